"""Diagnostics inside the training loop (issue 7): hallucination signals, the step-0 baseline, worst-utterance
files, the change since step 0 per evaluation set (also across a resume), the language-aware normaliser in
evaluation, and the pre-flight check (`run.py --check`, and at the start of a fresh run)."""

from __future__ import annotations

import csv
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from asr.config import EvalSetConfig, SourceConfig, validate
from asr.metrics import compression_ratio, error_rates, hallucination_metrics, has_loop
from asr.text import normalize
from asr.train import train

from helpers import (FIXTURE, read_json, read_tsv, scalars, tiny_ctc_config, write_exp)


HALLUCINATION_KEYS = ("insertion_rate", "empty_rate", "loop_rate", "compression_ratio", "high_compression_rate",
                      "length_ratio")


def fixture_copy(folder: Path, sentences: dict[str, str] | None = None) -> Path:
    """A copy of the fixture corpus (another source of the same clips); `sentences` replaces the sentence
    column of the named splits' TSVs with one text for every row."""
    shutil.copytree(FIXTURE, folder)
    for split, text in (sentences or {}).items():
        path = folder / f"{split}.tsv"
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        col = rows[0].index("sentence")
        for r in rows[1:]:
            r[col] = text
        path.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------
# Hypotheses written by hand: what a looping, empty or inventing model would output.


def test_hallucination_metrics_on_hand_written_hypotheses():
    refs = ["the cat sat on the mat", "a dog runs", "hello world", "one two three"]
    hyps = ["the cat the cat the cat the cat",  # a decoder loop
            "",  # nothing for a non-empty reference
            "hello big wide world",  # two inserted words
            "one two three"]  # correct
    m = hallucination_metrics(refs, hyps)
    assert set(m) == set(HALLUCINATION_KEYS)
    assert m["loop_rate"] == pytest.approx(25.0)
    assert m["empty_rate"] == pytest.approx(25.0)
    # Insertions: the loop's 8 words against 6 (2 inserted), "big wide" (2); per reference word (6+3+2+3).
    assert m["insertion_rate"] == pytest.approx(100.0 * 4 / 14)
    assert m["length_ratio"] == pytest.approx((8 + 0 + 4 + 3) / 14)
    ratios = [compression_ratio(h) for h in hyps if h]
    assert m["compression_ratio"] == pytest.approx(sum(ratios) / 3)
    assert m["high_compression_rate"] == 0.0  # short texts compress poorly, even the loop

    # Nothing wrong: every rate is zero and the length ratio one.
    clean = hallucination_metrics(refs, refs)
    assert clean["loop_rate"] == clean["empty_rate"] == clean["insertion_rate"] == 0.0
    assert clean["length_ratio"] == pytest.approx(1.0)

    # A long loop compresses far better than speech does.
    looping = "the cat " * 20
    assert compression_ratio(looping) > 2.4
    assert compression_ratio("bir iki üç dört beş altı yedi sekiz dokuz on") < 2.4
    long = hallucination_metrics(["the cat sat on the mat", "one two three"], [looping.strip(), "one two three"])
    assert long["loop_rate"] == pytest.approx(50.0) and long["high_compression_rate"] == pytest.approx(50.0)
    assert long["compression_ratio"] == pytest.approx((compression_ratio(looping.strip()) + ratios[-1]) / 2)
    assert long["length_ratio"] == pytest.approx(43 / 9)
    # An empty reference: every hypothesis word is an insertion; an empty hypothesis there is not "empty".
    assert hallucination_metrics(["", "x"], ["extra words", "x"])["insertion_rate"] == pytest.approx(200.0)
    assert hallucination_metrics(["", "x"], ["", "x"])["empty_rate"] == 0.0


def test_has_loop_and_compression_ratio():
    assert has_loop("the cat the cat the cat the cat".split())
    assert has_loop("so so so".split())
    assert has_loop("and then i went to the shop to the shop to the shop".split())
    assert not has_loop("the cat the cat".split())  # two repeats are language, not a loop
    assert not has_loop("the cat sat on the mat".split())
    assert not has_loop([])
    assert compression_ratio("") == 0.0
    assert compression_ratio("ab" * 100) > 2.4


