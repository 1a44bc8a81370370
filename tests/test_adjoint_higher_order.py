"""Higher-order gradients: ``torch.autograd.grad(..., create_graph=True)`` through ``odeint`` and through
``odeint_adjoint`` (its backward pass differentiable), so Hessian-vector products and gradient penalties
work. References: the direct HVP through ``odeint`` and double central finite differences of the loss
(float64, a tiny MLP)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralode import odeint, odeint_adjoint
from test_gradients import _one_thread  # noqa: F401 (the autouse fixture)

DT = torch.float64
TIGHT = dict(rtol=1e-11, atol=1e-13)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(2, 3).to(DT)
        self.l2 = nn.Linear(3, 2).to(DT)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.5 * torch.sin(t)) - 0.1 * y


def _setup():
    func = TinyMLP()
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.5]], dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=DT)
    return func, y0, t


def _loss(ys: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 1.5, ys.numel(), dtype=DT).reshape(ys.shape)
    return (ys * w).sum() + 0.5 * (ys**2).sum()


def _hvp(solve, func, y0, t, v, **kw):
    """(H v) with respect to (y0, parameters), by grad of (grad · v)."""
    xs = [y0, *func.parameters()]
    g = torch.autograd.grad(_loss(solve(func, y0, t, **kw)), xs, create_graph=True)
    return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), xs)


def _directions(func, y0, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=gen, dtype=DT) for x in [y0, *func.parameters()]]


def _flat(xs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _loss_at(func, y0, t, shift, **kw) -> float:
    """The loss with (y0, parameters) moved by ``shift`` (no graph)."""
    with torch.no_grad():
        params = list(func.parameters())
        saved = [p.clone() for p in params]
        for p, d in zip(params, shift[1:]):
            p.add_(d)
        value = float(_loss(odeint(func, y0 + shift[0], t, **kw)))
        for p, s in zip(params, saved):
            p.copy_(s)
    return value


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_hvp_through_adjoint_matches_direct_and_double_finite_differences(method):
    func, y0, t = _setup()
    kw = (
        dict(TIGHT, method=method)
        if method == "dopri5"
        else dict(method=method, options={"step_size": 1 / 30})
    )
    v = _directions(func, y0, 1)
    h_adj = _flat(_hvp(odeint_adjoint, func, y0, t, v, **kw))
    h_dir = _flat(_hvp(odeint, func, y0, t, v, **kw))
    scale = float(h_dir.abs().max())
    # The adjoint's backward solve is another discretisation: O(tolerance) (dopri5), O(h^4) (rk4).
    assert float((h_adj - h_dir).abs().max()) < (1e-7 if method == "dopri5" else 1e-5) * scale
    # uᵀ H v by double central differences of the loss, for a few directions u.
    eps = 1e-3
    for seed in (2, 3):
        u = _directions(func, y0, seed)
        vals = {}
        for su in (1, -1):
            for sv in (1, -1):
                shift = [eps * (su * a + sv * b) for a, b in zip(u, v)]
                vals[su, sv] = _loss_at(func, y0, t, shift, **kw)
        fd = (vals[1, 1] - vals[1, -1] - vals[-1, 1] + vals[-1, -1]) / (4 * eps * eps)
        assert abs(float(_flat(u) @ h_adj) - fd) < 1e-5 * max(1.0, abs(fd))


def test_gradient_penalty_through_adjoint_matches_direct():
    """d/dθ of ‖∂L/∂y0‖²: the input-gradient penalty of adversarial and Lipschitz regularisation."""
    func, y0, t = _setup()
    params = list(func.parameters())

    def penalty_grad(solve):
        (gy,) = torch.autograd.grad(_loss(solve(func, y0, t, **TIGHT)), y0, create_graph=True)
        return _flat(torch.autograd.grad((gy**2).sum(), params))

    g_adj, g_dir = penalty_grad(odeint_adjoint), penalty_grad(odeint)
    assert float((g_adj - g_dir).abs().max()) < 1e-7 * float(g_dir.abs().max())


def test_hvp_tuple_state_and_seminorm():
    torch.manual_seed(1)
    w = nn.Parameter(0.5 * torch.randn(2, 2, dtype=DT))

    def func(t, y):
        x, v = y
        return v, -torch.tanh(x @ w.T) - 0.1 * v

    x0 = torch.tensor([1.0, -0.5], dtype=DT, requires_grad=True)
    v0 = torch.tensor([0.0, 0.3], dtype=DT)
    t = torch.linspace(0.0, 1.0, 3, dtype=DT)

    def hvp(solve, **kw):
        xs, vs = solve(func, (x0, v0), t, **TIGHT, **kw)
        g = torch.autograd.grad((xs**2).sum() + vs.sum(), [x0, w], create_graph=True)
        return _flat(torch.autograd.grad(g[0].sum() + g[1].sum(), [x0, w]))

    h_dir = hvp(odeint)
    h_adj = hvp(odeint_adjoint, adjoint_params=(w,), adjoint_options={"norm": "seminorm"})
    assert float((h_adj - h_dir).abs().max()) < 1e-7 * float(h_dir.abs().max())


@pytest.mark.parametrize("sensitivity", ["interpolating", "quadrature"])
def test_sensitivities_without_a_differentiable_backward_raise(sensitivity):
    func, y0, t = _setup()
    ys = odeint_adjoint(func, y0, t, sensitivity=sensitivity, rtol=1e-6, atol=1e-8)
    with pytest.raises(NotImplementedError, match=f"sensitivity={sensitivity!r}"):
        torch.autograd.grad(ys.sum(), list(func.parameters()), create_graph=True)


def test_first_order_gradient_unchanged_by_create_graph():
    func, y0, t = _setup()
    xs = [y0, *func.parameters()]
    g1 = torch.autograd.grad(_loss(odeint_adjoint(func, y0, t, **TIGHT)), xs)
    g2 = torch.autograd.grad(_loss(odeint_adjoint(func, y0, t, **TIGHT)), xs, create_graph=True)
    torch.testing.assert_close(_flat(g2).detach(), _flat(g1), rtol=1e-8, atol=1e-10)
