"""The adjoint's sensitivities (backsolve, interpolating, quadrature), its one backward solve across the
output times, user norms, non-leaf ``adjoint_params`` and the ``NeuralODE`` defaults. Float64, tiny
problems; references are direct backprop at tight tolerances, central finite differences, the exact
adjoint of a linear system, and torchdiffeq's adjoint."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode import SENSITIVITIES, NeuralODE, odeint, odeint_adjoint, record_stats
from test_gradients import MLPField, _one_thread  # noqa: F401 (the autouse fixture)

DT = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _mlp(dtype=DT) -> MLPField:
    torch.manual_seed(0)
    return MLPField(width=5).to(dtype)


class TupleField(nn.Module):
    """x of shape (2, 2) and v of shape (3,), coupled through parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.w = nn.Parameter(0.5 * torch.randn(3, 4, dtype=DT))
        self.k = nn.Parameter(torch.tensor(0.7, dtype=DT))

    def forward(self, t, y):
        x, v = y
        dx = -self.k * x + torch.tanh(self.w @ x.reshape(4)).sum() * torch.cos(t)
        dv = torch.tanh(self.w @ x.reshape(4)) - 0.3 * v
        return dx, dv


def _loss(ys, weights):
    if isinstance(ys, torch.Tensor):
        return (ys * weights[0]).sum()
    return sum((y * w).sum() for y, w in zip(ys, weights))


def _grads(solve, func, y0, t, weights, **kw):
    y0s = [y.detach().clone().requires_grad_(True) for y in (y0 if isinstance(y0, tuple) else (y0,))]
    tt = t.detach().clone().requires_grad_(True)
    params = list(func.parameters())
    ys = solve(func, tuple(y0s) if isinstance(y0, tuple) else y0s[0], tt, **kw)
    return torch.autograd.grad(_loss(ys, weights), [*y0s, tt, *params])


def _weights(ys):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(y.shape, generator=g, dtype=DT) for y in (ys if isinstance(ys, tuple) else (ys,))]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


PROBLEMS = {
    "mlp": lambda: (
        _mlp(),
        torch.tensor([[0.3, -0.5], [1.0, 0.2]], dtype=DT),
        torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=DT),
    ),
    "tuple": lambda: (
        TupleField(),
        (torch.tensor([[0.5, -0.2], [0.1, 0.9]], dtype=DT), torch.tensor([0.3, -0.4, 0.2], dtype=DT)),
        torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=DT),
    ),
    "reverse": lambda: (
        _mlp(),
        torch.tensor([0.4, -0.1], dtype=DT),
        torch.tensor([1.0, 0.6, 0.0], dtype=DT),
    ),
}


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_sensitivity_matches_direct_and_finite_differences(sensitivity, name):
    func, y0, t = PROBLEMS[name]()
    with torch.no_grad():
        weights = _weights(odeint(func, y0, t))
    got = _grads(odeint_adjoint, func, y0, t, weights, sensitivity=sensitivity, **TIGHT)
    want = _grads(odeint, func, y0, t, weights, **TIGHT)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-6
    # central finite differences on one entry of y0, every output time and one parameter entry
    eps = 1e-6

    def loss_at(y0_, t_, p_shift=0.0):
        p = next(func.parameters())
        with torch.no_grad():
            p.view(-1)[0] += p_shift
            val = float(_loss(odeint(func, y0_, t_, method="dopri8", **TIGHT), weights))
            p.view(-1)[0] -= p_shift
        return val

    y0_list = list(y0) if isinstance(y0, tuple) else [y0]

    def with_y0(d):
        shifted = [y.clone() for y in y0_list]
        shifted[0].view(-1)[0] += d
        return tuple(shifted) if isinstance(y0, tuple) else shifted[0]

    fd_y0 = (loss_at(with_y0(eps), t) - loss_at(with_y0(-eps), t)) / (2 * eps)
    assert math.isclose(float(got[0].view(-1)[0]), fd_y0, rel_tol=1e-5, abs_tol=1e-7)
    g_t = got[len(y0_list)]
    for i in range(len(t)):
        d = torch.zeros_like(t)
        d[i] = eps
        fd_t = (loss_at(y0, t + d) - loss_at(y0, t - d)) / (2 * eps)
        assert math.isclose(float(g_t[i]), fd_t, rel_tol=1e-5, abs_tol=1e-7)
    fd_p = (loss_at(y0, t, eps) - loss_at(y0, t, -eps)) / (2 * eps)
    assert math.isclose(float(got[len(y0_list) + 1].view(-1)[0]), fd_p, rel_tol=1e-5, abs_tol=1e-7)


