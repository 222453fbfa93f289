"""torch.distributed helpers; everything degrades to single-process behaviour when not launched by torchrun."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as td


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str) -> None:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); no-op otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        td.init_process_group(backend=backend)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if is_initialized():
        td.barrier()


def sum_values(*values: float) -> tuple[float, ...]:
    """Sum scalars over ranks (float64 on CPU via gloo, or the NCCL device)."""
    if not is_initialized():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return tuple(t.tolist())


def gather_rows(rows: list) -> list:
    """Concatenate a list from every rank (all ranks get the whole list)."""
    if not is_initialized():
        return rows
    parts = [None] * world_size()
    td.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def cleanup() -> None:
    if is_initialized():
        td.destroy_process_group()


def loader_worker_init(worker_id: int = 0) -> None:
    """`worker_init_fn` of every DataLoader: keep stop signals for the main process, which saves a checkpoint
    and then stops. A terminal's Ctrl-C, a scheduler, and torchrun (os.killpg on each rank) signal the whole
    process group; a worker killed by it makes the main process fail on the spot ("DataLoader worker ... is
    killed by signal") without saving. So the worker leaves the process group (group signals no longer reach
    it) and ignores SIGINT. It still ends with the main process: the loader shuts it down, multiprocessing's
    exit handler terminates it (SIGTERM, sent to it alone), or it sees that the main process is gone."""
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
