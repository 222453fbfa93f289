"""The training loop: `train` reads top to bottom; `setup` builds what it drives, `train_step` is one
optimizer step over grad_accum micro-batches, and the few helpers below log, evaluate and save.

    python run.py --exp experiments/demo.toml
"""

from __future__ import annotations

import math
import resource
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
from asr import fsdp
from asr.augment import Augmenter, apply_spec_masks, perturbed_samples, speed_factor, speed_on
from asr.augment import enabled as augment_enabled
from asr.config import Config, ConfigError, to_toml
from asr.data import AudioDataset, DataError, DurationBatchSampler, Utterance, collate, write_report
from asr.evaluation import check_scored, evaluate_sets
from asr.experiment import (Board, Data, Log, Progress, TrainingError, autocast_for, choose_precision, eval_precision,
                            export_to, guard_bf16_convs, lock_run_dir, prepare, record_decode_failures, start_run,
                            unlock_run_dir)
from asr.losses import DEFAULT_LOSS, loss_function
from asr.models import (Bundle, infer_family, layer_drop_context, loss_step, numpy_layer_drop, parameter_summary,
                        select_parameters, set_encoder_frozen, uses_layerdrop)
from asr.optim import make_optimizer, make_scheduler
from asr.resume import (ResumeError, RunState, check_resume, check_settings, checkpoint_state, load_newest, restore,
                        show)


@dataclass
class Run:
    """Everything a training run holds: built by `setup`, driven by `train`."""

    cfg: Config
    out: Path
    log: Log
    device: torch.device
    bundle: Bundle
    data: Data
    model: torch.nn.Module  # the model whose parameters train
    forward: torch.nn.Module  # what runs its forward: DistributedDataParallel(model), or the model itself
    distributed: bool  # several processes (torchrun): gradients are all-reduced
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    batches: object  # iterator of collated micro-batches (the loader over the resumable sampler)
    loss_fn: object
    loss_name: str
    precision: str
    autocast: object
    eval_autocast: object  # evaluation's (eval.precision)
    tb: object  # SummaryWriter on rank 0, else None
    state: RunState
    saved_names: set | None  # train.save_trainable_only: the parameters checkpoints hold
    frozen: bool  # the encoder is frozen until model.freeze_encoder_steps
    failed: "FailedClips" = None
    fallback: dict | None = None  # a decodable one-clip batch, for a rank whose micro-batch lost every clip
    stream: object = None  # asr.shards.ShardStream when the training clips are streamed from shards
    skeleton: torch.nn.Module | None = None  # train.parallel = fsdp under torchrun: the unsharded model, on meta


@dataclass
class StepResult:
    """One optimizer step, summed over its micro-batches and all ranks."""

    loss: float  # loss sum
    n: float  # the count the loss is a sum over (label tokens)
    grad_norm: float
    lr: float  # the learning rate the step used
    finite_loss: bool
    finite: bool  # loss and gradient: the update was applied
    samples: float = 0.0
    audio_s: float = 0.0


# ---------------------------------------------------------------------------------------
# The loop.


