"""``odeint``: torchdiffeq's front door over the generic Runge-Kutta engine.

This module turns ``(func, y0, t, rtol, atol, method, options)`` into a validated :class:`Problem`
(flattened state, float times, norm, controller) and runs the engine. Validation happens once, before
the loop; the loop itself never re-checks its inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from neuralode._batched import odeint_per_sample
from neuralode._callbacks import ADAPTIVE_CALLBACKS, FIXED_CALLBACKS, chain_callbacks, collect_callbacks
from neuralode._control import STEP_SIZE_OPTIONS, Controller, initial_step, make_controller, make_norm
from neuralode._methods import ADAPTIVE_METHODS, FIXED_METHODS, TABLEAUS
from neuralode._registry import EXTRA_METHODS
from neuralode._solve import compiled_stepper, integrate_adaptive, integrate_fixed
from neuralode._stats import SolveStats, _report_forward

__all__ = ["SOLVERS", "odeint"]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]

ADAPTIVE_OPTIONS = STEP_SIZE_OPTIONS | {"norm", "dtype", "step_t", "jump_t", "grid_points", "eps", "compile"}
FIXED_OPTIONS = frozenset({"step_size", "grid_constructor", "interp", "perturb", "dtype", "compile"})

#: Every method name ``odeint`` accepts.
SOLVERS: tuple[str, ...] = ADAPTIVE_METHODS + FIXED_METHODS + tuple(EXTRA_METHODS)


@dataclasses.dataclass
class Problem:
    """A validated solve, ready for the engine (internal)."""

    f: Callable  # f(t: float, y: Tensor, perturb: int = 0) -> Tensor, flat state for tuples
    y0: torch.Tensor
    t: list[float]
    method: str
    options: dict[str, Any]
    rtol: Any
    atol: Any
    shapes: list[torch.Size] | None  # tuple state: shapes of its tensors
    f0: torch.Tensor
    callbacks: Any = None  # _callbacks.Callbacks found on func, or None
    func: Callable | None = None  # the user's func(t: Tensor, y), for the compiled step

    def unflatten(self, ys: torch.Tensor) -> TensorOrTuple:
        """(T, *flat) → (T, *y0.shape) or a tuple of (T, *shape_i)."""
        if self.shapes is None:
            return ys
        sizes = [math.prod(s) for s in self.shapes]
        return tuple(p.reshape(ys.shape[0], *s) for p, s in zip(ys.split(sizes, dim=1), self.shapes))


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
            ``interp`` (``"linear"`` or ``"cubic"``), ``perturb``. ``per_sample=True`` (adaptive
            methods): every sample of the first dimension gets its own step size; see
            :func:`neuralode.odeint_per_sample` (``func`` then receives ``t`` of shape ``(batch,)``).
            Adaptive also: ``step_t``/``jump_t`` (times to step exactly onto; at a ``jump_t`` ``func`` is
            re-evaluated past the discontinuity). Explicit Runge-Kutta methods, adaptive and fixed-grid
            (``interp="linear"``, no ``perturb``): ``compile`` (``True`` or a dict of ``torch.compile``
            arguments, e.g. ``{"backend": "aot_eager"}``): each step (its ``func`` calls, stage
            combinations and error ratio) runs as one compiled graph, cached per ``func``; ``func`` must
            be traceable by ``torch.compile``, and the first solve pays the compilation. Other methods
            (``explicit_adams``, ``implicit_adams``, ``scipy_solver``, the implicit Runge-Kutta methods)
            list theirs in ``docs/compatibility.md``.
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
        SolverError: non-finite values, step-size underflow, or more than ``max_num_steps`` steps.
    """
    if event_fn is not None and isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() != 2:
        raise ValueError(
            f"event_fn needs t with exactly 2 entries (start, and a time giving the direction), got len(t)={t.numel()}"
        )
    if options is not None and "per_sample" in options:
        options = dict(options)
        if options.pop("per_sample"):
            if event_fn is not None:
                raise ValueError("event_fn is not supported with options['per_sample']=True")
            return odeint_per_sample(
                func, y0, t, rtol=rtol, atol=atol, method=method, options=options, stats=stats
            )
    problem = make_problem(func, y0, t, rtol, atol, method, options)
    solve_stats = SolveStats(n_solves=1, nfe=1)  # the evaluation of func(t0, y0) in make_problem
    time_grad = t.requires_grad
    y0_run = f0_run = None
    if time_grad:
        # Shifting t0 by δ moves the whole solution like shifting y0 by −δ·f(t0, y0): exact first order.
        y0_run = problem.y0 - _delta(t[0], problem.y0) * problem.f0.detach()
        # The first stage must see the shifted state too, or its Jacobian term is lost from dy/dt0.
        f0_run = problem.f(problem.t[0], y0_run)
        solve_stats.nfe += 1
    if event_fn is not None:
        from neuralode._event import solve_to_event

        event_t, ys = solve_to_event(problem, event_fn, solve_stats, y0=y0_run, f0=f0_run, t_like=t)
        if time_grad:  # the state at t0 itself does not move with t0
            ys = torch.cat([ys[:1] + _delta(t[0], ys) * problem.f0.detach(), ys[1:]])
        if stats is not None:
            stats.add(solve_stats)
        _report_forward(solve_stats)
        return event_t, problem.unflatten(ys)
    ys = torch.stack(run(problem, solve_stats, y0=y0_run, f0=f0_run))
    if time_grad:
        ys = ys + _time_shift(problem, t, ys, solve_stats)
    if stats is not None:
        stats.add(solve_stats)
    _report_forward(solve_stats)
    return problem.unflatten(ys)


