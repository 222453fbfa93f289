"""Pre-flight data checks: every split read once, before any training, without model weights.

    python run.py --exp FILE --check       (and at the start of every training run)

`preflight(cfg)` reads each source's train, dev and test split expressions (those that are set) with
asr.data's readers, takes durations from the audio file headers, and reports per split: clips, hours,
speakers, duration and characters-per-second percentiles, chars/s outliers (likely misaligned or wrong
transcripts), characters outside the training vocabulary, transcripts with control characters (taken
out by the readers); the overlap between the training splits and each evaluation split (identical
sentences after script-aware normalising, shared speakers); label lengths (Whisper: tokens with the
prefix and <|endoftext|>, against the 448 limit; CTC: output frames against labels plus repeats); what
the filters will drop, by reason; the clips of a decoded sample (`preflight.decode_sample` per split) that
fail to decode, hold NaN/inf samples or are silent; and (CTC) the punctuation and symbols that would
become vocabulary labels, with the `data.text.chars_to_ignore` value that removes them. The drop counts
come from asr.data.filter_utterances with a labeler built from the tokenizer or the model config alone
(`weightless_labeler`), so they are exactly those training writes to data_report.json.

`format_preflight(result)` is a short table for the terminal; `write_preflight(result, out_dir)`
writes <out_dir>/preflight.json.
"""

from __future__ import annotations

import math
import random
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asr.audio import WHISPER_SAMPLE_RATE, NonFiniteAudio
from asr.checkpoint import json_text, write_files
from asr.config import Config, duplicate_source_names, eval_set_specs, toml_value
from asr.data import (WHISPER_MIN_S, Labeler, SplitReport, Utterance, control_chars_line, ctc_min_frames,
                      filter_utterances, load_utterance_audio, min_input_samples, read_source_split, source_name)
from asr.text import (PAD, UNK, WORD_DELIMITER, clean_transcript, extend_chars_to_ignore, normalize,
                      run_vocab)

ROLES = ("train", "dev", "test")  # the split fields of a source; dev and test are evaluation splits
PERCENTILES = (0, 5, 50, 95, 100)
TEXT_CHARS = 120  # transcripts in examples are cut to this many characters
READ_ERRORS = ("bad_row", "bad_path", "missing_file", "undecodable")  # rows that give no usable clip
SILENT_DBFS = -60.0  # a decoded clip whose RMS level is below this (or all zeros) is silent


# ---------------------------------------------------------------------------------------
# A labeler without weights: the same label ids and output frame counts the built model gives.


def ctc_conv_layout(mcfg) -> dict:
    """The feature encoder's conv kernels and strides (and adapter layers) of the CTC model that
    asr.models.build_ctc would build from `mcfg` (a ModelConfig), read from its config alone."""
    import transformers
    from transformers import AutoConfig

    from asr.models import SCRATCH_CONFIGS, ModelError

    try:
        if mcfg.init == "scratch":
            if mcfg.name:
                mconf = AutoConfig.from_pretrained(mcfg.name)
            else:
                mconf = getattr(transformers, SCRATCH_CONFIGS[mcfg.arch])(
                    feat_extract_norm="layer", do_stable_layer_norm=True)
            for k in ("conv_dim", "conv_kernel", "conv_stride"):
                if getattr(mcfg, k):
                    setattr(mconf, k, list(getattr(mcfg, k)))
        else:  # build_ctc loads a pretrained model's config as it is (size fields do not apply)
            mconf = AutoConfig.from_pretrained(mcfg.name)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model.name: cannot load CTC model config '{mcfg.name}': {msg}") from None
    kernels, strides = list(mconf.conv_kernel), list(mconf.conv_stride)
    if not len(mconf.conv_dim) == len(kernels) == len(strides):
        raise ModelError(f"model.conv_dim, conv_kernel, conv_stride: need one entry per conv layer each "
                         f"(got {len(mconf.conv_dim)}, {len(kernels)}, {len(strides)})")
    adapter = bool(getattr(mconf, "add_adapter", False))
    return {"conv_kernel": kernels, "conv_stride": strides,
            "adapter_layers": int(getattr(mconf, "num_adapter_layers", 0)) if adapter else 0,
            "adapter_stride": int(getattr(mconf, "adapter_stride", 1)) if adapter else 1}


