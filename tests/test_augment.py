"""On-the-fly augmentation (`[augment]`, asr/augment.py): each augmentation changes the waveform or the
features as specified, the perturbed lengths drive batching and CTC feasibility, evaluation is untouched,
resume is exact with augmentation on, and bad settings are one line."""

from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.augment import (Augmenter, apply_spec_masks, mask_spans, mix_at_snr, perturbed_samples, speed_factor,
                         speed_perturb)
from asr.config import AugmentConfig
from asr.data import DurationBatchSampler, Labeler, SplitReport, Utterance, collate, filter_utterances
from asr.data import DataConfig, load_utterance_audio, read_source_split
from asr.resume import ResumeError
from asr.train import train

from helpers import final_params, read_json, tiny_ctc_config, write_exp


def fixture_clip() -> torch.Tensor:
    utts, _ = read_source_split(tiny_ctc_config("unused").data.sources[0], "train")
    return load_utterance_audio(utts[0], 16000)  # (N,)


@pytest.fixture
def noise_dir(tmp_path):
    """A folder with one short stereo 8 kHz noise clip (shorter than any fixture clip: it is looped)."""
    folder = tmp_path / "noise"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sf.write(folder / "pink.flac", rng.standard_normal((4000, 2)).astype("float32") * 0.1, 8000)
    return folder


def snr_db(clean: torch.Tensor, mixed: torch.Tensor) -> float:
    return 10 * math.log10(float(clean.double().pow(2).sum() / (mixed - clean).double().pow(2).sum()))


# ---------------------------------------------------------------------------------------
# The augmentations themselves.


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_length_and_pitch_by_the_factor(factor):
    audio = fixture_clip()
    out = speed_perturb(audio, factor, 16000)
    assert out.shape[0] == math.ceil(audio.shape[0] / factor) == perturbed_samples(audio.shape[0], factor, 16000)
    tone = torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)  # 1 s of 440 Hz
    spectrum = torch.fft.rfft(speed_perturb(tone, factor, 16000)).abs()
    peak_hz = int(spectrum.argmax()) * 16000 / ((spectrum.shape[0] - 1) * 2)
    assert abs(peak_hz - 440 * factor) < 2  # tempo and pitch change together (Kaldi's speed perturbation)


def test_noise_is_mixed_at_the_drawn_snr(noise_dir):
    audio = fixture_clip()
    fixed = Augmenter(AugmentConfig(noise_dir=str(noise_dir), snr_db=[17.0, 17.0]), 0, 16000)
    for i in range(4):
        mixed = fixed(audio, [], epoch=0, index=i)["audio"]
        assert mixed.shape == audio.shape
        assert abs(snr_db(audio, mixed) - 17.0) < 0.5
    ranged = Augmenter(AugmentConfig(noise_dir=str(noise_dir), snr_db=[10.0, 30.0]), 0, 16000)
    snrs = [snr_db(audio, ranged(audio, [], epoch=0, index=i)["audio"]) for i in range(8)]
    assert all(10 - 0.5 < s < 30 + 0.5 for s in snrs) and max(snrs) - min(snrs) > 3  # drawn per clip
    again = [snr_db(audio, ranged(audio, [], epoch=0, index=i)["audio"]) for i in range(8)]
    assert snrs == again  # the same (epoch, index): the same draws
    assert snrs != [snr_db(audio, ranged(audio, [], epoch=1, index=i)["audio"]) for i in range(8)]
    never = Augmenter(AugmentConfig(noise_dir=str(noise_dir), noise_prob=0.0), 0, 16000)
    assert torch.equal(never(audio, [], 0, 0)["audio"], audio)
    assert abs(snr_db(audio, mix_at_snr(audio, torch.randn(audio.shape[0]), -3.0)) + 3.0) < 1e-6


