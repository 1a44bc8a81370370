"""Accuracy of the parameter gradient of each gradient method on the ODE-Net block, against a tight
reference, at several tolerances: what the cheaper backward passes cost in accuracy.

The ODE-Net classifier (64 channels; its vector field has ReLU and GroupNorm) in float64, a seeded batch
of 8 random 28×28 inputs with random labels, cross-entropy loss; the ODE block on [0, 1] by dopri5 with
rtol = atol = tol forwards and backwards. Reference: direct backprop at 1e-10. Reported: the relative
error (2-norm) of the gradient with respect to the vector field's parameters, and forward/backward NFE.
Deterministic.

Usage::

    python benchmarks/bench_adjoint_accuracy.py [--tols 1e-3 1e-5 1e-7]
"""

from __future__ import annotations

import argparse

import torch

import neuralode
from neuralode.models.odenet import ODENet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-5, 1e-7])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ODENet(64).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (8,), generator=gen)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    params = list(model.odefunc.parameters())

    def grad(solve):
        model.zero_grad()
        with neuralode.record_stats() as st:
            logits = model.head(solve(model.downsampling(x))[-1])
            torch.nn.functional.cross_entropy(logits, labels).backward()
        return torch.cat([q.grad.reshape(-1) for q in params]), st

    ref, _ = grad(lambda h: neuralode.odeint(model.odefunc, h, t, rtol=1e-10, atol=1e-10))
    semi = {"norm": "seminorm"}
    print("| tol | gradient | backward norm | relative error | NFE fwd | NFE bwd |")
    print("|---:|---|---|---:|---:|---:|")
    for tol in args.tols:
        rows = [("direct", "", lambda h, tol=tol: neuralode.odeint(model.odefunc, h, t, rtol=tol, atol=tol))]
        for sens in neuralode.SENSITIVITIES:
            for name, opts in (("default", None), ("seminorm", semi)):
                if sens == "quadrature" and opts is not None:
                    continue  # the parameter gradient is never under error control there
                rows.append(
                    (
                        f"adjoint {sens}",
                        name,
                        lambda h, s=sens, o=opts, tol=tol: neuralode.odeint_adjoint(
                            model.odefunc, h, t, rtol=tol, atol=tol, sensitivity=s, adjoint_options=o
                        ),
                    )
                )
        for name, norm, solve in rows:
            g, st = grad(solve)
            err = float((g - ref).norm() / ref.norm())
            print(f"| {tol:g} | {name} | {norm} | {err:.3f} | {st.nfe} | {st.backward.nfe} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
