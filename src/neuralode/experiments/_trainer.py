"""The trainer every experiment runs on: run folder, checkpoints, resume, signals, divergence, records.

An experiment supplies a config dataclass, a model, an optimizer and a :class:`Task` (one training
step, one evaluation, its own extra state); :class:`Trainer` owns the loop around it:

- the run folder (:class:`RunFolder`): a fresh run refuses a folder that already holds one unless
  ``--overwrite``; ``--resume`` needs a checkpoint; an exclusive lock (``.lock``) keeps a second run out
  of a folder in use; stale ``*.tmp`` files of a killed write are removed;
- one checkpoint schema (:data:`CHECKPOINT_SCHEMA`): model, optimizer, scheduler, every RNG state, the
  step, the config, the log line counts and the task's state, written atomically; resume is exact
  (same weights, bit for bit, on the same device and thread count);
- SIGTERM/SIGINT: the current step finishes, a checkpoint is written, :class:`Interrupted` is raised
  (the command prints how to resume and exits 128 + signal number);
- divergence: a failed training solve (its work budget, ``--max-steps``, exceeded, or non-finite
  values) or a non-finite loss or weight raises :class:`TrainingDiverged`; the last good checkpoint
  stays;
- records: ``config.json`` (the resolved config), ``run.json`` (versions, git commit, command line,
  host, and one entry per launch with start/end time and exit status), ``metrics.jsonl``;
- NFE per iteration (``record_stats`` in the task) summed into the run's totals; a progress bar.

:func:`run_experiment` is the command-line driver on top: it resolves the config, checks the folder,
and turns each outcome into an exit status (2 for a user mistake, before any folder is made).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from neuralode._errors import SolverError
from neuralode.experiments._config import (
    UsageError,
    add_config_options,
    add_run_options,
    config_dict,
    read_config_file,
    resolve_config,
    typed_options,
)
from neuralode.experiments._runs import (
    RunDir,
    _jsonable,
    get_rng_state,
    load_checkpoint,
    progress,
    resolve_device,
    save_checkpoint,
    set_rng_state,
)

__all__ = [
    "CHECKPOINT_SCHEMA",
    "CheckpointError",
    "Experiment",
    "Interrupted",
    "RunFolder",
    "StopSignal",
    "Task",
    "Trainer",
    "TrainingDiverged",
    "load_run_config",
    "read_checkpoint",
    "read_weights",
    "register_eval",
    "register_experiment",
    "run_experiment",
]

#: Version of the checkpoint layout written by :meth:`Trainer.save`.
CHECKPOINT_SCHEMA = 2

#: Names that mark a folder as a run folder (``--overwrite`` refuses to empty anything else).
_RUN_MARKERS = ("config.json", "run.json", "checkpoint.pt", "metrics.jsonl")
_LOCK = ".lock"


class CheckpointError(UsageError):
    """A checkpoint that cannot be read (truncated, empty, not ours, or from another experiment)."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite values or a solve ran out of its work budget."""

    def __init__(self, iteration: int, reason: str):
        super().__init__(f"training diverged at iteration {iteration}: {reason}")
        self.iteration, self.reason = iteration, reason


class Interrupted(Exception):
    """A SIGTERM/SIGINT stopped the run; the last checkpoint is at iteration ``step`` (``None``: none yet)."""

    def __init__(self, signum: int, step: int | None):
        where = "before its first checkpoint" if step is None else f"at iteration {step}"
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.step = signum, step


# ------------------------------------------------------------------------------------------ checkpoints


def read_checkpoint(path: str | os.PathLike, *, experiment: str | None = None, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a clear :class:`CheckpointError` naming ``path``
    when it is missing, empty, truncated, not a checkpoint, or from another experiment."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}")
    try:
        ckpt = load_checkpoint(path, map_location=map_location)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != CHECKPOINT_SCHEMA:
        found = ckpt.get("schema") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} has schema {found!r}; this version reads schema {CHECKPOINT_SCHEMA}"
        )
    if experiment is not None and ckpt.get("experiment") != experiment:
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to a {ckpt.get('experiment')!r} run, not {experiment!r}"
        )
    return ckpt


