"""Word n-gram language models: estimate one from transcripts and write it as ARPA, read any ARPA file.

Build one from an experiment's training transcripts (cleaned as training cleans them) or from a text
file with one utterance per line (used as given, split on whitespace):

    python -m asr.lm --exp experiments/demo.toml --order 3 --out runs/demo/lm.arpa
    python -m asr.lm --text corpus.txt --order 4 --out lm.arpa

Estimation is interpolated modified Kneser-Ney (Chen & Goodman 1998), as KenLM's `lmplz` does it:

* Sentences are padded as `<s> w1 ... wn </s>` (empty ones are skipped).
* Counts: the highest order uses raw counts; lower orders use continuation counts (the number of
  distinct words seen to the left), except n-grams starting with `<s>`, which keep raw counts
  (nothing can precede `<s>`).
* Three discounts per order from the counts-of-counts t1..t4 of those counts:
  Y = t1 / (t1 + 2 t2), D1 = 1 - 2Y t2/t1, D2 = 2 - 3Y t3/t2, D3+ = 3 - 4Y t4/t3. A corpus too small
  for them (a zero t_k, or a discount outside (0, k]) uses KenLM's `--discount_fallback` values 0.5, 1, 1.5.
* p(w | h) = max(a(hw) - D(a(hw)), 0) / a(h.) + gamma(h) p(w | h'), where h' drops the oldest word,
  gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / a(h.) is exactly the back-off weight written
  for h, and the unigrams interpolate with the uniform distribution over the vocabulary (all words,
  `</s>` and `<unk>`; `<s>` is never predicted and gets log10 probability -99, as in KenLM). So the
  written model is normalised for every context, also through back-off.

ARPA files hold log10 probabilities; `NgramLM` scores in log10 (`score`, `score_sentence`) and gives a
beam search natural-log increments through a small state (`start`, `advance`, `finish`).
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
from collections import defaultdict
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LN10 = math.log(10.0)
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback default
NO_PROB = -99.0  # log10 probability written for <s>, which is never predicted


class ArpaError(Exception):
    """A malformed ARPA file; the message is one line naming the file and the line."""


# ---------------------------------------------------------------------------------------
# Estimation.


def _count_ngrams(sentences: list[list[str]], order: int) -> list[dict[tuple, int]]:
    """Raw counts: raw[n][ngram] for n = 1..order (raw[0] unused), over <s> ... </s> padded sentences."""
    raw: list[dict[tuple, int]] = [{} for _ in range(order + 1)]
    for words in sentences:
        padded = [BOS] + words + [EOS]
        for n in range(1, order + 1):
            table = raw[n]
            for i in range(len(padded) - n + 1):
                g = tuple(padded[i:i + n])
                table[g] = table.get(g, 0) + 1
    return raw


def _adjusted_counts(raw: list[dict[tuple, int]], order: int) -> list[dict[tuple, int]]:
    """Kneser-Ney counts: raw at the highest order and for n-grams starting with <s>, else the number
    of distinct left extensions."""
    adjusted: list[dict[tuple, int]] = [{} for _ in range(order + 1)]
    adjusted[order] = dict(raw[order])
    for n in range(1, order):
        left = defaultdict(int)
        for g in raw[n + 1]:
            left[g[1:]] += 1
        table = adjusted[n]
        for g, c in raw[n].items():
            table[g] = c if g[0] == BOS else left[g]
    adjusted[1].pop((BOS,), None)  # <s> is only ever a context
    return adjusted


def _discounts(counts: dict[tuple, int]) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts (D1, D2, D3+) from counts-of-counts, or the fallback values."""
    t = [0] * 5
    for c in counts.values():
        if 1 <= c <= 4:
            t[c] += 1
    if min(t[1:]) == 0:
        return FALLBACK_DISCOUNTS
    y = t[1] / (t[1] + 2 * t[2])
    d = (1 - 2 * y * t[2] / t[1], 2 - 3 * y * t[3] / t[2], 3 - 4 * y * t[4] / t[3])
    if not all(0 < dk <= k for k, dk in zip((1, 2, 3), d)):
        return FALLBACK_DISCOUNTS
    return d


def _context_stats(counts: dict[tuple, int], d: tuple[float, float, float]) -> dict[tuple, tuple[float, float]]:
    """For each context h of these n-grams: (total count a(h.), total discount D1 N1 + D2 N2 + D3 N3+)."""
    stats: dict[tuple, list[float]] = {}
    for g, c in counts.items():
        s = stats.setdefault(g[:-1], [0.0, 0.0])
        s[0] += c
        s[1] += d[min(c, 3) - 1]
    return {h: (total, disc) for h, (total, disc) in stats.items()}


