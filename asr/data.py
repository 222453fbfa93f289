"""Corpora (Common Voice folders, manifests, Hugging Face datasets), filters with reasons,
the audio dataset, batch collation and the resumable duration-bucketed batch sampler."""

from __future__ import annotations

import io
import json
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from asr.audio import AudioError, audio_info, load_audio
from asr.config import DataConfig, SourceConfig
from asr.text import clean_transcript


class DataError(Exception):
    """A data source that cannot be used at all (missing folder, split, column); one line naming it."""


@dataclass
class Utterance:
    id: str
    text: str  # the transcript as given (references are scored against this)
    language: str
    source: str
    path: str = ""  # audio file; empty for rows of a Hugging Face table
    table: str = ""  # key of a Hugging Face table holding the audio bytes
    row: int = -1
    speaker: str = ""
    duration: float = 0.0
    label_text: str = ""  # the cleaned training transcript
    labels: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Reading sources. Each reader returns (utterances, bad rows); a bad row is (reason, detail dict).


def split_names(expr: str) -> list[str]:
    return [s.strip() for s in expr.split("+") if s.strip()]


def source_name(src: SourceConfig) -> str:
    return src.name or src.language or Path(src.path.rstrip("/")).name or src.kind


def _read_tsv(path: Path, bad: list) -> list[dict]:
    """Tab-separated rows with a header; rows that are not valid UTF-8 or have the wrong column count are bad."""
    lines = path.read_bytes().split(b"\n")
    try:
        header = lines[0].decode("utf-8-sig").rstrip("\r").split("\t")
    except UnicodeDecodeError:
        raise DataError(f"{path}: header is not valid UTF-8") from None
    rows = []
    for lineno, raw in enumerate(lines[1:], start=2):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(("bad_row", {"file": str(path), "line": lineno, "detail": f"invalid UTF-8 at byte {e.start}"}))
            continue
        cells = line.split("\t")
        if len(cells) != len(header):
            bad.append(("bad_row", {"file": str(path), "line": lineno,
                                    "detail": f"{len(cells)} fields, header has {len(header)}"}))
            continue
        rows.append(dict(zip(header, cells), _line=lineno, _file=str(path)))
    return rows


def _read_jsonl(path: Path, bad: list) -> list[dict]:
    rows = []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as e:
            bad.append(("bad_row", {"file": str(path), "line": lineno, "detail": str(e).splitlines()[0][:120]}))
            continue
        rows.append(dict(row, _line=lineno, _file=str(path)))
    return rows


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _rows_to_utterances(rows, src, name, base: Path, audio_col, text_col, bad, allow_absolute):
    utts = []
    for row in rows:
        where = {"file": row["_file"], "line": row["_line"]}
        if audio_col not in row or text_col not in row:
            missing = audio_col if audio_col not in row else text_col
            raise DataError(f"{row['_file']}: no column '{missing}' (set audio_column/text_column)")
        rel = str(row[audio_col]).strip()
        text = row[text_col] if isinstance(row[text_col], str) else ""
        p = Path(rel)
        if not rel or (p.is_absolute() and not allow_absolute) or (not p.is_absolute() and not _inside(base / p, base)):
            bad.append(("bad_path", dict(where, path=rel)))
            continue
        path = p if p.is_absolute() else base / p
        utts.append(Utterance(
            id=f"{name}/{Path(rel).stem}", text=text, language=src.language, source=name, path=str(path),
            speaker=str(row.get("client_id", row.get("speaker", ""))),
        ))
    return utts


def read_common_voice(src: SourceConfig, split_expr: str, bad: list) -> list[Utterance]:
    folder = Path(src.path)
    if not folder.is_dir():
        raise DataError(f"data source '{source_name(src)}': folder not found: {folder}")
    rows = []
    for split in split_names(split_expr):
        tsv = folder / f"{split}.tsv"
        if not tsv.is_file():
            raise DataError(f"data source '{source_name(src)}': split file not found: {tsv}")
        rows += _read_tsv(tsv, bad)
    return _rows_to_utterances(rows, src, source_name(src), folder / "clips", src.audio_column or "path",
                               src.text_column or "sentence", bad, allow_absolute=False)


