"""Whisper and CTC encoders (Wav2Vec2 / XLS-R, HuBERT, WavLM) through transformers: building,
label construction, per-batch inputs on the device, and export as `save_pretrained` folders."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asr.audio import WHISPER_SAMPLE_RATE, log_mel, lengths_to_mask, normalize_waveform
from asr.augment import apply_spec_masks
from asr.config import ModelConfig
from asr.data import WHISPER_MIN_S, Labeler, min_input_samples


class ModelError(Exception):
    """A model that cannot be built (unknown id, unknown language); one line."""


# Config fields of ModelConfig that map onto the transformers config of each family.
_CTC_OVERRIDES = ("layerdrop", "mask_time_prob", "mask_time_length", "mask_feature_prob", "mask_feature_length",
                  "attention_dropout", "hidden_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout")
_WHISPER_OVERRIDES = {"attention_dropout": "attention_dropout", "hidden_dropout": "dropout",
                      "activation_dropout": "activation_dropout", "layerdrop": "encoder_layerdrop",
                      "mask_time_prob": "mask_time_prob", "mask_time_length": "mask_time_length",
                      "mask_feature_prob": "mask_feature_prob", "mask_feature_length": "mask_feature_length"}


@dataclass
class Bundle:
    """A model with what turns batches into its inputs and its outputs into text."""

    family: str  # whisper | ctc
    model: torch.nn.Module
    cfg: ModelConfig
    tokenizer: object = None  # whisper: WhisperTokenizer
    vocab: object = None  # ctc: asr.text.CharVocab | PieceVocab
    processor: object = None  # for export
    encoder_flags: dict = field(default_factory=dict)  # requires_grad of encoder parameters while frozen

    @property
    def labeler(self) -> Labeler:
        if self.family == "whisper":
            return Labeler(encode=self.encode_whisper, max_tokens=self.model.config.max_target_positions,
                           min_samples=round(WHISPER_MIN_S * WHISPER_SAMPLE_RATE))
        return Labeler(encode=lambda text, lang: self.vocab.encode(text), output_frames=self.output_frames,
                       min_samples=min_input_samples(self.output_frames))

    # -- Whisper labels ----------------------------------------------------------------
    def whisper_language(self, language: str) -> str | None:
        """The Whisper language code used for a data language (after model.language_map), or None where
        the map sends it to "" (no language token). An unknown language raises ModelError."""
        language = language or self.cfg.language
        code = self.cfg.language_map.get(language, language)
        return whisper_code(code, language) if code else None

    def prefix_tokens(self, language: str, timestamps: bool = False) -> list[int]:
        """<|startoftranscript|> [<|lang|>] <|task|> <|notimestamps|> (without it for `timestamps`)"""
        tok = self.tokenizer
        ids = [tok.convert_tokens_to_ids("<|startoftranscript|>")]
        code = self.whisper_language(language)
        if code is not None:
            ids.append(tok.convert_tokens_to_ids(f"<|{code}|>"))
        ids.append(tok.convert_tokens_to_ids(f"<|{self.cfg.task}|>"))
        if not timestamps:
            ids.append(tok.convert_tokens_to_ids("<|notimestamps|>"))
        return ids

    def encode_whisper(self, text: str, language: str) -> list[int]:
        """Full decoder sequence: prefix tokens, text tokens, <|endoftext|>."""
        return self.prefix_tokens(language) + self.tokenizer.encode(text, add_special_tokens=False) + [
            self.tokenizer.eos_token_id]

    def output_frames(self, n_samples: int) -> int:
        return int(ctc_output_lengths(self.model, torch.tensor(n_samples)).item())


def ctc_output_lengths(model, audio_lengths: torch.Tensor) -> torch.Tensor:
    """Output frames of a CTC encoder for input lengths in samples (B,): the conv feature encoder's
    arithmetic (transformers' `_get_feat_extract_output_lengths`, a private method: called here only)."""
    return model._get_feat_extract_output_lengths(audio_lengths)


def check_model_name(name: str) -> None:
    """ModelError for a model.name that can only be a local folder (absolute, ./, ../, ~, or more than one
    "/"; hub ids are "owner/name") when there is no such folder: transformers would otherwise take it for
    a malformed hub id ("Repo id must be in the form ...")."""
    import os

    if not name or os.path.isdir(os.path.expanduser(name)):
        return
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        raise ModelError(f"model.name: folder not found: {name}")


def infer_family(cfg: ModelConfig) -> str:
    if cfg.family:
        return cfg.family
    if cfg.init == "scratch" and not cfg.name:
        return "ctc"
    check_model_name(cfg.name)
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(cfg.name).model_type
    except Exception as e:
        raise ModelError(f"model.name: cannot load config of '{cfg.name}': {_first_line(e)}") from None
    return "whisper" if model_type == "whisper" else "ctc"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def whisper_code(code: str, language: str = "") -> str:
    """A Whisper language code ("tr") for a code or an English name ("turkish"); ModelError if Whisper lacks it."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = code.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    name = language or code
    raise ModelError(f"Whisper does not know language '{code}'; map '{name}' to a related language with "
                     f"model.language_map (e.g. {{ {name} = \"<code>\" }}, or \"\" to leave the token out)")


def check_language(code: str | None) -> None:
    if code is not None:
        whisper_code(code)


@contextmanager
def quiet_progress_bars():
    """transformers' per-call tqdm bars ("Loading weights", "Writing model shards") off for a block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def scratch_sizes(mconf, cfg: ModelConfig, family: str) -> None:
    """Sets model.hidden_size, num_layers, num_heads, intermediate_size (and CTC's conv layers) where given
    on the transformers config `mconf` of a model trained from scratch."""
    if family == "whisper":
        sizes = {"d_model": cfg.hidden_size, "encoder_layers": cfg.num_layers, "decoder_layers": cfg.num_layers,
                 "encoder_attention_heads": cfg.num_heads, "decoder_attention_heads": cfg.num_heads,
                 "encoder_ffn_dim": cfg.intermediate_size, "decoder_ffn_dim": cfg.intermediate_size}
    else:
        sizes = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
                 "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
                 "conv_dim": cfg.conv_dim, "conv_kernel": cfg.conv_kernel, "conv_stride": cfg.conv_stride}
    for k, v in sizes.items():
        if v:
            setattr(mconf, k, list(v) if isinstance(v, list) else v)
    if family == "whisper":
        return
    if not len(mconf.conv_dim) == len(mconf.conv_kernel) == len(mconf.conv_stride):
        raise ModelError(f"model.conv_dim, conv_kernel, conv_stride: need one entry per conv layer each "
                         f"(got {len(mconf.conv_dim)}, {len(mconf.conv_kernel)}, {len(mconf.conv_stride)})")
    mconf.num_feat_extract_layers = len(mconf.conv_dim)
    if cfg.hidden_size and mconf.hidden_size % mconf.num_conv_pos_embedding_groups:
        mconf.num_conv_pos_embedding_groups = 1


