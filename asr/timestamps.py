"""Whisper training samples with timestamps: a frame-energy speech detector, timestamp labels
(<|0.00|> text<|3.52|>) and the packing of several clips of one language into one sample, each a
function of the seeded sampler position (so a resumed run draws the same samples)."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

import torch

TIME_PRECISION = 0.02  # seconds per timestamp token (<|0.00|>, <|0.02|>, ... <|30.00|>)
MAX_TIME = 30.0  # Whisper's window
PACK_CANDIDATES = 16  # clips drawn per packed sample; those that fit join it, in the order drawn
MAX_PROMPT = 223  # previous-text tokens at most (Whisper's max_target_positions // 2 - 1)


def speech_bounds(audio: torch.Tensor, sample_rate: int, frame_s: float = TIME_PRECISION,
                  below_peak_db: float = 35.0, floor_db: float = -60.0) -> tuple[float, float]:
    """(start, end) in seconds of the speech in a clip (N,): our own frame-energy detector. The clip is cut
    into frames of `frame_s` (20 ms, one timestamp step); speech runs from the first to the last frame whose
    RMS level is within `below_peak_db` dB of the loudest frame's and above `floor_db` dBFS. A clip without
    such a frame (silence) is speech from 0 to its end."""
    n = max(1, int(round(frame_s * sample_rate)))
    duration = audio.shape[0] / sample_rate
    frames = torch.nn.functional.pad(audio.float(), (0, (-audio.shape[0]) % n)).view(-1, n)  # (F, n)
    level = 10 * torch.log10(frames.pow(2).mean(dim=1) + 1e-12)  # (F,) dBFS
    if level.numel() == 0:
        return 0.0, duration
    loud = torch.nonzero(level > max(float(level.max()) - below_peak_db, floor_db)).flatten()
    if loud.numel() == 0:
        return 0.0, duration
    return int(loud[0]) * n / sample_rate, min(duration, (int(loud[-1]) + 1) * n / sample_rate)


def timestamp_id(begin: int, seconds: float) -> int:
    """The token of a time (<|0.00|> is `begin`), rounded to 0.02 s and kept within [0, 30] s."""
    return begin + min(max(int(round(seconds / TIME_PRECISION)), 0), int(round(MAX_TIME / TIME_PRECISION)))


def timestamp_labels(prefix: list[int], segments: list[tuple[float, float, list[int]]], begin: int,
                     eos: int) -> list[int]:
    """prefix (<|startoftranscript|> [<|lang|>] <|task|>), then per segment (start s, end s, text ids)
    <|start|> text <|end|>, then <|endoftext|>: Whisper's timestamped training sequence."""
    ids = list(prefix)
    for start, end, text in segments:
        ids += [timestamp_id(begin, start), *text, timestamp_id(begin, end)]
    return ids + [eos]


