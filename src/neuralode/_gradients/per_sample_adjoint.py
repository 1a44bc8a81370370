"""The adjoint method for per-sample stepping: O(1) memory in the number of steps, every sample its own
step sizes forwards *and* backwards.

The backward pass solves, for each sample ``b``, the augmented system ``[y_b, a_b]`` backwards with
:func:`~neuralode.odeint_per_sample` (error norm: the max of the RMS of ``y`` and of ``a``), as *one*
solve from each row's last output time to its first: a row ends a step on each of its output times,
where ``y_b ← y_b(t_i)`` and ``a_b += dL/dy_b(t_i)`` (its first stage re-evaluated), and carries its step
size and controller history on. The parameter
adjoint ``a_θ = ∫ −aᵀ ∂f/∂θ dt`` does not feed back into the dynamics, so it is not part of the state: it
is a quadrature along each sample's *accepted* steps, ``a_θ += Σ_b h_b Σ_i b_i (−a_{b,i}ᵀ ∂f/∂θ)``,
computed after each step's accept/reject decision as one ordinary vector-Jacobian product per stage
with the cotangent rows scaled by each sample's ``h_b`` (0 for rejected or finished samples). Cost: about
twice the backward work of the state-only adjoint (each stage with a non-zero weight ``b_i`` is
re-evaluated once for the parameters); parameters take no part in step-size control (a seminorm).
The backward solve is reported to ``record_stats`` as a forward solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from neuralode._errors import SolverError
from neuralode._integrate.per_sample import odeint_per_sample, solve_rows
from neuralode._problem import make_rows_problem
from neuralode._solvers.explicit import TABLEAUS
from neuralode._stats import SolveStats

__all__ = ["odeint_per_sample_adjoint"]


def odeint_per_sample_adjoint(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: torch.Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_params: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`~neuralode.odeint_per_sample` with gradients by the per-sample adjoint method.

    Same arguments and result ``(T, B, *shape)``; ``func`` must treat the samples independently (sample
    ``b`` of its output depends only on sample ``b`` of ``y``). Gradients flow to ``y0`` and to
    ``adjoint_params`` (default: ``func.parameters()`` when ``func`` is a module), not to ``t``.
    ``adjoint_rtol``/``adjoint_atol`` (default: ``rtol``/``atol``) control the backward solves.
    """
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, torch.nn.Module) else ()
    params = tuple(p for p in adjoint_params if p.requires_grad)
    if method is not None and method not in TABLEAUS and isinstance(method, str):
        explicit = ", ".join(m for m, tab in TABLEAUS.items() if tab.adaptive)
        raise ValueError(
            f"method={method!r}: the per-sample adjoint supports the explicit adaptive methods ({explicit}) "
            "(its quadrature and backward solve take explicit Runge-Kutta stages); for the stiff methods use "
            "odeint_per_sample (backpropagation through the steps, each implicit stage by the implicit "
            "function theorem) or the joint odeint_adjoint"
        )
    t2 = make_rows_problem(func, y0, t, rtol, atol, method, options, evaluate=False).t
    y0_checked = y0
    for name, tol, adj in (("rtol", rtol, adjoint_rtol), ("atol", atol, adjoint_atol)):
        if isinstance(tol, torch.Tensor) and adj is None:
            raise ValueError(
                f"{name} is a tensor (shaped like the state); the backward solve's augmented state has another "
                f"shape, so pass adjoint_{name} as a float"
            )
        if isinstance(adj, torch.Tensor):
            raise TypeError(f"adjoint_{name} must be a float, got a tensor")
    settings = {
        "func": func,
        "t2": t2,
        "rtol": rtol,
        "atol": atol,
        "method": method,
        "options": options,
        "adjoint_rtol": rtol if adjoint_rtol is None else adjoint_rtol,
        "adjoint_atol": atol if adjoint_atol is None else adjoint_atol,
    }
    return _PerSampleAdjoint.apply(settings, y0_checked, *params)


