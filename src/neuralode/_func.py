"""``torch.func.vmap`` over ``odeint``: every vmapped problem with its own solve.

An adaptive solve decides on host numbers (accept or reject a step, when to stop), which ``vmap`` cannot
batch: under ``vmap`` each problem would need its own control flow. So when ``odeint`` runs with
``vmap`` as the innermost ``torch.func`` transform, it leaves the vmapped world for the duration of the
solve, as a batching rule does: the batched inputs become ordinary ``(B, ...)`` tensors, the engine runs
on them, and the result goes back as a batched tensor of the same ``vmap`` level.

- Adaptive explicit methods: the per-sample engine (:func:`odeint_per_sample`), so each problem takes
  the steps it would take alone (its own step sizes, rejections and end), as in a Python loop.
- Fixed-grid methods: one solve of the whole batch on the shared grid (the same arithmetic per sample).

``func`` is called with batched tensors of the same level (its ``t`` and ``y`` batched along the problems),
so tensors it captures from the vmapped function (parameters being vmapped over) work as usual. Gradients
(``loss.backward()``, ``torch.func.grad``/``jacrev`` outside the ``vmap``) flow through the engine's
operations. Not supported, with an error saying so: ``event_fn``, tuple states, the methods the
methods that build a Newton Jacobian with autograd or run outside PyTorch (``kvaerno*``, ``scipy_solver``)
and per-problem output times on a fixed grid. A batch of stiff problems, each with its own steps, is
``odeint(f, y0_batch, t, method="kvaerno5", options={"per_sample": True})`` instead.

``jacrev``/``jacfwd``/``jvp`` alone need nothing from here: their transforms allow the solver's host
decisions (the step sizes are not differentiated, as in ``odeint``).

This uses ``torch._C._functorch``'s batch-dimension primitives, the ones ``torch.func.vmap`` itself is
built on (an ``autograd.Function`` with a ``vmap`` rule cannot see the tensors ``func`` captures).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch._C import _functorch as _ft
from torch._functorch import pyfunctorch

from neuralode._integrate.joint import run
from neuralode._integrate.per_sample import odeint_per_sample
from neuralode._problem import SOLVERS, make_problem
from neuralode._solvers.explicit import ADAPTIVE_METHODS, FIXED_METHODS
from neuralode._solvers.registry import EXTRA_METHODS
from neuralode._stats import SolveStats, _report_forward

__all__ = ["odeint_vmapped", "vmap_level"]

_local = threading.local()


def vmap_level() -> tuple[int, int] | None:
    """``(level, batch size)`` when the innermost active ``torch.func`` transform is ``vmap`` (and this
    thread is not already inside a vmapped solve), else ``None``."""
    if _ft.maybe_current_level() is None or getattr(_local, "inside", False):
        return None
    top = pyfunctorch.retrieve_current_functorch_interpreter()
    if top.key() != _ft.TransformType.Vmap:
        return None
    return top.level(), top.batch_size()


def _unwrap(x: torch.Tensor, level: int, batch: int, what: str) -> torch.Tensor | None:
    """``x`` batched at ``level`` as a plain ``(batch, ...)`` tensor; ``None`` if ``x`` is not batched."""
    if not _ft.is_batchedtensor(x) or _ft.maybe_get_level(x) != level:
        return None
    value, bdim = _ft._unwrap_batched(x, level)
    value = value.movedim(bdim, 0) if bdim is not None else value.expand(batch, *value.shape)
    if _ft.is_batchedtensor(value):
        raise NotImplementedError(
            f"odeint under nested torch.func.vmap ({what} is batched at two levels) is not supported; "
            "flatten the batch dimensions into one vmap"
        )
    return value


def odeint_vmapped(
    level: tuple[int, int],
    func,
    y0,
    t: torch.Tensor,
    rtol: Any,
    atol: Any,
    method: str | None,
    options: dict[str, Any] | None,
    event_fn,
    stats,
):
    """``odeint`` called under ``torch.func.vmap`` (see the module docstring): returns a tensor batched at
    the ``vmap`` level, shaped ``(len(t), *y0.shape)`` per problem."""
    lvl, batch = level
    name = "dopri5" if method is None else method
    if event_fn is not None:
        raise NotImplementedError("odeint with event_fn under torch.func.vmap is not supported")
    if not isinstance(y0, torch.Tensor):
        raise NotImplementedError(
            "odeint under torch.func.vmap needs a single tensor y0 (a tuple state is not supported); "
            "concatenate the tensors into one"
        )
    if options is not None and options.get("per_sample"):
        raise ValueError(
            "options['per_sample'] has no meaning under torch.func.vmap (every problem is its own)"
        )
    if name not in SOLVERS:
        raise ValueError(f"method={method!r} is not a known method; valid methods: {', '.join(SOLVERS)}")
    adaptive = name in ADAPTIVE_METHODS
    if not adaptive and name not in _fixed_methods():
        raise NotImplementedError(
            f"method={name!r} under torch.func.vmap is not supported: each vmapped problem needs its own "
            f"adaptive steps, which the per-sample engine provides for {', '.join(ADAPTIVE_METHODS)} only. "
            "For a batch of stiff problems, solve a batched y0 with options={'per_sample': True} (each problem "
            "its own steps) or options={'jacobian': 'batch'} (shared steps)"
        )
    y0_b = _unwrap(y0, lvl, batch, "y0")
    t_b = _unwrap(t, lvl, batch, "t") if isinstance(t, torch.Tensor) else None
    if t_b is not None and not adaptive:
        raise NotImplementedError(
            "per-problem output times t under torch.func.vmap need an adaptive method (a fixed grid is shared)"
        )
    tol = {}
    for key, v in (("rtol", rtol), ("atol", atol)):
        vb = _unwrap(v, lvl, batch, key) if isinstance(v, torch.Tensor) else None
        if vb is not None:  # per problem: (B, *tol.shape), broadcast against (B, *y0.shape)
            vb = vb.reshape(batch, *([1] * (y0.dim() - (vb.dim() - 1))), *vb.shape[1:])
        tol[key] = v if vb is None else vb
    y0_plain = y0_b if y0_b is not None else y0.expand(batch, *y0.shape)
    t_plain = t_b if t_b is not None else t

    def wrap(x: torch.Tensor) -> torch.Tensor:
        return _ft._add_batch_dim(x, 0, lvl)

    def unwrap_out(out) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"func must return a tensor, got {type(out).__name__}")
        plain = _unwrap(out, lvl, batch, "func's output")
        return plain if plain is not None else out.expand(batch, *out.shape)

    def per_sample_func(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # tt: (B,)
        return unwrap_out(func(wrap(tt), wrap(y)))

    def joint_func(tt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # tt: 0-d, shared
        return unwrap_out(func(tt, wrap(y)))

    _local.inside = True
    try:
        if adaptive:
            ys = odeint_per_sample(
                per_sample_func, y0_plain, t_plain, method=name, options=options, stats=stats, **tol
            )
        else:
            problem = make_problem(joint_func, y0_plain, t_plain, tol["rtol"], tol["atol"], name, options)
            solve_stats = SolveStats(n_solves=1, nfe=1)  # the evaluation of func(t0, y0) in make_problem
            ys = torch.stack(run(problem, solve_stats))
            if stats is not None:
                stats.add(solve_stats)
            _report_forward(solve_stats)
    finally:
        _local.inside = False
    return _ft._add_batch_dim(ys, 1, lvl)  # (T, B, *shape) → per problem (T, *shape)


def _fixed_methods() -> frozenset[str]:
    """Fixed-grid methods (explicit tableaus and the non-tableau fixed-grid steppers)."""
    return frozenset(FIXED_METHODS) | {n for n, s in EXTRA_METHODS.items() if s.make_stepper is not None}
