"""The training loop: one function that trains, evaluates and saves, with the few helpers it calls.

    python run.py --exp experiments/demo.toml
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from asr import allocator
from asr import checkpoint as ckpt
from asr import distributed as dist
from asr.config import Config, ConfigError, eval_set_specs, to_toml
from asr.data import AudioDataset, DurationBatchSampler, Utterance, collate, write_report
from asr.decode import decode_tag
from asr.evaluation import evaluate, worst_rows, write_eval
from asr.experiment import (EXPORT_INFO, Log, Progress, TrainingError, autocast_for, check_decoding, export_to,
                            lock_run_dir, pick_device, pick_precision, prepare, seed_everything, start_run,
                            unlock_run_dir, use_allocator)
from asr.losses import DEFAULT_LOSS, loss_function
from asr.models import (infer_family, layer_drop_context, loss_batch, model_inputs, numpy_layer_drop,
                        parameter_summary, quiet_progress_bars, select_parameters, set_encoder_frozen,
                        uses_layerdrop)

EVAL_SCALARS = ("wer", "cer", "wer_ortho", "cer_ortho", "loss", "insertion_rate", "empty_rate", "loop_rate",
                "compression_ratio", "high_compression_rate", "length_ratio", "wer_change_since_step0")


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over all parameters (frozen ones simply get no gradient); no weight decay on biases and norm
    weights (1-D parameters); `train.lr_scale` multiplies the learning rate of matching parameters
    (the first matching pattern counts)."""
    return torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def optimizer_groups(model: torch.nn.Module, cfg) -> list[dict]:
    """make_optimizer's parameter groups with their settings from train config `cfg`, always in the same order."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        scale = next((v for pattern, v in cfg.lr_scale.items() if re.search(pattern, name)), 1.0)
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale,
             "betas": tuple(cfg.betas), "eps": cfg.eps} for (decay, scale), ps in groups.items()]


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
        if self.signal is not None:  # a second Ctrl-C must not cut the checkpoint the first one asked for
            print(f"already stopping (signal {signum}): saving a checkpoint first; SIGKILL stops at once",
                  file=sys.stderr, flush=True)
            return
        self.signal = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class RunState:
    """What a checkpoint carries besides weights and optimizer: where the run is and what it has seen."""

    step: int = 0
    best: dict = field(default_factory=lambda: {"wer": math.inf, "cer": math.inf, "step": -1})
    totals: dict = field(default_factory=lambda: {"samples": 0, "audio_s": 0.0, "time": 0.0})
    baseline: dict = field(default_factory=dict)  # WER of each evaluation set at step 0 (forgetting)
    skipped_steps: int = 0  # non-finite steps skipped in the whole run
    sampler: dict = field(default_factory=lambda: {"epoch": 0, "position": 0})


def restore(path: Path, model, optimizer, scheduler, scaler, saved_names, device, tc) -> tuple[RunState, list]:
    """Load a (verified) checkpoint into the training objects, with the optimizer and schedule settings of train
    config `tc` (a resume may change them); returns the run state and every rank's RNG states."""
    model_state, optim_state, trainer = ckpt.load_checkpoint(path, map_location=device, verified=True)
    load_model_state(model, model_state, saved_names, f"checkpoint {path}")
    try:
        optimizer.load_state_dict(optim_state)
    except ValueError as e:  # other parameter groups: train.lr_scale (or the model) changed since
        raise TrainingError(f"checkpoint {path}: its optimizer state does not fit this run ({e}); "
                            f"train.lr_scale changed? Resume with the old settings or start over with --fresh"
                            ) from None
    scheduler.load_state_dict(trainer["scheduler"])
    # This run's settings, not the checkpoint's: peak learning rate, weight decay, betas and eps of each group,
    # and the learning rate of the next step from this run's schedule (lr, warmup, schedule, max_steps: e.g. a
    # run extended after it finished). With an unchanged config they are the saved ones.
    for group, new in zip(optimizer.param_groups, optimizer_groups(model, tc)):
        group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, base_lr, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if trainer["scaler"]:  # empty when saved without fp16 (train.precision or run.device changed since)
        scaler.load_state_dict(trainer["scaler"])
    state = RunState(trainer["step"], trainer["best"], trainer["totals"], trainer.get("baseline", {}),
                     trainer.get("skipped_steps", 0), trainer["sampler"])
    return state, trainer["rng"]


