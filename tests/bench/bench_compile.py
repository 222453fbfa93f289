"""`train.compile = true` against eager: compile time and steady-state step time, Whisper base.

    python tests/bench/bench_compile.py --steps 20 --batch 8

Whisper base fine-tuned on the shared Turkish corpus (experiments/tr_whisper_base.toml) for --steps steps,
once eager and once with the training forward compiled (inductor), same seed, data order and precision (the
default, `auto`: bf16 on a CPU with native bf16, else fp32; --precision sets it). Pre-flight and the step-0
evaluation are off, the end's evaluation reads one clip: each run's wall time is start-up, training and the
final checkpoint. Reports per run: the first step (the
compiled run compiles there), the steps that recompiled (label lengths the first graph did not cover), the
median step over the last half of the steps (steady state), wall time; and the steady-state ratio, the
compile overhead (the compiled run's wall time minus what its steps would have taken at its steady-state rate,
minus the same for eager) and the largest per-step loss difference. CTC models cannot compile yet (a
ConfigError: inductor's backward fails on clips of varying length with torch 2.9), so only Whisper is
measured. Writes tests/bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

from benchlib import ROOT, shared_args, trained_precision, whisper_base_run  # tests/bench is the script's folder: on sys.path


def run(args, compiled: bool) -> dict:
    out = Path(args.work) / ("compiled" if compiled else "eager")
    cmd = whisper_base_run(
        args, out, "dev", f"train.max_steps={args.steps}", f"train.warmup_steps={min(5, args.steps)}",
        "train.log_every=1", f"train.precision={args.precision}", f"train.compile={str(compiled).lower()}",
        f"train.eval_every={args.steps + 1}", f"train.save_every={args.steps + 1}", "eval.at_start=false",
        "eval.max_utterances=1", "preflight.enabled=false") + ["--fresh"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    log = (out / "train.log").read_text(encoding="utf-8")
    steps = re.findall(r"step (\d+)/\d+ loss ([\d.]+) .* ([\d.]+) s/step", log)
    times = [float(s) for _, _, s in steps]
    steady = statistics.median(times[len(times) // 2:])
    return {"wall_s": wall, "precision": trained_precision(log), "step_times": times,
            "losses": [float(x) for _, x, _ in steps], "first_step_s": times[0], "steady_step_s": steady,
            "slow_steps": [i + 1 for i, s in enumerate(times) if i and s > 2 * steady],
            "overhead_s": wall - steady * len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_args(ap)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--work", default="/tmp/asr-bench-compile")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "compile.json"))
    args = ap.parse_args()
    eager, compiled = run(args, False), run(args, True)
    result = {"settings": vars(args), "eager": eager, "compiled": compiled,
              "steady_step_ratio_eager_over_compiled": eager["steady_step_s"] / compiled["steady_step_s"],
              "compile_overhead_s": compiled["overhead_s"] - eager["overhead_s"],
              "max_loss_difference": max(abs(a - b) for a, b in zip(eager["losses"], compiled["losses"]))}
    for name, r in (("eager", eager), ("compiled", compiled)):
        print(f"{name:9s} ({r['precision']}): first step {r['first_step_s']:.1f} s, steady {r['steady_step_s']:.2f} "
              f"s/step, slow steps {r['slow_steps']}, wall {r['wall_s']:.0f} s")
    print(f"steady-state step: {result['steady_step_ratio_eager_over_compiled']:.2f}x eager's speed; "
          f"compile overhead {result['compile_overhead_s']:.0f} s; "
          f"largest per-step loss difference {result['max_loss_difference']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
