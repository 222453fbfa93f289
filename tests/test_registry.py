"""Losses and decoders are registries by model family (asr.losses.LOSSES, asr.decode.DECODERS), issue 14:
adding a decoder is one function and one entry, its keyword arguments come from decode.args (loss_args for
losses), its files are tagged by its name, and a name or argument that does not fit the family is a
one-line settings error (exit status 2) before anything is read."""

from __future__ import annotations

import pytest
import torch

import run
from asr.config import load_config
from asr.decode import DECODERS, ctc_greedy, decode_tag
from asr.losses import LOSSES

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import (REPO, needs_whisper_base, read_json, read_tsv, tiny_run,
                     tiny_whisper_config, write_exp)

DEMO = REPO / "experiments" / "demo.toml"


# The worked example of the README: greedy decoding with a penalty on the blank.
def greedy_blank_penalty(log_probs, lengths, vocab, cfg, blank_penalty: float = 0.0):
    """Best path after lowering the blank's log-probability by `blank_penalty` (fewer deletions)."""
    log_probs = log_probs.clone()
    log_probs[..., vocab.blank] -= blank_penalty  # (B, T, V)
    return ctc_greedy(log_probs, lengths, vocab.blank)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A CTC model trained for 3 steps: its greedy output is mostly blanks."""
    return tiny_run(tmp_path_factory.mktemp("short"), 3)


def test_a_registered_decoder_runs_in_eval_only_with_its_arguments(short_run, monkeypatch, capsys):
    exp, out = short_run
    monkeypatch.setitem(DECODERS["ctc"], "greedy_bp", greedy_blank_penalty)
    assert run.main(["--exp", str(exp), "--eval-only"]) == 0
    base = ["--exp", str(exp), "--eval-only", "--set", "decode.method=greedy_bp"]
    assert run.main(base + ["--set", "decode.args.blank_penalty=0.0"]) == 0
    assert run.main(base + ["--set", "decode.args.blank_penalty=30.0"]) == 0
    greedy = read_tsv(out / "eval" / "step-000003.dev.greedy.tsv")
    same = read_tsv(out / "eval" / "step-000003.dev.greedy_bp-blank_penalty0.0.tsv")
    pushed = read_tsv(out / "eval" / "step-000003.dev.greedy_bp-blank_penalty30.0.tsv")
    assert [r["hypothesis"] for r in same] == [r["hypothesis"] for r in greedy]
    assert sum(len(r["hypothesis"]) for r in pushed) > sum(len(r["hypothesis"]) for r in greedy)
    assert read_json(out / "eval" / "step-000003.dev.greedy_bp-blank_penalty30.0.json")["decode"] == \
        "greedy_bp-blank_penalty30.0"


def test_decoder_tags_come_from_the_registry_names():
    cfg = load_config(DEMO)
    assert decode_tag(cfg.decode) == "greedy"
    cfg.decode.method, cfg.decode.beam_size = "beam", 8
    assert decode_tag(cfg.decode) == "beam8"
    cfg.decode.method = "greedy_bp"  # any other method is named by itself, never "beam{N}"
    assert decode_tag(cfg.decode) == "greedy_bp"


@pytest.mark.parametrize("overrides, words", [
    (["decode.method=nucleus"], ["decode.method", "'nucleus'", "greedy", "beam"]),
    (["train.loss=focal"], ["train.loss", "'focal'", "ctc"]),
    (["train.loss=cross_entropy"], ["train.loss", "'cross_entropy'", "whisper models, not ctc"]),
    (["decode.args.blank_penalty=1.0"], ["decode.args", "'greedy'", "'blank_penalty'"]),
    (["train.loss_args.epsilon=0.1"], ["train.loss_args", "'ctc'", "'epsilon'"]),
])
def test_a_loss_or_decoder_that_does_not_fit_is_a_settings_error(overrides, words, capsys):
    args = ["--exp", str(DEMO), "--print-config"]
    for o in overrides:
        args += ["--set", o]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(w in err for w in words), err


@needs_whisper_base
def test_a_ctc_loss_on_whisper_is_a_settings_error_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    import asr.evaluation
    import asr.train

    for module in (asr.train, asr.evaluation):
        monkeypatch.setattr(module, "prepare", lambda *a, **k: pytest.fail("data were read"))
    cfg = tiny_whisper_config(tmp_path / "run")
    exp = write_exp(cfg, tmp_path / "exp.toml")
    for args in (["--set", "train.loss=ctc"], ["--eval-only", "--set", "train.loss=ctc"],
                 ["--set", "decode.args.temperature=0.5"]):
        assert run.main(["--exp", str(exp), *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: train.loss: 'ctc' is a loss of ctc models, not whisper ones") or \
            err.startswith("error: decode.args: 'greedy' takes no argument 'temperature'"), err


def test_label_smoothing_with_epsilon_0_is_cross_entropy_and_differs_with_epsilon():
    import types

    fn, ce = LOSSES["whisper"]["label_smoothing"], LOSSES["whisper"]["cross_entropy"]
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
    outputs, batch = types.SimpleNamespace(logits=logits), {"labels": labels}
    assert fn(outputs, batch, epsilon=0.0)[0].item() == pytest.approx(ce(outputs, batch)[0].item(), rel=1e-6)
    smoothed, n = fn(outputs, batch, epsilon=0.2)
    assert n == 8 and smoothed.item() != pytest.approx(ce(outputs, batch)[0].item(), rel=1e-3)


@needs_whisper_base
def test_loss_args_reach_the_loss_in_a_whisper_run(tmp_path):
    from asr.train import train

    losses = {}
    for eps in (0.0, 0.3):
        cfg = tiny_whisper_config(tmp_path / f"eps{eps}", max_steps=1)
        cfg.eval.at_start = False
        cfg.train.loss, cfg.train.loss_args = "label_smoothing", {"epsilon": eps}
        losses[eps] = train(cfg)["train_loss"][0][1]
    plain = tiny_whisper_config(tmp_path / "plain", max_steps=1)
    plain.eval.at_start = False
    assert train(plain)["train_loss"][0][1] == pytest.approx(losses[0.0], rel=1e-6)
    assert losses[0.3] != pytest.approx(losses[0.0], rel=1e-4)
    # A Whisper run's error analysis, and the two runs compared utterance by utterance.
    assert (tmp_path / "eps0.3" / "eval" / "step-000001.errs.txt").read_text().startswith("%WER = ")
    from asr.compare import main as compare

    assert compare([str(tmp_path / "eps0.0"), str(tmp_path / "eps0.3"), "--json"]) == 0


def test_the_saved_config_keeps_the_arguments(tmp_path, monkeypatch):
    from asr.config import to_toml

    monkeypatch.setitem(DECODERS["ctc"], "greedy_bp", greedy_blank_penalty)
    cfg = load_config(DEMO, ["decode.method=greedy_bp", "decode.args.blank_penalty=2.5"])
    back = tmp_path / "back.toml"
    back.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(back) == cfg and cfg.decode.args == {"blank_penalty": 2.5}