def num(value, spec: str = ".2f") -> str:
    """A metric for a log line; "n/a" for None (a score of no utterance)."""
    return "n/a" if value is None else format(value, spec)


def agree(error: Exception | None) -> None:
    """Raise rank 0's failed write (`error`) on every rank, so that all ranks stop together."""
    (failed,) = dist.sum_values(1.0 if error is not None else 0.0)
    if failed:
        raise error or ckpt.CheckpointError("stopping: rank 0 could not write its files")


def record_failures(data, key: str, by_id: dict, failures: list, cfg: Config, out: Path, log: Log) -> None:
    """Count clips (`by_id`: id -> Utterance) that failed to decode when loaded in data_report.json's split
    `key`, each once, with a log line the first time, and rewrite the report."""
    new = [(i, e) for i, e in failures if data.reports[key].decode_failed(by_id[i], e, cfg.data.report_examples)]
    for utt_id, err in new:
        log(f"dropped {utt_id}: {err}")
    if new and dist.is_main():
        write_report(data.reports, out / "data_report.json")


class FailedClips:
    """Training clips that failed to decode, counted per epoch over all ranks. More than
    data.max_failed_fraction of an epoch's clips stops the run (before the step, so no checkpoint is saved
    or pruned): a corpus that cannot be decoded must not train on to a result."""

    def __init__(self, data, cfg: Config, out: Path, log: Log):
        self.data, self.cfg, self.out, self.log = data, cfg, out, log
        self.epoch, self.failed = None, []  # this epoch's (id, error), over all ranks
        self.by_id: dict | None = None

    def update(self, micro: list[dict], ck_dir: Path) -> None:
        local = [(b["sampler_state"]["epoch"], utt_id, err) for b in micro for utt_id, err in b["dropped"]]
        (n,) = dist.sum_values(float(len(local)))
        if not n:
            return
        rows = sorted(dist.gather_rows(local), key=lambda r: r[0])  # epoch order, whatever the ranks'
        for epoch, utt_id, err in rows:
            if epoch != self.epoch:
                self.epoch, self.failed = epoch, []
            self.failed.append((utt_id, err))
        if self.by_id is None:
            self.by_id = {u.id: u for u in self.data.train}
        for source in dict.fromkeys(self.by_id[i].source for _, i, _ in rows):
            record_failures(self.data, f"{source}/train", self.by_id,
                            [(i, e) for _, i, e in rows if self.by_id[i].source == source], self.cfg, self.out,
                            self.log)
        total, fraction = len(self.data.train), self.cfg.data.max_failed_fraction
        if len(self.failed) > fraction * total:
            examples = "; ".join(f"{i} ({e})" for i, e in self.failed[:3])
            raise TrainingError(
                f"{len(self.failed)} of {total} training clips failed to decode in epoch {self.epoch + 1}, more "
                f"than data.max_failed_fraction = {fraction} allows, e.g. {examples}; stopping (last good "
                f"checkpoint: {ckpt.latest_checkpoint(ck_dir) or 'none yet'}; see {self.out / 'data_report.json'})")


