#!/usr/bin/env python3
"""Training a stiff Neural ODE: the rate constants of a chemical reaction network, learned by gradient descent.

The vector field is Robertson's mass-action network (``A → B``, ``2B → B + C``, ``B + C → A + C``)

    y₁' = −k₁ y₁ + k₃ y₂ y₃,   y₂' = k₁ y₁ − k₂ y₂² − k₃ y₂ y₃,   y₃' = k₂ y₂²

as an ``nn.Module`` whose parameters are ``log₁₀ k``; the truth is ``k = (0.04, 3·10⁷, 10⁴)``, the start
``(0.01, 3·10⁶, 10⁵)`` (every rate off by a factor 4 to 10). The data are trajectories from a few initial
compositions observed at log-spaced times up to ``t = 100``, where the fast mode of the network decays at
rates up to ~10⁴ while the solution changes on times of order 1 to 100: the problem is stiff, and an
explicit method needs steps set by the fastest mode, not by the accuracy.

The script

1. fits ``log₁₀ k`` with Adam, the solves by ``kvaerno5`` (L-stable ESDIRK), the gradient once by
   ``odeint_adjoint`` (``sensitivity="interpolating"``: the adjoint ODE integrated backwards by ``kvaerno5``
   along the forward solve's dense output) and once by ``odeint`` (backpropagation through the solver),
   from the same start; it records per iteration the loss, the parameter error, wall and CPU time, and
   the forward and backward evaluations, Jacobians and LU factorisations (``record_stats``);
2. checks the two gradients at the start against each other and against central finite differences;
3. measures the trajectory error of the start and of the fitted models on held-out initial compositions;
4. runs the explicit ``dopri5`` and ``tsit5`` on the same problem with a realistic step budget
   (``--max-num-steps``; they raise ``SolverError``) and once without a budget (how many evaluations they
   need; ``--explicit-budget``);
5. writes ``metrics.json`` and ``stiff_kinetics.png`` to ``--out``.

    python examples/stiff_kinetics.py --iterations 150 --threads 1 --out docs/results/stiff/training

The state is float64 (the species span ten orders of magnitude: ``y₂`` stays below 4·10⁻⁵).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from neuralode import SolverError, odeint, odeint_adjoint, record_stats

F64 = torch.float64
TRUE_LOG10K = (math.log10(0.04), math.log10(3e7), 4.0)
START_LOG10K = (-2.0, math.log10(3e6), 5.0)


class Counted(nn.Module):
    """``func`` with a count of its evaluations (the counters of ``record_stats`` are lost when a solve
    raises)."""

    def __init__(self, func: nn.Module):
        super().__init__()
        self.func, self.calls = func, 0

    def forward(self, t, y):
        self.calls += 1
        return self.func(t, y)


class MassAction(nn.Module):
    """Robertson's network with learnable ``log₁₀`` rate constants.

    ``forward(t, y)``: ``y`` of shape ``(..., 3)`` (concentrations of A, B, C); returns ``dy/dt`` of the
    same shape (per unit time).
    """

    def __init__(self, log10k: tuple[float, float, float]):
        super().__init__()
        self.log10k = nn.Parameter(torch.tensor(log10k, dtype=F64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k1, k2, k3 = (10.0**self.log10k).unbind()
        a, b, c = y.unbind(-1)
        r1, r2, r3 = k1 * a, k2 * b * b, k3 * b * c
        return torch.stack([-r1 + r3, r1 - r2 - r3, r2], -1)


def initial_compositions(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3)`` initial states: mostly A, some C, no B (random mixtures summing to 1)."""
    a = 0.5 + 0.5 * torch.rand(n, dtype=F64, generator=generator)
    return torch.stack([a, torch.zeros_like(a), 1.0 - a], -1)


def observation_times(t_end: float, n: int) -> torch.Tensor:
    """``(n + 1,)``: 0 and ``n`` log-spaced times from ``1e-5`` to ``t_end``."""
    return torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-5, math.log10(t_end), n, dtype=F64)])


def make_data(args, generator: torch.Generator) -> dict:
    """Training and held-out initial states, the times, and the true trajectories (``kvaerno5`` at rtol 1e-9)."""
    t = observation_times(args.t_end, args.n_times)
    y0_train = initial_compositions(args.n_train, generator)
    y0_test = initial_compositions(args.n_test, generator)
    truth = MassAction(TRUE_LOG10K)
    with torch.no_grad():
        y_train = odeint(truth, y0_train, t, method="kvaerno5", rtol=1e-9, atol=1e-14)
        y_test = odeint(truth, y0_test, t, method="kvaerno5", rtol=1e-9, atol=1e-14)
    scale = y_train.abs().amax(dim=(0, 1))  # per species: the loss weighs B (~1e-5) like A and C
    return dict(t=t, y0_train=y0_train, y0_test=y0_test, y_train=y_train, y_test=y_test, scale=scale)


