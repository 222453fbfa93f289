"""Losses as plain functions: `(outputs, batch) -> (loss_sum, n)`.

`outputs` is the model's output (`.logits`); `batch` holds targets and lengths on the device
(see `asr.models.loss_batch`). Each returns the summed loss and the count it is a sum over
(label tokens), so gradient accumulation can normalise by the whole window's count.
To add a loss: write a function, add it to LOSSES, set `train.loss` in the experiment file.
"""

from __future__ import annotations

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


LOSSES = {
    "ctc": ctc,
    "cross_entropy": cross_entropy,
}

DEFAULT_LOSS = {"ctc": "ctc", "whisper": "cross_entropy"}
