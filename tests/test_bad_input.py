"""Bad input, end to end (issue 5): a deliberately broken Common Voice folder built in the test trains
through run.py with every bad item dropped, reported by reason in data_report.json and counted on stdout;
a valid but unusual clip (stereo 44.1 kHz wav) is kept and used; start-up failures (missing data folder,
unknown model, a language Whisper does not know) stop with one line on stderr before any training; a clip
that breaks on disk in the middle of training is dropped and logged, and the run goes on."""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.config import SourceConfig

from helpers import one_thread  # noqa: F401 (an autouse fixture: in-process runs on one thread)
from helpers import (FIXTURE, REPO, needs_whisper_base, read_json, tiny_ctc_config, tiny_whisper_config, write_exp)


RUN_TIMEOUT = 180  # seconds for one run.py subprocess


def fixture_rows(split: str) -> list[dict]:
    with open(FIXTURE / f"{split}.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def run_cli(exp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "run.py", "--exp", str(exp), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


# ---------------------------------------------------------------------------------------
# The broken corpus.

N_GOOD = 10  # good fixture clips in the broken corpus' train.tsv
LONG_TEXT = "merhaba dünya bugün hava çok güzel " * 60  # far more than 448 Whisper tokens


def truncated_mp3(src: Path) -> bytes:
    """The first half of a fixture mp3, cut inside a frame. (The fixture clips are header-less constant
    bit-rate mp3s of 96-byte frames: a cut exactly on a frame boundary would leave a valid, shorter mp3
    that no decoder can tell from a complete one; an odd length never falls on one.)"""
    data = src.read_bytes()
    return data[: (len(data) // 2) | 1]


def build_broken_corpus(root: Path) -> dict[str, str | None]:
    """A Common Voice release folder: N_GOOD good clips and one of each kind of bad item in train.tsv,
    4 good clips in dev.tsv. Returns {clip stem or row tag: expected drop reason, None when kept}."""
    clips = root / "clips"
    clips.mkdir(parents=True)
    train_rows, dev_rows = fixture_rows("train"), fixture_rows("dev")
    expected: dict[str, str | None] = {}
    lines = ["client_id\tpath\tsentence"]

    def row(client: str, path: str, sentence: str) -> None:
        lines.append(f"{client}\t{path}\t{sentence}")

    for r in train_rows[:N_GOOD]:
        shutil.copy(FIXTURE / "clips" / r["path"], clips / r["path"])
        row(r["client_id"], r["path"], r["sentence"])
        expected[Path(r["path"]).stem] = None
    spare = train_rows[N_GOOD:]  # clips and sentences for the rest

    # Valid: a stereo 44.1 kHz wav (another channel layout and rate than the corpus' 48 kHz mono mp3s).
    audio, sr = sf.read(FIXTURE / "clips" / spare[0]["path"], dtype="float32")
    audio44 = torch.from_numpy(audio)
    from asr.audio import resample

    audio44 = resample(audio44, sr, 44100).numpy()
    sf.write(clips / "stereo44k.wav", np.stack([audio44, 0.5 * audio44], axis=1), 44100)
    row("s1", "stereo44k.wav", spare[0]["sentence"])
    expected["stereo44k"] = None

    (clips / "truncated.mp3").write_bytes(truncated_mp3(FIXTURE / "clips" / spare[1]["path"]))
    row("b1", "truncated.mp3", spare[1]["sentence"])
    expected["truncated"] = "undecodable"

    (clips / "garbage.mp3").write_bytes(random.Random(0).randbytes(6000))
    row("b2", "garbage.mp3", "bozuk dosya")
    expected["garbage"] = "undecodable"

    row("b3", "missing.mp3", "kayıp dosya")
    expected["missing"] = "missing_file"

    (clips / "zero.mp3").write_bytes(b"")
    row("b4", "zero.mp3", "boş dosya")
    expected["zero"] = "undecodable"

    shutil.copy(FIXTURE / "clips" / spare[2]["path"], clips / "notext.mp3")
    row("b5", "notext.mp3", "")
    expected["notext"] = "empty_text"

    # 45 s: fixture audio end to end, written as a 16 kHz wav.
    pieces, total = [], 0
    for r in train_rows:
        a, sr = sf.read(FIXTURE / "clips" / r["path"], dtype="float32")
        pieces.append(a)
        total += len(a) / sr
        if total >= 45:
            break
    long_audio = resample(torch.from_numpy(np.concatenate(pieces)), sr, 16000)[: 45 * 16000].numpy()
    sf.write(clips / "long45.wav", long_audio, 16000)
    row("b6", "long45.wav", "çok uzun bir kayıt")
    expected["long45"] = "too_long"

    shutil.copy(FIXTURE / "clips" / spare[3]["path"], clips / "longtext.mp3")
    row("b7", "longtext.mp3", LONG_TEXT)
    expected["longtext"] = "labels_too_long"  # CTC: ctc_infeasible (more labels than output frames)

    shutil.copy(FIXTURE / "clips" / spare[4]["path"], clips / "straytab.mp3")
    row("b8", "straytab.mp3", "bir\tiki")  # one field too many
    expected["line:straytab"] = "bad_row"

    row("b9", "../../x.mp3", "kaçak yol")
    expected["path:../../x.mp3"] = "bad_path"

    data = ("\n".join(lines) + "\n").encode("utf-8")
    shutil.copy(FIXTURE / "clips" / spare[5]["path"], clips / "badutf8.mp3")
    data += b"b10\tbadutf8.mp3\tbozuk \xff\xfe metin\n"  # not UTF-8
    expected["line:badutf8"] = "bad_row"
    (root / "train.tsv").write_bytes(data)

    dev = ["client_id\tpath\tsentence"]
    for r in dev_rows[:4]:
        shutil.copy(FIXTURE / "clips" / r["path"], clips / r["path"])
        dev.append(f"{r['client_id']}\t{r['path']}\t{r['sentence']}")
    (root / "dev.tsv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    return expected


def line_of(root: Path, needle: bytes) -> int:
    for lineno, raw in enumerate((root / "train.tsv").read_bytes().split(b"\n"), start=1):
        if needle in raw:
            return lineno
    raise AssertionError(needle)


@pytest.fixture(scope="module")
def broken_corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("broken") / "cv"
    expected = build_broken_corpus(root)
    return root, expected


def broken_config(out: Path, corpus: Path, family: str):
    if family == "whisper":
        cfg = tiny_whisper_config(out, max_steps=3, log_every=1)
        cfg.eval.max_utterances = 0
    else:
        cfg = tiny_ctc_config(out, max_steps=3, log_every=1)
    cfg.data.sources = [SourceConfig(kind="common_voice", path=str(corpus), language="tr", train="train",
                                     dev="dev")]
    cfg.data.batch_size = 4
    cfg.eval.split = "train"  # the kept training clips are evaluated: each of them decodes end to end
    cfg.eval.batch_size = 8
    cfg.eval.at_start = False
    return cfg


def check_broken_run(proc, out: Path, corpus: Path, expected: dict, family: str, check_truncated: bool) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = read_json(out / "results.json")
    assert results["steps"] == 3

    report = read_json(out / "data_report.json")["tr/train"]
    if family == "ctc":
        expected = dict(expected, longtext="ctc_infeasible")
    if not check_truncated:
        expected = {k: v for k, v in expected.items() if k != "truncated"}
    want = {}
    for reason in expected.values():
        if reason:
            want[reason] = want.get(reason, 0) + 1
    dropped = dict(report["dropped"])
    if not check_truncated:  # see test_truncated_mp3_is_dropped
        dropped["undecodable"] -= int(any(e["id"] == "tr/truncated" for e in report["examples"]["undecodable"]))
    assert dropped == want
    n_rows = len(expected) + (0 if check_truncated else 1)
    assert report["total"] == n_rows
    assert report["kept"] + sum(report["dropped"].values()) == report["total"]

    # Each dropped item is named in the examples under its own reason.
    ex = report["examples"]
    by_reason: dict[str, set] = {}
    for reason, rows in ex.items():
        for e in rows:
            if "id" in e:
                by_reason.setdefault(reason, set()).add(e["id"].split("/", 1)[1])
    for key, reason in expected.items():
        if reason and not key.startswith(("line:", "path:")):
            assert key in by_reason.get(reason, set()), (key, reason, ex)
        if reason is None:
            assert all(key not in ids for ids in by_reason.values()), (key, ex)
    assert {e["line"] for e in ex["bad_row"]} == {line_of(corpus, b"straytab.mp3"), line_of(corpus, b"badutf8.mp3")}
    assert all(e["file"] == str(corpus / "train.tsv") for e in ex["bad_row"])
    assert [e["path"] for e in ex["bad_path"]] == ["../../x.mp3"]
    if family == "whisper":
        (too_long,) = ex["labels_too_long"]
        assert too_long["tokens"] > 448
    assert ex["too_long"][0]["duration"] == pytest.approx(45.0, abs=0.01)
    assert all("\n" not in e.get("detail", "") for rows in ex.values() for e in rows)

    # The counts are printed.
    m = re.search(r"^tr/train: kept (\d+)/(\d+) .*$", proc.stdout, re.M)
    assert m, proc.stdout[-2000:]
    assert (int(m.group(1)), int(m.group(2))) == (report["kept"], report["total"])
    for reason, n in report["dropped"].items():
        assert f"{reason} {n}" in m.group(0)

    # Kept clips, the stereo 44.1 kHz wav among them, trained without a decoding failure and were evaluated.
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "dropped tr/" not in log
    with open(out / "eval" / "step-000003.tsv", encoding="utf-8", newline="") as f:
        evaluated = {r["id"].split("/", 1)[1] for r in csv.DictReader(f, delimiter="\t")}
    kept = {k for k, v in expected.items() if v is None}
    assert kept <= evaluated
    assert read_json(out / "eval" / "step-000003.json")["failed"] == 0


def test_broken_corpus_trains_and_reports_each_bad_item_ctc(broken_corpus, tmp_path):
    corpus, expected = broken_corpus
    out = tmp_path / "run"
    proc = run_cli(write_exp(broken_config(out, corpus, "ctc"), tmp_path / "exp.toml"))
    check_broken_run(proc, out, corpus, expected, "ctc", check_truncated=False)


@needs_whisper_base
def test_broken_corpus_trains_and_reports_each_bad_item_whisper(broken_corpus, tmp_path):
    """With a tiny scratch Whisper on the shared whisper-base tokenizer: the over-long transcript is
    dropped as labels_too_long (more than 448 decoder tokens)."""
    corpus, expected = broken_corpus
    out = tmp_path / "run"
    proc = run_cli(write_exp(broken_config(out, corpus, "whisper"), tmp_path / "exp.toml"))
    check_broken_run(proc, out, corpus, expected, "whisper", check_truncated=False)


def test_stereo_44k_wav_is_decoded_to_mono_16k(broken_corpus):
    from asr.audio import load_audio

    corpus, _ = broken_corpus
    path = corpus / "clips" / "stereo44k.wav"
    info = sf.info(str(path))
    assert (info.channels, info.samplerate) == (2, 44100)
    audio = load_audio(path)
    assert audio.dim() == 1 and abs(audio.shape[0] - round(info.frames * 16000 / 44100)) <= 1
    stereo, _ = sf.read(path, dtype="float32")
    mono = torch.from_numpy(stereo.mean(axis=1))
    from asr.audio import resample

    assert torch.allclose(audio, resample(mono, 44100, 16000), atol=1e-5)


def test_truncated_mp3_is_dropped(broken_corpus, tmp_path):
    """An mp3 cut short (an interrupted download or copy) decodes to a fraction of its transcript's audio:
    it must be dropped as undecodable, not trained against the whole sentence."""
    from asr.audio import AudioError, audio_info, load_audio
    from asr.config import DataConfig
    from asr.data import SplitReport, filter_utterances, read_source_split

    corpus, _ = broken_corpus
    path = corpus / "clips" / "truncated.mp3"
    for reader in (audio_info, load_audio):
        with pytest.raises(AudioError, match="truncated"):
            reader(path)
    with pytest.raises(AudioError, match="truncated"):
        load_audio(path.read_bytes())
    utts, bad = read_source_split(SourceConfig(path=str(corpus), language="tr"), "train")
    report = SplitReport()
    filter_utterances([u for u in utts if u.id == "tr/truncated"], [], DataConfig(), None, report)
    assert dict(report.dropped) == {"undecodable": 1}
    # The complete fixture clips are not flagged.
    for r in fixture_rows("train") + fixture_rows("dev"):
        audio_info(FIXTURE / "clips" / r["path"])


# ---------------------------------------------------------------------------------------
# Start-up failures: one line on stderr, exit status 1, before any training.


def assert_startup_failure(proc, out: Path, *words: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr.strip()
    assert err.count("\n") == 0, f"more than one line on stderr:\n{err[-3000:]}"
    assert err.startswith("error: ") and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not (out / "checkpoints").exists()
    assert not re.search(r"^step \d+/", proc.stdout, re.M)
    return err


def test_missing_data_folder_fails_at_start(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out)
    missing = tmp_path / "no-such-corpus"
    cfg.data.sources[0].path = str(missing)
    proc = run_cli(write_exp(cfg, tmp_path / "exp.toml"))
    assert_startup_failure(proc, out, str(missing), "not found")


def test_missing_local_model_folder_fails_at_start(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out)
    missing = tmp_path / "models" / "no-such-model"
    cfg.model.name, cfg.model.init = str(missing), "pretrained"
    proc = run_cli(write_exp(cfg, tmp_path / "exp.toml"))
    err = assert_startup_failure(proc, out, str(missing))
    assert "not found" in err and "Repo id" not in err


def test_unknown_model_id_fails_at_start_offline(tmp_path):
    """A hub id that is not in the cache, with no network (HF_HUB_OFFLINE): one line naming it."""
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out)
    cfg.model.name, cfg.model.init = "nobody-zz/no-such-asr-model", "pretrained"
    proc = run_cli(write_exp(cfg, tmp_path / "exp.toml"))
    assert_startup_failure(proc, out, "model.name", "nobody-zz/no-such-asr-model")


@needs_whisper_base
def test_language_whisper_does_not_know_fails_at_start(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_whisper_config(out)
    cfg.data.sources[0].language = "xx"
    proc = run_cli(write_exp(cfg, tmp_path / "exp.toml"))
    assert_startup_failure(proc, out, "'xx'", "language_map")


# ---------------------------------------------------------------------------------------
# A clip that breaks on disk during training.


def test_clip_broken_on_disk_mid_training_is_dropped_and_logged(tmp_path, monkeypatch):
    """The clip decodes at data preparation; during step 1 it is overwritten with garbage (from inside the
    loss function, so the timing is exact). Every later load of it fails: it is dropped with a log line,
    the run completes, and the final evaluation (on the training clips) reports it as failed."""
    from asr import losses
    from asr.train import train

    corpus = tmp_path / "cv"
    shutil.copytree(FIXTURE, corpus)
    victim = corpus / "clips" / fixture_rows("train")[5]["path"]
    victim_id = "tr/" + victim.stem
    out = tmp_path / "run"
    cfg = tiny_ctc_config(out, max_steps=8)  # 32 clips, batches of 8: two epochs, every clip loaded again
    cfg.data.sources[0].path = str(corpus)
    cfg.eval.split = "train"
    cfg.eval.at_start = False
    cfg.eval.batch_size = 32
    state = {"calls": 0, "broken_at": None}

    def ctc_breaking_a_file(outputs, batch):
        if torch.is_grad_enabled():  # training steps only, not evaluation
            state["calls"] += 1
            if state["calls"] == 1:
                victim.write_bytes(random.Random(1).randbytes(victim.stat().st_size))
                state["broken_at"] = 1
        return losses.ctc(outputs, batch)

    monkeypatch.setitem(losses.LOSSES["ctc"], "ctc_breaking_a_file", ctc_breaking_a_file)
    cfg.train.loss = "ctc_breaking_a_file"
    results = train(cfg, fresh=True)

    assert state["broken_at"] == 1
    assert results["steps"] == 8
    assert all(np.isfinite(loss) for _, loss in results["train_loss"])
    log = (out / "train.log").read_text(encoding="utf-8")
    drops = [line for line in log.splitlines() if f"dropped {victim_id}: " in line]
    assert drops, log[-3000:]
    assert all(str(victim) in line and "cannot" in line for line in drops)
    assert set(re.findall(r"dropped (\S+): ", log)) == {victim_id}  # no other clip
    assert results["eval"]["tr"]["failed"] == 1 and results["eval"]["tr"]["n"] == 31
