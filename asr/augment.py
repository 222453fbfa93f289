"""On-the-fly augmentation of training clips (the `[augment]` section): speed perturbation, additive noise,
gain, and SpecAugment masks on Whisper's log-mel features.

Every draw comes from a generator seeded by the run seed, the epoch and the clip's index in the training
set (`clip_generator`), never from a global one: a clip gets the same augmentation in a resumed run, with
any number of loader workers. The sampler knows each clip's speed factor in advance (`speed_factor`) and
batches on the perturbed durations. Evaluation is never augmented.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.config import AugmentConfig, ConfigError

# Whisper's front end (asr.audio): a log-mel frame every 160 samples, 3000 frames.
HOP_LENGTH = 160
N_FRAMES = 3000
NOISE_SUFFIXES = {"." + f.lower() for f in sf.available_formats()} | {".oga", ".opus", ".aif", ".aiff"}


def clip_generator(kind: str, seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one clip's draws of `kind` ("speed", "augment") in `epoch` of a run seeded `seed`."""
    key = hashlib.blake2b(f"{kind}/{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def uniform(lo: float, hi: float, generator: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# Pure functions of tensors.


def speed_perturb(audio: torch.Tensor, factor: float, sample_rate: int) -> torch.Tensor:
    """Kaldi/icefall speed perturbation: resampling, so tempo and pitch change together; `factor` 1.1 is
    10% faster (shorter). (N,) -> (ceil(N / factor),)"""
    if factor == 1.0:
        return audio
    orig = int(round(sample_rate * factor))  # the clip read as if sampled at factor x the rate
    return AF.resample(audio, orig, sample_rate)


def perturbed_samples(n: int, factor: float, sample_rate: int) -> int:
    """Samples of an n-sample clip after `speed_perturb` (torchaudio's ceil of n x new / orig rate)."""
    if factor == 1.0:
        return n
    orig = int(round(sample_rate * factor))
    g = math.gcd(orig, sample_rate)
    return -(-n * (sample_rate // g) // (orig // g))


def apply_gain(audio: torch.Tensor, gain_db: float) -> torch.Tensor:
    """(N,) -> (N,) scaled by 10^(gain_db / 20)."""
    return audio * (10.0 ** (gain_db / 20.0))


def mix_at_snr(audio: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """`audio` plus `noise` scaled so that the signal-to-noise power ratio is `snr_db`. (N,), (N,) -> (N,)
    A silent clip or silent noise adds nothing."""
    p_signal = audio.double().pow(2).mean()
    p_noise = noise.double().pow(2).mean()
    if p_signal == 0 or p_noise == 0:
        return audio
    scale = torch.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return audio + (noise.double() * scale).to(audio.dtype)


def mask_spans(length: int, prob: float, width: int, min_masks: int, generator: torch.Generator) -> torch.Tensor:
    """SpecAugment spans along one axis of `length`, as transformers' `_compute_mask_indices` draws them for
    one row: int(prob x length / width + U[0, 1)) spans (at least `min_masks`) of `width`, starting at
    distinct positions, wholly inside; none when the axis is shorter than `width`. (length,) bool"""
    mask = torch.zeros(length, dtype=torch.bool)
    if prob <= 0 or length < width:
        return mask
    n = max(int(prob * length / width + float(torch.rand((), generator=generator))), min_masks)
    n = min(n, length - width + 1)
    for start in torch.randperm(length - width + 1, generator=generator)[:n].tolist():
        mask[start : start + width] = True
    return mask


def apply_spec_masks(features: torch.Tensor, time_mask: torch.Tensor, freq_mask: torch.Tensor) -> torch.Tensor:
    """Zero masked frames and mel channels, as transformers' Whisper `_mask_input_features` does.
    features (B, n_mels, T), time_mask (B, T') with T' <= T (frames beyond T' are not masked),
    freq_mask (B, n_mels) -> (B, n_mels, T)"""
    t = min(time_mask.shape[1], features.shape[2])
    mask = torch.zeros(features.shape[0], features.shape[2], dtype=torch.bool, device=features.device)
    mask[:, :t] = time_mask[:, :t].to(features.device)
    keep = ~(mask[:, None, :] | freq_mask.to(features.device)[:, :, None])  # (B, n_mels, T)
    return features * keep


# ---------------------------------------------------------------------------------------
# Per-clip augmentation in the loader workers.


def enabled(cfg: AugmentConfig) -> bool:
    """Whether any waveform augmentation is on (speed, noise, gain)."""
    return bool(speed_on(cfg) or cfg.noise_dir or cfg.gain_db)


def speed_on(cfg: AugmentConfig) -> bool:
    return any(f != 1.0 for f in cfg.speed)


def speed_factor(speeds: list[float], seed: int, epoch: int, index: int) -> float:
    """The speed factor of training clip `index` in `epoch`: one of `speeds` (the clip's allowed factors),
    uniformly; 1.0 when there are none."""
    if not speeds:
        return 1.0
    g = clip_generator("speed", seed, epoch, index)
    return speeds[int(torch.randint(len(speeds), (), generator=g))]


def noise_files(folder: str) -> list[tuple[Path, int, int]]:
    """(path, frames, sample rate) of every audio file under `folder` (any format soundfile reads), in name
    order. A missing folder, one without audio, or a file whose header does not read is a ConfigError."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"augment.noise_dir: folder not found: {folder}")
    out = []
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in NOISE_SUFFIXES):
        try:
            info = sf.info(str(p))
        except Exception as e:
            raise ConfigError(f"augment.noise_dir: cannot read {p}: {str(e).strip().splitlines()[-1]}") from None
        if info.frames > 0:
            out.append((p, int(info.frames), int(info.samplerate)))
    if not out:
        raise ConfigError(f"augment.noise_dir: no audio files ({', '.join(sorted(NOISE_SUFFIXES)[:6])}, ...) "
                          f"in {folder}")
    return out


class Augmenter:
    """Augments one decoded training clip: speed (the factor the sampler batched it with), noise, gain; and
    draws Whisper's log-mel masks (when `n_mels`). Holds only settings and the noise file list, so it pickles
    to loader workers."""

    def __init__(self, cfg: AugmentConfig, seed: int, sample_rate: int, n_mels: int = 0,
                 mask_defaults: dict | None = None):
        self.cfg, self.seed, self.sample_rate, self.n_mels = cfg, seed, sample_rate, n_mels
        self.noises = noise_files(cfg.noise_dir) if cfg.noise_dir else []
        d = mask_defaults or {}
        pick = lambda k: getattr(cfg, k) if getattr(cfg, k) is not None else d.get(k, 0)  # noqa: E731
        self.masks = {k: pick(k) for k in ("mask_time_prob", "mask_time_length", "mask_time_min_masks",
                                           "mask_feature_prob", "mask_feature_length", "mask_feature_min_masks")}
        self.spec = n_mels > 0 and (self.masks["mask_time_prob"] > 0 or self.masks["mask_feature_prob"] > 0)

    def __call__(self, audio: torch.Tensor, speeds: list[float], epoch: int, index: int) -> dict:
        """{"audio": (N',), and with Whisper masks "time_mask": (T,), "freq_mask": (n_mels,)} of clip
        `index` in `epoch`."""
        cfg = self.cfg
        audio = speed_perturb(audio, speed_factor(speeds, self.seed, epoch, index), self.sample_rate)
        g = clip_generator("augment", self.seed, epoch, index)  # the draws below, always in this order
        if self.noises and float(torch.rand((), generator=g)) < cfg.noise_prob:
            noise = self.noise_segment(audio.shape[0], g)
            audio = mix_at_snr(audio, noise, uniform(cfg.snr_db[0], cfg.snr_db[1], g))
        if cfg.gain_db:
            audio = apply_gain(audio, uniform(cfg.gain_db[0], cfg.gain_db[1], g))
        out = {"audio": audio}
        if self.spec:
            m = self.masks
            frames = min(N_FRAMES, audio.shape[0] // HOP_LENGTH + 1)  # the frames that hold the clip
            out["time_mask"] = mask_spans(frames, m["mask_time_prob"], m["mask_time_length"],
                                          m["mask_time_min_masks"], g)
            out["freq_mask"] = mask_spans(self.n_mels, m["mask_feature_prob"], m["mask_feature_length"],
                                          m["mask_feature_min_masks"], g)
        return out

    def noise_segment(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A random stretch of n samples of a random noise file (looped when shorter), at the run's rate. (n,)"""
        path, frames, sr = self.noises[int(torch.randint(len(self.noises), (), generator=generator))]
        need = min(frames, int(math.ceil(n * sr / self.sample_rate)) + 1)
        start = int(torch.randint(frames - need + 1, (), generator=generator))
        data, sr = sf.read(str(path), start=start, frames=need, dtype="float32", always_2d=True)  # (need, C)
        noise = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
        if sr != self.sample_rate:
            noise = AF.resample(noise, sr, self.sample_rate)
        reps = -(-n // max(noise.shape[0], 1))
        return noise.repeat(reps)[:n] if noise.shape[0] else torch.zeros(n)
