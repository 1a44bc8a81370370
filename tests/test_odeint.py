"""odeint against analytic solutions, scipy's solve_ivp and torchdiffeq; directions, tuples, dtypes."""

import math

import numpy as np
import pytest
import torch
import torchdiffeq
from scipy.integrate import solve_ivp

import neuralode
from neuralode import odeint

ADAPTIVE = list(neuralode.ADAPTIVE_METHODS)
FIXED = list(neuralode.FIXED_METHODS)
F64 = torch.float64


# --- five non-stiff test problems: components written once, evaluated on numpy or torch ------------
_MU = 0.012277471


def _decay(y):
    return [-0.5 * y[0], -0.5 * y[1]]


def _harmonic(y):
    return [y[1], -y[0]]


def _lotka(y):
    return [1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]]


def _vdp(y):
    return [y[1], (1 - y[0] ** 2) * y[1] - y[0]]


def _arenstorf(y):
    x, yy, vx, vy = y
    d1 = ((x + _MU) ** 2 + yy**2) ** 1.5
    d2 = ((x - 1 + _MU) ** 2 + yy**2) ** 1.5
    ax = x + 2 * vy - (1 - _MU) * (x + _MU) / d1 - _MU * (x - 1 + _MU) / d2
    ay = yy - 2 * vx - (1 - _MU) * yy / d1 - _MU * yy / d2
    return [vx, vy, ax, ay]


PROBLEMS = {
    "decay": (_decay, [1.0, 2.0], 5.0),
    "harmonic": (_harmonic, [1.0, 0.0], 10.0),
    "lotka_volterra": (_lotka, [10.0, 5.0], 10.0),
    "van_der_pol": (_vdp, [2.0, 0.0], 10.0),
    "arenstorf": (
        _arenstorf,
        [0.994, 0.0, 0.0, -2.00158510637908252240537862224],
        17.0652165601579625588917206249,
    ),
}


def _numpy_f(name):
    rhs = PROBLEMS[name][0]
    return lambda t, y: np.array(rhs(y))


def _torch_f_native(name):
    rhs = PROBLEMS[name][0]
    return lambda t, y: torch.stack(rhs(y))


def _reference(name, ts):
    _, y0, t_end = PROBLEMS[name]
    sol = solve_ivp(_numpy_f(name), (0.0, t_end), y0, method="DOP853", rtol=1e-13, atol=1e-13, t_eval=ts)
    return torch.tensor(sol.y.T, dtype=F64)


@pytest.mark.parametrize("name", list(PROBLEMS))
@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3"])
def test_adaptive_matches_reference(name, method):
    _, y0, t_end = PROBLEMS[name]
    ts = np.linspace(0.0, t_end, 7)
    rtol, atol = (1e-6, 1e-8) if method == "bosh3" else (1e-8, 1e-10)
    ys = odeint(
        _torch_f_native(name),
        torch.tensor(y0, dtype=F64),
        torch.tensor(ts, dtype=F64),
        rtol=rtol,
        atol=atol,
        method=method,
    )
    ref = _reference(name, ts)
    scale = ref.abs().max()
    # Global error of an adaptive solve is a modest multiple of the local tolerance.
    factor = 2e4 if name == "arenstorf" else 1e3
    assert float((ys - ref).abs().max()) <= factor * (atol + rtol * scale), name