class Stiffish(nn.Module):
    """y' = A y with one fast decaying mode: reconstructing y backwards amplifies errors by e^{10 T}."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-10.0, 0.5], [0.0, -0.3]], dtype=DT))

    def forward(self, t, y):
        return self.A @ y


def test_dissipative_system_backsolve_wrong_interpolating_right():
    func = Stiffish()
    y0 = torch.tensor([1.0, 1.0], dtype=DT)
    t = torch.tensor([0.0, 4.0, 8.0], dtype=DT)
    tol = dict(rtol=1e-6, atol=1e-8)

    def grad_a(solve, **kw):
        func.zero_grad()
        solve(func, y0, t, **kw).sum().backward()
        return func.A.grad.clone()

    want = grad_a(odeint, **TIGHT)
    back = grad_a(odeint_adjoint, **tol)
    assert not bool(torch.isfinite(back).all()) or _rel(back, want) > 1.0  # visibly wrong
    for sens in ("interpolating", "quadrature"):
        assert _rel(grad_a(odeint_adjoint, sensitivity=sens, **tol), want) < 1e-4


def test_linear_system_exact_adjoint_every_sensitivity():
    A = torch.tensor([[-0.1, 1.0], [-1.0, -0.2]], dtype=DT)
    y0 = torch.tensor([1.0, 0.5], dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.5, 2.0], dtype=DT)
    g = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.5, 2.0], [-1.0, 0.3]], dtype=DT)
    want = sum(torch.linalg.matrix_exp(A * ti).T @ gi for ti, gi in zip(t, g))
    for sens in SENSITIVITIES:
        y = y0.clone().requires_grad_(True)
        ys = odeint_adjoint(lambda tt, x: A @ x, y, t, adjoint_params=(), sensitivity=sens, **TIGHT)
        (ys * g).sum().backward()
        assert _rel(y.grad, want) < 1e-8


def test_one_backward_solve_fewer_evaluations_than_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    func = _mlp()
    y0 = torch.tensor([[0.3, -0.5], [1.0, 0.2]], dtype=DT)
    t = torch.linspace(0, 1, 10, dtype=DT)
    calls = [0]

    def counted(tt, y):
        calls[0] += 1
        return func(tt, y)

    grads = {}
    nfe = {}
    for lib in ("neuralode", "torchdiffeq"):
        func.zero_grad()
        solve = odeint_adjoint if lib == "neuralode" else torchdiffeq.odeint_adjoint
        ys = solve(counted, y0, t, adjoint_params=tuple(func.parameters()), rtol=1e-7, atol=1e-9)
        calls[0] = 0
        ys.sum().backward()
        nfe[lib] = calls[0]
        grads[lib] = [p.grad.clone() for p in func.parameters()]
    assert nfe["neuralode"] < nfe["torchdiffeq"]
    for a, b in zip(grads["neuralode"], grads["torchdiffeq"]):
        assert _rel(a, b) < 1e-5
    with record_stats() as st:
        ys = odeint_adjoint(func, y0, t, rtol=1e-7, atol=1e-9)
    ys.sum().backward()
    assert st.backward.n_solves == 1 and st.backward.nfe == nfe["neuralode"]


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_user_norm_gets_torchdiffeq_split(sensitivity):
    func = TupleField()
    y0 = (torch.ones(2, 2, dtype=DT), torch.ones(3, dtype=DT))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT, requires_grad=True)
    seen = []

    def norm(parts):
        seen.append(tuple(tuple(p.shape) for p in parts))
        return max(p.abs().max() for p in parts)

    ys = odeint_adjoint(func, y0, t, adjoint_options={"norm": norm}, sensitivity=sensitivity)
    (ys[0].sum() + ys[1].sum()).backward()
    states = [(2, 2), (3,)]
    params = [(3, 4), ()]
    want = {"backsolve": [(), *states, *states, *params], "interpolating": [(), *states, *params]}
    want["quadrature"] = [(), *states]
    assert seen and all(s == tuple(want[sensitivity]) for s in seen)
    # tensor state: y and its adjoint in y0's shape
    seen.clear()
    func2 = _mlp()
    odeint_adjoint(
        func2, torch.ones(3, 2, dtype=DT), t.detach(), adjoint_options={"norm": norm}
    ).sum().backward()
    assert all(s == ((), (3, 2), (3, 2), (5, 2), (5,), (2, 5), (2,)) for s in seen)


def test_non_leaf_adjoint_params_torchcde_pattern():
    torch.manual_seed(0)
    data = torch.randn(4, 2, dtype=DT, requires_grad=True)
    lin = nn.Linear(2, 2).to(DT)
    held = {}

    def func(tt, y):
        return lin(y) * held["coeffs"].mean(0) - 0.1 * y

    y0 = torch.tensor([0.5, -0.3], dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    grads = {}
    for sens in (None, *SENSITIVITIES):
        data.grad = None
        lin.zero_grad()
        coeffs = held["coeffs"] = data * 2.0 + 1.0  # computed from data that needs gradients: not a leaf
        if sens is None:
            ys = odeint(func, y0, t, **TIGHT)
        else:
            params = (*lin.parameters(), coeffs)
            ys = odeint_adjoint(func, y0, t, adjoint_params=params, sensitivity=sens, **TIGHT)
        ys.sum().backward()
        grads[sens] = (data.grad.clone(), lin.weight.grad.clone())
    for sens in SENSITIVITIES:
        for a, b in zip(grads[sens], grads[None]):
            assert _rel(a, b) < 1e-6
    unused = data.sum(0) * 3.0
    with pytest.raises(
        ValueError, match=r"adjoint_params\[2\] is not a leaf tensor and func does not use it"
    ):
        odeint_adjoint(func, y0, t, adjoint_params=(*lin.parameters(), unused, coeffs))


@pytest.mark.parametrize("sensitivity", ["interpolating", "quadrature"])
def test_checkpointed_trajectory_equals_dense(sensitivity):
    func, y0, t = PROBLEMS["mlp"]()
    with torch.no_grad():
        weights = _weights(odeint(func, y0, t))
    dense = _grads(odeint_adjoint, func, y0, t, weights, sensitivity=sensitivity, rtol=1e-6, atol=1e-8)
    with record_stats() as st:
        few = _grads(
            odeint_adjoint, func, y0, t, weights, sensitivity=sensitivity, checkpoints=2, rtol=1e-6, atol=1e-8
        )
    for a, b in zip(few, dense):
        assert _rel(a, b) < 1e-12
    assert st.backward.nfe > 0


def test_fixed_grid_and_float32():
    func, y0, t = PROBLEMS["mlp"]()
    with torch.no_grad():
        weights = _weights(odeint(func, y0, t))
    want = _grads(odeint, func, y0, t, weights, **TIGHT)
    for sens in SENSITIVITIES:
        got = _grads(
            odeint_adjoint, func, y0, t, weights, method="rk4", options={"step_size": 0.01}, sensitivity=sens
        )
        for g, w in zip(got, want):
            assert _rel(g, w) < 1e-5
    f32 = _mlp(torch.float32)
    for sens in SENSITIVITIES:
        y = torch.tensor([[0.3, -0.5]], requires_grad=True)
        odeint_adjoint(f32, y, t.float(), rtol=1e-5, atol=1e-6, sensitivity=sens).sum().backward()
        assert y.grad.dtype == torch.float32 and f32.l1.weight.grad.dtype == torch.float32
        assert bool(torch.isfinite(y.grad).all())
        f32.zero_grad()


def test_sensitivity_with_event_and_options():
    func, y0, t = PROBLEMS["mlp"]()
    y = y0.clone().requires_grad_(True)
    ev_t, sol = odeint_adjoint(
        func, y, torch.tensor([0.0, 5.0], dtype=DT), event_fn=lambda tt, x: tt - 0.8, sensitivity="quadrature"
    )
    sol[-1].sum().backward()
    y_ref = y0.clone().requires_grad_(True)
    odeint(func, y_ref, torch.tensor([0.0, float(ev_t)], dtype=DT))[-1].sum().backward()
    assert float(ev_t) == pytest.approx(0.8) and _rel(y.grad, y_ref.grad) < 1e-5
    for sens in SENSITIVITIES:
        with record_stats() as st:
            ys = odeint_adjoint(
                func,
                y0,
                t,
                sensitivity=sens,
                adjoint_method="bosh3",
                adjoint_rtol=1e-5,
                adjoint_atol=1e-7,
                adjoint_options={"max_num_steps": 10_000, "controller": "pi"},
            )
        ys.sum().backward()
        assert st.backward.n_accepted > 0 and st.backward.nfe > 0


def test_sensitivity_bad_input():
    func, y0, t = PROBLEMS["mlp"]()
    with pytest.raises(ValueError, match="sensitivity='nope'"):
        odeint_adjoint(func, y0, t, sensitivity="nope")
    with pytest.raises(ValueError, match="adjoint_method='implicit_adams'"):
        odeint_adjoint(func, y0, t, sensitivity="quadrature", adjoint_method="implicit_adams")
    with pytest.raises(ValueError, match="explicit Runge-Kutta method"):
        odeint_adjoint(
            func, y0, t, sensitivity="interpolating", method="implicit_adams", options={"step_size": 0.1}
        )
    with pytest.raises(ValueError, match="checkpoints must be a positive int"):
        odeint_adjoint(func, y0, t, sensitivity="interpolating", checkpoints=0)
    with pytest.raises(ValueError, match="sensitivity='quadrature' chooses the adjoint's variant"):
        NeuralODE(func, gradient="direct", sensitivity="quadrature")
    with pytest.raises(ValueError, match="not an adjoint sensitivity"):
        NeuralODE(func, gradient="adjoint", sensitivity="x")


def test_neuralode_adjoint_uses_seminorm_by_default():
    func, y0, t = PROBLEMS["mlp"]()
    node = NeuralODE(func, t=t, gradient="adjoint", rtol=1e-6, atol=1e-8)
    node(y0).sum().backward()
    nfe_node = node.last_stats.backward.nfe
    with record_stats() as semi:
        odeint_adjoint(
            func, y0, t, rtol=1e-6, atol=1e-8, adjoint_options={"norm": "seminorm"}
        ).sum().backward()
    with record_stats() as default:
        odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-8).sum().backward()
    assert nfe_node == semi.backward.nfe < default.backward.nfe
    node = NeuralODE(func, t=t, gradient="adjoint", rtol=1e-6, atol=1e-8, adjoint_options={"norm": None})
    node(y0).sum().backward()
    assert node.last_stats.backward.nfe == default.backward.nfe  # torchdiffeq's norm on request
    for sens in SENSITIVITIES:
        node = NeuralODE(
            func, t=t, gradient="adjoint", sensitivity=sens, method="rk4", options={"step_size": 0.1}
        )
        with record_stats() as st:  # fixed grid: the forward options are inherited, no norm added
            node(y0).sum().backward()
        assert st.backward.nfe >= 4 * 12
    assert "sensitivity='quadrature'" in repr(NeuralODE(func, gradient="adjoint", sensitivity="quadrature"))


def test_output_times_without_loss_cost_no_backward_stops():
    func = _mlp()
    y0 = torch.tensor([[0.3, -0.5]], dtype=DT)
    nfe, grads = {}, {}
    for n in (2, 20):
        t = torch.linspace(0, 1, n, dtype=DT)
        func.zero_grad()
        with record_stats() as st:
            ys = odeint_adjoint(func, y0, t, rtol=1e-8, atol=1e-10)
        ys[-1].sum().backward()  # only the last output enters the loss
        nfe[n], grads[n] = st.backward.nfe, func.l1.weight.grad.clone()
    assert nfe[20] == nfe[2]
    assert _rel(grads[20], grads[2]) < 1e-12


@pytest.mark.parametrize("sensitivity", ["backsolve", "interpolating"])
def test_backward_evaluations_per_step_and_jump(sensitivity):
    """The backward solve costs one evaluation at t_N and the tableau's new stages per attempted step (the
    forward's steps are longer than the output intervals, so the first backward step is the first
    interval: no initial-step evaluation); a jump costs one more evaluation with backsolve, none with
    interpolating (the derivative after it is the kept evaluation at t_i plus one vector-Jacobian
    product). The gradient stays that of direct backprop."""
    func = _mlp()
    y0 = torch.tensor([[0.3, -0.5], [1.0, 0.2]], dtype=DT)
    t = torch.linspace(0.0, 1.0, 7, dtype=DT)
    calls = [0]

    class Counted(nn.Module):
        def __init__(self):
            super().__init__()
            self.func = func

        def forward(self, tt, y):
            calls[0] += 1
            return self.func(tt, y)

    weights = _weights(odeint(func, y0, t))
    got = _grads(odeint_adjoint, Counted(), y0, t, weights, sensitivity=sensitivity, **TIGHT)
    want = _grads(odeint, func, y0, t, weights, **TIGHT)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-6
    with record_stats() as st:
        ys = odeint_adjoint(Counted(), y0, t, sensitivity=sensitivity, rtol=1e-6, atol=1e-8)
    calls[0] = 0
    _loss(ys, weights).backward()
    bwd = st.backward
    jumps = len(t) - 2 if sensitivity == "backsolve" else 0
    assert bwd.nfe == calls[0] == 1 + 6 * bwd.n_steps + jumps


@pytest.mark.parametrize("sensitivity", SENSITIVITIES)
def test_y0_from_an_encoder_in_adjoint_params(sensitivity):
    """y0 computed by an encoder whose parameters are listed in ``adjoint_params`` too (func does not use
    them): the backward reads y(t) near t0 from the forward's first step, which starts at y0 itself; that
    must not reach into the encoder's graph (it would free it, or count the encoder's gradient twice)."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    enc = nn.Linear(3, 2).to(DT)
    x = torch.randn(4, 3, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    params = (*f.parameters(), *enc.parameters())

    def field(tt, y):
        return f(y)

    ys = odeint_adjoint(
        field, torch.tanh(enc(x)), t, sensitivity=sensitivity, adjoint_params=params, rtol=1e-4, atol=1e-6
    )
    got = torch.autograd.grad(ys.pow(2).sum(), params)
    want = torch.autograd.grad(odeint(field, torch.tanh(enc(x)), t, **TIGHT).pow(2).sum(), params)
    for g, w in zip(got, want):
        assert _rel(g, w) < 1e-5


def test_step_landing_exactly_on_a_stop_ends_on_it():
    """A step whose natural end is exactly the next stop (equal output intervals, the backward step as
    long as one) is reported as ending on it, so the loop moves past the stop instead of proposing a
    zero step there next."""
    from neuralode._step_size import propose_step

    stops = [(0.5, False), (0.25, False)]
    assert propose_step(0.75, 0.25, 0.0, -1.0, stops, 0, 0.0) == (-0.25, False, (0.5, False))
    assert propose_step(0.75, 0.1, 0.0, -1.0, stops, 0, 0.0)[2] is None
    assert propose_step(0.75, 0.5, 0.0, -1.0, stops, 0, 0.0) == (-0.25, False, (0.5, False))


def test_jump_at_the_end_time_is_no_stop():
    """``jump_t`` exactly at ``t[-1]``: the solve ends there, so the last step is a plain step (no
    one-sided evaluation past the end of the span): the same evaluations and result as without it."""
    from neuralode._step_size import propose_step

    assert propose_step(0.75, 0.25, 1.0, 1.0, [(1.0, True)], 0, 0.0) == (0.25, True, None)
    assert propose_step(0.75, 0.5, 1.0, 1.0, [(0.9, True)], 0, 0.0)[2] == (0.9, True)
    y0 = torch.tensor([1.0, -0.5], dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    seen = []

    def f(tt, y):
        seen.append(float(tt))
        return -y

    plain = odeint(f, y0, t, rtol=1e-8, atol=1e-10)
    n_plain = len(seen)
    seen.clear()
    jumped = odeint(f, y0, t, rtol=1e-8, atol=1e-10, options={"jump_t": torch.tensor([1.0], dtype=DT)})
    assert len(seen) == n_plain and max(seen) <= 1.0
    torch.testing.assert_close(jumped, plain, rtol=0, atol=0)


@pytest.mark.parametrize("checkpoints", [None, 2])
@pytest.mark.parametrize("sensitivity", ["interpolating", "quadrature"])
def test_non_contiguous_y0(sensitivity, checkpoints):
    """A transposed ``y0``: the backward reads y(t) inside the first forward step from ``y0`` as passed
    (the forward trajectory keeps it, not a contiguous copy); the gradients equal those of a contiguous
    ``y0``."""
    torch.manual_seed(0)
    w = (0.5 * torch.randn(3, 3, dtype=DT)).requires_grad_(True)
    t = torch.linspace(0.0, 1.0, 4, dtype=DT)
    base = torch.randn(4, 3, dtype=DT)

    def grads(y0):
        y0 = y0.requires_grad_(True)
        ys = odeint_adjoint(
            lambda tt, y: torch.tanh(w @ y),
            y0,
            t,
            rtol=1e-6,
            atol=1e-8,
            sensitivity=sensitivity,
            checkpoints=checkpoints,
            adjoint_params=(w,),
        )
        return torch.autograd.grad(ys.square().sum(), (y0, w))

    for g, want in zip(grads(base.T), grads(base.T.contiguous())):
        torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
