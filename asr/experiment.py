"""Setting up a run: device and precision, the log, the run folder, data and model (`prepare`), exports.

Used by the training loop (asr/train.py) and by evaluation-only runs.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from asr import allocator
from asr import checkpoint as ckpt
from asr import distributed as dist
from asr.augment import noise_files, speed_on
from asr.config import (Config, ConfigError, check_methods, duplicate_source_names, eval_set_name, eval_set_specs,
                        to_toml)
from asr.data import (DataError, SplitReport, Utterance, filter_utterances, format_report, read_source_split,
                      source_name, write_report)
from asr.models import Bundle, build, export, infer_family
from asr.text import clean_transcript, run_vocab


class TrainingError(Exception):
    """A run that cannot go on (no data, too many bad steps); one line."""


EXPORT_INFO = "asr_export.json"  # in best/ and final/: which step the exported weights are from


# ---------------------------------------------------------------------------------------
# The run folder's lock.

LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # resolved run folder -> file descriptor holding its lock (this process)


def lock_run_dir(out: Path) -> None:
    """Take the exclusive lock of a run folder (`fcntl.flock` on `out/.lock`) for this process, or stop with
    one line (ConfigError: exit status 2). The lock holds until `unlock_run_dir` or the process's end: the OS
    releases it when the process dies, however it dies, so a killed run leaves no stale lock. Taking it again
    in the same process is a no-op. An unwritable `out` (read-only disk, a file in its path, no permission)
    is the same kind of one-line error. Under torchrun rank 0 takes it and the other ranks learn the outcome."""
    error = None
    if dist.is_main():
        try:
            _lock(out)
        except ConfigError as e:
            error = str(e)
    (failed,) = dist.sum_values(1.0 if error else 0.0)
    if failed:
        raise ConfigError(error or f"run.out_dir: rank 0 could not take the lock of {out}")


def _lock(out: Path) -> None:
    key = str(out.resolve())
    if key in _HELD:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"run.out_dir: cannot write to {out}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"run.out_dir: {out} is in use by another run (pid {holder}); wait for it to end "
                              f"or set another run.out_dir") from None
        raise ConfigError(f"run.out_dir: cannot lock {out / LOCK_FILE}: {e.strerror or e}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"run.out_dir: cannot write to {out}: {e.strerror or e}") from None
    _HELD[key] = fd


def unlock_run_dir(out: Path) -> None:
    """Release this process's lock of `out` (if it holds it)."""
    fd = _HELD.pop(str(Path(out).resolve()), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for the copies forked loader workers may still hold
        os.close(fd)


def _forget_locks_in_child() -> None:
    # A forked process (a data-loader worker) shares the lock's open file: its copy must not keep the lock
    # after the run lets it go, nor take part in it.
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


# ---------------------------------------------------------------------------------------
# Set-up.


class Log:
    """Prints and appends to train.log (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None and dist.is_main() else None
        self.progress: Progress | None = None

    def __call__(self, msg: str) -> None:
        if not dist.is_main():
            return
        if self.progress:
            self.progress.clear()
        print(msg, flush=True)
        if self.file:
            try:
                self.file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
                self.file.flush()
            except OSError as e:  # a full disk: the terminal still has the log, and the run goes on
                self.file = None
                print(f"warning: train.log no longer written: {e.strerror or e}", flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.clear()
        if self.file:
            self.file.close()
            self.file = None


class Progress:
    """One updating status line on stderr, only when stderr is a terminal (log lines carry the rest)."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stderr
        self.total = total
        self.enabled = dist.is_main() and self.stream.isatty()
        self.t0 = time.time()
        self.width = 0

    def update(self, step: int, first_step: int, loss: float) -> None:
        if not self.enabled:
            return
        done = (step - first_step) / max(self.total - first_step, 1)
        eta = (time.time() - self.t0) / max(step - first_step, 1) * (self.total - step)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"[{bar}] step {step}/{self.total} loss {loss:.4f} eta {int(eta) // 60}:{int(eta) % 60:02d}"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class Board:
    """TensorBoard's SummaryWriter (rank 0 only) whose write failures (a full disk, a file size limit) end
    TensorBoard logging with one log line rather than a traceback from its writer thread: the run goes on,
    its checkpoints and eval files are what counts."""

    def __init__(self, folder: Path, log: Log):
        self.folder, self.log, self.writer = folder, log, None
        if threading.excepthook is not _quiet_tensorboard_thread:
            _quiet_tensorboard_thread.default = threading.excepthook
            threading.excepthook = _quiet_tensorboard_thread
        self._call(lambda: setattr(self, "writer", _summary_writer(folder)))

    def _call(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            self.writer = None
            self.log(f"warning: TensorBoard logging stopped: cannot write {self.folder}: {e.strerror or e}")

    def __getattr__(self, name: str):  # add_scalar, add_text, add_audio, flush, close
        def call(*args, **kwargs):
            if self.writer is not None:
                self._call(lambda: getattr(self.writer, name)(*args, **kwargs))
        return call


def _summary_writer(folder: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def _quiet_tensorboard_thread(args) -> None:
    # TensorBoard's writer thread re-raises a failed write after storing it; the next call from the run's
    # thread raises it again, and Board turns that into one log line.
    if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
        return
    _quiet_tensorboard_thread.default(args)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("run.device: CUDA requested but not available")
        if dist.is_initialized() or name == "cuda":
            return torch.device("cuda", dist.local_rank() if dist.is_initialized() else torch.cuda.current_device())
    return torch.device(name)


def cpu_bf16_flags() -> list[str]:
    """The native bf16 instruction sets of this CPU (avx512_bf16, amx_bf16) named in /proc/cpuinfo's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def choose_precision(name: str, device: torch.device, key: str = "train.precision", *,
                     family: str) -> tuple[str, str]:
    """(precision, why) for setting `key` = `name` on `device` for a model of `family` (whisper | ctc). `auto`:
    bf16 (fp16 without bf16) on CUDA; on a CPU with native bf16 (avx512_bf16, amx_bf16), bf16 for Whisper, whose
    step it runs about 2x faster with WER within 0.6 points of fp32 after 20 and 100 steps (bench_bf16, README
    "Benchmarks"), and fp32 for CTC models, whose accuracy under bf16 is measured only on a small model trained
    from scratch (bench_ctc), not on a pretrained encoder's fine-tuning; else fp32."""
    if name != "auto":
        return name, f"{key} = {name!r}"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ("bf16", f"{key} = 'auto' on CUDA with bf16") if bf16 else ("fp16", f"{key} = 'auto' on CUDA without bf16")
    flags = cpu_bf16_flags()
    if not flags:
        return "fp32", f"{key} = 'auto' on a CPU without native bf16"
    if family == "whisper":
        return "bf16", (f"{key} = 'auto' on a CPU with native bf16 ({', '.join(flags)}); set 'fp32' for "
                        f"full precision")
    return "fp32", (f"{key} = 'auto' for a CTC model on the CPU: bf16's accuracy is measured only for a small model "
                    f"trained from scratch; this CPU has native bf16 ({', '.join(flags)}): set 'bf16' for faster steps")


def eval_precision(cfg: Config, device: torch.device, log, family: str) -> str:
    """The precision of evaluation and decoding: eval.precision, else train.precision; logged with why."""
    key = "eval.precision" if cfg.eval.precision else "train.precision"
    precision, why = choose_precision(cfg.eval.precision or cfg.train.precision, device, key, family=family)
    log(f"evaluation precision {precision} ({why})")
    return precision


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts for bf16/fp16, or of null contexts for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def guard_bf16_convs(model: torch.nn.Module, device: torch.device, log) -> list[str]:
    """Run in float32 the convolutions of `model` whose bf16 result on this CPU is wrong; returns their names.

    torch 2.9's oneDNN gives garbage for some bf16 convolution shapes on CPUs with native bf16 (a grouped Conv1d with
    2, 4, 6, 8 or 12 input channels per group and 8 to 128 taps, as in a small Wav2Vec2's positional embedding:
    relative error 1.1, against 2e-3 for bf16 rounding), and a model trained through it learns nothing (CTC from
    scratch stayed blank for 1000 steps). Each convolution shape of `model` is computed once in bf16 on random
    data and compared with float64; one off by more than 5% runs with autocast off (its input and weights cast to
    float32, its output cast back to the input's dtype), and the log names it."""
    if device.type != "cpu":
        return []
    import torch.nn.functional as F

    checked, names = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            continue
        if getattr(m, "bf16_fp32_guard", False):  # already guarded
            names.append(name)
            continue
        dims = 1 if isinstance(m, torch.nn.Conv1d) else 2
        key = (dims, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups)
        if key not in checked:
            conv = F.conv1d if dims == 1 else F.conv2d
            gen = torch.Generator().manual_seed(0)
            size = [d * (k - 1) + 1 + 8 * s for k, s, d in zip(m.kernel_size, m.stride, m.dilation)]
            x = torch.randn(2, m.in_channels, *size, generator=gen).bfloat16()
            w = torch.randn(m.out_channels, m.in_channels // m.groups, *m.kernel_size, generator=gen).bfloat16()
            args = (None, m.stride, m.padding, m.dilation, m.groups)
            exact = conv(x.double(), w.double(), *args)
            checked[key] = float((conv(x, w, *args).double() - exact).norm() / exact.norm().clamp_min(1e-30))
        if checked[key] > 0.05:
            base = type(m)
            m.__class__ = type(f"Fp32{base.__name__}", (base,), {"forward": _fp32_forward, "bf16_fp32_guard": True})
            names.append(f"{name} (bf16 error {checked[key]:.2f})")
    if names:
        log(f"bf16: {len(names)} convolution(s) give wrong bf16 results on this CPU (oneDNN) and run in float32: "
            + ", ".join(names))
    return names


def _fp32_forward(self, x):  # also where FSDP gathered the weights in bf16; the output in the input's dtype
    with torch.autocast(x.device.type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Data:
    train: list[Utterance]
    eval_sets: dict[str, list[Utterance]]
    reports: dict[str, SplitReport] = field(default_factory=dict)
    stream: object = None  # asr.shards.ShardSource: training clips streamed from shards (then `train` is empty)


def read_data(cfg: Config) -> tuple[dict, dict]:
    """Raw utterances and bad rows per (source name, split) for the training splits and the evaluation sets."""
    raw, bad = {}, {}
    if duplicate := duplicate_source_names(cfg):
        raise TrainingError(duplicate)
    sources = {source_name(s): s for s in cfg.data.sources}
    wanted = [(name, "train") for name, s in sources.items() if s.train and s.kind != "shards"]  # shards: streamed
    for set_name, src, split in eval_set_specs(cfg):
        if not getattr(sources[src], split):
            raise TrainingError(f"evaluation set '{set_name}': data source '{src}' has no {split} split")
        wanted.append((src, split))
    for key in dict.fromkeys(wanted):
        raw[key], bad[key] = read_source_split(sources[key[0]], getattr(sources[key[0]], key[1]))
    return raw, bad


def build_vocab(cfg: Config, raw: dict, out_dir: Path, stream=None):
    """The CTC vocabulary: the one saved with the run if there is one, else built from training transcripts
    (of `stream`'s shards too: their text column) and saved in out_dir/vocab."""
    texts = [clean_transcript(u.text, cfg.data.text, u.language) for (_, split), us in raw.items()
             if split == "train" for u in us]
    if stream is not None and not (out_dir / "vocab" / "vocab.json").is_file():
        texts += stream.texts(cfg.data)
    vocab, origin = run_vocab(cfg.data, texts, out_dir / "vocab")
    if vocab is None:
        raise TrainingError("no training transcripts to build a CTC vocabulary from")
    if origin == "saved":
        return vocab
    if dist.is_main():
        tmp = out_dir / ".tmp-vocab"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        vocab.save(tmp)
        ckpt.replace_dir(tmp, out_dir / "vocab")
    return vocab


def prepare(cfg: Config, out_dir: Path, log: Log, report: bool = True) -> tuple[Bundle, Data]:
    """Read the sources, build the model, filter the data with the model's labels, write data_report.json
    (unless not `report`: an evaluation-only run leaves the training run's report as it is)."""
    raw, bad = read_data(cfg)
    stream = None
    if shards := [s for s in cfg.data.sources if s.kind == "shards"]:
        from asr.shards import ShardSource

        stream = ShardSource(shards[0])
    family = infer_family(cfg.model)
    vocab = build_vocab(cfg, raw, out_dir, stream) if family == "ctc" else None
    # Training languages first: the first is what an exported Whisper transcribes by default, not the
    # language of an evaluation-only source (e.g. one watched for forgetting).
    training = sorted({s.language for s in cfg.data.sources if s.train and s.kind != "shards"}
                      | set(stream.languages if stream else ()))
    languages = training + sorted({s.language for s in cfg.data.sources} - set(training))
    bundle = build(cfg.model, vocab, languages, cfg.augment)
    labeler = bundle.labeler
    if labeler.max_tokens and cfg.data.max_label_tokens > 0:
        labeler.max_tokens = min(labeler.max_tokens, cfg.data.max_label_tokens)
    if bundle.family == "whisper" and (cfg.data.timestamp_prob > 0 or cfg.data.concat_prob > 0):
        from asr.timestamps import timestamped_length

        labeler.timestamped = lambda text, lang: timestamped_length(bundle.tokenizer,
                                                                    bundle.prefix_tokens(lang, True), text)
    kept, reports = {}, {}
    for (name, split), utts in raw.items():
        reports[f"{name}/{split}"] = SplitReport()
        speeds = cfg.augment.speed if split == "train" and speed_on(cfg.augment) else ()  # the perturbed lengths
        kept[name, split] = filter_utterances(utts, bad[name, split], cfg.data, labeler, reports[f"{name}/{split}"],
                                              speeds=speeds)
    train = [u for (name, split), utts in kept.items() if split == "train" for u in utts]
    if stream is not None:
        reports[f"{stream.name}/train"] = SplitReport()  # filled as the clips stream (asr.shards)
    limit = cfg.eval.max_utterances or None
    eval_sets = {set_name: kept[src, split][:limit] for set_name, src, split in eval_set_specs(cfg)}
    if dist.is_main() and report:
        write_report(reports, out_dir / "data_report.json")
    log(format_report(reports))
    if stream is not None:
        log(stream.describe())
    for set_name, src, split in eval_set_specs(cfg):
        if not eval_sets[set_name]:  # it would score 0 utterances as WER 0 and make any model the best
            r = reports[f"{src}/{split}"]
            why = ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items())) or "no rows"
            raise DataError(f"evaluation set '{set_name}' ({src}/{split}): no utterance left after filtering "
                            f"({r.total} read: {why}; see {out_dir / 'data_report.json'})")
    return bundle, Data(train, eval_sets, reports, stream)


def record_decode_failures(data: Data, key: str, by_id: dict, failures: list, cfg: Config, out: Path, log: Log,
                           write: bool = True) -> None:
    """Count clips (`by_id`: id -> Utterance) that failed to decode when loaded in data_report.json's split
    `key`, each once, with a log line the first time, and rewrite the report (when `write`)."""
    new = [(i, e) for i, e in failures if data.reports[key].decode_failed(by_id[i], e, cfg.data.report_examples)]
    for utt_id, err in new:
        log(f"dropped {utt_id}: {err}")
    if new and write and dist.is_main():
        write_report(data.reports, out / "data_report.json")


def check_whisper_only(cfg: Config, family: str) -> None:
    """Timestamp, packing and prompt labels and long-form sets on a CTC model: ConfigError naming the key."""
    if family == "whisper":
        return
    on = [k for k in ("timestamp_prob", "concat_prob", "prev_text_prob") if getattr(cfg.data, k) > 0]
    if on:
        raise ConfigError(f"data.{on[0]}: Whisper's timestamp and prompt labels are not for CTC models; set it to 0")
    for i, es in enumerate(cfg.eval.sets):
        if es.kind == "longform":
            raise ConfigError(f"eval.sets.{i}.kind: long-form sets ('{eval_set_name(es)}') need a Whisper model "
                              f"(transformers' long-form generate)")


def check_decoding(cfg: Config) -> None:
    """Before any work: the loss and the decoder exist for the model's family and take the arguments given
    (ConfigError: exit status 2), and the decoding LM (decode.lm) reads, so a missing or malformed file is
    one line at start-up rather than a traceback at the first evaluation."""
    family = infer_family(cfg.model)
    check_methods(cfg, family)
    check_whisper_only(cfg, family)
    if not cfg.decode.lm:
        return
    from asr.decode import load_lm
    from asr.lm import ArpaError

    try:
        load_lm(cfg.decode.lm)
    except (OSError, ArpaError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise TrainingError(f"decode.lm: cannot read {cfg.decode.lm}: {detail}") from None


def export_to(bundle: Bundle, folder: Path, info: dict) -> None:
    """Export a `save_pretrained` folder atomically (temporary folder, then rename); a failed write (disk
    full), however the writing library reports it, is a one-line CheckpointError naming the folder."""

    def write(tmp: Path) -> None:
        export(bundle, tmp)
        (tmp / EXPORT_INFO).write_text(ckpt.json_text(info, indent=None), encoding="utf-8")

    ckpt.write_folder(folder, write)


def use_allocator(cfg: Config, device: torch.device, log: Log) -> None:
    """Apply run.allocator to this process; log what a CPU run's tensors are allocated with."""
    running = allocator.configure(cfg.run.allocator)
    asked = cfg.run.allocator
    if device.type == "cpu":
        why = {"tbb": "only run.py preloads it", "release": "glibc only", "system": "TBB's is preloaded"}
        log(f"CPU allocator: {running}" + ("" if running == asked or asked == "auto" else
                                           f" (run.allocator = {asked!r} is not in effect: {why[asked]})"))


def start_run(cfg: Config, fresh: bool = False, training: bool = True) -> tuple[torch.device, Path, Log]:
    """The run folder, locked (cleared of the old run's state with `fresh`, of half-written folders always),
    its log, seeds; for training also its resolved config.toml and, on a new run, the pre-flight data checks
    (an evaluation-only run writes neither: the folder's config.toml stays the training run's)."""
    device = pick_device(cfg.run.device)
    check_decoding(cfg)
    if training and cfg.augment.noise_dir:
        noise_files(cfg.augment.noise_dir)  # a missing or empty folder: one line (ConfigError) before any work
    out = Path(cfg.run.out_dir)
    lock_run_dir(out)  # before anything in it is removed or written
    if fresh and training and dist.is_main() and out.exists():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("tb", "eval", "best", "final", "vocab", "results.json", "train.log", "preflight.json"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "train.log")
    if dist.is_main():
        for p in ckpt.clean_partial(out):  # an export or vocabulary write killed half-way
            log(f"removed partial {p}")
        if training:
            ckpt.write_files({out / "config.toml": to_toml(cfg)})
    use_allocator(cfg, device, log)
    seed_everything(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if training and cfg.preflight.enabled and dist.is_main() and not ckpt.latest_checkpoint(out / "checkpoints"):
        from asr.preflight import format_preflight, preflight, write_preflight

        report = preflight(cfg)
        write_preflight(report, out)
        log(format_preflight(report))
    return device, out, log