def test_analytic_exponential_and_oscillator():
    t = torch.linspace(0, 5, 11, dtype=F64)
    y = odeint(lambda t, y: -2.0 * y, torch.tensor([3.0], dtype=F64), t)
    torch.testing.assert_close(y[:, 0], 3.0 * torch.exp(-2.0 * t), rtol=1e-6, atol=1e-8)
    z = odeint(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([0.0, 1.0], dtype=F64), t)
    torch.testing.assert_close(z[:, 0], torch.sin(t), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_dopri5_nfe_close_to_scipy_rk45(name):
    _, y0, t_end = PROBLEMS[name]
    sol = solve_ivp(_numpy_f(name), (0.0, t_end), y0, method="RK45", rtol=1e-6, atol=1e-9)
    with neuralode.record_stats() as stats:
        odeint(
            _torch_f_native(name),
            torch.tensor(y0, dtype=F64),
            torch.tensor([0.0, t_end], dtype=F64),
            rtol=1e-6,
            atol=1e-9,
        )
    assert abs(stats.nfe - sol.nfev) <= 0.15 * sol.nfev, (stats.nfe, sol.nfev)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"])
def test_adaptive_agrees_with_torchdiffeq(method):
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    f = lambda t, y: (y**3) @ A  # noqa: E731
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    high = method in ("dopri5", "dopri8")
    t = torch.linspace(0, 5 if high else 2, 20, dtype=F64)
    rtol, atol = (1e-7, 1e-9) if high else (1e-5, 1e-7)
    ours = odeint(f, y0, t, rtol=rtol, atol=atol, method=method)
    theirs = torchdiffeq.odeint(f, y0, t, rtol=rtol, atol=atol, method=method)
    assert float((ours - theirs).abs().max()) < 1e3 * (atol + rtol * 2)


def test_dopri5_step_sequence_equals_torchdiffeq():
    """Same embedded pair, controller and initial step: the same number of evaluations."""
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return (y**3) @ A

    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 25, 50, dtype=F64)
    theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-9)
    td_nfe = calls[0]
    with neuralode.record_stats() as stats:
        ours = odeint(f, y0, t, rtol=1e-6, atol=1e-9)
    assert stats.nfe == td_nfe
    # Values agree to the dense-output error (we land exactly on t[-1]; torchdiffeq interpolates there).
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", FIXED)
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_fixed_grid_agrees_with_torchdiffeq(method, interp):
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    f = lambda t, y: torch.tanh(y) @ A + torch.sin(t)  # noqa: E731
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 0.13, 0.5, 1.37, 2.0], dtype=F64)
    opts = dict(step_size=0.1, interp=interp)
    ours = odeint(f, y0, t, method=method, options=opts)
    theirs = torchdiffeq.odeint(f, y0, t, method=method, options=opts)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_fixed_grid_steps_on_t_without_step_size():
    f = lambda t, y: -y  # noqa: E731
    t = torch.tensor([0.0, 0.1, 0.3, 0.35], dtype=F64)
    ours = odeint(f, torch.ones(1, dtype=F64), t, method="euler")
    expect = [1.0, 0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.95]
    torch.testing.assert_close(ours[:, 0], torch.tensor(expect, dtype=F64))


def test_grid_constructor_and_perturb():
    f = lambda t, y: -y  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=F64)

    def grid(func, y0, tt):
        return torch.linspace(float(tt[0]), float(tt[-1]), 11, dtype=F64)

    ours = odeint(f, torch.ones(1, dtype=F64), t, method="euler", options=dict(grid_constructor=grid))
    assert math.isclose(float(ours[-1, 0]), 0.9**10, rel_tol=1e-12)

    # A jump in f at t = 0.5 (a grid point): perturb evaluates the one-sided limits.
    def step_f(t, y):
        return torch.where(t < 0.5, torch.zeros_like(y), torch.ones_like(y))

    plain = odeint(step_f, torch.zeros(1, dtype=F64), t, method="euler", options=dict(step_size=0.5))
    pert = odeint(
        step_f, torch.zeros(1, dtype=F64), t, method="euler", options=dict(step_size=0.5, perturb=True)
    )
    theirs = torchdiffeq.odeint(
        step_f, torch.zeros(1, dtype=F64), t, method="euler", options=dict(step_size=0.5, perturb=True)
    )
    assert float(plain[-1]) == 0.5 and float(pert[-1]) == 0.5
    torch.testing.assert_close(pert, theirs)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "rk4"])
