"""``odeint_adjoint``: gradients by solving the adjoint ODE backwards in time, at O(1) memory in the number
of solver steps (Chen et al. 2018, §2 and Appendix B; Kidger, Chen & Lyons 2021 for the seminorm).

The forward solve keeps no autograd graph; it stores only the outputs ``y(t_i)``. The backward pass
integrates the augmented state ``s = [y, a, a_θ, a_t]`` (flattened into one vector, so the same engine
as the forward solve runs it) from ``t_N`` to ``t_0``, one output interval at a time:

    dy/dt = f(t, y),   da/dt = −aᵀ ∂f/∂y,   da_θ/dt = −aᵀ ∂f/∂θ,   da_t/dt = −aᵀ ∂f/∂t

with the three vector-Jacobian products from one ``torch.autograd.grad`` call per evaluation. At each
output time the reconstructed ``y`` is replaced by the stored forward value (cheap partial
checkpointing, §1.4 of our notes) and ``dL/dy(t_i)`` is added to ``a``.

The gradient it returns is the exact gradient of the continuous solution evaluated along a numerically
reconstructed trajectory: it differs from backpropagation through the solver by O(tolerance). When that
difference matters (stiff or strongly contracting dynamics, loose tolerances), use ``odeint`` (direct)
or ``odeint_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from neuralode._callbacks import collect_callbacks
from neuralode._control import make_norm
from neuralode._odeint import (
    SOLVERS,
    Problem,
    _check_tol,
    make_problem,
    method_callbacks,
    method_options,
    run,
)
from neuralode._stats import SolveStats, _report_backward, _report_forward

__all__ = ["odeint_adjoint"]

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


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
) -> TensorOrTuple:
    """Solve ``dy/dt = func(t, y)`` like :func:`~neuralode.odeint`; gradients by the adjoint method.

    Memory does not grow with the number of solver steps: the forward pass stores only the outputs.
    The price is a second solve (backwards, of a system about twice the state plus the parameters) and a
    gradient that matches backpropagation through the solver only to O(tolerance).

    Args:
        func, y0, t, rtol, atol, method, options: as for :func:`~neuralode.odeint`.
        event_fn: terminal event, as for :func:`~neuralode.odeint`: returns ``(event_t, solution)``; the
            state at the event is differentiated by the adjoint with the event time held fixed (use
            :func:`~neuralode.odeint_event` for a differentiable event time). The event is located by a
            gradient-free ``odeint`` solve first, then the adjoint solve runs to it.
        adjoint_rtol, adjoint_atol: tolerances of the backward solve; default ``rtol``/``atol``.
        adjoint_method: solver of the backward solve; default ``method``.
        adjoint_options: options of the backward solve; default ``options`` without its ``norm`` (when
            ``adjoint_method`` is ``method``). ``{"norm": "seminorm"}`` leaves the parameter adjoint
            ``a_θ`` out of the error estimate (Kidger, Chen & Lyons 2021): it never feeds back into the
            dynamics, so controlling its error only costs steps. ``"norm"`` may also be a callable that
            receives the tuple ``(a_t, y, a, *a_θ)`` of flat tensors (torchdiffeq's convention). The
            default norm is the max over the RMS of ``y``, ``a`` (each measured with the forward norm),
            of every parameter's adjoint, and ``|a_t|``.
        adjoint_params: the tensors to compute gradients for; default ``tuple(func.parameters())`` when
            ``func`` is an ``nn.Module``. Tensors that ``func`` uses but that are not listed here get
            no gradient. Listed tensors that ``func`` does not use get zeros.

    Returns:
        ``(len(t), *y0.shape)`` tensor, or a tuple of ``(len(t), *y0[i].shape)`` tensors.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SolverError: the forward or the backward solve failed.
    """
    if event_fn is not None:  # torchdiffeq's event mode: (event_t, solution), event_t without gradient
        from neuralode._event import solve_to_event_with

        kwargs = dict(rtol=rtol, atol=atol, method=method, options=options, adjoint_rtol=adjoint_rtol)
        kwargs.update(
            adjoint_atol=adjoint_atol, adjoint_method=adjoint_method, adjoint_options=adjoint_options
        )
        return solve_to_event_with(
            odeint_adjoint, func, y0, t, event_fn, adjoint_params=adjoint_params, **kwargs
        )
    params = _check_params(func, adjoint_params)
    y0_flat = torch.cat([x.reshape(-1) for x in y0]) if isinstance(y0, (tuple, list)) else y0
    with torch.no_grad():
        problem = make_problem(func, y0, t, rtol, atol, method, options)
    adjoint = _adjoint_setup(
        func, problem, params, adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options, options
    )
    ys = _Adjoint.apply(problem, adjoint, t, y0_flat, *params)
    return problem.unflatten(ys)


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


def _check_params(
    func, adjoint_params, name: str = "adjoint_params", who: str = "odeint_adjoint"
) -> tuple[torch.Tensor, ...]:
    """The tensors that get gradients: given ones (leaf tensors), or ``func``'s parameters."""
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
            if not p.is_leaf:
                raise ValueError(
                    f"{name}[{i}] is not a leaf tensor (it was computed from other tensors); "
                    "pass the leaf tensors it was computed from, or compute it inside func"
                )
            if p.requires_grad and not p.is_floating_point():
                raise TypeError(f"{name}[{i}] must be floating point, got dtype {p.dtype}")
    return tuple(p for p in params if p.requires_grad)


def _adjoint_setup(func, problem: Problem, params, rtol, atol, method, options, fwd_options) -> _AdjointSetup:
    method = problem.method if method is None else method
    if not isinstance(method, str) or method not in SOLVERS:
        raise ValueError(
            f"adjoint_method={method!r} is not a known method; valid methods: {', '.join(SOLVERS)}"
        )
    valid, adaptive = method_options(method)
    if options is None:
        # The backward dynamics call the autograd engine, which torch.compile cannot trace: the forward
        # solve's "compile" stays with the forward solve.
        options = {
            k: v for k, v in (fwd_options or {}).items() if k not in ("norm", "compile") and k in valid
        }
    elif not isinstance(options, dict):
        raise TypeError(f"adjoint_options must be a dict, got {type(options).__name__}")
    else:
        options = dict(options)
        valid = valid | {"norm"}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(
                f"unknown adjoint_options {unknown} for adjoint_method {method!r}; valid options: "
                f"{', '.join(sorted(valid))}"
            )
    if options.get("compile"):
        raise ValueError(
            "adjoint_options['compile'] is not supported: the backward dynamics run the autograd engine, "
            "which torch.compile cannot trace (options['compile'] still compiles the forward solve)"
        )
    options.pop("compile", None)
    norm = options.pop("norm", None)
    if norm is not None and not adaptive:
        raise ValueError(
            f"adjoint_options['norm'] has no effect with the fixed-step adjoint_method={method!r}; drop it "
            "or choose an adaptive adjoint_method"
        )
    if norm is not None and norm != "seminorm" and not callable(norm):
        raise ValueError(f"adjoint_options['norm']={norm!r}; expected 'seminorm' or a callable")
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
    )


