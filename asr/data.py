"""Corpora (Common Voice folders, manifests, Hugging Face datasets), filters with reasons,
the audio dataset, batch collation and the resumable duration-bucketed batch sampler."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from asr.audio import AudioError, audio_info, load_audio
from asr.checkpoint import json_text, write_files
from asr.config import DataConfig, SourceConfig, source_name  # noqa: F401 (source_name re-exported)
from asr.text import clean_transcript, strip_controls


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
    controls: str = ""  # control characters taken out of `text` when it was read (asr.text.strip_controls)
    speeds: list[float] = field(default_factory=list)  # training: augment.speed factors at which it passes the filters


# ---------------------------------------------------------------------------------------
# Reading sources. Each reader returns (utterances, bad rows); a bad row is (reason, detail dict).


def split_names(expr: str) -> list[str]:
    return [s.strip() for s in expr.split("+") if s.strip()]


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
    """Whether `path` stays inside `folder`, judged on the names (".." segments), not on where symlinks point,
    so a clips folder of symlinks into a shared store is fine while "../../x.mp3" is not."""
    rel = os.path.normpath(os.path.relpath(os.path.abspath(path), os.path.abspath(folder)))
    return rel != ".." and not rel.startswith(".." + os.sep) and not os.path.isabs(rel)


def _rows_to_utterances(rows, src, name, base: Path, audio_col, text_col, bad, allow_absolute):
    for col in (audio_col, text_col):
        if rows and all(col not in row for row in rows):
            raise DataError(f"{rows[0]['_file']}: no column '{col}' (set audio_column/text_column)")
    utts = []
    for row in rows:
        where = {"file": row["_file"], "line": row["_line"]}
        missing = [c for c in (audio_col, text_col) if c not in row]
        if missing:  # a JSONL row without the field: one bad row, not a broken source
            bad.append(("bad_row", dict(where, detail=f"no field '{missing[0]}'")))
            continue
        if not isinstance(row[audio_col], str):
            bad.append(("bad_path", dict(where, path=repr(row[audio_col]))))
            continue
        rel = row[audio_col].strip()
        text, controls = strip_controls(row[text_col] if isinstance(row[text_col], str) else "")
        p = Path(rel)
        if not rel or (p.is_absolute() and not allow_absolute) or (not p.is_absolute() and not _inside(base / p, base)):
            bad.append(("bad_path", dict(where, path=rel)))
            continue
        path = p if p.is_absolute() else base / p
        utts.append(Utterance(
            id=f"{name}/{Path(rel).stem}", text=text, language=src.language, source=name, path=str(path),
            speaker=str(row.get("client_id", row.get("speaker", ""))), controls=controls,
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


_MANIFEST_SUFFIXES = ("", ".tsv", ".jsonl", ".json")


def read_manifest(src: SourceConfig, split_expr: str, bad: list) -> list[Utterance]:
    """Manifests with `path` and `text` columns (TSV with a header, or JSON lines), audio paths relative to
    the manifest's folder. A split name is a manifest file in `path` (or beside it, when `path` is a file),
    with or without its .tsv/.jsonl/.json suffix: train = "train" reads train.tsv."""
    folder = Path(src.path)
    if not folder.exists():
        raise DataError(f"data source '{source_name(src)}': not found: {folder}")
    base = folder if folder.is_dir() else folder.parent
    rows = []
    for split in split_names(split_expr):
        if folder.is_file() and split in (folder.name, folder.stem):
            f = folder
        else:
            f = next((base / (split + sfx) for sfx in _MANIFEST_SUFFIXES if (base / (split + sfx)).is_file()), None)
        if f is None:
            raise DataError(f"data source '{source_name(src)}': manifest not found: {base / split}[.tsv|.jsonl]")
        rows += _read_jsonl(f, bad) if f.suffix in (".jsonl", ".json") else _read_tsv(f, bad)
    return _rows_to_utterances(rows, src, source_name(src), base, src.audio_column or "path",
                               src.text_column or "text", bad, allow_absolute=True)


def _read_csv(path: Path, bad: list) -> list[dict]:
    """CSV rows with a header (an audiofolder's metadata.csv); bad rows as in `_read_tsv`."""
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or any("\udc80" <= c <= "\udcff" for c in "".join(header)):
        raise DataError(f"{path}: no valid UTF-8 header")
    rows, prev = [], reader.line_num
    for cells in reader:
        lineno, prev = prev + 1, reader.line_num  # the line the row starts on
        if not any(c.strip() for c in cells):
            continue
        if any("\udc80" <= ch <= "\udcff" for c in cells for ch in c):
            bad.append(("bad_row", {"file": str(path), "line": lineno, "detail": "invalid UTF-8"}))
            continue
        if len(cells) != len(header):
            bad.append(("bad_row", {"file": str(path), "line": lineno,
                                    "detail": f"{len(cells)} fields, header has {len(header)}"}))
            continue
        rows.append(dict(zip(header, cells), _line=lineno, _file=str(path)))
    return rows


def read_audiofolder(src: SourceConfig, split_expr: str, bad: list) -> list[Utterance]:
    """A Hugging Face audiofolder read directly (no `datasets` audio encoding, which needs torchcodec/FFmpeg):
    audio files with a metadata.csv or metadata.jsonl whose `file_name` column holds their paths relative
    to it. Split folders (train/, dev/, ...) each have their own metadata; without them the folder's own
    metadata is the single split "train", as in `datasets`."""
    folder, name = Path(src.path), source_name(src)
    audio_col = src.audio_column if src.audio_column not in ("", "audio") else "file_name"
    rows_by_base = []
    for split in split_names(split_expr):
        here = folder / split if (folder / split).is_dir() else folder if split == "train" else None
        meta = None if here is None else next(
            (here / m for m in ("metadata.csv", "metadata.jsonl") if (here / m).is_file()), None)
        if meta is None:
            raise DataError(f"data source '{name}': no split '{split}' in audiofolder {folder} "
                            f"(expected {folder / split}/metadata.csv or .jsonl)")
        rows = _read_csv(meta, bad) if meta.suffix == ".csv" else _read_jsonl(meta, bad)
        rows_by_base.append((rows, here))
    utts = []
    for rows, here in rows_by_base:
        utts += _rows_to_utterances(rows, src, name, here, audio_col, src.text_column or "sentence", bad,
                                    allow_absolute=False)
    return utts


_HF_TABLES: dict[str, object] = {}  # table key -> datasets.Dataset with undecoded audio


def read_hf(src: SourceConfig, split_expr: str, bad: list) -> list[Utterance]:
    name = source_name(src)
    audio_col, text_col = src.audio_column or "audio", src.text_column or "sentence"
    folder = Path(src.path)
    if folder.is_dir() and not (folder / "dataset_dict.json").is_file() and not (folder / "state.json").is_file() \
            and not any((folder / s / "state.json").is_file() for s in split_names(split_expr)):
        return read_audiofolder(src, split_expr, bad)
    import datasets

    utts = []
    for split in split_names(split_expr):
        try:
            if folder.is_dir() and (folder / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(folder))[split]
            elif folder.is_dir() and (folder / split / "state.json").is_file():
                ds = datasets.load_from_disk(str(folder / split))  # one save_to_disk folder per split
            elif folder.is_dir() and (folder / "state.json").is_file():
                ds = datasets.load_from_disk(str(folder))  # a single Dataset: one split, "train" unless named
                own = str(ds.split) if ds.split is not None else "train"
                if split != own:
                    raise DataError(f"data source '{name}': no split '{split}' in {src.path} (a single saved "
                                    f"Dataset, split '{own}'; set this split to \"{own}\" or \"\")")
            else:
                ds = datasets.load_dataset(src.path, src.hf_config or None, split=split)
        except DataError:
            raise
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
            text, controls = strip_controls(text if isinstance(text, str) else "")
            utts.append(Utterance(id=f"{name}/{split}/{i}", text=text, language=src.language, source=name,
                                  table=key, row=i, controls=controls))
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


def load_utterance_audio(utt: Utterance, sample_rate: int | None) -> torch.Tensor:
    """Decoded mono audio of one utterance at `sample_rate` (None: as stored, without resampling). (N,)"""
    if not utt.table:
        return load_audio(utt.path, sample_rate)
    value = _hf_audio(utt)
    if isinstance(value, tuple):
        from asr.audio import NonFiniteAudio, resample

        audio, sr = value
        if not torch.isfinite(audio).all():  # as load_audio does for files
            raise NonFiniteAudio(f"{utt.id}: audio contains NaN or infinite samples")
        audio = audio if audio.dim() == 1 else audio.mean(0)
        return audio if sample_rate is None else resample(audio, sr, sample_rate)
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


WHISPER_MIN_S = 0.1  # Whisper's shortest input: clips below it are too_short, whatever their label


@dataclass
class Labeler:
    """What the filters need to know about the model: how text becomes label ids, (CTC) how many
    output frames a clip of n samples gives, and the fewest input samples it takes."""

    encode: Callable[[str, str], list[int]]  # (cleaned text, language) -> label ids
    max_tokens: int = 0  # labels longer than this are dropped (0: no limit)
    output_frames: Callable[[int], int] | None = None  # CTC: frames for n input samples
    min_samples: int = 0  # shorter clips are dropped as too_short (CTC: the receptive field, see min_input_samples)
    timestamped: Callable[[str, str], int] | None = None  # Whisper with timestamps: that label's length


def min_input_samples(output_frames: Callable[[int], int]) -> int:
    """The fewest input samples for which `output_frames` (non-decreasing) gives one frame: a CTC
    feature encoder's receptive field (400 samples for Wav2Vec2's 7 conv layers)."""
    hi = 1
    while output_frames(hi) < 1:
        hi *= 2
        if hi > 1 << 40:
            raise ValueError("the model gives no output frame for any input length")
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if output_frames(mid) >= 1 else (mid + 1, hi)
    return lo


@dataclass
class SplitReport:
    total: int = 0
    kept: int = 0
    kept_hours: float = 0.0
    dropped: dict = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))
    controls: int = 0  # transcripts (kept or not) that had control characters taken out
    control_examples: list = field(default_factory=list)

    failed: dict = field(default_factory=dict)  # id -> error of kept clips that failed to decode when loaded
    failed_reasons: dict = field(default_factory=Counter)

    def drop(self, reason: str, detail: dict, max_examples: int) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < max_examples:
            self.examples[reason].append(detail)

    def decode_failed(self, utt: Utterance, error: str, max_examples: int) -> bool:
        """Count a kept clip that the loader could not decode (training or evaluation), once: it moves from
        `kept` to dropped reason `decode_failed`. Returns whether it was new."""
        if utt.id in self.failed:
            return False
        self.failed[utt.id] = error
        self.kept -= 1
        self.kept_hours = max(0.0, self.kept_hours - utt.duration / 3600)
        self.failed_reasons[decode_reason(utt, error)] += 1
        detail = {"id": utt.id, "path": utt.path} if utt.path else {"id": utt.id}
        self.drop("decode_failed", dict(detail, detail=error), max_examples)
        return True


