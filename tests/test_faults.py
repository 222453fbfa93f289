"""Faults (issue 5) on real runs of tiny scratch CTC models: SIGKILL mid-training and mid-save, then the
same command resumes from the newest complete checkpoint and ends with the weights of an uninterrupted
run; non-finite losses and gradients are skipped, counted, and stop the run after train.max_bad_steps in
a row; a full disk while saving is a one-line error that leaves the previous checkpoint loadable;
SIGINT/SIGTERM save a checkpoint at the current step and exit 130/143."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr import checkpoint as ckpt

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import (FullDisk, final_params, read_json, scalars, start, tiny_ctc_config, wait_for,
                     write_exp)


RUN_TIMEOUT = 180  # seconds for any one run.py subprocess
MAX_STEPS = 12


def fault_config(out: Path, **train):
    """Dropout, SpecAugment and a data-loader worker, as real runs have: an exact resume must restore the
    random streams and the sampler position. Batches of 4 (8 an epoch): the runs cross an epoch."""
    kw = dict(max_steps=MAX_STEPS, save_every=2, keep_last=20, log_every=1, warmup_steps=2, schedule="linear",
              eval_every=0)
    kw.update(train)
    cfg = tiny_ctc_config(out, **kw)
    m = cfg.model
    m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.feat_proj_dropout = m.final_dropout = 0.1
    m.mask_time_prob, m.mask_time_length = 0.3, 2
    cfg.data.batch_size = 4
    cfg.data.num_workers = 1
    cfg.eval.at_start = False
    return cfg


def run_cli(exp: Path, logs: Path) -> subprocess.CompletedProcess:
    p = start([sys.executable, "run.py", "--exp", str(exp)], logs)
    rc = p.wait(timeout=RUN_TIMEOUT)
    return subprocess.CompletedProcess(p.args, rc, (logs / "stdout").read_text(), (logs / "stderr").read_text())


def logged_step(out: Path, step: int):
    log = out / "train.log"
    pattern = re.compile(rf"^\S+ \S+ step {step}/", re.M)
    return lambda: log.is_file() and bool(pattern.search(log.read_text(encoding="utf-8", errors="replace")))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def complete_steps(out: Path) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(ckpt.TMP_PREFIX))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run, through the same command line as the faulty ones: its final weights."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    proc = run_cli(write_exp(fault_config(out), root / "exp.toml"), root / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    REFERENCE_RUN["out"] = out
    return final_params(out / "checkpoints" / f"step-{MAX_STEPS:06d}")


REFERENCE_RUN: dict = {}


def resume_and_compare(exp: Path, out: Path, logs: Path, reference: dict, from_step: int) -> str:
    """Re-run the same command: it resumes from `from_step` and ends with the reference weights."""
    proc = run_cli(exp, logs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "train.log").read_text(encoding="utf-8")
    resumed = re.findall(r"resumed from (\S+) \(step (\d+)\)", log)
    assert resumed and resumed[-1] == (str(out / "checkpoints" / f"step-{from_step:06d}"), str(from_step)), resumed
    assert read_json(out / "results.json")["steps"] == MAX_STEPS
    assert_same_weights(reference, final_params(out / "checkpoints" / f"step-{MAX_STEPS:06d}"))
    assert leftovers(out) == []
    return log


def test_a_resume_with_other_random_state_ends_elsewhere(reference, tmp_path):
    """What makes the weight comparisons below meaningful: the reference's own step-6 checkpoint, resumed
    with another torch random state (dropout and masks draw on it), does not end with the reference's
    weights; resumed as saved, it does."""
    src = REFERENCE_RUN["out"]
    results = {}
    for case in ("as saved", "other rng"):
        out = tmp_path / case.replace(" ", "_")
        shutil.copytree(src / "vocab", out / "vocab")
        shutil.copytree(src / "checkpoints" / "step-000006", out / "checkpoints" / "step-000006")
        if case == "other rng":
            path = out / "checkpoints" / "step-000006" / "trainer.pt"
            trainer = torch.load(path, weights_only=False)
            trainer["rng"][0]["torch"] = torch.Generator().manual_seed(123).get_state()
            torch.save(trainer, path)
        proc = run_cli(write_exp(fault_config(out), tmp_path / f"{out.name}.toml"), tmp_path / f"{out.name}.logs")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[case] = final_params(out / "checkpoints" / f"step-{MAX_STEPS:06d}")
    assert_same_weights(reference, results["as saved"])
    assert any(not torch.equal(reference[k], results["other rng"][k]) for k in reference)


# ---------------------------------------------------------------------------------------
# SIGKILL.


def test_sigkill_mid_training_then_resume_equals_uninterrupted(reference, tmp_path):
    out = tmp_path / "run"
    exp = write_exp(fault_config(out), tmp_path / "exp.toml")
    proc = start([sys.executable, "run.py", "--exp", str(exp)], tmp_path / "logs1")
    wait_for(logged_step(out, 5), proc, what="step 5")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    steps = complete_steps(out)
    assert steps and steps[-1] < MAX_STEPS, steps  # killed between checkpoints, before the end
    resume_and_compare(exp, out, tmp_path / "logs2", reference, steps[-1])


# Runs run.py with asr.checkpoint slowed down: the save of step 4 writes model.pt, then blocks (the test
# kills it there), so the kill lands inside the save with a partial .tmp-step-000004-<pid> folder.
SLOW_SAVE = r"""
import sys, time
import asr.checkpoint as ck
real = ck._save_file
def save_file(obj, path):
    entry = real(obj, path)
    if path.parent.name.startswith(ck.TMP_PREFIX + "step-000004") and path.name == "model.pt":
        time.sleep(600)
    return entry
