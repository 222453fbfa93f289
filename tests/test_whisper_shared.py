"""Whisper with the shared whisper-base (../shared beside the repository; skipped without it): label
prompts against WhisperTokenizer, language mapping, generation, a tiny scratch Whisper through the loop
(exact resume, export to pipeline) and a few steps of fine-tuning the real model through run.py."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from asr.config import ModelConfig
from asr.models import Bundle, ModelError, build

from helpers import (FIXTURE, REPO, SYNTH_TR, WHISPER_BASE, final_params, needs_synth_tr, needs_whisper_base,
                     read_json, same_clips_config, tiny_whisper_config)

pytestmark = needs_whisper_base

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(WHISPER_BASE).tokenizer  # what asr.models.build_whisper uses


_REFERENCE = {}


def reference_ids(text: str, language: str | None, task: str) -> list[int]:
    """transformers' own label construction: a tokenizer of its own with its prefix tokens set."""
    from transformers import WhisperTokenizer

    if language not in _REFERENCE:  # set_prefix_tokens(language=None) keeps the previous language
        _REFERENCE[language] = WhisperTokenizer.from_pretrained(WHISPER_BASE, language=language)
    tok = _REFERENCE[language]
    tok.set_prefix_tokens(language=language, task=task)
    return tok(text).input_ids


TEXTS = ["Merhaba dünya, nasılsın?", "Işık ılık; İstanbul'da iğne.", "hello world", "  spaced  out ", "42 + 7 = 49"]


@pytest.mark.parametrize("task", ["transcribe", "translate"])
@pytest.mark.parametrize("language", ["tr", "en", "de", "si", "ja"])
def test_labels_match_whisper_tokenizer(tokenizer, language, task):
    bundle = Bundle("whisper", None, ModelConfig(task=task), tokenizer=tokenizer)
    for text in TEXTS:
        assert bundle.encode_whisper(text, language) == reference_ids(text, language, task), text
    assert bundle.prefix_tokens(language) == reference_ids("", language, task)[:-1]


def test_language_names_and_default_language(tokenizer):
    bundle = Bundle("whisper", None, ModelConfig(language="tr"), tokenizer=tokenizer)
    assert bundle.prefix_tokens("turkish") == bundle.prefix_tokens("tr") == bundle.prefix_tokens("")
    assert bundle.encode_whisper("Merhaba", "") == reference_ids("Merhaba", "tr", "transcribe")


def test_language_map_dv_to_sinhalese(tokenizer):
    bundle = Bundle("whisper", None, ModelConfig(language_map={"dv": "si"}), tokenizer=tokenizer)
    assert bundle.whisper_language("dv") == "si"
    assert bundle.encode_whisper("ދިވެހި", "dv") == reference_ids("ދިވެހި", "si", "transcribe")


def test_unknown_language_raises_one_line(tokenizer):
    for cfg, lang in ((ModelConfig(), "dv"), (ModelConfig(), "xx"), (ModelConfig(language_map={"dv": "zz"}), "dv")):
        bundle = Bundle("whisper", None, cfg, tokenizer=tokenizer)
        with pytest.raises(ModelError) as e:
            bundle.prefix_tokens(lang)
        msg = str(e.value)
        assert "\n" not in msg and "language_map" in msg and lang in msg


def test_empty_mapping_leaves_the_language_token_out(tokenizer):
    bundle = Bundle("whisper", None, ModelConfig(language_map={"dv": ""}), tokenizer=tokenizer)
    assert bundle.whisper_language("dv") is None
    ids = bundle.encode_whisper("ދިވެހި", "dv")
    assert ids == reference_ids("ދިވެހި", None, "transcribe")
    assert ids[:3] == tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>"])


def test_build_rejects_an_unknown_language():
    cfg = ModelConfig(name=str(WHISPER_BASE), init="scratch", hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64)
    with pytest.raises(ModelError, match="language_map"):
        build(cfg, languages=["dv"])
    cfg.language_map = {"dv": "si"}
    bundle = build(cfg, languages=["dv"])
    assert bundle.model.generation_config.language == "si"  # what an exported model's pipeline decodes


# ---------------------------------------------------------------------------------------
# Generation.


def clip_batch(bundle, languages):
    from asr.audio import load_audio
    from asr.data import Utterance, collate

    rows = list(csv.DictReader(open(FIXTURE / "dev.tsv", encoding="utf-8"), delimiter="\t"))[: len(languages)]
    items = []
    for r, lang in zip(rows, languages):
        u = Utterance(id=r["path"], text=r["sentence"], language=lang, source="t", path=str(FIXTURE / "clips" / r["path"]))
        items.append({"utt": u, "audio": load_audio(u.path), "error": None, "state": None})
    return collate(items)


