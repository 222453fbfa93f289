"""Transcripts and clips that would poison a run (issue 13, section 5 and pre-flight decoding): control
characters taken out of transcripts with a warning, punctuation left in a CTC vocabulary with the
chars_to_ignore line that removes it, clips shorter than the model's minimum context, and the pre-flight
decode sample (NaN/inf, silent and undecodable clips)."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
import unicodedata

import numpy as np
import pytest
import soundfile as sf

from asr.config import ConfigError, DataConfig, SourceConfig, TextConfig, validate
from asr.data import Labeler, SplitReport, filter_utterances, format_report, read_source_split, write_report
from asr.preflight import format_preflight, output_frames_fn, preflight, weightless_labeler
from asr.text import CharVocab, ignore_pattern, clean_transcript
from helpers import WHISPER_BASE, needs_whisper_base, read_tsv, tiny_ctc_config, tiny_whisper_config
from test_preflight import DEMO_TEXT, base_rows, ctc_config, cv, write_corpus

CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # what may never reach a vocabulary or a TSV cell


def tone(path, seconds, amplitude=0.3, sr=16000, subtype=None):
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(path, (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sr, subtype=subtype)


def corpus_with_clips(tmp_path, clips: dict[str, object], texts: dict[str, str] | None = None, split="train"):
    """The fixture corpus (Common Voice layout) with extra wav clips written into `split`: name -> seconds of
    tone, or a callable writing the file. Rows get `texts[name]` or "bir cümle"."""
    rows = base_rows()
    folder = write_corpus(tmp_path / "cv", rows)
    lines = (folder / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    for name, make in clips.items():
        path = folder / "clips" / name
        make(path) if callable(make) else tone(path, make)
        lines.append(f"x\t{name}\t{(texts or {}).get(name, 'bir cümle')}\t2\t0\ttr")
    (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------
# Control characters.


def test_strip_controls():
    from asr.text import strip_controls

    assert strip_controls("İyi bir cümle.") == ("İyi bir cümle.", "")
    assert strip_controls("a\x00b\x07c\x7fd\x85e\ud800f") == ("abcdef", "\x00\x07\x7f\x85\ud800")
    assert strip_controls("bir\tiki\nüç\r\ndört") == ("bir iki üç  dört", "\t\n\r")
    # Invisible format characters (zero-width non-joiner, bidi marks) and other spaces are not controls.
    assert strip_controls("mi\u200cxa\u00a0b\u200f") == ("mi\u200cxa\u00a0b\u200f", "")
    cfg = TextConfig(lowercase=True)
    assert clean_transcript("A\x00b\tC", cfg, "tr") == "ab c"


def test_control_characters_are_taken_out_of_tsv_and_jsonl_transcripts_with_a_warning(tmp_path, train_clips):
    """NUL and other C0/C1 controls in a Common Voice TSV; in a JSONL manifest also tab, newline and a lone
    surrogate inside the JSON strings: taken out of the text (tab/newline become spaces), the clips kept,
    counted with their ids in the data report and the log line."""
    cvdir = tmp_path / "cv"
    (cvdir / "clips").mkdir(parents=True)
    for c in train_clips[:3]:
        shutil.copy(c, cvdir / "clips" / c.name)
    sentences = ["Bir\x00 cümle.", "İki\x07 cümle\x85.", "Üç cümle."]
    (cvdir / "train.tsv").write_text("client_id\tpath\tsentence\n" + "".join(
        f"s\t{c.name}\t{t}\n" for c, t in zip(train_clips, sentences)), encoding="utf-8")
    man = tmp_path / "man"
    man.mkdir()
    texts = ["bir\tiki\nüç", "dört\u0000beş", "altı\ud800"]  # tab, newline, NUL, a lone surrogate
    jsonl = [{"path": str(c), "text": t} for c, t in zip(train_clips, texts)]
    (man / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl), encoding="utf-8")
    cfg = DataConfig(text=TextConfig(lowercase=True))
    reports = {}
    for name, src, want in (
            ("cv", cv(cvdir, name="cv"), ["Bir cümle.", "İki cümle.", "Üç cümle."]),
            ("man", SourceConfig(kind="manifest", path=str(man), name="man"), ["bir iki üç", "dörtbeş", "altı"])):
        utts, bad = read_source_split(src, "train")
        assert bad == [] and [u.text for u in utts] == want
        report = reports[f"{name}/train"] = SplitReport()
        kept = filter_utterances(utts, bad, cfg, None, report)
        assert len(kept) == 3 and not any(CONTROL.search(u.text + u.label_text) for u in kept)
    assert reports["cv/train"].controls == 2 and reports["man/train"].controls == 3
    assert reports["cv/train"].control_examples == [
        {"id": f"cv/{train_clips[0].stem}", "chars": "U+0000", "text": "Bir cümle."},
        {"id": f"cv/{train_clips[1].stem}", "chars": "U+0007 U+0085", "text": "İki cümle."}]
    assert [e["chars"] for e in reports["man/train"].control_examples] == ["U+0009 U+000A", "U+0000", "U+D800"]
    write_report(reports, tmp_path / "data_report.json")
    out = json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))
    assert out["cv/train"]["control_chars"]["transcripts"] == 2 and out["cv/train"]["kept"] == 3
    assert out["cv/train"]["dropped"] == {}
    log = format_report(reports)
    assert (f"warning: cv/train: control characters taken out of 2 transcripts (tab/newline/CR became spaces), e.g. "
            f"cv/{train_clips[0].stem} (U+0000), cv/{train_clips[1].stem} (U+0007 U+0085)") in log.splitlines()
    assert "warning: man/train: control characters taken out of 3 transcripts" in log


def test_control_characters_reach_neither_the_vocabulary_nor_the_eval_tsv(tmp_path):
    """A CTC run on transcripts holding NUL, BEL and a C1 control: vocab.json and every evaluation TSV are
    free of them, and the log and pre-flight warn with the clip ids."""
    from asr.train import train

    rows = base_rows()
    rows["train"][0][1] = "Bir\x00 cümle\x07 daha."
    rows["train"][1][1] = "Tek\x9b kelime."
    rows["dev"][0][1] = "Dev\x00 cümlesi\x01."
    folder = write_corpus(tmp_path / "cv", rows)
    cfg = tiny_ctc_config(tmp_path / "run", max_steps=1)
    cfg.data.sources[0].path = str(folder)
    cfg.preflight.decode_sample = 0
    cfg.eval.at_start = False  # the evaluation at the end is enough
    train(cfg, fresh=True)
    out = tmp_path / "run"
    vocab = json.loads((out / "vocab" / "vocab.json").read_text(encoding="utf-8"))
    assert not [t for t in vocab if CONTROL.search(t)]
    tsvs = sorted((out / "eval").glob("*.tsv"))
    assert tsvs
    for tsv in tsvs:
        text = tsv.read_text(encoding="utf-8")
        assert not CONTROL.search(text), tsv.name
    refs = {r["id"]: r["reference"] for r in read_tsv(out / "eval" / "step-000001.tsv")}
    dev_id = "tr/" + rows["dev"][0][0][:-4]
    assert refs[dev_id] == "Dev cümlesi."
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "warning: tr/train: control characters taken out of 2 transcripts" in log
    assert f"warning: tr/dev: control characters taken out of 1 transcripts (tab/newline/CR became spaces), e.g. " \
           f"{dev_id} (U+0000 U+0001)" in log
    pre = json.loads((out / "preflight.json").read_text(encoding="utf-8"))
    assert pre["splits"]["tr/train"]["control_chars"]["transcripts"] == 2
    assert any(w.startswith("tr/dev: control characters taken out of 1 transcripts") for w in pre["warnings"])
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["tr/dev"]["control_chars"]["examples"][0]["id"] == dev_id


# ---------------------------------------------------------------------------------------
# Punctuation and symbols in a CTC vocabulary.


def test_extend_chars_to_ignore_keeps_removing_the_old_and_removes_the_new():
    from asr.text import extend_chars_to_ignore

    new = "&'()[|€\\^-]"
    tr_xlsr = r"[\,\?\.\!\-\;\:\"\“\%\‘\”\�\']"  # experiments/tr_xlsr.toml's
    for current in ("", ",?.!", ',?.!;:"“”‘’%-', tr_xlsr, "[,.]", r"\s+-\s+", "[^a-z ]x"):
        value = extend_chars_to_ignore(current, new)
        pattern = ignore_pattern(value)
        old = re.compile(ignore_pattern(current)) if current else None
        sample = "a, b. c? d! e; f: g\" h“ i% j- k ' l|m(n)o[p]q€r\\s^t -  u x"
        for c in new:
            assert re.sub(pattern, "", c) == "", (current, value, c)
        if old is not None:  # whatever the old value removed is still removed
            assert not old.search(re.sub(pattern, "", sample)), (current, value)
        assert re.sub(pattern, "", "abc def") == "abc def"
    assert extend_chars_to_ignore(",?.", "'") == ",?.'"  # a bare list stays a bare list
    assert extend_chars_to_ignore("[,.]", "'") == "[,.']"
    assert extend_chars_to_ignore(r"\s-\s", "'") == r"(?:\s-\s)|[']"
    assert extend_chars_to_ignore("", "|") == r"[\|]"  # a bare "|" would be read as a regex


def run_punctuation(tmp_path, rows, chars_to_ignore, name):
    folder = write_corpus(tmp_path / name / "cv", rows)
    cfg = ctc_config(tmp_path / name / "run", cv(folder))
    cfg.data.text.chars_to_ignore = chars_to_ignore
    cfg.preflight.decode_sample = 0
    validate(cfg)
    return cfg, preflight(cfg)


@pytest.mark.parametrize("extra, line", [
    # A bare list stays one.
    ({0: "Türkiye'nin başkenti."}, """chars_to_ignore = ",?.!;:\\"“”‘’%-'\""""),
    # "|" (the word delimiter), brackets, a backslash: a character class, escaped for TOML.
    ({0: "Bir (iki) | üç & dört [beş] 5€ a\\b", 1: "Türkiye'nin"},
     r'''chars_to_ignore = "[,\\?\\.!;:\"“”‘’%\\-\\&'\\(\\)\\[\\\\\\]\\|€]"'''),
])
def test_punctuation_left_in_ctc_labels_is_a_warning_with_the_line_that_removes_it(tmp_path, extra, line):
    rows = base_rows()
    for k, text in extra.items():
        rows["train"][k][1] = text
    cfg, result = run_punctuation(tmp_path, rows, DEMO_TEXT["chars_to_ignore"], "before")
    punct = result["punctuation"]
    marks = {c for t in extra.values() for c in t if unicodedata.category(c)[0] in "PS"}
    marks -= set(DEMO_TEXT["chars_to_ignore"])
    assert set(punct["chars"]) == marks and punct["chars_to_ignore"] == line
    counts = " ".join(f"{c} x{sum(t.count(c) for t in extra.values())}" for c in punct["chars"])
    warning = (f"training transcripts keep punctuation or symbols that become CTC labels: {counts}; to remove them, "
               f"put under [data.text]: {line}")
    assert warning in result["warnings"]
    assert f"warning: {warning}" in format_preflight(result)
    # The line, pasted into the experiment file, removes them: no warning, none of them in the vocabulary.
    value = tomllib.loads(line)["chars_to_ignore"]
    cfg, after = run_punctuation(tmp_path, rows, value, "after")
    assert after["punctuation"] == {"chars": {}, "chars_to_ignore": None}
    assert not any("punctuation" in w for w in after["warnings"])
    assert after["vocab"]["size"] < result["vocab"]["size"]


