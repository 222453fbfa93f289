"""Sharded corpora: a configured split written as Parquet shards with an index, and streamed back for training.

    python -m asr.shards --exp experiments/tr_xlsr.toml --split train --out /data/tr-shards [--shard-mb 256]

A shards folder holds shard-000000.parquet, ... (columns audio: the clip's encoded bytes as they were on disk,
id, text, duration, speaker, language; row groups of ROW_GROUP rows) and index.json: per shard its file, rows,
bytes, hours, a duration histogram and a blake2b digest of its bytes. The writer keeps the utterances that
asr.data's filters keep without a model (missing or undecodable files, empty text, data.min/max_duration_s);
the model's own filters (labels too long, CTC infeasible, too short for the encoder) run while streaming.

A source `kind = "shards"` (path: the folder or an fsspec URL) is streamed by `ShardStream`: every epoch the
shard order is shuffled with the run seed and dealt out to the streams (ranks x loader workers, disjoint);
each stream reads `data.shuffle_buffer` clips that pass the filters, batches them by duration under
data.batch_size / data.max_batch_s (asr.data.DurationBatchSampler on the buffer, seeded by the run seed, the
stream, the epoch and the buffer's number) and yields the batches in shuffled order. A stream's position is
(epoch, shard, row where its buffer started, buffer number, batches of it already yielded): a resumed run reads
that buffer again and goes on from the same batch, so it trains on exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import io
import json
import random
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from asr import checkpoint as ckpt
from asr.audio import AudioError, load_audio
from asr.config import Config, ConfigError, SourceConfig, source_name
from asr.data import (DataError, DurationBatchSampler, SplitReport, Utterance, _hf_audio, check_utterance, collate,
                      filter_utterances, read_source_split)
from asr.text import clean_transcript, strip_controls

INDEX = "index.json"
FORMAT = "asr-shards/1"
ROW_GROUP = 256
HIST_EDGES = (0, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30)  # seconds: bin i is [edge i, edge i+1), the last [30, inf)
COLUMNS = ("audio", "id", "text", "duration", "speaker", "language")


def histogram(durations: list[float]) -> list[int]:
    counts = [0] * len(HIST_EDGES)
    for d in durations:
        counts[max(i for i, e in enumerate(HIST_EDGES) if d >= e or i == 0)] += 1
    return counts


# ---------------------------------------------------------------------------------------
# Writing.


def clip_bytes(u: Utterance) -> bytes:
    """The encoded audio of an utterance: its file's bytes, or a Hugging Face row's (samples encoded as FLAC)."""
    if not u.table:
        return Path(u.path).read_bytes()
    value = _hf_audio(u)
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return Path(value).read_bytes()
    import soundfile as sf

    audio, sr = value
    buf = io.BytesIO()
    sf.write(buf, audio.numpy().T if audio.dim() > 1 else audio.numpy(), sr, format="FLAC")
    return buf.getvalue()


def _write_shard(rows: list[tuple[Utterance, bytes]], path: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "audio": pa.array([b for _, b in rows], pa.binary()),
        "id": [u.id for u, _ in rows], "text": [u.text for u, _ in rows],
        "duration": pa.array([u.duration for u, _ in rows], pa.float64()),
        "speaker": [u.speaker for u, _ in rows], "language": [u.language for u, _ in rows],
    })
    pq.write_table(table, path, row_group_size=ROW_GROUP,
                   compression={c: "none" if c == "audio" else "zstd" for c in COLUMNS})
    data = path.read_bytes()
    durations = [u.duration for u, _ in rows]
    return {"file": path.name, "rows": len(rows), "bytes": len(data), "hours": round(sum(durations) / 3600, 6),
            "durations": histogram(durations), "blake2b": hashlib.blake2b(data).hexdigest()}


def write_shards(cfg: Config, split: str, out: Path, shard_mb: float = 256, log=print) -> dict:
    """Write the filtered utterances of every source's `split` ("train", "dev" or "test") to `out` as Parquet
    shards of about `shard_mb` MiB of audio each, with index.json; atomically (a temporary folder beside `out`
    renamed into place: a failure leaves no half-written shard or index). Returns the index."""
    if split not in ("train", "dev", "test"):
        raise ConfigError(f"--split: {split!r} is not train, dev or test")
    sources = [s for s in cfg.data.sources if getattr(s, split)]
    if not sources:
        raise ConfigError(f"--split {split}: no data source has a {split} split")
    if any(s.kind == "shards" for s in sources):
        raise ConfigError(f"--split {split}: a shards source is already sharded")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / INDEX).is_file())):
        raise ConfigError(f"--out: {out} exists and is not a shards folder (no {INDEX}); choose another folder")
    utts, filtered = [], {}
    for src in sources:
        raw, bad = read_source_split(src, getattr(src, split))
        report = SplitReport()
        utts += filter_utterances(raw, bad, cfg.data, None, report)
        filtered[f"{source_name(src)}/{split}"] = {"total": report.total, "kept": report.kept,
                                                   "dropped": dict(report.dropped)}
        log(f"{source_name(src)}/{split}: kept {report.kept}/{report.total}"
            + "".join(f", {k} {v}" for k, v in sorted(report.dropped.items())))
    if not utts:
        raise DataError(f"--split {split}: no utterance left after filtering")
    random.Random(cfg.run.seed).shuffle(utts)  # mixed sources and speakers in every shard
    limit = shard_mb * 2**20

    def fill(tmp: Path) -> None:
        shards, rows, size = [], [], 0
        for u in utts:
            try:
                data = clip_bytes(u)
            except (OSError, AudioError) as e:
                raise DataError(f"{u.path or u.id}: cannot read audio: {getattr(e, 'strerror', None) or e}") from None
            rows.append((u, data))
            size += len(data)
            if size >= limit:
                shards.append(_write_shard(rows, tmp / f"shard-{len(shards):06d}.parquet"))
                rows, size = [], 0
        if rows:
            shards.append(_write_shard(rows, tmp / f"shard-{len(shards):06d}.parquet"))
        chars = Counter(c for u in utts for c in u.label_text)  # the cleaned transcripts' (filter_utterances')
        index = {"format": FORMAT, "split": split, "sources": [source_name(s) for s in sources],
                 "languages": sorted({u.language for u in utts}), "rows": sum(s["rows"] for s in shards),
                 "hours": round(sum(s["hours"] for s in shards), 6), "duration_edges_s": list(HIST_EDGES),
                 "filtered": filtered, "text_settings": asdict(cfg.data.text), "chars": dict(sorted(chars.items())),
                 "shards": shards}
        (tmp / INDEX).write_text(ckpt.json_text(index), encoding="utf-8")
        fill.index = index

    ckpt.write_folder(out, fill)
    return fill.index


# ---------------------------------------------------------------------------------------
# Reading: the index, shard bytes (local or fsspec), verification.


def _is_url(path: str) -> bool:
    return "://" in path


def _open(base: str, name: str):
    if _is_url(base):
        import fsspec

        fs, root = fsspec.core.url_to_fs(base)
        return fs.open(f"{root.rstrip('/')}/{name}", "rb")
    return open(Path(base) / name, "rb")


def _where(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def load_index(src: SourceConfig) -> dict:
    """The index.json of a shards source, checked; DataError (one line) when missing or malformed."""
    base, name = src.path, source_name(src)
    where = _where(base, INDEX)
    try:
        with _open(base, INDEX) as f:
            index = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"data source '{name}': {where} not found (write the shards with python -m asr.shards)"
                        ) from None
    except OSError as e:
        raise DataError(f"data source '{name}': cannot read {where}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"data source '{name}': {where} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise DataError(f"data source '{name}': {where}: format {got!r}, expected {FORMAT!r}")
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"data source '{name}': {where}: no shards listed")
    types = {"file": str, "rows": int, "bytes": int, "hours": (int, float), "blake2b": str}
    for i, s in enumerate(shards):
        for key, tp in types.items():
            if not isinstance(s, dict) or not isinstance(s.get(key), tp) or isinstance(s.get(key), bool):
                raise DataError(f"data source '{name}': {where}: shard {i}: missing or invalid '{key}'")
        if s["rows"] < 1 or "/" in s["file"] or s["file"].startswith("."):
            raise DataError(f"data source '{name}': {where}: shard {i}: invalid rows or file name ({s['file']!r})")
    return index


def read_shard(base: str, entry: dict, name: str):
    """A shard's bytes checked against its index entry (size, blake2b digest, rows), as a pyarrow ParquetFile;
    DataError (one line) when they disagree or it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = _where(base, entry["file"])
    try:
        with _open(base, entry["file"]) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"data source '{name}': cannot read shard {where}: {e.strerror or e}") from None
    if len(data) != entry["bytes"]:
        raise DataError(f"data source '{name}': shard {where} has {len(data)} bytes, index.json says {entry['bytes']}")
    if hashlib.blake2b(data).hexdigest() != entry["blake2b"]:
        raise DataError(f"data source '{name}': shard {where} does not match its blake2b digest in index.json")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except Exception as e:
        raise DataError(f"data source '{name}': shard {where} is not a Parquet file ({str(e).splitlines()[0]})"
                        ) from None
    return check_footer(pf, entry, where, name)