@pytest.fixture(scope="module")
def tiny_whisper():
    cfg = ModelConfig(name=str(WHISPER_BASE), init="scratch", hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, language_map={"xx": ""})
    torch.manual_seed(0)
    bundle = build(cfg, languages=["tr", "xx"])
    bundle.model.eval()
    return bundle


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_whisper_generate_matches_transformers_generate(tiny_whisper, task):
    """Our decoding (forced to the training prompt) equals Whisper's own generate(language=, task=)."""
    from asr.decode import whisper_generate
    from asr.models import model_inputs

    bundle = tiny_whisper
    bundle.cfg.task = task
    try:
        batch = clip_batch(bundle, ["tr", "tr", "tr"])
        ours = whisper_generate(bundle, batch, CPU, max_new_tokens=6)
        feats = model_inputs(bundle, batch, CPU)["input_features"]
        ids = bundle.model.generate(input_features=feats, language="tr", task=task, max_new_tokens=6)
        assert ours == bundle.tokenizer.batch_decode(ids, skip_special_tokens=True)
        assert all(o.strip() for o in ours)
    finally:
        bundle.cfg.task = "transcribe"


def test_whisper_generate_mixed_prompts_in_one_batch(tiny_whisper):
    """A batch mixing a language with one mapped to "" (no language token) decodes each with its own prompt."""
    from asr.decode import whisper_generate

    bundle = tiny_whisper
    mixed = whisper_generate(bundle, clip_batch(bundle, ["xx", "tr", "xx"]), CPU, max_new_tokens=6)
    alone_tr = whisper_generate(bundle, clip_batch(bundle, ["xx", "tr"]), CPU, max_new_tokens=6)
    assert len(mixed) == 3 and mixed[:2] == alone_tr


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_whisper_generate_is_quiet(tiny_whisper, method):
    """No "attention mask is not set", "Both max_new_tokens and max_length" or generation_config warnings
    (transformers' logger does not propagate to the root logger: listen on it directly)."""
    from asr.decode import whisper_generate
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    handler, level = Records(), hf_logging.get_verbosity()
    logger.addHandler(handler)
    hf_logging.set_verbosity_warning()
    try:
        whisper_generate(tiny_whisper, clip_batch(tiny_whisper, ["tr", "tr"]), CPU, method=method, beam_size=2,
                         max_new_tokens=3)
        # The listener works: Whisper's own generate, called as the old code did, is noisy.
        if method == "greedy":
            from asr.models import model_inputs

            feats = model_inputs(tiny_whisper, clip_batch(tiny_whisper, ["tr", "tr"]), CPU)["input_features"]
            before = list(handler.messages)
            tiny_whisper.model.generate(input_features=feats, language="tr", task="transcribe", max_new_tokens=3)
            assert len(handler.messages) > len(before)
            handler.messages = before
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert handler.messages == []


# ---------------------------------------------------------------------------------------
# A tiny scratch Whisper through the training loop.


def test_whisper_stop_and_resume_equals_uninterrupted(tmp_path):
    def cfg(out, max_steps):
        c = tiny_whisper_config(out, max_steps=max_steps, grad_accum=2, schedule="constant", warmup_steps=1)
        c.model.hidden_dropout = c.model.attention_dropout = c.model.activation_dropout = 0.1
        c.model.mask_time_prob, c.model.mask_time_length = 0.1, 5  # SpecAugment on the log-mel frames
        c.data.batch_size = 2
        c.data.num_workers = 1
        return c

    from asr.train import train

    train(cfg(tmp_path / "a", 3), fresh=True)
    train(cfg(tmp_path / "b", 2), fresh=True)
    train(cfg(tmp_path / "b", 3))
    a = final_params(tmp_path / "a" / "checkpoints" / "step-000003")
    b = final_params(tmp_path / "b" / "checkpoints" / "step-000003")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_whisper_exported_folders_run_in_pipeline(tmp_path):
    """best/ and final/ of a tiny scratch Whisper load in pipeline(), which decodes in the training language
    and task (from the exported generation config) exactly as our evaluation did."""
    import transformers

    from asr.audio import load_audio
    from asr.experiment import EXPORT_INFO
    from asr.train import train

    out = tmp_path / "run"
    cfg = tiny_whisper_config(out, max_steps=2, eval_every=1)
    cfg.decode.max_new_tokens = 5
    train(cfg, fresh=True)
    best_step = read_json(out / "best" / EXPORT_INFO)["step"]
    for folder, step in (("final", 2), ("best", best_step)):
        asr = transformers.pipeline("automatic-speech-recognition", model=str(out / folder), device="cpu")
        assert asr.model.generation_config.language == "tr" and asr.model.generation_config.task == "transcribe"
        rows = list(csv.DictReader(open(out / "eval" / f"step-{step:06d}.tsv", encoding="utf-8"), delimiter="\t"))
        assert len(rows) == 2
        for r in rows:
            clip = FIXTURE / "clips" / (r["id"].split("/", 1)[1] + ".mp3")
            # num_beams 1: the pipeline's own default is a 5-beam search, our evaluation decodes greedily.
            text = asr({"raw": load_audio(clip).numpy(), "sampling_rate": 16000},
                       generate_kwargs={"max_new_tokens": 5, "num_beams": 1})["text"]
            # A 2-step model may emit special tokens (<|notimestamps|>), which the pipeline prints and our
            # decoding, like tokenizer.decode(skip_special_tokens=True), leaves out.
            text = re.sub(r"<\|[^|]*\|>", "", text)
            assert text.strip() == r["hypothesis"], (folder, r["id"])