def scaled_mse(ys: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each species relative to its largest observed value."""
    return ((ys - target) / scale).pow(2).mean()


def solve(model: nn.Module, y0: torch.Tensor, t: torch.Tensor, gradient: str, args) -> torch.Tensor:
    """The model's trajectory ``(len(t), *y0.shape)`` by the stiff solver, differentiable by ``gradient``."""
    kw = dict(method=args.method, rtol=args.rtol, atol=args.atol)
    if gradient == "adjoint":
        return odeint_adjoint(
            model,
            y0,
            t,
            sensitivity="interpolating",
            adjoint_rtol=args.adjoint_rtol,
            adjoint_atol=args.adjoint_atol,
            adjoint_options={"norm": "seminorm"},
            **kw,
        )
    return odeint(model, y0, t, **kw)


def loss_and_grad(model: MassAction, data: dict, gradient: str, args) -> tuple[float, torch.Tensor, dict]:
    """One forward and backward pass: the loss, ``d loss / d log₁₀ k`` and the solver counters and times."""
    model.zero_grad()
    wall, cpu = time.perf_counter(), time.process_time()
    with record_stats() as st:
        ys = solve(model, data["y0_train"], data["t"], gradient, args)
        loss = scaled_mse(ys, data["y_train"], data["scale"])
        wall_f, cpu_f = time.perf_counter() - wall, time.process_time() - cpu
        loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    bw = st.backward
    counters = dict(
        wall_s=wall,
        cpu_s=cpu,
        forward_wall_s=wall_f,
        forward_cpu_s=cpu_f,
        nfe_forward=st.nfe,
        n_jac_forward=st.n_jac,
        n_lu_forward=st.n_lu,
        steps_forward=st.n_steps,
        nfe_backward=bw.nfe if bw is not None else 0,
        n_jac_backward=bw.n_jac if bw is not None else 0,
        n_lu_backward=bw.n_lu if bw is not None else 0,
        steps_backward=bw.n_steps if bw is not None else 0,
    )
    return float(loss.detach()), model.log10k.grad.detach().clone(), counters


def parameter_error(model: MassAction) -> float:
    """Largest ``|log₁₀ k − log₁₀ k_true|`` (decades)."""
    return float((model.log10k.detach() - torch.tensor(TRUE_LOG10K, dtype=F64)).abs().max())


@torch.no_grad()
def trajectory_error(log10k, data: dict, args) -> dict:
    """Error of the model with ``log10k`` on the held-out initial states: the RMS of the scaled error
    (as the loss) and the largest relative error of each species at the observation times."""
    ys = odeint(
        MassAction(tuple(log10k)), data["y0_test"], data["t"], method=args.method, rtol=1e-9, atol=1e-14
    )
    ref = data["y_test"]
    rel = ((ys - ref).abs() / ref.abs().clamp_min(1e-12))[1:]  # t = 0 is exact; B is 0 there
    return dict(
        scaled_rms=float(scaled_mse(ys, ref, data["scale"]).sqrt()),
        max_rel_error_per_species=[float(v) for v in rel.amax(dim=(0, 1))],
    )


def gradient_check(data: dict, args, fd_rtol: float = 1e-10) -> dict:
    """At the start: the adjoint's and direct backprop's gradients, and central finite differences of the
    loss (each evaluation a solve at ``rtol=fd_rtol``, step 1e-5 in ``log₁₀ k``)."""
    model = MassAction(START_LOG10K)
    _, g_adj, _ = loss_and_grad(model, data, "adjoint", args)
    _, g_dir, _ = loss_and_grad(model, data, "direct", args)
    eps = 1e-5
    fd = []
    with torch.no_grad():
        for i in range(3):
            vals = []
            for sign in (1.0, -1.0):
                p = list(START_LOG10K)
                p[i] += sign * eps
                ys = odeint(
                    MassAction(tuple(p)),
                    data["y0_train"],
                    data["t"],
                    method=args.method,
                    rtol=fd_rtol,
                    atol=fd_rtol * 1e-5,
                )
                vals.append(float(scaled_mse(ys, data["y_train"], data["scale"])))
            fd.append((vals[0] - vals[1]) / (2 * eps))
    fd_t = torch.tensor(fd, dtype=F64)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return dict(
        adjoint=g_adj.tolist(),
        direct=g_dir.tolist(),
        finite_differences=fd,
        rel_adjoint_vs_direct=rel(g_adj, g_dir),
        rel_adjoint_vs_fd=rel(g_adj, fd_t),
        rel_direct_vs_fd=rel(g_dir, fd_t),
    )


def train(data: dict, gradient: str, args, log: Callable[[str], None]) -> dict:
    """Adam on ``log₁₀ k`` from ``START_LOG10K``; returns the per-iteration history and the fitted values."""
    model = MassAction(START_LOG10K)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.iterations, 1), eta_min=args.lr / 100)
    history = []
    for it in range(args.iterations):
        loss, _, counters = loss_and_grad(model, data, gradient, args)
        row = dict(iteration=it, loss=loss, param_error=parameter_error(model), **counters)
        history.append(row)
        opt.step()
        sched.step()
        if it % args.print_every == 0 or it == args.iterations - 1:
            log(
                f"[{gradient}] it {it:4d} loss {loss:.3e} |Δlog10k|max {row['param_error']:.3e} "
                f"{counters['wall_s']:.2f} s (cpu {counters['cpu_s']:.2f}) nfe {counters['nfe_forward']}/"
                f"{counters['nfe_backward']} jac {counters['n_jac_forward']}/{counters['n_jac_backward']} "
                f"lu {counters['n_lu_forward']}/{counters['n_lu_backward']}"
            )
    with torch.no_grad():
        final = float(
            scaled_mse(
                solve(model, data["y0_train"], data["t"], "direct", args), data["y_train"], data["scale"]
            )
        )
    return dict(
        history=history,
        final_loss=final,
        log10k=model.log10k.detach().tolist(),
        param_error=parameter_error(model),
    )


