"""The Rosenbrock-W method ``ros34pw2``: its tableau (Rosenbrock and W order conditions, the embedded and
dense-output orders, L-stability), convergence order (also non-autonomous and with a frozen or arbitrary
``W``), stiff problems against SciPy's Radau, gradients against finite differences, modes and options."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from neuralode import SOLVERS, SolveStats, odeint, odeint_adjoint, odeint_dense
from neuralode._solvers import rosenbrock
from neuralode._solvers.rosenbrock import ROSENBROCK_TABLEAUS, w_trees

scipy_integrate = pytest.importorskip("scipy.integrate")

F64 = torch.float64
TAB = ROSENBROCK_TABLEAUS["ros34pw2"]
A_SMOOTH = torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=F64)


def smooth(t, y):
    return y @ A_SMOOTH.T


def nonlinear(t, y):
    """Non-autonomous and nonlinear: the order needs the stage times and the W-conditions."""
    return torch.stack([-y[0] + math.sin(t) * y[1] ** 2, -2.0 * y[1] + math.cos(3.0 * t) * y[0]])


def nonlinear_rows(t, y):
    """:func:`nonlinear` on each row of a ``(B, 2)`` batch."""
    return torch.stack(
        [-y[:, 0] + math.sin(t) * y[:, 1] ** 2, -2.0 * y[:, 1] + math.cos(3.0 * t) * y[:, 0]], -1
    )


def robertson(t, y):
    y1, y2, y3 = y.unbind(-1)
    r1, r2, r3 = 0.04 * y1, 3e7 * y2 * y2, 1e4 * y2 * y3
    return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)


def van_der_pol(t, y, mu=1000.0):
    x, v = y.unbind(-1)
    return torch.stack([v, mu * (1 - x * x) * v - x], -1)


def radau(f, y0, t, rtol=1e-10, atol=1e-14):
    sol = scipy_integrate.solve_ivp(
        lambda s, y: f(s, torch.from_numpy(y)).numpy(),
        (float(t[0]), float(t[-1])),
        y0.numpy(),
        method="Radau",
        rtol=rtol,
        atol=atol,
        t_eval=t.numpy(),
    )
    assert sol.success
    return torch.from_numpy(sol.y.T)


def fixed(h):
    return {"first_step": h, "min_step": h, "max_step": h}


def slopes(f, y0, t1, ref, hs=(0.1, 0.05, 0.025)):
    errs = []
    for h in hs:
        y = odeint(f, y0, torch.tensor([0.0, t1], dtype=F64), method="ros34pw2", options=fixed(h))[-1]
        errs.append(float((y - ref).abs().max()))
    return [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]


# -- the tableau -----------------------------------------------------------------------------------------


def test_registered_and_tableau_valid():
    assert "ros34pw2" in SOLVERS
    TAB.check()
    assert TAB.stiffly_accurate and TAB.w_method
    assert [len(w_trees(k)) for k in (1, 2, 3, 4)] == [1, 3, 8, 21]  # 1, 2, 5, 13 W-trees of each size


@pytest.mark.parametrize(
    "change",
    [{"order": 4}, {"error_order": 3}, {"dense_order": 4}, {"dense_w_order": 3}],
    ids=["order", "embedded", "dense", "dense-W"],
)
def test_claimed_orders_are_exact(change):
    with pytest.raises(ValueError, match="violates"):
        dataclasses.replace(TAB, **change).check()


def test_w_conditions_are_checked():
    """A coefficient change that keeps the Rosenbrock conditions of order 3 (exact Jacobian) breaks the
    W-conditions: moving weight within row 2 of α (its sum, the stage time, stays) and back in Γ keeps
    every β = α + Γ."""
    alpha = [list(r) for r in TAB.alpha]
    gammas = [list(r) for r in TAB.gammas]
    alpha[2][0] += 0.1
    alpha[2][1] -= 0.1
    gammas[2][0] -= 0.1
    gammas[2][1] += 0.1
    other = dataclasses.replace(
        TAB, alpha=tuple(map(tuple, alpha)), gammas=tuple(map(tuple, gammas)), dense=()
    )
    with pytest.raises(ValueError, match="W-condition"):
        other.check()
    dataclasses.replace(other, w_method=False).check()  # still a Rosenbrock method of order 3(2)


def test_l_stable():
    assert abs(TAB.stability(-1e12)) < 1e-9 and abs(TAB.stability(-1e12 + 1e12j)) < 1e-9
    samples = [complex(-x, y) for x in (0.0, 1e-3, 0.1, 1, 3, 10, 100, 1e4) for y in (0, 0.3, 1, 3, 10, 1e3)]
    assert max(abs(TAB.stability(z)) for z in samples) <= 1 + 1e-12
    assert abs(TAB.stability(0.1) - math.exp(0.1)) < 10 * 0.1**4


# -- accuracy ----------------------------------------------------------------------------------------------


def test_convergence_order_smooth_and_non_autonomous():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    for s in slopes(smooth, y0, 2.0, torch.linalg.matrix_exp(2.0 * A_SMOOTH) @ y0):
        assert 2.8 < s < 3.3
    ref = odeint(nonlinear, y0, torch.tensor([0.0, 2.0], dtype=F64), method="dopri8", rtol=1e-13, atol=1e-14)[
        -1
    ]
    for s in slopes(nonlinear, y0, 2.0, ref):
        assert 2.7 < s < 3.4


def test_w_property_frozen_and_arbitrary_jacobian(monkeypatch):
    """Fixed steps keep the first Jacobian for the whole solve (one Jacobian, one LU); and with ``W`` a
    matrix that is not the Jacobian at all (``W = 0``: an explicit method; ``W`` = a random matrix) the
    order is still 3."""
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    ref = odeint(nonlinear, y0, torch.tensor([0.0, 2.0], dtype=F64), method="dopri8", rtol=1e-13, atol=1e-14)[
        -1
    ]
    stats = SolveStats()
    odeint(
        nonlinear,
        y0,
        torch.tensor([0.0, 2.0], dtype=F64),
        method="ros34pw2",
        options=fixed(0.0625),
        stats=stats,
    )
    assert stats.n_jac == 1 and stats.n_lu == 1 and stats.n_steps == 32
    g = torch.Generator().manual_seed(0)
    for w in (torch.zeros(2, 2, dtype=F64), torch.randn(2, 2, dtype=F64, generator=g)):
        monkeypatch.setattr(rosenbrock, "jacobian", lambda f, t, z, batch, w=w: w)
        for s in slopes(nonlinear, y0, 2.0, ref):
            assert 2.7 < s < 3.4


def test_robertson_against_radau():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 0.4, 4.0, 40.0], dtype=F64)
    ref = radau(robertson, y0, t)
    stats = SolveStats()
    with torch.no_grad():
        y = odeint(robertson, y0, t, method="ros34pw2", rtol=1e-6, atol=1e-10, stats=stats)
    assert float(((y - ref) / (1e-6 * ref.abs() + 1e-10)).abs().max()) < 50
    assert 0 < stats.n_jac < stats.n_steps < 400 and stats.n_lu >= stats.n_jac
    assert torch.allclose(y.sum(-1), torch.ones(4, dtype=F64), atol=1e-9)  # mass conservation


def test_van_der_pol_1000_slow_manifold_against_radau():
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0.0, 300.0, 4, dtype=F64)
    ref = radau(van_der_pol, y0, t, atol=1e-12)
    stats = SolveStats()
    with torch.no_grad():
        y = odeint(van_der_pol, y0, t, method="ros34pw2", rtol=1e-6, atol=1e-6, stats=stats)
    assert float((y - ref).abs().max()) < 1e-4
    assert stats.n_steps < 400


@pytest.mark.slow
def test_robertson_long_and_van_der_pol_1000_period_against_radau():
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 1.0, 1e2, 1e4, 1e5], dtype=F64)
    ref = radau(robertson, y0, t)
    with torch.no_grad():
        y = odeint(robertson, y0, t, method="ros34pw2", rtol=1e-8, atol=1e-12)
    assert float(((y - ref) / (1e-8 * ref.abs() + 1e-12)).abs().max()) < 200
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 1000.0, 3000.0], dtype=F64)
    ref = radau(van_der_pol, y0, t, atol=1e-12)
    with torch.no_grad():
        y = odeint(van_der_pol, y0, t, method="ros34pw2", rtol=1e-8, atol=1e-8)
    assert float((y - ref).abs().max()) < 1e-4


def test_dense_output_between_steps_and_odeint_dense():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0.0, 3.0, 301, dtype=F64)
    exact = torch.stack([torch.linalg.matrix_exp(s * A_SMOOTH) @ y0 for s in t])
    stats = SolveStats()
    y = odeint(smooth, y0, t, method="ros34pw2", rtol=1e-5, atol=1e-7, stats=stats)
    assert stats.n_accepted < 200  # most outputs come from the interpolant
    assert float((y - exact).abs().max()) < 1e-4
    sol = odeint_dense(smooth, y0, 0.0, 3.0, method="ros34pw2", rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sol(t), y, rtol=1e-12, atol=1e-12)


# -- gradients -----------------------------------------------------------------------------------------


class Decay(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([30.0, 0.7], dtype=F64))

    def forward(self, t, y):
        return torch.stack([-self.k[0] * (y[0] - math.cos(t)), -self.k[1] * y[1] * y[0]])


def _loss(func, y0):
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ys = odeint(func, y0, t, method="ros34pw2", options=fixed(0.01))
    return (ys[1:] * torch.tensor([1.0, 2.0], dtype=F64)).sum()


def test_gradient_against_finite_differences():
    """Fixed steps: the finite differences see the same discrete map, up to the Jacobian's own change
    with the state and the parameters (held constant by the gradient; by the W-property that changes the
    result by O(h³) = 1e-6 here, hence the absolute tolerance)."""
    func = Decay()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    g_y0, g_k = torch.autograd.grad(_loss(func, y0), (y0, func.k))
    eps = 1e-6
    with torch.no_grad():
        fd_y0 = torch.stack(
            [
                (_loss(func, y0 + eps * e) - _loss(func, y0 - eps * e)) / (2 * eps)
                for e in torch.eye(2, dtype=F64)
            ]
        )
        fd_k = []
        for e in torch.eye(2, dtype=F64):
            func.k += eps * e
            up = _loss(func, y0)
            func.k -= 2 * eps * e
            fd_k.append((up - _loss(func, y0)) / (2 * eps))
            func.k += eps * e
    torch.testing.assert_close(g_y0, fd_y0, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(g_k, torch.stack(fd_k), rtol=1e-5, atol=5e-6)


def test_adjoint_and_direct_gradients_against_the_matrix_exponential():
    """``y' = Ay``: the exact gradient of ``y(1)`` with respect to ``A`` and ``y0`` is differentiable
    through ``matrix_exp``."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    w = torch.tensor([1.0, -2.0], dtype=F64)
    a_ref = A_SMOOTH.clone().requires_grad_(True)
    y0_ref = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    ref = torch.autograd.grad((torch.linalg.matrix_exp(a_ref) @ y0_ref * w).sum(), (a_ref, y0_ref))
    for solve in (odeint, odeint_adjoint):
        a = torch.nn.Parameter(A_SMOOTH.clone())
        y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
        kw = {"adjoint_params": (a,)} if solve is odeint_adjoint else {}
        ys = solve(lambda t, y, a=a: a @ y, y0, t, method="ros34pw2", rtol=1e-5, atol=1e-7, **kw)
        got = torch.autograd.grad((ys[-1] * w).sum(), (a, y0))
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


