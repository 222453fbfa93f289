"""asr.data: sources (Common Voice, manifests, Hugging Face), filters and the data report, the dataset,
collation, and the duration-bucketed resumable batch sampler."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import load_audio
from asr.config import DataConfig, SourceConfig, TextConfig
from asr.data import (AudioDataset, DataError, DurationBatchSampler, Labeler, SplitReport, collate, ctc_min_frames,
                      filter_utterances, load_utterance_audio, read_source_split, write_report)
from conftest import FIXTURE_CV, SHARED, fixture_rows, requires_shared

CV = SourceConfig(kind="common_voice", path=str(FIXTURE_CV), language="tr")


def read(src: SourceConfig, expr: str):
    return read_source_split(src, expr)


def keep(utts, bad=(), cfg: DataConfig | None = None, labeler: Labeler | None = None):
    report = SplitReport()
    kept = filter_utterances(utts, list(bad), cfg or DataConfig(), labeler, report)
    return kept, report


@pytest.fixture(scope="module")
def fixture_train():
    """The fixture's training utterances, filtered (durations filled in)."""
    utts, bad = read(CV, "train")
    kept, report = keep(utts, bad)
    assert report.kept == 32
    return kept


# ---------------------------------------------------------------------------------------
# Common Voice.


@pytest.mark.parametrize("expr, n", [("train", 32), ("dev", 8), ("test", 8), ("train+dev", 40),
                                     ("train+train", 32), ("dev + train + dev", 40), ("train+dev+test", 48)])
def test_common_voice_split_expressions(expr, n):
    utts, bad = read(CV, expr)
    assert bad == []
    assert len(utts) == n
    assert len({u.path for u in utts}) == n  # de-duplicated


def test_common_voice_rows_become_utterances():
    utts, _ = read(CV, "train")
    rows = fixture_rows("train")
    assert [u.text for u in utts] == [r["sentence"] for r in rows]
    u, r = utts[0], rows[0]
    assert u.path == str(FIXTURE_CV / "clips" / r["path"])
    assert u.language == "tr" and u.source == "tr" and u.speaker == r["client_id"]
    assert u.id == f"tr/{r['path'].rsplit('.', 1)[0]}"


def test_common_voice_filters_keep_every_fixture_clip(fixture_train):
    assert all(1.0 < u.duration < 3.0 for u in fixture_train)
    assert all(u.label_text == u.text for u in fixture_train)  # default cleaning changes nothing here


def test_common_voice_missing_split_or_folder(tmp_path):
    with pytest.raises(DataError, match="validated.tsv"):
        read(CV, "train+validated")
    with pytest.raises(DataError, match="nowhere"):
        read(SourceConfig(path=str(tmp_path / "nowhere")), "train")


@requires_shared
def test_shared_synth_cv_reads_without_bad_rows():
    src = SourceConfig(path=str(SHARED / "data" / "synth-cv" / "tr"), language="tr")
    if not (SHARED / "data" / "synth-cv" / "tr" / "train.tsv").is_file():
        pytest.skip("no synth-cv/tr in ../shared")
    utts, bad = read(src, "train+dev")
    assert bad == [] and len(utts) == 1350


# ---------------------------------------------------------------------------------------
# Manifests.


def copy_clips(train_clips, folder, n=3, suffix=".mp3"):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, clip in enumerate(train_clips[:n]):
        shutil.copy(clip, folder / f"clip{i}{suffix}")
        names.append(f"clip{i}{suffix}")
    return names


