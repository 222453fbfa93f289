"""Experiment configuration: a tree of typed dataclasses, loaded from TOML.

A TOML file sets only what differs from the defaults below; `--set a.b=v` overrides
are parsed as TOML values and type-checked. Unknown keys and wrong types raise
`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A bad experiment file or override; the message is one line naming the key or file."""


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = True  # deterministic algorithms (CPU runs are then bit-reproducible)
    # The C allocator behind CPU tensors (asr/allocator.py). auto: oneTBB's scalable allocator on CPU runs
    # where the tbb wheel is installed (run.py restarts itself once with it preloaded), else the system's;
    # tbb: the same, an error without the wheel; system: glibc's malloc, whose heap fragments (resident
    # memory about twice the live peak); release: glibc handing every freed block of 1 MB or more back to
    # the OS (memory at the live peak, slower steps). On TBB the loop bounds the kept blocks once per step
    # (allocator.limit_cache).
    allocator: str = "auto"


@dataclass
class SourceConfig:
    """One corpus. `kind` is common_voice | manifest | hf | shards.

    Splits are expressions such as "train+dev": for common_voice the names of the release
    TSVs, for manifest the manifest files (relative to `path`, or beside it when `path` is a
    file; the .tsv/.jsonl suffix may be left out), for hf the dataset's split names. An empty
    split means the source has none (e.g. an evaluation-only set).

    hf `path` is a hub id, a `save_to_disk` folder (a DatasetDict, one folder per split, or a
    single Dataset, which is split "train"), or an audiofolder (metadata.csv or metadata.jsonl
    with a `file_name` column; split subfolders, or the folder itself as split "train").

    shards `path` is a folder or fsspec URL holding the Parquet shards and index.json that
    `python -m asr.shards` writes; they are streamed as training clips only (dev and test must be "").
    """

    name: str = ""  # defaults to the language, or the folder name
    kind: str = "common_voice"
    path: str = ""  # folder (common_voice, manifest, hf on disk) or hub id (hf)
    language: str = ""  # ISO code, e.g. "tr"; used for Whisper's language token and text rules
    train: str = "train"
    dev: str = "dev"
    test: str = "test"
    hf_config: str = ""  # hf: the dataset's config name (e.g. "tr" for Common Voice)
    audio_column: str = ""  # default: "path" (common_voice, manifest) or "audio" (hf)
    text_column: str = ""  # default: "sentence" (common_voice, hf) or "text" (manifest)


