"""Training checkpoints: written atomically (temporary folder, then rename), newest complete
one found on restart, old ones pruned. A checkpoint folder `step-000123/` holds:

    model.pt      model state dict
    optimizer.pt  optimizer state dict
    trainer.pt    step, scheduler, scaler, sampler position, RNG states, best score, counters
    config.toml   the resolved config
    manifest.json each file's size and how its bytes are checked: the CRC-32 that torch.save's zip writer
                  already computes of every record as it writes it (the .pt files), or a blake2b digest
                  computed as the file is written (config.toml; a .pt file when torch's CRC-32 is off)

A sharded checkpoint (train.parallel = "fsdp") holds `state/` (torch.distributed.checkpoint: `.metadata` and
each rank's `__R_0.distcp`, the model and optimizer together) instead of model.pt and optimizer.pt; its manifest
lists every file of `state/` with its blake2b digest (DCP keeps no checksums of its own).

A kill at any moment leaves either the complete folder or a `.tmp-*` one that `clean_partial` removes
on the next start (or, for a checkpoint that was being replaced by a re-save of the same step, moves
back); a failed write (disk full) raises CheckpointError naming the folder and leaves no `.tmp-*` behind.
A checkpoint whose files do not match its manifest, or that cannot be loaded, is renamed aside
(`step-N.corrupt`) by `newest_verified`, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = TMP_PREFIX + "old-"  # a complete folder moved aside while its replacement is renamed in
_OLD_DIR = re.compile(r"^\.tmp-old-(.+)-(\d+)$")  # .tmp-old-<name>-<pid>
FILES = ("model.pt", "optimizer.pt", "trainer.pt", "config.toml")
SHARDED = "state"  # a sharded checkpoint's torch.distributed.checkpoint folder (model and optimizer)
MANIFEST = "manifest.json"
HASH = "blake2b"
ZIP_CRC = "zip-crc32"  # the manifest's check of a torch.save file: the CRC-32 of each of its zip records
_new_hash = hashlib.blake2b


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; one line."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files fail verification against its manifest, or fail to load."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is corrupt: {reason}")
        self.path, self.reason = path, reason


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class _WriteErrors:
    """A binary file for torch.save that hashes and counts what goes through it, and remembers the OSError its
    writes raised: torch.save's zip writer turns a failed write (ENOSPC, EFBIG, EIO) into a RuntimeError
    about stream positions."""

    def __init__(self, f, hashed: bool):
        self.f = f
        self.error: OSError | None = None
        self.hash = _new_hash() if hashed else None
        self.size = 0

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        if self.hash is not None:
            self.hash.update(data)
        self.size += n
        return n

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def _save_file(obj, path: Path) -> dict:
    """torch.save `obj` (bytes: written as they are) to `path`, synced; returns its manifest entry. A blake2b
    digest of the bytes is computed only where torch.save's own CRC-32s do not check them: hashing every byte
    again would add about as much time as the save itself takes (tests/bench/bench_checkpoint.py)."""
    zip_crc = not isinstance(obj, bytes) and torch.serialization.get_crc32_options()
    with open(path, "wb") as f:
        w = _WriteErrors(f, hashed=not zip_crc)
        try:
            w.write(obj) if isinstance(obj, bytes) else torch.save(obj, w)
        except Exception:
            if w.error is not None:
                raise w.error from None  # the real cause, e.g. "No space left on device"
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"size": w.size, "check": ZIP_CRC} if zip_crc else {"size": w.size, HASH: w.hash.hexdigest()}


def save_checkpoint(folder: Path, step: int, model_state: dict, optimizer_state: dict, trainer_state: dict,
                    config_toml: str) -> Path:
    """Write `folder/step-NNNNNN` atomically; a failure (CheckpointError) leaves earlier checkpoints
    untouched and no temporary folder behind."""
    final = folder / step_dir_name(step)
    tmp = folder / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        objects = (model_state, optimizer_state, trainer_state, config_toml.encode("utf-8"))
        files = {name: _save_file(obj, tmp / name) for name, obj in zip(FILES, objects)}
        _save_file(json.dumps({"files": files}, indent=1).encode("utf-8"), tmp / MANIFEST)
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) replaces it
        _fsync_dir(folder)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = io_error_reason(e)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}") from None
    except BaseException:  # KeyboardInterrupt: nothing half-written stays behind either
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _file_entry(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"size": path.stat().st_size, HASH: hashlib.file_digest(f, _new_hash).hexdigest()}


def save_sharded_checkpoint(folder: Path, step: int, state: dict, trainer_state: dict, config_toml: str) -> Path:
    """Every rank: write `folder/step-NNNNNN` atomically as a sharded checkpoint. `state` (asr.fsdp.sharded_state)
    goes through torch.distributed.checkpoint into `state/`, each rank writing its own shards and digesting them
    for the manifest; rank 0 writes trainer.pt, config.toml and manifest.json and renames the folder into place.
    A failure on any rank raises CheckpointError on every rank and leaves earlier checkpoints untouched and no
    temporary folder behind."""
    import torch.distributed.checkpoint as dcp

    from asr import distributed as dist
    from asr.fsdp import quiet_dcp

    final = folder / step_dir_name(step)
    pid = dist.gather_rows([os.getpid()])[0]  # one temporary folder for all ranks: rank 0's
    tmp = folder / f"{TMP_PREFIX}{step_dir_name(step)}-{pid}"
    error = None

    def agree(phase) -> None:
        nonlocal error
        try:
            phase()
        except (Exception, dcp.api.CheckpointException) as e:  # DCP's is a BaseException
            error = error or e
        (failed,) = dist.sum_values(float(error is not None))
        if failed:
            if dist.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            reason = (io_error_reason(error) or dcp_error_reason(error)) if error is not None else None
            if error is not None and reason is None:
                raise error
            raise CheckpointError(f"cannot write checkpoint {final}: {reason or 'failed on another rank'}") from None

    def start() -> None:
        if dist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

    entries = {}

    def write_shards() -> None:
        with quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp / SHARDED))
        mine = sorted((tmp / SHARDED).glob(f"__{dist.rank()}_*"))
        if dist.is_main():
            mine.append(tmp / SHARDED / ".metadata")
        entries.update((f"{SHARDED}/{p.name}", _file_entry(p)) for p in mine)

    def finish() -> None:
        if dist.is_main():
            files = dict(rows)
            files["trainer.pt"] = _save_file(trainer_state, tmp / "trainer.pt")
            files["config.toml"] = _save_file(config_toml.encode("utf-8"), tmp / "config.toml")
            _save_file(json.dumps({"files": files}, indent=1).encode("utf-8"), tmp / MANIFEST)
            _fsync_dir(tmp / SHARDED)
            _fsync_dir(tmp)
            replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) replaces it
            _fsync_dir(folder)

    try:
        agree(start)
        dist.barrier()
        agree(write_shards)
        rows = dist.gather_rows(sorted(entries.items()))
        agree(finish)
    except BaseException:  # KeyboardInterrupt: nothing half-written stays behind either
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def dcp_error_reason(e: BaseException) -> str | None:
    """Why torch.distributed.checkpoint failed, in one line: its CheckpointException carries each failed rank's
    exception in `failures` ({rank: (exception, traceback)}); the operating system's reason (disk full) when
    one has it, else the first one's type and message. None for another exception."""
    inner = [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
    inner = [x for x in inner if isinstance(x, BaseException)]
    for x in inner:
        if reason := io_error_reason(x):
            return reason
    if not inner:
        return None
    lines = str(inner[0]).strip().splitlines()
    return f"{type(inner[0]).__name__}: {lines[0][:200]}" if lines else type(inner[0]).__name__


def load_trainer(path: Path) -> dict:
    """trainer.pt of a (verified) sharded checkpoint; CorruptCheckpoint when it does not load."""
    try:
        return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except (OSError, MemoryError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {getattr(e, 'strerror', None) or e}") from None
    except Exception as e:
        raise CorruptCheckpoint(path, f"cannot be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                ) from None


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Every `step-N` folder in `folder`, complete or not, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def is_sharded(path: Path) -> bool:
    """Whether checkpoint folder `path` is a sharded one (torch.distributed.checkpoint, train.parallel = fsdp)."""
    return (path / SHARDED).is_dir()


def required_files(path: Path) -> list[str]:
    """The files without which checkpoint folder `path` is incomplete."""
    return ["trainer.pt", f"{SHARDED}/.metadata"] if is_sharded(path) else list(FILES[:3])


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` (none of their files missing), oldest first."""
    return [(s, p) for s, p in step_dirs(folder) if all((p / f).is_file() for f in required_files(p))]


def _manifest(path: Path) -> dict | str | None:
    """A checkpoint's manifest {file name: entry}, None when it has none, or why it cannot be read."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        if not all(isinstance(e, dict) and isinstance(e.get("size"), int) for e in files.values()):
            raise ValueError("an entry without a size")
        return files
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"


def verify(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be trusted (a file missing, of another size than its manifest says,
    or whose bytes fail the manifest's check), or None. A checkpoint saved before manifests existed has only
    its files' presence checked."""
    missing = [f for f in required_files(path) if not (path / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    files = _manifest(path)
    if isinstance(files, str):
        return files
    for name, entry in (files or {}).items():
        reason = _check_file(path, name, entry)
        if reason is not None:
            return reason
    return None


def _check_file(path: Path, name: str, entry: dict) -> str | None:
    p = path / name
    if not p.is_file():
        return f"{name} missing"
    if p.stat().st_size != entry["size"]:
        return f"{name} has {p.stat().st_size} bytes, its manifest says {entry['size']}"
    try:
        with open(p, "rb") as f:
            if HASH in entry:
                ok = hashlib.file_digest(f, _new_hash).hexdigest() == entry[HASH]
                return None if ok else f"{name} does not match its manifest's {HASH} digest"
            if entry.get("check") == ZIP_CRC:
                return _check_zip(f, name)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {name}: {e.strerror or e}") from None
    return f"{MANIFEST} names no check for {name}"


def _check_zip(f, name: str) -> str | None:
    """Read every record of a torch.save zip file, checking its CRC-32 (torch.load does not)."""
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except MemoryError:
        raise
    except Exception as e:  # any damage to the zip's structure (BadZipFile, EOFError, a seek out of range...)
        return f"{name} is not an intact zip file ({type(e).__name__}: {str(e)[:120]})"
    return None if bad is None else f"{name}: record {bad} fails its CRC-32 check"


def saved_config(path: Path) -> str | None:
    """The text of checkpoint `path`'s config.toml, or None when it is missing or fails its manifest's check
    (only that file is checked: it is small)."""
    files = _manifest(path)
    try:
        if isinstance(files, str) or (files is not None and "config.toml" not in files):
            return None
        if files is not None and _check_file(path, "config.toml", files["config.toml"]) is not None:
            return None
        return (path / "config.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, CheckpointError):
        return None


def set_aside(path: Path, reason: str, log) -> Path:
    """Rename a corrupt checkpoint to `step-N.corrupt` (`.corrupt-2`, ... when taken), never deleting it."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    try:
        path.rename(target)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt ({reason}) and cannot be renamed aside: "
                              f"{e.strerror or e}") from None
    log(f"checkpoint {path} is corrupt ({reason}): renamed to {target.name}")
    return target


def newest_verified(folder: Path, log) -> Path | None:
    """The newest checkpoint in `folder` that verifies; every newer one is renamed aside (`set_aside`), each
    with a log line saying why. One saved before manifests existed is returned unverified, with a log line."""
    for _, path in reversed(step_dirs(folder)):
        reason = verify(path)
        if reason is None:
            if not (path / MANIFEST).is_file():
                log(f"checkpoint {path} has no {MANIFEST} (saved before checkpoints were verified): "
                    f"loading it unverified")
            return path
        set_aside(path, reason, log)
    return None


def clean_partial(folder: Path) -> list[Path]:
    """Remove temporary folders left by an interrupted save; returns what was removed.

    A complete folder that a save had moved aside to replace it (`.tmp-old-<name>-<pid>`) is moved back
    when the kill came before its replacement was renamed in, so no complete checkpoint is lost."""
    removed = []
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if not p.name.startswith(TMP_PREFIX):
                continue
            m = _OLD_DIR.match(p.name)
            if m and not (folder / m.group(1)).exists():
                p.rename(folder / m.group(1))
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_checkpoint(path: Path, map_location="cpu", verified: bool = False) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, trainer state) of a checkpoint folder, verified against its manifest
    first unless `verified` already. CorruptCheckpoint when it fails that or does not load; CheckpointError
    when it cannot be read for another reason (a read error, no memory)."""
    reason = None if verified else verify(path)
    if reason is not None:
        raise CorruptCheckpoint(path, reason)
    try:
        model = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
        optim = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except (OSError, MemoryError, torch.OutOfMemoryError) as e:  # the machine's fault, not the checkpoint's
        detail = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {detail}") from None
    except Exception as e:
        raise CorruptCheckpoint(path, f"cannot be loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                ) from None
    return model, optim, trainer


def prune(folder: Path, keep_last: int, keep_steps: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep_last` checkpoints (0: keep all) and those in `keep_steps` (the best's,
    the one just saved). Folders that are not complete checkpoints are never touched."""
    if keep_last < 1:
        return
    found = list_checkpoints(folder)
    recent = {s for s, _ in found[-keep_last:]}
    for step, path in found:
        if step not in recent and step not in keep_steps:
            # Renamed first: a kill during the deletion leaves a .tmp-* folder that clean_partial removes,
            # not a half-deleted step-N.
            doomed = path.with_name(f"{TMP_PREFIX}prune-{path.name}-{os.getpid()}")
            try:
                path.rename(doomed)
            except OSError:
                doomed = path
            shutil.rmtree(doomed, ignore_errors=True)


def io_error_reason(e: BaseException) -> str | None:
    """The operating-system reason ("No space left on device") behind a failed write, or None when `e`
    is not one: an OSError, or a library's own error that wraps or reports one (safetensors raises
    SafetensorError "... (os error 28)", torch.save a RuntimeError whose context is the OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            return e.strerror or str(e) or type(e).__name__
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return os.strerror(int(m.group(1)))
        e = e.__cause__ or e.__context__
    return None


def finite_json(obj):
    """`obj` with every non-finite float (NaN, inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 1) -> str:
    """Strict JSON of `obj` (what every JSON file of a run is written with): non-finite floats become null,
    never the bare NaN/Infinity that Python writes and other JSON readers reject."""
    return json.dumps(finite_json(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def write_files(files: dict[Path, bytes | str]) -> None:
    """Write each file atomically (a temporary file beside it, then a rename), all renamed only once all
    were written: a failure leaves every file as it was and no temporary file behind. A write that fails
    for a reason of the operating system (disk full) raises CheckpointError naming the file."""
    tmps: dict[Path, Path] = {}
    path = None
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmps[path] = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except Exception as e:
        for tmp in tmps.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        reason = io_error_reason(e)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write {path}: {reason}") from None


def write_folder(folder: Path, write) -> None:
    """Write a folder atomically: `write(tmp)` fills a temporary folder beside `folder`, which then replaces
    it. A write that fails for a reason of the operating system (disk full, file too large, read-only)
    raises CheckpointError naming `folder` and leaves neither a temporary folder nor a changed `folder`."""
    tmp = folder.with_name(f"{TMP_PREFIX}{folder.name}-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        _fsync_dir(tmp)
        replace_dir(tmp, folder)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = io_error_reason(e)
        if reason is None:
            raise
        raise CheckpointError(f"cannot write {folder}: {reason}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing `dst` with as short a gap as renames allow (a kill inside the
    gap leaves `dst` as `.tmp-old-<name>-<pid>`, which `clean_partial` of dst's folder moves back)."""
    old = dst.with_name(f"{OLD_PREFIX}{dst.name}-{os.getpid()}")
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
