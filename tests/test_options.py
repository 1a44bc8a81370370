"""torchdiffeq's options and callbacks: step_t, jump_t (and deprecated grid_points/eps), every other
option name, callbacks found on func (with torchdiffeq's warnings), and the errors torchdiffeq raises."""

import math

import pytest
import torch
import torchdiffeq

from neuralode import SolverError, odeint, record_stats

F64 = torch.float64


def smooth(t, y):
    return -0.5 * y + torch.sin(3 * t)


def kink(t, y):  # |t − 0.5|: a derivative discontinuity at t = 0.5
    return torch.abs(t - 0.5) * torch.ones_like(y)


def jump(t, y):  # a jump in f at t = 0.5
    return torch.where(t < 0.5, 1.0, -1.0).to(y.dtype) * torch.ones_like(y)


class Recorder(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f
        self.log = {"step": [], "accept": [], "reject": []}

    def forward(self, t, y):
        return self.f(t, y)

    def callback_step(self, t0, y0, dt):
        self.log["step"].append((t0, y0, dt))

    def callback_accept_step(self, t0, y0, dt):
        self.log["accept"].append((t0, y0, dt))

    def callback_reject_step(self, t0, y0, dt):
        self.log["reject"].append((t0, y0, dt))


def _ends(rec):
    return [float(t0 + dt) for t0, _, dt in rec.log["accept"]]


def test_step_t_makes_steps_land_on_the_points():
    rec = Recorder(kink)
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y = odeint(rec, y0, t, rtol=1e-9, atol=1e-9, options={"step_t": torch.tensor([0.5, 0.25], dtype=F64)})
    ends = _ends(rec)
    assert any(abs(e - 0.5) < 1e-15 for e in ends) and any(abs(e - 0.25) < 1e-15 for e in ends)
    assert abs(y[-1].item() - 0.25) < 1e-9  # ∫_0^1 |t − 0.5| dt
    ref = torchdiffeq.odeint(kink, y0, t, rtol=1e-9, atol=1e-9, options={"step_t": torch.tensor([0.5, 0.25])})
    assert torch.allclose(y, ref.to(F64), atol=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_jump_t_resolves_a_discontinuity_with_fewer_rejections(reverse):
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=F64)
    exact = 0.0  # ∫ of +1 then −1 over halves
    with record_stats() as plain:
        y_plain = odeint(jump, y0, t, rtol=1e-8, atol=1e-8)
    with record_stats() as jumped:
        y_jump = odeint(jump, y0, t, rtol=1e-8, atol=1e-8, options={"jump_t": [0.5]})
    assert abs(y_jump[-1].item() - exact) < 1e-12
    assert jumped.n_rejected < plain.n_rejected
    assert abs(y_plain[-1].item() - exact) < 1e-5


def test_deprecated_grid_points_and_eps_map_to_jump_t():
    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.warns(UserWarning, match="grid_points"):
        a = odeint(jump, y0, t, options={"grid_points": torch.tensor([0.5], dtype=F64)})
    with pytest.warns(UserWarning, match="eps"):
        b = odeint(jump, y0, t, options={"jump_t": [0.5], "eps": 1e-6})
    c = odeint(jump, y0, t, options={"jump_t": [0.5]})
    assert torch.equal(a, c) and torch.equal(b, c)


def test_step_t_and_jump_t_must_not_overlap():
    with pytest.raises(ValueError, match="step_t.*jump_t"):
        odeint(smooth, torch.zeros(1), torch.tensor([0.0, 1.0]), options={"step_t": [0.5], "jump_t": [0.5]})
    with pytest.raises(TypeError, match="jump_t"):
        odeint(smooth, torch.zeros(1), torch.tensor([0.0, 1.0]), options={"jump_t": 0.5})


def test_adaptive_callbacks_are_called_with_torchdiffeq_arguments():
    rec = Recorder(smooth)
    y0 = torch.ones(3, dtype=F64)
    with record_stats() as st:
        odeint(
            rec, y0, torch.tensor([0.0, 2.0], dtype=F64), rtol=1e-8, atol=1e-8, options={"first_step": 1.0}
        )
    assert len(rec.log["accept"]) == st.n_accepted and len(rec.log["reject"]) == st.n_rejected > 0
    assert len(rec.log["step"]) == st.n_accepted + st.n_rejected
    t0, y, dt = rec.log["step"][0]
    assert t0.dim() == 0 and dt.dim() == 0 and torch.equal(y, y0)


def test_callbacks_agree_with_torchdiffeq():
    y0 = torch.ones(2, dtype=F64)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ours, theirs = Recorder(smooth), Recorder(smooth)
    odeint(ours, y0, t, rtol=1e-6, atol=1e-6)
    torchdiffeq.odeint(theirs, y0, t, rtol=1e-6, atol=1e-6)
    # Same steps, except that our last step ends exactly on t[-1] (torchdiffeq steps past it and
    # interpolates back).
    assert len(ours.log["accept"]) == len(theirs.log["accept"])
    assert len(ours.log["reject"]) == len(theirs.log["reject"])
    for (a, _, da), (b, _, db) in zip(ours.log["accept"][:-1], theirs.log["accept"][:-1]):
        assert abs(float(a) - float(b)) < 1e-9 and abs(float(da) - float(db)) < 1e-9
    assert float(ours.log["accept"][-1][0] + ours.log["accept"][-1][2]) == 2.0


def test_callbacks_on_tuple_state_and_reverse_time():
    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log = {"step": []}

        def forward(self, t, s):
            return -s[0], -s[1]

        def callback_step(self, t0, y0, dt):
            self.log["step"].append((t0, y0, dt))

    rec = F()
    odeint(
        rec,
        (torch.ones(2), torch.ones(3)),
        torch.tensor([1.0, 0.0]),
        method="rk4",
        options={"step_size": 0.25},
    )
    assert len(rec.log["step"]) == 4
    t0, y, dt = rec.log["step"][0]
    assert isinstance(y, tuple) and [p.shape for p in y] == [(2,), (3,)]
    assert float(t0) == 1.0 and float(dt) == -0.25


@pytest.mark.parametrize("method", ["rk4", "explicit_adams", "gl4"])
def test_fixed_grid_methods_warn_about_accept_and_reject_callbacks(method):
    rec = Recorder(smooth)
    with pytest.warns(UserWarning, match="does not support callbacks"):
        odeint(rec, torch.ones(1), torch.tensor([0.0, 1.0]), method=method, options={"step_size": 0.5})
    assert len(rec.log["step"]) == 2 and not rec.log["accept"]


def test_scipy_solver_supports_no_callbacks():
    class StepOnly(torch.nn.Module):
        def forward(self, t, y):
            return -y

        def callback_step(self, t0, y0, dt):
            raise AssertionError("must not be called")

    with pytest.warns(UserWarning, match="does not support callbacks"):
        odeint(StepOnly(), torch.ones(1), torch.tensor([0.0, 1.0]), method="scipy_solver")


ADAPTIVE_OPTIONS = [
    {"first_step": 0.01},
    {"safety": 0.8, "ifactor": 5.0, "dfactor": 0.3},
    {"max_step": 0.05},
    {"min_step": 1e-3},
    {"dtype": torch.float32},
    {"norm": lambda x: x.abs().max()},
    {"max_num_steps": 10_000},
]


@pytest.mark.parametrize("options", ADAPTIVE_OPTIONS, ids=lambda o: ",".join(o))
def test_adaptive_options_agree_with_torchdiffeq(options):
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.linspace(0, 2, 5, dtype=F64)
    ours = odeint(smooth, y0, t, rtol=1e-7, atol=1e-9, options=options)
    theirs = torchdiffeq.odeint(smooth, y0, t, rtol=1e-7, atol=1e-9, options=options)
    assert torch.allclose(ours, theirs, atol=1e-7)


FIXED_OPTIONS = [
    {"step_size": 0.1},
    {"step_size": 0.1, "interp": "cubic"},
    {"step_size": 0.1, "perturb": True},
    {"grid_constructor": lambda f, y0, t: torch.linspace(float(t[0]), float(t[-1]), 13, dtype=F64)},
]


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "implicit_adams"])
@pytest.mark.parametrize("options", FIXED_OPTIONS, ids=["step", "cubic", "perturb", "grid"])
def test_fixed_options_agree_with_torchdiffeq(method, options):
    y0 = torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.linspace(0, 2, 7, dtype=F64)
    f = jump if options.get("perturb") else smooth
    ours = odeint(f, y0, t, method=method, options=options, rtol=1e-3, atol=1e-4)
    theirs = torchdiffeq.odeint(f, y0, t, method=method, options=options, rtol=1e-3, atol=1e-4)
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_errors_torchdiffeq_raises_are_clear_errors_here():
    y0, t = torch.ones(1), torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match="mutually exclusive"):
        odeint(
            smooth, y0, t, method="euler", options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t}
        )
    with pytest.raises(ValueError, match="method"):
        odeint(smooth, y0, t, method="dopri7")
    with pytest.raises(ValueError, match="rtol"):
        odeint(smooth, y0, t, rtol=torch.tensor(1e-3, requires_grad=True))
    with pytest.raises(ValueError, match="interp"):
        odeint(smooth, y0, t, method="rk4", options={"interp": "quadratic"})
    with pytest.raises(SolverError, match="max_num_steps"):
        odeint(smooth, y0, torch.tensor([0.0, 100.0]), options={"max_num_steps": 3})
    with pytest.raises(ValueError, match="unknown option"):
        odeint(smooth, y0, t, options={"step_size": 0.1})  # adaptive method: torchdiffeq only warns


