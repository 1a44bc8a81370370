"""Adams, implicit Runge-Kutta and SciPy methods: registry, tableaus, convergence order on y' = Ay,
agreement with torchdiffeq, gradients, nonlinear solver options and errors."""

import importlib
import math
import sys
import warnings

import pytest
import torch
import torchdiffeq

from neuralode import SOLVERS, odeint
from neuralode._solvers.adams import bashforth, moulton
from neuralode._solvers.implicit import IMPLICIT_TABLEAUS
from neuralode._solvers.registry import EXTRA_METHODS

F64 = torch.float64
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.3]], dtype=F64)
Y0 = torch.tensor([1.0, 0.5], dtype=F64)


def linear(t, y):
    return y @ A.T


def nonlinear(t, y):
    return torch.tanh(y) @ A + torch.sin(t)


def test_registry_lists_every_torchdiffeq_method():
    names = set(importlib.import_module("torchdiffeq._impl.odeint").SOLVERS) | {
        "implicit_euler",
        "implicit_midpoint",
        "trapezoid",
        "gl4",
        "gl6",
        "radauIIA3",
        "radauIIA5",
        "sdirk2",
        "trbdf2",
    }
    assert names <= set(SOLVERS)
    assert set(EXTRA_METHODS) <= set(SOLVERS)


@pytest.mark.parametrize("name", list(IMPLICIT_TABLEAUS))
def test_implicit_tableau_order_conditions(name):
    IMPLICIT_TABLEAUS[name].check()


def test_adams_coefficients_are_the_textbook_ones():
    assert [float(x) for x in bashforth(4)] == [55 / 24, -59 / 24, 37 / 24, -9 / 24]
    assert [float(x) for x in moulton(4)] == [9 / 24, 19 / 24, -5 / 24, 1 / 24]
    for m in range(1, 13):
        assert sum(bashforth(m)) == 1 and sum(moulton(m)) == 1


def _order(method, options, hs=(0.1, 0.05)):
    t = torch.tensor([0.0, 1.0], dtype=F64)
    exact = torch.linalg.matrix_exp(A) @ Y0
    errs = [
        (odeint(linear, Y0, t, method=method, options={**options, "step_size": h})[-1] - exact).norm().item()
        for h in hs
    ]
    return math.log2(errs[0] / errs[1]), errs


@pytest.mark.parametrize("name", list(IMPLICIT_TABLEAUS))
def test_implicit_convergence_order(name):
    order, errs = _order(name, {})
    assert order > IMPLICIT_TABLEAUS[name].order - 0.2, errs


@pytest.mark.parametrize(
    "method,max_order,expected",
    [("explicit_adams", 4, 3), ("explicit_adams", 5, 4), ("implicit_adams", 4, 4), ("implicit_adams", 5, 5)],
)
def test_adams_convergence_order(method, max_order, expected):
    opts = (
        {"max_order": max_order} if method == "explicit_adams" else {"max_order": max_order, "max_iters": 50}
    )
    order, errs = _order(method, opts, hs=(0.05, 0.025))
    assert order > expected - 0.3, errs


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
@pytest.mark.parametrize(
    "options", [{}, {"step_size": 0.05}, {"step_size": 0.07, "interp": "cubic"}, {"max_order": 6}]
)
def test_adams_agrees_with_torchdiffeq(method, options):
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=F64)
    t = torch.linspace(0, 3, 31, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # at the default tolerances both warn that the corrector did not converge
        ours = odeint(nonlinear, y0, t, method=method, options=options)
        theirs = torchdiffeq.odeint(nonlinear, y0, t, method=method, options=options)
    # The order-11 Bashforth predictor amplifies round-off: the starter's RK4 steps, computed in another
    # order of operations than torchdiffeq's, differ in the last bits, which grow to ~1e-10 relative.
    rtol = 1e-9 if method == "explicit_adams" else 0.0
    assert torch.allclose(ours, theirs, rtol=rtol, atol=1e-12)


def test_implicit_adams_corrector_options_agree_with_torchdiffeq():
    t = torch.linspace(0, 2, 11, dtype=F64)
    kw = dict(method="implicit_adams", options={"max_iters": 1, "max_order": 7}, rtol=1e-3, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that the corrector did not converge
        ours = odeint(nonlinear, Y0, t, **kw)
        theirs = torchdiffeq.odeint(nonlinear, Y0, t, **kw)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


def test_adams_option_errors():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="max_order"):
        odeint(linear, Y0, t, method="implicit_adams", options={"max_order": 13})
    with pytest.warns(UserWarning, match="reduces to `rk4`"):
        odeint(linear, Y0, t, method="explicit_adams", options={"max_order": 3})
    with pytest.raises(ValueError, match="unknown option"):
        odeint(linear, Y0, t, method="explicit_adams", options={"max_iters": 3})


@pytest.mark.parametrize("solver", ["RK45", "LSODA", "Radau"])
def test_scipy_solver_agrees_with_torchdiffeq(solver):
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.3]], dtype=F64)
    t = torch.linspace(0, 2, 11, dtype=F64)
    kw = dict(method="scipy_solver", options={"solver": solver}, rtol=1e-6, atol=1e-8)
    ours = odeint(nonlinear, y0, t, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq always passes min_step, which SciPy warns is unused
        theirs = torchdiffeq.odeint(nonlinear, y0, t, **kw)
    # LSODA keeps state between calls in its Fortran common blocks: same tolerance, not bitwise equal.
    tol = 1e-6 if solver == "LSODA" else 1e-12
    assert (ours - theirs).abs().max() < tol


def test_scipy_solver_reverse_time_and_tuple_state():
    t = torch.linspace(1, 0, 5, dtype=F64)

    def f(t, s):
        return linear(t, s[0]), -s[1]

    ours = odeint(f, (Y0, Y0), t, method="scipy_solver", options={"solver": "DOP853"}, rtol=1e-10, atol=1e-12)
    ref = odeint(f, (Y0, Y0), t, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-8)


def test_scipy_missing_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.integrate", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        odeint(linear, Y0, torch.tensor([0.0, 1.0], dtype=F64), method="scipy_solver")


@pytest.mark.parametrize("name", ["gl4", "trbdf2"])
def test_implicit_gradients_gradcheck(name):
    w = torch.randn(2, 2, dtype=F64, requires_grad=True)
    y0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.5], dtype=F64)

    def solve(w, y0):
        return odeint(
            lambda t, y: torch.tanh(y @ w) - 0.5 * y, y0, t, method=name, options={"step_size": 0.25}
        )

    assert torch.autograd.gradcheck(solve, (w, y0), atol=1e-6, nondet_tol=1e-9)


