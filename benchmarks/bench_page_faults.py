"""The network's cost inside a solve against a bare loop of it, with the process's minor page faults.

At large batches a network's activations are megabytes; glibc's allocator may return freed blocks of that
size to the system and fault them back in on the next allocation, so a call can cost more inside a solve
than in a tight loop of the same call. This prints, for an MLP at one batch size, the bare call's CPU
time and page faults per call, and a dopri5 solve's CPU time and page faults per evaluation (under
``torch.no_grad()``, one thread). Run it twice, with and without the allocator settings, to see what the
faults cost::

    python benchmarks/bench_page_faults.py
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864 \\
        python benchmarks/bench_page_faults.py
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import neuralode


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, nargs=2, default=(32, 256), help="state and hidden width")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--calls", type=int, default=100, help="bare calls per round")
    p.add_argument("--solves", type=int, default=5, help="solves per round")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = getattr(torch, args.dtype)
    d, w = args.width
    net = torch.nn.Sequential(
        torch.nn.Linear(d, w), torch.nn.Tanh(), torch.nn.Linear(w, w), torch.nn.Tanh(), torch.nn.Linear(w, d)
    ).to(dt)

    def f(t, y):
        return net(y)

    y0 = torch.randn(args.batch, d, dtype=dt)
    t = torch.tensor([0.0, 1.0], dtype=dt)
    tol = dict(rtol=1e-6, atol=1e-8) if dt == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    with torch.no_grad():
        for _ in range(3):  # warm-up
            net(y0)
            neuralode.odeint(f, y0, t, **tol)
        for _ in range(args.rounds):
            faults, cpu = minor_faults(), time.process_time()
            for _ in range(args.calls):
                net(y0)
            bare = (time.process_time() - cpu) / args.calls * 1e6
            bare_faults = (minor_faults() - faults) / args.calls
            faults, cpu = minor_faults(), time.process_time()
            with neuralode.record_stats() as st:
                for _ in range(args.solves):
                    neuralode.odeint(f, y0, t, **tol)
            per_eval = (time.process_time() - cpu) / st.nfe * 1e6
            eval_faults = (minor_faults() - faults) / st.nfe
            print(
                f"{d}-{w}-{w}-{d} b={args.batch} {args.dtype}: bare {bare:.0f} µs/call "
                f"({bare_faults:.1f} faults); solve {per_eval:.0f} µs/eval ({eval_faults:.1f} faults, "
                f"{st.nfe} evaluations); ratio {per_eval / bare:.2f}"
            )


if __name__ == "__main__":
    main()
