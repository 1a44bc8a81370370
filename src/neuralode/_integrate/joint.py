"""The joint integration (one step size for the whole state) of explicit Runge-Kutta tableaus, and the engine's entry.

:func:`run` dispatches a validated problem: explicit adaptive tableaus to the adaptive loop of
``_integrate/adaptive.py`` with the :class:`RKStep` strategy (here), fixed grids to
:func:`integrate_fixed`, methods with their own driver to ``MethodSpec.run``. The strategy and the
fixed-grid loop step with the Runge-Kutta core of ``_solvers/rk.py`` (its ``SCALAR`` strategy) and take
their outputs from ``_interpolation.py``.

Conventions: times are Python floats (float64) on the host; the state ``y`` is one tensor of any shape
(tuple states are flattened by the front door). ``f(t, y)`` is the vector field with ``t`` a float.
Each adaptive step synchronises with the device once, to fetch the error ratio that decides
accept/reject; nothing else in the loop waits for the device.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Sequence

import torch

from neuralode._callbacks import chain_callbacks
from neuralode._errors import SolverError, step_limit_error
from neuralode._integrate.adaptive import adaptive_loop, finish
from neuralode._interpolation import dense_eval, interpolate, step_outputs
from neuralode._solvers.rk import error_ratio, rk_step, rms_error_ratio, rms_factor, without_grad
from neuralode._solvers.tableau import ButcherTableau
from neuralode._stats import SolveStats
from neuralode._step_size import Norm, initial_step, rms_norm, rms_scale

__all__ = [
    "compiled_stepper",
    "dense_eval",
    "integrate_fixed",
    "last_finite_grid_time",
    "outputs_reached",
    "rk_step",
    "rk_stepper",
    "run",
]

Func = Callable[[float, torch.Tensor], torch.Tensor]


def run(
    problem,
    stats: SolveStats,
    trace: list | None = None,
    y0: torch.Tensor | None = None,
    f0: torch.Tensor | None = None,
    callbacks=None,
    event=None,
    jump=None,
    on_accept=None,
    f0_side: int | None = None,
) -> list[torch.Tensor]:
    """Run the engine on a validated :class:`~neuralode._problem.Problem`; returns the list of flat
    states at ``problem.t``.

    ``trace`` and ``callbacks`` go to the loop (see ``_integrate/adaptive.adaptive_loop``), after the
    user's callbacks found on ``func`` (``problem.callbacks``); ``event`` (adaptive tableaus only) is the
    terminal-event hook of ``adaptive_loop``; so is ``jump``, and ``on_accept`` (the adjoint's hooks) is
    that of ``adaptive_loop`` or ``integrate_fixed`` (explicit RK tableaus), or of a method's own driver
    (``MethodSpec.run``) where its signature names it, as it may ``jump``, ``trace`` and ``callbacks``. ``f0_side``: the side
    ``f0`` was evaluated on at ``t[0]`` (see ``Problem.f0_side``; default: ``problem.f0_side`` for
    ``problem.f0``, 0 for a given ``f0``)."""
    s = problem.settings
    tab = s.tab
    callbacks = chain_callbacks(problem.callbacks, callbacks)
    if f0_side is None:
        f0_side = problem.f0_side if f0 is None else 0
    y0 = problem.y0 if y0 is None else y0
    f0 = problem.f0 if f0 is None else f0
    if len(problem.t) == 1:
        stats.status, stats.t_reached = "success", problem.t[0]
        return [y0]
    # A method with its own driver (e.g. the ESDIRK one) takes the hooks its signature names.
    driver_hooks = _driver_hooks(s.spec.run) if tab is None and s.spec.run is not None else frozenset()
    if (jump is not None and not ((tab is not None and tab.adaptive) or "jump" in driver_hooks)) or (
        on_accept is not None and tab is None and "on_accept" not in driver_hooks
    ):
        raise ValueError(f"method={problem.method!r} has no jump/on_accept hooks")
    if on_accept is not None and s.compile:
        raise ValueError("on_accept needs the eager step (options['compile'] is set)")
    if tab is None:
        if trace is not None and "trace" not in driver_hooks:
            raise ValueError(
                f"method={problem.method!r} cannot be replayed from a step trace; use gradient='direct' or 'adjoint'"
            )
        if s.spec.run is not None:  # a driver with options["throw"] records how it ended in stats
            stats.status = None
            given = {"on_accept": on_accept, "jump": jump, "trace": trace, "callbacks": callbacks}
            hooks = {k: v for k, v in given.items() if v is not None and k in driver_hooks}
            ys = s.spec.run(problem, stats, y0, **hooks)
            if stats.status is None:
                stats.status, stats.t_reached = "success", problem.t[-1]
            return ys
        return _run_fixed(
            problem, stats, None, y0, f0, f0_side, callbacks, s.spec.make_stepper(problem), None
        )
    if not s.compile:
        return _run_tableau(problem, stats, trace, y0, f0, f0_side, callbacks, event, None, jump, on_accept)
    compiled, release = _compiled(problem, y0)
    try:
        return _run_tableau(
            problem, stats, trace, y0, f0, f0_side, callbacks, event, compiled, jump, on_accept
        )
    finally:
        release()


@functools.cache
def _driver_hooks(driver) -> frozenset[str]:
    """The keyword hooks (``on_accept``, ``jump``, ``trace``, ``callbacks``) a method's own driver takes."""
    names = inspect.signature(driver).parameters
    return frozenset(k for k in ("on_accept", "jump", "trace", "callbacks") if k in names)


def _run_tableau(
    problem, stats, trace, y0, f0, f0_side, callbacks, event, compiled, jump, on_accept
) -> list[torch.Tensor]:
    """The explicit Runge-Kutta part of :func:`run`; ``compiled`` is the compiled step or None."""
    s = problem.settings
    tab = s.tab
    if tab.adaptive:
        step = rk_strategy(problem.f, tab, y0, problem.rtol, problem.atol, problem.norm, compiled, stats)
        h0 = s.first_step
        if h0 is None:
            h0 = initial_step(
                problem.f,
                problem.t[0],
                y0,
                f0,
                tab.order,
                problem.rtol,
                problem.atol,
                problem.norm,
                problem.direction,
                scale=step.y0_abs,
            )
            stats.nfe += 1
        return adaptive_loop(
            step,
            problem,
            stats,
            y0,
            f0,
            float(h0),
            trace=trace,
            callbacks=callbacks,
            event=event,
            jump=jump,
            on_accept=on_accept,
        )
    stepper = None if compiled is None else compiled_stepper(tab, compiled)
    return _run_fixed(problem, stats, trace, y0, f0, f0_side, callbacks, stepper, on_accept)


def _run_fixed(problem, stats, trace, y0, f0, f0_side, callbacks, stepper, on_accept) -> list[torch.Tensor]:
    """The fixed-grid part of :func:`run`: ``stepper`` None steps with the explicit tableau."""
    s = problem.settings
    return integrate_fixed(
        problem.f,
        s.tab,
        y0,
        f0,
        problem.t,
        problem.grid(),
        interp=s.interp,
        perturb=s.perturb,
        f0_side=f0_side,
        stats=stats,
        trace=trace,
        callbacks=callbacks,
        stepper=stepper,
        on_accept=on_accept,
        throw=s.throw,
    )


def _compiled(problem, y0: torch.Tensor):
    """``(step, release)``: ``step(t, h, y, f0) -> (y1, stages, error ratio)`` through the compiled step
    (options['compile']), and what to call once the solve is over."""
    from neuralode._integrate.compiled_step import compiled_step

    s, rtol, atol = problem.settings, problem.rtol, problem.atol
    step, release = compiled_step(problem.func, s.tab, problem.shapes, s.user_norm, rtol, atol, s.compile)
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


class RKStep:
    """The explicit Runge-Kutta step strategy of :func:`~neuralode._integrate.adaptive.adaptive_loop`: the
    step of the RK core (or the compiled step, ``options['compile']``), FSAL when the tableau has it.
    :func:`rk_strategy` picks :class:`RKStepRMS` where it applies."""

    keep_lu = None
    accepted = None
    aux_of = None
    rms_factor = None
    y0_abs = None  # (RKStepRMS: |y0| + atol/rtol, shared with Hairer's initial step)

    def __init__(self, f: Func, tab: ButcherTableau, rtol, atol, norm: Norm, compiled, stats):
        self.f, self.tab, self.rtol, self.atol, self.norm = f, tab, rtol, atol, norm
        self.compiled, self.stats = compiled, stats  # (the stats: dense output's extra stages)
        self.fsal = tab.fsal
        self.evals = tab.stages - 1  # per step (the first stage is f0)

    def attempt(self, f: Func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, aux):
        if self.compiled is not None and f is self.f:
            y1, k, ratio = self.compiled(t, h, y, f0)
            return y1, ratio, k, None
        tab = self.tab
        y1, k = rk_step(f, tab, t, h, y, f0)
        return y1, without_grad(error_ratio, tab, k, h, y, y1, self.rtol, self.atol, self.norm), k, None

    def limit_error(self, t: float, h: float, n_steps: int, max_num_steps: int, failed) -> SolverError | None:
        error = step_limit_error(t, h, n_steps, max_num_steps)
        if error is not None and failed is not None:  # the step shrank because func returned NaN/inf
            return _nonfinite_stage(self.tab, *failed, n_steps)
        return error

    def nonfinite(
        self, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, n_steps: int
    ) -> SolverError | None:
        if not bool(torch.isfinite(y).all()):
            return SolverError("nonfinite", "non-finite state", t=t, step_size=h, n_steps=n_steps)
        # f(t, y) itself non-finite: no smaller step can help (and the initial step size is NaN then).
        if not bool(torch.isfinite(f0).all()) or math.isnan(h):
            return SolverError("nonfinite", "func returned NaN/inf", t=t, step_size=h, n_steps=n_steps)
        return None

    def stages(self, k, f1):
        return [*k, f1]

    def dense(self, t: float, h: float, y: torch.Tensor, k, f1, thetas) -> list[torch.Tensor]:
        return dense_eval(self.f, self.tab, t, h, y, [*k, f1], thetas, self.stats)


class RKStepRMS(RKStep):
    """:class:`RKStep` with the default RMS norm and scalar tolerances: the cheaper error ratio of
    :func:`rms_error_ratio`, which reuses ``|y1| + atol/rtol`` of a step's end as the next step's
    ``|y| + atol/rtol`` (the loop's ``aux``), up to the host factor ``|h| · rms_factor``."""

    def __init__(self, f: Func, tab: ButcherTableau, rtol: float, atol: float, y0: torch.Tensor, stats):
        super().__init__(f, tab, rtol, atol, rms_norm, None, stats)
        self.y0 = y0
        self.c_tol, self.y0_abs = rms_scale(y0, rtol, atol)
        self.rms_factor = rms_factor(tab, rtol, y0.numel())

    def aux_of(self, y: torch.Tensor) -> torch.Tensor:
        return self.y0_abs if y is self.y0 else torch.abs(y.detach()).add_(self.c_tol)

    def attempt(self, f: Func, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, y_abs):
        """The step and ``‖x‖₂`` of :func:`rms_error_ratio`'s ``x``, without grad (one norm kernel, no
        reshape); ``y_abs = |y| + atol/rtol``."""
        tab = self.tab
        y1, k = rk_step(f, tab, t, h, y, f0)
        grad = torch.is_grad_enabled()  # the raw switch, as in without_grad (one call layer less)
        if grad:
            torch._C._set_grad_enabled(False)
        try:
            x, y1_abs = rms_error_ratio(tab, k, y1, self.c_tol, y_abs)
            return y1, torch.linalg.vector_norm(x), k, y1_abs
        finally:
            if grad:
                torch._C._set_grad_enabled(True)


def rk_strategy(
    f: Func, tab: ButcherTableau, y0: torch.Tensor, rtol, atol, norm: Norm, compiled, stats
) -> RKStep:
    """The step strategy of the explicit tableau ``tab``: :class:`RKStepRMS` for the default RMS norm with
    scalar tolerances and an eager step (and a tableau without auxiliary error weights), else
    :class:`RKStep`."""
    if (
        compiled is None
        and norm is rms_norm
        and tab.b_error_aux is None
        and isinstance(rtol, float)
        and isinstance(atol, float)
    ):
        return RKStepRMS(f, tab, rtol, atol, y0, stats)
    return RKStep(f, tab, rtol, atol, norm, compiled, stats)


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
    f0_side: int = 0,
    stats: SolveStats,
    trace: list | None = None,
    callbacks=None,
    stepper=None,
    on_accept=None,
    throw: bool = True,
) -> list[torch.Tensor]:
    """Fixed-grid solve: one step per grid interval; outputs between grid points by linear (default) or
    cubic Hermite interpolation. ``grid`` runs from ``t_out[0]`` to ``t_out[-1]``.

    ``stepper(f, t, h, y, f0, stats) -> (y1, f1 or None)`` replaces the explicit RK step of ``tab`` (used
    by the implicit and Adams methods; ``f1`` is ``f(t + h, y1)`` when the step has it for free).
    ``on_accept(t, h, y, k_ext)`` as for the adaptive loop with :class:`RKStep` (explicit RK steps of ``tab`` only).
    With ``perturb``, ``f`` is evaluated at the one-sided limits inside each step, never at a grid point;
    ``f0`` is then reused for the first step only if it was evaluated that way (``f0_side`` equal to the
    direction of integration).

    A non-finite state raises :class:`SolverError` after the loop (one sync per solve: NaN/inf stay
    non-finite through every later step). With ``throw=False`` the outputs after the last finite grid
    state are NaN and ``stats.status``/``stats.t_reached`` say so; finding that grid state costs one
    small reduction per step (no sync) in that mode only."""
    direction = 1.0 if t_out[-1] > t_out[0] else -1.0
    finite = None if throw else []  # per step: the sum of the new state (finite while the state is)
    error = None
    outputs = [y0]
    i_out = 1
    y = y0
    f_next: torch.Tensor | None = f0 if not perturb or f0_side == direction else None
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
        try:
            y1, f1 = stepper(f, g0, h, y, f_next, stats)
        except SolverError as err:  # the implicit steppers stop on a NaN stage residual
            if throw:
                raise
            error = err
            break
        if finite is not None:  # one reduction; its NaN/inf (or a sum that overflows) marks the step
            finite.append(y1.detach().sum())
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
        thetas, i_out, at_end = step_outputs(t_out, i_out, g0, h, g1, direction)
        if thetas:
            if interp == "cubic" and f1 is None:
                f1 = f(g1, y1)
                stats.nfe += 1
            outputs.extend(interpolate(interp, y, y1, k[0], f1, h, thetas))
        if at_end:
            outputs.append(y1)
            i_out += 1
        y, f_next = y1, (None if perturb else f1)
        stats.n_steps += 1
        stats.n_accepted += 1
        stats.last_step = abs(h)
    # A NaN/inf state stays non-finite through every later step (y1 = y + h Σ b_j k_j), so the end
    # state tells for the whole grid: one sync per solve.
    if error is None and not bool(torch.isfinite(y).all()):
        if throw:
            raise nonfinite_outputs(t_out, outputs, stats.n_steps)
        error = SolverError("nonfinite", "non-finite state", t=math.nan, step_size=math.nan, n_steps=0)
    t_reached = t_out[-1]
    if error is not None:
        t_reached = last_finite_grid_time(grid, torch.stack(finite) if finite else None)
        outputs = outputs[: outputs_reached(t_out, t_reached)]
    finish(stats, error, t_reached, outputs, len(t_out), y0)
    return outputs