def check_footer(pf, entry: dict, where: str, name: str):
    """`pf` when its rows and columns are what index.json says, else DataError."""
    if pf.metadata.num_rows != entry["rows"]:
        raise DataError(f"data source '{name}': shard {where} has {pf.metadata.num_rows} rows, index.json says "
                        f"{entry['rows']}")
    missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(f"data source '{name}': shard {where} has no column '{missing[0]}'")
    return pf


def shard_texts(src: SourceConfig, index: dict) -> list[str]:
    """The transcripts of every shard (the text column only; no audio is read): for the CTC vocabulary."""
    import pyarrow.parquet as pq

    texts = []
    for entry in index["shards"]:
        try:
            with _open(src.path, entry["file"]) as f:
                column = pq.ParquetFile(f).read(columns=["text"]).column(0)
                texts += [strip_controls(t or "")[0] for t in column.to_pylist()]
        except OSError as e:
            raise DataError(f"data source '{source_name(src)}': cannot read shard {_where(src.path, entry['file'])}: "
                            f"{e.strerror or e}") from None
    return texts


class ShardSource:
    """A shards source opened at start-up: its config and index (no shard read yet)."""

    def __init__(self, src: SourceConfig):
        self.src, self.name, self.index = src, source_name(src), load_index(src)
        self.rows = sum(s["rows"] for s in self.index["shards"])
        self.languages = [src.language] if src.language else list(self.index.get("languages") or [])

    def texts(self, data_cfg) -> list[str]:
        """Cleaned transcripts for the CTC vocabulary and pre-flight's punctuation count. When index.json counted
        the characters under the same data.text settings (and language) and the vocabulary is of characters: one
        string holding each character once, punctuation and symbols as often as they occur, read from the index
        alone. Else every shard's text column, cleaned (time grows with the corpus)."""
        index, lang = self.index, self.src.language or (self.languages or [""])[0]
        if (data_cfg.vocab == "char" and isinstance(index.get("chars"), dict)
                and index.get("text_settings") == asdict(data_cfg.text) and index.get("languages") == [lang]):
            return ["".join(c * (n if unicodedata.category(c)[0] in "PS" else 1) for c, n in index["chars"].items())]
        return [clean_transcript(t, data_cfg.text, lang) for t in shard_texts(self.src, index)]

    def describe(self) -> str:
        return (f"{self.name}/train: streamed from {len(self.index['shards'])} shards in {self.src.path} "
                f"({self.rows} clips, {self.index.get('hours', 0):.2f} h); the filters count what they drop "
                f"into data_report.json as the clips stream")