def explicit_attempt(data: dict, method: str, max_num_steps: int, rtol: float, atol: float) -> dict:
    """The true model solved by an explicit method on the training problem; a ``SolverError`` is caught and
    reported (where it stopped, after how many steps and evaluations of ``f``)."""
    wall = time.perf_counter()
    out: dict = dict(method=method, max_num_steps=max_num_steps, rtol=rtol, atol=atol)
    func = Counted(MassAction(TRUE_LOG10K))
    with torch.no_grad(), record_stats() as st:
        try:
            ys = odeint(
                func,
                data["y0_train"],
                data["t"],
                method=method,
                rtol=rtol,
                atol=atol,
                options={"max_num_steps": max_num_steps},
            )
        except SolverError as e:
            out.update(raised=True, reason=e.reason, t_reached=float(e.t), n_steps=e.n_steps, message=str(e))
        else:
            rel = ((ys - data["y_train"]).abs() / data["y_train"].abs().clamp_min(1e-12))[1:]
            out.update(raised=False, max_rel_error=float(rel.max()), n_steps=st.n_steps)
    out.update(nfe=func.calls, wall_s=time.perf_counter() - wall)
    return out


def stiff_reference_cost(data: dict, args) -> dict:
    """The same solve (true model, training problem) by the stiff method at the training tolerances."""
    wall = time.perf_counter()
    with torch.no_grad(), record_stats() as st:
        odeint(
            MassAction(TRUE_LOG10K),
            data["y0_train"],
            data["t"],
            method=args.method,
            rtol=args.rtol,
            atol=args.atol,
        )
    return dict(
        method=args.method,
        nfe=st.nfe,
        n_steps=st.n_steps,
        n_jac=st.n_jac,
        n_lu=st.n_lu,
        wall_s=time.perf_counter() - wall,
    )


def summarise(history: list[dict]) -> dict:
    keys = [k for k in history[0] if k not in ("iteration", "loss", "param_error")]
    return {k: statistics.median(r[k] for r in history) for k in keys}


