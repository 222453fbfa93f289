"""bf16 on the CPU: autocast forward, float32 weights, features and loss; exact resume; eval.precision; what
`auto` picks and why."""

from __future__ import annotations

import math
import re

import pytest
import torch

from asr import experiment
from asr.models import build, loss_step, model_inputs
from asr.train import train

from helpers import (faulty_grouped_bf16_conv1d, final_params, needs_whisper_base, read_json, read_tsv, same_clips_config, scalars, tiny_ctc_config,
                     tiny_whisper_config)


@pytest.mark.parametrize("family", ["ctc", pytest.param("whisper", marks=needs_whisper_base)])
def test_bf16_cpu_training_is_finite_falls_and_keeps_fp32_weights(tmp_path, family):
    make = tiny_ctc_config if family == "ctc" else tiny_whisper_config
    cfg = make(tmp_path / "run", max_steps=8, precision="bf16", save_every=8, schedule="constant", lr=3e-3)
    cfg.eval.at_start = False
    cfg.data.sources[0].train = "dev"  # 8 clips, one batch: the same batch every step, so the loss must fall
    cfg.data.batch_size = 8
    train(cfg, fresh=True)
    loss = [v for _, v in scalars(tmp_path / "run")["train/loss"]]
    assert len(loss) == 8 and all(math.isfinite(v) for v in loss)
    assert loss[-1] < 0.95 * loss[0], loss
    params = final_params(tmp_path / "run" / "checkpoints" / "step-000008")
    assert {v.dtype for v in params.values() if v.is_floating_point()} == {torch.float32}
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "training precision bf16 (train.precision = 'bf16')" in log
    assert "evaluation precision bf16 (train.precision = 'bf16')" in log


@pytest.mark.parametrize("family", ["ctc", pytest.param("whisper", marks=needs_whisper_base)])
def test_bf16_features_are_computed_in_fp32(tmp_path, family):
    """Under bf16 autocast the model gets exactly the float32 features (Whisper's log-mel has a matmul that
    autocast would run in bf16), and the loss is float32."""
    cfg = (tiny_ctc_config if family == "ctc" else tiny_whisper_config)(tmp_path)
    from asr.text import CharVocab

    bundle = build(cfg.model, CharVocab.build(["ab c"]), ["tr"])
    torch.manual_seed(0)
    audio = torch.randn(2, 16000) * torch.linspace(0.01, 3.0, 16000)
    labels = torch.tensor([[1, 2, 3], [2, 3, -100]]) if family == "ctc" else \
        torch.tensor([bundle.prefix_tokens("tr") + [400, 401, 402], bundle.prefix_tokens("tr") + [403, 404, -100]])
    batch = {"audio": audio, "audio_lengths": torch.tensor([16000, 12000]), "labels": labels,
             "label_lengths": (labels != -100).sum(1)}
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    bundle.model.register_forward_pre_hook(grab, with_kwargs=True)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    loss_fn = (lambda out, b: (out.logits.float().logsumexp(-1).sum(), 1))
    _, loss, _ = loss_step(bundle, bundle.model, batch, loss_fn, torch.device("cpu"), bf16)
    expected = model_inputs(bundle, batch, torch.device("cpu"))
    key = "input_features" if family == "whisper" else "input_values"
    assert seen[key].dtype == torch.float32 and torch.equal(seen[key], expected[key])
    assert loss.dtype == torch.float32


def test_bf16_resume_is_exact(tmp_path):
    """bf16: 5 steps then 3 more after a resume end with the weights of 8 uninterrupted steps."""
    def config(out, steps):
        cfg = tiny_ctc_config(out, max_steps=steps, precision="bf16", schedule="constant", save_every=0)
        cfg.model.hidden_dropout = cfg.model.mask_time_prob = 0.1
        cfg.data.batch_size = 4
        return cfg

    train(config(tmp_path / "a", 8), fresh=True)
    train(config(tmp_path / "b", 5), fresh=True)
    train(config(tmp_path / "b", 8))
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text(encoding="utf-8")
    a = final_params(tmp_path / "a" / "checkpoints" / "step-000008")
    b = final_params(tmp_path / "b" / "checkpoints" / "step-000008")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["ctc", pytest.param("whisper", marks=needs_whisper_base)])