def last_finite_grid_time(grid: Sequence[float], sums: torch.Tensor | None) -> float:
    """The time of the last finite state of a failed fixed-grid solve: the end of the leading run of steps
    whose new state's sum (``sums``, one per step, ``None`` for none) is finite (one sync)."""
    n_ok = int(torch.isfinite(sums).logical_not().cumsum(0).eq(0).sum()) if sums is not None else 0
    return grid[n_ok]


def outputs_reached(t_out: Sequence[float], t_reached: float) -> int:
    """How many of the output times ``t_out`` a solve that reached ``t_reached`` has passed."""
    direction = 1.0 if t_out[-1] > t_out[0] else -1.0
    return sum(1 for tj in t_out if direction * (tj - t_reached) <= 0)


def nonfinite_outputs(t_out: Sequence[float], outputs: Sequence[torch.Tensor], n_steps: int) -> SolverError:
    """The error for a fixed-grid solve whose outputs are not all finite, at the first such output."""
    i = next((i for i, o in enumerate(outputs) if not bool(torch.isfinite(o).all())), len(outputs) - 1)
    what = "NaN" if bool(torch.isnan(outputs[i]).any()) else "inf"
    return SolverError(
        "nonfinite",
        f"func returned {what}: the fixed-grid solution is not finite from output {i} on",
        t=float(t_out[min(i, len(t_out) - 1)]),
        step_size=float("nan"),
        n_steps=n_steps,
    )


def _nonfinite_stage(tab, t: float, h: float, k, n_steps: int) -> SolverError:
    """The error for a step that kept failing on a non-finite stage: the first stage of the last attempt
    that is NaN/inf says where ``func`` broke down (a few syncs, on the way out only)."""
    for i, ki in enumerate(k):
        if not bool(torch.isfinite(ki).all()):
            what = "NaN" if bool(torch.isnan(ki).any()) else "inf"
            return SolverError(
                "nonfinite", f"func returned {what}", t=t + tab.c[i] * h, step_size=h, n_steps=n_steps
            )
    return SolverError("nonfinite", "non-finite error estimate (overflow)", t=t, step_size=h, n_steps=n_steps)


def compiled_stepper(tab: ButcherTableau, compiled):
    """``compiled(t, h, y, f0 or None) -> (y1, stages, _)`` (``_integrate/compiled_step.py``) in the fixed-grid stepper
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
