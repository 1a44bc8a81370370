"""``odeint_adjoint``: gradients by solving the adjoint ODE backwards in time (Chen et al. 2018, §2 and
Appendix B; Kidger, Chen & Lyons 2021 for the seminorm), in three variants chosen by ``sensitivity``.

The forward solve keeps no autograd graph. With ``a = dL/dy`` the adjoint, the backward pass integrates

    da/dt = −aᵀ ∂f/∂y,   da_θ/dt = −aᵀ ∂f/∂θ,   da_t/dt = −aᵀ ∂f/∂t

from ``t_N`` to ``t_0`` (the three vector-Jacobian products from one autograd call per evaluation), as
*one* adaptive solve with the output times as stops: at each ``t_i`` the jump ``a += dL/dy(t_i)`` is
applied and only the first stage is re-evaluated (``"interpolating"``/``"quadrature"``: not even that,
the dynamics being linear in ``a``, it is the last stage plus one vector-Jacobian product of its kept
graph); the step size and the controller history carry over.
Where ``y(t)`` comes from is what the sensitivities differ in:

- ``"backsolve"`` (torchdiffeq's): ``y`` is solved backwards together with the adjoint, in the state
  ``[y, a, a_θ, a_t]``; at each output time ``y`` is reset to the stored forward value. O(1) memory in
  the number of steps; the reverse-time solve of ``y`` is ill-conditioned for dissipative dynamics.
- ``"interpolating"``: ``y(t)`` is read from the dense output of the forward steps: kept whole (default),
  or re-solved one segment at a time (no graph) from checkpoints, the state every few accepted steps
  (``checkpoints=K``: memory O(K + one segment)). The backward state is ``[a, a_θ, a_t]``: no
  reverse-time solve of ``y``.
- ``"quadrature"``: ``y(t)`` as for ``"interpolating"``; the backward state is only ``[a, a_t]`` (error
  control on them alone), and ``a_θ`` is a Gauss-Legendre quadrature of ``−aᵀ ∂f/∂θ`` over each accepted
  backward step, with ``a`` at the nodes from the step's dense output.

The gradient is the exact gradient of the continuous solution evaluated along a numerically
reconstructed trajectory: it differs from backpropagation through the solver by O(tolerance).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralode._callbacks import CheckpointKeeper, collect_callbacks
from neuralode._errors import SolverError
from neuralode._gradients.per_sample_adjoint import odeint_per_sample_adjoint
from neuralode._integrate.joint import dense_eval, rk_step, run
from neuralode._problem import (
    Problem,
    _time,
    adjoint_settings,
    inherited_options,
    make_problem,
    method_callbacks,
    method_options,
)
from neuralode._problem import check_tol as _check_tol
from neuralode._solvers.explicit import TABLEAUS
from neuralode._solvers.stiff import ESDIRK_TABLEAUS
from neuralode._stats import SolveStats, _report_backward, _report_forward
from neuralode._step_size import make_norm

__all__ = ["SENSITIVITIES", "inherited_options", "odeint_adjoint"]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]

#: The adjoint variants of ``odeint_adjoint(..., sensitivity=...)``.
SENSITIVITIES: tuple[str, ...] = ("backsolve", "interpolating", "quadrature")


def odeint_adjoint(
    func: Callable[[torch.Tensor, TensorOrTuple], TensorOrTuple],
    y0: TensorOrTuple,
    t: torch.Tensor,
    *,
    rtol: float | torch.Tensor = 1e-7,
    atol: float | torch.Tensor = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Callable | None = None,
    adjoint_rtol: float | torch.Tensor | None = None,
    adjoint_atol: float | torch.Tensor | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    sensitivity: str = "backsolve",
    checkpoints: int | None = None,
) -> TensorOrTuple:
    """Solve ``dy/dt = func(t, y)`` like :func:`~neuralode.odeint`; gradients by the adjoint method.

    The forward pass stores only the outputs (``"backsolve"``) or a few checkpoints (the other
    sensitivities). The price is a second solve, backwards, and a gradient that matches backpropagation
    through the solver only to O(tolerance).

    Args:
        func, y0, t, rtol, atol, method, options: as for :func:`~neuralode.odeint`;
            ``options={"per_sample": True}`` runs :func:`~neuralode.odeint_per_sample_adjoint` (backsolve
            only; ``checkpoints``, another ``adjoint_method`` and ``adjoint_options`` are errors there).
        event_fn: terminal event, as for :func:`~neuralode.odeint`: returns ``(event_t, solution)``; the
            state at the event is differentiated by the adjoint with the event time held fixed (use
            :func:`~neuralode.odeint_event` for a differentiable event time). The event is located by a
            gradient-free ``odeint`` solve first, then the adjoint solve runs to it.
        adjoint_rtol, adjoint_atol: tolerances of the backward solve; default ``rtol``/``atol``.
        adjoint_method: solver of the backward solve; default ``method``.
        adjoint_options: options of the backward solve; default ``options`` without its ``norm`` (when
            ``adjoint_method`` is ``method``). ``{"norm": "seminorm"}`` leaves the parameter adjoint
            ``a_θ`` out of the error estimate (Kidger, Chen & Lyons 2021): it never feeds back into the
            dynamics, so controlling its error only costs steps. ``"norm"`` may also be a callable; it
            receives torchdiffeq's split of the backward state, a tuple ``(a_t, *y, *a_y, *a_θ)`` with
            ``a_t`` 0-d, each ``y``/``a_y`` part in the shape of its part of ``y0`` and each ``a_θ`` in its
            parameter's shape (``"interpolating"``: no ``y``; ``"quadrature"``: only ``(a_t, *a_y)``). The
            default norm is the max over the RMS of ``y`` and of ``a`` (each measured with the forward
            norm), of every parameter's adjoint, and ``|a_t|``. ``{"compile": True}`` (or a dict of
            ``torch.compile`` arguments, as ``options["compile"]``; never inherited from ``options``)
            runs each backward evaluation, ``func`` and its vector-Jacobian products, as one compiled
            graph, cached per ``func``: same gradients to rounding, the first backward pass pays the
            compilation. It needs an explicit Runge-Kutta ``adjoint_method``, leaf ``adjoint_params`` and
            a ``func`` that ``torch.compile`` can trace; ``create_graph=True`` runs eagerly.
        adjoint_params: the tensors to compute gradients for; default ``tuple(func.parameters())`` when
            ``func`` is an ``nn.Module``. Tensors that ``func`` uses but that are not listed here get
            no gradient. Listed leaf tensors that ``func`` does not use get zeros. A listed tensor that
            is not a leaf (computed from others, e.g. spline coefficients from data) must be used by
            ``func``; its gradient flows on to the tensors it was computed from.
        sensitivity: ``"backsolve"`` (default, torchdiffeq's: the state solved backwards with the
            adjoint), ``"interpolating"`` (the state from forward checkpoints; right where backsolve is
            unstable) or ``"quadrature"`` (as ``"interpolating"``, parameter gradient by Gauss-Legendre
            quadrature on each backward step, error control on the state's adjoint only). The last two
            need an explicit Runge-Kutta ``method`` (its steps are re-solved) or a stiff ``kvaerno*`` one
            (its whole dense output is kept; no ``checkpoints``): with stiff dynamics use
            ``method="kvaerno*"`` and ``"interpolating"``, backsolve would integrate the fast decaying
            modes of ``y`` backwards, where they grow; ``"quadrature"`` also an adaptive explicit
            Runge-Kutta ``adjoint_method``.
        checkpoints: ``"interpolating"``/``"quadrature"``: ``None`` (default) keeps the dense output of
            every forward step (its stages: memory O(steps · stages · state), no recomputation; on fixed
            grids and with ``options["compile"]``: about √(2n) states, as below); an int keeps at most that many states and re-solves the
            forward steps between two of them when the backward pass reaches them (memory
            O(checkpoints + one segment), about one forward solve more; see
            :func:`~neuralode.odeint_checkpoint`).

    Returns:
        ``(len(t), *y0.shape)`` tensor, or a tuple of ``(len(t), *y0[i].shape)`` tensors.

    Higher-order gradients: with ``torch.autograd.grad(..., create_graph=True)`` the backward pass of
    ``"backsolve"`` is itself differentiable (it is then made of ``odeint_adjoint`` solves of the
    backward system, one per output interval), so Hessian-vector products and gradient penalties work
    at O(1) memory in the number of steps. ``"interpolating"``, ``"quadrature"`` and gradients with
    respect to ``t`` raise ``NotImplementedError`` there.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SolverError: the forward or the backward solve failed.
        NotImplementedError: ``create_graph=True`` with a sensitivity other than ``"backsolve"``.
    """
    if event_fn is not None:  # torchdiffeq's event mode: (event_t, solution), event_t without gradient
        from neuralode._events import solve_to_event_with

        kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, adjoint_rtol=adjoint_rtol)
        kwargs.update(
            adjoint_atol=adjoint_atol, adjoint_method=adjoint_method, adjoint_options=adjoint_options
        )
        kwargs.update(sensitivity=sensitivity, checkpoints=checkpoints)
        return solve_to_event_with(
            odeint_adjoint, func, y0, t, event_fn, adjoint_params=adjoint_params, **kwargs
        )
    if not isinstance(sensitivity, str) or sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity={sensitivity!r}; expected one of {', '.join(SENSITIVITIES)}")
    if isinstance(options, dict) and "per_sample" in options:
        options = dict(options)
        if options.pop("per_sample"):
            _check_per_sample(sensitivity, checkpoints, method, adjoint_method, adjoint_options)
            kw = dict(rtol=rtol, atol=atol, method=method, options=options, adjoint_rtol=adjoint_rtol)
            kw.update(adjoint_atol=adjoint_atol, adjoint_params=adjoint_params)
            return odeint_per_sample_adjoint(func, y0, t, **kw)
    if checkpoints is not None and (
        isinstance(checkpoints, bool) or not isinstance(checkpoints, int) or checkpoints < 1
    ):
        raise ValueError(f"checkpoints must be a positive int or None, got {checkpoints!r}")
    params = _check_params(func, adjoint_params, leaves_only=False)
    non_leaf = {
        k: next(i for i, q in enumerate(adjoint_params) if q is p)
        for k, p in enumerate(params)
        if not p.is_leaf
    }
    y0_flat = torch.cat([x.reshape(-1) for x in y0]) if isinstance(y0, (tuple, list)) else y0
    with torch.no_grad():
        problem = make_problem(func, y0, t, rtol, atol, method, options)
    if sensitivity != "backsolve" and problem.method in ESDIRK_TABLEAUS and checkpoints is not None:
        raise ValueError(
            f"sensitivity={sensitivity!r} with method={problem.method!r} reads the state from the dense "
            "output of every forward step and cannot re-solve them from checkpoints; use checkpoints=None"
        )
    if (
        sensitivity != "backsolve"
        and problem.method not in TABLEAUS
        and problem.method not in ESDIRK_TABLEAUS
    ):
        raise ValueError(
            f"sensitivity={sensitivity!r} reads the forward steps' dense output, which needs an explicit "
            f"Runge-Kutta method or an ESDIRK one; got method={problem.method!r} (valid: "
            f"{', '.join([*TABLEAUS, *ESDIRK_TABLEAUS])}); use sensitivity='backsolve' with it"
        )
    adjoint = _adjoint_setup(
        func, problem, params, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, options
    )
    adjoint.sensitivity, adjoint.checkpoints, adjoint.non_leaf = sensitivity, checkpoints, non_leaf
    if sensitivity == "quadrature" and adjoint.method not in TABLEAUS:
        raise ValueError(
            f"sensitivity='quadrature' integrates the parameter gradient on the steps of an explicit "
            f"Runge-Kutta backward solve; got adjoint_method={adjoint.method!r} (valid: {', '.join(TABLEAUS)})"
        )
    if non_leaf and torch.is_grad_enabled():
        _check_non_leaf_used(problem, params, non_leaf)
    ys = _Adjoint.apply(problem, adjoint, t, y0_flat, *params)
    return problem.unflatten(ys)


def _check_per_sample(sensitivity, checkpoints, method, adjoint_method, adjoint_options) -> None:
    """``options["per_sample"]`` runs :func:`~neuralode.odeint_per_sample_adjoint`: the arguments it lacks."""
    what = "odeint_adjoint(..., options={'per_sample': True}) (odeint_per_sample_adjoint)"
    if sensitivity != "backsolve":
        raise ValueError(f"{what} supports sensitivity='backsolve' only, got sensitivity={sensitivity!r}")
    if checkpoints is not None:
        raise ValueError(f"{what} keeps no checkpoints (its memory is O(1) already); drop checkpoints")
    if adjoint_method is not None and adjoint_method != method:
        raise ValueError(f"{what} solves backwards with the forward method; drop adjoint_method")
    if adjoint_options is not None and adjoint_options not in ({}, {"norm": "seminorm"}):
        raise ValueError(
            f"{what} takes no adjoint_options (its backward norm is already a seminorm), got {adjoint_options!r}"
        )


# -- setup -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _AdjointSetup:
    """Everything the backward pass needs besides the saved tensors (internal)."""

    func: Callable
    params: tuple[torch.Tensor, ...]
    rtol: Any
    atol: Any
    method: str
    options: dict[str, Any]
    seminorm: bool
    user_norm: Callable | None
    state_norm: Callable  # the forward norm, on the flat state
    sensitivity: str = "backsolve"
    checkpoints: int | None = None
    non_leaf: dict[int, int] = dataclasses.field(default_factory=dict)  # params index -> adjoint_params index
    compile: dict | None = None  # adjoint_options["compile"]: torch.compile keyword arguments


def _check_params(
    func, adjoint_params, name: str = "adjoint_params", who: str = "odeint_adjoint", leaves_only: bool = True
) -> tuple[torch.Tensor, ...]:
    """The tensors that get gradients: given ones, or ``func``'s parameters (those needing grad)."""
    if adjoint_params is None:
        if not isinstance(func, nn.Module):
            raise ValueError(
                f"{who} cannot find the parameters of func (a {type(func).__name__}, not an "
                f"nn.Module); pass {name}=(tensor, ...) with the tensors that need gradients, or "
                f"{name}=() if none do"
            )
        params = tuple(func.parameters())
    else:
        if isinstance(adjoint_params, torch.Tensor) or not isinstance(adjoint_params, Sequence):
            raise TypeError(f"{name} must be a tuple or list of tensors, got {type(adjoint_params).__name__}")
        params = tuple(adjoint_params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(p).__name__}")
            if leaves_only and not p.is_leaf:
                raise ValueError(
                    f"{name}[{i}] is not a leaf tensor (it was computed from other tensors); "
                    "pass the leaf tensors it was computed from, or compute it inside func"
                )
            if p.requires_grad and not p.is_floating_point():
                raise TypeError(f"{name}[{i}] must be floating point, got dtype {p.dtype}")
    return tuple(p for p in params if p.requires_grad)


def _adjoint_setup(func, problem: Problem, params, rtol, atol, method, options, fwd_options) -> _AdjointSetup:
    method, options, norm = adjoint_settings(method, options, problem.method, fwd_options)
    compile_kwargs = options.pop("compile", None)
    if compile_kwargs is not None:
        _check_compile(params)
    sizes = None if problem.shapes is None else [math.prod(s) for s in problem.shapes]
    return _AdjointSetup(
        func=func,
        params=params,
        rtol=_aug_tol(problem.rtol if rtol is None else rtol, "adjoint_rtol", problem),
        atol=_aug_tol(problem.atol if atol is None else atol, "adjoint_atol", problem),
        method=method,
        options=options,
        seminorm=norm == "seminorm",
        user_norm=norm if callable(norm) else None,
        state_norm=make_norm((fwd_options or {}).get("norm"), sizes, problem.shapes),
        compile=compile_kwargs,
    )


def _check_compile(params) -> None:
    """``adjoint_options["compile"]``: what the compiled backward evaluation cannot do, as errors."""
    from neuralode._gradients.compiled_eval import compiled_available

    if not compiled_available():
        raise ValueError(
            f"adjoint_options['compile'] needs torch.compile to trace torch.autograd.grad "
            f"(torch._dynamo.config.trace_autograd_ops), which torch {torch.__version__} lacks; drop it"
        )
    if any(not p.is_leaf for p in params):
        raise ValueError(
            "adjoint_options['compile'] needs leaf tensors in adjoint_params (the compiled graph cannot "
            "reach into the graph that computed one); drop adjoint_options['compile'], or compute the "
            "tensor inside func"
        )


def _aug_tol(tol, name: str, problem: Problem):
    """The backward tolerance on the flat state: a float, or a per-element tensor of the flat state's
    size (``_Layout.tol`` extends it to the backward state)."""
    tol = _check_tol(name, tol, problem.y0, problem.shapes)  # (re-)validates the forward default too
    if isinstance(tol, float):
        return tol
    return tol.expand(problem.y0.shape).reshape(-1)


# -- the autograd function ---------------------------------------------------------------------------


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, adjoint: _AdjointSetup, t, y0_flat, *params):
        stats = SolveStats(n_solves=1, nfe=1)  # func(t0, y0) in make_problem
        ctx.record = None
        with torch.no_grad():
            if adjoint.sensitivity == "backsolve":
                ys = torch.stack(run(problem, stats))
            elif problem.method in ESDIRK_TABLEAUS:  # the stiff solvers: their whole dense output
                steps: list = []
                poly = _DensePoly(ESDIRK_TABLEAUS[problem.method].dense)
                ys = torch.stack(
                    run(
                        problem,
                        stats,
                        on_accept=lambda t, h, y, st: steps.append(
                            (t, h, y, poly.coefficients(h, [*st[0], st[1]]))
                        ),
                    )
                )
                ctx.record = ("dense", steps)
            elif (
                adjoint.checkpoints is None
                and TABLEAUS[problem.method].adaptive
                and not problem.settings.compile  # the compiled step hands out no stages
            ):
                recorder = _DenseRecorder(problem, stats)  # the whole dense output
                ys = torch.stack(run(problem, stats, on_accept=recorder))
                ctx.record = ("dense", recorder.steps)
            else:  # the step sequence and a few states, to re-solve the forward steps segment by segment
                trace: list = []
                keeper = CheckpointKeeper(adjoint.checkpoints)
                ys = torch.stack(run(problem, stats, trace=trace, callbacks=keeper))
                ctx.record = ("checkpoints", trace, keeper.states)
        ctx.sinks = _report_forward(stats)
        ctx.stopped = None if stats.status == "success" else (stats.status, stats.t_reached)
        ctx.fwd_step = _forward_step_size(problem.t, stats)
        ctx.problem, ctx.adjoint = problem, adjoint
        ctx.t_grad = t.requires_grad
        ctx.save_for_backward(t, ys)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        t, ys = ctx.saved_tensors
        problem, adjoint = ctx.problem, ctx.adjoint
        if ctx.stopped is not None:  # options["throw"] = False and the forward solve failed
            reason, t_reached = ctx.stopped
            raise SolverError(
                reason,
                "odeint_adjoint cannot differentiate a solve that stopped early (options['throw']=False): "
                "its backward pass starts from the state at t[-1], which was never reached; use odeint or "
                "odeint_checkpoint for gradients of the part reached. The forward solve stopped",
                t=t_reached,
                step_size=math.nan,
                n_steps=0,
            )
        if torch.is_grad_enabled():  # create_graph=True: the backward pass must itself be differentiable
            _check_differentiable(adjoint, ctx.t_grad)
            grad_y0, grad_params = _backward_differentiable(problem, adjoint, ys, grad_ys)
            return (None, None, None, grad_y0.view(problem.y0.shape), *grad_params)
        stats = SolveStats()
        with _compiled_evals(problem, adjoint, ys, ctx.t_grad) as compiled:
            grad_y0, grad_params, grad_t = _backward(
                problem, adjoint, t, ys, grad_ys, ctx.t_grad, stats, ctx.record, ctx.fwd_step, compiled
            )
        _report_backward(ctx.sinks, stats)
        return (None, None, grad_t, grad_y0.view(problem.y0.shape), *grad_params)


