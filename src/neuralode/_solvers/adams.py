"""Adams-Bashforth(-Moulton) on a fixed grid, with torchdiffeq's semantics.

``explicit_adams``: Adams-Bashforth predictor only. ``implicit_adams`` (alias ``fixed_adams``):
Adams-Bashforth predictor, then the Adams-Moulton corrector iterated to convergence (``max_iters``
functional iterations, default 4). Like torchdiffeq:

* the first two steps are Kutta's 3/8-rule RK4 steps; then the order grows by one per step as the history
  of ``f`` values fills, up to ``max_order`` (default and maximum 12; below 4 the method is RK4 throughout,
  with a warning): an ``m``-step Bashforth predictor with ``m = min(steps taken, max_order − 1)``,
  corrected by the ``(m+1)``-step Moulton formula;
* ``f`` is evaluated afresh at the start of every step and appended to the history (the corrected value
  at the step's end is not);
* the corrector has converged when ``max |Δ(dy)| / (atol + rtol · max(|dy_old|, |dy_new|)) < 1`` over the
  increment ``dy``; if it does not converge the oldest history entry is dropped (the order falls by one)
  and torchdiffeq's warning is raised.

The coefficients are computed exactly (rational arithmetic, integrals of the Lagrange basis
polynomials), not typed in. Order: the Bashforth formula with ``m`` points has order ``m``; the Moulton
formula with ``m + 1`` points has order ``m + 1``. The corrector's convergence test synchronises with
the host once per iteration.
"""

from __future__ import annotations

import functools
import warnings
from fractions import Fraction

import torch

from neuralode._callbacks import FIXED_CALLBACKS
from neuralode._solvers.explicit import RK4
from neuralode._solvers.rk import rk_step
from neuralode._solvers.tableau import MethodSpec

__all__ = ["MAX_ORDER", "bashforth", "moulton"]

MAX_ORDER = 12
MIN_ORDER = 4
MAX_ITERS = 4


def _poly_mul(p: list[Fraction], q: list[Fraction]) -> list[Fraction]:
    out = [Fraction(0)] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def _lagrange_integrals(nodes: list[int]) -> list[Fraction]:
    """``∫_0^1 ℓ_j(s) ds`` for the Lagrange basis ``ℓ_j`` on ``nodes`` (in units of the step)."""
    out = []
    for j, xj in enumerate(nodes):
        poly = [Fraction(1)]
        denom = Fraction(1)
        for m, xm in enumerate(nodes):
            if m != j:
                poly = _poly_mul(poly, [Fraction(-xm), Fraction(1)])
                denom *= xj - xm
        out.append(sum(c / (k + 1) for k, c in enumerate(poly)) / denom)
    return out


@functools.cache
def bashforth(m: int) -> tuple[Fraction, ...]:
    """Weights of ``f_n, f_{n-1}, ..., f_{n-m+1}`` in ``y_{n+1} = y_n + h Σ β_j f_{n-j}`` (order ``m``)."""
    return tuple(_lagrange_integrals([-j for j in range(m)]))


@functools.cache
def moulton(m: int) -> tuple[Fraction, ...]:
    """Weights of ``f_{n+1}, f_n, ..., f_{n-m+2}`` in the ``m``-point Adams-Moulton formula (order ``m``)."""
    return tuple(_lagrange_integrals([1 - j for j in range(m)]))


class _AdamsStepper:
    """Stepper for the fixed-grid loop. Holds the ``f`` history of one solve (a fresh one per solve)."""

    def __init__(self, problem, implicit: bool):
        self.implicit = implicit
        self.max_order, self.max_iters = problem.settings.method_options
        # torchdiffeq reads rtol/atol as the corrector's tolerances.
        self.rtol, self.atol = problem.rtol, problem.atol
        self.history: list[torch.Tensor] = []  # most recent first, at most max_order − 1 entries
        self.history_t: float | None = None

    def _push(self, t: float, f: torch.Tensor) -> None:
        if self.history_t != t:
            self.history.insert(0, f)
            del self.history[max(self.max_order - 1, 0) :]
            self.history_t = t

    def __call__(self, f, t, h, y, f0, stats):
        self._push(t, f0)
        order = min(len(self.history), self.max_order - 1)
        if order < MIN_ORDER - 1:
            return _rk38(f, t, h, y, f0, stats), None
        beta = bashforth(order)
        dy = _dot(beta, self.history, h)
        if self.implicit:
            mw = moulton(order + 1)
            delta = _dot(mw[1:], self.history, h)
            converged = False
            for _ in range(self.max_iters):
                dy_old = dy
                f1 = f(t + h, y + dy)
                stats.nfe += 1
                dy = (h * float(mw[0])) * f1 + delta
                tol = self.atol + self.rtol * torch.maximum(dy_old.abs(), dy.abs())
                converged = bool(((dy_old - dy).abs() / tol).max() < 1)  # one sync per iteration
                if converged:
                    break
            if not converged:
                warnings.warn(
                    "Functional iteration did not converge. Solution may be incorrect.", stacklevel=2
                )
                self.history.pop()
        return y + dy, None


def _dot(weights, fs, h: float) -> torch.Tensor:
    """``Σ_j (h·w_j) f_j`` (in torchdiffeq's order of operations: high-order Bashforth formulas amplify
    round-off, so the same order keeps the two libraries within ~1e-15 of each other)."""
    out = None
    for w, fv in zip(weights, fs):
        term = fv * (h * float(w))
        out = term if out is None else out + term
    return out


def _parse(options: dict) -> tuple[int, int]:
    """``(max_order, max_iters)`` of the Adams options."""
    max_order = options.get("max_order", MAX_ORDER)
    if not isinstance(max_order, int) or isinstance(max_order, bool) or max_order < 1:
        raise ValueError(f"options['max_order'] must be a positive int, got {max_order!r}")
    if max_order > MAX_ORDER:
        raise ValueError(f"options['max_order']={max_order}; it must be at most {MAX_ORDER}")
    if max_order < MIN_ORDER:
        warnings.warn(f"max_order is below {MIN_ORDER}, so the solver reduces to `rk4`.", stacklevel=5)
    max_iters = options.get("max_iters", MAX_ITERS)
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"options['max_iters'] must be a positive int, got {max_iters!r}")
    return max_order, max_iters


def _rk38(f, t, h, y, k1, stats) -> torch.Tensor:
    """Kutta's 3/8 rule (the ``rk4`` tableau, torchdiffeq's ``rk4_alt_step_func``), the Adams starter."""
    stats.nfe += 3
    return rk_step(f, RK4, t, h, y, k1)[0]


_FIXED = {"step_size", "grid_constructor", "interp", "perturb", "dtype", "max_num_steps", "throw"}
SPECS = [
    MethodSpec(
        name="explicit_adams",
        options=frozenset(_FIXED | {"max_order"}),
        callbacks=FIXED_CALLBACKS,
        order=MAX_ORDER - 1,
        make_stepper=lambda problem: _AdamsStepper(problem, implicit=False),
        parse=_parse,
    ),
    *(
        MethodSpec(
            name=name,
            options=frozenset(_FIXED | {"max_order", "max_iters"}),
            callbacks=FIXED_CALLBACKS,
            order=MAX_ORDER,
            make_stepper=lambda problem: _AdamsStepper(problem, implicit=True),
            parse=_parse,
        )
        for name in ("implicit_adams", "fixed_adams")
    ),
]
