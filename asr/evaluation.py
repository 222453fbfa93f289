"""Evaluation: decode a set, score it, and write what a researcher reads, for a training run at a step
(`evaluate_sets`) and for the evaluation-only command (`evaluate_only`):

    eval/<stem>.json       metrics: wer, cer (normalised), wer_ortho, cer_ortho, loss, n, hallucination
                           signals, the WER's bootstrap 95% interval, per-speaker and per-source WER, and what
                           was evaluated (set, split, step, decoder tag, loss, subset size, reference words)
    eval/<stem>.tsv        per utterance: id, speaker, language, duration, reference words, S/D/I, texts
    eval/<stem>.worst.tsv  the eval.worst utterances with the highest WER
    eval/<stem>.errs.txt   icefall-style error analysis: aligned texts, confusion pairs, deletions, insertions

    python run.py --exp experiments/demo.toml --eval-only [--checkpoint runs/demo/best]
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from asr import checkpoint as ckpt
from asr import distributed as dist
from asr.config import Config, ConfigError, eval_set_kind, eval_set_specs
from asr.data import AudioDataset, Utterance, collate, load_utterance_audio
from asr.decode import ctc_decode, decode_tag, whisper_generate
from asr.experiment import (EXPORT_INFO, Board, TrainingError, autocast_for, eval_precision, guard_bf16_convs,
                            prepare, record_decode_failures, start_run, unlock_run_dir)
from asr.losses import DEFAULT_LOSS, loss_function
from asr.metrics import (breakdown, error_analysis, error_rates, format_errs, hallucination_metrics,
                         utterance_counts_all)
from asr.models import infer_family, loss_step, model_inputs, quiet_progress_bars, select_parameters
from asr.text import NORMALIZERS

TB_AUDIO = 3  # worst utterances of each evaluation given to TensorBoard with their audio


def eval_batches(utts: list[Utterance], batch_size: int) -> list[list[int]]:
    """Fixed batches for evaluation: sorted by duration (less padding), this rank's share."""
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)
    mine = order[dist.rank() :: dist.world_size()]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def evaluate(bundle, utts: list[Utterance], cfg, device, loss_fn, autocast=nullcontext,
             failures: list | None = None) -> tuple[dict, list]:
    """Decode `utts` with `cfg.decode` and score them. Returns (metrics, rows of (id, reference, hypothesis)).

    Metrics: wer, cer (normalised with cfg.eval.normalizer in each utterance's language), wer_ortho,
    cer_ortho (percent), loss (teacher-forced, with `loss_fn`), n, failed (clips that could not be decoded),
    and the hallucination signals of asr.metrics.hallucination_metrics on the normalised text; with n = 0
    (every clip failed) the scores and the loss are None, never 0 or NaN. Given `failures`, the (id, error)
    of each clip that failed to decode is appended to it.
    Evaluation is sharded over ranks and gathered; every rank gets the same result.
    """
    model = bundle.model
    was_training = model.training
    model.eval()
    dataset = AudioDataset(utts, cfg.data.sample_rate)
    # Its own generator: a loader without one draws its seed from the global RNG, and an evaluation
    # must not shift the dropout and masking draws of the training steps after it (exact resume).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=eval_batches(utts, cfg.eval.batch_size),
                                         collate_fn=collate, num_workers=cfg.data.num_workers,
                                         worker_init_fn=dist.loader_worker_init,
                                         generator=torch.Generator().manual_seed(0))
    rows, loss_sum, loss_n = [], 0.0, 0
    for batch in loader:
        rows += [(utt_id, "", "", err) for utt_id, err in batch["dropped"]]
        if not batch["ids"]:
            continue
        if bundle.family == "whisper":  # the encoder runs once, for the loss and for decoding
            inputs = model_inputs(bundle, batch, device)  # float32 features, as in training
            with autocast():
                inputs["encoder_outputs"] = model.get_encoder()(inputs.pop("input_features"))
            _, loss, n = loss_step(bundle, model, batch, loss_fn, device, autocast, inputs)
            with autocast():
                hyps = whisper_generate(bundle, batch, device, cfg.decode.method, cfg.decode.beam_size,
                                        cfg.decode.max_new_tokens, cfg.decode.prompt,
                                        encoder_outputs=inputs["encoder_outputs"], args=cfg.decode.args)
        else:
            outputs, loss, n = loss_step(bundle, model, batch, loss_fn, device, autocast)
            hyps = ctc_decode(bundle, outputs, batch, cfg.decode)
        loss_sum += float(loss)
        loss_n += n
        rows += [(i, ref, hyp.strip(), None) for i, ref, hyp in zip(batch["ids"], batch["texts"], hyps)]
    model.train(was_training)
    rows = dist.gather_rows(rows)
    loss_sum, loss_n = dist.sum_values(loss_sum, loss_n)
    order = {u.id: k for k, u in enumerate(utts)}
    rows.sort(key=lambda r: order.get(r[0], 0))
    scored = [r for r in rows if r[3] is None]
    language = {u.id: u.language for u in utts}
    langs = [language.get(r[0], "") for r in scored]
    refs, hyps = [r[1] for r in scored], [r[2] for r in scored]
    metrics = error_rates(refs, hyps, cfg.eval.normalizer, langs)
    metrics["loss"] = loss_sum / loss_n if loss_n else None
    metrics["failed"] = len(rows) - len(scored)
    if failures is not None:
        failures += [(r[0], r[3]) for r in rows if r[3] is not None]
    norm = NORMALIZERS[cfg.eval.normalizer]
    metrics.update(hallucination_metrics([norm(r, lang) for r, lang in zip(refs, langs)],
                                         [norm(h, lang) for h, lang in zip(hyps, langs)]))
    return metrics, [r[:3] for r in scored]


