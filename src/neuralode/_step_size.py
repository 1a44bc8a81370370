"""Step-size control: error norms, Hairer's initial step, integral and PI controllers.

All controller arithmetic is on Python floats: the error ratio is fetched once per step (the loop's one
host-device synchronisation), and everything after it costs no kernel launches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from neuralode._solvers.rk import SCALAR, combine_dop853, without_grad

__all__ = [
    "STEP_SIZE_OPTIONS",
    "Controller",
    "combine_dop853",
    "initial_step",
    "make_controller",
    "make_norm",
    "propose_step",
    "rms_norm",
    "rms_rows",
]

#: The options of adaptive step-size control (initial step, limits, controller), the same for every adaptive
#: loop: joint, per-sample and the stiff solvers.
STEP_SIZE_OPTIONS = frozenset(
    {
        "first_step",
        "safety",
        "ifactor",
        "dfactor",
        "max_num_steps",
        "min_step",
        "max_step",
        "controller",
        "pcoeff",
        "icoeff",
    }
)

Norm = Callable[[torch.Tensor], torch.Tensor]


def propose_step(
    t: float, h: float, t_end: float, direction: float, stops, i_stop: int, min_step: float
) -> tuple[float, bool, tuple[float, bool] | None]:
    """The next signed step of an adaptive loop from ``t`` with proposed size ``h`` (> 0).

    The step is at least ``min_step``, ends exactly on ``t_end`` when it would reach it (``last``), and is
    shortened to end on the next entry of ``stops`` (``(time, is_jump)`` pairs in the direction of
    integration, from index ``i_stop``) that it would cross; a step landing exactly on it ends on it too
    (so the caller moves past it), unless that stop is ``t_end``. Returns ``(h_signed, last, stop)``.
    """
    h = max(h, min_step)
    last = h >= abs(t_end - t)
    h_signed = (t_end - t) if last else direction * h
    if i_stop < len(stops):
        past = direction * (stops[i_stop][0] - (t + h_signed))
        # A stop on t_end itself is no stop: the solve ends there (nothing past it is evaluated).
        if past < 0 or (past == 0 and not last):
            stop = stops[i_stop]
            return stop[0] - t, False, stop
    return h_signed, last, None


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over all elements (0-d tensor)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def rms_rows(x: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
    """Per-row RMS of a ``(B, n)`` tensor; with ``groups`` (column counts), the max over the groups of
    each group's RMS (the per-row form of the tuple states' mixed norm)."""
    if groups is None:
        return torch.linalg.vector_norm(x, dim=1) / math.sqrt(max(x.shape[1], 1))
    parts = [rms_rows(p) for p in x.split(list(groups), dim=1) if p.shape[1] > 0]
    return torch.stack(parts, dim=1).amax(dim=1)


def make_norm(user_norm: Callable | None, sizes: Sequence[int] | None, shapes=None) -> Norm:
    """The error norm on the (flattened) state.

    Single tensor: ``user_norm`` or RMS. Tuple state (``sizes`` given): ``user_norm`` receives the tuple of
    tensors; the default is the max over the tensors of each one's RMS (torchdiffeq's mixed norm).
    """
    if sizes is None:
        return user_norm if user_norm is not None else rms_norm
    if user_norm is not None:

        def tuple_user_norm(x: torch.Tensor) -> torch.Tensor:
            parts = x.split(list(sizes))
            return torch.as_tensor(user_norm(tuple(p.view(s) for p, s in zip(parts, shapes))))

        return tuple_user_norm

    def mixed(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([rms_norm(p) for p in x.split(list(sizes))]).max()

    return mixed


@dataclasses.dataclass(frozen=True)
class Controller:
    """Integral (default) or PI step-size controller on the error ratio r (accept when r ≤ 1).

    ``factor = safety · r^(−(pcoeff+icoeff)/k) · r_prev^(pcoeff/k)``, clipped to ``[dfactor, ifactor]``
    (to ``[1, ifactor]`` after an accepted step, as torchdiffeq), ``k`` the method's order.
    ``pcoeff = 0, icoeff = 1`` is the classic integral controller. :meth:`factor` works on host floats
    (one step size), :meth:`factor_rows` on tensors (a step size per row); same formula, same defaults.
    """

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.0
    icoeff: float = 1.0

    def factor(self, ratio: float, prev_ratio: float, accepted: bool) -> float:
        if not math.isfinite(ratio):
            return self.dfactor
        if ratio == 0.0:
            return self.ifactor
        k = self.order
        f = self.safety * ratio ** (-(self.pcoeff + self.icoeff) / k)
        if self.pcoeff:
            f *= max(prev_ratio, 1e-4) ** (self.pcoeff / k)
        lower = 1.0 if ratio < 1.0 else self.dfactor
        return min(self.ifactor, max(f, lower))

    def factor_rows(
        self, ratio: torch.Tensor, prev_ratio: torch.Tensor | None, all_finite: bool
    ) -> torch.Tensor:
        """:meth:`factor` per row: ``ratio`` and ``prev_ratio`` (the last accepted ratio of each row;
        unused without ``pcoeff``) are ``(B,)`` tensors; ``all_finite`` says no row needs the NaN/inf
        fallback (``dfactor``), which saves two kernels. ``ratio = 0`` gives ``ifactor``."""
        k = self.order
        fac = ratio.pow(-(self.pcoeff + self.icoeff) / k).mul_(self.safety)
        if self.pcoeff:
            fac.mul_(prev_ratio.clamp(min=1e-4).pow_(self.pcoeff / k))
        fac = fac.clamp_(self.dfactor, self.ifactor)
        fac = torch.where(ratio < 1.0, fac.clamp(min=1.0), fac)
        if not all_finite:
            fac = torch.where(torch.isfinite(ratio), fac, self.dfactor)
        return fac


def make_controller(order: int, options) -> Controller:
    """The controller the options ask for: ``controller`` (``"i"``, default, or ``"pi"``), ``pcoeff``,
    ``icoeff``, ``safety``, ``ifactor``, ``dfactor``; ``order`` is the method's."""
    kind = options.get("controller", "i")
    if kind not in ("i", "pi"):
        raise ValueError(f"options['controller']={kind!r} is not a controller; expected 'i' or 'pi'")
    default_p, default_i = (0.0, 1.0) if kind == "i" else (0.2, 0.65)
    return Controller(
        order=order,
        safety=float(options.get("safety", 0.9)),
        ifactor=float(options.get("ifactor", 10.0)),
        dfactor=float(options.get("dfactor", 0.2)),
        pcoeff=float(options.get("pcoeff", default_p)),
        icoeff=float(options.get("icoeff", default_i)),
    )