def run(
    problem: Problem,
    stats: SolveStats,
    trace: list | None = None,
    y0: torch.Tensor | None = None,
    f0: torch.Tensor | None = None,
    callbacks=None,
    event=None,
    jump=None,
    on_accept=None,
) -> list[torch.Tensor]:
    """Run the engine on a validated problem; returns the list of flat states at ``problem.t``.

    ``trace`` and ``callbacks`` go to the loop (see ``integrate_adaptive``), after the user's callbacks
    found on ``func`` (``problem.callbacks``); ``event`` (adaptive tableaus only) is the terminal-event
    hook of ``integrate_adaptive``; so is ``jump``, and ``on_accept`` (the adjoint's hooks) is that of
    ``integrate_adaptive`` or ``integrate_fixed`` (explicit RK tableaus only)."""
    tab = TABLEAUS.get(problem.method)
    callbacks = chain_callbacks(problem.callbacks, callbacks)
    opts = problem.options
    y0 = problem.y0 if y0 is None else y0
    f0 = problem.f0 if f0 is None else f0
    if len(problem.t) == 1:
        return [y0]
    if (jump is not None and (tab is None or not tab.adaptive)) or (on_accept is not None and tab is None):
        raise ValueError(f"method={problem.method!r} has no jump/on_accept hooks")
    if on_accept is not None and opts.get("compile"):
        raise ValueError("on_accept needs the eager step (options['compile'] is set)")
    hooks = {"jump": jump, "on_accept": on_accept}
    if tab is None:
        spec = EXTRA_METHODS[problem.method]
        if trace is not None:
            raise ValueError(
                f"method={problem.method!r} cannot be replayed from a step trace; use gradient='direct' or 'adjoint'"
            )
        if spec.run is not None:
            return spec.run(problem, stats, y0)
        return integrate_fixed(
            problem.f,
            None,
            y0,
            f0,
            problem.t,
            _grid(problem),
            interp=opts.get("interp", "linear"),
            perturb=bool(opts.get("perturb", False)),
            stats=stats,
            callbacks=callbacks,
            stepper=spec.make_stepper(problem),
        )
    if not opts.get("compile"):
        return _run_tableau(problem, tab, stats, trace, y0, f0, callbacks, event, None, **hooks)
    compiled, release = _compiled(problem, tab, y0)
    try:
        return _run_tableau(problem, tab, stats, trace, y0, f0, callbacks, event, compiled, **hooks)
    finally:
        release()


