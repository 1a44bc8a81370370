"""``odeint_adjoint(..., adjoint_options={"compile": ...})``: the backward evaluation as one compiled graph.

The gradients must equal the eager adjoint's to float64 rounding (same steps: the backward dynamics are
the same function) and direct backpropagation to the tolerance. The default suite compiles once, with
``backend="aot_eager"`` (dynamo traces ``torch.autograd.grad`` and AOTAutograd the product, no code
generation); the ``slow`` tests use Inductor across sensitivities, tuple states, ``t`` gradients, the
cache and ``NeuralODE``.
"""

import gc
import weakref

import pytest
import torch

from neuralode import NeuralODE, odeint, odeint_adjoint, record_stats
from neuralode._integrate.compiled_step import _CACHE

AOT = {"backend": "aot_eager"}
# Inductor's import warns about a deprecated torch.jit API it uses.
INDUCTOR_WARNING = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
TOL = dict(rtol=1e-9, atol=1e-11)


class Field(torch.nn.Module):
    """A small time-dependent field that counts its calls (an integer attribute changing every call)."""

    def __init__(self, d=2, w=8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, d)).double()
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y) * torch.cos(t)


class TupleField(torch.nn.Module):
    """``(x, v)`` states: a damped oscillator with a learned force."""

    def __init__(self):
        super().__init__()
        self.force = torch.nn.Linear(2, 2).double()

    def forward(self, t, state):
        x, v = state
        return v, self.force(x) - 0.1 * v


def _grads(func, y0, t, sensitivity, adjoint_options, adjoint=True):
    y0 = (
        tuple(y.clone().requires_grad_(True) for y in y0)
        if isinstance(y0, tuple)
        else y0.clone().requires_grad_(True)
    )
    kw = dict(sensitivity=sensitivity, adjoint_options=adjoint_options) if adjoint else {}
    solve = odeint_adjoint if adjoint else odeint
    out = solve(func, y0, t, **TOL, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum(
        (o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view_as(o)).square().sum() for o in outs
    )
    inputs = [*(y0 if isinstance(y0, tuple) else (y0,)), *func.parameters()]
    if t.requires_grad:
        inputs.append(t)
    return torch.autograd.grad(loss, inputs)


def _assert_equal_to_rounding(got, ref):
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)


def test_compiled_backward_equals_eager_adjoint_and_direct():
    torch.manual_seed(0)
    f = Field()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 4, dtype=torch.float64)
    semi = {"norm": "seminorm"}
    ref = _grads(f, y0, t, "interpolating", semi)
    got = _grads(f, y0, t, "interpolating", {**semi, "compile": AOT})
    _assert_equal_to_rounding(got, ref)
    for g, d in zip(got, _grads(f, y0, t, None, None, adjoint=False)):
        torch.testing.assert_close(g, d, rtol=1e-6, atol=1e-8)


W = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
# Module-level tensors read by a plain function (torch.compile guards no aliasing of an argument with them).
A = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
B = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)


def _field_of_globals(t, y):
    return torch.tanh(y @ A) @ B


def test_compiled_backward_other_adjoint_params_of_the_same_func():
    """A compiled evaluation cached for ``adjoint_params=(A,)`` must not serve ``(B,)`` (the same count, the
    same ``func``): its graph would differentiate ``A`` again."""
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for params in ((A,), (B,)):
        got, ref = (
            torch.autograd.grad(
                odeint_adjoint(_field_of_globals, y0, t, **TOL, adjoint_params=params, adjoint_options=o)
                .square()
                .sum(),
                params,
            )
            for o in ({"compile": AOT}, None)
        )
        _assert_equal_to_rounding(got, ref)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"adjoint_options": {"compile": "yes"}}, TypeError, "adjoint_options\\['compile'\\] must be a bool"),
        (
            {"adjoint_method": "kvaerno3", "adjoint_options": {"compile": True}},
            ValueError,
            "explicit Runge-Kutta adjoint_method, not 'kvaerno3'",
        ),
        (  # a non-leaf tensor
            {"adjoint_params": (W * 2,), "adjoint_options": {"compile": True}},
            ValueError,
            "needs leaf tensors in adjoint_params",
        ),
    ],
)
def test_compile_option_errors(kwargs, error, match):
    y0 = torch.randn(2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    params = kwargs.get("adjoint_params", (W,))
    with pytest.raises(error, match=match):
        odeint_adjoint(lambda t, y: y @ params[0], y0, t, **{"adjoint_params": params, **kwargs})


@pytest.mark.slow
@pytest.mark.filterwarnings(INDUCTOR_WARNING)
@pytest.mark.parametrize("sensitivity", ["backsolve", "interpolating", "quadrature"])
def test_inductor_every_sensitivity_with_t_gradients(sensitivity):
    torch.manual_seed(1)
    f = Field()
    y0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 1.5, 5, dtype=torch.float64).requires_grad_(True)
    ref = _grads(f, y0, t, sensitivity, None)
    calls = f.calls
    with record_stats() as stats:
        got = _grads(f, y0, t, sensitivity, {"compile": True})
    _assert_equal_to_rounding(got, ref)
    # the evaluations happened (dynamo replays the counter's increments) and were counted
    assert f.calls - calls == stats.nfe + stats.backward.nfe


@pytest.mark.slow
@pytest.mark.filterwarnings(INDUCTOR_WARNING)
def test_inductor_tuple_state_and_plain_function():
    torch.manual_seed(2)
    f = TupleField()
    y0 = (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    t = torch.linspace(0.0, 2.0, 3, dtype=torch.float64)
    for sensitivity in ("backsolve", "interpolating"):
        ref = _grads(f, y0, t, sensitivity, {"norm": "seminorm"})
        got = _grads(f, y0, t, sensitivity, {"norm": "seminorm", "compile": True})
        _assert_equal_to_rounding(got, ref)
    # a plain function with its tensors given as adjoint_params
    w = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(3, 2, dtype=torch.float64)
    res = []
    for opts in (None, {"compile": True}):
        out = odeint_adjoint(
            lambda t, y: torch.tanh(y @ w), x0, t, **TOL, adjoint_params=(w,), adjoint_options=opts
        )
        res.append(torch.autograd.grad(out.square().sum(), w))
    _assert_equal_to_rounding(res[1], res[0])


@pytest.mark.slow
@pytest.mark.filterwarnings(INDUCTOR_WARNING)
def test_inductor_cache_reuse_no_recompile_and_no_model_kept_alive():
    from torch._dynamo.utils import counters

    torch.manual_seed(3)
    f = Field()
    t = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    model = NeuralODE(
        f, t, **TOL, gradient="adjoint", sensitivity="interpolating", adjoint_options={"compile": True}
    )
    for i in range(3):
        y0 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        model(y0).square().sum().backward()
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # new values, times and states: no recompilation
    entries = [k for k in _CACHE.get(f, {}) if k[0] == "adjoint"]
    assert len(entries) == 2  # the evaluation, and its variant at the jumps
    ref_f = weakref.ref(f)
    del model, f
    gc.collect()
    assert ref_f() is None
