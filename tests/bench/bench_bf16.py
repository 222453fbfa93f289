"""bf16 autocast on the CPU against fp32: may `train.precision = "auto"` pick bf16 where the CPU has it?

    python tests/bench/bench_bf16.py --steps 20 100 --batch 4 --eval-limit 50

Whisper base fine-tuned on the shared Turkish corpus (experiments/tr_whisper_base.toml) once in fp32 and once
in bf16 (autocast; float32 weights, optimizer state, features and loss), on the same seed, data order and
settings: a constant learning rate after warmup, so the run stopped at the first --steps value and resumed to
the next is the run that never stopped (the tests prove resume exact). Each stop is evaluated on the first
--eval-limit clips of the test split in the run's own precision: normalised and orthographic WER, and the
median training s/step. Writes tests/bench/results/bf16.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

from benchlib import ROOT, shared_args, whisper_base_run  # tests/bench is the script's folder: on sys.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_args(ap)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eval-limit", type=int, default=50, help="the first N test clips (0: all 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--work", default="/tmp/asr-bench-bf16")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "bf16.json"))
    args = ap.parse_args()
    result = {"settings": vars(args), "runs": {}}
    for precision in args.precisions:
        out = Path(args.work) / precision
        rows = []
        for i, steps in enumerate(sorted(args.steps)):
            cmd = whisper_base_run(
                args, out, "test", f"train.max_steps={steps}", "train.schedule=constant",
                f"train.warmup_steps={args.warmup}", f"train.lr={args.lr}", f"train.precision={precision}",
                f"train.eval_every={max(args.steps) + 1}", f"train.save_every={max(args.steps) + 1}",
                "eval.at_start=false", f"eval.max_utterances={args.eval_limit}", "preflight.enabled=false")
            if i == 0:
                cmd.append("--fresh")
            t = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT)
            wall = time.perf_counter() - t
            ev = json.loads((out / "eval" / f"step-{steps:06d}.json").read_text())
            log = (out / "train.log").read_text()
            step_s = [float(m) for m in re.findall(r" ([\d.]+) s/step", log)]
            rows.append({"steps": steps, "wer": ev["wer"], "wer_ortho": ev["wer_ortho"], "cer": ev["cer"],
                         "n": ev["n"], "wall_s": wall, "logged_s_per_step": step_s})
            print(f"{precision} step {steps}: WER {ev['wer']:.2f} (ortho {ev['wer_ortho']:.2f}), {wall:.0f} s",
                  flush=True)
        picked = re.findall(r"training precision (\w+)", (out / "train.log").read_text())
        all_s = [s for r in rows for s in r["logged_s_per_step"]]
        result["runs"][precision] = {"picked": picked[-1] if picked else None, "stops": rows,
                                     "s_per_step_median": statistics.median(all_s) if all_s else None}
    if {"fp32", "bf16"} <= result["runs"].keys():
        f, b = result["runs"]["fp32"], result["runs"]["bf16"]
        result["wer_difference_bf16_minus_fp32"] = {r["steps"]: s["wer"] - r["wer"] for r, s in zip(f["stops"], b["stops"])}
        if f["s_per_step_median"] and b["s_per_step_median"]:
            result["step_speedup_bf16"] = f["s_per_step_median"] / b["s_per_step_median"]
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