# ---------------------------------------------------------------------------------------
# What an evaluation writes.


def analyse(rows: list, utts: list[Utterance], normalizer: str) -> tuple[dict, list, list, str]:
    """Per-utterance scores of `rows` (id, reference, hypothesis): (metrics to add: reference words, the WER's
    bootstrap 95% interval, WER per speaker and per source; the TSV rows; the worst rows, highest WER first;
    the errs.txt text)."""
    from asr.compare import bootstrap_ci

    by_id = {u.id: u for u in utts}
    norm = NORMALIZERS[normalizer]
    utt = [by_id[r[0]] for r in rows]
    refs = [norm(r[1], u.language) for r, u in zip(rows, utt)]
    hyps = [norm(r[2], u.language) for r, u in zip(rows, utt)]
    counts = utterance_counts_all(refs, hyps)
    errors = [c["substitutions"] + c["deletions"] + c["insertions"] for c in counts]
    words = [c["ref_words"] for c in counts]
    extra = {"ref_words": sum(words), "wer_ci95": list(bootstrap_ci(errors, words)) if rows else None,
             "per_source": breakdown([u.source for u in utt], counts)}
    if any(u.speaker for u in utt):
        extra["per_speaker"] = breakdown([u.speaker for u in utt], counts)
    table = [(r[0], u.speaker, u.language, round(u.duration, 3), c["ref_words"], c["substitutions"],
              c["deletions"], c["insertions"], r[1], r[2]) for r, u, c in zip(rows, utt, counts)]
    wer = [round(100.0 * e / max(w, 1), 2) for e, w in zip(errors, words)]
    worst = sorted(((r[0], r[1], r[2], w) for r, w in zip(rows, wer)), key=lambda x: -x[3])
    errs = format_errs(error_analysis([r[0] for r in rows], refs, hyps, [r[1] for r in rows], [r[2] for r in rows]))
    return extra, table, worst, errs


TSV_COLUMNS = ["id", "speaker", "language", "duration", "ref_words", "substitutions", "deletions", "insertions",
               "reference", "hypothesis"]


def write_eval(folder: Path, stem: str, metrics: dict, table: list, worst: list, errs: str) -> None:
    """`folder/stem.json` (metrics), `.tsv` (TSV_COLUMNS per utterance), `.worst.tsv` (id, reference,
    hypothesis, wer) and `.errs.txt`, written atomically together: a failed write (disk full) is a
    CheckpointError naming the file and leaves none of them half-written."""
    ckpt.write_files({folder / f"{stem}.json": ckpt.json_text(metrics),
                      folder / f"{stem}.tsv": _tsv(TSV_COLUMNS, table),
                      folder / f"{stem}.worst.tsv": _tsv(["id", "reference", "hypothesis", "wer"], worst),
                      folder / f"{stem}.errs.txt": errs})


def _tsv(header: list[str], rows: list) -> str:
    f = io.StringIO(newline="")
    w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return f.getvalue()


