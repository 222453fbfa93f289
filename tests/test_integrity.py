"""Checkpoints that cannot be trusted and resumes with changed settings (issue 13, cases 1 and 3).

A checkpoint carries a manifest (each file's size and check); one that fails it, or fails to load, is renamed
aside to `step-N.corrupt` with one log line and the run resumes from the newest one that verifies, ending with
the weights of a run that was never damaged. A resume takes the settings it may change (learning rate and its
schedule, steps, evaluation, ...) and refuses, in one line and before writing anything, those it cannot."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from asr import checkpoint as ckpt
from asr.config import ConfigError, to_toml, validate
from asr.evaluation import evaluate_only
from asr.train import train

from helpers import final_params, scalars, tiny_ctc_config, write_exp

MAX_STEPS = 6


def run_config(out: Path, **train_kw):
    """Checkpoints at steps 2, 4 and 6, all kept; no evaluation but the one at the end."""
    kw = dict(max_steps=MAX_STEPS, save_every=2, keep_last=20, log_every=1, eval_every=0)
    kw.update(train_kw)
    cfg = tiny_ctc_config(out, **kw)
    cfg.eval.at_start = False
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An undamaged run: its checkpoints are copied and damaged below."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    train(run_config(out), fresh=True)
    return out


def copy_run(reference: Path, dest: Path, steps=(2, 4)) -> Path:
    """The reference run as it was after its step-4 checkpoint (the vocabulary and those checkpoints)."""
    shutil.copytree(reference / "vocab", dest / "vocab")
    for s in steps:
        shutil.copytree(reference / "checkpoints" / f"step-{s:06d}", dest / "checkpoints" / f"step-{s:06d}")
    return dest


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def overwrite_tensor_data(path: Path, n: int = 4096) -> None:
    """Overwrite `n` bytes in the middle of the largest tensor of a torch.save file: torch.load reads such a file
    without complaint (it checks no CRC-32), and the run would train on from garbage."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the record's bytes follow its local header
    assert info.file_size >= n
    mid = start + (info.file_size - n) // 2
    data[mid:mid + n] = os.urandom(n)
    path.write_bytes(bytes(data))


def log_of(out: Path) -> str:
    return (out / "train.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------
# The manifest.


def test_manifest_records_every_file_and_verify_catches_damage(tmp_path):
    folder = tmp_path / "checkpoints"
    path = ckpt.save_checkpoint(folder, 3, {"w": torch.randn(50_000)}, {"s": torch.ones(4)}, {"step": 3}, "a = 1\n")
    files = json.loads((path / ckpt.MANIFEST).read_text(encoding="utf-8"))["files"]
    assert set(files) == {"model.pt", "optimizer.pt", "trainer.pt", "config.toml"}
    for name, entry in files.items():
        assert entry["size"] == (path / name).stat().st_size
    assert ckpt.verify(path) is None
    assert ckpt.saved_config(path) == "a = 1\n"
    (path / "config.toml").write_text("a = 2\n", encoding="utf-8")  # the same size, other bytes
    assert ckpt.verify(path) == "config.toml does not match its manifest's blake2b digest"
    assert ckpt.saved_config(path) is None
    overwrite_tensor_data(path / "model.pt")
    assert ckpt.verify(path) == "model.pt: record archive/data/0 fails its CRC-32 check"


# ---------------------------------------------------------------------------------------
# Damaged checkpoints.


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "overwritten": (lambda ck: overwrite_tensor_data(ck / "model.pt"), r"model\.pt: record \S+ fails its CRC-32 check"),
    "truncated": (lambda ck: truncate(ck / "model.pt"), r"model\.pt has \d+ bytes, its manifest says \d+"),
    "no_optimizer": (lambda ck: (ck / "optimizer.pt").unlink(), r"optimizer\.pt missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(reference, tmp_path,
                                                                                       damage):
    """The newest checkpoint (step 4) damaged: renamed to step-000004.corrupt (kept, not deleted) with one
    log line naming the cause; the run resumes from step 2 and ends with the undamaged run's weights."""
    out = copy_run(reference, tmp_path / "run")
    damage_fn, reason = DAMAGE[damage]
    damage_fn(out / "checkpoints" / "step-000004")
    kept = sorted(p.name for p in (out / "checkpoints" / "step-000004").iterdir())
    results = train(run_config(out, keep_last=2))
    assert results["steps"] == MAX_STEPS
    log = log_of(out)
    lines = [line for line in log.splitlines() if "corrupt" in line]
    assert len(lines) == 1, lines
    assert re.search(rf"checkpoint {re.escape(str(out / 'checkpoints' / 'step-000004'))} is corrupt \({reason}\): "
                     rf"renamed to step-000004\.corrupt$", lines[0]), lines[0]
    assert re.search(r"resumed from .*step-000002 \(step 2\)", log)
    aside = out / "checkpoints" / "step-000004.corrupt"
    assert sorted(p.name for p in aside.iterdir()) == kept  # set aside as it was
    assert_same_weights(final_params(reference / "checkpoints" / "step-000006"),
                        final_params(out / "checkpoints" / "step-000006"))
    # keep_last = 2 over the run's own checkpoints: the one set aside is not among them, nor removed.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000004.corrupt",
                                                                     "step-000006"]