def test_gain_scales_by_the_drawn_decibels():
    audio = fixture_clip()
    fixed = Augmenter(AugmentConfig(gain_db=[6.0, 6.0]), 0, 16000)(audio, [], 0, 0)["audio"]
    assert torch.allclose(fixed, audio * 10 ** (6 / 20))
    ratios = [float(Augmenter(AugmentConfig(gain_db=[-6.0, 6.0]), 0, 16000)(audio, [], 0, i)["audio"].abs().max()
                    / audio.abs().max()) for i in range(6)]
    assert all(10 ** (-6 / 20) - 1e-6 <= r <= 10 ** (6 / 20) + 1e-6 for r in ratios) and len(set(ratios)) == 6


def test_masks_cover_the_configured_widths():
    g = torch.Generator().manual_seed(0)
    one = mask_spans(300, prob=0.0001, width=7, min_masks=1, generator=g)  # exactly one span
    (where,) = torch.nonzero(one, as_tuple=True)
    assert len(where) == 7 and int(where[-1] - where[0]) == 6
    many = mask_spans(1000, prob=0.3, width=10, min_masks=2, generator=g)
    runs = torch.diff(torch.nonzero(torch.diff(torch.cat([torch.tensor([0]), many.int(), torch.tensor([0])])))[:, 0])
    spans = runs[::2]  # lengths of the masked runs: whole spans, overlapping ones merged
    assert len(spans) >= 2 and all(int(s) >= 10 for s in spans)
    assert 0.15 * 1000 < int(many.sum()) <= 0.3 * 1000 + 10
    assert not mask_spans(9, prob=1.0, width=10, min_masks=2, generator=g).any()  # a clip shorter than a span
    # Whisper: per clip, over its own frames, then applied to the log-mel features.
    aug = Augmenter(AugmentConfig(mask_time_prob=0.05, mask_time_length=12, mask_feature_prob=0.0001,
                                  mask_feature_length=9, mask_feature_min_masks=1), 0, 16000, n_mels=80,
                    mask_defaults={"mask_time_min_masks": 2})
    item = aug(torch.randn(16000), [], 0, 0)  # 1 s: 101 frames
    assert item["time_mask"].shape == (101,) and item["freq_mask"].shape == (80,)
    assert int(item["freq_mask"].sum()) == 9 and int(item["time_mask"].sum()) >= 12
    features = torch.rand(1, 80, 3000) + 1.0
    masked = apply_spec_masks(features, item["time_mask"][None], item["freq_mask"][None])
    zero = masked == 0  # (1, 80, 3000)
    assert torch.equal(zero[0, :, :101].all(0), item["time_mask"]) and not zero[0, :, 101:].all(0).any()
    assert torch.equal(zero[0].all(1), item["freq_mask"])


def test_whisper_training_batches_carry_masks_that_model_inputs_applies():
    from asr.models import model_inputs

    aug = Augmenter(AugmentConfig(mask_time_prob=0.1, mask_time_length=10), 0, 16000, n_mels=80)
    utts = [Utterance(id=f"u{i}", text="a", language="tr", source="s", labels=[1, 2]) for i in range(2)]
    items = [{"utt": u, "error": None, "state": None, **aug(torch.randn(n), [], 0, i)}
             for i, (u, n) in enumerate(zip(utts, (16000, 8000)))]
    batch = collate(items)
    assert batch["time_mask"].shape == (2, 101) and not batch["time_mask"][1, 51:].any()
    bundle = SimpleNamespace(family="whisper", model=SimpleNamespace(config=SimpleNamespace(num_mel_bins=80)),
                             tokenizer=SimpleNamespace(eos_token_id=0))
    feats = model_inputs(bundle, batch, torch.device("cpu"))["input_features"]  # (2, 80, 3000)
    assert torch.equal((feats == 0).all(1)[:, :101], batch["time_mask"])
    plain = dict(batch)
    del plain["time_mask"], plain["freq_mask"]  # an evaluation batch
    assert not (model_inputs(bundle, plain, torch.device("cpu"))["input_features"] == 0).all(1).any()


# ---------------------------------------------------------------------------------------
# Speed perturbation: filters and batches on the perturbed lengths.


