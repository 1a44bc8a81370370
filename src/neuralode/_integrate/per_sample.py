"""Per-sample adaptive stepping: a batch of independent problems, each with its own step size.

``odeint`` (the joint mode) steps the whole batch with one step size chosen from one error norm over
all elements: the hardest sample sets the pace for every sample. Here every sample (row of the first
dimension) has its own time, step size, accept/reject decision, step counters and status; the batch still
goes through ``func`` together, one call per stage. Accept/reject and the controller are ``torch.where``
masks; the loop waits for the device once per step (one small tensor: "is anyone still running" and
which output columns the step crossed).

Use it when the samples' dynamics differ a lot (stiffness, time scales, per-sample start and end
times); keep the joint mode when they are alike: it runs fewer kernels per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from neuralode._errors import SolverError
from neuralode._interpolation import dense_rows, row_outputs
from neuralode._problem import RowsProblem, make_rows_problem
from neuralode._solvers.rk import ROWS, error_ratio, rk_step, rms_error_ratio, rms_factor
from neuralode._stats import SolveStats, _report_forward
from neuralode._step_size import Controller, initial_step, rms_rows

__all__ = ["PerSampleInfo", "odeint_per_sample"]

#: Status codes of :class:`PerSampleInfo` (``status`` tensor), as ``SolveStats.status`` in per-sample mode.
STATUS = SolveStats.STATUS
_RUNNING_OR_OK, _MAX_STEPS, _UNDERFLOW, _NONFINITE = 0, 1, 2, 3


@dataclasses.dataclass
class PerSampleInfo:
    """What happened to each sample of a per-sample solve (tensors of shape ``(B,)`` on y0's device).

    Attributes:
        status: 0 success, 1 ``max_num_steps`` exceeded, 2 step-size underflow, 3 non-finite state
            (see ``SolveStats.STATUS``). Only returned with ``throw=False``; otherwise a failure raises.
            The same tensors are the solve's ``SolveStats.status`` and ``SolveStats.t_reached``.
        n_steps, n_accepted, n_rejected: attempted / accepted / rejected steps of each sample.
        t: time each sample reached.
        nfe: calls of ``func`` on the whole batch (int); each call evaluates every sample.
    """

    status: torch.Tensor
    n_steps: torch.Tensor
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    t: torch.Tensor
    nfe: int


def odeint_per_sample(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    throw: bool | None = None,
    return_info: bool = False,
    stats: SolveStats | None = None,
) -> torch.Tensor | tuple[torch.Tensor, PerSampleInfo]:
    """Solve a batch of independent ODEs ``dy_b/dt = func(t, y)_b``, each sample with its own steps.

    Args:
        func: ``func(t, y)`` with ``t`` of shape ``(B,)`` (each sample's current time, in ``y``'s dtype)
            and ``y`` of shape ``(B, *shape)``; returns dy/dt of ``y``'s shape. Sample ``b`` of the
            output must depend only on sample ``b`` of the input (as for any batched network without
            batch norm).
        y0: ``(B, *shape)`` floating tensor; the first dimension is the batch.
        t: output times, 1-D ``(T,)`` shared by all samples, or 2-D ``(B, T)`` per sample (each row
            strictly monotonic; rows may have different start and end times and directions). Column 0
            is each sample's start time.
        rtol, atol: positive floats, or tensors broadcastable to ``y0`` (e.g. ``(B, 1)`` per sample).
        method: an adaptive method (default ``"dopri5"``).
        options: ``first_step``, ``min_step``, ``max_step``, ``max_num_steps`` (per sample, default
            1,000,000); the step-size controller, as ``odeint``: ``controller`` (``"i"`` or ``"pi"``),
            ``pcoeff``, ``icoeff``, ``safety``, ``ifactor``, ``dfactor``; ``compile`` (``True`` or a dict
            of ``torch.compile`` keyword arguments: each step as one compiled graph, as ``odeint``'s
            ``options["compile"]``); ``throw`` (the same as the keyword).
        throw: raise :class:`SolverError` if any sample failed (default: ``options["throw"]``, else
            ``True``); with ``False`` the outputs a failed sample never reached are NaN and the
            per-sample status and time reached are in ``info`` and in the solve's ``SolveStats``
            (``status``, ``t_reached``). A keyword that contradicts ``options["throw"]`` is a
            ``ValueError``.
        return_info: also return a :class:`PerSampleInfo`.
        stats: a :class:`SolveStats` to add this solve's counters to.

    Returns:
        ``(T, B, *shape)``: the solution at the output times (like ``odeint``), and the info if asked.
        ``record_stats()`` receives ``nfe`` = calls of ``func`` on the whole batch and ``n_steps``,
        ``n_accepted``, ``n_rejected`` summed over the samples.

    The step sequence of each sample is the one ``odeint`` takes for that sample alone (same initial
    step, controller and error norm), so the results agree with per-sample ``odeint`` solves to rounding.
    Gradients flow by backpropagation through the steps (step-size control is not differentiated, as in
    ``odeint``).
    """
    if throw is not None:
        if not isinstance(throw, bool):
            raise TypeError(f"throw must be True or False, got {type(throw).__name__} {throw!r:.40}")
        if options is not None and options.get("throw", throw) != throw:
            raise ValueError(f"throw={throw} contradicts options['throw']={options['throw']!r}; give one")
        options = {**(options or {}), "throw": throw}
    problem = make_rows_problem(func, y0, t, rtol, atol, method, options)
    return solve_rows(problem, return_info=return_info, stats=stats)


def solve_rows(
    problem: RowsProblem, *, return_info: bool = False, stats: SolveStats | None = None
) -> torch.Tensor | tuple[torch.Tensor, PerSampleInfo]:
    """Solve a validated per-sample problem (see :func:`odeint_per_sample` for what it returns;
    ``problem.settings.throw`` says whether a failed sample raises)."""
    throw = problem.settings.throw
    solve_stats = stats
    stats = SolveStats(n_solves=1, nfe=1)  # func(t0, y0) in make_rows_problem
    ys, info = _integrate(problem, stats, throw)
    stats.status, stats.t_reached = info.status, info.t
    _report_forward(stats)
    if solve_stats is not None:
        solve_stats.add(stats)
    B, shape = problem.y0.shape[0], problem.shape
    if throw:
        bad = (info.status != _RUNNING_OR_OK).nonzero().flatten().tolist()
        if bad:
            b = bad[0]
            reason = STATUS[int(info.status[b])]
            raise SolverError(
                reason,
                f"{len(bad)} of {B} samples failed (first: sample {b}, {reason})",
                t=float(info.t[b]),
                step_size=float("nan"),
                n_steps=int(info.n_steps[b]),
            )
    out = ys.reshape(ys.shape[0], *shape)
    return (out, info) if return_info else out


# -- the loop ----------------------------------------------------------------------------------------------


def _integrate(
    problem: RowsProblem, stats: SolveStats, throw: bool, event=None
) -> tuple[torch.Tensor, PerSampleInfo]:
    """The per-sample loop on the flat ``(B, n)`` state, eager or with the compiled step (cached per
    ``func``); the adjoint's hooks run eagerly. ``event`` (see ``_event.RowEvent``) stops each row at
    its own terminal event: ``event.check(t, h, t_new, y, y1, stages, accept) -> fired`` after every
    step."""
    compile_kwargs = problem.settings.compile
    if compile_kwargs is None or problem.quad is not None or problem.jump is not None:
        return _loop(problem, stats, throw, None, event)
    from neuralode._integrate.compiled_step import compiled_step

    step, release = compiled_step(
        problem.func,
        problem.tab,
        None,
        None,
        problem.rtol,
        problem.atol,
        compile_kwargs,
        rows=(tuple(problem.shape), problem.groups),
    )
    try:
        return _loop(problem, stats, throw, step, event)
    finally:
        release()


def _loop(
    problem: RowsProblem, stats: SolveStats, throw: bool, compiled, event=None
) -> tuple[torch.Tensor, PerSampleInfo]:
    f, tab, y, f0, tt = problem.f, problem.tab, problem.y0, problem.f0, problem.t
    rtol, atol, s = problem.rtol, problem.atol, problem.settings
    B, n = y.shape
    T = tt.shape[1]
    y_init = y
    dtype, device = y.dtype, y.device
    tdtype = tt.dtype
    t, t_end = tt[:, 0].clone(), tt[:, -1].clone()
    direction = torch.sign(t_end - t)
    controller: Controller = s.controller
    min_step, max_step, max_num_steps = s.min_step, s.max_step, s.max_num_steps
    groups = problem.groups
    if s.first_step is None:
        h = initial_step(
            f, t, y, f0, tab.order, rtol, atol, functools.partial(rms_rows, groups=groups), direction, ROWS
        )
        stats.nfe += 1
    else:
        h = torch.full((B,), s.first_step, dtype=tdtype, device=device)
    h = h.clamp(max=max_step)
    # The per-sample adjoint's hook (see RowsProblem): a quadrature along each sample's accepted steps
    # without it being part of the state.
    quad = problem.quad
    # The other hook: jump(j, hit, y) -> y changes the rows ``hit`` that have just reached their interior
    # output column j[b] (steps end exactly on those times; the step sizes carry on).
    jump = problem.jump
    if jump is not None:
        next_stop = torch.ones(B, dtype=torch.int64, device=device)
    # Scalar tolerances and the RMS norm: the error ratio with its constants applied per row at the end.
    scalar_tol = (
        isinstance(rtol, float) and isinstance(atol, float) and tab.b_error_aux is None and groups is None
    )
    if scalar_tol:
        e_factor = rms_factor(tab, rtol, n)
        c_tol = torch.scalar_tensor(atol / rtol, dtype=dtype, device=device)
    else:
        row_norm = functools.partial(rms_rows, groups=groups)
    f_step = f
    if quad is not None:

        def f_step(t_i, y_i):  # records every stage for the quadrature
            stage_ts.append(t_i)
            stage_ys.append(y_i)
            return f(t_i, y_i)

    running = torch.ones(B, dtype=torch.bool, device=device)
    status = torch.zeros(B, dtype=torch.int8, device=device)
    n_steps = torch.zeros(B, dtype=torch.int64, device=device)
    n_acc = torch.zeros_like(n_steps)
    prev_ratio = torch.ones(B, dtype=tdtype, device=device) if controller.pcoeff else None
    last_nan = None
    # With only (t0, t1) (or with jumps) the answer is the state where each sample stops.
    dense_out = T > 2 and jump is None
    if dense_out:
        next_out = torch.ones(B, dtype=torch.int64, device=device)
        cols = [y] * (T - 1)
    iteration = 0
    while True:
        if iteration >= max_num_steps:  # every running sample has taken exactly this many steps
            status = torch.where(running, _MAX_STEPS, status).to(torch.int8)
            running = running & False
            break
        iteration += 1
        if min_step > 0:
            h = h.clamp(min=min_step)
        t_to = t_end
        if jump is not None:  # this row's next output time (its own time once it stopped)
            t_to = torch.where(running, tt.gather(1, next_stop.unsqueeze(1)).squeeze(1), t)
        dist = (t_to - t) * direction  # 0 for samples that are done: they take steps of size 0
        last = h >= dist
        h_signed = torch.where(last, dist, h) * direction
        t_try = t + h_signed
        # Stage times in the state's dtype (what func receives): two conversions a step, none a stage.
        t_lo = t if dtype == tdtype else t.to(dtype)
        h_lo = h_signed if dtype == tdtype else h_signed.to(dtype)
        hp = (h_lo.unsqueeze(1), h_lo)  # ROWS: (B, 1) and (B,)

        if compiled is not None:
            y1, k, ratio = compiled((t, h_signed), y, f0, rtol, atol)
        else:
            if quad is not None:
                stage_ts, stage_ys = [t_lo], [y]
            y1, k = rk_step(f_step, tab, t_lo, hp, y, f0, ROWS)
        stats.nfe += tab.stages - 1
        t_new = torch.where(last, t_to, t_try)
        if tab.fsal:
            f1 = k[-1]
        else:
            f1 = f(t_new, y1)
            stats.nfe += 1

        with torch.no_grad():
            if compiled is not None:
                ratio = ratio.to(tdtype)
            elif scalar_tol:  # the constant factor |h e_0|/(rtol·sqrt(n)) is applied in the time dtype
                x, _ = rms_error_ratio(tab, k, y1, c_tol, None, y)
                ratio = torch.linalg.vector_norm(x, dim=1).to(tdtype).mul_(h_signed.abs()).mul_(e_factor)
            else:
                ratio = error_ratio(tab, k, hp, y, y1, rtol, atol, row_norm, ROWS)
                if ratio.dtype != tdtype:
                    ratio = ratio.to(tdtype)
        accept = (ratio <= 1.0) & running
        if min_step > 0:
            accept = accept | (running & (h_signed.abs() <= min_step) & torch.isfinite(ratio))
        if jump is not None:
            reached = accept & last
            hit = reached & (next_stop < T - 1)
            running_next = running & ~(reached & ~hit)
        else:
            running_next = running & ~(accept & last)
        if event is not None:  # rows whose accepted step crossed their event stop there
            running_next = running_next & ~event.check(t, h_signed, t_new, y, y1, [*k, f1], accept)
        underflow = (t_try == t) & running
        flags = torch.stack([running_next.any(), torch.isfinite(ratio).all(), underflow.any()])
        if jump is not None:
            flags = torch.cat([flags, hit.any().reshape(1)])
        if dense_out:
            count, window = row_outputs(tt, t_new, direction, accept, next_out)
            flags = torch.cat([flags.to(torch.int64), window])
        flag_values = flags.tolist()  # the one host-device sync per step
        keep_going, all_finite, any_underflow = (bool(v) for v in flag_values[:3])

        if not all_finite or any_underflow:  # rare: stop the samples that cannot go on
            # As odeint: a non-finite error only rejects the step (it shrinks by dfactor); the sample
            # stops when its current state is non-finite or its step no longer moves t.
            # f(t, y) itself non-finite (or a NaN step size): no smaller step can help either.
            bad_f = ~torch.isfinite(f0.reshape(B, -1)).all(dim=1) | torch.isnan(h_signed)
            bad_state = running & ~torch.isfinite(ratio) & (~torch.isfinite(y).all(dim=1) | bad_f)
            # A step that shrank to nothing on NaN/inf stages failed on func's values, not on accuracy.
            stuck_nan = underflow & ~torch.isfinite(ratio)
            if last_nan is not None:
                stuck_nan = stuck_nan | (underflow & last_nan)
            status = torch.where(
                bad_state | stuck_nan, _NONFINITE, torch.where(underflow, _UNDERFLOW, status)
            ).to(torch.int8)
            stop = bad_state | underflow
            accept = accept & ~stop
            running_next = running_next & ~stop
            t_end = torch.where(stop, t, t_end)
            keep_going = bool(running_next.any())
        # Rows whose latest attempt had a NaN/inf error estimate (kept only once one has).
        if not all_finite:
            last_nan = running & ~torch.isfinite(ratio)
        elif last_nan is not None:
            last_nan = last_nan & ~running
        if dense_out:
            lo, hi = flag_values[3], flag_values[4]
            if hi > lo:
                cols = _write_outputs(
                    tab, f, cols, next_out, count, lo, hi, tt, t, t_new, h_signed, y, y1, k, f1, stats
                )
                next_out = count

        if quad is not None:
            quad(stage_ts, stage_ys, torch.where(accept, h_signed, torch.zeros_like(h_signed)).to(dtype))
        # Accepted samples move; the controller proposes the next step for everyone.
        acc_col = accept.unsqueeze(1)
        y = torch.where(acc_col, y1, y)
        f0 = torch.where(acc_col, f1, f0)
        t = torch.where(accept, t_new, t)
        n_steps = n_steps + running
        n_acc = n_acc + accept
        if jump is not None and flag_values[3]:
            hit = hit & accept  # (a failure check above may have withdrawn the acceptance)
            y = jump(next_stop, hit, y)
            f0 = torch.where(hit.unsqueeze(1), f(t, y), f0)
            stats.nfe += 1
            next_stop = next_stop + hit
        with torch.no_grad():
            h = h_signed.abs().mul_(controller.factor_rows(ratio, prev_ratio, all_finite))
            if max_step < math.inf:
                h = h.clamp_(max=max_step)
            if prev_ratio is not None:
                prev_ratio = torch.where(accept, ratio, prev_ratio)
        running = running_next
        if not keep_going:
            break
    outs = [y_init, *cols] if dense_out else [y_init, y]
    if not throw:  # columns a failed sample never reached are NaN, not a stale value
        failed = status != _RUNNING_OR_OK
        for j in range(1, T):
            unreached = failed & (j >= next_out) if dense_out else failed
            outs[j] = torch.where(unreached.unsqueeze(1), torch.full_like(outs[j], math.nan), outs[j])
    ys = torch.stack(outs)
    stats.n_steps = int(n_steps.sum())
    stats.n_accepted = int(n_acc.sum())
    stats.n_rejected = stats.n_steps - stats.n_accepted
    info = PerSampleInfo(
        status=status, n_steps=n_steps, n_accepted=n_acc, n_rejected=n_steps - n_acc, t=t, nfe=stats.nfe
    )
    return ys, info


def _write_outputs(tab, f, cols, next_out, count, lo, hi, tt, t, t_new, h_signed, y, y1, k, f1, stats):
    """Dense output at the crossed columns ``lo..hi-1`` (exact ``y1`` where a column equals t_new);
    column ``j`` is written for the samples with ``next_out <= j < count``."""
    window = tt[:, lo:hi]
    dense = dense_rows(f, tab, t, h_signed, y, [*k, f1], window, stats)  # (B, W, n)
    exact = (window == t_new.unsqueeze(1)).unsqueeze(2)
    dense = torch.where(exact, y1.unsqueeze(1), dense)
    cols = list(cols)
    for j in range(lo, hi):
        hit = ((next_out <= j) & (j < count)).unsqueeze(1)
        cols[j - 1] = torch.where(hit, dense[:, j - lo], cols[j - 1])
    return cols
