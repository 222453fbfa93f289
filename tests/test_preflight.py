"""asr.preflight: each check fires on a small Common Voice corpus built to trigger it (copies of the fixture
clips with hand-written TSVs), the weight-free labeler equals the real model's, and the drop counts equal
those a real training run writes to data_report.json."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from asr.config import (Config, DataConfig, EvalConfig, ModelConfig, RunConfig, SourceConfig, TextConfig,
                        TrainConfig, validate)
from asr.preflight import format_preflight, preflight, weightless_labeler, write_preflight
from asr.text import CharVocab, basic_normalize, clean_transcript, normalize
from conftest import FIXTURE_CV, SHARED, fixture_rows

WHISPER_BASE = SHARED / "models" / "whisper-base"
SYNTH_TR = SHARED / "data" / "synth-cv" / "tr"
needs_whisper_base = pytest.mark.skipif(not (WHISPER_BASE / "tokenizer.json").is_file(),
                                        reason=f"shared Whisper base not found at {WHISPER_BASE}")
needs_synth_tr = pytest.mark.skipif(not (SYNTH_TR / "train.tsv").is_file(),
                                    reason=f"shared synthetic Turkish corpus not found at {SYNTH_TR}")

DEMO_TEXT = dict(lowercase=True, chars_to_ignore=',?.!;:"“”‘’%-')
SHORTEST = "synth_tr_1_000105.mp3"  # 1.58 s, a training clip of the fixture
LONG_TR = " ".join(r["sentence"] for r in fixture_rows("train"))[:600].strip()  # 600 characters of Turkish
THAANA = ["ދިވެހިރާއްޖެ ރީތި ރަށެކެވެ", "މާލެ އަކީ ވެރިރަށް", "ދިވެހި ބަސް"]


# ---------------------------------------------------------------------------------------
# Building corpora.


def base_rows() -> dict[str, list[list[str]]]:
    """The fixture's splits as [clip, sentence, speaker] rows, with speakers disjoint between splits."""
    return {split: [[r["path"], r["sentence"], f"{split}-spk-{k % 4}"] for k, r in enumerate(fixture_rows(split))]
            for split in ("train", "dev", "test")}