def test_ctc_feasibility_and_batching_use_the_perturbed_length(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype="float32"), 16000)  # 1 s: 50 frames at 320 samples each
    labeler = Labeler(encode=lambda text, lang: list(range(48)), output_frames=lambda n: n // 320, min_samples=400)

    def kept(speeds):
        u = Utterance(id="a", text="x", language="tr", source="s", path=str(tmp_path / "a.wav"))
        report = SplitReport()
        out = filter_utterances([u], [], DataConfig(), labeler, report, speeds=speeds)
        return out, report

    out, _ = kept([0.9, 1.0, 1.1])  # 1.1: 14546 samples, 45 frames < 48 labels
    assert out[0].speeds == [0.9, 1.0]
    out, report = kept([1.1])
    assert out == [] and report.dropped == {"ctc_infeasible": 1}
    assert kept([])[0][0].speeds == []
    # The sampler batches each epoch on the durations at the drawn factors: max_batch_s holds for those.
    base = [1.0 + 0.01 * i for i in range(40)]
    speeds = [0.9, 1.0, 1.1]

    def at(epoch):
        return [perturbed_samples(round(d * 16000), speed_factor(speeds, 0, epoch, i), 16000) / 16000
                for i, d in enumerate(base)]

    sampler = DurationBatchSampler(base, max_batch_s=4.0, seed=0, durations_at=at)
    for epoch in (0, 1):
        d = at(epoch)
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(40))
        assert all(len(b) * max(d[i] for i in b) <= 4.0 for b in batches)
    assert at(0) != at(1) and any(len(b) * max(base[i] for i in b) > 4.0 * 1.05 for b in sampler.batches(0))


# ---------------------------------------------------------------------------------------
# Training runs.


def aug_config(out, noise, max_steps=8):
    """The tiny CTC model with every augmentation on (and transformers' masks from the [augment] section),
    dropout, grad accumulation over 2 batches and a loader worker; 8 batches an epoch, crossing epochs."""
    cfg = tiny_ctc_config(out, max_steps=max_steps, grad_accum=2, schedule="linear", warmup_steps=2, eval_every=0,
                          save_every=5, log_every=2, keep_last=5)
    cfg.model.hidden_dropout = 0.1
    cfg.model.mask_time_prob = None
    a = cfg.augment
    a.speed, a.noise_dir, a.snr_db, a.gain_db = [0.9, 1.0, 1.1], str(noise), [5.0, 20.0], [-6.0, 6.0]
    a.mask_time_prob, a.mask_time_length, a.mask_feature_prob, a.mask_feature_length = 0.3, 2, 0.2, 4
    cfg.data.batch_size, cfg.data.num_workers = 4, 1
    cfg.eval.at_start, cfg.preflight.enabled = False, False
    return cfg


def test_resume_is_exact_with_augmentation_on(tmp_path, noise_dir):
    """A run killed after its step-5 checkpoint resumes to the same weights as one never stopped; and the
    augmentation changes the training (without it the weights differ)."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(aug_config(a, noise_dir), fresh=True)
    b.mkdir()
    shutil.copytree(a / "checkpoints" / "step-000005", b / "checkpoints" / "step-000005")
    shutil.copytree(a / "vocab", b / "vocab")
    train(aug_config(b, noise_dir))
    assert "resumed from" in (b / "train.log").read_text(encoding="utf-8")
    wa, wb = final_params(a / "checkpoints" / "step-000008"), final_params(b / "checkpoints" / "step-000008")
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    other = aug_config(b, noise_dir, max_steps=10)
    other.augment.speed = [1.0, 1.1]  # the batches depend on it: a resume cannot take it
    with pytest.raises(ResumeError, match=r"augment\.speed"):
        train(other)
    cfg = aug_config(c, noise_dir)
    cfg.augment.speed, cfg.augment.noise_dir, cfg.augment.gain_db = [], "", []
    train(cfg, fresh=True)
    wc = final_params(c / "checkpoints" / "step-000008")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_evaluation_is_untouched_and_tensorboard_shows_augmented_clips(tmp_path, noise_dir):
    """Train on the 8 dev clips at a zero learning rate: augmentation changes the training loss, not the
    evaluation's (the same weights, the same clips); step 0's TensorBoard holds augmented audio and log-mels."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import same_clips_config

    results = {}
    for name, on in (("plain", False), ("aug", True)):
        cfg = same_clips_config(tiny_ctc_config(tmp_path / name))
        cfg.eval.at_start, cfg.preflight.enabled = False, False
        if on:
            cfg.augment.speed, cfg.augment.noise_dir, cfg.augment.gain_db = [0.9, 1.1], str(noise_dir), [-6.0, 6.0]
        results[name] = train(cfg, fresh=True)
    assert results["plain"]["train_loss"] != results["aug"]["train_loss"]
    plain = read_json(tmp_path / "plain" / "eval" / "step-000001.json")
    aug = read_json(tmp_path / "aug" / "eval" / "step-000001.json")
    assert plain["loss"] == aug["loss"] and plain["cer"] == aug["cer"]
    acc = EventAccumulator(str(tmp_path / "aug" / "tb"), size_guidance={"audio": 0, "images": 0})
    acc.Reload()
    assert {"augment/0/audio", "augment/2/audio"} <= set(acc.Tags()["audio"])
    assert {"augment/0/log_mel", "augment/2/log_mel"} <= set(acc.Tags()["images"])
    assert acc.Audio("augment/0/audio")[0].step == 0
    acc = EventAccumulator(str(tmp_path / "plain" / "tb"))
    acc.Reload()
    assert not [t for t in acc.Tags()["audio"] + acc.Tags()["images"] if t.startswith("augment/")]