def agree(error: Exception | None) -> None:
    """Raise rank 0's failed write (`error`) on every rank, so that all ranks stop together."""
    (failed,) = dist.sum_values(1.0 if error is not None else 0.0)
    if failed:
        raise error or ckpt.CheckpointError("stopping: rank 0 could not write its files")


def num(value, spec: str = ".2f") -> str:
    """A metric for a log line; "n/a" for None (a score of no utterance)."""
    return "n/a" if value is None else format(value, spec)


def evaluate_and_write(run, name: str, utts: list[Utterance], stem: str, info: dict, tb_prefix: str,
                       write_report: bool = True, baseline: dict | None = None) -> dict:
    """Evaluate one set for `run` (a training run, or an evaluation-only one: bundle, data, cfg, device,
    loss_fn, eval_autocast, out, tb, log), count its decoding failures in the data report, write its files under
    eval/ and its numbers and worst utterances to TensorBoard. Returns its metrics with `info` added. Given
    `baseline` ({set: WER at step 0}, filled at step 0), the metrics hold wer_change_since_step0."""
    cfg = run.cfg
    failures: list = []
    if eval_set_kind(cfg, name) == "longform":
        return longform_and_write(run, name, utts, stem, info, tb_prefix, write_report, failures)
    metrics, rows = evaluate(run.bundle, utts, cfg, run.device, run.loss_fn, run.eval_autocast, failures)
    record_decode_failures(run.data, info["data"], {u.id: u for u in utts}, failures, cfg, run.out, run.log,
                           write_report)
    extra, table, worst, errs = analyse(rows, utts, cfg.eval.normalizer)
    metrics = {**metrics, **extra, **info, "max_utterances": cfg.eval.max_utterances}
    if baseline is not None and metrics["wer"] is not None:
        if info["step"] == 0:
            baseline.setdefault(name, metrics["wer"])
        if name in baseline:
            metrics["wer_change_since_step0"] = metrics["wer"] - baseline[name]
    error = None
    if dist.is_main():
        try:
            write_eval(run.out / "eval", stem, metrics, table, worst[: cfg.eval.worst], errs)
        except ckpt.CheckpointError as e:
            error = e
        if run.tb is not None:
            log_to_tensorboard(run.tb, f"{tb_prefix}/{name}", metrics, rows, worst, utts, cfg, info["step"])
    agree(error)
    return metrics


def longform_and_write(run, name: str, utts: list[Utterance], stem: str, info: dict, tb_prefix: str,
                       write_report: bool, failures: list) -> dict:
    """`evaluate_and_write` for a long-form set (asr.longform): eval/<stem>.json and .tsv (one row per
    recording), TensorBoard scalars and examples."""
    from asr.longform import TSV_COLUMNS, evaluate_longform

    cfg = run.cfg
    metrics, table = evaluate_longform(run.bundle, utts, cfg, run.device, name, run.eval_autocast, failures)
    record_decode_failures(run.data, info["data"], {u.id: u for u in utts}, failures, cfg, run.out, run.log,
                           write_report)
    metrics = {**metrics, **info, "kind": "longform", "max_utterances": cfg.eval.max_utterances}
    error = None
    if dist.is_main():
        try:
            ckpt.write_files({run.out / "eval" / f"{stem}.json": ckpt.json_text(metrics),
                              run.out / "eval" / f"{stem}.tsv": _tsv(TSV_COLUMNS, table)})
        except ckpt.CheckpointError as e:
            error = e
        if run.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    run.tb.add_scalar(f"{tb_prefix}/{name}/{key}", value, info["step"])
            run.tb.add_text(f"{tb_prefix}/{name}/examples", "\n\n".join(
                f"**ref:** {r[-2]}  \n**hyp:** {r[-1]}" for r in table[: cfg.eval.examples]), info["step"])
    agree(error)
    return metrics