def output_frames_fn(layout: dict):
    """n input samples -> output frames: floor((n - kernel) / stride) + 1 per conv layer (and per adapter
    layer, kernel 1), the formula of transformers' `_get_feat_extract_output_lengths`."""
    layers = list(zip(layout["conv_kernel"], layout["conv_stride"]))
    layers += [(1, layout["adapter_stride"])] * layout["adapter_layers"]

    def output_frames(n_samples: int) -> int:
        n = int(n_samples)
        for kernel, stride in layers:
            n = (n - kernel) // stride + 1
        return n

    return output_frames


def weightless_labeler(cfg: Config, vocab=None) -> Labeler:
    """The Labeler training filters with (asr.models.Bundle.labeler, capped at data.max_label_tokens as
    asr.train.prepare caps it), built without model weights.

    Whisper: the tokenizer and the model config only; encode = <|startoftranscript|> [<|lang|>] <|task|>
    <|notimestamps|> + text tokens + <|endoftext|>, through Bundle.encode_whisper itself (on a Bundle
    without a model), so the language map and task are handled as in training; an unknown language
    raises ModelError as asr.models.build does. CTC: `vocab.encode` and the output frame count of the
    conv feature encoder (needs `vocab`, a CharVocab or PieceVocab)."""
    from asr.models import Bundle, ModelError, check_language, infer_family

    mcfg = cfg.model
    family = infer_family(mcfg)
    if family == "whisper":
        from transformers import AutoConfig, WhisperTokenizer

        if mcfg.task not in ("transcribe", "translate"):
            raise ModelError(f"model.task: {mcfg.task!r} is not 'transcribe' or 'translate'")
        try:
            tokenizer = WhisperTokenizer.from_pretrained(mcfg.name)
            mconf = AutoConfig.from_pretrained(mcfg.name)
        except (OSError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"model.name: cannot load Whisper tokenizer '{mcfg.name}': {msg}") from None
        tokenizer.model_max_length = 1 << 62  # lengths are checked here; no "longer than 1024" warning per clip
        shell = Bundle("whisper", None, mcfg, tokenizer=tokenizer)
        for lang in sorted({s.language for s in cfg.data.sources}):
            check_language(shell.whisper_language(lang))
        max_tokens = int(mconf.max_target_positions)
        if max_tokens and cfg.data.max_label_tokens > 0:
            max_tokens = min(max_tokens, cfg.data.max_label_tokens)
        return Labeler(encode=shell.encode_whisper, max_tokens=max_tokens,
                       min_samples=round(WHISPER_MIN_S * WHISPER_SAMPLE_RATE))
    if vocab is None:
        raise ModelError("a CTC model needs a vocabulary")
    frames = output_frames_fn(ctc_conv_layout(mcfg))
    return Labeler(encode=lambda text, lang: vocab.encode(text), output_frames=frames,
                   min_samples=min_input_samples(frames))


# ---------------------------------------------------------------------------------------
# Small helpers.


def _percentiles(values) -> dict | None:
    if not values:
        return None
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in PERCENTILES}


def show_char(c: str) -> str:
    """A character for the terminal: combining marks on a dotted circle with their code point (they would
    otherwise sit on the quote), invisible and space characters as code points."""
    cat = unicodedata.category(c)
    if cat[0] == "M":
        return f"\u25cc{c}(U+{ord(c):04X})"
    if cat[0] in "CZ":
        return f"U+{ord(c):04X}"
    return c


