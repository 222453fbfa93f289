"""Error rates (jiwer), orthographic and normalised, signals of hallucination, and error analysis
(per-utterance S/D/I, aligned text, confusion pairs: icefall's errs files)."""

from __future__ import annotations

import zlib
from collections import Counter

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


# ---------------------------------------------------------------------------------------
# Error analysis (icefall's errs files): per-utterance S/D/I, aligned text, confusion pairs.


def _check_lengths(**columns) -> None:
    if len({len(v) for v in columns.values()}) > 1:
        raise ValueError("lengths differ: " + ", ".join(f"{k} {len(v)}" for k, v in columns.items()))


def _align(refs: list[str], hyps: list[str], unit: str) -> list[list[tuple]]:
    # Per utterance the aligned (ref, hyp) token pairs, None on the missing side. The rule of _error_rate:
    # ONE jiwer call over the non-empty references; an empty one aligns its hypothesis as insertions.
    tokens = str.split if unit == "word" else (lambda s: list(s.strip()))
    out = [[(None, t) for t in tokens(h)] for h in hyps]
    scored = [i for i, r in enumerate(refs) if r.strip()]
    if not scored:
        return out
    fn = jiwer.process_words if unit == "word" else jiwer.process_characters
    res = fn([refs[i] for i in scored], [hyps[i] for i in scored])
    for i, ref, hyp, chunks in zip(scored, res.references, res.hypotheses, res.alignments):
        pairs = []
        for c in chunks:
            r, h = ref[c.ref_start_idx : c.ref_end_idx], hyp[c.hyp_start_idx : c.hyp_end_idx]
            if c.type in ("equal", "substitute"):
                pairs += zip(r, h)  # a substitution block has as many tokens on both sides
            elif c.type == "delete":
                pairs += [(t, None) for t in r]
            else:
                pairs += [(None, t) for t in h]
        out[i] = pairs
    return out


def _counts(pairs: list[tuple], length: str = "ref_words") -> dict:
    s = sum(1 for r, h in pairs if r is not None and h is not None and r != h)
    d = sum(1 for _, h in pairs if h is None)
    i = sum(1 for r, _ in pairs if r is None)
    n = len(pairs) - i
    return {"substitutions": s, "deletions": d, "insertions": i, "hits": n - s - d, length: n}


def utterance_counts_all(refs: list[str], hyps: list[str], unit: str = "word") -> list[dict]:
    """Per utterance (normalised text, words split on whitespace): substitutions, deletions, insertions,
    hits, ref_words, from one jiwer.process_words call, so they sum exactly to the totals behind
    error_rates' wer; an empty reference counts its hypothesis words as insertions. With unit "char", the
    same over characters (ref_chars), as behind error_rates' cer."""
    _check_lengths(refs=refs, hyps=hyps)
    return [_counts(p, "ref_words" if unit == "word" else "ref_chars") for p in _align(refs, hyps, unit)]


def _totals(counts: list[dict], length: str = "ref_words", rate: str = "wer") -> dict:
    out = {k: sum(c[k] for c in counts) for k in ("substitutions", "deletions", "insertions", "hits", length)}
    errors = out["substitutions"] + out["deletions"] + out["insertions"]
    return {**out, rate: 100.0 * errors / max(out[length], 1)}


def _ranked(counter: Counter) -> list:
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))  # count desc, then text


def _confusions(aligned: list[list[tuple]]) -> dict:
    subs, dels, ins = Counter(), Counter(), Counter()
    for pairs in aligned:
        for r, h in pairs:
            if r is None:
                ins[h] += 1
            elif h is None:
                dels[r] += 1
            elif r != h:
                subs[r, h] += 1
    return {"substitutions": [{"ref": r, "hyp": h, "count": n} for (r, h), n in _ranked(subs)],
            "deletions": [{"ref": r, "count": n} for r, n in _ranked(dels)],
            "insertions": [{"hyp": h, "count": n} for h, n in _ranked(ins)]}


def _mark(pairs: list[tuple]) -> str:
    return " ".join(r if r == h else f"({r or '*'}->{h or '*'})" for r, h in pairs)