def test_eval_precision(tmp_path, family):
    """eval.precision: bf16 training evaluated in fp32 scores and transcribes exactly as an fp32 run does (lr 0:
    the same weights); by default the evaluation runs in the training precision."""
    make = tiny_ctc_config if family == "ctc" else tiny_whisper_config
    evals = {}
    for name, train_p, eval_p in (("fp32", "fp32", ""), ("bf16", "bf16", ""), ("bf16-eval-fp32", "bf16", "fp32")):
        cfg = same_clips_config(make(tmp_path / name, precision=train_p))
        cfg.eval.precision = eval_p
        cfg.eval.at_start = False
        if family == "whisper":
            cfg.eval.max_utterances, cfg.decode.max_new_tokens = 3, 6
        train(cfg, fresh=True)
        evals[name] = (read_json(tmp_path / name / "eval" / "step-000001.json")["loss"],
                       [r["hypothesis"] for r in read_tsv(tmp_path / name / "eval" / "step-000001.tsv")])
    assert evals["bf16-eval-fp32"] == evals["fp32"]
    assert evals["bf16"][0] != evals["fp32"][0]
    log = (tmp_path / "bf16-eval-fp32" / "train.log").read_text(encoding="utf-8")
    assert "evaluation precision fp32 (eval.precision = 'fp32')" in log


