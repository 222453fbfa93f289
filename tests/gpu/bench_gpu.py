"""GPU micro-benchmarks for tests/gpu/check.sh: Whisper's log-mel features on the GPU against the CPU (time and
largest difference), and the GPU's measured bf16 matmul rate (the peak that achieved training FLOP/s are a fraction
of). Writes tests/bench/results/gpu_features.json.

    python tests/gpu/bench_gpu.py [--device cuda] [--batch 16] [--out FILE]

`--device cpu` runs the same code with the CPU on both sides (a check of this script where no GPU is lent).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bench"))


def timed(fn, sync, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16, help="clips per log-mel batch (default 16)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each clip (default 10 s)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "gpu_features.json"))
    args = ap.parse_args()

    import torch

    from asr.audio import log_mel
    from benchlib import matmul_flops_per_s

    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA GPU visible to torch", file=sys.stderr)
        return 1
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(args.batch, int(args.seconds * 16000), generator=g) * 0.1  # (B, N)
    on_device = audio.to(args.device)
    cpu_s = timed(lambda: log_mel(audio, 80), lambda: None, args.repeats)
    dev_s = timed(lambda: log_mel(on_device, 80), sync, args.repeats)
    diff = (log_mel(on_device, 80).cpu() - log_mel(audio, 80)).abs().max().item()
    dtype = "bf16" if not gpu or torch.cuda.is_bf16_supported() else "fp16"
    n = args.matmul_n if gpu else 1024
    peak = matmul_flops_per_s(n, 10 if gpu else 2, 5 if gpu else 2, args.device, dtype)
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "log_mel": {"batch": args.batch, "seconds_per_clip": args.seconds, "cpu_s": cpu_s, "device_s": dev_s,
                    "speedup": cpu_s / dev_s, "max_abs_diff": diff, "cpu_threads": torch.get_num_threads()},
        "matmul": {"dtype": dtype, "n": n, "flops_per_s": peak},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"log-mel of {args.batch} x {args.seconds:g} s: CPU {1e3 * cpu_s:.1f} ms ({torch.get_num_threads()} threads), "
          f"{result['device']} {1e3 * dev_s:.2f} ms ({cpu_s / dev_s:.1f}x), largest difference {diff:.2e}")
    print(f"{dtype} matmul {n}x{n}: {peak / 1e12:.1f} TFLOP/s on {result['device']}")
    print(f"wrote {args.out}")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
