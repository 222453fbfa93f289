"""Audio decoding, resampling and model input features (Whisper log-mel, Wav2Vec2 normalisation)."""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

# Whisper's fixed front end.
N_FFT = 400
HOP_LENGTH = 160
WHISPER_SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * WHISPER_SAMPLE_RATE  # 480000
N_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3000


class AudioError(Exception):
    """An audio file that cannot be read; the message names the file."""


class NonFiniteAudio(AudioError):
    """Audio that decodes to NaN or infinite samples (e.g. a float wav written from a failed computation)."""


def audio_info(path: str | Path | bytes | io.IOBase) -> tuple[float, int]:
    """(duration in seconds, sample rate) from the header of a file (a path, the file's bytes or a
    binary file object), without decoding. Raises AudioError naming the file."""
    name, src = _source(path)
    _check_complete(name, src)
    try:
        info = sf.info(src)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError for bad files
        raise AudioError(_message(name, f"cannot read audio header ({_reason(e)})")) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(_message(name, "no audio frames"))
    return info.frames / info.samplerate, info.samplerate


def _source(path) -> tuple[str, object]:
    """(name for messages, what soundfile opens) for a path, bytes or a binary file object.
    A path that is missing or empty raises AudioError here, with a clearer message than libsndfile's."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            raise AudioError("<bytes>: empty file")
        return "<bytes>", io.BytesIO(bytes(path))
    if hasattr(path, "read"):
        return str(getattr(path, "name", "<file object>")), path
    p = Path(path)
    if not p.is_file():
        raise AudioError(_message(str(path), "file not found" if not p.exists() else "not a regular file"))
    if p.stat().st_size == 0:
        raise AudioError(_message(str(path), "empty file"))
    return str(path), str(path)


_MPEG_KBPS = {  # (MPEG-1?, layer) -> kbit/s by bitrate index
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits


def _frame_size(key: int) -> int:
    """The byte size of the MPEG audio frame whose 32-bit header, shifted right by 9 bits, is `key`
    (sync, version, layer, protection, bitrate, sample rate, padding); 0 when it is not a frame header."""
    version, layer_bits = (key >> 10) & 3, (key >> 8) & 3
    bitrate_index, rate_index, padding = (key >> 3) & 15, (key >> 1) & 3, key & 1
    if (key >> 12) != 0x7FF or version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return 0  # not a frame header (junk, another tag, free format)
    mpeg1, layer = version == 3, 4 - layer_bits
    bitrate, rate = _MPEG_KBPS[mpeg1, layer][bitrate_index] * 1000, _MPEG_RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4
    return (144 if mpeg1 or layer == 2 else 72) * bitrate // rate + padding


_FRAME_SIZES: dict[int, int] = {}  # header >> 9 -> frame size: a file uses a handful of distinct headers


def mpeg_truncation(data: bytes) -> str | None:
    """Why an MPEG audio (mp3) stream looks cut short, or None: its last frame runs past the end of the
    data, or it holds fewer frames than its Xing/Info header says. Decoders drop a cut frame silently and
    return the audio before it, so a half-copied clip would otherwise train against its whole transcript.
    Data that is not a clean frame sequence (other formats, junk between frames) is left to the decoder."""
    pos, end = 0, len(data)
    if data[:3] == b"ID3" and end >= 10:  # ID3v2 tag: synchsafe size, optional footer
        pos = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F))
        pos += 10 if data[5] & 0x10 else 0
    if end - 128 >= pos and data[end - 128 : end - 125] == b"TAG":  # ID3v1 tag
        end -= 128
    frames, expected, sizes = 0, None, _FRAME_SIZES
    while pos + 4 <= end:
        h = int.from_bytes(data[pos : pos + 4], "big")
        size = sizes.get(h >> 9) or _frame_size(h >> 9)
        if not size:
            return None  # the decoder decides
        sizes[h >> 9] = size  # only valid headers: a few thousand at most
        if frames == 0 and (h >> 17) & 3 == 1:  # layer 3: a Xing/Info header in the first frame may give the count
            mpeg1, mono = (h >> 19) & 3 == 3, (h >> 6) & 3 == 3
            off = pos + 4 + ((17 if mono else 32) if mpeg1 else (9 if mono else 17))
            if data[off : off + 4] in (b"Xing", b"Info") and int.from_bytes(data[off + 4 : off + 8], "big") & 1:
                expected = int.from_bytes(data[off + 8 : off + 12], "big")
        if pos + size > end:
            return f"truncated: the last MPEG frame needs {pos + size - end} more bytes"
        pos, frames = pos + size, frames + 1
    if expected is not None and frames - 1 < expected:  # the header frame is not counted
        return f"truncated: {frames - 1} of {expected} MPEG frames"
    return None


def _check_complete(name: str, src) -> None:
    """AudioError when `src` (a path or BytesIO from `_source`) is an mp3 cut short (see mpeg_truncation)."""
    if isinstance(src, io.BytesIO):
        data = src.getvalue()
    elif isinstance(src, str):
        with open(src, "rb") as f:
            head = f.read(3)
            if head != b"ID3" and not (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
                return  # not MPEG audio
            data = head + f.read()
    else:
        return
    reason = mpeg_truncation(data)
    if reason:
        raise AudioError(_message(name, reason))


def _message(name: str, what: str) -> str:
    return re.sub(r"\s*[\r\n]+\s*", " ", f"{name}: {what}".strip())  # always one line


def _reason(e: Exception) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    text = text.splitlines()[-1]
    # libsndfile: "Error opening '<path>': <reason>"; the path is already in our message.
    m = re.match(r"Error opening .*?: (.*)$", text)
    if m:
        text = m.group(1)
    if "File does not exist or is not a regular file" in text:
        text = "unrecognised or corrupt audio data"  # what libsndfile says of an unparseable mp3
    return text


def load_audio(path: str | Path | bytes, sample_rate: int | None = 16000) -> torch.Tensor:
    """Decode wav/flac/mp3/ogg (a path, the file's bytes or a binary file object) to mono float32 at
    `sample_rate` (None: the file's own). Returns (N,). A missing, empty or corrupt file raises AudioError
    (one line, naming it); one whose samples are not all finite raises NonFiniteAudio."""
    name, src = _source(path)
    _check_complete(name, src)  # libsndfile reads the file again: faster than decoding the bytes from Python
    try:
        data, sr = sf.read(src, dtype="float32", always_2d=True)  # (N, C)
    except Exception as e:
        raise AudioError(_message(name, f"cannot decode audio ({_reason(e)})")) from None
    if data.shape[0] == 0:
        raise AudioError(_message(name, "no audio frames"))
    if not np.isfinite(data).all():
        raise NonFiniteAudio(_message(name, "audio contains NaN or infinite samples"))
    audio = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]))
    return audio if sample_rate is None else resample(audio, sr, sample_rate)


def resample(audio: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited sinc resampling with torchaudio. (..., N) -> (..., N * new_sr / orig_sr)"""
    if orig_sr == new_sr:
        return audio
    return AF.resample(audio, int(orig_sr), int(new_sr))


# ---------------------------------------------------------------------------------------
# Whisper log-mel spectrogram.


@functools.lru_cache(maxsize=4)
def _mel_filters_cpu(n_mels: int) -> torch.Tensor:
    """Slaney-style mel filterbank, as Whisper and transformers' WhisperFeatureExtractor use. (n_freqs, n_mels)"""
    return AF.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1, f_min=0.0, f_max=8000.0, n_mels=n_mels,
        sample_rate=WHISPER_SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )


def log_mel(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper's log-mel spectrogram: (B, N) 16 kHz audio, zero-padded or cut to 30 s -> (B, n_mels, 3000).

    Runs on the audio's device. Padding beyond a clip's length must be zeros (as `collate` makes it).
    Frames whose window lies wholly in the zero padding have zero power, so only the frames
    that reach the batch's real samples are transformed; the rest are filled with the value
    the full computation gives them (the same output, several times faster for short clips).
    """
    audio = audio.float()[:, :CHUNK_SAMPLES]
    B, N = audio.shape
    frames = min(N_FRAMES, N // HOP_LENGTH + 2)  # frame t is centred on sample t * HOP_LENGTH
    need = min(CHUNK_SAMPLES, frames * HOP_LENGTH + N_FFT // 2)  # zeros under the reflection at the end
    if need > N:
        audio = torch.nn.functional.pad(audio, (0, need - N))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (B, 201, need/160 + 1)
    power = (stft[..., :frames].abs() ** 2).contiguous()  # (B, 201, frames)
    filters = _mel_filters_cpu(n_mels).to(audio.device)  # (201, n_mels)
    log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()  # (B, n_mels, frames)
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    if frames < N_FRAMES:
        peak = peak.clamp(min=-10.0)  # the silent frames' log10(1e-10)
    floor = peak - 8.0
    out = torch.empty(B, n_mels, N_FRAMES, device=audio.device)
    out[..., :frames] = (torch.maximum(log_spec, floor) + 4.0) / 4.0
    out[..., frames:] = (floor.clamp(min=-10.0) + 4.0) / 4.0
    return out


# ---------------------------------------------------------------------------------------
# Wav2Vec2-style input normalisation.


def normalize_waveform(audio: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Zero mean, unit variance over each clip's first `lengths[b]` samples; padding stays 0. (B, N) -> (B, N)

    Matches transformers' Wav2Vec2FeatureExtractor(do_normalize=True).
    """
    audio = audio.float()
    mask = lengths_to_mask(lengths, audio.shape[1])  # (B, N)
    n = lengths.clamp(min=1).to(audio.dtype).unsqueeze(1)  # (B, 1)
    mean = (audio * mask).sum(dim=1, keepdim=True) / n
    var = (((audio - mean) * mask) ** 2).sum(dim=1, keepdim=True) / n
    return (audio - mean) / torch.sqrt(var + eps) * mask


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) integer lengths -> (B, max_len) long mask with 1 on real positions."""
    return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]).long()
