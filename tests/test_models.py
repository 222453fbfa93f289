"""asr.models: building CTC encoders and Whisper (scratch and from a local pretrained folder), config
overrides reaching the modules, freezing, model inputs."""

from __future__ import annotations

import pytest
import torch

from asr.config import ModelConfig
from asr.models import ModelError, build, model_inputs, quiet_progress_bars, set_encoder_frozen
from asr.text import CharVocab

from helpers import WHISPER_BASE, needs_whisper_base

VOCAB = CharVocab.build(["merhaba dünya", "bir iki üç"])


def tiny_scratch(**kw) -> ModelConfig:
    base = dict(init="scratch", name="", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                conv_dim=[16] * 7)
    base.update(kw)
    return ModelConfig(**base)


def dropouts(module: torch.nn.Module) -> set[float]:
    return {m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert"])
def test_scratch_ctc_head_fits_the_vocabulary(arch):
    bundle = build(tiny_scratch(arch=arch), VOCAB)
    conf = bundle.model.config
    assert bundle.family == "ctc"
    assert conf.vocab_size == len(VOCAB) and conf.pad_token_id == VOCAB.blank
    assert bundle.model.lm_head.out_features == len(VOCAB)
    assert conf.feat_extract_norm == "layer"
    audio = torch.randn(2, 16000)
    batch = {"audio": audio, "audio_lengths": torch.tensor([16000, 8000])}
    inputs = model_inputs(bundle, batch, torch.device("cpu"))
    assert inputs["attention_mask"].sum(1).tolist() == [16000, 8000]
    logits = bundle.model(**inputs).logits
    assert logits.shape == (2, bundle.output_frames(16000), len(VOCAB))


def test_scratch_conv_layers_must_agree():
    with pytest.raises(ModelError, match="conv_kernel"):
        build(tiny_scratch(conv_dim=[16, 16, 16]), VOCAB)
    bundle = build(tiny_scratch(conv_dim=[16, 16, 16], conv_kernel=[10, 3, 2], conv_stride=[5, 2, 2]), VOCAB)
    assert bundle.output_frames(16000) == bundle.model(torch.randn(1, 16000)).logits.shape[1]


def test_freezing():
    bundle = build(tiny_scratch(freeze_feature_encoder=True), VOCAB)
    fe = bundle.model.wav2vec2.feature_extractor
    assert not any(p.requires_grad for p in fe.parameters())
    set_encoder_frozen(bundle, True)
    assert not any(p.requires_grad for p in bundle.model.wav2vec2.parameters())
    assert all(p.requires_grad for p in bundle.model.lm_head.parameters())
    set_encoder_frozen(bundle, False)
    assert all(p.requires_grad for p in bundle.model.wav2vec2.encoder.parameters())
    assert not any(p.requires_grad for p in fe.parameters())  # the feature encoder stays frozen


def test_pretrained_ctc_gets_a_fresh_head_and_the_overrides(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    conf = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          conv_dim=[16] * 7, num_conv_pos_embedding_groups=1, vocab_size=40, hidden_dropout=0.05)
    Wav2Vec2ForCTC(conf).save_pretrained(tmp_path / "pre")
    cfg = ModelConfig(name=str(tmp_path / "pre"), hidden_dropout=0.37, attention_dropout=0.0, layerdrop=0.0,
                      mask_time_prob=0.3, final_dropout=0.21)
    bundle = build(cfg, VOCAB)
    m = bundle.model
    assert m.lm_head.out_features == len(VOCAB) and m.config.pad_token_id == VOCAB.blank
    assert m.config.hidden_dropout == 0.37 and m.config.mask_time_prob == 0.3
    assert {0.37, 0.21} <= dropouts(m) and 0.05 not in dropouts(m)  # built with the overrides, not patched after
    assert next(m.parameters()).dtype == torch.float32


def test_quiet_progress_bars_restores_the_setting():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with quiet_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


@needs_whisper_base
def test_pretrained_whisper_dropout_overrides_reach_the_modules(tmp_path):
    """Whisper's layers read their dropout when built: overrides must be on the config before loading."""
    from transformers import AutoConfig, WhisperForConditionalGeneration, WhisperProcessor

    conf = AutoConfig.from_pretrained(WHISPER_BASE)
    conf.update(dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, dropout=0.0))
    WhisperForConditionalGeneration(conf).save_pretrained(tmp_path / "w")
    WhisperProcessor.from_pretrained(WHISPER_BASE).save_pretrained(tmp_path / "w")
    bundle = build(ModelConfig(name=str(tmp_path / "w"), hidden_dropout=0.3, attention_dropout=0.2, layerdrop=0.1,
                               language="tr"), languages=["tr"])
    enc = bundle.model.model.encoder
    assert enc.dropout == 0.3 and enc.layerdrop == 0.1
    assert enc.layers[0].self_attn.dropout == 0.2
    assert bundle.model.model.decoder.dropout == 0.3
    assert not bundle.model.config.apply_spec_augment


@needs_whisper_base
def test_whisper_spec_augment_is_switched_on_by_its_probabilities():
    cfg = ModelConfig(name=str(WHISPER_BASE), init="scratch", hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, mask_time_prob=0.2, mask_time_length=5)
    bundle = build(cfg, languages=["tr"])
    conf = bundle.model.config
    assert conf.apply_spec_augment and conf.mask_time_prob == 0.2 and conf.mask_time_length == 5
    # The base config has no dropout: in training mode only the masking makes two forward passes differ.
    feats = torch.randn(1, conf.num_mel_bins, 3000)
    dec = torch.tensor([[50258, 50259]])
    m = bundle.model
    m.train()
    a, b = m(input_features=feats, decoder_input_ids=dec).logits, m(input_features=feats, decoder_input_ids=dec).logits
    assert not torch.equal(a, b)
    m.eval()
    a, b = m(input_features=feats, decoder_input_ids=dec).logits, m(input_features=feats, decoder_input_ids=dec).logits
    assert torch.equal(a, b)
