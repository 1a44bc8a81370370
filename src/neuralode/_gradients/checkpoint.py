"""``odeint_checkpoint``: the exact gradient of the discretised solve at O(√n) memory.

The forward solve runs without a graph and records the accepted step sequence ``(t, h)`` (the
engine's ``trace``) and the state at every ``stride``-th step (the checkpoints). The backward pass
replays one segment between checkpoints at a time with autograd — the same ``rk_step`` and dense-output
calls with the same step sizes — and backpropagates through it. So the gradient equals backpropagation
through the solver (``odeint``) to rounding, including its treatment of step-size selection, which
neither path differentiates (the controller works on host floats).

The stiff ``kvaerno*`` methods are replayed the same way, step by step at the recorded sizes, each
implicit stage by Newton to convergence and differentiated by the implicit function theorem (as
``odeint`` does); their Newton iterations start afresh at each segment, so the gradient equals direct
backprop to the Newton tolerance rather than to rounding.

Memory: the checkpoints plus one segment's graph. Time: one extra forward solve's worth of
evaluations during backward, plus one evaluation per segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from neuralode._callbacks import CheckpointKeeper
from neuralode._gradients.adjoint import _check_params
from neuralode._integrate.joint import _one_sided, run
from neuralode._interpolation import dense_eval, interpolate, step_outputs
from neuralode._odeint import _time_shift
from neuralode._problem import Problem, delta, make_problem
from neuralode._solvers.rk import rk_step
from neuralode._solvers.stiff import ESDIRK_TABLEAUS, EsdirkReplay
from neuralode._solvers.stiff import dense_output as esdirk_dense_output
from neuralode._stats import SolveStats, _report_backward, _report_forward

__all__ = ["odeint_checkpoint"]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


def odeint_checkpoint(
    func: Callable[[torch.Tensor, TensorOrTuple], TensorOrTuple],
    y0: TensorOrTuple,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    checkpoints: int | None = None,
    params: Sequence[torch.Tensor] | None = None,
) -> TensorOrTuple:
    """Solve like :func:`~neuralode.odeint`, with the same gradient, at memory O(checkpoints + segment).

    Use it where backprop through the solver (``odeint``) runs out of memory and the O(tolerance) error
    of the adjoint is not acceptable. It costs about one extra forward solve during ``backward()``.

    Args:
        func, y0, t, rtol, atol, method, options: as for :func:`~neuralode.odeint`.
        checkpoints: how many states to keep, at most (≥ 1). Default: about √(2n) for a solve of n
            steps (the number of steps is not known in advance; the stride doubles as the solve grows,
            so the checkpoints stay evenly spaced). Fewer checkpoints: less memory, longer segments.
        params: tensors to compute gradients for; default ``func``'s parameters when it is an
            ``nn.Module``. As for the adjoint, tensors ``func`` uses but not listed here get no gradient.

    Returns:
        ``(len(t), *y0.shape)`` tensor, or a tuple of ``(len(t), *y0[i].shape)`` tensors.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SolverError: the forward solve failed.
    """
    if checkpoints is not None and (
        isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1
    ):
        raise ValueError(f"checkpoints must be a positive int or None, got {checkpoints!r}")
    if isinstance(options, dict) and options.get("per_sample"):
        raise ValueError(
            "odeint_checkpoint does not support options['per_sample']=True (the per-sample loop keeps no step "
            "sequence to replay); use odeint_per_sample_adjoint, or odeint with options['per_sample']"
        )
    params = _check_params(func, params, name="params", who="odeint_checkpoint")
    y0_flat = torch.cat([x.reshape(-1) for x in y0]) if isinstance(y0, (tuple, list)) else y0
    with torch.no_grad():
        problem = make_problem(func, y0, t, rtol, atol, method, options)
    stats = SolveStats(n_solves=1, nfe=1)  # func(t0, y0) in make_problem
    time_grad = t.requires_grad
    if time_grad:  # as odeint: shifting t0 by δ is shifting y0 by −δ·f(t0, y0)
        y0_flat = y0_flat - delta(t[0], y0_flat) * problem.f0
    ys = _Checkpoint.apply(problem, checkpoints, stats, y0_flat, *params)
    if time_grad:
        extra = SolveStats()
        ys = ys + _time_shift(problem, t, ys, extra)
        _report_forward(extra)
    return problem.unflatten(ys)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, checkpoints, stats: SolveStats, y0, *params):
        trace: list = []
        keeper = CheckpointKeeper(checkpoints)
        with torch.no_grad():
            ys = torch.stack(run(problem, stats, trace=trace, y0=y0.detach(), callbacks=keeper))
        states, t_last = keeper.states, problem.t[-1]
        if stats.status != "success":  # options["throw"] = False: replay only up to the time reached
            t_last, d = stats.t_reached, problem.direction
            trace = [(t, h) for t, h in trace if d * (t - t_last) < 0]
            # The steps after the last output reached carry no gradient: the replay ends with the step
            # that reaches it (the last steps before a failure may not replay, e.g. next to a pole).
            t_out = max((tj for tj in problem.t if d * (tj - t_last) <= 0), key=lambda tj: d * tj)
            ends = [tr[0] for tr in trace[1:]] + [t_last]
            n_keep = next((j + 1 for j, e in enumerate(ends) if d * (e - t_out) >= 0), len(trace))
            if n_keep < len(trace):
                trace, t_last = trace[:n_keep], ends[n_keep - 1]
            states = {i: y for i, y in states.items() if i < len(trace)}
        ctx.sinks = _report_forward(stats)
        ctx.problem, ctx.trace, ctx.states, ctx.params = problem, trace, states, params
        ctx.t_last = t_last
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys):
        stats = SolveStats()
        grad_y0, grad_params = _backward(
            ctx.problem, ctx.trace, ctx.states, ctx.params, grad_ys, stats, ctx.t_last
        )
        _report_backward(ctx.sinks, stats)
        return (None, None, None, grad_y0, *grad_params)


def _step_outputs(
    problem: Problem, trace, t_last: float
) -> list[tuple[float, list[tuple[int, float]], int | None]]:
    """For every accepted step: its exact end time, the outputs strictly inside it as (index, θ), and
    the output at its end (or None): the loops' output plan, replayed from the trace. ``t_last``: where
    the last step ends (``t[-1]``, or the time a failed solve reached)."""
    t_out, direction = problem.t, problem.direction
    out = []
    i_out = 1
    for j, (t, h) in enumerate(trace):
        t1 = trace[j + 1][0] if j + 1 < len(trace) else t_last
        thetas, j_end, at_end = step_outputs(t_out, i_out, t, h, t1, direction)
        out.append((t1, list(zip(range(i_out, j_end), thetas)), j_end if at_end else None))
        i_out = j_end + at_end
    return out


def _backward(problem: Problem, trace, states, params, grad_ys, stats: SolveStats, t_last: float):
    if problem.method in ESDIRK_TABLEAUS:
        return _backward_esdirk(problem, trace, states, params, grad_ys, stats, t_last)
    settings = problem.settings
    tab = settings.tab
    adaptive = tab.adaptive
    interp = settings.interp
    perturb = settings.perturb and not adaptive
    direction = problem.direction
    plan = _step_outputs(problem, trace, t_last)

    def f(tt, y, perturb: int = 0):
        stats.nfe += 1
        return problem.f(tt, y, perturb)

    def segment(start: int, end: int, y_c: torch.Tensor):
        roots, weights = [], []
        y = y_c
        f0 = None
        for j in range(start, end):
            t, h = trace[j]
            t1, inner, out_end = plan[j]
            fj = _one_sided(f, t, t1, direction) if perturb else f
            if f0 is None:
                f0 = fj(t, y)
            y1, k = rk_step(fj, tab, t, h, y, f0)
            stats.n_steps += 1
            stats.n_accepted += 1
            f1 = k[-1] if tab.fsal else None
            if adaptive:
                if f1 is None:
                    f1 = f(t1, y1)
                if inner:
                    thetas = [th for _, th in inner]
                    vals = dense_eval(f, tab, t, h, y, [*k, f1], thetas, stats)
                    for (i, _), v in zip(inner, vals):
                        roots.append(v)
                        weights.append(grad_ys[i])
            elif inner:
                if interp == "cubic" and f1 is None:
                    f1 = fj(t1, y1)
                vals = interpolate(interp, y, y1, k[0], f1, h, [th for _, th in inner])
                for (i, _), v in zip(inner, vals):
                    roots.append(v)
                    weights.append(grad_ys[i])
            if out_end is not None:
                roots.append(y1)
                weights.append(grad_ys[out_end])
            y = y1
            f0 = None if perturb else f1
        return roots, weights, y

    return _backprop_segments(states, trace, params, grad_ys, stats, segment)


def _backprop_segments(states, trace, params, grad_ys, stats: SolveStats, segment):
    """The checkpointed backward pass: the segments between stored states from the last to the first,
    each replayed with the graph by ``segment(start, end, y_c) -> (roots, weights, y_end)`` (the outputs
    inside it with their cotangents, and its end state) and backpropagated, the adjoint at its start
    carried into the segment before."""
    starts = sorted(states)
    ends = [*starts[1:], len(trace)]
    a = None  # dL/dy at the end of the current segment
    grad_params = [None] * len(params)
    for start, end in zip(reversed(starts), reversed(ends)):
        y_c = states[start].detach().requires_grad_(True)
        with torch.enable_grad():
            roots, weights, y = segment(start, end, y_c)
            if a is not None:
                roots.append(y)
                weights.append(a)
            grads = torch.autograd.grad(
                roots, (y_c, *params), weights, allow_unused=True, materialize_grads=True
            )
        a = grads[0]
        for m, g in enumerate(grads[1:]):
            grad_params[m] = g if grad_params[m] is None else grad_params[m] + g
    return _finish(a, grad_params, params, grad_ys, stats)


def _finish(a, grad_params, params, grad_ys, stats: SolveStats):
    """``(dL/dy0, dL/dθ)`` from the adjoint at the first checkpoint and the summed parameter gradients."""
    stats.n_solves = 1
    grad_y0 = grad_ys[0] if a is None else a + grad_ys[0]
    grad_params = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad_params)]
    return grad_y0, grad_params


def _backward_esdirk(problem: Problem, trace, states, params, grad_ys, stats: SolveStats, t_last: float):
    """The backward pass for the stiff ``kvaerno*`` methods: each segment's steps re-taken at their
    recorded sizes by :class:`~neuralode._solvers.stiff.EsdirkReplay` (Newton to convergence, each stage
    differentiated by the implicit function theorem, as ``odeint`` does), outputs inside a step from its
    dense output, then backpropagated through. The replayed stages agree with the forward solve's to the
    Newton tolerance (the forward Newton history, rejected steps included, is not replayed)."""
    tab = ESDIRK_TABLEAUS[problem.method]
    direction = problem.direction
    jumps = {ts for ts, is_jump in problem.stops() if is_jump}
    plan = _step_outputs(problem, trace, t_last)

    def segment(start: int, end: int, y_c: torch.Tensor):
        roots, weights = [], []
        replay = EsdirkReplay(problem, stats, y_c)
        y = y_c
        f0 = problem.f(trace[start][0], y)
        stats.nfe += 1
        for j in range(start, end):
            t, h = trace[j]
            t1, inner, out_end = plan[j]
            y1, ks = replay.step(t, h, y, f0)
            stats.n_steps += 1
            stats.n_accepted += 1
            f1 = ks[-1]
            if inner:
                vals = esdirk_dense_output(tab, y, ks, f1, h, [th for _, th in inner])
                for (i, _), v in zip(inner, vals):
                    roots.append(v)
                    weights.append(grad_ys[i])
            if out_end is not None:
                roots.append(y1)
                weights.append(grad_ys[out_end])
            if t1 in jumps:  # as the forward solve: f past the jump, a fresh Jacobian
                f1 = problem.f(t1, y1, int(direction))
                stats.nfe += 1
                replay.after_jump()
            y, f0 = y1, f1
        return roots, weights, y

    return _backprop_segments(states, trace, params, grad_ys, stats, segment)