# ------------------------------------------------------------------------------------------- run folder


class RunFolder(RunDir):
    """A run folder, opened for one run: lock held, stale temporary files removed.

    ``main=False`` (non-zero ranks under ``torchrun``): nothing is written or locked.
    """

    def __init__(self, root: str | os.PathLike, *, main: bool = True):
        self.root = Path(root)
        self.main = main
        self.tensorboard = False  # also write TensorBoard scalars (see Trainer)
        self._lock_fd: int | None = None
        self._created = False

    # -- checks before anything is made
    @staticmethod
    def entries(root: Path) -> list[str]:
        return sorted(p.name for p in root.iterdir() if p.name != _LOCK) if root.is_dir() else []

    @classmethod
    def check(cls, root: Path, *, resume: bool, overwrite: bool) -> None:
        """Refuse what cannot work, before any file is touched."""
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other: continue the run or replace it")
        if root.exists() and not root.is_dir():
            raise UsageError(f"--out {str(root)!r} is a file, not a folder")
        if resume:
            if not (root / "checkpoint.pt").is_file():
                raise UsageError(
                    f"--resume: no checkpoint.pt in {str(root)!r} (no run there, or it stopped before its "
                    "first checkpoint); start it without --resume (with --overwrite if the folder exists)"
                )
            return
        found = cls.entries(root)
        if found and not overwrite:
            raise UsageError(
                f"{str(root)!r} already holds a run ({', '.join(found[:4])}{', ...' if len(found) > 4 else ''}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --out"
            )
        if found and not any(m in found for m in _RUN_MARKERS):
            raise UsageError(
                f"--overwrite: {str(root)!r} does not look like a run folder (no config.json, run.json or "
                "checkpoint.pt); refusing to delete its files. Choose another --out"
            )

    # -- opening
    def open(self, *, fresh: bool, overwrite: bool) -> RunFolder:
        if not self.main:
            return self
        self._created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"another run (pid {holder}) is writing to {str(self.root)!r}; wait for it or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            found = self.entries(self.root)
            if fresh and found and not overwrite:  # another run got here between the check and the lock
                raise UsageError(f"{str(self.root)!r} already holds a run; pass --resume or --overwrite")
            if fresh and overwrite:
                for name in found:
                    p = self.root / name
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            for p in self.root.glob("*.tmp"):  # left by a write that was killed
                p.unlink(missing_ok=True)
        except BaseException:
            self.close()
            raise
        return self

    def close(self, *, remove_if_empty: bool = False) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            if remove_if_empty and self._created and not self.entries(self.root):
                (self.root / _LOCK).unlink(missing_ok=True)
                self.root.rmdir()

    # -- writing (no-ops off the main process)
    def write_json(self, name: str, obj: Any) -> Path:
        return super().write_json(name, obj) if self.main else self.path(name)

    def append_jsonl(self, name: str, obj: Any) -> None:
        if self.main:
            super().append_jsonl(name, obj)

    def truncate_jsonl(self, name: str, keep: int) -> None:
        if self.main:
            super().truncate_jsonl(name, keep)


# ------------------------------------------------------------------------------------------------ signals


class StopSignal:
    """SIGTERM and SIGINT handling for one run.

    Outside the training loop (start-up, the final test, plots) a signal stops the run at once by
    raising :class:`Interrupted` naming the last checkpoint written (:attr:`saved`, ``None`` before the
    first). Inside the loop (:attr:`defer` set by :class:`Trainer`) it only sets :attr:`signum`: the
    current step finishes, a checkpoint is written, then the trainer raises. A second signal while one
    is pending stops at once (the last checkpoint on disk is complete: writes are atomic).
    """

    def __init__(self) -> None:
        self.signum = 0
        self.defer = False
        self.saved: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.defer and not self.signum:
            self.signum = signum
            return
        self.signum = signum
        raise Interrupted(signum, self.saved)

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


