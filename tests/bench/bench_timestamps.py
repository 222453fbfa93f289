"""Does Whisper keep its timestamps and long-form transcription through fine-tuning? (issue 18)

    python tests/bench/bench_timestamps.py                       # the full run (hours on CPU)
    python tests/bench/bench_timestamps.py --steps 6 --batch 4 --eval-limit 16 --recordings 1 --max-s 75 \
        --max-new-tokens 160                                      # the reduced run in the README

Whisper base on the shared synthetic Turkish corpus, three models evaluated the same way:
  pretrained   the model as downloaded
  recipe       fine-tuned --steps steps the usual way (data.timestamp_prob = 0: every label <|notimestamps|>)
  timestamps   the same steps, data and seed with data.timestamp_prob = 0.5 and packing
               (data.concat_prob = 0.5, data.concat_max_s = 30)
each on the test split's clips (short-form WER, greedy) and on a long-form set built from the same clips
(recordings of --min-s to --max-s seconds, decoded with transformers' long-form generate): long-form WER
(normalised and orthographic), the share of 30 s windows whose output has valid increasing timestamps,
and the median boundary error of the aligned segments. Writes tests/bench/results/timestamps.json; the
run is marked "reduced" when it is smaller than the full one (the defaults).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
FULL = {"steps": 200, "batch": 8, "eval_limit": 0, "recordings": 0, "min_s": 60.0, "max_s": 180.0,
        "max_new_tokens": 225}
KEYS = ("wer", "wer_ortho", "cer", "n")
LONG_KEYS = ("wer", "wer_ortho", "cer", "n", "seconds", "windows", "valid_timestamps", "boundary_error_s",
             "boundary_matched")


def settings(args, out: Path, extra: list[str]) -> list[str]:
    return [
        f"run.out_dir={out}", f"run.seed={args.seed}", f"model.name={args.model}",
        f"data.sources=[{{kind = \"common_voice\", path = \"{args.cv}\", language = \"tr\", train = \"train\", "
        f"dev = \"dev\", test = \"test\"}}]",
        f"data.batch_size={args.batch}", "data.num_workers=1", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
        "train.warmup_steps=2", "train.schedule=constant", "train.log_every=1", "train.eval_every=0",
        f"train.save_every={args.steps}", "train.keep_last=1", "eval.at_start=false",
        f"eval.max_utterances={args.eval_limit}", "eval.batch_size=16", "preflight.enabled=false",
        "eval.sets=[{source = \"tr\", split = \"test\", name = \"test\"}, "
        "{source = \"tr\", split = \"test\", name = \"test-long\", kind = \"longform\"}]",
        f"eval.longform_min_s={args.min_s}", f"eval.longform_max_s={args.max_s}",
        f"eval.longform_recordings={args.recordings}", f"decode.max_new_tokens={args.max_new_tokens}",
    ] + extra


def summary(results: dict) -> dict:
    short, long = results["test"], results["test-long"]
    return {"short": {k: short[k] for k in KEYS}, "long": {k: long[k] for k in LONG_KEYS}}


def pretrained(args, work: Path) -> dict:
    from asr.config import load_config
    from asr.evaluation import evaluate_only

    t0 = time.time()
    results = evaluate_only(load_config(None, settings(args, work / "pretrained", [])))
    return {**summary(results), "eval_s": round(time.time() - t0, 1)}


def finetuned(args, work: Path, name: str, extra: list[str]) -> dict:
    import asr.train as T
    from asr.config import load_config

    out = work / name
    t0 = time.time()
    results = T.train(load_config(None, settings(args, out, extra)), fresh=True)
    log = (out / "train.log").read_text(encoding="utf-8")
    steps = [float(x) for x in re.findall(r" ([0-9.]+) s/step", log)]
    return {**summary(results["eval"]), "s_per_step": statistics.median(steps[1:] or steps),
            "train_loss_last": results["train_loss"][-1][1] if results.get("train_loss") else None,
            "total_s": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "whisper-base"))
    p.add_argument("--cv", default=str(SHARED / "data" / "synth-cv" / "tr"))
    p.add_argument("--steps", type=int, default=FULL["steps"])
    p.add_argument("--batch", type=int, default=FULL["batch"])
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=FULL["eval_limit"], help="test clips (0: all 150)")
    p.add_argument("--recordings", type=int, default=FULL["recordings"], help="long recordings (0: as many as fit)")
    p.add_argument("--min-s", type=float, default=FULL["min_s"])
    p.add_argument("--max-s", type=float, default=FULL["max_s"])
    p.add_argument("--max-new-tokens", type=int, default=FULL["max_new_tokens"],
                   help="per clip and per 30 s window (a window cut short has no closing timestamp)")
    p.add_argument("--timestamp-prob", type=float, default=0.5)
    p.add_argument("--concat-prob", type=float, default=0.5)
    p.add_argument("--work", default="/tmp/bench_timestamps")
    p.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "timestamps.json"))
    args = p.parse_args()
    work = Path(args.work)
    t0 = time.time()
    runs = {"pretrained": pretrained(args, work)}
    runs["recipe"] = finetuned(args, work, "recipe", [])
    runs["timestamps"] = finetuned(args, work, "timestamps", [
        f"data.timestamp_prob={args.timestamp_prob}", f"data.concat_prob={args.concat_prob}",
        "data.concat_max_s=30"])
    reduced = {k: getattr(args, k) for k in FULL if getattr(args, k) != FULL[k]}
    result = {"reduced": bool(reduced), "reduced_from_full": {k: [v, FULL[k]] for k, v in reduced.items()},
              "args": vars(args), "runs": runs, "total_s": round(time.time() - t0, 1),
              "short_wer_gap_vs_recipe": runs["timestamps"]["short"]["wer"] - runs["recipe"]["short"]["wer"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