def test_manifest_tsv_and_jsonl_with_relative_paths(tmp_path, train_clips):
    man = tmp_path / "manifests"
    names = copy_clips(train_clips, man / "audio")
    (man / "train.tsv").write_text("path\ttext\n" + "".join(f"audio/{n}\tcümle {i}\n" for i, n in enumerate(names)),
                                   encoding="utf-8")
    with open(man / "dev.jsonl", "w", encoding="utf-8") as f:
        for i, n in enumerate(names[:2]):
            f.write(json.dumps({"path": f"audio/{n}", "text": f"dev {i}", "speaker": "s1"}, ensure_ascii=False) + "\n")
    src = SourceConfig(kind="manifest", path=str(man), language="tr")
    train, bad = read(src, "train")
    assert bad == [] and [u.text for u in train] == ["cümle 0", "cümle 1", "cümle 2"]
    assert train[0].path == str(man / "audio" / names[0])
    dev, bad = read(src, "dev.jsonl")
    assert bad == [] and [u.text for u in dev] == ["dev 0", "dev 1"] and dev[0].speaker == "s1"
    both, _ = read(src, "train+dev")
    assert len(both) == 3  # the dev clips are train clips: de-duplicated by path
    kept, report = keep(train)
    assert report.kept == 3
    assert torch.equal(load_utterance_audio(kept[0], 16000), load_audio(train_clips[0]))


def test_manifest_given_as_a_file_and_with_absolute_paths(tmp_path, train_clips):
    names = copy_clips(train_clips, tmp_path / "audio", n=2)
    f = tmp_path / "all.tsv"
    f.write_text(f"path\ttext\naudio/{names[0]}\tbir\n{tmp_path / 'audio' / names[1]}\tiki\n", encoding="utf-8")
    src = SourceConfig(kind="manifest", path=str(f))
    utts, bad = read(src, "all")
    assert bad == [] and [u.text for u in utts] == ["bir", "iki"]
    assert keep(utts)[1].kept == 2
    with pytest.raises(DataError, match="manifest not found"):
        read(src, "dev")  # a file is not silently reused for every split


