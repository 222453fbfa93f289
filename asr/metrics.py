"""Word and character error rates (jiwer), orthographic and normalised."""

from __future__ import annotations

import jiwer

from asr.text import NORMALIZERS


def _error_rate(refs: list[str], hyps: list[str], unit: str) -> tuple[int, int]:
    """(errors, reference length) summed over utterances; empty references count insertions only."""
    errors = total = 0
    scored = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    for r, h in zip(refs, hyps):
        if not r.strip():
            errors += len(h.split()) if unit == "word" else len(h.strip())
    if scored:
        fn = jiwer.process_words if unit == "word" else jiwer.process_characters
        out = fn([r for r, _ in scored], [h for _, h in scored])
        errors += out.substitutions + out.deletions + out.insertions
        total += out.substitutions + out.deletions + out.hits
    return errors, total


def error_rates(refs: list[str], hyps: list[str], normalizer: str = "basic") -> dict:
    """Corpus WER/CER in percent: `wer`, `cer` after normalising both sides, `wer_ortho`, `cer_ortho` as written."""
    norm = NORMALIZERS[normalizer]
    out = {}
    for suffix, (r, h) in {"": ([norm(x) for x in refs], [norm(x) for x in hyps]), "_ortho": (refs, hyps)}.items():
        for name, unit in (("wer", "word"), ("cer", "char")):
            errors, total = _error_rate(r, h, unit)
            out[name + suffix] = 100.0 * errors / max(total, 1)
    out["n"] = len(refs)
    return out


def utterance_wer(ref: str, hyp: str) -> float:
    errors, total = _error_rate([ref], [hyp], "word")
    return 100.0 * errors / max(total, 1)
