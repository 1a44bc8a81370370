"""Terminal events: integrate until ``event_fn(t, y)`` changes sign, and differentiate the event time.

Two entry points, with torchdiffeq's semantics:

* ``odeint(func, y0, t, event_fn=g)`` (``t = [t0, t1]``, ``t1`` only gives the direction) returns
  ``(event_t, solution)``, ``solution = [y(t0), y(event_t)]``. The event time carries no gradient; the
  state at it is differentiable with the event time held fixed.
* :func:`odeint_event` adds the gradient of the event time by the implicit function theorem: from
  ``g(T, y(T; θ)) = 0``, ``dT/dθ = −(∂g/∂y · ∂y/∂θ + ∂g/∂θ) / (∂g/∂t + ∂g/∂y · f(T, y(T)))``, and the state
  at the event moves by ``f · dT/dθ``. Works through ``odeint`` and through any other interface with
  ``odeint``'s signature (``odeint_adjoint``): then the event is located first without gradients and the
  interface solves to the (fixed) event time.

How the event is found. A vector-valued ``event_fn`` is combined as torchdiffeq does: each entry is
multiplied by its sign at ``t0`` and the minimum is taken, so the event fires when any entry changes sign.
Adaptive methods evaluate the event at the end of every attempted step and fetch its sign together with
the error ratio (no extra synchronisation per step); on the first accepted step where it has crossed,
the root is located on that step's dense output with the Illinois (regula falsi) method, to a bracket of
``atol`` in time (as torchdiffeq's bisection) or an exact zero. Fixed-grid methods need
``options['step_size']`` and search the linear (or cubic, ``interp='cubic'``) interpolant of the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from neuralode._dense import dense_eval, interpolate
from neuralode._errors import SolverError
from neuralode._methods import TABLEAUS
from neuralode._problem import _time, delta, make_problem, shifted_start
from neuralode._registry import EXTRA_METHODS
from neuralode._solve import _one_sided, rk_stepper, run
from neuralode._stats import SolveStats, _report_forward

__all__ = ["odeint_event"]

_MAX_FIXED_STEPS = 20_000  # torchdiffeq's cap on fixed-grid steps while searching for an event
_MAX_ROOT_ITERS = 200


class _Event:
    """The combined event on the flat state, and the step on which it fired (set by ``found``)."""

    def __init__(self, g: Callable[[float, torch.Tensor], torch.Tensor], t0: float, y0: torch.Tensor):
        self.g = g
        with torch.no_grad():
            self.sign0 = torch.sign(g(t0, y0))
        self.step: tuple | None = None

    def value(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """``min_i sign_i(t0) · g_i(t, y)``: positive until the event."""
        return torch.min(self.g(t, y) * self.sign0)

    @torch.no_grad()
    def crossed(self, t: float, y: torch.Tensor) -> torch.Tensor:
        return (self.value(t, y) <= 0).to(y.dtype)

    def found(self, t, h, y, k_ext, t1, y1) -> None:
        self.step = (t, h, y, k_ext, t1, y1)


def _flat_event_fn(event_fn: Callable, shapes, dtype, device) -> Callable:
    def g(t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t if isinstance(t, torch.Tensor) else _time(t, dtype, device)
        if shapes is not None:
            sizes = [math.prod(s) for s in shapes]
            y = tuple(p.view(s) for p, s in zip(y.split(sizes), shapes))
        out = event_fn(tt, y)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"event_fn(t, y) must return a tensor, got {type(out).__name__}")
        return out.reshape(-1)

    return g


def odeint_to_event(
    func,
    y0,
    t: torch.Tensor,
    event_fn: Callable,
    *,
    rtol=1e-7,
    atol=1e-9,
    method=None,
    options=None,
    stats=None,
):
    """``odeint(func, y0, t, event_fn=event_fn, ...)``: ``(event_t, solution)``, ``event_t`` without
    gradient (see :func:`neuralode.odeint`)."""
    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() != 2:
        raise ValueError(
            f"event_fn needs t with exactly 2 entries (start, and a time giving the direction), got len(t)={t.numel()}"
        )
    if options is not None and "per_sample" in options:
        options = dict(options)
        if options.pop("per_sample"):
            raise ValueError("event_fn is not supported with options['per_sample']=True")
    problem = make_problem(func, y0, t, rtol, atol, method, options)
    solve_stats = SolveStats(n_solves=1, nfe=1)  # the evaluation of func(t0, y0) in make_problem
    y0_run, f0_run = shifted_start(problem, t, solve_stats)
    event_t, ys = solve_to_event(problem, event_fn, solve_stats, y0=y0_run, f0=f0_run, t_like=t)
    if t.requires_grad:  # the state at t0 itself does not move with t0
        ys = torch.cat([ys[:1] + delta(t[0], ys) * problem.f0.detach(), ys[1:]])
    if stats is not None:
        stats.add(solve_stats)
    _report_forward(solve_stats)
    return event_t, problem.unflatten(ys)


def solve_to_event(problem, event_fn: Callable, stats, *, y0=None, f0=None, t_like: torch.Tensor):
    """Integrate ``problem`` from ``t[0]`` until the event; returns ``(event_t, stack([y0, y(event_t)]))``
    (flat states; ``event_t`` a detached 0-d tensor in ``t_like``'s dtype)."""
    if not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    y_start = problem.y0 if y0 is None else y0
    t0 = problem.t[0]
    direction = 1.0 if problem.t[-1] > t0 else -1.0
    g = _flat_event_fn(event_fn, problem.shapes, problem.y0.dtype, problem.y0.device)
    event = _Event(g, t0, y_start.detach())
    tol = _time_tol(problem.atol)

    def done(t_e: float, y_e: torch.Tensor):
        return torch.tensor(t_e, dtype=t_like.dtype, device=t_like.device), torch.stack([y_start, y_e])

    if bool(event.value(t0, y_start.detach()) == 0):  # already on the event (as torchdiffeq)
        return done(t0, y_start)

    tab = TABLEAUS.get(problem.method)
    if tab is not None and tab.adaptive:
        endless = dataclasses.replace(problem, t=[t0, direction * math.inf])
        try:
            run(endless, stats, y0=y_start, f0=f0, event=event)
        except SolverError as err:
            raise SolverError(
                err.reason,
                f"no event before the solve stopped ({err.reason})",
                t=err.t,
                step_size=err.step_size,
                n_steps=err.n_steps,
            ) from err
        if event.step is None:  # cannot happen: the loop only ends on the event or by raising
            raise RuntimeError("the solve ended without reaching the event")
        t, h, y, k_ext, _, y1 = event.step

        def interp(theta: float) -> torch.Tensor:
            if theta in (0.0, 1.0):
                return y if theta == 0.0 else y1
            return dense_eval(problem.f, tab, t, h, y, k_ext, [theta], stats)[0]

        if tab.uses_extra_stages:  # evaluate the dense output's extra stages once, with gradients on
            dense_eval(problem.f, tab, t, h, y, k_ext, [0.5], stats)
        theta = _root(lambda th: event.value(t + th * h, interp(th)), abs(h), tol)
        return done(t + theta * h, interp(theta))

    spec = EXTRA_METHODS.get(problem.method)
    if spec is not None and not spec.events:
        raise ValueError(f"method={problem.method!r} does not support event_fn; use an adaptive method")
    step = problem.options.get("step_size")
    if step is None:
        raise ValueError(
            f"event handling with the fixed-grid method {problem.method!r} needs options['step_size']"
        )
    stepper = rk_stepper(tab) if spec is None else spec.make_stepper(problem)
    h = direction * step
    interp_kind = problem.options.get("interp", "linear")
    perturb = bool(problem.options.get("perturb", False))
    t, y = t0, y_start
    f0 = problem.f0 if f0 is None else f0
    for n in range(_MAX_FIXED_STEPS):
        if problem.callbacks is not None:
            problem.callbacks.step(t, y, h)
        t1 = t0 + (n + 1) * h
        f_step = _one_sided(problem.f, t, t1, direction) if perturb else problem.f
        if perturb:  # one-sided limits at both ends of every step (as the fixed-grid loop)
            f0 = f_step(t, y)
            stats.nfe += 1
        y1, f1 = stepper(f_step, t, h, y, f0, stats)
        stats.n_steps += 1
        stats.n_accepted += 1
        if bool(event.crossed(t1, y1)):  # one synchronisation per step
            if interp_kind == "cubic" and f1 is None:
                f1 = problem.f(t1, y1)
                stats.nfe += 1

            def interp(theta, y=y, y1=y1, fa=f0, fb=f1):
                return interpolate(interp_kind, y, y1, fa, fb, h, [theta])[0]

            theta = _root(lambda th, t=t, interp=interp: event.value(t + th * h, interp(th)), abs(h), tol)
            return done(t + theta * h, interp(theta))
        t, y = t1, y1
        if f1 is None and not perturb:
            f1 = problem.f(t, y)
            stats.nfe += 1
        f0 = f1
    raise SolverError(
        "max_num_steps",
        f"no event within {_MAX_FIXED_STEPS} fixed steps",
        t=t,
        step_size=h,
        n_steps=_MAX_FIXED_STEPS,
    )


def _time_tol(atol) -> float:
    if isinstance(atol, torch.Tensor):
        return float(atol.min())
    return float(atol)


@torch.no_grad()
def _root(c: Callable[[float], torch.Tensor], span: float, tol: float) -> float:
    """A root θ ∈ (0, 1] of ``c`` (``c(0) > 0 ≥ c(1)``) by the Illinois method, to a bracket of
    ``tol / span`` in θ (``tol`` in time units) or an exact zero. One synchronisation per iteration."""
    lo, hi = 0.0, 1.0
    c_lo, c_hi = float(c(lo)), float(c(hi))
    if c_hi == 0.0:
        return hi
    width = tol / span if span > 0 else 0.0
    side = 0
    theta = hi
    for _ in range(_MAX_ROOT_ITERS):
        if hi - lo <= width:
            break
        denom = c_lo - c_hi
        theta = (lo * -c_hi + hi * c_lo) / denom if denom != 0 else 0.5 * (lo + hi)
        if not (lo < theta < hi):
            theta = 0.5 * (lo + hi)
        c_mid = float(c(theta))
        if c_mid == 0.0:
            return theta
        if c_mid > 0:
            lo, c_lo = theta, c_mid
            if side == 1:
                c_hi *= 0.5  # Illinois: halve the stale end's value so the bracket shrinks from both sides
            side = 1
        else:
            hi, c_hi = theta, c_mid
            if side == -1:
                c_lo *= 0.5
            side = -1
    # The end closer to the zero of the (modified) secant: report the side that has crossed, so that the
    # event has fired at the returned time.
    return hi


def odeint_event(
    func: Callable,
    y0: Any,
    t0: torch.Tensor,
    *,
    event_fn: Callable,
    reverse_time: bool = False,
    odeint_interface: Callable | None = None,
    **kwargs,
) -> tuple[torch.Tensor, Any]:
    """Solve from ``t0`` until ``event_fn(t, y)`` changes sign; the event time is differentiable.

    Args:
        func, y0: as for :func:`neuralode.odeint` (tensor or tuple state).
        t0: start time, a 0-d (or 1-element) floating tensor; may require grad.
        event_fn: ``event_fn(t, y) -> Tensor``; the event is the first sign change of any entry.
        reverse_time: integrate towards decreasing time.
        odeint_interface: ``neuralode.odeint`` (default) or ``neuralode.odeint_adjoint`` (or any function
            with their signature): how the state at the event is computed and differentiated.
        **kwargs: ``rtol``, ``atol``, ``method``, ``options`` (and, for ``odeint_adjoint``, its adjoint
            arguments).

    Returns:
        ``(event_t, solution)``: the event time (0-d, ``t0``'s dtype) and the states at ``t0`` and at the
        event, ``(2, *y0.shape)`` (a tuple of those for a tuple state). Both carry gradients with respect
        to ``y0``, ``t0`` and the parameters of ``func`` and ``event_fn`` (implicit function theorem).

    Raises:
        TypeError, ValueError: bad arguments; SolverError: the solve failed before the event.
    """
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a floating 0-d tensor, got {type(t0).__name__}")
    if t0.numel() != 1 or not t0.is_floating_point():
        raise ValueError(
            f"t0 must be a single floating-point time, got shape {tuple(t0.shape)} dtype {t0.dtype}"
        )
    if not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])

    # odeint locates the event and solves to it in one solve (it marks itself so; no import of it here).
    if odeint_interface is None or getattr(odeint_interface, "solves_to_event", False):
        event_t, solution = odeint_to_event(func, y0, t, event_fn, **kwargs)
    else:
        event_t, solution = solve_to_event_with(odeint_interface, func, y0, t, event_fn, **kwargs)
    return _reroute(func, event_fn, t0.detach().reshape(()), event_t, solution)


