"""Event regressions: training through repeated events with a constant event function past a terminal
time (against torchdiffeq), fixed-grid event accuracy, an event that never fires, and per-sample events
(each sample stops at its own event) against per-sample joint solves and finite differences."""

import functools
import math

import pytest
import torch
import torchdiffeq
from torch import nn

import neuralode
from neuralode import SolverError, odeint, odeint_adjoint, odeint_event

F64 = torch.float64


# -- a bouncing ball learnt through repeated events ----------------------------------------------------


class Gravity(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.tensor([9.0], dtype=F64))

    def forward(self, t, state):
        _pos, vel, radius = state
        return vel, -self.g.expand_as(vel), torch.zeros_like(radius)


class Ball(nn.Module):
    """Dynamics, restitution and the radius (inside the event function, carried in the tuple state)."""

    def __init__(self, g=9.0, radius=0.3, restitution=0.7):
        super().__init__()
        self.dynamics = Gravity()
        with torch.no_grad():
            self.dynamics.g.fill_(g)
        self.radius = nn.Parameter(torch.tensor([radius], dtype=F64))
        self.restitution = nn.Parameter(torch.tensor([restitution], dtype=F64))

    def simulate(self, lib, interface, times):
        t0 = torch.tensor([0.0], dtype=F64)

        def event_fn(t, state):
            if t > times[-1] + 1e-7:  # a terminal time: constant past it
                return torch.zeros_like(t)
            pos, _, radius = state
            return pos - radius

        state = (torch.tensor([2.0], dtype=F64), torch.tensor([0.0], dtype=F64), self.radius)
        trajectory, event_times = [state[0][None]], []
        for _ in range(6):
            if not t0 < times[-1]:
                break
            event_t, sol = lib.odeint_event(
                self.dynamics, state, t0, event_fn=event_fn, rtol=1e-9, atol=1e-9, odeint_interface=interface
            )
            ts = times[(times > t0) & (times <= event_t)]
            ts = torch.cat([t0.reshape(-1), ts])
            trajectory.append(interface(self.dynamics, state, ts, rtol=1e-9, atol=1e-9)[0][1:])
            if event_t < times[-1]:
                pos, vel, radius = (s[-1] for s in sol)
                vel = -vel * self.restitution
                state = (pos + 1e-7 * vel, vel, radius)
            event_times.append(event_t.reshape(-1))
            t0 = event_t
        return torch.cat(trajectory), torch.cat(event_times)


_TIMES = torch.linspace(0, 2.0, 11, dtype=F64)


@functools.cache
def _target() -> torch.Tensor:
    with torch.no_grad():
        return Ball(9.8, 0.2, 0.8).simulate(neuralode, odeint, _TIMES)[0]


def _train(lib, interface, steps=2):
    times, target = _TIMES, _target()
    model = Ball()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        trajectory, event_times = model.simulate(lib, interface, times)
        # The bounce times enter the loss; the terminal one does not: torchdiffeq's bisection may end a
        # hair before the terminal time, where the event function is the ball's and its gradient is not 0.
        loss = ((trajectory - target) ** 2).mean() + event_times[:-1].sum() * 1e-2
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        history.append((loss.detach(), event_times.detach(), grads.clone()))
        opt.step()
    return history


@pytest.mark.parametrize("interface", ["odeint", "odeint_adjoint"])
def test_bouncing_ball_trains_through_events_like_torchdiffeq(interface):
    ours = _train(neuralode, getattr(neuralode, interface))
    theirs = _train(torchdiffeq, getattr(torchdiffeq, interface))
    for (loss, times, grads), (td_loss, td_times, td_grads) in zip(ours, theirs):
        assert times.shape == td_times.shape and len(times) == 3  # two bounces, then the terminal time
        assert torch.allclose(times, td_times, atol=1e-7)
        assert torch.isclose(loss, td_loss, rtol=1e-6)
        assert torch.all(grads != 0)
        assert torch.allclose(grads, td_grads, rtol=1e-5, atol=1e-8), (grads, td_grads)
    assert ours[1][0] < ours[0][0]  # it trains