@dataclass
class TextConfig:
    """Training-side transcript cleaning (evaluation uses `eval.normalizer`)."""

    chars_to_ignore: str = ""  # a regex character class body or full regex; matches are removed
    replace: dict[str, str] = field(default_factory=dict)  # applied before chars_to_ignore
    lowercase: bool = False  # language-aware: Turkish/Azeri I->ı, İ->i
    collapse_whitespace: bool = True


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    sample_rate: int = 16000
    min_duration_s: float = 0.0
    max_duration_s: float = 30.0
    max_label_tokens: int = 448  # Whisper's decoder limit, prefix tokens included
    batch_size: int = 16  # clips per batch at most (0: no cap)
    max_batch_s: float = 0.0  # padded seconds of audio per batch at most (0: no cap)
    # duration: clips of similar length batched together (less padding); random: batches of any clips;
    # auto: duration for CTC models, random for Whisper (its input is always padded to 30 s)
    batching: str = "auto"
    num_workers: int = 1
    # shards sources: clips read ahead, shuffled and bucketed by duration together (memory: their encoded audio).
    shuffle_buffer: int = 1000
    # Keep decoded training clips in memory (in each loader worker): later epochs decode nothing.
    # Costs about 230 MB per hour of training audio per worker (float32 at 16 kHz).
    cache_audio: bool = False
    vocab: str = "char"  # CTC only: char | sentencepiece
    sp_model_type: str = "unigram"  # unigram | bpe
    sp_vocab_size: int = 128
    report_examples: int = 5  # offending rows kept per reason in data_report.json
    # Training stops when more than this share of an epoch's clips fail to decode (0: any failure stops it).
    max_failed_fraction: float = 0.05
    # Whisper: the share of training samples whose labels carry timestamp tokens (<|0.00|> text<|3.52|>, the
    # speech start/end found by asr.timestamps.speech_bounds) instead of <|notimestamps|>; 0: none.
    timestamp_prob: float = 0.0
    # Whisper: the share of training samples that pack several clips of the same language into one sample
    # of at most concat_max_s seconds, with one timestamped segment per clip (asr.timestamps).
    concat_prob: float = 0.0
    concat_max_s: float = 30.0
    # Whisper: the share of training samples conditioned on another clip's text of the same language after
    # <|startofprev|> (as Whisper conditions on the previous segment's text); the loss skips that prompt.
    prev_text_prob: float = 0.0
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class ModelConfig:
    name: str = "openai/whisper-small"  # hub id or local folder; "" with init="scratch" for a default config
    family: str = ""  # whisper | ctc; inferred from the model config when empty
    init: str = "pretrained"  # pretrained | scratch
    arch: str = "wav2vec2"  # scratch CTC without a name: wav2vec2 | hubert
    # Size fields for init = "scratch" (0 keeps the base config's value).
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    conv_dim: list[int] = field(default_factory=list)
    conv_kernel: list[int] = field(default_factory=list)
    conv_stride: list[int] = field(default_factory=list)
    # Whisper.
    language: str = ""  # default language for sources that name none
    task: str = "transcribe"
    language_map: dict[str, str] = field(default_factory=dict)  # e.g. {dv = "si"}; "" leaves the token out
    # CTC encoders.
    freeze_feature_encoder: bool = True
    freeze_encoder_steps: int = 0
    layerdrop: float | None = None  # None keeps the checkpoint's value
    mask_time_prob: float | None = None
    mask_time_length: int | None = None
    mask_feature_prob: float | None = None
    mask_feature_length: int | None = None
    attention_dropout: float | None = None
    hidden_dropout: float | None = None
    activation_dropout: float | None = None
    feat_proj_dropout: float | None = None
    final_dropout: float | None = None
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "linear"  # linear | cosine | constant (all after warmup)
    warmup_steps: int = 0
    grad_accum: int = 1
    clip_grad: float = 1.0  # 0 disables clipping
    # auto | fp32 | bf16 | fp16 (auto: bf16/fp16 on CUDA; on a CPU with native bf16, bf16 for Whisper and fp32
    # for CTC; else fp32). bf16/fp16 autocast the forward; the
    # weights, optimizer state, input features and loss stay float32 (fp16 adds a gradient scaler).
    precision: str = "auto"
    # Under torchrun: ddp replicates the model on every rank (DistributedDataParallel); fsdp shards parameters,
    # gradients and optimizer state over the ranks (FSDP2 fully_shard on each encoder/decoder layer and the
    # root; sharded checkpoints with torch.distributed.checkpoint, resumable at any world size). In one
    # process (world size 1) fsdp has nothing to shard: the whole model trains there, its checkpoints keep the
    # sharded format.
    parallel: str = "ddp"
    # torch.compile (inductor) the training forward: the first steps take the compilation (minutes), later ones
    # run the compiled graph; a CPU run needs a C++ compiler (g++, or $CXX). Evaluation runs uncompiled.
    compile: bool = False
    loss: str = ""  # a loss of asr.losses.LOSSES for the model's family; "" picks the family's default
    loss_args: dict[str, bool | int | float | str] = field(default_factory=dict)  # its keyword arguments
    log_every: int = 10
    eval_every: int = 500  # 0: only at the end
    save_every: int = 500  # 0: only at the end
    keep_last: int = 2  # newest checkpoints kept, besides the best's (0: keep every checkpoint)
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    # Which parameters train: regular expressions searched in parameter names (e.g. "model.decoder",
    # "encoder.layers.(8|9|10|11)\\.", "lm_head"). `trainable` non-empty: only matches train; then
    # `frozen` matches are frozen. Applied before LoRA (which freezes everything but its adapters
    # and what `trainable` names).
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    lr_scale: dict[str, float] = field(default_factory=dict)  # pattern -> learning-rate multiplier
    save_trainable_only: bool = False  # checkpoints hold only parameters that train (base weights reload)


