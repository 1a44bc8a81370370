"""Gradient methods: backprop through the solver (direct), the adjoint, and checkpointing.

All in float64. The problems are small so that every check runs in well under a second.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import neuralode
from neuralode import NeuralODE, odeint, odeint_adjoint, odeint_checkpoint, record_stats

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: threads only add contention on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


GRADIENTS = {"direct": odeint, "adjoint": odeint_adjoint, "checkpoint": odeint_checkpoint}


# -- problems ----------------------------------------------------------------------------------------


class MLPField(nn.Module):
    """Non-autonomous neural vector field f(t, y) = W2 tanh(W1 y + b1) · (1 + 0.5 sin t) + b2."""

    def __init__(self, dim: int = 2, width: int = 4):
        super().__init__()
        self.l1 = nn.Linear(dim, width).to(DT)
        self.l2 = nn.Linear(width, dim).to(DT)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.5 * torch.sin(t))


class Linear(nn.Module):
    """y' = A y (autonomous, known Jacobian)."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.2]], dtype=DT))

    def forward(self, t, y):
        return y @ self.A.T


class TupleField(nn.Module):
    """A tuple state (x of shape (2, 2), v of shape (3,)) coupled through a parameter."""

    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([0.7, -0.3], dtype=DT))
        self.w = nn.Parameter(torch.tensor([0.2, 0.5, -0.4], dtype=DT))

    def forward(self, t, state):
        x, v = state
        dx = -self.k * x + torch.cos(t) * v[:2].sum()
        dv = self.w * torch.tanh(x.sum()) - 0.1 * v * t
        return dx, dv


def _problem(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        return MLPField(), torch.randn(3, 2, dtype=DT), torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    if name == "linear":
        return Linear(), torch.randn(2, dtype=DT), torch.tensor([0.0, 1.5], dtype=DT)
    if name == "tuple":
        return (
            TupleField(),
            (torch.randn(2, 2, dtype=DT), torch.randn(3, dtype=DT)),
            torch.tensor([0.0, 0.3, 0.7, 1.2], dtype=DT),
        )
    if name == "reverse":  # decreasing times
        return MLPField(), torch.randn(2, dtype=DT), torch.tensor([1.0, 0.6, -0.5], dtype=DT)
    raise KeyError(name)


PROBLEMS = ("mlp", "linear", "tuple", "reverse")


def _loss(ys) -> torch.Tensor:
    """A loss that weighs every output time differently (so every dL/dy(t_i) is non-trivial)."""
    parts = ys if isinstance(ys, tuple) else (ys,)
    total = 0
    for p in parts:
        w = torch.linspace(0.5, 1.5, p.shape[0], dtype=DT).view(-1, *([1] * (p.dim() - 1)))
        total = total + (w * p**2).sum() + torch.sin(p).sum()
    return total


def _grads(solver, func, y0, t, **kw):
    """Gradients of _loss w.r.t. (y0 tensors..., t, params...)."""
    y0s = tuple(x.detach().requires_grad_() for x in (y0 if isinstance(y0, tuple) else (y0,)))
    tt = t.detach().requires_grad_()
    ys = solver(func, y0s if isinstance(y0, tuple) else y0s[0], tt, **kw)
    return torch.autograd.grad(_loss(ys), [*y0s, tt, *func.parameters()])


def _fd_grads(func, y0, t, eps=1e-6, **kw):
    """Central finite differences of the (very accurately solved) loss."""

    def loss(y0_, t_):
        with torch.no_grad():
            return float(_loss(odeint(func, y0_, t_, **kw)))

    y0s = list(y0) if isinstance(y0, tuple) else [y0]
    out = []
    pack = (lambda xs: tuple(xs)) if isinstance(y0, tuple) else (lambda xs: xs[0])

    def fd(tensor, call):
        g = torch.zeros_like(tensor)
        flat = g.view(-1)
        for j in range(tensor.numel()):
            orig = tensor.view(-1)[j].item()
            tensor.view(-1)[j] = orig + eps
            up = call()
            tensor.view(-1)[j] = orig - eps
            down = call()
            tensor.view(-1)[j] = orig
            flat[j] = (up - down) / (2 * eps)
        return g

    for i in range(len(y0s)):
        ys = [x.clone() for x in y0s]
        out.append(fd(ys[i], lambda ys=ys: loss(pack(ys), t)))
    tc = t.clone()
    out.append(fd(tc, lambda: loss(pack(y0s), tc)))
    with torch.no_grad():
        for p in func.parameters():
            out.append(fd(p.data, lambda: loss(pack(y0s), t)))
    return out


def _assert_close(got, want, rtol, atol, what=""):
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what} grad #{i}: {m}")