def test_constant_event_function_still_carries_a_zero_gradient():
    # Past the terminal time the event function is constant: the event time does not move with the
    # inputs, but it stays differentiable (zero), as the state is.
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    et, _sol = odeint_event(
        lambda t, y: torch.stack([y[1], -y[0]]),
        y0,
        torch.tensor(0.0, dtype=F64),
        event_fn=lambda t, y: torch.zeros_like(t) if t > 0.5 else y[0] + 5.0,
    )
    assert abs(et.item() - 0.5) < 1e-8  # the first time it stops being positive
    (g,) = torch.autograd.grad(et, y0)
    assert torch.equal(g, torch.zeros_like(g))


# -- fixed-grid events --------------------------------------------------------------------------------

_FIXED_PROBLEMS = [
    (
        "fall",
        lambda t, y: torch.stack([y[1], -9.8 + 0 * y[1]]),
        [10.0, 0.0],
        lambda t, y: y[0],
        math.sqrt(20 / 9.8),
    ),
    (
        "oscillator",
        lambda t, y: torch.stack([y[1], -y[0]]),
        [1.0, 0.0],
        lambda t, y: y[0] - 0.3,
        math.acos(0.3),
    ),
    ("decay", lambda t, y: -y, [1.0], lambda t, y: y[0] - 0.2, math.log(5.0)),
]


@pytest.mark.parametrize(
    "method,h", [("rk4", 0.2), ("rk4", 0.05), ("explicit_adams", 0.2), ("midpoint", 0.1)]
)
@pytest.mark.parametrize("name,f,y0,g,exact", _FIXED_PROBLEMS, ids=[p[0] for p in _FIXED_PROBLEMS])
def test_fixed_grid_event_time_at_least_as_accurate_as_torchdiffeq(method, h, name, f, y0, g, exact):
    if method == "explicit_adams" and name == "decay":
        pytest.skip("the order-12 Bashforth formula is itself inaccurate here, for both libraries")
    errors = []
    for lib in (neuralode, torchdiffeq):
        et, _ = lib.odeint_event(
            f,
            torch.tensor(y0, dtype=F64),
            torch.tensor(0.0, dtype=F64),
            event_fn=g,
            method=method,
            options={"step_size": h},
        )
        errors.append(abs(et.item() - exact))
    assert errors[0] <= errors[1], errors


def test_fixed_grid_event_with_euler_keeps_its_own_line():
    # Euler's step is linear in time: the event on its polygon is the same as torchdiffeq's.
    f, y0, g = _FIXED_PROBLEMS[1][1], torch.tensor([1.0, 0.0], dtype=F64), _FIXED_PROBLEMS[1][3]
    t0 = torch.tensor(0.0, dtype=F64)
    ours, _ = odeint_event(f, y0, t0, event_fn=g, method="euler", options={"step_size": 0.1}, atol=1e-12)
    theirs, _ = torchdiffeq.odeint_event(
        f, y0, t0, event_fn=g, method="euler", options={"step_size": 0.1}, atol=1e-12
    )
    assert abs(ours.item() - theirs.item()) < 1e-10


# -- an event that never fires ------------------------------------------------------------------------


def test_event_that_never_fires_ends_with_a_clear_error():
    with pytest.raises(SolverError, match="never crossed zero") as info:
        odeint_event(
            lambda t, y: torch.stack([y[1], -y[0]]),
            torch.tensor([1.0, 0.0], dtype=F64),
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y[0] + 2.0,
            options={"max_num_steps": 300},
        )
    err = info.value
    assert err.reason == "no_event" and err.n_steps == 300 and err.t > 10
    assert "at t=" in str(err) and "after 300 steps" in str(err) and "max_num_steps" in str(err)


