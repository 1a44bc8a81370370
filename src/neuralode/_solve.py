"""The integration loops: one generic explicit Runge-Kutta step, an adaptive loop and a fixed-grid loop.

Conventions: times are Python floats (float64) on the host; the state ``y`` is one tensor of any shape
(tuple states are flattened by the front door). ``f(t, y)`` is the vector field with ``t`` a float.
Each adaptive step synchronises with the device once, to fetch the error ratio that decides
accept/reject; nothing else in the loop waits for the device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from neuralode._control import Controller, Norm, combine_dop853, rms_norm
from neuralode._errors import SolverError
from neuralode._stats import SolveStats
from neuralode._tableau import ButcherTableau

__all__ = ["compiled_stepper", "dense_eval", "integrate_adaptive", "integrate_fixed", "rk_step", "rk_stepper"]

Func = Callable[[float, torch.Tensor], torch.Tensor]


def _combine(y: torch.Tensor, k: Sequence[torch.Tensor], coeffs, h: float) -> torch.Tensor:
    """``y + h Σ_j a_j k_j`` over the non-zero (j, a_j) pairs, as a chain of fused add kernels."""
    out = y
    first = True
    for j, a in coeffs:
        if first:
            out = torch.add(y, k[j], alpha=a * h)
            first = False
        else:
            out = out.add_(k[j], alpha=a * h)
    return out if not first else y.clone()


def rk_step(
    f: Func, tab: ButcherTableau, t: float, h: float, y: torch.Tensor, f0: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One explicit RK step from (t, y) with first stage ``f0``; returns ``(y1, stages)``.

    For an FSAL tableau the last stage is f(t + h, y1).
    """
    k = [f0]
    c, nz = tab.c, tab.a_nonzero
    y_stage = y
    for i in range(1, tab.stages):
        y_stage = _combine(y, k, nz[i], h)
        k.append(f(t + c[i] * h, y_stage))
    if tab.fsal:
        y1 = y_stage
    else:
        y1 = _combine(y, k, tab.b_nonzero, h)
    return y1, k


def _weighted(k: Sequence[torch.Tensor], w, h: float) -> torch.Tensor:
    """``h Σ_j w_j k_j``; ``w`` is a weight list, or already the non-zero ``(j, w_j)`` pairs."""
    pairs = w if isinstance(w[0], tuple) else [(j, v) for j, v in enumerate(w) if v != 0.0]
    j0, v0 = pairs[0]
    out = torch.mul(k[j0], v0 * h)
    for j, v in pairs[1:]:
        out.add_(k[j], alpha=v * h)
    return out


@torch.no_grad()
def _error_ratio(tab, k, h, y, y1, rtol, atol, norm: Norm) -> torch.Tensor:
    """Error ratio of a step as a 0-d tensor (≤ 1 means accept)."""
    tol = torch.maximum(y.abs(), y1.abs()).mul_(rtol).add_(atol)
    r = torch.as_tensor(norm(_weighted(k, tab.b_error, h).div_(tol)))
    if tab.b_error_aux is None:
        return r
    r3 = torch.as_tensor(norm(_weighted(k, tab.b_error_aux_nonzero, h).div_(tol)))
    return combine_dop853(r, r3)