def test_manifest_bad_json_lines_are_bad_rows(tmp_path, train_clips):
    names = copy_clips(train_clips, tmp_path, n=1)
    lines = [json.dumps({"path": names[0], "text": "iyi"}).encode(), b"{not json", b"[1, 2]",
             json.dumps({"path": names[0]}).encode(), b'{"path": "x.mp3", "text": "\xff\xfe"}',
             json.dumps({"path": None, "text": "no path"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    utts, bad = read(SourceConfig(kind="manifest", path=str(tmp_path)), "m")
    assert [u.text for u in utts] == ["iyi"]
    assert sorted(r for r, _ in bad) == ["bad_path", "bad_row", "bad_row", "bad_row", "bad_row"]
    assert sorted(d["line"] for _, d in bad) == [2, 3, 4, 5, 6]


def test_manifest_without_the_text_column_is_a_data_error(tmp_path, train_clips):
    names = copy_clips(train_clips, tmp_path, n=1)
    (tmp_path / "m.tsv").write_text(f"path\tsentence\n{names[0]}\tx\n", encoding="utf-8")
    with pytest.raises(DataError, match="text"):
        read(SourceConfig(kind="manifest", path=str(tmp_path)), "m")
    utts, _ = read(SourceConfig(kind="manifest", path=str(tmp_path), text_column="sentence"), "m")
    assert [u.text for u in utts] == ["x"]


# ---------------------------------------------------------------------------------------
# Hugging Face: audiofolder, save_to_disk.


def test_hf_audiofolder_with_metadata_csv(tmp_path, train_clips):
    af = tmp_path / "af"
    names = copy_clips(train_clips, af / "wavs")
    (af / "metadata.csv").write_text(
        "file_name,transcription\n" + "".join(f'wavs/{n},"merhaba, dünya {i}"\n' for i, n in enumerate(names)),
        encoding="utf-8")
    src = SourceConfig(kind="hf", path=str(af), language="tr", text_column="transcription")
    utts, bad = read(src, "train")
    assert bad == [] and [u.text for u in utts] == [f"merhaba, dünya {i}" for i in range(3)]
    kept, report = keep(utts)
    assert report.kept == 3
    assert torch.equal(load_utterance_audio(kept[1], 16000), load_audio(train_clips[1]))
    with pytest.raises(DataError, match="dev"):
        read(src, "dev")


def test_hf_audiofolder_with_split_folders(tmp_path, train_clips):
    af = tmp_path / "af"
    for split, n in (("train", 3), ("test", 1)):
        names = copy_clips(train_clips, af / split, n=n)
        with open(af / split / "metadata.jsonl", "w", encoding="utf-8") as f:
            for name in names:
                f.write(json.dumps({"file_name": name, "sentence": f"{split} {name}"}) + "\n")
    src = SourceConfig(kind="hf", path=str(af))
    assert len(read(src, "train")[0]) == 3
    test, _ = read(src, "test")
    assert [u.text for u in test] == ["test clip0.mp3"] and test[0].path == str(af / "test" / "clip0.mp3")


@pytest.mark.parametrize("storage", ["paths", "bytes"])
def test_hf_save_to_disk(tmp_path, train_clips, storage):
    import datasets

    clips = train_clips[:3]
    column = ([str(p) for p in clips] if storage == "paths"
              else [{"bytes": p.read_bytes(), "path": None} for p in clips])
    ds = datasets.Dataset.from_dict({"audio": column, "sentence": ["bir", "iki", "üç"]})
    ds = ds.cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(train=ds, dev=ds.select([2])).save_to_disk(str(tmp_path / "dict"))

    single = SourceConfig(kind="hf", path=str(tmp_path / "single"), language="tr")
    utts, bad = read(single, "train")
    assert bad == [] and [u.text for u in utts] == ["bir", "iki", "üç"]
    kept, report = keep(utts)
    assert report.kept == 3 and abs(kept[0].duration - load_audio(clips[0]).shape[0] / 16000) < 1e-3
    assert torch.equal(load_utterance_audio(kept[2], 16000), load_audio(clips[2]))
    with pytest.raises(DataError, match="dev"):
        read(single, "dev")  # one saved Dataset is one split, not every split

    both = SourceConfig(kind="hf", path=str(tmp_path / "dict"), language="tr")
    utts, _ = read(both, "train+dev")
    assert [u.text for u in utts] == ["bir", "iki", "üç", "üç"]
    kept, report = keep(utts)
    assert report.kept == 4
    assert torch.equal(load_utterance_audio(kept[3], 16000), load_audio(clips[2]))
    with pytest.raises(DataError, match="column 'text'"):
        read(SourceConfig(kind="hf", path=str(tmp_path / "dict"), text_column="text"), "train")


# ---------------------------------------------------------------------------------------
# Filters and the data report.


def write_tone(path, seconds, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr)


def char_labeler(max_tokens=0, frames_per_second=None):
    """A fake model: one label per character; CTC output frames at `frames_per_second` of 16 kHz input."""
    frames = None if frames_per_second is None else (lambda n: n * frames_per_second // 16000)
    return Labeler(encode=lambda text, lang: [ord(c) for c in text], max_tokens=max_tokens, output_frames=frames)


@pytest.fixture
def bad_corpus(tmp_path, train_clips):
    """A Common Voice folder in which every row but the first two trips exactly one filter."""
    root = tmp_path / "cv"
    clips = root / "clips"
    clips.mkdir(parents=True)
    shutil.copy(train_clips[0], clips / "good_mp3.mp3")
    shutil.copy(train_clips[1], clips / "quiet_mp3.mp3")
    for name in ("good", "stray", "bom", "empty1", "labels", "ctc1", "ctc2"):
        write_tone(clips / f"{name}.wav", 1.0)
    write_tone(clips / "short.wav", 0.2)
    write_tone(clips / "long.wav", 3.0)
    (clips / "garbage.mp3").write_bytes(b"definitely not an mp3 frame\n" * 100)
    (clips / "empty.mp3").write_bytes(b"")
    write_tone(tmp_path / "outside.wav", 1.0)
    rows = [
        "c1\tgood_mp3.mp3\tİyi bir cümle.\t2",
        "c1\tgood.wav\tkısa\t2",
        "c1\tstray.wav\tstray\ttab\t2",  # bad_row: one field too many (line 4)
        "c2\t../outside.wav\tkaçak yol\t2",  # bad_path
        "c2\t../../x.mp3\tkaçak yol\t2",  # bad_path
        "c2\t/etc/passwd\tmutlak yol\t2",  # bad_path: absolute in a Common Voice folder
        "c2\tmissing.mp3\tkayıp dosya\t2",  # missing_file
        "c3\tgarbage.mp3\tbozuk\t2",  # undecodable
        "c3\tempty.mp3\tboş dosya\t2",  # undecodable
        "c3\tshort.wav\tçok kısa\t2",  # too_short
        "c3\tlong.wav\tçok uzun\t2",  # too_long
        "c4\tquiet_mp3.mp3\t  ?!  \t2",  # empty_text once cleaned
        "c4\tempty1.wav\t\t2",  # empty_text
        "c4\tlabels.wav\t" + "uzun etiket " * 3 + "\t2",  # labels_too_long (35 labels > 30)
        "c4\tctc1.wav\tabcdefghijklmnopqrstu\t2",  # ctc_infeasible: 21 labels, 20 frames
        "c4\tctc2.wav\taabbccddeeffgghhiijj\t2",  # ctc_infeasible: 20 labels + 10 repeats
    ]
    data = ("client_id\tpath\tsentence\tup_votes\n" + "\n".join(rows) + "\n").encode("utf-8")
    data += "c5\tbom.wav\tbozuk ".encode("utf-8") + b"\xff\xfe UTF-8\t2\n"  # bad_row: invalid UTF-8 (line 18)
    (root / "train.tsv").write_bytes(data)
    return root


EXPECTED_DROPS = {"bad_row": 2, "bad_path": 3, "missing_file": 1, "undecodable": 2, "too_short": 1, "too_long": 1,
                  "empty_text": 2, "labels_too_long": 1, "ctc_infeasible": 2}
BAD_CORPUS_CFG = dict(min_duration_s=0.5, max_duration_s=2.5, text=TextConfig(chars_to_ignore="?!.", lowercase=True))


def test_each_filter_reason_fires(bad_corpus):
    utts, bad = read(SourceConfig(path=str(bad_corpus), language="tr"), "train")
    report = SplitReport()
    kept = filter_utterances(utts, bad, DataConfig(**BAD_CORPUS_CFG), char_labeler(max_tokens=30, frames_per_second=20),
                             report)
    assert dict(report.dropped) == EXPECTED_DROPS
    assert [u.label_text for u in kept] == ["iyi bir cümle", "kısa"]
    assert report.total == 17 and report.kept == 2
    assert kept[0].labels == [ord(c) for c in "iyi bir cümle"]
    undecodable = report.examples["undecodable"]
    assert {e["path"].rsplit("/", 1)[-1] for e in undecodable} == {"garbage.mp3", "empty.mp3"}
    assert all("\n" not in e["detail"] and e["path"] in e["detail"] for e in undecodable)
    assert {e["line"] for e in report.examples["bad_row"]} == {4, 18}
    assert {e["path"] for e in report.examples["bad_path"]} == {"../outside.wav", "../../x.mp3", "/etc/passwd"}
    assert report.examples["ctc_infeasible"][1] == {"id": "tr/ctc2", "path": str(bad_corpus / "clips" / "ctc2.wav"),
                                                    "frames": 20, "needed": 30}
    assert report.examples["too_short"] == [{"id": "tr/short", "path": str(bad_corpus / "clips" / "short.wav"),
                                             "duration": 0.2}]


def test_without_a_labeler_label_filters_do_not_apply(bad_corpus):
    utts, bad = read(SourceConfig(path=str(bad_corpus), language="tr"), "train")
    report = SplitReport()
    kept = filter_utterances(utts, bad, DataConfig(**BAD_CORPUS_CFG), None, report)
    assert report.kept == 5 and len(kept) == 5 and all(u.labels == [] for u in kept)
    assert "labels_too_long" not in report.dropped and "ctc_infeasible" not in report.dropped


def test_write_report(bad_corpus, tmp_path):
    reports = {"tr/train": SplitReport(), "tr/dev": SplitReport()}
    cfg = DataConfig(report_examples=1, **BAD_CORPUS_CFG)
    utts, bad = read(SourceConfig(path=str(bad_corpus), language="tr"), "train")
    filter_utterances(utts, bad, cfg, char_labeler(max_tokens=30, frames_per_second=20), reports["tr/train"])
    dev, dev_bad = read(CV, "dev")
    filter_utterances(dev, dev_bad, cfg, None, reports["tr/dev"])
    write_report(reports, tmp_path / "data_report.json")
    out = json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))
    assert set(out) == {"tr/train", "tr/dev"}
    assert out["tr/dev"]["total"] == out["tr/dev"]["kept"] == 8 and out["tr/dev"]["dropped"] == {}
    train = out["tr/train"]
    assert train["total"] == 17 and train["kept"] == 2 and train["dropped"] == EXPECTED_DROPS
    assert set(train["examples"]) == set(EXPECTED_DROPS)
    assert all(len(rows) == 1 for rows in train["examples"].values())  # capped at report_examples
    assert train["examples"]["missing_file"][0]["path"].endswith("missing.mp3")
    assert 0 < train["kept_hours"] < 0.01
    assert not (tmp_path / "data_report.json.tmp").exists()


def test_ctc_min_frames_counts_repeats():
    assert ctc_min_frames([]) == 0
    assert ctc_min_frames([1, 2, 3]) == 3
    assert ctc_min_frames([1, 1, 2, 2, 2]) == 8


def test_write_report_without_a_labeler(bad_corpus, tmp_path):
    src = SourceConfig(path=str(bad_corpus), language="tr")
    cfg = DataConfig(min_duration_s=0.5, max_duration_s=2.5, report_examples=1)
    reports = {"tr/train": SplitReport(), "tr/dev": SplitReport()}
    utts, bad = read(src, "train")
    filter_utterances(utts, bad, cfg, None, reports["tr/train"])
    dev, dev_bad = read(CV, "dev")
    filter_utterances(dev, dev_bad, cfg, None, reports["tr/dev"])
    write_report(reports, tmp_path / "data_report.json")
    out = json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))
    assert set(out) == {"tr/train", "tr/dev"}
    assert out["tr/dev"]["kept"] == 8 and out["tr/dev"]["dropped"] == {}
    train = out["tr/train"]
    assert train["total"] == train["kept"] + sum(train["dropped"].values())
    assert train["dropped"]["undecodable"] == 2 and len(train["examples"]["undecodable"]) == 1  # capped
    assert train["dropped"]["bad_path"] == 3 and train["dropped"]["bad_row"] == 2
    assert train["kept_hours"] > 0
    assert not (tmp_path / "data_report.json.tmp").exists()


