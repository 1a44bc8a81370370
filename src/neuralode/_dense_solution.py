"""``odeint_dense``: one adaptive solve over ``[t0, t1]``, evaluated afterwards at any time in the span.

The solve is ``odeint``'s (same steps, same statistics); every accepted step keeps its start state and
stages, and :class:`DenseSolution` evaluates the step's own interpolant (``_dense.dense_eval`` for the
explicit Runge-Kutta tableaus, the ``MethodSpec.dense_output`` of the other adaptive methods: the stiff
solvers' Hermite interpolants) at the times it is asked for. The values at output times equal ``odeint``'s at the same times.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any

import torch

from neuralode._integrate.joint import run
from neuralode._interpolation import dense_eval
from neuralode._problem import make_problem
from neuralode._solvers.explicit import ADAPTIVE_METHODS, TABLEAUS
from neuralode._solvers.registry import EXTRA_METHODS
from neuralode._stats import SolveStats, _report_forward

__all__ = ["DenseSolution", "odeint_dense"]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


class DenseSolution:
    """The continuous solution of an adaptive solve: call it with times in ``[t0, t1]``.

    Attributes:
        t0, t1: the span (floats, in the direction of integration: ``t1 < t0`` for a reverse solve).
        ts: ``(n_steps + 1,)`` float64 tensor of the accepted step boundaries, ``ts[0] = t0``,
            ``ts[-1] = t1``.
        method: the method name.
        stats: the solve's :class:`SolveStats` (evaluations of ``func`` made later by the interpolant of
            methods with extra dense-output stages are added to it).

    ``sol(t)`` with ``t`` a float or a 0-d tensor returns the state at ``t`` (shaped like ``y0``, or a
    tuple); with a 1-D tensor of ``N`` times (any order) it returns ``(N, *y0.shape)`` (or a tuple of
    ``(N, *y0[i].shape)``). Values carry the autograd graph of the solve (gradients with respect to
    ``y0`` and the parameters of ``func``, not with respect to the times). Times outside the span raise
    ``ValueError``.
    """

    def __init__(
        self, problem, method: str, steps: list, t_end: float, y_end: torch.Tensor, stats: SolveStats
    ):
        self._problem = problem
        self._steps = steps  # (t, h, y, stages-for-the-interpolant) per accepted step
        self.method = method
        self.t0 = problem.t[0]
        self.t1 = t_end
        self._y_end = y_end
        self._direction = 1.0 if t_end > self.t0 else -1.0
        starts = [s[0] for s in steps]
        # bisect wants ascending keys: the step starts times the direction
        self._keys = [self._direction * s for s in starts]
        self.ts = torch.tensor([*starts, t_end], dtype=torch.float64)
        self.stats = stats

    def __repr__(self) -> str:
        return f"DenseSolution(method={self.method!r}, t0={self.t0}, t1={self.t1}, steps={len(self._steps)})"

    def __call__(self, t: float | torch.Tensor) -> TensorOrTuple:
        scalar = not isinstance(t, torch.Tensor) or t.dim() == 0
        if isinstance(t, torch.Tensor):
            if t.dim() > 1:
                raise ValueError(f"t must be a float, a 0-d or a 1-D tensor, got shape {tuple(t.shape)}")
            if t.numel() and not t.is_floating_point():
                raise TypeError(f"t must be floating point, got dtype {t.dtype}")
            times = [float(x) for x in t.detach().reshape(-1).tolist()]  # one synchronisation per call
        elif isinstance(t, (int, float)) and not isinstance(t, bool):
            times = [float(t)]
        else:
            raise TypeError(f"t must be a float or a tensor of times, got {type(t).__name__}")
        lo, hi = sorted((self.t0, self.t1))
        bad = [x for x in times if not lo <= x <= hi]
        if bad:
            raise ValueError(f"t={bad[0]} lies outside the solved span [{lo}, {hi}]")
        flat = self._evaluate(times)
        out = self._problem.unflatten(flat)
        if scalar:
            return out[0] if isinstance(out, torch.Tensor) else tuple(o[0] for o in out)
        return out

    def _evaluate(self, times: list[float]) -> torch.Tensor:
        """``(len(times), *state.shape)`` states (the engine's state: ``y0``'s shape, or the flat
        concatenation of a tuple): each step's interpolant once, at all its times together."""
        y0 = self._problem.y0
        if not times:
            return y0.new_empty((0, *y0.shape))
        groups: dict[int, list[int]] = {}
        values: list[torch.Tensor | None] = [None] * len(times)
        for i, x in enumerate(times):
            if x == self.t1:
                values[i] = self._y_end
                continue
            j = bisect.bisect_right(self._keys, self._direction * x) - 1
            groups.setdefault(max(j, 0), []).append(i)
        for j, idx in groups.items():
            t, h, y, stages = self._steps[j]
            thetas = [(times[i] - t) / h for i in idx]
            for i, v in zip(idx, self._interpolate(t, h, y, stages, thetas)):
                values[i] = y if times[i] == t else v
        return torch.stack([v.reshape(y0.shape) for v in values])

    def _interpolate(self, t: float, h: float, y: torch.Tensor, stages, thetas: list[float]):
        tab = TABLEAUS.get(self.method)
        if tab is not None:
            # (stages is the step's own list: extra dense-output stages are computed once and kept in it)
            return dense_eval(self._problem.f, tab, t, h, y, stages, thetas, self.stats)
        return EXTRA_METHODS[self.method].dense_output(y, stages, h, thetas)


