"""Training memory of one MNIST step against depth: ResNet, RK-Net and ODE-Net (the paper's Table 1 claim).

The paper's memory column says a ResNet and an RK-Net (backprop through the solver) need memory that grows
with depth (blocks, or solver steps), while the ODE-Net trained with the adjoint needs O(1) memory in the
depth of the solve. Measured here on one training step (forward, backward, SGD update) of a batch of
MNIST-shaped images, each configuration in a fresh subprocess at one thread:

* ``saved_mb``: bytes of the tensors autograd keeps for the backward pass (summed with
  ``torch.autograd.graph.saved_tensors_hooks``; views of one storage are counted once). This is the
  activation memory the paper's claim is about, and it is exact and repeatable.
* ``peak_mb``: the process's peak resident memory during the step minus its resident memory just before
  it (``ru_maxrss`` is a high-water mark; the warm-up step runs on a batch of 2, so it does not hide the
  measured peak). Model, optimizer state and the data batch exist before the baseline is read, so the
  data set's own memory is excluded. This one includes allocator slack and the adjoint's transient
  backward graphs.

Configurations: ResNet with 2/6/18 pre-activation blocks; RK-Net = the ODE-Net's network with
``gradient="direct"`` through ``rk4`` with 1/3/9/18 fixed steps (4 evaluations each); ODE-Net with the
adjoint (seminorm) through ``dopri5`` at several tolerances (forward/backward NFE reported) and through
``rk4`` with the same fixed step counts as RK-Net.

    python benchmarks/bench_memory_depth.py                       # batch 128, ~1 min
    python benchmarks/bench_memory_depth.py --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

RESNET_BLOCKS = (2, 6, 18)
RK_STEPS = (1, 3, 9, 18)
ODE_TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def _configs() -> list[dict]:
    out = [{"model": "resnet", "blocks": n} for n in RESNET_BLOCKS]
    out += [{"model": "rknet", "steps": n} for n in RK_STEPS]
    out += [{"model": "odenet", "method": "rk4", "steps": n} for n in RK_STEPS]
    out += [{"model": "odenet", "method": "dopri5", "tol": tol} for tol in ODE_TOLS]
    return out


def _build(cfg: dict):
    from neuralode.models.odenet import ODENet, ResNet

    if cfg["model"] == "resnet":
        return ResNet(n_blocks=cfg["blocks"])
    if cfg.get("method", "rk4") == "rk4":
        opts = {"step_size": 1.0 / cfg["steps"]}
        grad = "direct" if cfg["model"] == "rknet" else "adjoint"
        return ODENet(method="rk4", options=opts, gradient=grad)
    tol = cfg["tol"]
    return ODENet(rtol=tol, atol=tol, gradient="adjoint", adjoint_options={"norm": "seminorm"})


def _child(cfg: dict, batch: int) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _build(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    g = torch.Generator().manual_seed(1)
    step(torch.rand(2, 1, 28, 28, generator=g), torch.randint(0, 10, (2,), generator=g))  # warm-up
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits, y)
    saved = sum(seen.values())
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = getattr(getattr(model, "ode", None), "last_stats", None)
    return {
        **cfg,
        "saved_mb": saved / 2**20,
        "peak_mb": (peak - base) / 1024,
        "nfe_forward": None if stats is None else stats.nfe,
        "nfe_backward": None if stats is None else stats.backward.nfe,
    }


def _label(r: dict) -> str:
    if r["model"] == "resnet":
        return f"ResNet, {r['blocks']} blocks"
    if r["model"] == "rknet":
        return f"RK-Net, rk4 x {r['steps']}"
    if r.get("method") == "rk4":
        return f"ODE-Net (adjoint), rk4 x {r['steps']}"
    return f"ODE-Net (adjoint), dopri5 tol {r['tol']:g}"


def _depth(r: dict) -> int:
    """Layers evaluated in the forward pass: residual blocks, or vector-field evaluations."""
    return r["blocks"] if r["model"] == "resnet" else (r["nfe_forward"] or 4 * r["steps"])


def _table(rows: list[dict]) -> str:
    lines = [
        "| model | depth (blocks or forward NFE) | backward NFE | saved for backward (MiB) | peak step memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        nb = "" if r["nfe_backward"] in (None, 0) else str(r["nfe_backward"])
        lines.append(f"| {_label(r)} | {_depth(r)} | {nb} | {r['saved_mb']:.1f} | {r['peak_mb']:.1f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups = {
        "ResNet": [r for r in rows if r["model"] == "resnet"],
        "RK-Net (backprop through rk4)": [r for r in rows if r["model"] == "rknet"],
        "ODE-Net, adjoint, rk4": [r for r in rows if r["model"] == "odenet" and r.get("method") == "rk4"],
        "ODE-Net, adjoint, dopri5": [r for r in rows if r.get("method") == "dopri5"],
    }
    for ax, key, title in zip(axes, ("saved_mb", "peak_mb"), ("saved for backward", "peak during the step")):
        for name, rs in groups.items():
            rs = sorted(rs, key=_depth)
            ax.plot([_depth(r) for r in rs], [r[key] for r in rs], "o-", label=name)
        ax.set_xlabel("depth: residual blocks, or forward function evaluations")
        ax.set_ylabel("memory (MiB)")
        ax.set_title(f"One training step, batch {rows[0]['batch']}: {title}", fontsize=10)
        ax.set_xscale("log")
        ticks = [v for v in (2, 4, 6, 12, 18, 36, 72) if v <= max(_depth(r) for r in rows)]
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(v) for v in ticks]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--json", help="write the rows to this JSON file")
    p.add_argument("--plot", help="write the plot to this PNG file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child), a.batch)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cfg in _configs():
        out = subprocess.run(
            [sys.executable, __file__, "--batch", str(a.batch), "--child", json.dumps(cfg)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        row = {**json.loads(out.stdout.strip().splitlines()[-1]), "batch": a.batch}
        rows.append(row)
        print(f"{_label(row)}: saved {row['saved_mb']:.1f} MiB, peak {row['peak_mb']:.1f} MiB", flush=True)
    print(_table(rows))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    if a.plot:
        _plot(rows, a.plot)


if __name__ == "__main__":
    main()