# -- modes, dtypes, tuples, options ------------------------------------------------------------------


@pytest.mark.slow
def test_batch_mode_against_radau():
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=F64)
    t = torch.tensor([0.0, 1.0, 10.0], dtype=F64)
    with torch.no_grad():
        yb = odeint(robertson, y0, t, method="ros34pw2", rtol=1e-7, atol=1e-11, options={"jacobian": "batch"})
    for i in range(2):
        ref = radau(robertson, y0[i], t)
        assert float(((yb[:, i] - ref) / (1e-7 * ref.abs() + 1e-11)).abs().max()) < 50


def test_batch_mode_float32_and_tuple_state():
    """``"batch"``: (2, 2) blocks, each row's error on its own; it agrees with the dense mode."""
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.4], [2.0, 1.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    stats = SolveStats()
    yb = odeint(nonlinear_rows, y0, t, method="ros34pw2", rtol=1e-8, atol=1e-10, options={"jacobian": "batch"},
                stats=stats)  # fmt: skip
    yd = odeint(
        nonlinear_rows, y0, t, method="ros34pw2", rtol=1e-8, atol=1e-10, options={"jacobian": "dense"}
    )
    torch.testing.assert_close(yb, yd, rtol=1e-6, atol=1e-8)
    assert stats.n_jac > 0
    y32 = odeint(
        lambda t, y: y @ A_SMOOTH.T.float(),
        torch.tensor([1.0, 0.5]),
        torch.tensor([0.0, 1.0]),
        method="ros34pw2",
        rtol=1e-5,
        atol=1e-6,
    )
    exact = torch.linalg.matrix_exp(A_SMOOTH) @ torch.tensor([1.0, 0.5], dtype=F64)
    assert y32.dtype == torch.float32 and float((y32[-1].double() - exact).abs().max()) < 1e-4
    a, b = odeint(
        lambda t, y: (y[1], -y[0]),
        (torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)),
        t[:2],
        method="ros34pw2",
        rtol=1e-8,
        atol=1e-10,
    )
    assert abs(float(a[-1, 0]) - math.cos(1.0)) < 1e-7 and abs(float(b[-1, 0]) + math.sin(1.0)) < 1e-7


