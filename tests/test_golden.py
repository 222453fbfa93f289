"""Golden runs (torchtune style): the first 10 training losses and a checksum of the final weights of a tiny
seeded CTC run and a tiny Whisper run, pinned to the values the code gave before the training loop was
refactored (issue 14), in fp32. A refactor that changes what the loop computes (the order of random draws, the
loss normalisation, accumulation, clipping, the schedule) changes these numbers; one that only moves code
does not. CPU, one thread, deterministic.

To re-pin after an intended change of behaviour, print the values from a run of `golden_run` and say why in
the commit."""

from __future__ import annotations

import pytest
import torch

from asr.train import train

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import final_params, needs_whisper_base, tiny_ctc_config, tiny_whisper_config

STEPS = 10

CTC_LOSSES = [11.505419995411334, 9.838437951129416, 10.265690758114768, 9.412494721283784, 8.98128221855789,
              9.199866485595702, 9.05847799366918, 8.701297883064516, 8.477586177357455, 8.283787168305496]
CTC_CHECKSUM = (406.229376598759, 3021.6170106729683, -5.571906874571749)

WHISPER_LOSSES = [10.85342524601863, 10.808726435122283, 10.754387350643382, 10.774078369140625,
                  10.675501623819041, 10.721213827327807, 10.690125685471754, 10.664541015625, 10.61218690035636,
                  10.622076181265024]
WHISPER_CHECKSUM = (10211.262434116505, 85448.21412779615, -1437.5111388356058)


def checksum(state: dict) -> tuple[float, float, float]:
    """Sum, absolute sum and a position-weighted sum of every tensor (float64, keys in sorted order): a
    permutation or sign change inside a tensor changes the third even where the first two stay."""
    total = absolute = weighted = 0.0
    for k in sorted(state):
        t = state[k].double().flatten()
        total += float(t.sum())
        absolute += float(t.abs().sum())
        ramp = torch.linspace(-1, 1, t.numel(), dtype=torch.float64) if t.numel() > 1 else torch.ones(1, dtype=torch.float64)
        weighted += float((t * ramp).sum())
    return total, absolute, weighted


def golden_run(cfg) -> tuple[list[float], tuple[float, float, float]]:
    results = train(cfg)
    losses = [loss for _, loss in results["train_loss"]]
    return losses, checksum(final_params(f"{cfg.run.out_dir}/checkpoints/step-{STEPS:06d}"))


def test_golden_ctc_run(tmp_path):
    """Dropout, SpecAugment time masks and gradient accumulation on: the random draws and the accumulation
    window are part of what is pinned."""
    cfg = tiny_ctc_config(tmp_path / "run", max_steps=STEPS, log_every=1, grad_accum=2, warmup_steps=2)
    m = cfg.model
    m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.feat_proj_dropout = m.final_dropout = 0.1
    m.mask_time_prob, m.mask_time_length = 0.3, 2
    cfg.data.batch_size = 4
    cfg.eval.at_start = False
    losses, sums = golden_run(cfg)
    assert losses == pytest.approx(CTC_LOSSES, rel=1e-6)
    assert sums == pytest.approx(CTC_CHECKSUM, rel=1e-6)


@needs_whisper_base
def test_golden_whisper_run(tmp_path):
    """fp32: `auto` is bf16 for Whisper on a CPU with native bf16, fp32 on one without, so pinned explicitly."""
    cfg = tiny_whisper_config(tmp_path / "run", max_steps=STEPS, log_every=1, precision="fp32")
    cfg.eval.at_start = False
    losses, sums = golden_run(cfg)
    assert losses == pytest.approx(WHISPER_LOSSES, rel=1e-6)
    assert sums == pytest.approx(WHISPER_CHECKSUM, rel=1e-6)


def test_the_checksum_sees_a_swap_inside_a_tensor():
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([3.0, 2.0, 1.0])}
    assert checksum(a)[:2] == checksum(b)[:2] and checksum(a)[2] != checksum(b)[2]