def solve_to_event_with(interface: Callable, func, y0, t: torch.Tensor, event_fn: Callable, **kwargs):
    """``(event_t, solution)`` with ``solution`` from ``interface`` (e.g. ``odeint_adjoint``): the event is
    located by a gradient-free ``odeint`` solve, then ``interface`` solves from ``t[0]`` to it (the event
    time held fixed). Costs one forward solve more than a solve that locates and differentiates at once.
    """
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"event_fn needs t with exactly 2 entries (start, and a time giving the direction), got {got}"
        )
    forward = {k: kwargs[k] for k in ("rtol", "atol", "method", "options") if k in kwargs}
    with torch.no_grad():
        event_t, _ = odeint_to_event(func, y0, t.detach(), event_fn, **forward)
    t_span = torch.cat([t[:1], event_t.detach().to(t).reshape(1)])
    if float(t_span[1].detach()) == float(t_span[0].detach()):  # already on the event: nothing to solve
        sol = y0 if isinstance(y0, torch.Tensor) else tuple(y0)
        if isinstance(sol, torch.Tensor):
            return event_t, torch.stack([sol, sol])
        return event_t, tuple(torch.stack([s, s]) for s in sol)
    return event_t, interface(func, y0, t_span, **kwargs)


def _reroute(func, event_fn, t0: torch.Tensor, event_t: torch.Tensor, solution):
    """Attach the implicit-function-theorem gradient to the event time and the final state."""
    is_tuple = not isinstance(solution, torch.Tensor)
    shapes = [s.shape[1:] for s in solution] if is_tuple else None
    y_e = torch.cat([s[-1].reshape(-1) for s in solution]) if is_tuple else solution[-1]
    y_start = None if is_tuple else solution[0]
    dtype, device = y_e.dtype, y_e.device
    g = _flat_event_fn(event_fn, shapes, dtype, device)

    def f_flat(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if shapes is None:
            return func(tt, y)
        sizes = [math.prod(s) for s in shapes]
        out = func(tt, tuple(p.view(s) for p, s in zip(y.split(sizes), shapes)))
        return torch.cat([o.reshape(-1) for o in out])

    y0_flat = torch.cat([s[0].reshape(-1) for s in solution]) if is_tuple else y_start
    with torch.no_grad():
        sign0 = torch.sign(g(t0.to(dtype), y0_flat.detach()))  # torchdiffeq combines with the signs at t0
        sign0 = torch.where(sign0 == 0, torch.ones_like(sign0), sign0)

    def c(tt, y):
        return torch.min(g(tt, y) * sign0)

    t_e = event_t.detach().to(dtype)
    with torch.enable_grad():
        t_var = t_e.clone().requires_grad_(True)
        y_var = y_e.detach().requires_grad_(True)
        c_val = c(t_var, y_var)
        dc_dt, dc_dy = torch.autograd.grad(c_val, (t_var, y_var), allow_unused=True)
    with torch.no_grad():
        f_e = f_flat(t_e, y_e.detach())
        dc_dt = torch.zeros((), dtype=dtype, device=device) if dc_dt is None else dc_dt
        dc_dy = torch.zeros_like(y_e) if dc_dy is None else dc_dy
        total = dc_dt + (dc_dy * f_e).sum()  # dc/dt along the solution at the event
        total = total + 1e-12 * torch.where(total >= 0, 1.0, -1.0)  # a tangential crossing has no derivative

    c_live = c(t_e, y_e)  # depends on y0, t0 and parameters through y_e, and on event_fn's parameters
    shift = -(c_live - c_live.detach()) / total  # zero in value; the gradient of the event time
    event_out = (event_t.detach() + shift.to(event_t.dtype)).reshape(event_t.shape)
    y_out = y_e + f_e * shift
    if not is_tuple:
        return event_out, torch.cat([solution[:-1], y_out[None]], dim=0)
    sizes = [math.prod(s) for s in shapes]
    parts = [p.view(s) for p, s in zip(y_out.split(sizes), shapes)]
    return event_out, tuple(torch.cat([s[:-1], p[None]], dim=0) for s, p in zip(solution, parts))
