"""LoRA (asr/lora.py) on tiny random Whisper and Wav2Vec2ForCTC models, and optionally on the real Whisper base."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC, WhisperConfig, WhisperForConditionalGeneration

from asr.lora import LoRALinear, apply_lora, merge_lora, merged_copy

WHISPER_TARGETS = [r"(q|k|v|out)_proj$", r"fc[12]$"]  # encoder and decoder, self and cross attention
CTC_TARGETS = [r"attention\.(q|k|v|out)_proj$", r"feed_forward\.(intermediate|output)_dense$"]


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                        max_source_positions=20, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=3, suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperForConditionalGeneration(cfg).eval()


def tiny_ctc(seed: int = 0) -> Wav2Vec2ForCTC:
    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=[32] * 3, conv_kernel=[10, 3, 3], conv_stride=[5, 2, 2], num_feat_extract_layers=3,
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=12,
                         mask_time_prob=0.0, layerdrop=0.0)
    return Wav2Vec2ForCTC(cfg).eval()


def whisper_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(2, 16, 40, generator=g),  # (B, mels, 2 * max_source_positions)
            "decoder_input_ids": torch.randint(4, 96, (2, 7), generator=g)}


def ctc_inputs(seed: int = 1) -> dict:
    return {"input_values": torch.randn(2, 1600, generator=torch.Generator().manual_seed(seed))}


FAMILIES = {"whisper": (tiny_whisper, whisper_inputs, WHISPER_TARGETS),
            "ctc": (tiny_ctc, ctc_inputs, CTC_TARGETS)}


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Non-zero B (as after training) so merging has something to fold in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def test_lora_linear_formula_and_zero_start():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 4, 6)
    layer = LoRALinear(copy.deepcopy(base), rank=2, alpha=4)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + x @ layer.lora_A.T @ layer.lora_B.T * 2.0
    torch.testing.assert_close(layer(x), expected)
    merged = layer.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_dropout_acts_on_the_low_rank_path_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRALinear(copy.deepcopy(base), rank=4, alpha=4, dropout=0.5).train()
    x = torch.randn(16, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout must not touch the base path
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), layer(x))  # random masks in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_starts_identical_to_base(family):
    build, inputs, targets = family
    base, model = build(), build()
    names = apply_lora(model, targets, rank=4, alpha=8)
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(logits(model, inputs()), logits(base, inputs()))


def test_whisper_wraps_every_attention_and_ffn_linear_but_not_tied_proj_out():
    model = tiny_whisper()
    names = apply_lora(model, WHISPER_TARGETS + ["proj"])  # "proj" also matches proj_out
    assert len(names) == 2 * 6 + 2 * 10  # encoder: q k v out fc1 fc2; decoder adds cross-attention q k v out
    assert "proj_out" not in names and type(model.proj_out) is nn.Linear
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tiny_whisper(), ["proj_out"])


def test_ctc_wraps_attention_and_feed_forward():
    names = apply_lora(tiny_ctc(), CTC_TARGETS)
    assert len(names) == 2 * 6
    assert all(".encoder.layers." in n for n in names)


def test_nothing_matched_raises():
    with pytest.raises(ValueError, match=r"no_such_layer.*match no nn.Linear"):
        apply_lora(tiny_ctc(), ["no_such_layer", r"conv\d"])


def test_trainable_count_follows_formula(family):
    build, _, targets = family
    model, rank = build(), 4
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = apply_lora(model, targets, rank=rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(rank * (shapes[n][0] + shapes[n][1]) for n in names)
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)


def test_training_changes_only_adapters(family):
    build, inputs, targets = family
    model = build()
    apply_lora(model, targets, rank=4, alpha=8, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        loss = model(**inputs(seed=10 + step)).logits.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert p.grad is None, name
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_merge_matches_unmerged_and_survives_save_pretrained(family, tmp_path):
    build, inputs, targets = family
    model = build()
    apply_lora(model, targets, rank=4, alpha=8)
    randomize_adapters(model)
    expected = logits(model, inputs())
    assert not torch.allclose(expected, logits(build(), inputs()), atol=1e-3)  # the adapters do something
    merged = merged_copy(model)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # the training model is untouched
    assert torch.equal(logits(model, inputs()), expected)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert merged.state_dict().keys() == build().state_dict().keys()  # a standard checkpoint layout
    torch.testing.assert_close(logits(merged, inputs()), expected, atol=1e-5, rtol=1e-5)

    merged.save_pretrained(tmp_path)
    loaded, info = type(merged).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(loaded.eval(), inputs()), expected, atol=1e-5, rtol=1e-5)
    if isinstance(loaded, WhisperForConditionalGeneration):
        assert loaded.proj_out.weight is loaded.model.decoder.embed_tokens.weight

    assert merge_lora(model) is model  # in place
    torch.testing.assert_close(logits(model, inputs()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_and_backward(family, dtype):
    build, inputs, targets = family
    model = build()
    apply_lora(model, targets, rank=4)
    randomize_adapters(model)
    with torch.autocast("cpu", dtype=dtype):
        out = model(**inputs()).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora)


def test_low_precision_base_with_float32_adapters():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 4).to(torch.bfloat16), rank=2)
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


WHISPER_BASE = Path(__file__).resolve().parents[2] / "shared" / "models" / "whisper-base"


@pytest.mark.skipif(not WHISPER_BASE.is_dir(), reason=f"real Whisper base not found at {WHISPER_BASE}")
def test_real_whisper_base_q_v():
    model = WhisperForConditionalGeneration.from_pretrained(WHISPER_BASE, dtype=torch.float32).eval()
    cfg = model.config
    names = apply_lora(model, [r"(q|v)_proj$"], rank=8, alpha=16)
    n_attn = cfg.encoder_layers + 2 * cfg.decoder_layers  # self-attention everywhere, cross-attention in the decoder
    assert len(names) == 2 * n_attn
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(names) * 8 * 2 * cfg.d_model
    randomize_adapters(model, seed=3)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_features": torch.randn(1, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g),
              "decoder_input_ids": torch.tensor([[cfg.decoder_start_token_id, 50259, 50359, 50363]])}
    expected = logits(model, inputs)
    torch.testing.assert_close(logits(merged_copy(model), inputs), expected, atol=1e-4, rtol=1e-4)
