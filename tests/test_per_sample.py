"""Per-sample adaptive stepping (``odeint_per_sample`` / ``options={"per_sample": True}``)."""

import pytest
import torch

import neuralode
from neuralode import SolverError, odeint, odeint_per_sample, record_stats

DT = torch.float64


def vdp_batch(mu):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)

    return f


def vdp_one(mu_b):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu_b * (1 - x * x) * v - x], -1)

    return f


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
def test_each_sample_matches_its_own_odeint_solve(method):
    B = 5
    mu = torch.linspace(0.3, 4.0, B, dtype=DT)
    y0 = torch.stack([torch.linspace(0.5, 2.0, B, dtype=DT), torch.zeros(B, dtype=DT)], 1)
    t = torch.linspace(0.0, 4.0, 6, dtype=DT)
    ys, info = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, method=method, return_info=True)
    assert ys.shape == (6, B, 2)
    assert (info.status == 0).all()
    for b in range(B):
        with record_stats() as st:
            yb = odeint(vdp_one(mu[b]), y0[b : b + 1], t, rtol=1e-6, atol=1e-8, method=method)
        torch.testing.assert_close(ys[:, b], yb[:, 0], rtol=1e-9, atol=1e-9)
        assert int(info.n_accepted[b]) == st.n_accepted
        assert int(info.n_rejected[b]) == st.n_rejected


def test_per_sample_times_start_end_and_direction():
    B = 3
    mu = torch.tensor([0.5, 1.0, 2.0], dtype=DT)
    y0 = torch.tensor([[1.0, 0.0], [2.0, 0.5], [0.5, -1.0]], dtype=DT)
    t = torch.tensor([[0.0, 0.7, 1.5, 3.0], [1.0, 1.2, 2.0, 2.5], [2.0, 1.0, 0.5, -1.0]], dtype=DT)
    ys = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-8, atol=1e-10)
    assert ys.shape == (4, B, 2)
    for b in range(B):
        yb = odeint(vdp_one(mu[b]), y0[b : b + 1], t[b], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(ys[:, b], yb[:, 0], rtol=1e-7, atol=1e-8)


def test_time_passed_to_func_is_per_sample_in_state_dtype():
    seen = []

    def f(t, y):
        seen.append((t.shape, t.dtype))
        return -y * (1 + t.unsqueeze(1))

    y0 = torch.ones(4, 3)
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 2.0], [0.0, 0.5]])
    ys = odeint_per_sample(f, y0, t, rtol=1e-5, atol=1e-7)
    assert all(s == ((4,), torch.float32) for s in seen)
    exact = torch.exp(-(t[:, 1] - t[:, 0]) - (t[:, 1] ** 2 - t[:, 0] ** 2) / 2)
    torch.testing.assert_close(ys[-1, :, 0], exact, rtol=1e-4, atol=1e-5)


def test_front_door_option_equals_function():
    mu = torch.linspace(0.5, 3.0, 4, dtype=DT)
    y0 = torch.tensor([[2.0, 0.0]], dtype=DT).repeat(4, 1)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    a = odeint(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, options={"per_sample": True, "max_num_steps": 500})
    b = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, options={"max_num_steps": 500})
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = odeint(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, options={"per_sample": False})
    torch.testing.assert_close(c, odeint(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8), rtol=0, atol=0)


def test_joint_mode_takes_several_times_more_steps_on_varied_van_der_pol():
    B = 32
    mu = torch.linspace(0.2, 10.0, B, dtype=DT)
    y0 = torch.tensor([[2.0, 0.0]], dtype=DT).repeat(B, 1)
    t = torch.tensor([0.0, 10.0], dtype=DT)
    with record_stats() as joint:
        yj = odeint(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8)
    ys, info = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, return_info=True)
    mean_steps = info.n_steps.double().mean().item()
    assert joint.n_steps > 2.5 * mean_steps
    assert info.nfe < joint.nfe
    torch.testing.assert_close(ys, yj, rtol=1e-3, atol=1e-3)