def read_manifest(src: SourceConfig, split_expr: str, bad: list) -> list[Utterance]:
    folder = Path(src.path)
    if not folder.exists():
        raise DataError(f"data source '{source_name(src)}': not found: {folder}")
    rows = []
    for split in split_names(split_expr):
        f = folder / split if folder.is_dir() else folder
        if not f.is_file():
            raise DataError(f"data source '{source_name(src)}': manifest not found: {f}")
        rows += _read_jsonl(f, bad) if f.suffix in (".jsonl", ".json") else _read_tsv(f, bad)
    base = folder if folder.is_dir() else folder.parent
    return _rows_to_utterances(rows, src, source_name(src), base, src.audio_column or "path",
                               src.text_column or "text", bad, allow_absolute=True)


_HF_TABLES: dict[str, object] = {}  # table key -> datasets.Dataset with undecoded audio


def read_hf(src: SourceConfig, split_expr: str, bad: list) -> list[Utterance]:
    import datasets

    name = source_name(src)
    audio_col, text_col = src.audio_column or "audio", src.text_column or "sentence"
    folder = Path(src.path)
    utts = []
    for split in split_names(split_expr):
        try:
            if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
                ds = datasets.load_from_disk(str(folder))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            elif folder.is_dir():
                ds = datasets.load_dataset("audiofolder", data_dir=str(folder), split=split)
            else:
                ds = datasets.load_dataset(src.path, src.hf_config or None, split=split)
        except KeyError:
            raise DataError(f"data source '{name}': no split '{split}' in {src.path}") from None
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data source '{name}': cannot load {src.path} split '{split}': {msg}") from None
        for col in (audio_col, text_col):
            if col not in ds.column_names:
                raise DataError(f"data source '{name}': {src.path} has no column '{col}' "
                                f"(columns: {', '.join(ds.column_names)})")
        if isinstance(ds.features[audio_col], datasets.Audio):
            ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
        key = f"{name}:{split}"
        _HF_TABLES[key] = ds.select_columns([audio_col])
        texts = ds[text_col]
        for i, text in enumerate(texts):
            utts.append(Utterance(id=f"{name}/{split}/{i}", text=text if isinstance(text, str) else "",
                                  language=src.language, source=name, table=key, row=i))
    return utts


READERS: dict[str, Callable] = {"common_voice": read_common_voice, "manifest": read_manifest, "hf": read_hf}


def _hf_audio(utt: Utterance):
    """(bytes or path) of a Hugging Face row's audio, or (array, rate) when the table holds decoded samples."""
    table = _HF_TABLES[utt.table]
    value = table[utt.row][table.column_names[0]]
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("array") is not None:
            return (torch.as_tensor(value["array"], dtype=torch.float32), int(value["sampling_rate"]))
        if value.get("path"):
            return value["path"]
    if isinstance(value, str):
        return value
    raise AudioError(f"{utt.id}: no audio in row {utt.row}")


def load_utterance_audio(utt: Utterance, sample_rate: int) -> torch.Tensor:
    """Decoded mono audio of one utterance at `sample_rate`. (N,)"""
    if not utt.table:
        return load_audio(utt.path, sample_rate)
    value = _hf_audio(utt)
    if isinstance(value, tuple):
        from asr.audio import resample

        audio, sr = value
        return resample(audio if audio.dim() == 1 else audio.mean(0), sr, sample_rate)
    return load_audio(value, sample_rate)


def _duration(utt: Utterance) -> float:
    if not utt.table:
        return audio_info(utt.path)[0]
    value = _hf_audio(utt)
    if isinstance(value, tuple):
        return value[0].shape[-1] / value[1]
    return audio_info(io.BytesIO(value) if isinstance(value, bytes) else value)[0]


# ---------------------------------------------------------------------------------------
# Filters and the data report.


@dataclass
class Labeler:
    """What the filters need to know about the model: how text becomes label ids, and
    (CTC) how many output frames a clip of n samples gives."""

    encode: Callable[[str, str], list[int]]  # (cleaned text, language) -> label ids
    max_tokens: int = 0  # labels longer than this are dropped (0: no limit)
    output_frames: Callable[[int], int] | None = None  # CTC: frames for n input samples


@dataclass
class SplitReport:
    total: int = 0
    kept: int = 0
    kept_hours: float = 0.0
    dropped: dict = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def drop(self, reason: str, detail: dict, max_examples: int) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < max_examples:
            self.examples[reason].append(detail)


def ctc_min_frames(labels: list[int]) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between each repeated pair."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