# ---------------------------------------------------------------------------------------
# A run with two evaluation sets and hand-made hypotheses, stopped at step 4 and resumed to step 6.


def fake_ctc_decode(calls: list):
    """A stand-in for asr.evaluation.ctc_decode that ignores the model and writes, for each utterance, one of:
    the reference (correct after normalising), nothing, a loop of its first word, or the reference with
    inserted words. The choice changes with every call, so WER differs between evaluations."""

    def decode(bundle, outputs, batch, cfg=None):
        n = len(calls)
        calls.append(list(batch["ids"]))
        out = []
        for k, (ref, lang) in enumerate(zip(batch["texts"], batch["languages"])):
            words = normalize(ref, lang).split()
            kind = random.Random(1000 * n + k).randrange(4)
            out.append([" ".join(words), "", " ".join([words[0]] * 6), " ".join(words + ["bir", "iki"])][kind])
        return out

    return decode


@contextmanager
def patched_decode(calls):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("asr.evaluation.ctc_decode", fake_ctc_decode(calls))
        yield


def two_set_config(out, de_copy, max_steps):
    """The fixture's dev split and a second, evaluation-only source (the fixture's test split under "de")."""
    cfg = tiny_ctc_config(out, max_steps=max_steps, eval_every=2, save_every=2, keep_last=5, log_every=1)
    cfg.data.sources.append(SourceConfig(kind="common_voice", path=str(de_copy), language="de", train="", dev="",
                                         test="test"))
    cfg.eval.sets = [EvalSetConfig(source="tr", split="dev", name="tr-dev"),
                     EvalSetConfig(source="de", split="test", name="de")]
    cfg.eval.worst = 5
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def sets_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    de = fixture_copy(root / "cv-de")
    out = root / "run"
    calls: list = []
    with patched_decode(calls):
        first = train(two_set_config(out, de, 4), fresh=True)
        preflight_first = read_json(out / "preflight.json")
        (out / "preflight.json").unlink()  # a resumed run must not write it again
        log_first = (out / "train.log").read_text(encoding="utf-8")
        second = train(two_set_config(out, de, 6))
    return {"out": out, "first": first, "second": second, "calls": calls, "preflight": preflight_first,
            "log_first": log_first}


def test_step0_is_evaluated_on_a_fresh_run_only(sets_run):
    out, first, second = sets_run["out"], sets_run["first"], sets_run["second"]
    m0 = read_json(out / "eval" / "step-000000.json")
    d0 = read_json(out / "eval" / "step-000000.de.json")
    assert (m0["set"], m0["step"], d0["set"]) == ("tr-dev", 0, "de")
    assert first["baseline_wer"] == {"tr-dev": m0["wer"], "de": d0["wer"]}
    # The resumed invocation evaluated steps 6 only (two sets), not step 0 again, and kept the baseline.
    assert len(sets_run["calls"]) == 2 * 3 + 2
    assert second["baseline_wer"] == first["baseline_wer"]
    log = (out / "train.log").read_text(encoding="utf-8")
    assert len(re.findall(r"eval tr-dev step 0:", log)) == 1
    assert re.search(r"resumed from .*step-000004", log)
    tags = scalars(out)
    assert [s for s, _ in tags["eval/tr-dev/wer"]] == [0, 2, 4, 6]
    assert [s for s, _ in tags["eval/de/wer"]] == [0, 2, 4, 6]
    assert read_json(out / "results.json")["baseline_wer"] == first["baseline_wer"]


def test_eval_at_start_false_skips_step0(tmp_path):
    cfg = tiny_ctc_config(tmp_path / "run", max_steps=2, eval_every=2)
    cfg.eval.at_start = False
    results = train(cfg, fresh=True)
    out = tmp_path / "run"
    assert not (out / "eval" / "step-000000.json").exists()
    assert (out / "eval" / "step-000002.json").is_file()
    assert results["baseline_wer"] == {}
    assert "wer_change_since_step0" not in read_json(out / "eval" / "step-000002.json")
    tags = scalars(out)
    assert [s for s, _ in tags["eval/tr/wer"]] == [2]
    assert "eval/tr/wer_change_since_step0" not in tags


