"""Clips per second of one data-loader worker's decoding (`asr.audio.load_audio`: the mp3 truncation check,
decoding, resampling to 16 kHz) and of data preparation's header probe (`audio_info`), on one thread.

    python tests/bench/bench_audio_loader.py --cv ../shared/data/synth-cv/tr --clips 300
    python tests/bench/bench_audio_loader.py --repo ../main --out /tmp/before.json   # another checkout's asr

Each figure is the best of --rounds passes over the same clips (the files are in the page cache after the
first), so it measures the CPU work per clip, not the disk.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
from benchlib import write_result  # noqa: E402 (tests/bench is the script's folder: on sys.path)


def best_rate(fn, items, rounds: int) -> float:
    """Items per second: the best of `rounds` passes."""
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for x in items:
            fn(x)
        best = max(best, len(items) / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv", default=str(ROOT.parent / "shared" / "data" / "synth-cv" / "tr"))
    ap.add_argument("--clips", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose asr package is measured")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "audio_loader.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.repo).resolve()))
    import soundfile as sf
    import torch

    import asr.audio as A

    torch.set_num_threads(1)  # a loader worker's share
    cv = Path(args.cv)
    with open(cv / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: args.clips]
    paths = [str(cv / "clips" / r["path"]) for r in rows]
    A.load_audio(paths[0])  # warm up (imports, resampling kernels)
    result = {
        "asr": str(Path(A.__file__).resolve()),
        "clips": len(paths),
        "load_audio_clips_per_s": best_rate(A.load_audio, paths, args.rounds),
        "audio_info_clips_per_s": best_rate(A.audio_info, paths, args.rounds),
        "truncation_check_clips_per_s": best_rate(lambda p: A.mpeg_truncation(Path(p).read_bytes()), paths,
                                                  args.rounds),
        "soundfile_read_clips_per_s": best_rate(lambda p: sf.read(p, dtype="float32"), paths, args.rounds),
    }
    write_result(result, args.out, digits=1)


if __name__ == "__main__":
    main()
