"""``torch.func.vmap`` over ``odeint`` against the Python loop over parameter sets.

Van der Pol oscillators ``x'' = μ(1 − x²)x' − x`` with ``μ = linspace(0.2, 10, B)`` (B = 64), ``y0 = (2, 0)``,
``t ∈ [0, 10]`` (11 outputs), float64: ``vmap(lambda mu: odeint(f_mu, y0, t))(mus)`` against
``torch.stack([odeint(f_mu, y0, t) for mu in mus])``, for dopri5 at rtol 1e-6 / atol 1e-8 (under ``vmap``
each problem takes its own steps, so the two agree to rounding) and rk4 at step 0.05. Reported: the
largest difference, median wall and CPU time of forward solves and of forward + backward (gradient
with respect to all μ), interleaved, at one thread.

    python benchmarks/bench_func.py [--batch 64] [--repeats 3] [--json out.json]   # ~2-3 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.func import vmap

from neuralode import odeint

F64 = torch.float64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled NeuralODE")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mus = torch.linspace(0.2, 10.0, args.batch, dtype=F64)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0.0, 10.0, 11, dtype=F64)
    setups = {
        "dopri5": {"method": "dopri5", "rtol": 1e-6, "atol": 1e-8},
        "rk4": {"method": "rk4", "options": {"step_size": 0.05}},
    }
    results = {}
    for name, kw in setups.items():

        def solve(mu, kw=kw):
            def f(s, y):
                return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

            return odeint(f, y0, t, **kw)

        def batched(m, solve=solve):
            return vmap(solve)(m)

        def loop(m, solve=solve):
            return torch.stack([solve(mu) for mu in m.unbind()])

        def with_grad(fn):
            def run():
                m = mus.clone().requires_grad_(True)
                (fn(m) ** 2).sum().backward()
                return m.grad

            return run

        with torch.no_grad():
            diff = float((batched(mus) - loop(mus)).abs().max())
        grad_diff = float((with_grad(batched)() - with_grad(loop)()).abs().max())
        fns = {
            "vmap": lambda b=batched: b(mus),
            "loop": lambda lo=loop: lo(mus),
            "vmap fwd+bwd": with_grad(batched),
            "loop fwd+bwd": with_grad(loop),
        }
        wall = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        names = list(fns)
        for r in range(args.repeats):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                if k.endswith("bwd"):
                    fns[k]()
                else:
                    with torch.no_grad():
                        fns[k]()
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
        results[name] = {
            "max_abs_diff": diff,
            "grad_max_abs_diff": grad_diff,
            **{f"{k} wall_s": statistics.median(v) for k, v in wall.items()},
            **{f"{k} cpu_s": statistics.median(v) for k, v in cpu.items()},
        }
    print(f"Van der Pol, B={args.batch} parameter sets, float64, one thread, medians of {args.repeats}\n")
    print(
        "| method | max diff | grad max diff | vmap ms | loop ms | speed-up | vmap fwd+bwd ms | loop fwd+bwd ms | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        v, lo = r["vmap cpu_s"], r["loop cpu_s"]
        vb, lb = r["vmap fwd+bwd cpu_s"], r["loop fwd+bwd cpu_s"]
        print(
            f"| {name} | {r['max_abs_diff']:.1e} | {r['grad_max_abs_diff']:.1e} | {1e3 * v:.0f} | {1e3 * lo:.0f} | "
            f"{lo / v:.1f}x | {1e3 * vb:.0f} | {1e3 * lb:.0f} | {lb / vb:.1f}x |"
        )
    print("\n(process CPU time; wall time in the JSON)")
    if not args.no_compile:
        results["compiled NeuralODE"] = compiled_neural_ode(args.repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


def compiled_neural_ode(repeats: int) -> dict:
    """A fixed-step NeuralODE (rk4, step 0.05 over [0, 1], tanh MLP 2-64-64-2, batch 64, float32): eager,
    ``torch.compile(fullgraph=True)`` (Inductor) and ``torch.export`` (its module, not compiled further)."""
    from neuralode import NeuralODE

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(2, 64),
                torch.nn.Tanh(),
                torch.nn.Linear(64, 64),
                torch.nn.Tanh(),
                torch.nn.Linear(64, 2),
            )

        def forward(self, t, y):
            return self.net(y)

    torch.manual_seed(0)
    model = NeuralODE(Field(), t=torch.linspace(0, 1, 5), method="rk4", options={"step_size": 0.05})
    y0 = torch.randn(64, 2)
    out = {}
    with torch.no_grad():
        ref = model(y0)
        w0 = time.perf_counter()
        compiled = torch.compile(model, fullgraph=True)
        diff_c = float((compiled(y0) - ref).abs().max())
        out["compile first call s"] = time.perf_counter() - w0
        w0 = time.perf_counter()
        exported = torch.export.export(model, (y0,)).module()
        diff_e = float((exported(y0) - ref).abs().max())
        out["export s"] = time.perf_counter() - w0
        fns = {"eager": lambda: model(y0), "compiled": lambda: compiled(y0), "exported": lambda: exported(y0)}
        cpu = {k: [] for k in fns}
        names = list(fns)
        for r in range(repeats * 4):
            for k in names[r % 3 :] + names[: r % 3]:
                c0 = time.process_time()
                for _ in range(10):
                    fns[k]()
                cpu[k].append((time.process_time() - c0) / 10)
    out.update({f"{k} ms": 1e3 * statistics.median(v) for k, v in cpu.items()})
    out.update({"compiled max diff": diff_c, "exported max diff": diff_e})
    print("\nFixed-step NeuralODE (rk4, 20 steps, MLP 2-64-64-2, batch 64, float32), CPU ms per forward:")
    print("| eager | compiled (fullgraph) | exported | compile first call s | max diff compiled / exported |")
    print("|---|---|---|---|---|")
    print(
        f"| {out['eager ms']:.2f} | {out['compiled ms']:.2f} | {out['exported ms']:.2f} | "
        f"{out['compile first call s']:.0f} | {diff_c:.1e} / {diff_e:.1e} |"
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
