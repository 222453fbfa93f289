"""On-the-fly augmentation (`[augment]`) on the shared corpus: does it help a low-resource run?

    python tests/bench/bench_augment.py                      # the full size (hours on 2 CPU cores)
    python tests/bench/bench_augment.py --steps 300 --seeds 0 --whisper-steps 0   # a reduced run

Part 1, the small CTC model of bench_ctc.py trained from scratch (`--steps` steps of `--batch` clips,
lr 2e-3, linear decay, the same model and seed for each setting), scored on the test split (speakers
unseen in training), for each seed: no augmentation, speed perturbation (0.9/1.0/1.1), and speed
perturbation plus additive noise (SNR 10-30 dB, half of the clips) from coloured noise (white, pink,
brown, blue) that this script generates into `--work`/noise (nothing downloaded).
Part 2, Whisper base fine-tuned `--whisper-steps` steps without and with SpecAugment on its log-mel
features (time masks 0.05 x 10 frames, at least 2; mel masks 0.05 x 10 channels), scored on the first
`--whisper-eval-limit` test clips (0: all 150). `--whisper-steps 0` skips it.
Writes tests/bench/results/augment.json (with the settings, so a reduced run says it is one).
The parts can run as separate processes (e.g. one seed each, `OMP_NUM_THREADS=1`) and be combined:

    python tests/bench/bench_augment.py --merge seed0.json seed1.json seed2.json whisper.json
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
sys.path.insert(0, str(Path(__file__).parent))
SHARED = ROOT.parent / "shared"

from benchlib import trained_precision  # noqa: E402

CTC_SETTINGS = {
    "none": [],
    "speed": ["augment.speed=[0.9, 1.0, 1.1]"],
    "speed_noise": ["augment.speed=[0.9, 1.0, 1.1]", "augment.noise_dir={noise}", "augment.snr_db=[10, 30]",
                    "augment.noise_prob=0.5"],
}
WHISPER_SETTINGS = {
    "none": [],
    "specaugment": ["augment.mask_time_prob=0.05", "augment.mask_time_length=10", "augment.mask_time_min_masks=2",
                    "augment.mask_feature_prob=0.05", "augment.mask_feature_length=10"],
}
FULL = {"steps": 1000, "seeds": [0, 1, 2], "whisper_steps": 50, "whisper_eval_limit": 0}


def write_noise(folder: Path, seconds: float = 20.0, sample_rate: int = 16000) -> list[str]:
    """Coloured noise clips: power spectral density ~ 1/f^beta (white 0, pink 1, brown 2, blue -1)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    n = int(seconds * sample_rate)
    names = []
    for name, beta in (("white", 0.0), ("pink", 1.0), ("brown", 2.0), ("blue", -1.0)):
        spectrum = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / sample_rate)
        f[0] = f[1]
        noise = np.fft.irfft(spectrum / f ** (beta / 2), n)
        noise = (0.5 * noise / np.abs(noise).max()).astype("float32")
        path = folder / f"{name}.{'wav' if name == 'white' else 'flac'}"
        sf.write(path, noise, sample_rate)
        names.append(path.name)
    return names


def ctc_run(args, seed: int, setting: str, work: Path, noise: Path) -> dict:
    import asr.train as T
    from asr.config import load_config
    from bench_ctc import base_overrides

    out = work / f"ctc-{setting}-seed{seed}"
    run_args = argparse.Namespace(cv=args.cv, seed=seed, batch=args.batch, steps=args.steps, lr=args.lr,
                                  warmup=args.warmup, eval_split="test")
    extra = [o.replace("{noise}", str(noise)) for o in CTC_SETTINGS[setting]]
    cfg = load_config(None, base_overrides(run_args, out) + [
        "data.cache_audio=true", "eval.at_start=false", "preflight.enabled=false", "train.log_every=10",
        f"train.schedule={args.schedule}"] + args.ctc_set + extra)
    t = time.perf_counter()
    results = T.train(cfg, fresh=True)
    wall = time.perf_counter() - t
    m = next(iter(results["eval"].values()))
    log = (out / "train.log").read_text(encoding="utf-8")
    steps = [float(x) for x in re.findall(r" ([0-9.]+) s/step", log)]
    return {"setting": setting, "seed": seed, "cer": m["cer"], "wer": m["wer"], "test_loss": m["loss"], "n": m["n"],
            "final_train_loss": results["train_loss"][-1][1] if results["train_loss"] else None,
            "train_audio_s_per_s": results["train_audio_s_per_s"], "s_per_step": statistics.median(steps[1:] or steps),
            "wall_s": wall, "precision": trained_precision(log), "threads": torch_threads()}


