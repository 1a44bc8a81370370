"""CUDA correctness of the core loop (skipped without a CUDA device; see benchmarks/gpu_check.sh)."""

import warnings

import pytest
import torch

from neuralode import odeint, record_stats

pytestmark = pytest.mark.gpu


def _field(device, dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    return net.to(device=device, dtype=dtype)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4"])
def test_cuda_solution_and_gradient_match_cpu(method):
    dtype = torch.float64
    opts = {"step_size": 0.05} if method == "rk4" else None
    results = {}
    for device in ("cpu", "cuda"):
        net = _field(device, dtype)
        y0 = torch.linspace(-1, 1, 24, dtype=dtype, device=device).reshape(8, 3).requires_grad_()
        t = torch.linspace(0, 2, 5, dtype=dtype, device=device)
        ys = odeint(lambda t, y, net=net: net(y), y0, t, rtol=1e-8, atol=1e-10, method=method, options=opts)
        g = torch.autograd.grad(ys.square().sum(), [y0, *net.parameters()])
        results[device] = (ys.detach().cpu(), [x.cpu() for x in g])
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-9, atol=1e-10)
    for a, b in zip(results["cuda"][1], results["cpu"][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_one_host_sync_per_adaptive_step():
    net = _field("cuda", torch.float32)
    y0 = torch.randn(64, 3, device="cuda")
    t = torch.tensor([0.0, 5.0], device="cuda")
    odeint(lambda t, y: net(y), y0, t, rtol=1e-4, atol=1e-6)  # warm-up
    with warnings.catch_warnings(record=True) as caught, record_stats() as st:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                odeint(lambda t, y: net(y), y0, t, rtol=1e-4, atol=1e-6)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # validation (y0 finite, t to host), the initial step (2), and one per step
    assert len(syncs) <= st.n_steps + 6, (len(syncs), st.n_steps)


def test_float32_state_float64_times_on_cuda():
    seen = []

    def f(t, y):
        seen.append((t.dtype, t.device.type))
        return -y

    y0 = torch.ones(4, device="cuda")
    ys = odeint(f, y0, torch.tensor([0.0, 1.0], device="cuda"), rtol=1e-6, atol=1e-8)
    assert ys.device.type == "cuda" and ys.dtype == torch.float32
    assert all(s == (torch.float32, "cuda") for s in seen)
    torch.testing.assert_close(ys[-1].cpu(), torch.full((4,), float(torch.exp(torch.tensor(-1.0)))))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cuda_compiled_adaptive_step_matches_eager(backend):
    dtype = torch.float64
    net = _field("cuda", dtype)
    y0 = torch.linspace(-1, 1, 24, dtype=dtype, device="cuda").reshape(8, 3).requires_grad_()
    t = torch.linspace(0, 2, 5, dtype=dtype, device="cuda")
    out = {}

    def f(t, y):
        return net(y)

    for opt in (None, {"backend": backend}):
        with record_stats() as stats:
            ys = odeint(f, y0, t, rtol=1e-8, atol=1e-10, options={"compile": opt})
        g = torch.autograd.grad(ys.square().sum(), [y0, *net.parameters()])
        out[opt is None] = (ys.detach(), g, stats.nfe)
    assert out[True][2] == out[False][2]
    torch.testing.assert_close(out[False][0], out[True][0], rtol=1e-10, atol=1e-11)
    for a, b in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_compiled_step_keeps_one_host_sync_per_step():
    net = _field("cuda", torch.float32)
    y0 = torch.randn(64, 3, device="cuda")
    t = torch.tensor([0.0, 5.0], device="cuda")

    def f(t, y):
        return net(y)

    opts = {"compile": {"backend": "aot_eager"}}
    with torch.no_grad():
        odeint(f, y0, t, rtol=1e-4, atol=1e-6, options=opts)  # compiles
    with warnings.catch_warnings(record=True) as caught, record_stats() as st:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                odeint(f, y0, t, rtol=1e-4, atol=1e-6, options=opts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= st.n_steps + 6, (len(syncs), st.n_steps)