def test_event_search_has_a_default_step_budget(monkeypatch):
    import neuralode._events as ev

    assert ev.EVENT_STEP_BUDGET == 20_000
    monkeypatch.setattr(ev, "EVENT_STEP_BUDGET", 100)
    with pytest.raises(SolverError, match="step budget of 100 steps") as info:
        odeint(
            lambda t, y: -y,
            torch.ones(1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            event_fn=lambda t, y: y + 1,
        )
    assert info.value.reason == "no_event"
    monkeypatch.setattr(ev, "_MAX_FIXED_STEPS", 50)
    with pytest.raises(SolverError, match="never crossed zero within 50 fixed steps") as info:
        odeint_event(
            lambda t, y: -y,
            torch.ones(1, dtype=F64),
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y + 1,
            method="rk4",
            options={"step_size": 0.1},
        )
    assert info.value.reason == "no_event" and abs(info.value.t - 5.0) < 1e-9


# -- per-sample events --------------------------------------------------------------------------------

A0 = ((-0.3, 1.0), (-1.0, -0.3))
Y0 = ((1.0, 0.0), (0.8, 0.5), (0.3, -0.2), (-0.5, 1.0))
TOL = dict(rtol=1e-9, atol=1e-10)


class Rotation(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(A0, dtype=F64))

    def forward(self, t, y):
        return y @ self.A.T


def _per_sample_loss(func, y0, event_fn, **kw):
    et, sol = odeint_event(
        func, y0, torch.tensor(0.0, dtype=F64), event_fn=event_fn, options={"per_sample": True}, **TOL, **kw
    )
    w = torch.arange(1, len(et) + 1, dtype=F64)
    return (et * w).sum() + (sol[-1] ** 2 * w[:, None]).sum(), et, sol


def _row_loop_loss(func, y0, event_fn_row, **kw):
    loss, times, states = 0.0, [], []
    for b in range(y0.shape[0]):
        et, sol = odeint_event(
            func, y0[b : b + 1], torch.tensor(0.0, dtype=F64), event_fn=event_fn_row, **TOL, **kw
        )
        loss = loss + (b + 1) * et + (b + 1) * (sol[-1] ** 2).sum()
        times.append(et)
        states.append(sol[-1, 0])
    return loss, torch.stack(times), torch.stack(states)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_per_sample_event_matches_a_loop_of_joint_solves(method):
    func = Rotation()
    y0 = torch.tensor(Y0, dtype=F64, requires_grad=True)
    loss, et, sol = _per_sample_loss(func, y0, lambda t, y: y[:, 0], method=method)
    assert et.shape == (4,) and sol.shape == (2, 4, 2) and et.dtype == F64
    assert torch.equal(sol[0], y0)
    ref_loss, ref_t, ref_y = _row_loop_loss(func, y0, lambda t, y: y[0, 0], method=method)
    assert torch.allclose(et, ref_t, atol=1e-8) and torch.allclose(sol[-1], ref_y, atol=1e-8)
    assert sol[-1, :, 0].abs().max() < 1e-8  # each row on its own event
    grads = torch.autograd.grad(loss, [func.A, y0])
    ref = torch.autograd.grad(ref_loss, [func.A, y0])
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-7), (g, r)


def test_per_sample_event_gradient_matches_finite_differences():
    func = Rotation()
    y0 = torch.tensor(Y0, dtype=F64, requires_grad=True)
    loss, _, _ = _per_sample_loss(func, y0, lambda t, y: y[:, 0])
    g_A, g_y0 = torch.autograd.grad(loss, [func.A, y0])
    eps = 1e-6
    for i, j in [(0, 0), (1, 0), (0, 1)]:
        with torch.no_grad():
            vals = []
            for s in (1, -1):
                func.A[i, j] += s * eps
                vals.append(_per_sample_loss(func, y0.detach(), lambda t, y: y[:, 0])[0])
                func.A[i, j] -= s * eps
        assert abs((vals[0] - vals[1]).item() / (2 * eps) - g_A[i, j].item()) < 1e-5
    for b, j in [(0, 1), (2, 0), (3, 1)]:
        vals = []
        for s in (1, -1):
            yp = y0.detach().clone()
            yp[b, j] += s * eps
            vals.append(_per_sample_loss(func, yp, lambda t, y: y[:, 0])[0].detach())
        assert abs((vals[0] - vals[1]).item() / (2 * eps) - g_y0[b, j].item()) < 1e-5