def test_auto_on_cpu_picks_by_native_bf16_and_model_family_and_says_why(monkeypatch):
    from asr.experiment import choose_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(experiment, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    precision, why = choose_precision("auto", cpu, family="whisper")
    assert precision == "bf16" and "avx512_bf16" in why and "'fp32'" in why
    precision, why = choose_precision("auto", cpu, "eval.precision", family="ctc")
    assert precision == "fp32" and why.startswith("eval.precision = 'auto' for a CTC model") and "'bf16'" in why
    monkeypatch.setattr(experiment, "cpu_bf16_flags", lambda: [])
    for family in ("whisper", "ctc"):
        assert choose_precision("auto", cpu, family=family) == (
            "fp32", "train.precision = 'auto' on a CPU without native bf16")
    assert choose_precision("bf16", cpu, family="ctc") == ("bf16", "train.precision = 'bf16'")
    assert choose_precision("fp32", cpu, family="whisper") == ("fp32", "train.precision = 'fp32'")
    assert re.fullmatch(r"[a-z0-9_]*", "".join(experiment.cpu_bf16_flags()))


@pytest.mark.parametrize("family", ["ctc", "whisper"])
def test_a_default_run_trains_and_evaluates_in_autos_choice_for_its_family(tmp_path, family):
    """The default (`auto`) through a real run: the family reaches choose_precision for training and evaluation
    (on this machine: bf16 for Whisper where the CPU has native bf16, else fp32)."""
    from asr.experiment import choose_precision

    make = tiny_ctc_config if family == "ctc" else tiny_whisper_config
    cfg = make(tmp_path / "run", max_steps=1)
    assert cfg.train.precision == "auto" and cfg.eval.precision == ""
    cfg.eval.max_utterances, cfg.decode.max_new_tokens = 2, 4
    train(cfg, fresh=True)
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    precision, why = choose_precision("auto", torch.device("cpu"), family=family)
    assert f"training precision {precision} ({why})" in log
    assert f"evaluation precision {precision} ({why})" in log
    assert precision == ("bf16" if family == "whisper" and experiment.cpu_bf16_flags() else "fp32")


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("model", ["tiny_ctc", "demo", "tiny_whisper"])
def test_bf16_forward_agrees_with_fp32(tmp_path, model):
    """The whole model's bf16-autocast forward agrees with its float32 forward to bf16 rounding, after
    guard_bf16_convs as training and evaluation run it. torch 2.9's oneDNN gets a small Wav2Vec2's grouped
    positional convolution (2 to 12 input channels per group, 8 to 128 taps) wrong in bf16 on CPUs with native
    bf16: there the logits differed by more than their own size, and the demo model trained in bf16 stayed blank."""
    from asr.config import load_config
    from asr.experiment import guard_bf16_convs
    from asr.text import CharVocab

    if model == "demo":
        cfg = load_config("experiments/demo.toml")
    else:
        cfg = (tiny_ctc_config if model == "tiny_ctc" else tiny_whisper_config)(tmp_path)
    bundle = build(cfg.model, CharVocab.build(["abc def"]), ["tr"])
    bundle.model.eval()
    torch.manual_seed(0)
    audio = torch.randn(2, 32000) * 0.1
    batch = {"audio": audio, "audio_lengths": torch.tensor([32000, 24000]),
             "labels": torch.tensor([bundle.prefix_tokens("tr") + [400, 401]] * 2) if model == "tiny_whisper" else None}
    inputs = model_inputs(bundle, batch, torch.device("cpu"))
    guard_bf16_convs(bundle.model, torch.device("cpu"), lambda line: None)
    with torch.no_grad():
        fp32 = bundle.model(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = bundle.model(**inputs).logits
    assert _relative_error(bf16, fp32) < 0.05


def test_guard_runs_a_wrong_bf16_conv_in_fp32(monkeypatch):
    """Where a bf16 convolution is wrong (here made so: grouped bf16 convolutions return garbage), the guard finds
    it by shape, runs it in float32 under autocast and names it; other convolutions are left alone; the parameters
    (a weight-normed conv, as Wav2Vec2's) keep their names; a copy and a second guard keep working."""
    import copy

    import torch.nn.functional as F

    from asr.experiment import guard_bf16_convs

    monkeypatch.setattr(F, "conv1d", faulty_grouped_bf16_conv1d(F.conv1d))
    torch.manual_seed(0)
    grouped = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(32, 32, 16, padding=8, groups=16), dim=2)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 32, 3, padding=1), torch.nn.GELU(), grouped)
    keys = list(model.state_dict())
    x = torch.randn(2, 4, 50)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _relative_error(model(x), expected) > 0.5  # the fault is real before the guard
    lines = []
    names = guard_bf16_convs(model, torch.device("cpu"), lines.append)
    assert [n.split(" ")[0] for n in names] == ["2"] and len(lines) == 1 and "run in float32: 2 (bf16 error" in lines[0]
    assert type(model[0]) is torch.nn.Conv1d and list(model.state_dict()) == keys
    for m in (model, copy.deepcopy(model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _relative_error(m(x), expected) < 0.05
    assert torch.equal(model(x), expected)  # float32 untouched
    assert len(guard_bf16_convs(model, torch.device("cpu"), lines.append)) == 1  # guarded once, not wrapped again
    assert type(model[2]).__name__ == "Fp32ParametrizedConv1d" and type(model[2]).__base__.__name__ == "ParametrizedConv1d"


def test_bf16_training_and_evaluation_guard_the_model(tmp_path, monkeypatch):
    """Training with train.precision = bf16 and an evaluation-only run in bf16 both run the guard (made to find
    the positional convolution wrong here, so the wiring is tested on any CPU) and log what runs in float32."""
    import torch.nn.functional as F

    from asr.evaluation import evaluate_only

    monkeypatch.setattr(F, "conv1d", faulty_grouped_bf16_conv1d(F.conv1d))
    cfg = tiny_ctc_config(tmp_path / "run", max_steps=2, precision="bf16")
    cfg.eval.at_start = False
    train(cfg, fresh=True)
    line = "run in float32: wav2vec2.encoder.pos_conv_embed.conv (bf16 error"
    assert line in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    cfg.train.precision, cfg.eval.precision = "fp32", "bf16"
    (tmp_path / "run" / "train.log").write_text("", encoding="utf-8")
    evaluate_only(cfg)
    assert line in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
