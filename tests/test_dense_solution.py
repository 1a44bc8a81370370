"""``odeint_dense``: the dense solution equals ``odeint`` at the same times (every adaptive method), agrees
with torchdiffeq's ``odeint_dense``, handles tuples, reverse time, gradients and bad input."""

from __future__ import annotations

import pytest
import torch

from neuralode import DenseSolution, odeint, odeint_dense, record_stats
from neuralode._solvers.explicit import ADAPTIVE_METHODS
from neuralode._solvers.stiff import ESDIRK_TABLEAUS

F64 = torch.float64
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=F64)
METHODS = list(ADAPTIVE_METHODS) + list(ESDIRK_TABLEAUS)


def linear(t, y):
    return y @ A.T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("span", [(0.0, 3.0), (2.0, -1.0)])
def test_equals_odeint_at_the_same_times(method, span):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(*span, 13, dtype=F64)
    tol = {"rtol": 1e-5, "atol": 1e-7}
    ref = odeint(linear, y0, t, method=method, **tol)
    sol = odeint_dense(linear, y0, t[0], t[-1], method=method, **tol)
    assert isinstance(sol, DenseSolution)
    torch.testing.assert_close(sol(t), ref, rtol=0, atol=1e-13)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sol(t[perm]), ref[perm], rtol=0, atol=1e-13)  # any order
    torch.testing.assert_close(sol(float(t[5])), ref[5], rtol=0, atol=1e-13)  # a scalar
    assert sol.ts[0] == span[0] and sol.ts[-1] == span[1] and len(sol.ts) == sol.stats.n_accepted + 1
    torch.testing.assert_close(sol(sol.ts)[-1], ref[-1], rtol=0, atol=0)
    exact = torch.linalg.matrix_exp((t[7] - t[0]) * A) @ y0
    assert float((sol(t[7]) - exact).abs().max()) < 5e-3  # (fehlberg2 is first order)


def test_agrees_with_torchdiffeq_odeint_dense():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    tol = {"rtol": 1e-8, "atol": 1e-10}
    ours = odeint_dense(linear, y0, 0.0, 3.0, **tol)
    theirs = torchdiffeq.odeint_dense(
        linear, y0, torch.tensor(0.0, dtype=F64), torch.tensor(3.0, dtype=F64), **tol
    )
    for s in (0.0, 0.3, 1.7, 2.9):
        torch.testing.assert_close(ours(s), theirs(torch.tensor(s, dtype=F64)), rtol=0, atol=1e-7)


def test_tuple_state_float32_and_stats():
    def f(t, y):
        u, w = y
        return (-u * 2.0, u.sum() - w)

    y0 = (torch.ones(3), torch.zeros(2, 1))
    with record_stats() as st:
        sol = odeint_dense(f, y0, torch.tensor(0.0), torch.tensor(1.0), method="tsit5", rtol=1e-5, atol=1e-6)
    t = torch.tensor([0.0, 0.25, 1.0])
    u, w = sol(t)
    ru, rw = odeint(f, y0, t.double().float(), method="tsit5", rtol=1e-5, atol=1e-6)
    assert u.shape == (3, 3) and w.shape == (3, 2, 1) and u.dtype == torch.float32
    torch.testing.assert_close(u, ru)
    torch.testing.assert_close(w, rw)
    u1, w1 = sol(0.5)
    assert u1.shape == (3,) and w1.shape == (2, 1)
    assert st.nfe == sol.stats.nfe and st.n_solves == 1


def test_gradient_through_the_dense_solution():
    theta = torch.tensor([0.7, -1.1], dtype=F64, requires_grad=True)

    def f(t, y):
        return torch.stack([theta[0] * y[1], theta[1] * y[0] - 0.1 * y[1] ** 3])

    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 0.4, 1.5, 2.0], dtype=F64)
    for method in ("dopri8", "kvaerno4"):
        (g_ref,) = torch.autograd.grad(odeint(f, y0, t, method=method).sum(), theta)
        (g,) = torch.autograd.grad(odeint_dense(f, y0, 0.0, 2.0, method=method)(t).sum(), theta)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_bad_input():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="adaptive method.*rk4"):
        odeint_dense(linear, y0, 0.0, 1.0, method="rk4")
    with pytest.raises(ValueError, match="differ"):
        odeint_dense(linear, y0, 1.0, 1.0)
    with pytest.raises(ValueError, match="per_sample"):
        odeint_dense(linear, y0, 0.0, 1.0, options={"per_sample": True})
    with pytest.raises(TypeError, match="t0"):
        odeint_dense(linear, y0, "0", 1.0)
    with pytest.raises(ValueError, match="unknown option"):
        odeint_dense(linear, y0, 0.0, 1.0, options={"step_size": 0.1})
    sol = odeint_dense(linear, y0, 0.0, 1.0)
    with pytest.raises(ValueError, match="outside the solved span"):
        sol(torch.tensor([0.5, 1.5], dtype=F64))
    with pytest.raises(ValueError, match="1-D"):
        sol(torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize("method", ["dopri5", "kvaerno5", "ros34pw2"])
def test_multidimensional_state_keeps_its_shape(method):
    y0 = torch.tensor([[1.0, 0.5], [-0.2, 0.3]], dtype=F64)  # (2, 2): rows are independent problems
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    tol = {"rtol": 1e-6, "atol": 1e-9}
    sol = odeint_dense(linear, y0, 0.0, 1.0, method=method, **tol)
    out = sol(t)
    assert out.shape == (5, 2, 2) and sol(0.5).shape == (2, 2) and sol(t[:0]).shape == (0, 2, 2)
    torch.testing.assert_close(out, odeint(linear, y0, t, method=method, **tol), rtol=0, atol=1e-12)