def _flat_func(func: Callable, shapes) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``func`` on the flat state, with the time as a tensor (so that ∂f/∂t can be taken)."""
    if shapes is None:
        return func
    sizes = [math.prod(s) for s in shapes]

    def f(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = func(tt, tuple(p.view(s) for p, s in zip(y.split(sizes), shapes)))
        return torch.cat([o.reshape(-1) for o in out])

    return f


_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)


def _vjp(out, inputs: tuple[torch.Tensor, ...], v, retain: bool = False) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad(out, inputs, v, retain_graph=retain, allow_unused=True,
    materialize_grads=True)``; ``out`` and ``v`` a tensor each or equally long tuples.

    Calls the autograd engine directly: ``v`` has ``out``'s shape and dtype by construction, so the
    public wrapper's argument normalisation and shape checks are pure overhead, ~30 µs of the ~170 µs
    an adjoint evaluation of a small network costs on CPU. Falls back to the public call if the
    engine's signature ever differs."""
    outs = out if isinstance(out, tuple) else (out,)
    vs = v if isinstance(v, tuple) else (v,)
    if _ENGINE is not None:
        try:
            res = _ENGINE.run_backward(outs, vs, retain, False, inputs, True, accumulate_grad=False)
        except TypeError:
            pass
        else:
            return tuple(r if r is not None else torch.zeros_like(x) for r, x in zip(res, inputs))
    return torch.autograd.grad(
        outs, inputs, vs, retain_graph=retain, allow_unused=True, materialize_grads=True
    )


