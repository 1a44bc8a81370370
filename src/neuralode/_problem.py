"""The problem builder: what every front door receives, validated once and turned into settings.

``odeint``, ``odeint_checkpoint``, ``odeint_adjoint`` and ``odeint_event`` build a :class:`Problem`
with :func:`make_problem`; ``odeint_per_sample`` (and its adjoint) a :class:`RowsProblem` with
:func:`make_rows_problem`; ``FixedGridSolver`` uses the same checks for its arguments and
:func:`fixed_grid` for its grid; ``odeint_adjoint``'s ``adjoint_method``/``adjoint_options`` are checked
by :func:`adjoint_settings`. Here, and only here, the user's arguments are checked (each error names
the argument, what arrived and what is expected) and the options dict is parsed into a
:class:`Settings` (controller, step-size limits, grid, interpolation, norm, ...), so the loops read
typed fields and never look into the dict.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from neuralode._callbacks import ADAPTIVE_CALLBACKS, FIXED_CALLBACKS, collect_callbacks
from neuralode._integrate.compiled_step import check_compile_option
from neuralode._solvers.explicit import ADAPTIVE_METHODS, FIXED_METHODS, TABLEAUS
from neuralode._solvers.registry import EXTRA_METHODS
from neuralode._solvers.stiff import ESDIRK_TABLEAUS
from neuralode._solvers.tableau import ButcherTableau, MethodSpec
from neuralode._step_size import STEP_SIZE_OPTIONS, Controller, Norm, make_controller, make_norm

__all__ = [
    "ADAPTIVE_OPTIONS",
    "FIXED_OPTIONS",
    "MAX_NUM_STEPS",
    "SOLVERS",
    "Problem",
    "RowsProblem",
    "Settings",
    "adjoint_settings",
    "delta",
    "fixed_grid",
    "inherited_options",
    "make_problem",
    "make_rows_problem",
    "method_callbacks",
    "method_options",
    "shifted_start",
]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]

#: Default cap on the steps of one solve (adaptive steps, or fixed-grid intervals).
MAX_NUM_STEPS = 1_000_000

ADAPTIVE_OPTIONS = STEP_SIZE_OPTIONS | {
    "norm",
    "dtype",
    "step_t",
    "jump_t",
    "grid_points",
    "eps",
    "compile",
    "throw",
}
FIXED_OPTIONS = frozenset(
    {"step_size", "grid_constructor", "interp", "perturb", "dtype", "compile", "max_num_steps", "throw"}
)
PER_SAMPLE_OPTIONS = STEP_SIZE_OPTIONS | {"compile", "throw"}

#: Every method name ``odeint`` accepts.
SOLVERS: tuple[str, ...] = ADAPTIVE_METHODS + FIXED_METHODS + tuple(EXTRA_METHODS)


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


# -- settings: the options dict, parsed --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """A method's options as typed fields (what the loops read).

    ``tab`` is the explicit Runge-Kutta tableau (``None`` for the other methods, described by ``spec``);
    ``controller`` is set for adaptive tableaus; ``step_size``/``grid_constructor``/``interp``/
    ``perturb`` are the fixed-grid options; ``compile`` the ``torch.compile`` keyword arguments (or
    ``None``: eager steps); ``throw``: a failed solve raises ``SolverError`` (``True``) or returns what
    it reached, NaN after, with its status in the solve's ``SolveStats`` (``False``).
    """

    tab: ButcherTableau | None
    spec: MethodSpec | None
    controller: Controller | None = None
    user_norm: Callable | None = None
    first_step: float | None = None
    min_step: float = 0.0
    max_step: float = math.inf
    max_num_steps: int = MAX_NUM_STEPS
    step_t: tuple[float, ...] = ()
    jump_t: tuple[float, ...] = ()
    step_size: float | None = None
    grid_constructor: Callable | None = None
    interp: str = "linear"
    perturb: bool = False
    compile: dict | None = None
    throw: bool = True
    method_options: Any = None  # what spec.parse made of the method's own options

    @property
    def adaptive(self) -> bool:
        return self.tab is not None and self.tab.adaptive


#: The Settings of each explicit Runge-Kutta method without options (frozen, so shared by every solve).
_DEFAULT_SETTINGS: dict[str, Settings] = {}


def parse_settings(method: str, options: dict[str, Any]) -> Settings:
    """The :class:`Settings` of ``options`` (already checked by :func:`check_step_options`)."""
    if not options and method in TABLEAUS:  # the common call: parsed once per method
        settings = _DEFAULT_SETTINGS.get(method)
        if settings is None:
            settings = _DEFAULT_SETTINGS[method] = _parse_settings(method, options)
        return settings
    return _parse_settings(method, options)


def _parse_settings(method: str, options: dict[str, Any]) -> Settings:
    tab, spec = TABLEAUS.get(method), EXTRA_METHODS.get(method)
    controller = None
    if tab is not None and tab.adaptive:
        controller = make_controller(tab.order, options)
    elif spec is not None and "controller" in spec.options:  # adaptive methods of their own (stiff)
        controller = make_controller(spec.order, options)
    return Settings(
        tab=tab,
        spec=spec,
        controller=controller,
        user_norm=options.get("norm"),
        first_step=options.get("first_step"),
        min_step=options.get("min_step", 0.0),
        max_step=options.get("max_step", math.inf),
        max_num_steps=options.get("max_num_steps", MAX_NUM_STEPS),
        step_t=tuple(options.get("step_t") or ()),
        jump_t=tuple(options.get("jump_t") or ()),
        step_size=options.get("step_size"),
        grid_constructor=options.get("grid_constructor"),
        interp=options.get("interp", "linear"),
        perturb=bool(options.get("perturb", False)),
        compile=options.get("compile"),
        throw=options.get("throw", True),
        method_options=spec.parse(options) if spec is not None and spec.parse is not None else None,
    )


def inherited_options(fwd_options: dict[str, Any] | None, method: str) -> dict[str, Any]:
    """The adjoint's backward solve's default options: the forward ones that ``method`` takes, without
    ``norm`` (the backward state is another), ``compile`` (the backward evaluation is another function,
    compiled only when ``adjoint_options`` asks for it) and ``throw`` (a failed backward solve has no partial
    gradient)."""
    valid = method_options(method)[0]
    drop = ("norm", "compile", "throw")
    return {k: v for k, v in (fwd_options or {}).items() if k not in drop and k in valid}


def adjoint_settings(
    adjoint_method, adjoint_options, method: str, fwd_options: dict[str, Any] | None
) -> tuple[str, dict[str, Any], Any]:
    """``odeint_adjoint``'s ``adjoint_method`` and ``adjoint_options``, checked, for a forward solve with
    ``method`` (validated) and ``fwd_options``: ``(method, options, norm)`` with the backward solve's
    method, its options (step-size options normalised as :func:`check_step_options` does, ``compile`` as
    :func:`check_compile_option` does; default: the forward ones it takes, see :func:`inherited_options`)
    and the backward norm (``"seminorm"``, a callable, or ``None``)."""
    adjoint_method = method if adjoint_method is None else adjoint_method
    if not isinstance(adjoint_method, str) or adjoint_method not in SOLVERS:
        raise ValueError(
            f"adjoint_method={adjoint_method!r} is not a known method; valid methods: {', '.join(SOLVERS)}"
        )
    valid, adaptive = method_options(adjoint_method)
    if adjoint_options is None:
        options = inherited_options(fwd_options, adjoint_method)
    elif not isinstance(adjoint_options, dict):
        raise TypeError(f"adjoint_options must be a dict, got {type(adjoint_options).__name__}")
    else:
        options = dict(adjoint_options)
        if options.get("compile") and adjoint_method not in TABLEAUS:
            raise ValueError(
                f"adjoint_options['compile'] compiles the backward evaluation of an explicit Runge-Kutta "
                f"adjoint_method, not {adjoint_method!r}; valid methods: {', '.join(TABLEAUS)}"
            )
        valid = valid | {"norm"}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(
                f"unknown adjoint_options {unknown} for adjoint_method {adjoint_method!r}; valid options: "
                f"{', '.join(sorted(valid))}"
            )
    if "compile" in options:
        options["compile"] = check_compile_option(options["compile"], "adjoint_options")
    norm = options.pop("norm", None)
    if norm is not None and not adaptive and adjoint_method not in ESDIRK_TABLEAUS:
        raise ValueError(
            f"adjoint_options['norm'] has no effect with the fixed-step adjoint_method={adjoint_method!r}; "
            "drop it or choose an adaptive adjoint_method"
        )
    if norm is not None and norm != "seminorm" and not callable(norm):
        raise ValueError(f"adjoint_options['norm']={norm!r}; expected 'seminorm' or a callable")
    check_step_options(options)
    return adjoint_method, options, norm


# -- the joint problem -------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """A validated solve, ready for the engine (internal).

    ``f(t: float, y, perturb=0)`` is the vector field on the flat state (tuple states are concatenated);
    ``f0 = f(t[0], y0)``, evaluated at the one-sided limit ``t[0]`` + 1 ulp (in the direction of
    integration) when ``f0_side`` is ±1 (fixed grids with ``perturb``). ``settings`` and ``norm`` are
    derived from ``method``/``options``/``shapes`` when not given.
    """

    f: Callable
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
    f0_side: int = 0
    settings: Settings | None = None
    norm: Norm | None = None

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = parse_settings(self.method, self.options)
        if self.norm is None:
            self.norm = make_norm(self.settings.user_norm, self.sizes, self.shapes)

    @property
    def sizes(self) -> list[int] | None:
        return None if self.shapes is None else [math.prod(s) for s in self.shapes]

    @property
    def direction(self) -> float:
        """+1 forward in time, −1 backward."""
        t = self.t
        return 1.0 if len(t) < 2 or t[-1] > t[0] else -1.0

    def unflatten(self, ys: torch.Tensor) -> TensorOrTuple:
        """(T, *flat) → (T, *y0.shape) or a tuple of (T, *shape_i)."""
        if self.shapes is None:
            return ys
        return tuple(p.reshape(ys.shape[0], *s) for p, s in zip(ys.split(self.sizes, dim=1), self.shapes))

    def stops(self) -> list[tuple[float, bool]]:
        """``step_t``/``jump_t`` after ``t[0]`` in the direction of integration, as ``(time, is_jump)``."""
        s, t0, d = self.settings, self.t[0], self.direction
        if not s.step_t and not s.jump_t:
            return []
        pts = [(v, False) for v in s.step_t] + [(v, True) for v in s.jump_t]
        return sorted({p for p in pts if d * (p[0] - t0) > 0}, key=lambda p: d * p[0])

    def grid(self) -> list[float]:
        """The fixed grid: ``options['grid_constructor']``'s, or ``step_size`` spacing, or ``t`` itself."""
        s, t = self.settings, self.t
        if s.grid_constructor is None:
            return fixed_grid(t, s.step_size, s.max_num_steps)
        tt = torch.tensor(t, dtype=torch.float64, device=self.y0.device)
        grid = s.grid_constructor(self.f, self.y0, tt)
        grid = [float(x) for x in torch.as_tensor(grid).tolist()]
        if len(grid) < 2 or grid[0] != t[0] or grid[-1] != t[-1]:
            raise ValueError(
                f"options['grid_constructor'] returned a grid from {grid[0] if grid else None} to "
                f"{grid[-1] if grid else None}; it must start at t[0]={t[0]} and end at t[-1]={t[-1]}"
            )
        d = self.direction
        if any(d * (b - a) <= 0 for a, b in itertools.pairwise(grid)):
            raise ValueError(
                "options['grid_constructor'] must return a strictly monotonic grid in t's direction"
            )
        return grid