@functools.cache
def _reference(name: str):
    func, y0, t = _problem(name)
    return _fd_grads(func, y0, t, rtol=1e-12, atol=1e-12, method="dopri8")


# -- agreement with finite differences ---------------------------------------------------------------


@pytest.mark.parametrize("gradient", list(GRADIENTS))
@pytest.mark.parametrize("name", PROBLEMS)
def test_gradients_match_finite_differences(gradient, name):
    func, y0, t = _problem(name)
    got = _grads(GRADIENTS[gradient], func, y0, t, rtol=1e-10, atol=1e-10)
    _assert_close(got, _reference(name), rtol=1e-5, atol=1e-6, what=f"{gradient}/{name}")


@pytest.mark.parametrize("method", list(neuralode.TABLEAUS))  # RK methods; others: test_methods_extra
def test_adjoint_every_method_matches_direct(method):
    """Fixed-step methods: the adjoint of the continuous problem differs from the discrete gradient by
    the discretisation error, so compare both with a fine step."""
    func, y0, t = _problem("mlp")
    order = neuralode.TABLEAUS[method].order
    if method in neuralode.FIXED_METHODS:
        kw = {"options": {"step_size": 0.01}}
        tol = 3 * 0.01**order
    else:  # low-order adaptive methods need many steps at tight tolerances: scale them by order
        # (fehlberg2's global error is ~1e3 × its tolerance: its error estimate is of first order)
        solve_tol, tol = {
            "adaptive_heun": (1e-6, 1e-4),
            "fehlberg2": (1e-7, 1e-3),
            "bosh3": (1e-8, 1e-6),
        }.get(method, (1e-9, 1e-7))
        kw = {"rtol": solve_tol, "atol": solve_tol}
    direct = _grads(odeint, func, y0, t, method=method, **kw)
    adjoint = _grads(odeint_adjoint, func, y0, t, method=method, **kw)
    _assert_close(adjoint, direct, rtol=tol, atol=tol, what=method)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_adjoint_close_to_direct_within_tolerance(tol):
    func, y0, t = _problem("mlp")
    direct = _grads(odeint, func, y0, t, rtol=tol, atol=tol)
    adjoint = _grads(odeint_adjoint, func, y0, t, rtol=tol, atol=tol)
    for a, d in zip(adjoint, direct):
        err = float((a - d).abs().max() / d.abs().max().clamp_min(1.0))
        assert err < 100 * tol, f"adjoint differs from direct by {err:.2e} at tol={tol:g}"


def test_adjoint_gradcheck():
    func, y0, t = _problem("linear")
    t = t.clone().requires_grad_()
    A = func.A

    def fn(y0_, t_, A_):
        return odeint_adjoint(lambda tt, y: y @ A_.T, y0_, t_, rtol=1e-11, atol=1e-12, adjoint_params=(A_,))

    # gradcheck perturbs A_ (a leaf it creates); finite differences of an adaptive solve are only
    # accurate to the tolerance, hence the loose atol.
    assert torch.autograd.gradcheck(
        fn, (y0.clone().requires_grad_(), t, A.detach().clone().requires_grad_()), eps=1e-6, atol=1e-5
    )


def test_adjoint_linear_exact_gradient():
    """y' = Ay: y(T) = exp(AT) y0, so dL/dy0 = exp(AT)ᵀ dL/dy(T) exactly."""
    func, y0, t = _problem("linear")
    y0 = y0.clone().requires_grad_()
    yT = odeint_adjoint(func, y0, t, rtol=1e-12, atol=1e-12)[-1]
    g = torch.randn(2, dtype=DT)
    (grad,) = torch.autograd.grad(yT, y0, g)
    want = torch.linalg.matrix_exp(func.A.detach() * 1.5).T @ g
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-10)