# ---------------------------------------------------------------------------------------
# Dataset and collation.


def test_a_corrupt_clip_is_dropped_not_fatal(tmp_path, fixture_train):
    (tmp_path / "broken.mp3").write_bytes(b"\x00garbage\x00" * 500)
    broken = type(fixture_train[0])(id="tr/broken", text="x", language="tr", source="tr",
                                    path=str(tmp_path / "broken.mp3"), labels=[5, 6])
    ds = AudioDataset([fixture_train[0], broken, fixture_train[1]])
    item = ds[(0, 3, 1)]
    assert item["audio"] is None and "broken.mp3" in item["error"] and "\n" not in item["error"]
    assert item["state"] == {"epoch": 0, "position": 4}
    batch = collate([ds[(0, 3, i)] for i in range(3)])
    assert batch["ids"] == [fixture_train[0].id, fixture_train[1].id]
    assert batch["audio"].shape[0] == 2 and batch["dropped"][0][0] == "tr/broken"
    assert batch["sampler_state"] == {"epoch": 0, "position": 4}
    all_bad = collate([ds[1]])
    assert all_bad["audio"].shape[0] == 0 and all_bad["ids"] == [] and len(all_bad["dropped"]) == 1


def test_audio_cache_decodes_each_clip_once(fixture_train, monkeypatch):
    """data.cache_audio: the second epoch's items come from memory, equal to the decoded ones; a clip that
    fails to decode is dropped every time, never cached."""
    import asr.data as D

    calls = []
    real = D.load_utterance_audio
    monkeypatch.setattr(D, "load_utterance_audio", lambda u, sr: calls.append(u.id) or real(u, sr))
    broken = dataclasses.replace(fixture_train[1], id="tr/broken", path=fixture_train[1].path + ".missing")
    utts = [fixture_train[0], broken, fixture_train[2]]
    plain, cached = AudioDataset(utts), AudioDataset(utts, cache=True)
    first = [cached[i] for i in range(3)]
    second = [cached[(1, k, i)] for k, i in enumerate(range(3))]
    assert calls.count(utts[0].id) == 1 and calls.count(utts[2].id) == 1 and calls.count("tr/broken") == 2
    for i in (0, 2):
        assert torch.equal(first[i]["audio"], plain[i]["audio"]) and torch.equal(second[i]["audio"], plain[i]["audio"])
    assert second[1]["audio"] is None and second[1]["error"]
    assert second[2]["state"] == {"epoch": 1, "position": 3}


