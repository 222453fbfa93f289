"""A small Wav2Vec2ForCTC trained from scratch: this project's duration-bucketed loop against
`Trainer` grouping by length (`train_sampling_strategy="group_by_length"`, formerly `group_by_length=True`) (the classic XLS-R fine-tuning recipe), side by side.

    python tests/bench/bench_ctc.py [--cv ../shared/data/synth-cv/tr] [--steps 200] [--batch 16]

Both sides start from the same randomly initialised weights (same seed, same config, same
character vocabulary), use the same optimiser settings and steps, and take `--batch` clips
per step (ours: duration-bucketed batches, `data.batch_size` with no seconds cap). Reports
seconds per step, training throughput in seconds of real (unpadded) audio per second, the
padding fraction of input samples over the batches each side trained on, and CER on the
evaluation split after training (both scored with this project's greedy decoder and
metrics), and each side's training FLOP/s (torch's FlopCounterMode count of the padded batches over
the timed steps) as a fraction of this machine's matmul rate in the precision that side trained in.
`--ours-set KEY=VALUE` (repeatable) changes this project's side only. Writes
tests/bench/results/ctc.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchlib import matmul_flops_per_s  # noqa: E402 (tests/bench is the script's folder: on sys.path)

MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, conv_dim=[64] * 7)


def model_overrides() -> list[str]:
    return ["model.init=scratch", "model.name=", "model.arch=wav2vec2", f"model.hidden_size={MODEL['hidden_size']}",
            f"model.num_layers={MODEL['num_layers']}", f"model.num_heads={MODEL['num_heads']}",
            f"model.intermediate_size={MODEL['intermediate_size']}", f"model.conv_dim={MODEL['conv_dim']}",
            "model.freeze_feature_encoder=false", "model.mask_time_prob=0.0"]


def base_overrides(args, out_dir: Path) -> list[str]:
    return [
        f"run.out_dir={out_dir}", f"run.seed={args.seed}",
        f"data.sources=[{{kind = \"common_voice\", path = \"{args.cv}\", language = \"tr\", train = \"train\", "
        f"dev = \"dev\", test = \"test\"}}]",
        "data.text.lowercase=true", "data.text.chars_to_ignore=\",?.!;:\\\"“”‘’%-\"",
        f"data.batch_size={args.batch}", "data.max_batch_s=0", "data.num_workers=1",
        f"train.max_steps={args.steps}", f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}",
        "train.schedule=linear", "train.log_every=1", "train.eval_every=0", f"train.save_every={args.steps}",
        "train.keep_last=1", "train.clip_grad=1.0", f"eval.split={args.eval_split}", "eval.batch_size=16",
    ] + model_overrides()


def flops_per_clip(vocab_size: int, longest: int):
    """Forward + backward FLOPs (matmuls and convolutions, as torch's FlopCounterMode counts them) of the model on
    one clip of N samples, as a function of N: counted on the CPU at four lengths up to `longest`; a*N + b*N^2 fits
    them to 0.1% (the attention is the N^2 term). A batch of `clips` padded to N is `clips` times that."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from asr.config import load_config
    from asr.models import build, model_inputs

    class Vocab:  # what build() reads of a vocabulary
        blank = 0

        def __len__(self):
            return vocab_size

    bundle = build(load_config(None, model_overrides()).model, Vocab())
    lengths = np.linspace(16000, max(longest, 32000), 4).round()
    counts = []
    for n in lengths:
        batch = {"audio": torch.randn(1, int(n)), "audio_lengths": torch.tensor([int(n)])}
        with FlopCounterMode(display=False) as counter:
            out = bundle.model(**model_inputs(bundle, batch, torch.device("cpu")))
            out.logits.float().log_softmax(-1).sum().backward()
        counts.append(counter.get_total_flops())
    a, b = np.linalg.lstsq(np.stack([lengths, lengths**2], 1), np.array(counts, float), rcond=None)[0]
    return lambda n: float(a * n + b * n * n)


def add_flops(results: dict, args) -> None:
    """Each side's achieved FLOP/s over its timed steps (on padded shapes [clips, samples]: the work done) and its
    fraction of the matmul rate in that side's precision (the Trainer's: fp32 on the CPU), measured here, after the
    sides, on an otherwise idle machine."""
    vocab_size = len(json.loads((Path(args.work) / "hf" / "vocab.json").read_text(encoding="utf-8")))
    shapes = {side: results[side]["batch_shapes"][: len(results[side]["step_times"][: args.steps])]
              for side in ("hf", "ours")}
    per_clip = flops_per_clip(vocab_size, max(n for s in shapes.values() for _, n in s))
    peaks = {}
    for side in ("hf", "ours"):
        r = results[side]
        precision = r.get("precision", "fp32")
        if precision not in peaks:
            peaks[precision] = matmul_flops_per_s(dtype=precision)
        r["train_flops"] = sum(clips * per_clip(n) for clips, n in shapes[side])
        r["flops_per_s"] = r["train_flops"] / sum(r["step_times"][: args.steps])
        r["matmul_peak_flops_per_s"], r["matmul_dtype"] = peaks[precision], precision
        r["fraction_of_matmul_peak"] = r["flops_per_s"] / peaks[precision]


def side_ours(args, work: Path) -> dict:
    import re

    import asr.train as T
    from asr.config import load_config

    cfg = load_config(None, base_overrides(args, work / "out") + args.ours_set)
    captured = {}
    real_sampler = T.DurationBatchSampler

    class Recording(real_sampler):  # records the batches it hands out, to measure padding
        def __iter__(self):
            for keys in super().__iter__():
                captured.setdefault("batches", []).append([self.durations[i] for _, _, i in keys])
                yield keys

    T.DurationBatchSampler = Recording
    t = time.perf_counter()
    results = T.train(cfg)
    wall = time.perf_counter() - t
    log = (work / "out" / "train.log").read_text(encoding="utf-8")
    step_times = [float(x) for x in re.findall(r" ([0-9.]+) s/step", log)]
    batches = captured["batches"][: args.steps]
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches)
    m = next(iter(results["eval"].values()))
    from asr.allocator import tbb_active
    from benchlib import trained_precision

    return {"step_times": step_times, "padding_fraction": 1 - real / padded, "cer": m["cer"], "wer": m["wer"],
            "mean_batch_clips": statistics.mean(len(b) for b in batches), "audio_s": real, "wall_s": wall,
            "allocator": "tbb" if tbb_active() else cfg.run.allocator, "precision": trained_precision(log),
            "batch_shapes": [[len(b), round(max(b) * 16000)] for b in batches]}


