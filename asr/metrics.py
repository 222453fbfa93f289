"""Error rates (jiwer), orthographic and normalised, and signals of hallucination."""

from __future__ import annotations

import zlib

import jiwer

from asr.text import NORMALIZERS


def _error_rate(refs: list[str], hyps: list[str], unit: str) -> tuple[int, int, int]:
    """(errors, reference length, insertions) summed over utterances; empty references count insertions only."""
    errors = total = insertions = 0
    scored = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    for r, h in zip(refs, hyps):
        if not r.strip():
            n = len(h.split()) if unit == "word" else len(h.strip())
            errors += n
            insertions += n
    if scored:
        fn = jiwer.process_words if unit == "word" else jiwer.process_characters
        out = fn([r for r, _ in scored], [h for _, h in scored])
        errors += out.substitutions + out.deletions + out.insertions
        total += out.substitutions + out.deletions + out.hits
        insertions += out.insertions
    return errors, total, insertions


def error_rates(refs: list[str], hyps: list[str], normalizer: str = "script", languages: list[str] | None = None
                ) -> dict:
    """Corpus WER/CER in percent: `wer`, `cer` after normalising both sides (per utterance language),
    `wer_ortho`, `cer_ortho` as written; `n` utterances. Of no utterance at all, the rates are None."""
    if not refs:
        return {"wer": None, "cer": None, "wer_ortho": None, "cer_ortho": None, "n": 0}
    norm = NORMALIZERS[normalizer]
    langs = languages or [""] * len(refs)
    normalised = ([norm(x, lang) for x, lang in zip(refs, langs)], [norm(x, lang) for x, lang in zip(hyps, langs)])
    out = {}
    for suffix, (r, h) in {"": normalised, "_ortho": (refs, hyps)}.items():
        for name, unit in (("wer", "word"), ("cer", "char")):
            errors, total, _ = _error_rate(r, h, unit)
            out[name + suffix] = 100.0 * errors / max(total, 1)
    out["n"] = len(refs)
    return out


def utterance_wer(ref: str, hyp: str) -> float:
    errors, total, _ = _error_rate([ref], [hyp], "word")
    return 100.0 * errors / max(total, 1)


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes; Whisper treats above 2.4 as a sign of repetition."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def has_loop(words: list[str], max_n: int = 4, min_repeats: int = 3) -> bool:
    """True when some n-gram (n <= max_n) repeats back to back at least `min_repeats` times
    ("a b a b a b"), the decoder loop typical of hallucinating seq2seq models."""
    for n in range(1, max_n + 1):
        for start in range(len(words) - n * min_repeats + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    return False


def hallucination_metrics(refs: list[str], hyps: list[str]) -> dict:
    """Signals that a model invents or loops rather than transcribes (refs/hyps already normalised):
    insertion_rate (inserted words per reference word, percent), empty_rate (share of empty hypotheses
    for non-empty references, percent), loop_rate (share of hypotheses with a repeated n-gram loop,
    percent), compression_ratio (mean over non-empty hypotheses) and high_compression_rate (share above
    2.4, percent), length_ratio (hypothesis words over reference words). Of no utterance at all, None each."""
    if not refs:
        return dict.fromkeys(("insertion_rate", "empty_rate", "loop_rate", "compression_ratio",
                              "high_compression_rate", "length_ratio"))
    n = len(refs)
    _, total, insertions = _error_rate(refs, hyps, "word")
    ratios = [compression_ratio(h) for h in hyps if h.strip()]
    ref_words = sum(len(r.split()) for r in refs)
    return {
        "insertion_rate": 100.0 * insertions / max(total, 1),
        "empty_rate": 100.0 * sum(1 for r, h in zip(refs, hyps) if r.strip() and not h.strip()) / n,
        "loop_rate": 100.0 * sum(1 for h in hyps if has_loop(h.split())) / n,
        "compression_ratio": sum(ratios) / len(ratios) if ratios else 0.0,
        "high_compression_rate": 100.0 * sum(1 for r in ratios if r > 2.4) / n,
        "length_ratio": sum(len(h.split()) for h in hyps) / max(ref_words, 1),
    }