# -- semantics -------------------------------------------------------------------------------------


def test_adjoint_unused_params_get_zeros_and_t_grad_only_when_asked():
    func, y0, t = _problem("mlp")
    unused = nn.Parameter(torch.ones(3, dtype=DT))
    func.unused = unused
    y0 = y0.clone().requires_grad_()
    ys = odeint_adjoint(func, y0, t)
    ys.sum().backward()
    assert unused.grad is not None and torch.equal(unused.grad, torch.zeros(3, dtype=DT))
    assert t.grad is None


def test_adjoint_explicit_params_and_frozen_params():
    func, y0, t = _problem("mlp")
    func.l1.weight.requires_grad_(False)
    ys = odeint_adjoint(func, y0, t)
    ys.sum().backward()
    assert func.l1.weight.grad is None and func.l2.weight.grad is not None
    # A plain function with explicit parameters.
    w = torch.tensor([0.3, -0.2], dtype=DT, requires_grad=True)
    ys = odeint_adjoint(lambda tt, y: w * y, torch.ones(2, dtype=DT), t, adjoint_params=(w,))
    ys[-1].sum().backward()
    torch.testing.assert_close(w.grad, torch.exp(w.detach()) * 1.0, rtol=1e-6, atol=1e-6)


def test_adjoint_seminorm_lowers_backward_nfe():
    torch.manual_seed(0)
    func = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 4)).to(DT)
    field = lambda_module(func)
    y0 = torch.randn(8, 4, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    nfe = {}
    grads = {}
    for norm in ("default", "seminorm"):
        opts = None if norm == "default" else {"norm": "seminorm"}
        with record_stats() as st:
            ys = odeint_adjoint(field, y0, t, rtol=1e-6, atol=1e-6, adjoint_options=opts)
            ys[-1].pow(2).sum().backward()
        nfe[norm] = st.backward.nfe
        grads[norm] = [p.grad.clone() for p in field.parameters()]
        field.zero_grad()
    assert nfe["seminorm"] < nfe["default"], nfe
    for a, b in zip(grads["seminorm"], grads["default"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def lambda_module(net: nn.Module) -> nn.Module:
    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    return Field()


def test_adjoint_options_and_method():
    func, y0, t = _problem("mlp")
    want = _grads(odeint, func, y0, t, rtol=1e-10, atol=1e-10)
    got = _grads(
        odeint_adjoint,
        func,
        y0,
        t,
        rtol=1e-10,
        atol=1e-10,
        adjoint_method="rk4",
        adjoint_options={"step_size": 0.002},
    )
    _assert_close(got, want, rtol=1e-7, atol=1e-7)
    seen = []

    def norm(parts):
        seen.append(len(parts))
        return max(float(p.abs().max()) if p.numel() else 0.0 for p in parts)

    got = _grads(odeint_adjoint, func, y0, t, rtol=1e-9, atol=1e-9, adjoint_options={"norm": norm})
    _assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen and seen[0] == 3 + len(list(func.parameters()))  # (a_t, y, a, *a_θ)
    # Per-element tolerances carry over to the backward solve.
    got = _grads(odeint_adjoint, func, y0, t, rtol=torch.full((2,), 1e-10, dtype=DT), atol=1e-10)
    _assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_adjoint_backward_stats():
    func, y0, t = _problem("mlp")
    with record_stats() as st:
        ys = odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-6)
    assert st.backward.nfe == 0 and st.nfe > 0
    ys.sum().backward()  # outside the block: still recorded
    assert st.backward.nfe > 0 and st.backward.n_accepted > 0
    assert st.backward.n_solves == 1  # one backward solve across all output times


def test_adjoint_float32_state():
    func = MLPField().float()
    y0 = torch.randn(4, 2)
    t = torch.tensor([0.0, 1.0])
    ys = odeint_adjoint(func, y0.requires_grad_(), t, rtol=1e-5, atol=1e-6)
    ys.sum().backward()
    assert y0.grad.dtype == torch.float32 and func.l1.weight.grad.dtype == torch.float32


# -- bad input ---------------------------------------------------------------------------------------


def test_adjoint_bad_inputs():
    func, y0, t = _problem("mlp")
    with pytest.raises(ValueError, match="adjoint_params"):
        odeint_adjoint(lambda tt, y: -y, y0, t)
    with pytest.raises(TypeError, match=r"adjoint_params\[1\] must be a tensor"):
        odeint_adjoint(func, y0, t, adjoint_params=(func.l1.weight, 3.0))
    with pytest.raises(TypeError, match="tuple or list of tensors"):
        odeint_adjoint(func, y0, t, adjoint_params=func.l1.weight)
    nonleaf = func.l1.weight * 2
    with pytest.raises(ValueError, match=r"adjoint_params\[0\] is not a leaf"):
        odeint_adjoint(func, y0, t, adjoint_params=(nonleaf,))
    with pytest.raises(ValueError, match="event_fn needs t with exactly 2"):
        odeint_adjoint(func, y0, t, event_fn=lambda tt, y: y.sum())
    with pytest.raises(ValueError, match="adjoint_method='nope'"):
        odeint_adjoint(func, y0, t, adjoint_method="nope")
    with pytest.raises(ValueError, match="adjoint_options"):
        odeint_adjoint(func, y0, t, adjoint_options={"norm": "fancy"})
    with pytest.raises(ValueError, match="unknown adjoint_options"):
        odeint_adjoint(func, y0, t, adjoint_options={"step_size": 0.1})
    with pytest.raises(ValueError, match="fixed-step"):
        odeint_adjoint(func, y0, t, adjoint_method="rk4", adjoint_options={"norm": "seminorm"})
    with pytest.raises(ValueError, match="adjoint_rtol"):
        odeint_adjoint(func, y0, t, adjoint_rtol=-1.0)
    with pytest.raises(TypeError, match="adjoint_options must be a dict"):
        odeint_adjoint(func, y0, t, adjoint_options=[("norm", "seminorm")])
    with pytest.raises(ValueError, match="method="):
        odeint_adjoint(func, y0, t, method="nope")


# -- checkpointing -----------------------------------------------------------------------------------


def _max_rel(got, want) -> float:
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-300)) for g, w in zip(got, want))


