"""What the benchmark scripts share: the shared corpus and model arguments, and printing plus writing a result."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"


def shared_args(ap: argparse.ArgumentParser) -> None:
    """--model (Whisper base of ../shared), --cv (its Turkish Common Voice folder), --lang."""
    ap.add_argument("--model", default=str(SHARED / "models" / "whisper-base"))
    ap.add_argument("--cv", default=str(SHARED / "data" / "synth-cv" / "tr"))
    ap.add_argument("--lang", default="tr")


def write_result(result: dict, out: str | Path, digits: int = 2) -> None:
    """Print a flat result as a two-column table and write it as JSON to `out`."""
    for key, value in result.items():
        print(f"{key:32s} {value:.{digits}f}" if isinstance(value, float) else f"{key:32s} {value}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def trained_precision(log: str) -> str:
    """The precision a run's train.log says it trained in (what `auto` resolved to)."""
    return re.search(r"training precision (\w+)", log).group(1)