def test_collate_shapes_and_padding(fixture_train):
    utts = [fixture_train[i] for i in (0, 1, 2)]
    for u, labels in zip(utts, ([3, 4, 5], [7], [1, 2, 3, 4, 5, 6])):
        u.labels = labels
    items = [AudioDataset(utts)[i] for i in range(3)]
    batch = collate(items)
    lengths = [it["audio"].shape[0] for it in items]
    assert batch["audio"].shape == (3, max(lengths)) and batch["audio"].dtype == torch.float32
    assert batch["audio_lengths"].tolist() == lengths and batch["audio_lengths"].dtype == torch.long
    for b, n in enumerate(lengths):
        assert torch.equal(batch["audio"][b, :n], items[b]["audio"])
        assert torch.all(batch["audio"][b, n:] == 0)
    assert batch["labels"].shape == (3, 6) and batch["labels"].dtype == torch.long
    assert batch["labels"][1].tolist() == [7, -100, -100, -100, -100, -100]
    assert batch["labels"][0].tolist() == [3, 4, 5, -100, -100, -100]
    assert batch["label_lengths"].tolist() == [3, 1, 6] and batch["label_lengths"].dtype == torch.long
    assert batch["texts"] == [u.text for u in utts] and batch["languages"] == ["tr"] * 3
    assert batch["dropped"] == [] and batch["sampler_state"] is None