def side_hf(args, work: Path) -> dict:
    from dataclasses import dataclass

    import datasets
    import torch
    from transformers import (Trainer, TrainerCallback, TrainingArguments, Wav2Vec2CTCTokenizer,
                              Wav2Vec2FeatureExtractor, Wav2Vec2Processor)

    import asr.experiment as E
    from asr.config import load_config
    from asr.data import AudioDataset, collate
    from asr.decode import ctc_greedy
    from asr.metrics import error_rates

    cfg = load_config(None, base_overrides(args, work / "setup"))
    (work / "setup").mkdir(parents=True, exist_ok=True)
    E.seed_everything(cfg.run.seed)
    bundle, data = E.prepare(cfg, work / "setup", E.Log(None))  # same vocab, same initial weights as ours
    model, vocab = bundle.model, bundle.vocab
    vocab.save(work)
    tokenizer = Wav2Vec2CTCTokenizer(str(work / "vocab.json"), unk_token="[UNK]", pad_token="[PAD]",
                                     word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=True)
    processor = Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)
    model.config.ctc_loss_reduction = "mean"  # the recipe's setting

    # The recipe: audio to normalised input values and text to labels, once per clip, via .map.
    dataset = AudioDataset(data.train, 16000)
    ds = datasets.Dataset.from_dict({"i": list(range(len(data.train)))})

    def prepare_dataset(example):
        item = dataset[example["i"]]
        out = processor(audio=item["audio"].numpy(), sampling_rate=16000)
        return {"input_values": out.input_values[0], "input_length": len(item["audio"]),
                "labels": vocab.encode(item["utt"].label_text)}

    ds = ds.map(prepare_dataset, remove_columns=["i"], cache_file_name=str(work / "cache" / "train.arrow"))

    @dataclass
    class DataCollatorCTCWithPadding:
        processor: Wav2Vec2Processor

        def __call__(self, features):
            input_features = [{"input_values": f["input_values"]} for f in features]
            label_features = [{"input_ids": f["labels"]} for f in features]
            batch = self.processor.pad(input_features, padding=True, return_tensors="pt")
            labels_batch = self.processor.tokenizer.pad(label_features, padding=True, return_tensors="pt")
            batch["labels"] = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
            return batch

    step_times, lengths = [], []

    class StepTimer(TrainerCallback):  # from one step's end to the next: data loading included, as ours
        def on_train_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            step_times.append(now - self.t)
            self.t = now

    collator = DataCollatorCTCWithPadding(processor)

    def recording_collator(features):
        lengths.append([f["input_length"] for f in features])
        return collator(features)

    targs = TrainingArguments(
        output_dir=str(work / "hf_out"), train_sampling_strategy="group_by_length", length_column_name="input_length",
        per_device_train_batch_size=args.batch, learning_rate=args.lr, warmup_steps=args.warmup,
        lr_scheduler_type="linear", max_steps=args.steps, max_grad_norm=1.0, weight_decay=0.0, use_cpu=True,
        save_strategy="no", eval_strategy="no", logging_steps=50, report_to=[], seed=args.seed,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=recording_collator,
                      processing_class=processor.feature_extractor, callbacks=[StepTimer()])
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t

    # Score with the same decoder and metrics as ours.
    eval_utts = next(iter(data.eval_sets.values()))
    loader = torch.utils.data.DataLoader(AudioDataset(eval_utts, 16000), batch_size=16, collate_fn=collate)
    model.eval()
    refs, hyps = [], []
    from asr.models import model_inputs

    with torch.no_grad():
        for batch in loader:
            logits = model(**model_inputs(bundle, batch, torch.device("cpu"))).logits
            out_lengths = model._get_feat_extract_output_lengths(batch["audio_lengths"])
            hyps += [vocab.decode(ids) for ids in ctc_greedy(logits, out_lengths, vocab.blank)]
            refs += batch["texts"]
    m = error_rates(refs, hyps)
    batches = lengths[: args.steps]
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches)
    return {"step_times": step_times, "padding_fraction": 1 - real / padded, "cer": m["cer"], "wer": m["wer"],
            "mean_batch_clips": statistics.mean(len(b) for b in batches), "audio_s": real / 16000, "wall_s": wall,
            "batch_shapes": [[len(b), max(b)] for b in batches]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_cv = ROOT.parent / "shared" / "data" / "synth-cv" / "tr"
    ap.add_argument("--cv", default=str(default_cv if default_cv.is_dir() else ROOT / "tests" / "fixtures" / "cv-tr"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-split", default="dev")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for this project's side only, e.g. data.cache_audio=true")
    ap.add_argument("--work", default="/tmp/asr-bench-ctc")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "ctc.json"))
    ap.add_argument("--side", choices=("hf", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--add-flops", metavar="RESULT_JSON",
                    help="count the FLOPs of an earlier result file that recorded batch shapes, and rewrite it")
    args = ap.parse_args()
    args.cv = str(Path(args.cv).resolve())

    if args.add_flops:
        summary = json.loads(Path(args.add_flops).read_text(encoding="utf-8"))
        if "batch_shapes" not in summary["ours"]:
            raise SystemExit(f"{args.add_flops}: no batch shapes recorded (written before bench_ctc kept them)")
        args.steps, args.work = summary["settings"]["steps"], summary["settings"]["work"]
        add_flops(summary, args)
        Path(args.add_flops).write_text(json.dumps(summary, indent=1))
        report(summary, args.add_flops)
        return

    if args.side:
        work = Path(args.work) / args.side
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        result = side_hf(args, work) if args.side == "hf" else side_ours(args, work)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    import torch

    from asr.allocator import preload_env
    from asr.config import load_config

    ours_cfg = load_config(None, base_overrides(args, Path(args.work)) + args.ours_set)
    results = {}
    for side in ("hf", "ours"):
        # Ours as run.py runs it: with the C allocator run.py preloads (run.allocator).
        env = preload_env(ours_cfg.run.allocator, ours_cfg.run.device) if side == "ours" else None
        res = subprocess.run([sys.executable, __file__, "--side", side] + sys.argv[1:], cwd=ROOT,
                             capture_output=True, text=True, env=env)
        if res.returncode != 0:
            sys.stderr.write(res.stdout[-4000:] + res.stderr[-8000:])
            raise SystemExit(f"{side} side failed")
        results[side] = json.loads(res.stdout.strip().splitlines()[-1])
    for r in results.values():
        r["step_s_median"] = statistics.median(r["step_times"][2:] or r["step_times"])
        r["audio_s_per_s"] = r["audio_s"] / sum(r["step_times"][: args.steps])
    add_flops(results, args)
    hf, ours = results["hf"], results["ours"]
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("side", "add_flops")}, "model": MODEL,
               "threads": torch.get_num_threads(),
               "step_s_ratio_hf_over_ours": hf["step_s_median"] / ours["step_s_median"],
               "throughput_ratio_ours_over_hf": ours["audio_s_per_s"] / hf["audio_s_per_s"], **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    report(summary, args.out)


