"""The explicit Runge-Kutta core: the stages of one step and its error ratio, for any tableau.

Every explicit Runge-Kutta solve goes through :func:`rk_step` (the stages and the propagated solution)
and :func:`error_ratio` / :func:`rms_error_ratio` (accept when ≤ 1): the joint loop, the per-sample
loop, the compiled step, the fixed grids (``odeint`` and :class:`~neuralode.FixedGridSolver`),
checkpoint replay and the Adams starter. What differs between them is how a step size enters the
arithmetic, a small strategy:

* :data:`SCALAR`: one step size for the whole state, a Python float, and the time a Python float.
  ``y + h Σ a_j k_j`` is a chain of fused add kernels with ``alpha = a_j h``: every coefficient is a
  kernel argument, never a tensor operand.
* :data:`ROWS`: the step size as tensors, a pair ``(h_y, h_t)``: ``h_y`` broadcastable to the state in
  its dtype (``(B, 1)``, one per row, for the per-sample loop; 0-d for a traced step) and ``h_t`` of
  the time's shape and dtype. ``y + h Σ a_j k_j`` is ``addcmul(y, h_y, k_0 + Σ (a_j/a_0) k_j,
  value=a_0)``. The same code is traced by ``torch.compile``, which fuses it into the network's kernels.

``tab`` is a :class:`~neuralode._solvers.tableau.ButcherTableau`, or its :func:`coefficients` (a named tuple
with the same attribute names: what a traced step reads, so that no cached property is evaluated
while tracing).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "ROWS",
    "SCALAR",
    "coefficients",
    "combine_dop853",
    "error_ratio",
    "rk_step",
    "rms_error_ratio",
    "without_grad",
]

Pairs = tuple[tuple[int, float], ...]


class _Scalar:
    """Step size and time as Python floats (see the module docstring)."""

    @staticmethod
    def at(t: float, h: float, c: float) -> float:
        return t + c * h

    @staticmethod
    def comb(y: torch.Tensor, k: Sequence[torch.Tensor], pairs: Pairs, h: float) -> torch.Tensor:
        """``y + h Σ_j a_j k_j`` over the non-zero ``(j, a_j)`` pairs."""
        if not pairs:
            return y.clone()
        j0, a0 = pairs[0]
        out = torch.add(y, k[j0], alpha=a0 * h)
        for j, a in pairs[1:]:
            out.add_(k[j], alpha=a * h)
        return out

    @staticmethod
    def weighted(k: Sequence[torch.Tensor], pairs: Pairs, h: float) -> torch.Tensor:
        """``h Σ_j w_j k_j`` over the non-zero ``(j, w_j)`` pairs."""
        j0, w0 = pairs[0]
        out = torch.mul(k[j0], w0 * h)
        for j, w in pairs[1:]:
            out.add_(k[j], alpha=w * h)
        return out


class _Rows:
    """Step size as a pair of tensors ``(h_y, h_t)`` (see the module docstring)."""

    @staticmethod
    def at(t: torch.Tensor, h, c: float) -> torch.Tensor:
        return torch.add(t, h[1], alpha=c)

    @staticmethod
    def comb(y: torch.Tensor, k: Sequence[torch.Tensor], pairs: Pairs, h) -> torch.Tensor:
        if not pairs:
            return y.clone()
        return torch.addcmul(y, h[0], _relative(k, pairs), value=pairs[0][1])

    @staticmethod
    def weighted(k: Sequence[torch.Tensor], pairs: Pairs, h) -> torch.Tensor:
        return _relative(k, pairs).mul_(h[0]).mul_(pairs[0][1])


SCALAR = _Scalar()
ROWS = _Rows()


def _relative(k: Sequence[torch.Tensor], pairs: Pairs) -> torch.Tensor:
    """``k_0 + Σ_j (a_j/a_0) k_j``: the combination divided by its first weight (a fresh tensor)."""
    j0, a0 = pairs[0]
    if len(pairs) == 1:
        return k[j0].clone()
    j1, a1 = pairs[1]
    acc = torch.add(k[j0], k[j1], alpha=a1 / a0)
    for j, a in pairs[2:]:
        acc.add_(k[j], alpha=a / a0)
    return acc


def rk_step(f: Callable, tab, t, h, y: torch.Tensor, f0: torch.Tensor | None, ops=SCALAR):
    """One explicit RK step from ``(t, y)``; returns ``(y1, stages)``.

    ``f0`` is the first stage ``f(t, y)``, or ``None`` to evaluate it here. For an FSAL tableau the last
    stage is ``f(t + h, y1)``. ``t``/``h`` as ``ops`` wants them (see the module docstring).
    """
    comb = ops.comb
    c, nz = tab.c, tab.a_nonzero
    stages = len(c)
    k = [f(t, y) if f0 is None else f0]
    y_stage = y
    # SCALAR's combinations and the stage times inline (ops.comb's and ops.at's arithmetic): a call per
    # stage costs more than the arithmetic.
    if ops is SCALAR:
        add = torch.add
        for i in range(1, stages):
            pairs = nz[i]
            if pairs:
                j0, a0 = pairs[0]
                y_stage = add(y, k[j0], alpha=a0 * h)
                for j, a in pairs[1:]:
                    y_stage.add_(k[j], alpha=a * h)
            else:
                y_stage = y.clone()
            k.append(f(t + c[i] * h, y_stage))
    else:
        h_t = h[1]
        for i in range(1, stages):
            y_stage = comb(y, k, nz[i], h)
            k.append(f(torch.add(t, h_t, alpha=c[i]), y_stage))
    if tab.fsal:
        return y_stage, k
    return comb(y, k, tab.b_nonzero, h), k


def error_ratio(tab, k, h, y: torch.Tensor, y1: torch.Tensor, rtol, atol, norm: Callable, ops=SCALAR):
    """The error ratio ``norm(h Σ_j e_j k_j / (atol + rtol·max(|y|, |y1|)))`` of a step (≤ 1 accepts),
    DOP853's combination when the tableau has a second estimate. ``norm`` reduces the whole state
    (a 0-d result, the joint loop) or each row (``(B,)``, the per-sample loop). Call it without grad.
    """
    tol = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
    r = torch.as_tensor(norm(ops.weighted(k, tab.b_error_nonzero, h).div_(tol)))
    if not tab.b_error_aux_nonzero:
        return r
    r3 = torch.as_tensor(norm(ops.weighted(k, tab.b_error_aux_nonzero, h).div_(tol)))
    return combine_dop853(r, r3)


def rms_error_ratio(
    tab,
    k,
    y1: torch.Tensor,
    c: torch.Tensor,
    y_abs_c: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`error_ratio` for the RMS norm and float tolerances, with every constant on the host.

    ``rms(e / (atol + rtol·max(|y|, |y1|)))`` with ``e = h Σ_j e_j k_j`` equals
    ``|h e_0 / rtol| / sqrt(n) · ‖(k_0 + Σ_j (e_j/e_0) k_j) / max(|y| + c, |y1| + c)‖₂``, ``c = atol/rtol``
    (a 0-d tensor, so that no Python scalar is wrapped and converted: that costs a hidden copy kernel).
    ``|y| + c`` is the previous step's ``|y1| + c`` when the caller keeps it (``y_abs_c``), else computed
    from ``y`` (then ``None`` is returned in its place). Returns ``(x, |y1| + c)`` with ``x = (k_0 + Σ (e_j/e_0) k_j) / max(…)`` of the state's
    shape; the caller reduces it (one ``dot`` for the joint loop, a norm per row for the per-sample loop)
    and applies :func:`rms_factor`. Call it without grad; 4 + (non-zero error weights) kernels.
    """
    if y_abs_c is None:
        y1_abs_c = None
        scale = torch.maximum(torch.abs(y), torch.abs(y1)).add_(c)
    else:
        y1_abs_c = torch.abs(y1).add_(c)
        scale = torch.maximum(y_abs_c, y1_abs_c)
    return _relative(k, tab.b_error_nonzero).div_(scale), y1_abs_c