# ---------------------------------------------------------------------------------------
# DurationBatchSampler.


@pytest.fixture(scope="module")
def durations(fixture_train) -> list[float]:
    return [u.duration for u in fixture_train]


def spread_durations(n=300, seed=1) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(1.0, 15.0), 3) for _ in range(n)]


def epoch_batches(sampler, epoch=0):
    """The (rank's) batches of one epoch as lists of indices, through the public iterator."""
    n = len(sampler.batches(epoch))
    start = sum(len(sampler.batches(e)) for e in range(sampler.epoch, epoch))
    keys = list(itertools.islice(iter(sampler), start + n))[start:]
    assert all(k[0] == epoch for b in keys for k in b)
    return [[i for _, _, i in b] for b in keys]


def test_sampler_same_seed_same_batches_other_seed_other_order():
    d = spread_durations()
    a = epoch_batches(DurationBatchSampler(d, batch_size=8, seed=3))
    b = epoch_batches(DurationBatchSampler(d, batch_size=8, seed=3))
    c = epoch_batches(DurationBatchSampler(d, batch_size=8, seed=4))
    assert a == b
    assert a != c
    s = DurationBatchSampler(d, batch_size=8, seed=3)
    assert s.batches(0) != s.batches(1)  # each epoch is shuffled anew