def train(cfg: Config, fresh: bool = False) -> dict:
    """Train `cfg` into cfg.run.out_dir, resuming from its newest checkpoint that verifies unless `fresh`.
    The run folder is locked against other runs while this runs; a resume with settings it cannot take
    stops before anything is written."""
    out = Path(cfg.run.out_dir)
    try:
        lock_run_dir(out)
        if not fresh:
            check_settings(cfg)
        run = setup(cfg, fresh)
        tc, state, log = cfg.train, run.state, run.log
        stop, window, last_eval, bad_steps = Stop().install(), Window(), None, 0
        progress = log.progress = Progress(tc.max_steps)
        first_step = state.step
        try:
            if state.step == 0 and cfg.eval.at_start:
                evaluate_run(run)  # the baseline: what fine-tuning starts from
            while state.step < tc.max_steps:
                unfreeze_when_due(run)
                t0 = time.time()
                micro = [next(run.batches) for _ in range(tc.grad_accum)]
                window.wait += time.time() - t0  # the step waited this long for the loader
                run.failed.update(micro)  # stops the run when too many clips failed to decode
                result = train_step(run, micro)
                state.step += 1
                state.sampler = micro[-1]["sampler_state"]
                bad_steps = count_bad_steps(run, result, bad_steps)
                account(run, window, result, time.time() - t0)
                progress.update(state.step, first_step, result.loss / max(result.n, 1.0))
                if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                    window = window.report(run, result)
                at_end, new_best = state.step == tc.max_steps, False
                if (tc.eval_every and state.step % tc.eval_every == 0) or at_end:
                    last_eval, new_best = evaluate_run(run)
                (stopping,) = dist.sum_values(1.0 if stop.signal else 0.0)  # all ranks stop at the same step
                if (tc.save_every and state.step % tc.save_every == 0) or at_end or new_best or stopping:
                    save(run)
                if stopping:
                    log(f"stopped by signal {stop.signal} at step {state.step}; checkpoint saved")
                    raise SystemExit(128 + (stop.signal or signal.SIGTERM))
        finally:
            stop.restore()
            # The loader's workers stop now: left to a later garbage collection (the Run is in a reference
            # cycle), PyTorch's shutdown waits 5 s for each worker.
            run.batches = None
            progress.clear()
            log.progress = None
            if run.tb:
                run.tb.flush()
        return finish(run, last_eval or evaluate_run(run)[0], window.losses)  # resumed at the end: evaluate
    finally:
        unlock_run_dir(out)


