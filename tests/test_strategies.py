"""Fine-tuning strategies in the training loop (issue 6): trainable/frozen patterns, per-group learning rates,
LoRA (merged export, exact resume, checkpoints of trainable parameters only, --eval-only), several evaluation
sets, CTC decoding settings side by side (greedy, beam, beam + LM) and Whisper prompts. Tiny scratch models
on the fixture corpus, on CPU."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from asr.config import EvalSetConfig, SourceConfig, TrainConfig, validate
from asr.data import AudioDataset, collate
from asr.models import model_inputs, select_parameters
from asr.experiment import EXPORT_INFO, Log, prepare, seed_everything
from asr.optim import lr_lambda, make_optimizer
from asr.train import train

from helpers import (FIXTURE, final_params, needs_whisper_base, read_json, read_tsv, scalars, tiny_ctc_config,
                     tiny_whisper_config, write_exp)

CPU = torch.device("cpu")


def initial_bundle(cfg, folder: Path, run_dir: Path | None = None):
    """The model as train() sets it up before its first step (same seed, same parameter selection), in a
    scratch folder (with the run's CTC vocabulary, when given)."""
    cfg = copy.deepcopy(cfg)
    cfg.run.out_dir = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if run_dir is not None and (run_dir / "vocab").is_dir():
        shutil.copytree(run_dir / "vocab", folder / "vocab", dirs_exist_ok=True)
    seed_everything(cfg.run.seed)
    bundle, data = prepare(cfg, folder, Log(None))
    select_parameters(bundle, cfg.train, cfg.lora)
    return bundle, data


def a_batch(bundle, utts, n: int = 4) -> dict:
    dataset = AudioDataset(utts, 16000)
    return collate([dataset[i] for i in range(min(n, len(utts)))])


def logits_of(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def safetensors_of(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def eval_only(exp: Path, *args: str) -> int:
    import run

    return run.main(["--exp", str(exp), "--eval-only", *args])


# ---------------------------------------------------------------------------------------
# train.trainable / train.frozen, the parameter summary, train.lr_scale.


TRAINABLE = [r"encoder\.layers\.0\.", r"lm_head"]
FROZEN = [r"lm_head\.bias$", r"layer_norm"]


@pytest.fixture(scope="module")
def patterns_run(tmp_path_factory):
    """Only the transformer layer and the head train, minus the head's bias and the layer norms; weight decay
    on, so a frozen parameter that reached the optimizer would move."""
    out = tmp_path_factory.mktemp("patterns") / "run"
    cfg = tiny_ctc_config(out, max_steps=3, warmup_steps=0, schedule="constant", weight_decay=0.1,
                          trainable=list(TRAINABLE), frozen=list(FROZEN))
    train(cfg, fresh=True)
    return cfg, out


def test_frozen_parameters_stay_bit_identical(patterns_run, tmp_path):
    cfg, out = patterns_run
    bundle, _ = initial_bundle(cfg, tmp_path / "init", out)
    init = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    want = {n for n in init if any(re.search(t, n) for t in TRAINABLE) and not any(re.search(f, n) for f in FROZEN)}
    assert trainable == want and "lm_head.weight" in trainable and "lm_head.bias" not in trainable
    final = final_params(out / "checkpoints" / "step-000003")
    frozen = set(init) - trainable
    assert len(frozen) > 10
    moved = sorted(n for n in frozen if not torch.equal(final[n], init[n]))
    assert not moved, f"frozen parameters changed: {moved[:5]}"
    still = sorted(n for n in trainable if torch.equal(final[n], init[n]))
    assert not still, f"trainable parameters did not change: {still[:5]}"
    # The exported final/ holds the same weights.
    exported = safetensors_of(out / "final")
    assert all(torch.equal(exported[n], final[n]) for n in init)


def test_parameter_summary_at_start(patterns_run, tmp_path):
    cfg, out = patterns_run
    log = (out / "train.log").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(log) if re.search(r"module +trainable +total$", line))
    rows = {}
    for line in log[start + 1:]:
        m = re.match(r"^(\S+) +([0-9,]+) +([0-9,]+)", line)
        assert m, line
        rows[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
        if m.group(1) == "all":
            break
    assert start < next(i for i, line in enumerate(log) if "training ctc model" in line)  # printed at start
    bundle, _ = initial_bundle(cfg, tmp_path / "init", out)
    want: dict = {}
    for name, p in bundle.model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        t, n = want.get(key, (0, 0))
        want[key] = (t + (p.numel() if p.requires_grad else 0), n + p.numel())
    all_t, all_n = rows.pop("all")
    assert rows == want
    assert set(rows) == {"wav2vec2.feature_extractor", "wav2vec2.feature_projection", "wav2vec2.encoder", "lm_head"}
    assert (all_t, all_n) == (sum(t for t, _ in rows.values()), sum(n for _, n in rows.values()))
    assert all_n == sum(p.numel() for p in bundle.model.parameters())
    assert 0 < all_t < all_n and rows["wav2vec2.feature_extractor"][0] == 0
    assert rows["lm_head"] == (bundle.model.lm_head.weight.numel(), bundle.model.lm_head.weight.numel()
                               + bundle.model.lm_head.bias.numel())


def test_lr_scale_gives_matching_parameters_their_own_learning_rate(tmp_path):
    """One Adam step moves each parameter element by about its learning rate (the first step's update is
    lr * g / |g|): the head by 10x the rest. The saved optimizer holds both rates."""
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out, max_steps=1, lr=1e-3, warmup_steps=0, schedule="constant", clip_grad=0.0,
                          lr_scale={"lm_head": 10.0})
    cfg.eval.at_start = False
    train(cfg, fresh=True)
    bundle, _ = initial_bundle(cfg, tmp_path / "init", out)
    init = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    final = final_params(out / "checkpoints" / "step-000001")
    step = {n: float((final[n] - init[n]).abs().max()) for n in init}
    assert step["lm_head.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert step["lm_head.bias"] == pytest.approx(1e-2, rel=1e-3)
    for name in ("wav2vec2.encoder.layers.0.attention.q_proj.weight", "wav2vec2.feature_projection.projection.weight"):
        assert step[name] == pytest.approx(1e-3, rel=1e-3), name
    groups = torch.load(out / "checkpoints" / "step-000001" / "optimizer.pt", weights_only=True)["param_groups"]
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-3, 1e-2])


def test_resume_with_other_learning_rate_groups_fails_in_one_line(tmp_path, capsys):
    import run

    cfg = tiny_ctc_config(tmp_path / "run", max_steps=1)
    cfg.eval.at_start = False
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp)]) == 0
    capsys.readouterr()
    assert run.main(["--exp", str(exp), "--set", "train.max_steps=2", "--set", 'train.lr_scale={"lm_head" = 10.0}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume ") and "train.lr_scale.lm_head" in err and "\n" not in err


def test_make_optimizer_groups_follow_the_schedule():
    """First matching pattern counts; weight decay only on matrices; LambdaLR scales each group's own rate."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
            self.head = torch.nn.Linear(3, 2)

    net = Net()
    tc = TrainConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, max_steps=10, schedule="linear",
                     lr_scale={"head": 10.0, r"enc\.1|head\.bias": 0.5})
    opt = make_optimizer(net, tc)
    names = {id(p): n for n, p in net.named_parameters()}
    per_param = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert per_param == {"enc.0.weight": (1e-3, 0.01), "enc.0.bias": (1e-3, 0.0),
                         "enc.1.weight": (5e-4, 0.01), "enc.1.bias": (5e-4, 0.0),
                         "head.weight": (1e-2, 0.01), "head.bias": (1e-2, 0.0)}  # "head" matched first
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc))
    f = lr_lambda(tc)
    for step in range(6):
        lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lrs["head.weight"] == pytest.approx(1e-2 * f(step))
        assert lrs["enc.1.bias"] == pytest.approx(5e-4 * f(step))
        assert lrs["enc.0.weight"] == pytest.approx(1e-3 * f(step))
        opt.step()
        sched.step()


@needs_whisper_base
def test_whisper_encoder_only_keeps_fixed_parameters_fixed(tmp_path):
    """train.trainable = ["model.encoder"]: the decoder is frozen, and the encoder's sinusoidal position table
    (which Whisper never trains) stays fixed; the summary counts the encoder as full fine-tuning does."""
    out = tmp_path / "run"
    cfg = tiny_whisper_config(out, max_steps=2, lr=1e-2, warmup_steps=0, trainable=["model.encoder"])
    cfg.eval.at_start = False
    train(cfg, fresh=True)
    bundle, _ = initial_bundle(cfg, tmp_path / "init")
    init = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert "model.encoder.embed_positions.weight" not in trainable
    assert trainable == {n for n in init if n.startswith("model.encoder.") and "embed_positions" not in n}
    final = final_params(out / "checkpoints" / "step-000002")
    assert [n for n in init if n not in trainable and not torch.equal(final[n], init[n])] == []
    assert [n for n in trainable if torch.equal(final[n], init[n])] == []
    full = initial_bundle(tiny_whisper_config(tmp_path / "full"), tmp_path / "full")[0]
    encoder_trainable = sum(p.numel() for n, p in full.model.named_parameters()
                            if p.requires_grad and n.startswith("model.encoder."))
    log = (out / "train.log").read_text(encoding="utf-8")
    m = re.search(r"^model\.encoder +([0-9,]+) +([0-9,]+)$", log, re.M)
    assert m and int(m.group(1).replace(",", "")) == encoder_trainable < int(m.group(2).replace(",", ""))
    assert re.search(r"^model\.decoder +0 +[0-9,]+$", log, re.M)


def test_pattern_matching_nothing_fails_at_start(tmp_path, capsys):
    import run

    cfg = tiny_ctc_config(tmp_path / "run")
    exp = write_exp(cfg, tmp_path / "exp.toml")
    for key in ("train.trainable", "train.frozen"):
        assert run.main(["--exp", str(exp), "--fresh", "--set", f'{key}=["lm_head", "no_such_module"]']) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}: pattern 'no_such_module' matches no parameter") and "\n" not in err
        assert not (tmp_path / "run" / "checkpoints").exists()
    assert run.main(["--exp", str(exp), "--set", "lora.rank=2", "--set", 'lora.targets=["no_such_linear"]']) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lora.targets:") and "\n" not in err


# ---------------------------------------------------------------------------------------
# LoRA on a tiny Wav2Vec2 CTC model.


def lora_ctc_config(out, **train_kw):
    kw = dict(max_steps=6, lr=5e-3, warmup_steps=0, schedule="constant", eval_every=3, save_every=3, keep_last=5)
    kw.update(train_kw)
    cfg = tiny_ctc_config(out, **kw)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 8.0, [r"(q_proj|v_proj)$"]
    validate(cfg)
    return cfg


def is_adapter_or_head(name: str) -> bool:
    return ".lora_" in name or name.startswith("lm_head.")


@pytest.fixture(scope="module")
def lora_ctc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_ctc") / "run"
    cfg = lora_ctc_config(out)
    cfg.eval.at_start = False  # the best step then has a training checkpoint
    results = train(cfg, fresh=True)
    return cfg, out, results


def test_lora_ctc_trains_only_adapters_and_head(lora_ctc_run, tmp_path):
    cfg, out, _ = lora_ctc_run
    bundle, _ = initial_bundle(cfg, tmp_path / "init", out)
    init = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in bundle.model.named_parameters() if is_adapter_or_head(n)}
    assert sum(".lora_" in n for n in trainable) == 4  # q_proj and v_proj of the one layer, A and B each
    final = final_params(out / "checkpoints" / "step-000006")
    assert final.keys() == init.keys()
    moved = [k for k in init if not is_adapter_or_head(k) and not torch.equal(final[k], init[k])]
    assert not moved, f"frozen base weights changed: {moved[:5]}"
    still = [k for k in init if is_adapter_or_head(k) and torch.equal(final[k], init[k])]
    assert not still, f"adapters or head did not train: {still}"


def test_lora_ctc_export_is_merged_and_gives_the_same_logits(lora_ctc_run, tmp_path):
    from transformers import AutoModelForCTC

    cfg, out, _ = lora_ctc_run
    exported = safetensors_of(out / "final")
    assert not any("lora_" in k for k in exported)
    bundle, data = initial_bundle(cfg, tmp_path / "init", out)
    base_keys = {k for k in bundle.model.state_dict() if ".lora_" not in k}
    assert set(exported) == base_keys
    bundle.model.load_state_dict(final_params(out / "checkpoints" / "step-000006"))
    plain = AutoModelForCTC.from_pretrained(str(out / "final"))
    inputs = model_inputs(bundle, a_batch(bundle, data.eval_sets["tr"]), CPU)
    lora_logits = logits_of(bundle.model, inputs)
    merged_logits = logits_of(plain, inputs)
    assert (lora_logits - merged_logits).abs().max() < 1e-5
    # The adapters matter: without them (B = 0) the logits are others.
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()
    assert (logits_of(bundle.model, inputs) - lora_logits).abs().max() > 1e-4


def test_lora_ctc_final_folder_runs_in_pipeline(lora_ctc_run):
    """final/ transcribes each dev clip in transformers' pipeline as the unmerged model did in training."""
    import transformers

    from asr.audio import load_audio

    _, out, _ = lora_ctc_run
    asr = transformers.pipeline("automatic-speech-recognition", model=str(out / "final"), device="cpu")
    rows = read_tsv(out / "eval" / "step-000006.tsv")
    assert len(rows) == 8
    for r in rows[:3]:
        clip = FIXTURE / "clips" / (r["id"].split("/", 1)[1] + ".mp3")
        text = asr({"raw": load_audio(clip).numpy(), "sampling_rate": 16000})["text"]
        assert " ".join(text.split()) == r["hypothesis"], r["id"]


def test_lora_ctc_eval_only_checkpoint_and_best_agree(lora_ctc_run, tmp_path):
    cfg, out, results = lora_ctc_run
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)
    cfg = lora_ctc_config(run_dir)
    exp = write_exp(cfg, tmp_path / "exp.toml")
    best = results["best"]["step"]
    assert best in (3, 6) and read_json(run_dir / "best" / EXPORT_INFO)["step"] == best
    written = run_dir / "eval" / f"step-{best:06d}.dev.greedy.json"
    got = {}
    for which, folder in (("checkpoint", run_dir / "checkpoints" / f"step-{best:06d}"), ("best", run_dir / "best")):
        assert eval_only(exp, "--checkpoint", str(folder)) == 0
        got[which] = (read_json(written), [r["hypothesis"] for r in read_tsv(written.with_suffix(".tsv"))])
        written.unlink()
    (a, hyps_a), (b, hyps_b) = got["checkpoint"], got["best"]
    training = read_json(run_dir / "eval" / f"step-{best:06d}.json")
    for key in ("wer", "cer", "wer_ortho", "cer_ortho", "n"):
        assert a[key] == b[key] == training[key], key
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert hyps_a == hyps_b == [r["hypothesis"] for r in read_tsv(run_dir / "eval" / f"step-{best:06d}.tsv")]


def lora_resume_config(out, max_steps, trainable_only):
    """LoRA with dropout in the adapters and the model, grad accumulation: the resumed run has RNG to restore."""
    cfg = lora_ctc_config(out, max_steps=max_steps, grad_accum=2, eval_every=3, save_every=0, log_every=2,
                          save_trainable_only=trainable_only)
    cfg.lora.dropout = 0.1
    m = cfg.model
    m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.final_dropout = 0.1
    cfg.data.batch_size = 4
    return cfg


@pytest.mark.parametrize("trainable_only", [False, True], ids=["full", "trainable_only"])
def test_lora_stop_and_resume_is_exact(tmp_path, trainable_only):
    train(lora_resume_config(tmp_path / "a", 7, trainable_only), fresh=True)
    train(lora_resume_config(tmp_path / "b", 4, trainable_only), fresh=True)
    results = train(lora_resume_config(tmp_path / "b", 7, trainable_only))
    assert results["steps"] == 7
    assert re.search(r"resumed from .*step-000004", (tmp_path / "b" / "train.log").read_text(encoding="utf-8"))
    a = final_params(tmp_path / "a" / "checkpoints" / "step-000007")
    b = final_params(tmp_path / "b" / "checkpoints" / "step-000007")
    assert_same_tensors(a, b)
    # The full weights (base + merged adapters) agree too: the base rebuilt on resume is the same.
    assert_same_tensors(safetensors_of(tmp_path / "a" / "final"), safetensors_of(tmp_path / "b" / "final"))
    if trainable_only:
        bundle, _ = initial_bundle(lora_resume_config(tmp_path / "x", 7, True), tmp_path / "init", tmp_path / "a")
        trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
        assert set(a) == trainable  # adapters and head only
        assert len(a) * 5 < len(bundle.model.state_dict())
        assert not any(torch.equal(a[k], bundle.model.state_dict()[k]) for k in a)  # they trained
    else:
        assert any(".lora_" in k for k in a) and "wav2vec2.encoder.layers.0.attention.q_proj.weight" in a
    # The adapters really trained away from the step-4 state (the comparison above is not of idle weights).
    step4 = final_params(tmp_path / "b" / "checkpoints" / "step-000004")
    assert not torch.equal(step4["lm_head.weight"], b["lm_head.weight"])


def test_eval_only_with_a_trainable_only_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = lora_ctc_config(out, max_steps=3, save_trainable_only=True, eval_every=3)
    train(cfg, fresh=True)
    assert len(final_params(out / "checkpoints" / "step-000003")) == 6
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert eval_only(exp) == 0
    got = read_json(out / "eval" / "step-000003.dev.greedy.json")
    want = read_json(out / "eval" / "step-000003.json")
    for key in ("wer", "cer", "n"):
        assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------
# LoRA on a tiny scratch Whisper (the shared whisper-base config and tokenizer).


@needs_whisper_base
def test_lora_whisper_adapters_train_and_export_merges(tmp_path):
    import transformers
    from transformers import WhisperForConditionalGeneration

    from asr.audio import load_audio

    out = tmp_path / "run"
    cfg = tiny_whisper_config(out, max_steps=3, lr=1e-2, warmup_steps=0, eval_every=3)
    cfg.lora.rank, cfg.lora.alpha = 4, 8.0
    cfg.decode.max_new_tokens = 5
    validate(cfg)
    train(cfg, fresh=True)
    bundle, data = initial_bundle(cfg, tmp_path / "init")
    init = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {re.sub(r"\.lora_[AB]$", "", n) for n in trainable} == {
        m for m, _ in bundle.model.named_modules() if re.search(r"(q_proj|v_proj)$", m)}
    final = final_params(out / "checkpoints" / "step-000003")
    assert final.keys() == init.keys()
    moved = [k for k in init if ".lora_" not in k and not torch.equal(final[k], init[k])]
    assert not moved, f"frozen base weights changed: {moved[:5]}"
    assert all(not torch.equal(final[k], init[k]) for k in init if ".lora_" in k)

    exported = safetensors_of(out / "final")
    assert not any("lora_" in k for k in exported)
    bundle.model.load_state_dict(final)
    plain = WhisperForConditionalGeneration.from_pretrained(str(out / "final"))
    inputs = model_inputs(bundle, a_batch(bundle, data.eval_sets["tr"], 2), CPU)
    assert (logits_of(bundle.model, inputs) - logits_of(plain, inputs)).abs().max() < 1e-5

    asr = transformers.pipeline("automatic-speech-recognition", model=str(out / "final"), device="cpu")
    rows = read_tsv(out / "eval" / "step-000003.tsv")
    assert len(rows) == 2
    for r in rows:
        clip = FIXTURE / "clips" / (r["id"].split("/", 1)[1] + ".mp3")
        # num_beams 1: the pipeline's own default is a 5-beam search, our evaluation decodes greedily.
        text = asr({"raw": load_audio(clip).numpy(), "sampling_rate": 16000},
                   generate_kwargs={"max_new_tokens": 5, "num_beams": 1})
        assert text["text"].strip() == r["hypothesis"], r["id"]

    # --eval-only from the training checkpoint (adapters applied again) and from the merged final/.
    exp = write_exp(cfg, tmp_path / "exp.toml")
    written = out / "eval" / "step-000003.dev.greedy.json"
    for folder in (out / "checkpoints" / "step-000003", out / "final"):
        assert eval_only(exp, "--checkpoint", str(folder)) == 0
        got, want = read_json(written), read_json(out / "eval" / "step-000003.json")
        assert (got["wer"], got["cer"], got["n"]) == (want["wer"], want["cer"], want["n"]), folder.name
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert [r["hypothesis"] for r in read_tsv(written.with_suffix(".tsv"))] == [r["hypothesis"] for r in rows]
        written.unlink()


# ---------------------------------------------------------------------------------------
# Several evaluation sets.


def two_set_config(out, second: Path, max_steps: int = 4):
    cfg = tiny_ctc_config(out, max_steps=max_steps, eval_every=2, save_every=2, keep_last=5)
    cfg.data.sources.append(SourceConfig(kind="common_voice", path=str(second), language="de", train="", dev="dev",
                                         test="test"))
    cfg.eval.sets = [EvalSetConfig(source="tr", split="dev"), EvalSetConfig(source="de", split="test", name="de")]
    validate(cfg)
    return cfg


def test_eval_sets_files_tags_and_best_on_the_first(tmp_path, monkeypatch):
    import asr.evaluation

    second = tmp_path / "cv-de"
    shutil.copytree(FIXTURE, second)
    # WER per evaluation, (first set, second set) at steps 0, 2, 4: the first set is best at step 2, the
    # second at step 4. The real evaluation runs; only its WER is replaced.
    planned = [80.0, 90.0, 50.0, 70.0, 60.0, 10.0]
    real = asr.evaluation.evaluate

    def evaluate(bundle, utts, *args, **kwargs):
        metrics, rows = real(bundle, utts, *args, **kwargs)
        metrics["wer"] = planned.pop(0)
        return metrics, rows

    monkeypatch.setattr(asr.evaluation, "evaluate", evaluate)
    out = tmp_path / "run"
    results = train(two_set_config(out, second), fresh=True)
    assert planned == []
    assert results["best"]["step"] == 2 and results["best"]["wer"] == 50.0
    assert read_json(out / "best" / EXPORT_INFO)["step"] == 2
    for step, (w1, w2) in ((0, (80, 90)), (2, (50, 70)), (4, (60, 10))):
        first = read_json(out / "eval" / f"step-{step:06d}.json")
        second_m = read_json(out / "eval" / f"step-{step:06d}.de.json")
        assert (first["set"], first["wer"], second_m["set"], second_m["wer"]) == ("tr-dev", w1, "de", w2)
        assert first["n"] == second_m["n"] == 8
    ids_first = {r["id"] for r in read_tsv(out / "eval" / "step-000004.tsv")}
    ids_second = {r["id"] for r in read_tsv(out / "eval" / "step-000004.de.tsv")}
    assert all(i.startswith("tr/") for i in ids_first) and all(i.startswith("de/") for i in ids_second)
    test_clips = {r["path"].rsplit(".", 1)[0] for r in read_tsv(FIXTURE / "test.tsv")}
    assert {i.split("/", 1)[1] for i in ids_second} == test_clips
    tags = scalars(out)
    assert tags["eval/tr-dev/wer"] == [(0, 80.0), (2, 50.0), (4, 60.0)]
    assert tags["eval/de/wer"] == [(0, 90.0), (2, 70.0), (4, 10.0)]
    assert "eval/tr/wer" not in tags
    assert set(results["eval"]) == {"tr-dev", "de"}
    report = read_json(out / "data_report.json")
    assert "de/train" not in report and report["de/test"]["kept"] == 8  # evaluation-only source


def test_eval_set_with_unknown_source_is_a_config_error(tmp_path, capsys):
    import run

    second = tmp_path / "cv-de"
    second.mkdir()
    exp = write_exp(two_set_config(tmp_path / "run", second), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--set", "eval.sets.1.source=xx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.sets.1.source: 'xx' is not a data source" in err and "\n" not in err
    assert run.main(["--exp", str(exp), "--set", "eval.sets.1.split=valid"]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.sets.1.split" in err and "\n" not in err
    # Two sets of one name would be one set in the results, the files and TensorBoard.
    assert run.main(["--exp", str(exp), "--set", "eval.sets.1.name=tr-dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("eval.sets.1.name: 'tr-dev' names an earlier evaluation set too") and "\n" not in err
    # A split the source does not have (the evaluation-only source has no training split): one line, exit 1.
    assert run.main(["--exp", str(exp), "--set", "eval.sets.1.split=train"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: evaluation set 'de': data source 'de' has no train split"


def test_eval_only_files_name_each_sets_own_split(tmp_path):
    """--eval-only with eval.sets: each file carries the split its set read (eval.split is not used)."""
    second = tmp_path / "cv-de"
    shutil.copytree(FIXTURE, second)
    out = tmp_path / "run"
    cfg = two_set_config(out, second)
    cfg.eval.sets = [EvalSetConfig(source="tr", split="test"), EvalSetConfig(source="de", split="dev", name="de")]
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert eval_only(exp) == 0
    first = read_json(out / "eval" / "step-000000.test.greedy.json")
    second_m = read_json(out / "eval" / "step-000000.dev.greedy.de.json")
    assert (first["set"], first["split"], second_m["set"], second_m["split"]) == ("tr-test", "test", "de", "dev")
    clips = {s: {r["path"].rsplit(".", 1)[0] for r in read_tsv(FIXTURE / f"{s}.tsv")} for s in ("dev", "test")}
    assert {r["id"].split("/", 1)[1] for r in read_tsv(out / "eval" / "step-000000.test.greedy.tsv")} == clips["test"]
    assert {r["id"].split("/", 1)[1] for r in read_tsv(out / "eval" / "step-000000.dev.greedy.de.tsv")} == clips["dev"]
    assert not list((out / "eval").glob("*.dev.greedy.json"))


@needs_whisper_base
def test_whisper_eval_only_source_keeps_the_training_language_for_export(tmp_path):
    """An evaluation-only source in another language (to watch forgetting) is decoded in its own language,
    and the exported model still transcribes the training language by default."""
    second = tmp_path / "cv-de"
    shutil.copytree(FIXTURE, second)
    out = tmp_path / "run"
    cfg = tiny_whisper_config(out, max_steps=1, eval_every=1)
    cfg.eval.at_start = False
    cfg.data.sources.append(SourceConfig(kind="common_voice", path=str(second), language="de", train="", dev="dev"))
    cfg.eval.sets = [EvalSetConfig(source="tr", split="dev"), EvalSetConfig(source="de", split="dev")]
    validate(cfg)
    train(cfg, fresh=True)
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(out / "final")).language == "tr"
    assert read_json(out / "eval" / "step-000001.de-dev.json")["n"] == 2


# ---------------------------------------------------------------------------------------
# CTC decoding settings from one run: greedy, beam, beam + LM.


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    """Two steps at a tiny learning rate: the near-random output exercises every token (a trained tiny model
    outputs blanks only), and close scores are where beam search and greedy could part."""
    import asr.lm

    root = tmp_path_factory.mktemp("decode")
    out = root / "run"
    cfg = tiny_ctc_config(out, max_steps=2, lr=1e-5, warmup_steps=0)
    train(cfg, fresh=True)
    exp = write_exp(cfg, root / "exp.toml")
    arpa = root / "lm.arpa"
    assert asr.lm.main(["--exp", str(exp), "--out", str(arpa)]) == 0
    return exp, out, arpa


def test_decoding_settings_write_their_own_files(decode_run):
    exp, out, arpa = decode_run
    assert eval_only(exp) == 0
    assert eval_only(exp, "--set", "decode.method=beam", "--set", "decode.beam_size=4") == 0
    assert eval_only(exp, "--set", "decode.method=beam", "--set", f"decode.lm={arpa}") == 0
    got = {}
    for tag in ("greedy", "beam4", "beam4-lm"):
        m = read_json(out / "eval" / f"step-000002.dev.{tag}.json")
        assert m["decode"] == tag and m["step"] == 2 and m["n"] == 8
        for key in ("wer", "cer", "wer_ortho", "cer_ortho"):
            assert math.isfinite(m[key])
        rows = read_tsv(out / "eval" / f"step-000002.dev.{tag}.tsv")
        assert len(rows) == 8 and (out / "eval" / f"step-000002.dev.{tag}.worst.tsv").is_file()
        got[tag] = (m, [r["hypothesis"] for r in rows])
    assert got["greedy"][1] != got["beam4"][1]  # beam search finds other labellings
    assert got["greedy"][0]["cer"] != got["beam4"][0]["cer"]
    # The greedy file equals training's own evaluation at that step.
    assert got["greedy"][1] == [r["hypothesis"] for r in read_tsv(out / "eval" / "step-000002.tsv")]


def test_lm_is_used_in_beam_search(decode_run):
    """With a large word insertion bonus (applied only through the LM), the search ends words more often."""
    exp, out, arpa = decode_run
    assert eval_only(exp, "--set", "decode.method=beam") == 0
    plain = [r["hypothesis"] for r in read_tsv(out / "eval" / "step-000002.dev.beam4.tsv")]
    assert eval_only(exp, "--set", "decode.method=beam", "--set", f"decode.lm={arpa}", "--set",
                     "decode.lm_beta=8") == 0
    fused = [r["hypothesis"] for r in read_tsv(out / "eval" / "step-000002.dev.beam4-lm.tsv")]
    assert fused != plain
    assert sum(len(h.split()) for h in fused) > sum(len(h.split()) for h in plain)


def test_beam_width_1_is_greedy_on_a_trained_model(decode_run):
    exp, out, _ = decode_run
    assert eval_only(exp, "--set", "decode.method=beam", "--set", "decode.beam_size=1") == 0
    beam1 = [r["hypothesis"] for r in read_tsv(out / "eval" / "step-000002.dev.beam1.tsv")]
    greedy = [r["hypothesis"] for r in read_tsv(out / "eval" / "step-000002.tsv")]
    assert any(len(h) > 10 for h in greedy)
    assert beam1 == greedy


def test_missing_lm_file_is_a_one_line_error(decode_run, tmp_path, capsys):
    exp, out, _ = decode_run
    assert eval_only(exp, "--set", "decode.method=beam", "--set", f"decode.lm={tmp_path / 'none.arpa'}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: decode.lm:") and "none.arpa" in err and "\n" not in err
    bad = tmp_path / "bad.arpa"
    bad.write_text("not an arpa file\n", encoding="utf-8")
    assert eval_only(exp, "--set", "decode.method=beam", "--set", f"decode.lm={bad}") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: decode.lm:") and "\n" not in err


# ---------------------------------------------------------------------------------------
# Whisper prompts.


@needs_whisper_base
def test_whisper_prompt_is_placed_before_the_prefix(tmp_path, monkeypatch):
    from transformers import GenerationMixin

    from asr.decode import whisper_generate

    cfg = tiny_whisper_config(tmp_path / "run")
    bundle, data = initial_bundle(cfg, tmp_path / "init")
    batch = a_batch(bundle, data.eval_sets["tr"], 2)
    tok = bundle.tokenizer
    answer = tok.encode(" merhaba dünya", add_special_tokens=False) + [tok.eos_token_id]
    seen = []

    def generate(model, **kwargs):
        ids = kwargs["decoder_input_ids"]
        seen.append((ids.tolist(), kwargs["generation_config"].max_new_tokens))
        return torch.cat([ids, torch.tensor([answer] * ids.shape[0])], dim=1)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    prefix = bundle.prefix_tokens("tr")
    assert tok.convert_ids_to_tokens(prefix) == ["<|startoftranscript|>", "<|tr|>", "<|transcribe|>",
                                                 "<|notimestamps|>"]
    assert whisper_generate(bundle, batch, CPU, max_new_tokens=20) == [" merhaba dünya"] * 2
    assert seen[-1] == ([prefix] * 2, 20)
    texts = whisper_generate(bundle, batch, CPU, max_new_tokens=20, prompt="Ankara İzmir")
    assert texts == [" merhaba dünya"] * 2  # the prompt is not part of the transcript
    context = [tok.convert_tokens_to_ids("<|startofprev|>")] + tok.encode(" Ankara İzmir", add_special_tokens=False)
    assert seen[-1] == ([context + prefix] * 2, 20)
    assert tok.decode(seen[-1][0][0][1:len(context)]) == " Ankara İzmir"


@needs_whisper_base
def test_whisper_eval_only_with_a_prompt_writes_a_prompt_file(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_whisper_config(out, max_steps=1)
    cfg.eval.at_start = False
    train(cfg, fresh=True)
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert eval_only(exp) == 0
    assert eval_only(exp, "--set", "decode.prompt=Ankara İzmir Türkiye") == 0
    plain = read_json(out / "eval" / "step-000001.dev.greedy.json")
    prompted = read_json(out / "eval" / "step-000001.dev.greedy-prompt.json")
    assert prompted["decode"] == "greedy-prompt" and plain["decode"] == "greedy"
    assert prompted["n"] == plain["n"] == 2
    assert len(read_tsv(out / "eval" / "step-000001.dev.greedy-prompt.tsv")) == 2