def _run_tableau(
    problem: Problem, tab, stats, trace, y0, f0, callbacks, event, compiled, jump=None, on_accept=None
) -> list[torch.Tensor]:
    """The explicit Runge-Kutta part of :func:`run`; ``compiled`` is the compiled step or None."""
    opts = problem.options
    if tab.adaptive:
        norm = make_norm(
            opts.get("norm"),
            None if problem.shapes is None else [math.prod(s) for s in problem.shapes],
            problem.shapes,
        )
        controller = _controller(tab, opts)
        direction = 1.0 if problem.t[-1] > problem.t[0] else -1.0
        h0 = opts.get("first_step")
        if h0 is None:
            h0 = initial_step(
                problem.f, problem.t[0], y0, f0, tab.order, problem.rtol, problem.atol, norm, direction
            )
            stats.nfe += 1
        return integrate_adaptive(
            problem.f,
            tab,
            y0,
            f0,
            problem.t,
            rtol=problem.rtol,
            atol=problem.atol,
            norm=norm,
            controller=controller,
            h0=float(h0),
            min_step=float(opts.get("min_step", 0.0)),
            max_step=float(opts.get("max_step", math.inf)),
            max_num_steps=int(opts.get("max_num_steps", 1_000_000)),
            stats=stats,
            trace=trace,
            callbacks=callbacks,
            stops=_stops(problem),
            event=event,
            compiled=compiled,
            jump=jump,
            on_accept=on_accept,
        )
    return integrate_fixed(
        problem.f,
        tab,
        y0,
        f0,
        problem.t,
        _grid(problem),
        interp=opts.get("interp", "linear"),
        perturb=bool(opts.get("perturb", False)),
        stats=stats,
        trace=trace,
        callbacks=callbacks,
        stepper=None if compiled is None else compiled_stepper(tab, compiled),
        on_accept=on_accept,
    )


def _compiled(problem: Problem, tab, y0: torch.Tensor):
    """``(step, release)``: ``step(t, h, y, f0) -> (y1, stages, error ratio)`` through the compiled step
    (options['compile']), and what to call once the solve is over."""
    from neuralode._compiled_step import compiled_step

    opts, rtol, atol = problem.options, problem.rtol, problem.atol
    step, release = compiled_step(
        problem.func, tab, problem.shapes, opts.get("norm"), rtol, atol, opts["compile"]
    )
    device, f64 = y0.device, torch.float64

    if device.type == "cpu":

        def run_step(t: float, h: float, y: torch.Tensor, f0: torch.Tensor):
            return step(torch.tensor([t, h], dtype=f64), y, f0, rtol, atol)

    else:  # two fill kernels and a stack: a host-to-device copy of [t, h] would synchronise

        def run_step(t: float, h: float, y: torch.Tensor, f0: torch.Tensor):
            th = torch.stack(
                (
                    torch.scalar_tensor(t, dtype=f64, device=device),
                    torch.scalar_tensor(h, dtype=f64, device=device),
                )
            )
            return step(th, y, f0, rtol, atol)

    return run_step, release


def method_options(method: str) -> tuple[frozenset[str], bool]:
    """``(valid option names, adaptive?)`` of any method in :data:`SOLVERS` (``ValueError`` otherwise)."""
    if method in TABLEAUS:
        adaptive = TABLEAUS[method].adaptive
        return (ADAPTIVE_OPTIONS if adaptive else FIXED_OPTIONS), adaptive
    if method in EXTRA_METHODS:
        return EXTRA_METHODS[method].options, False
    raise ValueError(f"method={method!r} is not a known method; valid methods: {', '.join(SOLVERS)}")


def method_callbacks(method: str) -> frozenset[str]:
    """The callback names ``method`` calls (torchdiffeq's sets: all three for adaptive methods, only
    ``callback_step`` on fixed grids, none for ``scipy_solver``)."""
    if method in EXTRA_METHODS:
        return EXTRA_METHODS[method].callbacks
    return ADAPTIVE_CALLBACKS if TABLEAUS[method].adaptive else FIXED_CALLBACKS


def _controller(tab, opts) -> Controller:
    return make_controller(tab.order, opts)


def _grid(problem: Problem) -> list[float]:
    opts, t = problem.options, problem.t
    if "grid_constructor" in opts:
        tt = torch.tensor(t, dtype=torch.float64, device=problem.y0.device)
        grid = opts["grid_constructor"](problem.f, problem.y0, tt)
        grid = [float(x) for x in torch.as_tensor(grid).tolist()]
        if len(grid) < 2 or grid[0] != t[0] or grid[-1] != t[-1]:
            raise ValueError(
                f"options['grid_constructor'] returned a grid from {grid[0] if grid else None} to "
                f"{grid[-1] if grid else None}; it must start at t[0]={t[0]} and end at t[-1]={t[-1]}"
            )
        direction = 1.0 if t[-1] > t[0] else -1.0
        if any(direction * (b - a) <= 0 for a, b in itertools.pairwise(grid)):
            raise ValueError(
                "options['grid_constructor'] must return a strictly monotonic grid in t's direction"
            )
        return grid
    step = opts.get("step_size")
    if step is None:
        return list(t)
    direction = 1.0 if t[-1] > t[0] else -1.0
    span = abs(t[-1] - t[0])
    n = math.ceil(span / step - 1e-12)
    grid = [t[0] + direction * step * i for i in range(n)] + [t[-1]]
    return grid