def write_corpus(root: Path, splits: dict[str, list[list[str]]], locale: str = "tr") -> Path:
    """A Common Voice folder at `root`: <split>.tsv with client_id, path, sentence; the fixture clips named
    by the rows are copied into clips/ (a name that is no fixture clip stays missing)."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        lines = ["client_id\tpath\tsentence\tup_votes\tdown_votes\tlocale"]
        for clip, sentence, speaker in rows:
            src = FIXTURE_CV / "clips" / clip
            if src.is_file() and not (root / "clips" / clip).exists():
                shutil.copy(src, root / "clips" / clip)
            lines.append(f"{speaker}\t{clip}\t{sentence}\t2\t0\t{locale}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def ctc_config(out_dir, *sources: SourceConfig, **data) -> Config:
    """A tiny scratch Wav2Vec2-style CTC model (7 conv layers, 320 samples a frame: 50 frames/s)."""
    cfg = Config(
        run=RunConfig(out_dir=str(out_dir), seed=0, device="cpu"),
        data=DataConfig(sources=list(sources), batch_size=8, num_workers=0, text=TextConfig(**DEMO_TEXT), **data),
        model=ModelConfig(init="scratch", name="", arch="wav2vec2", hidden_size=32, num_layers=1, num_heads=2,
                          intermediate_size=64, conv_dim=[32] * 7, freeze_feature_encoder=False, mask_time_prob=0.0,
                          hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                          final_dropout=0.0, layerdrop=0.0),
        train=TrainConfig(max_steps=1, lr=1e-3, warmup_steps=0, eval_every=0, save_every=0, log_every=1),
        eval=EvalConfig(split="dev", batch_size=8),
    )
    validate(cfg)
    return cfg


def cv(path, language="tr", **kw) -> SourceConfig:
    return SourceConfig(kind="common_voice", path=str(path), language=language, **kw)


def run_preflight(tmp_path, splits, **data) -> dict:
    folder = write_corpus(tmp_path / "cv", splits)
    return preflight(ctc_config(tmp_path / "run", cv(folder), **data))


# ---------------------------------------------------------------------------------------
# The control: the plain fixture corpus triggers nothing.


def test_clean_corpus_has_no_findings(tmp_path):
    result = run_preflight(tmp_path, base_rows())
    assert result["errors"] == [] and result["warnings"] == []
    assert result["family"] == "ctc" and result["frame_rate_hz"] == 50.0
    assert list(result["splits"]) == ["tr/train", "tr/dev", "tr/test"]
    for label, n in (("tr/train", 32), ("tr/dev", 8), ("tr/test", 8)):
        s = result["splits"][label]
        assert (s["rows"], s["clips"], s["unreadable"], s["speakers"]) == (n, n, 0, 4)
        assert s["filter"] == {"total": n, "kept": n, "kept_hours": s["filter"]["kept_hours"], "dropped": {},
                               "examples": {}}
        assert 1.5 < s["duration_s"]["p0"] <= s["duration_s"]["p50"] <= s["duration_s"]["p100"] < 2.2
        assert s["hours"] == pytest.approx(s["filter"]["kept_hours"], abs=1e-4) and 0 < s["hours"] < 0.02
        assert 5 < s["chars_per_s"]["p50"] < 25 and s["cps_outliers"]["count"] == 0
        assert s["oov"]["clips"] == 0 and s["oov"]["chars"] == {}
        assert s["labels"]["kind"] == "ctc_frames" and s["labels"]["infeasible"] == 0 and s["labels"]["ratio"]["p0"] > 1
    for label in ("tr/dev", "tr/test"):
        o = result["overlap"][label]
        assert o["sentences"]["clips"] == 0 and o["speakers"]["shared"] == 0 and o["same_clips"] == 0
    assert result["time_s"] < 30


# ---------------------------------------------------------------------------------------
# Each check on a corpus built to trigger it.


def test_sources_sharing_a_name_are_one_error_in_preflight_and_in_training(tmp_path):
    """Two sources named by the same language (files and logs are keyed by the name): pre-flight lists the
    error, and a run that skips pre-flight stops on the same line before reading any data."""
    from asr.experiment import TrainingError, read_data

    folder = write_corpus(tmp_path / "cv", base_rows())
    cfg = ctc_config(tmp_path / "run", cv(folder), cv(folder))
    line = 'data.sources: names must be unique (got tr, tr); set name = "..."'
    assert line in preflight(cfg)["errors"]
    with pytest.raises(TrainingError) as e:
        read_data(cfg)
    assert str(e.value) == line

def test_overlapping_sentence_between_train_and_dev(tmp_path):
    rows = base_rows()
    train_sentence = rows["train"][3][1]
    # The same sentence in dev, written differently (Turkish capitals, punctuation): the same after normalising.
    upper = train_sentence.replace("i", "İ").replace("ı", "I").upper()
    assert "İ" in upper and "I" in upper
    rows["dev"][0][1] = "  " + upper.rstrip(".!?") + " !"
    result = run_preflight(tmp_path, rows)
    o = result["overlap"]["tr/dev"]
    assert o["sentences"]["clips"] == 1 and o["sentences"]["distinct"] == 1
    assert o["sentences"]["examples"][0]["sentence"] == normalize(train_sentence, "tr")
    assert o["sentences"]["examples"][0]["train_clips"] == 1
    assert o["sentences"]["share"] == pytest.approx(1 / 8)
    assert result["overlap"]["tr/test"]["sentences"]["clips"] == 0
    assert o["speakers"]["shared"] == 0
    assert any("tr/dev: 1 clips (12.5%) have a sentence that is also in train" in w for w in result["warnings"])
    assert "tr/dev: 1 clips share a training sentence" in format_preflight(result)


def test_shared_speaker(tmp_path):
    rows = base_rows()
    rows["dev"][0][2] = rows["dev"][1][2] = "train-spk-2"  # a training speaker reads two dev clips
    result = run_preflight(tmp_path, rows)
    spk = result["overlap"]["tr/dev"]["speakers"]
    assert (spk["shared"], spk["clips"], spk["eval_speakers"]) == (1, 2, 5)
    assert spk["examples"] == [{"speaker": "train-spk-2", "eval_clips": 2, "train_clips": 8}]
    assert result["overlap"]["tr/test"]["speakers"]["shared"] == 0
    assert result["overlap"]["tr/dev"]["sentences"]["clips"] == 0
    assert "1/5 speakers shared (2 clips)" in format_preflight(result)


def test_600_character_transcript_is_infeasible_for_ctc_and_an_outlier(tmp_path):
    assert len(LONG_TR) == 600
    rows = base_rows()
    rows["train"][5][1] = LONG_TR
    clip_id = "tr/" + rows["train"][5][0].rsplit(".", 1)[0]
    result = run_preflight(tmp_path, rows)
    s = result["splits"]["tr/train"]
    assert s["filter"]["dropped"] == {"ctc_infeasible": 1} and s["filter"]["kept"] == 31
    assert s["labels"]["infeasible"] == 1
    ex = s["labels"]["examples"][0]
    assert ex["id"] == clip_id and ex["needed"] >= 500 and ex["frames"] < 120
    assert s["cps_outliers"]["count"] == 1
    assert s["cps_outliers"]["examples"][0]["id"] == clip_id and s["cps_outliers"]["examples"][0]["x_median"] > 10
    assert result["splits"]["tr/dev"]["filter"]["dropped"] == {}
    assert any("fewer CTC frames than labels plus repeats" in w and clip_id in w for w in result["warnings"])


def test_clip_too_short_for_its_text_and_a_too_long_one(tmp_path):
    rows = base_rows()
    i = next(k for k, r in enumerate(rows["train"]) if r[0] == SHORTEST)
    text = "Kadar müthiş yine hattı ayakkabı kurt de balık, bu akşam yine geldi ve gitti, hep böyle."  # 88 chars
    rows["train"][i][1] = text
    rows["train"][0][1] = "Evet."  # a few characters on a ~1.9 s clip: far below the median
    result = run_preflight(tmp_path, rows)
    s = result["splits"]["tr/train"]
    short_id, evet_id = "tr/" + SHORTEST[:-4], "tr/" + rows["train"][0][0][:-4]
    # 1.58 s gives 78 frames at 50 frames/s; the cleaned text needs one per character plus repeats.
    need = len(clean_transcript(text, TextConfig(**DEMO_TEXT), "tr"))
    assert s["labels"]["infeasible"] == 1 and s["labels"]["examples"][0]["id"] == short_id
    assert s["labels"]["examples"][0]["frames"] == 78 and s["labels"]["examples"][0]["needed"] >= need > 78
    assert s["filter"]["dropped"] == {"ctc_infeasible": 1}
    outliers = {e["id"]: e for e in s["cps_outliers"]["examples"]}
    assert s["cps_outliers"]["count"] == 2 and set(outliers) == {short_id, evet_id}
    assert outliers[short_id]["x_median"] > 3 and outliers[evet_id]["x_median"] < 1 / 3
    assert outliers[evet_id]["text"] == "Evet."


def test_characters_outside_the_training_vocabulary_in_dev(tmp_path):
    rows = base_rows()
    rows["dev"][2][1] = "Mañana Straße ñ."
    result = run_preflight(tmp_path, rows)
    oov = result["splits"]["tr/dev"]["oov"]
    assert oov["chars"] == {"ñ": 2, "ß": 1} and oov["clips"] == 1
    assert oov["examples"] == [{"id": "tr/" + rows["dev"][2][0][:-4], "chars": "ßñ", "text": "Mañana Straße ñ."}]
    assert result["splits"]["tr/train"]["oov"]["clips"] == 0 and result["splits"]["tr/test"]["oov"]["clips"] == 0
    assert result["vocab"] == {"kind": "char", "size": 3 + 28, "from": "built"}  # [PAD] [UNK] | + 28 letters
    table = format_preflight(result)
    assert "ñ ß (1 clips)" in table  # most frequent first
    # CTC labels of such a clip hold [UNK]: it is not dropped, only reported.
    assert result["splits"]["tr/dev"]["filter"]["dropped"] == {}


def test_thaana_sentences(tmp_path):
    """A second source in Dhivehi: counted and printed intact, and sentence overlap uses the script-aware
    normaliser (a dev sentence that differs from a training one only in a fili is not an overlap)."""
    tr = write_corpus(tmp_path / "tr", base_rows())
    clips = [r["path"] for r in fixture_rows("train")]
    same = THAANA[1] + "."  # the training sentence with a full stop
    one_fili = "ދިވެހި ބުސް"  # THAANA[2] with ު for ަ: another word
    assert basic_normalize(one_fili) == basic_normalize(THAANA[2]) and normalize(one_fili) != normalize(THAANA[2])
    dv = write_corpus(tmp_path / "dv", {
        "train": [[clips[k], t, f"dv-{k}"] for k, t in enumerate(THAANA)],
        "dev": [[clips[10], same, "dv-dev-0"], [clips[11], one_fili, "dv-dev-1"]],
    }, locale="dv")
    cfg = ctc_config(tmp_path / "run", cv(tr, test=""), cv(dv, language="dv", test=""))
    result = preflight(cfg)
    assert result["errors"] == []
    assert list(result["splits"]) == ["tr/train", "tr/dev", "dv/train", "dv/dev"]
    s = result["splits"]["dv/dev"]
    assert (s["clips"], s["speakers"], s["filter"]["kept"]) == (2, 2, 2)
    o = result["overlap"]["dv/dev"]
    assert o["sentences"]["clips"] == 1
    assert o["sentences"]["examples"] == [{"sentence": THAANA[1], "text": same, "eval_clips": 1, "train_clips": 1}]
    # The fili ު is a character no training transcript has: counted as one character, the mark itself.
    assert s["oov"]["chars"] == {"ު": 1} and s["oov"]["clips"] == 1
    assert result["splits"]["dv/train"]["oov"]["clips"] == 0
    # Thaana characters per second are counted with their marks.
    assert result["splits"]["dv/train"]["chars_per_s"] is not None
    table = format_preflight(result)
    assert THAANA[1] in table and "\u25ccު(U+07AA) (1 clips)" in table
    path = write_preflight(result, tmp_path / "out")
    assert THAANA[1] in path.read_text(encoding="utf-8")  # not \u-escaped
    assert json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(result))


@needs_whisper_base
def test_whisper_labels_over_448_tokens(tmp_path):
    """A 600-character Dhivehi transcript is over 448 Whisper tokens (Thaana is split into bytes); 600
    characters of Turkish are not: the limit is in tokens, prefix tokens included."""
    thaana_600 = (" ".join(THAANA) + " ") * 12
    thaana_600 = thaana_600[:600].strip()
    clips = [r["path"] for r in fixture_rows("train")]
    dv = write_corpus(tmp_path / "dv", {"train": [[c, THAANA[k % 3], f"s{k}"] for k, c in enumerate(clips[:6])]
                                        + [[clips[6], thaana_600, "s6"], [clips[7], LONG_TR, "s7"]],
                                        "dev": [[clips[8], THAANA[0], "d0"]]}, locale="dv")
    cfg = Config(run=RunConfig(out_dir=str(tmp_path / "run")),
                 data=DataConfig(sources=[cv(dv, language="dv", test="")]),
                 model=ModelConfig(name=str(WHISPER_BASE), language_map={"dv": "si"}))
    result = preflight(cfg)
    assert result["errors"] == [] and result["family"] == "whisper"
    s = result["splits"]["dv/train"]
    lab = s["labels"]
    assert lab["kind"] == "whisper_tokens" and lab["limit"] == 448
    assert lab["over_limit"] == 1 and lab["examples"][0]["id"] == "dv/" + clips[6][:-4]
    assert lab["examples"][0]["tokens"] > 448
    assert s["filter"]["dropped"] == {"labels_too_long": 1} and s["filter"]["kept"] == 7
    # The Turkish 600 characters are kept, and its length counts the 4 prefix tokens and <|endoftext|>.
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(str(WHISPER_BASE))
    assert lab["tokens"]["p100"] == lab["examples"][0]["tokens"]
    n_tr = len(tok.encode(LONG_TR, add_special_tokens=False)) + 5
    assert n_tr < 448
    assert lab["tokens"]["p0"] == min(len(tok.encode(t, add_special_tokens=False)) + 5 for t in THAANA)
    assert any("labels over 448 tokens" in w for w in result["warnings"])
    # A lower data.max_label_tokens is the limit training uses, too.
    cfg.data.max_label_tokens = 40
    capped = preflight(cfg)["splits"]["dv/train"]
    assert capped["labels"]["limit"] == 40 and capped["filter"]["dropped"]["labels_too_long"] >= 2


@needs_whisper_base
def test_whisper_unknown_language_is_an_error_not_a_crash(tmp_path):
    dv = write_corpus(tmp_path / "dv", {"train": [[SHORTEST, THAANA[0], "s"]]}, locale="dv")
    cfg = Config(run=RunConfig(out_dir=str(tmp_path / "run")),
                 data=DataConfig(sources=[cv(dv, language="dv", dev="", test="")]),
                 model=ModelConfig(name=str(WHISPER_BASE)))
    result = preflight(cfg)
    assert len(result["errors"]) == 1 and "language_map" in result["errors"][0]
    assert result["splits"]["dv/train"]["clips"] == 1 and result["splits"]["dv/train"]["labels"] is None


def test_unreadable_rows_and_clips_are_counted_not_fatal(tmp_path):
    rows = base_rows()
    rows["train"].append(["missing.mp3", "Bir cümle.", "x"])
    rows["train"].append(["../../outside.mp3", "Bir cümle.", "x"])
    rows["train"].append(["garbage.mp3", "Bir cümle.", "x"])
    rows["train"][1][1] = "..."  # empty once cleaned
    folder = write_corpus(tmp_path / "cv", rows)
    (folder / "clips" / "garbage.mp3").write_bytes(b"not audio at all" * 10)
    with open(folder / "train.tsv", "ab") as f:
        f.write(b"a\tb\n")  # wrong column count
        f.write(b"x\tbad.mp3\t\xff\xfe broken\t2\t0\ttr\n")  # invalid UTF-8
    cfg = ctc_config(tmp_path / "run", cv(folder, test="nonexistent"))
    result = preflight(cfg)
    # The test split is not trained or evaluated on by this run: a missing one is a warning, not an error.
    assert result["errors"] == []
    assert any("nonexistent" in w and "tr/test" in w and "not used by this run" in w for w in result["warnings"])
    s = result["splits"]["tr/train"]
    assert s["filter"]["dropped"] == {"bad_row": 2, "bad_path": 1, "missing_file": 1, "undecodable": 1,
                                      "empty_text": 1}
    assert (s["rows"], s["clips"], s["unreadable"], s["filter"]["kept"]) == (37, 32, 5, 31)
    assert "tr/test" not in result["splits"]
    assert "warning: tr/test:" in format_preflight(result)


def test_no_model_is_built_or_loaded(tmp_path, monkeypatch):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("pre-flight must not build or load a model")

    monkeypatch.setattr(transformers.AutoModelForCTC, "from_config", refuse)
    monkeypatch.setattr(transformers.AutoModelForCTC, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.WhisperForConditionalGeneration, "__init__", refuse)
    result = run_preflight(tmp_path, base_rows())
    assert result["errors"] == [] and result["splits"]["tr/train"]["labels"]["infeasible"] == 0
    if (WHISPER_BASE / "tokenizer.json").is_file():
        cfg = Config(run=RunConfig(out_dir=str(tmp_path / "w")),
                     data=DataConfig(sources=[cv(tmp_path / "cv")]), model=ModelConfig(name=str(WHISPER_BASE)))
        result = preflight(cfg)
        assert result["errors"] == [] and result["splits"]["tr/train"]["labels"]["over_limit"] == 0


# ---------------------------------------------------------------------------------------
# The same drops as training.


def test_drop_counts_equal_the_data_report_of_a_real_run(tmp_path):
    from asr.train import train

    rows = base_rows()
    i = next(k for k, r in enumerate(rows["train"]) if r[0] == SHORTEST)
    rows["train"][i][1] = LONG_TR[:90]  # ctc_infeasible
    rows["train"][2][1] = "?!"  # empty_text
    rows["train"].append(["missing.mp3", "Bir cümle.", "x"])  # missing_file
    rows["train"].append(["garbage.mp3", "Bir cümle.", "x"])  # undecodable
    rows["train"].append(["../x.mp3", "Bir cümle.", "x"])  # bad_path
    rows["dev"].append(["nope.mp3", "Bir cümle.", "x"])
    folder = write_corpus(tmp_path / "cv", rows)
    (folder / "clips" / "garbage.mp3").write_bytes(b"\x00" * 500)
    with open(folder / "train.tsv", "ab") as f:
        f.write(b"only\ttwo\n")  # bad_row
    # Durations: too_short below 1.62 s (the two 1.58 s clips, one of them already infeasible), too_long
    # above 2.0 s (four dev clips).
    cfg = ctc_config(tmp_path / "run", cv(folder), min_duration_s=1.62, max_duration_s=2.0)
    before = preflight(cfg)
    assert before["vocab"]["from"] == "built"
    train(cfg, fresh=True)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text(encoding="utf-8"))
    assert set(report) == {"tr/train", "tr/dev"}
    assert report["tr/train"]["dropped"] == {"bad_row": 1, "bad_path": 1, "missing_file": 1, "undecodable": 1,
                                             "empty_text": 1, "too_short": 2}
    assert report["tr/dev"]["dropped"] == {"missing_file": 1, "too_long": 4}
    after = preflight(cfg)  # now with the run's saved vocabulary
    assert after["vocab"]["from"] == "saved"
    for result in (before, after):
        for label, rep in report.items():
            got = json.loads(json.dumps(result["splits"][label]["filter"]))
            assert got["dropped"] == rep["dropped"], label
            assert (got["total"], got["kept"]) == (rep["total"], rep["kept"]), label
            assert got["kept_hours"] == pytest.approx(rep["kept_hours"], abs=1e-4)
            assert got["examples"] == rep["examples"], label
    # The infeasible clip is shadowed by too_short (the filters stop at the first reason): it shows in the
    # label check, which looks at every readable clip.
    assert before["splits"]["tr/train"]["labels"]["infeasible"] == 1


# ---------------------------------------------------------------------------------------
# The weight-free labeler against the real models.


def _samples():
    return [0, 399, 400, 401, 719, 720, 1000, 1234, 16000, 16001, 24321, 48000, 160000, 480123]


@pytest.mark.parametrize("conv", [
    {},  # the default 7-layer feature encoder
    {"conv_dim": [32, 32, 32], "conv_kernel": [10, 3, 3], "conv_stride": [5, 3, 2]},
])
def test_ctc_output_frames_equal_the_model(tmp_path, conv):
    from asr.models import build

    cfg = ctc_config(tmp_path / "run", cv(FIXTURE_CV))
    for k, v in conv.items():
        setattr(cfg.model, k, v)
    vocab = CharVocab.build(["abc def"])
    bundle = build(cfg.model, vocab)
    labeler, real = weightless_labeler(cfg, vocab), bundle.labeler
    for n in _samples():
        assert labeler.output_frames(n) == real.output_frames(n), n
    assert labeler.encode("abc fed", "tr") == real.encode("abc fed", "tr")
    assert labeler.max_tokens == real.max_tokens == 0
    assert labeler.min_samples == real.min_samples  # the receptive field: too_short below it
    assert real.output_frames(real.min_samples) == 1 and real.output_frames(real.min_samples - 1) < 1


def test_ctc_output_frames_of_a_named_config_with_adapter_and_a_pretrained_model(tmp_path):
    import transformers

    from asr.models import build

    vocab = CharVocab.build(["abc def"])
    conf = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                       conv_dim=[16, 16, 16], conv_kernel=[8, 4, 3], conv_stride=[4, 3, 2],
                                       num_conv_pos_embedding_groups=2, num_conv_pos_embeddings=8, add_adapter=True,
                                       num_adapter_layers=2, adapter_stride=2, output_hidden_size=32)
    conf.save_pretrained(tmp_path / "named")
    cfg = ctc_config(tmp_path / "run", cv(FIXTURE_CV))
    cfg.model = ModelConfig(init="scratch", name=str(tmp_path / "named"))
    real = build(cfg.model, vocab)
    labeler = weightless_labeler(cfg, vocab)
    assert real.model.config.add_adapter
    for n in _samples():
        assert labeler.output_frames(n) == real.output_frames(n), n
    assert labeler.min_samples == real.labeler.min_samples
    # A pretrained model keeps its own conv layout: the scratch size fields do not apply to it.
    real.model.save_pretrained(tmp_path / "pretrained")
    cfg.model = ModelConfig(init="pretrained", name=str(tmp_path / "pretrained"), conv_kernel=[2, 2, 2],
                            conv_stride=[1, 1, 1])
    real = build(cfg.model, vocab)
    labeler = weightless_labeler(cfg, vocab)
    for n in _samples():
        assert labeler.output_frames(n) == real.output_frames(n), n


@needs_whisper_base
def test_whisper_encode_equals_the_bundle(tmp_path):
    from asr.models import ModelError, build

    sources = [cv(FIXTURE_CV, language="tr"), cv(FIXTURE_CV, language="dv", name="dv"),
               cv(FIXTURE_CV, language="", name="none")]
    cfg = Config(run=RunConfig(out_dir=str(tmp_path / "run")), data=DataConfig(sources=sources, max_label_tokens=300),
                 model=ModelConfig(name=str(WHISPER_BASE), init="scratch", hidden_size=32, num_layers=1, num_heads=2,
                                   intermediate_size=64, language="de", language_map={"dv": "si"}))
    bundle = build(cfg.model, None, ["tr", "dv", ""])
    labeler = weightless_labeler(cfg, None)
    texts = ["merhaba dünya", "İstanbul'da IŞIK ılık", THAANA[0], "Größe Straße", "", " leading space", LONG_TR]
    for lang in ("tr", "dv", ""):
        for t in texts:
            assert labeler.encode(t, lang) == bundle.encode_whisper(t, lang), (lang, t)
    prefix = labeler.encode("", "dv")
    assert len(prefix) == 5 and prefix[1] == bundle.tokenizer.convert_tokens_to_ids("<|si|>")
    assert labeler.encode("", "")[1] == bundle.tokenizer.convert_tokens_to_ids("<|de|>")  # model.language
    assert labeler.max_tokens == min(bundle.labeler.max_tokens, cfg.data.max_label_tokens) == 300
    assert labeler.output_frames is None
    cfg.model.task = "translate"
    assert weightless_labeler(cfg, None).encode("x", "tr")[2] == bundle.tokenizer.convert_tokens_to_ids("<|translate|>")
    cfg.model.language_map = {}
    with pytest.raises(ModelError, match="language_map"):
        weightless_labeler(cfg, None)


# ---------------------------------------------------------------------------------------
# The shared corpus: timing (printed, not asserted).


@needs_synth_tr
def test_shared_corpus_timing(tmp_path, capsys):
    sources = [cv(SYNTH_TR, train="train", dev="dev", test="test")]
    configs = {"ctc": ctc_config(tmp_path / "ctc", *sources)}
    configs["ctc"].preflight.decode_sample = 0  # headers only; the Whisper run decodes every clip
    if (WHISPER_BASE / "tokenizer.json").is_file():
        configs["whisper"] = Config(run=RunConfig(out_dir=str(tmp_path / "whisper")),
                                    data=DataConfig(sources=sources), model=ModelConfig(name=str(WHISPER_BASE)))
    for name, cfg in configs.items():
        t0 = time.time()
        result = preflight(cfg)
        wall = time.time() - t0
        with capsys.disabled():
            print(f"\npre-flight ({name}) on {SYNTH_TR}: {wall:.2f} s wall, {result['time_s']:.2f} s inside")
            print(format_preflight(result))
        assert result["errors"] == []
        assert [result["splits"][f"tr/{s}"]["clips"] for s in ("train", "dev", "test")] == [1200, 150, 150]
        # Test speakers are disjoint from train (as in Common Voice); dev shares the training voices.
        assert result["overlap"]["tr/test"]["speakers"]["shared"] == 0
        assert result["overlap"]["tr/dev"]["speakers"]["shared"] > 0
        assert 1.1 < result["splits"]["tr/train"]["hours"] < 1.3
        decoded = [result["splits"][f"tr/{s}"]["decode"] for s in ("train", "dev", "test")]
        if name == "whisper":
            assert [d["decoded"] for d in decoded] == [1200, 150, 150]
            assert not any(d[k]["count"] for d in decoded for k in ("undecodable", "non_finite", "silent"))
            with capsys.disabled():
                print(f"decoding all {sum(d['decoded'] for d in decoded)} clips: "
                      f"{sum(d['time_s'] for d in decoded):.2f} s")
        else:
            assert decoded == [None] * 3


def test_evaluating_on_the_training_split_is_a_warning(tmp_path):
    folder = write_corpus(tmp_path / "cv", base_rows())
    cfg = ctc_config(tmp_path / "run", cv(folder))
    assert not any("eval.split" in w for w in preflight(cfg)["warnings"])
    cfg.eval.split = "train"
    assert any(w.startswith('eval.split is "train"') for w in preflight(cfg)["warnings"])