def plot(results: dict, data: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for g, style in (("adjoint", "-"), ("direct", "--")):
        if g in results["training"]:
            h = results["training"][g]["history"]
            ax.semilogy([r["loss"] for r in h], style, label=f"loss ({g})")
            ax.semilogy([r["param_error"] for r in h], style, label=f"max |Δlog₁₀k| ({g})")
    ax.set_xlabel("iteration")
    ax.set_title(f"training ({args.method}, Adam lr {args.lr})")
    ax.legend(fontsize=8)
    t = data["t"][1:].numpy()
    fitted = results["training"].get("adjoint", next(iter(results["training"].values())))["log10k"]
    with torch.no_grad():
        y_fit = odeint(
            MassAction(tuple(fitted)), data["y0_test"], data["t"], method=args.method, rtol=1e-9, atol=1e-14
        )
        y_start = odeint(
            MassAction(START_LOG10K), data["y0_test"], data["t"], method=args.method, rtol=1e-9, atol=1e-14
        )
    ax = axes[1]
    names = ("A", "B ×10⁴", "C")
    for s, (name, color) in enumerate(zip(names, ("C0", "C1", "C2"))):
        mult = 1e4 if s == 1 else 1.0
        ax.semilogx(t, mult * data["y_test"][1:, 0, s].numpy(), "o", color=color, ms=4, label=f"{name} truth")
        ax.semilogx(t, mult * y_fit[1:, 0, s].numpy(), "-", color=color, label=f"{name} fitted")
        ax.semilogx(t, mult * y_start[1:, 0, s].numpy(), ":", color=color)
    ax.set_xlabel("t")
    ax.set_title("held-out initial state (dotted: start)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[2]
    names = []
    nfes = []
    for a in results["explicit"]:
        names.append(
            f"{a['method']}\n{a['max_num_steps']:.0e} steps\n" + ("raised" if a["raised"] else "finished")
        )
        nfes.append(a["nfe"])
    ref = results["stiff_reference"]
    names.append(f"{ref['method']}")
    nfes.append(ref["nfe"])
    ax.bar(range(len(nfes)), nfes, color=["C3" if "raised" in n else "C7" for n in names[:-1]] + ["C0"])
    for i, v in enumerate(nfes):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(nfes)), names, fontsize=7)
    ax.set_ylabel("evaluations of f (one solve of the training batch)")
    ax.set_title(f"explicit vs stiff to t = {args.t_end:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default="stiff_kinetics_out", help="folder for metrics.json and the plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lr", type=float, default=0.1, help="Adam learning rate on log10 k (cosine decay to 1/100 of it)"
    )
    p.add_argument("--method", default="kvaerno5", choices=("kvaerno3", "kvaerno4", "kvaerno5"))
    p.add_argument("--gradients", default="adjoint,direct", help="comma-separated: adjoint, direct")
    p.add_argument("--t-end", type=float, default=100.0)
    p.add_argument("--n-times", type=int, default=12, help="log-spaced observation times (plus t = 0)")
    p.add_argument("--n-train", type=int, default=4, help="training initial states")
    p.add_argument("--n-test", type=int, default=4, help="held-out initial states")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-10)
    p.add_argument("--adjoint-rtol", type=float, default=1e-5)
    p.add_argument("--adjoint-atol", type=float, default=1e-8)
    p.add_argument("--max-num-steps", type=int, default=10_000, help="step budget of the explicit attempts")
    p.add_argument(
        "--explicit-budget",
        type=int,
        default=1_000_000,
        help="budget of the unbounded explicit run (0: skip)",
    )
    p.add_argument("--print-every", type=int, default=5)
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    data = make_data(args, gen)
    results: dict = dict(
        config=vars(args),
        true_log10k=list(TRUE_LOG10K),
        start_log10k=list(START_LOG10K),
        environment=dict(torch=torch.__version__, python=platform.python_version(), threads=args.threads),
    )
    log(f"Robertson kinetics to t = {args.t_end:g}, {args.n_train} training / {args.n_test} held-out states")

    results["stiff_reference"] = stiff_reference_cost(data, args)
    log(f"stiff solve of the training batch: {results['stiff_reference']}")
    attempts = [
        explicit_attempt(data, m, args.max_num_steps, args.rtol, args.atol) for m in ("dopri5", "tsit5")
    ]
    if args.explicit_budget:
        attempts.append(explicit_attempt(data, "dopri5", args.explicit_budget, args.rtol, args.atol))
    results["explicit"] = attempts
    for a in attempts:
        log(f"explicit: {json.dumps({k: v for k, v in a.items() if k != 'message'})}")

    results["gradient_check"] = gradient_check(data, args)
    log(f"gradients at the start: {results['gradient_check']}")

    results["training"] = {}
    for g in args.gradients.split(","):
        results["training"][g] = train(data, g, args, log)
    results["held_out"] = dict(start=trajectory_error(START_LOG10K, data, args))
    for g, r in results["training"].items():
        r["median_per_iteration"] = summarise(r["history"])
        results["held_out"][g] = trajectory_error(r["log10k"], data, args)
        log(
            f"[{g}] final loss {r['final_loss']:.3e}, log10k {r['log10k']}, |Δlog10k|max {r['param_error']:.2e}"
        )
        log(f"[{g}] median per iteration: {r['median_per_iteration']}")
        log(f"[{g}] held-out: {results['held_out'][g]}")
    log(f"held-out at the start: {results['held_out']['start']}")
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    if not args.no_plot:
        plot(results, data, args, os.path.join(args.out, "stiff_kinetics.png"))
    log(f"wrote {args.out}/metrics.json" + ("" if args.no_plot else " and stiff_kinetics.png"))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
