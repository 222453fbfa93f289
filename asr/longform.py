"""Long-form evaluation (eval.sets kind = "longform"): recordings of 60-180 s built from a split's clips
(seeded, with known segment boundaries), decoded with transformers' long-form Whisper `generate`
(sequential 30 s windows moved by the predicted timestamps), scored by long-form WER, the share of windows
whose output has valid increasing timestamps, and the boundary error of the predicted segments."""

from __future__ import annotations

import random
import statistics
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from asr import distributed as dist
from asr.data import DataError, Utterance, load_utterance_audio
from asr.metrics import error_rates
from asr.timestamps import speech_bounds

GAP_S = 5.0  # boundary alignment: the cost of leaving a segment unmatched (a match costs |start| + |end| error)


@dataclass
class Recording:
    id: str
    clips: list[Utterance]
    language: str
    audio: torch.Tensor | None = None  # (N,)
    segments: list[tuple[float, float]] = field(default_factory=list)  # true (start, end) of each clip's speech
    failed: list[tuple[str, str]] = field(default_factory=list)  # (clip id, error) left out

    @property
    def reference(self) -> str:
        return " ".join(u.text.strip() for u in self.clips if u.id not in dict(self.failed))


def plan_recordings(utts: list[Utterance], min_s: float, max_s: float, count: int, seed: int,
                    name: str = "") -> list[Recording]:
    """Which clips make each recording: clips in a seeded order joined until a duration drawn in
    [min_s, max_s] is reached. `count` recordings (the clips cycled in new orders where the split is too
    short), or 0: as many as the clips fill, each clip at most once. DataError when none can be built."""
    rng = random.Random(f"longform/{seed}")
    order, pos, passes = list(range(len(utts))), len(utts), 0
    recordings, current, total, target = [], [], 0.0, rng.uniform(min_s, max_s)
    while not count or len(recordings) < count:
        if pos == len(order):
            if not count and passes:  # each clip at most once
                break
            rng.shuffle(order)
            pos, passes = 0, passes + 1
        k = order[pos]
        pos += 1
        current.append(utts[k])
        total += utts[k].duration
        if total >= target:
            recordings.append(current)
            current, total, target = [], 0.0, rng.uniform(min_s, max_s)
    if not recordings:
        seconds = sum(u.duration for u in utts)
        raise DataError(f"evaluation set '{name}': its {len(utts)} clips ({seconds:.1f} s) fill no long-form "
                        f"recording of {min_s:g} s or more; lower eval.longform_min_s or set "
                        f"eval.longform_recordings to reuse clips")
    return [Recording(f"{name}/long-{k:03d}", clips, clips[0].language) for k, clips in enumerate(recordings)]


def load_recording(rec: Recording, sample_rate: int) -> None:
    """Decode and join a recording's clips; its true segments are each clip's speech start and end
    (asr.timestamps.speech_bounds) at the clip's place. A clip that fails to decode is left out."""
    parts, offset = [], 0
    for u in rec.clips:
        try:
            audio = load_utterance_audio(u, sample_rate)
        except Exception as e:
            rec.failed.append((u.id, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        start, end = speech_bounds(audio, sample_rate)
        rec.segments.append((offset / sample_rate + start, offset / sample_rate + end))
        parts.append(audio)
        offset += audio.shape[0]
    rec.audio = torch.cat(parts) if parts else torch.zeros(0)


def window_valid(tokens: list[int], begin: int, eos: int) -> bool:
    """Whether one 30 s window's output (its generated tokens) has valid, increasing timestamps: it starts
    and ends with a timestamp token (every text run enclosed), holds at least two, and their times never
    decrease. Special tokens other than timestamps (language, task, <|endoftext|>) are left out first."""
    seq = [t for t in tokens if t < eos or t >= begin]
    stamps = [t for t in seq if t >= begin]
    return len(stamps) >= 2 and seq[0] >= begin and seq[-1] >= begin and stamps == sorted(stamps)


def align_boundaries(true: list[tuple[float, float]], pred: list[tuple[float, float]]) -> list[float]:
    """Absolute errors (s) of the starts and ends of matched segments: a monotonic alignment of the predicted
    segments to the true ones (edit-distance style) where a match costs its start and end errors and an
    unmatched segment on either side costs GAP_S."""
    n, m = len(true), len(pred)
    cost = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        for j in range(m + 1):
            if i == 0 or j == 0:
                cost[i][j] = (i + j) * GAP_S
                continue
            match = abs(true[i - 1][0] - pred[j - 1][0]) + abs(true[i - 1][1] - pred[j - 1][1])
            cost[i][j] = min(cost[i - 1][j - 1] + match, cost[i - 1][j] + GAP_S, cost[i][j - 1] + GAP_S)
    errors, i, j = [], n, m
    while i > 0 and j > 0:
        match = abs(true[i - 1][0] - pred[j - 1][0]) + abs(true[i - 1][1] - pred[j - 1][1])
        if cost[i][j] == cost[i - 1][j - 1] + match:
            errors += [abs(true[i - 1][1] - pred[j - 1][1]), abs(true[i - 1][0] - pred[j - 1][0])]  # reversed below
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + GAP_S:
            i -= 1
        else:
            j -= 1
    return errors[::-1]


@torch.no_grad()
def transcribe_long(bundle, audio: torch.Tensor, language: str, device, max_new_tokens: int,
                    num_beams: int = 1, autocast=nullcontext) -> tuple[str, list[tuple[float, float]], list[list[int]]]:
    """One recording (N,) through transformers' long-form `generate` (return_timestamps=True: sequential
    30 s windows moved by the predicted timestamps): (text, predicted segments (start, end) in s, the
    generated tokens of each window). `generate` runs under `autocast`; the log-mel features before it in
    float32."""
    model, tok = bundle.model, bundle.tokenizer
    feats = bundle.processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt",
                                               truncation=False, padding="longest", return_attention_mask=True)
    if feats.input_features.shape[-1] < 3000:  # a short recording: one window, padded as Whisper's input
        feats = bundle.processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt",
                                                   return_attention_mask=True)
    code = bundle.whisper_language(language)
    with autocast():
        out = model.generate(feats.input_features.to(device), attention_mask=feats.attention_mask.to(device),
                             return_timestamps=True, return_segments=True, language=code, task=bundle.cfg.task,
                             max_new_tokens=max_new_tokens, num_beams=num_beams)
    segments = out["segments"][0] if isinstance(out, dict) else []
    sequences = out["sequences"] if isinstance(out, dict) else out
    windows: dict[int, list[int]] = {}
    for seg in segments:  # every segment of a window holds that window's output as its "result"
        result = seg["result"]
        result = result["sequences"] if isinstance(result, dict) else result
        windows.setdefault(id(seg["result"]), result.flatten().tolist())
    text = tok.decode(sequences[0], skip_special_tokens=True).strip()
    pred = [(float(s["start"]), float(s["end"])) for s in segments]
    return text, pred, list(windows.values())


