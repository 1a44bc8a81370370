"""Regression tests for wrong behaviours found by running torchdiffeq users' programs against neuralode:
perturbed fixed grids, bad option values, unbounded fixed grids, LSODA step limits, import cycles."""

import ast
import math
import pathlib

import pytest
import torch

import neuralode
from neuralode import FixedGridSolver, SolveStats, odeint, odeint_per_sample
from neuralode._problem import method_options
from neuralode._solvers.explicit import ADAPTIVE_METHODS

F64 = torch.float64
T01 = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
GRID = {0.0, 0.25, 0.5, 0.75, 1.0}  # step_size 0.25 on [0, 1]


class Counting(torch.nn.Module):
    """``y' = -y + [t >= 0.5]`` (a jump at a grid point) that records every time it is called at."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def forward(self, t, y):
        self.times.append(float(t))
        return -y + (t >= 0.5).to(y.dtype)


def _solve(method, options, **kw):
    func, stats = Counting(), SolveStats()
    ys = odeint(func, torch.ones(2, dtype=F64), T01, method=method, options=options, stats=stats, **kw)
    return func, stats, ys


PERTURB_METHODS = [m for m in neuralode.SOLVERS if "perturb" in method_options(m)[0]]


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")  # the jump, for implicit Adams
@pytest.mark.parametrize("method", PERTURB_METHODS)
def test_perturb_never_evaluates_at_a_grid_point(method):
    func, stats, ys = _solve(method, {"step_size": 0.25, "perturb": True})
    assert not GRID & set(func.times), sorted(GRID & set(func.times))
    assert len(func.times) == stats.nfe  # no call that the counters do not know of (no extra check call)
    assert bool(torch.isfinite(ys).all())


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_perturb_with_time_gradients_stays_off_the_grid(method):
    t = T01.clone().requires_grad_(True)
    func, stats = Counting(), SolveStats()
    ys = odeint(
        func,
        torch.ones(2, dtype=F64),
        t,
        method=method,
        options={"step_size": 0.25, "perturb": True},
        stats=stats,
    )
    ys.sum().backward()
    assert not GRID & set(func.times)
    assert t.grad is not None and bool(torch.isfinite(t.grad).all())


def test_perturb_first_step_takes_the_limit_from_inside():
    # y' = [t >= 0] - [t <= 0]... evaluated at t0 = 0 exactly would give 0; from the right it is 1.
    def sign(t, y):
        return torch.sign(t) * torch.ones_like(y)

    ys = odeint(
        sign,
        torch.zeros(1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        method="euler",
        options={"perturb": True},
    )
    assert float(ys[-1]) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", [m for m in neuralode.SOLVERS if m != "scipy_solver"])
def test_calls_of_func_equal_the_reported_evaluations(method):
    options = {"step_size": 0.25} if "step_size" in method_options(method)[0] else None
    func, stats, _ = _solve(method, options, rtol=1e-4, atol=1e-6)
    # A Jacobian (the stiff solvers') is one call of func too, counted apart as n_jac.
    assert len(func.times) == stats.nfe + stats.n_jac
    if method in ADAPTIVE_METHODS:  # the builder's check evaluation is the first stage: nothing before it
        assert func.times[0] == 0.0 and func.times[1] != 0.0


def test_calls_of_func_equal_the_reported_evaluations_scipy():
    pytest.importorskip("scipy")
    func, stats, _ = _solve("scipy_solver", None, rtol=1e-4, atol=1e-6)
    assert len(func.times) == stats.nfe


# -- bad input ----------------------------------------------------------------------------------------

Y0 = torch.ones(2, dtype=F64)


def f(t, y):
    return -y


@pytest.mark.parametrize(
    "method, options, exc, match",
    [
        ("dopri5", {"first_step": "x"}, TypeError, r"options\['first_step'\] must be a number, got str"),
        (
            "dopri5",
            {"min_step": 0.5, "max_step": 0.1},
            ValueError,
            r"options\['min_step'\]=0.5 is larger than",
        ),
        ("dopri5", {"max_step": 0}, ValueError, r"options\['max_step'\] must be positive, got 0"),
        ("dopri5", {"max_step": -1.0}, ValueError, r"options\['max_step'\] must be positive"),
        ("dopri5", {"min_step": -1.0}, ValueError, r"options\['min_step'\] must be >= 0"),
        ("dopri5", {"safety": "0.9"}, TypeError, r"options\['safety'\] must be a number"),
        ("rk4", {"step_size": "0.1"}, TypeError, r"options\['step_size'\] must be a number, got str"),
        ("rk4", {"step_size": 0.0}, ValueError, r"options\['step_size'\] must be positive"),
        ("rk4", {"grid_constructor": 3}, TypeError, r"options\['grid_constructor'\] must be callable"),
        ("explicit_adams", {"step_size": "0.1"}, TypeError, r"options\['step_size'\] must be a number"),
    ],
)
def test_bad_option_values_name_the_option(method, options, exc, match):
    with pytest.raises(exc, match=match):
        odeint(f, Y0, T01, method=method, options=options)


def test_bad_option_values_per_sample():
    y0 = torch.ones(3, 1, dtype=F64)
    with pytest.raises(TypeError, match=r"options\['first_step'\] must be a number"):
        odeint_per_sample(f, y0, T01, options={"first_step": "x"})
    with pytest.raises(ValueError, match=r"options\['min_step'\]=0.5 is larger than"):
        odeint_per_sample(f, y0, T01, options={"min_step": 0.5, "max_step": 0.1})
    with pytest.raises(ValueError, match=r"options\['max_step'\] must be positive"):
        odeint(f, y0, T01, options={"per_sample": True, "max_step": 0})


def test_fixed_grid_solver_step_size_is_checked():
    with pytest.raises(TypeError, match=r"FixedGridSolver\['step_size'\] must be a number, got str"):
        FixedGridSolver(f, T01, step_size="0.1", mode="eager")
    with pytest.raises(ValueError, match="t needs at least 2 times"):
        FixedGridSolver(f, T01[:1], mode="eager")


@pytest.mark.parametrize(
    "call",
    [
        lambda y0: odeint(f, y0, T01),
        lambda y0: neuralode.odeint_checkpoint(f, y0, T01, params=()),
        lambda y0: neuralode.odeint_adjoint(f, y0, T01, adjoint_params=()),
        lambda y0: odeint_per_sample(f, y0, T01),
        lambda y0: neuralode.odeint_event(f, y0, T01[0], event_fn=lambda t, y: y - 0.5),
    ],
    ids=["odeint", "checkpoint", "adjoint", "per_sample", "event"],
)
def test_python_float_y0_is_a_type_error(call):
    # torchdiffeq 0.2.5 refuses it too (an AssertionError: "y0 must be either a torch.Tensor or a tuple").
    with pytest.raises(TypeError, match=r"y0 must be a tensor.*got float; wrap a number as torch.tensor"):
        call(1.0)


# -- NaN produced mid-solve -----------------------------------------------------------------------------

STIFF = {
    "kvaerno3",
    "kvaerno4",
    "kvaerno5",
}  # their driver reports NaN as step-size underflow (not checked here)


def nan_after_half(t, y):
    return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)


@pytest.mark.filterwarnings("ignore:Functional iteration did not converge")
@pytest.mark.parametrize("method", [m for m in neuralode.SOLVERS if m not in STIFF])
def test_nan_mid_solve_is_a_nonfinite_error(method):
    if method == "scipy_solver":
        pytest.importorskip("scipy")
    options = {"step_size": 0.1} if "step_size" in method_options(method)[0] else None
    with pytest.raises(neuralode.SolverError, match="NaN") as err:
        odeint(nan_after_half, Y0, T01, method=method, options=options)
    assert err.value.reason == "nonfinite"
    assert 0.5 <= err.value.t <= 1.0
    if method in ADAPTIVE_METHODS:  # where func broke down, not a step-size underflow
        assert "func returned NaN" in str(err.value) and err.value.t == pytest.approx(0.5)


# -- fixed grids have a cap ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rk4", "explicit_adams", "implicit_euler"])
def test_a_huge_fixed_grid_is_refused_before_it_is_built(method):
    func = Counting()
    with pytest.raises(
        ValueError, match=r"makes 1000000000000 grid steps .* more than max_num_steps=1000000"
    ):
        odeint(func, Y0, torch.tensor([0.0, 1.0], dtype=F64), method=method, options={"step_size": 1e-12})
    assert func.times == []  # refused before any work


def test_fixed_grid_cap_can_be_raised_and_lowered():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match="more than max_num_steps=5"):
        odeint(f, Y0, t, method="euler", options={"step_size": 0.1, "max_num_steps": 5})
    ys = odeint(f, Y0, t, method="euler", options={"step_size": 0.1, "max_num_steps": 10})
    assert float(ys[-1, 0]) == pytest.approx(0.9**10)
    with pytest.raises(ValueError, match="more than max_num_steps"):
        FixedGridSolver(f, t, step_size=1e-12, mode="eager")


# -- scipy_solver's LSODA with step limits ------------------------------------------------------------


@pytest.mark.parametrize("limits", [(1e-6, 0.5), (0.01, 0.1), (0.0, 1.0)])
def test_scipy_lsoda_with_min_and_max_step(limits):
    pytest.importorskip("scipy")
    lo, hi = limits
    t = torch.linspace(0, 10, 5, dtype=F64)
    ys = odeint(f, Y0, t, method="scipy_solver", options={"solver": "LSODA", "min_step": lo, "max_step": hi})
    assert torch.allclose(ys, torch.exp(-t)[:, None].expand(5, 2), rtol=1e-4, atol=1e-6)


# -- no import cycles among the private modules --------------------------------------------------------

SRC = pathlib.Path(neuralode.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _private_imports(path: pathlib.Path) -> set[str]:
    """The private ``neuralode._x[.y]`` modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("neuralode._"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)  # submodules imported by name
            elif node.module == "neuralode":
                out.update(f"neuralode.{a.name}" for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("neuralode._"))
    return out


