"""The stiff solvers (``kvaerno3/4/5``) in per-sample mode: every row its own step size, Newton iteration
and Jacobian. Checked against a loop of single-row joint solves (the same step sequence, so agreement to
rounding), SciPy's Radau, finite differences; failures without raising (``throw=False``) in both modes."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode import SolverError, SolveStats, odeint, odeint_per_sample, odeint_per_sample_adjoint

scipy_integrate = pytest.importorskip("scipy.integrate")

F64 = torch.float64
METHODS = ("kvaerno3", "kvaerno4", "kvaerno5")
NEWTON_TIGHT = {"newton_tol": 1e-4, "max_iters": 50}  # Newton error ~1e-14: smooth in the parameters


def robertson(k: torch.Tensor):
    """Robertson's kinetics with rate constants ``k`` of shape ``(B, 3)`` (one set per row)."""

    def f(t, y):
        y1, y2, y3 = y.unbind(-1)
        r1, r2, r3 = k[:, 0] * y1, k[:, 1] * y2 * y2, k[:, 2] * y2 * y3
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)

    return f


def van_der_pol(mu: torch.Tensor):
    """Van der Pol with ``mu`` of shape ``(B,)``."""

    def f(t, y):
        x, v = y.unbind(-1)
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    return f


K_ROB = torch.tensor([[0.04, 3e7, 1e4], [0.08, 1.5e7, 2e4], [0.02, 6e7, 5e3]], dtype=F64)
Y0_ROB = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).repeat(3, 1)
T_ROB = torch.tensor([0.0, 1e-2, 1.0], dtype=F64)
MU = torch.tensor([1.0, 10.0, 100.0], dtype=F64)
Y0_VDP = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 0.5]], dtype=F64)
T_VDP = torch.tensor([0.0, 0.2, 0.4], dtype=F64)


def robertson_np(k):
    def f(t, y):
        r1, r2, r3 = k[0] * y[0], k[1] * y[1] ** 2, k[2] * y[1] * y[2]
        return [-r1 + r3, r1 - r2 - r3, r2]

    return f


def van_der_pol_np(mu):
    def f(t, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    return f


def scipy_rows(make_f_np, params, y0, t, rtol=1e-10, atol=1e-14):
    """SciPy Radau, one row at a time (NumPy vector fields): ``(T, B, d)``."""
    out = []
    for b in range(y0.shape[0]):
        sol = scipy_integrate.solve_ivp(
            make_f_np(params[b].tolist()),
            (float(t[0]), float(t[-1])),
            y0[b].tolist(),
            method="Radau",
            rtol=rtol,
            atol=atol,
            t_eval=t.tolist(),
        )
        assert sol.success
        out.append(torch.from_numpy(sol.y.T))
    return torch.stack(out, 1)


def joint_rows(make_f, params, y0, t, **kw):
    """A loop of single-row joint solves: ``(T, B, d)``."""
    return torch.cat(
        [odeint(make_f(params[b : b + 1]), y0[b : b + 1], t, **kw) for b in range(y0.shape[0])], 1
    )


# -- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "kvaerno5",
        pytest.param("kvaerno4", marks=pytest.mark.slow),
        pytest.param("kvaerno3", marks=pytest.mark.slow),
    ],
)
def test_robertson_rows_equal_single_row_solves_and_radau(method):
    kw = dict(method=method, rtol=1e-4, atol=1e-9)
    with neuralode.record_stats() as stats:
        ys, info = odeint_per_sample(robertson(K_ROB), Y0_ROB, T_ROB, **kw, return_info=True)
    ref = joint_rows(robertson, K_ROB, Y0_ROB, T_ROB, **kw)
    # The same step sequence per row as the joint solver alone on that row: equal to rounding.
    torch.testing.assert_close(ys, ref, rtol=1e-9, atol=1e-13)
    radau = scipy_rows(robertson_np, K_ROB, Y0_ROB, T_ROB)
    scale = radau.abs().amax(dim=0, keepdim=True)
    assert float(((ys - radau).abs() / scale).max()) < 1e-3
    assert (info.status == 0).all()
    assert len(set(info.n_steps.tolist())) > 1  # every row its own steps
    assert (info.n_jac < info.n_steps).all() and (info.n_jac >= 1).all()  # Jacobians kept across steps
    # SolveStats: batched Jacobian passes and LU calls (a pass serves every row that needs a block)
    assert int(info.n_jac.max()) <= stats.n_jac <= int(info.n_jac.sum())
    assert int(info.n_lu.max()) <= stats.n_lu <= int(info.n_lu.sum())
    assert stats.n_steps == int(info.n_steps.sum())