def initial_step(
    f: Callable,
    t0,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    rtol,
    atol,
    norm: Norm,
    direction,
    ops=SCALAR,
    scale: torch.Tensor | None = None,
):
    """Hairer, Nørsett & Wanner (1993, II.4) starting step; one evaluation of ``f``. Returns ``|h|``.

    :data:`~neuralode._solvers.rk.SCALAR`: ``t0``, ``direction`` floats, ``norm`` over the whole state, a float
    result (two syncs). :data:`~neuralode._solvers.rk.ROWS`: ``t0``, ``direction`` ``(B,)`` in the time dtype,
    ``norm`` per row of the ``(B, n)`` state, a ``(B,)`` result (no sync). Runs without grad. ``scale``:
    :func:`rms_scale`'s ``|y0| + atol/rtol`` when the caller has it (SCALAR, RMS norm, float tolerances).
    """
    return without_grad(_initial_step, f, t0, y0, f0, order, rtol, atol, norm, direction, ops, scale)


def rms_scale(y: torch.Tensor, rtol: float, atol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, |y| + c)``, ``c = atol/rtol`` a 0-d tensor in ``y``'s dtype: the error scale
    ``atol + rtol·|y|`` over ``rtol``, as the RMS error ratio (:func:`~neuralode._solvers.rk.rms_error_ratio`)
    and :func:`initial_step` use it, without grad. (A Python scalar operand would cost a hidden copy
    kernel per use.)"""
    c = torch.scalar_tensor(atol / rtol, dtype=y.dtype, device=y.device)
    return c, torch.abs(y.detach()).add_(c)


def first_step(problem, stats, y0: torch.Tensor, order: int, norm: Norm, direction: float):
    """``(f(t0, y0), |h0|)`` for a scalar-step driver: ``problem.f0`` when ``y0`` is the problem's own
    (else one evaluation), and ``options['first_step']`` or :func:`initial_step` (one evaluation), capped
    at ``max_step``. Counts the evaluations in ``stats.nfe``."""
    f, t0, settings = problem.f, problem.t[0], problem.settings
    if y0 is problem.y0:
        f0 = problem.f0
    else:
        f0 = f(t0, y0)
        stats.nfe += 1
    h = settings.first_step
    if h is None:
        h = initial_step(
            f, t0, y0, f0, order, problem.rtol, problem.atol, norm, direction
        )  # runs without grad
        stats.nfe += 1
    return f0, min(abs(float(h)), settings.max_step)


def _initial_step(f, t0, y0, f0, order, rtol, atol, norm, direction, ops, scale=None):
    like = None if ops is SCALAR else t0
    factor = 1.0  # the host factor of the RMS norms (below)
    if like is None and norm is rms_norm and isinstance(rtol, float) and isinstance(atol, float):
        # scale / rtol = |y0| + atol/rtol (2 kernels instead of 3), and 1/rtol applied to the norms on the host.
        scale, factor = (rms_scale(y0, rtol, atol)[1] if scale is None else scale), 1.0 / rtol
    else:
        scale = y0.abs().mul_(rtol).add_(atol)
    d0, d1 = _norm_values(norm, (y0, f0), scale, like, factor)
    if like is None and not (math.isfinite(d0) and math.isfinite(d1)):
        return math.nan  # as a NaN f0 does: the loop's first step reports the non-finite value
    small = d0 < 1e-5 or d1 < 1e-5 if like is None else (d0 < 1e-5) | (d1 < 1e-5)
    h0 = _where(small, 1e-6, 0.01 * d0 / _where(small, 1.0, d1))
    hs = direction * h0
    h_step = hs if like is None else (hs.to(y0.dtype).unsqueeze(1), hs)
    f1 = f(ops.at(t0, h_step, 1.0), ops.comb(y0, (f0,), ((0, 1.0),), h_step))
    (d2,) = _norm_values(norm, (f1 - f0,), scale, like, factor)
    d2 = d2 / h0
    dmax = max(d1, d2) if like is None else torch.maximum(d1, d2)
    tiny = dmax <= 1e-15
    h1 = _where(tiny, _clamp_min(h0 * 1e-3, 1e-6), (0.01 / _where(tiny, 1.0, dmax)) ** (1.0 / order))
    return min(100 * h0, h1) if like is None else torch.minimum(100 * h0, h1)


def _norm_values(norm: Norm, xs, scale: torch.Tensor, like: torch.Tensor | None, factor: float = 1.0) -> list:
    """``norm(x / scale)`` for each ``x``: host floats in one sync (``like`` None; the RMS norms of all
    in one reduction, times ``factor``), or tensors in ``like``'s dtype."""
    if like is not None:
        return [norm(x / scale).to(like.dtype) for x in xs]
    if norm is rms_norm:  # one reduction, 1/sqrt(n) on the host: 7 kernels fewer
        inv_sqrt_n = factor / math.sqrt(max(scale.numel(), 1))
        if len(xs) == 1:
            return [float(torch.linalg.vector_norm(torch.div(xs[0], scale))) * inv_sqrt_n]
        both = torch.stack(xs).div_(scale)
        # The norm over every dimension but the first: no reshape kernel (a 0-d state needs the reshape).
        d = both.dim()
        rows = torch.linalg.vector_norm(both if d > 1 else both.view(-1, 1), dim=tuple(range(1, max(d, 2))))
        return [v * inv_sqrt_n for v in rows.tolist()]
    return [float(v) for v in torch.stack([torch.as_tensor(norm(x / scale)) for x in xs]).tolist()]


def _where(cond, a, b):
    """``a if cond else b`` on host values, ``torch.where`` on tensors."""
    return (a if cond else b) if isinstance(cond, bool) else torch.where(cond, a, b)


def _clamp_min(x, lo: float):
    return max(x, lo) if isinstance(x, float) else x.clamp(min=lo)
