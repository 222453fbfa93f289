"""The training loop: data and model set-up, then one function that trains, evaluates and saves.

    python run.py --exp experiments/demo.toml
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from asr import checkpoint as ckpt
from asr import distributed as dist
from asr.config import Config, eval_set_specs, to_toml
from asr.data import (AudioDataset, DurationBatchSampler, SplitReport, Utterance, collate, filter_utterances,
                      format_report, read_source_split, source_name, write_report)
from asr.decode import decode_tag
from asr.evaluation import evaluate, worst_rows, write_eval
from asr.losses import DEFAULT_LOSS, LOSSES
from asr.models import (Bundle, build, export, infer_family, loss_batch, model_inputs, parameter_summary,
                        quiet_progress_bars, select_parameters, set_encoder_frozen)
from asr.text import CharVocab, PieceVocab, clean_transcript, load_vocab


class TrainingError(Exception):
    """A run that cannot go on (no data, too many bad steps); one line."""


EXPORT_INFO = "asr_export.json"  # in best/ and final/: which step the exported weights are from


# ---------------------------------------------------------------------------------------
# Set-up.


class Log:
    """Prints and appends to train.log (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None and dist.is_main() else None
        self.progress: Progress | None = None

    def __call__(self, msg: str) -> None:
        if not dist.is_main():
            return
        if self.progress:
            self.progress.clear()
        print(msg, flush=True)
        if self.file:
            self.file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.progress:
            self.progress.clear()
        if self.file:
            self.file.close()
            self.file = None


class Progress:
    """One updating status line on stderr, only when stderr is a terminal (log lines carry the rest)."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = dist.is_main() and self.stream.isatty()
        self.t0 = time.time()
        self.width = 0

    def update(self, step: int, first_step: int, loss: float) -> None:
        if not self.enabled:
            return
        done = (step - first_step) / max(self.total - first_step, 1)
        eta = (time.time() - self.t0) / max(step - first_step, 1) * (self.total - step)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"[{bar}] step {step}/{self.total} loss {loss:.4f} eta {int(eta) // 60}:{int(eta) % 60:02d}"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("run.device: CUDA requested but not available")
        if dist.is_initialized() or name == "cuda":
            return torch.device("cuda", dist.local_rank() if dist.is_initialized() else torch.cuda.current_device())
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts for bf16/fp16, or of null contexts for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Data:
    train: list[Utterance]
    eval_sets: dict[str, list[Utterance]]
    reports: dict[str, SplitReport] = field(default_factory=dict)


def read_data(cfg: Config) -> tuple[dict, dict]:
    """Raw utterances and bad rows per (source name, split) for the training splits and the evaluation sets."""
    raw, bad = {}, {}
    sources = {source_name(s): s for s in cfg.data.sources}
    if len(sources) != len(cfg.data.sources):
        names = ", ".join(source_name(s) for s in cfg.data.sources)
        raise TrainingError(f"data.sources: names must be unique (got {names}); set name = \"...\"")
    wanted = [(name, "train") for name, s in sources.items() if s.train]
    for set_name, src, split in eval_set_specs(cfg):
        if not getattr(sources[src], split):
            raise TrainingError(f"evaluation set '{set_name}': data source '{src}' has no {split} split")
        wanted.append((src, split))
    for key in dict.fromkeys(wanted):
        raw[key], bad[key] = read_source_split(sources[key[0]], getattr(sources[key[0]], key[1]))
    return raw, bad


def build_vocab(cfg: Config, raw: dict, out_dir: Path):
    """The CTC vocabulary: the one saved with the run if there is one, else built from training transcripts."""
    folder = out_dir / "vocab"
    if (folder / "vocab.json").is_file():
        return load_vocab(folder)
    texts = [clean_transcript(u.text, cfg.data.text, u.language) for (_, split), us in raw.items()
             if split == "train" for u in us]
    if not texts:
        raise TrainingError("no training transcripts to build a CTC vocabulary from")
    if cfg.data.vocab == "sentencepiece":
        vocab = PieceVocab.build(texts, cfg.data.sp_vocab_size, cfg.data.sp_model_type)
    else:
        vocab = CharVocab.build(texts)
    if dist.is_main():
        tmp = out_dir / ".tmp-vocab"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        vocab.save(tmp)
        ckpt.replace_dir(tmp, folder)
    return vocab


def prepare(cfg: Config, out_dir: Path, log: Log) -> tuple[Bundle, Data]:
    """Read the sources, build the model, filter the data with the model's labels, write data_report.json."""
    raw, bad = read_data(cfg)
    family = infer_family(cfg.model)
    vocab = build_vocab(cfg, raw, out_dir) if family == "ctc" else None
    # Training languages first: the first is what an exported Whisper transcribes by default, not the
    # language of an evaluation-only source (e.g. one watched for forgetting).
    training = sorted({s.language for s in cfg.data.sources if s.train})
    languages = training + sorted({s.language for s in cfg.data.sources} - set(training))
    bundle = build(cfg.model, vocab, languages)
    labeler = bundle.labeler
    if labeler.max_tokens and cfg.data.max_label_tokens > 0:
        labeler.max_tokens = min(labeler.max_tokens, cfg.data.max_label_tokens)
    kept, reports = {}, {}
    for (name, split), utts in raw.items():
        reports[f"{name}/{split}"] = SplitReport()
        kept[name, split] = filter_utterances(utts, bad[name, split], cfg.data, labeler, reports[f"{name}/{split}"])
    train = [u for (name, split), utts in kept.items() if split == "train" for u in utts]
    limit = cfg.eval.max_utterances or None
    eval_sets = {set_name: kept[src, split][:limit] for set_name, src, split in eval_set_specs(cfg)}
    if dist.is_main():
        write_report(reports, out_dir / "data_report.json")
    log(format_report(reports))
    return bundle, Data(train, eval_sets, reports)


def check_decoding(cfg: Config) -> None:
    """Read the decoding LM (decode.lm, used by CTC beam search) before any work, so a missing or malformed
    file is one line at start-up rather than a traceback at the first evaluation."""
    if not (cfg.decode.lm and cfg.decode.method == "beam"):
        return
    from asr.decode import load_lm
    from asr.lm import ArpaError

    try:
        load_lm(cfg.decode.lm)
    except (OSError, ArpaError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise TrainingError(f"decode.lm: cannot read {cfg.decode.lm}: {detail}") from None


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over all parameters (frozen ones simply get no gradient); no weight decay on biases and norm
    weights (1-D parameters); `train.lr_scale` multiplies the learning rate of matching parameters
    (the first matching pattern counts)."""
    import re

    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        scale = next((v for pattern, v in cfg.lr_scale.items() if re.search(pattern, name)), 1.0)
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
         for (decay, scale), ps in groups.items()], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def checkpoint_state(model: torch.nn.Module, names: set[str] | None) -> dict:
    """The model's state dict, or only the entries in `names` (train.save_trainable_only)."""
    state = model.state_dict()
    return state if names is None else {k: v for k, v in state.items() if k in names}


def load_model_state(model: torch.nn.Module, state: dict, names: set[str] | None, where: str) -> None:
    """Load a checkpoint's weights; with `names`, a partial state over the freshly built base model."""
    try:
        if names is None:
            model.load_state_dict(state)
        else:
            missing = set(state) - set(model.state_dict())
            if missing:
                raise RuntimeError(f"unexpected keys {sorted(missing)[:3]}")
            model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # another model, or a CTC head for another vocabulary than the run's
        raise TrainingError(f"{where} does not fit the configured model "
                            f"({str(e).strip().splitlines()[-1].strip()[:200]})") from None


def lr_lambda(cfg):
    """Multiplier of the peak learning rate at a step: linear warmup, then linear/cosine decay or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(progress, 1.0)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


_FALLBACK: dict = {}


def fallback_batch(utts: list[Utterance], cfg: Config) -> dict:
    """A one-clip batch of the first decodable training clip: what a rank whose micro-batch lost every
    clip to decoding errors runs (with weight 0), so that it still joins the gradient all-reduce."""
    if "batch" not in _FALLBACK:
        dataset = AudioDataset(utts, cfg.data.sample_rate)
        for i in range(len(utts)):
            item = dataset[i]
            if item["audio"] is not None:
                _FALLBACK["batch"] = collate([item])
                break
        else:
            raise TrainingError("no training clip can be decoded")
    return _FALLBACK["batch"]


def export_to(bundle: Bundle, folder: Path, info: dict) -> None:
    """Export a `save_pretrained` folder atomically (temporary folder, then rename); a failed write (disk
    full), however the writing library reports it, is a one-line CheckpointError naming the folder."""

    def write(tmp: Path) -> None:
        export(bundle, tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info))

    ckpt.write_folder(folder, write)


class Stop:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config, fresh: bool = False) -> dict:
    """Train `cfg` into cfg.run.out_dir, resuming from its newest checkpoint unless `fresh`."""
    device = pick_device(cfg.run.device)
    check_decoding(cfg)
    out = Path(cfg.run.out_dir)
    if fresh and dist.is_main() and out.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("tb", "eval", "best", "final", "vocab", "results.json", "train.log", "preflight.json"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train.log")
    if dist.is_main():
        for p in ckpt.clean_partial(out):  # an export or vocabulary write killed half-way
            log(f"removed partial {p}")
    (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8") if dist.is_main() else None
    seed_everything(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if cfg.preflight.enabled and dist.is_main() and not ckpt.latest_checkpoint(out / "checkpoints"):
        from asr.preflight import format_preflight, preflight, write_preflight

        report = preflight(cfg)
        write_preflight(report, out)
        log(format_preflight(report))

    bundle, data = prepare(cfg, out, log)
    if not data.train:
        raise TrainingError(f"no training utterances left after filtering (see {out / 'data_report.json'})")
    tc = cfg.train
    select_parameters(bundle, tc, cfg.lora)
    model = bundle.model.to(device)
    saved_names = {n for n, p in model.named_parameters() if p.requires_grad} if tc.save_trainable_only else None
    precision = pick_precision(tc.precision, device)
    autocast = autocast_for(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_name = tc.loss or DEFAULT_LOSS[bundle.family]
    if loss_name not in LOSSES:
        raise TrainingError(f"train.loss: unknown loss '{loss_name}' (known: {', '.join(LOSSES)})")
    loss_fn = LOSSES[loss_name]
    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    sampler = DurationBatchSampler([u.duration for u in data.train], cfg.data.batch_size, cfg.data.max_batch_s,
                                   seed=cfg.run.seed, num_replicas=dist.world_size(), rank=dist.rank())
    tb = None
    if dist.is_main():
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))

    # Resume from the newest complete checkpoint (partial ones are removed first).
    ck_dir = out / "checkpoints"
    step, best, totals = 0, {"wer": math.inf, "step": -1}, {"samples": 0, "audio_s": 0.0, "time": 0.0}
    baseline: dict[str, float] = {}  # WER of each evaluation set at step 0, to show forgetting
    bad_steps = skipped_steps = 0  # non-finite steps in a row / in the whole run
    if dist.is_main():
        for p in ckpt.clean_partial(ck_dir):
            log(f"removed partial checkpoint {p}")
    dist.barrier()
    latest = ckpt.latest_checkpoint(ck_dir)
    trainer_state = None
    if latest is not None:
        model_state, optim_state, trainer_state = ckpt.load_checkpoint(latest, map_location=device)
        load_model_state(model, model_state, saved_names, f"checkpoint {latest}")
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as e:  # other parameter groups: train.lr_scale (or the model) changed since
            raise TrainingError(f"checkpoint {latest}: its optimizer state does not fit this run ({e}); "
                                f"train.lr_scale changed? Resume with the old settings or start over with --fresh"
                                ) from None
        scheduler.load_state_dict(trainer_state["scheduler"])
        # The learning rate of the next step comes from this run's schedule (the saved one may have had
        # another max_steps, e.g. a run extended after it finished); with an unchanged config it is the same.
        for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * f(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        scaler.load_state_dict(trainer_state["scaler"])
        sampler.load_state_dict(trainer_state["sampler"])
        step, best, totals = trainer_state["step"], trainer_state["best"], trainer_state["totals"]
        skipped_steps = trainer_state.get("skipped_steps", 0)
        baseline = trainer_state.get("baseline", {})
        log(f"resumed from {latest} (step {step})")
    else:
        log(parameter_summary(model))
    frozen = cfg.model.freeze_encoder_steps > step
    if frozen:
        set_encoder_frozen(bundle, True)
    ddp = wrap(model, device)
    if trainer_state is not None:  # last, so set-up cannot consume randomness after it
        rng = trainer_state["rng"]
        ckpt.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])

    loader = torch.utils.data.DataLoader(
        AudioDataset(data.train, cfg.data.sample_rate), batch_sampler=sampler, collate_fn=collate,
        num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=dist.loader_worker_init,  # stop signals are for the main process: it saves, then stops
        generator=torch.Generator().manual_seed(cfg.run.seed),  # workers must not draw on the global RNG
        persistent_workers=False,
    )
    batches = iter(loader)
    sampler_state = sampler.state_dict()

    def save(at_step: int) -> None:
        rng = dist.gather_rows([ckpt.rng_state()])  # every rank's generators, so each resumes its own stream
        if dist.is_main():
            state = {"step": at_step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "sampler": sampler_state, "rng": rng, "best": best, "totals": totals,
                     "skipped_steps": skipped_steps, "baseline": baseline}
            path = ckpt.save_checkpoint(ck_dir, at_step, checkpoint_state(model, saved_names),
                                        optimizer.state_dict(), state, to_toml(cfg))
            ckpt.prune(ck_dir, tc.keep_last, {best["step"]})
            log(f"saved {path}")
        dist.barrier()

    def run_eval(at_step: int) -> dict:
        nonlocal best
        results = {}
        for k, (name, utts) in enumerate(data.eval_sets.items()):
            metrics, rows = evaluate(bundle, utts, cfg, device, loss_name, autocast)
            if at_step == 0:
                baseline.setdefault(name, metrics["wer"])
            if name in baseline:
                metrics["wer_change_since_step0"] = metrics["wer"] - baseline[name]
            results[name] = metrics
            if dist.is_main():
                stem = ckpt.step_dir_name(at_step) + ("" if k == 0 else f".{name}")
                worst = worst_rows(rows, cfg.eval.worst, cfg.eval.normalizer, {u.id: u.language for u in utts})
                write_eval(out / "eval", stem, metrics, rows, {"set": name, "step": at_step}, worst)
                for key in EVAL_SCALARS + ("wer_change_since_step0",):
                    if key in metrics:
                        tb.add_scalar(f"eval/{name}/{key}", metrics[key], at_step)
                tb.add_text(f"eval/{name}/examples", "\n\n".join(
                    f"**ref:** {r}  \n**hyp:** {h}" for _, r, h in rows[: cfg.eval.examples]), at_step)
            log(f"eval {name} step {at_step}: wer {metrics['wer']:.2f} cer {metrics['cer']:.2f} "
                f"wer_ortho {metrics['wer_ortho']:.2f} loss {metrics['loss']:.4f} (n={metrics['n']})"
                + (f" change since step 0 {metrics['wer_change_since_step0']:+.2f}" if at_step and name in baseline
                   else ""))
        new_best = False
        if results:
            first = next(iter(results.values()))
            if (first["wer"], first["cer"]) < (best["wer"], best.get("cer", math.inf)):  # CER breaks WER ties
                best, new_best = {"wer": first["wer"], "cer": first["cer"], "step": at_step}, True
                if dist.is_main():
                    export_to(bundle, out / "best", {"kind": "best", **best})
                    log(f"new best wer {first['wer']:.2f} at step {at_step}")
        return {"results": results, "new_best": new_best}

    stop = Stop().install()
    model.train()
    log(f"training {bundle.family} model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(data.train)} utterances, device {device}, precision {precision}, world size {dist.world_size()}")
    window = {"loss": 0.0, "n": 0, "samples": 0, "audio_s": 0.0, "time": 0.0, "steps": 0}
    last_eval = None
    loss_log = []  # (step, mean train loss per label token) at each logging step of this invocation
    progress = log.progress = Progress(tc.max_steps)
    first_step = step
    try:
        if step == 0 and cfg.eval.at_start:
            run_eval(0)  # the baseline: what fine-tuning starts from
        while step < tc.max_steps:
            if frozen and step >= cfg.model.freeze_encoder_steps:
                set_encoder_frozen(bundle, False)
                ddp, frozen = wrap(model, device), False
                log(f"step {step}: encoder unfrozen")
            t_step = time.time()
            # One optimizer step: grad_accum micro-batches, normalised by the count the loss function
            # returns (label tokens, frames, ...) summed over the whole window and all ranks. That count
            # is known only after the forward passes: the micro-batches are scaled by an estimate (label
            # lengths) and the gradients corrected once the window's true count is in.
            micro = [next(batches) for _ in range(tc.grad_accum)]
            sampler_state = micro[-1]["sampler_state"]
            for b in micro:
                for utt_id, err in b["dropped"]:
                    log(f"dropped {utt_id}: {err}")
            (n_estimate,) = dist.sum_values(float(sum(int(b["label_lengths"].sum()) for b in micro)))
            n_estimate = max(n_estimate, 1.0)
            loss_total, n_local = 0.0, 0
            for i, batch in enumerate(micro):
                weight = 1.0
                if not batch["ids"]:  # every clip failed to decode
                    if ddp is model:
                        continue
                    batch, weight = fallback_batch(data.train, cfg), 0.0  # still join the gradient all-reduce
                sync = i == len(micro) - 1 or ddp is model
                with (nullcontext() if sync else ddp.no_sync()):
                    with autocast():
                        outputs = ddp(**model_inputs(bundle, batch, device))
                    loss_sum, n = loss_fn(outputs, loss_batch(bundle, batch, device))
                    scaler.scale(loss_sum * (weight * dist.world_size() / n_estimate)).backward()
                loss_total += weight * float(loss_sum.detach())
                n_local += n if weight else 0
            scaler.unscale_(optimizer)
            loss_total, n_window = dist.sum_values(loss_total, float(n_local))
            if n_window > 0 and n_window != n_estimate:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(n_estimate / n_window)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad if tc.clip_grad > 0 else math.inf)
            finite_loss = math.isfinite(loss_total)
            finite = finite_loss and math.isfinite(float(grad_norm))
            if finite or scaler.is_enabled():
                scaler.step(optimizer)  # with fp16 the scaler itself skips non-finite steps
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            # An fp16 gradient overflow with a finite loss is the scaler's business (it lowers its scale and
            # skips the step); a non-finite loss, or a non-finite gradient without a scaler, is a bad step.
            bad_steps = bad_steps + 1 if not finite_loss or (not finite and not scaler.is_enabled()) else 0
            if not finite:
                skipped_steps += 1
                log(f"step {step}: non-finite {'gradient' if finite_loss else 'loss'}, update skipped "
                    f"({bad_steps} bad in a row, {skipped_steps} skipped in this run)")
                if tb:
                    tb.add_scalar("train/skipped_steps", skipped_steps, step)
                if bad_steps >= tc.max_bad_steps:
                    raise TrainingError(f"{bad_steps} non-finite steps in a row at step {step}; stopping "
                                        f"(last good checkpoint: {ckpt.latest_checkpoint(ck_dir)})")

            n_samples = sum(len(b["ids"]) for b in micro)
            audio_s = sum(float(b["audio_lengths"].sum()) for b in micro) / cfg.data.sample_rate
            n_samples, audio_s = dist.sum_values(n_samples, audio_s)
            dt = time.time() - t_step
            totals = {"samples": totals["samples"] + n_samples, "audio_s": totals["audio_s"] + audio_s,
                      "time": totals["time"] + dt}
            if finite:
                window["loss"] += loss_total
                window["n"] += n_window
            window["samples"] += n_samples
            window["audio_s"] += audio_s
            window["time"] += dt
            window["steps"] += 1
            progress.update(step, first_step, loss_total / max(n_window, 1.0))
            if step % tc.log_every == 0 or step == tc.max_steps:
                elapsed = max(window["time"], 1e-9)
                loss_avg = window["loss"] / window["n"] if window["n"] else math.nan  # nan: every step skipped
                if window["n"]:
                    loss_log.append((step, loss_avg))
                lr = scheduler.get_last_lr()[0]
                if tb:
                    if window["n"]:
                        tb.add_scalar("train/loss", loss_avg, step)
                    tb.add_scalar("train/lr", lr, step)
                    tb.add_scalar("train/grad_norm", float(grad_norm), step)
                    tb.add_scalar("train/samples_per_s", window["samples"] / elapsed, step)
                    tb.add_scalar("train/audio_s_per_s", window["audio_s"] / elapsed, step)
                log(f"step {step}/{tc.max_steps} loss {loss_avg:.4f} lr {lr:.2e} grad_norm {float(grad_norm):.3f} "
                    f"{window['samples'] / elapsed:.1f} samples/s {window['audio_s'] / elapsed:.1f} audio s/s "
                    f"{elapsed / window['steps']:.2f} s/step")
                window = {"loss": 0.0, "n": 0, "samples": 0, "audio_s": 0.0, "time": 0.0, "steps": 0}

            at_end = step == tc.max_steps
            new_best = False
            if (tc.eval_every and step % tc.eval_every == 0) or at_end:
                last_eval = run_eval(step)
                new_best = last_eval["new_best"]
            (stopping,) = dist.sum_values(1.0 if stop.signal else 0.0)  # all ranks stop at the same step
            if (tc.save_every and step % tc.save_every == 0) or at_end or new_best or stopping:
                save(step)
            if stopping:
                code = 128 + (stop.signal or signal.SIGTERM)
                log(f"stopped by signal {stop.signal} at step {step}; checkpoint saved")
                raise SystemExit(code)
    finally:
        stop.restore()
        progress.clear()
        log.progress = None
        if tb:
            tb.flush()

    if last_eval is None:  # resumed at the end: evaluate once more for the results
        last_eval = run_eval(step)
    if dist.is_main():
        export_to(bundle, out / "final", {"kind": "final", "step": step})
    results = {
        "steps": step,
        "eval": last_eval["results"],
        "best": best,
        "baseline_wer": baseline,
        "skipped_steps": skipped_steps,
        "train_samples_per_s": totals["samples"] / max(totals["time"], 1e-9),
        "train_audio_s_per_s": totals["audio_s"] / max(totals["time"], 1e-9),
        "train_s_per_step": totals["time"] / max(step, 1),
        "train_loss": loss_log,  # (step, loss) at the logging steps of this invocation
    }
    if dist.is_main():
        (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
        tb.close()
        log(f"done: {out / 'results.json'}")
    log.close()
    return results


EVAL_SCALARS = ("wer", "cer", "wer_ortho", "cer_ortho", "loss", "insertion_rate", "empty_rate", "loop_rate",
                "compression_ratio", "high_compression_rate", "length_ratio")


def wrap(model: torch.nn.Module, device: torch.device):
    """DistributedDataParallel when launched with torchrun, else the model itself."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def evaluate_only(cfg: Config, checkpoint: str | None = None) -> dict:
    """Evaluate without training: a checkpoint folder (training `step-N/` or exported `best/`, `final/`),
    else the run's newest checkpoint, else the model as configured (zero-shot). Writes
    eval/step-N.<split>.<decoding>[.<set>].json/.tsv/.worst.tsv, so decoding settings sit side by side."""
    device = pick_device(cfg.run.device)
    check_decoding(cfg)
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train.log")
    seed_everything(cfg.run.seed)
    bundle, data = prepare(cfg, out, log)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(out / "checkpoints")
    step = 0
    if path is not None:
        if not path.is_dir():
            raise TrainingError(f"--checkpoint: not a folder: {path}")
        if (path / "model.pt").is_file():  # a training checkpoint: the same parameter set-up (LoRA) first
            select_parameters(bundle, cfg.train, cfg.lora)
            state, _, trainer_state = ckpt.load_checkpoint(path)
            step = trainer_state["step"]
            partial = set(state) if cfg.train.save_trainable_only else None
        elif (path / "config.json").is_file():  # an exported folder: merged weights, the base architecture
            with quiet_progress_bars():
                state = type(bundle.model).from_pretrained(str(path), dtype=torch.float32).state_dict()
            info = path / EXPORT_INFO
            step = json.loads(info.read_text())["step"] if info.is_file() else 0
            partial = None
        else:
            raise TrainingError(f"--checkpoint: {path} holds neither model.pt nor config.json")
        load_model_state(bundle.model, state, partial, f"--checkpoint: {path}")
        log(f"evaluating {path} (step {step})")
    model = bundle.model.to(device)
    autocast = autocast_for(pick_precision(cfg.train.precision, device), device)
    loss_name = cfg.train.loss or DEFAULT_LOSS[bundle.family]
    tag = decode_tag(cfg.decode)
    results = {}
    splits = {name: split for name, _, split in eval_set_specs(cfg)}  # eval.sets name each set's own split
    for k, (name, utts) in enumerate(data.eval_sets.items()):
        metrics, rows = evaluate(bundle, utts, cfg, device, loss_name, autocast)
        results[name] = metrics
        split = splits[name]
        if dist.is_main():
            stem = f"{ckpt.step_dir_name(step)}.{split}.{tag}" + ("" if k == 0 else f".{name}")
            worst = worst_rows(rows, cfg.eval.worst, cfg.eval.normalizer, {u.id: u.language for u in utts})
            write_eval(out / "eval", stem, metrics, rows, {"set": name, "step": step, "decode": tag,
                                                           "split": split}, worst)
        log(f"eval {name} ({split}, {tag}) step {step}: wer {metrics['wer']:.2f} cer {metrics['cer']:.2f} "
            f"wer_ortho {metrics['wer_ortho']:.2f} cer_ortho {metrics['cer_ortho']:.2f} (n={metrics['n']})")
    log.close()
    return results