def test_throw_false_returns_what_was_reached():
    t = torch.linspace(0.0, 2.0, 9, dtype=F64)
    stats = SolveStats()
    ys = odeint(lambda t, y: y**2, torch.ones(2, dtype=F64), t, method="ros34pw2", rtol=1e-5, atol=1e-8,
                options={"throw": False}, stats=stats)  # fmt: skip
    assert stats.status == "underflow" and 0.999 < stats.t_reached < 1.001
    assert torch.isfinite(ys[:5]).all() and torch.isnan(ys[5:]).all()
    torch.testing.assert_close(ys[:4, 0], 1 / (1 - t[:4]), rtol=1e-4, atol=0)
    stats = SolveStats()
    odeint(smooth, torch.ones(2, dtype=F64), t, method="ros34pw2", options={"throw": False, "max_num_steps": 5},
           stats=stats)  # fmt: skip
    assert stats.status == "max_num_steps" and 0 < stats.t_reached < 2


def test_bad_options():
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="'krylov' is not supported by method='ros34pw2'"):
        odeint(smooth, y0, t, method="ros34pw2", options={"jacobian": "krylov"})
    with pytest.raises(ValueError, match="forms the dense Jacobian, and the state has 300 elements"):
        odeint(lambda t, y: -y, torch.ones(300, dtype=F64), t, method="ros34pw2")
    with pytest.raises(ValueError, match="options\\['jacobian'\\]='batch' needs a single tensor y0"):
        odeint(smooth, y0, t, method="ros34pw2", options={"jacobian": "batch"})
    with pytest.raises(ValueError, match="unknown option"):
        odeint(smooth, y0, t, method="ros34pw2", options={"newton_tol": 0.1})
    y = odeint(
        lambda t, y: -y, torch.ones(300, dtype=F64), t, method="ros34pw2", options={"jacobian": "dense"}
    )
    assert abs(float(y[-1, 0]) - math.exp(-1.0)) < 1e-6
