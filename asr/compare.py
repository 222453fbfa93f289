"""Is B better than A? Paired bootstrap significance of a WER/CER difference (Bisani & Ney 2004).

    python -m asr.compare runs/a/eval/step-000400.tsv runs/b/eval/step-000400.tsv
    python -m asr.compare runs/a runs/b                     (newest step of each, every set both have)
    python -m asr.compare runs/a runs/b --step 400 --set cv-tr --json
    python -m asr.compare runs/a runs/a --eval-only test.greedy --eval-only-b test.beam8

A and B are eval TSVs (columns id, reference, hypothesis, optionally language; others are ignored) or
run folders. In a run folder, training evaluations are eval/step-000400.tsv (the first set) and
eval/step-000400.<set>.tsv (the others); `--eval-only` files are eval/step-000400.<split>.<tag>.tsv and
eval/step-000400.<split>.<tag>.<set>.tsv. Each is found through the .json written beside it, which
names its set. Utterances are paired by id. Word and character errors are counted per utterance on the
normalised text, exactly as asr.metrics.error_rates counts them for the eval JSON; the utterances are
then resampled with replacement, the same indices for A and B, and the corpus WER of both is computed
on every resample: the 2.5 and 97.5 percentiles of WER_B - WER_A are the 95% interval, and the share
of resamples where WER_B < WER_A is the probability that B is better.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tomllib
from pathlib import Path

import numpy as np

from asr.metrics import utterance_counts_all
from asr.text import NORMALIZERS


class CompareError(Exception):
    """Bad input: a missing file, TSVs that do not pair up, an unknown step or set."""


# ---------------------------------------------------------------------------------------
# Per-utterance errors and the bootstrap.


def _counts(refs: list[str], hyps: list[str], unit: str) -> tuple[np.ndarray, np.ndarray]:
    counts = utterance_counts_all(refs, hyps, unit)
    length = "ref_words" if unit == "word" else "ref_chars"
    errors = [c["substitutions"] + c["deletions"] + c["insertions"] for c in counts]
    return np.array(errors, dtype=np.int64), np.array([c[length] for c in counts], dtype=np.int64)


def utterance_errors(refs: list[str], hyps: list[str], normalizer: str = "script",
                     languages: list[str] | None = None) -> dict[str, np.ndarray]:
    """Per utterance, after normalising both sides (each in its language): word_errors, words,
    char_errors, chars, int arrays (n,). Their sums give asr.metrics.error_rates' wer and cer exactly."""
    norm = NORMALIZERS[normalizer]
    langs = languages or [""] * len(refs)
    r = [norm(x, lang) for x, lang in zip(refs, langs)]
    h = [norm(x, lang) for x, lang in zip(hyps, langs)]
    word_errors, words = _counts(r, h, "word")
    char_errors, chars = _counts(r, h, "char")
    return {"word_errors": word_errors, "words": words, "char_errors": char_errors, "chars": chars}


def corpus_rate(errors: np.ndarray, lengths: np.ndarray) -> float:
    """Corpus error rate in percent: all errors over all reference units, as asr.metrics computes it."""
    return 100.0 * int(errors.sum()) / max(int(lengths.sum()), 1)


