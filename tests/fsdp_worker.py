"""Run under torchrun by tests/test_fsdp.py: train each experiment file given, one after the other, in one process
group (one launch for several runs: a launch costs seconds).

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py [--device cuda] A.toml B.toml ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr import distributed as dist  # noqa: E402
from asr.config import load_config  # noqa: E402
from asr.train import train  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    device = "cpu"
    if args[:1] == ["--device"]:
        device, args = args[1], args[2:]
    dist.init_from_env(device)  # gloo on the CPU, NCCL on GPUs
    try:
        for exp in args:
            train(load_config(exp))
    finally:
        dist.cleanup()
