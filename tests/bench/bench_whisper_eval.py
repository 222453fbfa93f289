"""Where a Whisper evaluation batch's time goes on the CPU: the encoder and greedy `generate` (the decoder),
in fp32 and bf16 autocast, with the dynamic KV cache `generate` uses by default and with a static one; and
whether the transcripts are the same as fp32's.

    python tests/bench/bench_whisper_eval.py --model ../shared/models/whisper-base \
        --cv ../shared/data/synth-cv/tr --clips 16

One batch of the first --clips clips of the test split (as asr.evaluation batches them, by duration);
each figure is the best of --rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchlib import shared_args, write_result  # noqa: E402


def best_time(fn, rounds: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared_args(ap)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=225)
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "whisper_eval.json"))
    args = ap.parse_args()
    import torch

    import asr.decode as D
    from asr.config import load_config
    from asr.data import AudioDataset, collate
    from asr.experiment import prepare
    from asr.models import model_inputs

    cfg = load_config(None, [
        "run.out_dir=/tmp/asr-bench-whisper-eval", f"model.name={Path(args.model).resolve()}",
        f'data.sources=[{{kind = "common_voice", path = "{Path(args.cv).resolve()}", language = "{args.lang}", '
        f'train = "test", dev = "test"}}]', "preflight.enabled=false"])
    Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)
    bundle, data = prepare(cfg, Path(cfg.run.out_dir), print)
    model, cpu = bundle.model.eval(), torch.device("cpu")
    utts = sorted(next(iter(data.eval_sets.values()))[: args.clips], key=lambda u: u.duration)
    dataset = AudioDataset(utts)
    batch = collate([dataset[i] for i in range(len(utts))])
    features = model_inputs(bundle, batch, cpu)["input_features"]  # (B, n_mels, 3000)
    plain = D.whisper_generation_config
    result, texts = {"clips": len(utts), "threads": torch.get_num_threads()}, {}
    for precision in ("fp32", "bf16"):
        ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else \
            (lambda: torch.autocast("cpu", enabled=False))
        with torch.no_grad(), ac():
            t, enc = best_time(lambda: model.get_encoder()(features), args.rounds)
        result[f"encoder_s_{precision}"] = t
        for cache in ("dynamic", "static"):
            def config(*a, **kw):
                gen = plain(*a, **kw)
                if cache == "static":
                    gen.cache_implementation = "static"
                return gen

            D.whisper_generation_config = config
            with ac():
                t, hyps = best_time(lambda: D.whisper_generate(bundle, batch, cpu, max_new_tokens=args.max_new_tokens,
                                                               encoder_outputs=enc), args.rounds)
            result[f"generate_s_{precision}_{cache}"] = t
            texts[precision, cache] = hyps
    D.whisper_generation_config = plain
    for key in texts:
        result["same_as_fp32_" + "_".join(key)] = sum(a == b for a, b in zip(texts[key], texts["fp32", "dynamic"]))
    write_result(result, args.out)


if __name__ == "__main__":
    main()