# ---------------------------------------------------------------------------------------
# The real model, end to end through run.py.


NOISE = ("Writing model shards", "Loading weights", "Passing `generation_config` together with",
         "attention mask is not set", "Both `max_new_tokens`")


@needs_synth_tr
def test_whisper_base_finetune_end_to_end(tmp_path):
    out = tmp_path / "run"
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
[run]
out_dir = {json.dumps(str(out))}

[[data.sources]]
kind = "common_voice"
path = {json.dumps(str(SYNTH_TR))}
language = "tr"

[data]
batch_size = 2
num_workers = 0

[model]
name = {json.dumps(str(WHISPER_BASE))}

[train]
max_steps = 2
lr = 1e-5
warmup_steps = 1
eval_every = 0
save_every = 0
log_every = 1

[eval]
max_utterances = 4
batch_size = 4

[decode]
max_new_tokens = 24
""", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "run.py", "--exp", str(exp)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(out / "results.json")
    assert results["steps"] == 2
    metrics = results["eval"]["tr"]
    assert metrics["n"] == 4
    assert 0 <= metrics["wer"] < 200 and metrics["cer"] < 100  # finite, and the pretrained model transcribes
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    assert (out / "checkpoints" / "step-000002" / "model.pt").is_file()


def test_data_max_label_tokens_limits_whisper_labels(tmp_path):
    """data.max_label_tokens caps the label length (prefix tokens included) below the model's own limit."""
    from asr.experiment import Log, prepare

    cfg = tiny_whisper_config(tmp_path)
    cfg.data.max_label_tokens = 14
    bundle, data = prepare(cfg, tmp_path, Log(None))
    report = read_json(tmp_path / "data_report.json")["tr/train"]
    assert report["dropped"].get("labels_too_long", 0) > 0
    assert data.train and all(len(u.labels) <= 14 for u in data.train)
    assert report["kept"] + report["dropped"]["labels_too_long"] == 32


def test_whisper_train_loss_is_normalised_like_eval_loss(tmp_path):
    """Per target token (the start token is no target): the train loss of step 1 equals the eval loss
    on the same clips and weights."""
    from asr.train import train

    results = train(same_clips_config(tiny_whisper_config(tmp_path / "run")), fresh=True)
    (_, train_loss), = results["train_loss"]
    assert train_loss == pytest.approx(results["eval"]["tr"]["loss"], rel=1e-4)


@needs_whisper_base
@pytest.mark.parametrize("family, batching, expected", [("whisper", "auto", False), ("ctc", "auto", True),
                                                        ("whisper", "duration", True), ("ctc", "random", False)])
def test_auto_batching_is_random_for_whisper_and_by_duration_for_ctc(tmp_path, monkeypatch, family, batching,
                                                                     expected):
    """Whisper pads every clip to 30 s, so duration buckets save nothing there and only make batches less
    varied: data.batching = "auto" draws Whisper's batches at random and buckets CTC batches by duration."""
    import asr.train
    from helpers import tiny_ctc_config

    seen = {}
    real = asr.train.DurationBatchSampler

    def spy(*args, **kwargs):
        seen["by_duration"] = kwargs["by_duration"]
        return real(*args, **kwargs)

    monkeypatch.setattr(asr.train, "DurationBatchSampler", spy)
    make = tiny_whisper_config if family == "whisper" else tiny_ctc_config
    cfg = make(tmp_path / "run", max_steps=1)
    cfg.data.batching = batching
    cfg.eval.at_start = False
    cfg.preflight.enabled = False
    asr.train.train(cfg, fresh=True)
    assert seen["by_duration"] is expected
