"""DistributedDataParallel on CPU with gloo (issue 5), launched as users launch it:
`python -m torch.distributed.run --nproc_per_node=2 run.py --exp FILE`.

- 2 processes with batch B/2 each give the per-step losses and final weights of 1 process with batch B
  (the sampler's global batches are the same; see DurationBatchSampler), with and without gradient
  accumulation (no_sync on the first micro-batch).
- A 2-process run stopped by SIGTERM to torchrun (which passes it on to each rank's process group) and
  started again with the same command ends with exactly the weights (torch.equal) of an uninterrupted
  2-process run: both runs sum the same two per-rank gradients in the same all-reduce, so nothing but a
  wrong resume could change a bit. Only rank 0 logs and writes; evaluation is sharded and gathered.
- LayerDrop (issue 13 §7): every rank skips the layers one process skips at that step, so the weights still
  agree; the demo experiment runs under torchrun as it is; a rank whose batch failed to decode runs the
  fallback batch with weight 0; no trainable parameter goes without a gradient when DDP does not look for
  unused ones.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch


from asr.models import layer_drop_context, layer_drop_generator
from helpers import (FIXTURE, REPO, final_params, read_json, tiny_ctc_config, tiny_whisper_config, write_exp)


pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

RUN_TIMEOUT = 180  # seconds for any one launch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    # One thread per process, as torchrun gives each rank: the 1-process runs compute like a rank, and two
    # ranks on two cores do not oversubscribe them.
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not inside a launched job
        e.pop(k, None)
    return e


def torchrun(nproc: int, logs: Path) -> list[str]:
    """The launcher, with each rank's stdout and stderr in its own file under `logs`."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", f"--log-dir={logs}", "--redirects=3", "run.py"]


def start(args: list[str], logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=REPO, env=env(), stdout=open(logs / "launcher.out", "w"),
                            stderr=subprocess.STDOUT)


