"""Forward+backward time and peak memory of the gradient methods, against torchdiffeq and torchode.

Each configuration runs in a fresh subprocess (so peak memory is its own), at one thread:

1. a warm-up forward+backward on a 1-step version of the problem (loads kernels, fills caches);
2. the measured run: peak RSS during it minus the RSS just before it (``ru_maxrss`` is the process
   high-water mark; the warm-up is tiny, so it does not hide the run's peak), and NFE forward/backward;
3. ``--reps`` timed repetitions: median wall time and median process CPU time.

Problems: a neural vector field (rotation + tanh MLP, state (batch, dim) in float32) integrated over
[0, T]. ``rk4`` with n = 10 … 10 000 fixed steps on [0, 1]; ``dopri5`` (rtol 1e-5, atol 1e-6) on
growing horizons T. Output times are just ``[0, T]``; the loss is the sum of squares of y(T).

    python benchmarks/bench_gradients.py                 # everything (~15 min on a quiet CPU)
    python benchmarks/bench_gradients.py --quick         # small sizes only (~2 min)
    python benchmarks/bench_gradients.py --suite dopri5 --json out.json

Prints one markdown table per suite; ratios are against torchdiffeq's counterpart (direct and
checkpoint vs ``torchdiffeq.odeint``; adjoint vs ``odeint_adjoint``; seminorm, and the interpolating
(with the seminorm) and quadrature sensitivities, vs its seminorm; on rk4 vs its adjoint), for
wall time, process CPU time (the steadier figure on a shared machine) and the peak-memory increase.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DIM, BATCH, WIDTH = 8, 32, 32
RTOL, ATOL = 1e-5, 1e-6

RK4_STEPS = (10, 100, 1000, 10000)
DOPRI5_HORIZONS = (1.0, 10.0, 100.0)

# (library, mode) per suite; torchode has no rk4.
MODES = {
    "rk4": [
        ("neuralode", "direct"),
        ("neuralode", "adjoint"),
        ("neuralode", "checkpoint"),
        ("neuralode", "interpolating"),
        ("neuralode", "quadrature"),
        ("torchdiffeq", "direct"),
        ("torchdiffeq", "adjoint"),
    ],
    "dopri5": [
        ("neuralode", "direct"),
        ("neuralode", "adjoint"),
        ("neuralode", "seminorm"),
        ("neuralode", "interpolating"),
        ("neuralode", "quadrature"),
        ("neuralode", "checkpoint"),
        ("torchdiffeq", "direct"),
        ("torchdiffeq", "adjoint"),
        ("torchdiffeq", "seminorm"),
        ("torchode", "direct"),
        ("torchode", "adjoint"),
    ],
}


# -- one configuration (runs in the subprocess) -------------------------------------------------------


def _field():
    import torch
    from torch import nn

    class Field(nn.Module):
        """dy/dt = y Aᵀ + 0.5 · MLP(y): a slowly damped rotation plus a neural perturbation, so the
        number of adaptive steps grows about linearly with the horizon."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(DIM, WIDTH), nn.Tanh(), nn.Linear(WIDTH, DIM))
            rot = torch.zeros(DIM, DIM)
            for i in range(0, DIM, 2):
                rot[i, i + 1], rot[i + 1, i] = 1.0, -1.0
            self.register_buffer("A", rot - 0.01 * torch.eye(DIM))
            self.calls = 0

        def forward(self, t, y):
            self.calls += 1
            return y @ self.A.T + 0.5 * self.net(y)

    return Field()


def _solve_fn(lib: str, mode: str, method: str, horizon: float, steps: int | None, func):
    """A closure doing one forward+backward; returns (nfe_forward, nfe_backward)."""
    import torch

    y0 = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, horizon])
    fixed = method == "rk4"
    options = {"step_size": horizon / steps} if fixed else None
    kw = {"method": method, "options": options}
    if not fixed:
        kw.update(rtol=RTOL, atol=ATOL)

    if lib == "neuralode":
        import neuralode

        def go():
            with neuralode.record_stats() as st:
                if mode == "direct":
                    ys = neuralode.odeint(func, y0, t, **kw)
                elif mode == "checkpoint":
                    ys = neuralode.odeint_checkpoint(func, y0, t, **kw)
                else:  # adjoint: backsolve (default norm), seminorm, interpolating (seminorm), quadrature
                    semi = mode in ("seminorm", "interpolating") and not fixed
                    opts = {"norm": "seminorm"} if semi else None
                    sens = mode if mode in neuralode.SENSITIVITIES else "backsolve"
                    ys = neuralode.odeint_adjoint(func, y0, t, adjoint_options=opts, sensitivity=sens, **kw)
                ys[-1].pow(2).sum().backward()
            return st.nfe, st.backward.nfe

        return go

    if lib == "torchdiffeq":
        import torchdiffeq

        def go():
            func.calls = 0
            if mode == "direct":
                ys = torchdiffeq.odeint(func, y0, t, **kw)
            else:
                opts = {"norm": "seminorm"} if mode == "seminorm" else None
                ys = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_options=opts, **kw)
            fwd = func.calls
            ys[-1].pow(2).sum().backward()
            return fwd, func.calls - fwd

        return go

    if lib == "torchode":
        import torchode as to

        term = to.ODETerm(func)
        step = to.Dopri5(term=term)
        ctrl = to.IntegralController(atol=ATOL, rtol=RTOL, term=term)
        solver = to.AutoDiffAdjoint(step, ctrl) if mode == "direct" else to.BacksolveAdjoint(term, step, ctrl)
        t_eval = t.repeat(BATCH, 1)

        def go():
            func.calls = 0
            sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t_eval))
            fwd = func.calls  # torchode's term batches the per-sample evaluations into one call
            sol.ys[:, -1].pow(2).sum().backward()
            return fwd, func.calls - fwd

        return go

    raise ValueError(lib)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    func = _field()
    fixed = cfg["steps"] is not None
    h_warm = cfg["horizon"] / cfg["steps"] if fixed else 0.01
    warm = _solve_fn(cfg["lib"], cfg["mode"], cfg["method"], h_warm, 1 if fixed else None, func)
    warm()
    func.zero_grad()
    go = _solve_fn(cfg["lib"], cfg["mode"], cfg["method"], cfg["horizon"], cfg["steps"], func)
    before = _rss_mb()
    nfe_f, nfe_b = go()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    walls, cpus = [], []
    for _ in range(cfg["reps"]):
        func.zero_grad()
        w0, c0 = time.perf_counter(), time.process_time()
        go()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {
        **cfg,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "peak_rss_mb": peak,
        "peak_delta_mb": max(peak - before, 0.0),
        "nfe_forward": nfe_f,
        "nfe_backward": nfe_b,
    }