def sample_rng(seed: int, epoch: int, position: int, index: int) -> random.Random:
    """The generator of the sample that clip `index` makes at global batch `position` of `epoch`."""
    key = hashlib.blake2b(f"timestamps/{seed}/{epoch}/{position}/{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


class ClipFailed(Exception):
    """A clip packed into a sample could not be decoded: `utt` names it."""

    def __init__(self, utt, error: str):
        super().__init__(error)
        self.utt = utt


class TimestampSamples:
    """What turns a training clip into its sample, for `asr.data.AudioDataset`: with probability
    `data.concat_prob` several clips of its language packed into at most `data.concat_max_s` seconds (the
    drawn clip first, then clips drawn at random that fit the duration and the label limit), one
    timestamped segment each; else with probability `data.timestamp_prob` the clip alone with timestamps;
    else the clip's own <|notimestamps|> labels. With probability `data.prev_text_prob` the labels start
    with <|startofprev|> and the text of a clip of the same language drawn at random (the prompt, which
    the loss skips). Every draw comes from `sample_rng` of the sampler
    position, so a resumed run builds the same samples. Segments run from the detected speech start to end
    (`speech_bounds`), shifted by the clip's place in the pack."""

    def __init__(self, utts: list, tokenizer, prefixes: dict[str, list[int]], data_cfg, seed: int,
                 max_tokens: int):
        self.utts, self.tokenizer, self.prefixes, self.seed = utts, tokenizer, prefixes, seed
        self.timestamp_prob, self.concat_prob = data_cfg.timestamp_prob, data_cfg.concat_prob
        self.prev_text_prob = data_cfg.prev_text_prob
        self.max_s, self.sample_rate, self.max_tokens = data_cfg.concat_max_s, data_cfg.sample_rate, max_tokens
        self.begin = tokenizer.convert_tokens_to_ids("<|0.00|>")
        self.eos = tokenizer.eos_token_id
        self.startofprev = tokenizer.convert_tokens_to_ids("<|startofprev|>")
        self.by_language: dict[str, list[int]] = defaultdict(list)
        for k, u in enumerate(utts):
            self.by_language[u.language].append(k)
        self._text: dict[int, list[int]] = {}

    def text_ids(self, k: int) -> list[int]:
        """A clip's text tokens as a segment: with the leading space Whisper's segments have."""
        if k not in self._text:
            self._text[k] = self.tokenizer.encode(" " + self.utts[k].label_text, add_special_tokens=False)
        return self._text[k]

    def pack(self, epoch: int, position: int, index: int) -> list[int] | None:
        """The clips of the sample that clip `index` makes at (epoch, position), in order; None: plain labels."""
        return self.draw(epoch, position, index)[0]

    def draw(self, epoch: int, position: int, index: int) -> tuple[list[int] | None, int | None]:
        """(the sample's clips in order, or None for the clip's plain labels; the clip whose text is the
        previous-text prompt, or None)."""
        rng = sample_rng(self.seed, epoch, position, index)
        packed, timestamped = rng.random() < self.concat_prob, rng.random() < self.timestamp_prob
        utt = self.utts[index]
        pool = self.by_language[utt.language]
        prev = rng.choice(pool) if rng.random() < self.prev_text_prob else None
        if not packed:
            return ([index] if timestamped else None), prev
        clips, seconds = [index], utt.duration
        tokens = len(self.prefixes[utt.language]) + 3 + len(self.text_ids(index))
        for k in rng.sample(pool, min(len(pool), PACK_CANDIDATES)):
            more = 2 + len(self.text_ids(k))
            if k not in clips and seconds + self.utts[k].duration <= self.max_s and tokens + more <= self.max_tokens:
                clips.append(k)
                seconds += self.utts[k].duration
                tokens += more
        return clips, prev

    def prompt(self, k: int | None, labels: list[int]) -> list[int]:
        """<|startofprev|> and clip k's text (its last tokens: at most 223, and what fits before `labels` in
        the token limit); [] for none or no room."""
        room = min(MAX_PROMPT, self.max_tokens - len(labels) - 1)
        if k is None or room <= 0:
            return []
        return [self.startofprev] + self.text_ids(k)[-room:]

    def __call__(self, epoch: int, position: int, index: int, audio: torch.Tensor, load):
        """(audio (N,), labels, prompt length) of the sample, or None for the clip's own labels. `load(k)`
        decodes clip k; a packed clip that fails raises ClipFailed naming it."""
        clips, prev = self.draw(epoch, position, index)
        if clips is None:
            if prev is None:
                return None
            prompt = self.prompt(prev, self.utts[index].labels)
            return audio, prompt + self.utts[index].labels, len(prompt)
        parts, segments, offset = [], [], 0
        for k in clips:
            try:
                a = audio if k == index else load(k)
            except Exception as e:
                raise ClipFailed(self.utts[k], str(e).splitlines()[0] if str(e) else type(e).__name__) from None
            start, end = speech_bounds(a, self.sample_rate)
            segments.append((offset / self.sample_rate + start, offset / self.sample_rate + end, self.text_ids(k)))
            parts.append(a)
            offset += a.shape[0]
        audio = torch.cat(parts)[: int(MAX_TIME * self.sample_rate)]  # decoded lengths can pass the headers'
        labels = timestamp_labels(self.prefixes[self.utts[index].language], segments, self.begin, self.eos)
        prompt = self.prompt(prev, labels)
        return audio, prompt + labels, len(prompt)


def timestamped_length(tokenizer, prefix: list[int], text: str) -> int:
    """The length of a clip's labels with timestamps (for the 448-token filter)."""
    return len(prefix) + 3 + len(tokenizer.encode(" " + text, add_special_tokens=False))

