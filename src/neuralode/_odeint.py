"""``odeint``: torchdiffeq's front door over the generic Runge-Kutta engine.

A short dispatch: the arguments become a validated :class:`~neuralode._problem.Problem` (one builder,
``_problem.make_problem``, shared by every front door), the engine (``_solve.run``) solves it, and the
flat states go back to the user's shapes. Per-sample stepping and events branch off to their modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from neuralode._events import odeint_to_event
from neuralode._func import odeint_vmapped, vmap_level
from neuralode._integrate.joint import run
from neuralode._integrate.per_sample import odeint_per_sample
from neuralode._problem import SOLVERS, Problem, make_problem, shifted_start
from neuralode._problem import delta as _delta
from neuralode._stats import SolveStats, _report_forward

__all__ = ["SOLVERS", "odeint"]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


def odeint(
    func: Callable[[torch.Tensor, TensorOrTuple], TensorOrTuple],
    y0: TensorOrTuple,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable | None = None,
    stats: SolveStats | None = None,
) -> TensorOrTuple | tuple[torch.Tensor, TensorOrTuple]:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    Gradients flow by backpropagation through the solver's operations (the paper's "RK-Net"); for O(1)
    memory use :func:`odeint_adjoint`.

    Args:
        func: ``func(t, y)`` with ``t`` a 0-d tensor in ``y``'s dtype and ``y`` shaped like ``y0``; returns
            dy/dt of the same shape and dtype.
        y0: initial state: a floating tensor of any shape, or a tuple of them.
        t: 1-D tensor of output times, strictly increasing or strictly decreasing; ``t[0]`` is the start.
        rtol, atol: relative and absolute tolerances (adaptive methods): positive floats, or tensors
            broadcastable to the state (for a tuple state, a tuple with one entry per tensor).
        method: one of :data:`SOLVERS`; default ``"dopri5"``.
        options: method options. Adaptive: ``first_step``, ``min_step``, ``max_step``, ``max_num_steps``
            (default 1,000,000), ``safety`` (0.9), ``ifactor`` (10), ``dfactor`` (0.2), ``norm``
            (callable on the state, or on the tuple of tensors), ``controller`` (``"i"`` or ``"pi"``),
            ``pcoeff``/``icoeff``. Fixed grid: ``step_size``, ``grid_constructor(func, y0, t) -> grid``,
            ``interp`` (``"linear"`` or ``"cubic"``), ``perturb`` (``func`` is evaluated at the one-sided
            limits inside each step, never at a grid point), ``max_num_steps`` (the most grid intervals,
            default 1,000,000: a larger grid is refused before it is built). ``per_sample=True`` (adaptive
            methods): every sample of the first dimension gets its own step size; see
            :func:`neuralode.odeint_per_sample` (``func`` then receives ``t`` of shape ``(batch,)``);
            with ``event_fn`` each sample stops at its own event (event times ``(batch,)``).
            Adaptive also: ``step_t``/``jump_t`` (times to step exactly onto; at a ``jump_t`` ``func`` is
            re-evaluated past the discontinuity). Explicit Runge-Kutta methods, adaptive and fixed-grid
            (``interp="linear"``, no ``perturb``): ``compile`` (``True`` or a dict of ``torch.compile``
            arguments, e.g. ``{"backend": "aot_eager"}``): each step (its ``func`` calls, stage
            combinations and error ratio) runs as one compiled graph, cached per ``func``; ``func`` must
            be traceable by ``torch.compile``, and the first solve pays the compilation. Other methods
            (``explicit_adams``, ``implicit_adams``, ``scipy_solver``, the implicit Runge-Kutta methods)
            list theirs in ``docs/compatibility.md``.
            ``throw`` (every method; default ``True``): ``False``
            returns what a failed solve reached instead of raising ``SolverError``: its outputs after
            the time reached are NaN (constants, without gradient), and ``stats.status`` (``"success"``,
            ``"max_num_steps"``, ``"underflow"``, ``"nonfinite"``) and ``stats.t_reached`` say how it
            ended (per sample, as ``(batch,)`` tensors, with ``per_sample``); see ``SolveStats``.
            Callbacks ``callback_step``/``callback_accept_step``/``callback_reject_step`` are found as
            attributes of ``func`` (see ``neuralode._callbacks``).
        event_fn: terminal event ``event_fn(t, y) -> Tensor``: integrate from ``t[0]`` (``t`` must have
            exactly two entries; ``t[1]`` only gives the direction) until some entry of ``event_fn``
            changes sign, and return ``(event_t, solution)``. ``event_t`` carries no gradient here; use
            :func:`odeint_event` for event times differentiable by the implicit function theorem.
        stats: a :class:`SolveStats` to add this solve's counters to (see also ``record_stats``).

    Returns:
        ``(len(t), *y0.shape)`` tensor, or a tuple of ``(len(t), *y0[i].shape)`` tensors. With ``event_fn``,
        ``(event_t, solution)`` with ``solution`` the states at ``t[0]`` and at ``event_t``.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SolverError: non-finite values, step-size underflow, or more than ``max_num_steps`` steps
            (unless ``options["throw"]`` is ``False``).
    """
    level = vmap_level()
    if level is not None:  # under torch.func.vmap: each vmapped problem gets its own solve (_func.py)
        return odeint_vmapped(level, func, y0, t, rtol, atol, method, options, event_fn, stats)
    if event_fn is not None:
        return odeint_to_event(
            func, y0, t, event_fn, rtol=rtol, atol=atol, method=method, options=options, stats=stats
        )
    if options is not None and "per_sample" in options:
        options = dict(options)
        if options.pop("per_sample"):
            return odeint_per_sample(
                func, y0, t, rtol=rtol, atol=atol, method=method, options=options, stats=stats
            )
    problem = make_problem(func, y0, t, rtol, atol, method, options)
    solve_stats = SolveStats(n_solves=1, nfe=1)  # the evaluation of func(t0, y0) in make_problem
    y0_run, f0_run = shifted_start(problem, t, solve_stats)
    ys = torch.stack(run(problem, solve_stats, y0=y0_run, f0=f0_run, f0_side=problem.f0_side))
    if t.requires_grad:
        ys = ys + _time_shift(problem, t, ys, solve_stats)
    if stats is not None:
        stats.add(solve_stats)
    _report_forward(solve_stats)
    return problem.unflatten(ys)


def _time_shift(problem: Problem, t: torch.Tensor, ys: torch.Tensor, stats: SolveStats) -> torch.Tensor:
    """Zero-valued term whose gradient with respect to ``t_i`` is ``f(t_i, y(t_i))``, so that
    ``dL/dt_i = dL/dy(t_i) · f(t_i, y(t_i))`` (exact for the ODE solution)."""
    # With perturb, f is taken as the one-sided limit from inside the solve's span (never at a grid point).
    side = problem.f0_side
    with torch.no_grad():
        fs = torch.stack(
            [problem.f(ti, yi, side if i == 0 else -side) for i, (ti, yi) in enumerate(zip(problem.t, ys))]
        )
    stats.nfe += len(problem.t)
    return _delta(t, ys).view(-1, *([1] * (ys.dim() - 1))) * fs


odeint.solves_to_event = True  # odeint_event locates and differentiates the event in one solve with it
