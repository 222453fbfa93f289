"""How much GPU memory a run's model states take per rank, under ddp and fsdp, at several world sizes; the model is
built on the meta device from its config alone (no weights loaded or downloaded), with the run's trainable
parameters and LoRA adapters and its precision.

    python -m asr.memory --exp experiments/tr_whisper_base.toml --set model.name=openai/whisper-large-v3 --ranks 1,2,4,8

Per rank, in GB (1e9 bytes):
  params     float32 weights: all of them (ddp), this rank's shards (fsdp)
  grads      float32 gradients of the trainable parameters (fsdp: sharded, but whole between the micro-batches of
             an accumulation window, train.grad_accum > 1, which keeps them unreduced)
  optimizer  AdamW's two float32 moments of each trainable parameter (fsdp: sharded)
  buffers    ddp: DistributedDataParallel's gradient buckets (a copy of the gradients, world size > 1);
             fsdp: the parameters gathered at once in the precision's dtype: the root's (kept through forward and
             backward) and two layers (the running one and the prefetched next)
Activations are not counted (they grow with the batch; model.gradient_checkpointing shrinks them), nor the CUDA
context: a GPU "fits" when these states take at most (1 - headroom) of it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

GPU_GB = (24, 40, 48, 80, 141)
GB = 1e9


@dataclass
class Row:
    ranks: int
    parallel: str
    params: int  # bytes per rank
    grads: int
    optimizer: int
    buffers: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers

    def fits(self, headroom: float) -> list[int]:
        return [g for g in GPU_GB if self.total <= (1 - headroom) * g * GB]


def model_config(mc, vocab_size: int):
    """The transformers config the run would build its model from (asr.models.build_whisper / build_ctc's sizes),
    read from model.name's config.json alone."""
    import transformers
    from transformers import AutoConfig

    from asr.models import _CTC_OVERRIDES, SCRATCH_CONFIGS, _apply_overrides, infer_family, scratch_sizes

    family = infer_family(mc)
    if family == "whisper":
        conf = AutoConfig.from_pretrained(mc.name)
        if mc.init == "scratch":
            scratch_sizes(conf, mc, "whisper")
        return family, conf
    if mc.init == "scratch" and not mc.name:
        conf = getattr(transformers, SCRATCH_CONFIGS[mc.arch])(feat_extract_norm="layer", do_stable_layer_norm=True)
    else:
        conf = AutoConfig.from_pretrained(mc.name)
    if mc.init == "scratch":
        scratch_sizes(conf, mc, "ctc")
    conf.vocab_size = vocab_size
    _apply_overrides(conf, mc, _CTC_OVERRIDES)  # e.g. no time masking: no masked_spec_embed parameter
    return family, conf


def meta_model(cfg, vocab_size: int) -> torch.nn.Module:
    """The run's model on the meta device, its parameters marked trainable as the run marks them."""
    from transformers import AutoModelForCTC, WhisperForConditionalGeneration

    from asr.models import Bundle, select_parameters

    family, conf = model_config(cfg.model, vocab_size)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(conf) if family == "whisper" else AutoModelForCTC.from_config(conf)
    if family == "ctc" and cfg.model.freeze_feature_encoder:
        model.freeze_feature_encoder()
    select_parameters(Bundle(family, model, cfg.model), cfg.train, cfg.lora)
    return model


def shard_numel(p: torch.Tensor, ranks: int) -> int:
    """Elements of one rank's FSDP2 shard of `p`: dim 0 split into `ranks` chunks, padded to the largest."""
    if p.ndim == 0:
        return 1
    return math.ceil(p.shape[0] / ranks) * (p.numel() // max(p.shape[0], 1))


def table(model: torch.nn.Module, ranks: list[int], precision: str, grad_accum: int = 1) -> list[Row]:
    """Bytes per rank of the model states (see the module's docstring) for ddp and fsdp at each world size."""
    from asr.fsdp import transformer_layers

    params = list(model.parameters())  # tied parameters once
    trainable = [p for p in params if p.requires_grad]
    n_all, n_train = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    gathered_bytes = 2 if precision in ("bf16", "fp16") else 4
    layers = transformer_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in params if id(p) not in in_layers)
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    rows = []
    for n in ranks:
        rows.append(Row(n, "ddp", 4 * n_all, 4 * n_train, 8 * n_train, 4 * n_train if n > 1 else 0))
        shard_all = sum(shard_numel(p, n) for p in params)
        shard_train = sum(shard_numel(p, n) for p in trainable)
        grads = 4 * (n_train if grad_accum > 1 and n > 1 else shard_train)
        buffers = gathered_bytes * (root + 2 * largest) if n > 1 else 0
        rows.append(Row(n, "fsdp", 4 * shard_all, grads, 8 * shard_train, buffers))
    return rows


def vocab_size_of(cfg, given: int | None) -> tuple[int, str]:
    """The CTC head's size: --vocab-size, else the run folder's saved vocabulary, else data.sp_vocab_size for
    sentencepiece, else 64 characters (said in the output)."""
    if given:
        return given, "--vocab-size"
    vocab = Path(cfg.run.out_dir) / "vocab" / "vocab.json"
    if vocab.is_file():
        return len(json.loads(vocab.read_text(encoding="utf-8"))), str(vocab)
    if cfg.data.vocab == "sentencepiece":
        return cfg.data.sp_vocab_size, "data.sp_vocab_size"
    return 64, "assumed (no saved vocabulary; set --vocab-size)"


def format_table(rows: list[Row], headroom: float) -> str:
    lines = [f"{'ranks':>5s}  {'parallel':8s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'buffers':>7s} "
             f"{'total':>7s}  fits (GB GPUs, {100 * (1 - headroom):.0f}% for states)"]
    for r in rows:
        fits = " ".join(str(g) for g in r.fits(headroom)) or "none"
        lines.append(f"{r.ranks:5d}  {r.parallel:8s} {r.params / GB:7.2f} {r.grads / GB:7.2f} {r.optimizer / GB:7.2f} "
                     f"{r.buffers / GB:7.2f} {r.total / GB:7.2f}  {fits}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="experiment TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--ranks", default="1,2,4,8", help="world sizes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--vocab-size", type=int, default=None, help="CTC: labels of the output head")
    parser.add_argument("--headroom", type=float, default=0.2,
                        help="share of each GPU left for activations and the CUDA context (default 0.2)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)

    from asr.config import ConfigError, load_config
    from asr.models import ModelError

    try:
        cfg = load_config(args.exp, args.overrides)
        ranks = [int(x) for x in args.ranks.split(",")]
        if not ranks or min(ranks) < 1:
            raise ValueError
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"error: --ranks: expected positive integers separated by commas, got {args.ranks!r}", file=sys.stderr)
        return 2
    if not 0 <= args.headroom < 1:
        print(f"error: --headroom: must be in [0, 1), got {args.headroom}", file=sys.stderr)
        return 2
    precision = "bf16" if cfg.train.precision == "auto" else cfg.train.precision  # auto: bf16 on a current GPU
    vocab, vocab_from = vocab_size_of(cfg, args.vocab_size)
    try:
        model = meta_model(cfg, vocab)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1  # as run.py
    rows = table(model, ranks, precision, cfg.train.grad_accum)
    if args.json:
        print(json.dumps([dict(vars(r), total=r.total) for r in rows]))
        return 0
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{type(model).__name__} from {cfg.model.name or cfg.model.arch} ({cfg.model.init}): {n_all:,} parameters, "
          f"{n_train:,} trainable; precision {precision}, AdamW, grad_accum {cfg.train.grad_accum}"
          + (f"; CTC head of {vocab} labels ({vocab_from})" if not hasattr(model.config, "d_model") else ""))
    print("model states per rank in GB (1e9 bytes); activations not included (python -m asr.memory --help)")
    print(format_table(rows, args.headroom))
    return 0


if __name__ == "__main__":
    sys.exit(main())