def decode_reason(utt: Utterance, error: str) -> str:
    """An error message without the file name it starts with: what failed ("audio contains NaN ...")."""
    for name in (utt.path, "<bytes>", utt.id):
        if name and error.startswith(name + ": "):
            return error[len(name) + 2 :]
    return error


def ctc_min_frames(labels: list[int]) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between each repeated pair."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


def filter_utterances(utts: list[Utterance], bad_rows: list, cfg: DataConfig, labeler: Labeler | None,
                      report: SplitReport, workers: int = 8, speeds: list[float] = ()) -> list[Utterance]:
    """Fill durations, cleaned text and labels; keep the utterances that pass every filter.

    Dropped ones are counted in `report` by reason: bad_row, bad_path, missing_file, undecodable,
    empty_text, too_short (below data.min_duration_s or the model's `labeler.min_samples`), too_long,
    labels_too_long, ctc_infeasible. Transcripts the readers took control characters out of are counted
    in `report.controls` (a warning: the clip itself is kept).
    With speed perturbation (`speeds`, augment.speed), each kept clip's `speeds` are the factors at whose
    perturbed length it still passes the duration and CTC checks; a clip that passes at none of them is
    dropped with the reason of the first.
    """
    report.total += len(utts) + len(bad_rows)
    for reason, detail in bad_rows:
        report.drop(reason, detail, cfg.report_examples)
    for u in utts:
        if u.controls:
            report.controls += 1
            if len(report.control_examples) < cfg.report_examples:
                report.control_examples.append({"id": u.id, "chars": " ".join(f"U+{ord(c):04X}" for c in u.controls),
                                                "text": u.text})

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
        if labeler is not None:
            u.labels = labeler.encode(u.label_text, u.language)
        n = int(round(duration * cfg.sample_rate))
        problem = _length_problem(u, duration, n, cfg, labeler)
        if problem is None and speeds:
            from asr.augment import perturbed_samples

            lengths = [perturbed_samples(n, f, cfg.sample_rate) for f in speeds]
            problems = [_length_problem(u, m / cfg.sample_rate, m, cfg, labeler) for m in lengths]
            u.speeds = [f for f, p in zip(speeds, problems) if p is None]
            if not u.speeds:
                problem = (problems[0][0], dict(problems[0][1], speed=speeds[0]))
        if problem is not None:
            report.drop(problem[0], dict(detail, **problem[1]), cfg.report_examples)
            continue
        kept.append(u)
    report.kept += len(kept)
    report.kept_hours += sum(u.duration for u in kept) / 3600
    return kept


