"""Joint vs per-sample adaptive stepping on a batch of Van der Pol oscillators with varied μ
(or, with ``--field mlp``, Van der Pol plus a neural correction ``0.1 · MLP(y)``, tanh 2-64-64-2: the
same dynamics with an expensive ``func``).

One batch, ``μ = linspace(mu_min, mu_max, B)``, ``y0 = (2, 0)``, ``t ∈ [0, t1]``, dopri5. Compared in one
process, interleaved, at one thread:

* neuralode joint (``odeint``): one step size for the whole batch (RMS norm over all elements).
* neuralode per-sample (``odeint_per_sample``): each oscillator its own step size.
* torchode (per-sample, its only mode), and torchdiffeq (joint) for reference.

Printed per mode: steps per sample (mean / max; the joint mode takes the same number for every sample),
calls of ``func`` on the batch, median wall and CPU time, and the max error against a tight per-sample
reference (rtol 1e-10).

    python benchmarks/bench_per_sample.py                 # B=64, μ in [0.2, 10], float64 rtol 1e-6
    python benchmarks/bench_per_sample.py --dtype float32 --rtol 1e-3 --atol 1e-4
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import neuralode

try:
    import torchdiffeq
except ImportError:  # pragma: no cover
    torchdiffeq = None
try:
    import torchode
except ImportError:  # pragma: no cover
    torchode = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--mu-min", type=float, default=0.2)
    p.add_argument("--mu-max", type=float, default=10.0)
    p.add_argument("--t1", type=float, default=10.0)
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--field",
        choices=("vdp", "mlp"),
        default="vdp",
        help="Van der Pol, or Van der Pol + 0.1 MLP(y) (tanh 2-64-64-2)",
    )
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    B = args.batch
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 2),
    ).to(device)

    def build(dt):
        """The batch's vector field and start state in dtype ``dt``."""
        mu = torch.linspace(args.mu_min, args.mu_max, B, dtype=dt, device=device)
        if args.field == "vdp":

            def field(t, y):
                x, v = y[..., 0], y[..., 1]
                return torch.stack([v, mu * (1 - x * x) * v - x], -1)

            return field, torch.tensor([[2.0, 0.0]], dtype=dt, device=device).repeat(B, 1)
        net_dt = copy.deepcopy(net).to(dt)

        def field(t, y):  # Van der Pol plus a neural correction (a universal-differential-equation shape)
            x, v = y[..., 0], y[..., 1]
            return torch.stack([v, mu * (1 - x * x) * v - x], -1) + 0.1 * net_dt(y)

        return field, torch.tensor([[2.0, 0.0]], dtype=dt, device=device).repeat(B, 1)

    vdp, y0 = build(dtype)
    t = torch.tensor([0.0, args.t1], dtype=dtype, device=device)
    tol = {"rtol": args.rtol, "atol": args.atol}
    with torch.no_grad():
        field64, y064 = build(torch.float64)
        ref = neuralode.odeint_per_sample(field64, y064, t.double(), rtol=1e-10, atol=1e-12)[-1]

    counts: dict[str, dict] = {}

    def nd_joint():
        with neuralode.record_stats() as st:
            y = neuralode.odeint(vdp, y0, t, **tol)[-1]
        counts["neuralode joint"] = {"steps_mean": st.n_steps, "steps_max": st.n_steps, "batched_nfe": st.nfe}
        return y

    def nd_per_sample():
        ys, info = neuralode.odeint_per_sample(vdp, y0, t, return_info=True, **tol)
        counts["neuralode per-sample"] = {
            "steps_mean": float(info.n_steps.double().mean()),
            "steps_max": int(info.n_steps.max()),
            "batched_nfe": info.nfe,
        }
        return ys[-1]

    modes = {"neuralode joint": nd_joint, "neuralode per-sample": nd_per_sample}
    if torchode is not None:

        def to_solve():
            term = torchode.ODETerm(vdp)
            ctrl = torchode.IntegralController(atol=args.atol, rtol=args.rtol, term=term)
            solver = torchode.AutoDiffAdjoint(torchode.Dopri5(term=term), ctrl)
            sol = solver.solve(torchode.InitialValueProblem(y0=y0, t_eval=t.expand(B, -1)))
            steps = sol.stats["n_steps"]
            counts["torchode"] = {
                "steps_mean": float(steps.double().mean()),
                "steps_max": int(steps.max()),
                "batched_nfe": int(sol.stats["n_f_evals"].max()),
            }
            return sol.ys[:, -1]

        modes["torchode"] = to_solve
    if torchdiffeq is not None:

        def td_solve():
            n = [0]

            def counted(tt, y):
                n[0] += 1
                return vdp(tt, y)

            y = torchdiffeq.odeint(counted, y0, t, method="dopri5", **tol)[-1]
            counts["torchdiffeq joint"] = {"batched_nfe": n[0]}
            return y

        modes["torchdiffeq joint"] = td_solve
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {name: {"wall": [], "cpu": []} for name in modes}
    names = list(modes)
    with torch.no_grad():
        for name, fn in modes.items():  # warm-up and accuracy
            err = float((fn().double() - ref).abs().max())
            results[name]["max_err"] = err
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                modes[name]()
                sync()
                results[name]["wall"].append(time.perf_counter() - w0)
                results[name]["cpu"].append(time.process_time() - c0)
    print(
        f"{'Van der Pol' if args.field == 'vdp' else 'Van der Pol + 0.1 MLP(y)'}, B={B}, mu in [{args.mu_min}, {args.mu_max}], t in [0, {args.t1}], {args.dtype}, "
        f"rtol={args.rtol}, atol={args.atol}, dopri5, {args.device}, {args.repeats} repeats\n"
    )
    print("| mode | steps/sample mean | max | batched NFE | wall ms | CPU ms | max err vs ref |")
    print("|---|---|---|---|---|---|---|")
    out = {}
    for name in names:
        c, r = counts.get(name, {}), results[name]
        wall, cpu = statistics.median(r["wall"]) * 1e3, statistics.median(r["cpu"]) * 1e3
        sm, sx = c.get("steps_mean", "-"), c.get("steps_max", "-")
        sm = f"{sm:.1f}" if isinstance(sm, float) else sm
        print(
            f"| {name} | {sm} | {sx} | {c.get('batched_nfe', '-')} | {wall:.1f} | {cpu:.1f} | {r['max_err']:.1e} |"
        )
        out[name] = {**c, "wall_ms": wall, "cpu_ms": cpu, "max_err": r["max_err"]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": out}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
