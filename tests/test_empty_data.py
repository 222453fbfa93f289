"""Empty or failing data (issue 13, section 4) and a full disk while writing an evaluation (section 6): a
corpus whose clips cannot be decoded stops the run with one line instead of training to a "successful"
end; an evaluation set with no utterance is a start-up error; an evaluation that scored no utterance is
never the best and has null scores; every JSON a run writes is strict JSON; a failed write of an
evaluation's files leaves nothing half-written and ends the run cleanly."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr import checkpoint as ckpt
from asr.audio import audio_info

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import FIXTURE, FullDisk, read_json, scalars, tiny_ctc_config, write_exp


def reject(name):
    raise ValueError(f"not JSON: {name}")


def assert_strict_json(out: Path) -> list[Path]:
    """Every *.json under `out` parses without NaN/Infinity (which Python writes and other readers reject)."""
    found = sorted(out.rglob("*.json"))
    assert found
    for path in found:
        json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)
    return found


def config(out: Path, corpus: Path = FIXTURE, **train):
    """The tiny CTC run on `corpus`, pre-flight off (its checks are tested on their own): what is tested
    here is what training and evaluation do with the data."""
    cfg = tiny_ctc_config(out, **train)
    cfg.data.sources[0].path = str(corpus)
    cfg.preflight.enabled = False
    return cfg


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err[-3000:]
    return err


def steps(out: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]


# ---------------------------------------------------------------------------------------
# A corpus whose clips all fail to decode.


def nan_corpus(root: Path) -> Path:
    """The fixture's rows (32 train, 8 dev) over float32 wavs full of NaN, each as long as its fixture clip:
    the headers are fine (the filters keep every clip), the samples are not."""
    (root / "clips").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = (FIXTURE / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t")
        col = header.index("path")
        rows = []
        for line in lines[1:]:
            cells = line.split("\t")
            duration = audio_info(FIXTURE / "clips" / cells[col])[0]
            cells[col] = Path(cells[col]).stem + ".wav"
            sf.write(root / "clips" / cells[col], np.full(int(duration * 16000), np.nan, dtype=np.float32), 16000,
                     subtype="FLOAT")
            rows.append("\t".join(cells))
        (root / f"{split}.tsv").write_text("\n".join([lines[0]] + rows) + "\n", encoding="utf-8")
    return root


def test_a_corpus_of_nan_clips_stops_at_the_first_batch(tmp_path, capsys):
    """Before: trained to the end with loss nan, "wer 0.00 (n=0)", exported best/ and final/, rc 0."""
    import run

    out = tmp_path / "run"
    cfg = config(out, nan_corpus(tmp_path / "cv"), max_steps=4, save_every=1)
    assert run.main(["--exp", str(write_exp(cfg, tmp_path / "exp.toml"))]) == 1
    err = one_line_error(capsys)
    assert err.startswith("error: 8 of 32 training clips failed to decode in epoch 1, more than "
                          "data.max_failed_fraction = 0.05 allows")
    examples = re.findall(r"(tr/\S+) \([^()]*audio contains NaN or infinite samples\)", err)
    assert len(examples) == 3, err
    assert "last good checkpoint: none yet" in err and str(out / "data_report.json") in err
    assert not (out / "best").exists() and not (out / "final").exists() and not (out / "results.json").exists()
    assert steps(out) == []
    # The step-0 evaluation (its clips are NaN too) scored nothing: null scores, not a best.
    step0 = read_json(out / "eval" / "step-000000.json")
    assert step0["n"] == 0 and step0["failed"] == 8
    assert step0["wer"] is None and step0["cer"] is None and step0["loss"] is None
    # What the loader saw is in the data report: the clips count as failed, not as kept.
    report = read_json(out / "data_report.json")
    for split, n in (("tr/train", 8), ("tr/dev", 8)):
        assert report[split]["decode_failed"] == n
        assert report[split]["decode_failed_reasons"] == {"audio contains NaN or infinite samples": n}
        assert report[split]["dropped"] == {"decode_failed": n}
        assert report[split]["kept"] == report[split]["total"] - n
    assert {e["id"] for e in report["tr/train"]["examples"]["decode_failed"]} >= set(examples)
    assert_strict_json(out)


# ---------------------------------------------------------------------------------------
# data.max_failed_fraction: one clip of 32 that never decodes.


def fail_one_clip(monkeypatch, at_call: int = 17) -> set:
    """From the `at_call`-th clip loaded on (the third batch of 8), that clip fails to decode every time."""
    from asr import data
    from asr.audio import AudioError

    real, calls, victim = data.load_utterance_audio, [], set()

    def load(utt, sample_rate):
        calls.append(utt.id)
        if len(calls) == at_call:
            victim.add(utt.id)
        if utt.id in victim:
            raise AudioError(f"{utt.path}: cannot decode audio (simulated)")
        return real(utt, sample_rate)

    monkeypatch.setattr(data, "load_utterance_audio", load)
    return victim


def test_one_failing_clip_in_32_trains_on_with_the_default_fraction(tmp_path, monkeypatch):
    from asr.train import train

    victim = fail_one_clip(monkeypatch)
    out = tmp_path / "run"
    cfg = config(out, max_steps=8)  # two epochs: the clip fails in both
    cfg.eval.at_start = False
    results = train(cfg, fresh=True)
    assert results["steps"] == 8 and len(victim) == 1
    (clip,) = victim
    log = (out / "train.log").read_text(encoding="utf-8")
    assert len(re.findall(rf"dropped {re.escape(clip)}: .*simulated", log)) == 1  # logged once, not each epoch
    report = read_json(out / "data_report.json")["tr/train"]
    assert report["decode_failed"] == 1 and report["kept"] == 31
    assert report["decode_failed_reasons"] == {"cannot decode audio (simulated)": 1}
    assert report["examples"]["decode_failed"][0]["id"] == clip
    # The epoch's failures travel with the checkpoint, so a resumed run goes on counting them.
    trainer = torch.load(out / "checkpoints" / "step-000008" / "trainer.pt", weights_only=False)
    assert trainer["failed"]["epoch"] == 1 and [i for i, _ in trainer["failed"]["clips"]] == [clip]


def test_failures_counted_before_a_resume_still_count_after_it(tmp_path, monkeypatch, capsys):
    """The epoch's first failure (step 3) is in the checkpoint the resumed run starts from; the clip that
    fails at its step 4, in the same epoch, makes two, over data.max_failed_fraction's 1.5 of 32, and stops
    it (before: the count began again at 0 and the run went on)."""
    import run
    from asr import data

    fail_one_clip(monkeypatch)  # the 17th clip loaded: step 3 of epoch 1
    out = tmp_path / "run"
    cfg = config(out, max_steps=8)  # 4 steps an epoch
    cfg.eval.at_start = False
    cfg.data.max_failed_fraction = 1.5 / 32
    cfg.train.save_every = 1
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--set", "train.max_steps=3"]) == 0
    real, seen = data.load_utterance_audio, []

    def first_fails(utt, sample_rate):
        if not seen:
            seen.append(utt.id)
            raise data.AudioError(f"{utt.path}: cannot decode audio (simulated)")
        return real(utt, sample_rate)

    monkeypatch.setattr(data, "load_utterance_audio", first_fails)
    capsys.readouterr()
    assert run.main(["--exp", str(exp)]) == 1
    err = capsys.readouterr().err
    assert "error: 2 of 32 training clips failed to decode in epoch 1, more than data.max_failed_fraction" in err


def test_one_failing_clip_stops_the_run_with_fraction_0(tmp_path, monkeypatch, capsys):
    """With data.max_failed_fraction = 0 the failure stops the run before its step: the previous step's
    checkpoint stays (not pruned, keep_last = 1), nothing is exported."""
    import run

    victim = fail_one_clip(monkeypatch)
    out = tmp_path / "run"
    cfg = config(out, max_steps=8, save_every=1, keep_last=1)
    cfg.eval.at_start = False
    cfg.data.max_failed_fraction = 0.0
    assert run.main(["--exp", str(write_exp(cfg, tmp_path / "exp.toml"))]) == 1
    err = one_line_error(capsys)
    (clip,) = victim
    last = out / "checkpoints" / "step-000002"
    assert err == (f"error: 1 of 32 training clips failed to decode in epoch 1, more than data.max_failed_fraction "
                   f"= 0.0 allows, e.g. {clip} ({FIXTURE / 'clips' / clip.split('/')[1]}.mp3: cannot decode audio "
                   f"(simulated)); stopping (last good checkpoint: {last}; see {out / 'data_report.json'})")
    assert steps(out) == [2]
    ckpt.load_checkpoint(last)
    assert not (out / "final").exists() and not (out / "best").exists() and not (out / "results.json").exists()
    assert read_json(out / "data_report.json")["tr/train"]["decode_failed"] == 1


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_max_failed_fraction_is_validated(tmp_path, capsys, value):
    import run

    exp = write_exp(config(tmp_path / "run"), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--set", f"data.max_failed_fraction={value}", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == f"error: data.max_failed_fraction: must be in [0, 1], got {float(value)!r}"


# ---------------------------------------------------------------------------------------
# An evaluation set with no utterance.


def header_only_dev(tmp_path: Path) -> Path:
    """The fixture corpus with a dev.tsv of a header and no rows."""
    corpus = tmp_path / "cv"
    shutil.copytree(FIXTURE, corpus, ignore=shutil.ignore_patterns("clips"))
    (corpus / "clips").symlink_to(FIXTURE / "clips")
    header = (FIXTURE / "dev.tsv").read_text(encoding="utf-8").splitlines()[0]
    (corpus / "dev.tsv").write_text(header + "\n", encoding="utf-8")
    return corpus


@pytest.mark.parametrize("eval_only", [False, True])
def test_a_dev_split_with_a_header_and_no_rows_is_a_startup_error(tmp_path, capsys, eval_only):
    """Before: "wer 0.00 (n=0)", the untrained step-0 model exported as best/ with WER 0, NaN in results.json."""
    import run

    corpus = header_only_dev(tmp_path)
    out = tmp_path / "run"
    exp = write_exp(config(out, corpus), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp)] + (["--eval-only"] if eval_only else [])) == 1
    err = one_line_error(capsys)
    assert err == (f"error: evaluation set 'tr' (tr/dev): no utterance left after filtering (0 read: no rows; "
                   f"see {out / 'data_report.json'})")
    assert not (out / "eval").exists() and not (out / "checkpoints").exists() and not (out / "best").exists()
    assert read_json(out / "data_report.json")["tr/dev"]["total"] == 0


# ---------------------------------------------------------------------------------------
# An evaluation that scored no utterance.


def test_an_evaluation_of_no_decoded_clip_is_never_the_best(tmp_path, monkeypatch):
    """The evaluation of step 2 loses every clip to decoding errors: its scores are null (before: WER 0,
    which made it the best), the best stays where it was, TensorBoard gets no score for it."""
    import asr.evaluation
    import asr.train as T
    from asr import data
    from asr.audio import AudioError

    broken, calls = {"on": False}, []
    real_evaluate, real_load = asr.evaluation.evaluate, data.load_utterance_audio

    def evaluate(*args, **kwargs):
        calls.append(1)
        broken["on"] = len(calls) == 2  # evaluations at steps 0, 2, 4
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            broken["on"] = False

    def load(utt, sample_rate):
        if broken["on"]:
            raise AudioError(f"{utt.path}: cannot decode audio (simulated)")
        return real_load(utt, sample_rate)

    monkeypatch.setattr(asr.evaluation, "evaluate", evaluate)
    monkeypatch.setattr(data, "load_utterance_audio", load)
    out = tmp_path / "run"
    results = T.train(config(out, max_steps=4, eval_every=2), fresh=True)
    assert len(calls) == 3
    step2 = read_json(out / "eval" / "step-000002.json")
    assert step2["n"] == 0 and step2["failed"] == 8
    assert all(step2[k] is None for k in ("wer", "cer", "wer_ortho", "cer_ortho", "loss", "insertion_rate"))
    assert results["best"]["step"] in (0, 4) and results["best"]["wer"] is not None
    assert read_json(out / "best" / "asr_export.json")["step"] == results["best"]["step"]
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "eval tr step 2: no utterance could be decoded (8 failed); no scores, not a best" in log
    assert not re.search(r"new best wer \S+ at step 2$", log, re.M)
    assert read_json(out / "data_report.json")["tr/dev"]["decode_failed"] == 8
    assert [s for s, _ in scalars(out)["eval/tr/wer"]] == [0, 4]
    assert_strict_json(out)


# ---------------------------------------------------------------------------------------
# Strict JSON.


def test_every_json_of_a_run_with_nan_losses_is_strict(tmp_path, monkeypatch):
    """Every loss non-finite (training and evaluation), pre-flight on: before, eval/*.json and results.json
    held a bare NaN."""
    from asr import losses
    from asr.train import train

    def nan_ctc(outputs, batch):
        loss_sum, n = losses.ctc(outputs, batch)
        return loss_sum * float("nan"), n

    monkeypatch.setitem(losses.LOSSES["ctc"], "nan_ctc", nan_ctc)
    out = tmp_path / "run"
    cfg = config(out, max_steps=2, max_bad_steps=10, eval_every=1)
    cfg.preflight.enabled = True
    cfg.train.loss = "nan_ctc"
    results = train(cfg, fresh=True)
    assert results["skipped_steps"] == 2
    found = {p.relative_to(out).as_posix() for p in assert_strict_json(out)}
    assert {"preflight.json", "data_report.json", "results.json", "eval/step-000002.json", "best/asr_export.json",
            "final/asr_export.json"} <= found
    assert read_json(out / "eval" / "step-000002.json")["loss"] is None
    assert read_json(out / "results.json")["eval"]["tr"]["loss"] is None


def test_json_text_maps_non_finite_numbers_to_null():
    text = ckpt.json_text({"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)], "c": {"d": 0.5}})
    assert json.loads(text, parse_constant=reject) == {"a": None, "b": [1.0, None, [None, 2]], "c": {"d": 0.5}}


# ---------------------------------------------------------------------------------------
# The disk fills up while an evaluation's files are written.


def fill_disk_at(monkeypatch, full) -> None:
    """Files opened for writing whose path satisfies `full(path)` are on a full disk (builtins.open and
    io.open, which pathlib's write_text uses)."""
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and ("w" in mode or "a" in mode) and full(Path(file)):
            return FullDisk(f, room=0)
        return f

    monkeypatch.setattr("builtins.open", open_)
    monkeypatch.setattr(io, "open", open_)


@pytest.mark.parametrize("checkpoint_fits", [True, False])
def test_disk_full_while_writing_an_evaluation(tmp_path, monkeypatch, capsys, checkpoint_fits):
    """Step 4's eval/step-000004.json cannot be written (before: a traceback in write_eval, an empty
    step-000004.json left behind, the steps since the last checkpoint lost). Now: one line naming the file,
    no eval file of step 4 (nor a temporary one) left, and a checkpoint of step 4 when one still fits, else
    the previous checkpoint intact; exit status 1. The same command then resumes and finishes."""
    import run

    def full(path: Path) -> bool:
        if path.parent.name == "eval" and "step-000004.json" in path.name:
            return True
        return not checkpoint_fits and path.parent.name.startswith(".tmp-step-000004") and path.name == "model.pt"

    out = tmp_path / "run"
    cfg = config(out, max_steps=6, eval_every=2, save_every=2, keep_last=5)
    cfg.eval.at_start = False
    exp = write_exp(cfg, tmp_path / "exp.toml")
    with monkeypatch.context() as m:
        fill_disk_at(m, full)
        assert run.main(["--exp", str(exp)]) == 1
    err = one_line_error(capsys)
    cause = f"error: cannot write {out / 'eval' / 'step-000004.json'}: No space left on device; "
    if checkpoint_fits:
        assert err == cause + "stopped after saving the checkpoint of step 4"
        assert steps(out) == [2, 4]
    else:
        assert err == (cause + f"the checkpoint of step 4 could not be saved either (cannot write checkpoint "
                       f"{out / 'checkpoints' / 'step-000004'}: No space left on device); last checkpoint: "
                       f"{out / 'checkpoints' / 'step-000002'}")
        assert steps(out) == [2]
    ckpt.load_checkpoint(out / "checkpoints" / "step-000002")
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step-000002.errs.txt", "step-000002.json",
                                                                "step-000002.tsv", "step-000002.worst.tsv"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert not (out / "final").exists() and not (out / "results.json").exists()
    read_json(out / "eval" / "step-000002.json")

    assert run.main(["--exp", str(exp)]) == 0  # room again: resumes and finishes
    assert read_json(out / "results.json")["steps"] == 6
    log = (out / "train.log").read_text(encoding="utf-8")
    assert f"resumed from {out / 'checkpoints' / ('step-000004' if checkpoint_fits else 'step-000002')}" in log


# ---------------------------------------------------------------------------------------
# Two ranks: the failures are counted over both, so both stop at the same step.


def test_two_ranks_stop_together_when_a_clip_of_one_rank_fails(tmp_path):
    """One NaN clip of 32 and data.max_failed_fraction = 0 under torchrun: only the rank whose share holds
    the clip sees it fail; the count is summed over ranks, so both stop with the same line (a rank stopping
    alone would leave the other waiting in its next collective)."""
    import subprocess
    import sys

    from helpers import REPO

    corpus = tmp_path / "cv"
    shutil.copytree(FIXTURE, corpus, ignore=shutil.ignore_patterns("clips"))
    (corpus / "clips").mkdir()
    for clip in (FIXTURE / "clips").iterdir():
        (corpus / "clips" / clip.name).symlink_to(clip)
    lines = (corpus / "train.tsv").read_text(encoding="utf-8").splitlines()
    cells = lines[10].split("\t")
    victim = "tr/" + Path(cells[1]).stem
    duration = audio_info(FIXTURE / "clips" / cells[1])[0]
    cells[1] = Path(cells[1]).stem + ".wav"
    sf.write(corpus / "clips" / cells[1], np.full(int(duration * 16000), np.nan, dtype=np.float32), 16000,
             subtype="FLOAT")
    lines[10] = "\t".join(cells)
    (corpus / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    cfg = config(out, corpus, max_steps=8, save_every=0)
    cfg.eval.at_start = False
    cfg.data.batch_size = 4  # per rank: a global batch of 8, 4 per rank
    cfg.data.max_failed_fraction = 0.0
    exp = write_exp(cfg, tmp_path / "exp.toml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    logs = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             f"--log-dir={logs}", "--redirects=3", "run.py", "--exp", str(exp)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=180)  # a rank that stopped alone would leave the other waiting: no end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
            proc.wait()
    assert rc != 0
    errors = []
    for rank in (0, 1):
        (path,) = logs.rglob(f"attempt_0/{rank}/stderr.log")
        lines = [line for line in path.read_text().splitlines() if line.startswith("error: ")]
        errors.append(lines)
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert errors[0][0].startswith(f"error: 1 of 32 training clips failed to decode in epoch 1, more than "
                                   f"data.max_failed_fraction = 0.0 allows, e.g. {victim} (")
    assert not (out / "final").exists() and not (out / "results.json").exists()


def test_decoded_arrays_of_nan_from_a_table_fail_like_files(monkeypatch):
    """A Hugging Face table holding decoded samples (not file bytes): NaN samples fail the clip, as a
    file's do in asr.audio.load_audio (the same NonFiniteAudio, which pre-flight reports as non_finite)."""
    from asr import data
    from asr.audio import NonFiniteAudio

    class Table:
        column_names = ["audio"]

        def __getitem__(self, row):
            return {"audio": {"array": [0.1, float("nan")] * 800 if row else [0.1, -0.1] * 800,
                              "sampling_rate": 16000}}

    monkeypatch.setitem(data._HF_TABLES, "t:train", Table())
    good, bad = (data.Utterance(id=f"t/train/{i}", text="x", language="tr", source="t", table="t:train", row=i)
                 for i in (0, 1))
    assert data.load_utterance_audio(good, 16000).shape == (1600,)
    for rate in (16000, None):
        with pytest.raises(NonFiniteAudio, match=r"^t/train/1: audio contains NaN or infinite samples$"):
            data.load_utterance_audio(bad, rate)


def test_a_dev_split_with_a_header_and_no_rows_is_a_preflight_error(tmp_path, capsys):
    import run

    corpus = header_only_dev(tmp_path)
    exp = write_exp(config(tmp_path / "run", corpus), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--check"]) == 1
    out = capsys.readouterr().out
    assert "error: evaluation set 'tr' (tr/dev): no utterance left after filtering (0 read: no rows)" in out
