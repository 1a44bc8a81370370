"""Gradients of the stiff ``kvaerno*`` solves beyond direct backprop: the adjoint's single backward solve
across the output times (the driver's ``jump`` hook) and ``odeint_checkpoint``'s replay of the steps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from neuralode import odeint, odeint_adjoint, odeint_checkpoint, record_stats
from neuralode._integrate.joint import run
from neuralode._problem import make_problem
from neuralode._stats import SolveStats

F64 = torch.float64


class StiffLinear(nn.Module):
    """``y' = A y + b sin t`` with ``A`` of eigenvalues about −1 and −1000 (stiff) and parameters ``A, b``."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-1.0, 0.5], [2.0, -1000.0]], dtype=F64))
        self.b = nn.Parameter(torch.tensor([0.3, 40.0], dtype=F64))

    def forward(self, t, y):
        return y @ self.A.T + self.b * torch.sin(t)


T = torch.tensor([0.0, 0.01, 0.3, 1.0], dtype=F64)
W = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 1.5]], dtype=F64)


def _loss(ys):
    return (ys[1:] * W).sum()


def _grads(interface, f, y0, **kw):
    ys = interface(f, y0, T, **kw)
    return torch.autograd.grad(_loss(ys), (y0, f.A, f.b))


def test_esdirk_jump_hook_inside_one_solve():
    """``jump`` at the inner output times of a kvaerno solve: ``y' = −2y`` with ``y += 1`` at each of them
    equals the analytic piecewise solution, in one solve (one initial step, one Jacobian)."""
    t_out = [0.0, 0.3, 0.7, 1.0]
    lam = 2.0
    with torch.no_grad():
        problem = make_problem(
            lambda t, y: -lam * y,
            torch.ones(1, dtype=F64),
            torch.tensor(t_out, dtype=F64),
            1e-8,
            1e-11,
            "kvaerno5",
            None,
        )
    seen = []

    def jump(j, y):
        seen.append(j)
        y = y + 1.0
        return y, -lam * y

    stats = SolveStats()
    ys = run(problem, stats, jump=jump)
    expect, y = [1.0], 1.0
    for a, b in itertools.pairwise(t_out):
        y = y * math.exp(-lam * (b - a))
        expect.append(y)  # the output is the state before the jump
        y += 1.0
    assert seen == [1, 2]
    assert stats.n_jac == 1
    torch.testing.assert_close(torch.cat(ys), torch.tensor(expect, dtype=F64), rtol=1e-7, atol=0)


def test_adjoint_one_backward_solve_matches_direct():
    f = StiffLinear()
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    kw = dict(method="kvaerno5", rtol=1e-6, atol=1e-8)
    with record_stats() as st:
        g_adj = _grads(odeint_adjoint, f, y0, sensitivity="interpolating", **kw)
    assert st.backward.n_solves == 1
    g_dir = _grads(odeint, f, y0, **kw)
    for a, b in zip(g_adj, g_dir):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpoint_equals_direct():
    """The replayed steps give backprop's gradient, to the Newton tolerance (far below the solve's)."""
    f = StiffLinear()
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    kw = dict(method="kvaerno5", rtol=1e-6, atol=1e-8)
    with record_stats() as st:
        g_ck = _grads(odeint_checkpoint, f, y0, checkpoints=2, **kw)
    assert st.backward.n_steps == st.n_accepted  # every accepted step replayed once
    g_dir = _grads(odeint, f, y0, **kw)
    for a, b in zip(g_ck, g_dir):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "rtol", "checkpoints"), [("kvaerno3", 1e-5, None), ("kvaerno5", 1e-7, 2)])
def test_checkpoint_equals_direct_and_finite_differences(method, rtol, checkpoints):
    """As above at other settings, and both equal central differences of the solve."""
    f = StiffLinear()
    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    kw = dict(method=method, rtol=rtol, atol=rtol * 1e-2)
    with record_stats() as st:
        g_ck = _grads(odeint_checkpoint, f, y0, checkpoints=checkpoints, **kw)
    assert st.backward.n_steps == st.n_accepted  # every accepted step replayed once
    g_dir = _grads(odeint, f, y0, **kw)
    for a, b in zip(g_ck, g_dir):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    eps = 1e-6
    with torch.no_grad():
        for k, (name, g) in enumerate(zip(("A", "b"), g_ck[1:])):
            p = getattr(f, name)
            for idx in [(0, 1), (1, 1)] if k == 0 else [(0,), (1,)]:
                vals = []
                for sign in (1.0, -1.0):
                    p[idx] += sign * eps
                    vals.append(float(_loss(odeint(f, y0, T, **kw))))
                    p[idx] -= sign * eps
                fd = (vals[0] - vals[1]) / (2 * eps)
                assert abs(float(g[idx]) - fd) <= 1e-4 * max(1.0, abs(fd)), (name, idx, float(g[idx]), fd)


@pytest.mark.slow
def test_checkpoint_with_jump_t_and_time_gradient():
    """A discontinuity in ``f`` (``options['jump_t']``) and a gradient with respect to ``t``: as ``odeint``."""

    class Switch(StiffLinear):
        def forward(self, t, y):
            return super().forward(t, y) + torch.where(t < 0.5, 0.0, 5.0) * self.b

    y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    kw = dict(method="kvaerno5", rtol=1e-6, atol=1e-8, options={"jump_t": [0.5]})
    out = []
    for interface in (odeint_checkpoint, odeint):
        f = Switch()
        t = T.clone().requires_grad_(True)
        ys = interface(f, y0, t, **kw)
        out.append(torch.autograd.grad(_loss(ys), (y0, f.A, f.b, t)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)