def train_step(run: Run, micro: list[dict]) -> StepResult:
    """One optimizer step over grad_accum micro-batches: autocast forward, loss, scaled backward (no
    all-reduce but on the last micro-batch), unscale, count correction, clip, step, schedule.

    The loss is normalised by the count the loss function returns (label tokens, frames, ...) summed over
    the whole window and all ranks. That count is known only after the forward passes: the micro-batches
    are scaled by an estimate (label lengths) and the gradients corrected once the window's true count is in.
    """
    model, scaler, optimizer, tc = run.model, run.scaler, run.optimizer, run.cfg.train
    (n_estimate,) = dist.sum_values(float(sum(int(b["label_lengths"].sum()) for b in micro)))
    n_estimate = max(n_estimate, 1.0)
    loss_total, n_local = 0.0, 0
    for i, batch in enumerate(micro):
        weight = 1.0
        if not batch["ids"]:  # every clip failed to decode
            if not run.distributed:
                continue
            batch, weight = fallback_batch(run), 0.0  # still join the gradient all-reduce
        sync = i == len(micro) - 1 or not run.distributed
        if run.skeleton is not None:  # FSDP: no reduce-scatter and no reshard until the last micro-batch
            fsdp.set_accumulating(model, not sync)
        with (nullcontext() if sync or run.skeleton is not None else run.forward.no_sync()):
            with layer_drop_context(model, run.cfg.run.seed, run.state.step, i):  # the same on every rank
                _, loss_sum, n = loss_step(run.bundle, run.forward, batch, run.loss_fn, run.device, run.autocast)
            scaler.scale(loss_sum * (weight * dist.world_size() / n_estimate)).backward()
        loss_total += weight * float(loss_sum.detach())
        n_local += n if weight else 0
    scaler.unscale_(optimizer)
    loss_total, n_window = dist.sum_values(loss_total, float(n_local))
    if n_window > 0 and n_window != n_estimate:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(n_estimate / n_window)
    grad_norm = fsdp.to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad or math.inf))
    finite_loss = math.isfinite(loss_total)
    finite = finite_loss and math.isfinite(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if finite or scaler.is_enabled():
        scaler.step(optimizer)  # with fp16 the scaler itself skips non-finite steps
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    allocator.limit_cache()
    run.scheduler.step()
    samples, audio_s = dist.sum_values(sum(len(b["ids"]) for b in micro),
                                       sum(float(b["audio_lengths"].sum()) for b in micro) / run.cfg.data.sample_rate)
    return StepResult(loss_total, n_window, grad_norm, lr, finite_loss, finite, samples, audio_s)


# ---------------------------------------------------------------------------------------
# Set-up.


def setup(cfg: Config, fresh: bool) -> Run:
    """The run folder, data and model, optimizer, schedule, scaler, sampler and loader; resumed from the
    newest checkpoint that verifies (partial ones removed, corrupt ones renamed aside), with this run's
    settings where they changed."""
    device, out, log = start_run(cfg, fresh)
    check_compile(cfg, device)
    bundle, data = prepare(cfg, out, log)
    if not data.train and data.stream is None:
        raise TrainingError(f"no training utterances left after filtering (see {out / 'data_report.json'})")
    tc = cfg.train
    select_parameters(bundle, tc, cfg.lora)
    model = bundle.model.to(device)
    saved_names = {n for n, p in model.named_parameters() if p.requires_grad} if tc.save_trainable_only else None
    precision, why = choose_precision(tc.precision, device, family=bundle.family)
    log(f"training precision {precision} ({why})")
    eval_prec = eval_precision(cfg, device, log, bundle.family)
    eval_autocast = autocast_for(eval_prec, device)
    if "bf16" in (precision, eval_prec):
        guard_bf16_convs(model, device, log)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    skeleton = None
    if tc.parallel == "fsdp" and dist.is_initialized():  # before the optimizer: sharding replaces the parameters
        check_layer_drop(model)
        skeleton = fsdp.shard(model, precision)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler(device.type, enabled=precision == "fp16")  # every rank skips the same steps
    elif tc.parallel == "fsdp":
        log("train.parallel = fsdp in one process (world size 1): nothing to shard, the whole model trains here; "
            "checkpoints stay sharded (torch.distributed.checkpoint), so torchrun resumes them at any world size")
    optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc)
    by_duration = cfg.data.batching == "duration" or (cfg.data.batching == "auto" and bundle.family == "ctc")
    augmenter = make_augmenter(cfg, bundle)
    if data.stream is not None:  # streamed from shards: each rank its own
        from asr.shards import ShardStream

        if augmenter is not None or (bundle.family == "whisper" and max(
                cfg.data.timestamp_prob, cfg.data.concat_prob, cfg.data.prev_text_prob) > 0):
            raise ConfigError("data.sources: a shards source takes no [augment] waveform augmentation or Whisper "
                              "SpecAugment, nor data.timestamp_prob / concat_prob / prev_text_prob, yet: turn them "
                              "off or train from a listed source")
        sampler = ShardStream(data.stream, cfg, bundle.labeler, by_duration, dist.rank(), dist.world_size())
    else:
        sampler = DurationBatchSampler([u.duration for u in data.train], cfg.data.batch_size, cfg.data.max_batch_s,
                                       seed=cfg.run.seed, num_replicas=dist.world_size(), rank=dist.rank(),
                                       by_duration=by_duration, durations_at=perturbed_durations(cfg, data.train))
        dataset = AudioDataset(data.train, cfg.data.sample_rate, cache=cfg.data.cache_audio,
                               samples=timestamp_samples(cfg, bundle, data.train), augment=augmenter)
    tb = None
    if dist.is_main():
        tb = Board(out / "tb", log)
        tb.add_text("config", "```toml\n" + to_toml(cfg) + "\n```", 0)  # runs told apart by their settings

    ck_dir = out / "checkpoints"
    if dist.is_main():
        for p in ckpt.clean_partial(ck_dir):
            log(f"removed partial checkpoint {p}")
    had_checkpoints = bool(ckpt.step_dirs(ck_dir))

    def load(path: Path):
        changes = check_resume(path, cfg)
        return restore(path, model, optimizer, scheduler, scaler, saved_names, device, tc), changes

    latest, loaded = load_newest(ck_dir, log, load)
    state, rng = RunState(), None
    if latest is not None:
        (state, rng), changes = loaded
        if state.step > tc.max_steps:
            raise ResumeError(f"train.max_steps: {tc.max_steps} is below the step of {latest} ({state.step}); "
                                   f"set at least {state.step}, or start over with --fresh")
        sampler.load_state_dict(state.sampler)
        log(f"resumed from {latest} (step {state.step})")
        for key, old, new in changes:
            log(f"resume: {key} {show(old)} -> {show(new)}")
    else:
        if had_checkpoints:
            log(f"no checkpoint in {ck_dir} verifies: starting from step 0")
        log(parameter_summary(model))
    frozen = cfg.model.freeze_encoder_steps > state.step
    if frozen:
        set_encoder_frozen(bundle, True)
    forward = forward_module(model, device, skeleton, tc.compile)
    if rng is not None:  # last, so set-up cannot consume randomness after it
        ckpt.set_rng_state(rng[dist.rank()] if dist.rank() < len(rng) else rng[0])
    if tb and augmenter and state.step == 0:
        show_augmented(tb, dataset, sampler, augmenter.n_mels, cfg.data.sample_rate)
    batches = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler,
        collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=dist.loader_worker_init,  # stop signals are for the main process: it saves, then stops
        generator=torch.Generator().manual_seed(cfg.run.seed),  # workers must not draw on the global RNG
    )) if data.stream is None else sampler.batches(device, dist.loader_worker_init)
    run = Run(cfg, out, log, device, bundle, data, model, forward, dist.is_initialized(), optimizer, scheduler,
              scaler, batches, loss_function(tc, bundle.family), tc.loss or DEFAULT_LOSS[bundle.family],
              precision, autocast_for(precision, device), eval_autocast, tb, state, saved_names, frozen, skeleton=skeleton)
    run.failed = FailedClips(run)
    run.stream = sampler if data.stream is not None else None
    model.train()
    log(f"training {bundle.family} model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(data.train) or data.stream.rows} utterances, device {device}, precision {precision}, "
        f"world size {dist.world_size()}" + ("; forward compiled (train.compile: the first steps include the "
                                             "compilation)" if tc.compile else ""))
    return run