def log_to_tensorboard(tb, prefix: str, metrics: dict, rows: list, worst: list, utts: list[Utterance], cfg,
                       step: int) -> None:
    """Every numeric metric as a scalar, examples as text, and the worst utterances with their audio."""
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tb.add_scalar(f"{prefix}/{key}", value, step)
    tb.add_text(f"{prefix}/examples", "\n\n".join(
        f"**ref:** {r}  \n**hyp:** {h}" for _, r, h in rows[: cfg.eval.examples]), step)
    by_id = {u.id: u for u in utts}
    for k, (utt_id, ref, hyp, wer) in enumerate(worst[:TB_AUDIO]):
        tb.add_text(f"{prefix}/worst_{k}", f"**{utt_id}** WER {wer:.1f}  \n**ref:** {ref}  \n**hyp:** {hyp}", step)
        try:
            audio = load_utterance_audio(by_id[utt_id], cfg.data.sample_rate)
        except Exception:  # decoded a moment ago; a clip gone since is not the evaluation's business
            continue
        tb.add_audio(f"{prefix}/worst_{k}", audio.unsqueeze(0), step, sample_rate=cfg.data.sample_rate)


def evaluate_sets(run, step: int) -> dict:
    """Evaluate every set of a training run at `step`: eval/step-N[.<set>].* files, TensorBoard, a log line
    each. Returns {set name: metrics}. A set of which no clip could be decoded has None scores (n = 0). A
    failed write (disk full) raises CheckpointError on every rank."""
    results = {}
    specs = {name: (src, split) for name, src, split in eval_set_specs(run.cfg)}
    for k, (name, utts) in enumerate(run.data.eval_sets.items()):
        src, split = specs[name]
        info = {"set": name, "split": split, "data": f"{src}/{split}", "step": step, "decode": decode_tag(run.cfg.decode),
                "loss_name": run.loss_name}
        stem = ckpt.step_dir_name(step) + ("" if k == 0 else f".{name}")
        metrics = results[name] = evaluate_and_write(run, name, utts, stem, info, "eval",
                                                     baseline=run.state.baseline)
        if not metrics["n"]:
            run.log(f"eval {name} step {step}: no utterance could be decoded ({metrics['failed']} failed); "
                    f"no scores, not a best")
            continue
        change = metrics.get("wer_change_since_step0")
        change = f" change since step 0 {change:+.2f}" if step and change is not None else ""
        run.log(f"eval {name} step {step}: wer {num(metrics['wer'])} cer {num(metrics['cer'])} "
                f"wer_ortho {num(metrics['wer_ortho'])} loss {num(metrics['loss'], '.4f')} (n={metrics['n']}){change}"
                + longform_note(metrics))
    return results


def longform_note(metrics: dict) -> str:
    """The long-form scores of a log line ("" for a set of clips)."""
    if metrics.get("kind") != "longform":
        return ""
    return (f" valid_timestamps {num(metrics['valid_timestamps'], '.3f')} of {metrics['windows']} windows, "
            f"boundary_error_s {num(metrics['boundary_error_s'], '.2f')}")


def check_scored(results: dict, what: str) -> None:
    """A TrainingError naming each set of which no utterance could be decoded: its result is no result."""
    empty = [f"'{name}' ({m['failed']} failed)" for name, m in results.items() if not m["n"]]
    if empty:
        raise TrainingError(f"{what}: no utterance of evaluation set {', '.join(empty)} could be decoded; "
                            f"no scores (see data_report.json and train.log)")


# ---------------------------------------------------------------------------------------
# The evaluation-only command.


def checkpoint_family(path: Path) -> str | None:
    """"whisper" or "ctc" for a training checkpoint (from its parameter names, read without loading the
    tensors) or an exported folder (its config.json); None when neither tells."""
    if (path / "model.pt").is_file() or ckpt.is_sharded(path):
        try:
            if ckpt.is_sharded(path):  # train.parallel = fsdp: the names in DCP's metadata
                from asr.fsdp import saved_names

                names = saved_names(path / ckpt.SHARDED)
            else:
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
    if not (path / "model.pt").is_file() and not (path / "config.json").is_file() and not ckpt.is_sharded(path):
        raise ConfigError(f"--checkpoint: {path} holds neither model.pt (a training checkpoint) nor config.json "
                          f"(an exported model)")
    found, wanted = checkpoint_family(path), infer_family(cfg.model)
    if found is not None and found != wanted:
        names = {"whisper": "a Whisper model", "ctc": "a CTC model"}
        raise ConfigError(f"--checkpoint: {path} is {names[found]}, the experiment configures {names[wanted]} "
                          f"(model.name = {cfg.model.name!r})")


