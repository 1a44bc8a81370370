"""Eager vs compiled fixed-grid solves: time per solve after warm-up, and the compile time.

MLP 2→64→64→2 (tanh) vector field, rk4 with step 0.05 on t ∈ [0, 1] (20 steps, 80 evaluations), float32,
batch 1, 64, 1024. Modes, interleaved in one process:

* ``odeint``: neuralode's eager loop (``method="rk4", options={"step_size": 0.05}``).
* ``torchdiffeq``: the same grid in torchdiffeq.
* ``odeint compile``: ``odeint(..., options={"step_size": h, "compile": True})``: the same loop with each
  step one Inductor graph.
* ``compile``: :class:`neuralode.FixedGridSolver` with the RK step compiled by ``torch.compile``
  (Inductor); its first call's wall time is reported as the compile time.
* CUDA only: ``cuda_graph`` (the whole solve captured in one CUDA graph and replayed) and
  ``cuda_graph+compile``.

``--grad`` times forward + backward (a training step's solve) instead of ``no_grad`` solves (CUDA-graph
modes are inference only and are skipped then).

    python benchmarks/bench_compiled.py                 # CPU, ~2-4 min (Inductor compiles per batch size)
    python benchmarks/bench_compiled.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import neuralode
from bench_solvers import MLP  # the same 2-64-64-2 tanh field as the solver benchmark

try:
    import torchdiffeq
except ImportError:  # pragma: no cover
    torchdiffeq = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,64,1024")
    p.add_argument("--step", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grad", action="store_true", help="time forward+backward instead of no_grad solves")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = torch.tensor([0.0, 1.0], device=device)
    all_rows = []
    print(f"rk4, step {args.step}, t in [0, 1], float32, MLP 2-64-64-2, {device}, grad={args.grad}\n")
    print(
        "| batch | mode | compile/first call s | wall ms/solve | CPU ms/solve | × vs odeint | max diff vs odeint |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        torch.manual_seed(0)
        torch._dynamo.reset()
        f = MLP(2, 64).to(device)
        y0 = torch.randn(batch, 2, device=device)
        opts = {"step_size": args.step}
        modes = {"odeint": lambda f=f, y0=y0, o=opts: neuralode.odeint(f, y0, t, method="rk4", options=o)}
        if torchdiffeq is not None:
            modes["torchdiffeq"] = lambda f=f, y0=y0, o=opts: torchdiffeq.odeint(
                f, y0, t, method="rk4", options=o
            )
        opts_c = {**opts, "compile": True}
        modes["odeint compile"] = lambda f=f, y0=y0, o=opts_c: neuralode.odeint(
            f, y0, t, method="rk4", options=o
        )
        solvers = {
            "compile": neuralode.FixedGridSolver(f, t, method="rk4", step_size=args.step, mode="compile")
        }
        if device.type == "cuda" and not args.grad:
            solvers["cuda_graph"] = neuralode.FixedGridSolver(
                f, t, method="rk4", step_size=args.step, mode="cuda_graph"
            )
            solvers["cuda_graph+compile"] = neuralode.FixedGridSolver(
                f, t, method="rk4", step_size=args.step, mode="cuda_graph", compile=True
            )
        for name, s in solvers.items():
            modes[name] = lambda s=s, y0=y0: s(y0)
        ctx = torch.enable_grad if args.grad else torch.no_grad
        first, times, diffs = {}, {name: [] for name in modes}, {}
        cpu = {name: [] for name in modes}
        with ctx():
            ref = modes["odeint"]()
            for name, fn in modes.items():
                w0 = time.perf_counter()
                out = fn()
                sync()
                first[name] = time.perf_counter() - w0
                diffs[name] = float((out - ref).detach().abs().max())
            names = list(modes)
            for r in range(args.repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = modes[name]()
                    if args.grad:
                        out[-1].square().sum().backward()
                    sync()
                    times[name].append(time.perf_counter() - w0)
                    cpu[name].append(time.process_time() - c0)
        # The ratio uses CPU time on the CPU (robust to a loaded machine), wall time on CUDA.
        clock = cpu if device.type == "cpu" else times
        base = statistics.median(clock["odeint"])
        for name in names:
            med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
            ratio = base / statistics.median(clock[name])
            print(
                f"| {batch} | {name} | {first[name]:.2f} | {med * 1e3:.3f} | {med_cpu * 1e3:.3f} | {ratio:.2f} "
                f"| {diffs[name]:.1e} |",
                flush=True,
            )
            all_rows.append(
                {
                    "batch": batch,
                    "mode": name,
                    "first_s": first[name],
                    "wall_ms": med * 1e3,
                    "cpu_ms": med_cpu * 1e3,
                    "speedup_vs_odeint": ratio,
                    "max_diff": diffs[name],
                }
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": all_rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
