"""The optimizer and the learning-rate schedule: AdamW with per-pattern learning-rate scales, linear warmup
then linear / cosine decay (or constant) to zero at train.max_steps."""

from __future__ import annotations

import math
import re

import torch


def optimizer_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """AdamW's parameter groups with their settings from train config `cfg`, always in the same order: no
    weight decay on biases and norm weights (1-D parameters); `train.lr_scale` multiplies the learning rate
    of matching parameters (the first matching pattern counts). Frozen parameters simply get no gradient."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        scale = next((v for pattern, v in cfg.lr_scale.items() if re.search(pattern, name)), 1.0)
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale,
             "betas": tuple(cfg.betas), "eps": cfg.eps} for (decay, scale), ps in groups.items()]


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over `optimizer_groups`."""
    return torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_lambda(cfg):
    """Multiplier of the peak learning rate at a step: linear warmup, then linear/cosine decay or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(progress, 1.0)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def apply_settings(model: torch.nn.Module, optimizer, scheduler, cfg) -> None:
    """Give a restored optimizer and schedule the settings of train config `cfg` (a resume may change them):
    peak learning rate (times each group's lr_scale), weight decay, betas and eps of each group, and the
    learning rate of the next step from this schedule (lr, warmup, schedule, max_steps: e.g. a run extended
    after it finished). With the settings the checkpoint was saved with, nothing changes."""
    for group, new in zip(optimizer.param_groups, optimizer_groups(model, cfg)):
        group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler.lr_lambdas = [lr_lambda(cfg)] * len(optimizer.param_groups)
    for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
