"""train.parallel = "fsdp" (issue 15 §2): FSDP2 on CPU with gloo, against DistributedDataParallel.

One torchrun launch (2 ranks) trains the runs in one process group (tests/fsdp_worker.py): a tiny Whisper and a
tiny CTC model, each under ddp and under fsdp, 5 steps with a checkpoint at step 3. The fsdp runs must give the
ddp runs' per-step losses and gradient norms (clipping on: the norms are above train.clip_grad) and, up to the
order of the additions, their final weights, in best/ and final/ exports gathered to rank 0. Then, in this
process (world size 1), the 2-rank sharded checkpoint of step 3 resumes exactly as the 2-rank ddp checkpoint of
step 3 does: the same weights, optimizer state, sampler position and random state.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr import checkpoint as ckpt
from asr.config import ConfigError, load_config
from asr.train import train
from helpers import REPO, final_params, read_json, tiny_ctc_config, tiny_whisper_config, write_exp
from test_ddp import env, free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS, SAVED = 5, 3
# grad_accum 2 for the CTC model: FSDP's accumulation (no reduce-scatter, no reshard) runs on the first micro-batch.
MODELS = {"whisper": (tiny_whisper_config, 1), "ctc": (tiny_ctc_config, 2)}


def run_config(family: str, out: Path, parallel: str):
    make, grad_accum = MODELS[family]
    # fp32: the comparisons are to 1e-5, and under bf16 ddp autocasts the forward while fsdp's MixedPrecisionPolicy
    # casts the parameters (different roundings by design); `auto` is bf16 for Whisper on a CPU with native bf16.
    cfg = make(out, max_steps=STEPS, save_every=SAVED, keep_last=0, grad_accum=grad_accum, parallel=parallel,
               precision="fp32")
    cfg.eval.at_start = False
    cfg.preflight.enabled = False  # suite time
    cfg.data.batch_size = 2  # per rank
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(family, parallel) -> the run folder of a 2-rank run; all trained by one torchrun launch. ("whisper",
    "stopped"): the whisper fsdp run stopped by SIGTERM during step 3 (it saves step 3, then exits)."""
    root = tmp_path_factory.mktemp("fsdp")
    folders = {(f, p): root / f"{f}-{p}" for f in MODELS for p in ("ddp", "fsdp")}
    exps = [str(write_exp(run_config(f, out, p), root / f"{f}-{p}.toml")) for (f, p), out in folders.items()]
    folders["whisper", "stopped"] = root / "whisper-stopped"
    stopped = run_config("whisper", folders["whisper", "stopped"], "fsdp")
    stopped.train.save_every = 0  # only the stop saves
    exps.append(f"{write_exp(stopped, root / 'whisper-stopped.toml')}@{SAVED}")
    folders["ctc", "fsdp-bf16"] = root / "ctc-fsdp-bf16"  # last: the worker's fault stays on after it
    bf16 = run_config("ctc", folders["ctc", "fsdp-bf16"], "fsdp")
    bf16.train.precision = "bf16"
    exps.append(str(write_exp(bf16, root / "ctc-fsdp-bf16-conv-fault.toml")))
    logs = root / "logs"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", f"--log-dir={logs}", "--redirects=3", "tests/fsdp_worker.py", *exps]
    p = subprocess.run(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    ranks = "".join(f"\n--- {f}\n{f.read_text()[-3000:]}" for f in sorted(logs.rglob("std*.log")))
    assert p.returncode == 0, p.stdout[-3000:] + ranks
    return folders


def logged(out: Path, key: str) -> list[float]:
    return [float(x) for x in re.findall(rf" step \d+/\d+ .*{key} ([0-9.]+)", (out / "train.log").read_text())]


def exported(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("family", list(MODELS))
def test_fsdp_matches_ddp_on_two_ranks(runs, family):
    ddp, fsdp = runs[family, "ddp"], runs[family, "fsdp"]
    r1, r2 = read_json(ddp / "results.json"), read_json(fsdp / "results.json")
    assert [s for s, _ in r2["train_loss"]] == list(range(1, STEPS + 1))
    l1 = torch.tensor([v for _, v in r1["train_loss"]], dtype=torch.float64)
    l2 = torch.tensor([v for _, v in r2["train_loss"]], dtype=torch.float64)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=0), (l1, l2)
    assert len(set(l1.tolist())) == STEPS  # the steps really differ
    n1, n2 = logged(ddp, "grad_norm"), logged(fsdp, "grad_norm")  # the full norm, not one rank's part of it
    assert len(n2) == STEPS and torch.allclose(torch.tensor(n1), torch.tensor(n2), rtol=0, atol=2e-3), (n1, n2)
    assert max(n1) > 1.0  # clipping (train.clip_grad 1.0) took effect with the sharded norm
    assert r2["eval"]["tr"]["loss"] == pytest.approx(r1["eval"]["tr"]["loss"], rel=1e-4)

    # The sharded checkpoint: every rank's shards and DCP's metadata, each in the manifest; no model.pt.
    step = fsdp / "checkpoints" / ckpt.step_dir_name(STEPS)
    shards = sorted(p.name for p in (step / ckpt.SHARDED).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"] and not (step / "model.pt").exists()
    assert set(read_json(step / "manifest.json")["files"]) == {f"state/{s}" for s in shards} | {"trainer.pt",
                                                                                                "config.toml"}
    # final/ and best/ hold the full weights, gathered to rank 0, as save_pretrained folders.
    w1 = final_params(ddp / "checkpoints" / ckpt.step_dir_name(STEPS))
    for name in ("final", "best"):
        w2 = exported(fsdp / name)
        assert set(w2) <= set(w1) and len(w2) >= len(w1) - 1  # save_pretrained leaves out a tied copy
        worst = max(((w1[k] - w2[k]).abs().max().item(), k) for k in w2)
        assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5) for k in w2), f"largest difference {worst}"


