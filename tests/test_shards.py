"""Sharded corpora (issue 15, part 1): the fixture corpus written as Parquet shards with index.json, a tiny CTC
model trained from them (loss falls, filters counted while streaming), exact resume with two loader workers
(from a mid-run checkpoint, and after a SIGKILL), disjoint shards per rank and worker, one-line errors for a
bad index or shard, an atomic writer, pre-flight from index.json alone."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asr import checkpoint as ckpt
from asr.config import ConfigError, SourceConfig, validate
from asr.data import DataError
from asr.shards import INDEX, ShardSource, ShardStream, write_shards
from asr.train import train

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import FIXTURE, env, final_params, read_json, scalars, start, tiny_ctc_config, wait_for, write_exp

SHARD_MB = 0.05  # 4 shards of 8 fixture clips


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tr"
    index = write_shards(tiny_ctc_config(out.parent / "unused"), "train", out, shard_mb=SHARD_MB)
    assert [s["rows"] for s in index["shards"]] == [8, 8, 8, 8] and index["rows"] == 32
    return out


def shards_config(out: Path, shards: Path, **train):
    """tiny_ctc_config trained from `shards`, evaluated on the fixture's dev clips."""
    cfg = tiny_ctc_config(out, **train)
    cfg.data.sources = [
        SourceConfig(kind="shards", path=str(shards), language="tr", train="train", dev="", test=""),
        SourceConfig(name="dev", kind="common_voice", path=str(FIXTURE), language="tr", train="", dev="dev", test=""),
    ]
    cfg.data.shuffle_buffer = 12
    validate(cfg)
    return cfg


def test_index_describes_the_shards(shards):
    index = read_json(shards / INDEX)
    ids = set()
    import pyarrow.parquet as pq

    for s in index["shards"]:
        t = pq.read_table(shards / s["file"])
        assert t.num_rows == s["rows"] and sum(s["durations"]) == s["rows"]
        assert s["hours"] == pytest.approx(sum(t.column("duration").to_pylist()) / 3600, abs=1e-6)
        ids |= set(t.column("id").to_pylist())
        row = t.slice(0, 1).to_pylist()[0]  # the clip's file, byte for byte
        assert row["audio"] == (FIXTURE / "clips" / (row["id"].split("/", 1)[1] + ".mp3")).read_bytes()
    assert len(ids) == 32 and index["languages"] == ["tr"]


def test_training_from_shards_loss_falls_and_filters_are_counted(shards, tmp_path):
    """16 steps from the shards: the loss falls; a duration limit drops clips while streaming, and
    data_report.json counts them as the folder source's filters would."""
    cfg = shards_config(tmp_path / "run", shards, max_steps=16, log_every=4, save_every=8)
    cfg.data.max_duration_s = 1.85
    cfg.eval.at_start = False
    train(cfg, fresh=True)
    loss = scalars(tmp_path / "run")["train/loss"]
    assert loss[-1][1] < 0.8 * loss[0][1], f"train loss did not fall: {loss}"
    # The folder source's own filter counts for the same settings.
    from asr.data import SplitReport, filter_utterances, read_source_split

    utts, bad = read_source_split(SourceConfig(path=str(FIXTURE), language="tr"), "train")
    expected = SplitReport()
    filter_utterances(utts, bad, cfg.data, None, expected)
    report = read_json(tmp_path / "run" / "data_report.json")["tr/train"]
    assert expected.dropped["too_long"] > 0
    assert report["total"] == 32 and report["dropped"] == {"too_long": expected.dropped["too_long"]}
    assert report["kept"] == expected.kept


def resume_config(out: Path, shards: Path):
    """Dropout, SpecAugment, two loader workers taking turns, a shuffle buffer smaller than a stream's epoch:
    10 steps of batches of 4 cross an epoch (16 clips a stream) and several buffers."""
    cfg = shards_config(out, shards, max_steps=10, schedule="linear", warmup_steps=2, save_every=5, keep_last=5,
                        log_every=4, eval_every=0)
    m = cfg.model
    m.hidden_dropout = m.attention_dropout = m.activation_dropout = m.feat_proj_dropout = m.final_dropout = 0.1
    m.mask_time_prob, m.mask_time_length = 0.3, 2
    cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer = 4, 2, 6
    cfg.eval.at_start = False
    return cfg


