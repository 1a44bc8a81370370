"""Terminal events: location, both time directions, tuple states, fixed grids, and event-time gradients
(implicit function theorem) through odeint and odeint_adjoint against finite differences."""

import math

import pytest
import torch
import torchdiffeq

import neuralode
from neuralode import odeint, odeint_adjoint, odeint_event

F64 = torch.float64


class Fall(torch.nn.Module):
    """Free fall with linear drag: y = (height, velocity)."""

    def __init__(self, gravity=9.8, drag=0.1):
        super().__init__()
        self.gravity = torch.nn.Parameter(torch.tensor(gravity, dtype=F64))
        self.drag = torch.nn.Parameter(torch.tensor(drag, dtype=F64))

    def forward(self, t, y):
        return torch.stack([y[1], -self.gravity - self.drag * y[1]])


def ground(t, y):
    return y[0]


def test_free_fall_event_time_matches_closed_form_both_directions():
    def f(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -9.8)])

    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    exact = math.sqrt(2 * 10 / 9.8)
    et, sol = odeint_event(f, y0, t0, event_fn=ground, rtol=1e-8, atol=1e-10)
    assert abs(et.item() - exact) < 1e-9
    assert sol.shape == (2, 2) and abs(sol[-1, 0].item()) < 1e-8
    et_r, sol_r = odeint_event(f, y0, t0, event_fn=ground, reverse_time=True, rtol=1e-8, atol=1e-10)
    assert abs(et_r.item() + exact) < 1e-9
    assert sol_r[-1, 1].item() > 0  # moving up when it left the ground, in backward time


def test_odeint_event_fn_returns_detached_time_and_requires_two_times():
    func = Fall()
    y0 = torch.tensor([5.0, 1.0], dtype=F64)
    et, sol = odeint(func, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=ground, rtol=1e-8, atol=1e-8)
    assert not et.requires_grad and et.dtype == F64
    td_t, td_sol = torchdiffeq.odeint(
        func, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=ground, rtol=1e-8, atol=1e-8
    )
    assert abs(et.item() - td_t.item()) < 1e-7
    assert torch.allclose(sol, td_sol, atol=1e-6)
    with pytest.raises(ValueError, match="exactly 2"):
        odeint(func, y0, torch.tensor([0.0, 1.0, 2.0], dtype=F64), event_fn=ground)


def test_event_on_tuple_state_and_vector_event():
    def f(t, state):
        _, v = state
        return v, torch.full_like(v, -9.8)

    def events(t, state):  # fires at the first of: ground, or height 3
        x, _ = state
        return torch.cat([x.reshape(-1), (x - 3.0).reshape(-1)])

    x0, v0 = torch.tensor([10.0], dtype=F64), torch.tensor([0.0], dtype=F64)
    et, (xs, vs) = odeint_event(f, (x0, v0), torch.tensor(0.0, dtype=F64), event_fn=events, atol=1e-10)
    assert xs.shape == (2, 1) and vs.shape == (2, 1)
    assert abs(et.item() - math.sqrt(2 * 7 / 9.8)) < 1e-8
    assert abs(xs[-1].item() - 3.0) < 1e-8


def test_event_already_zero_at_start_returns_t0():
    et, sol = odeint(
        Fall(), torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64), event_fn=ground
    )
    assert et.item() == 0.5 and torch.equal(sol[0], sol[1])


@pytest.mark.parametrize("method", ["rk4", "gl4"])
def test_fixed_grid_event(method):
    func = Fall(drag=0.0)
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    cubic = {"step_size": 0.05, "interp": "cubic"}
    et, _ = odeint_event(func, y0, t0, event_fn=ground, method=method, options=cubic, atol=1e-9)
    assert abs(et.item() - math.sqrt(2 * 10 / 9.8)) < 1e-8  # the cubic interpolant is exact here
    if method == "rk4":  # interp="linear" still locates on the cubic: closer than torchdiffeq's line
        linear = {"step_size": 0.05}
        et, sol = odeint_event(func, y0, t0, event_fn=ground, method=method, options=linear, atol=1e-9)
        td_t, _ = torchdiffeq.odeint_event(
            func, y0, t0, event_fn=ground, method=method, options=linear, atol=1e-9
        )
        exact = math.sqrt(2 * 10 / 9.8)
        assert abs(et.item() - exact) < 1e-8 < abs(td_t.item() - exact)
        assert abs(sol[-1, 0].item()) < 1e-8


def test_fixed_grid_event_needs_step_size_and_scipy_has_no_events():
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="step_size"):
        odeint_event(Fall(), y0, torch.tensor(0.0, dtype=F64), event_fn=ground, method="rk4")
    with pytest.raises(ValueError, match="does not support event_fn"):
        odeint_event(Fall(), y0, torch.tensor(0.0, dtype=F64), event_fn=ground, method="scipy_solver")


