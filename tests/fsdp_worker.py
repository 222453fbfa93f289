"""Run under torchrun by tests/test_fsdp.py and tests/test_cuda.py: train each experiment file given, one after the
other, in one process group (one launch for several runs: a launch costs seconds). `FILE@N`: every rank sends
itself SIGTERM during step N, as a scheduler's pre-emption does, so the run saves step N and stops (exit 143),
and the next file goes on. From a file named *conv-fault* on (put it last), grouped bf16 convolutions are wrong
(helpers.faulty_grouped_bf16_conv1d).

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py [--device cuda] A.toml B.toml@3 ...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402

import asr.train as T  # noqa: E402
from asr import distributed as dist  # noqa: E402
from asr.config import load_config  # noqa: E402
from helpers import faulty_grouped_bf16_conv1d  # noqa: E402 (tests/, the script's folder, is on sys.path)

STOP_AT = None
_step = T.train_step


def train_step(run, micro):
    if run.state.step + 1 == STOP_AT:
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler: finish this step, save, stop
    return _step(run, micro)


T.train_step = train_step


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
            if "conv-fault" in Path(exp).name:  # from here on, grouped bf16 convolutions are wrong
                F.conv1d = faulty_grouped_bf16_conv1d(F.conv1d)
            try:
                T.train(load_config(exp))
            except SystemExit as e:
                if not (STOP_AT and e.code == 128 + signal.SIGTERM):
                    raise
    finally:
        dist.cleanup()