def evaluate_sets(bundle, data, cfg: Config, device, loss_name: str, autocast, step: int, state: RunState, out: Path,
                  tb, log: Log) -> dict:
    """Evaluate every set; write eval/step-N[.<set>].json, .tsv and .worst.tsv, TensorBoard scalars and
    examples, and a log line each. Returns {set name: metrics}. A set of which no clip could be decoded has
    None scores (n = 0). A failed write (disk full) raises CheckpointError on every rank."""
    results = {}
    keys = {name: f"{src}/{split}" for name, src, split in eval_set_specs(cfg)}
    for k, (name, utts) in enumerate(data.eval_sets.items()):
        failures: list = []
        metrics, rows = evaluate(bundle, utts, cfg, device, loss_name, autocast, failures)
        record_failures(data, keys[name], {u.id: u for u in utts}, failures, cfg, out, log)
        if step == 0 and metrics["wer"] is not None:
            state.baseline.setdefault(name, metrics["wer"])
        if name in state.baseline and metrics["wer"] is not None:
            metrics["wer_change_since_step0"] = metrics["wer"] - state.baseline[name]
        results[name] = metrics
        error = None
        if dist.is_main():
            stem = ckpt.step_dir_name(step) + ("" if k == 0 else f".{name}")
            worst = worst_rows(rows, cfg.eval.worst, cfg.eval.normalizer, {u.id: u.language for u in utts})
            try:
                write_eval(out / "eval", stem, metrics, rows, {"set": name, "step": step}, worst)
            except ckpt.CheckpointError as e:
                error = e
            for key in EVAL_SCALARS:
                if metrics.get(key) is not None:
                    tb.add_scalar(f"eval/{name}/{key}", metrics[key], step)
            tb.add_text(f"eval/{name}/examples", "\n\n".join(
                f"**ref:** {r}  \n**hyp:** {h}" for _, r, h in rows[: cfg.eval.examples]), step)
        agree(error)
        if not metrics["n"]:
            log(f"eval {name} step {step}: no utterance could be decoded ({metrics['failed']} failed); "
                f"no scores, not a best")
            continue
        change = metrics.get("wer_change_since_step0")
        change = f" change since step 0 {change:+.2f}" if step and change is not None else ""
        log(f"eval {name} step {step}: wer {num(metrics['wer'])} cer {num(metrics['cer'])} "
            f"wer_ortho {num(metrics['wer_ortho'])} loss {num(metrics['loss'], '.4f')} (n={metrics['n']}){change}")
    return results


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    loss: float = 0.0
    n: float = 0.0
    samples: float = 0.0
    audio_s: float = 0.0
    time: float = 0.0
    steps: int = 0

    def report(self, step: int, max_steps: int, lr: float, grad_norm: float, tb) -> tuple[float, str]:
        """Write the window to TensorBoard; returns its mean loss per label (nan when every step was
        skipped) and the log line."""
        elapsed = max(self.time, 1e-9)
        loss = self.loss / self.n if self.n else math.nan
        if tb:
            if self.n:
                tb.add_scalar("train/loss", loss, step)
            tb.add_scalar("train/lr", lr, step)
            tb.add_scalar("train/grad_norm", grad_norm, step)
            tb.add_scalar("train/samples_per_s", self.samples / elapsed, step)
            tb.add_scalar("train/audio_s_per_s", self.audio_s / elapsed, step)
        return loss, (f"step {step}/{max_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                      f"{self.samples / elapsed:.1f} samples/s {self.audio_s / elapsed:.1f} audio s/s "
                      f"{elapsed / max(self.steps, 1):.2f} s/step")


# ---------------------------------------------------------------------------------------
# The loop.


def check_settings(cfg: Config) -> None:
    """Before the run folder is written to (config.toml): a ResumeError when the run would resume from a
    checkpoint saved with settings it cannot change (config.RESUME_FIXED)."""
    for _, path in reversed(ckpt.step_dirs(Path(cfg.run.out_dir) / "checkpoints")):
        if ckpt.saved_config(path) is not None:  # else a broken checkpoint, renamed aside later
            ckpt.check_resume(path, cfg)
            return


def load_newest(ck_dir: Path, log: Log, load) -> tuple[Path | None, object]:
    """(path, `load(path)`) of the newest checkpoint in `ck_dir` that verifies and loads, on every rank, or
    (None, None). One that fails either is renamed aside (`step-N.corrupt`) with a log line saying why."""
    while True:
        if dist.is_main():
            ckpt.newest_verified(ck_dir, log)  # renames aside the newer ones that fail verification
        dist.barrier()
        path = ckpt.latest_checkpoint(ck_dir)
        if path is None:
            return None, None
        try:
            result, reason = load(path), None
        except ckpt.CorruptCheckpoint as e:
            result, reason = None, e.reason
        (failed,) = dist.sum_values(float(reason is not None))
        if not failed:
            return path, result
        if dist.is_main():
            ckpt.set_aside(path, reason or "cannot be loaded on another rank", log)


