"""``options={"throw": False}``: a failed solve returns what it reached, NaN after, with its status.

The failing problem is ``dy/dt = y²``, ``y(0) = 1``: ``y = 1/(1 − t)`` blows up at ``t = 1`` (adaptive
methods: step-size underflow; fixed grids: the state overflows to inf/NaN), or any problem with a small
``max_num_steps``. Each mode's outputs up to the time reached must equal a normal solve that stops
there, the rest must be NaN, and ``throw=True`` (the default) must still raise the same ``SolverError``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import neuralode
from composition import FailureCell, failure_cells, failure_outcome, says_what_to_do
from neuralode import SolverError, SolveStats, odeint, odeint_adjoint, odeint_checkpoint, odeint_per_sample

F64 = torch.float64
EAGER = {"backend": "eager"}  # torch.compile without code generation: the compiled path, quickly
T = torch.linspace(0.0, 2.0, 9, dtype=F64)
TOL = {"rtol": 1e-5, "atol": 1e-8}  # 0, 0.25, ..., 2: the blow-up at 1 is between outputs


class Square(torch.nn.Module):
    """``dy/dt = a·y²`` (``a = 1``): blows up at ``t = 1/(a·y0)``."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

    def forward(self, t, y):
        return self.a * y**2


def square(t, y):
    return y**2


def nan_after_one(t, y):
    """Finite (``dy/dt = −y``) before ``t = 1``, NaN from there on."""
    return -y if float(t) < 1.0 else y * math.nan


def _y0(*shape):
    return torch.ones(*shape or (2,), dtype=F64)


def _check(ys, stats, reference, status, rtol=1e-5):
    """Outputs up to ``stats.t_reached`` equal ``reference(t_ok)`` (adaptive: to tolerance, the reference
    clips its last step onto t_ok[-1]), NaN after; the status is ``status``."""
    assert stats.status == status and not stats.success
    n_ok = int((T <= stats.t_reached).sum())
    assert 1 <= n_ok < len(T)
    assert torch.isfinite(ys[:n_ok]).all()
    assert torch.isnan(ys[n_ok:]).all()
    ref = reference(T[:n_ok])
    torch.testing.assert_close(ys[:n_ok], ref, rtol=rtol, atol=1e-9)


# -- joint mode: each loop ---------------------------------------------------------------------------

JOINT = {
    # name: (func, method, options, expected status, reached time in this interval)
    "adaptive": (square, "dopri5", {}, "underflow", (1.0 - 1e-4, 1.0 + 1e-4)),
    "adaptive-compiled": (square, "dopri5", {"compile": EAGER}, "underflow", (1.0 - 1e-4, 1.0 + 1e-4)),
    "max_num_steps": (square, "dopri5", {"max_num_steps": 12}, "max_num_steps", (0.25, 1.0)),
    "fixed": (square, "rk4", {"step_size": 0.01}, "nonfinite", (1.0, 1.1)),
    "fixed-compiled": (square, "rk4", {"step_size": 0.01, "compile": EAGER}, "nonfinite", (1.0, 1.1)),
    "fixed-t-grid": (nan_after_one, "rk4", {}, "nonfinite", (0.75, 0.75)),
    # (order-11 Adams-Bashforth turns unstable before the blow-up: its state overflows earlier)
    "explicit_adams": (square, "explicit_adams", {"step_size": 0.01}, "nonfinite", (0.5, 1.1)),
    "implicit_adams": (nan_after_one, "implicit_adams", {"step_size": 0.05}, "nonfinite", (0.95, 0.95)),
    "implicit": (nan_after_one, "implicit_euler", {"step_size": 0.05}, "nonfinite", (0.95, 0.95)),
    # (no stage of gl4 lies on t = 1: y(1) is finite, the step from 1 fails)
    "gl4": (nan_after_one, "gl4", {"step_size": 0.05}, "nonfinite", (1.0, 1.0)),
}


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "adaptive-compiled" else n for n in JOINT]
)
def test_joint_mode_returns_what_it_reached(name):
    func, method, options, status, (lo, hi) = JOINT[name]
    stats = SolveStats()
    ys = odeint(func, _y0(), T, **TOL, method=method, options={**options, "throw": False}, stats=stats)
    assert lo <= stats.t_reached <= hi + 1e-12
    # A normal solve to the reached output times (fixed grids: the same grid; max_num_steps: raised).
    ref_opts = {k: v for k, v in options.items() if k != "max_num_steps"}
    _check(ys, stats, lambda t: odeint(func, _y0(), t, **TOL, method=method, options=ref_opts), status)
    with pytest.raises(SolverError) as err:
        odeint(func, _y0(), T, **TOL, method=method, options=options)
    assert err.value.reason == status