# -- validation --------------------------------------------------------------------------------------


def make_problem(func, y0, t, rtol, atol, method, options) -> Problem:
    """Validate everything ``odeint`` receives and normalise it (one call of ``func`` to check it)."""
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")
    method = "dopri5" if method is None else method
    if not isinstance(method, str) or (method not in TABLEAUS and method not in EXTRA_METHODS):
        raise ValueError(f"method={method!r} is not a known method; valid methods: {', '.join(SOLVERS)}")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    options = {} if options is None else dict(options)
    if method in EXTRA_METHODS:
        valid = EXTRA_METHODS[method].options
        supported_callbacks = EXTRA_METHODS[method].callbacks
    elif TABLEAUS[method].adaptive:
        valid, supported_callbacks = ADAPTIVE_OPTIONS, ADAPTIVE_CALLBACKS
    else:
        valid, supported_callbacks = FIXED_OPTIONS, FIXED_CALLBACKS
    if "compile" in options and "compile" not in valid:
        raise ValueError(
            f"options['compile'] applies to the explicit Runge-Kutta methods, not {method!r}; "
            f"valid methods: {', '.join(TABLEAUS)}"
        )
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method!r}; valid options: {', '.join(sorted(valid))}"
        )
    if "compile" in options:
        from neuralode._compiled_step import check_compile_option

        options["compile"] = check_compile_option(options["compile"])
        if options["compile"] and not TABLEAUS[method].adaptive:
            if options.get("interp", "linear") != "linear" or options.get("perturb"):
                raise ValueError(
                    "options['compile'] on a fixed grid needs interp='linear' and no perturb (the compiled "
                    "step evaluates its first stage inside the graph)"
                )
    y0, shapes = _check_y0(y0)
    t_list = _check_t(t, y0)
    rtol = _check_tol("rtol", rtol, y0, shapes)
    atol = _check_tol("atol", atol, y0, shapes)
    _check_step_options(options)
    tdtype = y0.dtype
    device = y0.device

    if shapes is None:

        def f(tt: float, y: torch.Tensor, perturb: int = 0) -> torch.Tensor:
            return func(_time(tt, tdtype, device, perturb), y)
    else:
        sizes = [math.prod(s) for s in shapes]

        def f(tt: float, y: torch.Tensor, perturb: int = 0) -> torch.Tensor:
            parts = tuple(p.view(s) for p, s in zip(y.split(sizes), shapes))
            out = func(_time(tt, tdtype, device, perturb), parts)
            return torch.cat([o.reshape(-1) for o in out])

    f0 = _check_func_output(func, f, t_list[0], y0, shapes, tdtype, device)
    callbacks = collect_callbacks(func, method, supported_callbacks, shapes)
    return Problem(
        f=f,
        y0=y0,
        t=t_list,
        method=method,
        options=options,
        rtol=rtol,
        atol=atol,
        shapes=shapes,
        f0=f0,
        callbacks=callbacks,
        func=func,
    )


def _time(t: float, dtype: torch.dtype, device: torch.device, perturb: int = 0) -> torch.Tensor:
    """The time handed to ``func``: a 0-d tensor in the state's dtype (as torchdiffeq). ``perturb=±1``
    moves it one ulp (in that dtype) up or down: the one-sided limit at a grid point."""
    # scalar_tensor is about half the cost of torch.tensor(t) (no Python-sequence parsing) and on CUDA it
    # is a fill kernel, no synchronisation.
    tt = torch.scalar_tensor(t, dtype=dtype, device=device)
    if perturb:
        tt = torch.nextafter(tt, tt + perturb)
    return tt