# ------------------------------------------------------------------------------------------- distributed


class Distributed:
    """Rank, world size and reductions under ``torchrun``; a no-op in a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def shard(self, n: int) -> slice:
        """This process's contiguous part of ``n`` items of a global batch (sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def average_gradients(self, params: Iterable[torch.nn.Parameter], weight: float) -> None:
        """Replace every process's gradients by their weighted mean ``sum_r w_r g_r / sum_r w_r``, in one
        all-reduce. ``weight``: this process's number of samples, when its loss is a mean over them (the
        result is then the gradient of the mean over the global batch)."""
        if not self.enabled:
            return
        params = [q for q in params if q.requires_grad]
        if not params:
            return
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
        w = torch.tensor([float(weight)], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([*(g.reshape(-1) * w for g in grads), w])
        torch.distributed.all_reduce(flat)
        flat = flat[:-1] / flat[-1]
        offset = 0
        for q, g in zip(params, grads):
            q.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def mean(self, values: dict[str, Any], weight: float, device: torch.device) -> dict[str, Any]:
        """Weighted mean over the processes of the numbers in ``values`` (other entries kept as they are)."""
        if not self.enabled:
            return values
        keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        sums = self.sum([float(values[k]) * weight for k in keys] + [float(weight)], device)
        return {**values, **{k: v / sums[-1] for k, v in zip(keys, sums)}}

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _Single:
    """:class:`Distributed`'s interface for one process."""

    world, rank, enabled, main = 1, 0, False, True

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        return values

    def shard(self, n: int) -> slice:
        return slice(0, n)

    def average_gradients(self, params: Any, weight: float) -> None:
        pass

    def mean(self, values: dict[str, Any], weight: float, device: torch.device) -> dict[str, Any]:
        return values

    def close(self) -> None:
        pass

    def max_int(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        pass


def start_distributed(device: torch.device) -> tuple[torch.device, Any]:
    """``(device, dist)`` for this process: under ``torchrun`` a :class:`Distributed` (each process on
    its own GPU, ``LOCAL_RANK``, when the device is CUDA), else a single-process stand-in."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, _Single()
    dist = Distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, dist


def on_device(train: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``train(cfg, run, ckpt, stop, device, dist)`` as an :attr:`Experiment.train`: sets ``cfg.threads``,
    resolves ``cfg.device`` and joins the ``torchrun`` group (closed at the end)."""

    def run(cfg: Any, run: RunFolder, ckpt: dict | None, stop: StopSignal | None) -> dict[str, Any]:
        if getattr(cfg, "threads", None):
            torch.set_num_threads(cfg.threads)
        device, dist = start_distributed(resolve_device(cfg.device))
        try:
            return train(cfg, run, ckpt, stop, device, dist)
        finally:
            dist.close()

    run.__doc__ = train.__doc__
    return run


# ------------------------------------------------------------------------------------------------ trainer


class Task(Protocol):
    """What an experiment supplies to :class:`Trainer`."""

    def step(self, it: int) -> dict[str, Any]:
        """Training iteration ``it`` (0-based): forward, backward, optimizer step. Returns at least
        ``loss`` (a float), ``nfe_forward`` and ``nfe_backward``."""

    def evaluate(self, done: int) -> dict[str, Any]:
        """Evaluation after ``done`` iterations: the fields of one ``metrics.jsonl`` line."""

    def state(self) -> dict[str, Any]:
        """Extra state a checkpoint needs for an exact resume (generators, running means, ...)."""

    def load_state(self, state: dict[str, Any]) -> None: ...

    def postfix(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Progress-bar fields for the step record ``rec``."""


@dataclasses.dataclass
class Trainer:
    """The loop: ``Trainer(run, ...).fit(task)`` trains ``total`` iterations from the start or a checkpoint.

    ``eval_every``: evaluate (one ``metrics.jsonl`` line) and checkpoint every this many iterations and
    at the end; ``checkpoint_every``: extra checkpoints in between; ``eval_at_start``: one evaluation
    before the first iteration.
    """

    run: RunFolder
    experiment: str
    config: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    total: int = 1
    eval_every: int = 1
    checkpoint_every: int | None = None
    eval_at_start: bool = False
    desc: str = ""
    stop: StopSignal | None = None
    dist: Any = dataclasses.field(default_factory=_Single)
    start: int = 0
    lines: dict[str, int] = dataclasses.field(default_factory=dict)
    totals: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"nfe_forward": 0, "nfe_backward": 0, "wall_time_s": 0.0, "cpu_time_s": 0.0}
    )
    last_saved: int | None = None

    def __post_init__(self) -> None:
        self._clock = (time.perf_counter(), time.process_time())
        self._tb: Any = None

    # -- logs
    def log(self, name: str, row: dict[str, Any]) -> None:
        """Append ``row`` to ``name`` (JSON lines); the line count goes into every checkpoint."""
        self.run.append_jsonl(name, row)
        self.lines[name] = self.lines.get(name, 0) + 1
        if name == "metrics.jsonl":
            self._scalars("eval", row, int(row.get("iter", 0)))

    def _scalars(self, prefix: str, row: dict[str, Any], step: int) -> None:
        if self._tb is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iter":
                self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def _tick(self) -> None:
        now = (time.perf_counter(), time.process_time())
        self.totals["wall_time_s"] += now[0] - self._clock[0]
        self.totals["cpu_time_s"] += now[1] - self._clock[1]
        self._clock = now

    # -- checkpoints
    def resume(self, ckpt: dict[str, Any], task: Task) -> None:
        """Restore everything from ``ckpt`` (as :func:`read_checkpoint` returned it)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.start = int(ckpt["step"])
        self.lines = dict(ckpt["lines"])
        self.totals.update(ckpt["totals"])
        self.last_saved = self.start
        for name, keep in self.lines.items():  # a log never holds lines past its checkpoint
            self.run.truncate_jsonl(name, keep)
        task.load_state(ckpt["task"])
        if self.total < self.start:
            raise UsageError(
                f"the checkpoint in {str(self.run.root)!r} is at iteration {self.start}, past the requested "
                f"budget of {self.total}; raise it to continue"
            )

    def save(self, step: int, task: Task) -> None:
        self._tick()
        if self.run.main:
            save_checkpoint(
                self.run.checkpoint,
                {
                    "schema": CHECKPOINT_SCHEMA,
                    "experiment": self.experiment,
                    "step": step,
                    "config": config_dict(self.config),
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                    "rng": get_rng_state(),
                    "lines": dict(self.lines),
                    "totals": dict(self.totals),
                    "task": task.state(),
                },
            )
        self.last_saved = step
        if self.stop is not None:
            self.stop.saved = step

    # -- the loop
    def _params_finite(self) -> bool:
        flags = [p.detach().isfinite().all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    def fit(self, task: Task) -> None:
        if self.run.tensorboard and self.run.main:
            self._tb = open_tensorboard(
                self.run.path("tensorboard"), purge_step=self.start + 1 if self.start else None
            )
        try:
            self._fit(task)
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def _fit(self, task: Task) -> None:
        if self.stop is not None:
            self.stop.saved = self.last_saved
        if self.start == 0:  # a checkpoint from the start: --resume works, divergence keeps something
            if self.eval_at_start:
                self.log("metrics.jsonl", {"iter": 0, **task.evaluate(0)})
            self.save(0, task)
        bar = (
            progress(total=self.total, initial=min(self.start, self.total), desc=self.desc)
            if self.run.main
            else None
        )
        if self.stop is not None:
            self.stop.defer = True
        try:
            for it in range(self.start, self.total):
                signum = self.dist.max_int(self.stop.signum if self.stop is not None else 0)
                if signum:
                    if self.last_saved != it:
                        self.save(it, task)
                    raise Interrupted(signum, it)
                try:
                    rec = task.step(it)
                except (SolverError, ArithmeticError, ValueError) as exc:
                    if not _is_divergence(exc):
                        raise
                    raise TrainingDiverged(
                        it + 1, f"a training solve failed ({type(exc).__name__}: {exc})"
                    ) from None
                loss = float(rec["loss"])
                if not math.isfinite(loss):
                    raise TrainingDiverged(it + 1, f"the loss is {loss}")
                if not self._params_finite():
                    raise TrainingDiverged(it + 1, "the weights became non-finite")
                self._scalars("train", rec, it + 1)
                self.totals["nfe_forward"] += rec.get("nfe_forward", 0)
                self.totals["nfe_backward"] += rec.get("nfe_backward", 0)
                done = it + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**task.postfix(rec), refresh=False)
                if done % self.eval_every == 0 or done == self.total:
                    self._tick()
                    try:
                        row = {"iter": done, **task.evaluate(done)}
                    except (SolverError, ArithmeticError, ValueError) as exc:
                        if not _is_divergence(exc):
                            raise
                        raise TrainingDiverged(
                            done, f"an evaluation solve failed ({type(exc).__name__}: {exc})"
                        ) from None
                    self.log("metrics.jsonl", {**row, "wall_time_s": self.totals["wall_time_s"]})
                    self.save(done, task)
                elif self.checkpoint_every and done % self.checkpoint_every == 0:
                    self.save(done, task)
        finally:
            if bar is not None:
                bar.close()
            if self.stop is not None:
                self.stop.defer = False
        self._tick()
        if (
            self.stop is not None and self.stop.signum
        ):  # arrived during the last step: its checkpoint is written
            raise Interrupted(self.stop.signum, self.last_saved)


def open_tensorboard(logdir: Path, purge_step: int | None = None) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter``; :class:`UsageError` when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UsageError(
            f"--tensorboard needs the tensorboard package ({exc}); pip install tensorboard, or drop --tensorboard"
        ) from None
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _is_divergence(exc: BaseException) -> bool:
    """Whether an error inside a training step is the model blowing up rather than a bug: a solver
    failure, arithmetic on infinities (e.g. a zero initial step from an infinite derivative), or a
    solver input check that found NaN/inf."""
    if isinstance(exc, (SolverError, ArithmeticError)):
        return True
    text = str(exc)
    return "NaN" in text or "nan" in text.split() or "inf" in text.split() or "non-finite" in text


# ------------------------------------------------------------------------------------------------ records


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def start_record(run: RunFolder, experiment: str, *, resumed_from: int | None, world_size: int) -> dict:
    """Add this launch to ``run.json`` (created on the first launch) and return the record."""
    import neuralode

    record: dict[str, Any] = {}
    if resumed_from is not None and run.path("run.json").is_file():
        try:
            record = json.loads(run.path("run.json").read_text())
        except (OSError, json.JSONDecodeError):
            record = {}
    record.setdefault("experiment", experiment)
    record.update(
        neuralode=getattr(neuralode, "__version__", None),
        torch=torch.__version__,
        python=platform.python_version(),
        git_commit=_git_commit(),
    )
    record.setdefault("launches", []).append(
        {
            "command": ["neuralode", *sys.argv[1:]] if sys.argv and sys.argv[0] else sys.argv,
            "cwd": os.getcwd(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "world_size": world_size,
            "resumed_from_iteration": resumed_from,
            "start": _now(),
            "end": None,
            "status": "running",
        }
    )
    run.write_json("run.json", record)
    return record


def end_record(run: RunFolder, record: dict, status: str, exit_code: int) -> None:
    launch = record["launches"][-1]
    launch.update(end=_now(), status=status, exit_code=exit_code)
    run.write_json("run.json", record)


def write_config(run: RunFolder, experiment: str, cfg: Any, **resolved: Any) -> None:
    """``config.json``: the config with what was resolved at run time (device actually used, threads)."""
    run.write_json("config.json", {"experiment": experiment, **config_dict(cfg), **_jsonable(resolved)})


# ------------------------------------------------------------------------------------------ evaluation


def load_run_config(run_dir: str | os.PathLike, experiment: str, config_cls: type) -> Any:
    """The config of the run folder ``run_dir`` (its ``config.json``); :class:`UsageError` when the
    folder is not a run of ``experiment``."""
    run_dir = Path(run_dir)
    what = f"not a `neuralode train {experiment}` run folder"
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is {what} (no such folder)")
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{str(run_dir)!r} is {what} (no config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{str(path)!r} cannot be read ({exc}); {str(run_dir)!r} is {what}") from None
    if not isinstance(saved, dict) or saved.get("experiment") != experiment:
        found = saved.get("experiment") if isinstance(saved, dict) else None
        raise UsageError(f"{str(run_dir)!r} holds a {found!r} run, not a {experiment!r} run")
    known = {f.name for f in dataclasses.fields(config_cls)}
    return resolve_config(config_cls, {}, file_values={k: v for k, v in saved.items() if k in known})


def read_weights(path: str | os.PathLike, experiment: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, checkpoint)`` from a run's ``checkpoint.pt`` (schema checked) or a weights file such
    as MNIST's ``best.pt`` (``{"model": ..., "epoch": ...}``), loaded with ``weights_only=True``."""
    path = Path(path)
    if path.name == "checkpoint.pt":
        ckpt = read_checkpoint(path, experiment=experiment)
    else:
        if not path.is_file():
            raise UsageError(f"no weights at {str(path)!r}: the run has not finished an evaluation yet")
        try:
            ckpt = load_checkpoint(path)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UsageError(f"{str(path)!r} holds no model weights")
    return ckpt["model"], ckpt


def eval_device(name: str | None, cfg: Any) -> torch.device:
    """The device to evaluate on: ``name``, else the run's own device when it is there, else the CPU."""
    try:
        if name is not None:
            return resolve_device(name)
        return resolve_device(getattr(cfg, "device", "cpu"))
    except ValueError as exc:
        if name is not None:
            raise UsageError(str(exc)) from None
        print(f"note: the run used {cfg.device!r}, which is not here; evaluating on the CPU", file=sys.stderr)
        return torch.device("cpu")


def register_eval(
    subparsers: Any, name: str, evaluate: Callable[..., dict[str, Any]], *, help: str, description: str,
    data_dir: bool = False, forward: tuple[str, ...] = (),
) -> argparse.ArgumentParser:  # fmt: skip
    """``neuralode eval NAME RUN_DIR``: ``evaluate(run_dir, device=, threads=[, data_dir=])`` returns the
    test metrics, printed as JSON (the same keys and values as the run's ``metrics.json``). ``forward``:
    names of options the caller adds to the returned parser, passed on to ``evaluate`` as keywords."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("run", metavar="RUN_DIR", help=f"run folder of `neuralode train {name}`")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the run's)")
    if data_dir:
        p.add_argument("--data-dir", default=None, help="data folder (default: the run's --data-dir)")

    def run(args: argparse.Namespace) -> int:
        kw = {"data_dir": args.data_dir} if data_dir else {}
        kw.update({k: getattr(args, k) for k in forward})
        try:
            if args.threads is not None and args.threads < 1:
                raise UsageError(f"--threads must be a positive integer, got {args.threads}")
            metrics = evaluate(args.run, device=args.device, threads=args.threads, **kw)
        except UsageError as exc:
            p.error(str(exc))
        print(json.dumps(_jsonable(metrics), indent=2))
        return 0

    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------------------- command driver


@dataclasses.dataclass
class Experiment:
    """What :func:`run_experiment` needs to know about one ``train`` command.

    ``train(cfg, run, ckpt, stop)`` trains (``ckpt``: the checkpoint to resume, or None) and returns the
    final metrics; ``check(cfg)`` finds user mistakes that need the environment (a missing GPU, missing
    data files) before any folder is made; ``resumable(saved_config)`` names the fields a resumed run
    may change; ``headline(metrics)`` is the last stdout line; ``distributed``: the experiment splits
    its batches across the processes of ``torchrun`` (else it refuses to run there).
    """

    name: str
    config_cls: type
    train: Callable[..., dict[str, Any]]
    default_out: Callable[[Any], str]
    headline: Callable[[dict[str, Any]], str]
    resumable: Callable[[dict[str, Any]], Iterable[str]]
    check: Callable[[Any], None] = lambda cfg: None
    command: str = ""
    hidden: tuple[str, ...] = ()
    distributed: bool = False


def register_experiment(
    subparsers: Any, spec: Experiment, *, names: Iterable[str], help: str, description: str
) -> list[argparse.ArgumentParser]:
    """Add one parser per name; returns them (for experiment-specific extras)."""
    parsers = []
    for name in names:
        p = subparsers.add_parser(
            name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add_config_options(p, spec.config_cls, hidden=spec.hidden)
        example = spec.default_out(spec.config_cls())
        add_run_options(p, example)
        may = sorted(spec.resumable(config_dict(spec.config_cls())))
        p.epilog = "resumable (may change with --resume): " + (
            ", ".join("--" + f.replace("_", "-") for f in may) or "none"
        )
        p.set_defaults(func=lambda args, _p=p, _n=name: run_experiment(args, spec, _p, _n))
        parsers.append(p)
    return parsers


def check_device(cfg: Any) -> None:
    """``--device cuda`` on a machine without CUDA (and the like) as a :class:`UsageError`."""
    if hasattr(cfg, "device"):
        try:
            resolve_device(cfg.device)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _plan(args: argparse.Namespace, spec: Experiment) -> tuple[Any, Path, dict | None]:
    typed = typed_options(args, spec.config_cls)
    file_values = read_config_file(args.config, spec.config_cls, spec.name) if args.config else None
    resume = bool(args.resume)
    if isinstance(args.resume, str):
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UsageError(
                f"--out {args.out} differs from --resume {args.resume}; a resumed run stays in its folder"
            )
        args.out = args.resume
    if args.out is None:
        out = Path(spec.default_out(resolve_config(spec.config_cls, typed, file_values=file_values)))
    else:
        out = Path(args.out)
    if out.name == "checkpoint.pt":
        out = out.parent
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = (out / "checkpoint.pt").is_file()  # relaunched by torchrun --max-restarts
        args.overwrite = args.overwrite or not resume  # the failed attempt's own files
    if int(os.environ.get("RANK", "0")) == 0:  # the other ranks would see rank 0's fresh files
        RunFolder.check(out, resume=resume, overwrite=args.overwrite)
    ckpt = None
    if resume:
        if args.config:
            raise UsageError("--config starts a new run; with --resume the run's own config is used")
        ckpt = read_checkpoint(out / "checkpoint.pt", experiment=spec.name)
        cfg = resolve_config(spec.config_cls, typed, saved=ckpt["config"], resumable=spec.resumable)
    else:
        cfg = resolve_config(spec.config_cls, typed, file_values=file_values)
    check_device(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not spec.distributed:
        raise UsageError(
            f"train {spec.name} does not split its batches across processes; run it without torchrun"
        )
    spec.check(cfg)
    if getattr(args, "tensorboard", False):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as exc:
            raise UsageError(
                f"--tensorboard needs the tensorboard package ({exc}); pip install tensorboard, or drop it"
            ) from None
    return cfg, out, ckpt


def execute(
    spec: Experiment,
    cfg: Any,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    planned: tuple[dict | None] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` into the run folder ``out`` (the Python API behind every ``train`` command).

    ``resume=True`` continues the checkpoint in ``out``; ``cfg`` must then equal the run's config except
    in resumable fields. Raises :class:`UsageError`, :class:`Interrupted` or :class:`TrainingDiverged`;
    ``run.json`` records the outcome either way.
    """
    out = Path(out)
    if planned is not None:  # the command line checked everything already
        (ckpt,) = planned
    else:
        ckpt = None
        RunFolder.check(out, resume=resume, overwrite=overwrite)
        if resume:
            ckpt = read_checkpoint(out / "checkpoint.pt", experiment=spec.name)
            cfg = resolve_config(
                spec.config_cls, config_dict(cfg), saved=ckpt["config"], resumable=spec.resumable
            )
        check_device(cfg)
        spec.check(cfg)
    main = int(os.environ.get("RANK", "0")) == 0
    with StopSignal() as stop:
        stop.saved = ckpt["step"] if ckpt else None
        run = RunFolder(out, main=main).open(fresh=ckpt is None, overwrite=overwrite)
        try:
            return _execute(spec, cfg, run, ckpt, stop, main=main, tensorboard=tensorboard)
        finally:
            run.close()


def _execute(spec: Experiment, cfg: Any, run: RunFolder, ckpt: dict | None, stop: StopSignal, *,
             main: bool, tensorboard: bool) -> dict[str, Any]:  # fmt: skip
    run.tensorboard = tensorboard
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resumed = ckpt["step"] if ckpt else None
    record = start_record(run, spec.name, resumed_from=resumed, world_size=world) if main else {}
    status, code = "failed", 1
    try:
        metrics = spec.train(cfg, run, ckpt, stop)
        status, code = "completed", 0
        return metrics
    except Interrupted as exc:
        status, code = f"interrupted by {signal.Signals(exc.signum).name}", 128 + exc.signum
        raise
    except TrainingDiverged:
        status, code = "diverged", 1
        raise
    except UsageError:
        status, code = "usage error", 2
        raise
    finally:
        if main:
            stop.defer = True  # the record of a stop is written whole
            end_record(run, record, status, code)
            stop.defer = False


def run_experiment(
    args: argparse.Namespace, spec: Experiment, parser: argparse.ArgumentParser, name: str
) -> int:
    """Run one ``train`` command: exit 0 done, 2 user mistake, 1 diverged, 128+N stopped by signal N."""
    command = spec.command or f"neuralode train {name}"
    try:
        cfg, out, ckpt = _plan(args, spec)
    except UsageError as exc:
        parser.error(str(exc))
    if args.print_config:
        print(json.dumps({"experiment": spec.name, **config_dict(cfg)}, indent=2))
        return 0
    where = f" (resumed at iteration {ckpt['step']})" if ckpt else ""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{spec.name}: run folder {out}{where}", file=sys.stderr, flush=True)
    try:
        metrics = execute(
            spec, cfg, out, overwrite=args.overwrite, planned=(ckpt,), tensorboard=args.tensorboard
        )
    except UsageError as exc:
        parser.error(str(exc))
    except Interrupted as exc:
        if exc.step is None:
            then = f"nothing to resume; start it again with: {command} --out {out} --overwrite"
        else:
            then = f"checkpoint saved in {str(out)!r}. Resume with: {command} --out {out} --resume"
        print(f"{spec.name}: {exc}; {then}", file=sys.stderr, flush=True)
        return 128 + exc.signum
    except TrainingDiverged as exc:
        lr = getattr(cfg, "lr", None)
        kept = (
            "the last good checkpoint is kept"
            if (out / "checkpoint.pt").exists()
            else "no checkpoint was written yet"
        )
        print(
            f"error: {exc}; {kept} in {str(out)!r}. Lower --lr"
            + (f" (now {lr:g})" if isinstance(lr, (int, float)) else "")
            + ", tighten --rtol/--atol, or raise --max-steps if the solves are legitimately long",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{spec.name}: results in {out}; {spec.headline(metrics)}", flush=True)
    return 0
