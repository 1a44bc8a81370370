"""Peak memory of one forward + backward pass against the number of solver steps, for every gradient method.

Problem: an MLP vector field 2-64-2 (tanh) on a batch of 64 states, float32, integrated over [0, 1] by
``rk4`` with 10, 1 000 and 10 000 fixed steps; loss the sum of the final state. Gradient methods: direct
backprop (``odeint``), ``odeint_checkpoint`` (default: about √(2n) checkpoints), and ``odeint_adjoint``
with each sensitivity: ``backsolve``; ``interpolating`` and ``quadrature`` with their default (about √(2n)
checkpoints on a fixed grid) and with ``checkpoints=16``.

Each cell runs in a fresh subprocess at one thread. Reported:

* ``kept_mb``: what the forward pass leaves behind for the backward pass: the process's resident memory
  right after the forward pass minus right before it (``/proc/self/statm``).
* ``peak_mb``: the process's peak resident memory during forward + backward minus its resident memory just
  before (``ru_maxrss`` is a high-water mark; a warm-up pass at 10 steps runs first, so the baseline
  includes the interpreter, torch and the solver's code paths). Both include allocator slack, so
  differences below ~1 MiB are noise.

torch has no allocator statistics for CPU tensors, so the resident set is the measure.

Usage::

    python benchmarks/bench_adjoint_memory.py [--steps 10 1000 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = {
    "direct": {},
    "checkpoint": {},
    "adjoint backsolve": {"sensitivity": "backsolve"},
    "adjoint interpolating": {"sensitivity": "interpolating"},
    "adjoint interpolating, 16 checkpoints": {"sensitivity": "interpolating", "checkpoints": 16},
    "adjoint quadrature": {"sensitivity": "quadrature"},
    "adjoint quadrature, 16 checkpoints": {"sensitivity": "quadrature", "checkpoints": 16},
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(name: str, steps: int) -> dict:
    import torch
    from torch import nn

    import neuralode

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))

        def forward(self, t, y):
            return self.net(y)

    func = Field()
    y0 = torch.randn(64, 2)
    t = torch.tensor([0.0, 1.0])

    def solve(n: int):
        kw = dict(method="rk4", options={"step_size": 1.0 / n})
        if name == "direct":
            return neuralode.odeint(func, y0, t, **kw)
        if name == "checkpoint":
            return neuralode.odeint_checkpoint(func, y0, t, **kw)
        return neuralode.odeint_adjoint(func, y0, t, **kw, **METHODS[name])

    def step(n: int):
        func.zero_grad(set_to_none=True)
        before = _rss_mb()
        ys = solve(n)
        kept = _rss_mb() - before
        ys[-1].sum().backward()
        return kept

    step(10)  # warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    with neuralode.record_stats() as st:
        kept = step(steps)
    cpu = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": name,
        "steps": steps,
        "kept_mb": kept,
        "peak_mb": (peak - base) / 1024,
        "cpu_s": cpu,
        "nfe_forward": st.nfe,
        "nfe_backward": st.backward.nfe,
    }


def _table(rows: list[dict], steps: list[int]) -> str:
    head = " | ".join(f"{n} steps: kept / peak" for n in steps)
    lines = [f"| gradient | {head} |", "|---|" + "---:|" * len(steps)]
    for name in METHODS:
        cells = []
        for n in steps:
            r = next((r for r in rows if r["method"] == name and r["steps"] == n), None)
            cells.append("" if r is None else f"{r['kept_mb']:.1f} / {r['peak_mb']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 1000, 10000])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child[0], int(a.child[1]))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for n in a.steps:
        for name in a.methods:  # interleaved: every method at one step count, then the next count
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, str(n)], capture_output=True, text=True, env=env
            )
            if out.returncode != 0:
                print(f"{name}, {n} steps: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{name}, {n} steps: kept {row['kept_mb']:.1f} MiB, peak {row['peak_mb']:.1f} MiB, "
                f"CPU {row['cpu_s']:.2f} s, NFE {row['nfe_forward']} + {row['nfe_backward']}",
                flush=True,
            )
    print(_table(rows, a.steps))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