def _cut(text: str, n: int = TEXT_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _vocab_chars(vocab) -> set[str]:
    """Characters a CTC vocabulary can write (a space is the word delimiter)."""
    if vocab.kind == "char":
        return {t for t in vocab.tokens if t not in (PAD, UNK, WORD_DELIMITER)} | {" ", WORD_DELIMITER}
    chars = {c for t in vocab.tokens if t not in (PAD, UNK) for c in t.replace("▁", " ")}
    return chars | {" "}


# ---------------------------------------------------------------------------------------
# One split.


def _decode_sample(utts: list[Utterance], cfg: Config, workers: int) -> dict | None:
    """Decode the clips the filters keep, all of them up to preflight.decode_sample, else a random sample of
    that many (seeded with run.seed), in a thread pool: which fail to decode (training drops them then),
    hold NaN/inf samples (dropped too) or are silent (all zeros, or an RMS level below SILENT_DBFS)."""
    n = cfg.preflight.decode_sample
    if n <= 0:
        return None
    t0 = time.time()
    total = len(utts)
    if total > n:  # a seeded sample, in the split's order
        utts = [utts[k] for k in sorted(random.Random(cfg.run.seed).sample(range(total), n))]

    def check(u: Utterance):
        try:
            audio = load_utterance_audio(u, None)  # (N,) at the stored rate: twice as fast, the same findings
        except NonFiniteAudio as e:
            return "non_finite", {"id": u.id, "detail": str(e)}
        except Exception as e:  # AudioError, or whatever a third-party decoder raises: training drops it
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return "undecodable", {"id": u.id, "detail": msg}
        rms = float(audio.double().pow(2).mean().sqrt()) if audio.numel() else 0.0
        dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
        if dbfs < SILENT_DBFS:
            return "silent", {"id": u.id, "dbfs": None if rms == 0 else round(dbfs, 1)}  # None: all zeros
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(check, utts))
    out = {"decoded": len(utts), "of": total, "sampled": len(utts) < total}
    for kind in ("undecodable", "non_finite", "silent"):
        hits = [f[1] for f in found if f is not None and f[0] == kind]
        out[kind] = {"count": len(hits), "examples": hits[: cfg.preflight.examples]}
    out["time_s"] = round(time.time() - t0, 3)
    return out


