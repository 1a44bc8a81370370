"""odeint_adjoint with the stiff solvers, and a small run of examples/stiff_kinetics.py.

The adjoint of a stiff problem is integrated by ``kvaerno*`` along the forward solve's dense output
(``sensitivity="interpolating"``); its Newton iterations need the Jacobian of the backward dynamics,
which must therefore stay differentiable in the backward state.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from torch import nn

from neuralode import SolverError, odeint, odeint_adjoint, record_stats

F64 = torch.float64


def _load_example():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "stiff_kinetics.py"
    spec = importlib.util.spec_from_file_location("stiff_kinetics_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Relax(nn.Module):
    """``y' = −10^κ (y − θ₁ cos t) + θ₂ y₁ y₂``: relaxation at rate ``10^κ`` (stiff for κ ≥ 3; κ fixed) onto a
    slow manifold set by the parameters θ."""

    def __init__(self, kappa: float = 4.0, theta=(1.2, 0.3)):
        super().__init__()
        self.register_buffer("rate", torch.tensor(10.0**kappa, dtype=F64))
        self.theta = nn.Parameter(torch.tensor(theta, dtype=F64))

    def forward(self, t, y):
        th1, th2 = self.theta.unbind()
        return -self.rate * (y - th1 * torch.cos(t)) + th2 * y.prod() * torch.ones_like(y)


def _loss(ys):
    return (ys[1:] * torch.tensor([[1.0, -2.0], [-1.0, 1.5]], dtype=F64)).sum()


def test_adjoint_interpolating_matches_direct_and_finite_differences():
    """The stiff adjoint's parameter gradient equals backprop through the solve and central differences,
    and its backward solve stays within a small step budget: with a zero Jacobian of the backward dynamics
    (the bug this guards against) Newton is a fixed-point iteration that needs ``|hγλ| < 1``, more than
    700 steps here."""
    t = torch.tensor([0.0, 0.1, 0.2], dtype=F64)
    kw = dict(method="kvaerno5", rtol=1e-6, atol=1e-8)
    f = Relax()
    y0 = torch.tensor([2.0, -0.5], dtype=F64, requires_grad=True)
    with record_stats() as st:
        ys = odeint_adjoint(
            f, y0, t, sensitivity="interpolating", adjoint_options={"max_num_steps": 300}, **kw
        )
        g_adj = torch.autograd.grad(_loss(ys), (y0, f.theta))
    assert st.backward.n_jac >= 1
    g_dir = torch.autograd.grad(_loss(odeint(f, y0, t, **kw)), (y0, f.theta))
    eps = 1e-6
    fd = []
    with torch.no_grad():
        for e in torch.eye(2, dtype=F64):
            vals = []
            for sign in (1.0, -1.0):
                g = Relax()
                g.theta.add_(sign * eps * e)
                vals.append(float(_loss(odeint(g, y0, t, **kw))))
            fd.append((vals[0] - vals[1]) / (2 * eps))
    # dL/dy0 is ~e^(-1000): both ~0 (the fast mode forgets y0)
    torch.testing.assert_close(g_adj[0], g_dir[0], rtol=0, atol=1e-8)
    torch.testing.assert_close(g_adj[1], g_dir[1], rtol=1e-3, atol=1e-8)
    torch.testing.assert_close(g_adj[1], torch.tensor(fd, dtype=F64), rtol=1e-3, atol=1e-8)


def test_adjoint_stiff_seminorm_and_checkpoint_validation():
    f = Relax(kappa=3.0)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    kw = dict(method="kvaerno4", rtol=1e-5, atol=1e-7)
    ys = odeint_adjoint(f, y0, t, sensitivity="interpolating", adjoint_options={"norm": "seminorm"}, **kw)
    (g,) = torch.autograd.grad(ys[-1].sum(), f.theta)
    (g_dir,) = torch.autograd.grad(odeint(f, y0, t, **kw)[-1].sum(), f.theta)
    torch.testing.assert_close(g, g_dir, rtol=1e-3, atol=1e-9)
    with pytest.raises(ValueError, match="checkpoints"):
        odeint_adjoint(f, y0, t, method="kvaerno4", sensitivity="interpolating", checkpoints=4)
    with pytest.raises(ValueError, match="quadrature"):
        odeint_adjoint(f, y0, t, method="kvaerno4", sensitivity="quadrature")


def test_stiff_kinetics_example_small():
    """Two iterations of the example on a short span (to t = 0.01): the adjoint and direct gradients agree, the loss
    falls, the backward solves are counted, and dopri5 exhausts a small step budget."""
    ex = _load_example()
    args = ex.parse_args(
        "--iterations 2 --t-end 0.01 --n-times 3 --n-train 1 --n-test 1 --rtol 1e-5 --adjoint-rtol 1e-5 "
        "--lr 0.2 --no-plot".split()
    )
    data = ex.make_data(args, torch.Generator().manual_seed(0))
    _, g_dir, _ = ex.loss_and_grad(ex.MassAction(ex.START_LOG10K), data, "direct", args)
    run = ex.train(data, "adjoint", args, log=lambda msg: None)
    losses = [r["loss"] for r in run["history"]]
    assert losses[1] < losses[0] and run["final_loss"] < losses[0]
    assert all(r["nfe_backward"] > 0 and r["n_jac_backward"] > 0 for r in run["history"])
    _, g_adj, _ = ex.loss_and_grad(ex.MassAction(ex.START_LOG10K), data, "adjoint", args)
    torch.testing.assert_close(g_adj, g_dir, rtol=1e-3, atol=1e-9)
    attempt = ex.explicit_attempt(data, "dopri5", max_num_steps=10, rtol=1e-5, atol=1e-10)
    assert attempt["raised"] and attempt["reason"] == "max_num_steps" and attempt["t_reached"] < 0.01


def test_dopri5_hits_max_num_steps_on_the_stiff_span():
    ex = _load_example()
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    t = ex.observation_times(10.0, 4)
    with torch.no_grad():
        with pytest.raises(SolverError, match="max_num_steps"):
            odeint(ex.MassAction(ex.TRUE_LOG10K), y0, t, method="dopri5", options={"max_num_steps": 300})
        ys = odeint(
            ex.MassAction(ex.TRUE_LOG10K),
            y0,
            t,
            method="kvaerno5",
            rtol=1e-5,
            atol=1e-10,
            options={"max_num_steps": 300},
        )
    assert torch.isfinite(ys).all()
    torch.testing.assert_close(ys[-1].sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-6)