def test_max_step_is_respected():
    rec = Recorder(smooth)
    odeint(rec, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), options={"max_step": 0.1})
    assert max(abs(float(dt)) for _, _, dt in rec.log["accept"]) <= 0.1 + 1e-15
    assert math.isclose(sum(float(dt) for _, _, dt in rec.log["accept"]), 1.0)


def test_engine_callbacks_chain_after_the_users():
    from neuralode._integrate.joint import run
    from neuralode._problem import make_problem
    from neuralode._stats import SolveStats

    rec = Recorder(smooth)
    seen = []

    class Engine:
        def step(self, t, y, h):
            seen.append(t)

        def accept(self, t, y, h):
            pass

        def reject(self, t, y, h):
            pass

    problem = make_problem(
        rec, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), 1e-6, 1e-6, None, None
    )
    run(problem, SolveStats(), callbacks=Engine())
    assert len(seen) == len(rec.log["step"]) > 0


def test_adjoint_callbacks_see_the_backward_solve():
    from neuralode import odeint_adjoint

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(-0.5, dtype=F64))
            self.forward_steps, self.backward_steps = [], []

        def forward(self, t, y):
            return self.w * y

        def callback_accept_step(self, t0, y0, dt):
            self.forward_steps.append(float(t0))

        def callback_accept_step_adjoint(self, t0, y0, dt):
            self.backward_steps.append(float(t0))

    f = F()
    y = odeint_adjoint(f, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert f.forward_steps and not f.backward_steps
    y[-1].sum().backward()
    assert f.backward_steps and f.backward_steps[0] == 1.0  # the backward solve runs from t1 to t0