@pytest.mark.parametrize("batch_size, max_batch_s", [(8, 0.0), (0, 40.0), (16, 50.0), (1, 0.0)])
def test_sampler_covers_each_index_once_and_respects_caps(batch_size, max_batch_s):
    d = spread_durations()
    sampler = DurationBatchSampler(d, batch_size=batch_size, max_batch_s=max_batch_s, seed=0)
    for epoch in (0, 1):
        batches = epoch_batches(sampler, epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(d)))
        for b in batches:
            if batch_size:
                assert len(b) <= batch_size
            if max_batch_s and len(b) > 1:
                assert len(b) * max(d[i] for i in b) <= max_batch_s + 1e-9


def test_sampler_a_clip_longer_than_the_cap_gets_its_own_batch():
    d = [1.0, 1.0, 50.0, 1.0]
    batches = DurationBatchSampler(d, max_batch_s=10.0, seed=0).batches(0)
    assert [2] in batches and sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_sampler_padding_fraction_is_low(durations):
    sampler = DurationBatchSampler(durations, batch_size=8, seed=0)  # the demo's settings
    fraction = sampler.padding_fraction(0)
    print(f"padding fraction, fixture train durations, batch_size=8: {fraction:.4f}")
    assert fraction < 0.05
    d = spread_durations()
    bucketed = DurationBatchSampler(d, batch_size=16, seed=0).padding_fraction(0)
    unsorted = DurationBatchSampler(d, batch_size=16, seed=0, noise=1e9).padding_fraction(0)  # effectively random
    print(f"padding fraction, 300 clips of 1-15 s, batch_size=16: {bucketed:.4f} (random batching {unsorted:.4f})")
    assert bucketed < 0.1 and bucketed < unsorted / 4


def keys_after_resume(durations, state, n, **kw):
    sampler = DurationBatchSampler(durations, **kw)
    sampler.load_state_dict(state)
    return list(itertools.islice(iter(sampler), n))


def test_sampler_resume_from_collated_state(fixture_train, durations):
    kw = dict(batch_size=4, seed=7)
    sampler = DurationBatchSampler(durations, **kw)
    loader = torch.utils.data.DataLoader(AudioDataset(fixture_train), batch_sampler=sampler, collate_fn=collate)
    k = 3
    seen = list(itertools.islice(iter(loader), k))
    state = seen[-1]["sampler_state"]
    assert state == {"epoch": 0, "position": k}
    reference = list(itertools.islice(iter(DurationBatchSampler(durations, **kw)), 20))
    assert [b["ids"] for b in seen] == [[fixture_train[i].id for _, _, i in keys] for keys in reference[:k]]
    assert keys_after_resume(durations, state, 20 - k, **kw) == reference[k:]


@pytest.mark.parametrize("k", [1, 7, 8, 9, 13])
def test_sampler_resume_mid_epoch_and_across_the_epoch_boundary(durations, k):
    kw = dict(batch_size=4, seed=11)
    reference = list(itertools.islice(iter(DurationBatchSampler(durations, **kw)), 24))  # 8 batches an epoch
    assert len(DurationBatchSampler(durations, **kw).batches(0)) == 8
    epoch, position, _ = reference[k - 1][-1]
    state = {"epoch": epoch, "position": position + 1}  # what collate reports after the k-th batch
    assert keys_after_resume(durations, state, 24 - k, **kw) == reference[k:]


def test_sampler_state_dict_round_trip(durations):
    sampler = DurationBatchSampler(durations, batch_size=4, seed=0)
    sampler.load_state_dict({"epoch": 2, "position": 5})
    assert sampler.state_dict() == {"epoch": 2, "position": 5}
    first = next(iter(sampler))
    assert {(e, p) for e, p, _ in first} == {(2, 5)}


