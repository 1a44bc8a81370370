"""``odeint(..., options={"compile": ...})``: each Runge-Kutta step as one compiled graph.

Checked against the eager loop: same steps, same solution to rounding, same gradients, with tuple states,
tensor tolerances, DOP853's two error estimates, fixed grids, events and ``jump_t`` steps. The fast tests compile with
``backend="aot_eager"`` (dynamo capture + AOTAutograd, no code generation); one ``slow`` test uses
Inductor.
"""

import gc
import math
import weakref

import pytest
import torch

from neuralode import SolveStats, odeint, odeint_adjoint
from neuralode._integrate.compiled_step import _CACHE

AOT = {"backend": "aot_eager"}


class Field(torch.nn.Module):
    def __init__(self, d=2, w=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, d)).double()

    def forward(self, t, y):
        return self.net(y) * (1 + 0.1 * t)


def _solve(f, y0, t, compile_opt, **kw):
    stats = SolveStats()
    opts = dict(kw.pop("options", {}))
    if compile_opt is not None:
        opts["compile"] = compile_opt
    out = odeint(f, y0, t, options=opts, stats=stats, **kw)
    return out, stats


@pytest.mark.parametrize(
    ("compile_opt", "tol"),
    [
        (AOT, 1e-12),
        pytest.param(
            True,
            1e-11,
            marks=[
                pytest.mark.slow,
                pytest.mark.filterwarnings(
                    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
                ),
            ],
            id="inductor",
        ),
    ],
)
def test_same_steps_and_solution_as_eager(compile_opt, tol):
    torch.manual_seed(0)
    f = Field()
    y0 = torch.randn(8, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 3.0, 7, dtype=torch.float64)
    with torch.no_grad():
        ref, s_ref = _solve(f, y0, t, None, rtol=1e-7, atol=1e-9)
        out, s = _solve(f, y0, t, compile_opt, rtol=1e-7, atol=1e-9)
    assert (s.nfe, s.n_accepted, s.n_rejected) == (s_ref.nfe, s_ref.n_accepted, s_ref.n_rejected)
    torch.testing.assert_close(out, ref, rtol=tol, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("dopri5", {}),
        ("euler", {"step_size": 0.03}),
        ("midpoint", {"step_size": 0.03}),
        ("rk4", {"step_size": 0.03}),
    ],
)
def test_backprop_solution_and_gradients_match_eager(method, options):
    # On a fixed grid the first stage of a non-FSAL step is evaluated inside the graph; outputs between
    # grid points are linear interpolations as in the eager loop.
    torch.manual_seed(1)
    f = Field()
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 4, dtype=torch.float64)
    results = []
    for opt in (None, AOT):
        out, stats = _solve(f, y0, t, opt, rtol=1e-6, atol=1e-8, method=method, options=options)
        results.append((out, torch.autograd.grad(out.square().sum(), [y0, *f.parameters()]), stats.nfe))
    (ref, g_ref, nfe_ref), (out, g, nfe) = results
    assert nfe == nfe_ref
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for x_ref, x in zip(g_ref, g):
        torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_tuple_state_tensor_tolerances_and_dopri8():
    def osc(t, s):
        x, v = s
        return v, -x

    y0 = (torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    rtol = (torch.full((3,), 1e-8, dtype=torch.float64), 1e-6)
    for method in ("dopri5", "dopri8", "bosh3"):
        ref, s_ref = _solve(osc, y0, t, None, rtol=rtol, atol=1e-9, method=method)
        out, s = _solve(osc, y0, t, AOT, rtol=rtol, atol=1e-9, method=method)
        assert s.nfe == s_ref.nfe, method
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert abs(float(out[0][-1, 0]) - math.cos(2.0)) < 1e-5


def test_events_and_jump_t_with_compile():
    # A jump at t=1: the step onto it evaluates the one-sided limit eagerly; the others are compiled.
    def f(t, y):
        return torch.where(t < 1.0, torch.ones_like(y), -torch.ones_like(y))

    y0 = torch.zeros(1, dtype=torch.float64)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    out, _ = _solve(f, y0, t, AOT, options={"jump_t": torch.tensor([1.0], dtype=torch.float64)})
    assert abs(float(out[-1, 0])) < 1e-10  # up 1 and back down 1

    def g(t, y):
        return -torch.ones_like(y)

    event_t, _ = odeint(
        g,
        torch.ones(1, dtype=torch.float64),
        torch.tensor([0.0, 5.0], dtype=torch.float64),
        event_fn=lambda t, y: y[0],
        options={"compile": AOT},
    )
    assert abs(float(event_t) - 1.0) < 1e-9


def test_adjoint_with_a_compiled_forward_solve():
    torch.manual_seed(2)
    f = Field()
    y0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    grads = []
    for opt in (None, AOT):
        opts = {} if opt is None else {"compile": opt}
        out = odeint_adjoint(f, y0, t, rtol=1e-8, atol=1e-10, options=opts)
        grads.append(torch.autograd.grad(out.square().sum(), list(f.parameters())))
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_bad_compile_option_values():
    f = Field()
    y0 = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(TypeError, match="options\\['compile'\\]"):
        odeint(f, y0, t, options={"compile": "yes"})
    with pytest.raises(ValueError, match="explicit Runge-Kutta methods, not 'explicit_adams'"):
        odeint(f, y0, t, method="explicit_adams", options={"compile": True})
    with pytest.raises(ValueError, match="interp='linear'"):
        odeint(f, y0, t, method="rk4", options={"compile": True, "interp": "cubic"})
    out = odeint(f, y0, t, options={"compile": False})  # off: the eager loop
    torch.testing.assert_close(out, odeint(f, y0, t))


def test_cache_reuses_the_step_and_does_not_keep_the_model_alive():
    torch.manual_seed(3)
    f = Field()
    y0 = torch.randn(2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        odeint(f, y0, t, options={"compile": AOT})
        (step,) = _CACHE[f].values()
        odeint(f, y0, t, options={"compile": AOT})
        assert list(_CACHE[f].values()) == [step]
        # A bound method is cached on its instance, not on the short-lived method object.
        odeint(f.forward, y0, t, options={"compile": AOT})
        assert len(_CACHE[f]) == 2
    ref = weakref.ref(f)
    del f, step
    gc.collect()
    assert ref() is None


def test_a_new_lambda_per_solve_reuses_the_compiled_step():
    # odeint(lambda t, y: net(y), ...) inside a training loop: a new function object per solve, one trace.
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def train_like_loop():
        torch.manual_seed(6)
        f = Field()
        y0 = torch.randn(2, 2, dtype=torch.float64)
        t = torch.tensor([0.0, 1.0], dtype=torch.float64)
        opts = {"compile": {"backend": counting_backend}}
        with torch.no_grad():
            ref = odeint(f, y0, t)
            for _ in range(3):
                out = odeint(lambda t, y: f(t, y), y0, t, options=opts)
                torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        return weakref.ref(f)

    ref_f = train_like_loop()
    assert len(graphs) == 1
    gc.collect()
    assert ref_f() is None  # the cache's stand-in function let go of the closure after each solve


@pytest.mark.slow
def test_an_evaluation_counter_on_the_module_does_not_recompile():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    class Counted(Field):
        def __init__(self):
            super().__init__()
            self.nfe = 0

        def forward(self, t, y):
            self.nfe += 1
            return super().forward(t, y)

    torch.manual_seed(7)
    f = Counted()
    y0 = torch.randn(2, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(5):
            out, stats = _solve(f, y0, t, {"backend": counting_backend})
    # The first trace takes the counter as a constant; the second, after it changed, as a dynamic integer
    # (torch.compile's automatic dynamic); then no more. Without the setting: one trace per call.
    assert len(graphs) == 2
    assert f.nfe == 5 * stats.nfe
    torch.testing.assert_close(out, odeint(f, y0, t), rtol=1e-12, atol=1e-12)


class RowField(Field):
    def forward(self, t, y):  # t: (B,), one time per sample
        return self.net(y) * (1 + 0.1 * t.unsqueeze(1))


@pytest.mark.parametrize(
    ("method", "rtol", "atol"),
    [
        ("dopri5", 1e-6, 1e-8),
        pytest.param("bosh3", 1e-5, 1e-7, marks=pytest.mark.slow),
        pytest.param("dopri8", 1e-7, 1e-9, marks=pytest.mark.slow),
        pytest.param("dopri5", "tensor", 1e-8, marks=pytest.mark.slow),
    ],
)
def test_per_sample_compiled_matches_eager_per_sample(method, rtol, atol):
    # Per-sample stepping with the compiled step: same steps per sample, same values, same gradients.
    torch.manual_seed(0)
    f = RowField()
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    if rtol == "tensor":  # per-sample tolerances
        rtol = torch.tensor([[1e-4], [1e-5], [1e-6], [1e-7]], dtype=torch.float64)
    t = torch.linspace(0.0, 2.0, 5, dtype=torch.float64)
    out = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": AOT})):
        stats = SolveStats()
        ys = odeint(
            f, y0, t, rtol=rtol, atol=atol, method=method, options={"per_sample": True, **extra}, stats=stats
        )
        grads = torch.autograd.grad(ys.square().sum(), (y0, *f.parameters()))
        out[name] = (ys, grads, stats.n_steps, stats.nfe)
    (ye, ge, se, ne), (yc, gc_, sc, nc) = out["eager"], out["compiled"]
    assert any(key[-1] is not None for key in _CACHE[f])  # the per-sample compiled step ran
    assert (se, ne) == (sc, nc)
    torch.testing.assert_close(yc, ye, rtol=1e-10, atol=1e-12)
    for a, b in zip(gc_, ge):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
