"""Decoders: pure functions from model outputs to token ids, and ids to text."""

from __future__ import annotations

import torch


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks.

    log_probs (B, T, V) (or logits: the argmax is the same), lengths (B,) valid frames per item.
    """
    best = log_probs.argmax(dim=-1).cpu()  # (B, T)
    out = []
    for b in range(best.shape[0]):
        path = best[b, : int(lengths[b])].tolist()
        ids, prev = [], None
        for t in path:
            if t != prev and t != blank:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


@torch.no_grad()
def whisper_generate(bundle, batch: dict, device: torch.device, method: str = "greedy", beam_size: int = 4,
                     max_new_tokens: int = 225) -> list[str]:
    """Batched Whisper decoding through `generate`, forced to each utterance's language and the task."""
    from asr.models import model_inputs

    inputs = model_inputs(bundle, batch, device)
    languages = [bundle.whisper_language(lang) for lang in batch["languages"]]
    kwargs = {"task": bundle.cfg.task, "max_new_tokens": max_new_tokens}
    if all(languages):
        kwargs["language"] = languages
    kwargs["num_beams"] = beam_size if method == "beam" else 1
    ids = bundle.model.generate(input_features=inputs["input_features"], **kwargs)
    return bundle.tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.no_grad()
def ctc_decode(bundle, outputs, batch: dict) -> list[str]:
    """Greedy CTC decoding of a forward pass to text."""
    lengths = bundle.model._get_feat_extract_output_lengths(batch["audio_lengths"])
    return [bundle.vocab.decode(ids) for ids in ctc_greedy(outputs.logits, lengths, bundle.vocab.blank)]
