"""A/B of the adjoint's per-evaluation vector-Jacobian product: ``torch.autograd.grad`` against
``neuralode._gradients.adjoint._vjp`` (the autograd engine called directly), on the spiral model of
``bench_solvers.py`` (batch 20). Interleaved repeats, process CPU time, one thread; prints the median µs
of one evaluation (forward of the field + VJP) for each, after checking that both give identical results.

Usage::

    python benchmarks/bench_adjoint_vjp.py [--calls 2000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from neuralode._gradients.adjoint import _vjp

sys.path.insert(0, str(Path(__file__).parent))
from bench_solvers import SpiralFunc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    func = SpiralFunc()
    params = tuple(func.parameters())
    y = torch.randn(20, 1, 2)
    a = torch.randn(20, 1, 2)

    def evaluation(vjp):
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            fy = func(None, y_)
            return vjp(fy, (y_, *params), -a)

    def public(fy, inputs, v):
        return torch.autograd.grad(fy, inputs, v, allow_unused=True, materialize_grads=True)

    for x, z in zip(evaluation(public), evaluation(_vjp)):
        if not torch.equal(x, z):
            raise RuntimeError("the two VJPs differ")
    times: dict[str, list[float]] = {"torch.autograd.grad": [], "_vjp (engine)": []}
    contenders = [("torch.autograd.grad", public), ("_vjp (engine)", _vjp)]
    for rep in range(args.repeats):
        for name, vjp in contenders if rep % 2 else contenders[::-1]:
            t = time.process_time()
            for _ in range(args.calls):
                evaluation(vjp)
            times[name].append((time.process_time() - t) / args.calls * 1e6)
    for name, v in times.items():
        print(f"{name:20s} {statistics.median(v):7.1f} µs per evaluation (CPU, median of {args.repeats})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