def test_gradients_match_separate_solves():
    B = 4
    mu = torch.linspace(0.5, 2.0, B, dtype=DT).requires_grad_()
    y0 = torch.tensor([[1.5, 0.0], [1.0, 0.5], [2.0, -0.5], [0.5, 1.0]], dtype=DT).requires_grad_()
    t = torch.linspace(0.0, 2.0, 4, dtype=DT)
    w = torch.randn(4, B, 2, dtype=DT)
    ys = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-8, atol=1e-10)
    g_mu, g_y0 = torch.autograd.grad((ys * w).sum(), (mu, y0))
    for b in range(B):
        mu_b = mu.detach()[b].clone().requires_grad_()
        y0_b = y0.detach()[b : b + 1].clone().requires_grad_()
        yb = odeint(vdp_one(mu_b), y0_b, t, rtol=1e-8, atol=1e-10)
        gm, gy = torch.autograd.grad((yb[:, 0] * w[:, b]).sum(), (mu_b, y0_b))
        torch.testing.assert_close(g_mu[b], gm, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(g_y0[b], gy[0], rtol=1e-7, atol=1e-9)


def test_gradient_matches_finite_differences():
    B = 3
    mu = torch.tensor([0.5, 1.5, 3.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0]], dtype=DT).repeat(B, 1)
    t = torch.tensor([0.0, 1.5], dtype=DT)

    def loss(m):
        return odeint_per_sample(vdp_batch(m), y0, t, rtol=1e-10, atol=1e-12)[-1, :, 0]

    (g,) = torch.autograd.grad(loss(mu).sum(), mu)
    eps = 1e-5
    with torch.no_grad():
        for b in range(B):
            e = torch.zeros(B, dtype=DT)
            e[b] = eps
            fd = (loss(mu + e)[b] - loss(mu - e)[b]) / (2 * eps)
            assert abs(float(g[b]) - float(fd)) < 1e-5 * max(1.0, abs(float(fd)))


def test_failed_samples_status_and_throw():
    mu = torch.tensor([0.5, 8.0], dtype=DT)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=DT)
    t = torch.linspace(0.0, 10.0, 3, dtype=DT)
    opts = {"max_num_steps": 120}
    ys, info = odeint_per_sample(
        vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, options=opts, throw=False, return_info=True
    )
    assert info.status.tolist() == [0, 1]
    assert int(info.n_steps[1]) == 120
    assert torch.isfinite(ys[:, 0]).all() and torch.isnan(ys[-1, 1]).all()
    with pytest.raises(SolverError, match="1 of 2 samples failed"):
        odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, options=opts)


def test_nonfinite_sample_is_stopped():
    def f(t, y):
        return torch.stack([y[0] ** 2, -y[1]])  # sample 0 blows up at t = 1

    y0 = torch.ones(2, 1, dtype=DT)
    _, info = odeint_per_sample(f, y0, torch.tensor([0.0, 2.0], dtype=DT), throw=False, return_info=True)
    assert int(info.status[1]) == 0
    assert int(info.status[0]) in (2, 3)  # underflow near the singularity, or non-finite


def test_record_stats_counts_batched_evaluations():
    mu = torch.tensor([1.0, 2.0], dtype=DT)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=DT)
    with record_stats() as st:
        _, info = odeint_per_sample(vdp_batch(mu), y0, torch.tensor([0.0, 1.0], dtype=DT), return_info=True)
    assert st.nfe == info.nfe
    assert st.n_accepted == int(info.n_accepted.sum())
    assert st.n_steps == int(info.n_steps.sum())


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"method": "rk4"}, ValueError, "not an adaptive method"),
        ({"options": {"step_size": 0.1}}, ValueError, "unknown option"),
        ({"t": torch.zeros(2, 2, 2)}, ValueError, "must be"),
        ({"t": torch.tensor([0.0, 1.0, 1.0])}, ValueError, "strictly"),
        ({"y0": torch.ones(2, 2, dtype=torch.int64)}, TypeError, "floating"),
        ({"rtol": -1.0}, ValueError, "rtol"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = {"y0": torch.ones(2, 2), "t": torch.tensor([0.0, 1.0])}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        odeint_per_sample(lambda t, y: -y, args.pop("y0"), args.pop("t"), **args)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    mu = torch.linspace(0.5, 5.0, 16, dtype=DT)
    y0 = torch.tensor([[2.0, 0.0]], dtype=DT).repeat(16, 1)
    t = torch.linspace(0.0, 5.0, 5, dtype=DT)
    cpu = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-7, atol=1e-9)
    gpu = odeint_per_sample(vdp_batch(mu.cuda()), y0.cuda(), t.cuda(), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-9)


def test_exported():
    assert neuralode.odeint_per_sample is odeint_per_sample


