"""Training checkpoints: written atomically (temporary folder, then rename), newest complete
one found on restart, old ones pruned. A checkpoint folder `step-000123/` holds:

    model.pt      model state dict
    optimizer.pt  optimizer state dict
    trainer.pt    step, scheduler, scaler, sampler position, RNG states, best score, counters
    config.toml   the resolved config
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"


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


def _save_file(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, step: int, model_state: dict, optimizer_state: dict, trainer_state: dict,
                    config_toml: str) -> Path:
    """Write `folder/step-NNNNNN` atomically; a failure leaves earlier checkpoints untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_dir_name(step)
    tmp = folder / f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}"
    try:
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
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            old = folder / f"{TMP_PREFIX}old-{step_dir_name(step)}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
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
    """Remove temporary folders left by an interrupted save; returns what was removed."""
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
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
            shutil.rmtree(path, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing `dst` with as short a gap as renames allow."""
    old = dst.with_name(f"{TMP_PREFIX}old-{dst.name}-{os.getpid()}")
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