def filter_utterances(utts: list[Utterance], bad_rows: list, cfg: DataConfig, labeler: Labeler | None,
                      report: SplitReport, workers: int = 8) -> list[Utterance]:
    """Fill durations, cleaned text and labels; keep the utterances that pass every filter.

    Dropped ones are counted in `report` by reason: bad_row, bad_path, missing_file, undecodable,
    empty_text, too_short, too_long, labels_too_long, ctc_infeasible.
    """
    report.total += len(utts) + len(bad_rows)
    for reason, detail in bad_rows:
        report.drop(reason, detail, cfg.report_examples)

    def probe(u: Utterance):
        try:
            return _duration(u), None
        except AudioError as e:
            return None, str(e)
        except Exception as e:  # any other failure of a third-party decoder: still one row, not the run
            return None, f"{u.path or u.id}: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probes = list(pool.map(probe, utts))
    kept = []
    for u, (duration, err) in zip(utts, probes):
        detail = {"id": u.id, "path": u.path} if u.path else {"id": u.id}
        if err is not None:
            reason = "missing_file" if u.path and not Path(u.path).is_file() else "undecodable"
            report.drop(reason, dict(detail, detail=err), cfg.report_examples)
            continue
        u.duration = duration
        u.label_text = clean_transcript(u.text, cfg.text, u.language)
        if not u.label_text.strip():
            report.drop("empty_text", dict(detail, text=u.text), cfg.report_examples)
            continue
        if duration < cfg.min_duration_s:
            report.drop("too_short", dict(detail, duration=round(duration, 3)), cfg.report_examples)
            continue
        if cfg.max_duration_s and duration > cfg.max_duration_s:
            report.drop("too_long", dict(detail, duration=round(duration, 3)), cfg.report_examples)
            continue
        if labeler is not None:
            u.labels = labeler.encode(u.label_text, u.language)
            if labeler.max_tokens and len(u.labels) > labeler.max_tokens:
                report.drop("labels_too_long", dict(detail, tokens=len(u.labels)), cfg.report_examples)
                continue
            if labeler.output_frames is not None:
                frames = labeler.output_frames(int(round(duration * cfg.sample_rate)))
                need = ctc_min_frames(u.labels)
                if frames < need:
                    report.drop("ctc_infeasible", dict(detail, frames=frames, needed=need), cfg.report_examples)
                    continue
        kept.append(u)
    report.kept += len(kept)
    report.kept_hours += sum(u.duration for u in kept) / 3600
    return kept


def write_report(reports: dict[str, SplitReport], path: str | Path) -> None:
    out = {name: {"total": r.total, "kept": r.kept, "kept_hours": round(r.kept_hours, 4),
                  "dropped": dict(r.dropped), "examples": dict(r.examples)} for name, r in reports.items()}
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)


def format_report(reports: dict[str, SplitReport]) -> str:
    lines = []
    for name, r in reports.items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items())) or "none dropped"
        lines.append(f"{name}: kept {r.kept}/{r.total} ({r.kept_hours:.2f} h); {dropped}")
    return "\n".join(lines)


def read_source_split(src: SourceConfig, split_expr: str) -> tuple[list[Utterance], list]:
    """Raw utterances and bad rows of one source's split expression (e.g. "train+dev")."""
    bad: list = []
    utts = READERS[src.kind](src, split_expr, bad)
    seen, unique = set(), []
    for u in utts:  # "train+validated" names some clips twice
        key = (u.path, u.table, u.row)
        if key not in seen:
            seen.add(key)
            unique.append(u)
    return unique, bad


# ---------------------------------------------------------------------------------------
# Dataset and collation.


class AudioDataset(torch.utils.data.Dataset):
    """Decodes one utterance per item. Keys are (epoch, position, index) tuples from the
    batch sampler, or plain indices. A clip that fails to decode yields a `dropped` record."""

    def __init__(self, utts: list[Utterance], sample_rate: int = 16000):
        self.utts = utts
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, key):
        epoch, pos, i = key if isinstance(key, tuple) else (None, None, key)
        utt = self.utts[i]
        state = None if epoch is None else {"epoch": epoch, "position": pos + 1}
        try:
            audio = load_utterance_audio(utt, self.sample_rate)
        except Exception as e:
            return {"utt": utt, "audio": None, "error": str(e).splitlines()[0] if str(e) else type(e).__name__,
                    "state": state}
        return {"utt": utt, "audio": audio, "error": None, "state": state}