def train(cfg: Config, fresh: bool = False) -> dict:
    """Train `cfg` into cfg.run.out_dir, resuming from its newest checkpoint unless `fresh`. The run folder
    is locked against other runs while this runs (asr.experiment.lock_run_dir); a resume with settings it
    cannot take stops before anything is written."""
    out = Path(cfg.run.out_dir)
    try:
        lock_run_dir(out)
        if not fresh:
            check_settings(cfg)
        return _train(cfg, fresh)
    finally:
        unlock_run_dir(out)


def _train(cfg: Config, fresh: bool) -> dict:
    device, out, log = start_run(cfg, fresh)
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
    loss_fn = loss_function(tc, bundle.family)
    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    by_duration = cfg.data.batching == "duration" or (cfg.data.batching == "auto" and bundle.family == "ctc")
    sampler = DurationBatchSampler([u.duration for u in data.train], cfg.data.batch_size, cfg.data.max_batch_s,
                                   seed=cfg.run.seed, num_replicas=dist.world_size(), rank=dist.rank(),
                                   by_duration=by_duration)
    tb = None
    if dist.is_main():
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))

    # Resume from the newest checkpoint that verifies and loads (partial ones are removed first, corrupt ones
    # renamed aside), with this run's settings where they changed.
    ck_dir = out / "checkpoints"
    if dist.is_main():
        for p in ckpt.clean_partial(ck_dir):
            log(f"removed partial checkpoint {p}")
    had_checkpoints = bool(ckpt.step_dirs(ck_dir))

    def load(path: Path):
        changes = ckpt.check_resume(path, cfg)
        return restore(path, model, optimizer, scheduler, scaler, saved_names, device, tc), changes

    latest, loaded = load_newest(ck_dir, log, load)
    state, rng = RunState(), None
    if latest is not None:
        (state, rng), changes = loaded
        if state.step > tc.max_steps:
            raise ckpt.ResumeError(f"train.max_steps: {tc.max_steps} is below the step of {latest} ({state.step}); "
                                   f"set at least {state.step}, or start over with --fresh")
        sampler.load_state_dict(state.sampler)
        log(f"resumed from {latest} (step {state.step})")
        for key, old, new in changes:
            log(f"resume: {key} {ckpt.show(old)} -> {ckpt.show(new)}")
    else:
        if had_checkpoints:
            log(f"no checkpoint in {ck_dir} verifies: starting from step 0")
        log(parameter_summary(model))
    frozen = cfg.model.freeze_encoder_steps > state.step
    if frozen:
        set_encoder_frozen(bundle, True)
    ddp = wrap(model, device)
    if rng is not None:  # last, so set-up cannot consume randomness after it
        ckpt.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])
    batches = iter(torch.utils.data.DataLoader(
        AudioDataset(data.train, cfg.data.sample_rate, cache=cfg.data.cache_audio), batch_sampler=sampler,
        collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=dist.loader_worker_init,  # stop signals are for the main process: it saves, then stops
        generator=torch.Generator().manual_seed(cfg.run.seed),  # workers must not draw on the global RNG
    ))

    def save() -> None:
        rng = dist.gather_rows([ckpt.rng_state()])  # every rank's generators, so each resumes its own stream
        if dist.is_main():
            trainer = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng, **asdict(state)}
            path = ckpt.save_checkpoint(ck_dir, state.step, checkpoint_state(model, saved_names),
                                        optimizer.state_dict(), trainer, to_toml(cfg))
            ckpt.prune(ck_dir, tc.keep_last, {state.best["step"], state.step})
            log(f"saved {path}")
        dist.barrier()

    def run_eval() -> tuple[dict, bool]:
        """Evaluate at this step; a new best (lowest WER on the first set, CER breaking ties) is exported.
        An evaluation that scored no utterance (n = 0) is never a best."""
        allocator.release_cached()  # evaluation's buffers differ in size from training's: neither keeps the other's
        results = evaluate_sets(bundle, data, cfg, device, loss_name, autocast, state.step, state, out, tb, log)
        allocator.release_cached()
        first = next(iter(results.values()), None)
        if first is None or first["wer"] is None or \
                (first["wer"], first["cer"]) >= (state.best["wer"], state.best.get("cer", math.inf)):
            return results, False
        best, error = {"wer": first["wer"], "cer": first["cer"], "step": state.step}, None
        if dist.is_main():
            try:
                export_to(bundle, out / "best", {"kind": "best", **best})
            except ckpt.CheckpointError as e:
                error = e
        agree(error)
        state.best = best  # only once best/ holds it
        log(f"new best wer {first['wer']:.2f} at step {state.step}")
        return results, True

    def save_and_stop(error: ckpt.CheckpointError) -> None:
        """After a failed write of this step's evaluation (disk full): keep the step's training in a
        checkpoint if one can still be written, then stop with one line either way."""
        try:
            save()
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"{error}; the checkpoint of step {state.step} could not be saved either "
                                       f"({e}); last checkpoint: {ckpt.latest_checkpoint(ck_dir)}") from None
        raise ckpt.CheckpointError(f"{error}; stopped after saving the checkpoint of step {state.step}") from None

    stop = Stop().install()
    model.train()
    log(f"training {bundle.family} model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(data.train)} utterances, device {device}, precision {precision}, world size {dist.world_size()}")
    window, last_eval, loss_log = Window(), None, []  # loss_log: (step, train loss) at this invocation's log lines
    progress = log.progress = Progress(tc.max_steps)
    first_step, bad_steps = state.step, 0  # bad_steps: non-finite steps in a row
    failed_clips = FailedClips(data, cfg, out, log)
    try:
        if state.step == 0 and cfg.eval.at_start:
            run_eval()  # the baseline: what fine-tuning starts from
        while state.step < tc.max_steps:
            if frozen and state.step >= cfg.model.freeze_encoder_steps:
                set_encoder_frozen(bundle, False)
                ddp, frozen = wrap(model, device), False
                log(f"step {state.step}: encoder unfrozen")
            t_step = time.time()
            # One optimizer step: grad_accum micro-batches, normalised by the count the loss function
            # returns (label tokens, frames, ...) summed over the whole window and all ranks. That count
            # is known only after the forward passes: the micro-batches are scaled by an estimate (label
            # lengths) and the gradients corrected once the window's true count is in.
            micro = [next(batches) for _ in range(tc.grad_accum)]
            failed_clips.update(micro, ck_dir)  # stops the run when too many clips failed
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
                    with autocast(), layer_drop_context(model, cfg.run.seed, state.step, i):  # same on every rank
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
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad or math.inf))
            finite_loss = math.isfinite(loss_total)
            finite = finite_loss and math.isfinite(grad_norm)
            if finite or scaler.is_enabled():
                scaler.step(optimizer)  # with fp16 the scaler itself skips non-finite steps
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            allocator.limit_cache()
            scheduler.step()
            state.step += 1
            state.sampler = micro[-1]["sampler_state"]
            step = state.step
            # An fp16 gradient overflow with a finite loss is the scaler's business (it lowers its scale and
            # skips the step); a non-finite loss, or a non-finite gradient without a scaler, is a bad step.
            bad_steps = bad_steps + 1 if not finite_loss or (not finite and not scaler.is_enabled()) else 0
            if not finite:
                state.skipped_steps += 1
                log(f"step {step}: non-finite {'gradient' if finite_loss else 'loss'}, update skipped "
                    f"({bad_steps} bad in a row, {state.skipped_steps} skipped in this run)")
                if tb:
                    tb.add_scalar("train/skipped_steps", state.skipped_steps, step)
                if bad_steps >= tc.max_bad_steps:
                    raise TrainingError(f"{bad_steps} non-finite steps in a row at step {step}; stopping "
                                        f"(last good checkpoint: {ckpt.latest_checkpoint(ck_dir)})")

            n_samples, audio_s = dist.sum_values(sum(len(b["ids"]) for b in micro),
                                                 sum(float(b["audio_lengths"].sum()) for b in micro)
                                                 / cfg.data.sample_rate)
            dt = time.time() - t_step
            for key, value in (("samples", n_samples), ("audio_s", audio_s), ("time", dt)):
                state.totals[key] += value
                setattr(window, key, getattr(window, key) + value)
            window.loss, window.n = window.loss + (loss_total if finite else 0.0), window.n + (n_window if finite else 0)
            window.steps += 1
            progress.update(step, first_step, loss_total / max(n_window, 1.0))
            if step % tc.log_every == 0 or step == tc.max_steps:
                loss, line = window.report(step, tc.max_steps, scheduler.get_last_lr()[0], grad_norm, tb)
                if window.n:
                    loss_log.append((step, loss))
                log(line)
                window = Window()

            at_end = step == tc.max_steps
            new_best = False
            if (tc.eval_every and step % tc.eval_every == 0) or at_end:
                try:
                    last_eval, new_best = run_eval()
                except ckpt.CheckpointError as e:  # eval files or best/ not written: the disk is full
                    save_and_stop(e)
            (stopping,) = dist.sum_values(1.0 if stop.signal else 0.0)  # all ranks stop at the same step
            if (tc.save_every and step % tc.save_every == 0) or at_end or new_best or stopping:
                save()
            if stopping:
                log(f"stopped by signal {stop.signal} at step {step}; checkpoint saved")
                raise SystemExit(128 + (stop.signal or signal.SIGTERM))
    finally:
        stop.restore()
        progress.clear()
        log.progress = None
        if tb:
            tb.flush()

    if last_eval is None:  # resumed at the end: evaluate once more for the results
        last_eval, _ = run_eval()
    if dist.is_main():
        export_to(bundle, out / "final", {"kind": "final", "step": state.step})
    totals = state.totals
    results = {
        "steps": state.step,
        "eval": last_eval,
        "best": state.best,
        "baseline_wer": state.baseline,
        "skipped_steps": state.skipped_steps,
        "train_samples_per_s": totals["samples"] / max(totals["time"], 1e-9),
        "train_audio_s_per_s": totals["audio_s"] / max(totals["time"], 1e-9),
        "train_s_per_step": totals["time"] / max(state.step, 1),
        "train_loss": loss_log,  # (step, loss) at the logging steps of this invocation
    }
    if dist.is_main():
        ckpt.write_files({out / "results.json": ckpt.json_text(results)})
        tb.close()
        log(f"done: {out / 'results.json'}")
    log.close()
    return results


