"""The training loop on tiny scratch CTC models and the fixture corpus: the loss falls, resume is exact,
the run layout (checkpoints, eval files, TensorBoard, results), exported folders in `pipeline`, --eval-only."""

from __future__ import annotations

import io
import re
import shutil

import pytest
import torch

from asr.config import to_toml
from asr.experiment import EXPORT_INFO, Progress
from asr.train import train

from helpers import (FIXTURE, final_params, read_json, read_tsv, same_clips_config, scalars, tiny_ctc_config,
                     write_exp)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 40-step run: eval and checkpoint every 10 steps, keep_last 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = tiny_ctc_config(out, max_steps=40, eval_every=10, save_every=10, keep_last=2, log_every=10)
    results = train(cfg, fresh=True)
    return cfg, out, results


# ---------------------------------------------------------------------------------------
# Learning.


def test_tiny_ctc_run_loss_falls(finished_run):
    _, out, results = finished_run
    loss = scalars(out)["train/loss"]
    assert [s for s, _ in loss] == [10, 20, 30, 40]
    first, last = loss[0][1], loss[-1][1]
    assert last < 0.75 * first, f"train loss did not fall: {loss}"
    # The same windows are in the results and the log.
    assert [s for s, _ in results["train_loss"]] == [10, 20, 30, 40]
    assert results["train_loss"][-1][1] == pytest.approx(last, rel=1e-5)
    log = (out / "train.log").read_text(encoding="utf-8")
    assert re.search(r"step 40/40 loss [0-9.]+ lr", log)
    # Evaluation loss falls too.
    evals = [read_json(out / "eval" / f"step-{s:06d}.json")["loss"] for s in (10, 40)]
    assert evals[1] < evals[0]


# ---------------------------------------------------------------------------------------
# Run layout.


def test_run_layout(finished_run):
    cfg, out, results = finished_run
    assert (out / "config.toml").read_text(encoding="utf-8") == to_toml(cfg)
    report = read_json(out / "data_report.json")
    assert report["tr/train"]["kept"] == 32 and report["tr/dev"]["kept"] == 8

    # eval/step-N.json and .tsv at every eval step.
    for step in (10, 20, 30, 40):
        metrics = read_json(out / "eval" / f"step-{step:06d}.json")
        for key in ("wer", "cer", "wer_ortho", "cer_ortho"):
            assert 0 <= metrics[key] < 1000, key
        assert metrics["n"] == 8 and metrics["step"] == step
        rows = read_tsv(out / "eval" / f"step-{step:06d}.tsv")
        assert list(rows[0]) == ["id", "speaker", "language", "duration", "ref_words", "substitutions",
                                 "deletions", "insertions", "reference", "hypothesis"]
        assert len(rows) == 8
        # The per-utterance counts add up to the set's WER; the JSON says what was evaluated.
        errors = sum(int(r[k]) for r in rows for k in ("substitutions", "deletions", "insertions"))
        assert metrics["ref_words"] == sum(int(r["ref_words"]) for r in rows)
        assert 100.0 * errors / metrics["ref_words"] == pytest.approx(metrics["wer"])
        assert (metrics["set"], metrics["split"], metrics["decode"], metrics["loss_name"]) == ("tr", "dev", "greedy", "ctc")
        assert metrics["wer_ci95"][0] <= metrics["wer"] <= metrics["wer_ci95"][1]
        assert sum(g["utterances"] for g in metrics["per_speaker"].values()) == 8
        assert (out / "eval" / f"step-{step:06d}.errs.txt").read_text().startswith("%WER = ")
        refs = {r["sentence"] for r in read_tsv(FIXTURE / "dev.tsv")}
        assert {r["reference"] for r in rows} == refs

    # results.json: final eval metrics, steps, throughput.
    res = read_json(out / "results.json")
    assert res["steps"] == 40
    last = read_json(out / "eval" / "step-000040.json")
    for key in ("wer", "cer", "wer_ortho", "cer_ortho", "n", "loss"):
        assert res["eval"]["tr"][key] == last[key], key
    assert res["train_samples_per_s"] > 0 and res["train_audio_s_per_s"] > 0

    # best/ and final/ are save_pretrained folders that say which step they hold.
    for name in ("best", "final"):
        assert (out / name / "config.json").is_file() and (out / name / "vocab.json").is_file()
        assert (out / name / "processor_config.json").is_file()  # feature extractor + tokenizer
    assert read_json(out / "final" / EXPORT_INFO)["step"] == 40
    assert read_json(out / "best" / EXPORT_INFO)["step"] == res["best"]["step"]


