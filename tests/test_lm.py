"""asr.lm: Kneser-Ney estimation to ARPA, the ARPA reader and back-off scoring, the state API, the CLI."""

from __future__ import annotations

import math

import pytest

from asr.lm import BOS, EOS, UNK, ArpaError, NgramLM, build_arpa, estimate_kneser_ney, main, read_arpa

TEXTS = [
    "bir kedi geldi",
    "bir kedi gitti",
    "iki kedi geldi",
    "bir köpek geldi",
    "kedi uyudu",
    "bir kedi",
    "bu kedi bir kedi",
    "yine bir köpek geldi",
    "",  # empty utterances are skipped
]

CONTEXTS = [(), (BOS,), ("bir",), (BOS, "bir"), ("bir", "kedi"), (BOS, "bir", "kedi"), ("kedi", "bir", "kedi"),
            ("zzz",), ("zzz", "kedi"), ("kedi", "zzz"), (EOS,), ("geldi",)]


def _predictable(lm: NgramLM) -> list[str]:
    return sorted(lm.vocab - {BOS})


@pytest.fixture(scope="module", params=[1, 2, 3, 4])
def lm(request, tmp_path_factory) -> NgramLM:
    path = build_arpa(TEXTS, request.param, tmp_path_factory.mktemp("lm") / f"o{request.param}.arpa")
    return NgramLM.load(path)


def strict_parse(path) -> tuple[list[int], list[dict[tuple, tuple[float, float | None]]]]:
    """An independent, strict ARPA reader: header, sections in order, counts matching, \\end\\."""
    lines = [line.rstrip("\n") for line in open(path, encoding="utf-8")]
    assert lines[0] == "\\data\\"
    i, counts = 1, []
    while lines[i].startswith("ngram "):
        n, c = lines[i][len("ngram "):].split("=")
        assert int(n) == len(counts) + 1
        counts.append(int(c))
        i += 1
    sections = []
    for n in range(1, len(counts) + 1):
        while lines[i] == "":
            i += 1
        assert lines[i] == f"\\{n}-grams:"
        i += 1
        entries = {}
        while lines[i] != "":
            fields = lines[i].split("\t")
            assert len(fields) in (2, 3), lines[i]
            words = tuple(fields[1].split(" "))
            assert len(words) == n and words not in entries
            p = float(fields[0])
            bo = float(fields[2]) if len(fields) == 3 else None
            assert p <= 0.0
            assert bo is None or n < len(counts), "no back-off weights at the highest order"
            entries[words] = (p, bo)
            i += 1
        assert len(entries) == counts[n - 1]
        sections.append(entries)
    assert [line for line in lines[i:] if line] == ["\\end\\"]
    return counts, sections


def test_hand_computed_bigram_model():
    # Corpus "a b", "a c", order 2, fallback discounts D1=0.5, D2=1 (the corpus is too small for estimates).
    # Unigram continuation counts: a 1 ({<s>}), b 1, c 1, </s> 2 ({b, c}); vocabulary {a, b, c, </s>, <unk>}.
    # gamma() = (3 * 0.5 + 1 * 1) / 5 = 0.5, so p(a) = 0.5/5 + 0.5/5 = 0.2, p(</s>) = 1/5 + 0.1 = 0.3.
    probs, backoffs = estimate_kneser_ney(["a b", "a c"], order=2)
    assert probs[1][("a",)] == pytest.approx(0.2)
    assert probs[1][(EOS,)] == pytest.approx(0.3)
    assert probs[1][(UNK,)] == pytest.approx(0.1)
    # Bigrams keep raw counts: <s> a 2 -> p(a|<s>) = (2 - 1)/2 + gamma(<s>) p(a) with gamma(<s>) = 1/2.
    assert backoffs[1][(BOS,)] == pytest.approx(0.5)
    assert probs[2][(BOS, "a")] == pytest.approx(0.6)
    assert probs[2][("a", "b")] == pytest.approx((1 - 0.5) / 2 + 0.5 * 0.2)
    assert probs[2][("b", EOS)] == pytest.approx(0.5 + 0.5 * 0.3)


