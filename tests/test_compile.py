"""train.compile (Whisper): the training forward under torch.compile (inductor) trains, matches the eager run
without random draws, and resumes exactly with them (dropout) on; a CTC model or no C++ compiler is one line."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from asr.config import ConfigError
from asr.train import train

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import final_params, scalars, tiny_ctc_config, tiny_whisper_config


def config(out, steps, compile=True, dropout=0.1):
    cfg = tiny_whisper_config(out, max_steps=steps, compile=compile, schedule="constant", save_every=0,
                              log_every=1, precision="fp32")
    cfg.model.hidden_dropout = cfg.model.attention_dropout = dropout
    cfg.data.batch_size = 4
    cfg.eval.at_start = False
    cfg.eval.max_utterances, cfg.decode.max_new_tokens = 2, 4
    return cfg


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler: no g++ (or $CXX) on PATH")
def test_compiled_training_matches_eager_and_resumes_exactly(tmp_path):
    train(config(tmp_path / "eager", 4, compile=False, dropout=0.0), fresh=True)
    train(config(tmp_path / "compiled", 4, dropout=0.0), fresh=True)
    eager = [v for _, v in scalars(tmp_path / "eager")["train/loss"]]
    compiled = [v for _, v in scalars(tmp_path / "compiled")["train/loss"]]
    assert len(compiled) == 4 and all(math.isfinite(v) for v in compiled)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert "forward compiled" not in (tmp_path / "eager" / "train.log").read_text(encoding="utf-8")
    assert "forward compiled (train.compile" in (tmp_path / "compiled" / "train.log").read_text(encoding="utf-8")

    train(config(tmp_path / "a", 6), fresh=True)  # dropout on: its draws are part of what resumes
    train(config(tmp_path / "b", 3), fresh=True)
    train(config(tmp_path / "b", 6))
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text(encoding="utf-8")
    a = final_params(tmp_path / "a" / "checkpoints" / "step-000006")
    b = final_params(tmp_path / "b" / "checkpoints" / "step-000006")
    assert not any(k.startswith("_orig_mod") for k in a)  # checkpoints hold the model's own names
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_without_a_cpp_compiler_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-cxx")
    with pytest.raises(ConfigError, match=r"^train.compile: .*'no-such-cxx' is not on PATH; install g\+\+"):
        train(config(tmp_path / "run", 1), fresh=True)


def test_compile_of_a_ctc_model_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^train.compile: not available for CTC models yet"):
        train(tiny_ctc_config(tmp_path / "run", max_steps=1, compile=True), fresh=True)