def finish(p: subprocess.Popen, logs: Path) -> str:
    try:
        p.wait(timeout=RUN_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    return (logs / "launcher.out").read_text()


def launch(exp: Path, logs: Path, nproc: int, *extra: str) -> None:
    """`python run.py --exp exp [extra]` (nproc 1) or torchrun with nproc ranks; must succeed."""
    args = (torchrun(nproc, logs) if nproc > 1 else [sys.executable, "run.py"]) + ["--exp", str(exp), *extra]
    p = start(args, logs)
    output = finish(p, logs)
    assert p.returncode == 0, output[-3000:] + rank_output(logs)


def rank_output(logs: Path) -> str:
    return "".join(f"\n--- {f}\n{f.read_text()[-2000:]}" for f in sorted(logs.rglob("std*.log")))


def rank_stdout(logs: Path, rank: int) -> str:
    """What rank `rank` printed, over every launch logged under `logs`."""
    return "".join(f.read_text() for f in sorted(logs.rglob(f"attempt_*/{rank}/stdout.log")))


def equivalence_config(out: Path, batch_size: int, grad_accum: int):
    """No dropout, no SpecAugment (the tiny config's defaults): the only randomness is the batch order,
    which the sampler makes independent of the rank count."""
    cfg = tiny_ctc_config(out, max_steps=6, log_every=1, grad_accum=grad_accum, warmup_steps=2)
    cfg.data.batch_size = batch_size
    cfg.data.num_workers = 0
    cfg.eval.at_start = False
    return cfg


def layerdrop_config(out: Path, batch_size: int, grad_accum: int):
    """The equivalence config with 4 encoder layers and LayerDrop 0.1 (transformers' default for Wav2Vec2):
    layers are skipped in some steps (see `dropped_layers`)."""
    cfg = equivalence_config(out, batch_size, grad_accum)
    cfg.model.num_layers, cfg.model.layerdrop = 4, 0.1
    return cfg


def dropped_layers(seed: int, step: int, micro: int, n_draws: int, p: float) -> list[int]:
    """Which of `n_draws` LayerDrop draws (one per layer, in forward order) skip their layer at (step, micro)."""
    g = layer_drop_generator(seed, step, micro)
    return [i for i in range(n_draws) if float(torch.rand([], generator=g)) < p]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """1-process runs with batch 8, by grad_accum and LayerDrop (each launched once for the module)."""
    runs = {}

    def get(grad_accum: int, layerdrop: bool = False) -> Path:
        if (grad_accum, layerdrop) not in runs:
            root = tmp_path_factory.mktemp(f"one_ga{grad_accum}{'_ld' if layerdrop else ''}")
            cfg = (layerdrop_config if layerdrop else equivalence_config)(root / "run", 8, grad_accum)
            launch(write_exp(cfg, root / "exp.toml"), root / "logs", 1)
            runs[grad_accum, layerdrop] = root / "run"
        return runs[grad_accum, layerdrop]

    return get


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_ranks_match_one_process_with_the_same_global_batch(one_process, tmp_path, grad_accum):
    one, two = one_process(grad_accum), tmp_path / "two"
    launch(write_exp(equivalence_config(two, 4, grad_accum), tmp_path / "two.toml"), tmp_path / "logs", 2)
    assert_same_training(one, two)


def test_two_ranks_match_one_process_with_layerdrop(one_process, tmp_path):
    """LayerDrop 0.1: both ranks skip the layers one process skips at that step and micro-batch, so the
    weights still agree. Before, DDP stopped at the second step after a skipped layer ("Expected to have
    finished reduction"); with dropout on, the ranks' draws also differed (test_demo_experiment_...).
    One micro-batch a step: accumulation under DDP is the no-LayerDrop twin's (grad_accum 1 and 2), and a
    two-accumulation twin here passed before the fix too (it only cost suite time)."""
    grad_accum = 1
    drops = [dropped_layers(0, step, micro, 4, 0.1) for step in range(6) for micro in range(grad_accum)]
    assert any(drops) and not all(drops)  # some steps skip layers, others do not
    one, two = one_process(grad_accum, layerdrop=True), tmp_path / "two"
    launch(write_exp(layerdrop_config(two, 4, grad_accum), tmp_path / "two.toml"), tmp_path / "logs", 2)
    assert_same_training(one, two)


def assert_same_training(one: Path, two: Path, steps: int = 6, atol: float = 1e-5) -> None:
    """The same per-step losses, evaluation and (up to summation order) final weights."""
    r1, r2 = read_json(one / "results.json"), read_json(two / "results.json")
    assert [s for s, _ in r1["train_loss"]] == [s for s, _ in r2["train_loss"]] == list(range(1, steps + 1))
    losses1 = torch.tensor([v for _, v in r1["train_loss"]], dtype=torch.float64)
    losses2 = torch.tensor([v for _, v in r2["train_loss"]], dtype=torch.float64)
    assert torch.allclose(losses1, losses2, rtol=1e-5, atol=0), (losses1, losses2)
    assert len(set(losses1.tolist())) == steps  # the steps really differ
    assert r1["eval"]["tr"]["n"] == r2["eval"]["tr"]["n"] == 8
    assert r2["eval"]["tr"]["loss"] == pytest.approx(r1["eval"]["tr"]["loss"], rel=1e-4)

    # Not bit-equal: the ranks' gradients are summed by the all-reduce in another order than one
    # process's batch sums them, and the tiny differences pass through the Adam steps.
    w1 = final_params(one / "checkpoints" / f"step-{steps:06d}")
    w2 = final_params(two / "checkpoints" / f"step-{steps:06d}")
    assert w1.keys() == w2.keys()
    worst = max(((w1[k] - w2[k]).abs().max().item(), k) for k in w1)
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=atol) for k in w1), f"largest difference {worst}"


def test_two_ranks_with_the_one_process_batch_each_differ(one_process, tmp_path):
    """The comparison above can fail: 2 ranks with the 1-process batch size each (a global batch twice as
    large) give other losses."""
    two = tmp_path / "two"
    launch(write_exp(equivalence_config(two, 8, 1), tmp_path / "two.toml"), tmp_path / "logs", 2)
    l1 = [v for _, v in read_json(one_process(1) / "results.json")["train_loss"]]
    l2 = [v for _, v in read_json(two / "results.json")["train_loss"]]
    assert not torch.allclose(torch.tensor(l1), torch.tensor(l2), rtol=1e-3)


# ---------------------------------------------------------------------------------------
# LayerDrop and other control flow that could differ between ranks.


