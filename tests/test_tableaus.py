"""Tableaus validate themselves (no solve needed) and converge at their claimed order."""

import math

import pytest
import torch

import neuralode
from neuralode._integrate.joint import integrate_fixed
from neuralode._solvers.explicit import TABLEAUS
from neuralode._solvers.tableau import ButcherTableau, rooted_trees
from neuralode._stats import SolveStats

ALL = sorted(TABLEAUS)


def test_number_of_rooted_trees():
    counts = [sum(1 for t in rooted_trees(n)) - sum(1 for t in rooted_trees(n - 1)) for n in range(1, 9)]
    assert counts == [1, 1, 2, 4, 9, 20, 48, 115]


@pytest.mark.parametrize("name", ALL)
def test_tableau_order_conditions(name):
    TABLEAUS[name].check()


def test_registry_matches_torchdiffeq_names():
    for name in [
        "euler",
        "midpoint",
        "heun2",
        "heun3",
        "rk4",
        "adaptive_heun",
        "fehlberg2",
        "bosh3",
        "dopri5",
        "tsit5",
        "dopri8",
    ]:
        assert name in neuralode.SOLVERS


def test_fsal_is_derived():
    assert TABLEAUS["dopri5"].fsal and TABLEAUS["tsit5"].fsal and TABLEAUS["bosh3"].fsal
    assert TABLEAUS["dopri8"].fsal
    assert not TABLEAUS["rk4"].fsal and not TABLEAUS["fehlberg2"].fsal


def test_broken_tableau_is_rejected():
    bad = ButcherTableau(name="bad", c=(0.0, 0.5), a=((), (0.5,)), b=(0.5, 0.5), order=2)
    with pytest.raises(ValueError, match="order-2"):
        bad.check()
    bad_rows = ButcherTableau(name="bad", c=(0.0, 0.4), a=((), (0.5,)), b=(0.0, 1.0), order=2)
    with pytest.raises(ValueError, match="row 1"):
        bad_rows.check()
    with pytest.raises(ValueError, match="lower triangular"):
        ButcherTableau(name="bad", c=(0.0, 0.5), a=((), (0.5, 0.1)), b=(0.0, 1.0), order=2)


A = torch.tensor([[-0.3, 1.0], [-1.0, -0.3]], dtype=torch.float64)
Y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
T_END = 2.0


def _fixed_error(tab, n):
    grid = [T_END * i / n for i in range(n + 1)]
    f = lambda t, y: A @ y  # noqa: E731
    out = integrate_fixed(f, tab, Y0, A @ Y0, [0.0, T_END], grid, stats=SolveStats())
    exact = torch.linalg.matrix_exp(A * T_END) @ Y0
    return float((out[-1] - exact).abs().max())


@pytest.mark.parametrize("name", ALL)
def test_empirical_convergence_order(name):
    tab = TABLEAUS[name]
    # Step counts chosen so the error is well above rounding for every order.
    n = {1: 64, 2: 32, 3: 16, 4: 16, 5: 8, 8: 4}[tab.order]
    e1, e2 = _fixed_error(tab, n), _fixed_error(tab, 2 * n)
    order = math.log2(e1 / e2)
    assert abs(order - tab.order) < 0.3, (name, order)


@pytest.mark.parametrize("name", [n for n in ALL if TABLEAUS[n].adaptive])
def test_embedded_error_estimate_has_its_order(name):
    """The local error estimate shrinks like h^(error_order + 1)."""
    from neuralode._integrate.joint import rk_step

    tab = TABLEAUS[name]
    f = lambda t, y: A @ y  # noqa: E731
    errs = []
    for h in (0.2, 0.1):
        _, k = rk_step(f, tab, 0.0, h, Y0, A @ Y0)
        est = sum(e * kk for e, kk in zip(tab.b_error, k)) * h
        errs.append(float(est.abs().max()))
    order = math.log2(errs[0] / errs[1])
    assert abs(order - (tab.error_order + 1)) < 0.35, (name, order)


@pytest.mark.parametrize("name", ALL)
def test_dense_output_order(name):
    """Interpolation error inside one step shrinks like h^(dense_order + 1)."""
    from neuralode._integrate.joint import dense_eval, rk_step

    tab = TABLEAUS[name]
    f = lambda t, y: A @ y  # noqa: E731
    errs = []
    hs = (0.4, 0.2) if tab.dense_order < 6 else (0.8, 0.4)
    for h in hs:
        y1, k = rk_step(f, tab, 0.0, h, Y0, A @ Y0)
        f1 = k[-1] if tab.fsal else f(h, y1)
        (ym,) = dense_eval(f, tab, 0.0, h, Y0, [*k, f1], [0.37], SolveStats())
        exact = torch.linalg.matrix_exp(A * 0.37 * h) @ Y0
        errs.append(float((ym - exact).abs().max()))
    order = math.log2(errs[0] / errs[1])
    want = min(tab.dense_order, tab.order) + 1
    assert order > want - 0.35, (name, order, want)
