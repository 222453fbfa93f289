"""python -m asr.memory (issue 15 §2): model-state bytes per rank for ddp and fsdp, from a meta-device model,
checked against parameter counts worked out by hand from the tiny configs' sizes."""

from __future__ import annotations


from asr import memory
from helpers import needs_whisper_base, tiny_ctc_config, tiny_whisper_config, write_exp

D, FFN, VOCAB, MELS = 32, 64, 51865, 80  # the tiny Whisper: whisper-base's vocabulary and mel bins, sizes of 32
ATTN = 4 * D * D + 3 * D  # q, k, v, out projections; k has no bias
ENC_LAYER = ATTN + 2 * D + (D * FFN + FFN) + (FFN * D + D) + 2 * D  # self-attention, fc1, fc2, two layer norms
DEC_LAYER = 2 * ATTN + 3 * 2 * D + (D * FFN + FFN) + (FFN * D + D)  # self- and cross-attention, three norms
ENC_TRAIN = (MELS * D * 3 + D) + (D * D * 3 + D) + ENC_LAYER + 2 * D  # conv1, conv2, the layer, final norm
ENC_FROZEN = 1500 * D  # sinusoidal positions (not trained)
DEC = VOCAB * D + 448 * D + DEC_LAYER + 2 * D  # token embedding (tied to proj_out), learned positions, final norm
ALL, TRAIN = ENC_TRAIN + ENC_FROZEN + DEC, ENC_TRAIN + DEC


def rows_of(cfg, ranks, vocab=64, precision="bf16"):
    rows = memory.table(memory.meta_model(cfg, vocab), ranks, precision, cfg.train.grad_accum)
    return {(r.ranks, r.parallel): r for r in rows}


@needs_whisper_base
def test_tiny_whisper_bytes_by_hand(tmp_path):
    rows = rows_of(tiny_whisper_config(tmp_path), [1, 2])
    assert (ALL, TRAIN) == (1_754_240, 1_706_240)  # as the training log's parameter summary counts them
    one = rows[1, "ddp"]
    assert (one.params, one.grads, one.optimizer, one.buffers) == (4 * ALL, 4 * TRAIN, 8 * TRAIN, 0)
    assert rows[1, "fsdp"].total == one.total  # one process: nothing to shard
    ddp2 = rows[2, "ddp"]
    assert (ddp2.params, ddp2.buffers) == (4 * ALL, 4 * TRAIN)  # replicated, plus DDP's gradient buckets
    # fsdp at 2 ranks: every parameter's dim 0 halved; the vocabulary's 51865 rows pad to 2 x 25933 (one row of
    # 32 more). Gathered at once, in bf16: the root's parameters (all outside the two layers) and two layers.
    fsdp2 = rows[2, "fsdp"]
    assert fsdp2.params == 4 * (ALL + D) // 2
    assert (fsdp2.grads, fsdp2.optimizer) == (4 * (TRAIN + D) // 2, 8 * (TRAIN + D) // 2)
    assert fsdp2.buffers == 2 * ((ALL - ENC_LAYER - DEC_LAYER) + 2 * DEC_LAYER)
    assert rows_of(tiny_whisper_config(tmp_path), [2], precision="fp32")[2, "fsdp"].buffers == 2 * fsdp2.buffers


@needs_whisper_base
def test_lora_and_accumulation_are_honoured(tmp_path):
    cfg = tiny_whisper_config(tmp_path, grad_accum=2)
    cfg.lora.rank, cfg.lora.targets = 4, [r"(q_proj|v_proj)$"]
    rows = rows_of(cfg, [2])
    lora = 3 * 2 * 4 * (D + D)  # three attention blocks, q and v, A (4 x 32) and B (32 x 4)
    assert rows[2, "ddp"].params == 4 * (ALL + lora) and rows[2, "ddp"].optimizer == 8 * lora
    assert rows[2, "fsdp"].optimizer == 8 * lora // 2
    assert rows[2, "fsdp"].grads == 4 * lora  # whole between the micro-batches of an accumulation window


def test_tiny_ctc_trainable_head(tmp_path):
    cfg = tiny_ctc_config(tmp_path)
    cfg.train.trainable = ["^lm_head"]
    rows = rows_of(cfg, [1, 4], vocab=40)
    head = D * 40 + 40
    assert (rows[1, "ddp"].grads, rows[1, "ddp"].optimizer) == (4 * head, 8 * head)
    assert rows[4, "fsdp"].optimizer == 8 * (D * 40 + 40) // 4  # 40 rows split 4 ways
    from asr.models import build
    from asr.text import CharVocab

    real = build(cfg.model, CharVocab.build(["abcdefghijklmnopqrstuvwxyzçğıöşü01234"]))  # 40 labels with specials
    assert len(real.vocab) == 40
    assert rows[1, "ddp"].params == 4 * sum(p.numel() for p in real.model.parameters())


def test_whisper_large_v3_table_offline(tmp_path, capsys):
    """A config with whisper-large-v3's sizes, as a local folder: the table prints without the network."""
    from transformers import WhisperConfig

    WhisperConfig(d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
                  decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, vocab_size=51866,
                  num_mel_bins=128).save_pretrained(tmp_path / "large-v3")
    cfg = tiny_whisper_config(tmp_path / "run")
    cfg.model.name, cfg.model.init = str(tmp_path / "large-v3"), "pretrained"
    exp = write_exp(cfg, tmp_path / "exp.toml")
    assert memory.main(["--exp", str(exp), "--ranks", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "1,543,490,560 parameters, 1,541,570,560 trainable; precision bf16" in out
    lines = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["8"])}
    assert lines["1", "ddp"][2:7] == ["6.17", "6.17", "12.33", "0.00", "24.67"] and lines["1", "ddp"][7:] == [
        "40", "48", "80", "141"]  # 24.67 GB of states: not a 24 GB GPU
    assert lines["8", "fsdp"][6] == "3.34" and lines["8", "fsdp"][7] == "24"


def test_bad_ranks_is_one_line(tmp_path, capsys):
    exp = write_exp(tiny_ctc_config(tmp_path), tmp_path / "exp.toml")
    assert memory.main(["--exp", str(exp), "--ranks", "1,x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --ranks: expected positive integers separated by commas, got '1,x'"
