"""Evaluation: decode a set, score it, write `eval/step-N.json`, `.tsv` and `.worst.tsv`."""

from __future__ import annotations

import csv
import functools
import io
from contextlib import nullcontext
from pathlib import Path

import torch

from asr import checkpoint as ckpt
from asr import distributed as dist
from asr.data import AudioDataset, Utterance, collate
from asr.decode import ctc_decode, whisper_generate
from asr.losses import LOSSES
from asr.metrics import error_rates, hallucination_metrics, utterance_wer
from asr.text import NORMALIZERS
from asr.models import loss_batch, model_inputs


def eval_batches(utts: list[Utterance], batch_size: int) -> list[list[int]]:
    """Fixed batches for evaluation: sorted by duration (less padding), this rank's share."""
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)
    mine = order[dist.rank() :: dist.world_size()]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


@torch.no_grad()
def evaluate(bundle, utts: list[Utterance], cfg, device, loss_name: str, autocast=nullcontext,
             failures: list | None = None) -> tuple[dict, list]:
    """Decode `utts` with `cfg.decode` and score them. Returns (metrics, rows of (id, reference, hypothesis)).

    Metrics: wer, cer (normalised with cfg.eval.normalizer in each utterance's language), wer_ortho,
    cer_ortho (percent), loss (teacher-forced), n, failed (clips that could not be decoded), and the
    hallucination signals of asr.metrics.hallucination_metrics on the normalised text; with n = 0 (every
    clip failed) the scores and the loss are None, never 0 or NaN. Given `failures`, the (id, error) of
    each clip that failed to decode is appended to it.
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
    loss_fn = functools.partial(LOSSES[bundle.family][loss_name], **cfg.train.loss_args)
    rows, loss_sum, loss_n = [], 0.0, 0
    for batch in loader:
        for utt_id, err in batch["dropped"]:
            rows.append((utt_id, "", "", err))
        if not batch["ids"]:
            continue
        with autocast():
            inputs = model_inputs(bundle, batch, device)
            if bundle.family == "whisper":  # the encoder runs once, for the loss and for decoding
                encoded = model.get_encoder()(inputs.pop("input_features"))
                outputs = model(encoder_outputs=encoded, **inputs)
                loss, n = loss_fn(outputs, loss_batch(bundle, batch, device))
                del outputs  # (B, L, V) logits: not needed while decoding
                hyps = whisper_generate(bundle, batch, device, cfg.decode.method, cfg.decode.beam_size,
                                        cfg.decode.max_new_tokens, cfg.decode.prompt, encoder_outputs=encoded,
                                        args=cfg.decode.args)
            else:
                outputs = model(**inputs)
                loss, n = loss_fn(outputs, loss_batch(bundle, batch, device))
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


def worst_rows(rows: list, n: int, normalizer: str, languages: dict) -> list:
    """The `n` utterances with the highest normalised WER: (id, reference, hypothesis, wer)."""
    norm = NORMALIZERS[normalizer]
    scored = []
    for utt_id, ref, hyp in rows:
        lang = languages.get(utt_id, "")
        scored.append((utt_id, ref, hyp, round(utterance_wer(norm(ref, lang), norm(hyp, lang)), 2)))
    scored.sort(key=lambda r: -r[3])
    return scored[:n]


def write_eval(folder: Path, stem: str, metrics: dict, rows: list, extra: dict | None = None,
               worst: list | None = None) -> None:
    """`folder/stem.json` (metrics), `folder/stem.tsv` (id, reference, hypothesis) and, given `worst`,
    `folder/stem.worst.tsv` (id, reference, hypothesis, wer), written atomically together: a failed write
    (disk full) is a CheckpointError naming the file and leaves none of them half-written."""
    files = {folder / f"{stem}.json": ckpt.json_text({**metrics, **(extra or {})}),
             folder / f"{stem}.tsv": _tsv(["id", "reference", "hypothesis"], rows)}
    if worst is not None:
        files[folder / f"{stem}.worst.tsv"] = _tsv(["id", "reference", "hypothesis", "wer"], worst)
    ckpt.write_files(files)


def _tsv(header: list[str], rows: list) -> str:
    f = io.StringIO(newline="")
    w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return f.getvalue()