def test_reverse_time(method):
    f = lambda t, y: torch.stack([y[1], -y[0] + 0.1 * torch.sin(t)])  # noqa: E731
    t = torch.linspace(0, 3, 7, dtype=F64)
    opts = dict(step_size=0.01) if method == "rk4" else None
    fwd = odeint(
        f, torch.tensor([1.0, 0.0], dtype=F64), t, method=method, options=opts, rtol=1e-10, atol=1e-10
    )
    back = odeint(f, fwd[-1], t.flip(0), method=method, options=opts, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back.flip(0), fwd, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_tuple_state(method):
    def f(t, state):
        x, v = state
        return v, -x

    x0 = torch.ones(3, 2, dtype=F64)
    v0 = torch.zeros(3, 2, dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    opts = dict(step_size=0.001) if method == "rk4" else None
    xs, vs = odeint(f, (x0, v0), t, method=method, options=opts, rtol=1e-9, atol=1e-10)
    assert xs.shape == (5, 3, 2) and vs.shape == (5, 3, 2)
    torch.testing.assert_close(xs[:, 0, 0], torch.cos(t), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(vs[:, 0, 0], -torch.sin(t), rtol=1e-6, atol=1e-7)


def test_tuple_tolerances_and_norm_agree_with_torchdiffeq():
    def f(t, s):
        return -s[0] * 2.0, s[1] * 0.0 + s[0].sum()

    y0 = (torch.ones(4, dtype=F64), torch.zeros(1, dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ours = odeint(f, y0, t, rtol=1e-6, atol=1e-8)
    theirs = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-8)
    for a, b in zip(ours, theirs):  # same steps; the last value differs by dense-output error
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_time_given_to_func(dtype):
    seen = []

    def f(t, y):
        seen.append(t)
        return -y

    y = odeint(f, torch.ones(2, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype), rtol=1e-5, atol=1e-6)
    assert y.dtype == dtype
    assert all(s.dtype == dtype and s.dim() == 0 for s in seen)
    assert abs(float(y[-1, 0]) - math.exp(-1)) < 1e-4


def test_time_is_float64_internally_for_float32_state():
    """Long float32 solves keep exact output times: time runs in float64 on the host."""
    t = torch.tensor([0.0, 1000.0 + 1e-4], dtype=torch.float64)
    y = odeint(lambda t, y: torch.zeros_like(y), torch.ones(1), t.float().double(), rtol=1e-3, atol=1e-3)
    assert y.shape == (2, 1)


def test_per_element_tolerances():
    y0 = torch.tensor([1.0, 1000.0], dtype=F64)
    f = lambda t, y: -y  # noqa: E731
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with neuralode.record_stats() as loose:
        odeint(f, y0, t, rtol=torch.tensor([1e-3, 1e-3], dtype=F64), atol=1e-6)
    with neuralode.record_stats() as tight:
        odeint(f, y0, t, rtol=torch.tensor([1e-3, 1e-9], dtype=F64), atol=1e-6)
    assert tight.nfe > loose.nfe


def test_user_norm_and_pi_controller():
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    f = lambda t, y: (y**3) @ A  # noqa: E731
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 10, 5, dtype=F64)
    ref = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-9, options=dict(norm=lambda x: x.abs().max()))
    ours = odeint(f, y0, t, rtol=1e-6, atol=1e-9, options=dict(norm=lambda x: x.abs().max()))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    with neuralode.record_stats() as pi:
        y_pi = odeint(f, y0, t, rtol=1e-6, atol=1e-9, options=dict(controller="pi"))
    assert pi.nfe > 0
    torch.testing.assert_close(y_pi, ref, rtol=1e-4, atol=1e-4)


def test_step_options():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 10.0], dtype=F64)
    with neuralode.record_stats() as s:
        odeint(f, y0, t, rtol=1e-3, atol=1e-3, options=dict(max_step=0.5))
    assert s.n_accepted >= 20 and s.last_step <= 0.5
    with neuralode.record_stats() as s:
        odeint(f, y0, t, rtol=1e-3, atol=1e-3, options=dict(first_step=0.01))
    assert s.nfe > 0
    with neuralode.record_stats() as s:
        odeint(f, y0, t, rtol=1e-12, atol=1e-12, options=dict(min_step=1.0))
    assert s.n_rejected == 0


def test_stats_counts():
    with neuralode.record_stats() as s:
        odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert s.n_solves == 1 and s.n_steps == s.n_accepted + s.n_rejected
    # dopri5: 2 evaluations for the start (f0 + initial step), 6 per attempted step.
    assert s.nfe == 2 + 6 * s.n_steps
    mine = neuralode.SolveStats()
    odeint(
        lambda t, y: -y,
        torch.ones(1),
        torch.tensor([0.0, 1.0]),
        method="rk4",
        options=dict(step_size=0.1),
        stats=mine,
    )
    assert (mine.n_steps == 10 and mine.nfe == 1 + 4 * 10 - 0) or mine.nfe == 40


def test_time_gradient_direct():
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.2, 1.0, 1.5], dtype=F64, requires_grad=True)
    y = odeint(lambda t, y: -y * t, y0, t, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(y[1:].sum(), t)
    # y(t) = exp(-(t² − t0²)/2): dy/dt_i = −t_i y(t_i); dy/dt0 = t0 y(t_i)
    ex = lambda ti: math.exp(-(ti**2 - 0.04) / 2)  # noqa: E731
    want = [0.2 * (ex(1.0) + ex(1.5)), -1.0 * ex(1.0), -1.5 * ex(1.5)]
    torch.testing.assert_close(g, torch.tensor(want, dtype=F64), rtol=1e-6, atol=1e-8)