def build_whisper(cfg: ModelConfig, languages: list[str]) -> Bundle:
    from transformers import AutoConfig, GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    if cfg.task not in ("transcribe", "translate"):
        raise ModelError(f"model.task: {cfg.task!r} is not 'transcribe' or 'translate'")
    try:
        processor = WhisperProcessor.from_pretrained(cfg.name)
        mconf = AutoConfig.from_pretrained(cfg.name)
        # Dropouts and layerdrop are read when the modules are built: set them on the config first.
        _apply_overrides(mconf, cfg, _WHISPER_OVERRIDES)
        if (cfg.mask_time_prob or 0) > 0 or (cfg.mask_feature_prob or 0) > 0:
            mconf.apply_spec_augment = True  # Whisper ignores the mask probabilities without it
        if cfg.init == "scratch":
            scratch_sizes(mconf, cfg, "whisper")
            model = WhisperForConditionalGeneration(mconf)
            # The named model's generation config holds the language and task token tables that
            # `generate(language=..., task=...)` needs; one derived from the model config has none.
            try:
                model.generation_config = GenerationConfig.from_pretrained(cfg.name)
            except OSError:
                raise ModelError(f"model.name: '{cfg.name}' has no generation_config.json (Whisper's language "
                                 f"and task tables); cannot build a scratch Whisper from it") from None
            model.generation_config.alignment_heads = None  # the named model's layers, not this one's
        else:
            model = WhisperForConditionalGeneration.from_pretrained(cfg.name, config=mconf, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name: cannot load Whisper '{cfg.name}': {_first_line(e)}") from None
    bundle = Bundle("whisper", model, cfg, tokenizer=processor.tokenizer, processor=processor)
    for lang in languages:
        check_language(bundle.whisper_language(lang))
    model.config.use_cache = not cfg.gradient_checkpointing
    model.generation_config.forced_decoder_ids = None
    codes = [bundle.whisper_language(lang) for lang in languages]
    if codes and codes[0]:
        model.generation_config.language = codes[0]  # what an exported model's pipeline transcribes
    model.generation_config.task = cfg.task
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return bundle


def _apply_overrides(mconf, cfg: ModelConfig, mapping) -> None:
    items = mapping.items() if isinstance(mapping, dict) else ((k, k) for k in mapping)
    for ours, theirs in items:
        value = getattr(cfg, ours)
        if value is not None and hasattr(mconf, theirs):
            setattr(mconf, theirs, value)


SCRATCH_CONFIGS = {"wav2vec2": "Wav2Vec2Config", "hubert": "HubertConfig", "wavlm": "WavLMConfig"}


def build_ctc(cfg: ModelConfig, vocab, augment=None) -> Bundle:
    import transformers
    from transformers import AutoConfig, AutoModelForCTC

    special = dict(vocab_size=len(vocab), pad_token_id=vocab.blank, ctc_zero_infinity=True,
                   ctc_loss_reduction="sum")
    try:
        if cfg.init == "scratch":
            if cfg.name:
                mconf = AutoConfig.from_pretrained(cfg.name)
            else:  # XLS-R-like layout (layer-norm feature encoder, pre-norm transformer)
                mconf = getattr(transformers, SCRATCH_CONFIGS[cfg.arch])(
                    feat_extract_norm="layer", do_stable_layer_norm=True)
            scratch_sizes(mconf, cfg, "ctc")
            for k, v in special.items():
                setattr(mconf, k, v)
            _apply_overrides(mconf, cfg, _CTC_OVERRIDES)
            for k, v in augment_masks(augment).items():
                setattr(mconf, k, v)
            model = AutoModelForCTC.from_config(mconf)
        else:
            kwargs = {k: getattr(cfg, k) for k in _CTC_OVERRIDES if getattr(cfg, k) is not None}
            kwargs.update(augment_masks(augment))
            model = AutoModelForCTC.from_pretrained(cfg.name, dtype=torch.float32, ignore_mismatched_sizes=True,
                                                    **special, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name: cannot load CTC model '{cfg.name}': {_first_line(e)}") from None
    if cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    _mask_embed_trainable(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Bundle("ctc", model, cfg, vocab=vocab)


def _mask_embed_trainable(model) -> None:
    # The vector that replaces time-masked frames: without time masking (feature masking alone makes the
    # model create it) it is never used, and DistributedDataParallel stops on a parameter without gradient.
    embed = getattr(model.base_model, "masked_spec_embed", None)
    if embed is not None:
        embed.requires_grad_(bool(getattr(model.config, "apply_spec_augment", True) and model.config.mask_time_prob > 0))


AUGMENT_MASKS = ("mask_time_prob", "mask_time_length", "mask_time_min_masks", "mask_feature_prob",
                 "mask_feature_length", "mask_feature_min_masks")


def augment_masks(augment) -> dict:
    """A CTC model's config values for the `[augment]` section's mask settings that are set: transformers' own
    SpecAugment of the encoder's hidden states (set before the model is built, which creates the masked
    frames' vector only when a mask is on)."""
    values = {k: getattr(augment, k) for k in AUGMENT_MASKS if augment is not None and getattr(augment, k) is not None}
    if (values.get("mask_time_prob") or 0) > 0 or (values.get("mask_feature_prob") or 0) > 0:
        values["apply_spec_augment"] = True
    return values


def build(cfg: ModelConfig, vocab=None, languages: list[str] = (), augment=None) -> Bundle:
    """The model named by `cfg`: Whisper (labels for `languages`) or a CTC encoder with a head for `vocab`
    (with the SpecAugment masks of `augment`, the `[augment]` section, where set)."""
    check_model_name(cfg.name)
    family = infer_family(cfg)
    if family != "whisper" and vocab is None:
        raise ModelError("a CTC model needs a vocabulary")
    with quiet_progress_bars():
        if family == "whisper":
            return build_whisper(cfg, list(languages))
        return build_ctc(cfg, vocab, augment)


def encoder_of(bundle: Bundle) -> torch.nn.Module:
    """The acoustic encoder (frozen for the first model.freeze_encoder_steps steps)."""
    if bundle.family == "whisper":
        return bundle.model.model.encoder
    return bundle.model.base_model


def set_encoder_frozen(bundle: Bundle, frozen: bool) -> None:
    """Freeze the whole encoder, or give its parameters back the trainability they had before."""
    params = list(encoder_of(bundle).parameters())
    if frozen:
        bundle.encoder_flags = {id(p): p.requires_grad for p in params}
        for p in params:
            p.requires_grad_(False)
    else:
        for p in params:
            p.requires_grad_(bundle.encoder_flags.get(id(p), True))
        bundle.encoder_flags = {}


def select_parameters(bundle: Bundle, train_cfg, lora_cfg) -> None:
    """Decide which parameters train: `train.trainable` (only these), then `train.frozen`, then LoRA
    adapters on the layers matching `lora.targets` (which freezes everything else except what
    `train.trainable` names and a CTC model's output head). Patterns are regular expressions searched
    in parameter names; one that matches nothing is an error."""
    model = bundle.model
    named = dict(model.named_parameters())

    def matching(patterns, key):
        hits = set()
        for pattern in patterns:
            found = {n for n in named if re.search(pattern, n)}
            if not found:
                raise ModelError(f"{key}: pattern {pattern!r} matches no parameter (e.g. {next(iter(named))})")
            hits |= found
        return hits

    explicit = matching(train_cfg.trainable, "train.trainable")
    if train_cfg.trainable:
        for n, p in named.items():  # a selection: what the model keeps fixed (Whisper's sinusoids) stays fixed
            p.requires_grad_(p.requires_grad and n in explicit)
    for n in matching(train_cfg.frozen, "train.frozen"):
        named[n].requires_grad_(False)
    if bundle.family == "ctc" and bundle.cfg.freeze_feature_encoder:
        model.freeze_feature_encoder()
    if lora_cfg.rank > 0:
        from asr.lora import apply_lora

        keep = {n for n, p in named.items() if p.requires_grad and (n in explicit or
                                                                   (bundle.family == "ctc" and n.startswith("lm_head")))}
        try:
            apply_lora(model, lora_cfg.targets, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout)
        except ValueError as e:
            raise ModelError(f"lora.targets: {e}") from None
        for n, p in model.named_parameters():
            if n in keep:
                p.requires_grad_(True)


def parameter_summary(model: torch.nn.Module) -> str:
    """Trainable / total parameters per top-level module (first two name components)."""
    counts = defaultdict(lambda: [0, 0])
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        counts[key][0] += p.numel() if p.requires_grad else 0
        counts[key][1] += p.numel()
    width = max(len(k) for k in counts)
    lines = [f"{'module':{width}s} {'trainable':>13s} {'total':>13s}"]
    for key, (t, n) in counts.items():
        lines.append(f"{key:{width}s} {t:13,d} {n:13,d}")
    t = sum(c[0] for c in counts.values())
    n = sum(c[1] for c in counts.values())
    lines.append(f"{'all':{width}s} {t:13,d} {n:13,d} ({100 * t / max(n, 1):.2f}% trainable)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# LayerDrop under DistributedDataParallel.

_LAYERDROP_KEYS = ("layerdrop", "encoder_layerdrop", "decoder_layerdrop")  # CTC encoders; Whisper


def uses_layerdrop(model: torch.nn.Module) -> bool:
    """Whether the model skips whole layers at random in training (LayerDrop, any stack)."""
    return any((getattr(model.config, k, 0) or 0) > 0 for k in _LAYERDROP_KEYS)


class _SharedDraws(torch.overrides.TorchFunctionMode):
    """Serves `torch.rand([])`, the call with which transformers draws each LayerDrop decision (every CTC
    encoder, Whisper's encoder and decoder), from `generator` instead of the global one."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.rand and args in (([],), ((),)) and not kwargs:
            return torch.rand([], generator=self.generator)
        return func(*args, **(kwargs or {}))


def numpy_layer_drop(model: torch.nn.Module) -> str | None:
    """The name of a module that draws LayerDrop from numpy's global generator (the downsampling adapter of
    Wav2Vec2, WavLM, Data2VecAudio, Wav2Vec2-Conformer with `add_adapter`), which differs between ranks."""
    import inspect

    for name, module in model.named_modules():
        if (getattr(module, "layerdrop", 0) or 0) > 0 and "np.random" in inspect.getsource(type(module).forward):
            return name
    return None


def layer_drop_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of LayerDrop's draws in micro-batch `micro` of optimizer step `step` (0-based)."""
    key = hashlib.blake2b(f"layerdrop/{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1)


def layer_drop_context(model: torch.nn.Module, seed: int, step: int, micro: int):
    """The context of one training forward: its LayerDrop decisions come from `layer_drop_generator`, so
    every rank skips the same layers (DistributedDataParallel needs the same graph on every rank), the same
    as one process with the whole global batch, and the same in a resumed run. The global generator's
    stream differs between ranks (dropout draws from it by batch size). Nothing for a model without
    LayerDrop."""
    if not (model.training and uses_layerdrop(model)):
        return nullcontext()
    return _SharedDraws(layer_drop_generator(seed, step, micro))


# ---------------------------------------------------------------------------------------
# Batches -> model inputs, on the device.


def model_inputs(bundle: Bundle, batch: dict, device: torch.device) -> dict:
    """Model keyword arguments for a collated batch; features are computed here, on `device`."""
    audio = batch["audio"].to(device, non_blocking=True)  # (B, N)
    lengths = batch["audio_lengths"].to(device)  # (B,)
    if bundle.family == "whisper":
        features = log_mel(audio, bundle.model.config.num_mel_bins)  # (B, n_mels, 3000)
        if "time_mask" in batch:  # a training batch with SpecAugment (asr.augment)
            features = apply_spec_masks(features, batch["time_mask"], batch["freq_mask"])
        labels = batch["labels"].to(device)  # (B, L) full sequences, -100 padded
        decoder_input_ids = labels[:, :-1].clone()
        decoder_input_ids[decoder_input_ids == -100] = bundle.tokenizer.eos_token_id
        return {"input_features": features, "decoder_input_ids": decoder_input_ids}
    values = normalize_waveform(audio, lengths)  # (B, N)
    inputs = {"input_values": values}
    if bundle.model.config.feat_extract_norm == "layer":
        inputs["attention_mask"] = lengths_to_mask(lengths, audio.shape[1])
    return inputs


def loss_batch(bundle: Bundle, batch: dict, device: torch.device) -> dict:
    """What a loss function reads besides the outputs: targets and lengths on `device`."""
    labels = batch["labels"].to(device)
    if bundle.family == "whisper":
        targets = labels[:, 1:]  # (B, L-1) next-token targets
        prompt = batch.get("prompt_lengths")
        if prompt is not None and bool((prompt > 0).any()):  # a <|startofprev|> prompt: context, not targets
            skip = torch.arange(targets.shape[1], device=device)[None, :] < prompt.to(device)[:, None]  # (B, L-1)
            targets = targets.masked_fill(skip, -100)
        return {"labels": targets}
    out_lengths = ctc_output_lengths(bundle.model, batch["audio_lengths"]).to(device)
    return {"labels": labels, "label_lengths": batch["label_lengths"].to(device), "out_lengths": out_lengths,
            "blank": bundle.vocab.blank}


def loss_step(bundle: Bundle, model: torch.nn.Module, batch: dict, loss_fn, device: torch.device,
              autocast=nullcontext, inputs: dict | None = None) -> tuple[object, torch.Tensor, int]:
    """One forward pass and its loss, as training and evaluation both run it: (outputs, loss_sum, count).
    `model` is what runs the forward (the bundle's model, or DistributedDataParallel around it); `inputs`
    replace the batch's model inputs (e.g. Whisper's encoder output, computed once for loss and decoding).
    The forward runs under `autocast`; the input features before it and the loss after it in float32."""
    inputs = inputs if inputs is not None else model_inputs(bundle, batch, device)  # not autocast: exact features
    with autocast():
        outputs = model(**inputs)
    loss_sum, n = loss_fn(outputs, loss_batch(bundle, batch, device))
    return outputs, loss_sum, n


# ---------------------------------------------------------------------------------------
# Export.


def export(bundle: Bundle, folder: str | Path) -> None:
    """Write a `save_pretrained` folder (model + processor) that transformers' pipeline loads;
    LoRA adapters are merged into the exported weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from asr.lora import LoRALinear, merged_copy

    if any(isinstance(m, LoRALinear) for m in bundle.model.modules()):
        bundle = Bundle(bundle.family, merged_copy(bundle.model), bundle.cfg, bundle.tokenizer, bundle.vocab,
                        bundle.processor)
    with quiet_progress_bars():
        _export(bundle, folder)


def _export(bundle: Bundle, folder: Path) -> None:
    model = bundle.model
    if bundle.family == "whisper":
        model.save_pretrained(folder)
        bundle.processor.save_pretrained(folder)
        return
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    model.save_pretrained(folder)
    tokens = bundle.vocab.tokens
    if bundle.vocab.kind == "sentencepiece":  # the tokenizer joins tokens with "": word starts become spaces
        tokens = [t.replace("▁", " ") if t not in ("[PAD]", "[UNK]") else t for t in tokens]
    vocab_file = folder / "vocab.json"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|",
                                     bos_token=None, eos_token=None)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=model.config.feat_extract_norm == "layer")
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