def _aug_tol(tol, name: str, problem: Problem):
    """The backward tolerance on the flat state: a float, or a per-element tensor of the flat state's
    size (``_expand`` extends it to the augmented state)."""
    tol = _check_tol(name, tol, problem.y0, problem.shapes)  # (re-)validates the forward default too
    if isinstance(tol, float):
        return tol
    return tol.expand(problem.y0.shape).reshape(-1)


# -- the autograd function ---------------------------------------------------------------------------


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: Problem, adjoint: _AdjointSetup, t, y0_flat, *params):
        stats = SolveStats(n_solves=1, nfe=1)  # func(t0, y0) in make_problem
        with torch.no_grad():
            ys = torch.stack(run(problem, stats))
        ctx.sinks = _report_forward(stats)
        ctx.problem, ctx.adjoint = problem, adjoint
        ctx.t_grad = t.requires_grad
        ctx.save_for_backward(t, ys)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ys):
        t, ys = ctx.saved_tensors
        problem, adjoint = ctx.problem, ctx.adjoint
        stats = SolveStats()
        grad_y0, grad_params, grad_t = _backward(problem, adjoint, t, ys, grad_ys, ctx.t_grad, stats)
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


def _vjp(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad(out, inputs, v, allow_unused=True, materialize_grads=True)``.

    Calls the autograd engine directly: ``v`` has ``out``'s shape and dtype by construction, so the
    public wrapper's argument normalisation and shape checks are pure overhead, ~30 µs of the ~170 µs
    an adjoint evaluation of a small network costs on CPU. Falls back to the public call if the
    engine's signature ever differs."""
    if _ENGINE is not None:
        try:
            res = _ENGINE.run_backward((out,), (v,), False, False, inputs, True, accumulate_grad=False)
        except TypeError:
            pass
        else:
            return tuple(r if r is not None else torch.zeros_like(x) for r, x in zip(res, inputs))
    return torch.autograd.grad(out, inputs, v, allow_unused=True, materialize_grads=True)


def _backward(problem: Problem, adj: _AdjointSetup, t, ys, grad_ys, t_grad: bool, stats: SolveStats):
    """Integrate the augmented system over each output interval, last to first."""
    dtype, device = ys.dtype, ys.device
    n_out = ys.shape[0]
    ys = ys.reshape(n_out, -1)
    grad_ys = grad_ys.reshape(n_out, -1).to(dtype)
    n = ys.shape[1]
    params = adj.params
    p_numels = [p.numel() for p in params]
    n_p = sum(p_numels)
    n_t = 1 if t_grad else 0
    f_flat = _flat_func(adj.func, problem.shapes)
    y_shape = problem.y0.shape if problem.shapes is None else (n,)
    cast_params = any(p.dtype != dtype for p in params)

    def aug_f(tt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        y, a = s[:n], s[n : 2 * n]
        with torch.enable_grad():
            y_ = y.detach().view(y_shape).requires_grad_(True)
            tt_ = tt.detach().requires_grad_(t_grad)
            fy = f_flat(tt_, y_)
            inputs = (y_, *params, tt_) if t_grad else (y_, *params)
            if fy.requires_grad:
                vjps = _vjp(fy, inputs, -a.view_as(fy))
            else:  # f does not depend on anything differentiable
                vjps = tuple(torch.zeros_like(x) for x in inputs)
        parts = [fy.detach().reshape(-1), vjps[0].reshape(-1)]
        if cast_params:
            parts.extend(v.reshape(-1).to(dtype) for v in vjps[1 : 1 + len(params)])
        else:
            parts.extend(v.reshape(-1) for v in vjps[1 : 1 + len(params)])
        if t_grad:
            parts.append(vjps[-1].reshape(1).to(dtype))
        return torch.cat(parts)

    options = dict(adj.options)
    if method_options(adj.method)[1]:
        options["norm"] = _aug_norm(adj, n, p_numels, n_t)
    total = 2 * n + n_p + n_t
    a_p = torch.zeros(n_p, dtype=dtype, device=device)
    a_t = torch.zeros(n_t, dtype=dtype, device=device)
    a = grad_ys[-1]
    time_vjps = torch.zeros(n_out, dtype=dtype, device=device) if t_grad else None
    aug_problem = None
    for i in range(n_out - 1, 0, -1):
        if t_grad:
            with torch.no_grad():
                f_i = f_flat(torch.tensor(problem.t[i], dtype=dtype, device=device), ys[i].view(y_shape))
            stats.nfe += 1
            g = torch.dot(f_i.reshape(-1), grad_ys[i])
            time_vjps[i] = g
            a_t = a_t - g
        s0 = torch.cat([ys[i], a, a_p, a_t])
        interval = torch.tensor([problem.t[i], problem.t[i - 1]], dtype=torch.float64, device=device)
        if aug_problem is None:
            with torch.no_grad():
                aug_problem = make_problem(
                    aug_f, s0, interval, _expand(adj.rtol, n, total), _expand(adj.atol, n, total),
                    adj.method, options,
                )  # fmt: skip
            # callback_*_adjoint on func see the backward solve (flat augmented state [y, a_y, a_θ, a_t]).
            aug_problem.callbacks = collect_callbacks(
                adj.func, adj.method, method_callbacks(adj.method), adjoint=True
            )
            f0 = aug_problem.f0
        else:
            aug_problem = dataclasses.replace(aug_problem, t=[problem.t[i], problem.t[i - 1]], y0=s0)
            with torch.no_grad():
                f0 = aug_problem.f(problem.t[i], s0)
        stats.nfe += 1
        stats.n_solves += 1
        with torch.no_grad():
            s1 = run(aug_problem, stats, y0=s0, f0=f0)[-1]
        a = s1[n : 2 * n] + grad_ys[i - 1]
        a_p = s1[2 * n : 2 * n + n_p]
        a_t = s1[2 * n + n_p :]
    grad_params = []
    offset = 0
    for p, m in zip(params, p_numels):
        grad_params.append(a_p[offset : offset + m].view_as(p).to(p.dtype))
        offset += m
    grad_t = None
    if t_grad:
        time_vjps[0] = a_t.reshape(())
        grad_t = time_vjps.to(t.dtype)
    return a, grad_params, grad_t


def _expand(tol, n: int, total: int):
    """Per-element tolerance on the state → on the augmented state (see ``_aug_tol``)."""
    if isinstance(tol, float):
        return tol
    rest = tol.min().expand(total - 2 * n)
    return torch.cat([tol, tol, rest])


def _aug_norm(adj: _AdjointSetup, n: int, p_numels: list[int], n_t: int) -> Callable:
    state_norm = adj.state_norm
    n_p = sum(p_numels)
    if adj.user_norm is not None:
        user = adj.user_norm

        def user_norm(s: torch.Tensor) -> torch.Tensor:
            a_t = s[2 * n + n_p :].reshape(()) if n_t else s.new_zeros(())
            a_ps = s[2 * n : 2 * n + n_p].split(p_numels) if p_numels else ()
            return torch.as_tensor(user((a_t, s[:n], s[n : 2 * n], *a_ps)))

        return user_norm

    if adj.seminorm or not p_numels:

        def seminorm(s: torch.Tensor) -> torch.Tensor:
            parts = [state_norm(s[:n]), state_norm(s[n : 2 * n])]
            if n_t:
                parts.append(s[-1].abs())
            return torch.stack(parts).max()

        return seminorm

    inv_sqrt = None

    def default_norm(s: torch.Tensor) -> torch.Tensor:
        nonlocal inv_sqrt
        if inv_sqrt is None:
            inv_sqrt = torch.tensor([1.0 / math.sqrt(m) for m in p_numels], dtype=s.dtype, device=s.device)
        p_norms = torch.stack(torch._foreach_norm(list(s[2 * n : 2 * n + n_p].split(p_numels)))) * inv_sqrt
        parts = [state_norm(s[:n]).reshape(1), state_norm(s[n : 2 * n]).reshape(1), p_norms]
        if n_t:
            parts.append(s[-1:].abs())
        return torch.cat(parts).max()

    return default_norm
