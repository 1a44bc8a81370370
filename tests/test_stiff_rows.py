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
T_ROB = torch.tensor([0.0, 1e-2, 1.0, 10.0, 40.0], dtype=F64)
MU = torch.tensor([1.0, 10.0, 100.0], dtype=F64)
Y0_VDP = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 0.5]], dtype=F64)
T_VDP = torch.tensor([0.0, 0.5, 1.5, 3.0], dtype=F64)


def scipy_rows(make_f, params, y0, t, rtol=1e-11, atol=1e-14):
    """SciPy Radau, one row at a time: ``(T, B, d)``."""
    out = []
    for b in range(y0.shape[0]):
        f = make_f(params[b : b + 1])
        sol = scipy_integrate.solve_ivp(
            lambda s, y: f(s, torch.from_numpy(y)[None])[0].numpy(),
            (float(t[0]), float(t[-1])),
            y0[b].numpy(),
            method="Radau",
            rtol=rtol,
            atol=atol,
            t_eval=t.numpy(),
        )
        assert sol.success
        out.append(torch.from_numpy(sol.y.T))
    return torch.stack(out, 1)


def joint_rows(make_f, params, y0, t, **kw):
    """A loop of single-row joint solves: ``(T, B, d)``."""
    return torch.cat([odeint(make_f(params[b : b + 1]), y0[b : b + 1], t, **kw) for b in range(y0.shape[0])], 1)


# -- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["kvaerno5", pytest.param("kvaerno4", marks=pytest.mark.slow), pytest.param("kvaerno3", marks=pytest.mark.slow)]
)
def test_robertson_rows_equal_single_row_solves_and_radau(method):
    kw = dict(method=method, rtol=1e-5, atol=1e-10)
    ys, info = odeint_per_sample(robertson(K_ROB), Y0_ROB, T_ROB, **kw, return_info=True)
    ref = joint_rows(robertson, K_ROB, Y0_ROB, T_ROB, **kw)
    # The same step sequence per row as the joint solver alone on that row: equal to rounding.
    torch.testing.assert_close(ys, ref, rtol=1e-9, atol=1e-13)
    radau = scipy_rows(robertson, K_ROB, Y0_ROB, T_ROB)
    scale = radau.abs().amax(dim=0, keepdim=True)
    assert float(((ys - radau).abs() / scale).max()) < 2e-3
    assert (info.status == 0).all()
    assert len(set(info.n_steps.tolist())) > 1  # every row its own steps
    assert (info.n_jac < info.n_steps).all() and (info.n_jac >= 1).all()  # Jacobians kept across steps
    # odeint's per_sample option is the same solve
    ys2 = odeint(robertson(K_ROB), Y0_ROB, T_ROB, **kw, options={"per_sample": True})
    torch.testing.assert_close(ys2, ys, rtol=0, atol=0)


def test_van_der_pol_rows_with_different_stiffness():
    kw = dict(method="kvaerno4", rtol=1e-6, atol=1e-8)
    ys, info = odeint_per_sample(van_der_pol(MU), Y0_VDP, T_VDP, **kw, return_info=True)
    torch.testing.assert_close(ys, joint_rows(van_der_pol, MU, Y0_VDP, T_VDP, **kw), rtol=1e-8, atol=1e-10)
    radau = scipy_rows(van_der_pol, MU, Y0_VDP, T_VDP)
    assert float((ys - radau).abs().max()) < 1e-3
    steps = info.n_steps.tolist()
    assert steps[0] != steps[1] != steps[2]


