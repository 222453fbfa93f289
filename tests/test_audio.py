"""asr.audio: decoding and resampling, Whisper log-mel and Wav2Vec2 normalisation against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from asr.audio import AudioError, audio_info, lengths_to_mask, load_audio, log_mel, normalize_waveform
from conftest import SHARED, requires_shared


@pytest.fixture(scope="module")
def speech(train_clips) -> list[torch.Tensor]:
    """Four real speech clips of different lengths, decoded at 16 kHz."""
    return [load_audio(p) for p in train_clips[:4]]


def pad_batch(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([c.shape[0] for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for b, c in enumerate(clips):
        batch[b, : c.shape[0]] = c
    return batch, lengths


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio: torch.Tensor, sr: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(audio.numpy()))
    return float(np.argmax(spectrum)) * sr / audio.shape[0]


# ---------------------------------------------------------------------------------------
# Whisper log-mel.


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(speech, n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    expected = fe([c.numpy() for c in speech], sampling_rate=16000, return_tensors="np").input_features
    batch, _ = pad_batch(speech)
    ours = log_mel(batch, n_mels)
    assert ours.shape == (len(speech), n_mels, 3000)
    assert ours.dtype == torch.float32
    assert np.abs(ours.numpy() - expected).max() <= 1e-3


def test_log_mel_trims_clips_longer_than_30s(speech):
    from transformers import WhisperFeatureExtractor

    long = torch.cat(speech * 5)[: int(33.5 * 16000)]  # 33.5 s of real speech
    assert long.shape[0] > 30 * 16000
    expected = WhisperFeatureExtractor(feature_size=80)(long.numpy(), sampling_rate=16000,
                                                          return_tensors="np").input_features
    ours = log_mel(long[None], 80)
    assert ours.shape == (1, 80, 3000)
    assert np.abs(ours.numpy() - expected).max() <= 1e-3
    assert torch.equal(ours, log_mel(long[None, : 30 * 16000], 80))  # the tail is cut, not squeezed in


def test_log_mel_padding_does_not_change_a_clip(speech):
    """Per-clip features do not depend on what else is in the batch."""
    batch, _ = pad_batch(speech)
    together = log_mel(batch)
    alone = log_mel(speech[1][None])
    assert torch.allclose(together[1], alone[0], atol=1e-5)


def _log_mel_full(audio: torch.Tensor, n_mels: int) -> torch.Tensor:
    """The direct computation over all 3000 frames (what log_mel's shortcut must reproduce)."""
    audio = torch.nn.functional.pad(audio, (0, max(0, 480000 - audio.shape[1])))[:, :480000]
    stft = torch.stft(audio, 400, 160, window=torch.hann_window(400), return_complex=True)
    filters = AF.melscale_fbanks(201, 0.0, 8000.0, n_mels, 16000, norm="slaney", mel_scale="slaney")
    log_spec = torch.clamp(filters.T @ (stft[..., :-1].abs() ** 2), min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("n", [1, 399, 1000, 160 * 2999, 479999, 480000, 500000])
def test_log_mel_skipping_silent_frames_equals_the_full_computation(n):
    torch.manual_seed(n)
    audio = torch.randn(2, n) * 0.1
    audio[1, n // 2 :] = 0.0  # a shorter clip padded with zeros in the same batch
    assert torch.allclose(log_mel(audio, 80), _log_mel_full(audio, 80), atol=1e-5, rtol=0)


@requires_shared
def test_log_mel_matches_shared_whisper_base_extractor(speech):
    from transformers import WhisperFeatureExtractor

    model_dir = SHARED / "models" / "whisper-base"
    if not (model_dir / "processor_config.json").is_file() and not (model_dir / "preprocessor_config.json").is_file():
        pytest.skip(f"no feature extractor config in {model_dir}")
    fe = WhisperFeatureExtractor.from_pretrained(str(model_dir))
    expected = fe([c.numpy() for c in speech], sampling_rate=16000, return_tensors="np").input_features
    ours = log_mel(pad_batch(speech)[0], fe.feature_size)
    assert np.abs(ours.numpy() - expected).max() <= 1e-3


# ---------------------------------------------------------------------------------------
# Wav2Vec2 normalisation.


def test_normalize_waveform_matches_wav2vec2_feature_extractor(speech):
    from transformers import Wav2Vec2FeatureExtractor

    clips = [speech[0], speech[1][:12000], speech[2][:20000]]  # clearly different lengths
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    expected = fe([c.numpy() for c in clips], sampling_rate=16000, padding=True, return_tensors="np")
    batch, lengths = pad_batch(clips)
    ours = normalize_waveform(batch, lengths)
    mask = lengths_to_mask(lengths, batch.shape[1])
    assert ours.shape == batch.shape
    assert np.abs(ours.numpy() - expected.input_values).max() <= 1e-4
    assert np.array_equal(mask.numpy(), expected.attention_mask)
    assert mask.dtype == torch.long
    for b, n in enumerate(lengths.tolist()):  # zero mean, unit variance over the real samples; padding 0
        assert abs(float(ours[b, :n].mean())) < 1e-4
        assert abs(float(ours[b, :n].std(unbiased=False)) - 1.0) < 1e-3
        assert torch.all(ours[b, n:] == 0)


# ---------------------------------------------------------------------------------------
# Decoding and resampling.


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_load_audio_resamples_to_16k(tmp_path, sr):
    x = sine(440.0, 1.3, sr)
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, x, sr, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert audio.shape[0] == int(round(len(x) * 16000 / sr)) == 20800
    assert abs(peak_hz(audio) - 440.0) <= 1.0
    expected = AF.resample(torch.from_numpy(x), sr, 16000)
    assert torch.allclose(audio, expected, atol=1e-5)
    mid = audio[2000:-2000]  # away from the filter's edge effects: the tone keeps its level
    assert abs(float(mid.pow(2).mean().sqrt()) - 0.5 / np.sqrt(2)) < 0.01


def test_load_audio_keeps_16k_and_can_target_other_rates(tmp_path):
    x = sine(1000.0, 0.5, 16000)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    assert torch.equal(load_audio(tmp_path / "a.wav"), torch.from_numpy(x))
    at8k = load_audio(tmp_path / "a.wav", sample_rate=8000)
    assert at8k.shape[0] == 4000 and abs(peak_hz(at8k, 8000) - 1000.0) <= 2.0


def test_load_audio_downmixes_stereo(tmp_path):
    left, right = sine(300.0, 1.0, 16000), sine(300.0, 1.0, 16000, amp=0.25)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    audio = load_audio(tmp_path / "stereo.wav")
    assert audio.shape == (16000,)
    assert torch.allclose(audio, torch.from_numpy((left + right) / 2), atol=1e-6)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_load_audio_decodes_flac_and_ogg(tmp_path, fmt):
    x = sine(440.0, 1.0, 44100)
    path = tmp_path / f"tone.{fmt}"
    sf.write(path, np.stack([x, x], axis=1), 44100)  # stereo, resampled
    audio = load_audio(path)
    assert abs(audio.shape[0] - 16000) <= 2
    assert abs(peak_hz(audio) - 440.0) <= 1.0
    expected = AF.resample(torch.from_numpy(x), 44100, 16000)
    tol = 1e-3 if fmt == "flac" else 0.05  # flac is lossless (16-bit); vorbis is not
    assert float((audio[: expected.shape[0]] - expected[: audio.shape[0]]).abs().max()) < tol


def test_load_audio_decodes_fixture_mp3(train_clips):
    path = train_clips[0]
    duration, sr = audio_info(path)
    assert sr == 48000
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert audio.shape[0] == round(duration * 16000)
    assert torch.isfinite(audio).all() and float(audio.abs().max()) > 0.05  # speech, not silence
    assert abs(peak_hz(audio)) < 8000
    assert torch.equal(load_audio(path.read_bytes()), audio)  # bytes decode the same


def write_bad_files(folder):
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "garbage.mp3").write_bytes(b"this is not audio at all\n" * 200)
    (folder / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(256)) * 8)
    (folder / "text.ogg").write_bytes(b"OggS but not really" * 50)
    return {"missing.wav": "not found", "empty.mp3": "empty", "garbage.mp3": "", "garbage.wav": "",
            "text.ogg": ""}


@pytest.mark.parametrize("reader", [load_audio, audio_info], ids=["load_audio", "audio_info"])
@pytest.mark.parametrize("name", ["missing.wav", "empty.mp3", "garbage.mp3", "garbage.wav", "text.ogg"])
def test_bad_files_raise_one_line_audio_error_naming_the_file(tmp_path, reader, name):
    words = write_bad_files(tmp_path)[name]
    path = tmp_path / name
    with pytest.raises(AudioError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and "\r" not in message
    assert words in message


def test_bad_bytes_raise_audio_error():
    with pytest.raises(AudioError, match="<bytes>"):
        load_audio(b"")
    with pytest.raises(AudioError, match="<bytes>"):
        load_audio(b"garbage" * 100)
