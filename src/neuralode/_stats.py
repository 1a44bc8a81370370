"""Solver statistics: function evaluations, steps, rejections, last step size.

Every solve accumulates into a :class:`SolveStats`. Get one with the ``record_stats()`` context manager
(collects every solve started inside the block; the backward solves of those, which run later in
``loss.backward()``, go to ``stats.backward``) or from ``NeuralODE.last_stats``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import ClassVar

import torch

__all__ = ["SolveStats", "record_stats"]


@dataclasses.dataclass
class SolveStats:
    """Counters of one or more solves.

    Attributes:
        nfe: evaluations of the vector field (including the ones for the initial step size).
        n_steps: attempted steps (accepted + rejected).
        n_accepted: accepted steps.
        n_rejected: rejected steps.
        n_solves: how many solves were added up here.
        last_step: size of the last accepted step (time units), ``None`` before any step.
        n_jac: Jacobian evaluations (the stiff adaptive methods ``kvaerno*``, ``ros34pw2``; SciPy's, with
            ``scipy_solver``).
        n_lu: LU factorisations of the Newton matrix (the same methods).
        status: how the last solve ended: ``"success"``, ``"max_num_steps"``, ``"underflow"`` (step-size
            underflow), ``"nonfinite"`` (NaN/inf in the state or in ``func``'s values) or, for an event
            search, ``"no_event"`` (its step budget ran out): the ``SolverError.reason`` it would raise. Per-sample
            solves: a ``(B,)`` int8 tensor of codes (0 success, 1 max_num_steps, 2 underflow,
            3 nonfinite; names in ``SolveStats.STATUS``). ``None`` before any solve. Only a solve with
            ``options["throw"] = False`` can end in a failure here (otherwise it raises
            :class:`~neuralode.SolverError`).
        t_reached: the time the last solve reached (float; per-sample: a ``(B,)`` tensor): ``t[-1]`` on
            success, where it stopped otherwise (its outputs after that time are NaN).
        backward: statistics of the backward solves (adjoint or checkpoint recomputation) of these solves.
    """

    #: Names of the per-sample status codes.
    STATUS: ClassVar[dict[int, str]] = {0: "success", 1: "max_num_steps", 2: "underflow", 3: "nonfinite"}

    nfe: int = 0
    n_steps: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    n_solves: int = 0
    last_step: float | None = None
    n_jac: int = 0
    n_lu: int = 0
    # (not compared by ==: per-sample values are tensors, whose == is elementwise)
    status: str | torch.Tensor | None = dataclasses.field(default=None, compare=False)
    t_reached: float | torch.Tensor | None = dataclasses.field(default=None, compare=False)
    backward: SolveStats | None = None

    def add(self, other: SolveStats) -> None:
        """Add ``other``'s counters to these (``last_step``, ``status`` and ``t_reached`` take ``other``'s)."""
        self.nfe += other.nfe
        self.n_steps += other.n_steps
        self.n_accepted += other.n_accepted
        self.n_rejected += other.n_rejected
        self.n_solves += other.n_solves
        self.n_jac += other.n_jac
        self.n_lu += other.n_lu
        if other.last_step is not None:
            self.last_step = other.last_step
        if other.status is not None:
            self.status, self.t_reached = other.status, other.t_reached

    @property
    def success(self) -> bool | torch.Tensor:
        """Whether the last solve reached its end (per-sample: a ``(B,)`` bool tensor); ``True`` before
        any solve."""
        if self.status is None:
            return True
        if isinstance(self.status, str):
            return self.status == "success"
        return self.status == 0

    @property
    def nfe_forward(self) -> int:
        return self.nfe

    @property
    def nfe_backward(self) -> int:
        return 0 if self.backward is None else self.backward.nfe

    def as_dict(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in ("nfe", "n_steps", "n_accepted", "n_rejected", "n_solves", "last_step", "n_jac", "n_lu")
        }
        if self.status is not None:
            tensor = isinstance(self.status, torch.Tensor)
            d["status"] = self.status.tolist() if tensor else self.status
            d["t_reached"] = self.t_reached.tolist() if tensor else self.t_reached
        if self.backward is not None:
            d["backward"] = self.backward.as_dict()
        return d


_local = threading.local()


def _active() -> list[SolveStats]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextlib.contextmanager
def record_stats() -> Iterator[SolveStats]:
    """Collect the statistics of every solve started inside the block.

    Example::

        with neuralode.record_stats() as stats:
            y = neuralode.odeint_adjoint(func, y0, t)
        y.sum().backward()
        print(stats.nfe, stats.backward.nfe)
    """
    stats = SolveStats(backward=SolveStats())
    stack = _active()
    stack.append(stats)
    try:
        yield stats
    finally:
        # By identity: SolveStats is a dataclass, so ``list.remove`` (which uses ==) would drop an
        # outer recorder whose counters happen to equal this one's (e.g. after a single nested solve).
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is stats:
                del stack[i]
                break


def _report_forward(solve: SolveStats) -> list[SolveStats]:
    """Add one finished forward solve to every active recorder; returns them (their ``.backward`` get the
    backward statistics later)."""
    sinks = list(_active())
    for s in sinks:
        s.add(solve)
    return sinks


def _report_backward(sinks: list[SolveStats], solve: SolveStats) -> None:
    for s in sinks:
        if s.backward is None:
            s.backward = SolveStats()
        s.backward.add(solve)
