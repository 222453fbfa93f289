"""Our losses (asr.losses) against the transformers models' own losses on the same batch."""

from __future__ import annotations

import types

import pytest
import torch

from asr.config import ModelConfig
from asr.data import Utterance, collate
from asr.losses import LOSSES, cross_entropy, ctc
from asr.models import Bundle, loss_batch, model_inputs
from asr.text import CharVocab

from helpers import WHISPER_BASE, needs_whisper_base

CPU = torch.device("cpu")


def make_batch(label_seqs, n_samples):
    """A batch exactly as `collate` builds it, from label sequences and clip lengths (random audio,
    the same for the same length)."""
    items = []
    for k, (labels, n) in enumerate(zip(label_seqs, n_samples)):
        utt = Utterance(id=f"u{k}", text="", language="tr", source="t", labels=list(labels))
        audio = 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(n))
        items.append({"utt": utt, "audio": audio, "error": None, "state": None})
    return collate(items)


# ---------------------------------------------------------------------------------------
# Whisper: cross-entropy over the label tokens.


def tiny_whisper(**overrides):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    conf = dict(vocab_size=120, num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=2,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_source_positions=1500, max_target_positions=64, decoder_start_token_id=100,
                pad_token_id=101, eos_token_id=101, bos_token_id=101)
    conf.update(overrides)
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(WhisperConfig(**conf)).eval()


@torch.no_grad()
def test_whisper_cross_entropy_equals_hf_loss():
    model = tiny_whisper()
    eos = model.config.eos_token_id
    bundle = Bundle("whisper", model, ModelConfig(), tokenizer=types.SimpleNamespace(eos_token_id=eos))
    # Full sequences as Bundle.encode_whisper makes them: start token, prompt, text, end of text.
    seqs = [[100, 110, 111, 5, 6, 7, 8, eos], [100, 110, 111, 9, eos], [100, 110, 111, 3, 3, 4, 50, 60, 70, eos]]
    batch = make_batch(seqs, [16000, 12000, 20000])
    assert (batch["labels"] == -100).any()  # padded: the padding must not count

    outputs = model(**model_inputs(bundle, batch, CPU))
    targets = loss_batch(bundle, batch, CPU)
    loss_sum, n = cross_entropy(outputs, targets)
    assert n == sum(len(s) - 1 for s in seqs)  # every token after the start token is a target

    hf = model(input_features=model_inputs(bundle, batch, CPU)["input_features"], labels=batch["labels"][:, 1:])
    assert float(loss_sum / n) == pytest.approx(float(hf.loss), rel=1e-5)
    # The logits line up with HF's own shift of the labels (decoder_start_token_id prepended).
    assert torch.allclose(outputs.logits, hf.logits, atol=1e-5)
    assert LOSSES["whisper"]["cross_entropy"] is cross_entropy


@needs_whisper_base
@torch.no_grad()
def test_whisper_cross_entropy_equals_hf_loss_with_real_labels():
    """Labels from the shared whisper-base tokenizer (Bundle.encode_whisper), a tiny random model of its config."""
    from transformers import AutoConfig, WhisperForConditionalGeneration, WhisperTokenizer

    conf = AutoConfig.from_pretrained(WHISPER_BASE)
    conf.update(dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64))
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(conf).eval()
    tok = WhisperTokenizer.from_pretrained(WHISPER_BASE)
    bundle = Bundle("whisper", model, ModelConfig(language="tr"), tokenizer=tok)
    texts = ["Merhaba dünya.", "Işık ılık, iğne!", "Evet"]
    batch = make_batch([bundle.encode_whisper(t, "tr") for t in texts], [16000, 24000, 8000])
    outputs = model(**model_inputs(bundle, batch, CPU))
    loss_sum, n = cross_entropy(outputs, loss_batch(bundle, batch, CPU))
    hf = model(input_features=model_inputs(bundle, batch, CPU)["input_features"], labels=batch["labels"][:, 1:])
    assert float(loss_sum / n) == pytest.approx(float(hf.loss), rel=1e-5)


# ---------------------------------------------------------------------------------------
# CTC.


def tiny_ctc(vocab, **overrides):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    conf = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                conv_dim=[16] * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
                num_conv_pos_embedding_groups=1, vocab_size=len(vocab), pad_token_id=vocab.blank,
                ctc_loss_reduction="sum", ctc_zero_infinity=True)
    conf.update(overrides)
    torch.manual_seed(0)
    return Wav2Vec2ForCTC(Wav2Vec2Config(**conf)).eval()


@torch.no_grad()
def test_ctc_equals_hf_loss_with_attention_mask():
    vocab = CharVocab.build(["merhaba dünya", "bir iki üç", "evet hayır"])
    model = tiny_ctc(vocab)
    bundle = Bundle("ctc", model, ModelConfig(), vocab=vocab)
    texts = ["merhaba dünya", "bir iki", "evet"]
    batch = make_batch([vocab.encode(t) for t in texts], [16000, 9000, 6400])
    inputs = model_inputs(bundle, batch, CPU)
    assert "attention_mask" in inputs  # layer-norm feature encoder: padding is masked, lengths agree with HF's

    outputs = model(**inputs)
    loss_sum, n = ctc(outputs, loss_batch(bundle, batch, CPU))
    assert n == sum(len(t) for t in texts)
    hf = model(**inputs, labels=batch["labels"])
    assert float(hf.loss) > 0
    assert float(loss_sum) == pytest.approx(float(hf.loss), rel=1e-5)


def test_ctc_infeasible_pair_is_zeroed_not_infinite():
    vocab = CharVocab.build(["abcdefghijklmnopqrstuvwxyz"])
    model = tiny_ctc(vocab)
    bundle = Bundle("ctc", model, ModelConfig(), vocab=vocab)
    # 0.2 s of audio gives 9 frames: a 40-character label cannot fit, a 3-character one can.
    long_text = "abcdefghijklmnopqrstuvwxyzabcdefghijklmn"
    batch = make_batch([vocab.encode(long_text), vocab.encode("abc")], [3200, 16000])
    frames = model._get_feat_extract_output_lengths(batch["audio_lengths"])
    assert int(frames[0]) < len(long_text)

    with torch.no_grad():
        loss_sum, _ = ctc(model(**model_inputs(bundle, batch, CPU)), loss_batch(bundle, batch, CPU))
        assert torch.isfinite(loss_sum)
        hf = model(**model_inputs(bundle, batch, CPU), labels=batch["labels"])
        assert float(loss_sum) == pytest.approx(float(hf.loss), rel=1e-5)
        # The infeasible item contributes nothing; the feasible one is still counted.
        feasible = make_batch([vocab.encode("abc")], [16000])
        alone, _ = ctc(model(**model_inputs(bundle, feasible, CPU)), loss_batch(bundle, feasible, CPU))
        assert float(alone) > 0
        assert float(loss_sum) == pytest.approx(float(alone), rel=1e-5)
    # And the gradient is finite.
    loss_sum, _ = ctc(model(**model_inputs(bundle, batch, CPU)), loss_batch(bundle, batch, CPU))
    loss_sum.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