# -- driver --------------------------------------------------------------------------------------------


def _configs(suite: str, quick: bool, reps: int, only: set[str] | None = None) -> list[dict]:
    out = []
    if suite in ("rk4", "all"):
        for n in RK4_STEPS[:2] if quick else RK4_STEPS:
            for lib, mode in MODES["rk4"]:
                out.append(
                    dict(suite="rk4", lib=lib, mode=mode, method="rk4", horizon=1.0, steps=n, reps=reps)
                )
    if suite in ("dopri5", "all"):
        for T in DOPRI5_HORIZONS[:2] if quick else DOPRI5_HORIZONS:
            for lib, mode in MODES["dopri5"]:
                out.append(
                    dict(
                        suite="dopri5", lib=lib, mode=mode, method="dopri5", horizon=T, steps=None, reps=reps
                    )
                )
    if only:
        out = [c for c in out if f"{c['lib']}:{c['mode']}" in only]
    return out


def _spawn(cfg: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**cfg, "error": last[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size(r: dict) -> str:
    return f"n={r['steps']}" if r["suite"] == "rk4" else f"T={r['horizon']:g}"


def table(results: list[dict], suite: str) -> str:
    rows = [r for r in results if r["suite"] == suite]
    ref = {}
    for r in rows:
        if r["lib"] == "torchdiffeq" and "error" not in r:
            ref[(_size(r), r["mode"])] = r
    lines = [
        "| size | library | gradient | wall s | CPU s | peak RSS MB | Δ peak MB | NFE fwd | NFE bwd | wall vs td | CPU vs td | Δ mem vs td |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {_size(r)} | {r['lib']} | {r['mode']} | {r['error']} ||||||||| |")
            continue
        counterpart = {"checkpoint": "direct", "interpolating": "seminorm", "quadrature": "seminorm"}.get(
            r["mode"], r["mode"]
        )
        if r["suite"] == "rk4" and counterpart == "seminorm":
            counterpart = "adjoint"
        base = ref.get((_size(r), counterpart))
        theirs = base and r["lib"] != "torchdiffeq"
        ratio_t = f"{r['wall_s'] / base['wall_s']:.2f}×" if theirs else ""
        ratio_c = f"{r['cpu_s'] / base['cpu_s']:.2f}×" if theirs else ""
        ratio_m = (
            f"{r['peak_delta_mb'] / base['peak_delta_mb']:.2f}×"
            if base and r["lib"] != "torchdiffeq" and base["peak_delta_mb"] > 1
            else ""
        )
        lines.append(
            f"| {_size(r)} | {r['lib']} | {r['mode']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_delta_mb']:.1f} | {r['nfe_forward']} | {r['nfe_backward']} | "
            f"{ratio_t} | {ratio_c} | {ratio_m} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("rk4", "dopri5", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="only the two smallest sizes")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per configuration (median)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--only", help="comma-separated library:mode pairs to run, e.g. neuralode:quadrature")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    results = []
    only = set(args.only.split(",")) if args.only else None
    for cfg in _configs(args.suite, args.quick, args.reps, only):
        r = _spawn(cfg, args.timeout)
        results.append(r)
        status = r.get("error") or f"{r['wall_s']:.3f} s, Δ{r['peak_delta_mb']:.1f} MB"
        print(
            f"  {cfg['suite']} {_size(cfg)} {cfg['lib']} {cfg['mode']}: {status}", file=sys.stderr, flush=True
        )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
    for suite in ("rk4", "dopri5"):
        if any(r["suite"] == suite for r in results):
            print(f"\n### {suite}\n\n{table(results, suite)}")


if __name__ == "__main__":
    main()