def whisper_run(args, setting: str, work: Path) -> dict:
    import asr.train as T
    from asr.config import load_config

    out = work / f"whisper-{setting}"
    cfg = load_config(None, [
        f"run.out_dir={out}", "run.seed=0", f"model.name={args.whisper_model}",
        f"data.sources=[{{kind = \"common_voice\", path = \"{args.cv}\", language = \"tr\", train = \"train\", "
        f"dev = \"dev\", test = \"test\"}}]",
        f"data.batch_size={args.whisper_batch}", "data.num_workers=1", "data.cache_audio=true",
        f"train.max_steps={args.whisper_steps}", f"train.lr={args.whisper_lr}", "train.warmup_steps=5",
        "train.schedule=constant", "train.log_every=1", "train.eval_every=0",
        f"train.save_every={args.whisper_steps}", "train.keep_last=1", "eval.split=test",
        f"eval.max_utterances={args.whisper_eval_limit}", "eval.batch_size=16", "eval.at_start=false",
        "decode.max_new_tokens=64", "preflight.enabled=false",
    ] + args.whisper_set + WHISPER_SETTINGS[setting])
    t = time.perf_counter()
    results = T.train(cfg, fresh=True)
    wall = time.perf_counter() - t
    m = next(iter(results["eval"].values()))
    log = (out / "train.log").read_text(encoding="utf-8")
    steps = [float(x) for x in re.findall(r" ([0-9.]+) s/step", log)]
    return {"setting": setting, "wer": m["wer"], "wer_ortho": m["wer_ortho"], "cer": m["cer"], "n": m["n"],
            "s_per_step": statistics.median(steps[1:] or steps), "wall_s": wall, "precision": trained_precision(log),
            "threads": torch_threads()}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def merge(args) -> None:
    """Combine result files of separate processes (seeds, the Whisper part) into one, with their settings."""
    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.merge]
    out = {"merged_from": [{"file": str(p), "settings": d["settings"], "note": d.get("note")}
                           for p, d in zip(args.merge, parts)],
           "full_size": FULL, "noise_files": parts[0]["noise_files"],
           "ctc": {"runs": [r for d in parts for r in d["ctc"]["runs"]]},
           "whisper": {"runs": [r for d in parts for r in d["whisper"]["runs"]]}}
    ctc = out["ctc"]["runs"]
    whisper_steps = {d["settings"]["whisper_steps"] for d in parts if d["whisper"]["runs"]}
    seeds = {s: sorted(r["seed"] for r in ctc if r["setting"] == s) for s in CTC_SETTINGS}
    out["reduced"] = (any(seeds[s] != FULL["seeds"] for s in CTC_SETTINGS)
                      or any(d["settings"]["steps"] < FULL["steps"] for d in parts if d["ctc"]["runs"])
                      or sorted(r["setting"] for r in out["whisper"]["runs"]) != sorted(WHISPER_SETTINGS)
                      or any(w < FULL["whisper_steps"] for w in whisper_steps))
    out["ctc"]["summary"] = summarise(ctc)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out["ctc"]["summary"], indent=1))
    for r in out["whisper"]["runs"]:
        print(f"whisper {r['setting']}: WER {r['wer']:.2f} CER {r['cer']:.2f}")
    print(f"reduced: {out['reduced']}")


def summarise(runs: list[dict]) -> dict:
    by = {}
    for r in runs:
        by.setdefault(r["setting"], []).append(r)
    return {s: {"cer_mean": statistics.mean(r["cer"] for r in rs), "wer_mean": statistics.mean(r["wer"] for r in rs),
                "test_loss_mean": statistics.mean(r["test_loss"] for r in rs),
                "cer": [r["cer"] for r in rs], "s_per_step_median": statistics.median(r["s_per_step"] for r in rs)}
            for s, rs in by.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cv", default=str(SHARED / "data" / "synth-cv" / "tr"))
    ap.add_argument("--steps", type=int, default=FULL["steps"])
    ap.add_argument("--seeds", type=int, nargs="*", default=FULL["seeds"], help="none: skip the CTC part")
    ap.add_argument("--settings", nargs="+", default=list(CTC_SETTINGS), choices=list(CTC_SETTINGS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--schedule", default="linear", help="after warmup: linear (bench_ctc's) | constant | cosine")
    ap.add_argument("--whisper-model", default=str(SHARED / "models" / "whisper-base"))
    ap.add_argument("--whisper-steps", type=int, default=FULL["whisper_steps"], help="0: skip Whisper")
    ap.add_argument("--whisper-batch", type=int, default=8)
    ap.add_argument("--whisper-lr", type=float, default=1e-5)
    ap.add_argument("--whisper-eval-limit", type=int, default=FULL["whisper_eval_limit"])
    ap.add_argument("--work", default="/tmp/asr-bench-augment")
    ap.add_argument("--ctc-set", action="append", default=["train.precision=fp32"], metavar="KEY=VALUE",
                    help="extra override for every CTC run (default: fp32, the precision of the seed-0 run)")
    ap.add_argument("--whisper-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for both Whisper runs (e.g. train.precision=bf16)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: combine the runs of these result files into --out")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "augment.json"))
    args = ap.parse_args()
    if args.merge:
        return merge(args)

    work = Path(args.work)
    noise = work / "noise"
    files = write_noise(noise)
    reduced = (args.steps < FULL["steps"] or args.batch != 16 or args.schedule != "linear" or len(args.seeds) < len(FULL["seeds"]) or len(args.settings) < 3
               or args.whisper_steps < FULL["whisper_steps"] or args.whisper_eval_limit != 0)
    out = {"settings": vars(args), "reduced": reduced, "full_size": FULL, "noise_files": files,
           "ctc": {"runs": []}, "whisper": {"runs": []}}

    def save() -> None:
        out["ctc"]["summary"] = summarise(out["ctc"]["runs"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")

    for seed in args.seeds:
        for setting in args.settings:
            r = ctc_run(args, seed, setting, work, noise)
            print(f"ctc seed {seed} {setting}: CER {r['cer']:.2f} WER {r['wer']:.2f} {r['s_per_step']:.3f} s/step",
                  flush=True)
            out["ctc"]["runs"].append(r)
            save()
    if args.whisper_steps > 0:
        for setting in WHISPER_SETTINGS:
            r = whisper_run(args, setting, work)
            print(f"whisper {setting}: WER {r['wer']:.2f} CER {r['cer']:.2f} {r['s_per_step']:.2f} s/step", flush=True)
            out["whisper"]["runs"].append(r)
            save()
    save()
    print(json.dumps(out["ctc"]["summary"], indent=1))


if __name__ == "__main__":
    main()