def wrap(model: torch.nn.Module, device: torch.device):
    """DistributedDataParallel when launched with torchrun, else the model itself."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    adapter = numpy_layer_drop(model)
    if adapter:
        raise TrainingError(f"model: {adapter} draws its LayerDrop from numpy, differently on each rank; "
                            f"set its layerdrop to 0 (model.layerdrop = 0) for multi-process training")
    # LayerDrop skips the same layers on every rank (layer_drop_context), but their parameters get no
    # gradient that step: the reducer must look for them (after each forward, a walk of the graph).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=uses_layerdrop(model))


def evaluate_only(cfg: Config, checkpoint: str | None = None) -> dict:
    """Evaluate without training: a checkpoint folder (training `step-N/` or exported `best/`, `final/`),
    else the run's newest checkpoint, else the model as configured (zero-shot). Writes
    eval/step-N.<split>.<decoding>[.<set>].json/.tsv/.worst.tsv, so decoding settings sit side by side."""
    try:
        return _evaluate_only(cfg, checkpoint)
    finally:
        unlock_run_dir(Path(cfg.run.out_dir))


def checkpoint_family(path: Path) -> str | None:
    """"whisper" or "ctc" for a training checkpoint (from its parameter names, read without loading the
    tensors) or an exported folder (its config.json); None when neither tells."""
    if (path / "model.pt").is_file():
        try:
            names = list(torch.load(path / "model.pt", map_location="cpu", weights_only=True, mmap=True))
        except Exception:
            return None  # unreadable: loading it later says why
        if any(n.startswith("proj_out") or ".decoder.layers." in n or "encoder.conv1" in n for n in names):
            return "whisper"
        if any(n.startswith("lm_head") or "feature_projection" in n or "feature_extractor" in n for n in names):
            return "ctc"
        return None
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return None if model_type is None else "whisper" if model_type == "whisper" else "ctc"


def check_eval_checkpoint(cfg: Config, checkpoint: str) -> None:
    """A --checkpoint that is missing, holds no model, or holds a model of the other family than the
    experiment's: one line (ConfigError, exit status 2) before any data is read."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"--checkpoint: not found: {path}")
    if not path.is_dir():
        raise ConfigError(f"--checkpoint: not a folder: {path}")
    if not (path / "model.pt").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"--checkpoint: {path} holds neither model.pt (a training checkpoint) nor config.json "
                          f"(an exported model)")
    found, wanted = checkpoint_family(path), infer_family(cfg.model)
    if found is not None and found != wanted:
        names = {"whisper": "a Whisper model", "ctc": "a CTC model"}
        raise ConfigError(f"--checkpoint: {path} is {names[found]}, the experiment configures {names[wanted]} "
                          f"(model.name = {cfg.model.name!r})")


