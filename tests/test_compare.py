"""asr.compare: paired bootstrap of the WER difference between two eval TSVs or run folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from asr.compare import bootstrap_ci, compare_files, main, paired_bootstrap, utterance_errors
from asr.metrics import error_rates
from helpers import FIXTURE


def sentences() -> list[str]:
    out = []
    for split in ("train", "dev"):
        with open(FIXTURE / f"{split}.tsv", encoding="utf-8", newline="") as f:
            out += [r["sentence"] for r in csv.DictReader(f, delimiter="\t")]
    return out


def system_rows(fixed_share: float = 0.0, n: int = 120) -> list[tuple[str, str, str]]:
    """(id, reference, hypothesis): 4 in 5 utterances have their first word wrong; `fixed_share` of
    those (every other one for 0.5) are right in this system."""
    rows, sents = [], sentences()
    wrong = 0
    for k in range(n):
        ref = sents[k % len(sents)]
        hyp = ref
        if k % 5 != 4:
            wrong += 1
            if not (fixed_share == 0.5 and wrong % 2 == 0):
                hyp = "yanlış " + " ".join(ref.split()[1:])
        rows.append((f"tr/utt{k:03d}", ref, hyp))
    return rows


def write_tsv(path, rows, header=("id", "reference", "hypothesis")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def test_identical_files_give_zero_difference_and_interval(tmp_path, capsys):
    write_tsv(tmp_path / "a.tsv", system_rows())
    r = compare_files(tmp_path / "a.tsv", tmp_path / "a.tsv")
    assert r["wer_a"] == r["wer_b"] > 0
    assert r["wer_diff"] == 0.0 and r["wer_diff_ci95"] == [0.0, 0.0]
    assert r["wer_p_b_better"] == 0.0 and not r["wer_significant"]
    assert main([str(tmp_path / "a.tsv"), str(tmp_path / "a.tsv")]) == 0
    assert "same WER: not significant at 95%" in capsys.readouterr().out


def test_fixing_half_the_errors_is_significant(tmp_path, capsys):
    write_tsv(tmp_path / "a.tsv", system_rows())
    # B: the same utterances in another order, extra columns, and half of A's errors fixed.
    write_tsv(tmp_path / "b.tsv", [(h, "spk", i, r) for i, r, h in reversed(system_rows(0.5))],
              header=("hypothesis", "speaker", "id", "reference"))
    r = compare_files(tmp_path / "a.tsv", tmp_path / "b.tsv")
    assert r["n"] == 120
    assert r["wer_b"] == pytest.approx(r["wer_a"] / 2, rel=0.02)
    low, high = r["wer_diff_ci95"]
    assert low < r["wer_diff"] < high < 0
    assert r["wer_significant"] and r["wer_p_b_better"] > 0.95
    assert main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]) == 0
    out = capsys.readouterr().out
    assert "B's WER is lower than A's" in out and "significant at 95% (the interval" in out
    # the other way round: B is worse, just as significantly
    r2 = compare_files(tmp_path / "b.tsv", tmp_path / "a.tsv")
    assert r2["wer_diff"] == -r["wer_diff"] and r2["wer_diff_ci95"][0] > 0 and r2["wer_p_b_better"] == 0.0


def test_errors_match_metrics_and_bootstrap_matches_a_plain_loop():
    refs = ["IRMAK kenarında", "Bir, iki; üç!", "...", "", "kitap okudum", "Türkiye'nin başkenti", "iki kelime"] * 5
    hyps = ["ırmak kenarında", "bir iki", "fazla", "boş değil", "", "Türkiyenin başkent", "iki, üç kelime"] * 5
    langs = ["tr", "tr", "tr", "", "", "tr", "tr"] * 5
    for normalizer in ("script", "basic"):
        u = utterance_errors(refs, hyps, normalizer, langs)
        expected = error_rates(refs, hyps, normalizer, langs)
        assert 100.0 * u["word_errors"].sum() / u["words"].sum() == expected["wer"]
        assert 100.0 * u["char_errors"].sum() / u["chars"].sum() == expected["cer"]
    ea = utterance_errors(refs, hyps, "script", langs)
    eb = utterance_errors(refs, refs[:1] + hyps[1:], "script", langs)
    # a straightforward bootstrap: the same seeded indices, one resample at a time in plain Python
    n, resamples = len(refs), 200
    idx = np.random.default_rng(7).integers(0, n, size=(resamples, n)).tolist()
    diffs, wers, better = [], [], 0
    for sample in idx:
        words = sum(int(ea["words"][i]) for i in sample)
        wa = 100.0 * sum(int(ea["word_errors"][i]) for i in sample) / max(words, 1)
        wb = 100.0 * sum(int(eb["word_errors"][i]) for i in sample) / max(words, 1)
        diffs.append(wb - wa)
        wers.append(wa)
        better += wb < wa
    got = paired_bootstrap(ea["word_errors"], eb["word_errors"], ea["words"], resamples, seed=7)
    assert got["diff_ci95"] == pytest.approx(list(np.percentile(diffs, [2.5, 97.5])), abs=1e-9)
    assert got["p_b_better"] == better / resamples
    assert bootstrap_ci(ea["word_errors"], ea["words"], resamples, seed=7) == pytest.approx(
        tuple(np.percentile(wers, [2.5, 97.5])), abs=1e-9)
    # 10k utterances are drawn in blocks: still a sensible interval around the corpus WER
    big = np.tile(ea["word_errors"], 400), np.tile(ea["words"], 400)
    low, high = bootstrap_ci(*big)
    assert low < 100.0 * big[0].sum() / big[1].sum() < high and high - low < 3


def test_mismatched_ids_or_references_end_in_one_line(tmp_path, capsys):
    rows = system_rows(n=20)
    write_tsv(tmp_path / "a.tsv", rows)
    write_tsv(tmp_path / "b.tsv", rows[:-1])
    assert main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 ids only in A, 0 only in B (e.g. 'tr/utt019' only in A)" in err
    write_tsv(tmp_path / "b.tsv", [(i, r + " x" if i == "tr/utt003" else r, h) for i, r, h in rows])
    assert main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "id 'tr/utt003': the references differ" in err
    write_tsv(tmp_path / "b.tsv", [(i, r) for i, r, _ in rows], header=("id", "reference"))
    assert main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'b.tsv'}: no column 'hypothesis' in the header\n"


def write_eval(run, stem, set_name, rows, language="tr") -> None:
    """An eval TSV and the JSON beside it, as asr.train writes them (wer from asr.metrics)."""
    write_tsv(run / "eval" / f"{stem}.tsv", rows)
    write_tsv(run / "eval" / f"{stem}.worst.tsv", rows[:2])
    refs, hyps = [r for _, r, _ in rows], [h for _, _, h in rows]
    wer = error_rates(refs, hyps, "script", [language] * len(rows))["wer"]
    (run / "eval" / f"{stem}.json").write_text(json.dumps({"wer": wer, "set": set_name}))


def test_run_folders_every_set_newest_step_and_eval_only_files(tmp_path, capsys):
    # "IRMAK" / "ırmak" match only in Turkish: the language comes from the run's config.toml.
    turkish = [("tr/irmak", "IRMAK geldi", "ırmak geldi")]
    runs = {}
    for name, share in (("a", 0.0), ("b", 0.5)):
        run = runs[name] = tmp_path / f"run-{name}"
        rows = turkish + system_rows(share)
        write_eval(run, "step-000100", "tr", system_rows(n=30))
        write_eval(run, "step-000200", "tr", rows)
        write_eval(run, "step-000200.other", "other", rows[:50])
        write_eval(run, "step-000200.test.beam4", "tr", rows[:70])
        write_eval(run, "step-000200.test.beam4.other", "other", rows[:40])
        (run / "config.toml").write_text('[[data.sources]]\nname = ""\npath = "x/cv-tr"\nlanguage = "tr"\n\n'
                                         '[eval]\nnormalizer = "script"\n')
    a, b = str(runs["a"]), str(runs["b"])
    assert main([a, b, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["sets"]
    assert [(r["set"], r["step_a"], r["step_b"], r["n"]) for r in res] == [("tr", 200, 200, 121), ("other", 200, 200, 50)]
    assert res[0]["a"].endswith("step-000200.tsv") and res[0]["wer_significant"]
    assert res[0]["wer_a"] == res[0]["wer_a_recorded"] and res[0]["wer_b"] == res[0]["wer_b_recorded"]
    assert main([a, b, "--step", "100"]) == 0
    out = capsys.readouterr().out
    assert "set tr: 30 utterances" in out and "(step 100)" in out and "set other" not in out and "note:" not in out
    assert main([a, b, "--eval-only", "test.beam4", "--set", "other", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["sets"]
    assert [(r["set"], r["n"]) for r in res] == [("other", 40)] and res[0]["b"].endswith("step-000200.test.beam4.other.tsv")
    # one run folder and one TSV: the folder's first set at its newest step
    assert main([a, str(runs["b"] / "eval" / "step-000200.tsv"), "--json"]) == 0
    assert [r["set"] for r in json.loads(capsys.readouterr().out)["sets"]] == ["tr"]
    # outside a run, without its language, the Turkish I no longer matches, and a note says so
    x = tmp_path / "elsewhere" / "x.tsv"
    write_tsv(x, turkish + system_rows())
    x.with_suffix(".json").write_text((runs["a"] / "eval" / "step-000200.json").read_text())
    assert main([str(x), str(x)]) == 0
    assert "note: A's WER here" in capsys.readouterr().out
    assert main([str(x), str(x), "--language", "tr"]) == 0
    assert "note:" not in capsys.readouterr().out
    for argv, message in (([a, b, "--set", "nope"], "no evaluation of set 'nope' at step 200 (sets: tr, other)"),
                          ([a, b, "--step", "300"], "no training evaluation at step 300 (steps: 100, 200)"),
                          ([a, b, "--eval-only", "dev.greedy"], "--eval-only evaluations there: test.beam4")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
