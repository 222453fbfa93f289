"""Fully sharded data parallel training (`train.parallel = "fsdp"`) with PyTorch's FSDP2: every encoder and
decoder layer and then the root are `fully_shard`ed, so each rank holds 1/N of the parameters, gradients and
optimizer state; a layer's full parameters exist only while it runs. Evaluation and exports see the full
weights (`gathered`, `full_model`); checkpoints are torch.distributed.checkpoint folders (`sharded_state`,
`load_sharded`), which load at any world size, in one process too.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from asr import distributed as dist

# Warnings DCP prints on every save or load: a deprecation inside its file writer, and "assuming the intent is
# to save in a single process" in a run of one process (which is the intent).
_DCP_NOISE = ("TypedStorage is deprecated", "torch.distributed is disabled, unavailable or uninitialized")


@contextmanager
def quiet_dcp():
    with warnings.catch_warnings():
        for text in _DCP_NOISE:
            warnings.filterwarnings("ignore", message=f".*{text}")
        yield


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder and decoder layers (one FSDP unit each): the items of every ModuleList named `layers`
    (Whisper's model.encoder.layers and model.decoder.layers, a CTC encoder's encoder.layers)."""
    return [layer for name, m in model.named_modules()
            if name.rpartition(".")[2] == "layers" and isinstance(m, nn.ModuleList) for layer in m]


def mixed_precision(precision: str):
    """FSDP's MixedPrecisionPolicy for train.precision: parameters gathered (and the forward and backward run)
    in bf16/fp16, gradients reduced and the sharded master weights kept in float32; fp32: no casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory; tied parameters stay tied):
    the skeleton the full weights are gathered into for an export."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def shard(model: nn.Module, precision: str) -> nn.Module:
    """fully_shard every transformer layer, then the root, in place (the parameters become sharded DTensors:
    build the optimizer afterwards). Returns a meta-device skeleton of the unsharded model (`full_model`)."""
    from torch.distributed.fsdp import fully_shard

    skeleton = meta_copy(model)
    policy = mixed_precision(precision)
    for layer in transformer_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return skeleton


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_accumulating(model: nn.Module, accumulating: bool) -> None:
    """Before each micro-batch's backward: while `accumulating` (all but the window's last micro-batch)
    gradients are kept unsharded and unreduced, and parameters stay gathered after the backward, so the next
    micro-batch neither reduce-scatters nor all-gathers again (FSDP2's no_sync)."""
    model.set_requires_gradient_sync(not accumulating)
    model.set_reshard_after_backward(not accumulating)


def to_float(value) -> float:
    """A float of a tensor that may be a DTensor (clip_grad_norm_ over sharded gradients returns one whose
    local value is this rank's part only: the full value is all-reduced)."""
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


@contextmanager
def gathered(model: nn.Module):
    """Within the block every FSDP unit's full parameters are on every rank and a forward runs no collective:
    evaluation, where the ranks run different numbers of forwards (their shares of a set, generation lengths).
    Without FSDP: nothing."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    fully_shard.state(model)._lazy_init()  # the root first: an evaluation may call a submodule (Whisper's encoder)
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps its parameters (FSDP's default)
        for unit in units:
            unit.reshard()


def full_model(model: nn.Module, skeleton: nn.Module) -> nn.Module | None:
    """Every rank: gather the full float32 weights; rank 0 gets a plain (unsharded) copy of the model holding
    them, on the CPU, the other ranks None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    full = copy.deepcopy(skeleton)
    full.load_state_dict(state, assign=True)
    if hasattr(full, "tie_weights"):  # assign gave tied parameters (Whisper's proj_out) separate tensors
        full.tie_weights()
    return full.to("cpu")


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: set[str] | None) -> dict:
    """{"model": ..., "optimizer": ...} as torch.distributed.checkpoint saves and loads them (keyed by
    parameter name, each rank's shards; plain tensors in one process); with `names`
    (train.save_trainable_only), only those parameters of the model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None or not optimizer.state:  # no step taken yet (fp16's first steps may all be skipped):
        state = {"model": get_model_state_dict(model)}  # get_state_dict would take a zero step to make some
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    if names is not None:
        state["model"] = {k: v for k, v in state["model"].items() if k in names}
    return state


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 names: set[str] | None) -> None:
    """Load a torch.distributed.checkpoint folder saved from `sharded_state` at any world size into `model` and
    `optimizer` (None: the model alone), sharded or not; every rank calls it. Exceptions are DCP's (the caller
    names the checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    options = StateDictOptions(strict=names is None)
    if optimizer is not None and not any(k.startswith("optimizer.") for k in _saved_keys(folder)):
        optimizer = None  # saved before the first step: a fresh optimizer is the right one
    with quiet_dcp():
        if optimizer is None:
            state = sharded_state(model, None, names)
        else:  # get_state_dict gives a fresh optimizer state to load into (a zero step at learning rate 0)
            model_state, optim_state = get_state_dict(model, optimizer)
            if names is not None:
                model_state = {k: v for k, v in model_state.items() if k in names}
            state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(folder))
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)


def _saved_keys(folder: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def saved_names(folder: Path) -> list[str]:
    """The model's parameter names a torch.distributed.checkpoint folder holds (from its metadata alone)."""
    return [k[len("model."):] for k in _saved_keys(folder) if k.startswith("model.")]