def test_fsdp_bf16_guards_the_wrong_conv_and_agrees_with_fp32(runs):
    """fsdp in bf16 gathers the parameters in bf16 (no autocast), so the CPU's wrong bf16 convolutions are hit
    directly: the guard (made to find the positional convolution wrong by the worker, on any CPU) runs it in
    float32 with the bf16 weights cast up (without the cast: a dtype error), and the first step's loss is within
    2% of the fp32 run's."""
    bf16, fp32 = runs["ctc", "fsdp-bf16"], runs["ctc", "ddp"]
    log = (bf16 / "train.log").read_text(encoding="utf-8")
    assert "training precision bf16" in log and "run in float32: wav2vec2.encoder.pos_conv_embed.conv" in log
    first = logged(bf16, "loss")[0], logged(fp32, "loss")[0]
    assert abs(first[0] - first[1]) < 0.02 * first[1], first


def test_a_damaged_shard_fails_verification(runs, tmp_path):
    step = tmp_path / ckpt.step_dir_name(SAVED)
    shutil.copytree(runs["ctc", "fsdp"] / "checkpoints" / ckpt.step_dir_name(SAVED), step)
    assert ckpt.verify(step) is None and ckpt.list_checkpoints(tmp_path) == [(SAVED, step)]
    shard = step / ckpt.SHARDED / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert ckpt.verify(step) == "state/__1_0.distcp does not match its manifest's blake2b digest"
    (step / ckpt.SHARDED / ".metadata").unlink()
    assert ckpt.verify(step) == "state/.metadata missing" and ckpt.list_checkpoints(tmp_path) == []


def test_stopped_two_rank_fsdp_run_resumes_in_one_process(runs, tmp_path):
    """The 2-rank fsdp run stopped by SIGTERM during step 3 saved that step (sharded) and stopped; resumed in one
    process (fsdp with nothing to shard, the checkpoint loaded through torch.distributed.checkpoint) it goes on
    with the losses and ends with the weights of the 2-rank ddp run's step-3 checkpoint resumed in one process:
    the same weights, optimizer state, sampler position and random state came back."""
    stopped = runs["whisper", "stopped"]
    log = (stopped / "train.log").read_text()
    assert f"stopped by signal {int(signal.SIGTERM)} at step {SAVED}; checkpoint saved" in log
    assert [s for s, _ in ckpt.list_checkpoints(stopped / "checkpoints")] == [SAVED]
    results = {}
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        if parallel == "fsdp":
            shutil.copytree(stopped, out)
        else:
            shutil.copytree(runs["whisper", parallel] / "checkpoints" / ckpt.step_dir_name(SAVED),
                            out / "checkpoints" / ckpt.step_dir_name(SAVED))
        results[parallel] = train(run_config("whisper", out, parallel))
        log = (out / "train.log").read_text()
        assert f"resumed from {out / 'checkpoints' / ckpt.step_dir_name(SAVED)} (step {SAVED})" in log
        assert "world size 1" in log
    l1, l2 = ([v for _, v in results[p]["train_loss"]] for p in ("ddp", "fsdp"))
    assert [s for s, _ in results["fsdp"]["train_loss"]] == [4, 5]
    assert torch.allclose(torch.tensor(l1, dtype=torch.float64), torch.tensor(l2, dtype=torch.float64), rtol=1e-5,
                          atol=0), (l1, l2)
    # The one-process fsdp run saves sharded checkpoints too (one shard), which torchrun could resume.
    step = tmp_path / "fsdp" / "checkpoints" / ckpt.step_dir_name(STEPS)
    assert sorted(p.name for p in (step / ckpt.SHARDED).iterdir()) == [".metadata", "__0_0.distcp"]
    w1, w2 = final_params(tmp_path / "ddp" / "checkpoints" / ckpt.step_dir_name(STEPS)), exported(
        tmp_path / "fsdp" / "final")
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5) for k in w2)