def test_throw_true_is_the_default_and_raises_unchanged():
    with pytest.raises(SolverError, match="step size underflow") as err:
        odeint(square, _y0(), T, options={"throw": True})
    assert err.value.reason == "underflow" and 0.99 < err.value.t < 1.01


def test_success_reports_status_and_end_time():
    stats = SolveStats()
    odeint(square, _y0(), T[:3], options={"throw": False}, stats=stats)
    assert stats.status == "success" and stats.success and stats.t_reached == float(T[2])
    with neuralode.record_stats() as rec:
        odeint(square, _y0(), T[:3], method="rk4", options={"step_size": 0.1})
    assert rec.status == "success" and rec.t_reached == float(T[2])
    assert rec.as_dict()["status"] == "success"


@pytest.mark.parametrize(
    ("method", "options"),
    [("dopri5", {}), ("rk4", {"step_size": 0.05}), ("dopri5", {"per_sample": True})],
)
def test_success_path_makes_no_extra_sync(monkeypatch, method, options):
    """Host reads of tensor values (``bool``/``float``/``int``/``item``/``tolist``: the syncs on a GPU)
    during a successful solve: no more with ``throw=False`` than with the default (per-sample mode: one
    fewer, the default's check for failed samples at the end)."""
    counts = []

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *args):
            counts[-1] += 1
            return orig(self, *args)

        return wrapper

    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    y0 = torch.tensor([[0.5], [0.25]], dtype=F64)
    for throw in (True, False):
        counts.append(0)
        odeint(square, y0, T[:3], **TOL, method=method, options={**options, "throw": throw})
    assert 0 < counts[1] <= counts[0] <= counts[1] + 1


def test_tuple_state_outputs_after_failure_are_nan():
    def f(t, y):
        return y[0] ** 2, -y[1]

    stats = SolveStats()
    a, b = odeint(f, (_y0(1), _y0(2)), T, options={"throw": False}, stats=stats)
    n_ok = int((T <= stats.t_reached).sum())
    assert torch.isnan(a[n_ok:]).all() and torch.isnan(b[n_ok:]).all()
    torch.testing.assert_close(b[:n_ok], torch.exp(-T[:n_ok]).unsqueeze(1).expand(-1, 2), rtol=1e-6, atol=0)


def test_bad_throw_option_is_a_type_error():
    with pytest.raises(TypeError, match=r"options\['throw'\] must be True or False, got int"):
        odeint(square, _y0(), T, options={"throw": 0})


# -- scipy_solver ----------------------------------------------------------------------------------------


