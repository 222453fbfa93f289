"""What the checkpoint manifest's check costs a save: Whisper base in float32 with its AdamW state after one
step, saved by `asr.checkpoint.save_checkpoint`

    shipped       as it is: the manifest relies on the CRC-32 that torch.save's zip writer computes of each
                  record (torch's default, so today's saves already pay for it) and hashes nothing more;
                  verify() checks those CRC-32s at resume
    unverified    shipped without the manifest (no manifest.json, config.toml not hashed): the save as it was
                  before checkpoints were verified
    none          torch's CRC-32 switched off and nothing hashed: the bare cost of writing and syncing
    blake2b       torch's CRC-32 switched off, so save_checkpoint hashes every byte with blake2b as it is
                  written instead (its fallback when torch's CRC-32 is off)
    crc+blake2b   shipped plus a blake2b digest of every byte as it is written

in rotating order, then what verifying a shipped checkpoint costs at resume.

    python tests/bench/bench_checkpoint.py [--model ../shared/models/whisper-base] [--rounds 5] [--dir runs]

Prints the figures and writes tests/bench/results/checkpoint.json. Times are medians of the rounds; a save
includes fsync, so they depend on the disk under --dir (default: a temporary folder under runs/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from asr import checkpoint as ckpt  # noqa: E402
from asr.config import TrainConfig  # noqa: E402
from asr.train import make_optimizer  # noqa: E402


class NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


class AlsoHashed(ckpt._WriteErrors):
    def __init__(self, f, hashed: bool):
        super().__init__(f, True)


@contextmanager
def variant(name: str):
    """Set up one way of saving (see the module's docstring); restores the shipped one after."""
    crc, new_hash, writer, save_file = (torch.serialization.get_crc32_options(), ckpt._new_hash, ckpt._WriteErrors,
                                        ckpt._save_file)
    try:
        if name == "unverified":
            ckpt._new_hash = NoHash
            ckpt._save_file = lambda obj, path: {} if path.name == ckpt.MANIFEST else save_file(obj, path)
        elif name == "none":
            torch.serialization.set_crc32_options(False)
            ckpt._new_hash = NoHash
        elif name == "blake2b":
            torch.serialization.set_crc32_options(False)
        elif name == "crc+blake2b":
            ckpt._WriteErrors = AlsoHashed
        yield
    finally:
        torch.serialization.set_crc32_options(crc)
        ckpt._new_hash, ckpt._WriteErrors, ckpt._save_file = new_hash, writer, save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "whisper-base"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=str(ROOT / "runs"), help="where the checkpoints are written (then removed)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "checkpoint.json"))
    args = ap.parse_args()

    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5, weight_decay=0.01))
    for p in model.parameters():  # one step: AdamW's two moments per parameter exist
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model_state, optim_state = model.state_dict(), optimizer.state_dict()
    trainer = {"step": 1, "rng": [ckpt.rng_state()]}

    Path(args.dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    names = ["shipped", "unverified", "none", "blake2b", "crc+blake2b"]
    times: dict[str, list[float]] = {n: [] for n in names}
    verify_times, nbytes = [], 0
    try:
        for r in range(args.rounds + 1):  # round 0 warms up (page cache, allocator) and is not counted
            for name in names[r % 5:] + names[: r % 5]:
                with variant(name):
                    t = time.perf_counter()
                    path = ckpt.save_checkpoint(folder, r, model_state, optim_state, trainer, "")
                    dt = time.perf_counter() - t
                if r:
                    times[name].append(dt)
                if name == "shipped":
                    nbytes = sum(p.stat().st_size for p in path.iterdir())
                    t = time.perf_counter()
                    assert ckpt.verify(path) is None
                    if r:
                        verify_times.append(time.perf_counter() - t)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    med = {n: statistics.median(v) for n, v in times.items()}
    added = {n: [a / b - 1 for a, b in zip(times[n], times["unverified"])] for n in names if n != "unverified"}
    results = {
        "model": args.model, "bytes": nbytes, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "save_s": times, "median_save_s": med, "median_verify_s": statistics.median(verify_times),
        "change_vs_unverified_of_medians": {n: med[n] / med["unverified"] - 1 for n in added},
        "change_vs_unverified_median_per_round": {n: statistics.median(v) for n, v in added.items()},
    }
    print(f"checkpoint of {nbytes / 1e6:.0f} MB (model + AdamW state), {args.rounds} rounds, median save time:")
    for n in names:
        extra = "" if n == "unverified" else (f"  ({100 * (med[n] / med['unverified'] - 1):+.1f}% vs unverified; "
                                              f"per round, median {100 * statistics.median(added[n]):+.1f}%)")
        print(f"  {n:12s} {med[n]:.2f} s{extra}")
    print(f"verify at resume (shipped): {statistics.median(verify_times):.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
