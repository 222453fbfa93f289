"""Error analysis (asr.metrics): per-utterance S/D/I, icefall-style errs text, confusion pairs, breakdowns."""

from __future__ import annotations

import csv

import pytest

from asr.metrics import breakdown, error_analysis, error_rates, format_errs, utterance_counts_all
from asr.text import NORMALIZERS
from helpers import FIXTURE

# (ref, hyp, S, D, I, hits)
CASES = [
    ("bir iki üç dört", "bir iki üç dört", 0, 0, 0, 4),
    ("bir iki üç dört", "bir ev üç dört", 1, 0, 0, 3),
    ("bir iki üç dört", "bir üç dört", 0, 1, 0, 3),
    ("bir iki", "bir iki üç", 0, 0, 1, 2),
    ("bir iki", "", 0, 2, 0, 0),
    ("", "ses var", 0, 0, 2, 0),
    ("", "", 0, 0, 0, 0),
]


def expected(s, d, i, hits) -> dict:
    return {"substitutions": s, "deletions": d, "insertions": i, "hits": hits, "ref_words": s + d + hits}


def fixture_rows() -> list[dict]:
    rows = []
    for split in ("train", "dev"):
        with open(FIXTURE / f"{split}.tsv", encoding="utf-8", newline="") as f:
            rows += list(csv.DictReader(f, delimiter="\t"))
    return rows


def perturbed(refs: list[str]) -> list[str]:
    """Hypotheses with substitutions, deletions, insertions, an empty one and an exact one."""
    out = []
    for k, ref in enumerate(refs):
        w = ref.split()
        out.append([" ".join(w[1:]), "yanlış " + ref, ref.replace("e", "i"), "", ref, " ".join(w[::-1])][k % 6])
    return out


def test_utterance_counts_known_sdi():
    refs, hyps = [c[0] for c in CASES], [c[1] for c in CASES]
    for ref, hyp, *sdih in CASES:
        assert utterance_counts_all([ref], [hyp])[0] == expected(*sdih), (ref, hyp)
    counts = utterance_counts_all(refs, hyps)
    assert counts == [expected(*c[2:]) for c in CASES]
    errors = sum(c["substitutions"] + c["deletions"] + c["insertions"] for c in counts)
    assert errors == 7 and sum(c["ref_words"] for c in counts) == 4 + 4 + 4 + 2 + 2
    assert error_analysis([str(k) for k in range(len(refs))], refs, hyps)["totals"] == {
        **expected(1, 3, 3, 12), "wer": 100.0 * 7 / 16}
    assert 100.0 * 7 / 16 == error_rates(refs, hyps)["wer"]
    with pytest.raises(ValueError, match="refs 2, hyps 1"):
        utterance_counts_all(["a", "b"], ["a"])


def test_totals_equal_error_rates_on_fixture_text():
    # Turkish sentences with punctuation and capitals: words on the normalised text, characters on the
    # orthographic text, as error_rates scores them; one empty reference counts insertions only.
    refs = [r["sentence"] for r in fixture_rows()] + [""]
    hyps = perturbed(refs[:-1]) + ["fazladan kelime"]
    norm = NORMALIZERS["script"]
    analysis = error_analysis([f"u{k}" for k in range(len(refs))], [norm(x) for x in refs], [norm(x) for x in hyps],
                              refs, hyps)
    rates = error_rates(refs, hyps)
    assert analysis["totals"]["wer"] == pytest.approx(rates["wer"], abs=1e-12) and rates["wer"] > 10
    assert analysis["chars"]["totals"]["cer"] == pytest.approx(rates["cer_ortho"], abs=1e-12)
    t = analysis["totals"]
    for key in ("substitutions", "deletions", "insertions", "hits", "ref_words"):
        assert sum(u[key] for u in analysis["utterances"]) == t[key]
    assert min(t["substitutions"], t["deletions"], t["insertions"]) > 0
    assert analysis["utterances"][-1]["aligned"] == "(*->fazladan) (*->kelime)"


def test_icefall_marking():
    ref, hyp = "one two three four five six", "seven one too three five six"
    u = error_analysis(["utt1"], [ref], [hyp])["utterances"][0]
    assert u["aligned"] == "(*->seven) one (two->too) three (four->*) five six"
    assert (u["substitutions"], u["deletions"], u["insertions"], u["hits"], u["ref_words"]) == (1, 1, 1, 4, 6)


def test_confusion_pairs_counted_and_ranked():
    # every error next to a hit, so each alignment is the only one of least cost
    refs = ["kedi gel ve köpek", "kedi gel ve ev", "ev gel ve yol", "yol", "yol bu", "kal"]
    hyps = ["kedy gel köpek", "kedy gel ev", "eb gel yol", "ee yol", "yol ee bu", "kal ee"]
    a = error_analysis(list("abcdef"), refs, hyps)
    assert a["substitutions"] == [{"ref": "kedi", "hyp": "kedy", "count": 2}, {"ref": "ev", "hyp": "eb", "count": 1}]
    assert a["deletions"] == [{"ref": "ve", "count": 3}]
    assert a["insertions"] == [{"hyp": "ee", "count": 3}]
    assert a["totals"]["substitutions"] == 3 and a["totals"]["deletions"] == 3 and a["totals"]["insertions"] == 3


