"""Backward vs forward function evaluations of the adjoint: every sensitivity of ``odeint_adjoint``, with
the default and the seminorm backward norm, against torchdiffeq's ``odeint_adjoint``.

Problem: the spiral demo's field (``SpiralFunc``: MLP 2-50-2, tanh, on y³, seeded initial weights), y0 a
seeded ``randn(16, 2)`` batch, dopri5 at the default tolerances (rtol 1e-7, atol 1e-9), span 0..1 with 2,
10 and 50 output times, loss the sum of all outputs. NFE are counted by a counter in the vector field (so both libraries are counted the same way);
``record_stats`` must agree with it for neuralode. Deterministic: no timing.

Usage::

    python benchmarks/bench_adjoint_nfe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

import neuralode
from neuralode.experiments.spiral import SpiralFunc


class Counted(nn.Module):
    def __init__(self, func: nn.Module):
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t, y):
        self.calls += 1
        return self.func(t, y)


def measure(lib: str, sensitivity: str, norm: str, n_times: int, adjoint_method: str | None = None) -> dict:
    torch.manual_seed(0)
    func = Counted(SpiralFunc())
    y0 = torch.randn(16, 2)
    t = torch.linspace(0.0, 1.0, n_times)
    adj_opts = {"norm": "seminorm"} if norm == "seminorm" else None
    if lib == "torchdiffeq":
        import torchdiffeq

        ys = torchdiffeq.odeint_adjoint(func, y0, t, adjoint_options=adj_opts)
        fwd = func.calls
        ys.sum().backward()
        bwd = func.calls - fwd
    else:
        with neuralode.record_stats() as st:
            ys = neuralode.odeint_adjoint(
                func, y0, t, adjoint_options=adj_opts, sensitivity=sensitivity, adjoint_method=adjoint_method
            )
        fwd = func.calls
        ys.sum().backward()
        bwd = func.calls - fwd
        # The extra evaluation of the non-leaf check is not made here; the counters must agree.
        if (st.nfe, st.backward.nfe) != (fwd, bwd):
            raise RuntimeError(f"record_stats {st.nfe}/{st.backward.nfe} != counted {fwd}/{bwd}")
    method = adjoint_method or "dopri5"
    row = {"lib": lib, "sensitivity": sensitivity, "norm": norm, "n_times": n_times, "fwd": fwd, "bwd": bwd}
    return {**row, "adjoint_method": method}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    contenders = [("neuralode", s) for s in neuralode.SENSITIVITIES] + [("torchdiffeq", "backsolve")]
    for n_times in (2, 10, 50):
        for lib, sens in contenders:
            for norm in ("default", "seminorm"):
                if sens == "quadrature" and norm == "seminorm":
                    continue  # the parameter gradient is never in the error norm there
                rows.append(measure(lib, sens, norm, n_times))
        # A 3-stage backward method: cheaper steps where the output times force short ones.
        rows.append(measure("neuralode", "interpolating", "seminorm", n_times, adjoint_method="bosh3"))
    print(
        "| output times | library | sensitivity | backward norm | backward method | forward NFE | backward NFE "
        "| bwd/fwd |"
    )
    print("|---:|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n_times']} | {r['lib']} | {r['sensitivity']} | {r['norm']} | {r['adjoint_method']} | {r['fwd']} "
            f"| {r['bwd']} | {r['bwd'] / r['fwd']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
