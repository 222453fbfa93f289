"""Shared bits of the training tests: tiny configs on the fixture corpus, the shared assets, reading runs."""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from asr.config import (Config, DataConfig, DecodeConfig, EvalConfig, ModelConfig, RunConfig, SourceConfig,
                        TextConfig, TrainConfig, to_toml, validate)

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "cv-tr"
SHARED = REPO.parent / "shared"
WHISPER_BASE = SHARED / "models" / "whisper-base"
SYNTH_TR = SHARED / "data" / "synth-cv" / "tr"

needs_whisper_base = pytest.mark.skipif(
    not (WHISPER_BASE / "config.json").is_file(),
    reason=f"shared Whisper base model not found at {WHISPER_BASE} (../shared beside the repository)")
needs_synth_tr = pytest.mark.skipif(
    not (SYNTH_TR / "train.tsv").is_file(),
    reason=f"shared synthetic Turkish corpus not found at {SYNTH_TR} (../shared beside the repository)")


def tiny_ctc_config(out_dir, **train) -> Config:
    """A tiny scratch Wav2Vec2-style CTC model (layer-norm feature encoder, so it gets an attention mask)
    on the 32 fixture training clips, evaluated on the 8 dev clips."""
    cfg = Config(
        run=RunConfig(out_dir=str(out_dir), seed=0, device="cpu"),
        data=DataConfig(
            sources=[SourceConfig(kind="common_voice", path=str(FIXTURE), language="tr", train="train", dev="dev")],
            batch_size=8, num_workers=0,
            text=TextConfig(lowercase=True, chars_to_ignore=',?.!;:"“”‘’%-'),
        ),
        model=ModelConfig(init="scratch", name="", arch="wav2vec2", hidden_size=32, num_layers=1, num_heads=2,
                          intermediate_size=64, conv_dim=[32] * 7, freeze_feature_encoder=False,
                          mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0),
        train=TrainConfig(max_steps=4, lr=2e-3, warmup_steps=2, eval_every=0, save_every=0, log_every=1,
                          keep_last=2),
        eval=EvalConfig(split="dev", batch_size=8),
    )
    for k, v in train.items():
        setattr(cfg.train, k, v)
    validate(cfg)
    return cfg


def tiny_whisper_config(out_dir, **train) -> Config:
    """A tiny randomly initialised Whisper built from the shared whisper-base config and tokenizer."""
    cfg = Config(
        run=RunConfig(out_dir=str(out_dir), seed=0, device="cpu"),
        data=DataConfig(
            sources=[SourceConfig(kind="common_voice", path=str(FIXTURE), language="tr", train="train", dev="dev")],
            batch_size=4, num_workers=0,
        ),
        model=ModelConfig(name=str(WHISPER_BASE), init="scratch", hidden_size=32, num_layers=1, num_heads=2,
                          intermediate_size=64),
        train=TrainConfig(max_steps=4, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, log_every=1),
        eval=EvalConfig(split="dev", batch_size=8, max_utterances=2),
        decode=DecodeConfig(max_new_tokens=4),
    )
    for k, v in train.items():
        setattr(cfg.train, k, v)
    validate(cfg)
    return cfg


def tiny_run(root: Path, max_steps: int, *overrides: str) -> tuple[Path, Path]:
    """A tiny CTC run trained through run.py's main with `overrides` (no step-0 evaluation): (experiment
    file, run folder)."""
    import run

    cfg = tiny_ctc_config(root / "run", max_steps=max_steps)
    cfg.eval.at_start = False
    exp = write_exp(cfg, root / "exp.toml")
    assert run.main(["--exp", str(exp), *[a for o in overrides for a in ("--set", o)]]) == 0
    return exp, root / "run"


def same_clips_config(cfg):
    """Train and evaluate on the 8 dev clips, all in one batch, at a zero learning rate: the train loss
    of step 1 and the eval loss after it are the same quantity on the same weights."""
    cfg.data.sources[0].train = "dev"
    cfg.data.batch_size = 8
    cfg.eval.batch_size = 8
    cfg.eval.max_utterances = 0
    cfg.train.lr = 0.0
    cfg.train.max_steps = 1
    cfg.train.warmup_steps = 0
    cfg.train.log_every = 1
    return cfg


def read_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def scalars(out_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run's TensorBoard folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def final_params(model_dir_or_ckpt) -> dict:
    import torch

    return torch.load(Path(model_dir_or_ckpt) / "model.pt", map_location="cpu", weights_only=True)


def faulty_grouped_bf16_conv1d(real):
    """`real` (torch.nn.functional.conv1d) made wrong, as torch 2.9's oneDNN is for some shapes on CPUs with native
    bf16 whatever this CPU does: a grouped convolution of bf16 inputs comes out negated."""
    return lambda x, w, *a, **k: real(x, w, *a, **k) * (-1 if x.dtype == torch.bfloat16 and x.shape[1] != w.shape[1]
                                                        else 1)


def write_exp(cfg, path: Path) -> Path:
    path.write_text(to_toml(cfg), encoding="utf-8")
    return path


def read_tsv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on one intra-op thread: spinning OpenMP threads make a step many times slower
    on a busy machine (the subprocesses get OMP_NUM_THREADS=1 likewise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# Subprocesses and full disks (the fault tests).


def env() -> dict:
    # One intra-op thread: spinning OpenMP threads make a step many times slower on a busy machine.
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(args: list[str], logs: Path, group: bool = False) -> subprocess.Popen:
    """A subprocess writing stdout/stderr to files (a pipe would be held open by an orphaned loader worker
    after a SIGKILL). `group`: its own process group, as a terminal's foreground job."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=REPO, env=env(), stdout=open(logs / "stdout", "w"),
                            stderr=open(logs / "stderr", "w"), start_new_session=group)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0, what: str = "") -> None:
    """Poll `condition()` until true; fail if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class FullDisk:
    """A binary file on a disk that fills up after `room` bytes: the write that crosses it writes what fits,
    then raises ENOSPC (as os.write does), and so does every write after it."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
