"""Per-sample adaptive stepping: a batch of independent problems, each with its own step size.

``odeint`` (the joint mode) steps the whole batch with one step size chosen from one error norm over
all elements: the hardest sample sets the pace for every sample. Here every sample (row of the first
dimension) has its own time, step size, accept/reject decision, step counters and status; the batch still
goes through ``func`` together, one call per stage. Accept/reject and the controller are ``torch.where``
masks; the loop waits for the device once per step (one small tensor: "is anyone still running" and
which output columns the step crossed).

Use it when the samples' dynamics differ a lot (stiffness, time scales, per-sample start and end
times); keep the joint mode when they are alike: it runs fewer kernels per step.

The loop is the same for every method; how a row takes one step is a :class:`RowStepper`: the explicit
Runge-Kutta one here (the one RK core, eager or compiled), the stiff methods' (``kvaerno*``: a Newton
iteration, Jacobian block and LU per row) in ``_solvers/stiff.py``, found through the method's
``MethodSpec.rows``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from neuralode._errors import SolverError
from neuralode._interpolation import dense_rows, row_outputs
from neuralode._problem import RowsProblem, make_rows_problem
from neuralode._solvers.rk import ROWS, error_ratio, rk_step, rms_error_ratio, rms_factor
from neuralode._stats import SolveStats, _report_forward
from neuralode._step_size import initial_step, rms_rows

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
        n_jac, n_lu: the stiff methods (``kvaerno*``): Jacobian blocks computed and LU factorisations
            of each sample's Newton matrix (``None`` for the explicit methods).
    """

    status: torch.Tensor
    n_steps: torch.Tensor
    n_accepted: torch.Tensor
    n_rejected: torch.Tensor
    t: torch.Tensor
    nfe: int
    n_jac: torch.Tensor | None = None
    n_lu: torch.Tensor | None = None


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
        method: an adaptive method (default ``"dopri5"``): an explicit Runge-Kutta one, or a stiff one
            (``"kvaerno3"``, ``"kvaerno4"``, ``"kvaerno5"``: each row its own Newton iteration, ``(d, d)``
            Jacobian block and LU, ``d`` the elements per row; see ``docs/stiff.md``).
        options: ``first_step``, ``min_step``, ``max_step``, ``max_num_steps`` (per sample, default
            1,000,000); the step-size controller, as ``odeint``: ``controller`` (``"i"`` or ``"pi"``),
            ``pcoeff``, ``icoeff``, ``safety``, ``ifactor``, ``dfactor``; ``compile`` (explicit methods:
            ``True`` or a dict of ``torch.compile`` keyword arguments: each step as one compiled graph,
            as ``odeint``'s ``options["compile"]``); ``max_iters``, ``newton_tol`` and ``jacobian``
            (``"auto"`` or ``"batch"``, the same) for the stiff methods, as in ``odeint``; ``throw``
            (the same as the keyword).
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
    step, controller and error norm; for the stiff methods also the same Newton, Jacobian-reuse and LU
    decisions), so the results agree with per-sample ``odeint`` solves to rounding.
    Gradients flow by backpropagation through the steps (step-size control is not differentiated, as in
    ``odeint``; the stiff methods' implicit stages by the implicit function theorem).
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


# -- how a row steps: the explicit Runge-Kutta stepper (the stiff one lives in _solvers/stiff.py) ----------


class RowStepper(Protocol):
    """What the per-sample loop asks of a method: one attempted step of every row, and each row's next
    step size. The loop owns everything else (times, outputs, accept/reject masks, statuses, hooks).
    A protocol: the stiff methods' stepper (``_solvers/stiff.py``) has these members without importing
    this module.

    Attributes:
        tab: the dense-output tableau (``dense``, ``stages``, ``uses_extra_stages``; see ``dense_rows``).
        order: the order used by the initial step size.
        stages: with the adjoint's ``quad`` hook, ``(stage_ts, stage_ys)`` of the last step.
    """

    tab: Any
    order: int
    stages: tuple[list, list] | None = None

    def step(self, t, t_lo, t_to, last, h_signed, hp, y, f0, running):
        """One attempted step of every row from ``(t, y)`` with ``f0 = f(t, y)``: ``t``/``h_signed``
        ``(B,)`` in the time dtype, ``t_lo``/``hp`` the same in the state's dtype (``hp`` as
        :data:`ROWS` wants it), ``t_to``/``last`` each row's target and whether the step ends on it,
        ``running`` the rows still stepping (the others take steps of size 0). Returns
        ``(y1, k_ext, ratio, failed)``: the new states, the stages with ``f(t1, y1)`` last (the dense
        output's ``k_ext``), the error ratios ``(B,)`` in the time dtype (≤ 1 accepts), and ``None`` or
        a ``(B,)`` mask of rows whose step could not be computed (rejected whatever their ratio)."""
        raise NotImplementedError

    def factor(self, ratio, prev_ratio, all_finite: bool, accept) -> torch.Tensor:
        """``(B,)`` factors: next step size = factor · this step's ``|h|``."""
        raise NotImplementedError

    def row_counters(self) -> dict[str, torch.Tensor]:
        """Extra per-row counters for :class:`PerSampleInfo` (none by default)."""
        return {}


class _RkRows(RowStepper):
    """The explicit Runge-Kutta stepper: :func:`rk_step` and the error ratio, eager or compiled."""

    def __init__(self, problem: RowsProblem, stats: SolveStats, compiled) -> None:
        self.problem, self.stats, self.compiled = problem, stats, compiled
        self.tab = tab = problem.tab
        self.order = tab.order
        self.controller = problem.settings.controller
        rtol, atol, n = problem.rtol, problem.atol, problem.y0.shape[1]
        # Scalar tolerances and the RMS norm: the error ratio with its constants applied per row at the end.
        self.scalar_tol = (
            isinstance(rtol, float)
            and isinstance(atol, float)
            and tab.b_error_aux is None
            and problem.groups is None
        )
        if self.scalar_tol:
            self.e_factor = rms_factor(tab, rtol, n)
            self.c_tol = torch.scalar_tensor(atol / rtol, dtype=problem.y0.dtype, device=problem.y0.device)
        else:
            self.row_norm = functools.partial(rms_rows, groups=problem.groups)
        self.f = problem.f
        self.stages = ([], [])
        if problem.quad is not None:
            f = problem.f

            def f_step(t_i, y_i):  # records every stage for the quadrature
                self.stages[0].append(t_i)
                self.stages[1].append(y_i)
                return f(t_i, y_i)

            self.f = f_step

    def step(self, t, t_lo, t_to, last, h_signed, hp, y, f0, running):
        p, tab, stats = self.problem, self.tab, self.stats
        tdtype = t.dtype
        if self.compiled is not None:
            y1, k, ratio = self.compiled((t, h_signed), y, f0, p.rtol, p.atol)
        else:
            if p.quad is not None:
                self.stages = ([t_lo], [y])
            y1, k = rk_step(self.f, tab, t_lo, hp, y, f0, ROWS)
        stats.nfe += tab.stages - 1
        if tab.fsal:
            f1 = k[-1]
        else:
            f1 = p.f(torch.where(last, t_to, t + h_signed), y1)
            stats.nfe += 1
        with torch.no_grad():
            if self.compiled is not None:
                ratio = ratio.to(tdtype)
            elif self.scalar_tol:  # the constant factor |h e_0|/(rtol·sqrt(n)) is applied in the time dtype
                x, _ = rms_error_ratio(tab, k, y1, self.c_tol, None, y)
                ratio = torch.linalg.vector_norm(x, dim=1).to(tdtype).mul_(h_signed.abs()).mul_(self.e_factor)
            else:
                ratio = error_ratio(tab, k, hp, y, y1, p.rtol, p.atol, self.row_norm, ROWS)
                if ratio.dtype != tdtype:
                    ratio = ratio.to(tdtype)
        return y1, (*k, f1), ratio, None

    def factor(self, ratio, prev_ratio, all_finite: bool, accept) -> torch.Tensor:
        return self.controller.factor_rows(ratio, prev_ratio, all_finite)


def make_stepper(problem: RowsProblem, stats: SolveStats, compiled=None) -> RowStepper:
    """The method's :class:`RowStepper`: its ``MethodSpec.rows`` (the stiff methods), else the explicit
    Runge-Kutta one."""
    spec = problem.settings.spec
    if spec is not None and spec.rows is not None:
        return spec.rows(problem, stats)
    return _RkRows(problem, stats, compiled)


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
    y, f0, tt = problem.y0, problem.f0, problem.t
    rtol, atol, s = problem.rtol, problem.atol, problem.settings
    B = y.shape[0]
    T = tt.shape[1]
    y_init = y
    dtype, device = y.dtype, y.device
    tdtype = tt.dtype
    t, t_end = tt[:, 0].clone(), tt[:, -1].clone()
    direction = torch.sign(t_end - t)
    min_step, max_step, max_num_steps = s.min_step, s.max_step, s.max_num_steps
    groups = problem.groups
    stepper = make_stepper(problem, stats, compiled)
    f, tab = problem.f, stepper.tab
    if s.first_step is None:
        h = initial_step(
            problem.f,
            t,
            y,
            f0,
            stepper.order,
            rtol,
            atol,
            functools.partial(rms_rows, groups=groups),
            direction,
            ROWS,
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
    running = torch.ones(B, dtype=torch.bool, device=device)
    status = torch.zeros(B, dtype=torch.int8, device=device)
    n_steps = torch.zeros(B, dtype=torch.int64, device=device)
    n_acc = torch.zeros_like(n_steps)
    prev_ratio = torch.ones(B, dtype=tdtype, device=device) if s.controller.pcoeff else None
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

        y1, k_ext, ratio, failed = stepper.step(t, t_lo, t_to, last, h_signed, hp, y, f0, running)
        t_new = torch.where(last, t_to, t_try)
        accept = (ratio <= 1.0) & running
        if min_step > 0:
            accept = accept | (running & (h_signed.abs() <= min_step) & torch.isfinite(ratio))
        if failed is not None:  # the stepper could not compute these rows' steps (they are rejected)
            accept = accept & ~failed
        if jump is not None:
            reached = accept & last
            hit = reached & (next_stop < T - 1)
            running_next = running & ~(reached & ~hit)
        else:
            running_next = running & ~(accept & last)
        if event is not None:  # rows whose accepted step crossed their event stop there
            running_next = running_next & ~event.check(t, h_signed, t_new, y, y1, list(k_ext), accept)
        underflow = (t_try == t) & running
        if failed is not None and min_step > 0:  # no step at the minimum step size: an underflow
            underflow = underflow | (failed & (h_signed.abs() <= min_step))
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
                    tab, f, cols, next_out, count, lo, hi, tt, t, t_new, h_signed, y, y1, k_ext, stats
                )
                next_out = count

        if quad is not None:
            stage_ts, stage_ys = stepper.stages
            quad(stage_ts, stage_ys, torch.where(accept, h_signed, torch.zeros_like(h_signed)).to(dtype))
        # Accepted samples move; the controller proposes the next step for everyone.
        acc_col = accept.unsqueeze(1)
        y = torch.where(acc_col, y1, y)
        f0 = torch.where(acc_col, k_ext[-1], f0)
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
            h = h_signed.abs().mul_(stepper.factor(ratio, prev_ratio, all_finite, accept))
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
        status=status,
        n_steps=n_steps,
        n_accepted=n_acc,
        n_rejected=n_steps - n_acc,
        t=t,
        nfe=stats.nfe,
        **stepper.row_counters(),
    )
    return ys, info


def _write_outputs(tab, f, cols, next_out, count, lo, hi, tt, t, t_new, h_signed, y, y1, k_ext, stats):
    """Dense output at the crossed columns ``lo..hi-1`` (exact ``y1`` where a column equals t_new);
    column ``j`` is written for the samples with ``next_out <= j < count``."""
    window = tt[:, lo:hi]
    dense = dense_rows(f, tab, t, h_signed, y, list(k_ext), window, stats)  # (B, W, n)
    exact = (window == t_new.unsqueeze(1)).unsqueeze(2)
    dense = torch.where(exact, y1.unsqueeze(1), dense)
    cols = list(cols)
    for j in range(lo, hi):
        hit = ((next_out <= j) & (j < count)).unsqueeze(1)
        cols[j - 1] = torch.where(hit, dense[:, j - lo], cols[j - 1])
    return cols