def _rms_error_ratio(
    tab: ButcherTableau, k, y_abs_c: torch.Tensor, y1: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast path of :func:`_error_ratio` for the default RMS norm and scalar tolerances.

    ``rms(e / (atol + rtol·max(|y|, |y1|)))`` with ``e = h Σ_j e_j k_j`` equals
    ``|h e_0 / rtol| / sqrt(n) · ‖(k_0 + Σ_j (e_j/e_0) k_j) / max(|y| + c, |y1| + c)‖₂``, ``c = atol/rtol``
    (a 0-d tensor, so that no Python scalar is wrapped and converted: that costs a hidden copy kernel).
    Every constant factor moves to the host; ``|y| + c`` is the previous step's ``|y1| + c`` (returned for
    reuse); the squared norm is one ``dot``. 4 + (non-zero error weights) kernels.

    Returns ``(‖…‖₂², |y1| + c)``; the caller takes the square root and applies the host factor
    (:func:`_error_host_factor`) after fetching the first.
    """
    # No autograd here. torch.no_grad() as a decorator costs ~5 µs a call; the raw switch ~1 µs.
    grad = torch.is_grad_enabled()
    if grad:
        torch._C._set_grad_enabled(False)
    try:
        y1_abs_c = torch.abs(y1).add_(c)
        scale = torch.maximum(y_abs_c, y1_abs_c)
        (j0, e0), *rest = tab.b_error_nonzero
        if rest:
            err = torch.add(k[j0], k[rest[0][0]], alpha=rest[0][1] / e0)
            for j, e in rest[1:]:
                err.add_(k[j], alpha=e / e0)
            err = err.div_(scale).reshape(-1)
        else:
            err = torch.div(k[j0], scale).reshape(-1)
        return torch.dot(err, err), y1_abs_c
    finally:
        if grad:
            torch._C._set_grad_enabled(True)


def _error_host_factor(tab: ButcherTableau, h: float, rtol: float, n: int) -> float:
    """The constant ``|h e_0 / rtol| / sqrt(n)`` of :func:`_rms_error_ratio`."""
    return abs(h * tab.b_error_nonzero[0][1] / rtol) / math.sqrt(max(n, 1))


def dense_eval(
    f: Func,
    tab: ButcherTableau,
    t: float,
    h: float,
    y: torch.Tensor,
    k_ext: list[torch.Tensor],
    thetas: Sequence[float],
    stats: SolveStats,
) -> list[torch.Tensor]:
    """Dense output at ``t + θh`` for each θ in (0, 1); ``k_ext = [stages..., f(t1, y1)]`` (extended in
    place with the tableau's extra stages when it has any)."""
    if tab.uses_extra_stages and len(k_ext) == tab.stages + 1:
        for i, row in enumerate(tab.extra_nonzero):
            k_ext.append(f(t + tab.extra_c[i] * h, _combine(y, k_ext, row, h)))
            stats.nfe += 1
    # All outputs of the step in one matrix product: y + (h W) K with W the (len(thetas), stages) dense
    # weights. Three kernels (and three autograd nodes) instead of ~(stages + 1) per output.
    w = torch.tensor([[wi * h for wi in tab.dense_weights(th)] for th in thetas], dtype=y.dtype)
    K = torch.stack(k_ext).reshape(len(k_ext), -1)
    out = torch.addmm(y.reshape(1, -1), w.to(y.device, non_blocking=True), K)
    return list(out.view(len(thetas), *y.shape).unbind(0))


def integrate_adaptive(
    f: Func,
    tab: ButcherTableau,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t_out: Sequence[float],
    *,
    rtol,
    atol,
    norm: Norm,
    controller: Controller,
    h0: float,
    min_step: float = 0.0,
    max_step: float = math.inf,
    max_num_steps: int = 1_000_000,
    stats: SolveStats,
    trace: list | None = None,
    callbacks=None,
    stops: Sequence[tuple[float, bool]] = (),
    event=None,
    compiled=None,
    jump=None,
    on_accept=None,
) -> list[torch.Tensor]:
    """Adaptive solve through the times ``t_out`` (monotonic; ``t_out[0]`` is the start).

    Output times never shorten a step: values between steps come from the dense output. Only the last
    step is clipped to end exactly at ``t_out[-1]``. ``trace`` (if given) receives ``(t, h)`` of every
    accepted step, which is all it takes to replay the solve (checkpointing).

    ``stops``: ``(time, is_jump)`` pairs in the direction of integration (options ``step_t``/``jump_t``):
    a step that would cross one is shortened to end on it; after a jump, ``f`` is re-evaluated as the
    one-sided limit past it (FSAL does not hold across a discontinuity).
    ``event`` (terminal events, see ``_event.py``): ``event.crossed(t1, y1)`` returns a 0-d tensor fetched
    in the same synchronisation as the error ratio; on an accepted step where it is non-zero the loop
    calls ``event.found(t, h, y, k_ext, t1, y1)`` (the step's start, size, state, extended stages for
    ``dense_eval`` and end) and stops. ``t_out[-1]`` may then be ±inf.
    """
    t_end = t_out[-1]
    direction = 1.0 if t_end > t_out[0] else -1.0
    n_out = len(t_out)
    outputs = [y0]
    i_out = 1
    t, y = t_out[0], y0
    h = min(abs(h0), max_step)
    prev_ratio = 1.0
    n_steps = 0
    i_stop = 0
    if jump is not None:
        merged = dict.fromkeys(t_out[1:-1], False)
        for ts, is_jump in stops:
            merged[ts] = merged.get(ts, False) or is_jump
        stops = sorted(merged.items(), key=lambda p: direction * p[0])
    while i_stop < len(stops) and direction * (stops[i_stop][0] - t) <= 0:
        i_stop += 1
    # Default RMS norm with scalar tolerances: the cheaper error ratio that reuses |y1| as the next |y|.
    fast_norm = compiled is None and (
        norm is rms_norm and tab.b_error_aux is None and isinstance(rtol, float) and isinstance(atol, float)
    )
    if fast_norm:
        c_tol = torch.scalar_tensor(atol / rtol, dtype=y0.dtype, device=y0.device)
        y_abs = torch.abs(y0.detach()).add_(c_tol)
    while i_out < n_out:
        h = max(h, min_step)
        last = h >= abs(t_end - t)
        h_signed = (t_end - t) if last else direction * h
        stop = None
        if i_stop < len(stops) and direction * (stops[i_stop][0] - (t + h_signed)) < 0:
            stop = stops[i_stop]
            h_signed, last = stop[0] - t, False
        if t + h_signed == t:
            raise SolverError("underflow", "step size underflow", t=t, step_size=h_signed, n_steps=n_steps)
        if n_steps >= max_num_steps:
            raise SolverError(
                "max_num_steps",
                f"max_num_steps={max_num_steps} exceeded",
                t=t,
                step_size=h_signed,
                n_steps=n_steps,
            )
        if callbacks is not None:
            callbacks.step(t, y, h_signed)
        # A step onto a jump evaluates its end-time stages as the one-sided limit before the jump.
        f_step = f if stop is None or not stop[1] else _before(f, stop[0], direction)
        stats.nfe += tab.stages - 1
        n_steps += 1
        if compiled is not None and f_step is f:
            y1, k, ratio_t = compiled(t, h_signed, y, f0)
        else:
            y1, k = rk_step(f_step, tab, t, h_signed, y, f0)
            if fast_norm:  # squared RMS ratio up to a host-side factor
                ratio_t, y1_abs = _rms_error_ratio(tab, k, y_abs, y1.detach(), c_tol)
            else:
                ratio_t = _error_ratio(tab, k, h_signed, y, y1, rtol, atol, norm)
        if event is None:
            ratio = float(ratio_t)  # the one sync per step
        else:  # the event's sign check rides on the same sync
            t1_try = stop[0] if stop is not None else t + h_signed
            pair = torch.stack([ratio_t.to(torch.float64), event.crossed(t1_try, y1).to(torch.float64)])
            ratio, crossed = pair.tolist()
        if fast_norm:
            ratio = math.sqrt(ratio) * _error_host_factor(tab, h_signed, rtol, y0.numel())
        accepted = ratio <= 1.0 or abs(h_signed) <= min_step
        if not math.isfinite(ratio):
            accepted = False
            if not bool(torch.isfinite(y).all()):
                raise SolverError("nonfinite", "non-finite state", t=t, step_size=h_signed, n_steps=n_steps)
            # f(t, y) itself non-finite: no smaller step can help (and the initial step size is NaN then).
            if not bool(torch.isfinite(f0).all()) or math.isnan(h_signed):
                raise SolverError(
                    "nonfinite", "func returned NaN/inf", t=t, step_size=h_signed, n_steps=n_steps
                )
        if accepted:
            t1 = t_end if last else (stop[0] if stop is not None else t + h_signed)
            j_jump = i_out if jump is not None and i_out < n_out - 1 and t_out[i_out] == t1 else None
            if j_jump is not None and not tab.fsal and on_accept is None:
                f1 = None  # replaced by the jump's own evaluation
            elif stop is not None and stop[1]:
                f1 = f(t1, y1, perturb=int(direction))  # one-sided limit past the jump
                stats.nfe += 1
            elif tab.fsal:
                f1 = k[-1]
            else:
                f1 = f(t1, y1)
                stats.nfe += 1
            if stop is not None:
                i_stop += 1
            if callbacks is not None:
                callbacks.accept(t, y, h_signed)
            if trace is not None:
                trace.append((t, h_signed))
            if on_accept is not None:
                on_accept(t, h_signed, y, [*k, f1])
            # Outputs inside (t, t1]: exact at t1, dense output strictly inside.
            inner = []
            j = i_out
            while j < n_out and direction * (t_out[j] - t1) < 0:
                inner.append((t_out[j] - t) / h_signed)
                j += 1
            if inner:
                outputs.extend(dense_eval(f, tab, t, h_signed, y, [*k, f1], inner, stats))
            i_out = j
            if i_out < n_out and t_out[i_out] == t1:
                outputs.append(y1)
                i_out += 1
            stop_now = event is not None and bool(crossed)
            if stop_now:
                event.found(t, h_signed, y, [*k, f1], t1, y1)
            if j_jump is not None:
                y1, f1 = jump(j_jump, y1)
                if fast_norm:
                    y1_abs = torch.abs(y1.detach()).add_(c_tol)
            t, y, f0 = t1, y1, f1
            if fast_norm:
                y_abs = y1_abs
            stats.n_accepted += 1
            stats.last_step = abs(h_signed)
            prev_ratio = ratio
            if stop_now:
                break
        else:
            stats.n_rejected += 1
            if callbacks is not None:
                callbacks.reject(t, y, h_signed)
        h = min(abs(h_signed) * controller.factor(ratio, prev_ratio, accepted), max_step)
    stats.n_steps += n_steps
    return outputs


def integrate_fixed(
    f: Func,
    tab: ButcherTableau,
    y0: torch.Tensor,
    f0: torch.Tensor,
    t_out: Sequence[float],
    grid: Sequence[float],
    *,
    interp: str = "linear",
    perturb: bool = False,
    stats: SolveStats,
    trace: list | None = None,
    callbacks=None,
    stepper=None,
    on_accept=None,
) -> list[torch.Tensor]:
    """Fixed-grid solve: one step per grid interval; outputs between grid points by linear (default) or
    cubic Hermite interpolation. ``grid`` runs from ``t_out[0]`` to ``t_out[-1]``.

    ``stepper(f, t, h, y, f0, stats) -> (y1, f1 or None)`` replaces the explicit RK step of ``tab`` (used
    by the implicit and Adams methods; ``f1`` is ``f(t + h, y1)`` when the step has it for free).
    ``on_accept(t, h, y, k_ext)`` as for ``integrate_adaptive`` (explicit RK steps of ``tab`` only)."""
    n_out = len(t_out)
    direction = 1.0 if t_out[-1] > t_out[0] else -1.0
    outputs = [y0]
    i_out = 1
    y = y0
    f_next: torch.Tensor | None = None if perturb else f0
    f_plain = f
    stepper = rk_stepper(tab) if stepper is None else stepper
    # A stepper that evaluates the first stage itself when handed None (the compiled step); then f0 is not
    # available for cubic interpolation, so the caller uses it with interp="linear" only.
    first_stage_inside = getattr(stepper, "first_stage_inside", False)
    for g0, g1 in itertools.pairwise(grid):
        h = g1 - g0
        if perturb:  # one-sided limits at the step's ends (for discontinuities at grid points)
            f = _one_sided(f_plain, g0, g1, direction)
        if f_next is None and not first_stage_inside:
            f_next = f(g0, y)
            stats.nfe += 1
        if callbacks is not None:
            callbacks.step(g0, y, h)
        y1, f1 = stepper(f, g0, h, y, f_next, stats)
        k = [f_next]
        if on_accept is not None:
            if f1 is None:
                f1 = f(g1, y1)
                stats.nfe += 1
            on_accept(g0, h, y, [*stepper.last_stages, f1])
        if callbacks is not None:
            callbacks.accept(g0, y, h)
        if trace is not None:
            trace.append((g0, h))
        j = i_out
        while j < n_out and direction * (t_out[j] - g1) < 0:
            j += 1
        if j > i_out:
            thetas = [(t_out[m] - g0) / h for m in range(i_out, j)]
            if interp == "cubic":
                if f1 is None:
                    f1 = f(g1, y1)
                    stats.nfe += 1
                outputs.extend(_hermite(y, y1, k[0], f1, h, th) for th in thetas)
            else:
                outputs.extend(torch.lerp(y, y1, th) for th in thetas)
            i_out = j
        if i_out < n_out and t_out[i_out] == g1:
            outputs.append(y1)
            i_out += 1
        y, f_next = y1, (None if perturb else f1)
        stats.n_steps += 1
        stats.n_accepted += 1
        stats.last_step = abs(h)
    return outputs


def _before(f, t_jump: float, direction: float):
    """``f`` with evaluations at ``t_jump`` (to rounding) moved one ulp back, before the jump."""
    slack = 4 * math.ulp(max(1.0, abs(t_jump)))

    def fb(t: float, y: torch.Tensor) -> torch.Tensor:
        if abs(t - t_jump) <= slack:
            return f(t_jump, y, perturb=-int(direction))
        return f(t, y)

    return fb


def compiled_stepper(tab: ButcherTableau, compiled):
    """``compiled(t, h, y, f0 or None) -> (y1, stages, _)`` (``_compiled_step.py``) in the fixed-grid stepper
    protocol; it evaluates the first stage inside the graph when ``f0`` is None (non-FSAL tableaus)."""

    def step(f, t, h, y, f0, stats):
        y1, k, _ = compiled(t, h, y, f0)
        stats.nfe += tab.stages - (0 if f0 is None else 1)
        return y1, (k[-1] if tab.fsal else None)

    step.first_stage_inside = True
    return step


def rk_stepper(tab: ButcherTableau):
    """The explicit RK step of ``tab`` in the fixed-grid stepper protocol (see ``integrate_fixed``)."""

    def step(f, t, h, y, f0, stats):
        y1, k = rk_step(f, tab, t, h, y, f0)
        stats.nfe += tab.stages - 1
        step.last_stages = k  # for integrate_fixed's on_accept
        return y1, (k[-1] if tab.fsal else None)

    return step


def _one_sided(f, g0: float, g1: float, direction: float):
    def fs(t: float, y: torch.Tensor) -> torch.Tensor:
        return f(t, y, perturb=int(direction) if t == g0 else (-int(direction) if t == g1 else 0))

    return fs


def _hermite(y0, y1, f0, f1, h, th):
    h00, h10 = 2 * th**3 - 3 * th**2 + 1, th**3 - 2 * th**2 + th
    h01, h11 = -2 * th**3 + 3 * th**2, th**3 - th**2
    return y0 * h00 + y1 * h01 + f0 * (h10 * h) + f1 * (h11 * h)
