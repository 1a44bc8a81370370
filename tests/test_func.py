"""``torch.func`` over ``odeint``: ``vmap`` (adaptive methods with per-problem steps, fixed grids) equals the
Python loop, gradients through it, ``jacrev``/``jacfwd`` against finite differences, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import jacfwd, jacrev, vmap

from neuralode import SolveStats, odeint

F64 = torch.float64
T = torch.linspace(0.0, 3.0, 7, dtype=F64)
Y0 = torch.tensor([2.0, 0.0], dtype=F64)
MUS = torch.tensor([0.2, 1.0, 3.0, 6.0], dtype=F64)


def vdp(mu):
    def f(t, y):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    return f


def solve(mu, y0=Y0, t=T, method="dopri5", stats=None, **kw):
    opts = {"step_size": 0.05} if method in ("rk4", "midpoint") else None
    return odeint(vdp(mu), y0, t, method=method, rtol=1e-7, atol=1e-9, options=opts, stats=stats, **kw)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4", "midpoint"])
def test_vmap_over_parameters_equals_the_loop(method):
    batched = vmap(lambda mu: solve(mu, method=method))(MUS)
    loop = torch.stack([solve(mu, method=method) for mu in MUS])
    assert batched.shape == (4, 7, 2)
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-11)


def test_each_vmapped_problem_takes_its_own_steps():
    st_v, st_l = SolveStats(), SolveStats()
    vmap(lambda mu: solve(mu, stats=st_v))(MUS)
    per_problem = []
    for mu in MUS:
        s = SolveStats()
        solve(mu, stats=s)
        st_l.add(s)
        per_problem.append(s.n_steps)
    assert len(set(per_problem)) > 1  # the problems differ in their step counts...
    assert st_v.n_steps == st_l.n_steps  # ...and the vmapped solve took exactly the loop's steps


def test_vmap_over_y0_and_per_problem_times():
    y0s = torch.tensor([[2.0, 0.0], [1.0, 0.5], [-0.5, 1.0]], dtype=F64)
    ts = torch.stack([T, T * 0.5, T + 1.0])
    batched = vmap(lambda y, t: solve(1.5, y0=y, t=t))(y0s, ts)
    loop = torch.stack([solve(1.5, y0=y, t=t) for y, t in zip(y0s, ts)])
    torch.testing.assert_close(batched, loop, rtol=1e-9, atol=1e-11)
    # in_dims other than 0 and a float32 state
    batched32 = vmap(lambda y: solve(torch.tensor(1.5), y0=y, t=T.float()), in_dims=1)(y0s.float().T)
    loop32 = torch.stack([solve(torch.tensor(1.5), y0=y, t=T.float()) for y in y0s.float()])
    torch.testing.assert_close(batched32, loop32)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_gradient_through_vmap_equals_the_loop(method):
    mus = MUS.clone().requires_grad_(True)
    (g_v,) = torch.autograd.grad((vmap(lambda mu: solve(mu, method=method))(mus) ** 2).sum(), mus)
    (g_l,) = torch.autograd.grad(sum((solve(mu, method=method) ** 2).sum() for mu in mus), mus)
    torch.testing.assert_close(g_v, g_l, rtol=1e-9, atol=1e-11)
    # jacrev outside the vmap
    jac = jacrev(lambda m: vmap(lambda mu: solve(mu, method=method))(m)[:, -1, 0])(MUS)
    # (the step sizes are not differentiated: compare with the loop's gradients, not finite differences)
    loop = torch.stack(
        [
            torch.autograd.grad(solve(mu, method=method)[-1, 0], mu)[0]
            for mu in mus.detach().clone().requires_grad_(True).unbind()
        ]
    )
    torch.testing.assert_close(torch.diagonal(jac), loop, rtol=1e-9, atol=1e-11)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside jacfwd
@pytest.mark.parametrize("method", ["rk4", "midpoint", "dopri5"])
@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_through_odeint_against_finite_differences(method, transform):
    def final(params):
        mu, x0 = params[0], params[1:]
        y0 = torch.stack([x0[0], x0[1]])
        return solve(mu, y0=y0, method=method, t=T[:4])[-1]

    p = torch.tensor([1.3, 2.0, 0.1], dtype=F64)
    jac = transform(final)(p)
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack(
            [(final(p + eps * e) - final(p - eps * e)) / (2 * eps) for e in torch.eye(3, dtype=F64)], 1
        )
    assert jac.shape == (2, 3)
    torch.testing.assert_close(jac, fd, rtol=1e-5, atol=1e-7)


def test_unsupported_under_vmap_raise_clearly():
    with pytest.raises(NotImplementedError, match="kvaerno5.*jacobian"):
        vmap(lambda mu: solve(mu, method="kvaerno5"))(MUS)
    with pytest.raises(NotImplementedError, match="tuple"):
        vmap(lambda mu: odeint(lambda t, y: (-mu * y[0],), (Y0,), T))(MUS)
    with pytest.raises(NotImplementedError, match="fixed grid"):
        vmap(lambda t: solve(1.0, t=t, method="rk4"))(torch.stack([T, T + 1]))
    with pytest.raises(NotImplementedError, match="event_fn"):
        vmap(lambda mu: odeint(vdp(mu), Y0, T[:2], event_fn=lambda t, y: y[0]))(MUS)