def square_fenced(t, y):
    """``y²``, NaN where ``|y| > 1000`` (the implicit SciPy solvers would otherwise run past the pole)."""
    return torch.where(y.abs() > 1000, math.nan, y**2)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("solver", "status"),
    [("RK45", "underflow"), ("DOP853", "underflow"), ("Radau", "nonfinite"), ("LSODA", "nonfinite")],
)
def test_scipy_solver_returns_what_it_reached(solver, status):
    """RK45/DOP853 fail on the step size, Radau raises inside SciPy on the NaN Jacobian, LSODA carries
    NaN on: each stops just before the pole with the outputs before it, NaN after, and with
    ``throw=True`` raises (SciPy's failure as ``RuntimeError``, a non-finite state as ``SolverError``)."""
    options = {"solver": solver}
    stats = SolveStats()
    ys = odeint(square_fenced, _y0(), T, **TOL, method="scipy_solver", options={**options, "throw": False},
                stats=stats)  # fmt: skip
    assert 0.99 < stats.t_reached < 1.0
    assert stats.nfe > 0 and stats.n_steps > 0
    # (against y = 1/(1 − t): a SciPy solve to an earlier end takes other steps, LSODA notably)
    _check(ys, stats, lambda t: (1 / (1 - t)).unsqueeze(1).expand(-1, 2), status, rtol=1e-3)
    with pytest.raises((RuntimeError, SolverError), match=f"scipy_solver \\({solver}\\)"):
        odeint(square_fenced, _y0(), T, **TOL, method="scipy_solver", options=options)


def test_scipy_solver_success_and_reverse_time_with_throw_false():
    stats = SolveStats()
    back = T.flip(0)
    ys = odeint(lambda t, y: -y, _y0(), back, method="scipy_solver", rtol=1e-9, atol=1e-11,
                options={"throw": False, "solver": "DOP853"}, stats=stats)  # fmt: skip
    assert stats.status == "success" and stats.t_reached == 0.0
    torch.testing.assert_close(ys[:, 0], torch.exp(2.0 - back), rtol=1e-7, atol=0)


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_fixed_grid_solver_returns_what_it_reached(mode):
    """``FixedGridSolver(throw=False)``: the outputs, status and time reached of ``odeint``'s fixed grid
    with ``throw=False`` (the compiled step traced without code generation); ``throw=True`` raises."""
    torch._dynamo.reset()
    kwargs = {"method": "rk4", "step_size": 0.01, "mode": mode, "compile_options": EAGER}
    stats, ref_stats = SolveStats(), SolveStats()
    func = Square()
    y0 = _y0().requires_grad_(True)
    with neuralode.record_stats() as rec:
        ys = neuralode.FixedGridSolver(func, T, throw=False, **kwargs)(y0, stats=stats)
    ref = odeint(func, y0, T, method="rk4", options={"step_size": 0.01, "throw": False}, stats=ref_stats)
    assert stats.status == rec.status == ref_stats.status == "nonfinite"
    assert stats.t_reached == rec.t_reached == ref_stats.t_reached and 1.0 <= stats.t_reached <= 1.1
    torch.testing.assert_close(ys, ref, rtol=1e-12, atol=0, equal_nan=True)
    n_ok = int((T <= stats.t_reached).sum())
    assert torch.isnan(ys[n_ok:]).all()
    (g_nan,) = torch.autograd.grad(ys[n_ok:].sum(), y0, retain_graph=True)  # NaN outputs: constants
    assert (g_nan == 0).all()
    g = torch.autograd.grad(ys[2].sum(), (y0, func.a))
    g_ref = torch.autograd.grad(ref[2].sum(), (y0, func.a))
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)
    ok = neuralode.FixedGridSolver(square, T[:3], throw=False, **kwargs)
    assert torch.isfinite(ok(_y0(), stats=stats)).all() and stats.status == "success"
    with pytest.raises(SolverError) as err:
        neuralode.FixedGridSolver(square, T, **kwargs)(_y0())
    assert err.value.reason == "nonfinite"
    with pytest.raises(TypeError, match=r"FixedGridSolver\['throw'\] must be True or False"):
        neuralode.FixedGridSolver(square, T, throw=1, **kwargs)


# -- gradients -----------------------------------------------------------------------------------------