def test_step0_evaluation_does_not_change_training(tmp_path):
    """The baseline evaluation draws no random numbers that training uses: with dropout, SpecAugment masks and
    a loader worker, a run with it and one without end on the same weights."""
    from helpers import final_params

    runs = {}
    for at_start in (True, False):
        cfg = tiny_ctc_config(tmp_path / str(at_start), max_steps=3)
        m = cfg.model
        m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.feat_proj_dropout = m.final_dropout = 0.1
        m.mask_time_prob, m.mask_time_length = 0.3, 2
        cfg.data.num_workers = 1
        cfg.eval.at_start = at_start
        train(cfg, fresh=True)
        runs[at_start] = final_params(tmp_path / str(at_start) / "checkpoints" / "step-000003")
    assert (tmp_path / "True" / "eval" / "step-000000.json").is_file()
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])


def _normalised(rows, lang):
    return [normalize(r["reference"], lang) for r in rows], [normalize(r["hypothesis"], lang) for r in rows]


def test_hallucination_signals_in_eval_json_and_tensorboard(sets_run):
    out = sets_run["out"]
    tags = scalars(out)
    seen = set()
    for step in (0, 2, 4, 6):
        for name, suffix, lang in (("tr-dev", "", "tr"), ("de", ".de", "de")):
            stem = out / "eval" / f"step-{step:06d}{suffix}"
            m = read_json(stem.with_name(stem.name + ".json"))
            refs, hyps = _normalised(read_tsv(stem.with_name(stem.name + ".tsv")), lang)
            want = hallucination_metrics(refs, hyps)
            for key in HALLUCINATION_KEYS:
                assert m[key] == pytest.approx(want[key]), (step, name, key)
                assert dict(tags[f"eval/{name}/{key}"])[step] == pytest.approx(m[key], rel=1e-6), (step, name, key)
            seen.add((m["empty_rate"] > 0, m["loop_rate"] > 0, m["insertion_rate"] > 0))
    assert (True, True, True) in seen, "the hand-made hypotheses should trigger every signal"


def test_worst_utterances_file(sets_run):
    out = sets_run["out"]
    for stem, lang, n in (("step-000004", "tr", 8), ("step-000006.de", "de", 8)):
        rows = read_tsv(out / "eval" / f"{stem}.tsv")
        worst = read_tsv(out / "eval" / f"{stem}.worst.tsv")
        assert len(rows) == n
        assert list(worst[0]) == ["id", "reference", "hypothesis", "wer"]
        assert len(worst) == 5  # eval.worst
        wers = [float(r["wer"]) for r in worst]
        assert wers == sorted(wers, reverse=True)
        for r in worst:
            assert float(r["wer"]) == pytest.approx(
                error_rates([r["reference"]], [r["hypothesis"]], "script", [lang])["wer"], abs=0.005)
        # They are the highest: no utterance left out scores above the lowest listed.
        listed = {r["id"] for r in worst}
        others = [error_rates([r["reference"]], [r["hypothesis"]], "script", [lang])["wer"]
                  for r in rows if r["id"] not in listed]
        assert max(others) <= min(wers) + 0.005
        assert len(set(wers)) > 1, "the test needs utterances of different WER"