def test_arpa_file_parses_strictly_and_is_consistent(tmp_path):
    path = build_arpa(TEXTS, 3, tmp_path / "lm.arpa")
    counts, sections = strict_parse(path)
    assert counts == read_arpa(path)[0]
    unigrams = sections[0]
    assert unigrams[(BOS,)][0] == -99 and {EOS, UNK, "kedi", "köpek"} <= {g[0] for g in unigrams}
    for n in range(2, len(sections) + 1):
        for g in sections[n - 1]:
            # A well-formed back-off model: every n-gram's context and suffix are listed one order down.
            assert g[:-1] in sections[n - 2] and g[1:] in sections[n - 2], g
            assert sections[n - 2][g[:-1]][1] is not None, f"context {g[:-1]} has no back-off weight"


@pytest.mark.parametrize("ctx", CONTEXTS, ids=lambda c: " ".join(c) or "()")
def test_every_context_is_normalised(lm, ctx):
    total = sum(10 ** lm.score(w, ctx) for w in _predictable(lm))
    assert total == pytest.approx(1.0, abs=1e-5)


def test_seen_ngrams_score_higher_than_unseen(lm):
    assert lm.score("kedi", ["bir"]) > lm.score("köpek", ["bu"])
    if lm.order >= 2:
        assert lm.score("kedi", ["bir"]) > lm.score("kedi", ["geldi"])
        assert lm.score_sentence("bir kedi geldi") > lm.score_sentence("geldi kedi bir")
    if lm.order >= 3:
        assert lm.score("geldi", [BOS, "iki", "kedi"]) > lm.score("gitti", [BOS, "iki", "kedi"])


def test_continuation_counts_not_raw_frequency(tmp_path):
    # "francisco" is frequent but follows only "san"; "glasses" is rarer but follows many words. After an
    # unseen context, Kneser-Ney prefers the word seen in more contexts.
    texts = ["san francisco"] * 6 + ["red glasses", "my glasses", "new glasses", "old glasses"]
    lm = NgramLM.load(build_arpa(texts, 2, tmp_path / "lm.arpa"))
    assert lm.score("francisco", ["san"]) > lm.score("glasses", ["san"])
    assert lm.score("glasses", ["my"]) > lm.score("francisco", ["my"])
    assert lm.score("glasses", ["zzz"]) > lm.score("francisco", ["zzz"])


def test_state_api_matches_sentence_scores(lm):
    for sentence in ["bir kedi geldi", "kedi bir", "zzz kedi uyudu", ""]:
        state, total = lm.start(), 0.0
        for w in sentence.split():
            state, lp = lm.advance(state, w)
            total += lp
        total += lm.finish(state)
        assert total == pytest.approx(lm.score_sentence(sentence) * math.log(10), abs=1e-9)
        history = (BOS,) + tuple(w if w in lm else UNK for w in sentence.split())
        assert state == (history[-(lm.order - 1):] if lm.order > 1 else ())


def test_unknown_words(tmp_path):
    lm = NgramLM.load(build_arpa(TEXTS, 3, tmp_path / "lm.arpa"))
    assert lm.score("zzz", ["bir"]) == lm.score(UNK, ["bir"])
    assert lm.score("zzz", []) == pytest.approx(read_arpa(tmp_path / "lm.arpa")[1][(UNK,)])
    assert lm.score("kedi", ["zzz"]) == lm.score("kedi", [UNK])
    floored = NgramLM.load(tmp_path / "lm.arpa", unk_log10=-7.0)
    assert floored.score("zzz", []) == -7.0
    assert floored.score("zzz", [BOS]) == pytest.approx(-7.0 + floored.backoff[(BOS,)])


# A model written the way KenLM writes one (tabs, <unk> first, <s> at -99, back-offs of 0 left out).
KENLM_ARPA = """\\data\\
ngram 1=6
ngram 2=4
ngram 3=2

\\1-grams:
-1.5\t<unk>\t0
0\t<s>\t-0.4
-0.8\t</s>\t0
-0.7\ta\t-0.3
-0.9\tb\t-0.2
-1.1\tc

\\2-grams:
-0.3\t<s> a\t-0.25
-0.4\ta b\t-0.1
-0.5\tb </s>
-0.6\tb c

\\3-grams:
-0.2\t<s> a b
-0.15\ta b c

\\end\\
"""