def test_a_clean_ctc_corpus_gets_no_punctuation_warning(tmp_path):
    rows = base_rows()
    _, result = run_punctuation(tmp_path, rows, DEMO_TEXT["chars_to_ignore"], "demo")
    assert result["punctuation"] == {"chars": {}, "chars_to_ignore": None} and result["warnings"] == []
    _, raw = run_punctuation(tmp_path, rows, "", "raw")  # nothing removed: the fixture's . ? !
    assert set(raw["punctuation"]["chars"]) == {".", "?", "!"}
    assert raw["punctuation"]["chars_to_ignore"] == 'chars_to_ignore = "!.?"'


# ---------------------------------------------------------------------------------------
# Clips shorter than the model's minimum context.


@pytest.mark.parametrize("layout, expected", [
    ({"conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2]}, 400),
    ({"conv_kernel": [10, 3, 3], "conv_stride": [5, 3, 2]}, 50),
    ({"conv_kernel": [4], "conv_stride": [4]}, 4),
])
def test_min_input_samples_is_the_receptive_field(layout, expected):
    from asr.data import min_input_samples

    frames = output_frames_fn(dict(layout, adapter_layers=0, adapter_stride=1))
    n = min_input_samples(frames)
    assert n == expected and frames(n) == 1 and frames(n - 1) < 1


def test_ctc_clip_shorter_than_the_receptive_field_is_too_short_even_with_one_character(tmp_path):
    """0.02 s is 320 samples, under the 400 the feature encoder needs for one frame: too_short (it was
    ctc_infeasible), while a one-character clip of 0.03 s (480 samples, one frame) is kept."""
    folder = corpus_with_clips(tmp_path, {"tiny.wav": 0.02, "one.wav": 0.03}, {"tiny.wav": "a", "one.wav": "b"})
    cfg = ctc_config(tmp_path / "run", cv(folder))
    result = preflight(cfg)
    f = result["splits"]["tr/train"]["filter"]
    assert f["dropped"] == {"too_short": 1} and f["kept"] == 33
    assert f["examples"]["too_short"] == [{"id": "tr/tiny", "path": str(folder / "clips" / "tiny.wav"),
                                           "duration": 0.02, "model_min_s": 0.025}]
    labeler = weightless_labeler(cfg, CharVocab.build(["a b"]))
    assert labeler.min_samples == 400


@needs_whisper_base
def test_whisper_clip_under_a_tenth_of_a_second_is_too_short_even_with_one_character(tmp_path):
    from asr.config import Config, ModelConfig, RunConfig

    folder = corpus_with_clips(tmp_path, {"tiny.wav": 0.05, "ok.wav": 0.1}, {"tiny.wav": "a", "ok.wav": "b"})
    cfg = Config(run=RunConfig(out_dir=str(tmp_path / "run")), data=DataConfig(sources=[cv(folder, test="")]),
                 model=ModelConfig(name=str(WHISPER_BASE)))
    cfg.preflight.decode_sample = 0
    result = preflight(cfg)
    f = result["splits"]["tr/train"]["filter"]
    assert f["dropped"] == {"too_short": 1} and f["kept"] == 33
    assert f["examples"]["too_short"][0]["id"] == "tr/tiny" and f["examples"]["too_short"][0]["model_min_s"] == 0.1
    # Whisper writes punctuation (the fixture's . ? !) with its own tokens: no vocabulary warning.
    assert result["punctuation"] is None and not any("punctuation" in w for w in result["warnings"])


@needs_whisper_base
def test_the_models_labelers_have_the_same_minimum_as_the_weightless_ones(tmp_path):
    from asr.models import build

    cfg = tiny_ctc_config(tmp_path / "ctc")
    vocab = CharVocab.build(["bir iki"])
    assert build(cfg.model, vocab, ["tr"]).labeler.min_samples == weightless_labeler(cfg, vocab).min_samples == 400
    cfg = tiny_whisper_config(tmp_path / "whisper")
    assert build(cfg.model, None, ["tr"]).labeler.min_samples == weightless_labeler(cfg).min_samples == 1600


def test_filter_drops_below_the_labelers_minimum_as_too_short(tmp_path):
    tone(tmp_path / "a.wav", 0.05)
    from asr.data import Utterance

    utts = [Utterance(id="a", text="a", language="tr", source="s", path=str(tmp_path / "a.wav"))]
    report = SplitReport()
    labeler = Labeler(encode=lambda t, lang: [1] * len(t), min_samples=1600)
    assert filter_utterances(utts, [], DataConfig(), labeler, report) == []
    assert dict(report.dropped) == {"too_short": 1}
    assert filter_utterances(utts, [], DataConfig(), Labeler(encode=labeler.encode, min_samples=800), SplitReport())


# ---------------------------------------------------------------------------------------
# The pre-flight decode sample.


def nan_wav(path):
    tone(path, 1.0, subtype="FLOAT")
    data, sr = sf.read(path, dtype="float32")
    data[1000:1100] = np.nan
    sf.write(path, data, sr, subtype="FLOAT")


def truncated_flac(path):
    """A FLAC whose header is whole (the duration probe reads it) and whose audio is cut half-way."""
    tone(path.with_suffix(".tmp.flac"), 1.0)
    data = path.with_suffix(".tmp.flac").read_bytes()
    path.with_suffix(".tmp.flac").unlink()
    path.write_bytes(data[: len(data) // 2])


def test_preflight_decodes_and_reports_nan_silent_and_undecodable_clips(tmp_path):
    folder = corpus_with_clips(tmp_path, {
        "nan.wav": nan_wav,
        "zeros.wav": lambda p: sf.write(p, np.zeros(16000), 16000),
        "quiet.wav": lambda p: tone(p, 1.0, amplitude=1e-4, subtype="FLOAT"),  # -83 dBFS
        "loudish.wav": lambda p: tone(p, 1.0, amplitude=2e-3),  # -57 dBFS: not silent
        "cut.flac": truncated_flac,
    })
    cfg = ctc_config(tmp_path / "run", cv(folder))
    result = preflight(cfg)
    assert result["errors"] == []
    s = result["splits"]["tr/train"]
    assert s["filter"]["kept"] == 37  # the headers are fine: only decoding finds them
    d = s["decode"]
    assert (d["decoded"], d["of"], d["sampled"]) == (37, 37, False)
    assert [e["id"] for e in d["non_finite"]["examples"]] == ["tr/nan"] and d["non_finite"]["count"] == 1
    assert "NaN or infinite" in d["non_finite"]["examples"][0]["detail"]
    assert [e["id"] for e in d["undecodable"]["examples"]] == ["tr/cut"] and d["undecodable"]["count"] == 1
    assert "cut.flac" in d["undecodable"]["examples"][0]["detail"]
    assert d["silent"]["count"] == 2
    assert d["silent"]["examples"] == [{"id": "tr/zeros", "dbfs": None}, {"id": "tr/quiet", "dbfs": -83.0}]
    warnings = "\n".join(result["warnings"])
    assert "tr/train: of 37 clips decoded, 1 fail to decode and 1 hold NaN or infinite samples (training drops them)" \
           in warnings and "cut.flac" in warnings and "nan.wav" in warnings
    assert ("tr/train: 2 of 37 clips decoded are silent (all zeros or below -60 dBFS RMS), e.g. tr/zeros (all zeros), "
            "tr/quiet (-83.0 dBFS)") in result["warnings"]
    assert result["splits"]["tr/dev"]["decode"]["silent"]["count"] == 0
    assert "37: 2/2" in format_preflight(result)


def test_a_split_whose_every_decoded_clip_fails_is_an_error(tmp_path):
    folder = write_corpus(tmp_path / "cv", base_rows())
    (folder / "dev.tsv").write_text("client_id\tpath\tsentence\n" + "".join(
        f"x\tnan{k}.wav\tbir\n" for k in range(3)), encoding="utf-8")
    for k in range(3):
        nan_wav(folder / "clips" / f"nan{k}.wav")
    result = preflight(ctc_config(tmp_path / "run", cv(folder)))
    assert len(result["errors"]) == 1
    assert result["errors"][0].startswith("tr/dev: all 3 clips decoded failed (0 undecodable, 3 NaN/inf), e.g. ")
    assert "nan0.wav" in result["errors"][0]
    assert result["splits"]["tr/train"]["decode"]["non_finite"]["count"] == 0


def test_decode_sample_caps_the_clips_decoded_and_zero_turns_it_off(tmp_path):
    folder = write_corpus(tmp_path / "cv", base_rows())
    cfg = ctc_config(tmp_path / "run", cv(folder))
    cfg.preflight.decode_sample = 5
    d = preflight(cfg)["splits"]["tr/train"]["decode"]
    assert (d["decoded"], d["of"], d["sampled"]) == (5, 32, True)
    cfg.preflight.decode_sample = 0
    assert preflight(cfg)["splits"]["tr/train"]["decode"] is None
    cfg.preflight.decode_sample = -1
    with pytest.raises(ConfigError, match="preflight.decode_sample"):
        validate(cfg)