def _split_stats(utts: list[Utterance], bad: list, report: SplitReport, cfg: Config, family: str | None,
                 labeler: Labeler | None, train_chars: set[str] | None, kept: list[Utterance],
                 workers: int) -> dict:
    pc = cfg.preflight
    readable = [u for u in utts if u.duration > 0]  # filter_utterances fills durations of readable clips only
    durations = [u.duration for u in readable]
    speakers = {u.speaker for u in utts if u.speaker}
    read_errors = {r: report.dropped[r] for r in READ_ERRORS if report.dropped.get(r)}
    out = {
        "rows": report.total,
        "clips": len(readable),
        "unreadable": sum(read_errors.values()),
        "hours": round(sum(durations) / 3600, 4),
        "speakers": len(speakers),
        "duration_s": _percentiles(durations),
    }

    # Characters per second of the cleaned transcript, and the clips far from the split's median.
    cps = [(len(u.label_text) / u.duration, u) for u in readable if u.label_text.strip()]
    out["chars_per_s"] = _percentiles([c for c, _ in cps])
    outliers = []
    if cps:
        median = out["chars_per_s"]["p50"]
        if median > 0:
            for c, u in cps:
                ratio = c / median
                if ratio > pc.cps_outlier_factor or ratio < 1 / pc.cps_outlier_factor:
                    outliers.append((abs(math.log(ratio)) if ratio > 0 else math.inf, c, ratio, u))
    outliers.sort(key=lambda x: -x[0])
    out["cps_outliers"] = {
        "factor": pc.cps_outlier_factor, "count": len(outliers),
        "examples": [{"id": u.id, "duration": round(u.duration, 3), "chars": len(u.label_text), "chars_per_s": round(c, 2),
                      "x_median": round(r, 2), "text": _cut(u.text)} for _, c, r, u in outliers[: pc.examples]],
    }

    # Characters of the cleaned transcripts that the training vocabulary does not hold.
    if train_chars is not None:
        counts, clips, examples = Counter(), 0, []
        for u in utts:
            text = clean_transcript(u.text, cfg.data.text, u.language)
            missing = [c for c in text if c not in train_chars]
            if missing:
                counts.update(missing)
                clips += 1
                if len(examples) < pc.examples:
                    examples.append({"id": u.id, "chars": "".join(sorted(set(missing))), "text": _cut(u.text)})
        out["oov"] = {"chars": dict(counts.most_common()), "clips": clips, "examples": examples}
    else:
        out["oov"] = None

    # Label lengths against the model: Whisper tokens, or CTC frames vs labels plus repeats.
    if labeler is not None:
        with_text = [u for u in readable if u.label_text.strip()]
        if family == "whisper":
            lengths = [(len(u.labels or labeler.encode(u.label_text, u.language)), u) for u in with_text]
            over = sorted(((n, u) for n, u in lengths if labeler.max_tokens and n > labeler.max_tokens),
                          key=lambda x: -x[0])
            out["labels"] = {
                "kind": "whisper_tokens", "limit": labeler.max_tokens, "tokens": _percentiles([n for n, _ in lengths]),
                "over_limit": len(over),
                "examples": [{"id": u.id, "tokens": n, "duration": round(u.duration, 3), "text": _cut(u.text)}
                             for n, u in over[: pc.examples]],
            }
        else:
            rows = []
            for u in with_text:
                labels = u.labels or labeler.encode(u.label_text, u.language)
                frames = labeler.output_frames(int(round(u.duration * cfg.data.sample_rate)))
                need = ctc_min_frames(labels)
                rows.append((frames / max(need, 1), frames, need, u))
            bad_rows = sorted((r for r in rows if r[1] < r[2]), key=lambda r: r[0])
            out["labels"] = {
                "kind": "ctc_frames", "ratio": _percentiles([r for r, *_ in rows]), "infeasible": len(bad_rows),
                "examples": [{"id": u.id, "frames": f, "needed": n, "duration": round(u.duration, 3),
                              "text": _cut(u.text)} for _, f, n, u in bad_rows[: pc.examples]],
            }
    else:
        out["labels"] = None

    # What the filters drop: the same counts as data_report.json.
    out["filter"] = {"total": report.total, "kept": report.kept, "kept_hours": round(report.kept_hours, 4),
                     "dropped": dict(report.dropped), "examples": {k: list(v) for k, v in report.examples.items()}}
    out["control_chars"] = {"transcripts": report.controls, "examples": list(report.control_examples)}
    out["decode"] = _decode_sample(kept, cfg, workers)
    return out


def _overlap(train: list[Utterance], evals: list[Utterance], examples: int) -> dict:
    """Sentences (script-aware normalised) and speakers an evaluation split shares with the training splits."""
    def key(u):
        return normalize(u.text, u.language)

    train_sents = Counter(k for k in map(key, train) if k)
    eval_keys = [(key(u), u) for u in evals]
    shared = [(k, u) for k, u in eval_keys if k and k in train_sents]
    per_sentence = Counter(k for k, _ in shared)
    first_text = {}
    for k, u in shared:
        first_text.setdefault(k, u.text)
    train_spk = Counter(u.speaker for u in train if u.speaker)
    eval_spk = Counter(u.speaker for u in evals if u.speaker)
    shared_spk = [s for s in eval_spk if s in train_spk]
    shared_spk.sort(key=lambda s: -eval_spk[s])
    train_paths = {(u.path, u.table, u.row) for u in train}
    return {
        "eval_clips": len(evals),
        "sentences": {
            "clips": len(shared), "distinct": len(per_sentence),
            "share": round(len(shared) / max(len(evals), 1), 4),
            "examples": [{"sentence": k, "text": _cut(first_text[k]), "eval_clips": n, "train_clips": train_sents[k]}
                         for k, n in per_sentence.most_common(examples)],
        },
        "speakers": {
            "shared": len(shared_spk), "eval_speakers": len(eval_spk),
            "clips": sum(eval_spk[s] for s in shared_spk),
            "examples": [{"speaker": s, "eval_clips": eval_spk[s], "train_clips": train_spk[s]}
                         for s in shared_spk[:examples]],
        },
        "same_clips": sum(1 for u in evals if (u.path, u.table, u.row) in train_paths),
    }