def resampled_sums(columns: list[np.ndarray], resamples: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Bootstrap over utterances: draw `resamples` samples of n utterance indices with replacement
    (numpy default_rng(seed)), the same for every column, and return each column's sum over every
    sample, (resamples,) each. Drawn in blocks of about a million indices, so 10k utterances are fine."""
    n = len(columns[0])
    if n == 0:
        return [np.zeros(resamples, np.int64) for _ in columns]
    rng = np.random.default_rng(seed)
    block = max(1, min(resamples, 1_000_000 // max(n, 1)))
    sums = [[] for _ in columns]
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))  # (block, n)
        for out, col in zip(sums, columns):
            out.append(col[idx].sum(axis=1))
    return [np.concatenate(s) for s in sums]


def bootstrap_ci(errors, ref_words, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval (percent) of one system's corpus WER from per-utterance errors and
    reference words (e.g. utterance_errors()["word_errors"], ["words"])."""
    e, w = resampled_sums([np.asarray(errors, np.int64), np.asarray(ref_words, np.int64)], resamples, seed)
    low, high = np.percentile(100.0 * e / np.maximum(w, 1), [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap(errors_a, errors_b, lengths, resamples: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of B - A (Bisani & Ney 2004): `diff` (percent points, on all utterances),
    `diff_ci95` [low, high] (2.5 and 97.5 percentiles over resamples), `p_b_better` (share of resamples where
    B's rate is lower), `significant` (the interval excludes 0)."""
    a, b, n = (np.asarray(x, np.int64) for x in (errors_a, errors_b, lengths))
    sa, sb, sn = resampled_sums([a, b, n], resamples, seed)
    diff = 100.0 * sb / np.maximum(sn, 1) - 100.0 * sa / np.maximum(sn, 1)  # (resamples,)
    low, high = (float(x) for x in np.percentile(diff, [2.5, 97.5]))
    return {"diff": corpus_rate(b, n) - corpus_rate(a, n), "diff_ci95": [low, high],
            "p_b_better": float(np.mean(sb < sa)), "significant": low > 0 or high < 0}


# ---------------------------------------------------------------------------------------
# Eval TSVs and run folders.

_STEM = re.compile(r"^step-(\d+)(?:\.(.+))?$")


def read_eval_tsv(path: Path) -> dict[str, tuple[str, str, str | None]]:
    """{id: (reference, hypothesis, language or None)} in file order; columns are found by name."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CompareError(f"{path}: cannot read ({e})") from None
    if not rows:
        raise CompareError(f"{path}: empty file (expected a header: id, reference, hypothesis)")
    header = rows[0]
    missing = [c for c in ("id", "reference", "hypothesis") if c not in header]
    if missing:
        raise CompareError(f"{path}: no column {', '.join(repr(c) for c in missing)} in the header")
    col = {name: header.index(name) for name in ("id", "reference", "hypothesis", "language") if name in header}
    out = {}
    for line, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise CompareError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        utt = row[col["id"]]
        if utt in out:
            raise CompareError(f"{path}:{line}: id {utt!r} appears twice")
        out[utt] = (row[col["reference"]], row[col["hypothesis"]], row[col["language"]] if "language" in col else None)
    if not out:
        raise CompareError(f"{path}: no utterances")
    return out


def run_evals(run: Path) -> list[dict]:
    """The evaluations in `run`/eval: {tsv, step, variant ("" for training evaluations, "<split>.<tag>"
    for --eval-only ones), set, first}, one per TSV with a JSON beside it, ordered by step."""
    found = []
    for js in sorted((run / "eval").glob("step-*.json")):
        m, tsv = _STEM.match(js.stem), js.with_suffix(".tsv")
        if not m or not tsv.is_file():
            continue
        try:
            name = json.loads(js.read_text(encoding="utf-8"))["set"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CompareError(f"{js}: cannot read the set name ({type(e).__name__}: {e})") from None
        rest = m.group(2) or ""
        if rest == "":  # step-N.tsv: the first set of a training evaluation
            variant, first = "", True
        elif rest == name:  # step-N.<set>.tsv
            variant, first = "", False
        elif rest.endswith("." + name):  # step-N.<split>.<tag>.<set>.tsv
            variant, first = rest[: -len(name) - 1], False
        else:  # step-N.<split>.<tag>.tsv
            variant, first = rest, True
        found.append({"tsv": tsv, "step": int(m.group(1)), "variant": variant, "set": name, "first": first})
    return sorted(found, key=lambda e: (e["step"], not e["first"]))


def pick_evals(run: Path, variant: str, step: int | None, sets: list[str] | None) -> list[dict]:
    """The evaluations of `run` to compare: of `variant`, at `step` (default: the newest), of `sets`
    (default: all, the first set first)."""
    evals = run_evals(run)
    if not evals:
        raise CompareError(f"{run}: no evaluations (eval/step-N[...].tsv with its .json)")
    what = f"--eval-only {variant}" if variant else "training"
    mine = [e for e in evals if e["variant"] == variant]
    if not mine:
        others = sorted({e["variant"] for e in evals} - {""})
        hint = f"--eval-only evaluations there: {', '.join(others)}" if others else "only training evaluations there"
        raise CompareError(f"{run}: no {what} evaluations ({hint})")
    steps = sorted({e["step"] for e in mine})
    step = steps[-1] if step is None else step
    mine = [e for e in mine if e["step"] == step]
    if not mine:
        raise CompareError(f"{run}: no {what} evaluation at step {step} (steps: {', '.join(map(str, steps))})")
    if sets is not None:
        missing = [s for s in sets if s not in {e["set"] for e in mine}]
        if missing:
            raise CompareError(f"{run}: no evaluation of set {missing[0]!r} at step {step} "
                               f"(sets: {', '.join(e['set'] for e in mine)})")
        mine = [e for e in mine if e["set"] in sets]
    return mine


def run_settings(run: Path) -> tuple[str | None, dict[str, str]]:
    """(eval.normalizer, {source name: language}) from a run's config.toml; (None, {}) without one.
    Utterance ids are "<source name>/...", so a source's language applies to its utterances."""
    path = run / "config.toml"
    if not path.is_file():
        return None, {}
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CompareError(f"{path}: cannot read ({e})") from None
    from asr.config import SourceConfig, source_name

    langs = {}
    for s in cfg.get("data", {}).get("sources", []):
        src = SourceConfig(**{k: v for k, v in s.items() if k in SourceConfig.__dataclass_fields__})
        langs[source_name(src)] = src.language
    return cfg.get("eval", {}).get("normalizer"), langs


# ---------------------------------------------------------------------------------------
# Comparing.


def _recorded(tsv: Path) -> dict:
    # The eval JSON written beside a TSV, or {}.
    try:
        out = json.loads(tsv.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def pair_up(a: dict, b: dict, name_a: str, name_b: str) -> list[str]:
    """The shared ids in A's order; an error when the id sets or a shared reference differ."""
    only_a, only_b = [i for i in a if i not in b], [i for i in b if i not in a]
    if only_a or only_b:
        example = f"{only_a[0]!r} only in A" if only_a else f"{only_b[0]!r} only in B"
        raise CompareError(f"A ({name_a}) and B ({name_b}) hold different utterances: {len(only_a)} ids only in A, "
                           f"{len(only_b)} only in B (e.g. {example})")
    for i in a:
        if a[i][0] != b[i][0]:
            raise CompareError(f"id {i!r}: the references differ ({name_a}: {a[i][0]!r}; {name_b}: {b[i][0]!r})")
        if None not in (a[i][2], b[i][2]) and a[i][2] != b[i][2]:
            raise CompareError(f"id {i!r}: the languages differ ({name_a}: {a[i][2]!r}; {name_b}: {b[i][2]!r})")
    return list(a)


def compare_files(tsv_a: Path, tsv_b: Path, normalizer: str = "script", language: str | None = None,
                  source_languages: dict | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """Compare two eval TSVs. An utterance's language is its `language` column, else `language`, else
    its source's in `source_languages` (by the id's "<source>/" prefix), else "". Returns n, words,
    chars, languages, set, wer_a, wer_b, cer_a, cer_b, and wer_/cer_ + paired_bootstrap's keys (diff,
    diff_ci95, p_b_better, significant); wer_a_recorded/wer_b_recorded: the eval JSON's wer beside a TSV."""
    a, b = read_eval_tsv(tsv_a), read_eval_tsv(tsv_b)
    ids = pair_up(a, b, str(tsv_a), str(tsv_b))
    langs = []
    for i in ids:
        col = a[i][2] if a[i][2] is not None else b[i][2]
        src = next((lang for s, lang in (source_languages or {}).items() if i.startswith(s + "/")), "")
        langs.append(col if col is not None else language if language is not None else src)
    refs = [a[i][0] for i in ids]
    ea = utterance_errors(refs, [a[i][1] for i in ids], normalizer, langs)
    eb = utterance_errors(refs, [b[i][1] for i in ids], normalizer, langs)
    out = {"a": str(tsv_a), "b": str(tsv_b), "n": len(ids), "words": int(ea["words"].sum()),
           "chars": int(ea["chars"].sum()), "languages": sorted(set(langs))}
    for name, err, length in (("wer", "word_errors", "words"), ("cer", "char_errors", "chars")):
        out[f"{name}_a"] = corpus_rate(ea[err], ea[length])
        out[f"{name}_b"] = corpus_rate(eb[err], eb[length])
        boot = paired_bootstrap(ea[err], eb[err], ea[length], resamples, seed)  # the same indices for both
        out.update({f"{name}_{k}": v for k, v in boot.items()})
    recorded = [_recorded(tsv) for tsv in (tsv_a, tsv_b)]
    out["set"] = recorded[0].get("set")  # None without an eval JSON
    for side, rec in zip("ab", recorded):
        if isinstance(rec.get("wer"), (int, float)):
            out[f"wer_{side}_recorded"] = rec["wer"]
    return out


def verdict(r: dict, metric: str = "wer") -> str:
    """One sentence: which system is better on `metric` and whether it is significant at 95%."""
    d, (low, high) = r[f"{metric}_diff"], r[f"{metric}_diff_ci95"]
    m = metric.upper()
    what = (f"A and B have the same {m}" if d == 0 else
            f"B's {m} is {'lower' if d < 0 else 'higher'} than A's by {abs(d):.2f} points")
    if r[f"{metric}_significant"]:
        return f"{what}: significant at 95% (the interval [{low:+.2f}, {high:+.2f}] excludes 0)."
    return f"{what}: not significant at 95% (the interval [{low:+.2f}, {high:+.2f}] contains 0)."


def format_result(r: dict) -> str:
    langs = ", ".join(x or '""' for x in r["languages"])
    lines = [("" if r["set"] is None else f"set {r['set']}: ")
             + f"{r['n']} utterances, {r['words']} reference words, {r['chars']} characters "
             f"(normaliser {r['normalizer']}, language {langs})",
             f"  A  {r['a']}" + (f"  (step {r['step_a']})" if r.get("step_a") is not None else ""),
             f"  B  {r['b']}" + (f"  (step {r['step_b']})" if r.get("step_b") is not None else ""),
             f"  {'':4}{'A':>8}{'B':>8}{'B - A':>8}   {'95% CI of B - A':<18} P(B better)"]
    for m in ("wer", "cer"):
        low, high = r[f"{m}_diff_ci95"]
        lines.append(f"  {m.upper():4}{r[m + '_a']:8.2f}{r[m + '_b']:8.2f}{r[m + '_diff']:+8.2f}   "
                     f"{f'[{low:+.2f}, {high:+.2f}]':<18} {r[m + '_p_b_better']:.3f}")
    lines += [f"  {verdict(r, 'wer')}", f"  {verdict(r, 'cer')}"]
    for side in ("a", "b"):
        rec = r.get(f"wer_{side}_recorded")
        if rec is not None and abs(rec - r[f"wer_{side}"]) > 1e-9:
            lines.append(f"  note: {side.upper()}'s WER here ({r[f'wer_{side}']:.2f}) is not its eval JSON's "
                         f"({rec:.2f}): another normaliser or language than the evaluation's "
                         "(--normalizer, --language)")
    return "\n".join(lines)


def _step(ev: dict | None, tsv: Path) -> int | None:
    m = _STEM.match(tsv.stem)
    return ev["step"] if ev else int(m.group(1)) if m else None


def resolve(a: Path, b: Path, args) -> list[tuple[str, dict | None, dict | None, Path, Path]]:
    """(set, eval of A, eval of B, tsv A, tsv B) for every pair to compare."""
    for p in (a, b):
        if not p.exists():
            raise CompareError(f"{p}: no such file or folder")
    if a.is_file() and b.is_file():
        given = [o for o, v in (("--step", args.step), ("--set", args.set), ("--eval-only", args.eval_only),
                                ("--eval-only-b", args.eval_only_b)) if v is not None]
        if given:
            raise CompareError(f"{given[0]} applies to run folders; A and B are both TSV files")
        return [(None, None, None, a, b)]
    variant_b = args.eval_only_b if args.eval_only_b is not None else args.eval_only
    sets = [args.set] if args.set is not None else None
    ea = pick_evals(a, args.eval_only or "", args.step, sets) if a.is_dir() else None
    eb = pick_evals(b, variant_b or "", args.step, sets) if b.is_dir() else None
    if ea is not None and eb is not None:
        if sets is None:
            common = [e["set"] for e in ea if e["set"] in {x["set"] for x in eb}]
            if not common:
                raise CompareError(f"{a} (sets {', '.join(e['set'] for e in ea)}) and {b} (sets "
                                   f"{', '.join(e['set'] for e in eb)}) have no evaluation set in common")
            sets = common
        by_b = {e["set"]: e for e in eb}
        return [(e["set"], e, by_b[e["set"]], e["tsv"], by_b[e["set"]]["tsv"]) for e in ea if e["set"] in sets]
    if ea is not None:  # one folder, one file: the folder's first set unless --set
        e = ea[0]
        return [(e["set"], e, None, e["tsv"], b)]
    e = eb[0]
    return [(e["set"], None, e, a, e["tsv"])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asr.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="system A: an eval TSV or a run folder")
    parser.add_argument("b", help="system B: an eval TSV or a run folder")
    parser.add_argument("--step", type=int, help="run folders: the evaluation step (default: each one's newest)")
    parser.add_argument("--set", help="run folders: the evaluation set (default: every set both have; "
                                      "with one run folder, its first set)")
    parser.add_argument("--eval-only", metavar="SPLIT.TAG",
                        help="run folders: the files --eval-only wrote, eval/step-N.SPLIT.TAG[.set].tsv "
                             "(e.g. test.beam8), instead of the training evaluations")
    parser.add_argument("--eval-only-b", metavar="SPLIT.TAG", help="the same for B when it differs from A's")
    parser.add_argument("--normalizer", choices=sorted(NORMALIZERS),
                        help="evaluation normaliser (default: the run's eval.normalizer, else script)")
    parser.add_argument("--language", help="language of every utterance without a language column, e.g. tr "
                                           "(default: its source's in the run's config.toml, else none)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        if args.resamples < 1:
            raise CompareError(f"--resamples must be at least 1, got {args.resamples}")
        a, b = Path(args.a), Path(args.b)
        pairs = resolve(a, b, args)
        # A run's own eval.normalizer and source languages, for a run folder or a TSV in its eval/.
        settings = [run_settings(p if p.is_dir() else p.parent.parent) for p in (a, b)
                    if p.is_dir() or p.parent.name == "eval"]
        normalizers = {n for n, _ in settings if n}
        if args.normalizer is None and len(normalizers) > 1:
            raise CompareError(f"A and B were evaluated with different eval.normalizer "
                               f"({', '.join(sorted(normalizers))}); choose one with --normalizer")
        normalizer = args.normalizer or (normalizers.pop() if normalizers else "script")
        if normalizer not in NORMALIZERS:
            raise CompareError(f"eval.normalizer {normalizer!r} in the run's config.toml is not one of "
                               f"{', '.join(sorted(NORMALIZERS))}")
        source_languages = {k: v for _, langs in reversed(settings) for k, v in langs.items()}
        results = []
        for name, ev_a, ev_b, tsv_a, tsv_b in pairs:
            r = compare_files(tsv_a, tsv_b, normalizer, args.language, source_languages, args.resamples, args.seed)
            r.update({"set": name or r["set"], "step_a": _step(ev_a, tsv_a), "step_b": _step(ev_b, tsv_b),
                      "normalizer": normalizer})
            results.append(r)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"normalizer": normalizer, "resamples": args.resamples, "seed": args.seed, "sets": results},
                         indent=1, ensure_ascii=False))
    else:
        print("\n\n".join(format_result(r) for r in results))
        print(f"\npaired bootstrap over utterances: {args.resamples} resamples, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