def estimate_kneser_ney(texts, order: int = 3) -> tuple[list[dict[tuple, float]], list[dict[tuple, float]]]:
    """Interpolated modified Kneser-Ney estimates: (probs, backoffs), each a list indexed by order
    holding {ngram tuple: probability} and {context tuple: back-off weight} (plain, not log)."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    sentences = [t.split() for t in texts]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("no words in the training text")
    raw = _count_ngrams(sentences, order)
    adjusted = _adjusted_counts(raw, order)
    vocab = {g[0] for g in adjusted[1]} | {UNK}

    probs: list[dict[tuple, float]] = [{} for _ in range(order + 1)]
    backoffs: list[dict[tuple, float]] = [{} for _ in range(order + 1)]
    for n in range(1, order + 1):
        d = _discounts(adjusted[n])
        stats = _context_stats(adjusted[n], d)
        for h, (total, disc) in stats.items():
            backoffs[n - 1][h] = disc / total  # gamma(h), the back-off weight of context h
        for g, c in adjusted[n].items():
            total, _ = stats[g[:-1]]
            gamma = backoffs[n - 1][g[:-1]]
            lower = 1.0 / len(vocab) if n == 1 else probs[n - 1][g[1:]]
            probs[n][g] = max(c - d[min(c, 3) - 1], 0.0) / total + gamma * lower
    probs[1].setdefault((UNK,), backoffs[0][()] / len(vocab))
    return probs, backoffs


def _fmt(x: float) -> str:
    return f"{x:.7f}".rstrip("0").rstrip(".") if x != 0 else "0"


def build_arpa(texts, order: int = 3, path: str | Path = "lm.arpa") -> Path:
    """Estimate an interpolated modified Kneser-Ney model of `order` from `texts` (one cleaned utterance
    per string, words split on whitespace) and write it to `path` in ARPA format. Returns the path."""
    probs, backoffs = estimate_kneser_ney(texts, order)
    sections: list[list[str]] = []
    for n in range(1, order + 1):
        entries = dict(probs[n])
        if n == 1:
            entries[(BOS,)] = None  # written with NO_PROB
        lines = []
        for g in sorted(entries):
            p = entries[g]
            fields = [_fmt(NO_PROB if p is None else math.log10(p)), " ".join(g)]
            bo = backoffs[n].get(g) if n < order else None
            if bo is not None:
                fields.append(_fmt(math.log10(bo)) if bo > 0 else _fmt(NO_PROB))
            lines.append("\t".join(fields))
        sections.append(lines)
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        for n, lines in enumerate(sections, 1):
            f.write(f"ngram {n}={len(lines)}\n")
        for n, lines in enumerate(sections, 1):
            f.write(f"\n\\{n}-grams:\n")
            f.write("\n".join(lines) + "\n")
        f.write("\n\\end\\\n")
    return path


# ---------------------------------------------------------------------------------------
# Reading and scoring.


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_arpa(path: str | Path, strict: bool = True) -> tuple[list[int], dict[tuple, float], dict[tuple, float]]:
    """Parse an ARPA file: (header counts per order, {ngram: log10 prob}, {ngram: log10 back-off}).

    `strict` also checks that each section holds as many n-grams as the header announces and that
    the file ends with \\end\\."""
    path = Path(path)
    counts: dict[int, int] = {}
    seen: dict[int, int] = {}
    logp: dict[tuple, float] = {}
    backoff: dict[tuple, float] = {}
    where = "preamble"  # preamble | data | n (section order) | end
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line == "\\data\\":
                where = "data"
                continue
            if line == "\\end\\":
                where = "end"
                break
            if line.startswith("\\") and line.endswith("-grams:"):
                try:
                    n = int(line[1:-len("-grams:")])
                except ValueError:
                    raise ArpaError(f"{path}:{lineno}: bad section header {line!r}") from None
                if n not in counts:
                    raise ArpaError(f"{path}:{lineno}: section {line} not announced in \\data\\")
                where, seen[n] = n, 0
                continue
            if where == "preamble":
                continue
            if where == "data":
                if not line.startswith("ngram ") or "=" not in line:
                    raise ArpaError(f"{path}:{lineno}: expected 'ngram N=count', got {line!r}")
                n, c = line[len("ngram "):].split("=", 1)
                try:
                    counts[int(n)] = int(c)
                except ValueError:
                    raise ArpaError(f"{path}:{lineno}: bad count line {line!r}") from None
                continue
            n = where
            fields = line.split()
            if len(fields) not in (n + 1, n + 2):
                raise ArpaError(f"{path}:{lineno}: expected {n} words with a probability, got {line!r}")
            try:
                p = float(fields[0])
                bo = float(fields[n + 1]) if len(fields) == n + 2 else None
            except ValueError:
                raise ArpaError(f"{path}:{lineno}: bad number in {line!r}") from None
            g = tuple(fields[1:n + 1])
            logp[g] = p
            if bo is not None:
                backoff[g] = bo
            seen[n] += 1
    if not counts:
        raise ArpaError(f"{path}: no \\data\\ header")
    if strict:
        if where != "end":
            raise ArpaError(f"{path}: missing \\end\\")
        for n, c in sorted(counts.items()):
            if seen.get(n, 0) != c:
                raise ArpaError(f"{path}: header announces {c} {n}-grams, the section holds {seen.get(n, 0)}")
    order = max(counts)
    return [counts.get(n, 0) for n in range(1, order + 1)], logp, backoff


class NgramLM:
    """A back-off word n-gram model read from ARPA (log10 scores), with a state API for beam search.

    Out-of-vocabulary words are scored as `<unk>` where the model has it; `unk_log10` (a log10
    probability) replaces that score when given, and is used (default -10) when the model has no `<unk>`.
    """

    def __init__(self, logp: dict[tuple, float], backoff: dict[tuple, float], order: int,
                 unk_log10: float | None = None):
        self.logp = logp
        self.backoff = backoff
        self.order = order
        self.vocab = {g[0] for g in logp if len(g) == 1}
        self.unk_log10 = unk_log10
        self._cache: dict = {}

    @classmethod
    def load(cls, path: str | Path, unk_log10: float | None = None, strict: bool = True) -> "NgramLM":
        counts, logp, backoff = read_arpa(path, strict=strict)
        return cls(logp, backoff, len(counts), unk_log10=unk_log10)

    def __contains__(self, word: str) -> bool:
        return word in self.vocab

    def _map(self, word: str) -> str:
        return word if word in self.vocab else UNK

    def score(self, word: str, context_words=()) -> float:
        """log10 p(word | context), backing off through shorter contexts. The context is the words
        before `word`, oldest first; start it with "<s>" for the beginning of a sentence."""
        context = tuple(self._map(w) for w in context_words)[-(self.order - 1):] if self.order > 1 else ()
        return self._score(self._map(word), context)

    def _score(self, word: str, context: tuple) -> float:
        oov = word not in self.vocab
        if oov or (word == UNK and self.unk_log10 is not None):
            # Back-off weights of the context still apply, as if <unk> were only a unigram.
            unk = self.unk_log10 if self.unk_log10 is not None else self.logp.get((UNK,), -10.0)
            return sum(self.backoff.get(context[i:], 0.0) for i in range(len(context))) + unk
        total = 0.0
        for i in range(len(context) + 1):
            h = context[i:]
            p = self.logp.get(h + (word,))
            if p is not None:
                return total + p
            total += self.backoff.get(h, 0.0)
        raise AssertionError("unreachable: every vocabulary word has a unigram")

    def score_sentence(self, words, bos: bool = True, eos: bool = True) -> float:
        """log10 probability of a word sequence (a string is split on whitespace), with <s> and </s>."""
        if isinstance(words, str):
            words = words.split()
        context = [BOS] if bos else []
        total = 0.0
        for w in list(words) + ([EOS] if eos else []):
            total += self.score(w, context)
            context.append(w)
        return total

    # Incremental use: a state is the tuple of the last (order - 1) words (mapped to the vocabulary).

    def start(self) -> tuple:
        """The state at the beginning of a sentence (after <s>)."""
        return (BOS,)[: self.order - 1]

    def advance(self, state: tuple, word: str) -> tuple[tuple, float]:
        """(state after `word`, natural-log probability of `word` given `state`)."""
        key = (state, word)
        hit = self._cache.get(key)
        if hit is None:
            w = self._map(word)
            lp = self._score(w, state) * LN10
            new = (state + (w,))[-(self.order - 1):] if self.order > 1 else ()
            if len(self._cache) > 1_000_000:
                self._cache.clear()
            hit = self._cache[key] = (new, lp)
        return hit

    def finish(self, state: tuple) -> float:
        """Natural-log probability of </s> after `state`."""
        return self.advance(state, EOS)[1]


# ---------------------------------------------------------------------------------------
# Command line.


def experiment_texts(exp: str | Path, overrides: list[str] = ()) -> list[str]:
    """The cleaned training transcripts of every source of an experiment file."""
    from asr.config import load_config
    from asr.data import read_source_split
    from asr.text import clean_transcript

    cfg = load_config(exp, overrides)
    texts = []
    for src in cfg.data.sources:
        if not src.train:
            continue
        utts, _ = read_source_split(src, src.train)
        texts += [clean_transcript(u.text, cfg.data.text, u.language) for u in utts]
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--exp", help="experiment TOML: use the training transcripts of its sources, cleaned")
    src.add_argument("--text", help="plain text file, one utterance per line, used as given")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="with --exp: override a config value (repeatable)")
    parser.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    parser.add_argument("--out", required=True, help="ARPA file to write")
    args = parser.parse_args(argv)

    from asr.config import ConfigError
    from asr.data import DataError

    try:
        if args.order < 1:
            raise ValueError(f"--order must be at least 1, got {args.order}")
        if args.exp:
            texts = experiment_texts(args.exp, args.overrides)
        else:
            path = Path(args.text)
            if not path.is_file():
                raise FileNotFoundError(f"text file not found: {path}")
            texts = path.read_text(encoding="utf-8").splitlines()
        out = build_arpa(texts, args.order, args.out)
    except (ConfigError, DataError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts, _, _ = read_arpa(out)
    n_sent = sum(1 for t in texts if t.split())
    print(f"wrote {out}: order {args.order} from {n_sent} sentences, "
          + ", ".join(f"{c} {n}-grams" for n, c in enumerate(counts, 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