def _adaptive_methods() -> tuple[str, ...]:
    """The explicit adaptive tableaus and the methods with a ``MethodSpec.dense_output``."""
    return ADAPTIVE_METHODS + tuple(n for n, s in EXTRA_METHODS.items() if s.dense_output is not None)


def odeint_dense(
    func: Callable[[torch.Tensor, TensorOrTuple], TensorOrTuple],
    y0: TensorOrTuple,
    t0: float | torch.Tensor,
    t1: float | torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
) -> DenseSolution:
    """Solve ``dy/dt = func(t, y)`` from ``t0`` to ``t1`` and return the continuous solution.

    torchdiffeq's ``odeint_dense`` signature, for every adaptive method of :data:`SOLVERS` (torchdiffeq
    supports ``dopri5`` and a tensor ``y0`` only, and its result fails at ``t1`` itself).

    Args:
        func, y0, rtol, atol, options: as :func:`odeint` (``options`` of the chosen method; not
            ``per_sample`` or ``compile``).
        t0, t1: start and end of the span (floats or 0-d tensors; ``t1 < t0`` integrates backwards).
        method: an adaptive method (default ``"dopri5"``): the explicit embedded Runge-Kutta tableaus
            (each evaluated with its own dense output) or the stiff solvers ``kvaerno3/4/5`` and
            ``ros34pw2`` (cubic Hermite).

    Returns:
        A :class:`DenseSolution` ``sol``; ``sol(t)`` is the state at ``t`` (see the class).

    Raises:
        ValueError, TypeError: bad arguments, a fixed-grid method, ``t0 == t1``.
        SolverError: as :func:`odeint`.
    """
    name = "dopri5" if method is None else method
    valid = _adaptive_methods()
    if not isinstance(name, str) or name not in valid:
        raise ValueError(
            f"odeint_dense needs an adaptive method, got method={method!r}; valid methods: {', '.join(valid)}"
        )
    for key in ("per_sample", "compile"):
        if options is not None and options.get(key):
            raise ValueError(f"odeint_dense does not support options[{key!r}]")
    t = _span(t0, t1, y0)
    problem = make_problem(func, y0, t, rtol, atol, name, options)
    stats = SolveStats(n_solves=1, nfe=1)  # the evaluation of func(t0, y0) in make_problem
    steps: list = []

    def record(ts, h, y, stages):
        steps.append((ts, h, y, stages))

    if name in TABLEAUS:
        ys = run(problem, stats, on_accept=record)
    else:
        ys = EXTRA_METHODS[name].run(problem, stats, problem.y0, on_accept=record)
    _report_forward(stats)
    return DenseSolution(problem, name, steps, problem.t[-1], ys[-1], stats)


def _span(t0, t1, y0) -> torch.Tensor:
    """``[t0, t1]`` as the 1-D tensor ``make_problem`` validates (float64 unless t0 is a tensor)."""
    parts = []
    for name, v in (("t0", t0), ("t1", t1)):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
            if not v.is_floating_point():
                raise TypeError(f"{name} must be floating point, got dtype {v.dtype}")
            if v.requires_grad:
                raise ValueError(
                    f"{name} must not require grad: odeint_dense gives no gradient with respect to it"
                )
            parts.append(float(v))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(float(v))
        else:
            raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(v).__name__}")
    if not all(math.isfinite(v) for v in parts):
        raise ValueError(f"t0 and t1 must be finite, got {parts}")
    if parts[0] == parts[1]:
        raise ValueError(f"t0 and t1 must differ, both are {parts[0]}")
    y = y0 if isinstance(y0, torch.Tensor) else (y0[0] if isinstance(y0, (tuple, list)) and y0 else None)
    device = y.device if isinstance(y, torch.Tensor) else None
    return torch.tensor(parts, dtype=torch.float64, device=device)
