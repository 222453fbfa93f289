"""What the benchmark scripts share: the shared corpus and model arguments, printing plus writing a result, the
machine's matmul rate (for FLOP/s fractions)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def shared_args(ap: argparse.ArgumentParser) -> None:
    """--model (Whisper base of ../shared), --cv (its Turkish Common Voice folder), --lang."""
    ap.add_argument("--model", default=str(SHARED / "models" / "whisper-base"))
    ap.add_argument("--cv", default=str(SHARED / "data" / "synth-cv" / "tr"))
    ap.add_argument("--lang", default="tr")


def whisper_base_run(args, out: Path, dev: str, *sets: str) -> list[str]:
    """The run.py command of experiments/tr_whisper_base.toml on --model and --cv (--lang), with `dev` as the
    source's dev split, run.out_dir `out`, run.seed --seed, data.batch_size --batch and the `sets` (KEY=VALUE)."""
    cmd = [sys.executable, str(ROOT / "run.py"), "--exp", str(ROOT / "experiments" / "tr_whisper_base.toml"),
           "--set", f"run.out_dir={out}", "--set", f"run.seed={args.seed}",
           "--set", f"model.name={Path(args.model).resolve()}",
           "--set", f'data.sources=[{{kind = "common_voice", path = "{Path(args.cv).resolve()}", '
                    f'language = "{args.lang}", train = "train", dev = "{dev}"}}]',
           "--set", f"data.batch_size={args.batch}"]
    for kv in sets:
        cmd += ["--set", kv]
    return cmd


def write_result(result: dict, out: str | Path, digits: int = 2) -> None:
    """Print a flat result as a two-column table and write it as JSON to `out`."""
    for key, value in result.items():
        print(f"{key:32s} {value:.{digits}f}" if isinstance(value, float) else f"{key:32s} {value}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def trained_precision(log: str) -> str:
    """The precision a run's train.log says it trained in (what `auto` resolved to)."""
    return re.search(r"training precision (\w+)", log).group(1)


def matmul_flops_per_s(n: int = 3072, repeats: int = 3, rounds: int = 5, device: str = "cpu",
                       dtype: str = "fp32") -> float:
    """The machine's matmul rate in `dtype` on `device`: the best of several timed rounds (the first call warms the
    threads, or the GPU's clocks and cuBLAS, up)."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a, b = torch.randn(n, n, device=device, dtype=kind), torch.randn(n, n, device=device, dtype=kind)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        sync()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t))
    return best
