"""This project's Whisper fine-tuning against the Hugging Face course recipe, side by side.

    python tests/bench/bench_vs_hf.py --model ../shared/models/whisper-base \
        --cv ../shared/data/synth-cv/tr --lang tr --steps 30 --batch 8

Runs the reference recipe (processor in `datasets.map`, the course's data collator,
`Seq2SeqTrainer` with `predict_with_generate`) and then this project's loop, each in its own
subprocess (so peak memory is per side), on the same checkpoint, data, learning rate, warmup,
batch, steps, gradient-checkpointing setting and seed. Prints a table and writes
tests/bench/results/vs_hf.json. Ratios are reference / ours (above 1: ours is better),
except WER, which is reported as is. `--ours-set KEY=VALUE` (repeatable) changes this project's
side only, e.g. `--ours-set run.allocator=system` for glibc's malloc instead of oneTBB's, or
`--ours-set train.precision=fp32` for float32 throughout. By default each side runs at its own default
precision: the reference in fp32 (the Trainer's default), ours at `train.precision = "auto"` (bf16 autocast on
a CPU with native bf16; our FLOP/s are then a fraction of the measured bf16 matmul rate).
`--precision` sets both sides; `--device cuda --precision bf16` runs both sides on the GPU in bf16 autocast
(tests/gpu/check.sh: whisper-base, 50 steps) and adds each side's peak GPU memory; the FLOP/s are then a fraction of the GPU's bf16 matmul rate.

The reference decodes audio with soundfile and resamples each clip with torchaudio inside
`.map`: datasets' own `Audio(sampling_rate=16000)` decoding needs torchcodec and a system
FFmpeg, which a pip-only install does not have. Its collator strips the leading
<|startoftranscript|> as the Hugging Face fine-tuning blog's collator does.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchlib import matmul_flops_per_s, shared_args, trained_precision  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_split(cv: Path, split: str) -> list[dict]:
    with open(cv / f"{split}.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"path": str(cv / "clips" / r["path"]), "sentence": r["sentence"]} for r in rows]


# ---------------------------------------------------------------------------------------
# FLOPs of a Whisper training step.


def whisper_train_flops_per_sample(config, label_tokens: float) -> float:
    """Forward + backward (3x forward) FLOPs for one 30 s sample with `label_tokens` decoder tokens."""
    d, T, L = config.d_model, config.max_source_positions, label_tokens
    f_enc, f_dec, V, m = config.encoder_ffn_dim, config.decoder_ffn_dim, config.vocab_size, config.num_mel_bins
    macs = 2 * T * m * d * 3 + T * d * d * 3  # two convolutions (3000 then 1500 frames)
    macs += config.encoder_layers * (4 * T * d * d + 2 * T * T * d + 2 * T * d * f_enc)
    macs += config.decoder_layers * (
        4 * L * d * d + 2 * L * L * d  # self-attention
        + 2 * L * d * d + 2 * T * d * d + 2 * L * T * d  # cross-attention (K/V over the encoder output)
        + 2 * L * d * f_dec
    )
    macs += L * d * V  # output projection
    return 3 * 2 * macs


# ---------------------------------------------------------------------------------------
# The reference: the Hugging Face course recipe.


def side_hf(args, work: Path) -> dict:
    from dataclasses import dataclass
    from typing import Any

    import datasets
    import soundfile as sf
    import torch
    import torchaudio.functional as AF
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback,
                              WhisperForConditionalGeneration, WhisperProcessor)
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    from asr.metrics import error_rates

    out = {}
    cache = work / "hf_cache"
    t_start = time.perf_counter()
    processor = WhisperProcessor.from_pretrained(args.model, language=LANGUAGES[args.lang], task="transcribe")
    model = WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    model.generation_config.language = LANGUAGES[args.lang]
    model.generation_config.task = "transcribe"
    model.generation_config.forced_decoder_ids = None

    # Data preparation: features and labels computed once per clip and cached to disk by `.map`.
    t = time.perf_counter()
    cv = Path(args.cv)

    def prepare_dataset(example):
        array, sr = sf.read(example["path"], dtype="float32")
        array = AF.resample(torch.from_numpy(array), sr, 16000).numpy()
        example = processor(audio=array, sampling_rate=16000, text=example["sentence"])
        example["input_length"] = len(array) / 16000
        return example

    prepared = {}
    for split, name in (("train", "train"), ("test", args.eval_split)):
        rows = read_split(cv, name)
        ds = datasets.Dataset.from_list(rows)
        ds = ds.map(prepare_dataset, remove_columns=ds.column_names,
                    cache_file_name=str(cache / f"{split}.arrow"), load_from_cache_file=False)
        if split == "train":
            ds = ds.filter(lambda n: n < 30.0, input_columns=["input_length"],
                           cache_file_name=str(cache / "train_filtered.arrow"), load_from_cache_file=False)
        prepared[split] = ds
    out["prepare_s"] = time.perf_counter() - t
    out["prepare_disk_bytes"] = dir_bytes(cache)

    @dataclass
    class DataCollatorSpeechSeq2SeqWithPadding:
        processor: Any
        decoder_start_token_id: int

        def __call__(self, features):
            input_features = [{"input_features": f["input_features"][0]} for f in features]
            batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
            label_features = [{"input_ids": f["labels"]} for f in features]
            labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
            labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
            if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
                labels = labels[:, 1:]
            batch["labels"] = labels
            return batch

    collator = DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id)
    hyps_refs = {}

    def compute_metrics(pred):
        pred_ids, label_ids = pred.predictions, pred.label_ids
        pred_ids[pred_ids == -100] = processor.tokenizer.pad_token_id  # Seq2SeqTrainer pads with -100
        label_ids[label_ids == -100] = processor.tokenizer.pad_token_id
        hyps = processor.batch_decode(pred_ids, skip_special_tokens=True)
        refs = processor.batch_decode(label_ids, skip_special_tokens=True)
        hyps_refs["last"] = (refs, hyps)
        return {"wer": error_rates(refs, hyps)["wer"]}

    step_times = []

    class StepTimer(TrainerCallback):  # from one step's end to the next: data loading included, as ours
        def on_train_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            step_times.append(now - self.t)
            self.t = now

    training_args = Seq2SeqTrainingArguments(
        output_dir=str(work / "hf_out"), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup,
        max_steps=args.steps, gradient_checkpointing=args.grad_ckpt, use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        per_device_eval_batch_size=args.eval_batch, predict_with_generate=True,
        generation_max_length=args.max_new_tokens, eval_strategy="no", save_strategy="no", logging_steps=10,
        report_to=[], seed=args.seed, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=prepared["train"],
                             data_collator=collator, compute_metrics=compute_metrics,
                             processing_class=processor.feature_extractor, callbacks=[StepTimer()])

    def evaluate(tag):
        t = time.perf_counter()
        trainer.predict(prepared["test"], max_length=args.max_new_tokens)
        refs, hyps = hyps_refs["last"]
        # Score the original sentences (as ours does), not the tokenizer's round trip of them.
        originals = [r["sentence"] for r in read_split(cv, args.eval_split)][: len(hyps)]
        m = error_rates(originals, hyps)
        out[f"eval_{tag}_s"] = time.perf_counter() - t
        out[f"wer_{tag}"], out[f"wer_ortho_{tag}"] = m["wer"], m["wer_ortho"]

    evaluate("before")
    t = time.perf_counter()
    trainer.train()
    out["train_s"] = time.perf_counter() - t
    out["step_times"] = step_times
    evaluate("after")
    out["end_to_end_s"] = time.perf_counter() - t_start
    out["n_train"] = len(prepared["train"])
    return out


# ---------------------------------------------------------------------------------------
# This project.


def ours_config(args, out_dir: Path):
    from asr.config import load_config

    return load_config(None, [
        f"run.out_dir={out_dir}", f"run.seed={args.seed}", f"model.name={args.model}", f"run.device={args.device}",
        f"train.precision={'auto' if args.precision == 'defaults' else args.precision}",
        f"data.sources=[{{kind = \"common_voice\", path = \"{args.cv}\", language = \"{args.lang}\", "
        f"train = \"train\", dev = \"dev\", test = \"test\"}}]",
        f"data.batch_size={args.batch}", "data.max_batch_s=0", f"data.num_workers={args.workers}",
        f"train.max_steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}",
        "train.schedule=constant", "train.weight_decay=0.0", "train.clip_grad=1.0", "train.log_every=1",
        "train.eval_every=0", f"train.save_every={args.steps}", "train.keep_last=1", "eval.at_start=true",
        f"model.gradient_checkpointing={str(args.grad_ckpt).lower()}",
        f"eval.split={args.eval_split}", f"eval.batch_size={args.eval_batch}",
        f"decode.max_new_tokens={args.max_new_tokens}",
    ] + args.ours_set)


def side_ours(args, work: Path) -> dict:
    """One `asr.train.train` call, as `python run.py` runs it (with the C allocator run.py would preload):
    step-0 evaluation (before), training, evaluation at the end (after), checkpoint and export included."""
    import asr.train as T

    out_dir = work / "ours_out"
    cfg = ours_config(args, out_dir)
    timings: dict[str, list] = {"prepare": [], "build": [], "evaluate": [], "preflight": []}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            timings[name].append(time.perf_counter() - t)
            return result
        return wrapper

    import asr.experiment as E

    T.prepare, T.evaluate_sets = timed("prepare", T.prepare), timed("evaluate", T.evaluate_sets)
    E.build = timed("build", E.build)  # model loading, inside prepare
    import asr.preflight

    asr.preflight.preflight = timed("preflight", asr.preflight.preflight)
    t = time.perf_counter()
    results = T.train(cfg, fresh=True)
    out = {"end_to_end_s": time.perf_counter() - t}
    out["prepare_s"] = timings["prepare"][0] - timings["build"][0]  # reading, probing, labelling, filtering
    out["preflight_s"] = sum(timings["preflight"])
    out["model_load_s"] = timings["build"][0]
    out["eval_before_s"], out["eval_after_s"] = timings["evaluate"][0], timings["evaluate"][-1]
    out["prepare_disk_bytes"] = (out_dir / "data_report.json").stat().st_size  # the only data file written
    log = (out_dir / "train.log").read_text(encoding="utf-8")
    out["step_times"] = [float(x) for x in re.findall(r" ([0-9.]+) s/step", log)]
    out["precision"] = trained_precision(log)
    out["train_s"] = sum(out["step_times"])
    before = json.loads((out_dir / "eval" / "step-000000.json").read_text())
    after = next(iter(results["eval"].values()))
    out["wer_before"], out["wer_ortho_before"] = before["wer"], before["wer_ortho"]
    out["wer_after"], out["wer_ortho_after"] = after["wer"], after["wer_ortho"]
    out["n_train"] = sum(1 for _ in open(Path(args.cv) / "train.tsv", encoding="utf-8")) - 1
    from asr.allocator import tbb_active

    out["allocator"] = "tbb" if tbb_active() else cfg.run.allocator
    return out


# ---------------------------------------------------------------------------------------


def subset_corpus(args, work: Path) -> str:
    """A copy of the Common Voice folder's TSVs cut to --train-limit / --eval-limit rows (clips linked)."""
    if not (args.train_limit or args.eval_limit):
        return args.cv
    cv, sub = Path(args.cv), work / "cv-subset"
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir(parents=True)
    (sub / "clips").symlink_to(cv / "clips")
    for split, limit in (("train", args.train_limit), (args.eval_split, args.eval_limit)):
        lines = (cv / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (sub / f"{split}.tsv").write_text("".join(lines[: 1 + limit] if limit else lines), encoding="utf-8")
    return str(sub)


def run_side(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:] + ["--cv", args.cv]  # the last --cv wins
    env = None
    if side == "ours":  # what run.py does before training: preload the allocator run.allocator names
        from asr.allocator import preload_env

        cfg = ours_config(args, Path(args.work))
        env = preload_env(cfg.run.allocator, cfg.run.device)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-8000:])
        raise SystemExit(f"{side} side failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_args(ap)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--eval-limit", type=int, default=0, help="first N clips of the evaluation split (0: all)")
    ap.add_argument("--train-limit", type=int, default=0, help="first N training clips (0: all; for smoke runs)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=225)
    ap.add_argument("--workers", type=int, default=1, help="data loader workers for our side")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both sides (default cpu)")
    ap.add_argument("--precision", choices=("defaults", "fp32", "bf16", "fp16"), default="defaults",
                    help="both sides: autocast dtype (default: each side's own, the reference fp32, ours auto)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for this project's side only, e.g. run.allocator=system")
    ap.add_argument("--work", default="/tmp/asr-bench-vs-hf")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "vs_hf.json"))
    ap.add_argument("--side", choices=("hf", "ours"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model, args.cv = str(Path(args.model).resolve()), str(Path(args.cv).resolve())
    work = Path(args.work)

    if args.side:
        side_work = work / args.side
        shutil.rmtree(side_work, ignore_errors=True)
        side_work.mkdir(parents=True)
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        torch.manual_seed(args.seed)
        result = side_hf(args, side_work) if args.side == "hf" else side_ours(args, side_work)
        result["peak_rss_mb"] = peak_rss_mb()
        if args.device == "cuda":  # over the whole side: evaluations before and after, and training
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(result))
        return

    import torch
    from transformers import AutoConfig

    work.mkdir(parents=True, exist_ok=True)
    args.cv = subset_corpus(args, work)
    hf = run_side("hf", args)
    ours = run_side("ours", args)
    gpu = args.device == "cuda"
    matmul_dtype = ours.get("precision", "fp32")  # the precision our side's log says it trained in
    machine = matmul_flops_per_s(8192, 10, 5, "cuda", matmul_dtype) if gpu else matmul_flops_per_s(dtype=matmul_dtype)
    config = AutoConfig.from_pretrained(args.model)
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(args.model)
    sentences = [r["sentence"] for r in read_split(Path(args.cv), "train")]
    mean_tokens = statistics.mean(len(tok.encode(s, add_special_tokens=False)) + 4 for s in sentences)
    flops_sample = whisper_train_flops_per_sample(config, mean_tokens)

    def median_step(side):
        times = side["step_times"][2:] or side["step_times"]
        return statistics.median(times)

    rows = {}
    for name, key, better_low in (
        ("data preparation (s)", "prepare_s", True), ("prepared data on disk (bytes)", "prepare_disk_bytes", True),
        ("evaluation before (s)", "eval_before_s", True), ("evaluation after (s)", "eval_after_s", True),
        ("end to end (s)", "end_to_end_s", True), ("peak resident memory (MB)", "peak_rss_mb", True),
    ) + ((("peak GPU memory (MB)", "peak_gpu_mb", True),) if gpu else ()):
        rows[key] = {"name": name, "hf": hf[key], "ours": ours[key],
                     "ratio": hf[key] / ours[key] if ours[key] else float("inf")}
    for side in (hf, ours):
        side["step_s_median"] = median_step(side)
        side["samples_per_s"] = args.batch / side["step_s_median"]
    rows["step_s_median"] = {"name": "train s/step (median)", "hf": hf["step_s_median"],
                             "ours": ours["step_s_median"], "ratio": hf["step_s_median"] / ours["step_s_median"]}
    rows["samples_per_s"] = {"name": "train samples/s", "hf": hf["samples_per_s"], "ours": ours["samples_per_s"],
                             "ratio": ours["samples_per_s"] / hf["samples_per_s"]}
    achieved = flops_sample * ours["samples_per_s"]
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("side",)},
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "rows": rows,
        "wer": {s: {k: side[k] for k in ("wer_before", "wer_after", "wer_ortho_before", "wer_ortho_after")}
                for s, side in (("hf", hf), ("ours", ours))},
        "flops": {"train_flops_per_sample": flops_sample, "mean_label_tokens": mean_tokens,
                  "achieved_flops_per_s": achieved, "machine_matmul_flops_per_s": machine,
                  "matmul_dtype": matmul_dtype,
                  "fraction_of_matmul_peak": achieved / machine},
        "raw": {"hf": hf, "ours": ours},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))

    print(f"{'':32s} {'HF recipe':>14s} {'ours':>14s} {'HF/ours':>9s}")
    for r in rows.values():
        print(f"{r['name']:32s} {r['hf']:14.2f} {r['ours']:14.2f} {r['ratio']:8.2f}x")
    for s in ("hf", "ours"):
        w = summary["wer"][s]
        print(f"WER {s:5s}: before {w['wer_before']:.2f} -> after {w['wer_after']:.2f} (normalised); "
              f"orthographic {w['wer_ortho_before']:.2f} -> {w['wer_ortho_after']:.2f}")
    f = summary["flops"]
    print(f"ours: {f['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s of training, "
          f"{100 * f['fraction_of_matmul_peak']:.1f}% of this machine's {f['machine_matmul_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s {f['matmul_dtype']} matmul ({summary['device']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