def test_direct_and_checkpoint_gradients_of_the_reached_part():
    """Backprop (and the checkpointed replay) of an output before the failure: the gradient of the
    same output in a normal solve that stops there; unreached outputs are constants (no gradient)."""
    grads = []
    for solve in (odeint, odeint_checkpoint):
        func = Square()
        y0 = _y0().requires_grad_(True)
        stats = SolveStats()
        with neuralode.record_stats() as rec:
            ys = solve(func, y0, T, options={"throw": False})
        stats.add(rec)
        assert stats.status == "underflow" and torch.isnan(ys[-1]).all()
        loss = ys[3].sum() + torch.nan_to_num(ys[-1], nan=0.0).sum()
        grads.append(torch.autograd.grad(loss, (y0, func.a)))
    func = Square()
    y0 = _y0().requires_grad_(True)
    ref = torch.autograd.grad(odeint(func, y0, T[:4])[3].sum(), (y0, func.a))
    for g in grads:
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=0)
    # y(0.75) = 1/(1 − 0.75 a): ∂/∂y0 = 1/(1 − 0.75)² = 16 per component, ∂/∂a = 2 · 0.75 · 16.
    torch.testing.assert_close(ref[0], torch.full((2,), 16.0, dtype=F64), rtol=1e-5, atol=0)


def test_checkpoint_fixed_grid_gradient_stops_at_the_last_finite_state():
    func = Square()
    y0 = _y0().requires_grad_(True)
    ys = odeint_checkpoint(func, y0, T, method="rk4", options={"step_size": 0.05, "throw": False})
    g = torch.autograd.grad(ys[2].sum(), (y0, func.a))
    ref = torch.autograd.grad(
        odeint(func, y0, T[:3], method="rk4", options={"step_size": 0.05})[2].sum(), (y0, func.a)
    )
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=0)
    assert all(torch.isfinite(x).all() for x in g)


def test_adjoint_forward_returns_what_it_reached_and_its_backward_raises():
    func = Square()
    y0 = _y0().requires_grad_(True)
    with neuralode.record_stats() as stats:
        ys = odeint_adjoint(func, y0, T, options={"throw": False})
    _check(ys.detach(), stats, lambda t: odeint(square, _y0(), t), "underflow")
    with pytest.raises(SolverError, match="odeint_adjoint cannot differentiate a solve that stopped"):
        ys[3].sum().backward()


