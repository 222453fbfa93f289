"""Training checkpoints: written atomically (temporary folder, then rename), newest complete
one found on restart, old ones pruned. A checkpoint folder `step-000123/` holds:

    model.pt      model state dict
    optimizer.pt  optimizer state dict
    trainer.pt    step, scheduler, scaler, sampler position, RNG states, best score, counters
    config.toml   the resolved config

A kill at any moment leaves either the complete folder or a `.tmp-*` one that `clean_partial` removes
on the next start (or, for a checkpoint that was being replaced by a re-save of the same step, moves
back); a failed write (disk full) raises CheckpointError naming the folder and leaves no `.tmp-*` behind.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = TMP_PREFIX + "old-"  # a complete folder moved aside while its replacement is renamed in
_OLD_DIR = re.compile(r"^\.tmp-old-(.+)-(\d+)$")  # .tmp-old-<name>-<pid>


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; one line."""


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
    """A binary file for torch.save that remembers the OSError its writes raised: torch.save's zip writer
    turns a failed write (ENOSPC, EFBIG, EIO) into a RuntimeError about stream positions."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        w = _WriteErrors(f)
        try:
            torch.save(obj, w)
        except Exception:
            if w.error is not None:
                raise w.error from None  # the real cause, e.g. "No space left on device"
            raise
        f.flush()
        os.fsync(f.fileno())


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
        _save_file(model_state, tmp / "model.pt")
        _save_file(optimizer_state, tmp / "optimizer.pt")
        _save_file(trainer_state, tmp / "trainer.pt")
        with open(tmp / "config.toml", "w", encoding="utf-8") as f:
            f.write(config_toml)
            f.flush()
            os.fsync(f.fileno())
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


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in ("model.pt", "optimizer.pt", "trainer.pt")):
            found.append((int(m.group(1)), p))
    return sorted(found)


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


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict, dict, dict]:
    """(model state, optimizer state, trainer state) of a checkpoint folder."""
    try:
        model = torch.load(path / "model.pt", map_location=map_location, weights_only=True)
        optim = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    return model, optim, trainer


def prune(folder: Path, keep_last: int, keep_steps: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep_last` checkpoints and those in `keep_steps` (e.g. the best)."""
    found = list_checkpoints(folder)
    recent = {s for s, _ in found[-keep_last:]} if keep_last > 0 else set()
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