def test_parallel_setting_is_checked(tmp_path):
    cfg = tiny_ctc_config(tmp_path / "run")
    exp = write_exp(cfg, tmp_path / "exp.toml")
    with pytest.raises(ConfigError, match=r"train.parallel: 'zero' is not one of 'ddp', 'fsdp'"):
        load_config(exp, ["train.parallel=zero"])
    with pytest.raises(ConfigError, match=r"model.freeze_encoder_steps: not with train.parallel = \"fsdp\""):
        load_config(exp, ["train.parallel=fsdp", "model.freeze_encoder_steps=2"])


def test_eval_only_reads_a_sharded_checkpoint(runs):
    """--eval-only of an fsdp run: its newest sharded checkpoint's model (DCP, in one process) scores what the
    run's own evaluation at that step scored."""
    import run

    out = runs["ctc", "fsdp"]
    assert ckpt.is_sharded(out / "checkpoints" / "step-000005")  # no model.pt to read
    assert run.main(["--run", str(out), "--eval-only"]) == 0
    own, again = read_json(out / "eval" / "step-000005.json"), read_json(out / "eval" / "step-000005.dev.greedy.json")
    assert again["n"] == own["n"] == 8 and again["loss"] == pytest.approx(own["loss"], rel=1e-5)
    assert again["cer"] == own["cer"]


def test_a_sharded_save_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """A shard write that fails (ENOSPC inside torch.distributed.checkpoint, here in one process) is one
    CheckpointError naming the checkpoint and the cause; no temporary folder stays, the earlier checkpoint stays."""
    import errno
    import os

    import torch.distributed.checkpoint.filesystem as dcp_fs

    from asr import fsdp

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "checkpoints"
    ckpt.save_sharded_checkpoint(folder, 1, fsdp.sharded_state(model, optimizer, None), {"step": 1}, "")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_fs, "_write_item", full)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_sharded_checkpoint(folder, 2, fsdp.sharded_state(model, optimizer, None), {"step": 2}, "")
    assert str(e.value) == f"cannot write checkpoint {folder / 'step-000002'}: No space left on device"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"] and ckpt.verify(folder / "step-000001") is None


def test_a_sharded_checkpoint_that_does_not_load_is_corrupt(tmp_path):
    """A shard cut short in a checkpoint without a manifest (nothing to verify it against): DCP's failure to read
    it is one CorruptCheckpoint line (the caller renames the checkpoint aside), not DCP's traceback."""
    from asr import fsdp
    from asr.resume import load_sharded_state

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    path = ckpt.save_sharded_checkpoint(tmp_path, 1, fsdp.sharded_state(model, optimizer, None), {"step": 1}, "")
    (path / ckpt.MANIFEST).unlink()
    shard = path / ckpt.SHARDED / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(ckpt.CorruptCheckpoint) as e:
        load_sharded_state(path, torch.nn.Linear(4, 3), None, None)
    assert str(e.value).startswith(f"checkpoint {path} is corrupt: cannot be loaded: ") and "\n" not in str(e.value)


def test_a_sharded_save_before_any_step_changes_nothing(tmp_path):
    """A sharded save while the optimizer has taken no step (fp16's first steps may all be skipped) holds the model
    alone and leaves the optimizer without state (DCP's get_state_dict would take a zero step to make one, so the
    run would go on with Adam's step count one ahead); it loads into a fresh optimizer."""
    from asr import fsdp
    from asr.resume import load_sharded_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    path = ckpt.save_sharded_checkpoint(tmp_path, 1, fsdp.sharded_state(model, optimizer, None), {"step": 1}, "")
    assert not optimizer.state
    other = torch.nn.Linear(4, 3)
    fresh = torch.optim.AdamW(other.parameters())
    load_sharded_state(path, other, fresh, None)
    assert torch.equal(other.weight, model.weight) and not fresh.state
