"""Every bad input raises a clear ValueError/TypeError; runtime failures raise SolverError."""

import pytest
import torch

import neuralode
from neuralode import SolverError, odeint

F64 = torch.float64
Y0 = torch.ones(2, dtype=F64)
T = torch.tensor([0.0, 1.0], dtype=F64)


def f(t, y):
    return -y


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(method="rk45"), ValueError, "valid methods: .*dopri5"),
        (
            dict(method="dopri5", options=dict(step_size=0.1)),
            ValueError,
            "unknown option.*step_size.*valid options",
        ),
        (dict(method="rk4", options=dict(rtol=1)), ValueError, "unknown option"),
        (dict(rtol=0.0), ValueError, "rtol must be positive"),
        (dict(atol=-1e-3), ValueError, "atol must be positive"),
        (dict(rtol=torch.tensor([1e-3, 0.0], dtype=F64)), ValueError, "rtol must be positive"),
        (dict(atol="small"), TypeError, "atol must be"),
        (dict(options=dict(max_num_steps=0)), ValueError, "max_num_steps"),
        (dict(method="euler", options=dict(step_size=-0.1)), ValueError, "step_size"),
        (dict(method="euler", options=dict(interp="quadratic")), ValueError, "interp"),
        (dict(options=dict(controller="pid2")), ValueError, "controller"),
        (dict(options=dict(norm="rms")), TypeError, "norm"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        odeint(f, Y0, T, **kwargs)


@pytest.mark.parametrize(
    ("t", "exc", "match"),
    [
        (torch.tensor([[0.0, 1.0]], dtype=F64), ValueError, "t must be 1-D, got shape"),
        (torch.tensor([], dtype=F64), ValueError, "t is empty"),
        (torch.tensor([0.0, 1.0, 1.0], dtype=F64), ValueError, "strictly increasing or strictly decreasing"),
        (torch.tensor([0.0, 1.0, 0.5], dtype=F64), ValueError, "t\\[1\\]=1.0 and t\\[2\\]=0.5"),
        (torch.tensor([1.0, 0.0, 0.5], dtype=F64), ValueError, "t\\[1\\]=0.0 and t\\[2\\]=0.5"),
        (torch.tensor([0.0, 1.0, float("nan")], dtype=F64), ValueError, "NaN or inf"),
        (torch.tensor([0.0, float("nan")], dtype=F64), ValueError, "NaN or inf"),
        (torch.tensor([0.0, float("inf")], dtype=F64), ValueError, "NaN or inf"),
        (torch.tensor([0, 1]), TypeError, "t must be floating point"),
        ([0.0, 1.0], TypeError, "t must be a 1-D tensor"),
    ],
)
def test_bad_t(t, exc, match):
    with pytest.raises(exc, match=match):
        odeint(f, Y0, t)


def test_t_near_the_float_limit():
    # finite times whose sum overflows: the finiteness check falls back to the exact test
    from neuralode._problem import check_t

    assert check_t(torch.tensor([1e308, 1.7e308], dtype=F64)) == [1e308, 1.7e308]
    assert check_t(torch.tensor([1.7e308, 1e308], dtype=F64)) == [1.7e308, 1e308]


def test_bad_y0():
    with pytest.raises(TypeError, match="y0 must be a floating-point tensor, got dtype torch.int64"):
        odeint(f, torch.ones(2, dtype=torch.long), T)
    with pytest.raises(ValueError, match="y0 contains NaN or inf"):
        odeint(f, torch.tensor([1.0, float("nan")], dtype=F64), T)
    with pytest.raises(ValueError, match=r"y0\[1\] contains NaN"):
        odeint(lambda t, s: s, (Y0, torch.tensor([float("inf")], dtype=F64)), T)
    with pytest.raises(TypeError, match="y0 must be a tensor or a non-empty tuple"):
        odeint(f, [1.0, 2.0], T)
    with pytest.raises(TypeError, match="share one dtype"):
        odeint(lambda t, s: s, (Y0, torch.ones(1)), T)


def test_devices_must_match():
    meta_t = torch.tensor([0.0, 1.0], dtype=F64, device="meta")
    with pytest.raises(ValueError, match="t is on meta but y0 is on cpu"):
        odeint(f, Y0, meta_t)


def test_func_output_checked_once_before_the_loop():
    with pytest.raises(ValueError, match=r"returned shape \(3,\); expected the state's shape \(2,\)"):
        odeint(lambda t, y: torch.ones(3, dtype=F64), Y0, T)
    with pytest.raises(
        TypeError, match="returned dtype torch.float32; expected the state's dtype torch.float64"
    ):
        odeint(lambda t, y: y.float(), Y0, T)
    with pytest.raises(TypeError, match="must return a tensor, got float"):
        odeint(lambda t, y: 1.0, Y0, T)
    with pytest.raises(TypeError, match="tuple of 2 tensors"):
        odeint(lambda t, s: s[0], (Y0, Y0), T)
    with pytest.raises(TypeError, match="func must be callable"):
        odeint("f", Y0, T)


def test_nonfinite_during_solve():
    def blowup(t, y):
        return torch.where(t > 0.5, torch.full_like(y, float("nan")), -y)

    with pytest.raises(SolverError, match="t=0.5") as info:
        odeint(blowup, Y0, T)
    assert info.value.reason in ("nonfinite", "underflow")
    assert isinstance(info.value, RuntimeError)


def test_nonfinite_func_at_the_start_fails_at_once():
    # f(t0, y0) = NaN makes the initial step size NaN; no step can succeed, so the first one raises
    # (it used to retry NaN-sized steps until max_num_steps).
    with pytest.raises(SolverError, match="func returned NaN/inf") as info:
        odeint(lambda t, y: y * float("nan"), Y0, T, options={"max_num_steps": 10_000})
    assert info.value.reason == "nonfinite" and info.value.n_steps == 1

    def nan_for_sample_1(t, y):
        return -y + torch.tensor([[0.0], [float("nan")], [0.0]], dtype=y.dtype)

    with pytest.raises(SolverError, match="sample 1, nonfinite"):
        odeint(
            nan_for_sample_1,
            torch.ones(3, 2, dtype=F64),
            T,
            options={"per_sample": True, "max_num_steps": 10_000},
        )


def test_step_size_underflow():
    # y' = y² from y0 = 1 blows up at t = 1.
    with pytest.raises(SolverError, match="underflow|non-finite") as info:
        odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64))
    assert 0.99 < info.value.t < 1.01
    assert "try" in str(info.value) or "loosen" in str(info.value)


def test_max_num_steps():
    with pytest.raises(SolverError, match="max_num_steps=5 exceeded") as info:
        odeint(f, Y0, torch.tensor([0.0, 100.0], dtype=F64), options=dict(max_num_steps=5))
    assert info.value.reason == "max_num_steps" and info.value.n_steps == 5
    assert "raise options['max_num_steps']" in str(info.value)


def test_solver_error_is_exported():
    assert issubclass(neuralode.SolverError, RuntimeError)