def test_private_modules_import_no_cycle():
    files = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0].startswith("_")]
    names = {"neuralode", "neuralode.__main__"}
    graph = {_module_name(p): _private_imports(p) for p in files if _module_name(p) not in names}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    assert "neuralode._solvers.rk" in graph and len(graph) > 20
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = [*path[path.index(d) :], d]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_grid_arithmetic_is_unchanged():
    from neuralode._problem import fixed_grid

    assert fixed_grid([0.0, 1.0], 0.3) == [0.0, 0.3, 0.6, 0.8999999999999999, 1.0]
    assert fixed_grid([1.0, 0.0], 0.5) == [1.0, 0.5, 0.0]
    assert fixed_grid([0.0, 0.5, 1.0], None) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("explicit_adams", {"max_order": 0}, r"options\['max_order'\] must be a positive int"),
        ("implicit_adams", {"max_iters": 0}, r"options\['max_iters'\] must be a positive int"),
        ("implicit_euler", {"nonlinear_solver": "x"}, r"options\['nonlinear_solver'\]='x'"),
        ("gl4", {"nonlinear_tol": -1.0}, r"options\['nonlinear_tol'\] must be positive"),
        ("scipy_solver", {"solver": "X"}, r"options\['solver'\]='X'"),
    ],
)
def test_method_options_are_checked_before_func_is_called(method, options, match):
    func = Counting()
    with pytest.raises(ValueError, match=match):
        odeint(func, Y0, T01, method=method, options=options)
    assert func.times == []


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_nonfinite_first_derivative_is_a_solver_error_not_a_division_by_zero(method):
    # A diverged model can return inf at t0; the starting-step heuristic divided by a zero first step.
    y0 = torch.ones(3, dtype=torch.float64)
    with pytest.raises(neuralode.SolverError) as info:
        neuralode.odeint(lambda t, y: y * math.inf, y0, torch.tensor([0.0, 1.0]), method=method)
    assert info.value.reason == "nonfinite"
