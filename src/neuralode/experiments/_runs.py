"""Run folders, checkpoints, seeding and progress: the plumbing every experiment shares.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per epoch/evaluation), ``metrics.json``
(final numbers), ``checkpoint.pt`` (written atomically, loaded with ``weights_only=True``) and plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import resource
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunDir",
    "check_device_name",
    "get_rng_state",
    "load_checkpoint",
    "peak_memory_mb",
    "plot_nfe",
    "progress",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (if installed) and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the core
        pass


def get_rng_state() -> dict[str, Any]:
    """Every global random state, in a form that ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [
            name,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(_plain_to_py_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _py_state_to_plain(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _plain_to_py_state(s: list) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def save_checkpoint(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Write ``obj`` with ``torch.save`` atomically: a kill at any moment leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}; start without --resume or pass the run folder"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes); start again with --overwrite")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read (truncated, corrupt, or holding more than weights: "
            f"{first}); start again with --overwrite"
        ) from None


class RunDir:
    """A run folder: ``RunDir(path).write_json("config.json", cfg)``, ``.append_jsonl(...)``, ``.path(name)``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, p)
        return p

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text())

    def append_jsonl(self, name: str, obj: Any) -> None:
        with open(self.path(name), "a") as fh:
            fh.write(json.dumps(_jsonable(obj)) + "\n")

    def truncate_jsonl(self, name: str, keep: int) -> None:
        """Keep the first ``keep`` lines (used on resume, so a log never holds lines past the checkpoint)."""
        p = self.path(name)
        if p.exists():
            lines = p.read_text().splitlines(keepends=True)[:keep]
            p.write_text("".join(lines))

    @property
    def checkpoint(self) -> Path:
        return self.path("checkpoint.pt")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def resolve_device(name: str | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but CUDA is not available; use --device cpu")
    return dev


def check_device_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` parses as a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``)."""
    try:
        torch.device("cpu" if name == "auto" else name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={name!r} is not a device (expected cpu, cuda, cuda:N or auto)") from exc


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MiB: CUDA allocator peak on a CUDA device, else the process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def plot_nfe(
    path: str | os.PathLike,
    records: list[dict[str, Any]],
    series: dict[str, str],
    *,
    x: str = "iter",
    title: str = "Function evaluations per training iteration",
    dpi: int = 150,
) -> Path | None:
    """An NFE-over-training plot: ``series`` maps a legend label to a key of the ``records`` (the lines of
    a ``metrics.jsonl``); records without the key are skipped. Returns the path, or None without data."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for label, key in series.items():
        pts = [(r[x], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("training iteration")
    ax.set_ylabel("NFE (function evaluations) per iteration")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=dpi)
    return Path(path)


class _PlainProgress:
    """Fallback when tqdm is missing: one line every few seconds."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.n, self._last, self._post = 0, 0.0, ""

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last > 5 or self.n == self.total:
            self._last = now
            print(f"{self.desc} {self.n}/{self.total or '?'} {self._post}", file=sys.stderr, flush=True)

    def set_postfix(self, **kw: Any) -> None:
        self._post = " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", **kw: Any):
    """A progress bar (tqdm when installed, plain lines otherwise; silent when ``NEURALODE_QUIET=1``)."""
    disable = os.environ.get("NEURALODE_QUIET") == "1"
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kw)
    except ImportError:
        return _PlainProgress(iterable, total, desc)