def test_checkpoints_keep_last_plus_best(finished_run):
    _, out, results = finished_run
    ck = out / "checkpoints"
    scores = {s: (lambda m: (m["wer"], m["cer"]))(read_json(out / "eval" / f"step-{s:06d}.json"))
              for s in (0, 10, 20, 30, 40)}
    best_step = min(scores, key=lambda s: (scores[s], s))  # the first step with the lowest (WER, CER)
    assert best_step > 0, "the untrained model scored best: the fixture trains too little to test this"
    assert results["best"]["step"] == best_step
    expected = {f"step-{s:06d}" for s in (30, 40, best_step)}
    assert {p.name for p in ck.iterdir()} == expected
    for name in expected:
        assert sorted(p.name for p in (ck / name).iterdir()) == ["config.toml", "manifest.json", "model.pt",
                                                                  "optimizer.pt", "trainer.pt"]
    trainer = torch.load(ck / "step-000040" / "trainer.pt", weights_only=False)
    assert trainer["step"] == 40
    assert {"scheduler", "scaler", "sampler", "rng", "best", "totals"} <= set(trainer)
    assert len(trainer["rng"]) == 1  # one entry per rank
    assert {"python", "numpy", "torch"} <= set(trainer["rng"][0])


def test_tensorboard_scalars(finished_run):
    _, out, _ = finished_run
    tags = scalars(out)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/audio_s_per_s",
                "eval/tr/wer", "eval/tr/cer", "eval/tr/loss"):
        assert tag in tags, f"{tag} missing from TensorBoard (have {sorted(tags)})"
    assert [s for s, _ in tags["eval/tr/wer"]] == [0, 10, 20, 30, 40]  # step 0: the untrained baseline
    assert tags["eval/tr/wer"][-1][1] == pytest.approx(read_json(out / "eval" / "step-000040.json")["wer"])
    assert all(v > 0 for _, v in tags["train/samples_per_s"])
    for key in ("insertion_rate", "empty_rate", "loop_rate", "compression_ratio", "length_ratio"):
        assert [s for s, _ in tags[f"eval/tr/{key}"]] == [0, 10, 20, 30, 40]
    change = tags["eval/tr/wer_change_since_step0"]
    step0 = read_json(out / "eval" / "step-000000.json")["wer"]
    assert change[-1][1] == pytest.approx(tags["eval/tr/wer"][-1][1] - step0)
    # Every numeric key of the eval JSON, the step's time, its wait for the loader and the peak memory.
    for key in ("ref_words", "failed", "n", "max_utterances"):
        assert f"eval/tr/{key}" in tags, key
    for tag in ("train/s_per_step", "train/loader_wait_s_per_step", "train/peak_memory_gb"):
        assert [s for s, _ in tags[tag]] == [10, 20, 30, 40] and all(v >= 0 for _, v in tags[tag]), tag
    assert 0.1 < tags["train/peak_memory_gb"][-1][1] < 24