ck._save_file = save_file
import run
sys.exit(run.main(sys.argv[1:]))
"""


def test_sigkill_mid_save_then_resume_from_previous_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    exp = write_exp(fault_config(out), tmp_path / "exp.toml")
    proc = start([sys.executable, "-c", SLOW_SAVE, "--exp", str(exp)], tmp_path / "logs1")
    ck_dir = out / "checkpoints"
    partial = lambda: any((p / "model.pt").is_file() for p in ck_dir.glob(".tmp-step-000004-*"))  # noqa: E731
    wait_for(partial, proc, what="the step-4 save to start")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (tmp_dir,) = ck_dir.glob(".tmp-step-000004-*")
    assert complete_steps(out) == [2]  # the partial one is not a checkpoint
    log = resume_and_compare(exp, out, tmp_path / "logs2", reference, 2)
    assert f"removed partial checkpoint {tmp_dir}" in log
    assert not tmp_dir.exists()


def test_kill_while_replacing_a_checkpoint_keeps_it(tmp_path):
    """A save that replaces an existing step-N moves it aside first; a kill before the new one is renamed
    in leaves no step-N, only the moved-aside folder: clean_partial moves it back instead of deleting it."""
    folder = tmp_path / "checkpoints"
    state = {"w": torch.arange(3.0)}
    ckpt.save_checkpoint(folder, 4, state, {}, {"step": 4}, "")
    (folder / "step-000004").rename(folder / ".tmp-old-step-000004-999")  # the kill came here
    ckpt.save_checkpoint(folder, 6, state, {}, {"step": 6}, "")
    (folder / "step-000006").rename(folder / ".tmp-step-000008-999")  # and an unfinished later save
    assert complete_steps(tmp_path) == []
    removed = ckpt.clean_partial(folder)
    assert [p.name for p in removed] == [".tmp-step-000008-999"]
    assert complete_steps(tmp_path) == [4]
    model, _, trainer = ckpt.load_checkpoint(folder / "step-000004")
    assert torch.equal(model["w"], state["w"]) and trainer["step"] == 4


def test_prune_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """prune renames a checkpoint out of the step-N namespace before deleting it: killed mid-deletion, it
    leaves a .tmp-* folder that the next start removes, never a step-N folder with some files missing."""
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        ckpt.save_checkpoint(folder, step, {"w": torch.zeros(2)}, {}, {"step": step}, "")

    def killed_rmtree(path, ignore_errors=False):
        (Path(path) / "model.pt").unlink()  # deleted one file, then the process died
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ckpt.shutil, "rmtree", killed_rmtree)
        ckpt.prune(folder, keep_last=2)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) == ["step-000004", "step-000006"]
    assert [p.name for p in ckpt.clean_partial(folder)] == [f".tmp-prune-step-000002-{os.getpid()}"]


# ---------------------------------------------------------------------------------------
# SIGINT / SIGTERM.


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_current_step_and_resume_equals_uninterrupted(reference, tmp_path, sig, code):
    out = tmp_path / "run"
    exp = write_exp(fault_config(out), tmp_path / "exp.toml")
    proc = start([sys.executable, "run.py", "--exp", str(exp)], tmp_path / "logs1")
    wait_for(logged_step(out, 3), proc, what="step 3")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == code, (tmp_path / "logs1" / "stderr").read_text()[-3000:]
    log = (out / "train.log").read_text(encoding="utf-8")
    m = re.search(rf"stopped by signal {int(sig)} at step (\d+); checkpoint saved", log)
    assert m, log[-2000:]
    stopped = int(m.group(1))
    last_logged = max(int(s) for s in re.findall(r" step (\d+)/", log))
    assert 3 <= stopped < MAX_STEPS and stopped == last_logged  # the step it was in, not a later one
    assert complete_steps(out)[-1] == stopped
    assert "Traceback" not in (tmp_path / "logs1" / "stderr").read_text()
    resume_and_compare(exp, out, tmp_path / "logs2", reference, stopped)


@pytest.mark.parametrize("sig, code", [
    (signal.SIGINT, 130),
    (signal.SIGTERM, 143),
], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_process_group_with_loader_workers(tmp_path, sig, code):
    """Ctrl-C in a terminal (and many schedulers' SIGTERM) reaches the whole process group, data-loader
    workers included: still a checkpoint at the current step and exit status 130/143."""
    out = tmp_path / "run"
    exp = write_exp(fault_config(out), tmp_path / "exp.toml")
    proc = start([sys.executable, "run.py", "--exp", str(exp)], tmp_path / "logs1", group=True)
    try:
        wait_for(logged_step(out, 3), proc, what="step 3")
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = (tmp_path / "logs1" / "stderr").read_text()
    assert rc == code, stderr[-3000:]
    log = (out / "train.log").read_text(encoding="utf-8")
    m = re.search(rf"stopped by signal {int(sig)} at step (\d+); checkpoint saved", log)
    assert m and complete_steps(out)[-1] == int(m.group(1))
    assert "Traceback" not in stderr


class WorkerSignals(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.tensor([os.getpgrp(), int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)])


def test_loader_worker_init_keeps_group_signals_from_workers():
    """asr.distributed.loader_worker_init (the loaders' worker_init_fn): the worker leaves the process group
    that terminals and torchrun signal, and ignores SIGINT."""
    from asr import distributed as dist

    loader = torch.utils.data.DataLoader(WorkerSignals(), num_workers=1, worker_init_fn=dist.loader_worker_init)
    ((pgid, ignores_sigint),) = next(iter(loader)).tolist()
    assert pgid != os.getpgrp() and ignores_sigint == 1


# ---------------------------------------------------------------------------------------
# Non-finite losses and gradients.


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def register_bad_loss(monkeypatch, bad_steps: set[int], kind: str) -> str:
    """A CTC loss that is non-finite (kind "loss") or has non-finite gradients (kind "grad") on the
    training steps in `bad_steps` (1-based; one micro-batch a step), registered in asr.losses.LOSSES."""
    from asr import losses

    calls = {"n": 0}

    def loss(outputs, batch):
        if not torch.is_grad_enabled():  # evaluation
            return losses.ctc(outputs, batch)
        calls["n"] += 1
        if calls["n"] in bad_steps:
            if kind == "loss":
                loss_sum, n = losses.ctc(outputs, batch)
                return loss_sum * float("nan"), n
            outputs.logits = NanGrad.apply(outputs.logits)
        return losses.ctc(outputs, batch)

    name = f"ctc_bad_{kind}"
    monkeypatch.setitem(losses.LOSSES["ctc"], name, loss)
    return name


def nan_config(out: Path, loss: str, **train):
    kw = dict(max_steps=6, save_every=1, keep_last=20, log_every=1, max_bad_steps=2)
    cfg = tiny_ctc_config(out, **{**kw, **train})
    cfg.train.loss = loss
    cfg.eval.at_start = False
    return cfg


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_an_isolated_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, kind):
    from asr.train import train

    out = tmp_path / "run"
    results = train(nan_config(out, register_bad_loss(monkeypatch, {3}, kind)), fresh=True)
    assert results["steps"] == 6  # one bad step (max_bad_steps = 2) does not stop the run
    ck = out / "checkpoints"
    w = {s: final_params(ck / f"step-{s:06d}") for s in (2, 3, 4)}
    assert_same_weights(w[2], w[3])  # step 3 changed nothing
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])  # step 4 trained again
    assert all(torch.isfinite(t).all() for t in w[4].values() if t.is_floating_point())
    opt = {s: ckpt.load_checkpoint(ck / f"step-{s:06d}")[1] for s in (2, 3)}
    assert [st["step"] for st in opt[3]["state"].values()] == [st["step"] for st in opt[2]["state"].values()]
    log = (out / "train.log").read_text(encoding="utf-8")
    what = "loss" if kind == "loss" else "gradient"
    assert f"step 3: non-finite {what}, update skipped (1 bad in a row, 1 skipped in this run)" in log
    assert log.count("update skipped") == 1
    assert scalars(out)["train/skipped_steps"] == [(3, 1.0)]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in results["train_loss"])


def test_a_window_of_skipped_steps_logs_no_zero_loss(tmp_path, monkeypatch):
    """The loss of a window with no finite step is unknown, not 0 (a 0 would read as a perfect fit)."""
    from asr.train import train

    out = tmp_path / "run"
    cfg = nan_config(out, register_bad_loss(monkeypatch, {3}, "loss"), save_every=0)
    results = train(cfg, fresh=True)
    logged = dict(results["train_loss"])
    assert 3 not in logged or logged[3] != logged[3]  # absent or NaN
    tb = dict(scalars(out)["train/loss"])
    assert 3 not in tb or tb[3] != tb[3]
    assert not re.search(r"step 3/6 loss 0\.0000", (out / "train.log").read_text(encoding="utf-8"))
    assert all(loss > 0 for s, loss in results["train_loss"] if s != 3)


def test_too_many_non_finite_steps_in_a_row_stop_with_one_line(tmp_path, monkeypatch, capsys):
    """Steps 3, 4 and 5 non-finite with max_bad_steps = 3: the run stops at step 5 with one line (exit status
    1 through run.py), and the last checkpoint is intact, loadable and holds the weights of step 2."""
    import run
    from asr.models import build
    from asr.text import load_vocab

    out = tmp_path / "run"
    cfg = nan_config(out, register_bad_loss(monkeypatch, {3, 4, 5}, "loss"), max_bad_steps=3)
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("error: 3 non-finite steps in a row at step 5")
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert str(latest) in err
    assert latest.name == "step-000004" and complete_steps(out) == [1, 2, 3, 4]
    model_state, optim_state, trainer = ckpt.load_checkpoint(latest)
    bundle = build(cfg.model, load_vocab(out / "vocab"), ["tr"])
    bundle.model.load_state_dict(model_state)  # loadable into the configured model
    assert all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point())
    assert_same_weights(final_params(out / "checkpoints" / "step-000002"), model_state)
    assert trainer["step"] == 4
    assert scalars(out)["train/skipped_steps"] == [(3, 1.0), (4, 2.0), (5, 3.0)]


# ---------------------------------------------------------------------------------------
# Out of disk.


def test_out_of_disk_while_saving_is_one_clear_error(tmp_path, monkeypatch):
    """The disk fills up while step 4's optimizer.pt is written (torch.save's own writer in between):
    CheckpointError names the checkpoint and the cause; step 2 stays loadable; nothing temporary is left;
    once there is room again, the same run resumes from step 2."""
    from asr.train import train

    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        p = Path(path)
        if "w" in mode and p.parent.name.startswith(".tmp-step-000004") and p.name == "optimizer.pt":
            return FullDisk(f, room=1000)
        return f

    out = tmp_path / "run"
    cfg = fault_config(out, max_steps=6, save_every=2)
    cfg.data.num_workers = 0
    with monkeypatch.context() as m, pytest.raises(ckpt.CheckpointError) as info:
        m.setattr(ckpt, "open", open_on_a_full_disk, raising=False)
        train(cfg, fresh=True)
    message = str(info.value)
    assert "\n" not in message
    assert message == f"cannot write checkpoint {out / 'checkpoints' / 'step-000004'}: No space left on device"
    assert complete_steps(out) == [2] and leftovers(out) == []
    ckpt.load_checkpoint(out / "checkpoints" / "step-000002")
    results = train(cfg)
    assert results["steps"] == 6
    assert "resumed from" in (out / "train.log").read_text(encoding="utf-8")


# Runs run.py with a file size limit (RLIMIT_FSIZE) set right after the first checkpoint is written: the
# next checkpoint's model.pt no longer fits, and the kernel fails the write (EFBIG), as a full disk would.
LIMIT_AFTER_FIRST_SAVE = r"""
import resource, sys
import asr.checkpoint as ck
real = ck.save_checkpoint
def save_checkpoint(*args, **kwargs):
    path = real(*args, **kwargs)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return path
ck.save_checkpoint = save_checkpoint
import run
sys.exit(run.main(sys.argv[1:]))
"""

# The same limit from the start: the first big file written is best/'s model.safetensors (no checkpoint
# before the end), whose writer raises its own SafetensorError, not OSError.
LIMIT_FROM_START = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
import run
sys.exit(run.main(sys.argv[1:]))
"""


def test_write_failure_while_saving_through_run_py(tmp_path):
    out = tmp_path / "run"
    exp = write_exp(fault_config(out, max_steps=6, save_every=2), tmp_path / "exp.toml")
    p = start([sys.executable, "-c", LIMIT_AFTER_FIRST_SAVE, "--exp", str(exp)], tmp_path / "logs")
    rc = p.wait(timeout=RUN_TIMEOUT)
    err = (tmp_path / "logs" / "stderr").read_text().strip()
    assert rc == 1, err[-3000:]
    assert err == f"error: cannot write checkpoint {out / 'checkpoints' / 'step-000004'}: File too large"
    assert complete_steps(out) == [2] and leftovers(out) == []
    ckpt.load_checkpoint(out / "checkpoints" / "step-000002")


def test_write_failure_while_exporting_through_run_py(tmp_path):
    out = tmp_path / "run"
    cfg = fault_config(out, max_steps=2, save_every=0)
    cfg.data.num_workers = 0
    p = start([sys.executable, "-c", LIMIT_FROM_START, "--exp", str(write_exp(cfg, tmp_path / "exp.toml"))],
              tmp_path / "logs")
    rc = p.wait(timeout=RUN_TIMEOUT)
    err = (tmp_path / "logs" / "stderr").read_text().strip()
    assert rc == 1, err[-3000:]
    # best/ fails, then the checkpoint that would keep the step fails too: one line says both.
    assert err == (f"error: cannot write {out / 'best'}: File too large; the checkpoint of step 2 could not be "
                   f"saved either (cannot write checkpoint {out / 'checkpoints' / 'step-000002'}: File too large); "
                   f"last checkpoint: none")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-")) == []


def test_write_folder_turns_library_write_errors_into_checkpoint_errors(tmp_path):
    """asr.checkpoint.write_folder: an OS-level write failure, however a library reports it, is one
    CheckpointError naming the folder; the old folder stays; other errors (bugs) propagate unchanged."""
    from safetensors import SafetensorError

    folder = tmp_path / "best"
    ckpt.write_folder(folder, lambda tmp: (tmp / "a.txt").write_text("old"))

    def disk_full(tmp):
        (tmp / "a.txt").write_text("new")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(ckpt.CheckpointError, match=rf"^cannot write {re.escape(str(folder))}: No space left on device$"):
        ckpt.write_folder(folder, disk_full)
    assert (folder / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best"]

    def bug(tmp):
        raise TypeError("not a write failure")

    with pytest.raises(TypeError):
        ckpt.write_folder(folder, bug)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_fp16_gradient_overflows_are_the_scalers_business(tmp_path, monkeypatch):
    """With fp16 and a GradScaler, non-finite gradients with a finite loss are overflows the scaler handles
    (it skips the step and lowers its scale): three in a row do not stop a run with max_bad_steps = 2,
    while three non-finite losses in a row do."""
    from asr.experiment import TrainingError
    from asr.train import train

    cfg = nan_config(tmp_path / "grad", register_bad_loss(monkeypatch, {3, 4, 5}, "grad"), precision="fp16")
    results = train(cfg, fresh=True)
    # Steps 3-5 skipped, and any early steps where the scaler's initial scale (65536) overflowed fp16.
    assert results["steps"] == 6 and results["skipped_steps"] >= 3
    log = (tmp_path / "grad" / "train.log").read_text(encoding="utf-8")
    assert all(f"step {s}: non-finite gradient, update skipped (0 bad in a row" in log for s in (3, 4, 5))
    cfg = nan_config(tmp_path / "loss", register_bad_loss(monkeypatch, {3, 4, 5}, "loss"), precision="fp16")
    with pytest.raises(TrainingError, match="2 non-finite steps in a row at step 4"):
        train(cfg, fresh=True)