# -- per-sample mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "compiled"),
    [
        ("keyword", False),
        ("options", False),
        ("odeint", False),
        pytest.param("odeint", True, marks=pytest.mark.slow),
    ],
)
def test_per_sample_status_and_time_in_stats(how, compiled):
    y0 = torch.tensor([[1.0], [0.25]], dtype=F64)  # sample 0 blows up at t = 1, sample 1 at t = 4
    options = {"compile": EAGER} if compiled else {}
    stats = SolveStats()
    if how == "keyword":
        ys = odeint_per_sample(square, y0, T, **TOL, options=options, throw=False, stats=stats)
    elif how == "options":
        ys = odeint_per_sample(square, y0, T, **TOL, options={**options, "throw": False}, stats=stats)
    else:
        ys = odeint(
            square, y0, T, **TOL, options={**options, "throw": False, "per_sample": True}, stats=stats
        )
    assert stats.status.tolist() == [2, 0] and stats.success.tolist() == [False, True]
    assert SolveStats.STATUS[int(stats.status[0])] == "underflow"
    assert 0.999 < float(stats.t_reached[0]) < 1.001 and float(stats.t_reached[1]) == 2.0
    n_ok = int((T <= stats.t_reached[0]).sum())
    assert torch.isnan(ys[n_ok:, 0]).all() and torch.isfinite(ys[:, 1]).all()
    assert stats == dataclasses.replace(stats)  # == ignores the (tensor) status
    ref = odeint_per_sample(square, y0[:1], T[:n_ok], **TOL, options=options)
    torch.testing.assert_close(ys[:n_ok, :1], ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(ys[:, 1, 0], 0.25 / (1 - 0.25 * T), rtol=1e-4, atol=0)
    with pytest.raises(SolverError, match="1 of 2 samples failed"):
        odeint_per_sample(square, y0, T, **TOL, options=options)


def test_per_sample_keyword_contradicting_options_is_refused():
    with pytest.raises(ValueError, match=r"throw=True contradicts options\['throw'\]=False"):
        odeint_per_sample(square, _y0(2, 1), T, options={"throw": False}, throw=True)
    with pytest.raises(TypeError, match="throw must be True or False"):
        odeint_per_sample(square, _y0(2, 1), T, throw="no")


# -- events -------------------------------------------------------------------------------------------


def test_event_solve_that_fails_returns_what_it_reached():
    """No event before the blow-up: the event time is the time reached and the state there."""
    stats = SolveStats()
    t2 = torch.tensor([0.0, 5.0], dtype=F64)
    event_t, sol = odeint(
        square, _y0(), t2, event_fn=lambda t, y: y[0] + 1.0, options={"throw": False}, stats=stats
    )
    assert stats.status == "underflow" and float(event_t) == stats.t_reached
    assert 0.999 < stats.t_reached < 1.001 and torch.isfinite(sol).all()
    assert (sol[-1] > 1e6).all()  # y = 1/(1 − t) just before the blow-up
    with pytest.raises(SolverError, match="no event before the solve stopped"):
        odeint(square, _y0(), t2, event_fn=lambda t, y: y[0] + 1.0)
    # An event before the failure is found as usual.
    event_t, sol = odeint(
        square, _y0(), t2, event_fn=lambda t, y: y[0] - 2.0, options={"throw": False}, stats=stats
    )
    assert stats.status == "success"
    torch.testing.assert_close(event_t, torch.tensor(0.5, dtype=F64), rtol=1e-6, atol=0)


# -- the composition block: every method, mode, execution and gradient on a problem that fails -----------

_FAIL_FAST = set(failure_cells(everything=False))
_FAIL_CELLS = [
    pytest.param(c, id=c.id, marks=() if c in _FAIL_FAST else pytest.mark.slow)
    for c in failure_cells(everything=True)
]


@pytest.mark.parametrize("cell", _FAIL_CELLS)
def test_failure_cell(cell: FailureCell) -> None:
    """Every method, mode, execution and gradient method (the slow marker runs the compiled ones and
    the rest of the per-sample/gradient cells of the other methods)."""
    kind, detail = failure_outcome(cell)
    assert kind != "WRONG", f"{cell.id}: {detail}"
    assert kind == "ok" or says_what_to_do(detail), detail


def test_event_search_out_of_steps_and_per_sample_events():
    stats = SolveStats()
    t2 = torch.tensor([0.0, 5.0], dtype=F64)
    never = lambda t, y: y[0] + 1.0  # noqa: E731 (y stays positive)
    event_t, sol = odeint(
        square, _y0(), t2, **TOL, event_fn=never, options={"throw": False, "max_num_steps": 20}, stats=stats
    )
    assert stats.status == "no_event" and float(event_t) == stats.t_reached < 1.0
    with pytest.raises(SolverError) as err:
        odeint(square, _y0(), t2, **TOL, event_fn=never, options={"max_num_steps": 20})
    assert err.value.reason == "no_event"
    event_t, sol = odeint(
        lambda t, y: -y, _y0(), t2, method="rk4", event_fn=never,
        options={"throw": False, "step_size": 0.5, "max_num_steps": 10}, stats=stats,
    )  # fmt: skip
    assert stats.status == "no_event" and stats.t_reached == float(event_t) == 5.0
    torch.testing.assert_close(
        sol[-1], odeint(lambda t, y: -y, _y0(), t2, method="rk4", options={"step_size": 0.5})[-1]
    )
    with pytest.raises(ValueError, match=r"options\['throw'\]=False is not supported with per-sample events"):
        odeint(
            square,
            _y0(2, 1),
            t2,
            event_fn=lambda t, y: y[:, 0] - 2,
            options={"per_sample": True, "throw": False},
        )
