"""The per-sample adjoint's one backward solve across the output times (each row stops on its own output
times for the jump and carries its step size on): gradients against backpropagation through per-sample
``odeint`` and central finite differences (float64), and ``odeint_adjoint(options={"per_sample": True})``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralode
from neuralode import odeint, odeint_adjoint, odeint_checkpoint, odeint_per_sample, odeint_per_sample_adjoint
from test_gradients import _one_thread  # noqa: F401 (the autouse fixture)

DT = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


class RowField(nn.Module):
    """A tiny MLP whose rows are independent; ``t`` is ``(B,)``, so each row sees its own time."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(2, 5).to(DT)
        self.l2 = nn.Linear(5, 2).to(DT)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.5 * torch.sin(t)).unsqueeze(-1) - 0.2 * y


def _times(per_row: bool, B: int = 3) -> torch.Tensor:
    if per_row:  # different spans and lengths of the output intervals per row
        return torch.stack([torch.linspace(0.0, 1.5 + 0.5 * b, 5, dtype=DT) + 0.1 * b for b in range(B)])
    return torch.linspace(0.0, 2.0, 5, dtype=DT)


def _loss(solve, func, y0, t):
    ys = solve(func, y0, t, **TIGHT)
    w = torch.linspace(-1.0, 1.5, ys.numel(), dtype=DT).reshape(ys.shape)
    return (ys * w).sum()


@pytest.mark.parametrize("per_row", [False, True])
def test_gradients_match_direct_and_finite_differences(per_row):
    func = RowField()
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.5], [-0.3, 0.8]], dtype=DT, requires_grad=True)
    t = _times(per_row)
    params = list(func.parameters())
    g_adj = torch.autograd.grad(_loss(odeint_per_sample_adjoint, func, y0, t), [y0, *params])
    g_dir = torch.autograd.grad(_loss(odeint_per_sample, func, y0, t), [y0, *params])
    for ga, gd in zip(g_adj, g_dir):
        torch.testing.assert_close(ga, gd, rtol=1e-7, atol=1e-8)
    # Central differences in y0 and in one weight matrix, on the forward solve alone.
    eps = 1e-5
    with torch.no_grad():
        for x, g in ((y0, g_adj[0]), (func.l1.weight, g_adj[1])):
            for idx in [(0, 0), (1, 1), (2, 0)]:
                old = x[idx].item()
                x[idx] = old + eps
                up = _loss(odeint_per_sample, func, y0, t)
                x[idx] = old - eps
                down = _loss(odeint_per_sample, func, y0, t)
                x[idx] = old
                fd = (up - down) / (2 * eps)
                assert abs(float(g[idx]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


def test_one_backward_solve_across_output_times():
    func = RowField()
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.5], [-0.3, 0.8]], dtype=DT, requires_grad=True)
    t = _times(True)
    with neuralode.record_stats() as st:
        loss = _loss(odeint_per_sample_adjoint, func, y0, t)
        loss.backward()
    # The forward solve and one backward solve (reported as a forward solve), not one per output interval.
    assert st.n_solves == 2


def test_odeint_adjoint_per_sample_option_is_the_per_sample_adjoint():
    func = RowField()
    y0 = torch.tensor([[1.0, 0.0], [0.5, -0.5]], dtype=DT, requires_grad=True)
    t = _times(False)
    params = list(func.parameters())
    ya = odeint_adjoint(func, y0, t, options={"per_sample": True}, **TIGHT)
    yb = odeint_per_sample_adjoint(func, y0, t, **TIGHT)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    ga = torch.autograd.grad(ya.sum(), [y0, *params])
    gb = torch.autograd.grad(yb.sum(), [y0, *params])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # options={"per_sample": False} is the joint adjoint
    yj = odeint_adjoint(func, y0, t, options={"per_sample": False}, **TIGHT)
    torch.testing.assert_close(yj, odeint(func, y0, t, **TIGHT), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sensitivity="interpolating"), "sensitivity='backsolve' only"),
        (dict(checkpoints=3), "keeps no checkpoints"),
        (dict(adjoint_method="bosh3"), "drop adjoint_method"),
        (dict(adjoint_options={"max_num_steps": 5}), "takes no adjoint_options"),
    ],
)
def test_odeint_adjoint_per_sample_bad_arguments(kwargs, match):
    y0 = torch.ones(2, 2, dtype=DT)
    with pytest.raises(ValueError, match=match):
        odeint_adjoint(RowField(), y0, _times(False), options={"per_sample": True}, **kwargs)


def test_checkpoint_per_sample_is_a_clear_error():
    with pytest.raises(ValueError, match="per_sample"):
        odeint_checkpoint(RowField(), torch.ones(2, 2, dtype=DT), _times(False), options={"per_sample": True})


def test_second_order_gradients_are_a_clear_error():
    func = RowField()
    y0 = torch.ones(2, 2, dtype=DT, requires_grad=True)
    ys = odeint_per_sample_adjoint(func, y0, _times(False), rtol=1e-6, atol=1e-8)
    with pytest.raises(NotImplementedError, match="per-sample adjoint"):
        torch.autograd.grad(ys.sum(), list(func.parameters()), create_graph=True)
