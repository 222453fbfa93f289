"""The CUDA-marked tests (issue 15 §3), run by tests/gpu/check.sh on a GPU and skipped without one:
bf16 and fp16 autocast (fp16 with the GradScaler) train with finite, falling losses; a stopped and resumed run ends
with bit-identical weights on the GPU; the training loader hands out pinned batches; FSDP on the GPU (NCCL, every
visible GPU a rank) gives DDP's losses.

ASR_TEST_DEVICE=cpu runs them on the CPU (a check of the tests themselves where no GPU is lent).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: before CUDA starts

import pytest
import torch

from helpers import REPO, final_params, needs_whisper_base, read_json, tiny_whisper_config, write_exp

DEVICE = os.environ.get("ASR_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, needs_whisper_base,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU")]


def gpu_config(out: Path, **train):
    """The tiny Whisper on the fixture corpus, on the device, a constant rate high enough to fall in 12 steps."""
    cfg = tiny_whisper_config(out, **{"max_steps": 12, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant",
                                      "log_every": 1, **train})
    cfg.run.device = DEVICE
    cfg.eval.at_start = False
    cfg.preflight.enabled = False
    return cfg


def deterministic_attention():
    """The math kernel of scaled_dot_product_attention: its backward adds in a fixed order (flash and
    memory-efficient attention's do not), so reruns give the same bits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains(tmp_path, precision):
    from asr.train import train

    if precision == "bf16" and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    results = train(gpu_config(tmp_path / "run", precision=precision))
    losses = [v for _, v in results["train_loss"]]  # of the applied steps (log_every 1)
    # fp16: the scaler skips its first steps while it lowers its scale from 65536 to one that does not overflow
    assert results["skipped_steps"] <= (4 if precision == "fp16" else 0)
    assert len(losses) == 12 - results["skipped_steps"] and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses  # it learns
    trainer = torch.load(tmp_path / "run" / "checkpoints" / "step-000012" / "trainer.pt", weights_only=False)
    if precision == "fp16":  # the GradScaler ran, and its scale is in the checkpoint
        assert trainer["scaler"] and math.isfinite(trainer["scaler"]["scale"]) and trainer["scaler"]["scale"] > 0
    else:
        assert not trainer["scaler"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"device {DEVICE}" in log and f"precision {precision}" in log


def test_resume_is_exact_on_the_gpu(tmp_path):
    from asr.train import train

    with deterministic_attention():
        train(gpu_config(tmp_path / "whole", max_steps=6, precision="bf16"))
        train(gpu_config(tmp_path / "parts", max_steps=3, precision="bf16"))
        train(gpu_config(tmp_path / "parts", max_steps=6, precision="bf16"))  # resumes from step 3
    assert "resumed from" in (tmp_path / "parts" / "train.log").read_text()
    w1, w2 = (final_params(tmp_path / r / "checkpoints" / "step-000006") for r in ("whole", "parts"))
    different = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_training_batches_are_pinned(tmp_path):
    from asr.experiment import unlock_run_dir
    from asr.train import setup

    cfg = gpu_config(tmp_path / "run")
    run = setup(cfg, fresh=True)
    try:
        batch = next(run.batches)
        assert batch["audio"].is_pinned() == (DEVICE == "cuda") and batch["labels"].is_pinned() == (DEVICE == "cuda")
        assert run.model.proj_out.weight.device.type == DEVICE
    finally:
        unlock_run_dir(Path(cfg.run.out_dir))


def test_fsdp_matches_ddp_on_the_gpus(tmp_path):
    """train.parallel fsdp against ddp under torchrun, every visible GPU a rank (one GPU: FSDP over one rank, which
    still runs fully_shard, the sharded checkpoint and the gathered export), in float32."""
    ranks = torch.cuda.device_count() if DEVICE == "cuda" else 2
    exps = []
    for parallel in ("ddp", "fsdp"):
        cfg = gpu_config(tmp_path / parallel, max_steps=5, save_every=5, precision="fp32", parallel=parallel)
        exps.append(str(write_exp(cfg, tmp_path / f"{parallel}.toml")))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    worker = REPO / "tests" / "fsdp_worker.py"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--standalone",
                        str(worker), "--device", DEVICE, *exps], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    l1, l2 = ([v for _, v in read_json(tmp_path / r / "results.json")["train_loss"]] for r in ("ddp", "fsdp"))
    assert torch.allclose(torch.tensor(l1), torch.tensor(l2), rtol=1e-4, atol=0), (l1, l2)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-000005" / "state" / ".metadata").is_file()
    assert (tmp_path / "fsdp" / "final" / "model.safetensors").is_file()
