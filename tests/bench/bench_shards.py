"""A corpus as a Common Voice folder source vs as Parquet shards streamed (asr.shards), at 1x and repeated 10x
and 50x: start-up time to the first training step, peak resident memory and training samples/s of a tiny
scratch CTC model (tests/helpers.py's tiny_ctc_config, batches of 8, one loader worker).

    flock /work/notes/bench.lock python tests/bench/bench_shards.py [--corpus ../shared/data/synth-cv/tr]
        [--scales 1,10,50] [--steps 30] [--shard-mb 4] [--kinds folder,shards] [--dir runs/bench-shards]

The Nx corpora repeat the rows, not the audio: the folder source's train.tsv lists every clip N times (each a
symlink of its own to the clip, so none is read as a duplicate), the shards' index.json lists every shard N
times (symlinks to the 1x shard files); both hold N times the hours. Each configuration runs in a fresh
process: start-up is the time from the call of asr.train.train to the start of the first step (reading the
corpus, the vocabulary, the model, the loader; pre-flight is off for both: `--check` is separate), peak RSS the
process's ru_maxrss at its end (batches capped at data.max_batch_s = 40 so that the steps' activations peak
alike) and at the start of the first step (the corpus, model and loader before any forward pass), samples/s
and audio s/s results.json's training throughput (batches differ: the folder source buckets clips by duration
over the whole corpus, the shards within each stream's shuffle buffer). Writes
tests/bench/results/shards.json. Figures on a shared machine: only ratios within one invocation mean much.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def child(spec: dict) -> None:
    """One training run in this process; prints its figures as JSON on the last line."""
    import torch

    import asr.train as train_mod
    from asr.config import SourceConfig, validate
    from helpers import tiny_ctc_config

    torch.set_num_threads(1)
    cfg = tiny_ctc_config(spec["out"], max_steps=spec["steps"], log_every=max(1, spec["steps"] // 3), save_every=0,
                          eval_every=0)
    train_src = (SourceConfig(kind="shards", path=spec["path"], language="tr", train="train", dev="", test="")
                 if spec["kind"] == "shards" else
                 SourceConfig(kind="common_voice", path=spec["path"], language="tr", train="train", dev="", test=""))
    cfg.data.sources = [train_src, SourceConfig(name="dev", kind="common_voice", path=spec["corpus"], language="tr",
                                                train="", dev="dev", test="")]
    cfg.data.num_workers, cfg.data.batch_size, cfg.data.max_batch_s = 1, 8, 40.0  # activations capped alike
    cfg.eval.at_start, cfg.eval.max_utterances = False, 8
    cfg.preflight.enabled = False
    validate(cfg)
    first = {}
    step = train_mod.train_step

    def timed(run, micro):
        if "t" not in first:
            first["t"], first["rss"] = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return step(run, micro)

    train_mod.train_step = timed
    t0 = time.time()
    results = train_mod.train(cfg, fresh=True)
    print(json.dumps({"startup_s": round(first["t"] - t0, 3), "total_s": round(time.time() - t0, 3),
                      "rss_at_first_step_mb": round(first["rss"], 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "samples_per_s": round(results["train_samples_per_s"], 2),
                      "audio_s_per_s": round(results["train_audio_s_per_s"], 2)}))


def folder_corpus(corpus: Path, scale: int, out: Path) -> Path:
    """A Common Voice folder whose train.tsv lists each clip `scale` times (symlinks to the clips)."""
    if (out / "train.tsv").is_file():
        return out
    (out / "clips").mkdir(parents=True)
    with open(corpus / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with open(out / "train.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        for k in range(scale):
            for row in rows:
                name = f"r{k}_{row['path']}" if scale > 1 else row["path"]
                os.symlink((corpus / "clips" / row["path"]).resolve(), out / "clips" / name)
                w.writerow(dict(row, path=name))
    return out


def repeated_shards(base: Path, scale: int, out: Path) -> Path:
    """A shards folder whose index.json lists every shard of `base` `scale` times (symlinks to its files)."""
    if (out / "index.json").is_file():
        return out
    out.mkdir(parents=True)
    index = json.loads((base / "index.json").read_text(encoding="utf-8"))
    shards = []
    for k in range(scale):
        for s in index["shards"]:
            name = f"r{k}-{s['file']}"
            os.symlink((base / s["file"]).resolve(), out / name)
            shards.append(dict(s, file=name))
    index.update(shards=shards, rows=index["rows"] * scale, hours=round(index["hours"] * scale, 6))
    (out / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "synth-cv" / "tr"))
    ap.add_argument("--scales", default="1,10,50")
    ap.add_argument("--kinds", default="folder,shards")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shard-mb", type=float, default=4.0)
    ap.add_argument("--dir", default=str(ROOT / "runs" / "bench-shards"))
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "shards.json"))
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    from asr.shards import write_shards
    from helpers import tiny_ctc_config

    corpus, work = Path(args.corpus), Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.time()
    cfg = tiny_ctc_config(work / "unused")
    cfg.data.sources[0].path = str(corpus)
    index = write_shards(cfg, "train", work / "shards-1x", shard_mb=args.shard_mb, log=lambda m: None)
    write_s = time.time() - t0
    print(f"wrote {len(index['shards'])} shards ({index['rows']} clips, {index['hours']:.3f} h) in {write_s:.1f} s",
          flush=True)
    runs = []
    for scale in [int(s) for s in args.scales.split(",")]:
        for kind in args.kinds.split(","):
            path = (folder_corpus(corpus, scale, work / f"folder-{scale}x") if kind == "folder" else
                    repeated_shards(work / "shards-1x", scale, work / f"shards-{scale}x"))
            spec = {"kind": kind, "path": str(path), "corpus": str(corpus), "steps": args.steps,
                    "out": str(work / f"run-{kind}-{scale}x")}
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                               env=env, cwd=ROOT)
            if p.returncode:
                sys.exit(f"{kind} {scale}x failed:\n{p.stderr[-2000:]}")
            figures = json.loads(p.stdout.strip().splitlines()[-1])
            row = {"kind": kind, "scale": scale, "clips": index["rows"] * scale,
                   "hours": round(index["hours"] * scale, 3), **figures}
            runs.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"run-{kind}-{scale}x", ignore_errors=True)
    summary = {}
    for kind in args.kinds.split(","):
        mine = [r for r in runs if r["kind"] == kind]
        if len(mine) > 1:
            summary[kind] = {"rss_growth_largest_over_1x": round(mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"], 3),
                             "rss_at_first_step_growth": round(mine[-1]["rss_at_first_step_mb"]
                                                               / mine[0]["rss_at_first_step_mb"], 3),
                             "startup_growth_largest_over_1x": round(mine[-1]["startup_s"] / mine[0]["startup_s"], 3)}
    result = {"corpus": str(corpus), "steps": args.steps, "shard_mb": args.shard_mb, "shards_1x": len(index["shards"]),
              "model": "tiny scratch CTC (tests/helpers.py tiny_ctc_config), batch 8, 1 loader worker, 1 thread",
              "write_shards_s": round(write_s, 2), "runs": runs, "summary": summary,
              "note": "a shared 2-core machine (other jobs running): compare ratios within this file only"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
