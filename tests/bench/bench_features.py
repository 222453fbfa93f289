"""Feature and resampling speed against transformers' reference paths, on real clips.

    python tests/bench/bench_features.py [--cv ../shared/data/synth-cv/tr] [--batch 16] [--repeats 5]

Prints a table and writes tests/bench/results/features.json. Times are medians over repeats
measured in this one run; the ratios (reference time / ours) are what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import torchaudio.functional as AF  # noqa: E402

from asr.audio import load_audio, log_mel, resample  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cv", default=str(ROOT.parent / "shared" / "data" / "synth-cv" / "tr"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "features.json"))
    args = ap.parse_args()

    from transformers import WhisperFeatureExtractor

    clips_dir = Path(args.cv) / "clips"
    if not clips_dir.is_dir():
        clips_dir = ROOT / "tests" / "fixtures" / "cv-tr" / "clips"
    paths = sorted(clips_dir.glob("*.mp3"))[: args.batch]
    clips = [load_audio(p) for p in paths]
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    arrays = [c.numpy() for c in clips]
    results = {"batch": len(clips), "clips_from": str(clips_dir), "threads": torch.get_num_threads()}

    for n_mels in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=n_mels)
        ours = log_mel(batch, n_mels)
        ref_default = torch.from_numpy(fe(arrays, sampling_rate=16000, return_tensors="np").input_features)

        def numpy_path():  # the extractor's numpy implementation (its path when torch is absent)
            padded = np.zeros((len(arrays), 480000), dtype=np.float32)
            for i, a in enumerate(arrays):
                padded[i, : min(len(a), 480000)] = a[:480000]
            return fe._np_extract_fbank_features(padded, "cpu")

        ref_numpy = torch.from_numpy(numpy_path())
        t_ours = median_time(lambda: log_mel(batch, n_mels), args.repeats)
        t_default = median_time(lambda: fe(arrays, sampling_rate=16000, return_tensors="np"), args.repeats)
        t_numpy = median_time(numpy_path, args.repeats)
        results[f"log_mel_{n_mels}"] = {
            "ours_s": t_ours, "hf_numpy_s": t_numpy, "hf_default_call_s": t_default,
            "speedup_vs_hf_numpy": t_numpy / t_ours, "speedup_vs_hf_default_call": t_default / t_ours,
            "max_abs_diff_vs_hf_numpy": float((ours - ref_numpy).abs().max()),
            "max_abs_diff_vs_hf_default_call": float((ours - ref_default).abs().max()),
        }

    # Resampling 48 kHz -> 16 kHz: ours (batched, whole batch at once) vs the per-clip path.
    raw = [sf.read(p, dtype="float32")[0] for p in paths]
    sr = sf.info(paths[0]).samplerate
    raw_lengths = [len(r) for r in raw]
    raw_batch = torch.zeros(len(raw), max(raw_lengths))
    for i, r in enumerate(raw):
        raw_batch[i, : len(r)] = torch.from_numpy(r)

    def per_clip():
        return [AF.resample(torch.from_numpy(r), sr, 16000) for r in raw]

    def batched():
        return resample(raw_batch, sr, 16000)

    t_ref = median_time(per_clip, args.repeats)
    t_ours = median_time(batched, args.repeats)
    ref_out, ours_out = per_clip(), batched()
    diff = max(float((ours_out[i, : len(r)] - r).abs().max()) for i, r in enumerate(ref_out))
    # End to end, decode + resample one clip after another, as a data loader worker does.
    t_load = median_time(lambda: [load_audio(p) for p in paths], args.repeats)
    results["resample_48k_16k"] = {
        "orig_sr": sr, "per_clip_s": t_ref, "batched_s": t_ours, "speedup": t_ref / t_ours,
        "max_abs_diff": diff, "decode_and_resample_per_clip_ms": 1000 * t_load / len(paths),
    }

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"batch {len(clips)} real clips, {torch.get_num_threads()} threads")
    for n_mels in (80, 128):
        r = results[f"log_mel_{n_mels}"]
        print(f"log_mel {n_mels:3d}: ours {r['ours_s'] * 1000:7.1f} ms | HF numpy {r['hf_numpy_s'] * 1000:7.1f} ms "
              f"({r['speedup_vs_hf_numpy']:.1f}x) | HF default call {r['hf_default_call_s'] * 1000:7.1f} ms "
              f"({r['speedup_vs_hf_default_call']:.1f}x) | max |diff| {r['max_abs_diff_vs_hf_numpy']:.2e}")
    r = results["resample_48k_16k"]
    print(f"resample {r['orig_sr']}->16000: per clip {r['per_clip_s'] * 1000:.1f} ms | batched "
          f"{r['batched_s'] * 1000:.1f} ms ({r['speedup']:.1f}x) | max |diff| {r['max_abs_diff']:.2e} | "
          f"decode+resample {r['decode_and_resample_per_clip_ms']:.2f} ms/clip")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
