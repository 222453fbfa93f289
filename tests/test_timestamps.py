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


@needs_whisper_base
def test_prev_text_prompt_is_context_and_not_a_target(tmp_path):
    from asr.models import loss_batch

    cfg, bundle, utts = whisper_data(tmp_path, prev_text_prob=1.0, timestamp_prob=0.5)
    dataset = samples_of(cfg, bundle, utts)
    items = [dataset[(0, 1, i)] for i in range(8)]
    prev, sot = bundle.tokenizer.convert_tokens_to_ids(["<|startofprev|>", "<|startoftranscript|>"])
    texts = {" " + u.label_text for u in utts}
    for item in items:
        labels, p = item["labels"], item["prompt_length"]
        # <|startofprev|> another clip's text, then the sample's own sequence from <|startoftranscript|>
        assert labels[0] == prev and labels[p] == sot and p > 1 and len(labels) <= 448
        assert bundle.tokenizer.decode(labels[1:p]) in texts
    batch = collate(items)
    targets = loss_batch(bundle, batch, torch.device("cpu"))["labels"]  # (B, L-1): labels shifted by one
    for b, item in enumerate(items):
        p, n = item["prompt_length"], len(item["labels"])
        assert (targets[b, :p] == -100).all()  # the prompt and <|startoftranscript|> are not predicted
        assert targets[b, p:n - 1].tolist() == item["labels"][p + 1:]  # the rest is, as without a prompt
    # Without a prompt the targets are the labels shifted by one, as before.
    plain = collate([samples_of(tiny_whisper_config(tmp_path / "b"), bundle, utts)[(0, 1, i)] for i in range(2)])
    assert torch.equal(loss_batch(bundle, plain, torch.device("cpu"))["labels"], plain["labels"][:, 1:])


# ---------------------------------------------------------------------------------------
# Long-form evaluation.


def test_window_validity_and_boundary_alignment():
    from asr.longform import align_boundaries, window_valid

    eos, b = 50257, BEGIN
    sot, tr, task = 50258, 50303, 50359
    assert window_valid([sot, tr, task, b, 11, 12, b + 50, b + 50, 13, b + 120, eos], b, eos)
    assert not window_valid([sot, tr, task, b, 11, 12, 13, eos], b, eos)  # a text never closed
    assert not window_valid([sot, tr, task, 11, b + 10, eos], b, eos)  # text before the first timestamp
    assert not window_valid([b + 60, 11, b + 50, eos], b, eos)  # time going back
    assert not window_valid([sot, tr, task, eos], b, eos)  # no timestamp at all
    true = [(0.5, 2.0), (2.5, 4.0), (4.4, 6.0)]
    # The second true segment missed, the others found 0.1 s off (start) and 0.2 s off (end).
    assert align_boundaries(true, [(0.6, 2.2), (4.5, 6.2)]) == pytest.approx([0.1, 0.2, 0.1, 0.2])
    assert align_boundaries(true, []) == [] and align_boundaries(true, true) == [0.0] * 6


def fake_utts(durations, language="tr"):
    from asr.data import Utterance

    return [Utterance(id=f"u{k}", text=f"w{k}", language=language, source="s", duration=d)
            for k, d in enumerate(durations)]