def _flatten(tensors) -> torch.Tensor:
    """``torch.cat([x.reshape(-1) for x in tensors])`` (same dtype and device) in one call."""
    if _FLATTEN is not None:
        return _FLATTEN(tensors)
    return torch.cat([x.reshape(-1) for x in tensors])


_FLATTEN = getattr(getattr(torch._C, "_nn", None), "flatten_dense_tensors", None)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each part sits in the flat backward state: ``[y?, a, a_θ?, a_t?]``."""

    n: int  # state size
    with_y: bool  # backsolve: y is solved backwards too
    n_p: int  # parameter entries in the state (0 for quadrature)
    n_t: int  # 1 when t needs a gradient

    @property
    def a(self) -> slice:
        o = self.n if self.with_y else 0
        return slice(o, o + self.n)

    @property
    def p(self) -> slice:
        return slice(self.a.stop, self.a.stop + self.n_p)

    @property
    def t(self) -> int:
        return self.p.stop

    @property
    def total(self) -> int:
        return self.p.stop + self.n_t

    def tol(self, tol):
        """Per-element tolerance on the state (see ``_aug_tol``) → on the backward state."""
        if isinstance(tol, float):
            return tol
        rest = tol.min().expand(self.total - (2 if self.with_y else 1) * self.n)
        return torch.cat([tol, tol, rest] if self.with_y else [tol, rest])


def _compiled_evals(problem: Problem, adj: _AdjointSetup, ys: torch.Tensor, t_grad: bool):
    """A context for the backward pass: ``None`` (eager), or with ``adjoint_options["compile"]`` the
    compiled backward evaluation and its variant at the jumps (``compiled_eval.py``)."""
    if adj.compile is None:
        return contextlib.nullcontext()
    from neuralode._gradients.compiled_eval import compiled_evals

    return compiled_evals(
        adj.func,
        problem.shapes,
        problem.y0.shape if problem.shapes is None else (ys[0].numel(),),
        adj.sensitivity == "backsolve",
        t_grad,
        () if adj.sensitivity == "quadrature" else adj.params,
        adj.compile,
    )


def _backward(
    problem: Problem,
    adj: _AdjointSetup,
    t,
    ys,
    grad_ys,
    t_grad: bool,
    stats: SolveStats,
    record,
    fwd_step: float | None = None,
    compiled: tuple[Callable, Callable | None] | None = None,
):
    """Integrate the backward system from ``t_N`` to ``t_0``, jumping ``a`` at every output time.

    ``fwd_step``: the forward's step size near ``t_N`` (:func:`_forward_step_size`). Where it reaches the
    first output time the backward stops at, an adaptive explicit backward solve takes that whole
    interval as its first step (unless its options set ``first_step``): the backward dynamics are the
    forward ones linearised, at the same tolerance by default, so the step is about as long as the
    forward could take, and it spares the evaluation and the cautious first steps of
    :func:`~neuralode._step_size.initial_step` (a first step that is too long is rejected and shortened
    as any other). Elsewhere the first step is chosen as for any solve. ``compiled``: the backward
    evaluation as one compiled graph and its variant at a jump (``compiled_eval.py``), or None (eager)."""
    dtype, device = ys.dtype, ys.device
    n_out = ys.shape[0]
    ys = ys.reshape(n_out, -1)
    grad_ys = grad_ys.reshape(n_out, -1).to(dtype)
    n = ys.shape[1]
    params = adj.params
    p_numels = [p.numel() for p in params]
    n_p = sum(p_numels)
    sens = adj.sensitivity
    quadrature = sens == "quadrature"
    lay = _Layout(n=n, with_y=sens == "backsolve", n_p=0 if quadrature else n_p, n_t=1 if t_grad else 0)
    f_flat = _flat_func(adj.func, problem.shapes)
    y_shape = problem.y0.shape if problem.shapes is None else (n,)
    cast_params = any(p.dtype != dtype for p in params)
    traj = None if lay.with_y else _Trajectory(problem, ys, stats, record)
    state_params = () if quadrature else params
    last_fy: list[torch.Tensor | None] = [None]  # f(t, y) of the latest evaluation (for dL/dt_i)
    # Interpolating and quadrature: y(t) does not depend on the backward state and the dynamics are
    # linear in a, so the derivative after the jump a += g at t_i is the one before it plus the
    # vector-Jacobian product of the same graph with −g. The evaluation at the next jump's time is kept
    # with its graph (``held``: state, result, f(t_i, y(t_i)) with graph, the product's inputs) and
    # apply_jump reuses it when the step that ended there is the one that made it.
    linear = not lay.with_y
    a_slice = lay.a
    held: list = [None]
    next_jump = [math.nan, None]  # the time of the next jump and dL/dy there
    jump_slack = 16 * math.ulp(max(abs(x) for x in problem.t))  # the last stage's time t + 1·h, rounded

    def aug_f_eager(tt: float, s: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        # ``s`` requires grad only when an implicit backward method (kvaerno*) takes the Jacobian of these
        # dynamics: then the result must stay differentiable in ``s`` (``y`` kept attached, the
        # vector-Jacobian products built with a graph), or that Jacobian would be zero.
        jac = s.requires_grad
        y = s[:n] if lay.with_y else traj(tt)
        tt_ = _time(tt, dtype, device, perturb)
        if t_grad:
            tt_.requires_grad_(True)
        with torch.enable_grad():
            # detached otherwise: y(t0) may be y0 itself, with the caller's graph
            y_ = y.view(y_shape) if jac and lay.with_y else y.detach().view(y_shape).requires_grad_(True)
            fy_g = f_flat(tt_, y_)
            inputs = (y_, *state_params, tt_) if t_grad else (y_, *state_params)
            keep = False
            if not fy_g.requires_grad:  # f does not depend on anything differentiable
                vjps = tuple(torch.zeros_like(x) for x in inputs)
            elif jac:
                vjps = torch.autograd.grad(
                    fy_g,
                    inputs,
                    torch.neg(s[a_slice]).view_as(fy_g),
                    create_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            else:
                keep = linear and not cast_params and not perturb and abs(tt - next_jump[0]) <= jump_slack
                vjps = _vjp(fy_g, inputs, torch.neg(s[a_slice]).view_as(fy_g), retain=keep)
        fy = (fy_g if jac else fy_g.detach()).reshape(-1) if lay.with_y or t_grad else None
        last_fy[0] = fy
        if cast_params:  # parameters in another dtype than the state
            vjps = (vjps[0], *(v.to(dtype) for v in vjps[1:]))
        parts = (fy, *vjps) if lay.with_y else vjps
        out = torch.cat([x.reshape(-1) for x in parts]) if jac else _flatten(parts)
        if keep:
            held[0] = (s, out, fy_g, fy, inputs)
        return out

    def aug_f_compiled(tt: float, s: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        # adjoint_options["compile"]: the evaluation is one compiled graph (``compiled_eval.py``). At the
        # next jump's time (as ``keep`` below) it also returns the evaluation after the jump, kept in ``held``.
        y = s[:n] if lay.with_y else traj(tt)
        tt_ = _time(tt, dtype, device, perturb)
        if linear and not perturb and abs(tt - next_jump[0]) <= jump_slack:
            out, fy, out_jump = compiled[1](tt_, y, s[a_slice], next_jump[1], *state_params)
            held[0] = (s, out_jump, fy)
        else:
            out, fy, _ = compiled[0](tt_, y, s[a_slice], *state_params)
        last_fy[0] = fy
        return out

    def aug_f(tt: float, s: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        """``[f?, −aᵀ∂f/∂y, −aᵀ∂f/∂θ, −aᵀ∂f/∂t?]`` at ``(tt, s)``, flat: one evaluation of ``func`` and one
        vector-Jacobian product, eager or as one compiled graph."""
        if compiled is not None:
            return aug_f_compiled(tt, s, perturb)
        return aug_f_eager(tt, s, perturb)

    time_vjps = torch.zeros(n_out, dtype=dtype, device=device) if t_grad else None

    def apply_jump(i: int, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At output time t_i: y ← y(t_i) (backsolve), a += dL/dy(t_i), a_t −= dL/dy(t_i)·f(t_i, y(t_i));
        returns the new state and its derivative (one evaluation, or one vector-Jacobian product of the
        kept evaluation at t_i, see ``held``)."""
        kept, held[0] = held[0], None
        s_in, s = s, s.clone()
        if lay.with_y:
            s[:n] = ys[i]
        s[lay.a].add_(grad_ys[i])
        if kept is not None and kept[0] is s_in and compiled is not None:
            _, ds, last_fy[0] = kept
        elif kept is not None and kept[0] is s_in:
            _, out, fy_g, fy, inputs = kept
            ds = out + _flatten(_vjp(fy_g, inputs, torch.neg(grad_ys[i]).view_as(fy_g)))
            last_fy[0] = fy
        else:
            ds = aug_f(problem.t[i], s)  # does not depend on a_t
            stats.nfe += 1
        if t_grad:
            g = torch.dot(last_fy[0], grad_ys[i])
            time_vjps[i] = g
            s[lay.t] -= g
        return s, ds

    a_p = torch.zeros(n_p, dtype=dtype, device=device)
    if n_out == 1:
        return grad_ys[0], _split_params(a_p, params, p_numels), time_vjps
    s_n, ds_n = apply_jump(n_out - 1, torch.zeros(lay.total, dtype=dtype, device=device))
    options = dict(adj.options)
    adaptive = _error_controlled(adj.method)
    one_solve = adaptive and (adj.method in TABLEAUS or adj.method in ESDIRK_TABLEAUS)
    stops: list[int] = []
    if one_solve:
        # Output times whose dL/dy is zero need no jump, so no stop either (one synchronisation).
        nonzero = (grad_ys[1:-1] != 0).any(dim=1).tolist()
        stops = [i for i in range(n_out - 2, 0, -1) if nonzero[i - 1]]
    if adaptive:
        options["norm"] = _aug_norm(adj, lay, problem.shapes, y_shape)
        if stops and fwd_step and adj.method in TABLEAUS and options.get("first_step") is None:
            gap = abs(problem.t[-1] - problem.t[stops[0]])
            if fwd_step >= gap:  # the first stop cuts the first step short anyway
                options["first_step"] = gap
    aug_problem = Problem(
        f=aug_f,
        y0=s_n,
        t=problem.t[::-1],
        method=adj.method,
        options=options,
        rtol=lay.tol(adj.rtol),
        atol=lay.tol(adj.atol),
        shapes=None,
        f0=ds_n,
        # callback_*_adjoint on func see the backward solve (the flat backward state).
        callbacks=collect_callbacks(adj.func, adj.method, method_callbacks(adj.method), adjoint=True),
    )
    on_accept = None
    if quadrature and params:
        on_accept = _Quadrature(TABLEAUS[adj.method], aug_f, traj, f_flat, y_shape, params, lay, a_p, stats)
    if one_solve:  # one solve for all t_i
        aug_problem.t = [problem.t[-1], *(problem.t[i] for i in stops), problem.t[0]]
        stats.n_solves += 1

        def jump(j: int, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            next_jump[:] = (problem.t[stops[j]], grad_ys[stops[j]]) if j < len(stops) else (math.nan, None)
            return apply_jump(stops[j - 1], s)

        next_jump[:] = (problem.t[stops[0]], grad_ys[stops[0]]) if stops else (math.nan, None)
        s_0 = run(aug_problem, stats, jump=jump, on_accept=on_accept)[-1]
    else:  # fixed grids and the other methods: one solve per output interval, as torchdiffeq
        s, ds = s_n, ds_n
        for i in range(n_out - 1, 0, -1):
            piece = dataclasses.replace(aug_problem, t=[problem.t[i], problem.t[i - 1]])
            next_jump[:] = (problem.t[i - 1], grad_ys[i - 1]) if i > 1 else (math.nan, None)
            stats.n_solves += 1
            s = run(piece, stats, y0=s, f0=ds, on_accept=on_accept)[-1]
            if i > 1:
                s, ds = apply_jump(i - 1, s)
        s_0 = s
    a = s_0[lay.a] + grad_ys[0]
    if not quadrature:
        a_p = s_0[lay.p]
    if t_grad:
        time_vjps[0] = s_0[lay.t]
    return a, _split_params(a_p, params, p_numels), None if time_vjps is None else time_vjps.to(t.dtype)


def _forward_step_size(t_out: Sequence[float], stats: SolveStats) -> float | None:
    """The forward solve's step size near ``t_N``: the larger of its last accepted step and its mean step
    over the span (the last step may be one cut short to end on ``t_N``); ``None`` without steps."""
    if not stats.n_accepted or stats.last_step is None:
        return None
    return max(stats.last_step, abs(t_out[-1] - t_out[0]) / stats.n_accepted)


def _check_differentiable(adj: _AdjointSetup, t_grad: bool) -> None:
    if adj.sensitivity != "backsolve":
        raise NotImplementedError(
            f"higher-order gradients (create_graph=True) through odeint_adjoint need "
            f"sensitivity='backsolve'; sensitivity={adj.sensitivity!r} reads the state from the forward "
            "solve's dense output, which carries no graph (use sensitivity='backsolve', or odeint)"
        )
    if t_grad:
        raise NotImplementedError(
            "higher-order gradients (create_graph=True) through odeint_adjoint do not cover t; detach t "
            "(or use odeint)"
        )


def _backward_differentiable(problem: Problem, adj: _AdjointSetup, ys, grad_ys):
    """The backsolve backward pass as a differentiable computation (``create_graph=True``).

    The backward system ``s = [y, a, a_θ]``, ``ds/dt = [f, −aᵀ∂f/∂y, −aᵀ∂f/∂θ]`` is solved on each output
    interval by ``odeint_adjoint`` itself (its vector-Jacobian products built with ``create_graph``), and
    the jumps between intervals are ordinary tensor operations. So the gradient it returns is a
    differentiable function of ``θ``, of the saved outputs ``ys`` (themselves outputs of this adjoint)
    and of ``grad_ys``; differentiating it runs the adjoint of the backward system: O(1) memory in the
    number of steps again, with the same tolerances and method as the backward solve. Same step-size
    control (norm included) as the first-order backward pass, but one solve per output interval."""
    dtype = ys.dtype
    n_out = ys.shape[0]
    ys = ys.reshape(n_out, -1)
    grad_ys = grad_ys.reshape(n_out, -1).to(dtype)
    n = ys.shape[1]
    params = adj.params
    p_numels = [p.numel() for p in params]
    lay = _Layout(n=n, with_y=True, n_p=sum(p_numels), n_t=0)
    f_flat = _flat_func(adj.func, problem.shapes)
    y_shape = problem.y0.shape if problem.shapes is None else (n,)

    def aug_f(tt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # In the solve's forward pass (no grad mode) nothing needs a graph, and ``s`` may still hang on
        # the outer graph (the first evaluation): y is cut off from it. In its backward pass ``s`` is a
        # fresh leaf, so the derivatives taken from its slices are partial ones, as they must be.
        build = torch.is_grad_enabled()
        y, a = s[:n].view(y_shape), s[lay.a]
        with torch.enable_grad():
            y_ = y if build and y.requires_grad else y.detach().requires_grad_(True)
            fy = f_flat(tt.to(dtype), y_)
            if fy.requires_grad:
                vjps = torch.autograd.grad(
                    fy,
                    (y_, *params),
                    -a.view_as(fy),
                    create_graph=build,
                    allow_unused=True,
                    materialize_grads=True,
                )
            else:
                vjps = tuple(torch.zeros_like(x) for x in (y_, *params))
        return torch.cat([fy.reshape(-1), *(v.reshape(-1).to(dtype) for v in vjps)])

    options = dict(adj.options)
    if _error_controlled(adj.method):
        options["norm"] = _aug_norm(adj, lay, problem.shapes, y_shape)
    rtol, atol = lay.tol(adj.rtol), lay.tol(adj.atol)
    t_all = torch.tensor(problem.t, dtype=torch.float64)
    s = torch.cat([ys[-1], grad_ys[-1], grad_ys.new_zeros(lay.n_p)])
    for i in range(n_out - 1, 0, -1):
        s = odeint_adjoint(
            aug_f,
            s,
            t_all[[i, i - 1]],
            rtol=rtol,
            atol=atol,
            method=adj.method,
            options=options,
            adjoint_params=params,
        )[-1]
        s = torch.cat([ys[i - 1], s[lay.a] + grad_ys[i - 1], s[lay.p]])
    a_y = s[lay.a] if n_out > 1 else grad_ys[0]
    return a_y, _split_params(s[lay.p], params, p_numels)


def _error_controlled(method: str) -> bool:
    """Whether ``method`` steps under error control with ``options['norm']`` (adaptive tableaus, kvaerno*)."""
    return method_options(method)[1] or method in ESDIRK_TABLEAUS


def _split_params(a_p: torch.Tensor, params, p_numels) -> list[torch.Tensor]:
    return [g.view_as(p).to(p.dtype) for g, p in zip(a_p.split(p_numels), params)]


def _check_non_leaf_used(problem: Problem, params, non_leaf: dict[int, int]) -> None:
    """A non-leaf tensor in ``adjoint_params`` that ``func`` does not use would get a zero gradient and
    pass none on to the tensors it was computed from: almost surely a mistake, so it is an error. Checked
    on one evaluation ``func(t0, y0)`` with autograd (only when such tensors are given)."""
    ks = list(non_leaf)
    with torch.enable_grad():
        fy = problem.f(problem.t[0], problem.y0.detach())
    used = (
        torch.autograd.grad(fy, [params[k] for k in ks], torch.ones_like(fy), allow_unused=True)
        if fy.requires_grad
        else [None] * len(ks)
    )
    for k, g in zip(ks, used):
        if g is None:
            raise ValueError(
                f"adjoint_params[{non_leaf[k]}] is not a leaf tensor and func does not use it, so no "
                "gradient could reach the tensors it was computed from; pass the tensor func uses (or "
                "compute it inside func)"
            )


class _Trajectory:
    """``y(t)`` of the forward solve, read from the tableau's dense output of its steps.

    Either every forward step's dense output was kept (``dense``: ``(t, h, y, Q)`` per step, ``Q`` the
    coefficients of :class:`_DensePoly`, recorded by :class:`_DenseRecorder`), or only checkpoints
    (``trace`` and ``states``, as ``odeint_checkpoint`` records them): then the steps of the segment
    holding ``t`` are re-solved (no graph, identical arithmetic) from its checkpoint when first needed;
    two segments stay cached."""

    def __init__(self, problem: Problem, ys: torch.Tensor, stats: SolveStats, record: tuple):
        self.f, self.stats = problem.f, stats
        self.tab = TABLEAUS.get(problem.method)
        self.poly = _DensePoly((self.tab or ESDIRK_TABLEAUS[problem.method]).dense)
        t_out = problem.t
        self.direction = 1.0 if t_out[-1] > t_out[0] else -1.0
        self.cache: collections.OrderedDict = collections.OrderedDict()
        kind, *data = record
        if kind == "dense":
            (dense,) = data
            ends = [(d[0], d[2]) for d in dense[1:]] + [(t_out[-1], ys[-1].view(problem.y0.shape))]
            # y0 (the first step's state) may hang on the caller's graph: every value read here is detached
            steps = [(t, h, y.detach(), q, y1.detach(), t1) for (t, h, y, q), (t1, y1) in zip(dense, ends)]
            self.keys = [self.direction * dense[0][0]]
            self.cache[0] = ([self.direction * d[0] for d in dense], steps)
            self.max_cached = 1
        else:
            trace, states = data
            self.trace = trace
            self.ends = [trace[j + 1][0] for j in range(len(trace) - 1)] + [t_out[-1]]
            self.starts = sorted(states)
            self.states = states
            self.keys = [self.direction * trace[s][0] for s in self.starts]
            self.max_cached = 2

    def __call__(self, tt: float) -> torch.Tensor:
        """``y(tt)``: the stored tensor itself at a step's start or end (callers must not modify it), else a
        new flat tensor."""
        x = self.direction * tt
        seg = max(bisect.bisect_right(self.keys, x) - 1, 0)
        cached = self.cache.get(seg)
        keys, steps = cached if cached is not None else self._segment(seg)
        t, h, y, q, y1, t1 = steps[max(bisect.bisect_right(keys, x) - 1, 0)]
        if tt == t1:
            return y1
        theta = (tt - t) / h
        if theta <= 0.0:
            return y
        return self.poly.at(theta, y, q)

    @torch.no_grad()
    def _segment(self, seg: int):
        if seg in self.cache:
            self.cache.move_to_end(seg)
            return self.cache[seg]
        tab, stats = self.tab, self.stats
        start = self.starts[seg]
        end = self.starts[seg + 1] if seg + 1 < len(self.starts) else len(self.trace)
        y = self.states[start].detach()  # the first checkpoint is y0, which may hang on the caller's graph
        f0 = self.f(self.trace[start][0], y)
        stats.nfe += 1
        keys, steps = [], []
        for j in range(start, end):
            t, h = self.trace[j]
            t1 = self.ends[j]
            y1, k = rk_step(self.f, tab, t, h, y, f0)
            stats.nfe += tab.stages - 1
            f1 = k[-1] if tab.fsal else self.f(t1, y1)
            stats.nfe += 0 if tab.fsal else 1
            k_ext = [*k, f1]
            if tab.uses_extra_stages:  # dense_eval appends the extra stages to k_ext
                dense_eval(self.f, tab, t, h, y, k_ext, [0.5], stats)
            keys.append(self.direction * t)
            steps.append((t, h, y, self.poly.coefficients(h, k_ext), y1, t1))
            y, f0 = y1, f1
        self.cache[seg] = (keys, steps)
        if len(self.cache) > self.max_cached:
            self.cache.popitem(last=False)
        return keys, steps


class _DensePoly:
    """A tableau's dense output as a polynomial in θ per step: ``y(t + θh) = y + Σ_k θᵏ q_k`` with
    ``q_k = h Σ_j P[j][k−1] K_j`` over the extended stages ``K_j`` (``P``: ``tab.dense``, the weights'
    coefficients of θ¹, θ², …). The coefficients ``Q = (q_1, q_2, …)`` are formed once per step
    (``(state size, degree)``, fewer columns than stages), so a value costs one matrix-vector product."""

    def __init__(self, dense: Sequence[Sequence[float]]):
        self.degree = max(len(p) for p in dense)
        self.p = [[p[k] if k < len(p) else 0.0 for k in range(self.degree)] for p in dense]
        self.p_tensor: dict = {}  # (dtype, device) -> P

    def coefficients(self, h: float, k_ext: list[torch.Tensor]) -> torch.Tensor:
        """``Q`` of a step of size ``h`` with extended stages ``k_ext``: ``(state size, degree)``."""
        K = torch.stack(k_ext).reshape(len(k_ext), -1)
        p = self.p_tensor.get((K.dtype, K.device))
        if p is None:
            p = self.p_tensor[(K.dtype, K.device)] = torch.tensor(self.p, dtype=K.dtype, device=K.device)
        return torch.mm(K.T, p).mul_(h)

    def at(self, theta: float, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``y + Σ_k θᵏ q_k``, a new flat tensor (``y`` may be non-contiguous: ``y0`` as passed)."""
        powers = [theta]
        for _ in range(self.degree - 1):
            powers.append(powers[-1] * theta)
        w = torch.tensor(powers, dtype=y.dtype)
        if not y.is_cpu:
            w = w.to(y.device, non_blocking=True)
        return torch.addmv(y.reshape(-1), q, w)


class _DenseRecorder:
    """``on_accept`` hook of the forward solve that keeps every step's start, size, state and dense-output
    coefficients (:class:`_DensePoly`)."""

    def __init__(self, problem: Problem, stats: SolveStats):
        self.f, self.tab, self.stats = problem.f, TABLEAUS[problem.method], stats
        self.poly = _DensePoly(self.tab.dense)
        self.steps: list = []

    def __call__(self, t: float, h: float, y: torch.Tensor, k_ext: list[torch.Tensor]) -> None:
        if self.tab.uses_extra_stages:  # dense_eval appends the extra stages to k_ext
            dense_eval(self.f, self.tab, t, h, y, k_ext, [0.5], self.stats)
        self.steps.append((t, h, y, self.poly.coefficients(h, k_ext)))


class _Quadrature:
    """``on_accept`` hook of the backward solve: ``a_θ += h Σ_j w_j (−a(t_j)ᵀ ∂f/∂θ(t_j, y(t_j)))`` at
    Gauss-Legendre nodes of each accepted step (``⌈(order + 1)/2⌉`` nodes: exact beyond the method's
    order), ``a(t_j)`` from the step's dense output, ``y(t_j)`` from the forward trajectory; one
    vector-Jacobian product for all nodes."""

    def __init__(self, tab, aug_f, traj, f_flat, y_shape, params, lay: _Layout, a_p, stats):
        m = max(2, math.ceil((tab.order + 1) / 2))
        x, w = np.polynomial.legendre.leggauss(m)
        self.thetas = [float(v) for v in (x + 1) / 2]
        self.weights = [float(v) for v in w / 2]
        self.tab, self.aug_f, self.traj, self.f_flat = tab, aug_f, traj, f_flat
        self.y_shape, self.params, self.lay, self.a_p, self.stats = y_shape, params, lay, a_p, stats

    def __call__(self, t: float, h: float, s: torch.Tensor, k_ext: list[torch.Tensor]) -> None:
        lay = self.lay
        nodes = dense_eval(self.aug_f, self.tab, t, h, s, k_ext, self.thetas, self.stats)
        outs, cots = [], []
        dtype, device = s.dtype, s.device
        with torch.enable_grad():
            for th, w, s_j in zip(self.thetas, self.weights, nodes):
                tt = t + th * h
                fy = self.f_flat(_time(tt, dtype, device), self.traj(tt).view(self.y_shape))
                if fy.requires_grad:
                    outs.append(fy)
                    cots.append(s_j[lay.a].view_as(fy) * (-w * h))
        self.stats.nfe += len(self.thetas)
        if not outs:
            return
        grads = _vjp(tuple(outs), self.params, tuple(cots))
        self.a_p.add_(torch.cat([g.reshape(-1).to(dtype) for g in grads]))


def _aug_norm(adj: _AdjointSetup, lay: _Layout, shapes, y_shape) -> Callable:
    state_norm = adj.state_norm
    params = adj.params
    p_numels = [p.numel() for p in params]
    n = lay.n
    if adj.user_norm is not None:
        user = adj.user_norm
        sizes = None if shapes is None else [math.prod(s) for s in shapes]

        def state_parts(v: torch.Tensor) -> list[torch.Tensor]:
            if sizes is None:
                return [v.view(y_shape)]
            return [p.view(s) for p, s in zip(v.split(sizes), shapes)]

        def user_norm(s: torch.Tensor) -> torch.Tensor:
            parts = [s[lay.t] if lay.n_t else s.new_zeros(())]
            if lay.with_y:
                parts.extend(state_parts(s[:n]))
            parts.extend(state_parts(s[lay.a]))
            if lay.n_p:
                parts.extend(g.view(p.shape) for g, p in zip(s[lay.p].split(p_numels), params))
            return torch.as_tensor(user(tuple(parts)))

        return user_norm

    if adj.seminorm or not lay.n_p:
        if not lay.with_y and not lay.n_t:  # interpolating, quadrature: the state's adjoint alone
            return lambda s: state_norm(s[lay.a])

        def seminorm(s: torch.Tensor) -> torch.Tensor:
            parts = [state_norm(s[:n])] if lay.with_y else []
            parts.append(state_norm(s[lay.a]))
            if lay.n_t:
                parts.append(s[lay.t].abs())
            return torch.stack(parts).max()

        return seminorm

    inv_sqrt = None

    def default_norm(s: torch.Tensor) -> torch.Tensor:
        nonlocal inv_sqrt
        if inv_sqrt is None:
            inv_sqrt = torch.tensor([1.0 / math.sqrt(m) for m in p_numels], dtype=s.dtype, device=s.device)
        p_norms = torch.stack(torch._foreach_norm(list(s[lay.p].split(p_numels)))) * inv_sqrt
        parts = [state_norm(s[:n]).reshape(1)] if lay.with_y else []
        parts.extend([state_norm(s[lay.a]).reshape(1), p_norms])
        if lay.n_t:
            parts.append(s[lay.t : lay.t + 1].abs())
        return torch.cat(parts).max()

    return default_norm