def test_per_sample_event_with_event_parameters_vectors_and_reverse_time():
    # A vector event (either component crossing its level), a level that is a parameter, backward time.
    func = Rotation()
    level = torch.tensor(0.2, dtype=F64, requires_grad=True)

    def event_fn(t, y):
        return torch.stack([y[:, 0] - level, y[:, 1] + 0.9], dim=1)

    y0 = torch.tensor(Y0, dtype=F64)
    et, _sol = odeint_event(
        func,
        y0,
        torch.tensor(0.0, dtype=F64),
        event_fn=event_fn,
        reverse_time=True,
        options={"per_sample": True},
        **TOL,
    )
    assert bool((et < 0).all())
    g_level = torch.autograd.grad(et.sum(), level)[0]
    ref = 0.0
    for b in range(4):
        e, _ = odeint_event(
            func,
            y0[b : b + 1],
            torch.tensor(0.0, dtype=F64),
            reverse_time=True,
            event_fn=lambda t, y: torch.stack([y[0, 0] - level, y[0, 1] + 0.9]),
            **TOL,
        )
        assert abs(e.item() - et[b].item()) < 1e-8
        ref = ref + e
    assert abs(torch.autograd.grad(ref, level)[0].item() - g_level.item()) < 1e-6


def test_per_sample_event_through_odeint_and_per_row_start_times():
    func = Rotation()
    y0 = torch.tensor(Y0, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    et, sol = odeint(func, y0, t, event_fn=lambda t, y: y[:, 0], options={"per_sample": True}, **TOL)
    assert et.shape == (4,) and not et.requires_grad and sol.requires_grad
    ref, _ = odeint_event(func, y0, t[0], event_fn=lambda t, y: y[:, 0], options={"per_sample": True}, **TOL)
    assert torch.allclose(et, ref.detach(), atol=1e-12)
    # Each row from its own start time: func and event_fn see each row's time (t of shape (B,)).
    t0 = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=F64)
    seen = []

    def event_fn(t, y):
        seen.append(t.shape)
        return y[:, 0] + 0.0 * t

    et2, _ = odeint_event(func, y0.detach(), t0, event_fn=event_fn, options={"per_sample": True}, **TOL)
    assert all(s == (4,) for s in seen)
    assert torch.allclose(et2 - t0, ref.detach(), atol=1e-8)  # autonomous: the same durations


def test_per_sample_event_rows_already_on_their_event_and_errors():
    func = Rotation()
    y0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)  # row 0 starts on its event
    et, sol = odeint_event(
        func,
        y0,
        torch.tensor(0.0, dtype=F64),
        event_fn=lambda t, y: y[:, 0],
        options={"per_sample": True},
        **TOL,
    )
    assert et[0].item() == 0.0 and torch.equal(sol[-1, 0], y0[0]) and et[1].item() > 0
    with pytest.raises(SolverError, match="1 of 2 samples failed.*never crossed zero") as info:
        odeint_event(
            lambda t, y: -y,
            y0,
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y[:, 1] - 0.5,
            options={"per_sample": True, "max_num_steps": 200},
        )
    assert info.value.reason == "no_event"
    with pytest.raises(ValueError, match="odeint_interface must be neuralode.odeint"):
        odeint_event(
            func,
            y0,
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y[:, 0],
            options={"per_sample": True},
            odeint_interface=odeint_adjoint,
        )
    with pytest.raises(ValueError, match=r"one value \(or a row of values\) per sample"):
        odeint_event(
            func,
            y0,
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y[0, 0],
            options={"per_sample": True},
        )
    with pytest.raises(TypeError, match="y0 must be a tensor"):
        odeint_event(
            func,
            (y0,),
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y[:, 0],
            options={"per_sample": True},
        )
    with pytest.raises(ValueError, match="not an adaptive method"):
        odeint_event(
            func,
            y0,
            torch.tensor(0.0, dtype=F64),
            event_fn=lambda t, y: y[:, 0],
            method="rk4",
            options={"per_sample": True, "step_size": 0.1},
        )