def _evaluate_only(cfg: Config, checkpoint: str | None) -> dict:
    device = pick_device(cfg.run.device)
    check_decoding(cfg)
    if checkpoint:
        check_eval_checkpoint(cfg, checkpoint)
    out = Path(cfg.run.out_dir)
    lock_run_dir(out)
    log = Log(out / "train.log")
    use_allocator(cfg, device, log)
    seed_everything(cfg.run.seed)
    bundle, data = prepare(cfg, out, log)
    path, loaded = Path(checkpoint) if checkpoint else None, None
    if path is None:  # the newest that verifies and loads
        path, loaded = load_newest(out / "checkpoints", log, lambda p: ckpt.load_checkpoint(p, verified=True))
    step = 0
    if path is not None:
        if not path.is_dir():
            raise TrainingError(f"--checkpoint: not a folder: {path}")
        if (path / "model.pt").is_file():  # a training checkpoint: the same parameter set-up (LoRA) first
            select_parameters(bundle, cfg.train, cfg.lora)
            state, _, trainer_state = loaded or ckpt.load_checkpoint(path)
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
    bundle.model.to(device)
    autocast = autocast_for(pick_precision(cfg.train.precision, device), device)
    loss_name = cfg.train.loss or DEFAULT_LOSS[bundle.family]
    tag = decode_tag(cfg.decode)
    results = {}
    specs = {name: (src, split) for name, src, split in eval_set_specs(cfg)}  # eval.sets name each set's own split
    for k, (name, utts) in enumerate(data.eval_sets.items()):
        failures: list = []
        metrics, rows = evaluate(bundle, utts, cfg, device, loss_name, autocast, failures)
        results[name] = metrics
        src, split = specs[name]
        record_failures(data, f"{src}/{split}", {u.id: u for u in utts}, failures, cfg, out, log)
        error = None
        if dist.is_main():
            stem = f"{ckpt.step_dir_name(step)}.{split}.{tag}" + ("" if k == 0 else f".{name}")
            worst = worst_rows(rows, cfg.eval.worst, cfg.eval.normalizer, {u.id: u.language for u in utts})
            try:
                write_eval(out / "eval", stem, metrics, rows, {"set": name, "step": step, "decode": tag,
                                                               "split": split}, worst)
            except ckpt.CheckpointError as e:
                error = e
        agree(error)
        log(f"eval {name} ({split}, {tag}) step {step}: wer {num(metrics['wer'])} cer {num(metrics['cer'])} "
            f"wer_ortho {num(metrics['wer_ortho'])} cer_ortho {num(metrics['cer_ortho'])} (n={metrics['n']}, "
            f"failed {metrics['failed']})")
    log.close()
    return results