class _PerSampleAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, settings: dict, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        stats = SolveStats()
        with torch.no_grad():
            ys = odeint_per_sample(
                settings["func"],
                y0,
                settings["t2"],
                rtol=settings["rtol"],
                atol=settings["atol"],
                method=settings["method"],
                options=settings["options"],
                stats=stats,
            )
        # failed rows are possible with options["throw"] = False only
        ctx.status, ctx.t_reached = stats.status, stats.t_reached
        ctx.settings = settings
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "higher-order gradients (create_graph=True) are not supported by the per-sample adjoint; "
                "use odeint_per_sample (backpropagation through the solver) or the joint odeint_adjoint"
            )
        if (ctx.settings["options"] or {}).get("throw") is False and bool((ctx.status != 0).any()):
            b = int((ctx.status != 0).nonzero()[0])
            raise SolverError(
                SolveStats.STATUS[int(ctx.status[b])],
                "the per-sample adjoint cannot differentiate a solve whose samples stopped early "
                "(options['throw']=False): its backward pass starts from their states at t[-1], which were "
                "never reached; use odeint_per_sample for gradients of the part reached. Sample "
                f"{b} stopped",
                t=float(ctx.t_reached[b]),
                step_size=math.nan,
                n_steps=0,
            )
        ys, *params = ctx.saved_tensors
        s = ctx.settings
        func, t2 = s["func"], s["t2"]
        T, B = ys.shape[0], ys.shape[1]
        shape = ys.shape[1:]
        ys_flat = ys.reshape(T, B, -1)
        g = grad_ys.reshape(T, B, -1).to(ys.dtype)
        n = ys_flat.shape[2]
        b_pairs = TABLEAUS["dopri5" if s["method"] is None else s["method"]].b_nonzero
        p_sum = [torch.zeros_like(p) for p in params]

        def aug_f(tt: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            y, a = state[:, :n], state[:, n:]
            with torch.enable_grad():
                y_ = y.detach().requires_grad_(True)
                fy = func(tt, y_.view(shape)).reshape(B, n)
                if not fy.requires_grad:
                    return torch.cat([fy, torch.zeros_like(y)], dim=1)
                (vjp_y,) = torch.autograd.grad(fy, y_, -a, allow_unused=True)
            return torch.cat([fy.detach(), torch.zeros_like(y) if vjp_y is None else vjp_y], dim=1)

        def quad(stage_ts, stage_ys, w):
            """Parameter adjoint: a_θ += Σ_b h_b Σ_i b_i (−a_{b,i}ᵀ ∂f/∂θ at stage i), accepted steps only;
            one ordinary vjp per stage (the cotangent rows carry each sample's h_b)."""
            for j, bj in b_pairs:
                y, a = stage_ys[j][:, :n], stage_ys[j][:, n:]
                with torch.enable_grad():
                    fy = func(stage_ts[j], y.detach().view(shape)).reshape(B, n)
                    if not fy.requires_grad:
                        continue
                    cot = a * (w * (-bj)).unsqueeze(1)
                    vjps = torch.autograd.grad(fy, params, cot, allow_unused=True, materialize_grads=True)
                for acc, v in zip(p_sum, vjps):
                    acc.add_(v.to(acc.dtype))

        rows = torch.arange(B, device=ys.device)

        def jump(j: torch.Tensor, hit: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            """At its output time t_i (column j of the reversed times, i = T-1-j) a row takes y ← y(t_i)
            and a += dL/dy(t_i)."""
            i = T - 1 - j
            new = torch.cat([ys_flat[i, rows], state[:, n:] + g[i, rows]], dim=1)
            return torch.where(hit.unsqueeze(1), new, state)

        # One backward solve across all output times: each row stops on its own output times for the jump
        # and carries its step size and controller history on. Error norm: max of the RMS of y and of a
        # (the parameter adjoint is a quadrature outside the state, so it takes no part in step-size
        # control: a seminorm).
        backward = make_rows_problem(
            aug_f,
            torch.cat([ys_flat[-1], g[-1]], dim=1),
            t2.flip(1),
            s["adjoint_rtol"],
            s["adjoint_atol"],
            s["method"],
            None,
            groups=(n, n),
            quad=quad if params else None,
            jump=jump,
        )
        state1 = solve_rows(backward)[-1]
        a = state1[:, n : 2 * n] + g[0]
        return (None, a.view(shape), *p_sum)