@pytest.mark.parametrize("method", list(neuralode.TABLEAUS))  # RK methods; others: test_methods_extra
def test_checkpoint_equals_direct_every_method(method):
    func, y0, t = _problem("tuple")
    fixed = method in neuralode.FIXED_METHODS
    kw = {"options": {"step_size": 0.05}} if fixed else {"rtol": 1e-4, "atol": 1e-4}
    want = _grads(odeint, func, y0, t, method=method, **kw)
    for checkpoints in (None, 1, 3):
        got = _grads(odeint_checkpoint, func, y0, t, method=method, checkpoints=checkpoints, **kw)
        assert _max_rel(got, want) < 1e-10, (method, checkpoints)


@pytest.mark.parametrize(
    "options", [{"interp": "cubic"}, {"perturb": True}, {"interp": "cubic", "perturb": True}]
)
def test_checkpoint_equals_direct_fixed_grid_options(options):
    func, y0, t = _problem("reverse")
    kw = {"method": "rk4", "options": {"step_size": 0.07, **options}}
    want = _grads(odeint, func, y0, t, **kw)
    got = _grads(odeint_checkpoint, func, y0, t, checkpoints=4, **kw)
    assert _max_rel(got, want) < 1e-10


def test_checkpoint_keeps_few_states():
    from neuralode._callbacks import CheckpointKeeper as _Keeper

    for n in (1, 10, 100, 1000, 10000):
        keeper = _Keeper(None)
        for _ in range(n):
            keeper.accept(0.0, None, 0.1)
        assert 0 in keeper.states
        assert len(keeper.states) <= 2 * keeper.stride + 1
        assert keeper.stride <= max(1, 2 * int(n**0.5)), (n, keeper.stride)
        fixed = _Keeper(5)
        for _ in range(n):
            fixed.accept(0.0, None, 0.1)
        assert 1 <= len(fixed.states) <= 5


