"""The run folder (issue 13): one run at a time holds it (an exclusive lock that dies with its process), an
unwritable folder is a one-line settings error for every command, a second stop signal does not cut the
checkpoint the first asked for, and --eval-only checks its --checkpoint before reading any data."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import run
from asr import experiment

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import (WHISPER_BASE, needs_whisper_base, start, tiny_ctc_config, tiny_whisper_config, wait_for,
                     write_exp)

RUN_TIMEOUT = 180


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------
# The lock.


def test_a_second_run_on_a_locked_folder_stops_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out, max_steps=100000, log_every=1)
    cfg.eval.at_start = False
    exp = write_exp(cfg, tmp_path / "exp.toml")
    holder = start([sys.executable, "run.py", "--exp", str(exp)], tmp_path / "logs")
    try:
        log = out / "train.log"
        wait_for(lambda: log.is_file() and " step 1/" in log.read_text(), holder, what="the first run's step 1")
        config_before, log_before = (out / "config.toml").read_text(), log.read_text()
        preflight_before = (out / "preflight.json").read_text()
        for args in ([], ["--eval-only"], ["--check"], ["--fresh"]):
            assert run.main(["--exp", str(exp), "--set", "train.lr=0.5", *args]) == 2, args
            err = one_line_error(capsys)
            assert f"{out} is in use by another run (pid {holder.pid})" in err, err
        assert (out / "config.toml").read_text() == config_before  # nothing of the second run was written
        assert (out / "preflight.json").read_text() == preflight_before
        assert log.read_text().startswith(log_before)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # The OS released the killed holder's lock: the same folder can be used at once.
    assert run.main(["--exp", str(exp), "--fresh", "--set", "train.max_steps=2"]) == 0


def test_the_lock_is_released_when_a_run_ends_in_process(tmp_path):
    out = tmp_path / "run"
    experiment.lock_run_dir(out)
    experiment.lock_run_dir(out)  # again in the same process: a no-op
    assert (out / experiment.LOCK_FILE).read_text().strip() == str(os.getpid())
    # Another process (a plain flock, as lock_run_dir takes it) cannot take it until it is released.
    probe = [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(out / experiment.LOCK_FILE)]
    taken = subprocess.run(probe, capture_output=True, text=True)
    assert taken.returncode != 0 and "BlockingIOError" in taken.stderr
    experiment.unlock_run_dir(out)
    assert subprocess.run(probe, capture_output=True, text=True).returncode == 0


# ---------------------------------------------------------------------------------------
# An unwritable run folder.


@pytest.mark.parametrize("command", [[], ["--check"], ["--eval-only"]])
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = tiny_ctc_config(blocker / "run")
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), *command]) == 2
    err = one_line_error(capsys)
    assert f"run.out_dir: cannot write to {blocker / 'run'}" in err and "Not a directory" in err, err


@pytest.mark.parametrize("command", [[], ["--check"], ["--eval-only"]])
def test_a_read_only_run_folder_is_one_line(tmp_path, capsys, monkeypatch, command):
    """Tests run as root, for whom permission bits do not stop writes: the read-only file system is simulated
    where the run folder is first written."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(experiment.os, "open", read_only)
    exp = write_exp(tiny_ctc_config(out), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), *command]) == 2
    err = one_line_error(capsys)
    assert f"run.out_dir: cannot write to {out}: Read-only file system" in err, err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------
# A second stop signal.