# ---------------------------------------------------------------------------------------
# Bad settings.


@pytest.mark.parametrize("overrides, message", [
    (["augment.noise_dir=NOISE/missing"], "augment.noise_dir: folder not found: NOISE/missing"),
    (["augment.noise_dir=NOISE/empty"], "augment.noise_dir: no audio files"),
    (["augment.speed=[0.9, 0]"], "augment.speed.1: must be in [0.5, 2], got 0.0"),
    (["augment.snr_db=[30, 10]"], "augment.snr_db: expected [low, high] with low <= high"),
    (["augment.gain_db=[6]"], "augment.gain_db: expected [low, high] with low <= high"),
    (["augment.noise_prob=1.5"], "augment.noise_prob: must be in [0, 1]"),
    (["augment.mask_time_prob=0.2", "model.mask_time_prob=0.1"], "augment.mask_time_prob and model.mask_time_prob"),
    (["augment.speed=[0.9, 1.1]", "data.timestamp_prob=0.5"], "augment.speed: not supported with data.timestamp_prob"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, overrides, message):
    import run

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    cfg = tiny_ctc_config(tmp_path / "run")
    cfg.model.mask_time_prob = None
    exp = write_exp(cfg, tmp_path / "exp.toml")
    args = ["--exp", str(exp)] + [a for o in overrides for a in ("--set", o.replace("NOISE", str(tmp_path)))]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message.replace("NOISE", str(tmp_path)) in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ctc_masks_from_the_augment_section_reach_the_model_config():
    """Set before the model is built: transformers creates the masked frames' vector only when a mask is on."""
    from asr.models import build

    cfg = tiny_ctc_config("unused").model
    cfg.mask_time_prob = None
    vocab = type("Vocab", (), {"blank": 0, "__len__": lambda self: 10})()
    model = build(cfg, vocab, augment=AugmentConfig(mask_time_prob=0.0)).model  # no mask: no vector
    assert getattr(model.wav2vec2, "masked_spec_embed", None) is None
    model = build(cfg, vocab, augment=AugmentConfig(mask_time_prob=0.3, mask_time_length=2, mask_feature_prob=0.2,
                                                     mask_feature_length=4)).model
    c = model.config
    assert (c.mask_time_prob, c.mask_time_length, c.mask_feature_prob, c.mask_feature_length) == (0.3, 2, 0.2, 4)
    assert c.apply_spec_augment and model.wav2vec2.masked_spec_embed.requires_grad
    model.train()
    x = torch.randn(2, 16000)
    torch.manual_seed(0)
    a = model(x).logits
    model.config.mask_time_prob = model.config.mask_feature_prob = 0.0
    torch.manual_seed(0)
    assert not torch.equal(a, model(x).logits)  # the masks change the training forward