def test_empty_reference():
    assert utterance_counts_all([""], ["bir iki"])[0] == expected(0, 0, 2, 0)
    assert utterance_counts_all(["  "], [""])[0] == expected(0, 0, 0, 0)
    a = error_analysis(["e", "f"], ["", ""], ["bir iki", ""], ["", ""], ["Bir", ""])
    assert [u["aligned"] for u in a["utterances"]] == ["(*->bir) (*->iki)", ""]
    assert a["totals"]["wer"] == 200.0 == error_rates(["", ""], ["bir iki", ""])["wer"]
    assert a["chars"]["insertions"] == [{"hyp": "B", "count": 1}, {"hyp": "i", "count": 1}, {"hyp": "r", "count": 1}]


def test_char_confusion_turkish_dotless_i():
    a = error_analysis(["u"], ["ışık"], ["isik"], ["Işık"], ["isik"])
    assert a["substitutions"] == [{"ref": "ışık", "hyp": "isik", "count": 1}]
    c = a["chars"]
    assert c["substitutions"] == [{"ref": "I", "hyp": "i", "count": 1}, {"ref": "ı", "hyp": "i", "count": 1},
                                  {"ref": "ş", "hyp": "s", "count": 1}]
    assert c["totals"] == {"substitutions": 3, "deletions": 0, "insertions": 0, "hits": 1, "ref_chars": 4,
                           "cer": 75.0}
    assert "1   ı -> i" in format_errs(a)


def test_breakdown_per_speaker_sums_to_corpus():
    rows = fixture_rows()
    norm = NORMALIZERS["script"]
    refs = [norm(r["sentence"]) for r in rows]
    hyps = perturbed(refs)
    speakers = [r["client_id"] for r in rows]
    speakers[0] = speakers[1] = ""  # unknown speaker
    speakers[2] = None
    counts = utterance_counts_all(refs, hyps)
    per = breakdown(speakers, counts)
    assert list(per) == sorted(per) and "" in per and None not in per
    assert per[""]["utterances"] == 3 and sum(g["utterances"] for g in per.values()) == len(rows)
    assert len(per) == len({s or "" for s in speakers}) > 2
    errors = sum(g["wer"] * g["ref_words"] / 100.0 for g in per.values())
    assert 100.0 * errors / sum(g["ref_words"] for g in per.values()) == pytest.approx(error_rates(refs, hyps)["wer"])
    one = breakdown(["a", "b", "a"], [expected(1, 0, 0, 3), expected(0, 1, 1, 1), expected(0, 0, 0, 4)])
    assert one == {"a": {"wer": 12.5, "utterances": 2, "ref_words": 8, "errors": 1},
                   "b": {"wer": 100.0, "utterances": 1, "ref_words": 2, "errors": 2}}


def test_format_errs_sections_and_deterministic():
    ids, refs, hyps = ["a", "b", "c"], ["bir iki", "üç dört beş", "altı"], ["bir ii", "üç beş", "altı yedi"]
    ortho_r, ortho_h = ["Bir iki.", "üç dört beş", "altı"], ["Biriki.", "üç beş", "altı yedi"]
    text = format_errs(error_analysis(ids, refs, hyps, ortho_r, ortho_h))
    assert text == format_errs(error_analysis(ids, refs, hyps, ortho_r, ortho_h))
    lines = text.splitlines()
    assert lines[0] == f"%WER = {100 * 3 / 6:.2f}"
    assert lines[1] == "Errors: 1 insertions, 1 deletions, 1 substitutions, over 6 reference words (4 correct)"
    heads = ["PER-UTT DETAILS: corr or (ref->hyp)", "SUBSTITUTIONS: count ref -> hyp", "DELETIONS: count ref",
             "INSERTIONS: count hyp", "CHAR SUBSTITUTIONS: count ref -> hyp", "CHAR DELETIONS: count ref",
             "CHAR INSERTIONS: count hyp"]
    assert [lines.index(h) for h in heads] == sorted(lines.index(h) for h in heads)
    per_utt = lines.index(heads[0])
    assert lines[per_utt + 1 : per_utt + 4] == ["a:\tbir (iki->ii)", "b:\tüç (dört->*) beş", "c:\taltı (*->yedi)"]
    assert lines[lines.index(heads[1]) + 1] == "1   iki -> ii"
    assert any(line.startswith("%CER = ") for line in lines)
    assert lines[lines.index(heads[4]) + 1] == ""  # no character substitutions
    at = lines.index(heads[5])  # a space is shown as ␣ and ranks first among equal counts (" " < "d")
    assert lines[at + 1 : at + 7] == ["2   ␣", "1   d", "1   r", "1   t", "1   ö", ""]
    # ranked sections do not depend on the order of the utterances; `top` cuts them
    shuffled = format_errs(error_analysis(ids[::-1], refs[::-1], hyps[::-1], ortho_r[::-1], ortho_h[::-1]))
    assert shuffled.split("\nSUBSTITUTIONS:")[1] == text.split("\nSUBSTITUTIONS:")[1]
    assert shuffled.split("\nSUBSTITUTIONS:")[0] != text.split("\nSUBSTITUTIONS:")[0]  # per-utt in given order
    many = error_analysis(["x"], ["a b c d"], ["e f g h"])
    short = format_errs(many, top=2).splitlines()
    at = short.index("SUBSTITUTIONS: count ref -> hyp")
    assert short[at + 1 : at + 4] == ["1   a -> e", "1   b -> f", ""]