def rms_factor(tab, rtol: float, n: int) -> float:
    """The constant ``|e_0 / rtol| / sqrt(n)`` of :func:`rms_error_ratio` (times ``|h|``: the ratio)."""
    return abs(tab.b_error_nonzero[0][1] / rtol) / math.sqrt(max(n, 1))


def combine_dop853(r: torch.Tensor, r3: torch.Tensor) -> torch.Tensor:
    """Hairer's DOP853 error ratio from the 5th-order (``r``) and 3rd-order (``r3``) estimates:
    ``r² / sqrt(r² + 0.01 r3²)`` (0 where both are 0, NaN where either is); elementwise, so per-sample
    ratios work too."""
    den = torch.sqrt(r * r + 0.01 * r3 * r3)
    return torch.where(den == 0, torch.zeros_like(r), r * r / den.clamp_min(torch.finfo(den.dtype).tiny))


def without_grad(fn: Callable, *args):
    """``fn(*args)`` with autograd off. ``torch.no_grad()`` costs ~5 µs a call; the raw switch ~1 µs."""
    if not torch.is_grad_enabled():
        return fn(*args)
    torch._C._set_grad_enabled(False)
    try:
        return fn(*args)
    finally:
        torch._C._set_grad_enabled(True)


class Coefficients(NamedTuple):
    """The parts of a tableau :func:`rk_step` and :func:`error_ratio` read, as plain data."""

    stages: int
    c: tuple[float, ...]
    a_nonzero: tuple[Pairs, ...]
    b_nonzero: Pairs
    fsal: bool
    b_error_nonzero: Pairs
    b_error_aux_nonzero: Pairs


@functools.cache
def coefficients(tab) -> Coefficients:
    """``tab``'s :class:`Coefficients` (what a traced step reads instead of the tableau itself)."""
    return Coefficients(
        tab.stages,
        tab.c,
        tab.a_nonzero,
        tab.b_nonzero,
        tab.fsal,
        tab.b_error_nonzero,
        tab.b_error_aux_nonzero,
    )
