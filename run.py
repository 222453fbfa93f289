"""Fine-tune or evaluate a speech recognition model from a TOML experiment file.

    python run.py --exp experiments/demo.toml
    python run.py --exp experiments/tr_xlsr.toml --set train.lr=1e-4 --set data.max_duration_s=20
    python run.py --exp experiments/demo.toml --print-config
    python run.py --exp experiments/demo.toml --check          (pre-flight data checks only)
    python run.py --exp experiments/demo.toml --eval-only [--checkpoint runs/demo/best]
    python run.py --run runs/demo --eval-only --set eval.split=test   (the run's own saved settings)
    torchrun --nproc_per_node=2 run.py --exp experiments/demo.toml
"""

from __future__ import annotations

import argparse
import os
import sys


def quiet_libraries():
    """Keep the training log readable: transformers' errors only, no per-call progress bars. Returns a
    function that restores the previous settings (main() also runs in-process, e.g. in tests)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from huggingface_hub.utils import logging as hub_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_verbosity = hub_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # no retry chatter before a one-line error when the Hub is unreachable

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def run_settings(cfg, overrides: list[str]):
    """What --eval-only evaluates with: the run's own saved settings (its config.toml, with the same
    --set on top) when the experiment's run folder has them, so a run trained with overrides is evaluated
    as it was trained; a note names the settings where the experiment file says otherwise."""
    from pathlib import Path

    from asr.config import config_changes, load_run_config

    folder = Path(cfg.run.out_dir)
    if not (folder / "config.toml").is_file():
        return cfg
    saved = load_run_config(folder, overrides)
    ignored = [key for key, _, _ in config_changes(saved, cfg)]
    print(f"evaluating with the run's own settings ({folder / 'config.toml'})"
          + (f"; the experiment file's differ in {', '.join(ignored)} (not used)" if ignored else ""), flush=True)
    return saved


def main(argv: list[str] | None = None, restart: bool = False) -> int:
    """The command line; with `restart` (as a script) it may first restart itself with another C allocator
    preloaded (run.allocator, asr/allocator.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", help="experiment TOML file")
    parser.add_argument("--run", help="a run folder: its saved config.toml is the experiment (with --set on top)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. train.lr=1e-4 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming from the newest checkpoint")
    parser.add_argument("--check", action="store_true",
                        help="pre-flight data checks only: print a table, write <out_dir>/preflight.json")
    parser.add_argument("--eval-only", action="store_true", help="evaluate only (see --checkpoint)")
    parser.add_argument("--checkpoint", help="with --eval-only: a checkpoint or exported model folder")
    args = parser.parse_args(argv)

    from asr.config import ConfigError, load_config, load_run_config, to_toml

    if bool(args.exp) == bool(args.run):
        print("error: give the experiment as --exp FILE or --run FOLDER (one of them)", file=sys.stderr)
        return 2
    try:
        if args.run:
            cfg = load_run_config(args.run, args.overrides)
        else:
            cfg = load_config(args.exp, args.overrides)
            if args.eval_only:
                cfg = run_settings(cfg, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(cfg))
        return 0
    if restart and not args.check:
        from asr.allocator import AllocatorError, preload_env, restart_with

        try:
            env = preload_env(cfg.run.allocator, cfg.run.device)
        except AllocatorError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if env is not None:
            restart_with(env)  # the same command, with TBB's malloc; nothing has been read or written yet

    restore_libraries = quiet_libraries()
    from asr import distributed as dist
    from asr.audio import AudioError
    from asr.checkpoint import CheckpointError
    from asr.data import DataError
    from asr.models import ModelError
    from asr.experiment import TrainingError, pick_device
    from asr.evaluation import evaluate_only
    from asr.train import train

    try:
        if args.check:
            from pathlib import Path

            from asr.experiment import lock_run_dir, unlock_run_dir
            from asr.preflight import format_preflight, preflight, write_preflight

            lock_run_dir(Path(cfg.run.out_dir))  # it writes preflight.json there
            try:
                result = preflight(cfg)
                write_preflight(result, cfg.run.out_dir)
            finally:
                unlock_run_dir(Path(cfg.run.out_dir))
            print(format_preflight(result))
            return 1 if result["errors"] else 0
        dist.init_from_env(pick_device(cfg.run.device).type)
        if args.eval_only:
            evaluate_only(cfg, args.checkpoint)
        else:
            train(cfg, fresh=args.fresh)
    except ConfigError as e:  # settings found wrong only now: the run folder, a resume it cannot take, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, ModelError, TrainingError, CheckpointError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
        restore_libraries()
    return 0


if __name__ == "__main__":
    sys.exit(main(restart=True))
