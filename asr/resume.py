"""Resuming a run: what a checkpoint carries besides weights (RunState), the settings a resumed run may and may
not change, loading the newest checkpoint that verifies into the training objects with this run's settings,
and the weights of a model alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asr import checkpoint as ckpt
from asr import distributed as dist
from asr.config import Config, ConfigError, config_changes, is_fixed, read_saved_config, toml_value
from asr.experiment import TrainingError
from asr.optim import apply_settings


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer: where the run is and what it has seen."""

    step: int = 0
    best: dict = field(default_factory=lambda: {"wer": math.inf, "cer": math.inf, "step": -1})
    totals: dict = field(default_factory=lambda: {"samples": 0, "audio_s": 0.0, "time": 0.0})
    baseline: dict = field(default_factory=dict)  # WER of each evaluation set at step 0 (forgetting)
    skipped_steps: int = 0  # non-finite steps skipped in the whole run
    sampler: dict = field(default_factory=lambda: {"epoch": 0, "position": 0})
    failed: dict = field(default_factory=lambda: {"epoch": None, "clips": []})  # this epoch's decode failures


def checkpoint_state(model: torch.nn.Module, names: set[str] | None) -> dict:
    """The model's state dict, or only the entries in `names` (train.save_trainable_only)."""
    state = model.state_dict()
    return state if names is None else {k: v for k, v in state.items() if k in names}


def load_model_state(model: torch.nn.Module, state: dict, names: set[str] | None, where: str) -> None:
    """Load a checkpoint's weights; with `names`, a partial state over the freshly built base model."""
    try:
        if names is None:
            model.load_state_dict(state)
        else:
            missing = set(state) - set(model.state_dict())
            if missing:
                raise RuntimeError(f"unexpected keys {sorted(missing)[:3]}")
            model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # another model, or a CTC head for another vocabulary than the run's
        raise TrainingError(f"{where} does not fit the configured model "
                            f"({str(e).strip().splitlines()[-1].strip()[:200]})") from None


def restore(path: Path, model, optimizer, scheduler, scaler, saved_names, device, tc) -> tuple[RunState, list]:
    """Load a (verified) checkpoint into the training objects, with the optimizer and schedule settings of train
    config `tc` (a resume may change them); returns the run state and every rank's RNG states."""
    if ckpt.is_sharded(path):  # train.parallel = fsdp: torch.distributed.checkpoint, saved at any world size
        trainer = ckpt.load_trainer(path)
        load_sharded_state(path, model, optimizer, saved_names)
    else:
        model_state, optim_state, trainer = ckpt.load_checkpoint(path, map_location=device, verified=True)
        load_model_state(model, model_state, saved_names, f"checkpoint {path}")
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as e:  # other parameter groups: train.lr_scale (or the model) changed since
            raise TrainingError(f"checkpoint {path}: its optimizer state does not fit this run ({e}); "
                                f"train.lr_scale changed? Resume with the old settings or start over with --fresh"
                                ) from None
    scheduler.load_state_dict(trainer["scheduler"])
    apply_settings(model, optimizer, scheduler, tc)
    if trainer["scaler"]:  # empty when saved without fp16 (train.precision or run.device changed since)
        scaler.load_state_dict(trainer["scaler"])
    state = RunState(trainer["step"], trainer["best"], trainer["totals"], trainer.get("baseline", {}),
                     trainer.get("skipped_steps", 0), trainer["sampler"],
                     trainer.get("failed", {"epoch": None, "clips": []}))
    return state, trainer["rng"]


def load_sharded_state(path: Path, model, optimizer, saved_names) -> None:
    """The model and optimizer (None: the model alone) of a sharded checkpoint (asr.fsdp.load_sharded), on every
    rank; a checkpoint that does not load is CorruptCheckpoint (renamed aside), a read error of the machine
    CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException

    from asr.fsdp import load_sharded

    try:
        load_sharded(path / ckpt.SHARDED, model, optimizer, saved_names)
    except (OSError, MemoryError, torch.OutOfMemoryError) as e:
        raise ckpt.CheckpointError(f"cannot read checkpoint {path}: {getattr(e, 'strerror', None) or e}") from None
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException: a shard that does not read, a key
        # or shape mismatch; it carries each failed rank's exception in `failures` ({rank: (exception, traceback)})
        causes = [f[0] for f in (getattr(e, "failures", None) or {}).values()] or [e]
        reason = next(filter(None, map(ckpt.io_error_reason, causes)), None)
        if reason:  # the machine's fault, not the checkpoint's
            raise ckpt.CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
        lines = [line.strip() for line in str(causes[0]).splitlines() if line.strip()]
        raise ckpt.CorruptCheckpoint(path, f"cannot be loaded: {type(causes[0]).__name__}"
                                           + (f": {lines[-1][:200]}" if lines else "")) from None


class ResumeError(ConfigError):
    """Settings a resumed run cannot take (exit status 2, like any settings error); one line."""


def saved_config_of(text: str) -> Config:
    try:
        return read_saved_config(text)
    except ConfigError as e:
        raise ResumeError(f"cannot read its config.toml ({e})") from None


def show(value) -> str:
    return "(unset)" if value is None else toml_value(value)


def check_resume(path: Path, cfg: Config) -> list[tuple[str, object, object]]:
    """The settings changes since checkpoint `path` (asr.config.config_changes); ResumeError, one line, when one of
    them cannot take effect on a resumed run (RESUME_FIXED)."""
    old_toml = ckpt.saved_config(path)
    try:
        if old_toml is None:
            raise ResumeError("its config.toml is missing or unreadable")
        changes = config_changes(saved_config_of(old_toml), cfg)
    except ResumeError as e:
        raise ResumeError(f"cannot resume from {path}: {e}; start over with --fresh or set another run.out_dir"
                          ) from None
    fixed = [f"{k} ({show(old)} -> {show(new)})" for k, old, new in changes if is_fixed(k)]
    if fixed:
        raise ResumeError(f"cannot resume {path.parent.parent} with changed settings that a resumed run cannot "
                          f"take: {', '.join(fixed)}; resume with the old values, start over with --fresh, or "
                          f"set another run.out_dir")
    return changes


def check_settings(cfg: Config) -> None:
    """Before the run folder is written to (config.toml): a ResumeError when the run would resume from a
    checkpoint saved with settings it cannot change (config.RESUME_FIXED)."""
    for _, path in reversed(ckpt.step_dirs(Path(cfg.run.out_dir) / "checkpoints")):
        if ckpt.saved_config(path) is not None:  # else a broken checkpoint, renamed aside later
            check_resume(path, cfg)
            return


def load_newest(ck_dir: Path, log, load) -> tuple[Path | None, object]:
    """(path, `load(path)`) of the newest checkpoint in `ck_dir` that verifies and loads, on every rank, or
    (None, None). One that fails either is renamed aside (`step-N.corrupt`) with a log line saying why."""
    while True:
        if dist.is_main():
            ckpt.newest_verified(ck_dir, log)  # renames aside the newer ones that fail verification
        dist.barrier()
        path = ckpt.latest_checkpoint(ck_dir)
        if path is None:
            return None, None
        try:
            result, reason = load(path), None
        except ckpt.CorruptCheckpoint as e:
            result, reason = None, e.reason
        (failed,) = dist.sum_values(float(reason is not None))
        if not failed:
            return path, result
        if dist.is_main():
            ckpt.set_aside(path, reason or "cannot be loaded on another rank", log)
