"""Losses as plain functions: `(outputs, batch, **train.loss_args) -> (loss_sum, n)`.

`outputs` is the model's output (`.logits`; with `hidden_states` too when the model is asked for them);
`batch` holds targets and lengths on the device (see `asr.models.loss_batch`). Each returns the summed loss
and the count it is a sum over (label tokens), so gradient accumulation can normalise by the whole
window's count. To add a loss: write a function, add it to LOSSES under the model family whose outputs it
reads, set `train.loss` (and its keyword arguments in `train.loss_args`) in the experiment file.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def ctc(outputs, batch) -> tuple[torch.Tensor, int]:
    """CTC over frames, log-softmax in float32, infeasible pairs zeroed (zero_infinity)."""
    log_probs = F.log_softmax(outputs.logits.float(), dim=-1)  # (B, T, V)
    labels = batch["labels"]  # (B, L), -100 padded
    loss = F.ctc_loss(
        log_probs.transpose(0, 1),  # (T, B, V)
        labels.clamp(min=0),
        batch["out_lengths"],
        batch["label_lengths"],
        blank=batch["blank"],
        reduction="sum",
        zero_infinity=True,
    )
    return loss, int(batch["label_lengths"].sum())


def cross_entropy(outputs, batch) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy over label tokens (Whisper); -100 marks padding."""
    logits = outputs.logits.float()  # (B, L, V)
    labels = batch["labels"]  # (B, L)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


def label_smoothing(outputs, batch, epsilon: float = 0.1) -> tuple[torch.Tensor, int]:
    """Cross-entropy against targets smoothed by `epsilon` (train.loss_args = { epsilon = 0.1 }), as in
    Whisper fine-tuning recipes that fight overfitting on small sets."""
    logits = outputs.logits.float()  # (B, L, V)
    labels = batch["labels"]  # (B, L)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum", label_smoothing=epsilon)
    return loss, int((labels != -100).sum())


LOSSES = {  # by model family: the outputs and batch keys a loss reads
    "ctc": {"ctc": ctc},
    "whisper": {"cross_entropy": cross_entropy, "label_smoothing": label_smoothing},
}

DEFAULT_LOSS = {"ctc": "ctc", "whisper": "cross_entropy"}


def loss_function(train_cfg, family: str):
    """The loss a run trains with: train.loss of `family` (its default when empty) with train.loss_args."""
    fn = LOSSES[family][train_cfg.loss or DEFAULT_LOSS[family]]
    return functools.partial(fn, **train_cfg.loss_args) if train_cfg.loss_args else fn


def check_loss(train_cfg, family: str) -> str | None:
    """Why train.loss / train.loss_args do not fit a loss of `family`, or None."""
    import inspect

    name = train_cfg.loss or DEFAULT_LOSS[family]
    if name not in LOSSES[family]:
        other = [f for f in LOSSES if name in LOSSES[f]]
        known = ", ".join(LOSSES[family])
        if other:
            return f"train.loss: {name!r} is a loss of {other[0]} models, not {family} ones (known: {known})"
        return f"train.loss: unknown loss {name!r} (known for {family} models: {known})"
    params = inspect.signature(LOSSES[family][name]).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = list(params)[2:]  # after (outputs, batch)
        unknown = sorted(set(train_cfg.loss_args) - set(accepted))
        if unknown:
            return f"train.loss_args: {name!r} takes no argument {unknown[0]!r} (it takes: {', '.join(accepted) or 'none'})"
    return None