def test_rows_with_their_own_times_stop_costing():
    """2-D ``t``: rows end at different times; a finished row takes no more steps, Jacobians or LUs."""
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 2.0, 4.0], [0.0, -1.0, -3.0]], dtype=F64)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]], dtype=F64)
    mu = torch.tensor([50.0, 50.0, 5.0], dtype=F64)
    ys, info = odeint_per_sample(van_der_pol(mu), y0, t, method="kvaerno5", rtol=1e-6, atol=1e-8, return_info=True)
    for b in range(3):
        ref = odeint(van_der_pol(mu[b : b + 1]), y0[b : b + 1], t[b], method="kvaerno5", rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ys[:, b], ref[:, 0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(info.t, t[:, -1])
    assert info.n_steps[0] < info.n_steps[1]
    assert info.n_jac[0] < info.n_jac[1] and info.n_lu[0] < info.n_lu[1]


def test_float32_rows():
    k = K_ROB.float()
    ys = odeint_per_sample(
        robertson(k), Y0_ROB.float(), T_ROB[:4].float(), method="kvaerno5", rtol=1e-4, atol=1e-7
    )
    assert ys.dtype == torch.float32
    radau = scipy_rows(robertson, K_ROB, Y0_ROB, T_ROB[:4])
    scale = radau.abs().amax(dim=0, keepdim=True)
    assert float(((ys.double() - radau).abs() / scale).max()) < 2e-2


# -- gradients ---------------------------------------------------------------------------------------------


def test_gradient_against_finite_differences():
    """Fixed steps (every step accepted), rows with their own end times: the direct gradient (implicit
    function theorem at every stage, per row) equals central differences of the same discrete solve."""
    k = torch.tensor([5.0, 30.0, 100.0], dtype=F64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.2], [2.0, 1.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, 0.3], [0.0, 0.5], [0.0, 0.4]], dtype=F64)
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
    eps = 1e-6
    with torch.no_grad():
        fd_k = torch.stack([(solve(k + eps * e, y0) - solve(k - eps * e, y0)) / (2 * eps) for e in torch.eye(3, dtype=F64)])
        fd_y0 = torch.stack(
            [(solve(k, y0 + eps * e) - solve(k, y0 - eps * e)) / (2 * eps) for e in torch.eye(6, dtype=F64).view(6, 3, 2)]
        ).view(3, 2)
    torch.testing.assert_close(g_k, fd_k, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_y0, fd_y0, rtol=1e-6, atol=1e-8)


def test_adaptive_gradient_equals_single_row_solves():
    mu = MU.clone().requires_grad_(True)
    y0 = Y0_VDP.clone().requires_grad_(True)
    kw = dict(method="kvaerno5", rtol=1e-6, atol=1e-8)
    w = torch.linspace(0.5, 1.5, T_VDP.numel() * 6, dtype=F64).view(-1, 3, 2)
    g = torch.autograd.grad((odeint_per_sample(van_der_pol(mu), y0, T_VDP, **kw) * w).sum(), (mu, y0))
    ref = torch.autograd.grad((joint_rows(van_der_pol, mu, y0, T_VDP, **kw) * w).sum(), (mu, y0))
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


@pytest.mark.parametrize("per_sample", [False, True])
def test_throw_false_returns_what_was_reached(per_sample):
    y0 = torch.tensor([[1.0], [0.25]], dtype=F64)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    kw = dict(method="kvaerno5", rtol=1e-4, atol=1e-8)
    stats = SolveStats()
    ys = odeint(blow_up, y0, t, **kw, options={"throw": False, "per_sample": per_sample}, stats=stats)
    assert not bool(torch.as_tensor(stats.success).all())
    reached = stats.t_reached if per_sample else torch.full((2,), stats.t_reached, dtype=F64)
    assert 0.98 < float(reached[0]) < 1.0
    if per_sample:  # the second row is unaffected by the first's failure
        assert stats.status.tolist()[1] == 0 and stats.status.tolist()[0] != 0
        assert float(reached[1]) == 2.0
    for b in range(2):
        n_ok = int((t <= reached[b]).sum())
        assert torch.isfinite(ys[:n_ok, b]).all() and torch.isnan(ys[n_ok:, b]).all()
        exact = y0[b, 0] / (1 - y0[b, 0] * t[:n_ok])
        torch.testing.assert_close(ys[:n_ok, b, 0], exact, rtol=1e-3, atol=0)
    with pytest.raises(SolverError):
        odeint(blow_up, y0, t, **kw, options={"per_sample": per_sample})


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
    ys = odeint_per_sample(f, Y0_ROB, T_ROB[:3], method="kvaerno3", rtol=1e-4, atol=1e-8, options={"jacobian": "batch"})
    assert torch.isfinite(ys).all()


def test_stats_count_batched_jacobians_and_lu():
    with neuralode.record_stats() as stats:
        _, info = odeint_per_sample(
            robertson(K_ROB), Y0_ROB, T_ROB[:4], method="kvaerno5", rtol=1e-5, atol=1e-10, return_info=True
        )
    assert 1 <= stats.n_jac <= int(info.n_jac.sum()) and int(info.n_jac.max()) <= stats.n_jac
    assert 1 <= stats.n_lu <= int(info.n_lu.sum())
    assert stats.n_steps == int(info.n_steps.sum())