def test_demo_experiment_runs_on_two_ranks(tmp_path):
    """experiments/demo.toml as it is (transformers' default LayerDrop 0.1, dropout 0.1, an evaluation at the
    start), only shorter: under torchrun it died at the first step with gloo's "Received data size doesn't
    match expected size"."""
    from transformers import Wav2Vec2Config

    from asr.config import load_config

    exp = REPO / "experiments" / "demo.toml"
    cfg, steps = load_config(exp), 8
    assert cfg.model.layerdrop is None and cfg.eval.at_start  # the model config's own LayerDrop
    p = Wav2Vec2Config().layerdrop
    assert p > 0 and any(dropped_layers(cfg.run.seed, s, 0, cfg.model.num_layers, p) for s in range(steps))
    out = tmp_path / "run"
    launch(exp, tmp_path / "logs", 2, "--set", f'run.out_dir="{out}"', "--set", f"train.max_steps={steps}")
    results = read_json(out / "results.json")
    assert results["steps"] == steps and results["eval"]["tr"]["n"] == 32
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "world size 2" in log and re.search(r"eval tr step 0: .*\(n=32\)", log)
    assert (out / "checkpoints" / f"step-{steps:06d}" / "model.pt").is_file()


def nan_clip_corpus(root: Path) -> str:
    """The fixture corpus with its first training clip replaced by a float WAV of NaN samples: the header is
    fine (data preparation keeps it), decoding fails in the loader. Returns the clip's id."""
    import shutil

    import numpy as np
    import soundfile as sf

    shutil.copytree(FIXTURE, root)
    lines = (root / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, row = lines[0].split("\t"), lines[1].split("\t")
    col = header.index("path")
    stem = row[col].rsplit(".", 1)[0]
    sf.write(root / "clips" / f"{stem}.wav", np.full(32000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    row[col] = f"{stem}.wav"
    (root / "train.tsv").write_text("\n".join([lines[0], "\t".join(row), *lines[2:]]) + "\n", encoding="utf-8")
    return f"tr/{stem}"


def test_a_rank_whose_batch_failed_to_decode_joins_the_step(tmp_path):
    """One clip decodes to NaN: at batch 1 per rank, in one step one rank has no clip left and runs the
    fallback batch with weight 0 (with the step's LayerDrop draws), so the all-reduce still matches and the
    weights are those of one process whose batch of 2 lost that clip."""
    corpus = tmp_path / "corpus"
    bad = nan_clip_corpus(corpus)
    runs = {}
    for nproc, batch_size in ((1, 2), (2, 1)):
        out = runs[nproc] = tmp_path / f"run{nproc}"
        cfg = layerdrop_config(out, batch_size, 1)
        cfg.data.sources[0].path = str(corpus)
        cfg.train.max_steps = 16  # one epoch: every clip once
        launch(write_exp(cfg, tmp_path / f"exp{nproc}.toml"), tmp_path / f"logs{nproc}", nproc)
    for out in runs.values():  # whichever rank had it, the clip failed once in the epoch
        assert len(re.findall(rf"dropped {re.escape(bad)}: .*NaN", (out / "train.log").read_text())) == 1
    # 16 Adam steps on batches of 1 and 2 clips: summation order alone moves some weights by up to 4e-5
    # (measured on the intact corpus); a fallback batch counted with weight 1 would move them by far more.
    assert_same_training(runs[1], runs[2], steps=16, atol=1e-4)


def layers_run(model, stacks, context, **inputs) -> list[list[int]]:
    """The indices of the layers of each stack that a training forward under `context` ran."""
    ran = [[] for _ in stacks]
    hooks = [layer.register_forward_pre_hook(lambda m, a, s=s, i=i: ran[s].append(i))
             for s, stack in enumerate(stacks) for i, layer in enumerate(stack)]
    try:
        with torch.no_grad(), context:
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return ran


@pytest.mark.parametrize("family", ["ctc", "whisper"])
def test_layerdrop_draws_come_from_the_step_not_the_global_generator(tmp_path, family):
    """Every LayerDrop decision (a CTC encoder's; Whisper's encoder and decoder) in a training forward
    comes from the generator of (run seed, step, micro-batch): the same whatever the global generator's
    state (which differs between ranks), in a resumed run, and in one process."""
    from asr.models import build
    from asr.text import CharVocab

    if family == "ctc":
        cfg = tiny_ctc_config(tmp_path)
        cfg.model.num_layers, cfg.model.layerdrop = 4, 0.5
        model = build(cfg.model, CharVocab.build(["ab c"])).model
        stacks, inputs = [model.wav2vec2.encoder.layers], {"input_values": torch.randn(1, 16000)}
    else:
        cfg = tiny_whisper_config(tmp_path)
        cfg.model.num_layers, cfg.model.layerdrop = 3, 0.5  # model.layerdrop is Whisper's encoder_layerdrop
        model = build(cfg.model, languages=["tr"]).model
        model.model.decoder.layerdrop = model.config.decoder_layerdrop = 0.5  # read when the decoder is built
        stacks = [model.model.encoder.layers, model.model.decoder.layers]
        inputs = {"input_features": torch.randn(1, 80, 3000), "decoder_input_ids": torch.tensor([[1, 2, 3]])}
    model.train()
    n = sum(len(stack) for stack in stacks)
    seen = []
    for step, micro in ((0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (4, 0)):
        runs = []
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            runs.append(layers_run(model, stacks, layer_drop_context(model, 0, step, micro), **inputs))
        dropped = dropped_layers(0, step, micro, n, 0.5)
        expected, k = [], 0
        for stack in stacks:
            expected.append([i for i in range(len(stack)) if k + i not in dropped])
            k += len(stack)
        assert runs[0] == runs[1] == expected, (step, micro)
        seen.append(expected)
    assert len({str(e) for e in seen}) > 1  # the draws change from step to step
    model.eval()  # evaluation skips nothing
    assert layers_run(model, stacks, layer_drop_context(model, 0, 0, 0), **inputs) == [
        list(range(len(stack))) for stack in stacks]


def test_an_adapter_drawing_layerdrop_from_numpy_is_named():
    """Wav2Vec2's downsampling adapter (`add_adapter`) draws its LayerDrop with numpy, out of reach of the
    step's generator: `wrap` refuses it under torchrun, naming it; without LayerDrop nothing is named."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from asr.models import numpy_layer_drop

    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 2], num_conv_pos_embedding_groups=2,
                 vocab_size=8, add_adapter=True, output_hidden_size=16)
    assert numpy_layer_drop(Wav2Vec2ForCTC(Wav2Vec2Config(layerdrop=0.1, **sizes))) == "wav2vec2.adapter"
    assert numpy_layer_drop(Wav2Vec2ForCTC(Wav2Vec2Config(layerdrop=0.0, **sizes))) is None


@pytest.mark.parametrize("masks", [{"mask_feature_prob": 0.3, "mask_feature_length": 2},
                                   {"mask_time_prob": 0.3, "mask_time_length": 2}])
def test_without_layerdrop_every_trainable_parameter_gets_a_gradient(tmp_path, masks):
    """Without LayerDrop, DDP is built without find_unused_parameters, and a trainable parameter that gets
    no gradient stops the run at the second step. SpecAugment's masked frame vector exists with feature
    masking alone but is used only by time masking: it trained nowhere and stopped DDP ("Expected to have
    finished reduction in the prior iteration")."""
    from asr.models import build
    from asr.text import CharVocab

    cfg = tiny_ctc_config(tmp_path)
    for k, v in masks.items():
        setattr(cfg.model, k, v)
    model = build(cfg.model, CharVocab.build(["ab c"])).model.train()
    assert model.config.layerdrop == 0 and model.wav2vec2.masked_spec_embed is not None
    model(input_values=torch.randn(2, 16000)).logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# ---------------------------------------------------------------------------------------
# Stop and resume.

MAX_STEPS = 10


def resume_config(out: Path, num_workers: int = 1):
    """Dropout and SpecAugment on (each rank restores its own random streams), LayerDrop on (2 layers at 0.2:
    step 8 skips one; the draws come from the step), batches of 2 per rank (8 global batches an epoch: the
    run crosses an epoch), an evaluation mid-run, `num_workers` loader workers per rank (the default config
    has 1)."""
    cfg = tiny_ctc_config(out, max_steps=MAX_STEPS, log_every=1, save_every=0, eval_every=5, keep_last=5,
                          warmup_steps=2)
    m = cfg.model
    m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.feat_proj_dropout = m.final_dropout = 0.1
    m.mask_time_prob, m.mask_time_length = 0.3, 2
    m.num_layers, m.layerdrop = 2, 0.2
    cfg.data.batch_size = 2
    cfg.data.num_workers = num_workers
    cfg.eval.at_start = False
    cfg.eval.batch_size = 3  # uneven shards: 8 clips over 2 ranks in batches of 3
    return cfg


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    log = out / "train.log"
    pattern = re.compile(rf"^\S+ \S+ step {step}/", re.M)
    deadline = time.monotonic() + timeout
    while not (log.is_file() and pattern.search(log.read_text(encoding="utf-8", errors="replace"))):
        assert proc.poll() is None, f"launcher exited ({proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"timed out waiting for step {step}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    out = root / "run"
    launch(write_exp(resume_config(out), root / "exp.toml"), root / "logs", 2)
    return out


@pytest.mark.parametrize("num_workers", [
    0,
    1,
])
def test_stopped_and_resumed_two_rank_run_equals_uninterrupted(uninterrupted, tmp_path, num_workers):
    """Stopped by SIGTERM to torchrun, which signals each rank's process group (data-loader workers
    included); the uninterrupted run had 1 worker per rank (the loader's results do not depend on it)."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    exp = write_exp(resume_config(out, num_workers), tmp_path / "exp.toml")
    p = start(torchrun(2, logs) + ["--exp", str(exp)], logs)
    wait_for_step(out, 3, p)
    p.send_signal(signal.SIGTERM)  # a pre-empted job: torchrun passes it on to both ranks
    launcher = finish(p, logs)
    log = (out / "train.log").read_text(encoding="utf-8")
    m = re.search(r"stopped by signal 15 at step (\d+); checkpoint saved", log)
    assert m, launcher[-3000:] + rank_output(logs)
    stopped = int(m.group(1))
    assert 3 <= stopped < MAX_STEPS
    assert (out / "checkpoints" / f"step-{stopped:06d}" / "model.pt").is_file()

    launch(exp, logs, 2)  # the same command again
    log = (out / "train.log").read_text(encoding="utf-8")
    assert re.search(rf"resumed from \S+step-{stopped:06d} \(step {stopped}\)", log)
    a = final_params(uninterrupted / "checkpoints" / f"step-{MAX_STEPS:06d}")
    b = final_params(out / "checkpoints" / f"step-{MAX_STEPS:06d}")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"

    # The checkpoint holds each rank's random state; the ranks' streams are their own.
    trainer = torch.load(out / "checkpoints" / f"step-{stopped:06d}" / "trainer.pt", weights_only=False)
    assert len(trainer["rng"]) == 2

    # Only rank 0 logs and writes: every step is logged once over both launches, rank 1 printed nothing,
    # and each launch wrote one TensorBoard file.
    steps = [int(s) for s in re.findall(r"^\S+ \S+ step (\d+)/", log, re.M)]
    assert steps == list(range(1, MAX_STEPS + 1))
    assert re.search(r"^step 1/", rank_stdout(logs, 0), re.M)
    own = [line for line in rank_stdout(logs, 1).splitlines() if not line.startswith("[Gloo] ")]  # gloo's banner
    assert own == []
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
    assert (out / "best" / "config.json").is_file() and (out / "final" / "config.json").is_file()


def test_two_rank_evaluation_is_sharded_and_gathered(uninterrupted):
    """Each evaluation scored all 8 dev clips once (4 per rank, gathered on every rank), in set order."""
    dev = [r["path"].rsplit(".", 1)[0] for r in csv.DictReader(open(REPO / "tests/fixtures/cv-tr/dev.tsv",
                                                                    encoding="utf-8"), delimiter="\t")]
    for step in (5, 10):
        metrics = read_json(uninterrupted / "eval" / f"step-{step:06d}.json")
        assert metrics["n"] == 8 and metrics["failed"] == 0
        with open(uninterrupted / "eval" / f"step-{step:06d}.tsv", encoding="utf-8", newline="") as f:
            ids = [r["id"] for r in csv.DictReader(f, delimiter="\t")]
        assert ids == [f"tr/{stem}" for stem in dev]
    results = read_json(uninterrupted / "results.json")
    assert results["eval"]["tr"]["n"] == 8
