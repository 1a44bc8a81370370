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
        n_jac: Jacobian evaluations (the implicit adaptive methods, ``kvaerno*``).
        n_lu: LU factorisations of the Newton matrix (the same methods).
        backward: statistics of the backward solves (adjoint or checkpoint recomputation) of these solves.
    """

    nfe: int = 0
    n_steps: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    n_solves: int = 0
    last_step: float | None = None
    n_jac: int = 0
    n_lu: int = 0
    backward: SolveStats | None = None

    def add(self, other: SolveStats) -> None:
        """Add ``other``'s counters to these (``last_step`` takes ``other``'s)."""
        self.nfe += other.nfe
        self.n_steps += other.n_steps
        self.n_accepted += other.n_accepted
        self.n_rejected += other.n_rejected
        self.n_solves += other.n_solves
        self.n_jac += other.n_jac
        self.n_lu += other.n_lu
        if other.last_step is not None:
            self.last_step = other.last_step

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