def test_reads_kenlm_style_arpa_and_backs_off(tmp_path):
    path = tmp_path / "kenlm.arpa"
    path.write_text(KENLM_ARPA, encoding="utf-8")
    lm = NgramLM.load(path)
    assert lm.order == 3
    assert lm.score("b", [BOS, "a"]) == pytest.approx(-0.2)  # listed trigram
    assert lm.score("c", ["a", "b"]) == pytest.approx(-0.15)
    assert lm.score(EOS, ["a", "b"]) == pytest.approx(-0.1 + -0.5)  # bo(a b) + p(</s> | b)
    assert lm.score("a", ["a", "b"]) == pytest.approx(-0.1 + -0.2 + -0.7)  # bo(a b) + bo(b) + p(a)
    assert lm.score("c", [BOS, "b"]) == pytest.approx(-0.6)  # context "<s> b" unlisted: weight 1
    assert lm.score("a", ["c", "c"]) == pytest.approx(-0.7)  # c has no back-off weight: 0
    assert lm.score("zzz", ["a"]) == pytest.approx(-0.3 + -1.5)  # <unk> after bo(a)
    assert lm.score_sentence("a b") == pytest.approx(-0.3 + -0.2 + (-0.1 + -0.5))


def test_strict_reader_rejects_bad_files(tmp_path):
    bad_count = tmp_path / "count.arpa"
    bad_count.write_text(KENLM_ARPA.replace("ngram 2=4", "ngram 2=5"), encoding="utf-8")
    with pytest.raises(ArpaError, match="announces 5 2-grams"):
        NgramLM.load(bad_count)
    NgramLM.load(bad_count, strict=False)  # lenient reading still works
    no_end = tmp_path / "end.arpa"
    no_end.write_text(KENLM_ARPA.replace("\\end\\", ""), encoding="utf-8")
    with pytest.raises(ArpaError, match="end"):
        NgramLM.load(no_end)
    short = tmp_path / "short.arpa"
    short.write_text(KENLM_ARPA.replace("-0.2\t<s> a b", "-0.2\t<s> a"), encoding="utf-8")
    with pytest.raises(ArpaError, match=":21:"):
        NgramLM.load(short)
    with pytest.raises(ArpaError, match="no .data. header"):
        (tmp_path / "empty.arpa").write_text("hello\n", encoding="utf-8")
        NgramLM.load(tmp_path / "empty.arpa")


# ---------------------------------------------------------------------------------------
# Command line.


def test_cli_from_text_file(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "lm.arpa"
    assert main(["--text", str(text), "--order", "2", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    counts, _ = strict_parse(out)
    assert len(counts) == 2
    assert NgramLM.load(out).score("kedi", ["bir"]) > NgramLM.load(out).score("kedi", ["geldi"])


def test_cli_from_experiment_uses_cleaned_training_transcripts(tmp_path, capsys):
    from asr.config import load_config
    from asr.data import read_source_split
    from asr.text import clean_transcript

    out = tmp_path / "lm.arpa"
    assert main(["--exp", "experiments/demo.toml", "--order", "3", "--out", str(out)]) == 0
    lm = NgramLM.load(out)
    cfg = load_config("experiments/demo.toml")
    utts, _ = read_source_split(cfg.data.sources[0], "train")
    words = {w for u in utts for w in clean_transcript(u.text, cfg.data.text, u.language).split()}
    assert lm.vocab - {BOS, EOS, UNK} == words
    assert all(w == w.lower() and not set(w) & set(",?.!") for w in words)


@pytest.mark.parametrize("args, message", [
    (["--text", "no/such/file.txt"], "text file not found: no/such/file.txt"),
    (["--exp", "no/such/exp.toml"], "experiment file not found: no/such/exp.toml"),
])
def test_cli_missing_file_is_one_line(tmp_path, capsys, args, message):
    assert main(args + ["--out", str(tmp_path / "lm.arpa")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "lm.arpa").exists()
