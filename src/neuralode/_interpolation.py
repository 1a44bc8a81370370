"""Dense output: values between the steps, and which output times fall in a step.

Interpolants: the tableau's own continuous extension (:func:`dense_eval`, one value per θ; its
per-row form :func:`dense_rows` for the per-sample loop; :func:`stage_sum`, the weighted sum of stages
it is, for the other methods' continuous extensions), cubic Hermite (:func:`hermite`) and linear
(``torch.lerp``), the fixed grids' choice (:func:`interpolate`). The output plan (:func:`step_outputs`;
per row, on the device, :func:`row_outputs`) says which output times a step covers. Every loop, the
event search and checkpoint replay use these, so a solve and its replay produce their outputs the same
way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuralode._solvers.rk import ROWS, SCALAR
from neuralode._solvers.tableau import ButcherTableau
from neuralode._stats import SolveStats

__all__ = ["dense_eval", "dense_rows", "hermite", "interpolate", "row_outputs", "stage_sum", "step_outputs"]


def step_outputs(
    t_out: Sequence[float], i: int, t: float, h: float, t1: float, direction: float
) -> tuple[list[float], int, bool]:
    """The outputs of the step from ``t`` to ``t1`` (size ``h``), from output ``i`` on.

    Returns ``(thetas, j, at_end)``: outputs ``i..j-1`` lie strictly inside the step, at ``t + θh``;
    ``at_end`` says whether output ``j`` is at ``t1`` exactly (then it is the step's end state).
    """
    n = len(t_out)
    thetas = []
    j = i
    while j < n and direction * (t_out[j] - t1) < 0:
        thetas.append((t_out[j] - t) / h)
        j += 1
    return thetas, j, (j < n and t_out[j] == t1)


def row_outputs(
    tt: torch.Tensor,
    t_new: torch.Tensor,
    direction: torch.Tensor,
    accept: torch.Tensor,
    next_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`step_outputs` per row, on the device: row ``b`` (output times ``tt[b]``, ``(B, T)``) has
    written its outputs before ``next_out[b]``; an accepted step to ``t_new[b]`` covers the outputs
    ``next_out[b] .. count[b]-1`` (a rejected one none). Returns ``(count, window)``, ``window`` the
    ``[lo, hi)`` range of output columns any row's step covers (a 2-element tensor, fetched with the
    loop's one sync; ``lo >= hi`` when none)."""
    crossed = (direction.unsqueeze(1) * (tt - t_new.unsqueeze(1)) <= 0).sum(1)
    count = torch.where(accept, crossed, next_out)
    moved = count > next_out
    T = tt.shape[1]
    return count, torch.stack([torch.where(moved, next_out, T).min(), torch.where(moved, count, 0).max()])


def dense_eval(
    f: Callable,
    tab: ButcherTableau,
    t: float,
    h: float,
    y: torch.Tensor,
    k_ext: list[torch.Tensor],
    thetas: Sequence[float],
    stats: SolveStats,
) -> list[torch.Tensor]:
    """The tableau's dense output at ``t + θh`` for each θ in (0, 1); ``k_ext = [stages..., f(t1, y1)]``
    (extended in place with the tableau's extra stages when it has any)."""
    _extra_stages(f, tab, t, h, y, k_ext, stats, SCALAR)
    # All outputs of the step in one matrix product: y + (h W) K with W the (len(thetas), stages) dense
    # weights. Three kernels (and three autograd nodes) instead of ~(stages + 1) per output.
    return stage_sum(y, [_dense_weights(tab.dense, th, h) for th in thetas], k_ext)


def stage_sum(y: torch.Tensor, weights: Sequence[Sequence[float]], stages: Sequence[torch.Tensor]):
    """``[y + Σ_j w_j stages_j for each row w of weights]`` (host-side weights, one matrix product)."""
    w = torch.tensor(weights, dtype=y.dtype)
    if w.device != y.device:
        w = w.to(y.device, non_blocking=True)
    K = torch.stack(list(stages)).reshape(len(stages), -1)
    out = torch.addmm(y.reshape(1, -1), w, K)
    return list(out.view(len(weights), *y.shape).unbind(0))


def _dense_weights(dense, theta: float, h: float) -> list[float]:
    """``h`` times the tableau's dense weights at ``theta`` (``ButcherTableau.dense_weights``), each
    polynomial by Horner's rule: about a fifth of the Python work of the power sums, per output."""
    out = []
    for poly in dense:
        acc = 0.0
        for p in reversed(poly):
            acc = acc * theta + p
        out.append(acc * theta * h)
    return out


def _extra_stages(f, tab, t, h, y, k_ext, stats, ops) -> None:
    if tab.uses_extra_stages and len(k_ext) == tab.stages + 1:
        for i, row in enumerate(tab.extra_nonzero):
            k_ext.append(f(ops.at(t, h, tab.extra_c[i]), ops.comb(y, k_ext, row, h)))
            stats.nfe += 1


def dense_rows(
    f: Callable,
    tab: ButcherTableau,
    t: torch.Tensor,
    h: torch.Tensor,
    y: torch.Tensor,
    k_ext: list[torch.Tensor],
    times: torch.Tensor,
    stats: SolveStats,
) -> torch.Tensor:
    """Per-row dense output: row ``b`` at the times ``times[b]`` (``(B, W)``) inside its own step from
    ``t[b]`` of size ``h[b]`` (both ``(B,)``, in the time dtype); ``y`` is ``(B, n)``. Returns
    ``(B, W, n)``. Rows with ``h = 0`` (not stepping) get ``y``."""
    hy = h.to(y.dtype)
    _extra_stages(f, tab, t, (hy.unsqueeze(1), h), y, k_ext, stats, ROWS)
    K = torch.stack(k_ext, dim=1)  # (B, S, n)
    safe_h = torch.where(h == 0, torch.ones_like(h), h)
    theta = ((times - t.unsqueeze(1)) / safe_h.unsqueeze(1)).to(y.dtype)  # (B, W)
    coef = _coefficients(tab, y.dtype, y.device)
    powers = torch.stack([theta ** (p + 1) for p in range(coef.shape[1])], dim=-1)  # (B, W, P)
    w = (powers @ coef.T) * hy.view(-1, 1, 1)  # (B, W, S)
    return torch.baddbmm(y.unsqueeze(1), w, K)


_COEF: dict = {}


def _coefficients(tab: ButcherTableau, dtype, device) -> torch.Tensor:
    """Dense-output polynomial coefficients as an (S_ext, P) tensor (coefficient of θ^(p+1))."""
    key = (tab.dense, dtype, device)
    coef = _COEF.get(key)
    if coef is None:
        P = max(len(p) for p in tab.dense)
        rows = [list(p) + [0.0] * (P - len(p)) for p in tab.dense]
        coef = _COEF[key] = torch.tensor(rows, dtype=dtype, device=device)
    return coef


def hermite(y0, y1, f0, f1, h, th):
    """Cubic Hermite interpolation at ``t0 + θh`` through ``(y0, f0)`` and ``(y1, f1)``."""
    h00, h10 = 2 * th**3 - 3 * th**2 + 1, th**3 - 2 * th**2 + th
    h01, h11 = -2 * th**3 + 3 * th**2, th**3 - th**2
    return y0 * h00 + y1 * h01 + f0 * (h10 * h) + f1 * (h11 * h)


def interpolate(kind: str, y0, y1, f0, f1, h, thetas: Sequence[float]) -> list[torch.Tensor]:
    """A fixed grid's outputs at ``t0 + θh``: ``kind`` ``"linear"`` (``f0``/``f1`` unused) or
    ``"cubic"`` (Hermite)."""
    if kind == "cubic":
        return [hermite(y0, y1, f0, f1, h, th) for th in thetas]
    return [torch.lerp(y0, y1, th) for th in thetas]
