"""The adjoint method for per-sample stepping: O(1) memory in the number of steps, every sample its own
step sizes forwards *and* backwards.

The backward pass solves, for each sample ``b``, the augmented system ``[y_b, a_b, a_θ^b]`` backwards with
:func:`~neuralode.odeint_per_sample`. The parameter adjoint must be per sample (``(B, P)``) because each
sample's quadrature runs on its own steps; its right-hand side ``-a_bᵀ ∂f_b/∂θ`` for all samples at once is
one batched vector-Jacobian product (``torch.autograd.grad(..., is_grads_batched=True)``: B cotangents,
each non-zero on one sample). That costs memory ``B × P`` and a backward pass vectorised over B, so
this is for moderate batches and parameter counts; the joint ``odeint_adjoint`` is cheaper when the
samples' step sizes would be alike anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from neuralode._batched import _check_inputs, odeint_per_sample

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
    y0_checked, t2, _, _ = _check_inputs(func, y0, t, rtol, atol)
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
        with torch.no_grad():
            ys = odeint_per_sample(
                settings["func"],
                y0,
                settings["t2"],
                rtol=settings["rtol"],
                atol=settings["atol"],
                method=settings["method"],
                options=settings["options"],
            )
        ctx.settings = settings
        ctx.save_for_backward(ys, *params)
        return ys

    @staticmethod
    def backward(ctx, grad_ys: torch.Tensor):
        ys, *params = ctx.saved_tensors
        s = ctx.settings
        func, t2 = s["func"], s["t2"]
        T, B = ys.shape[0], ys.shape[1]
        shape = ys.shape[1:]
        ys_flat = ys.reshape(T, B, -1)
        g = grad_ys.reshape(T, B, -1).to(ys.dtype)
        n = ys_flat.shape[2]
        p_numels = [p.numel() for p in params]
        P = sum(p_numels)
        eye = torch.eye(B, dtype=ys.dtype, device=ys.device).unsqueeze(2)  # (B, B, 1)

        def aug_f(tt: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            y, a = state[:, :n], state[:, n : 2 * n]
            with torch.enable_grad():
                y_ = y.detach().requires_grad_(True)
                fy = func(tt, y_.view(shape)).reshape(B, n)
                if not fy.requires_grad:
                    return torch.cat([fy, torch.zeros_like(y), state.new_zeros(B, P)], dim=1)
                (vjp_y,) = torch.autograd.grad(fy, y_, -a, retain_graph=bool(params), allow_unused=True)
                vjp_y = torch.zeros_like(y) if vjp_y is None else vjp_y
                parts = [fy.detach(), vjp_y]
                if params:
                    # Row b of the result: -a_bᵀ ∂f_b/∂θ, one batched vjp over B one-sample cotangents.
                    cot = -a.unsqueeze(0) * eye  # (B, B, n)
                    vjps = torch.autograd.grad(
                        fy, params, cot, is_grads_batched=True, allow_unused=True, materialize_grads=True
                    )
                    parts.extend(v.reshape(B, -1).to(ys.dtype) for v in vjps)
            return torch.cat(parts, dim=1)

        a = g[-1]
        a_p = ys.new_zeros(B, P)
        for i in range(T - 1, 0, -1):
            state0 = torch.cat([ys_flat[i], a, a_p], dim=1)
            rows = torch.stack([t2[:, i], t2[:, i - 1]], dim=1)
            state1 = odeint_per_sample(
                aug_f,
                state0,
                rows,
                rtol=s["adjoint_rtol"],
                atol=s["adjoint_atol"],
                method=s["method"],
                # Error norm: max of the RMS of y, of a and of the parameter adjoint (as odeint_adjoint):
                # one RMS over all would let thousands of parameter entries drown the state's error.
                options={"_groups": (n, n, P)},
            )[-1]
            a = state1[:, n : 2 * n] + g[i - 1]
            a_p = state1[:, 2 * n :]
        grads = []
        offset = 0
        total = a_p.sum(dim=0)
        for p, m in zip(params, p_numels):
            grads.append(total[offset : offset + m].view_as(p).to(p.dtype))
            offset += m
        return (None, a.view(shape), *grads)