# ---------------------------------------------------------------------------------------
# The whole check.


def preflight(cfg: Config, workers: int = 8) -> dict:
    """Read every split once and check it (see the module docstring). Never raises for bad data: rows that
    cannot be read are counted by reason, a source or model that cannot be used is listed in `errors`."""
    from asr.models import ModelError, infer_family

    t0 = time.time()
    errors: list[str] = []
    result: dict = {"model": cfg.model.name, "family": None, "eval_split": cfg.eval.split, "vocab": None,
                    "punctuation": None, "splits": {}, "overlap": {}, "warnings": [], "errors": errors}

    # Read each distinct (source, expression) once.
    names = [source_name(s) for s in cfg.data.sources]
    if duplicate := duplicate_source_names(cfg):
        errors.append(duplicate)
    used = {(n, "train") for n, s in zip(names, cfg.data.sources) if s.train}
    used |= {(src, split) for _, src, split in eval_set_specs(cfg)}
    unused_missing: list[str] = []
    reads: dict[tuple[int, str], tuple[list, list]] = {}
    roles: dict[str, tuple[int, str, str]] = {}  # label -> (source index, role, expression)
    shard_texts: list[str] = []
    for i, (src, name) in enumerate(zip(cfg.data.sources, names)):
        if src.kind == "shards":  # its index.json and shard footers, not its audio (asr.shards)
            shard_texts += _shards(src, cfg, result, errors)
            continue
        for role in ROLES:
            expr = getattr(src, role)
            if not expr:
                continue
            label = f"{name}/{role}"
            if label in roles:
                label = f"{name}#{i}/{role}"
            if (i, expr) not in reads:
                try:
                    reads[i, expr] = read_source_split(src, expr)
                except Exception as e:  # DataError (missing folder or split) and anything a reader raises
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    # A split the run trains or evaluates on is an error; another (a default test = "test"
                    # of a folder without one) only a warning.
                    (errors if (name, role) in used else unused_missing).append(f"{label}: {msg}")
                    continue
            roles[label] = (i, role, expr)

    # The model side: family, vocabulary (CTC), labeler.
    family = None
    try:
        family = infer_family(cfg.model)
    except ModelError as e:
        errors.append(str(e))
    result["family"] = family
    train_utts = [u for label, (i, role, expr) in roles.items() if role == "train" for u in reads[i, expr][0]]
    train_texts = [clean_transcript(u.text, cfg.data.text, u.language) for u in train_utts] + shard_texts
    vocab, train_chars = None, None
    if family == "ctc":
        try:
            vocab, origin = run_vocab(cfg.data, train_texts, Path(cfg.run.out_dir) / "vocab")
        except Exception as e:
            errors.append(f"vocabulary: {type(e).__name__}: {e}")
            origin = "none"
        if vocab is not None:
            train_chars = _vocab_chars(vocab)
            result["vocab"] = {"kind": vocab.kind, "size": len(vocab), "from": origin}
            result["punctuation"] = _punctuation(train_texts, cfg)
        else:
            errors.append("no training transcripts to build a CTC vocabulary from")
    elif train_texts:
        train_chars = {c for t in train_texts for c in t} | {" "}
        result["vocab"] = {"kind": "training_characters", "size": len(train_chars) - 1, "from": "built"}
    labeler = None
    if family is not None and (family == "whisper" or vocab is not None):
        try:
            labeler = weightless_labeler(cfg, vocab)
        except ModelError as e:
            errors.append(str(e))
        except Exception as e:
            errors.append(f"model: {type(e).__name__}: {e}")
    if labeler is not None and labeler.output_frames is not None:  # CTC output frames per second of audio
        sr = cfg.data.sample_rate
        result["frame_rate_hz"] = round((labeler.output_frames(11 * sr) - labeler.output_frames(sr)) / 10, 3)

    # Filter each distinct read once (durations from headers, in a thread pool), then the statistics.
    done: dict[tuple[int, str], dict] = {}
    for label, (i, role, expr) in roles.items():
        if (i, expr) not in done:
            utts, bad = reads[i, expr]
            report = SplitReport()
            kept = filter_utterances(utts, bad, cfg.data, labeler, report, workers=workers)
            done[i, expr] = _split_stats(utts, bad, report, cfg, family, labeler, train_chars, kept, workers)
        result["splits"][label] = dict(done[i, expr], source=names[i], role=role, expr=expr)

    # Overlap of each evaluation split with all the training splits (training mixes them).
    for label, (i, role, expr) in roles.items():
        if role != "train" and train_utts:
            result["overlap"][label] = _overlap(train_utts, reads[i, expr][0], cfg.preflight.examples)

    for label, s in result["splits"].items():  # every clip decoded failed: nothing to train or score on
        d = s["decode"]
        if d and d["decoded"] and d["undecodable"]["count"] + d["non_finite"]["count"] == d["decoded"]:
            ex = (d["undecodable"]["examples"] + d["non_finite"]["examples"])[0]
            errors.append(f"{label}: all {d['decoded']} clips decoded failed "
                          f"({d['undecodable']['count']} undecodable, {d['non_finite']['count']} NaN/inf), "
                          f"e.g. {ex['detail']}")
    for set_name, src, split in eval_set_specs(cfg):  # it would score no utterance: no result at all
        s = result["splits"].get(f"{src}/{split}")
        if s is not None and not s["filter"]["kept"]:
            why = ", ".join(f"{k} {v}" for k, v in sorted(s["filter"]["dropped"].items())) or "no rows"
            errors.append(f"evaluation set '{set_name}' ({src}/{split}): no utterance left after filtering "
                          f"({s['filter']['total']} read: {why})")
    result["warnings"] = ([f"{m} (not used by this run)" for m in unused_missing] + _warnings(result)
                          + result.pop("shard_warnings", []))
    result["time_s"] = round(time.time() - t0, 3)
    return result