@dataclass
class LoraConfig:
    """Low-rank adaptation (asr/lora.py) of the linear layers whose names match `targets`."""

    rank: int = 0  # 0: off
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [r"(q_proj|v_proj)$"])


@dataclass
class EvalSetConfig:
    source: str = ""  # a data source's name
    split: str = "dev"  # train | dev | test: which of the source's split expressions
    name: str = ""  # defaults to "<source>-<split>"
    # clips: each clip decoded alone; longform (Whisper): the split's clips joined into recordings of
    # eval.longform_min_s to longform_max_s seconds, decoded with transformers' long-form generate
    kind: str = "clips"


@dataclass
class EvalConfig:
    # Evaluation sets: [[eval.sets]] entries; without any, each source's `split` below. The best
    # checkpoint is chosen on the first set; the others are watched (e.g. forgetting of a language).
    sets: list[EvalSetConfig] = field(default_factory=list)
    split: str = "dev"  # which split of each source is evaluated during training
    max_utterances: int = 0  # 0: all; otherwise the first N (quick checks)
    batch_size: int = 16
    # script: keeps combining marks (Thaana, Brahmic vowel signs), language-aware case, apostrophes joined
    # (asr.text.normalize); basic: Whisper's BasicTextNormalizer, for comparison with published numbers
    normalizer: str = "script"
    examples: int = 4  # reference/hypothesis pairs shown in TensorBoard
    at_start: bool = True  # evaluate at step 0 (the zero-shot / untrained baseline) on a fresh run
    worst: int = 20  # eval/step-N.worst.tsv: the utterances with the highest WER
    # Long-form sets (eval.sets kind = "longform"): recordings of a duration drawn in [min_s, max_s] (seeded
    # with run.seed); `longform_recordings` of them (clips reused where the split is too short), or 0: as
    # many as the split's clips fill without reuse.
    longform_min_s: float = 60.0
    longform_max_s: float = 180.0
    longform_recordings: int = 0
    precision: str = ""  # "": train.precision; else auto | fp32 | bf16 | fp16 for evaluation and decoding


@dataclass
class DecodeConfig:
    method: str = "greedy"  # a decoder of asr.decode.DECODERS for the model's family: greedy | beam | ...
    args: dict[str, bool | int | float | str] = field(default_factory=dict)  # its keyword arguments
    beam_size: int = 4
    max_new_tokens: int = 225  # Whisper
    prompt: str = ""  # Whisper: text given as previous context (<|startofprev|>), e.g. domain vocabulary
    lm: str = ""  # CTC beam search: a word n-gram ARPA file (python -m asr.lm builds one)
    lm_alpha: float = 0.5  # LM weight
    lm_beta: float = 1.0  # word insertion bonus
    hotwords: list[str] = field(default_factory=list)  # CTC beam search: words to boost
    hotword_weight: float = 1.0
    length_norm: bool = False


@dataclass
class PreflightConfig:
    """Data checks before training (asr/preflight.py): `run.py --check` runs only them."""

    enabled: bool = True  # run them at the start of a training run and write <out_dir>/preflight.json
    cps_outlier_factor: float = 3.0  # chars/s above factor x or below 1/factor x the split median: outlier
    examples: int = 5  # examples kept per finding
    # Clips of each split decoded to find undecodable, NaN/inf and silent audio: all of a split up to this
    # many, else a random sample of this many (seeded with run.seed); 0: none decoded (headers only).
    decode_sample: int = 2000
    shard_sample: int = 0  # shards sources: clips decoded per shard (0: only index.json and the shards' footers read)