def test_tensorboard_config_and_worst_utterances_with_audio(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, out, _ = finished_run
    acc = EventAccumulator(str(out / "tb"), size_guidance={"audio": 0, "tensors": 0})
    acc.Reload()
    assert {"eval/tr/worst_0", "eval/tr/worst_1", "eval/tr/worst_2"} <= set(acc.Tags()["audio"])
    assert [e.step for e in acc.Audio("eval/tr/worst_0")] == [0, 10, 20, 30, 40]
    texts = {t.split("/text_summary")[0] for t in acc.Tags()["tensors"]}
    assert {"config", "eval/tr/worst_0", "eval/tr/examples"} <= texts
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert to_toml(cfg) in config


def test_step0_is_evaluated_but_not_checkpointed(finished_run):
    _, out, results = finished_run
    m = read_json(out / "eval" / "step-000000.json")
    assert m["step"] == 0 and m["n"] == read_json(out / "eval" / "step-000040.json")["n"] > 0
    assert results["baseline_wer"] == {"tr": m["wer"]}
    assert not (out / "checkpoints" / "step-000000").exists()
    worst = read_tsv(out / "eval" / "step-000040.worst.tsv")
    assert list(worst[0]) == ["id", "reference", "hypothesis", "wer"]
    assert len(worst) == min(20, m["n"])
    wers = [float(r["wer"]) for r in worst]
    assert wers == sorted(wers, reverse=True)


def test_partial_checkpoint_is_removed_and_never_loaded(finished_run, tmp_path):
    cfg, out, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    # A save interrupted mid-write: a complete-looking but temporary folder with a later step.
    tmp = run / "checkpoints" / ".tmp-step-000090-12345"
    shutil.copytree(run / "checkpoints" / "step-000040", tmp)
    (tmp / "model.pt").write_bytes(b"truncated")
    cfg2 = tiny_ctc_config(run, max_steps=42, eval_every=0, save_every=0, keep_last=2, log_every=1)
    results = train(cfg2)
    assert not tmp.exists()
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "removed partial checkpoint" in log
    assert re.search(r"resumed from .*step-000040 \(step 40\)", log)
    assert results["steps"] == 42 and (run / "checkpoints" / "step-000042").is_dir()


# ---------------------------------------------------------------------------------------
# Exact resume.


def resume_config(out, max_steps, schedule):
    """Dropout, SpecAugment time and feature masks, grad accumulation over 2 batches, a loader worker."""
    cfg = tiny_ctc_config(out, max_steps=max_steps, grad_accum=2, schedule=schedule, warmup_steps=2,
                          eval_every=3, save_every=0, log_every=2, keep_last=5)
    m = cfg.model
    m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.feat_proj_dropout = m.final_dropout = 0.1
    m.mask_time_prob, m.mask_time_length = 0.3, 2
    m.mask_feature_prob, m.mask_feature_length = 0.2, 4
    cfg.data.batch_size = 4  # 8 batches an epoch, 4 optimizer steps: the runs below cross epochs
    cfg.data.num_workers = 1
    return cfg


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def test_stop_at_max_steps_and_resume_equals_uninterrupted(tmp_path):
    """Stopped by max_steps = 5, resumed to 8 with max_steps = 8 (a constant schedule after warmup: with a
    decaying schedule the learning rate of steps 1-5 depends on max_steps itself)."""
    train(resume_config(tmp_path / "a", 8, "constant"), fresh=True)
    train(resume_config(tmp_path / "b", 5, "constant"), fresh=True)
    results = train(resume_config(tmp_path / "b", 8, "constant"))
    assert results["steps"] == 8
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text(encoding="utf-8")
    a = final_params(tmp_path / "a" / "checkpoints" / "step-000008")
    b = final_params(tmp_path / "b" / "checkpoints" / "step-000008")
    assert_same_weights(a, b)
    # The test can fail: dropout and masks really draw random numbers (a different seed changes the result).
    cfg = resume_config(tmp_path / "c", 8, "constant")
    cfg.run.seed = 1
    train(cfg, fresh=True)
    c = final_params(tmp_path / "c" / "checkpoints" / "step-000008")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_audio_cache_trains_the_same_weights(tmp_path):
    """data.cache_audio changes where the second epoch's audio comes from, not the run: 8 steps (two epochs)
    end with the same weights as without it."""
    train(resume_config(tmp_path / "a", 8, "constant"), fresh=True)
    cfg = resume_config(tmp_path / "b", 8, "constant")
    cfg.data.cache_audio = True
    train(cfg, fresh=True)
    assert_same_weights(final_params(tmp_path / "a" / "checkpoints" / "step-000008"),
                        final_params(tmp_path / "b" / "checkpoints" / "step-000008"))


def test_resume_from_mid_run_checkpoint_equals_uninterrupted(tmp_path):
    """A run killed after its step-5 checkpoint (linear decay schedule): the same command resumes it exactly."""
    cfg = resume_config(tmp_path / "a", 8, "linear")
    cfg.train.save_every = 5
    train(cfg, fresh=True)
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000005", b / "checkpoints" / "step-000005")
    shutil.copytree(tmp_path / "a" / "vocab", b / "vocab")
    cfg_b = resume_config(b, 8, "linear")
    cfg_b.train.save_every = 5
    train(cfg_b)
    assert "resumed from" in (b / "train.log").read_text(encoding="utf-8")
    assert_same_weights(final_params(tmp_path / "a" / "checkpoints" / "step-000008"),
                        final_params(b / "checkpoints" / "step-000008"))


def test_extending_a_finished_run_uses_the_new_schedule(tmp_path):
    """Resuming a finished run with a larger max_steps: the first resumed step already uses the new
    schedule's learning rate (the saved optimizer's is the old schedule's last, zero)."""
    out = tmp_path / "run"
    train(tiny_ctc_config(out, max_steps=4, warmup_steps=0, schedule="linear", keep_last=10), fresh=True)
    results = train(tiny_ctc_config(out, max_steps=8, warmup_steps=0, schedule="linear", save_every=1,
                                    keep_last=10))
    assert results["steps"] == 8
    lr = dict(scalars(out)["train/lr"])
    # The logged lr is the one the step used: step 4 the old schedule's last (1/4 of the peak), step 5 the
    # new schedule's (4/8 of it), where the old one would have had none left.
    assert lr[4] == pytest.approx(2e-3 * 1 / 4) and lr[5] == pytest.approx(2e-3 * 4 / 8)
    step4 = final_params(out / "checkpoints" / "step-000004")
    step5 = final_params(out / "checkpoints" / "step-000005")
    assert any(not torch.equal(step4[k], step5[k]) for k in step4), "step 5 ran with the old zero learning rate"


# ---------------------------------------------------------------------------------------
# Exported folders in transformers' pipeline.


@pytest.mark.parametrize("vocab", ["char", "sentencepiece"])
def test_exported_ctc_folders_run_in_pipeline(tmp_path, vocab):
    """best/ and final/ load in pipeline("automatic-speech-recognition") and transcribe each dev clip as our
    own greedy decode did (the eval TSV). Two steps at a tiny learning rate: the random-looking output
    exercises every token, where a trained tiny model would output blanks only."""
    import transformers

    from asr.audio import load_audio

    out = tmp_path / "run"
    cfg = tiny_ctc_config(out, max_steps=2, lr=1e-5, warmup_steps=0, eval_every=1, log_every=1)
    cfg.data.vocab = vocab
    cfg.data.sp_vocab_size = 60
    cfg.eval.batch_size = 1  # no padding: the pipeline sees one clip at a time too
    train(cfg, fresh=True)
    best_step = read_json(out / "best" / EXPORT_INFO)["step"]
    for folder, step in (("final", 2), ("best", best_step)):
        asr = transformers.pipeline("automatic-speech-recognition", model=str(out / folder), device="cpu")
        rows = read_tsv(out / "eval" / f"step-{step:06d}.tsv")
        assert any(len(r["hypothesis"]) > 5 for r in rows)
        for r in rows:
            clip = FIXTURE / "clips" / (r["id"].split("/", 1)[1] + ".mp3")
            text = asr({"raw": load_audio(clip).numpy(), "sampling_rate": 16000})["text"]
            # Whitespace aside (the tokenizer writes a run of word delimiters as several spaces).
            assert " ".join(text.split()) == r["hypothesis"], (folder, r["id"])


# ---------------------------------------------------------------------------------------
# --eval-only.


@pytest.mark.parametrize("which", ["latest", "best", "step"])
def test_eval_only_reproduces_training_eval(finished_run, tmp_path, which):
    import run

    cfg, out, results = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    cfg = tiny_ctc_config(run_dir, max_steps=40, eval_every=10, save_every=10, keep_last=2, log_every=10)
    exp = write_exp(cfg, tmp_path / "exp.toml")
    step = {"latest": 40, "best": results["best"]["step"], "step": 30}[which]
    args = ["--exp", str(exp), "--eval-only"]
    if which == "best":
        args += ["--checkpoint", str(run_dir / "best")]
    elif which == "step":
        args += ["--checkpoint", str(run_dir / "checkpoints" / f"step-{step:06d}")]
    assert run.main(args) == 0
    written = run_dir / "eval" / f"step-{step:06d}.dev.greedy.json"
    assert written.is_file()
    got, want = read_json(written), read_json(run_dir / "eval" / f"step-{step:06d}.json")
    for key in ("wer", "cer", "wer_ortho", "cer_ortho", "n"):
        assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)  # the weights of that step, not others
    hyps = [r["hypothesis"] for r in read_tsv(written.with_suffix(".tsv"))]
    assert hyps == [r["hypothesis"] for r in read_tsv(run_dir / "eval" / f"step-{step:06d}.tsv")]