def _event_time(interface, height, velocity, t0, gravity, drag):
    func = Fall(gravity, drag)
    y0 = torch.stack([height, velocity])
    et, sol = odeint_event(func, y0, t0, event_fn=ground, odeint_interface=interface, rtol=1e-10, atol=1e-10)
    return et, sol, func


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint], ids=["odeint", "odeint_adjoint"])
def test_event_time_gradient_matches_finite_differences(interface):
    h = torch.tensor(7.0, dtype=F64, requires_grad=True)
    v = torch.tensor(1.5, dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.3, dtype=F64, requires_grad=True)
    et, sol, func = _event_time(interface, h, v, t0, 9.8, 0.1)
    # Loss uses the event time and the velocity at impact (the state gradient is rerouted too).
    loss = et + 0.1 * sol[-1, 1]
    grads = torch.autograd.grad(loss, (h, v, t0, func.gravity, func.drag))

    def value(dh=0.0, dv=0.0, dt=0.0, dg=0.0, dd=0.0):
        with torch.no_grad():
            e, s, _ = _event_time(odeint, h + dh, v + dv, t0 + dt, 9.8 + dg, 0.1 + dd)
        return (e + 0.1 * s[-1, 1]).item()

    eps = 1e-4
    fd = []
    for k in ("dh", "dv", "dt", "dg", "dd"):
        fd.append((value(**{k: eps}) - value(**{k: -eps})) / (2 * eps))
    for g, want in zip(grads, fd):
        assert abs(g.item() - want) < 1e-5, (grads, fd)


@pytest.mark.parametrize("method", ["dopri8", "tsit5", "bosh3"])
def test_event_time_gradient_other_adaptive_methods(method):
    y0 = torch.tensor([6.0, 0.5], dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=F64)

    def event_time(y):
        et, _ = odeint_event(Fall(), y, t0, event_fn=ground, method=method, rtol=1e-10, atol=1e-10)
        return et

    (g,) = torch.autograd.grad(event_time(y0), y0)
    eps = 1e-5
    for i in range(2):
        e = torch.zeros(2, dtype=F64)
        e[i] = eps
        with torch.no_grad():
            fd = (event_time(y0 + e) - event_time(y0 - e)) / (2 * eps)
        assert abs(g[i].item() - fd.item()) < 1e-6


def test_event_time_gradient_agrees_with_torchdiffeq():
    results = []
    for lib in (neuralode, torchdiffeq):
        func = Fall()
        y0 = torch.tensor([4.0, 2.0], dtype=F64, requires_grad=True)
        t0 = torch.tensor(0.0, dtype=F64, requires_grad=True)
        et, _ = lib.odeint_event(func, y0, t0, event_fn=ground, rtol=1e-9, atol=1e-9)
        results.append((et.detach(), *torch.autograd.grad(et, (y0, t0, func.gravity, func.drag))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_event_gradient_reaches_event_fn_parameters():
    level = torch.tensor(2.0, dtype=F64, requires_grad=True)
    func = Fall(drag=0.0)

    def event(t, y):
        return y[0] - level

    et, _ = odeint_event(
        func, torch.tensor([10.0, 0.0], dtype=F64), torch.tensor(0.0, dtype=F64), event_fn=event
    )
    (g,) = torch.autograd.grad(et, level)
    # T = sqrt(2 (10 − L) / g) → dT/dL = −1 / (g T)
    assert abs(g.item() + 1 / (9.8 * et.item())) < 1e-6


def _load_example():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "bouncing_ball.py"
    spec = importlib.util.spec_from_file_location("bouncing_ball_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("interface", [odeint, odeint_adjoint], ids=["odeint", "odeint_adjoint"])
def test_bouncing_ball_example(interface):
    ball = _load_example()
    with torch.no_grad():
        times, _ = ball.BouncingBall().collisions(4)
    for got, want in zip(times, ball.closed_form(4)):
        assert abs(float(got) - want) < 1e-8
    rows, ok = ball.gradient_check(3, interface)
    assert ok, rows


def test_event_that_never_happens_raises_solver_error():
    with pytest.raises(neuralode.SolverError, match="never crossed zero"):
        odeint(
            lambda t, y: -y,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            event_fn=lambda t, y: y + 1.0,
            options={"max_num_steps": 50},
        )


def test_odeint_adjoint_event_mode_matches_torchdiffeq():
    results = []
    for lib in (neuralode, torchdiffeq):
        func = Fall()
        y0 = torch.tensor([4.0, 2.0], dtype=F64, requires_grad=True)
        t = torch.tensor([0.0, 1.0], dtype=F64)
        et, sol = lib.odeint_adjoint(func, y0, t, event_fn=ground, rtol=1e-9, atol=1e-9)
        assert lib is torchdiffeq or not et.requires_grad  # no gradient through the event time here
        grads = torch.autograd.grad(sol[-1, 1], (y0, func.gravity, func.drag))
        results.append((et, sol.detach(), *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def test_fixed_grid_event_with_perturb_agrees_with_torchdiffeq():
    def f(t, y):  # velocity jumps at t = 0.5 (a kick): perturb evaluates the correct side at grid points
        kick = torch.where(t < 0.5, 0.0, -20.0).to(y.dtype)
        return torch.stack([y[1], -9.8 + kick])

    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    kw = dict(event_fn=ground, method="rk4", options={"step_size": 0.05, "perturb": True}, atol=1e-10)
    et, sol = odeint_event(f, y0, t0, **kw)
    td_t, td_sol = torchdiffeq.odeint_event(f, y0, t0, **kw)
    # Exact: free fall to t = 0.5 (height 8.775, velocity -4.9), then acceleration -29.8.
    exact = 0.5 + (-4.9 + math.sqrt(4.9**2 + 2 * 29.8 * 8.775)) / 29.8
    assert abs(et.item() - exact) < 1e-9 < abs(td_t.item() - exact)  # on the cubic, not the line
    assert abs(sol[-1, 0].item()) < 1e-9 and abs(sol[-1, 1].item() + 4.9 + 29.8 * (exact - 0.5)) < 1e-8
    assert td_sol.shape == sol.shape