def collate(items: list[dict]) -> dict:
    """Pad a list of decoded items into a batch.

    audio (B, N) float32 zero-padded, audio_lengths (B,), labels (B, L) padded with -100,
    label_lengths (B,); ids/texts/languages as lists; `dropped` lists (id, error) of clips
    that failed to decode; `sampler_state` is where the sampler resumes after this batch.
    """
    state = items[-1]["state"] if items else None
    dropped = [(it["utt"].id, it["error"]) for it in items if it["audio"] is None]
    items = [it for it in items if it["audio"] is not None]
    B = len(items)
    n_max = max((it["audio"].shape[0] for it in items), default=0)
    l_max = max((len(it["utt"].labels) for it in items), default=0)
    audio = torch.zeros(B, n_max)
    labels = torch.full((B, l_max), -100, dtype=torch.long)
    for b, it in enumerate(items):
        audio[b, : it["audio"].shape[0]] = it["audio"]
        labels[b, : len(it["utt"].labels)] = torch.tensor(it["utt"].labels, dtype=torch.long)
    return {
        "ids": [it["utt"].id for it in items],
        "texts": [it["utt"].text for it in items],
        "languages": [it["utt"].language for it in items],
        "audio": audio,  # (B, N)
        "audio_lengths": torch.tensor([it["audio"].shape[0] for it in items], dtype=torch.long),  # (B,)
        "labels": labels,  # (B, L)
        "label_lengths": torch.tensor([len(it["utt"].labels) for it in items], dtype=torch.long),  # (B,)
        "dropped": dropped,
        "sampler_state": state,
    }


# ---------------------------------------------------------------------------------------
# Duration-bucketed, resumable, shardable batch sampler.


class DurationBatchSampler:
    """Groups clips of similar duration into batches capped by clip count and padded seconds
    (`batch_size` clips, `max_batch_s` = clips x longest clip), shuffled with a seed.

    Yields, forever, epoch after epoch, this rank's share of each global batch as a list of
    (epoch, position, index) keys. With `num_replicas` ranks, the caps apply per rank and each
    global batch is split between ranks, so the global batch does not depend on the rank count.
    Resume with `load_state_dict({"epoch": e, "position": p})`: the next batch is global batch p
    of epoch e.
    """

    def __init__(self, durations: list[float], batch_size: int = 0, max_batch_s: float = 0.0, seed: int = 0,
                 shuffle: bool = True, num_replicas: int = 1, rank: int = 0, noise: float = 0.05):
        if not durations:
            raise DataError("no utterances left to batch (see data_report.json)")
        self.durations = durations
        self.batch_size = batch_size * num_replicas if batch_size > 0 else 0
        self.max_batch_s = max_batch_s * num_replicas if max_batch_s > 0 else 0.0
        self.seed, self.shuffle, self.noise = seed, shuffle, noise
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list] | None = None

    def batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 100003 + epoch)
        order = list(range(len(self.durations)))
        if self.shuffle:
            rng.shuffle(order)
            keys = {i: self.durations[i] * (1.0 + self.noise * (2 * rng.random() - 1)) for i in order}
            order.sort(key=keys.__getitem__)
        else:
            order.sort(key=lambda i: self.durations[i])
        batches, current, longest = [], [], 0.0
        for i in order:
            d = self.durations[i]
            n, m = len(current) + 1, max(longest, d)
            full = (self.batch_size and n > self.batch_size) or (self.max_batch_s and n * m > self.max_batch_s)
            if current and full:
                batches.append(current)
                current, m = [], d
            current.append(i)
            longest = m
        if current:
            batches.append(current)
        batches = [b for b in batches if len(b) >= self.num_replicas]
        if not batches:
            raise DataError(f"fewer clips than ranks ({len(self.durations)} < {self.num_replicas})")
        if self.shuffle:
            rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def shard(self, batch: list[int], rank: int | None = None) -> list[int]:
        """A rank's part of a global batch (sorted by duration, dealt round-robin); this rank's by default."""
        if self.num_replicas == 1:
            return batch
        ordered = sorted(batch, key=lambda i: self.durations[i])
        return ordered[self.rank if rank is None else rank :: self.num_replicas]

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            batches = self.batches(epoch)
            for p in range(position, len(batches)):
                yield [(epoch, p, i) for i in self.shard(batches[p])]
            epoch, position = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= len(self.batches(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of padded (wasted) samples over an epoch's batches."""
        real = padded = 0.0
        for b in self.batches(epoch):
            for part in (self.shard(b, r) for r in range(self.num_replicas)):
                if part:
                    real += sum(self.durations[i] for i in part)
                    padded += len(part) * max(self.durations[i] for i in part)
        return 1.0 - real / padded if padded else 0.0