def test_checkpoints_without_a_manifest_load_unverified_and_one_that_fails_to_load_is_set_aside(reference,
                                                                                                tmp_path):
    """Checkpoints saved before manifests: loaded (with one log line saying so); a truncated model.pt in one
    is still caught when torch.load fails, and it is set aside like any other."""
    out = copy_run(reference, tmp_path / "run")
    for s in (2, 4):
        (out / "checkpoints" / f"step-{s:06d}" / ckpt.MANIFEST).unlink()
    truncate(out / "checkpoints" / "step-000004" / "model.pt")
    results = train(run_config(out))
    assert results["steps"] == MAX_STEPS
    log = log_of(out)
    assert re.search(r"checkpoint \S+step-000004 is corrupt \(cannot be loaded: .+\): renamed to "
                     r"step-000004\.corrupt", log)
    assert re.search(r"checkpoint \S+step-000002 has no manifest\.json .*: loading it unverified", log)
    assert re.search(r"resumed from .*step-000002 \(step 2\)", log)
    assert_same_weights(final_params(reference / "checkpoints" / "step-000006"),
                        final_params(out / "checkpoints" / "step-000006"))


def test_no_checkpoint_verifies_starts_over_saying_so(reference, tmp_path):
    """Both checkpoints damaged: both set aside (a second .corrupt of the same step gets its own name), and the
    run starts from step 0 with a line saying why."""
    out = copy_run(reference, tmp_path / "run")
    (out / "checkpoints" / "step-000002.corrupt").mkdir()  # from an earlier incident
    for s in (2, 4):
        overwrite_tensor_data(out / "checkpoints" / f"step-{s:06d}" / "model.pt")
    results = train(run_config(out, max_steps=2))
    assert results["steps"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000002", "step-000002.corrupt", "step-000002.corrupt-2", "step-000004.corrupt"]
    log = log_of(out)
    assert f"no checkpoint in {out / 'checkpoints'} verifies: starting from step 0" in log
    assert "resumed from" not in log


def test_eval_only_uses_the_newest_checkpoint_that_verifies(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run", steps=(2, 4, 6))
    overwrite_tensor_data(out / "checkpoints" / "step-000006" / "model.pt")
    cfg = run_config(out)
    evaluate_only(cfg)
    log = log_of(out)
    assert re.search(r"checkpoint \S+step-000006 is corrupt \(model\.pt: record \S+ fails its CRC-32 check\)", log)
    assert re.search(r"evaluating \S+step-000004 \(step 4\)", log)
    assert (out / "eval" / "step-000004.dev.greedy.json").is_file()
    # Named with --checkpoint, a damaged checkpoint is an error, left where it is.
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"step-000006\.corrupt is corrupt: model\.pt: record"):
        evaluate_only(cfg, str(out / "checkpoints" / "step-000006.corrupt"))


# ---------------------------------------------------------------------------------------
# Pruning.


def test_keep_last_0_keeps_every_checkpoint(tmp_path):
    """train.keep_last = 0 keeps every checkpoint (it used to delete the one just saved); below 0 is an error."""
    out = tmp_path / "run"
    train(run_config(out, max_steps=4, keep_last=0), fresh=True)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]
    cfg = run_config(out)
    cfg.train.keep_last = -1
    with pytest.raises(ConfigError, match=r"^train\.keep_last: must be in \[0, inf\), got -1$"):
        validate(cfg)


def test_prune_keeps_the_steps_it_is_told_and_touches_no_broken_folder(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(folder, step, {"w": torch.zeros(2)}, {}, {"step": step}, "")
    (folder / "step-000008" / "optimizer.pt").unlink()  # broken: not a checkpoint to count or delete
    (folder / "step-000010.corrupt").mkdir()
    ckpt.prune(folder, keep_last=1, keep_steps={2, 6})
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000006", "step-000008",
                                                         "step-000010.corrupt"]
    ckpt.prune(folder, keep_last=0)
    assert len(list(folder.iterdir())) == 4


# ---------------------------------------------------------------------------------------
# Resuming with changed settings.