def test_eval_losses_differ_between_steps(finished_run):
    """What makes the eval-only comparison above meaningful: each step's weights give another eval loss."""
    _, out, _ = finished_run
    losses = [read_json(out / "eval" / f"step-{s:06d}.json")["loss"] for s in (10, 20, 30, 40)]
    assert len(set(losses)) == 4


# ---------------------------------------------------------------------------------------
# Progress line.


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_only_on_a_terminal():
    tty = FakeTTY()
    p = Progress(100, stream=tty)
    p.update(10, 0, 1.5)
    p.update(20, 0, 1.25)
    p.clear()
    text = tty.getvalue()
    assert text.startswith("\r[") and "step 20/100 loss 1.2500" in text and "\n" not in text
    pipe = io.StringIO()
    q = Progress(100, stream=pipe)
    q.update(10, 0, 1.5)
    q.clear()
    assert pipe.getvalue() == ""


# ---------------------------------------------------------------------------------------
# The logged train loss is per target of the loss function, like the eval loss.


def test_train_loss_is_normalised_like_eval_loss(tmp_path):
    results = train(same_clips_config(tiny_ctc_config(tmp_path / "run")), fresh=True)
    (step, train_loss), = results["train_loss"]
    assert step == 1
    assert train_loss == pytest.approx(results["eval"]["tr"]["loss"], rel=1e-4)


def test_eval_only_with_a_checkpoint_of_another_model_fails_cleanly(finished_run, tmp_path, capsys):
    import run

    _, out, _ = finished_run
    cfg = tiny_ctc_config(tmp_path / "other", max_steps=40)
    cfg.model.hidden_size = 48  # another model than the checkpoint's
    exp = write_exp(cfg, tmp_path / "exp.toml")
    shutil.copytree(out / "vocab", tmp_path / "other" / "vocab")
    assert run.main(["--exp", str(exp), "--eval-only", "--checkpoint", str(out / "checkpoints" / "step-000040")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --checkpoint:") and "\n" not in err

