"""--eval-only (issue 14): it evaluates with the run's own saved settings (plus new --set), leaves the run's
config.toml and data_report.json as they are, writes its results beside the training run's (JSON with the
WER's bootstrap interval, TSV, errs.txt) and to TensorBoard, and exits 1 when a set decodes nothing."""

from __future__ import annotations

import pytest

import run

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import read_json, read_tsv, scalars, tiny_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run trained with a --set the experiment file does not have (another model size)."""
    return tiny_run(tmp_path_factory.mktemp("trained"), 2, "model.hidden_size=48")


def test_eval_only_uses_the_runs_own_settings_and_keeps_its_files(trained, capsys):
    exp, out = trained
    config, report = (out / "config.toml").read_bytes(), (out / "data_report.json").read_bytes()
    capsys.readouterr()
    # Before: the experiment file's model (hidden size 32) could not load the checkpoint (48): exit 1.
    assert run.main(["--exp", str(exp), "--eval-only"]) == 0
    said = capsys.readouterr().out
    assert f"evaluating with the run's own settings ({out / 'config.toml'}); the experiment file's differ in " \
           f"model.hidden_size (not used)" in said
    assert (out / "config.toml").read_bytes() == config and (out / "data_report.json").read_bytes() == report
    metrics = read_json(out / "eval" / "step-000002.dev.greedy.json")
    assert (metrics["set"], metrics["split"], metrics["decode"], metrics["step"], metrics["n"]) == \
        ("tr", "dev", "greedy", 2, 8)
    low, high = metrics["wer_ci95"]
    assert low <= metrics["wer"] <= high
    assert metrics["ref_words"] == sum(int(r["ref_words"]) for r in read_tsv(out / "eval" / "step-000002.dev.greedy.tsv"))
    errs = (out / "eval" / "step-000002.dev.greedy.errs.txt").read_text(encoding="utf-8")
    assert errs.startswith(f"%WER = {metrics['wer']:.2f}") and "PER-UTT DETAILS:" in errs
    assert [s for s, _ in scalars(out)["eval-only/dev.greedy/tr/wer"]] == [2]


def test_eval_only_of_a_run_folder_with_new_settings(trained):
    _, out = trained
    assert run.main(["--run", str(out), "--eval-only", "--set", "eval.split=train", "--set",
                     "eval.max_utterances=4"]) == 0
    metrics = read_json(out / "eval" / "step-000002.train.greedy.json")
    assert (metrics["split"], metrics["n"], metrics["max_utterances"]) == ("train", 4, 4)


def test_eval_only_that_decodes_nothing_exits_1(trained, monkeypatch, capsys):
    from asr import data
    from asr.audio import AudioError

    _, out = trained

    def broken(utt, sample_rate):
        raise AudioError(f"{utt.path}: cannot decode audio (simulated)")

    monkeypatch.setattr(data, "load_utterance_audio", broken)
    assert run.main(["--run", str(out), "--eval-only", "--set", "decode.method=beam"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --eval-only: no utterance of evaluation set 'tr' (8 failed) could be decoded; no scores " \
                  "(see data_report.json and train.log)"
    assert read_json(out / "eval" / "step-000002.dev.beam4.json")["wer"] is None


def test_run_and_exp_are_one_or_the_other(tmp_path, capsys):
    assert run.main(["--eval-only"]) == 2
    assert run.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: give the experiment as --exp FILE or --run FOLDER (one of them)",
                   f"error: --run: no config.toml in {tmp_path} (not a run folder)"]