def test_van_der_pol_rows_with_different_stiffness():
    kw = dict(method="kvaerno4", rtol=1e-5, atol=1e-7)
    with neuralode.record_stats() as stats:  # (odeint's per_sample option: the same engine)
        ys = odeint(van_der_pol(MU), Y0_VDP, T_VDP, **kw, options={"per_sample": True})
    torch.testing.assert_close(ys, joint_rows(van_der_pol, MU, Y0_VDP, T_VDP, **kw), rtol=1e-8, atol=1e-10)
    radau = scipy_rows(van_der_pol_np, MU, Y0_VDP, T_VDP)
    assert float((ys - radau).abs().max()) < 1e-3
    assert stats.status.tolist() == [0, 0, 0] and stats.n_jac >= 1


def test_rows_with_their_own_times_stop_costing():
    """2-D ``t``: rows end at different times; a finished row takes no more steps, Jacobians or LUs."""
    t = torch.tensor([[0.0, 0.1, 0.2], [0.0, 1.0, 2.0], [0.0, -0.5, -1.0]], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]], dtype=F64)
    mu = torch.tensor([10.0, 10.0, 2.0], dtype=F64)
    kw = dict(method="kvaerno5", rtol=1e-4, atol=1e-7)
    ys, info = odeint_per_sample(van_der_pol(mu), y0, t, **kw, return_info=True)
    for b in range(3):
        ref = odeint(van_der_pol(mu[b : b + 1]), y0[b : b + 1], t[b], **kw)
        torch.testing.assert_close(ys[:, b], ref[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(info.t, t[:, -1])
    assert info.n_steps[0] < info.n_steps[1]
    assert info.n_jac[0] < info.n_jac[1] and info.n_lu[0] < info.n_lu[1]


@pytest.mark.slow
def test_float32_rows():
    k = K_ROB.float()
    ys = odeint_per_sample(
        robertson(k), Y0_ROB.float(), T_ROB.float(), method="kvaerno5", rtol=1e-3, atol=1e-7
    )
    assert ys.dtype == torch.float32
    radau = scipy_rows(robertson_np, K_ROB, Y0_ROB, T_ROB)
    scale = radau.abs().amax(dim=0, keepdim=True)
    assert float(((ys.double() - radau).abs() / scale).max()) < 2e-2


# -- gradients ---------------------------------------------------------------------------------------------


def test_gradient_against_finite_differences():
    """Fixed steps (every step accepted), rows with their own end times: the direct gradient (implicit
    function theorem at every stage, per row) equals a central difference of the same discrete solve
    along a random direction in (k, y0)."""
    k = torch.tensor([5.0, 30.0, 100.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.2], [2.0, 1.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 0.2], [0.0, 0.3], [0.0, 0.1]], dtype=F64)
    h = 0.05

    def solve(kk, yy):
        def f(s, u):
            return torch.stack([-kk * (u[:, 0] - torch.cos(u[:, 1])), -u[:, 1] + u[:, 0] ** 2], -1)

        ys = odeint_per_sample(
            f,
            yy,
            t,
            method="kvaerno4",
            rtol=1e-10,
            atol=1e-10,
            options={"first_step": h, "min_step": h, "max_step": h, **NEWTON_TIGHT},
        )
        return (ys[-1] ** 2 * torch.tensor([1.0, -0.5], dtype=F64)).sum()

    g_k, g_y0 = torch.autograd.grad(solve(k, y0), (k, y0))
    gen = torch.Generator().manual_seed(0)
    dk, dy = torch.randn(3, dtype=F64, generator=gen), torch.randn(3, 2, dtype=F64, generator=gen)
    eps = 1e-6
    with torch.no_grad():
        fd = (solve(k + eps * dk, y0 + eps * dy) - solve(k - eps * dk, y0 - eps * dy)) / (2 * eps)
    torch.testing.assert_close((g_k * dk).sum() + (g_y0 * dy).sum(), fd, rtol=1e-6, atol=1e-9)
    assert (g_k != 0).all()


def test_adaptive_gradient_equals_single_row_solves():
    mu = MU[:2].clone().requires_grad_(True)
    y0 = Y0_VDP[:2].clone().requires_grad_(True)
    t = T_VDP[:2]
    kw = dict(method="kvaerno5", rtol=1e-4, atol=1e-7)
    w = torch.tensor([[[0.5, 1.0], [1.5, -1.0]]], dtype=F64)
    g = torch.autograd.grad((odeint_per_sample(van_der_pol(mu), y0, t, **kw) * w).sum(), (mu, y0))
    ref = torch.autograd.grad((joint_rows(van_der_pol, mu, y0, t, **kw) * w).sum(), (mu, y0))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_per_sample_adjoint_names_what_is_supported():
    func = torch.nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="explicit adaptive methods.*dopri5"):
        odeint_per_sample_adjoint(lambda t, y: func(y), Y0_VDP, T_VDP, method="kvaerno5")