def test_resume_from_mid_run_checkpoint_equals_uninterrupted(shards, tmp_path):
    """A run killed after its step-5 checkpoint (taken while the workers had read ahead, with the second worker's
    turn next): the same command resumes the streams exactly and ends with the uninterrupted run's weights."""
    train(resume_config(tmp_path / "a", shards), fresh=True)
    saved = torch.load(tmp_path / "a" / "checkpoints" / "step-000005" / "trainer.pt", weights_only=False)["sampler"]
    assert saved[0]["next"] == 1 and saved[0]["streams"][0]["window"] + saved[0]["streams"][0]["emitted"] > 0
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000005", b / "checkpoints" / "step-000005")
    shutil.copytree(tmp_path / "a" / "vocab", b / "vocab")
    train(resume_config(b, shards))
    assert "resumed from" in (b / "train.log").read_text(encoding="utf-8")
    a, r = (final_params(p / "checkpoints" / "step-000010") for p in (tmp_path / "a", b))
    different = [k for k in a if not torch.equal(a[k], r[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ after the resume"
    # Another number of streams cannot take the checkpoint's positions: one line.
    cfg = resume_config(tmp_path / "c", shards)
    cfg.data.num_workers = 1
    stream = ShardStream(ShardSource(cfg.data.sources[0]), cfg, None, True)
    with pytest.raises(ConfigError, match=r"saved with 1 ranks x 2 loader workers, this run has 1 x 1"):
        stream.load_state_dict(saved)


def stream_ids(shards: Path, rank: int, world: int, workers: int, n_batches: int) -> list[list[str]]:
    cfg = tiny_ctc_config(Path("/nonexistent"))
    cfg.data.num_workers, cfg.data.batch_size, cfg.data.shuffle_buffer = workers, 2, 4
    source = ShardSource(SourceConfig(kind="shards", path=str(shards), language="tr", train="train", dev="", test=""))
    it = ShardStream(source, cfg, None, True, rank, world).batches(torch.device("cpu"))
    return [next(it)["ids"] for _ in range(n_batches)]


def test_shards_are_disjoint_per_rank_and_worker(shards):
    """2 ranks x 2 workers: each of the 4 streams reads one shard per epoch, another in each epoch's shuffled
    order; within a rank the workers take turns; together the ranks see every clip once an epoch."""
    import pyarrow.parquet as pq

    index = read_json(shards / INDEX)
    shard_of = {i: n for n, s in enumerate(index["shards"])
                for i in pq.read_table(shards / s["file"]).column("id").to_pylist()}
    cfg = tiny_ctc_config(Path("/nonexistent"))
    cfg.data.num_workers = 2
    source = ShardSource(SourceConfig(kind="shards", path=str(shards), language="tr", train="train", dev="", test=""))
    streams = [ShardStream(source, cfg, None, True, rank, 2) for rank in (0, 1)]
    for epoch in (0, 1):
        parts = [streams[0].shards_of(s, epoch) for s in range(4)]
        assert sorted(sum(parts, [])) == [0, 1, 2, 3]
    assert [streams[0].shards_of(s, 0) for s in range(4)] != [streams[0].shards_of(s, 1) for s in range(4)]
    seen = []
    for rank in (0, 1):
        batches = stream_ids(shards, rank, 2, 2, 8)  # 8 clips per stream and epoch: 4 batches each, epoch 0
        for k in (0, 1):
            ids = [i for b in batches[k::2] for i in b]
            assert {shard_of[i] for i in ids} == set(streams[0].shards_of(rank * 2 + k, 0)) and len(set(ids)) == 8
        seen += [i for b in batches for i in b]
    assert sorted(seen) == sorted(shard_of)  # every clip once, no clip on two ranks


def damage(shards: Path, tmp: Path, how: str) -> Path:
    d = tmp / "damaged"
    shutil.copytree(shards, d)
    index = json.loads((d / INDEX).read_text())
    first = d / index["shards"][0]["file"]
    if how == "missing_index":
        (d / INDEX).unlink()
    elif how == "bad_json":
        (d / INDEX).write_text("{not json")
    elif how == "hash":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0xFF
        first.write_bytes(bytes(data))
    elif how == "rows":
        index["shards"][0]["rows"] = 9
        (d / INDEX).write_text(json.dumps(index))
    elif how == "missing_shard":
        first.unlink()
    return d


@pytest.mark.parametrize("how, message", [
    ("missing_index", r"index\.json not found \(write the shards with python -m asr\.shards\)"),
    ("bad_json", r"index\.json is not valid JSON"),
    ("hash", r"shard .*shard-000000\.parquet does not match its blake2b digest in index\.json"),
    ("rows", r"shard .*shard-000000\.parquet has 8 rows, index\.json says 9"),
    ("missing_shard", r"cannot read shard .*shard-000000\.parquet: No such file"),
])
def test_index_and_shard_errors_are_one_line(shards, tmp_path, how, message):
    d = damage(shards, tmp_path, how)
    src = SourceConfig(kind="shards", path=str(d), language="tr", train="train", dev="", test="")
    cfg = tiny_ctc_config(tmp_path / "run")
    cfg.data.batch_size, cfg.data.num_workers = 32, 0  # one stream reads every shard
    with pytest.raises(DataError, match=message) as e:
        next(ShardStream(ShardSource(src), cfg, None, True).batches(torch.device("cpu")))
    assert "\n" not in str(e.value)


def test_a_damaged_shard_stops_a_run_with_one_line(shards, tmp_path, capsys):
    import run

    cfg = shards_config(tmp_path / "run", damage(shards, tmp_path, "hash"), max_steps=4)
    cfg.data.num_workers = 1
    cfg.eval.at_start = False
    assert run.main(["--exp", str(write_exp(cfg, tmp_path / "exp.toml"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its blake2b digest" in err[0], err


def test_writing_is_atomic(shards, tmp_path, monkeypatch):
    """A full disk while writing the third shard: the folder's old shards and index stay as they were, no
    temporary folder is left, and the error is one line."""
    import asr.shards as shards_mod

    out = tmp_path / "out"
    shutil.copytree(shards, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = shards_mod._write_shard, []

    def failing(rows, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(rows, path)

    monkeypatch.setattr(shards_mod, "_write_shard", failing)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write .*out: No space left on device"):
        write_shards(tiny_ctc_config(tmp_path / "unused"), "train", out, shard_mb=SHARD_MB)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    # A folder that is not a shards folder is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a shards folder"):
        write_shards(tiny_ctc_config(tmp_path / "unused"), "train", tmp_path / "mine")


def test_preflight_reads_the_index_not_the_audio(shards, tmp_path, monkeypatch):
    """--check on a shards source: clips, hours and durations from index.json and the shards' footers; no shard
    is read whole and no clip decoded unless preflight.shard_sample asks; a bad index is an error line."""
    import asr.shards as shards_mod
    from asr.preflight import format_preflight, preflight

    def no_audio(*a, **k):
        raise AssertionError("audio read")

    cfg = shards_config(tmp_path / "run", shards)
    monkeypatch.setattr(shards_mod, "read_shard", no_audio)
    monkeypatch.setattr(shards_mod, "load_audio", no_audio)
    result = preflight(cfg)
    s = result["shards"]["tr/train"]
    assert (s["shards"], s["clips"], s["decoded"], sum(s["durations"])) == (4, 32, 0, 32) and not result["errors"]
    assert "tr/train: 4 shards, 32 clips" in format_preflight(result)
    monkeypatch.undo()
    cfg.preflight.shard_sample = 2
    assert preflight(cfg)["shards"]["tr/train"]["decoded"] == 8
    cfg.data.sources[0].path = str(damage(shards, tmp_path, "rows"))
    assert any("has 8 rows, index.json says 9" in e for e in preflight(cfg)["errors"])


def test_an_fsspec_url_streams_the_same_batches(shards):
    """path = "file://...": index and shards read through fsspec (as s3:// or hf:// would be), the same batches."""
    local, url = (ShardSource(SourceConfig(kind="shards", path=p, language="tr", train="train", dev="", test=""))
                  for p in (str(shards), "file://" + str(shards)))
    cfg = tiny_ctc_config(Path("/nonexistent"))
    cfg.data.num_workers, cfg.data.batch_size = 0, 4
    a, b = (ShardStream(s, cfg, None, True).batches(torch.device("cpu")) for s in (local, url))
    for _ in range(3):
        x, y = next(a), next(b)
        assert x["ids"] == y["ids"] and torch.equal(x["audio"], y["audio"])


def test_fallback_clip_of_a_stream(shards):
    """Under DDP a rank whose micro-batch lost every clip runs a one-clip batch: a stream gives its first clip."""
    cfg = tiny_ctc_config(Path("/nonexistent"))
    cfg.data.num_workers, cfg.data.batch_size = 0, 4
    stream = ShardStream(ShardSource(SourceConfig(kind="shards", path=str(shards), language="tr", train="train",
                                                  dev="", test="")), cfg, None, True)
    b = stream.fallback()
    assert len(b["ids"]) == 1 and b["audio"].shape == (1, int(b["audio_lengths"][0])) and b["audio"].abs().sum() > 0


def test_a_streamed_clip_that_fails_to_decode_is_counted_and_can_stop_the_run(tmp_path, monkeypatch, capsys):
    """A shard row whose bytes do not decode: data_report.json counts it under decode_failed; with
    data.max_failed_fraction = 0 the run stops at that batch with one line (exit status 1)."""
    import asr.shards as shards_mod
    import run

    real = shards_mod.clip_bytes
    bad_id = []

    def one_bad(u):
        if not bad_id:
            bad_id.append(u.id)
            return b"not audio at all" * 64
        return real(u)

    monkeypatch.setattr(shards_mod, "clip_bytes", one_bad)
    write_shards(tiny_ctc_config(tmp_path / "unused"), "train", tmp_path / "shards", shard_mb=SHARD_MB)
    cfg = shards_config(tmp_path / "run", tmp_path / "shards", max_steps=8)
    cfg.data.batch_size, cfg.data.shuffle_buffer = 8, 32  # the whole epoch in 4 batches
    cfg.eval.at_start = False
    cfg.eval.max_utterances = 2
    assert run.main(["--exp", str(write_exp(cfg, tmp_path / "a.toml")), "--set", "train.max_steps=4"]) == 0
    report = read_json(tmp_path / "run" / "data_report.json")["tr/train"]
    assert report["decode_failed"] == 1 and report["examples"]["decode_failed"][0]["id"] == bad_id[0]
    assert report["kept"] == 31 and report["total"] == 32
    capsys.readouterr()
    assert run.main(["--exp", str(write_exp(cfg, tmp_path / "b.toml")), "--fresh", "--set", "train.max_steps=4",
                     "--set", "data.max_failed_fraction=0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 32 training clips failed to decode in epoch 1" in err[0] and bad_id[0] in err[0]


def test_shards_of_which_no_clip_passes_the_filters_are_one_line(shards):
    cfg = tiny_ctc_config(Path("/nonexistent"))
    cfg.data.num_workers, cfg.data.max_duration_s = 0, 0.5
    stream = ShardStream(ShardSource(SourceConfig(kind="shards", path=str(shards), language="tr", train="train",
                                                  dev="", test="")), cfg, None, True)
    with pytest.raises(DataError, match=r"no clip of shards shard-00000\d\.parquet, .* passes the filters"):
        next(stream.batches(torch.device("cpu")))


def test_vocabulary_from_the_index_equals_the_text_column_one(shards):
    """A fresh CTC run's vocabulary (and pre-flight's punctuation count) from the characters index.json counted
    under the same data.text settings, without reading the shards; the same as from every shard's text column."""
    import asr.shards as shards_mod
    from asr.preflight import _punctuation
    from asr.text import CharVocab

    cfg = tiny_ctc_config(Path("/nonexistent"))
    cfg.data.text.chars_to_ignore = ""  # punctuation kept: counted
    write_shards(cfg, "train", shards.parent / "punct", shard_mb=SHARD_MB)
    source = ShardSource(SourceConfig(kind="shards", path=str(shards.parent / "punct"), language="tr", train="train",
                                      dev="", test=""))
    from_column = source.texts(tiny_ctc_config(Path("/x")).data)  # other text settings: the text column, cleaned
    assert len(from_column) == 32
    real, shards_mod.shard_texts = shards_mod.shard_texts, None  # the index alone
    try:
        from_index = source.texts(cfg.data)
    finally:
        shards_mod.shard_texts = real
    column = [shards_mod.clean_transcript(t, cfg.data.text, "tr") for t in real(source.src, source.index)]
    assert CharVocab.build(from_index).tokens == CharVocab.build(column).tokens
    punct = _punctuation(from_index, cfg)
    assert punct["chars"] and punct == _punctuation(column, cfg)


def test_command_line(tmp_path, capsys):
    """python -m asr.shards: writes the shards (exit 0); settings errors are one line, exit status 2."""
    from asr.shards import main

    exp = write_exp(tiny_ctc_config(tmp_path / "run"), tmp_path / "exp.toml")
    assert main(["--exp", str(exp), "--split", "train", "--out", str(tmp_path / "s"), "--shard-mb", "0.1"]) == 0
    assert "wrote 3 shards, 32 clips" in capsys.readouterr().out
    assert read_json(tmp_path / "s" / INDEX)["rows"] == 32
    for args, message in ((["--split", "validation"], "--split: 'validation' is not train, dev or test"),
                          (["--split", "test", "--set", "data.sources.0.test="],
                           "--split test: no data source has a test split"),
                          (["--shard-mb", "0"], "--shard-mb: must be above 0")):
        assert main(["--exp", str(exp), "--out", str(tmp_path / "t"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {message}"] or (len(err) == 1 and message in err[0]), err


def test_augmentation_with_a_shards_source_is_refused(shards, tmp_path):
    """[augment] waveform augmentation is applied by the listed sources' dataset only: with shards it would be
    silently off, so the run refuses it with one line."""
    cfg = shards_config(tmp_path / "run", shards, max_steps=1)
    cfg.augment.gain_db = [-6.0, 6.0]
    cfg.preflight.enabled = False
    with pytest.raises(ConfigError, match=r"a shards source takes no \[augment\] waveform augmentation"):
        train(cfg, fresh=True)


def test_sigkill_mid_training_then_resume_equals_uninterrupted(shards, tmp_path):
    """run.py killed (SIGKILL) after step 5 of 10 while its two workers stream: the same command resumes from
    the newest checkpoint and ends with the weights of an uninterrupted run."""
    def config(out):
        cfg = resume_config(out, shards)
        cfg.train.save_every, cfg.train.log_every = 2, 1
        return cfg

    train(config(tmp_path / "ref"), fresh=True)
    out = tmp_path / "run"
    exp = write_exp(config(out), tmp_path / "exp.toml")
    log = out / "train.log"
    proc = start([sys.executable, "run.py", "--exp", str(exp)], tmp_path / "logs1")
    wait_for(lambda: log.is_file() and re.search(r"^\S+ \S+ step 5/", log.read_text(errors="replace"), re.M),
             proc, what="step 5")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    steps = [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")]
    assert steps and steps[-1] < 10, steps
    again = subprocess.run([sys.executable, "run.py", "--exp", str(exp)], cwd=Path(__file__).parents[1],
                           capture_output=True, text=True, timeout=180, env=env())
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{steps[-1]:06d}'}" in log.read_text()
    a, b = (final_params(p / "checkpoints" / "step-000010") for p in (tmp_path / "ref", out))
    assert not [k for k in a if not torch.equal(a[k], b[k])]