def make_augmenter(cfg: Config, bundle: Bundle) -> Augmenter | None:
    """The training clips' augmentation (`[augment]`), or None when it is all off. Whisper's SpecAugment is
    drawn with the clips (mask widths default to the model config's); a CTC model masks inside its forward."""
    n_mels = bundle.model.config.num_mel_bins if bundle.family == "whisper" else 0
    conf = bundle.model.config
    defaults = {k: getattr(conf, k, 0) for k in ("mask_time_length", "mask_time_min_masks", "mask_feature_length",
                                                  "mask_feature_min_masks")}
    augmenter = Augmenter(cfg.augment, cfg.run.seed, cfg.data.sample_rate, n_mels, defaults)
    return augmenter if augment_enabled(cfg.augment) or augmenter.spec else None


def perturbed_durations(cfg: Config, utts: list):
    """With speed perturbation, the sampler's durations of each epoch: each clip's at its drawn factor."""
    if not speed_on(cfg.augment):
        return None
    seed, sr = cfg.run.seed, cfg.data.sample_rate
    return lambda epoch: [perturbed_samples(round(u.duration * sr), speed_factor(u.speeds, seed, epoch, i), sr) / sr
                          for i, u in enumerate(utts)]


def show_augmented(tb, dataset: AudioDataset, sampler, n_mels: int, sample_rate: int, n: int = 3):
    """TensorBoard at step 0: the first training batch's first `n` clips as the model gets them (audio, and
    their log-mel with Whisper's masks as images), so the augmentation can be heard and seen."""
    from asr.audio import log_mel

    for k, key in enumerate(next(iter(sampler))[:n]):
        item = dataset[key]
        if item["audio"] is None:
            continue
        audio = item["audio"]  # (N,)
        tb.add_audio(f"augment/{k}/audio", audio.clamp(-1, 1)[None], 0, sample_rate=sample_rate)
        frames = min(3000, audio.shape[0] // 160 + 1)
        mel = log_mel(audio[None], n_mels or 80)  # (1, n_mels, 3000)
        if "time_mask" in item:
            mel = apply_spec_masks(mel, item["time_mask"][None], item["freq_mask"][None])
        mel = mel[0, :, :frames].flip(0)  # (n_mels, T), low frequencies at the bottom
        image = (mel - mel.min()) / (mel.max() - mel.min()).clamp(min=1e-6)
        tb.add_image(f"augment/{k}/log_mel", image[None], 0)
        tb.add_text(f"augment/{k}/clip", f"{item['utt'].id}: {item['utt'].text}", 0)


def timestamp_samples(cfg: Config, bundle: Bundle, utts: list):
    """The builder of timestamped, packed and prompted Whisper samples (data.timestamp_prob, concat_prob,
    prev_text_prob), or None."""
    if bundle.family != "whisper" or max(cfg.data.timestamp_prob, cfg.data.concat_prob, cfg.data.prev_text_prob) <= 0:
        return None
    from asr.timestamps import TimestampSamples

    limit = min(bundle.model.config.max_target_positions, cfg.data.max_label_tokens or 1 << 30)
    prefixes = {lang: bundle.prefix_tokens(lang, timestamps=True) for lang in {u.language for u in utts}}
    return TimestampSamples(utts, bundle.tokenizer, prefixes, cfg.data, cfg.run.seed, limit)


def forward_module(model: torch.nn.Module, device: torch.device, skeleton, compile: bool):
    """What runs the training forward: the model (FSDP shards it in place), DistributedDataParallel around it
    under torchrun; `torch.compile`d (inductor) with train.compile. Evaluation and checkpoints use the model."""
    forward = model if skeleton is not None else wrap(model, device)
    if not compile:
        return forward
    return torch.compile(forward)


def check_compile(cfg: Config, device: torch.device) -> None:
    """train.compile: a ConfigError for a CTC model, and on the CPU without a C++ compiler for inductor ($CXX,
    default g++)."""
    import os
    import shutil

    if not cfg.train.compile:
        return
    if infer_family(cfg.model) == "ctc":
        # torch 2.9, CPU: the compiled backward of Wav2Vec2 with clips of varying length failed a stride check
        # ("expected size 4==4, stride 3008==3072 at dim=0"), also with dynamic=True.
        raise ConfigError("train.compile: not available for CTC models yet (inductor's compiled backward fails "
                          "on clips of varying length with torch 2.9); set train.compile = false")
    cxx = os.environ.get("CXX", "g++")
    if device.type == "cpu" and not shutil.which(cxx):
        raise ConfigError(f"train.compile: torch.compile on the CPU needs a C++ compiler and '{cxx}' is not on "
                          f"PATH; install g++ (or set CXX), or set train.compile = false")


def wrap(model: torch.nn.Module, device: torch.device):
    """DistributedDataParallel when launched with torchrun, else the model itself."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    check_layer_drop(model)
    # LayerDrop skips the same layers on every rank (layer_drop_context), but their parameters get no
    # gradient that step: the reducer must look for them (after each forward, a walk of the graph).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=uses_layerdrop(model))


def check_layer_drop(model: torch.nn.Module) -> None:
    adapter = numpy_layer_drop(model)
    if adapter:
        raise TrainingError(f"model: {adapter} draws its LayerDrop from numpy, differently on each rank; "
                            f"set its layerdrop to 0 (model.layerdrop = 0) for multi-process training")


def unfreeze_when_due(run: Run) -> None:
    if run.frozen and run.state.step >= run.cfg.model.freeze_encoder_steps:
        set_encoder_frozen(run.bundle, False)
        run.forward, run.frozen = forward_module(run.model, run.device, run.skeleton, run.cfg.train.compile), False
        run.log(f"step {run.state.step}: encoder unfrozen")


def fallback_batch(run: Run) -> dict:
    """A one-clip batch of the first decodable training clip (kept for the run): what a rank whose micro-batch
    lost every clip to decoding errors runs (with weight 0), so that it still joins the gradient all-reduce."""
    if run.fallback is None and run.stream is not None:
        run.fallback = run.stream.fallback()
    if run.fallback is None:
        dataset = AudioDataset(run.data.train, run.cfg.data.sample_rate)
        item = next((it for it in map(dataset.__getitem__, range(len(dataset))) if it["audio"] is not None), None)
        if item is None:
            raise TrainingError("no training clip can be decoded")
        run.fallback = collate([item])
    return run.fallback


# ---------------------------------------------------------------------------------------
# Accounting, logging, evaluation and saving.


def count_bad_steps(run: Run, result: StepResult, bad_steps: int) -> int:
    """Non-finite steps in a row, after this one; too many stop the run with one line. An fp16 gradient
    overflow with a finite loss is the scaler's business (it lowers its scale and skips the step); a
    non-finite loss, or a non-finite gradient without a scaler, is a bad step."""
    state, scaler = run.state, run.scaler
    bad_steps = bad_steps + 1 if not result.finite_loss or (not result.finite and not scaler.is_enabled()) else 0
    if not result.finite:
        state.skipped_steps += 1
        run.log(f"step {state.step}: non-finite {'gradient' if result.finite_loss else 'loss'}, update skipped "
                f"({bad_steps} bad in a row, {state.skipped_steps} skipped in this run)")
        if run.tb:
            run.tb.add_scalar("train/skipped_steps", state.skipped_steps, state.step)
        if bad_steps >= run.cfg.train.max_bad_steps:
            raise TrainingError(f"{bad_steps} non-finite steps in a row at step {state.step}; stopping "
                                f"(last good checkpoint: {ckpt.latest_checkpoint(run.out / 'checkpoints')})")
    return bad_steps


@dataclass
class Window:
    """Sums over the steps since the last log line; `losses` keeps (step, mean loss) of every log line."""

    loss: float = 0.0
    n: float = 0.0
    samples: float = 0.0
    audio_s: float = 0.0
    time: float = 0.0
    wait: float = 0.0  # waiting for the data loader
    steps: int = 0
    losses: list = field(default_factory=list)

    def report(self, run: Run, last: StepResult) -> "Window":
        """Log the window (a line, TensorBoard); returns the next, empty one. Its loss is the mean per label
        over the steps that were applied (none: no loss logged)."""
        step, tb = run.state.step, run.tb
        elapsed, steps = max(self.time, 1e-9), max(self.steps, 1)
        loss = self.loss / self.n if self.n else math.nan
        if self.n:
            self.losses.append((step, loss))
        if tb:
            scalars = {"lr": last.lr, "grad_norm": last.grad_norm, "samples_per_s": self.samples / elapsed,
                       "audio_s_per_s": self.audio_s / elapsed, "s_per_step": elapsed / steps,
                       "loader_wait_s_per_step": self.wait / steps, "peak_memory_gb": peak_memory_gb(run.device)}
            if self.n:
                scalars["loss"] = loss
            for key, value in scalars.items():
                tb.add_scalar(f"train/{key}", value, step)
        run.log(f"step {step}/{run.cfg.train.max_steps} loss {loss:.4f} lr {last.lr:.2e} grad_norm "
                f"{last.grad_norm:.3f} {self.samples / elapsed:.1f} samples/s {self.audio_s / elapsed:.1f} audio s/s "
                f"{elapsed / steps:.2f} s/step")
        return Window(losses=self.losses)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: the device's allocations on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def account(run: Run, window: Window, result: StepResult, dt: float) -> None:
    for key, value in (("samples", result.samples), ("audio_s", result.audio_s), ("time", dt)):
        run.state.totals[key] += value
        setattr(window, key, getattr(window, key) + value)
    if result.finite:
        window.loss, window.n = window.loss + result.loss, window.n + result.n
    window.steps += 1


def evaluate_run(run: Run) -> tuple[dict, bool]:
    """Evaluate at this step; a new best (lowest WER on the first set, CER breaking ties) is exported. An
    evaluation that scored no utterance (n = 0) is never a best. Eval files or best/ that cannot be written
    (disk full): the step is saved if it still can be, and the run stops with one line."""
    state = run.state
    try:
        allocator.release_cached()  # evaluation's buffers differ in size from training's: neither keeps the other's
        with fsdp.gathered(run.model):  # FSDP: the full weights on every rank, whose forwards differ in number
            results = evaluate_sets(run, state.step)
        allocator.release_cached()
        first = next(iter(results.values()), None)
        if first is None or first["wer"] is None or \
                (first["wer"], first["cer"]) >= (state.best["wer"], state.best.get("cer", math.inf)):
            return results, False
        best, error = {"wer": first["wer"], "cer": first["cer"], "step": state.step}, None
        bundle = export_bundle(run)
        if dist.is_main():
            try:
                export_to(bundle, run.out / "best", {"kind": "best", **best})
            except ckpt.CheckpointError as e:
                error = e
        (failed,) = dist.sum_values(1.0 if error else 0.0)
        if failed:
            raise error or ckpt.CheckpointError("stopping: rank 0 could not export best/")
    except ckpt.CheckpointError as e:
        save_and_stop(run, e)
    state.best = best  # only once best/ holds it
    run.log(f"new best wer {first['wer']:.2f} at step {state.step}")
    return results, True


def export_bundle(run: Run) -> Bundle | None:
    """What best/ and final/ export: the run's bundle; under FSDP (every rank calls it) rank 0 gets one of the
    full weights gathered into a plain model, the other ranks None."""
    if run.skeleton is None:
        return run.bundle
    full = fsdp.full_model(run.model, run.skeleton)
    return None if full is None else Bundle(run.bundle.family, full, run.bundle.cfg, run.bundle.tokenizer,
                                            run.bundle.vocab, run.bundle.processor)


def save(run: Run) -> None:
    """A checkpoint of this step (every rank's random state in it); older ones pruned. train.parallel = fsdp:
    a sharded one, every rank writing its shards."""
    rng = dist.gather_rows([ckpt.rng_state()])  # every rank's generators, so each resumes its own stream
    sampler = run.state.sampler
    if run.data.stream is not None:  # every rank streams its own shards: the checkpoint holds each one's position
        sampler = dist.gather_rows([sampler])
        key = f"{run.data.stream.name}/train"
        run.stream.update_report(run.data.reports[key], sampler)
        if dist.is_main():
            write_report(run.data.reports, run.out / "data_report.json")
    trainer = {"scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng,
               **asdict(run.state), "sampler": sampler}
    ck_dir = run.out / "checkpoints"
    if run.cfg.train.parallel == "fsdp":
        path = ckpt.save_sharded_checkpoint(ck_dir, run.state.step, fsdp.sharded_state(
            run.model, run.optimizer, run.saved_names), trainer, to_toml(run.cfg))
    elif dist.is_main():
        path = ckpt.save_checkpoint(ck_dir, run.state.step, checkpoint_state(run.model, run.saved_names),
                                    run.optimizer.state_dict(), trainer, to_toml(run.cfg))
    if dist.is_main():
        ckpt.prune(ck_dir, run.cfg.train.keep_last, {run.state.best["step"], run.state.step})
        run.log(f"saved {path}")
    dist.barrier()


def save_and_stop(run: Run, error: ckpt.CheckpointError) -> None:
    """After a failed write of this step's evaluation (disk full): keep the step's training in a checkpoint if
    one can still be written, then stop with one line either way."""
    step = run.state.step
    try:
        save(run)
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"{error}; the checkpoint of step {step} could not be saved either ({e}); "
                                   f"last checkpoint: {ckpt.latest_checkpoint(run.out / 'checkpoints') or 'none'}") from None
    raise ckpt.CheckpointError(f"{error}; stopped after saving the checkpoint of step {step}") from None


def finish(run: Run, last_eval: dict, losses: list) -> dict:
    """Export final/, write results.json; a final evaluation that could decode no utterance of a set is an
    error (exit status 1) once both are written."""
    state, totals = run.state, run.state.totals
    bundle = export_bundle(run)
    if dist.is_main():
        export_to(bundle, run.out / "final", {"kind": "final", "step": state.step})
    results = {
        "steps": state.step,
        "eval": last_eval,
        "best": state.best,
        "baseline_wer": state.baseline,
        "skipped_steps": state.skipped_steps,
        "train_samples_per_s": totals["samples"] / max(totals["time"], 1e-9),
        "train_audio_s_per_s": totals["audio_s"] / max(totals["time"], 1e-9),
        "train_s_per_step": totals["time"] / max(state.step, 1),
        "train_loss": losses,  # (step, loss) at the logging steps of this invocation
    }
    if dist.is_main():
        ckpt.write_files({run.out / "results.json": ckpt.json_text(results)})
        run.tb.close()
        run.log(f"done: {run.out / 'results.json'}")
    check_scored(last_eval, "final evaluation")
    run.log.close()
    return results


class FailedClips:
    """Training clips that failed to decode, counted per epoch over all ranks. More than
    data.max_failed_fraction of an epoch's clips stops the run (before the step, so no checkpoint is saved
    or pruned): a corpus that cannot be decoded must not train on to a result."""

    def __init__(self, run: Run):
        self.run = run
        self.by_id = {u.id: u for u in run.data.train}  # empty when streamed (asr.shards): stand-ins below

    def update(self, micro: list[dict]) -> None:
        run, seen = self.run, self.run.state.failed  # this epoch's (id, error) over all ranks, in checkpoints
        local = [(b["sampler_state"]["epoch"], utt_id, err) for b in micro for utt_id, err in b["dropped"]]
        (n,) = dist.sum_values(float(len(local)))
        if not n:
            return
        rows = sorted(dist.gather_rows(local), key=lambda r: r[0])  # epoch order, whatever the ranks'
        for epoch, utt_id, err in rows:
            if epoch != seen["epoch"]:
                seen["epoch"], seen["clips"] = epoch, []
            seen["clips"].append((utt_id, err))
        self.epoch, self.failed = seen["epoch"], seen["clips"]
        for _, i, _ in rows:
            if i not in self.by_id:  # a streamed clip
                self.by_id[i] = Utterance(id=i, text="", language="", source=run.data.stream.name)
        for source in dict.fromkeys(self.by_id[i].source for _, i, _ in rows):
            record_decode_failures(run.data, f"{source}/train", self.by_id,
                                   [(i, e) for _, i, e in rows if self.by_id[i].source == source], run.cfg,
                                   run.out, run.log)
        total, fraction = len(run.data.train) or run.data.stream.rows, run.cfg.data.max_failed_fraction
        if len(self.failed) > fraction * total:
            examples = "; ".join(f"{i} ({e})" for i, e in self.failed[:3])
            raise DataError(
                f"{len(self.failed)} of {total} training clips failed to decode in epoch {self.epoch + 1}, more "
                f"than data.max_failed_fraction = {fraction} allows, e.g. {examples}; stopping (last good "
                f"checkpoint: {ckpt.latest_checkpoint(run.out / 'checkpoints') or 'none yet'}; "
                f"see {run.out / 'data_report.json'})")


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
