"""Whisper trained with timestamps (issue 18): the speech detector, timestamped and packed training samples
and their exact resume, long-form evaluation, and the exported model's timestamps through the pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from asr.audio import load_audio
from asr.data import AudioDataset, DurationBatchSampler, collate
from asr.experiment import Log, prepare

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import FIXTURE, needs_whisper_base, tiny_whisper_config

SR = 16000
BEGIN = 50364  # <|0.00|> of Whisper's multilingual tokenizer


def silence(seconds: float, seed: int = 0) -> torch.Tensor:
    """Near-silence: white noise at about -80 dBFS, as a quiet recording's background."""
    return 1e-4 * torch.randn(int(round(seconds * SR)), generator=torch.Generator().manual_seed(seed))


def test_speech_bounds_find_known_leading_and_trailing_silence():
    from asr.timestamps import speech_bounds

    t = torch.arange(int(1.2 * SR)) / SR
    tone = 0.3 * torch.sin(2 * math.pi * 220 * t) * (0.6 + 0.4 * torch.sin(2 * math.pi * 3 * t))  # a voiced "word"
    start, end = speech_bounds(torch.cat([silence(0.5), tone, silence(0.8, 1)]), SR)
    assert start == pytest.approx(0.5, abs=0.021) and end == pytest.approx(1.7, abs=0.021)
    # A real clip, padded with 1.00 s of silence before and 0.70 s after: its bounds move by exactly 1.00 s.
    clip = load_audio(FIXTURE / "clips" / "synth_tr_1_000038.mp3", SR)
    s0, e0 = speech_bounds(clip, SR)
    assert 0 <= s0 < e0 <= clip.shape[0] / SR and e0 - s0 > 0.5
    s1, e1 = speech_bounds(torch.cat([silence(1.0), clip, silence(0.7, 1)]), SR)
    assert (s1, e1) == (pytest.approx(s0 + 1.0, abs=1e-9), pytest.approx(e0 + 1.0, abs=1e-9))
    assert speech_bounds(silence(2.0), SR) == (0.0, 2.0)  # nothing louder than the rest: the whole clip


def whisper_data(tmp_path, **data):
    cfg = tiny_whisper_config(tmp_path / "run")
    for k, v in data.items():
        setattr(cfg.data, k, v)
    bundle, d = prepare(cfg, tmp_path, Log(None))
    return cfg, bundle, d.train


def samples_of(cfg, bundle, utts):
    from asr.train import timestamp_samples

    return AudioDataset(utts, SR, samples=timestamp_samples(cfg, bundle, utts))


def times(labels: list[int]) -> list[float]:
    return [round((t - BEGIN) * 0.02, 2) for t in labels if BEGIN <= t <= BEGIN + 1500]


@needs_whisper_base
def test_timestamp_prob_labels_carry_the_speech_start_and_end(tmp_path):
    from asr.timestamps import speech_bounds

    cfg, bundle, utts = whisper_data(tmp_path, timestamp_prob=1.0)
    tok = bundle.tokenizer
    assert tok.convert_tokens_to_ids("<|0.00|>") == BEGIN and tok.convert_tokens_to_ids("<|3.52|>") == BEGIN + 176
    dataset = samples_of(cfg, bundle, utts)
    for i in range(3):
        item = dataset[(0, 0, i)]
        labels, u = item["labels"], utts[i]
        start, end = speech_bounds(item["audio"], SR)
        # <|startoftranscript|><|tr|><|transcribe|><|start|> text<|end|><|endoftext|>, no <|notimestamps|>
        assert labels[:3] == u.labels[:3] and labels[3] == BEGIN + round(start / 0.02)
        assert labels[-2] == BEGIN + round(end / 0.02) and labels[-1] == tok.eos_token_id
        assert tok.decode(labels[4:-2]) == " " + u.label_text
        assert tok.convert_tokens_to_ids("<|notimestamps|>") not in labels
        assert 0 <= start < end <= u.duration + 0.02
    batch = collate([dataset[(0, 0, i)] for i in range(3)])
    assert batch["label_lengths"].tolist() == [len(dataset[(0, 0, i)]["labels"]) for i in range(3)]
    # timestamp_prob = 0 (the default): the clip's own <|notimestamps|> labels, as before.
    assert "labels" not in samples_of(tiny_whisper_config(tmp_path / "b"), bundle, utts)[(0, 0, 0)]


@needs_whisper_base
def test_packed_samples_are_one_language_within_limits_and_resume_exactly(tmp_path):
    cfg, bundle, utts = whisper_data(tmp_path, timestamp_prob=0.5, concat_prob=0.5, concat_max_s=12.0)
    dataset = samples_of(cfg, bundle, utts)
    sampler = DurationBatchSampler([u.duration for u in utts], 4, seed=0)
    keys = [k for _, b in zip(range(16), iter(sampler)) for k in b]  # two epochs of 8 batches
    items = [dataset[k] for k in keys]
    kinds = []
    for item in items:
        labels = item.get("labels")
        if labels is None:
            kinds.append("plain")
            continue
        ts = times(labels)
        assert len(ts) % 2 == 0 and ts == sorted(ts), ts  # <|s|> text <|e|> per segment, in order
        assert len(labels) <= 448 and ts[-1] <= item["audio"].shape[0] / SR + 0.02
        kinds.append("packed" if len(ts) > 2 else "single")
        if len(ts) > 2:
            assert item["audio"].shape[0] / SR <= 12.0 + 0.05
    assert {"plain", "single", "packed"} <= set(kinds), kinds
    # The sample of a key is a function of (seed, epoch, position, clip): a sampler resumed at batch 11
    # yields the same samples, and another seed draws others.
    resumed = DurationBatchSampler([u.duration for u in utts], 4, seed=0)
    resumed.load_state_dict({"epoch": 1, "position": 3})
    tail = [k for _, b in zip(range(5), iter(resumed)) for k in b]
    assert tail == keys[-len(tail):]
    again = samples_of(cfg, bundle, utts)
    for k, item in zip(tail, items[-len(tail):]):
        other = again[k]
        assert other.get("labels") == item.get("labels") and torch.equal(other["audio"], item["audio"])
    cfg.run.seed = 1
    reseeded = samples_of(cfg, bundle, utts)
    assert any(reseeded[k].get("labels") != item.get("labels") for k, item in zip(keys, items))


@needs_whisper_base
def test_packing_respects_the_label_limit(tmp_path):
    cfg, bundle, utts = whisper_data(tmp_path, concat_prob=1.0, concat_max_s=30.0)
    from asr.train import timestamp_samples

    samples = timestamp_samples(cfg, bundle, utts)
    packs = [samples.pack(0, 0, i) for i in range(len(utts))]
    assert max(len(p) for p in packs) > 2  # 30 s hold several fixture clips
    samples.max_tokens = 40  # a tight limit: fewer clips per pack, never more tokens than it
    for i in range(len(utts)):
        clips = samples.pack(0, 0, i)
        n = len(samples.prefixes["tr"]) + 1 + sum(2 + len(samples.text_ids(k)) for k in clips)
        assert clips[0] == i and (n <= 40 or len(clips) == 1)