# -- failures and options ----------------------------------------------------------------------------------


def blow_up(t, y):
    """``y' = y²`` (a row from ``y0`` blows up at ``1/y0``), NaN beyond ``|y| > 100``."""
    return torch.where(y.abs() > 100, math.nan, y**2)


def test_throw_false_joint_returns_what_was_reached():
    y0 = torch.tensor([[1.0], [0.25]], dtype=F64)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    kw = dict(method="kvaerno5", rtol=1e-4, atol=1e-8)
    stats = SolveStats()
    ys = odeint(blow_up, y0, t, **kw, options={"throw": False}, stats=stats)
    assert stats.status == "underflow" and 0.98 < stats.t_reached < 1.0
    n_ok = int((t <= stats.t_reached).sum())
    assert torch.isfinite(ys[:n_ok]).all() and torch.isnan(ys[n_ok:]).all()
    torch.testing.assert_close(ys[:n_ok, :, 0], y0[:, 0] / (1 - y0[:, 0] * t[:n_ok, None]), rtol=1e-3, atol=0)
    with pytest.raises(SolverError, match="underflow"):
        odeint(blow_up, y0, t, **kw)


def nan_late_in_row_0(t, y):
    """``y' = −y``; row 0's values are NaN from ``t = 0.3`` on."""
    bad = (t >= 0.3) & (torch.arange(y.shape[0]) == 0)
    return torch.where(bad.unsqueeze(1), math.nan, -y)


def test_throw_false_per_sample_status_per_row():
    y0 = torch.ones(3, 1, dtype=F64)
    t = torch.tensor([[0.0, 0.2, 0.4, 0.6], [0.0, 0.2, 0.4, 0.6], [0.0, 1.0, 2.0, 3.0]], dtype=F64)
    kw = dict(method="kvaerno3", rtol=1e-3, atol=1e-6)
    stats = SolveStats()
    ys, info = odeint_per_sample(nan_late_in_row_0, y0, t, **kw, throw=False, stats=stats, return_info=True)
    # row 0: non-finite values from t = 0.3 on; the others succeed
    assert info.status.tolist() == [3, 0, 0] and stats.status is info.status
    assert abs(float(info.t[0]) - 0.3) < 1e-6 and info.t[1:].tolist() == [0.6, 3.0]
    for b in range(3):
        n_ok = int((t[b] <= info.t[b]).sum())
        assert torch.isfinite(ys[:n_ok, b]).all() and torch.isnan(ys[n_ok:, b]).all()
        torch.testing.assert_close(ys[:n_ok, b, 0], torch.exp(-t[b, :n_ok]), rtol=1e-2, atol=0)
    # out of steps: only the row with the long span
    t2 = torch.tensor([[0.0, 0.01], [0.0, 100.0]], dtype=F64)
    _, info = odeint_per_sample(
        lambda s, y: -y, y0[:2], t2, **kw, throw=False, options={"max_num_steps": 4}, return_info=True
    )
    assert info.status.tolist() == [0, 1] and float(info.t[1]) < 100.0
    with pytest.raises(SolverError, match="1 of 2 samples failed"):
        odeint_per_sample(lambda s, y: -y, y0[:2], t2, **kw, options={"max_num_steps": 4})


def test_per_sample_options():
    f = robertson(K_ROB)
    for bad, match in [
        ({"jacobian": "dense"}, "only 'batch'"),
        ({"jacobian": "nope"}, "expected one of"),
        ({"compile": True}, r"unknown option.*'kvaerno3'.*valid options"),
        ({"max_iters": 0}, "max_iters"),
        ({"newton_tol": -1.0}, "newton_tol"),
        ({"norm": max}, "unknown option"),
    ]:
        with pytest.raises(ValueError, match=match):
            odeint_per_sample(f, Y0_ROB, T_ROB, method="kvaerno3", options=bad)
    with pytest.raises(ValueError, match="kvaerno5"):  # listed among the per-sample methods
        odeint_per_sample(f, Y0_ROB, T_ROB, method="rk4")
    kw = dict(method="kvaerno3", rtol=1e-4, atol=1e-8, options={"jacobian": "batch"})
    ys = odeint_per_sample(lambda t, y: -y, Y0_ROB, T_ROB, **kw)
    torch.testing.assert_close(ys, Y0_ROB * torch.exp(-T_ROB).view(-1, 1, 1), rtol=1e-3, atol=1e-8)