# run.py with each checkpoint save slowed down after model.pt, so that a second signal lands inside the
# save the first one asked for.
SLOW_SAVE = r"""
import sys, time
import asr.checkpoint as ck
real = ck._save_file
def save_file(obj, path):
    real(obj, path)
    if path.name == "model.pt":
        time.sleep(3)
ck._save_file = save_file
import run
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_second_signal_does_not_cut_the_save_of_the_first(tmp_path):
    """Ctrl-C twice: the second one used to raise KeyboardInterrupt inside the save (SIGTERM shares the
    handler)."""
    sig = signal.SIGINT
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out, max_steps=100000, log_every=1)
    cfg.eval.at_start = False
    exp = write_exp(cfg, tmp_path / "exp.toml")
    proc = start([sys.executable, "-c", SLOW_SAVE, "--exp", str(exp)], tmp_path / "logs")
    log = out / "train.log"
    wait_for(lambda: log.is_file() and " step 2/" in log.read_text(), proc, what="step 2")
    proc.send_signal(sig)
    saving = lambda: any(out.glob("checkpoints/.tmp-step-*/model.pt"))  # noqa: E731
    wait_for(saving, proc, what="the save the signal asks for")
    proc.send_signal(sig)
    assert proc.wait(timeout=RUN_TIMEOUT) == 128 + sig
    stderr = (tmp_path / "logs" / "stderr").read_text()
    assert "already stopping" in stderr and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    stopped = [line for line in log.read_text().splitlines() if "stopped by signal" in line]
    assert len(stopped) == 1, log.read_text()[-2000:]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(steps) == 1 and steps[0].startswith("step-") and (out / "checkpoints" / steps[0] / "trainer.pt").is_file()


# ---------------------------------------------------------------------------------------
# --eval-only --checkpoint, checked before any data is read.


@pytest.fixture
def no_data_preparation(monkeypatch):
    import asr.evaluation
    import asr.train

    def prepare(*args, **kwargs):
        raise AssertionError("data were prepared before the checkpoint was checked")

    monkeypatch.setattr(asr.train, "prepare", prepare)
    monkeypatch.setattr(asr.evaluation, "prepare", prepare)


def test_eval_only_with_a_missing_checkpoint_fails_before_reading_data(tmp_path, capsys, no_data_preparation):
    exp = write_exp(tiny_ctc_config(tmp_path / "run"), tmp_path / "exp.toml")
    missing = tmp_path / "no-such-checkpoint"
    assert run.main(["--exp", str(exp), "--eval-only", "--checkpoint", str(missing)]) == 2
    assert one_line_error(capsys) == f"error: --checkpoint: not found: {missing}"


def test_eval_only_with_an_empty_folder_fails_before_reading_data(tmp_path, capsys, no_data_preparation):
    exp = write_exp(tiny_ctc_config(tmp_path / "run"), tmp_path / "exp.toml")
    (tmp_path / "empty").mkdir()
    assert run.main(["--exp", str(exp), "--eval-only", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "holds neither model.pt" in one_line_error(capsys)


@needs_whisper_base
def test_eval_only_with_a_whisper_model_on_a_ctc_experiment_names_both_families(tmp_path, capsys,
                                                                             no_data_preparation):
    exp = write_exp(tiny_ctc_config(tmp_path / "run"), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--eval-only", "--checkpoint", str(WHISPER_BASE)]) == 2
    err = one_line_error(capsys)
    assert f"{WHISPER_BASE} is a Whisper model, the experiment configures a CTC model" in err, err


@needs_whisper_base
def test_eval_only_with_a_ctc_checkpoint_on_a_whisper_experiment_names_both_families(tmp_path, capsys):
    ctc_out = tmp_path / "ctc"
    assert run.main(["--exp", str(write_exp(tiny_ctc_config(ctc_out, max_steps=1), tmp_path / "ctc.toml"))]) == 0
    capsys.readouterr()
    exp = write_exp(tiny_whisper_config(tmp_path / "whisper"), tmp_path / "whisper.toml")
    step = ctc_out / "checkpoints" / "step-000001"
    assert run.main(["--exp", str(exp), "--eval-only", "--checkpoint", str(step)]) == 2
    err = one_line_error(capsys)
    assert f"{step} is a CTC model, the experiment configures a Whisper model" in err, err


# ---------------------------------------------------------------------------------------
# TensorBoard on a full disk.


def test_a_tensorboard_write_failure_is_one_log_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out, max_steps=2)
    cfg.eval.at_start = False
    assert run.main(["--exp", str(write_exp(cfg, tmp_path / "exp.toml"))]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if "TensorBoard" in line]
    assert warnings == [f"warning: TensorBoard logging stopped: cannot write {out / 'tb'}: No space left on device"]
    assert "Traceback" not in captured.err and (out / "results.json").is_file()


def test_check_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """preflight.json cannot be written: --check says so in one line (exit 1) and leaves no temporary file
    (before: a traceback from write_text)."""
    import builtins

    from helpers import FullDisk

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f, room=0) if "preflight.json" in str(file) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", open_)
    out = tmp_path / "run"
    exp = write_exp(tiny_ctc_config(out), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--check"]) == 1
    err = one_line_error(capsys)
    assert err.startswith(f"error: cannot write {out / 'preflight.json'}: No space left on device"), err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