def test_long_recordings_are_seeded_and_within_their_durations():
    from asr.data import DataError
    from asr.longform import plan_recordings

    utts = fake_utts([3.0 + (k % 5) for k in range(200)])  # 1000 s
    recs = plan_recordings(utts, 60, 180, 0, seed=0, name="x")
    assert len(recs) >= 5 and all(60 <= sum(u.duration for u in r.clips) <= 180 + 7 for r in recs)
    ids = [u.id for r in recs for u in r.clips]
    assert len(ids) == len(set(ids))  # count 0: each clip at most once
    assert [[u.id for u in r.clips] for r in plan_recordings(utts, 60, 180, 0, seed=0)] == \
        [[u.id for u in r.clips] for r in recs]
    assert [u.id for u in plan_recordings(utts, 60, 180, 0, seed=1)[0].clips] != [u.id for u in recs[0].clips]
    short = fake_utts([2.0] * 10)  # 20 s: reused for 3 recordings when asked, else none fits 60 s
    assert len(plan_recordings(short, 60, 60, 3, seed=0)) == 3
    with pytest.raises(DataError, match="evaluation set 'x': its 10 clips .* fill no long-form recording"):
        plan_recordings(short, 60, 180, 0, seed=0, name="x")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Whisper trained 2 steps with timestamps, packing and prompts, evaluated on the dev clips and on a
    long-form set of two recordings of 40-70 s built from the training split."""
    from asr.config import EvalSetConfig
    from asr.train import train

    out = tmp_path_factory.mktemp("ts") / "run"
    cfg = tiny_whisper_config(out, max_steps=2)
    cfg.data.timestamp_prob, cfg.data.concat_prob, cfg.data.concat_max_s = 0.5, 0.5, 20.0
    cfg.data.prev_text_prob = 0.3
    cfg.eval.at_start, cfg.eval.max_utterances, cfg.preflight.enabled = False, 0, False
    cfg.eval.sets = [EvalSetConfig(source="tr", split="dev"),
                     EvalSetConfig(source="tr", split="train", name="long", kind="longform")]
    cfg.eval.longform_min_s, cfg.eval.longform_max_s, cfg.eval.longform_recordings = 40.0, 70.0, 2
    return cfg, train(cfg, fresh=True)


@needs_whisper_base
def test_longform_set_is_scored_into_the_eval_json_and_tensorboard(trained):
    from helpers import read_json, read_tsv, scalars

    cfg, results = trained
    out = cfg.run.out_dir
    m = read_json(f"{out}/eval/step-000002.long.json")
    assert m["kind"] == "longform" and m["n"] == 2 and m["split"] == "train" and m["step"] == 2
    assert 80 <= m["seconds"] <= 140 + 8 and m["windows"] >= 4  # two recordings of 40-70 s: 30 s windows
    for key in ("wer", "cer", "wer_ortho", "cer_ortho"):
        assert 0 <= m[key]
    assert 0 <= m["valid_timestamps"] <= 1 and (m["boundary_error_s"] is None or m["boundary_error_s"] >= 0)
    rows = read_tsv(f"{out}/eval/step-000002.long.tsv")
    assert len(rows) == 2 and all(len(r["reference"].split()) > 40 for r in rows)
    assert sum(int(r["segments"]) for r in rows) == m["clips"]
    tags = scalars(out)
    for key in ("wer", "wer_ortho", "valid_timestamps", "windows"):
        assert f"eval/long/{key}" in tags
    assert "valid_timestamps" in open(f"{out}/train.log", encoding="utf-8").read()


@needs_whisper_base
def test_exported_model_gives_timestamps_through_the_pipeline_on_two_minutes(trained):
    """What this proves: the exported final/ folder of a model trained with timestamps loads in transformers'
    pipeline, which runs its long-form (sequential, over 30 s) decoding with return_timestamps=True on a
    2-minute recording and returns chunks whose timestamps are numbers that never go back. A 2-step tiny
    model transcribes nothing right and its times need not match the speech (nor stay within the recording):
    that is for the benchmark to measure with a real model."""
    from transformers import pipeline

    cfg, _ = trained
    clips = sorted((FIXTURE / "clips").glob("*.mp3"))
    audio = torch.cat([load_audio(c, SR) for c in clips] * 2)[: 120 * SR]  # 2 minutes of speech
    assert audio.shape[0] == 120 * SR
    asr = pipeline("automatic-speech-recognition", model=f"{cfg.run.out_dir}/final", device="cpu")
    out = asr({"raw": audio.numpy(), "sampling_rate": SR}, return_timestamps=True,
              generate_kwargs={"num_beams": 1, "max_new_tokens": 8})
    chunks = out["chunks"]
    assert chunks and isinstance(out["text"], str)
    stamps = [t for c in chunks for t in c["timestamp"]]
    assert all(isinstance(t, float) for t in stamps), chunks  # every chunk closed with an end time
    assert stamps == sorted(stamps) and stamps[0] >= 0, chunks  # increasing: starts <= ends <= next starts
    assert stamps[-1] > 90.0  # the windows moved through the whole recording, not only its first 30 s


@pytest.mark.parametrize("assignment", ["data.timestamp_prob=0.5", "data.prev_text_prob=0.1",
                                        'eval.sets=[{source = "tr", split = "dev", kind = "longform"}]'])
def test_whisper_only_settings_on_a_ctc_model_stop_with_one_line(tmp_path, assignment, capsys):
    import run
    from helpers import tiny_ctc_config, write_exp

    exp = write_exp(tiny_ctc_config(tmp_path / "run"), tmp_path / "exp.toml")
    assert run.main(["--exp", str(exp), "--set", assignment]) == 2
    err = capsys.readouterr().err.strip()
    key = "eval.sets.0.kind" if "kind" in assignment else assignment.split("=")[0]
    assert err.startswith(f"error: {key}: ") and "Whisper" in err and "\n" not in err, err
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # before anything is written