class _OneVdp(torch.nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.mu = torch.nn.Parameter(mu)

    def forward(self, t, y):
        return vdp_one(self.mu)(t, y)


def test_gradients_agree_with_per_sample_adjoint_solves():
    """Per-sample mode differentiates through its steps; each sample's gradient matches the adjoint of
    that sample solved alone to the adjoint's tolerance."""
    B = 3
    mu = torch.tensor([0.5, 1.5, 3.0], dtype=DT, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.5, -0.5]], dtype=DT)
    t = torch.tensor([0.0, 0.8, 1.5], dtype=DT)
    ys = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-9, atol=1e-11)
    (g,) = torch.autograd.grad(ys[1:].sum(), mu)
    for b in range(B):
        m = _OneVdp(mu.detach()[b].clone())
        yb = neuralode.odeint_adjoint(m, y0[b : b + 1], t, rtol=1e-9, atol=1e-11)
        (ga,) = torch.autograd.grad(yb[1:].sum(), [m.mu])
        assert abs(float(g[b]) - float(ga)) < 1e-6 * max(1.0, abs(float(ga)))


class _VdpNet(torch.nn.Module):
    """Per-sample μ (one parameter per sample) plus shared parameters."""

    def __init__(self, B):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.linspace(0.5, 3.0, B, dtype=DT))
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=DT))
        self.lin = torch.nn.Linear(2, 2).to(DT)

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1) + self.w * torch.tanh(self.lin(y))


@pytest.mark.parametrize("per_sample_t", [False, True])
def test_per_sample_adjoint_matches_direct_gradients(per_sample_t):
    B = 4
    m = _VdpNet(B)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0], [1.5, 1.0]], dtype=DT, requires_grad=True)
    if per_sample_t:
        t = torch.stack([torch.linspace(0.0, 2.0, 3, dtype=DT) + 0.1 * b for b in range(B)])
    else:
        t = torch.linspace(0.0, 2.0, 4, dtype=DT)
    w = torch.randn(t.shape[-1], B, 2, dtype=DT)
    ys = odeint_per_sample(m, y0, t, rtol=1e-10, atol=1e-12)
    direct = torch.autograd.grad((ys * w).sum(), [y0, *m.parameters()])
    ya = neuralode.odeint_per_sample_adjoint(m, y0, t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ya, ys, rtol=0, atol=0)
    adjoint = torch.autograd.grad((ya * w).sum(), [y0, *m.parameters()])
    for gd, ga in zip(direct, adjoint):
        torch.testing.assert_close(ga, gd, rtol=1e-7, atol=1e-8)


def test_per_sample_adjoint_plain_function_gradient_to_y0():
    mu = torch.tensor([0.5, 2.0], dtype=DT)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=DT, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    (gd,) = torch.autograd.grad(odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-10, atol=1e-12)[-1].sum(), y0)
    ya = neuralode.odeint_per_sample_adjoint(vdp_batch(mu), y0, t, rtol=1e-10, atol=1e-12)
    (ga,) = torch.autograd.grad(ya[-1].sum(), y0)
    torch.testing.assert_close(ga, gd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("options", [{"controller": "pi"}, {"pcoeff": 0.3, "icoeff": 0.6, "safety": 0.8}])
def test_pi_controller_matches_its_own_odeint_solve(options):
    B = 3
    mu = torch.linspace(0.5, 3.0, B, dtype=DT)
    y0 = torch.stack([torch.linspace(0.5, 2.0, B, dtype=DT), torch.zeros(B, dtype=DT)], 1)
    t = torch.linspace(0.0, 3.0, 4, dtype=DT)
    ys, info = odeint_per_sample(
        vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, options=options, return_info=True
    )
    _, plain = odeint_per_sample(vdp_batch(mu), y0, t, rtol=1e-6, atol=1e-8, return_info=True)
    assert not torch.equal(info.n_steps, plain.n_steps)  # the PI controller takes other steps
    for b in range(B):
        with record_stats() as st:
            yb = odeint(vdp_one(mu[b]), y0[b : b + 1], t, rtol=1e-6, atol=1e-8, options=options)
        torch.testing.assert_close(ys[:, b], yb[:, 0], rtol=1e-9, atol=1e-9)
        assert st.n_steps == int(info.n_steps[b])


def test_nan_mid_solve_is_nonfinite_not_underflow():
    def f(t, y):  # sample 0 returns NaN from t = 0.4 on, for any state
        nan = torch.where((t > 0.4) & (torch.arange(2) == 0), float("nan"), 0.0).to(y.dtype)
        return -y + nan.unsqueeze(1)

    ys, info = odeint_per_sample(
        f, torch.ones(2, 1, dtype=DT), torch.tensor([0.0, 1.0], dtype=DT), throw=False, return_info=True
    )
    assert info.status.tolist() == [3, 0]
    assert float(info.t[0]) == pytest.approx(0.4, abs=1e-9)
    torch.testing.assert_close(ys[-1, 1], torch.exp(-torch.ones(1, dtype=DT)), rtol=1e-6, atol=0)
