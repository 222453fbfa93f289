"""run.allocator: oneTBB's allocator, preloaded by run.py for CPU runs, and glibc's release mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr import allocator
from asr.allocator import AllocatorError, preload_env, tbb_libraries
from helpers import REPO, final_params, tiny_ctc_config, write_exp

needs_tbb = pytest.mark.skipif(tbb_libraries() is None or not sys.platform.startswith("linux"),
                               reason="the tbb wheel is not installed (Linux x86_64 only)")
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")


def bare_env(**extra) -> dict:
    """A bare environment: nothing of the test session's (threads, allocator settings) leaks in."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", ""), "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def fake_wheel(monkeypatch):
    libs = (Path("/x/libtbbmalloc.so.2"), Path("/x/libtbbmalloc_proxy.so.2"))
    monkeypatch.setattr(allocator, "tbb_libraries", lambda: libs)
    monkeypatch.setattr(allocator, "tbb_active", lambda: False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("ASR_ALLOCATOR_PRELOADED", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    return libs


def test_preload_env_restarts_only_cpu_runs_that_want_tbb(fake_wheel, monkeypatch):
    env = preload_env("auto", "cpu")
    assert env["LD_PRELOAD"].split() == [str(p) for p in fake_wheel]
    assert env["ASR_ALLOCATOR_PRELOADED"] == "1"
    assert preload_env("tbb", "cpu")["LD_PRELOAD"] == env["LD_PRELOAD"]
    for choice, device in (("system", "cpu"), ("release", "cpu"), ("auto", "cuda"), ("tbb", "cuda:1")):
        assert preload_env(choice, device) is None, (choice, device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert preload_env("auto", "auto") is not None  # run.device auto on a machine without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preload_env("auto", "auto") is None
    monkeypatch.setenv("LD_PRELOAD", "/y/other.so")  # a user's own preload is kept, after ours
    assert preload_env("auto", "cpu")["LD_PRELOAD"].split()[-1] == "/y/other.so"
    monkeypatch.setenv("ASR_ALLOCATOR_PRELOADED", "1")  # tried once already: never a restart loop
    assert preload_env("auto", "cpu") is None


def test_without_the_wheel_auto_stays_and_tbb_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import run

    monkeypatch.setattr(allocator, "tbb_libraries", lambda: None)
    monkeypatch.setattr(allocator, "tbb_active", lambda: False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("ASR_ALLOCATOR_PRELOADED", raising=False)
    assert preload_env("auto", "cpu") is None
    with pytest.raises(AllocatorError, match="pip install tbb"):
        preload_env("tbb", "cpu")
    exp = write_exp(tiny_ctc_config(tmp_path / "run"), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--set", "run.allocator=tbb"], restart=True) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run.allocator = 'tbb'") and "\n" not in err
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_a_cpu_run_logs_the_allocator_it_runs_on(tmp_path):
    from asr.experiment import use_allocator

    if allocator.tbb_active():
        pytest.skip("this test session itself runs on TBB's allocator")
    cfg, lines = tiny_ctc_config(tmp_path), []
    for choice in ("system", "auto", "tbb"):
        cfg.run.allocator = choice
        use_allocator(cfg, torch.device("cpu"), lines.append)
    assert lines == ["CPU allocator: system", "CPU allocator: system",
                     "CPU allocator: system (run.allocator = 'tbb' is not in effect: only run.py preloads it)"]
    use_allocator(cfg, torch.device("meta"), lines.append)  # not a CPU run: nothing to say
    assert len(lines) == 3


@needs_tbb
def test_run_py_restarts_on_tbb_and_trains_the_same_weights(tmp_path):
    """`python run.py` restarts itself with TBB's malloc preloaded (its loader worker forked from it) and ends
    with the same weights as the same command on the system allocator."""
    logs, weights = {}, {}
    for choice in ("auto", "system"):
        cfg = tiny_ctc_config(tmp_path / choice, max_steps=3)
        cfg.data.num_workers, cfg.run.allocator = 1, choice
        res = subprocess.run([sys.executable, "run.py", "--exp", str(write_exp(cfg, tmp_path / f"{choice}.toml"))],
                             cwd=REPO, env=bare_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        logs[choice] = (tmp_path / choice / "train.log").read_text(encoding="utf-8")
        weights[choice] = final_params(tmp_path / choice / "checkpoints" / "step-000003")
    assert "CPU allocator: tbb" in logs["auto"]
    assert "CPU allocator: system" in logs["system"]
    assert weights["auto"].keys() == weights["system"].keys()
    assert all(torch.equal(weights["auto"][k], weights["system"][k]) for k in weights["auto"])


_REUSE = """
import resource, sys, torch
from asr import allocator
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
print(allocator.configure(sys.argv[1]))
x = torch.ones(2 ** 22); del x  # a 16 MB block, freed
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # the same request again and again, as every training step makes
    x = torch.ones(2 ** 22); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
before = rss_mb()
allocator.release_cached()
print(before - rss_mb())
"""


@needs_tbb
@needs_proc
def test_tbb_reuses_freed_blocks_without_faulting_pages_in_and_releases_them_on_request():
    def run(mode: str, env: dict) -> list[str]:
        res = subprocess.run([sys.executable, "-c", _REUSE, mode], cwd=REPO, capture_output=True, text=True,
                             env=env, check=True)
        return res.stdout.split()

    env = preload_env("auto", "cpu")
    assert env is not None
    running, faults, released_mb = run("auto", bare_env(LD_PRELOAD=env["LD_PRELOAD"]))
    assert running == "tbb"
    assert int(faults) < 200  # the cached block is handed out again: no page faulted in
    assert float(released_mb) > 12  # release_cached gives the kept 16 MB back
    running, faults, _ = run("release", bare_env())
    if running == "release":  # glibc: every 16 MB block is mapped afresh, 4096 pages faulted in each time
        assert int(faults) > 20 * 4096 * 0.9


_HOLES = """
import sys, torch
from asr import allocator
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
if allocator.configure(sys.argv[1]) != sys.argv[1]:
    print("no-mallopt"); raise SystemExit
x = torch.ones(2 ** 22)  # a freed 16 MB block: glibc's adaptive threshold rises, 2 MB blocks go to the heap
del x
base = rss_mb()
big, small = [], []
for _ in range(150):  # 2 MB blocks with small live ones between them: holes the heap top cannot trim
    big.append(torch.ones(2 ** 19))
    small.append(torch.ones(64))
del big
print(rss_mb() - base)
"""


@needs_proc
def test_release_mode_hands_freed_blocks_back():
    """run.allocator = "release": with glibc's default adaptive threshold, 300 MB of freed 2 MB tensors between
    live small ones stay resident; with the threshold fixed at 1 MB they go back to the OS."""

    def retained(mode: str) -> str:
        res = subprocess.run([sys.executable, "-c", _HOLES, mode], cwd=REPO, capture_output=True, text=True,
                             env=bare_env(), check=True)
        return res.stdout.strip()

    released = retained("release")
    if released == "no-mallopt":
        pytest.skip("the C library has no mallopt (not glibc)")
    assert float(released) < 30
    assert float(retained("system")) > 250  # the fragmentation the option exists for


_PILE_UP = """
import sys, torch
from asr import allocator
print(allocator.configure("auto"))
x = torch.ones(1 << 20); del x
base = highest = allocator.resident_bytes() / 2 ** 20
for i in range(1, 31):  # each step a block of another size class (batches of other shapes): none is reused
    x = torch.ones(int((1 << 20) * 1.1 ** i)); del x  # 4.4 .. 70 MB
    highest = max(highest, allocator.resident_bytes() / 2 ** 20)
    if sys.argv[1] == "limit":
        allocator.limit_cache()
print(base, highest)
"""


@needs_tbb
@needs_proc
def test_limit_cache_bounds_the_blocks_kept_when_shapes_change_every_step():
    """TBB keeps every freed large block for a request of its size class; when each step asks for other
    sizes they pile up (30 steps of 4.4..70 MB: ~650 MB kept). limit_cache, called once per step, hands them
    back once resident memory passes 1.25x that of the first step after the last release."""
    env = bare_env(LD_PRELOAD=preload_env("auto", "cpu")["LD_PRELOAD"])

    def run(mode: str) -> tuple[float, float]:
        res = subprocess.run([sys.executable, "-c", _PILE_UP, mode], cwd=REPO, capture_output=True, text=True,
                             env=env, check=True)
        running, base, highest = res.stdout.split()
        assert running == "tbb"
        return float(base), float(highest)

    base, highest = run("keep")
    assert highest - base > 500  # the pile-up limit_cache exists for
    base, highest = run("limit")
    assert highest < (base + 5) * 1.25 + 70  # 1.25x the first limited step, plus one step's block
