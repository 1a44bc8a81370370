"""Count the PyTorch operators one dopri5 solve dispatches, outside the vector field (load-independent).

Runs ``neuralode.odeint`` on the 2→64→64→2 tanh MLP of ``bench_solvers.py`` under ``torch.profiler`` and
reports the top-level operators of the solve, those of the MLP (5 per evaluation) and the difference per
evaluation: the solver's own kernel count, which sets its overhead floor in eager mode.

Usage::

    python benchmarks/count_solver_ops.py            # three rows
    python benchmarks/count_solver_ops.py --detail   # plus the operator histogram
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import neuralode

sys.path.insert(0, str(Path(__file__).parent))
from bench_solvers import MLP

ROWS = [  # (batch, dtype, rtol, atol, t1)
    (1, torch.float32, 1e-3, 1e-4, 1.0),
    (64, torch.float32, 1e-3, 1e-4, 1.0),
    (1, torch.float64, 1e-6, 1e-8, 10.0),
]
MLP_OPS_PER_EVAL = 5  # linear, tanh, linear, tanh, linear


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detail", action="store_true", help="print the operator histogram of each solve")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for batch, dtype, rtol, atol, t1 in ROWS:
        f = MLP(2, 64).to(dtype)
        y0 = torch.randn(batch, 2, dtype=dtype)
        t = torch.tensor([0.0, t1], dtype=dtype)
        with torch.no_grad():
            neuralode.odeint(f, y0, t, rtol=rtol, atol=atol)  # warm-up
            stats = neuralode.SolveStats()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                neuralode.odeint(f, y0, t, rtol=rtol, atol=atol, stats=stats)
        top = [e for e in prof.events() if e.cpu_parent is None]
        solver_ops = len(top) - MLP_OPS_PER_EVAL * stats.nfe
        print(
            f"batch {batch:4d} {dtype!s:13s} t1={t1:<4g} NFE {stats.nfe:3d}  top-level ops {len(top):4d}  "
            f"solver ops per evaluation {solver_ops / stats.nfe:.1f}"
        )
        if args.detail:
            print("   ", collections.Counter(e.name for e in top).most_common(20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
