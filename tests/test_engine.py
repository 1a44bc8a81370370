"""The Runge-Kutta core, step-size controllers and dense output shared by every loop."""

import math

import pytest
import torch

from neuralode import FixedGridSolver, SolverError, odeint
from neuralode._solvers.explicit import TABLEAUS
from neuralode._solvers.rk import ROWS, SCALAR, error_ratio, rk_step

F64 = torch.float64
T = torch.tensor([0.0, 1.0], dtype=F64)


def nan_after(t_nan: float):
    """y' = -y, NaN from t_nan on (for every state: no step size can avoid it)."""

    def f(t, y):
        return torch.full_like(y, math.nan) if float(t) > t_nan else -y

    return f


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8"])
def test_nan_mid_solve_is_reported_as_nan_at_its_time(method):
    y0 = torch.ones(3, dtype=F64)
    with pytest.raises(SolverError, match=r"func returned NaN at t=0\.4") as info:
        odeint(nan_after(0.4), y0, T, method=method)
    assert info.value.reason == "nonfinite"
    assert info.value.t == pytest.approx(0.4, abs=1e-9)
    with pytest.raises(SolverError, match=r"func returned NaN at t=0\.4"):  # with min_step: no underflow
        odeint(nan_after(0.4), y0, T, method=method, options={"min_step": 1e-3, "max_num_steps": 200})


def test_overflow_is_not_nan():
    # y' = y² from 1 blows up at t = 1 with finite values: still a step-size underflow there.
    with pytest.raises(SolverError, match="underflow") as info:
        odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))
    assert 0.99 < info.value.t < 1.01


@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams"])
def test_nan_on_a_fixed_grid_raises_at_the_first_bad_output(method):
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    with pytest.raises(SolverError, match="func returned NaN") as info:
        odeint(nan_after(0.45), torch.ones(2, dtype=F64), t, method=method, options={"step_size": 0.05})
    assert info.value.reason == "nonfinite"
    assert info.value.t in (0.5, 0.6)  # the first output whose state saw the NaN


def test_nan_in_fixed_grid_solver_raises():
    def f(t, y):
        return torch.where(t > 0.45, torch.full_like(y, math.nan), -y)

    solver = FixedGridSolver(
        f,
        torch.linspace(0.0, 1.0, 5, dtype=F64),
        mode="compile",
        compile_options={"backend": "eager"},
        step_size=0.1,
    )
    with pytest.raises(SolverError, match="func returned NaN"):
        solver(torch.ones(2, dtype=F64))


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "bosh3", "dopri8", "rk4", "heun2"])
def test_row_step_equals_scalar_step(name):
    # One row of ROWS with step size h is the SCALAR step with h: same stages, same error ratio.
    tab = TABLEAUS[name]
    A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)

    def f(t, y):
        return y @ A.T + torch.as_tensor(t, dtype=F64).reshape(-1, 1)

    y = torch.tensor([[1.0, -0.5], [0.3, 0.7]], dtype=F64)
    h = 0.13
    for b in range(2):
        y_b = y[b : b + 1]
        y1, k = rk_step(f, tab, 0.2, h, y_b, f(0.2, y_b))
        hr = torch.full((1,), h, dtype=F64)
        t_r = torch.full((1,), 0.2, dtype=F64)
        y1r, kr = rk_step(f, tab, t_r, (hr.unsqueeze(1), hr), y_b, f(t_r, y_b), ROWS)
        torch.testing.assert_close(y1r, y1, rtol=1e-14, atol=1e-14)
        if tab.adaptive:
            r = error_ratio(tab, k, h, y_b, y1, 1e-6, 1e-8, lambda x: x.pow(2).mean().sqrt(), SCALAR)
            rr = error_ratio(
                tab, kr, (hr.unsqueeze(1), hr), y_b, y1r, 1e-6, 1e-8, lambda x: x.pow(2).mean(1).sqrt(), ROWS
            )
            torch.testing.assert_close(rr, r.reshape(1), rtol=1e-6, atol=1e-10)  # a cancellation


def test_output_plan():
    from neuralode._interpolation import step_outputs

    t_out = [0.0, 0.1, 0.25, 0.5, 1.0]
    assert step_outputs(t_out, 1, 0.0, 0.5, 0.5, 1.0) == ([0.2, 0.5], 3, True)  # 0.5 is the step's end
    assert step_outputs(t_out, 1, 0.0, 0.05, 0.05, 1.0) == ([], 1, False)
    back = [1.0, 0.75, 0.2, 0.0]  # backwards in time
    thetas, j, at_end = step_outputs(back, 1, 1.0, -0.5, 0.5, -1.0)
    assert (thetas, j, at_end) == ([0.5], 2, False)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8", "tsit5"])
def test_checkpoint_replay_reproduces_the_outputs(method):
    # The backward pass replays the steps with the same core and output plan as the forward solve.
    from neuralode import odeint_checkpoint

    w = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.3, 0.31, 1.2, 2.0], dtype=F64)

    def f(t, y):
        return torch.tanh(y @ w.T)

    direct = odeint(f, y0, t, method=method, rtol=1e-6, atol=1e-8)
    ckpt = odeint_checkpoint(f, y0, t, method=method, rtol=1e-6, atol=1e-8, params=(w,), checkpoints=2)
    torch.testing.assert_close(ckpt, direct, rtol=0, atol=1e-14)
    g1 = torch.autograd.grad(direct.sum(), (y0, w))
    g2 = torch.autograd.grad(ckpt.sum(), (y0, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
