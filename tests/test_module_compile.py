"""A fixed-step ``NeuralODE`` under ``torch.compile(fullgraph=True)`` and ``torch.export``: one graph,
equal to the eager forward (and its gradients)."""

from __future__ import annotations

import pytest
import torch

from neuralode import NeuralODE


class _Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


FIXED_MODELS = [
    ("midpoint", None, [0.0, 0.5, 1.0]),
    ("euler", {"step_size": 0.07}, [1.0, 0.3, 0.0]),  # reverse time, outputs between grid points
    pytest.param("rk4", {"step_size": 0.1}, [0.0, 0.25, 0.5, 1.0], marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("method", "options", "t"), FIXED_MODELS)
def test_compile_fullgraph_equals_eager_with_gradients(method, options, t):
    torch._dynamo.reset()
    model = NeuralODE(_Field(), t=t, method=method, options=options)
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ys, ref = compiled(y0), model(y0)
    torch.testing.assert_close(ys, ref, rtol=0, atol=1e-6)
    g = torch.autograd.grad(ys.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("method", "options", "t"), FIXED_MODELS)
def test_export_equals_eager(method, options, t):
    model = NeuralODE(_Field(), t=t, method=method, options=options, only_last=True)
    y0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    exported = torch.export.export(model, (y0,))
    y1 = torch.randn(3, 2, generator=torch.Generator().manual_seed(3))  # another input, same shape
    torch.testing.assert_close(exported.module()(y1), model(y1), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_inductor_fullgraph_equals_eager():
    torch._dynamo.reset()
    model = NeuralODE(_Field(), t=[0.0, 0.5, 1.0], method="rk4", options={"step_size": 0.1})
    y0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(y0), model(y0), rtol=1e-5, atol=1e-6)