def test_resume_with_a_new_learning_rate_and_more_steps_takes_effect(tmp_path):
    """--set train.lr / weight_decay / max_steps on a finished run: logged as `resume: key old -> new`, and
    the optimizer really uses them, per group (lr_scale, no decay on 1-D parameters), from the next step."""
    import run

    out = tmp_path / "run"
    cfg = run_config(out, max_steps=4, lr=2e-3, warmup_steps=0, schedule="constant", lr_scale={"lm_head": 10.0})
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp)]) == 0
    assert run.main(["--exp", str(exp), "--set", "train.lr=2e-2", "--set", "train.weight_decay=0.1",
                     "--set", "train.max_steps=6"]) == 0
    log = log_of(out)
    assert re.search(r"resumed from \S+step-000004 \(step 4\)", log)
    assert "resume: train.lr 0.002 -> 0.02" in log
    assert "resume: train.max_steps 4 -> 6" in log
    assert "resume: train.weight_decay 0.0 -> 0.1" in log
    assert len(re.findall(r"resume: ", log)) == 3
    lr = dict(scalars(out)["train/lr"])
    assert lr[4] == pytest.approx(2e-3) and lr[5] == pytest.approx(2e-2) and lr[6] == pytest.approx(2e-2)
    assert re.search(r"step 5/6 loss \S+ lr 2\.00e-02", log)
    groups = torch.load(out / "checkpoints" / "step-000006" / "optimizer.pt", weights_only=True)["param_groups"]
    got = sorted(tuple(round(g[k], 9) for k in ("lr", "initial_lr", "weight_decay")) for g in groups)
    assert got == sorted((lr, lr, wd) for lr in (0.02, 0.2) for wd in (0.0, 0.1))
    assert (out / "config.toml").read_text(encoding="utf-8") == to_toml(run_config(
        out, max_steps=6, lr=2e-2, weight_decay=0.1, warmup_steps=0, schedule="constant", lr_scale={"lm_head": 10.0}))


def test_resume_with_settings_it_cannot_take_stops_in_one_line_before_writing(tmp_path, capsys):
    """Changed batch size and model size (and an allowed learning rate): exit status 2, one line naming the
    two fixed keys with their values and the ways out; config.toml and the checkpoints untouched."""
    import run

    out = tmp_path / "run"
    cfg = run_config(out, max_steps=2)
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
              and p.parts[len(out.parts)] in ("checkpoints", "config.toml", "train.log")}
    capsys.readouterr()
    rc = run.main(["--exp", str(exp), "--set", "data.batch_size=4", "--set", "model.hidden_size=64",
                   "--set", "train.lr=1e-2", "--set", "train.max_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "data.batch_size (8 -> 4), model.hidden_size (32 -> 64)" in err
    assert "--fresh" in err and "run.out_dir" in err and "train.lr" not in err
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
             and p.parts[len(out.parts)] in ("checkpoints", "config.toml", "train.log")}
    assert after == before


def test_max_steps_below_the_checkpoint_is_a_settings_error(tmp_path, capsys):
    import run

    out = tmp_path / "run"
    exp = write_exp(run_config(out, max_steps=4), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp)]) == 0
    capsys.readouterr()
    assert run.main(["--exp", str(exp), "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_steps: 2 is below the step of" in err and "(4)" in err


def test_resume_table_covers_the_keys_it_means(tmp_path):
    """Each fixed prefix names real settings; the keys a resume may change are not fixed."""
    from asr.config import RESUME_FIXED, flat_config, is_fixed

    keys = flat_config(run_config(tmp_path, lr_scale={"lm_head": 10.0}))  # an empty table has no keys
    for prefix in RESUME_FIXED:
        assert any(k == prefix or k.startswith(prefix + ".") for k in keys), prefix
    for key in ("train.lr", "train.max_steps", "train.weight_decay", "train.betas", "train.eps", "train.clip_grad",
                "train.schedule", "train.warmup_steps", "train.keep_last", "train.save_every", "train.eval_every",
                "train.log_every", "train.max_bad_steps", "eval.batch_size", "decode.method", "run.device",
                "data.num_workers", "data.cache_audio"):
        assert key in keys and not is_fixed(key), key
    for key in ("model.hidden_size", "data.batch_size", "data.sources.0.path", "data.text.lowercase", "lora.rank",
                "train.grad_accum", "train.trainable", "run.seed", "data.vocab"):
        assert key in keys and is_fixed(key), key


def test_resume_with_fp16_after_fp32_starts_a_fresh_grad_scaler(tmp_path):
    """train.precision may change: a checkpoint saved without fp16 holds no GradScaler state to load."""
    out = tmp_path / "run"
    train(run_config(out, max_steps=2, precision="fp32"), fresh=True)
    results = train(run_config(out, max_steps=3, precision="fp16"))
    assert results["steps"] == 3
    assert 'resume: train.precision "fp32" -> "fp16"' in log_of(out)
    trainer = torch.load(out / "checkpoints" / "step-000003" / "trainer.pt", weights_only=False)
    assert trainer["scaler"]["scale"] > 0