def report(summary: dict, out: str) -> None:
    hf, ours = summary["hf"], summary["ours"]
    print(f"{'':28s} {'Trainer':>10s} {'ours':>10s}")
    print(f"{'s/step (median)':28s} {hf['step_s_median']:10.3f} {ours['step_s_median']:10.3f}   "
          f"({summary['step_s_ratio_hf_over_ours']:.2f}x)")
    print(f"{'train audio s per s':28s} {hf['audio_s_per_s']:10.2f} {ours['audio_s_per_s']:10.2f}   "
          f"({summary['throughput_ratio_ours_over_hf']:.2f}x)")
    print(f"{'padding fraction':28s} {hf['padding_fraction']:10.3f} {ours['padding_fraction']:10.3f}")
    print(f"{'clips per batch (mean)':28s} {hf['mean_batch_clips']:10.1f} {ours['mean_batch_clips']:10.1f}")
    print(f"{'CER after training (%)':28s} {hf['cer']:10.2f} {ours['cer']:10.2f}")
    print(f"{'peak resident memory (MB)':28s} {hf['peak_rss_mb']:10.0f} {ours['peak_rss_mb']:10.0f}")
    if "flops_per_s" in ours:
        print(f"{'training GFLOP/s':28s} {hf['flops_per_s'] / 1e9:10.2f} {ours['flops_per_s'] / 1e9:10.2f}")
        print(f"{'  % of matmul peak':28s} {100 * hf['fraction_of_matmul_peak']:10.1f} "
              f"{100 * ours['fraction_of_matmul_peak']:10.1f}   (of "
              + ", ".join(f"{r['matmul_dtype']} {r['matmul_peak_flops_per_s'] / 1e9:.0f}" for r in (hf, ours))
              + " GFLOP/s)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