def test_newton_handles_stiffness_where_fixed_point_fails():
    def stiff(t, y):
        return -1000.0 * (y - torch.cos(t))

    y0 = torch.zeros(4, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y = odeint(stiff, y0, t, method="radauIIA5", options={"step_size": 0.1})
    assert torch.allclose(y[-1], torch.full_like(y0, math.cos(1.0)), atol=1e-3)
    with pytest.warns(UserWarning, match="did not converge"):
        odeint(
            stiff, y0, t, method="radauIIA5", options={"step_size": 0.1, "nonlinear_solver": "fixed_point"}
        )


def test_fixed_point_agrees_with_newton_when_nonstiff():
    t = torch.linspace(0, 1, 5, dtype=F64)
    a = odeint(nonlinear, Y0, t, method="gl6", options={"step_size": 0.05})
    b = odeint(nonlinear, Y0, t, method="gl6", options={"step_size": 0.05, "nonlinear_solver": "fixed_point"})
    assert torch.allclose(a, b, atol=1e-10)


def test_implicit_option_errors():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="nonlinear_solver"):
        odeint(linear, Y0, t, method="gl4", options={"nonlinear_solver": "broyden"})
    with pytest.raises(ValueError, match="max_iters"):
        odeint(linear, Y0, t, method="gl4", options={"max_iters": 0})


def test_implicit_methods_on_a_batch_in_float32():
    y0 = torch.randn(64, 2)
    t = torch.tensor([0.0, 1.0])
    ref = odeint(linear_f32 := (lambda t, y: y @ A.float().T), y0, t, rtol=1e-6, atol=1e-7)
    for name in ("gl4", "radauIIA5"):
        y = odeint(linear_f32, y0, t, method=name, options={"step_size": 0.1})
        assert y.dtype == torch.float32
        assert torch.allclose(y, ref, atol=1e-4)


@pytest.mark.parametrize("method", ["gl4", "radauIIA5", "implicit_adams"])
def test_adjoint_through_extra_methods_matches_direct(method):
    from neuralode import odeint_adjoint

    field = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    y0 = torch.tensor([[0.5, -0.2]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    kw = {"method": method, "options": {"step_size": 0.02}, "rtol": 1e-10, "atol": 1e-12}

    def grads(solve):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # implicit_adams' corrector at tight tolerances
            out = (
                solve(lambda t, y: field(y), y0, t, **kw)
                if solve is odeint
                else solve(_Wrap(field), y0, t, **kw)
            )
        return torch.autograd.grad(out.pow(2).sum(), (y0, *field.parameters()))

    for a, d in zip(grads(odeint_adjoint), grads(odeint)):
        assert torch.allclose(a, d, atol=1e-6), method


class _Wrap(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, y):
        return self.net(y)


def test_checkpoint_refuses_non_rk_methods_clearly():
    from neuralode import odeint_checkpoint

    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="cannot be replayed"):
        odeint_checkpoint(
            linear,
            y0,
            torch.tensor([0.0, 1.0], dtype=F64),
            method="gl4",
            options={"step_size": 0.1},
            params=(),
        )
