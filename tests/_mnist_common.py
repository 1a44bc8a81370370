"""Shared helpers for the MNIST tests: where the real files are, and how to run the CLI in a subprocess."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from neuralode.datasets import mnist as data

SRC = Path(__file__).resolve().parents[1] / "src"


def _find(name: str, candidates: list[str]) -> Path | None:
    for c in candidates:
        if c and all((Path(c) / f).is_file() for s in data.FILES.values() for f in s):
            return Path(c)
    return None


REPO = Path(__file__).resolve().parents[1]

# Where the IDX files are looked for: an environment variable, then folders relative to the repository
# (its own shared/data/, then a shared/data/ beside the checkout), then the library's default cache.
MNIST_DIR = _find(
    "mnist",
    [
        os.environ.get("NEURALODE_MNIST_DIR", ""),
        str(REPO / "shared" / "data" / "mnist"),
        str(REPO.parent / "shared" / "data" / "mnist"),
        str(data.default_data_dir("mnist")),
    ],
)
FASHION_DIR = _find(
    "fashion-mnist",
    [
        os.environ.get("NEURALODE_FASHION_MNIST_DIR", ""),
        str(REPO / "shared" / "data" / "fashion-mnist"),
        str(REPO.parent / "shared" / "data" / "fashion-mnist"),
        str(data.default_data_dir("fashion-mnist")),
    ],
)

needs_mnist = pytest.mark.skipif(
    MNIST_DIR is None, reason="MNIST IDX files not found (set NEURALODE_MNIST_DIR)"
)
needs_fashion = pytest.mark.skipif(FASHION_DIR is None, reason="Fashion-MNIST not installed")


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "NEURALODE_QUIET": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "neuralode", *args]
