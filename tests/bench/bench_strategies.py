"""Fine-tuning strategies and decoders side by side, on the shared assets.

    python tests/bench/bench_strategies.py [--steps 40] [--batch 8] [--eval-limit 50]

Part 1, Whisper base on the synthetic Turkish corpus, the same steps, data and seed for each:
full fine-tuning, decoder only, and LoRA (rank 16 on the attention projections): WER (normalised
and orthographic) before and after, seconds per step, trainable parameters.
Part 2, a small CTC model trained from scratch on the same corpus, decoded greedily, with a
prefix beam search, and with a beam search fused with a word 3-gram LM built from the training
transcripts (LM weight and word bonus tuned on dev over a small grid): CER and WER on the test
split. `--part ctc --reuse` decodes the CTC model an earlier run trained without training again.
Writes tests/bench/results/strategies.json.
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


def whisper_run(args, name: str, extra: list[str], work: Path) -> dict:
    import asr.train as T
    from asr.config import load_config

    out = work / name
    cfg = load_config(None, [
        f"run.out_dir={out}", "run.seed=0", f"model.name={SHARED / 'models' / 'whisper-base'}",
        f"data.sources=[{{kind = \"common_voice\", path = \"{SHARED / 'data' / 'synth-cv' / 'tr'}\", "
        f"language = \"tr\", train = \"train\", dev = \"dev\"}}]",
        f"data.batch_size={args.batch}", "data.num_workers=1", f"train.max_steps={args.steps}",
        "train.warmup_steps=5", "train.schedule=constant", "train.log_every=1", "train.eval_every=0",
        f"train.save_every={args.steps}", "train.keep_last=1", f"eval.max_utterances={args.eval_limit}",
        "eval.batch_size=16", "decode.max_new_tokens=64", "preflight.enabled=false",
    ] + extra)
    results = T.train(cfg, fresh=True)
    log = (out / "train.log").read_text(encoding="utf-8")
    steps = [float(x) for x in re.findall(r" ([0-9.]+) s/step", log)]
    trainable = re.search(r"^all\s+([\d,]+)\s+([\d,]+)", log, re.M)
    before = json.loads((out / "eval" / "step-000000.json").read_text())
    after = next(iter(results["eval"].values()))
    return {"wer_before": before["wer"], "wer_after": after["wer"], "wer_ortho_after": after["wer_ortho"],
            "cer_after": after["cer"], "s_per_step": statistics.median(steps[2:] or steps),
            "trainable": int(trainable.group(1).replace(",", "")), "total": int(trainable.group(2).replace(",", ""))}


def ctc_part(args, work: Path) -> dict:
    import subprocess

    import asr.train as T
    from asr.config import load_config

    out = work / "ctc"
    base = [
        f"run.out_dir={out}", "run.seed=0",
        f"data.sources=[{{kind = \"common_voice\", path = \"{SHARED / 'data' / 'synth-cv' / 'tr'}\", "
        f"language = \"tr\", train = \"train\", dev = \"dev\"}}]",
        "data.text.lowercase=true", "data.text.chars_to_ignore=\",?.!;:\\\"“”‘’%-\"", "data.batch_size=0",
        "data.max_batch_s=60", "data.num_workers=1", "model.init=scratch", "model.name=", "model.hidden_size=144",
        "model.num_layers=3", "model.num_heads=4", "model.intermediate_size=384", "model.conv_dim=[64,64,64,64,64,64,64]",
        "model.freeze_feature_encoder=false", "model.mask_time_prob=0.05", f"train.max_steps={args.ctc_steps}",
        "train.lr=2e-3", "train.warmup_steps=100", "train.eval_every=0", f"train.save_every={args.ctc_steps}",
        "train.log_every=50", "eval.at_start=false", "preflight.enabled=false",
    ]
    if not (args.reuse and (out / "final").is_dir()):
        T.train(load_config(None, base), fresh=True)
    arpa = out / "lm.arpa"
    exp = out / "config.toml"
    subprocess.run([sys.executable, "-m", "asr.lm", "--exp", str(exp), "--order", "3", "--out", str(arpa)],
                   cwd=ROOT, check=True, capture_output=True)

    def score(extra: list[str], split: str) -> dict:
        t = time.perf_counter()
        m = next(iter(T.evaluate_only(load_config(None, base + extra + [f"eval.split={split}"])).values()))
        return {"cer": m["cer"], "wer": m["wer"], "eval_s": time.perf_counter() - t}

    beam = ["decode.method=beam", "decode.beam_size=8", f"decode.lm={arpa}"]
    # The LM weight and word bonus are tuned on dev, as one would; the three settings are compared on test.
    grid = {(a, b): score(beam + [f"decode.lm_alpha={a}", f"decode.lm_beta={b}"], "dev")
            for a in args.lm_alphas for b in args.lm_betas}
    alpha, beta = min(grid, key=lambda k: (grid[k]["wer"], grid[k]["cer"]))
    settings = {"greedy": [], "beam8": ["decode.method=beam", "decode.beam_size=8"],
                "beam8-lm": beam + [f"decode.lm_alpha={alpha}", f"decode.lm_beta={beta}"]}
    res = {name: score(extra, "test") for name, extra in settings.items()}
    res["beam8-lm"].update(lm_alpha=alpha, lm_beta=beta)
    res["lm_grid_dev"] = [{"lm_alpha": a, "lm_beta": b, **m} for (a, b), m in grid.items()]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=50)
    ap.add_argument("--ctc-steps", type=int, default=1500)
    ap.add_argument("--lm-alphas", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--lm-betas", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--reuse", action="store_true", help="CTC part: decode the model a previous run trained")
    ap.add_argument("--part", choices=("all", "whisper", "ctc"), default="all")
    ap.add_argument("--work", default="/tmp/asr-bench-strategies")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "strategies.json"))
    args = ap.parse_args()
    if not (SHARED / "models" / "whisper-base").is_dir():
        raise SystemExit(f"needs the shared assets at {SHARED}")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(args.work)
    keys = {"whisper": ("steps", "batch", "eval_limit"), "ctc": ("ctc_steps", "lm_alphas", "lm_betas", "reuse")}
    summary = {f"settings_{part}": {k: getattr(args, k) for k in ks} for part, ks in keys.items()
               if args.part in ("all", part)}
    if args.part in ("all", "whisper"):
        summary["whisper"] = {
            "full": whisper_run(args, "full", ["train.lr=1e-5"], work),
            "decoder_only": whisper_run(args, "decoder", ["train.lr=1e-5", "train.trainable=['^model\\.decoder\\.']"],
                                        work),
            "lora": whisper_run(args, "lora", ["train.lr=1e-3", "lora.rank=16", "lora.alpha=32",
                                               "lora.targets=['(q_proj|k_proj|v_proj|out_proj)$']"], work),
        }
    if args.part in ("all", "ctc"):
        summary["ctc"] = ctc_part(args, work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if Path(args.out).is_file():  # keep the other part's figures when running one part
        old = json.loads(Path(args.out).read_text())
        summary = {**old, **summary}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    for name, r in summary.get("whisper", {}).items():
        print(f"whisper {name:13s} WER {r['wer_before']:.2f} -> {r['wer_after']:.2f} (ortho {r['wer_ortho_after']:.2f}) "
              f"{r['s_per_step']:.2f} s/step, {r['trainable']:,} of {r['total']:,} parameters train")
    for name, r in summary.get("ctc", {}).items():
        if name != "lm_grid_dev":
            lm = f", LM alpha {r['lm_alpha']} beta {r['lm_beta']} (tuned on dev)" if "lm_alpha" in r else ""
            print(f"ctc {name:9s} test CER {r['cer']:.2f} WER {r['wer']:.2f} ({r['eval_s']:.1f} s){lm}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