def evaluate_longform(bundle, utts: list[Utterance], cfg, device, name: str, autocast=None,
                      failures: list | None = None) -> tuple[dict, list]:
    """Build the recordings of a long-form set from `utts` (eval.longform_*), decode and score them.
    Returns (metrics, rows per recording). Metrics: wer, cer, wer_ortho, cer_ortho (percent, over whole
    recordings), n (recordings), seconds, windows, valid_timestamps (share of windows whose output has valid
    increasing timestamps, `window_valid`), boundary_error_s (median absolute error of the matched segments'
    starts and ends, `align_boundaries`), boundary_matched (share of true segments matched), failed (clips
    left out). Given `failures`, the (id, error) of each clip that failed to decode is appended to it."""
    ec = cfg.eval
    recordings = plan_recordings(utts, ec.longform_min_s, ec.longform_max_s, ec.longform_recordings,
                                 cfg.run.seed, name)
    model = bundle.model
    was_training = model.training
    model.eval()
    begin, eos = bundle.tokenizer.convert_tokens_to_ids("<|0.00|>"), bundle.tokenizer.eos_token_id
    num_beams = cfg.decode.beam_size if cfg.decode.method == "beam" else 1
    rows = []
    for rec in recordings[dist.rank():: dist.world_size()]:
        load_recording(rec, cfg.data.sample_rate)
        if not rec.segments:
            rows.append((rec.id, rec.language, 0.0, rec.reference, "", [], [], [], rec.failed))
            continue
        hyp, pred, windows = transcribe_long(bundle, rec.audio.cpu(), rec.language, device,
                                             cfg.decode.max_new_tokens, num_beams, autocast or nullcontext)
        valid = [window_valid(w, begin, eos) for w in windows]
        rows.append((rec.id, rec.language, rec.audio.shape[0] / cfg.data.sample_rate, rec.reference, hyp,
                     valid, align_boundaries(rec.segments, pred), [len(rec.segments), len(pred)], rec.failed))
    model.train(was_training)
    rows = dist.gather_rows(rows)
    rows.sort(key=lambda r: r[0])
    scored = [r for r in rows if r[2] > 0]
    metrics = error_rates([r[3] for r in scored], [r[4] for r in scored], ec.normalizer, [r[1] for r in scored])
    windows = [v for r in scored for v in r[5]]
    errors = [e for r in scored for e in r[6]]
    true_segments = sum(r[7][0] for r in scored)
    metrics.update({
        "n": len(scored), "seconds": round(sum(r[2] for r in scored), 2), "clips": true_segments,
        "windows": len(windows), "valid_timestamps": sum(windows) / len(windows) if windows else None,
        "boundary_error_s": statistics.median(errors) if errors else None,
        "boundary_matched": len(errors) / 2 / true_segments if true_segments else None,
        "failed": sum(len(r[8]) for r in rows), "loss": None, "wer_ci95": None,
    })
    if failures is not None:
        failures += [f for r in rows for f in r[8]]
    table = [(r[0], r[1], round(r[2], 2), r[7][0] if r[7] else 0, r[7][1] if r[7] else 0, len(r[5]), sum(r[5]),
              round(statistics.median(r[6]), 3) if r[6] else "", r[3], r[4]) for r in rows]
    return metrics, table


TSV_COLUMNS = ["id", "language", "duration", "segments", "predicted_segments", "windows", "valid_windows",
               "boundary_error_s", "reference", "hypothesis"]