def delta(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t − t.detach()``: zero in value, identity in gradient (in ``like``'s dtype)."""
    return (t - t.detach()).to(like.dtype)


def shifted_start(
    problem: Problem, t: torch.Tensor, stats
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(y0, f0)`` for a solve whose ``t`` requires grad, else ``(None, None)`` (start at ``problem``'s).

    Shifting ``t0`` by δ moves the whole solution like shifting ``y0`` by −δ·f(t0, y0): exact to first
    order. The first stage must see the shifted state too, or its Jacobian term is lost from dy/dt0
    (one evaluation, counted in ``stats``)."""
    if not t.requires_grad:
        return None, None
    y0 = problem.y0 - delta(t[0], problem.y0) * problem.f0.detach()
    f0 = problem.f(problem.t[0], y0, perturb=problem.f0_side)
    stats.nfe += 1
    return y0, f0


def fixed_grid(t: list[float], step_size: float | None, max_num_steps: int = MAX_NUM_STEPS) -> list[float]:
    """The grid of a fixed-step solve: ``t`` itself, or steps of ``step_size`` from ``t[0]`` with the last
    one shortened to end on ``t[-1]``. Refused (``ValueError``) beyond ``max_num_steps`` intervals."""
    if step_size is None:
        return list(t)
    n = _grid_intervals(t, step_size, max_num_steps)
    direction = 1.0 if t[-1] > t[0] else -1.0
    return [t[0] + direction * step_size * i for i in range(n)] + [t[-1]]


def _grid_intervals(t: list[float], step_size: float, max_num_steps: int) -> int:
    n = math.ceil(abs(t[-1] - t[0]) / step_size - 1e-12)
    if n > max_num_steps:
        raise ValueError(
            f"options['step_size']={step_size} makes {n} grid steps from t[0]={t[0]} to t[-1]={t[-1]}, more "
            f"than max_num_steps={max_num_steps}; use a larger step_size (or raise options['max_num_steps'])"
        )
    return n


def make_problem(func, y0, t, rtol, atol, method, options) -> Problem:
    """Validate everything ``odeint`` receives and normalise it. ``func`` is called once, at ``t[0]``
    (its one-sided limit with ``perturb``): that evaluation checks its output and is the solve's first
    stage (``Problem.f0``)."""
    check_func(func)
    method = "dopri5" if method is None else method
    if not isinstance(method, str) or (method not in TABLEAUS and method not in EXTRA_METHODS):
        raise ValueError(f"method={method!r} is not a known method; valid methods: {', '.join(SOLVERS)}")
    options = _check_option_names(method, options)
    y0, shapes = check_y0(y0)
    t_list = check_t(t, y0.device)
    rtol = check_tol("rtol", rtol, y0, shapes)
    atol = check_tol("atol", atol, y0, shapes)
    if options:
        check_step_options(options)
    settings = parse_settings(method, options)
    if settings.step_size is not None and len(t_list) > 1:  # refuse a huge grid before building it
        _grid_intervals(t_list, settings.step_size, settings.max_num_steps)
    f = flat_func(func, shapes, y0.dtype, y0.device)
    direction = 1.0 if len(t_list) < 2 or t_list[-1] > t_list[0] else -1.0
    f0_side = int(direction) if settings.perturb else 0
    f0 = _check_func_output(func, t_list[0], y0, shapes, f0_side)
    valid_callbacks = method_callbacks(method)
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
        callbacks=collect_callbacks(func, method, valid_callbacks, shapes),
        func=func,
        f0_side=f0_side,
        settings=settings,
    )


def _check_option_names(method: str, options) -> dict[str, Any]:
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    options = {} if options is None else dict(options)
    valid = method_options(method)[0]
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
        options["compile"] = check_compile_option(options["compile"])
        if options["compile"] and not TABLEAUS[method].adaptive:
            if options.get("interp", "linear") != "linear" or options.get("perturb"):
                raise ValueError(
                    "options['compile'] on a fixed grid needs interp='linear' and no perturb (the compiled "
                    "step evaluates its first stage inside the graph)"
                )
    return options


def flat_func(func: Callable, shapes, dtype: torch.dtype, device: torch.device) -> Callable:
    """``f(t: float, y_flat, perturb=0) -> dy_flat``: the user's ``func`` on the flat state, called with
    ``t`` as a 0-d tensor in the state's dtype."""
    # The last time handed to func, (float, tensor): equal times in a row (stages with equal c, or a step's
    # last stage and the next step's first) share one tensor, a kernel less each.
    # (Inline in f: a call per evaluation costs more than the check.)
    last: list = [math.nan, None]
    scalar = time_maker(dtype, device)

    if shapes is None:

        def f(tt: float, y: torch.Tensor, perturb: int = 0) -> torch.Tensor:
            if perturb:
                return func(_time(tt, dtype, device, perturb), y)
            if tt != last[0]:
                last[0], last[1] = tt, scalar(tt)
            return func(last[1], y)

        return f
    sizes = [math.prod(s) for s in shapes]

    def f_tuple(tt: float, y: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        parts = tuple(p.view(s) for p, s in zip(y.split(sizes), shapes))
        if perturb:
            out = func(_time(tt, dtype, device, perturb), parts)
        else:
            if tt != last[0]:
                last[0], last[1] = tt, scalar(tt)
            out = func(last[1], parts)
        return torch.cat([o.reshape(-1) for o in out])

    return f_tuple


def time_maker(dtype: torch.dtype, device: torch.device) -> Callable[[float], torch.Tensor]:
    """``t -> torch.scalar_tensor(t, dtype=dtype, device=device)``. A partial binds the keywords once:
    ~0.2 µs less per call than passing them (a time tensor is made for every stage)."""
    return functools.partial(torch.scalar_tensor, dtype=dtype, device=device)


def _time(t: float, dtype: torch.dtype, device: torch.device, perturb: int = 0) -> torch.Tensor:
    """The time handed to ``func``: a 0-d tensor in the state's dtype (as torchdiffeq). ``perturb=±1``
    moves it one ulp (in that dtype) up or down: the one-sided limit at a grid point."""
    # scalar_tensor is about half the cost of torch.tensor(t) (no Python-sequence parsing) and on CUDA it
    # is a fill kernel, no synchronisation.
    tt = torch.scalar_tensor(t, dtype=dtype, device=device)
    if perturb:
        tt = torch.nextafter(tt, tt + perturb)
    return tt


# -- argument checks -----------------------------------------------------------------------------------


def check_func(func) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}")


def check_y0(y0) -> tuple[torch.Tensor, list[torch.Size] | None]:
    """``(flat y0, shapes)``: a floating tensor as is (``shapes=None``), a tuple concatenated."""
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
    hint = "; wrap a number as torch.tensor(x)" if isinstance(y0, (int, float)) else ""
    raise TypeError(f"y0 must be a tensor or a non-empty tuple of tensors, got {type(y0).__name__}{hint}")


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``. A finite sum proves it in one kernel (``isfinite(x).all()`` is five); only
    a non-finite sum (NaN/inf inside, or finite values overflowing the sum) needs the exact check."""
    return math.isfinite(float((x.detach() if x.requires_grad else x).sum())) or bool(torch.isfinite(x).all())


def check_t(t, device: torch.device | None = None, min_len: int = 1) -> list[float]:
    """``t`` as host floats: a 1-D floating tensor, strictly monotonic, on ``device`` (when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a 1-D tensor of times, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D, got shape {tuple(t.shape)}")
    n = t.numel()
    if n == 0:
        raise ValueError("t is empty; it needs at least the start time")
    if n < min_len:
        raise ValueError(f"t needs at least {min_len} times, got {n}")
    if not t.is_floating_point():
        raise TypeError(f"t must be floating point, got dtype {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"t is on {t.device} but y0 is on {device}; put both on the same device")
    values = t.tolist()  # host floats (also of a tensor that requires grad): one synchronisation per solve
    # A finite sum proves every entry finite; only a non-finite one (or an overflow) needs the exact check.
    if not math.isfinite(sum(values)) and not all(math.isfinite(v) for v in values):
        raise ValueError("t contains NaN or inf values")
    pairs = itertools.pairwise(values)
    if n > 1 and not (
        all(a < b for a, b in pairs) if values[1] > values[0] else all(a > b for a, b in pairs)
    ):
        d = [b - a for a, b in itertools.pairwise(values)]
        bad = next(i for i, x in enumerate(d) if x == 0 or (x > 0) != (d[0] > 0))
        raise ValueError(
            f"t must be strictly increasing or strictly decreasing; t[{bad}]={values[bad]} and "
            f"t[{bad + 1}]={values[bad + 1]} break that"
        )
    return values


def check_tol(name: str, tol, y0: torch.Tensor, shapes=None):
    """A positive finite float, or a tensor (tuple states: one entry per tensor) on y0's dtype/device."""
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


def _number(key: str, v, what: str = "options") -> float:
    """A real number given as an int, a float or a one-element tensor (anything else: ``TypeError``)."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        return float(v.item())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{what}['{key}'] must be a number, got {type(v).__name__} {v!r:.40}")
    return float(v)


def check_step_options(options: dict, what: str = "options") -> None:
    """Check and normalise the step-size and grid options in place (numbers to floats, the deprecated
    ``grid_points``/``eps`` to ``jump_t``, times to lists of floats)."""
    for key in ("first_step", "min_step", "max_step", "step_size"):
        if key in options and options[key] is not None:
            v = _number(key, options[key], what)
            positive = key != "min_step"
            if not (v > 0 if positive else v >= 0):
                need = "positive" if positive else ">= 0"
                raise ValueError(f"{what}['{key}'] must be {need}, got {v}")
            options[key] = v
    lo, hi = options.get("min_step"), options.get("max_step")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{what}['min_step']={lo} is larger than {what}['max_step']={hi}")
    if "throw" in options and not isinstance(options["throw"], bool):
        v = options["throw"]
        raise TypeError(f"{what}['throw'] must be True or False, got {type(v).__name__} {v!r:.40}")
    if "max_num_steps" in options:
        v = options["max_num_steps"]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what}['max_num_steps'] must be a positive int, got {v!r}")
    for key in ("safety", "ifactor", "dfactor", "pcoeff", "icoeff"):
        if key in options:
            options[key] = _number(key, options[key], what)
    if options.get("interp", "linear") not in ("linear", "cubic"):
        raise ValueError(f"{what}['interp']={options['interp']!r}; expected 'linear' or 'cubic'")
    if options.get("norm") is not None and not callable(options["norm"]):
        raise TypeError(f"{what}['norm'] must be callable, got {type(options['norm']).__name__}")
    gc = options.get("grid_constructor")
    if gc is not None and not callable(gc):
        raise TypeError(f"{what}['grid_constructor'] must be callable, got {type(gc).__name__}")
    if options.get("step_size") is not None and gc is not None:
        raise ValueError(
            f"{what}['step_size'] and {what}['grid_constructor'] are mutually exclusive; give one"
        )
    if "grid_points" in options:
        # torchdiffeq before 0.2: grid_points (+ eps) marked discontinuities; jump_t does that now.
        warnings.warn(f"{what}['grid_points'] is deprecated; use {what}['jump_t']", stacklevel=4)
        if options.get("jump_t") is not None:
            raise ValueError(f"give {what}['jump_t'] or the deprecated {what}['grid_points'], not both")
        options["jump_t"] = options.pop("grid_points")
    if "eps" in options:
        warnings.warn(
            f"{what}['eps'] is ignored: at a jump_t the vector field is evaluated at the one-sided limit",
            stacklevel=4,
        )
        options.pop("eps")
    for key in ("step_t", "jump_t"):
        if options.get(key) is not None:
            options[key] = _check_times(key, options[key], what)
    both = set(options.get("step_t") or ()) & set(options.get("jump_t") or ())
    if both:
        raise ValueError(
            f"{what}['step_t'] and {what}['jump_t'] must not share elements; both contain {sorted(both)}"
        )


def _check_times(key: str, value, what: str = "options") -> list[float]:
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{what}['{key}'] must be 1-D, got shape {tuple(value.shape)}")
        values = value.detach().reshape(-1).tolist()
    elif isinstance(value, (list, tuple)):
        values = [_number(key, v, what) for v in value]
    else:
        raise TypeError(
            f"{what}['{key}'] must be a 1-D tensor or a sequence of times, got {type(value).__name__}"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what}['{key}'] contains NaN or inf")
    return [float(v) for v in values]


def _check_func_output(func, t0: float, y0: torch.Tensor, shapes, perturb: int = 0) -> torch.Tensor:
    """``func(t0, y0)`` on the flat state, after checking its type, shape, dtype and device."""
    tt = _time(t0, y0.dtype, y0.device, perturb)
    if shapes is None:
        out = func(tt, y0)
        check_output("func(t0, y0)", out, y0)
        return out
    parts = tuple(p.view(s) for p, s in zip(y0.split([math.prod(s) for s in shapes]), shapes))
    out = func(tt, parts)
    if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
        raise TypeError(
            f"func(t0, y0) must return a tuple of {len(shapes)} tensors for a tuple y0, got {type(out).__name__}"
        )
    for i, (o, p) in enumerate(zip(out, parts)):
        check_output(f"func(t0, y0)[{i}]", o, p)
    return torch.cat([o.reshape(-1) for o in out])


def check_output(what: str, out, like: torch.Tensor) -> None:
    """``out`` is a tensor of ``like``'s shape, dtype and device."""
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


# -- the per-sample problem ----------------------------------------------------------------------------


@dataclasses.dataclass
class RowsProblem:
    """A validated per-sample solve (internal): every row of the flat ``(B, n)`` state is its own problem.

    ``f(t: (B,) tensor, y: (B, n)) -> (B, n)``; ``t`` is ``(B, T)`` in the time dtype (float64, float32 on
    MPS); ``rtol``/``atol`` floats or ``(B, n)`` tensors; ``tab`` the explicit tableau, or the stiff
    method's own (its dense output is read the same way). ``groups`` (column counts) makes the error norm
    the max over the groups' RMS; ``quad(stage_ts, stage_ys, w)`` is called once per step after
    accept/reject (``w = h`` on accepted rows, 0 elsewhere); ``jump(j, hit, y) -> y`` makes every row end a
    step on each of its output times and changes the rows ``hit`` that have just reached their interior
    column ``j[b]`` (their first stage is then re-evaluated; only the final state is returned): all three
    are the per-sample adjoint's hooks.
    """

    f: Callable
    func: Callable
    y0: torch.Tensor  # (B, n)
    f0: torch.Tensor  # (B, n)
    t: torch.Tensor  # (B, T)
    rtol: Any
    atol: Any
    tab: ButcherTableau
    settings: Settings
    shape: torch.Size  # the user's state shape (B, *shape)
    groups: tuple[int, ...] | None = None
    quad: Callable | None = None
    jump: Callable | None = None


def make_rows_problem(
    func,
    y0,
    t,
    rtol,
    atol,
    method,
    options,
    *,
    groups: tuple[int, ...] | None = None,
    quad: Callable | None = None,
    jump: Callable | None = None,
    evaluate: bool = True,
) -> RowsProblem:
    """Validate what ``odeint_per_sample`` receives. ``func`` is called once at the start times (the
    solve's first stage), unless ``evaluate=False`` (then ``f0`` is ``None``)."""
    check_func(func)
    method = "dopri5" if method is None else method
    spec = EXTRA_METHODS.get(method) if isinstance(method, str) else None
    if not isinstance(method, str) or (
        method not in ADAPTIVE_METHODS and (spec is None or spec.rows is None)
    ):
        rows_methods = ADAPTIVE_METHODS + tuple(m for m, sp in EXTRA_METHODS.items() if sp.rows is not None)
        raise ValueError(
            f"method={method!r} is not an adaptive method; per-sample stepping needs one of "
            f"{', '.join(rows_methods)}"
        )
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    options = {} if options is None else dict(options)
    valid = PER_SAMPLE_OPTIONS if spec is None else spec.rows_options
    unknown = sorted(set(options) - valid)
    if unknown:
        with_method = "" if spec is None else f" with method {method!r}"
        raise ValueError(
            f"unknown option(s) {unknown} for per-sample stepping{with_method}; valid options: "
            f"{', '.join(sorted(valid))}"
        )
    check_step_options(options)
    options["compile"] = check_compile_option(options.get("compile"))
    settings = parse_settings(method, options)
    if not isinstance(y0, torch.Tensor):
        check_y0(y0)  # the tensor-or-tuple message
        raise TypeError(f"y0 must be a tensor of shape (batch, ...), got {type(y0).__name__}")
    check_y0(y0)
    if y0.dim() < 1 or y0.shape[0] == 0:
        raise ValueError(f"y0 must have a non-empty batch dimension first, got shape {tuple(y0.shape)}")
    t2 = _check_rows_t(t, y0)
    B = y0.shape[0]
    shape, dtype = y0.shape, y0.dtype

    def f(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return func(tt.to(dtype), y.view(shape)).reshape(B, -1)

    f0 = None
    if evaluate:
        f0 = func(t2[:, 0].to(dtype), y0)
        check_output("func(t0, y0)", f0, y0)
        f0 = f0.reshape(B, -1)
    return RowsProblem(
        f=f,
        func=func,
        y0=y0.reshape(B, -1),
        f0=f0,
        t=t2,
        rtol=_rows_tol("rtol", rtol, y0),
        atol=_rows_tol("atol", atol, y0),
        tab=TABLEAUS[method] if spec is None else spec.rows.tableau(method),
        settings=settings,
        shape=shape,
        groups=groups,
        quad=quad,
        jump=jump,
    )


def _check_rows_t(t, y0: torch.Tensor) -> torch.Tensor:
    """``t`` of shape ``(T,)`` or ``(B, T)`` as a contiguous ``(B, T)`` tensor in the time dtype."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError(f"t must be a floating-point tensor of times, got {t!r:.60}")
    if t.device != y0.device:
        raise ValueError(f"t is on {t.device} but y0 is on {y0.device}; put both on the same device")
    B = y0.shape[0]
    tdtype = torch.float64 if y0.device.type != "mps" else torch.float32
    if t.dim() == 1:
        t2 = t.detach().to(tdtype).unsqueeze(0).expand(B, -1)
    elif t.dim() == 2 and t.shape[0] == B:
        t2 = t.detach().to(tdtype)
    else:
        raise ValueError(f"t must be (T,) or (batch={B}, T), got shape {tuple(t.shape)}")
    if t.requires_grad:
        raise ValueError("gradients with respect to t are not supported in per-sample mode; detach t")
    if t2.shape[1] < 2:
        raise ValueError(f"t needs at least a start and an end time per sample, got {t2.shape[1]} column(s)")
    if not bool(torch.isfinite(t2).all()):
        raise ValueError("t contains NaN or inf values")
    d = t2.diff(dim=1)
    direction = torch.sign(t2[:, -1:] - t2[:, :1])
    if not bool(((d * direction) > 0).all()):
        raise ValueError("each row of t must be strictly increasing or strictly decreasing")
    return t2.contiguous()


def _rows_tol(name: str, tol, y0: torch.Tensor):
    """:func:`check_tol`, then a tensor expanded to the ``(B, n)`` flat state."""
    tol = check_tol(name, tol, y0)
    if isinstance(tol, float):
        return tol
    return tol.expand(y0.shape).reshape(y0.shape[0], -1)