def _length_problem(u: Utterance, duration: float, n: int, cfg: DataConfig,
                    labeler: Labeler | None) -> tuple[str, dict] | None:
    """(reason, detail) when utterance `u`, `duration` s or n samples long, fails a duration or CTC check."""
    if duration < cfg.min_duration_s:
        return "too_short", {"duration": round(duration, 3)}
    if labeler is not None and n < labeler.min_samples:
        return "too_short", {"duration": round(duration, 3), "model_min_s": round(labeler.min_samples / cfg.sample_rate, 4)}
    if cfg.max_duration_s and duration > cfg.max_duration_s:
        return "too_long", {"duration": round(duration, 3)}
    if labeler is not None:
        tokens = len(u.labels)
        if labeler.timestamped is not None:
            tokens = max(tokens, labeler.timestamped(u.label_text, u.language))
        if labeler.max_tokens and tokens > labeler.max_tokens:
            return "labels_too_long", {"tokens": tokens}
    if labeler is not None and labeler.output_frames is not None:
        frames, need = labeler.output_frames(n), ctc_min_frames(u.labels)
        if frames < need:
            return "ctc_infeasible", {"frames": frames, "needed": need}
    return None


def write_report(reports: dict[str, SplitReport], path: str | Path) -> None:
    """data_report.json: per split the clips read, kept and dropped by reason, with examples; `decode_failed`
    counts kept clips that the loader then could not decode, by reason in `decode_failed_reasons`."""
    out = {name: {"total": r.total, "kept": r.kept, "kept_hours": round(r.kept_hours, 4),
                  "dropped": dict(r.dropped), "examples": dict(r.examples), "decode_failed": len(r.failed),
                  "decode_failed_reasons": dict(r.failed_reasons),
                  "control_chars": {"transcripts": r.controls, "examples": r.control_examples}}
           for name, r in reports.items()}
    write_files({Path(path): json_text(out)})


