"""Interleaved A/B of ``odeint`` solves across package copies (process CPU time, one thread).

The copies are importable packages: ``neuralode`` and the baselines of ``benchmarks/make_baseline.sh``
(``neuralode_base``, ``neuralode_base2``; put their folder on ``PYTHONPATH``). Each row is
``D-W-bB-PREC-T1``: a tanh MLP D→W→W→D (``W = 0``: the trivial field ``dy/dt = y``, which isolates the
solver's own cost), batch B, ``f32`` (rtol 1e-3, atol 1e-4) or ``f64`` (rtol 1e-6, atol 1e-8), t in
[0, T1], dopri5, under ``torch.no_grad()``. Each timing sample is ``--block`` consecutive solves of one
copy; the copies' order rotates every repeat. Prints the median per solve, the overhead per evaluation
(as ``bench_solvers.py`` defines it) and each copy's time relative to the first.

Usage::

    PYTHONPATH=src:/tmp/base python benchmarks/ab_odeint.py 2-0-b1-f32-1 2-64-b64-f32-1 \\
        --libs neuralode,neuralode_base,neuralode_base2
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch


def _row(spec: str):
    d, w, b, prec, t1 = spec.split("-")
    return int(d), int(w), int(b.lstrip("b")), prec, float(t1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="rows as D-W-bB-PREC-T1, e.g. 2-64-b1-f32-1")
    p.add_argument("--libs", default="neuralode")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--block", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    libs = [x for x in args.libs.split(",") if x]
    mods = {n: importlib.import_module(n) for n in libs}
    for spec in args.rows:
        d, w, b, prec, t1 = _row(spec)
        dtype = torch.float32 if prec == "f32" else torch.float64
        rtol, atol = (1e-3, 1e-4) if prec == "f32" else (1e-6, 1e-8)
        torch.manual_seed(0)
        if w:
            net = torch.nn.Sequential(
                torch.nn.Linear(d, w),
                torch.nn.Tanh(),
                torch.nn.Linear(w, w),
                torch.nn.Tanh(),
                torch.nn.Linear(w, d),
            ).to(dtype)

            def f(t, y, net=net):
                return net(y)
        else:

            def f(t, y):
                return y

        y0 = torch.randn(b, d, dtype=dtype)
        t = torch.tensor([0.0, t1], dtype=dtype)
        times: dict[str, list[float]] = {n: [] for n in libs}
        func_times = []
        with torch.no_grad():
            calls = [0]

            def counted(t, y, calls=calls, f=f):
                calls[0] += 1
                return f(t, y)

            mods[libs[0]].odeint(counted, y0, t, rtol=rtol, atol=atol)
            nfe = calls[0]
            for m in mods.values():  # warm-up
                for _ in range(5):
                    m.odeint(f, y0, t, rtol=rtol, atol=atol)
            for r in range(args.repeats):
                for name in libs[r % len(libs) :] + libs[: r % len(libs)]:
                    m = mods[name]
                    c0 = time.process_time()
                    for _ in range(args.block):
                        m.odeint(f, y0, t, rtol=rtol, atol=atol)
                    times[name].append((time.process_time() - c0) / args.block)
                c0 = time.process_time()
                for _ in range(10 * args.block):
                    f(t[0], y0)
                func_times.append((time.process_time() - c0) / (10 * args.block))
        fm = statistics.median(func_times)
        first = statistics.median(times[libs[0]])
        parts = [f"{spec} nfe={nfe} func={fm * 1e6:.1f}us"]
        for name in libs:
            m = statistics.median(times[name])
            parts.append(
                f"{name}: {m * 1e3:.3f} ms, ovh/eval {(m - nfe * fm) / nfe * 1e6:.1f} us, x{m / first:.3f}"
            )
        print(" | ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
