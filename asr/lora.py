"""Low-rank adaptation (LoRA, Hu et al. 2021) of chosen nn.Linear layers, in plain PyTorch.

A wrapped layer computes  base(x) + dropout(x) @ A^T @ B^T * alpha / r  with the base weight and
bias frozen and only A (r x in) and B (out x r) trained; B starts at zero, so a freshly wrapped
model computes exactly what the base model computes. `merge_lora` folds B @ A back into the
weight, leaving plain nn.Linear layers that `save_pretrained` writes as a standard checkpoint.

A LoRALinear keeps the base layer's own `weight` and `bias` parameters under their old names
(`...q_proj.weight`), so the wrapped model's state dict is the base model's plus `lora_A` / `lora_B`.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

_LORA = (".lora_A", ".lora_B")  # name endings of adapter parameters


class LoRALinear(nn.Module):
    """An nn.Linear (its weight and bias frozen) plus a trainable low-rank update B @ A scaled by alpha / rank.
    A and B are float32 whatever the base dtype; under torch.autocast they run in the autocast dtype."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = base.weight  # (out, in), the base layer's own parameter
        self.bias = base.bias  # (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        out = F.linear(x, self.weight, self.bias)
        h = self.dropout(x).to(self.lora_A.dtype)  # autocast, where on, recasts inside F.linear
        low = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return out + (low * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in float32: what merging adds to the weight, (out, in)."""
        return self.scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding weight + scaling * B @ A (this layer's weight is updated in place)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, targets: list[str], rank: int = 8, alpha: float = 16,
               dropout: float = 0.0) -> list[str]:
    r"""Wrap, in place, every plain nn.Linear (not a subclass) of `model` whose module name matches a
    target in a LoRALinear, and freeze every other parameter (the caller may unfreeze more afterwards,
    e.g. a fresh CTC head; adapters from an earlier call stay trainable).

    A target matches when `re.search(target, name)` finds it anywhere in the full dotted module name:
    "q_proj" matches every "...self_attn.q_proj", r"encoder\.layers\.[45]\.fc1" only those two layers.
    Linears whose weight is shared with another module (tied weights, like Whisper's `proj_out`, which
    is the decoder's token embedding) are never wrapped: a merge would change the embedding too.
    Returns the wrapped names; raises ValueError when no linear matched.
    """
    if isinstance(targets, str):
        targets = [targets]
    patterns = [re.compile(t) for t in targets]
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    chosen, tied = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not any(p.search(name) for p in patterns):
            continue
        if uses[id(module.weight)] > 1:
            tied.append(name)
        else:
            chosen.append(name)
    if not chosen:
        note = f" (tied linears are never wrapped: {', '.join(tied)})" if tied else ""
        raise ValueError(f"LoRA targets {list(targets)} match no nn.Linear in {type(model).__name__}{note}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(_LORA))
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear of `model` back into a plain nn.Linear (W + scaling * B @ A), in place;
    returns `model`. The merged weights stay frozen (requires_grad False)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged deep copy of `model` (for export), leaving `model` and its adapters untouched."""
    return merge_lora(copy.deepcopy(model))