# ---------------------------------------------------------------------------------------
# Streaming.


def _counts() -> dict:
    return {"total": 0, "kept": 0, "kept_s": 0.0, "dropped": {}, "examples": {}, "controls": 0}


def _fresh() -> dict:
    return {"epoch": 0, "shard": 0, "row": 0, "window": 0, "emitted": 0, "counts": _counts()}


def _identity(x):
    return x


class ShardStream(torch.utils.data.IterableDataset):
    """Collated training batches streamed from the shards of `source` for this rank (see the module docstring).

    Each rank runs max(1, data.num_workers) streams, one per loader worker, taking turns batch by batch (the
    loader's order); stream s of S = ranks x streams reads shards perm[s::S] of the epoch's shuffled order.
    `batches(device)` is the iterator the loop draws from; each batch's `sampler_state` holds every stream's
    position on this rank, which `load_state_dict` takes back (from the list of every rank's, a checkpoint's).
    """

    def __init__(self, source: ShardSource, cfg: Config, labeler, by_duration: bool, rank: int = 0, world: int = 1):
        self.source, self.cfg, self.data_cfg, self.labeler = source, cfg, cfg.data, labeler
        self.seed, self.by_duration, self.rank, self.world = cfg.run.seed, by_duration, rank, world
        self.shards = source.index["shards"]
        self.n_streams = max(1, cfg.data.num_workers)
        self.states, self.next = [_fresh() for _ in range(self.n_streams)], 0
        total = world * self.n_streams
        if len(self.shards) < total:
            raise DataError(f"data source '{source.name}': {len(self.shards)} shards for {world} ranks x "
                            f"{self.n_streams} loader workers: every one needs a shard of its own (write smaller "
                            f"shards with --shard-mb, or lower data.num_workers)")

    def shards_of(self, stream: int, epoch: int) -> list[int]:
        """The shards (indices into index.json) that global stream `stream` reads in `epoch`, in order."""
        order = list(range(len(self.shards)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order[stream :: self.world * self.n_streams]

    # -- resume

    def state_dict(self) -> dict:
        return {"kind": "shards", "epoch": self.states[self.next]["epoch"], "next": self.next,
                "streams": copy.deepcopy(self.states)}

    def load_state_dict(self, saved) -> None:
        """Take this rank's position from a checkpoint's (a list with every rank's state)."""
        if not isinstance(saved, list) or not all(isinstance(s, dict) and s.get("kind") == "shards" for s in saved):
            raise ConfigError("cannot resume: the checkpoint holds no shard stream position; start over with --fresh")
        streams = len(saved[0]["streams"]) if saved else 0
        if len(saved) != self.world or streams != self.n_streams:
            raise ConfigError(f"cannot resume: the checkpoint's shard streams were saved with {len(saved)} ranks x "
                              f"{streams} loader workers, this run has {self.world} x {self.n_streams}; resume with "
                              f"the same number of processes and data.num_workers, or start over with --fresh")
        mine = saved[self.rank]
        self.states, self.next = copy.deepcopy(mine["streams"]), int(mine["next"])

    # -- the stream of one loader worker

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k = (self.next + (info.id if info is not None else 0)) % self.n_streams
        try:
            yield from self._stream(k)
        except Exception as e:  # one line for the main process (a worker's exception would come wrapped)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            yield {"stream": k, "error": msg if isinstance(e, DataError) else f"{type(e).__name__}: {msg}"}

    def _stream(self, k: int):
        cfg, stream = self.data_cfg, self.rank * self.n_streams + k
        st = self.states[k]
        epoch, pos, row, window, emitted = st["epoch"], st["shard"], st["row"], st["window"], st["emitted"]
        counts, kept_in_epoch = copy.deepcopy(st["counts"]), 0
        whole_epoch = (pos, row, window) == (0, 0, 0)  # this generator reads the epoch from its start
        reader = _Reader(self.source)
        while True:
            mine = self.shards_of(stream, epoch)
            if pos >= len(mine):
                if kept_in_epoch == 0 and whole_epoch:
                    raise DataError(f"data source '{self.source.name}': no clip of shards "
                                    f"{', '.join(self.shards[i]['file'] for i in mine)} passes the filters")
                epoch, pos, row, window, emitted, kept_in_epoch, whole_epoch = epoch + 1, 0, 0, 0, 0, 0, True
                continue
            start = {"epoch": epoch, "shard": pos, "row": row, "window": window, "counts": copy.deepcopy(counts)}
            clips = []
            while len(clips) < cfg.shuffle_buffer and pos < len(mine):
                for r, values in reader.rows(mine[pos], row):
                    row = r + 1
                    clip = self._filter(values, counts if epoch == 0 else None)
                    if clip is not None:
                        clips.append(clip)
                        if len(clips) >= cfg.shuffle_buffer:
                            break
                if row >= self.shards[mine[pos]]["rows"]:
                    pos, row = pos + 1, 0
            kept_in_epoch += len(clips)
            batches = []
            if clips:
                key = hashlib.blake2b(f"{self.seed}/{stream}/{epoch}/{window}".encode(), digest_size=6).digest()
                batches = DurationBatchSampler([u.duration for u, _ in clips], cfg.batch_size, cfg.max_batch_s,
                                               seed=int.from_bytes(key, "big"), by_duration=self.by_duration).batches(0)
            for b in range(emitted, len(batches)):
                batch = collate([self._decode(*clips[i]) for i in batches[b]])
                batch["stream"] = k
                batch["sampler_state"] = dict(start, emitted=b + 1, seen=copy.deepcopy(counts))
                yield batch
            window, emitted = window + 1, 0

    def _filter(self, values: dict, counts: dict | None):
        """(Utterance, audio bytes) of a shard row that passes the run's filters, else None; counted in `counts`."""
        text, controls = strip_controls(values["text"] if isinstance(values["text"], str) else "")
        u = Utterance(id=str(values["id"]), text=text, language=self.source.src.language or values["language"] or "",
                      source=self.source.name, speaker=values["speaker"] or "", controls=controls)
        d = values["duration"]
        if not isinstance(d, float) or not d == d or not values["audio"]:
            drop = ("bad_row", {"detail": "no duration or no audio"})
        else:
            u.duration = d
            drop = check_utterance(u, self.data_cfg, self.labeler)
        if counts is not None:
            counts["total"] += 1
            counts["controls"] += bool(controls)
            if drop is None:
                counts["kept"] += 1
                counts["kept_s"] += u.duration
            else:
                counts["dropped"][drop[0]] = counts["dropped"].get(drop[0], 0) + 1
                examples = counts["examples"].setdefault(drop[0], [])
                if len(examples) < self.data_cfg.report_examples:
                    examples.append(dict({"id": u.id}, **drop[1]))
        return None if drop is not None else (u, values["audio"])

    def _decode(self, u: Utterance, data: bytes) -> dict:
        try:
            audio = load_audio(data, self.data_cfg.sample_rate)
        except Exception as e:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            return {"utt": u, "audio": None, "error": f"{u.id}: {error}", "state": None}
        return {"utt": u, "audio": audio, "error": None, "state": None}

    # -- the main process

    def batches(self, device: torch.device, worker_init_fn=None):
        """The iterator of collated batches the training loop draws from (a DataLoader over the streams)."""
        loader = torch.utils.data.DataLoader(self, batch_size=None, collate_fn=_identity,
                                             num_workers=self.data_cfg.num_workers, pin_memory=device.type == "cuda",
                                             worker_init_fn=worker_init_fn,  # no draw on the global RNG:
                                             generator=torch.Generator().manual_seed(self.seed))
        return self._combine(loader)

    def _combine(self, loader):
        for batch in loader:
            k = batch.pop("stream")
            if "error" in batch:
                raise DataError(batch["error"])
            if k != self.next:
                raise DataError(f"shard streams out of turn (stream {k}, expected {self.next})")
            self.states[k], self.next = batch["sampler_state"], (k + 1) % self.n_streams
            batch["sampler_state"] = dict(self.state_dict(), epoch=self.states[k]["epoch"])  # the batch's epoch
            yield batch

    def fallback(self) -> dict:
        """A one-clip batch of the first clip of this rank's first stream that decodes, read afresh (what a rank
        whose micro-batch lost every clip runs, with weight 0, to join the gradient all-reduce)."""
        fresh = copy.copy(self)
        fresh.states = [_fresh() for _ in range(self.n_streams)]
        for b in fresh._stream(0):
            if b["ids"]:
                n, m = int(b["audio_lengths"][0]), int(b["label_lengths"][0])
                return dict(b, ids=b["ids"][:1], texts=b["texts"][:1], languages=b["languages"][:1],
                            audio=b["audio"][:1, :n], audio_lengths=b["audio_lengths"][:1], labels=b["labels"][:1, :m],
                            label_lengths=b["label_lengths"][:1], dropped=[])
            if b["sampler_state"]["epoch"] > 0:
                raise DataError(f"data source '{self.source.name}': no training clip can be decoded")

    # -- the data report

    def update_report(self, report: SplitReport, saved: list) -> None:
        """Fill `report` (this source's data_report.json entry) with the first epoch's filter counts streamed so
        far on every rank (`saved`: every rank's state); decode failures stay as counted."""
        total = _counts()
        for rank_state in saved:
            for s in rank_state["streams"]:
                c = s.get("seen", s["counts"])
                for key in ("total", "kept", "kept_s", "controls"):
                    total[key] += c[key]
                for reason, n in c["dropped"].items():
                    total["dropped"][reason] = total["dropped"].get(reason, 0) + n
                for reason, ex in c["examples"].items():
                    total["examples"].setdefault(reason, []).extend(ex)
        failed = report.dropped.get("decode_failed", 0)
        report.total, report.controls = total["total"], total["controls"]
        report.kept = total["kept"] - len(report.failed)
        report.kept_hours = total["kept_s"] / 3600
        report.dropped = Counter(total["dropped"])
        if failed:
            report.dropped["decode_failed"] = failed
        for reason, ex in total["examples"].items():
            report.examples[reason] = ex[: self.data_cfg.report_examples]


class _Reader:
    """The rows of one shard at a time (the shard's bytes verified once when opened), by row group."""

    def __init__(self, source: ShardSource):
        self.source, self.shard, self.pf = source, None, None

    def rows(self, shard: int, start: int):
        """(row number, {column: value}) from row `start` of `shard` to its end."""
        if shard != self.shard:
            self.pf, self.shard = None, None
            self.pf = read_shard(self.source.src.path, self.source.index["shards"][shard], self.source.name)
            self.shard = shard
        first = 0
        for g in range(self.pf.metadata.num_row_groups):
            n = self.pf.metadata.row_group(g).num_rows
            if first + n > start:
                cols = self.pf.read_row_group(g, columns=list(COLUMNS)).to_pydict()
                for i in range(max(0, start - first), n):
                    yield first + i, {c: cols[c][i] for c in COLUMNS}
            first += n


# ---------------------------------------------------------------------------------------
# Pre-flight.


def preflight_shards(src: SourceConfig, cfg: Config) -> dict:
    """What pre-flight says of a shards source: its index (shards, clips, hours, durations) with every shard's
    size and Parquet footer (rows, columns) checked without reading the audio; with preflight.shard_sample,
    that many clips of each shard decoded (the shard's bytes then read and checked against its digest)."""
    import pyarrow.parquet as pq

    source = ShardSource(src)
    index, errors, decoded, failed = source.index, [], 0, []
    hist = [0] * len(HIST_EDGES)
    for entry in index["shards"]:
        hist = [a + b for a, b in zip(hist, entry.get("durations") or [0] * len(HIST_EDGES))]
        where = _where(src.path, entry["file"])
        try:
            if cfg.preflight.shard_sample:
                pf = read_shard(src.path, entry, source.name)
                t = pf.read_row_group(0, columns=["id", "audio"]).to_pydict()
                for i in range(min(cfg.preflight.shard_sample, len(t["id"]))):
                    decoded += 1
                    try:
                        load_audio(t["audio"][i], cfg.data.sample_rate)
                    except AudioError as e:
                        failed.append({"id": t["id"][i], "detail": str(e)})
                continue
            with _open(src.path, entry["file"]) as f:
                f.seek(0, 2)
                if f.tell() != entry["bytes"]:
                    raise DataError(f"data source '{source.name}': shard {where} has {f.tell()} bytes, "
                                    f"index.json says {entry['bytes']}")
                f.seek(0)
                check_footer(pq.ParquetFile(f), entry, where, source.name)
        except DataError as e:
            errors.append(str(e))
        except Exception as e:  # a broken footer, a read error
            errors.append(f"data source '{source.name}': shard {where}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")
    return {"source": source.name, "path": src.path, "shards": len(index["shards"]), "clips": source.rows,
            "languages": source.languages,
            "hours": index.get("hours"), "duration_edges_s": list(HIST_EDGES), "durations": hist,
            "decoded": decoded, "undecodable": failed[: cfg.preflight.examples], "undecodable_count": len(failed),
            "errors": errors}


# ---------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="experiment TOML file")
    parser.add_argument("--split", default="train", help="train, dev or test: every source's split of that role")
    parser.add_argument("--out", required=True, help="the shards folder to write (replaced if it holds shards)")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="MiB of encoded audio per shard")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from asr.config import load_config
    from asr.checkpoint import CheckpointError

    try:
        if args.shard_mb <= 0:
            raise ConfigError(f"--shard-mb: must be above 0, got {args.shard_mb}")
        cfg = load_config(args.exp, args.overrides)
        index = write_shards(cfg, args.split, Path(args.out), args.shard_mb)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, AudioError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(index['shards'])} shards, {index['rows']} clips, {index['hours']:.3f} h to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