@pytest.mark.parametrize("batch_size, max_batch_s", [(4, 0.0), (0, 8.0), (3, 0.0), (5, 9.0)])
def test_sampler_two_replicas_shard_the_global_batches(durations, batch_size, max_batch_s):
    kw = dict(seed=5)
    single = DurationBatchSampler(durations, batch_size=2 * batch_size, max_batch_s=2 * max_batch_s, **kw)
    ranks = [DurationBatchSampler(durations, batch_size=batch_size, max_batch_s=max_batch_s, num_replicas=2,
                                  rank=r, **kw) for r in (0, 1)]
    for epoch in (0, 1, 2):
        assert all(len(b) >= 2 for b in single.batches(epoch))  # the settings leave no one-clip global batch
        assert ranks[0].batches(epoch) == ranks[1].batches(epoch) == single.batches(epoch)
    n = 2 * len(single.batches(0)) + 3  # into the third epoch
    streams = [list(itertools.islice(iter(s), n)) for s in ranks]
    for a, b in zip(*streams):
        ((epoch, position),) = {(e, p) for e, p, _ in a} | {(e, p) for e, p, _ in b}
        ia, ib = {i for _, _, i in a}, {i for _, _, i in b}
        assert a and b and not ia & ib
        assert ia | ib == set(single.batches(epoch)[position])
        if batch_size:
            assert len(a) <= batch_size and len(b) <= batch_size
    resumed = keys_after_resume(durations, {"epoch": 0, "position": 3}, 4, batch_size=batch_size,
                                max_batch_s=max_batch_s, num_replicas=2, rank=1, **kw)
    assert resumed == streams[1][3:7]


@pytest.mark.parametrize("durations, kw", [
    ([1.0] * 9, dict(batch_size=4)),  # 2 ranks: global batches of 8, a tail of 1
    ([1.0, 1.0, 1.0, 100.0, 1.0], dict(max_batch_s=3.0)),  # one clip over the cap on its own
    ([1.0] * 5, dict(batch_size=1)),  # per-rank batches of one clip
    ([1.0, 2.0, 3.0], dict(batch_size=8)),
])
@pytest.mark.parametrize("replicas", [2, 3])
def test_sampler_every_clip_once_and_no_empty_shard_with_several_ranks(durations, kw, replicas):
    if len(durations) < replicas:
        pytest.skip("fewer clips than ranks")
    ranks = [DurationBatchSampler(durations, num_replicas=replicas, rank=r, seed=2, **kw) for r in range(replicas)]
    n = len(ranks[0].batches(0))
    shards = [list(itertools.islice(iter(s), n)) for s in ranks]
    seen = sorted(i for rank in shards for b in rank for _, _, i in b)
    assert seen == list(range(len(durations)))
    assert all(b for rank in shards for b in rank)


def test_sampler_fewer_clips_than_ranks():
    with pytest.raises(DataError, match="fewer clips than ranks"):
        DurationBatchSampler([1.0], batch_size=4, num_replicas=2).batches(0)


def test_sampler_with_nothing_to_batch():
    with pytest.raises(DataError):
        DurationBatchSampler([], batch_size=4)


def test_random_batching_mixes_durations_under_the_same_caps():
    """by_duration=False (Whisper's default: its input is always 30 s) draws batches at random: far more
    padding than duration buckets, every clip once per epoch, caps kept, deterministic per seed, resumable."""
    rng = random.Random(1)
    durations = [rng.uniform(1.0, 15.0) for _ in range(300)]
    bucketed = DurationBatchSampler(durations, batch_size=16, seed=0)
    mixed = DurationBatchSampler(durations, batch_size=16, seed=0, by_duration=False)
    assert bucketed.padding_fraction() < 0.15 < mixed.padding_fraction()
    batches = mixed.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(300)) and max(map(len, batches)) == 16
    assert batches == DurationBatchSampler(durations, batch_size=16, seed=0, by_duration=False).batches(0)
    assert batches != mixed.batches(1)
    resumed = DurationBatchSampler(durations, batch_size=16, seed=0, by_duration=False)
    resumed.load_state_dict({"epoch": 0, "position": 5})
    assert [[i for _, _, i in b] for b in itertools.islice(iter(resumed), 3)] == batches[5:8]