def _check_y0(y0) -> tuple[torch.Tensor, list[torch.Size] | None]:
    if isinstance(y0, torch.Tensor):
        if not y0.is_floating_point():
            raise TypeError(
                f"y0 must be a floating-point tensor, got dtype {y0.dtype}; convert it with y0.float()"
            )
        if not _all_finite(y0):
            raise ValueError("y0 contains NaN or inf values")
        return y0, None
    if isinstance(y0, (tuple, list)) and len(y0) > 0 and all(isinstance(x, torch.Tensor) for x in y0):
        dtypes = {x.dtype for x in y0}
        devices = {x.device for x in y0}
        if any(not x.is_floating_point() for x in y0):
            raise TypeError(f"every tensor in y0 must be floating point, got dtypes {[x.dtype for x in y0]}")
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(f"the tensors of y0 must share one dtype and device, got {dtypes} on {devices}")
        for i, x in enumerate(y0):
            if not _all_finite(x):
                raise ValueError(f"y0[{i}] contains NaN or inf values")
        return torch.cat([x.reshape(-1) for x in y0]), [x.shape for x in y0]
    raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got {type(y0).__name__}")


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``. A finite sum proves it in one kernel (``isfinite(x).all()`` is five); only
    a non-finite sum (NaN/inf inside, or finite values overflowing the sum) needs the exact check."""
    return math.isfinite(float(x.detach().sum())) or bool(torch.isfinite(x).all())


def _check_t(t, y0: torch.Tensor) -> list[float]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("t is empty; it needs at least the start time")
    if not t.is_floating_point():
        raise TypeError(f"t must be floating point, got dtype {t.dtype}")
    if t.device != y0.device:
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}; put both on the same device")
    values = [float(x) for x in t.detach().tolist()]  # one synchronisation per solve
    if not all(math.isfinite(v) for v in values):
        raise ValueError("t contains NaN or inf values")
    if len(values) > 1:
        d = [b - a for a, b in itertools.pairwise(values)]
        if not (all(x > 0 for x in d) or all(x < 0 for x in d)):
            bad = next(i for i, x in enumerate(d) if x == 0 or (x > 0) != (d[0] > 0))
            raise ValueError(
                f"t must be strictly increasing or strictly decreasing; t[{bad}]={values[bad]} and "
                f"t[{bad + 1}]={values[bad + 1]} break that"
            )
    return values


def _check_tol(name: str, tol, y0: torch.Tensor, shapes):
    if isinstance(tol, (tuple, list)):
        if shapes is None or len(tol) != len(shapes):
            raise ValueError(f"{name} given as a sequence needs one entry per tensor of a tuple y0")
        parts = [
            torch.as_tensor(x, dtype=y0.dtype, device=y0.device).expand(s).reshape(-1)
            for x, s in zip(tol, shapes)
        ]
        tol = torch.cat(parts)
    if isinstance(tol, torch.Tensor):
        if tol.requires_grad:
            raise ValueError(f"{name} must not require grad")
        if not bool((tol > 0).all()) or not bool(torch.isfinite(tol).all()):
            raise ValueError(f"{name} must be positive and finite everywhere, got min {float(tol.min())}")
        tol = tol.to(dtype=y0.dtype, device=y0.device)
        try:
            torch.broadcast_shapes(tol.shape, y0.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(tol.shape)} does not broadcast to the state {tuple(y0.shape)}"
            ) from None
        return tol
    if not isinstance(tol, (int, float)) or isinstance(tol, bool):
        raise TypeError(f"{name} must be a positive float or a tensor, got {type(tol).__name__}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"{name} must be positive and finite, got {tol}")
    return float(tol)


def _check_step_options(options: dict) -> None:
    for key in ("first_step", "min_step", "max_step", "step_size"):
        if key in options and options[key] is not None:
            v = options[key]
            v = float(v) if not isinstance(v, torch.Tensor) else float(v.item())
            if not (v >= 0) or (key in ("first_step", "step_size") and v == 0):
                raise ValueError(f"options['{key}'] must be positive, got {v}")
            options[key] = v
    if "max_num_steps" in options:
        v = options["max_num_steps"]
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"options['max_num_steps'] must be a positive int, got {v!r}")
    if options.get("interp", "linear") not in ("linear", "cubic"):
        raise ValueError(f"options['interp']={options['interp']!r}; expected 'linear' or 'cubic'")
    if "norm" in options and not callable(options["norm"]):
        raise TypeError(f"options['norm'] must be callable, got {type(options['norm']).__name__}")
    if options.get("step_size") is not None and options.get("grid_constructor") is not None:
        raise ValueError(
            "options['step_size'] and options['grid_constructor'] are mutually exclusive; give one"
        )
    if "grid_points" in options:
        # torchdiffeq before 0.2: grid_points (+ eps) marked discontinuities; jump_t does that now.
        warnings.warn("options['grid_points'] is deprecated; use options['jump_t']", stacklevel=4)
        if options.get("jump_t") is not None:
            raise ValueError("give options['jump_t'] or the deprecated options['grid_points'], not both")
        options["jump_t"] = options.pop("grid_points")
    if "eps" in options:
        warnings.warn(
            "options['eps'] is ignored: at a jump_t the vector field is evaluated at the one-sided limit",
            stacklevel=4,
        )
        options.pop("eps")
    for key in ("step_t", "jump_t"):
        if options.get(key) is not None:
            options[key] = _check_times(key, options[key])
    both = set(options.get("step_t") or ()) & set(options.get("jump_t") or ())
    if both:
        raise ValueError(
            f"options['step_t'] and options['jump_t'] must not share elements; both contain {sorted(both)}"
        )


def _check_times(key: str, value) -> list[float]:
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"options['{key}'] must be 1-D, got shape {tuple(value.shape)}")
        values = value.detach().reshape(-1).tolist()
    elif isinstance(value, (list, tuple)):
        values = [float(v) for v in value]
    else:
        raise TypeError(
            f"options['{key}'] must be a 1-D tensor or a sequence of times, got {type(value).__name__}"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"options['{key}'] contains NaN or inf")
    return [float(v) for v in values]


def _stops(problem: Problem) -> list[tuple[float, bool]]:
    """``step_t``/``jump_t`` after ``t[0]`` in the direction of integration, as ``(time, is_jump)``."""
    opts, t = problem.options, problem.t
    direction = 1.0 if len(t) < 2 or t[-1] > t[0] else -1.0
    pts = [(v, False) for v in opts.get("step_t") or ()] + [(v, True) for v in opts.get("jump_t") or ()]
    pts = sorted({p for p in pts if direction * (p[0] - t[0]) > 0}, key=lambda p: direction * p[0])
    return pts


def _check_func_output(func, f, t0: float, y0: torch.Tensor, shapes, tdtype, device) -> torch.Tensor:
    if shapes is None:
        out = func(_time(t0, tdtype, device), y0)
        _check_one("func(t0, y0)", out, y0)
        return out
    parts = tuple(p.view(s) for p, s in zip(y0.split([math.prod(s) for s in shapes]), shapes))
    out = func(_time(t0, tdtype, device), parts)
    if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
        raise TypeError(
            f"func(t0, y0) must return a tuple of {len(shapes)} tensors for a tuple y0, got {type(out).__name__}"
        )
    for i, (o, p) in enumerate(zip(out, parts)):
        _check_one(f"func(t0, y0)[{i}]", o, p)
    return torch.cat([o.reshape(-1) for o in out])


def _check_one(what: str, out, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(out).__name__}")
    if out.shape != like.shape:
        raise ValueError(
            f"{what} returned shape {tuple(out.shape)}; expected the state's shape {tuple(like.shape)}"
        )
    if out.dtype != like.dtype:
        raise TypeError(f"{what} returned dtype {out.dtype}; expected the state's dtype {like.dtype}")
    if out.device != like.device:
        raise ValueError(f"{what} returned a tensor on {out.device}; expected {like.device}")


def _delta(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t − t.detach()``: zero in value, identity in gradient."""
    return (t - t.detach()).to(like.dtype)


def _time_shift(problem: Problem, t: torch.Tensor, ys: torch.Tensor, stats: SolveStats) -> torch.Tensor:
    """Zero-valued term whose gradient with respect to ``t_i`` is ``f(t_i, y(t_i))``, so that
    ``dL/dt_i = dL/dy(t_i) · f(t_i, y(t_i))`` (exact for the ODE solution)."""
    with torch.no_grad():
        fs = torch.stack([problem.f(ti, yi) for ti, yi in zip(problem.t, ys)])
    stats.nfe += len(problem.t)
    return _delta(t, ys).view(-1, *([1] * (ys.dim() - 1))) * fs