def error_analysis(ids: list[str], refs: list[str], hyps: list[str],
                   refs_ortho: list[str] | None = None, hyps_ortho: list[str] | None = None) -> dict:
    """What went wrong, on the normalised words: `totals` (substitutions, deletions, insertions, hits,
    ref_words, wer in percent, equal to error_rates' wer on the same text); `utterances`, per id its
    counts and `aligned`, the reference with errors marked as icefall does ("word (ref->hyp) (*->ins)
    (del->*)"); every `substitutions` {ref, hyp, count}, `deletions` {ref, count} and `insertions`
    {hyp, count}, count descending then text. With the orthographic text, `chars` holds the same at
    character level (totals with ref_chars and cer, equal to error_rates' cer_ortho; spaces count)."""
    _check_lengths(ids=ids, refs=refs, hyps=hyps)
    aligned = _align(refs, hyps, "word")
    counts = [_counts(p) for p in aligned]
    out = {"totals": _totals(counts),
           "utterances": [{"id": i, **c, "aligned": _mark(p)} for i, c, p in zip(ids, counts, aligned)],
           **_confusions(aligned)}
    if (refs_ortho is None) != (hyps_ortho is None):
        raise ValueError("refs_ortho and hyps_ortho must be given together")
    if refs_ortho is not None:
        _check_lengths(refs=refs, refs_ortho=refs_ortho, hyps_ortho=hyps_ortho)
        chars = _align(refs_ortho, hyps_ortho, "char")
        counts = [_counts(p, "ref_chars") for p in chars]
        out["chars"] = {"totals": _totals(counts, "ref_chars", "cer"), **_confusions(chars)}
    return out


def _ranked_lines(title: str, section: dict, top: int, show=str) -> list[str]:
    lines = [f"{title}SUBSTITUTIONS: count ref -> hyp"]
    lines += [f"{e['count']}   {show(e['ref'])} -> {show(e['hyp'])}" for e in section["substitutions"][:top]]
    lines += ["", f"{title}DELETIONS: count ref"]
    lines += [f"{e['count']}   {show(e['ref'])}" for e in section["deletions"][:top]]
    lines += ["", f"{title}INSERTIONS: count hyp"]
    lines += [f"{e['count']}   {show(e['hyp'])}" for e in section["insertions"][:top]]
    return lines + [""]


def format_errs(analysis: dict, top: int = 50) -> str:
    """An icefall-like errs.txt from error_analysis: %WER and counts, PER-UTT DETAILS (every utterance,
    in order), the `top` SUBSTITUTIONS, DELETIONS, INSERTIONS, then the same for characters (a space
    shown as ␣) when the analysis has them."""
    t = analysis["totals"]
    lines = [f"%WER = {t['wer']:.2f}",
             f"Errors: {t['insertions']} insertions, {t['deletions']} deletions, {t['substitutions']} "
             f"substitutions, over {t['ref_words']} reference words ({t['hits']} correct)",
             "Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, DELETIONS:, "
             "INSERTIONS:, CHAR SUBSTITUTIONS:, CHAR DELETIONS:, CHAR INSERTIONS:", "",
             "PER-UTT DETAILS: corr or (ref->hyp)"]
    lines += [f"{u['id']}:\t{u['aligned']}" for u in analysis["utterances"]]
    lines += [""] + _ranked_lines("", analysis, top)
    if "chars" in analysis:
        c = analysis["chars"]["totals"]
        lines += [f"%CER = {c['cer']:.2f} (orthographic)",
                  f"Errors: {c['insertions']} insertions, {c['deletions']} deletions, {c['substitutions']} "
                  f"substitutions, over {c['ref_chars']} reference characters ({c['hits']} correct)", ""]
        lines += _ranked_lines("CHAR ", analysis["chars"], top, lambda s: "␣" if s == " " else s)
    return "\n".join(lines)


def breakdown(keys: list[str], counts: list[dict]) -> dict:
    """WER per key (a speaker's client_id, a source) from utterance_counts_all's counts:
    {key: {"wer", "utterances", "ref_words", "errors"}} sorted by key; an unknown key ("" or None) is "".
    errors and ref_words sum over keys to the corpus totals, so the corpus WER is recovered from them."""
    _check_lengths(keys=keys, counts=counts)
    groups: dict[str, dict] = {}
    for key, c in zip(keys, counts):
        g = groups.setdefault(key or "", {"utterances": 0, "ref_words": 0, "errors": 0})
        g["utterances"] += 1
        g["ref_words"] += c["ref_words"]
        g["errors"] += c["substitutions"] + c["deletions"] + c["insertions"]
    return {k: {"wer": 100.0 * g["errors"] / max(g["ref_words"], 1), **g} for k, g in sorted(groups.items())}