@dataclass
class AugmentConfig:
    """On-the-fly augmentation of training clips in the loader workers (asr/augment.py); all off by default,
    never applied at evaluation. Each clip's draws are seeded by run.seed, the epoch and the clip's index."""

    speed: list[float] = field(default_factory=list)  # e.g. [0.9, 1.0, 1.1]: one factor per clip (resampling)
    noise_dir: str = ""  # a folder of noise clips (any format soundfile reads, e.g. MUSAN); "" off
    noise_prob: float = 1.0  # share of clips that get noise (with noise_dir)
    snr_db: list[float] = field(default_factory=lambda: [10.0, 30.0])  # [low, high]: the SNR, uniformly
    gain_db: list[float] = field(default_factory=list)  # [low, high], e.g. [-6, 6]; [] off
    # SpecAugment: on Whisper's log-mel features of each clip (time frames and mel channels set to 0, drawn in
    # the loader workers); on CTC models transformers' own masks of the encoder's hidden states (these map to
    # the model config's mask_time_prob, ...). Unset: off for Whisper, the checkpoint's (or model.mask_*) for CTC.
    mask_time_prob: float | None = None  # about this share of frames masked, in spans of mask_time_length
    mask_time_length: int | None = None  # default 10
    mask_time_min_masks: int | None = None  # default 2
    mask_feature_prob: float | None = None  # the same across mel channels (Whisper) / hidden channels (CTC)
    mask_feature_length: int | None = None  # default 10
    mask_feature_min_masks: int | None = None  # default 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    preflight: PreflightConfig = field(default_factory=PreflightConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# ---------------------------------------------------------------------------------------
# Building a typed tree from plain TOML values.


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{key}: unsupported type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown key '{key}'")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as runs/x or facebook/wav2vec2-base


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one `section.key=value` override in place. List items go by index (data.sources.0.path,
    train.betas.1), dict entries by key (data.text.replace.â=a)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}': expected key=value")
    key, text = assignment.split("=", 1)
    key, text = key.strip(), text.strip()
    parts = key.split(".")
    node: Any = cfg
    tp: Any = Config  # the declared type of `node`
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"unknown key '{key}' ('{here}': the list has {len(node)} items)")
            item_tp = typing.get_args(tp)[0]
            if last:
                node[int(part)] = _convert(_typed_value(text, item_tp), item_tp, key)
                return
            node, tp = node[int(part)], item_tp
        elif isinstance(node, dict):
            if not last:
                raise ConfigError(f"unknown key '{key}' ('{'.'.join(parts[:i])}' holds plain values)")
            val_tp = typing.get_args(tp)[1]
            node[part] = _convert(_typed_value(text, val_tp), val_tp, key)
            return
        elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            field_tp = typing.get_type_hints(type(node))[part]
            if last:
                setattr(node, part, _convert(_typed_value(text, field_tp), field_tp, key))
                return
            node, tp = getattr(node, part), field_tp
        else:
            raise ConfigError(f"unknown key '{key}'")