def _shards(src, cfg: Config, result: dict, errors: list) -> list[str]:
    """A shards source's pre-flight entry (result["shards"]); returns its cleaned transcripts (text column only)."""
    from asr.shards import ShardSource, preflight_shards

    label = f"{source_name(src)}/train"
    try:
        entry = result.setdefault("shards", {})[label] = preflight_shards(src, cfg)
        errors.extend(entry["errors"])
        if entry["undecodable_count"]:
            ex = entry["undecodable"][0]
            result.setdefault("shard_warnings", []).append(
                f"{label}: of {entry['decoded']} clips decoded, {entry['undecodable_count']} fail to decode, e.g. "
                f"{ex['id']}: {ex['detail']}")
        return ShardSource(src).texts(cfg.data)
    except Exception as e:  # DataError (a missing or malformed index.json, a shard that cannot be read)
        errors.append(f"{label}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        return []


def _punctuation(train_texts: list[str], cfg: Config) -> dict:
    """Punctuation and symbols (Unicode P*, S*) left in the cleaned training transcripts, which a CTC
    vocabulary makes labels of: their counts and the chars_to_ignore value that would remove them."""
    counts = Counter(c for t in train_texts for c in t if unicodedata.category(c)[0] in "PS")
    current = cfg.data.text.chars_to_ignore
    value = extend_chars_to_ignore(current, "".join(sorted(counts))) if counts else current
    return {"chars": dict(counts.most_common()),
            "chars_to_ignore": f"chars_to_ignore = {toml_value(value)}" if counts else None}


def _warnings(result: dict) -> list[str]:
    lines = []
    if result["eval_split"] == "train":
        lines.append("eval.split is \"train\": evaluation during training scores the training clips themselves")
    punct = result["punctuation"]
    if punct and punct["chars"]:
        chars = " ".join(f"{show_char(c)} x{n}" for c, n in punct["chars"].items())
        lines.append(f"training transcripts keep punctuation or symbols that become CTC labels: {chars}; to remove "
                     f"them, put under [data.text]: {punct['chars_to_ignore']}")
    for label, s in result["splits"].items():
        drop = s["filter"]["dropped"]
        if drop:
            lines.append(f"{label}: the filters drop {sum(drop.values())} of {s['filter']['total']} clips ("
                         + ", ".join(f"{k} {v}" for k, v in sorted(drop.items())) + ")")
        if s["cps_outliers"]["count"]:
            ex = s["cps_outliers"]["examples"][0]
            lines.append(f"{label}: {s['cps_outliers']['count']} clips with chars/s more than {s['cps_outliers']['factor']:g}x "
                         f"above or below the median (likely misaligned or wrong transcripts), e.g. {ex['id']} "
                         f"{ex['duration']} s {ex['chars_per_s']} chars/s ({ex['x_median']}x the median)")
        if s["control_chars"]["transcripts"]:
            cc = s["control_chars"]
            lines.append(f"{label}: {control_chars_line(cc['transcripts'], cc['examples'])}")
        d = s["decode"]
        if d and (d["undecodable"]["count"] or d["non_finite"]["count"]):
            ex = (d["undecodable"]["examples"] + d["non_finite"]["examples"])[:3]
            lines.append(f"{label}: of {d['decoded']} clips decoded, {d['undecodable']['count']} fail to decode and "
                         f"{d['non_finite']['count']} hold NaN or infinite samples (training drops them), e.g. "
                         + "; ".join(e["detail"] for e in ex))
        if d and d["silent"]["count"]:
            ex = ", ".join(f"{e['id']} ({'all zeros' if e['dbfs'] is None else str(e['dbfs']) + ' dBFS'})"
                           for e in d["silent"]["examples"][:3])
            lines.append(f"{label}: {d['silent']['count']} of {d['decoded']} clips decoded are silent (all zeros or "
                         f"below {SILENT_DBFS:g} dBFS RMS), e.g. {ex}")
        if s["oov"] and s["oov"]["clips"]:
            chars = " ".join(f"{show_char(c)} x{n}" for c, n in list(s["oov"]["chars"].items())[:10])
            lines.append(f"{label}: {s['oov']['clips']} clips with characters outside the training vocabulary: {chars}")
        lab = s["labels"]
        if lab and lab["kind"] == "whisper_tokens" and lab["over_limit"]:
            lines.append(f"{label}: {lab['over_limit']} clips with labels over {lab['limit']} tokens, e.g. "
                         f"{lab['examples'][0]['id']} ({lab['examples'][0]['tokens']} tokens)")
        if lab and lab["kind"] == "ctc_frames" and lab["infeasible"]:
            ex = lab["examples"][0]
            lines.append(f"{label}: {lab['infeasible']} clips with fewer CTC frames than labels plus repeats, e.g. "
                         f"{ex['id']} ({ex['frames']} frames, {ex['needed']} needed)")
    for label, o in result["overlap"].items():
        if o["sentences"]["clips"]:
            ex = o["sentences"]["examples"][0]
            lines.append(f"{label}: {o['sentences']['clips']} clips ({100 * o['sentences']['share']:.1f}%) have a sentence "
                         f"that is also in train ({o['sentences']['distinct']} distinct), e.g. \"{_cut(ex['text'], 60)}\"")
        if o["speakers"]["shared"]:
            lines.append(f"{label}: {o['speakers']['shared']} of {o['speakers']['eval_speakers']} speakers are also in "
                         f"train ({o['speakers']['clips']} clips)")
        if o["same_clips"]:
            lines.append(f"{label}: {o['same_clips']} clips are the same audio files as training clips")
    return lines


# ---------------------------------------------------------------------------------------
# Output.


def _fmt(p: dict | None, keys=("p5", "p50", "p95"), digits: int = 1) -> str:
    if not p:
        return "-"
    return "/".join(f"{p[k]:.{digits}f}" for k in keys)


def format_preflight(result: dict) -> str:
    """A short table for the terminal: one row per split, the overlap, then warnings and errors."""
    vocab = result.get("vocab") or {}
    head = f"pre-flight: {result.get('family') or '?'} model {result.get('model') or '(scratch)'}"
    if vocab:
        head += f", vocabulary {vocab['kind']} {vocab['size']} ({vocab['from']})"
    if result.get("frame_rate_hz"):
        head += f", {result['frame_rate_hz']:g} frames/s"
    head += f"; {result.get('time_s', 0):.1f} s"
    cols = ["split", "clips", "hours", "spk", "dur s p0/p5/p50/p95/p100", "chars/s p5/p50/p95", "out", "oov (clips)",
            "labels", "kept/total", "dropped", "decoded: bad/silent"]
    rows = []
    for label, s in result["splits"].items():
        lab = s["labels"]
        if lab is None:
            labels = "-"
        elif lab["kind"] == "whisper_tokens":
            labels = f"tok p50 {_fmt(lab['tokens'], ('p50',), 0)} max {_fmt(lab['tokens'], ('p100',), 0)}/{lab['limit']}"
        else:
            labels = f"frames/need p0 {_fmt(lab['ratio'], ('p0',), 2)} p50 {_fmt(lab['ratio'], ('p50',), 2)}"
        oov = "-"
        if s["oov"] and s["oov"]["clips"]:
            chars = " ".join(show_char(c) for c in list(s["oov"]["chars"])[:8])
            oov = f"{chars} ({s['oov']['clips']} clips)"
        drop, d = s["filter"]["dropped"], s["decode"]
        decoded = "-" if d is None else (f"{d['decoded']}: {d['undecodable']['count'] + d['non_finite']['count']}"
                                         f"/{d['silent']['count']}")
        rows.append([label, str(s["clips"]), f"{s['hours']:.3f}", str(s["speakers"]),
                     _fmt(s["duration_s"], ("p0", "p5", "p50", "p95", "p100")), _fmt(s["chars_per_s"]),
                     str(s["cps_outliers"]["count"]), oov, labels, f"{s['filter']['kept']}/{s['filter']['total']}",
                     ", ".join(f"{k} {v}" for k, v in sorted(drop.items())) or "-", decoded])
    widths = [max(len(r[k]) for r in [cols] + rows) for k in range(len(cols))]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for label, s in result.get("shards", {}).items():
        hist = ", ".join(f"{lo:g}-{hi:g} s {n}" for lo, hi, n in zip(s["duration_edges_s"],
                         s["duration_edges_s"][1:] + [float("inf")], s["durations"]) if n)
        lines.append(f"{label}: {s['shards']} shards, {s['clips']} clips, {s['hours'] or 0:.3f} h (index.json; "
                     f"{s['decoded']} clips decoded); durations {hist}")
    if result["overlap"]:
        lines.append("overlap with train:")
        for label, o in result["overlap"].items():
            sent, spk = o["sentences"], o["speakers"]
            s1 = (f"{sent['clips']} clips share a training sentence ({sent['distinct']} distinct)"
                  if sent["clips"] else "no shared sentences")
            if sent["clips"]:
                s1 += f', e.g. "{_cut(sent["examples"][0]["text"], 50)}"'
            s2 = (f"{spk['shared']}/{spk['eval_speakers']} speakers shared ({spk['clips']} clips)"
                  if spk["shared"] else "no shared speakers")
            same = f"; {o['same_clips']} identical clips" if o["same_clips"] else ""
            lines.append(f"  {label}: {s1}; {s2}{same}")
    for w in result["warnings"]:
        lines.append(f"warning: {w}")
    for e in result["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def write_preflight(result: dict, out_dir: str | Path) -> Path:
    """Write `result` to <out_dir>/preflight.json (atomically: a failed write, e.g. a full disk, is a one-line
    CheckpointError and leaves the previous file); returns the path."""
    path = Path(out_dir) / "preflight.json"
    write_files({path: json_text(result)})
    return path
