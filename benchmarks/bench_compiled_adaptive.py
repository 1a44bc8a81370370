"""Eager vs compiled adaptive solves (``odeint(..., options={"compile": True})``), beside torchdiffeq.

The rows of ``bench_solvers.py`` (dopri5, MLP vector fields, float32 rtol=1e-3/atol=1e-4 and float64
rtol=1e-6/atol=1e-8). Contenders, interleaved in one process (order rotating every repeat):

* ``eager``: ``neuralode.odeint`` as by default;
* ``compile``: the same call with ``options={"compile": True}`` (one Inductor graph per RK step);
* ``torchdiffeq``: ``torchdiffeq.odeint``.

Each timing sample is a block of ``--block`` consecutive solves of one contender (default 10), and the
blocks of the contenders are interleaved: one solve between two of another library's measures that
library's code evicting ours from the caches more than it measures the solver (a compiled step loses
~30% that way, the eager loop ~15%), while a training loop calls the same solver over and over.
Reported per row: the first compiled call's wall time (compilation + one solve), median process CPU time
per solve, NFE, the overhead ratio against the bare network (solve / (NFE × bare ``func`` call), as in
``bench_solvers.py``: below 1 means the compiled step runs the network's work faster than eager calls
of it), the speed-ups and the largest difference from the eager solution. ``--grad`` times forward +
backward through the solver (a training step's solve) instead of ``no_grad`` solves.

    python benchmarks/bench_compiled_adaptive.py --rows "2-64-64-2"          # 12 rows, ~5 min
    python benchmarks/bench_compiled_adaptive.py --grad --rows "b=64"
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
from bench_solvers import MLP, NETS, PRECISIONS, all_rows

try:
    import torchdiffeq
except ImportError:  # pragma: no cover
    torchdiffeq = None


CLOCK = time.process_time  # wall clock on CUDA (process time does not see the GPU)
SYNC = lambda: None  # noqa: E731


def _cpu(fn, n: int = 1) -> float:
    """Time (``CLOCK``) of ``n`` consecutive calls of ``fn``, per call."""
    SYNC()
    c0 = CLOCK()
    for _ in range(n):
        fn()
    SYNC()
    return (CLOCK() - c0) / n


def bench_row(row, repeats: int, budget: float, grad: bool, block: int, device: torch.device) -> dict:
    dtype, rtol, atol = PRECISIONS[row.precision]
    d, w = NETS[row.net]
    torch.manual_seed(0)
    f = MLP(d, w).to(device=device, dtype=dtype)
    y0 = torch.randn(row.batch, d, dtype=dtype, device=device).requires_grad_(grad)
    t = torch.tensor([0.0, row.t1], dtype=dtype, device=device)
    opts = {"eager": None, "compile": {"compile": True}}

    def solver(name):
        if name == "torchdiffeq":
            return lambda fn: torchdiffeq.odeint(fn, y0, t, rtol=rtol, atol=atol, method="dopri5")
        return lambda fn: neuralode.odeint(fn, y0, t, rtol=rtol, atol=atol, options=opts[name])

    names = ["eager", "compile"] + (["torchdiffeq"] if torchdiffeq is not None else [])
    solvers = {n: solver(n) for n in names}

    def run(name):
        if grad:
            f.zero_grad()
            solvers[name](f)[-1].square().sum().backward()
        else:
            with torch.no_grad():
                solvers[name](f)

    out = {"label": row.label, "libs": {}}
    w0 = time.perf_counter()
    run("compile")
    out["compile_s"] = time.perf_counter() - w0
    with torch.no_grad():
        ref = neuralode.odeint(f, y0, t, rtol=rtol, atol=atol)[-1]
        for name in names:
            calls = [0]

            def counted(tt, yy, calls=calls):
                calls[0] += 1
                return f(tt, yy)

            if name == "compile":  # count through the eager loop: the compiled step does the same steps
                st = neuralode.SolveStats()
                y1 = neuralode.odeint(f, y0, t, rtol=rtol, atol=atol, options=opts[name], stats=st)[-1]
                nfe = st.nfe
            else:
                y1 = solvers[name](counted)[-1]
                nfe = calls[0]
            diff = float((y1 - ref).abs().max())
            out["libs"][name] = {"nfe": nfe, "max_diff_vs_eager": diff, "cpu": []}
    for name in names:
        run(name)
    t0_ = t[0]
    func_cpu = []
    start = time.perf_counter()
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out["libs"][name]["cpu"].append(_cpu(lambda name=name: run(name), block))
        with torch.no_grad():
            func_cpu.append(_cpu(lambda: f(t0_, y0), 10 * block))
        if r >= 4 and time.perf_counter() - start > budget:
            break
    fc = statistics.median(func_cpu)
    out["func_cpu"], out["repeats"] = fc, len(func_cpu)
    for lib in out["libs"].values():
        lib["cpu_med"] = statistics.median(lib.pop("cpu"))
        lib["overhead_ratio"] = lib["cpu_med"] / (max(lib["nfe"], 1) * fc)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="2-64-64-2", help="substring filter on the row labels")
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--budget", type=float, default=8.0, help="seconds of repeats per row (min 5 repeats)")
    p.add_argument("--grad", action="store_true", help="time forward+backward instead of no_grad solves")
    p.add_argument("--block", type=int, default=10, help="consecutive solves per timing sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = [r for r in all_rows() if args.rows in r.label]
    device = torch.device(args.device)
    if device.type == "cuda":
        global CLOCK, SYNC
        CLOCK, SYNC = time.perf_counter, torch.cuda.synchronize
    print(
        f"dopri5, {'wall' if device.type == 'cuda' else 'CPU'} time per solve (median over blocks of {args.block}), one thread, grad={args.grad}, "
        f"torch {torch.__version__}\n"
    )
    head = "| row | first call s | eager ms | compile ms | torchdiffeq ms | NFE | ovh ratio eager / compile |"
    print(head + " × compile vs eager | × compile vs torchdiffeq | max diff |")
    print("|" + "---|" * 10)
    results = []
    for row in rows:
        r = bench_row(row, args.repeats, args.budget, args.grad, max(args.block, 1), device)
        results.append(r)
        L = r["libs"]
        td = L.get("torchdiffeq")
        e, c = L["eager"]["cpu_med"], L["compile"]["cpu_med"]
        td_ms = "-" if td is None else f"{td['cpu_med'] * 1e3:.2f}"
        td_x = "-" if td is None else f"{td['cpu_med'] / c:.2f}"
        print(
            f"| {r['label']} | {r['compile_s']:.1f} | {e * 1e3:.2f} | {c * 1e3:.2f} | {td_ms} | "
            f"{L['eager']['nfe']} | {L['eager']['overhead_ratio']:.2f} / {L['compile']['overhead_ratio']:.2f} | "
            f"{e / c:.2f} | {td_x} | {L['compile']['max_diff_vs_eager']:.1e} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"grad": args.grad, "block": args.block, "torch": torch.__version__, "rows": results},
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
