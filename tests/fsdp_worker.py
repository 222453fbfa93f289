"""Run under torchrun by tests/test_fsdp.py and tests/test_cuda.py: train each experiment file given, one after the
other, in one process group (one launch for several runs: a launch costs seconds). `FILE@N`: every rank sends
itself SIGTERM during step N, as a scheduler's pre-emption does, so the run saves step N and stops (exit 143),
and the next file goes on. A file named *conv-fault* (last) runs with wrong grouped bf16 convolutions.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py [--device cuda] A.toml B.toml@3 ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asr.train as T  # noqa: E402
from asr import distributed as dist  # noqa: E402
from asr.config import load_config  # noqa: E402

STOP_AT = None
_step = T.train_step


def train_step(run, micro):
    if run.state.step + 1 == STOP_AT:
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler: finish this step, save, stop
    return _step(run, micro)


T.train_step = train_step


def fault_grouped_bf16_convs():
    """A file named *conv-fault*: from here on grouped bf16 convolutions return wrong values (negated), as torch 2.9's
    oneDNN does for some shapes on CPUs with native bf16, whatever this CPU does."""
    import torch
    import torch.nn.functional as F

    real = F.conv1d
    F.conv1d = lambda x, w, *a, **k: real(x, w, *a, **k) * (
        -1 if x.dtype == torch.bfloat16 and x.shape[1] != w.shape[1] else 1)

if __name__ == "__main__":
    args = sys.argv[1:]
    device = "cpu"
    if args[:1] == ["--device"]:
        device, args = args[1], args[2:]
    dist.init_from_env(device)  # gloo on the CPU, NCCL on GPUs
    try:
        for exp in args:
            exp, _, stop = exp.partition("@")
            STOP_AT = int(stop) if stop else None
            if "conv-fault" in Path(exp).name:
                fault_grouped_bf16_convs()
            try:
                T.train(load_config(exp))
            except SystemExit as e:
                if not (STOP_AT and e.code == 128 + signal.SIGTERM):
                    raise
    finally:
        dist.cleanup()