def format_report(reports: dict[str, SplitReport]) -> str:
    lines = []
    for name, r in reports.items():
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items())) or "none dropped"
        lines.append(f"{name}: kept {r.kept}/{r.total} ({r.kept_hours:.2f} h); {dropped}")
        if r.controls:
            lines.append(f"warning: {name}: {control_chars_line(r.controls, r.control_examples)}")
    return "\n".join(lines)


def control_chars_line(n: int, examples: list) -> str:
    """The warning for `n` transcripts that had control characters taken out (examples: filter_utterances')."""
    ex = ", ".join(f"{e['id']} ({e['chars']})" for e in examples[:3])
    return f"control characters taken out of {n} transcripts (tab/newline/CR became spaces), e.g. {ex}"


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
    batch sampler, or plain indices. A clip that fails to decode yields a `dropped` record.
    With `cache`, decoded clips are kept (in each loader worker, or in the main process without
    workers) and later epochs decode nothing. `samples` (asr.timestamps.TimestampSamples) turns a keyed
    clip into its training sample (timestamped labels, packed clips); the item then holds its `labels`.
    With `augment` (an asr.augment.Augmenter; training only), each keyed clip (or sample) is augmented with
    the draws of its (epoch, index)."""

    def __init__(self, utts: list[Utterance], sample_rate: int = 16000, cache: bool = False, samples=None,
                 augment=None):
        self.utts = utts
        self.sample_rate = sample_rate
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.samples = samples
        self.augment = augment

    def __len__(self) -> int:
        return len(self.utts)

    def load(self, i: int) -> torch.Tensor:
        audio = self.cache.get(i) if self.cache is not None else None
        if audio is None:
            audio = load_utterance_audio(self.utts[i], self.sample_rate)
            if self.cache is not None:
                self.cache[i] = audio
        return audio

    def __getitem__(self, key):
        epoch, pos, i = key if isinstance(key, tuple) else (None, None, key)
        utt = self.utts[i]
        state = None if epoch is None else {"epoch": epoch, "position": pos + 1}
        try:
            audio = self.load(i)
        except Exception as e:
            return {"utt": utt, "audio": None, "error": str(e).splitlines()[0] if str(e) else type(e).__name__,
                    "state": state}
        item = {"utt": utt, "audio": audio, "error": None, "state": state}
        if self.samples is not None and epoch is not None:
            from asr.timestamps import ClipFailed

            try:
                sample = self.samples(epoch, pos, i, audio, self.load)
            except ClipFailed as e:  # a clip packed with this one: it is the one that failed
                return {"utt": e.utt, "audio": None, "error": str(e), "state": state}
            if sample is not None:
                item = {"utt": utt, "audio": sample[0], "labels": sample[1], "prompt_length": sample[2],
                        "error": None, "state": state}
        if self.augment is not None and epoch is not None:
            item.update(self.augment(item["audio"], utt.speeds, epoch, i))
        return item


def collate(items: list[dict]) -> dict:
    """Pad a list of decoded items into a batch.

    audio (B, N) float32 zero-padded, audio_lengths (B,), labels (B, L) padded with -100,
    label_lengths (B,); ids/texts/languages as lists; `dropped` lists (id, error) of clips
    that failed to decode; `sampler_state` is where the sampler resumes after this batch. An item's own
    `labels` (a timestamped or packed sample) replace its utterance's; prompt_lengths (B,) counts their
    leading previous-text tokens (0 without). Items with SpecAugment masks (asr.augment) add time_mask (B, T)
    (False-padded) and freq_mask (B, n_mels).
    """
    state = items[-1]["state"] if items else None
    dropped = [(it["utt"].id, it["error"]) for it in items if it["audio"] is None]
    items = [it for it in items if it["audio"] is not None]
    item_labels = [it.get("labels", it["utt"].labels) for it in items]
    B = len(items)
    n_max = max((it["audio"].shape[0] for it in items), default=0)
    l_max = max((len(ids) for ids in item_labels), default=0)
    audio = torch.zeros(B, n_max)
    labels = torch.full((B, l_max), -100, dtype=torch.long)
    for b, it in enumerate(items):
        audio[b, : it["audio"].shape[0]] = it["audio"]
        labels[b, : len(item_labels[b])] = torch.tensor(item_labels[b], dtype=torch.long)
    masks = {}
    if items and "time_mask" in items[0]:
        t_max = max(it["time_mask"].shape[0] for it in items)
        masks["time_mask"] = torch.zeros(B, t_max, dtype=torch.bool)  # (B, T)
        for b, it in enumerate(items):
            masks["time_mask"][b, : it["time_mask"].shape[0]] = it["time_mask"]
        masks["freq_mask"] = torch.stack([it["freq_mask"] for it in items])  # (B, n_mels)
    return {
        **masks,
        "ids": [it["utt"].id for it in items],
        "texts": [it["utt"].text for it in items],
        "languages": [it["utt"].language for it in items],
        "audio": audio,  # (B, N)
        "audio_lengths": torch.tensor([it["audio"].shape[0] for it in items], dtype=torch.long),  # (B,)
        "labels": labels,  # (B, L)
        "label_lengths": torch.tensor([len(ids) for ids in item_labels], dtype=torch.long),  # (B,)
        # Whisper: leading label tokens that are a previous-text prompt, not targets (B,)
        "prompt_lengths": torch.tensor([it.get("prompt_length", 0) for it in items], dtype=torch.long),
        "dropped": dropped,
        "sampler_state": state,
    }


# ---------------------------------------------------------------------------------------
# Duration-bucketed, resumable, shardable batch sampler.


def _at_least(batches: list[list[int]], n: int) -> list[list[int]]:
    """Give every batch at least `n` clips (one per rank), so no clip is left out of an epoch: a short
    batch (the tail, or a clip longer than the cap) takes its neighbour's nearest clips, or merges
    with it when the neighbour cannot spare them. Batches are in duration order."""
    if n <= 1:
        return batches
    out: list[list[int]] = []
    for b in batches:
        if len(b) >= n or not out:
            out.append(list(b))
            continue
        prev, need = out[-1], n - len(b)
        if len(prev) - need >= n:
            out.append(prev[-need:] + b)
            del prev[-need:]
        else:
            prev.extend(b)
    if len(out) > 1 and len(out[0]) < n:  # only the first can still be short: borrow from the second
        first, nxt, need = out[0], out[1], n - len(out[0])
        if len(nxt) - need >= n:
            first.extend(nxt[:need])
            del nxt[:need]
        else:
            out[1] = first + nxt
            del out[0]
    return out


class DurationBatchSampler:
    """Groups clips of similar duration into batches capped by clip count and padded seconds
    (`batch_size` clips, `max_batch_s` = clips x longest clip), shuffled with a seed; with
    `by_duration=False`, batches of randomly drawn clips under the same caps.

    Yields, forever, epoch after epoch, this rank's share of each global batch as a list of
    (epoch, position, index) keys. With `num_replicas` ranks, the global batches are those of one
    rank with the caps multiplied by the rank count (so they do not depend on it), each split
    between the ranks; a global batch with fewer clips than ranks borrows from its neighbour, so
    every clip is seen once an epoch and no rank gets an empty batch. A rank's share holds
    ceil(n / ranks) of the global batch's n clips, so its padded seconds can exceed max_batch_s by
    at most one clip when n is not a multiple of the rank count.
    Resume with `load_state_dict({"epoch": e, "position": p})`: the next batch is global batch p
    of epoch e. `durations_at(epoch)`, when given, gives each epoch's durations (speed perturbation).
    """

    def __init__(self, durations: list[float], batch_size: int = 0, max_batch_s: float = 0.0, seed: int = 0,
                 shuffle: bool = True, num_replicas: int = 1, rank: int = 0, noise: float = 0.05,
                 by_duration: bool = True, durations_at: Callable[[int], list[float]] | None = None):
        if not durations:
            raise DataError("no utterances left to batch (see data_report.json)")
        self.durations = durations
        self.batch_size = batch_size * num_replicas if batch_size > 0 else 0
        self.max_batch_s = max_batch_s * num_replicas if max_batch_s > 0 else 0.0
        self.seed, self.shuffle, self.noise, self.by_duration = seed, shuffle, noise, by_duration
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list] | None = None
        self.durations_at = durations_at
        self._durations = (-1, durations)  # (epoch, its durations)

    def durations_of(self, epoch: int) -> list[float]:
        """The clips' durations in `epoch` (perturbed by its speed factors with `durations_at`)."""
        if self.durations_at is None:
            return self.durations
        if self._durations[0] != epoch:
            self._durations = (epoch, self.durations_at(epoch))
        return self._durations[1]

    def batches(self, epoch: int) -> list[list[int]]:
        """The global batches of `epoch`, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        durations = self.durations_of(epoch)
        rng = random.Random(self.seed * 100003 + epoch)
        order = list(range(len(self.durations)))
        if self.shuffle:
            rng.shuffle(order)
            if self.by_duration:  # else: random batches (the caps still apply)
                keys = {i: durations[i] * (1.0 + self.noise * (2 * rng.random() - 1)) for i in order}
                order.sort(key=keys.__getitem__)
        elif self.by_duration:
            order.sort(key=lambda i: durations[i])
        batches, current, longest = [], [], 0.0
        for i in order:
            d = durations[i]
            n, m = len(current) + 1, max(longest, d)
            full = (self.batch_size and n > self.batch_size) or (self.max_batch_s and n * m > self.max_batch_s)
            if current and full:
                batches.append(current)
                current, m = [], d
            current.append(i)
            longest = m
        if current:
            batches.append(current)
        if len(self.durations) < self.num_replicas:
            raise DataError(f"fewer clips than ranks ({len(self.durations)} < {self.num_replicas})")
        batches = _at_least(batches, self.num_replicas)
        if self.shuffle:
            rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def shard(self, batch: list[int], rank: int | None = None, epoch: int = 0) -> list[int]:
        """A rank's part of a global batch of `epoch` (sorted by duration, dealt round-robin); this rank's by
        default."""
        if self.num_replicas == 1:
            return batch
        durations = self.durations_of(epoch)
        ordered = sorted(batch, key=lambda i: durations[i])
        return ordered[self.rank if rank is None else rank :: self.num_replicas]

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            batches = self.batches(epoch)
            for p in range(position, len(batches)):
                yield [(epoch, p, i) for i in self.shard(batches[p], epoch=epoch)]
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
        durations = self.durations_of(epoch)
        for b in self.batches(epoch):
            for part in (self.shard(b, r, epoch) for r in range(self.num_replicas)):
                if part:
                    real += sum(durations[i] for i in part)
                    padded += len(part) * max(durations[i] for i in part)
        return 1.0 - real / padded if padded else 0.0

