"""Compiled fixed-grid solves (``FixedGridSolver``): equal to eager ``odeint`` within rounding.

The fast tests compile with ``backend="aot_eager"`` (dynamo capture + AOTAutograd, no code generation:
seconds). Inductor's C++ code generation takes about a minute on a 2-core CPU, so that test is ``slow``.
"""

import pytest
import torch

from neuralode import FixedGridSolver, odeint, record_stats


class Field(torch.nn.Module):
    def __init__(self, d=2, w=16, dtype=torch.float32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, d)).to(
            dtype
        )

    def forward(self, t, y):
        return self.net(y) * (1 + 0.1 * t)


def _grads(out, module):
    return torch.autograd.grad(out.square().sum(), list(module.parameters()))


@pytest.mark.parametrize(
    ("t", "step_size"),
    [
        (torch.linspace(0.0, 1.0, 5), 0.07),
        (torch.tensor([1.0, 0.3, -0.5]), 0.1),
        (torch.linspace(0.0, 0.5, 6), None),
    ],
)
def test_eager_mode_is_odeint(t, step_size):
    f = Field()
    y0 = torch.randn(8, 2)
    opts = None if step_size is None else {"step_size": step_size}
    ref = odeint(f, y0, t, method="rk4", options=opts)
    out = FixedGridSolver(f, t, method="rk4", step_size=step_size, mode="eager")(y0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rk4", "midpoint"])
def test_compiled_step_equals_eager_values_and_gradients(method):
    torch._dynamo.reset()
    f = Field()
    y0 = torch.randn(8, 2)
    t = torch.tensor([0.0, 0.33, 1.0])
    ref = odeint(f, y0, t, method=method, options={"step_size": 0.1})
    solver = FixedGridSolver(
        f, t, method=method, step_size=0.1, mode="compile", compile_options={"backend": "aot_eager"}
    )
    with record_stats() as st:
        out = solver(y0)
    assert solver.compile_time_s is not None and solver.compile_time_s > 0
    assert st.nfe == solver.tab.stages * solver.n_steps
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(_grads(out, f), _grads(ref, f)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    out2 = solver(y0 * 2)  # second call: no recompilation needed, still right
    torch.testing.assert_close(out2, odeint(f, y0 * 2, t, method=method, options={"step_size": 0.1}))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_compiled_step_equals_eager_float64():
    torch._dynamo.reset()
    f = Field(dtype=torch.float64)
    y0 = torch.randn(32, 2, dtype=torch.float64)
    t = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)
    solver = FixedGridSolver(f, t, method="rk4", step_size=0.05, mode="compile")
    out = solver(y0)
    ref = odeint(f, y0, t, method="rk4", options={"step_size": 0.05})
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_equals_eager(compiled):
    torch._dynamo.reset()
    f = Field().cuda()
    y0 = torch.randn(64, 2, device="cuda")
    t = torch.linspace(0.0, 1.0, 4, device="cuda")
    ref = odeint(f, y0, t, method="rk4", options={"step_size": 0.05})
    solver = FixedGridSolver(f, t, method="rk4", step_size=0.05, mode="cuda_graph", compile=compiled)
    out = solver(y0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    y0b = torch.randn(64, 2, device="cuda")
    torch.testing.assert_close(solver(y0b), odeint(f, y0b, t, method="rk4", options={"step_size": 0.05}))
    assert not out.requires_grad


def test_cuda_graph_needs_cuda():
    solver = FixedGridSolver(Field(), torch.tensor([0.0, 1.0]), mode="cuda_graph", step_size=0.5)
    with pytest.raises(ValueError, match="CUDA"):
        solver(torch.randn(2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "dopri5"}, "fixed-step"),
        ({"mode": "jit"}, "mode"),
        ({"step_size": -0.1}, "step_size"),
        ({"t": torch.tensor([0.0, 1.0, 0.5])}, "strictly"),
        ({"t": torch.tensor([0.0])}, "at least 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"t": torch.tensor([0.0, 1.0])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FixedGridSolver(Field(), args.pop("t"), **args)