def test_checkpoint_stats_and_bad_input():
    func, y0, t = _problem("mlp")
    with record_stats() as st:
        ys = odeint_checkpoint(func, y0, t, rtol=1e-6, atol=1e-6)
    ys.sum().backward()
    # Recomputation: one evaluation per replayed stage plus one per segment; no rejected steps.
    assert st.backward.n_accepted == st.n_accepted and st.backward.n_rejected == 0
    assert 0 < st.backward.nfe <= st.nfe + st.n_accepted
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="checkpoints"):
            odeint_checkpoint(func, y0, t, checkpoints=bad)
    with pytest.raises(ValueError, match="params="):
        odeint_checkpoint(lambda tt, y: -y, y0, t)
    with pytest.raises(ValueError, match=r"params\[0\] is not a leaf"):
        odeint_checkpoint(func, y0, t, params=(func.l1.weight * 2,))


# -- NeuralODE ---------------------------------------------------------------------------------------


def test_neuralode_gradient_modes_agree_and_report_stats():
    torch.manual_seed(0)
    field = MLPField()
    y0 = torch.randn(5, 2, dtype=DT)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DT)
    grads, nfes = {}, {}
    for gradient in neuralode.GRADIENT_METHODS:
        node = NeuralODE(field, t=t, rtol=1e-8, atol=1e-8, gradient=gradient)
        field.zero_grad()
        y = node(y0)
        assert y.shape == (3, 5, 2)
        y.pow(2).sum().backward()
        grads[gradient] = [p.grad.clone() for p in field.parameters()]
        nfes[gradient] = (node.last_stats.nfe, node.last_stats.backward.nfe)
        assert node.last_stats.nfe > 0 and node.last_stats.n_solves == 1
    assert nfes["direct"][1] == 0 and nfes["adjoint"][1] > 0 and nfes["checkpoint"][1] > 0
    assert _max_rel(grads["checkpoint"], grads["direct"]) < 1e-10
    assert _max_rel(grads["adjoint"], grads["direct"]) < 1e-5
    node = NeuralODE(field, t=t, gradient="adjoint", only_last=True, adjoint_options={"norm": "seminorm"})
    assert node(y0).shape == (5, 2)


def test_neuralode_bad_gradient():
    with pytest.raises(ValueError, match="'direct', 'adjoint', 'checkpoint'"):
        NeuralODE(MLPField(), gradient="backsolve")


def test_adjoint_tuple_state_options():
    """Seminorm, a forward norm on the tuple, and per-tensor tolerances all carry over to the tuple
    state's backward solve."""
    func, y0, t = _problem("tuple")
    want = _grads(odeint, func, y0, t, rtol=1e-9, atol=1e-9)
    for kw in (
        {"adjoint_options": {"norm": "seminorm"}},
        {"options": {"norm": lambda parts: max(p.abs().max() for p in parts)}},
        {"rtol": (1e-9, 1e-8), "adjoint_atol": (1e-9, 1e-10)},
    ):
        got = _grads(odeint_adjoint, func, y0, t, **{"rtol": 1e-9, "atol": 1e-9, **kw})
        assert _max_rel(got, want) < 1e-6, kw


def test_neuralode_checkpoint_count_is_passed_through():
    torch.manual_seed(0)
    field = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = field

        def forward(self, t, y):
            return self.net(y)

    f = F()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    grads = []
    for mode, k in (("direct", None), ("checkpoint", 2)):
        node = neuralode.NeuralODE(
            f, method="rk4", options=dict(step_size=0.05), gradient=mode, checkpoints=k
        )
        node(y0)[-1].pow(2).sum().backward()
        grads.append([p.grad.clone() for p in f.parameters()])
        f.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="checkpoints must be a positive int"):
        neuralode.NeuralODE(f, gradient="checkpoint", checkpoints=0)
