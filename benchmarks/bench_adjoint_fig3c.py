"""The paper's Figure 3c from a real run: backward vs forward NFE per training iteration of an MNIST
ODE-Net trained with the adjoint (``neuralode train mnist --model odenet``, ``--log-every 1``).

Reads ``<run>/iterations.jsonl``; prints the per-epoch means of forward and backward NFE and their
ratio, and with ``--plot`` draws backward against forward NFE for every iteration (the paper's panel)
next to the ratio over training.

Usage::

    neuralode train mnist --model odenet --data-dir DIR --train-size 2560 --val-size 128 \\
        --test-size 256 --epochs 8 --threads 1 --log-every 1 --out RUN
    python benchmarks/bench_adjoint_fig3c.py RUN [--plot fig3c.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in (args.run / "iterations.jsonl").read_text().splitlines() if line]
    fwd = [r["nfe_forward"] for r in rows]
    bwd = [r["nfe_backward"] for r in rows]
    print("| epoch | iterations | forward NFE | backward NFE | backward / forward |")
    print("|---:|---:|---:|---:|---:|")
    for e in sorted({r["epoch"] for r in rows}):
        f = [r["nfe_forward"] for r in rows if r["epoch"] == e]
        b = [r["nfe_backward"] for r in rows if r["epoch"] == e]
        print(f"| {e + 1} | {len(f)} | {statistics.mean(f):.1f} | {statistics.mean(b):.1f} | "
              f"{sum(b) / sum(f):.2f} |")  # fmt: skip
    print(f"\nall {len(rows)} iterations: backward / forward = {sum(bwd) / sum(fwd):.2f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        sc = ax1.scatter(fwd, bwd, c=range(len(rows)), cmap="viridis", s=14)
        top = max(max(fwd), max(bwd)) * 1.1
        ax1.plot([0, top], [0, top], "k:", lw=1, label="backward = forward")
        ax1.plot([0, top], [0, top / 2], "k--", lw=1, label="backward = forward / 2")
        ax1.set(xlabel="NFE forward", ylabel="NFE backward", xlim=(0, top), ylim=(0, top))
        ax1.legend(fontsize=8, loc="upper left")
        fig.colorbar(sc, ax=ax1, label="iteration")
        ax2.plot([r["epoch_float"] for r in rows], [b / f for f, b in zip(fwd, bwd)], lw=1)
        ax2.axhline(0.5, color="k", ls="--", lw=1)
        ax2.set(
            xlabel="epoch",
            ylabel="NFE backward / forward",
            ylim=(0, max(1.5, max(b / f for f, b in zip(fwd, bwd)))),
        )
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