def _typed_value(text: str, tp: Any) -> Any:
    """An override's value: TOML syntax, or the bare text for a string field
    (--set model.language=no would parse as a bool, run.out_dir=runs/x not at all)."""
    value = _parse_value(text)
    if tp is str and not isinstance(value, str):
        return text
    return value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` ("a.b=v")."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {path}")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        cfg = _build(Config, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    for o in overrides:
        apply_override(cfg, o)
    validate(cfg)
    return cfg


_CHOICES = {
    "run.allocator": ("auto", "tbb", "system", "release"),
    "model.family": ("", "whisper", "ctc"),
    "model.init": ("pretrained", "scratch"),
    "model.arch": ("wav2vec2", "hubert", "wavlm"),
    "data.vocab": ("char", "sentencepiece"),
    "data.batching": ("auto", "duration", "random"),
    "data.sp_model_type": ("unigram", "bpe"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.parallel": ("ddp", "fsdp"),
    "eval.precision": ("", "auto", "fp32", "bf16", "fp16"),
    "eval.normalizer": ("script", "basic"),
    "eval.split": ("train", "dev", "test"),
}
_SOURCE_KINDS = ("common_voice", "manifest", "hf", "shards")


def validate(cfg: Config) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    for i, src in enumerate(cfg.data.sources):
        if src.kind not in _SOURCE_KINDS:
            raise ConfigError(f"data.sources.{i}.kind: {src.kind!r} is not one of {', '.join(_SOURCE_KINDS)}")
        if not src.path:
            raise ConfigError(f"data.sources.{i}.path: required")
        if src.kind == "shards" and (src.dev or src.test or not src.train):
            raise ConfigError(f"data.sources.{i}: a shards source is streamed for training only: set train = "
                              f"\"train\", dev = \"\" and test = \"\", and evaluate on another source")
    streamed = [i for i, s in enumerate(cfg.data.sources) if s.kind == "shards"]
    if streamed and len([s for s in cfg.data.sources if s.train]) > 1:
        raise ConfigError(f"data.sources.{streamed[0]}: a shards source must be the only training source "
                          f"(write the others into its shards with python -m asr.shards)")
    _check_ranges(cfg)
    check_methods(cfg)
    if cfg.data.max_duration_s and cfg.data.min_duration_s > cfg.data.max_duration_s:
        raise ConfigError(f"data.min_duration_s: {cfg.data.min_duration_s} is above data.max_duration_s "
                          f"({cfg.data.max_duration_s}); no clip would be kept")
    names = [source_name(s) for s in cfg.data.sources]
    set_names: set[str] = set()
    for i, es in enumerate(cfg.eval.sets):
        if es.source not in names:
            raise ConfigError(f"eval.sets.{i}.source: {es.source!r} is not a data source "
                              f"(sources: {', '.join(names) or 'none'})")
        if es.split not in ("train", "dev", "test"):
            raise ConfigError(f"eval.sets.{i}.split: {es.split!r} is not one of 'train', 'dev', 'test'")
        if es.kind not in ("clips", "longform"):
            raise ConfigError(f"eval.sets.{i}.kind: {es.kind!r} is not one of 'clips', 'longform'")
        set_name = eval_set_name(es)
        if set_name in set_names:  # a second set of the same name would silently replace the first
            raise ConfigError(f"eval.sets.{i}.name: {set_name!r} names an earlier evaluation set too")
        set_names.add(set_name)
    for key in ("train.trainable", "train.frozen", "lora.targets"):
        section, name = key.split(".")
        for pattern in getattr(getattr(cfg, section), name):
            _check_regex(key, pattern)
    for pattern in cfg.train.lr_scale:
        _check_regex("train.lr_scale", pattern)
    if cfg.train.parallel == "fsdp" and cfg.model.freeze_encoder_steps:
        raise ConfigError("model.freeze_encoder_steps: not with train.parallel = \"fsdp\" (a sharded checkpoint "
                          "saved while the encoder is frozen holds no optimizer state for it); freeze it with "
                          "train.frozen instead, or use ddp")
    _check_augment(cfg)
    if cfg.eval.longform_min_s > cfg.eval.longform_max_s:
        raise ConfigError(f"eval.longform_min_s: {cfg.eval.longform_min_s} is above eval.longform_max_s "
                          f"({cfg.eval.longform_max_s})")
    if cfg.data.batch_size <= 0 and cfg.data.max_batch_s <= 0:
        raise ConfigError("data.batch_size and data.max_batch_s: at least one must be set")
    if "" in cfg.data.text.replace:
        raise ConfigError("data.text.replace: an empty key would insert its value between every character")
    if cfg.data.text.chars_to_ignore:
        import re

        from asr.text import ignore_pattern

        try:
            re.compile(ignore_pattern(cfg.data.text.chars_to_ignore))
        except re.error as e:
            raise ConfigError(f"data.text.chars_to_ignore: invalid regular expression ({e})") from None


# The domain of every numeric setting: [a, b] closed, (a, b) open; a list's items and a table's values are
# each checked. A float must also be finite (TOML reads inf and nan). tests/test_config.py checks that every
# numeric field of the dataclasses above has an entry here.
RANGES = {
    "run.seed": "[0, 4294967295]",  # numpy's seed range
    "data.sample_rate": "[1000, inf)",
    "data.min_duration_s": "[0, inf)",
    "data.max_duration_s": "[0, inf)",  # 0: no limit
    "data.max_label_tokens": "[0, inf)",  # 0: the model's own limit
    "data.batch_size": "[0, inf)",  # 0: no cap (then max_batch_s caps)
    "data.max_batch_s": "[0, inf)",
    "data.num_workers": "[0, inf)",
    "data.shuffle_buffer": "[1, inf)",
    "data.sp_vocab_size": "[4, inf)",
    "data.report_examples": "[0, inf)",
    "data.max_failed_fraction": "[0, 1]",
    "data.timestamp_prob": "[0, 1]",
    "data.concat_prob": "[0, 1]",
    "data.concat_max_s": "(0, 30]",  # Whisper's window
    "data.prev_text_prob": "[0, 1]",
    "model.hidden_size": "[0, inf)",  # 0 keeps the base config's size
    "model.num_layers": "[0, inf)",
    "model.num_heads": "[0, inf)",
    "model.intermediate_size": "[0, inf)",
    "model.conv_dim": "[1, inf)",
    "model.conv_kernel": "[1, inf)",
    "model.conv_stride": "[1, inf)",
    "model.freeze_encoder_steps": "[0, inf)",
    "model.layerdrop": "[0, 1]",
    "model.mask_time_prob": "[0, 1]",
    "model.mask_time_length": "[1, inf)",
    "model.mask_feature_prob": "[0, 1]",
    "model.mask_feature_length": "[1, inf)",
    "model.attention_dropout": "[0, 1)",
    "model.hidden_dropout": "[0, 1)",
    "model.activation_dropout": "[0, 1)",
    "model.feat_proj_dropout": "[0, 1)",
    "model.final_dropout": "[0, 1)",
    "train.max_steps": "[1, inf)",
    "train.lr": "(0, inf)",
    "train.weight_decay": "[0, inf)",
    "train.betas": "[0, 1)",
    "train.eps": "(0, inf)",
    "train.warmup_steps": "[0, inf)",
    "train.grad_accum": "[1, inf)",
    "train.clip_grad": "[0, inf)",  # 0: no clipping
    "train.log_every": "[1, inf)",
    "train.eval_every": "[0, inf)",  # 0: only at the end
    "train.save_every": "[0, inf)",  # 0: only at the end
    "train.keep_last": "[0, inf)",  # 0: keep every checkpoint
    "train.max_bad_steps": "[1, inf)",
    "train.lr_scale": "[0, inf)",
    "eval.max_utterances": "[0, inf)",  # 0: all
    "eval.batch_size": "[1, inf)",
    "eval.examples": "[0, inf)",
    "eval.worst": "[0, inf)",
    "eval.longform_min_s": "(0, inf)",
    "eval.longform_max_s": "(0, inf)",
    "eval.longform_recordings": "[0, inf)",  # 0: as many as the clips fill
    "decode.beam_size": "[1, inf)",
    "decode.max_new_tokens": "[1, inf)",
    "decode.lm_alpha": "[0, inf)",
    "decode.lm_beta": "(-inf, inf)",  # a word insertion bonus or penalty
    "decode.hotword_weight": "(-inf, inf)",
    "lora.rank": "[0, inf)",  # 0: off
    "lora.alpha": "(0, inf)",
    "lora.dropout": "[0, 1)",
    "preflight.cps_outlier_factor": "(1, inf)",
    "preflight.examples": "[0, inf)",
    "preflight.decode_sample": "[0, inf)",  # 0: off
    "preflight.shard_sample": "[0, inf)",  # 0: off
    "augment.speed": "[0.5, 2]",
    "augment.noise_prob": "[0, 1]",
    "augment.snr_db": "[-30, 100]",
    "augment.gain_db": "[-60, 60]",
    "augment.mask_time_prob": "[0, 1]",
    "augment.mask_time_length": "[1, inf)",
    "augment.mask_time_min_masks": "[0, inf)",
    "augment.mask_feature_prob": "[0, 1]",
    "augment.mask_feature_length": "[1, inf)",
    "augment.mask_feature_min_masks": "[0, inf)",
}


def _check_augment(cfg: "Config") -> None:
    a = cfg.augment
    for key, value, empty_ok in (("snr_db", a.snr_db, False), ("gain_db", a.gain_db, True)):
        if (value or not empty_ok) and (len(value) != 2 or value[0] > value[1]):
            raise ConfigError(f"augment.{key}: expected [low, high] with low <= high, got {value!r}")
    if any(f != 1.0 for f in a.speed) and (cfg.data.timestamp_prob > 0 or cfg.data.concat_prob > 0):
        raise ConfigError("augment.speed: not supported with data.timestamp_prob or data.concat_prob (the "
                          "timestamps and packed lengths are those of the unperturbed clips)")
    for name in ("mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length"):
        if getattr(a, name) is not None and getattr(cfg.model, name) is not None:
            raise ConfigError(f"augment.{name} and model.{name}: both set; set only augment.{name}")


def check_methods(cfg: "Config", family: str = "") -> None:
    """train.loss and decode.method (with their args) against the registries asr.losses.LOSSES and
    asr.decode.DECODERS: for `family` (or model.family) when known, else a name of some family's."""
    from asr.decode import DECODERS, check_decoder
    from asr.losses import LOSSES, check_loss

    family = family or cfg.model.family or ("ctc" if cfg.model.init == "scratch" and not cfg.model.name else "")
    if family:
        for problem in (check_loss(cfg.train, family), check_decoder(cfg.decode, family)):
            if problem:
                raise ConfigError(problem)
        return
    if cfg.train.loss and not any(cfg.train.loss in LOSSES[f] for f in LOSSES):
        known = sorted({name for f in LOSSES for name in LOSSES[f]})
        raise ConfigError(f"train.loss: unknown loss {cfg.train.loss!r} (known: {', '.join(known)})")
    if not any(cfg.decode.method in DECODERS[f] for f in DECODERS):
        known = sorted({name for f in DECODERS for name in DECODERS[f]})
        raise ConfigError(f"decode.method: unknown decoder {cfg.decode.method!r} (known: {', '.join(known)})")


def _in_range(value: float, spec: str) -> bool:
    lo_text, hi_text = spec[1:-1].split(",")
    lo, hi = float(lo_text), float(hi_text)
    above = value >= lo if spec[0] == "[" else value > lo
    below = value <= hi if spec[-1] == "]" else value < hi
    return above and below and value == value and abs(value) != float("inf")


def _check_ranges(cfg: "Config") -> None:
    for key, spec in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
        for k, v in items:
            if v is not None and not _in_range(v, spec):
                where = key if k is None else f"{key}.{k}"
                raise ConfigError(f"{where}: must be in {spec}, got {v!r}")


# Settings a resumed run cannot change: they shape the model and which parameters train, the labels, or the
# stream of training batches whose position the checkpoint holds. A key is fixed when it is one of these or
# lies below one; changing it stops the run at start-up (--fresh or another run.out_dir starts a new run).
# Every other setting may change on resume and takes effect (README, "Runs that survive").
RESUME_FIXED = (
    "model",  # architecture, initial weights, Whisper's language and task tokens, dropout, freezing
    "lora",  # the adapters are parameters
    "train.trainable", "train.frozen", "train.lr_scale",  # which parameters train: the optimizer's groups
    "train.save_trainable_only",  # what the checkpoints hold
    "data.sources",  # the training clips, their order and ids
    "data.vocab", "data.sp_model_type", "data.sp_vocab_size", "data.text",  # the labels
    "data.sample_rate", "data.min_duration_s", "data.max_duration_s", "data.max_label_tokens",  # the clips kept
    "data.timestamp_prob", "data.concat_prob", "data.concat_max_s", "data.prev_text_prob",  # the samples, labels
    "data.batch_size", "data.max_batch_s", "data.batching", "train.grad_accum", "run.seed",  # the batches
    "data.shuffle_buffer",  # a shards stream's batches
    "train.parallel",  # the checkpoint format: one file per state (ddp) or torch.distributed.checkpoint shards
    "augment.speed",  # the perturbed durations the batches are formed from
    "augment.mask_time_prob", "augment.mask_time_length", "augment.mask_time_min_masks",  # CTC: the model's
    "augment.mask_feature_prob", "augment.mask_feature_length", "augment.mask_feature_min_masks",  # config
)


def is_fixed(key: str) -> bool:
    """Whether a dotted setting cannot change on a resumed run (RESUME_FIXED)."""
    return any(key == p or key.startswith(p + ".") for p in RESUME_FIXED)


def read_saved_config(text: str) -> Config:
    """A config saved with a run or checkpoint (config.toml), without the keys this version does not have
    (one saved by an older version). ConfigError when it cannot be read as a config."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}") from None
    return _build(Config, _known(Config, values))


def load_run_config(folder: str | Path, overrides: list[str] = ()) -> Config:
    """The settings a run folder was trained with (its config.toml, keys of older versions left out), then
    `overrides`; run.out_dir is the folder itself (where the run is now)."""
    path = Path(folder) / "config.toml"
    if not path.is_file():
        raise ConfigError(f"--run: no config.toml in {folder} (not a run folder)")
    try:
        cfg = read_saved_config(path.read_text(encoding="utf-8"))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.run.out_dir = str(folder)
    for o in overrides:
        apply_override(cfg, o)
    validate(cfg)
    return cfg


def _known(cls, values: dict) -> dict:
    hints, out = typing.get_type_hints(cls), {}
    for k, v in values.items():
        tp = hints.get(k)
        if tp is None:
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _known(tp, v)
        elif dataclasses.is_dataclass(item) and isinstance(v, list):
            v = [_known(item, x) if isinstance(x, dict) else x for x in v]
        out[k] = v
    return out


def flat_config(cfg: Config) -> dict:
    """A config as {dotted key: value}; lists of tables (data.sources, eval.sets) by index."""
    return _flat(dataclasses.asdict(cfg))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(_flat(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


def config_changes(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every setting that differs (None: not set in that config)."""
    a, b = flat_config(old), flat_config(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def source_name(src: SourceConfig) -> str:
    """A source's name: `name`, else its language, else its folder's name."""
    return src.name or src.language or Path(src.path.rstrip("/")).name or src.kind


def duplicate_source_names(cfg: "Config") -> str | None:
    """The one-line error for data sources that share a name (files and logs are keyed by it), or None."""
    names = [source_name(s) for s in cfg.data.sources]
    if len(set(names)) == len(names):
        return None
    return f"data.sources: names must be unique (got {', '.join(names)}); set name = \"...\""


def eval_set_name(es: EvalSetConfig) -> str:
    return es.name or f"{es.source}-{es.split}"


def eval_set_specs(cfg: "Config") -> list[tuple[str, str, str]]:
    """(set name, source name, split) of each evaluation set: `eval.sets`, else each source's `eval.split`."""
    if cfg.eval.sets:
        return [(eval_set_name(es), es.source, es.split) for es in cfg.eval.sets]
    return [(source_name(s), source_name(s), cfg.eval.split) for s in cfg.data.sources if getattr(s, cfg.eval.split)]


def eval_set_kind(cfg: "Config", name: str) -> str:
    """The kind of evaluation set `name`: "clips", or "longform" (recordings joined from its clips)."""
    return next((es.kind for es in cfg.eval.sets if eval_set_name(es) == name), "clips")


def _check_regex(key: str, pattern: str) -> None:
    import re

    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}: invalid regular expression {pattern!r} ({e})") from None


# ---------------------------------------------------------------------------------------
# Writing the resolved config back out as TOML.


def toml_value(v: Any) -> str:
    """A value as TOML text (a string escaped, a table inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    if dataclasses.is_dataclass(v):
        return toml_value(dataclasses.asdict(v))
    raise TypeError(f"cannot write {v!r} as TOML")


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _toml_key(k: str) -> str:
    return k if k and k.isascii() and k.replace("_", "").replace("-", "").isalnum() else toml_value(k)


def _toml_table(obj: Any, name: str, out: list[str], array: bool = False) -> None:
    """A dataclass as a TOML table: plain values first, then its sections and lists of sections."""
    fields = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    is_section = lambda v: dataclasses.is_dataclass(v)  # noqa: E731
    is_section_list = lambda v: isinstance(v, list) and v and all(map(dataclasses.is_dataclass, v))  # noqa: E731
    out.append(f"[[{name}]]" if array else f"[{name}]")
    for k, v in fields:
        if is_section(v) or is_section_list(v):
            continue
        out.append(f"# {k} = (unset)" if v is None else f"{_toml_key(k)} = {toml_value(v)}")
    out.append("")
    for k, v in fields:
        if is_section(v):
            _toml_table(v, f"{name}.{k}", out)
        elif is_section_list(v):
            for item in v:
                _toml_table(item, f"{name}.{k}", out, array=True)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML text that `load_config` reads back to an equal config."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        _toml_table(getattr(cfg, f.name), f.name, out)
    return "\n".join(out)