def load_for_eval(bundle, cfg: Config, out: Path, checkpoint: str | None, log) -> int:
    """Load the weights to evaluate into `bundle.model`: `checkpoint` (a training step-N/ folder or an exported
    best/, final/), else the run's newest checkpoint that verifies, else none (the model as configured).
    Returns the step they are from."""
    from asr.resume import load_model_state, load_newest, load_sharded_state

    path, loaded = Path(checkpoint) if checkpoint else None, None
    if path is None:
        path, loaded = load_newest(out / "checkpoints", log,
                                   lambda p: None if ckpt.is_sharded(p) else ckpt.load_checkpoint(p, verified=True))
    if path is None:
        return 0
    if ckpt.is_sharded(path):  # train.parallel = fsdp: the model's part of a sharded checkpoint
        select_parameters(bundle, cfg.train, cfg.lora)
        names = {n for n, p in bundle.model.named_parameters() if p.requires_grad} if cfg.train.save_trainable_only \
            else None
        reason = ckpt.verify(path) if checkpoint else None  # load_newest verified the run's newest
        if reason:
            raise ckpt.CorruptCheckpoint(path, reason)
        load_sharded_state(path, bundle.model, None, names)
        step = ckpt.load_trainer(path)["step"]
        log(f"evaluating {path} (step {step})")
        return step
    if (path / "model.pt").is_file():  # a training checkpoint: the same parameter set-up (LoRA) first
        select_parameters(bundle, cfg.train, cfg.lora)
        state, _, trainer_state = loaded or ckpt.load_checkpoint(path)
        step, partial = trainer_state["step"], set(state) if cfg.train.save_trainable_only else None
    else:  # an exported folder: merged weights, the base architecture
        with quiet_progress_bars():
            state = type(bundle.model).from_pretrained(str(path), dtype=torch.float32).state_dict()
        info = path / EXPORT_INFO
        step, partial = json.loads(info.read_text())["step"] if info.is_file() else 0, None
    load_model_state(bundle.model, state, partial, f"--checkpoint: {path}")
    log(f"evaluating {path} (step {step})")
    return step


def evaluate_only(cfg: Config, checkpoint: str | None = None) -> dict:
    """Evaluate without training (see `load_for_eval` for which weights). Writes
    eval/step-N.<split>.<decoding>[.<set>].* beside the training run's files, so decoding settings sit side by
    side, and TensorBoard scalars under eval-only/; leaves the run's config.toml and data_report.json as they
    are. A set of which no clip could be decoded is an error (exit status 1) once the others are written."""
    try:
        if checkpoint:
            check_eval_checkpoint(cfg, checkpoint)  # before any data is read
        device, out, log = start_run(cfg, training=False)
        bundle, data = prepare(cfg, out, log, report=not (out / "data_report.json").exists())  # not the run's
        step = load_for_eval(bundle, cfg, out, checkpoint, log)
        bundle.model.to(device)
        tb = Board(out / "tb", log) if dist.is_main() else None
        loss_name = cfg.train.loss or DEFAULT_LOSS[bundle.family]
        precision = eval_precision(cfg, device, log, bundle.family)
        if precision == "bf16":
            guard_bf16_convs(bundle.model, device, log)
        run = SimpleNamespace(cfg=cfg, bundle=bundle, data=data, device=device, out=out, log=log, tb=tb,  # as a Run
                              loss_fn=loss_function(cfg.train, bundle.family), loss_name=loss_name,
                              eval_autocast=autocast_for(precision, device))
        tag, results = decode_tag(cfg.decode), {}
        for k, (name, src, split) in enumerate(eval_set_specs(cfg)):
            info = {"set": name, "split": split, "data": f"{src}/{split}", "step": step, "decode": tag,
                    "loss_name": loss_name}
            stem = f"{ckpt.step_dir_name(step)}.{split}.{tag}" + ("" if k == 0 else f".{name}")
            metrics = results[name] = evaluate_and_write(run, name, data.eval_sets[name], stem, info,
                                                         f"eval-only/{split}.{tag}", write_report=False)
            ci = metrics["wer_ci95"]
            log(f"eval {name} ({split}, {tag}) step {step}: wer {num(metrics['wer'])}"
                + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                + f" cer {num(metrics['cer'])} wer_ortho {num(metrics['wer_ortho'])} "
                  f"cer_ortho {num(metrics['cer_ortho'])} (n={metrics['n']}, failed {metrics['failed']})"
                + longform_note(metrics))
        if tb is not None:
            tb.close()
        check_scored(results, "--eval-only")
        log.close()
        return results
    finally:
        unlock_run_dir(Path(cfg.run.out_dir))