def test_change_since_step0_per_set_survives_resume(sets_run):
    out = sets_run["out"]
    tags = scalars(out)
    for name, suffix in (("tr-dev", ""), ("de", ".de")):
        base = read_json(out / "eval" / f"step-000000{suffix}.json")["wer"]
        change = dict(tags[f"eval/{name}/wer_change_since_step0"])
        assert sorted(change) == [0, 2, 4, 6]
        for step in (0, 2, 4, 6):
            wer = read_json(out / "eval" / f"step-{step:06d}{suffix}.json")["wer"]
            assert read_json(out / "eval" / f"step-{step:06d}{suffix}.json")["wer_change_since_step0"] == \
                pytest.approx(wer - base)
            assert change[step] == pytest.approx(wer - base, abs=1e-4), (name, step)
        assert any(abs(change[s]) > 1 for s in (2, 4, 6)), "WER should change between evaluations"
    log = (out / "train.log").read_text(encoding="utf-8")
    assert re.search(r"eval de step 6: .* change since step 0 [+-][0-9.]+", log)


def test_preflight_written_at_start_not_on_resume(sets_run):
    out = sets_run["out"]
    report = sets_run["preflight"]
    assert {"tr/train", "tr/dev", "de/test"} <= set(report["splits"])
    assert report["errors"] == []
    assert "pre-flight:" in sets_run["log_first"]
    assert not (out / "preflight.json").exists(), "a resumed run wrote preflight.json again"
    log = (out / "train.log").read_text(encoding="utf-8")
    assert log.count("pre-flight:") == 1


# ---------------------------------------------------------------------------------------
# The normaliser reads each utterance's language.


@pytest.mark.parametrize("language,expected_wer", [("tr", 0.0), ("en", 100.0)])
def test_evaluation_normalises_in_the_utterance_language(tmp_path, language, expected_wer):
    """References "IŞIK ILIK" (Turkish capitals), hypotheses "ışık ılık": equal in Turkish (I -> ı), not in
    English (I -> i)."""
    import run

    corpus = fixture_copy(tmp_path / "cv", {"dev": "IŞIK ILIK"})
    cfg = tiny_ctc_config(tmp_path / "run")
    cfg.data.sources[0].path = str(corpus)
    cfg.data.sources[0].language = language
    cfg.eval.normalizer = "script"
    exp = write_exp(cfg, tmp_path / "exp.toml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("asr.evaluation.ctc_decode", lambda bundle, outputs, batch, cfg=None: ["ışık ılık"] * len(
            batch["ids"]))
        assert run.main(["--exp", str(exp), "--eval-only"]) == 0
    m = read_json(tmp_path / "run" / "eval" / "step-000000.dev.greedy.json")
    assert m["n"] == 8
    assert m["wer"] == pytest.approx(expected_wer)
    assert m["wer_ortho"] == pytest.approx(100.0)  # as written, the case differs
    worst = read_tsv(tmp_path / "run" / "eval" / "step-000000.dev.greedy.worst.tsv")
    assert {float(r["wer"]) for r in worst} == {expected_wer}


# ---------------------------------------------------------------------------------------
# run.py --check.


def test_check_prints_table_and_writes_preflight(tmp_path, capsys):
    import run

    from transformers.utils import logging as hf_logging

    cfg = tiny_ctc_config(tmp_path / "run")
    exp = write_exp(cfg, tmp_path / "exp.toml")
    hf_logging.enable_progress_bar()
    assert run.main(["--exp", str(exp), "--check"]) == 0
    assert hf_logging.is_progress_bar_enabled()  # run.main leaves the libraries' settings as it found them
    printed = capsys.readouterr().out
    assert printed.startswith("pre-flight: ctc model")
    assert re.search(r"^split +clips +hours", printed, re.M)
    assert re.search(r"^tr/dev +8 ", printed, re.M)
    report = read_json(tmp_path / "run" / "preflight.json")
    assert report["errors"] == [] and report["splits"]["tr/train"]["clips"] == 32
    # Only checks: no training, no checkpoints.
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "train.log").exists()


def test_check_exits_1_when_the_preflight_reports_errors(tmp_path, capsys):
    import run

    cfg = tiny_ctc_config(tmp_path / "run")
    cfg.data.sources[0].dev = "nosuch"
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--check"]) == 1
    printed = capsys.readouterr().out
    report = read_json(tmp_path / "run" / "preflight.json")
    assert report["errors"] and any("nosuch" in e for e in report["errors"])
    assert re.search(r"^error: .*nosuch", printed, re.M)
