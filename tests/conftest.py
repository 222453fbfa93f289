"""Shared paths and fixtures for the tests: the in-repo Common Voice fixture and the optional ../shared."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CV = REPO / "tests" / "fixtures" / "cv-tr"
SHARED = Path(__file__).parents[1].parent / "shared"

requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared assets not found at {SHARED}")


def fixture_rows(split: str) -> list[dict]:
    """Rows of the fixture corpus' `split`.tsv (Common Voice columns)."""
    with open(FIXTURE_CV / f"{split}.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="session")
def train_clips() -> list[Path]:
    """The fixture's training clips (48 kHz mp3), in train.tsv order."""
    return [FIXTURE_CV / "clips" / r["path"] for r in fixture_rows("train")]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the network (Hugging Face libraries stay offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
