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
``atol`` in time (as torchdiffeq's bisection). Fixed-grid methods need ``options['step_size']`` and
search the cubic Hermite interpolant of the step (through both ends' states and derivatives), whatever
``options['interp']``: fourth-order in the step size where a linear search is second-order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from neuralode._errors import SolverError
from neuralode._integrate.joint import _one_sided, rk_stepper, run
from neuralode._interpolation import dense_eval, dense_rows, hermite
from neuralode._problem import _time, delta, make_problem, shifted_start
from neuralode._solvers.explicit import TABLEAUS
from neuralode._solvers.registry import EXTRA_METHODS
from neuralode._stats import SolveStats, _report_forward

__all__ = ["odeint_event"]

_MAX_FIXED_STEPS = 20_000  # torchdiffeq's cap on fixed-grid steps while searching for an event
#: Default ``max_num_steps`` of an adaptive event search: an event that never fires ends in a
#: ``SolverError`` (reason ``"no_event"``) after this many steps instead of a million.
EVENT_STEP_BUDGET = 20_000
_MAX_ROOT_ITERS = 200


class _Event:
    """The combined event on the flat state, and the step on which it fired (set by ``found``)."""

    def __init__(self, g: Callable[[float, torch.Tensor], torch.Tensor], t0: float, y0: torch.Tensor):
        self.g = g
        with torch.no_grad():
            self.sign0 = torch.sign(g(t0, y0))
        self.step: tuple | None = None
        self.reached: tuple | None = None  # (t, y) where a failed solve stopped (options["throw"] = False)

    def value(self, t: float, y: torch.Tensor) -> torch.Tensor:
        """``min_i sign_i(t0) · g_i(t, y)``: positive until the event."""
        return torch.min(self.g(t, y) * self.sign0)

    @torch.no_grad()
    def crossed(self, t: float, y: torch.Tensor) -> torch.Tensor:
        return (self.value(t, y) <= 0).to(y.dtype)

    def found(self, t, h, y, k_ext, t1, y1) -> None:
        self.step = (t, h, y, k_ext, t1, y1)

    def stopped(self, t: float, y: torch.Tensor) -> None:
        self.reached = (t, y)


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
        if options.pop("per_sample"):  # each sample stops at its own event (times detached, as below)
            return per_sample_event(
                func,
                y0,
                t,
                event_fn,
                rtol=rtol,
                atol=atol,
                method=method,
                options=options,
                differentiable=False,
                stats=stats,
            )
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

    def done(t_e: float, y_e: torch.Tensor, status: str = "success"):
        stats.status, stats.t_reached = status, t_e
        return torch.tensor(t_e, dtype=t_like.dtype, device=t_like.device), torch.stack([y_start, y_e])

    if bool(event.value(t0, y_start.detach()) == 0):  # already on the event (as torchdiffeq)
        return done(t0, y_start)

    tab = TABLEAUS.get(problem.method)
    if tab is not None and tab.adaptive:
        budget = problem.options.get("max_num_steps", EVENT_STEP_BUDGET)
        endless = dataclasses.replace(
            problem,
            t=[t0, direction * math.inf],
            settings=dataclasses.replace(problem.settings, max_num_steps=budget),
        )
        try:
            run(endless, stats, y0=y_start, f0=f0, event=event)
        except SolverError as err:
            raise _search_failed(
                err.reason, budget, t=err.t, step_size=err.step_size, n_steps=err.n_steps
            ) from err
        if event.step is None and event.reached is not None:  # failed, options["throw"] = False
            status = "no_event" if stats.status == "max_num_steps" else stats.status  # as _search_failed
            return done(event.reached[0], event.reached[1], status)
        if event.step is None:  # cannot happen: the loop only ends on the event, by failing or raising
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
    perturb = bool(problem.options.get("perturb", False))
    cubic = (tab.order if spec is None else spec.order) > 1
    t, y = t0, y_start
    f0 = problem.f0 if f0 is None else f0
    budget = problem.options.get("max_num_steps", _MAX_FIXED_STEPS)
    for n in range(budget):
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
            # The event is located on the step's cubic Hermite interpolant whatever options['interp']
            # says: fourth-order accurate in h where the linear one is second-order, for the one
            # evaluation f(t1, y1) that the next step would have needed anyway. First-order methods
            # keep the line: Euler's step is exactly linear in time.
            if cubic and f1 is None:
                f1 = problem.f(t1, y1)
                stats.nfe += 1

            def interp(theta, y=y, y1=y1, fa=f0, fb=f1):
                return hermite(y, y1, fa, fb, h, theta) if cubic else torch.lerp(y, y1, theta)

            theta = _root(lambda th, t=t, interp=interp: event.value(t + th * h, interp(th)), abs(h), tol)
            return done(t + theta * h, interp(theta))
        t, y = t1, y1
        if f1 is None and not perturb:
            f1 = problem.f(t, y)
            stats.nfe += 1
        f0 = f1
    if not problem.settings.throw:
        return done(t, y, "no_event")
    raise SolverError(
        "no_event",
        f"event_fn never crossed zero within {budget} fixed steps of size {step} (options['max_num_steps'])",
        t=t,
        step_size=h,
        n_steps=budget,
    )


def _search_failed(reason: str, budget: int, prefix: str = "", **where) -> SolverError:
    """The error of an event search that stopped before its event (``reason``: the loop's); ``where``:
    the ``t``, ``step_size`` and ``n_steps`` at which it stopped."""
    # A step size that grew to inf (the solution settled) is an endless search too, not bad dynamics.
    if reason == "max_num_steps" or (reason == "nonfinite" and where["step_size"] in (math.inf, -math.inf)):
        return SolverError(
            "no_event",
            f"{prefix}event_fn never crossed zero within the event search's step budget of {budget} steps "
            "(options['max_num_steps'])",
            **where,
        )
    return SolverError(reason, f"{prefix}no event before the solve stopped ({reason})", **where)


def _time_tol(atol) -> float:
    if isinstance(atol, torch.Tensor):
        return float(atol.min())
    return float(atol)


@torch.no_grad()
def _root(c: Callable[[float], torch.Tensor], span: float, tol: float) -> float:
    """The first crossing θ ∈ (0, 1] of ``c`` (``c(0) > 0 ≥ c(1)``) by the Illinois method, to a bracket of
    ``tol / span`` in θ (``tol`` in time units). One synchronisation per iteration.

    A value of exactly zero counts as crossed (as a sign different from the start's), so an event
    function that is held at zero over an interval (``torch.zeros_like(t)`` past a terminal time) still
    has its first crossing located: the secant then falls on the bracket's end, and the step bisects.
    """
    lo, hi = 0.0, 1.0
    c_lo, c_hi = float(c(lo)), float(c(hi))
    width = tol / span if span > 0 else 0.0
    side = 0
    for _ in range(_MAX_ROOT_ITERS):
        if hi - lo <= width:
            break
        denom = c_lo - c_hi
        theta = (lo * -c_hi + hi * c_lo) / denom if denom != 0 else 0.5 * (lo + hi)
        if not (lo < theta < hi):
            theta = 0.5 * (lo + hi)
        c_mid = float(c(theta))
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
    # Report the side that has crossed, so that the event has fired at the returned time.
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
            arguments). ``options["max_num_steps"]`` bounds the search (default 20,000 steps, or
            20,000 fixed-grid steps): an event that never fires raises a :class:`SolverError` with reason
            ``"no_event"``. ``options={"per_sample": True}`` (adaptive methods): ``y0`` is a batch
            ``(B, *shape)``, every sample gets its own step sizes (as
            :func:`neuralode.odeint_per_sample`: ``func`` and ``event_fn`` receive ``t`` of shape ``(B,)``)
            and stops at its own event; ``event_fn`` returns ``(B,)`` or ``(B, k)``; ``t0`` may be
            ``(B,)``.

    Returns:
        ``(event_t, solution)``: the event time (0-d, ``t0``'s dtype) and the states at ``t0`` and at the
        event, ``(2, *y0.shape)`` (a tuple of those for a tuple state). Both carry gradients with respect
        to ``y0``, ``t0`` and the parameters of ``func`` and ``event_fn`` (implicit function theorem).
        With ``per_sample``: event times ``(B,)`` and states ``(2, B, *shape)`` (row ``b`` at its own
        event), differentiable with respect to ``y0`` and the parameters (not ``t0``).

    Raises:
        TypeError, ValueError: bad arguments; SolverError: the solve failed before the event.
    """
    if not isinstance(t0, torch.Tensor):
        raise TypeError(f"t0 must be a floating 0-d tensor, got {type(t0).__name__}")
    options = kwargs.get("options")
    if isinstance(options, dict) and options.get("per_sample"):
        return _odeint_event_per_sample(func, y0, t0, event_fn, reverse_time, odeint_interface, **kwargs)
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


def _odeint_event_per_sample(func, y0, t0, event_fn, reverse_time, interface, **kwargs):
    if interface is not None and not getattr(interface, "solves_to_event", False):
        raise ValueError(
            "options['per_sample']=True with events differentiates by backpropagation through the "
            "per-sample steps: odeint_interface must be neuralode.odeint (per-sample events are not "
            "supported with odeint_adjoint or odeint_checkpoint)"
        )
    unknown = sorted(set(kwargs) - {"rtol", "atol", "method", "options"})
    if unknown:
        raise TypeError(f"odeint_event got unexpected keyword argument(s) {unknown} with per_sample=True")
    if not t0.is_floating_point() or t0.dim() > 1:
        raise ValueError(
            f"with options['per_sample']=True, t0 must be a floating 0-d tensor or one start time per "
            f"sample (batch,), got shape {tuple(t0.shape)} dtype {t0.dtype}"
        )
    if t0.requires_grad:
        raise ValueError("gradients with respect to t0 are not supported with options['per_sample']=True")
    options = dict(kwargs.pop("options"))
    del options["per_sample"]
    t = torch.stack([t0, t0 + (-1.0 if reverse_time else 1.0)], dim=-1)
    return per_sample_event(func, y0, t, event_fn, options=options, **kwargs)


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
        # An event function that is constant here (e.g. ``torch.zeros_like(t)`` past a terminal time)
        # does not depend on (t, y): both partial derivatives are zero.
        if c_val.requires_grad:
            dc_dt, dc_dy = torch.autograd.grad(c_val, (t_var, y_var), allow_unused=True)
        else:
            dc_dt = dc_dy = None
    with torch.no_grad():
        f_e = f_flat(t_e, y_e.detach())
        dc_dt = torch.zeros((), dtype=dtype, device=device) if dc_dt is None else dc_dt
        dc_dy = torch.zeros_like(y_e) if dc_dy is None else dc_dy
        total = dc_dt + (dc_dy * f_e).sum()  # dc/dt along the solution at the event
        total = total + 1e-12 * torch.where(total >= 0, 1.0, -1.0)  # a tangential crossing has no derivative

    c_live = c(t_e, y_e)  # depends on y0, t0 and parameters through y_e, and on event_fn's parameters
    if not c_live.requires_grad and y_e.requires_grad:
        # A constant event: the event time does not move with the inputs (zero gradient), but it stays
        # in the graph like the state, so a loss built from event times can still be differentiated.
        c_live = c_live + 0.0 * y_e.sum()
    shift = -(c_live - c_live.detach()) / total  # zero in value; the gradient of the event time
    event_out = (event_t.detach() + shift.to(event_t.dtype)).reshape(event_t.shape)
    y_out = y_e + f_e * shift
    if not is_tuple:
        return event_out, torch.cat([solution[:-1], y_out[None]], dim=0)
    sizes = [math.prod(s) for s in shapes]
    parts = [p.view(s) for p, s in zip(y_out.split(sizes), shapes)]
    return event_out, tuple(torch.cat([s[:-1], p[None]], dim=0) for s, p in zip(solution, parts))


# -- per-sample events -------------------------------------------------------------------------------------


class RowEvent:
    """Each row's terminal event for the per-sample loop (``_batched._loop``'s ``event`` hook).

    ``g(t, y)`` takes the row times ``(B,)`` and the flat states ``(B, n)`` and returns ``(B, k)``; a row's
    event is the first sign change of any of its ``k`` entries (combined as the joint event: times the
    sign at ``t0``, then the minimum). ``check`` is called after every step: a row whose accepted step
    ended past its event has fired, and that step (start, size, state, stages) is kept for the root
    search, by masks on the device (no extra synchronisation).
    """

    def __init__(self, g: Callable, t0: torch.Tensor, y0: torch.Tensor):
        self.g = g
        with torch.no_grad():
            self.sign0 = torch.sign(g(t0, y0))
        self.at_start = self.value(t0, y0) == 0  # rows already on their event (torchdiffeq: event at t0)
        self.step: list[torch.Tensor] | None = None

    def value(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``min_i sign_i(t0) · g_i(t, y)`` per row, ``(B,)``: positive until the row's event."""
        return torch.amin(self.g(t, y) * self.sign0, dim=1)

    def check(self, t, h, t_new, y, y1, k_ext: list[torch.Tensor], accept: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fired = accept & ((self.value(t_new, y1) <= 0) | self.at_start)
        new = [t, h, y, *k_ext]
        if self.step is None:
            self.step = new
        else:
            col = fired.unsqueeze(1)
            self.step = [torch.where(fired if a.dim() == 1 else col, a, b) for a, b in zip(new, self.step)]
        return fired


def _row_event_fn(event_fn: Callable, shape, dtype) -> Callable:
    B = shape[0]

    def g(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = event_fn(t.to(dtype), y.view(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"event_fn(t, y) must return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != B:
            raise ValueError(
                f"with options['per_sample']=True, event_fn(t, y) must return one value (or a row of "
                f"values) per sample, shape ({B},) or ({B}, k); got {tuple(out.shape)}"
            )
        return out.reshape(B, -1)

    return g


@torch.no_grad()
def _root_rows(c: Callable[[torch.Tensor], torch.Tensor], c_lo, c_hi, width: torch.Tensor) -> torch.Tensor:
    """:func:`_root` for every row at once: the first crossing θ ∈ (0, 1] of each row's ``c`` (``(B,)``
    in, ``(B,)`` out), to a bracket of ``width`` per row. One synchronisation per iteration."""
    lo = torch.zeros_like(c_lo)
    hi = torch.ones_like(c_lo)
    side = torch.zeros_like(c_lo)
    for _ in range(_MAX_ROOT_ITERS):
        active = (hi - lo) > width
        if not bool(active.any()):
            break
        denom = c_lo - c_hi
        theta = (lo * -c_hi + hi * c_lo) / torch.where(denom != 0, denom, torch.ones_like(denom))
        theta = torch.where((denom != 0) & (lo < theta) & (theta < hi), theta, 0.5 * (lo + hi))
        c_mid = c(theta)
        up = active & (c_mid > 0)  # the root lies above theta
        down = active & ~(c_mid > 0)
        c_hi = torch.where(up & (side == 1), 0.5 * c_hi, c_hi)  # Illinois, as in _root
        c_lo = torch.where(down & (side == -1), 0.5 * c_lo, c_lo)
        lo, c_lo = torch.where(up, theta, lo), torch.where(up, c_mid, c_lo)
        hi, c_hi = torch.where(down, theta, hi), torch.where(down, c_mid, c_hi)
        side = torch.where(up, 1.0, torch.where(down, -1.0, side))
    return hi


def per_sample_event(
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    event_fn: Callable,
    *,
    rtol=1e-7,
    atol=1e-9,
    method: str | None = None,
    options: dict | None = None,
    differentiable: bool = True,
    stats=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terminal events: every row of ``y0`` (``(B, *shape)``) is solved with its own step
    sizes (as :func:`neuralode.odeint_per_sample`) until its own event; ``t`` is ``(2,)`` or ``(B, 2)``
    (start, and a time giving the direction). Returns ``(event_t, solution)``: ``(B,)`` times (``t``'s
    dtype) and ``(2, B, *shape)`` states at the start and at each row's event. With ``differentiable``
    the times carry implicit-function-theorem gradients and the states move with them, as
    :func:`odeint_event`; otherwise the times are detached (``odeint``'s ``event_fn``)."""
    from neuralode._integrate.per_sample import STATUS, _integrate
    from neuralode._problem import make_rows_problem

    if not callable(event_fn):
        raise TypeError(f"event_fn must be callable as event_fn(t, y), got {type(event_fn).__name__}")
    if not isinstance(t, torch.Tensor) or t.shape[-1:] != (2,) or t.dim() > 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"event_fn needs t with exactly 2 entries per sample ((2,) or (batch, 2): start, and a time "
            f"giving the direction), got {got}"
        )
    options = dict(options or {})
    options.setdefault("max_num_steps", EVENT_STEP_BUDGET)
    problem = make_rows_problem(func, y0, t, rtol, atol, method, options)
    if not problem.settings.throw:
        raise ValueError(
            "options['throw']=False is not supported with per-sample events (a failed sample raises); "
            "use the joint mode's event_fn, or odeint_per_sample without event_fn"
        )
    t2, tab, f, shape = problem.t, problem.tab, problem.f, problem.shape
    y_flat = problem.y0
    B = y_flat.shape[0]
    direction = torch.sign(t2[:, 1] - t2[:, 0])
    endless = dataclasses.replace(problem, t=torch.stack([t2[:, 0], direction * math.inf], dim=1))
    solve_stats = SolveStats(n_solves=1, nfe=1)  # func(t0, y0) in make_rows_problem
    event = RowEvent(_row_event_fn(event_fn, shape, problem.y0.dtype), t2[:, 0], problem.y0.detach())
    _, info = _integrate(endless, solve_stats, True, event)
    failed = (info.status != 0).nonzero().flatten().tolist()
    if failed:
        b = failed[0]
        raise _search_failed(
            STATUS[int(info.status[b])],
            problem.settings.max_num_steps,
            f"{len(failed)} of {B} samples failed (first: sample {b}): ",
            t=float(info.t[b]),
            step_size=float("nan"),
            n_steps=int(info.n_steps[b]),
        )
    t_s, h_s, y_s, *k_ext = event.step
    # The dense output's extra stages (if the tableau has any) are evaluated once, with gradients on.
    dense_rows(f, tab, t_s, h_s, y_s, k_ext, t_s.unsqueeze(1), solve_stats)

    def state_at(theta: torch.Tensor) -> torch.Tensor:
        return dense_rows(f, tab, t_s, h_s, y_s, k_ext, (t_s + theta * h_s).unsqueeze(1), solve_stats)[:, 0]

    with torch.no_grad():
        c_lo = event.value(t_s, y_s.detach())
        c_hi = event.value(t_s + h_s, state_at(torch.ones_like(t_s)))
        width = _time_tol(atol) / h_s.abs().clamp(min=torch.finfo(h_s.dtype).tiny)
        width = torch.where(event.at_start, torch.ones_like(width), width)
        theta = _root_rows(lambda th: event.value(t_s + th * h_s, state_at(th)), c_lo, c_hi, width)
    theta = torch.where(event.at_start, torch.zeros_like(theta), theta)
    t_e = t_s + theta * h_s
    y_e = torch.where(event.at_start.unsqueeze(1), y_flat, state_at(theta))
    _report_forward(solve_stats)
    if stats is not None:
        stats.add(solve_stats)
    if differentiable:
        t_out, y_out = _reroute_rows(f, event, t_e, y_e)
    else:
        t_out, y_out = t_e, y_e
    return t_out.to(t.dtype), torch.stack([y0, y_out.view(shape)])


def _reroute_rows(f: Callable, event: RowEvent, t_e: torch.Tensor, y_e: torch.Tensor):
    """:func:`_reroute` per row: each row's event time gets its implicit-function-theorem gradient,
    ``dT_b = −dc_b / (∂c_b/∂t + ∂c_b/∂y · f_b)``, and its state moves by ``f_b · dT_b``."""
    t_e = t_e.detach()
    with torch.enable_grad():
        t_var = t_e.clone().requires_grad_(True)
        y_var = y_e.detach().requires_grad_(True)
        c_val = event.value(t_var, y_var)
        if c_val.requires_grad:
            dc_dt, dc_dy = torch.autograd.grad(c_val.sum(), (t_var, y_var), allow_unused=True)
        else:
            dc_dt = dc_dy = None
    with torch.no_grad():
        f_e = f(t_e, y_e.detach())
        dc_dt = torch.zeros_like(t_e) if dc_dt is None else dc_dt
        dc_dy = torch.zeros_like(y_e) if dc_dy is None else dc_dy
        total = dc_dt.to(y_e.dtype) + (dc_dy * f_e).sum(dim=1)
        total = total + 1e-12 * torch.where(total >= 0, 1.0, -1.0)
    c_live = event.value(t_e, y_e)
    if not c_live.requires_grad and y_e.requires_grad:
        c_live = c_live + 0.0 * y_e.sum(dim=1)
    shift = -(c_live - c_live.detach()) / total
    return t_e + shift.to(t_e.dtype), y_e + f_e * shift.unsqueeze(1)
