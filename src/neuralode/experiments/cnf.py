"""Continuous normalizing flows on 2-D toy data (paper §4, Figures 4-5; FFJORD; RNODE).

Commands (see ``docs/cnf.md``)::

    neuralode train cnf --data moons --field planar --width 64 --iters 2000 --out runs/cnf-moons
    neuralode train nf  --data moons --layers 64 --iters 2000 --out runs/nf-moons
    neuralode figure4   --out runs/figure4

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per evaluation), ``metrics.json`` (final:
``train_nll``, ``test_nll`` in nats, ``nfe_forward``, ``nfe_backward``, ...), ``checkpoint.pt`` and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from neuralode.datasets.toy2d import (
    REFERENCE_LOG_PROBS,
    TARGET_ENERGIES,
    TOY_DATASETS,
    sample_toy,
    target_log_normalizer,
)
from neuralode.experiments._runs import (
    RunDir,
    get_rng_state,
    load_checkpoint,
    progress,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from neuralode.models.cnf import CNF, ConcatSquashMLP, GatedPlanarField
from neuralode.models.planar_flow import PlanarNF

__all__ = [
    "CNFConfig",
    "Figure4Config",
    "NFConfig",
    "build_cnf",
    "register",
    "run_figure4",
    "train_cnf",
    "train_nf",
]

_FIELDS = ("planar", "mlp")
_PLOT_BOX = 4.0  # half-width of the plotted square; the toy data sets live inside [-4, 4]^2


# --- configs ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CNFConfig:
    """One CNF training run (maximum likelihood on a toy data set)."""

    data: str = "moons"
    field: str = "planar"  # "planar": the paper's gated hypernetwork; "mlp": FFJORD's concat-squash MLP
    width: int = 64  # planar: M units
    hyper_hidden: int = 32  # planar: hypernetwork width
    hidden: str = "64-64-64"  # mlp: hidden widths
    activation: str = "tanh"
    end_time: float = 1.0
    learn_end_time: bool = True
    base_std: float = 1.0
    divergence: str = "exact"  # for training; evaluation always uses the exact trace
    noise: str = "gaussian"
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    eval_tol: float = 0.0  # rtol = atol for test NLL and plots; 0 = the training tolerances
    gradient: str = "direct"
    seminorm: bool = False
    kinetic: float = 0.0  # RNODE weight λ_K
    jacobian: float = 0.0  # RNODE weight λ_J
    iters: int = 2000
    batch: int = 256
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine" (to 0 over --iters)
    weight_decay: float = 1e-5
    eval_every: int = 250
    n_test: int = 5000
    seed: int = 0
    threads: int = 1
    plots: bool = True
    out: str = "runs/cnf"


@dataclasses.dataclass
class NFConfig:
    """One planar-NF training run (maximum likelihood, layers in the data → base direction)."""

    data: str = "moons"
    layers: int = 64
    base_std: float = 1.0
    iters: int = 2000
    batch: int = 256
    lr: float = 1e-3
    lr_schedule: str = "constant"
    optimizer: str = "adam"
    eval_every: int = 250
    n_test: int = 5000
    seed: int = 0
    threads: int = 1
    plots: bool = True
    out: str = "runs/nf"


@dataclasses.dataclass
class Figure4Config:
    """Density matching, KL(q‖p), NF with K layers vs CNF with M units (paper Figure 4, reduced budget)."""

    targets: str = "U1,U2,U3"
    sizes: str = "2,8,32"
    nf_iters: int = 5000  # paper: 500,000 with RMSprop
    cnf_iters: int = 500  # paper: 10,000 with Adam
    batch: int = 256
    nf_lr: float = 1e-3
    cnf_lr: float = 1e-2
    end_time: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-5
    n_eval: int = 10000
    seed: int = 0
    threads: int = 1
    out: str = "runs/figure4"


# --- builders -----------------------------------------------------------------------------------------


def _parse_dims(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in s.replace(",", "-").split("-") if v)
    except ValueError:
        raise ValueError(f"hidden={s!r} must be widths joined by '-', e.g. '64-64-64'") from None
    if not dims or min(dims) < 1:
        raise ValueError(f"hidden={s!r} must list positive widths, e.g. '64-64-64'")
    return dims


def build_cnf(cfg: CNFConfig) -> CNF:
    if cfg.field not in _FIELDS:
        raise ValueError(f"field={cfg.field!r} is unknown; expected one of {_FIELDS}")
    if cfg.field == "planar":
        field = GatedPlanarField(2, cfg.width, cfg.hyper_hidden)
    else:
        field = ConcatSquashMLP(2, _parse_dims(cfg.hidden), cfg.activation)
    return CNF(
        field, 2, end_time=cfg.end_time, learn_end_time=cfg.learn_end_time, base_std=cfg.base_std,
        divergence=cfg.divergence, noise=cfg.noise, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol,
        gradient=cfg.gradient, adjoint_options={"norm": "seminorm"} if cfg.seminorm else None,
        regularize=bool(cfg.kinetic or cfg.jacobian),
    )  # fmt: skip


def _check_data(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(f"--data {name!r} is not a toy data set; expected one of {sorted(TOY_DATASETS)}")


def _test_set(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + cfg.seed)  # disjoint from the training stream's seed
    return sample_toy(cfg.data, cfg.n_test, generator=g)


@torch.no_grad()
def _nll(log_prob_fn, x: torch.Tensor, chunk: int = 2500) -> float:
    vals = [log_prob_fn(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    return float(-torch.cat(vals).mean())


# --- training loops -----------------------------------------------------------------------------------


def train_cnf(cfg: CNFConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train a CNF by maximum likelihood; writes the run folder; returns the final metrics."""
    _check_data(cfg.data)
    torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out)
    seed_everything(cfg.seed)
    model = build_cnf(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.lr_schedule, cfg.iters)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    start, history, elapsed, window = _start_or_resume(run, resume, model, opt, sched, data_gen)
    run.write_json("config.json", cfg)
    x_test = _test_set(cfg)
    t0 = time.monotonic() - elapsed
    bar = progress(total=cfg.iters, initial=start, desc=f"cnf {cfg.data}")
    for it in range(start, cfg.iters):
        x = sample_toy(cfg.data, cfg.batch, generator=data_gen)
        out = model(x)
        nll = -out.log_prob.mean()
        loss = nll
        if out.kinetic is not None:
            loss = loss + cfg.kinetic * out.kinetic.mean() + cfg.jacobian * out.jacobian.mean()
        n_fwd = out.dynamics.n_evals
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        nfe_f, nfe_b = _nfe(out.stats, out.dynamics.n_evals, n_fwd)
        rec = {"iter": it + 1, "train_nll": float(nll.detach()), "nfe_forward": nfe_f, "nfe_backward": nfe_b}
        if out.kinetic is not None:
            rec["kinetic"], rec["jacobian"] = (
                float(out.kinetic.mean().detach()),
                float(out.jacobian.mean().detach()),
            )
        window = [*window[-99:], rec]
        bar.update(1)
        bar.set_postfix(nll=f"{rec['train_nll']:.3f}", nfe=nfe_f, T=f"{_t_end(model):.2f}")
        last = it + 1 == cfg.iters
        if (it + 1) % cfg.eval_every == 0 or last:
            xt = x_test if last else x_test[:1000]
            with _eval_mode(model, cfg.eval_tol):
                test_nll = _nll(lambda v: model.log_prob(v, divergence="exact"), xt)
            ev = {**_window_mean(window), "iter": it + 1, "test_nll": test_nll, "n_test": xt.shape[0]}
            ev["time_s"] = time.monotonic() - t0
            ev["end_time"] = _t_end(model)
            run.append_jsonl("metrics.jsonl", ev)
            history.append(ev)
            save_checkpoint(
                run.checkpoint,
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": get_rng_state(), "data_rng": data_gen.get_state(), "iter": it + 1, "history": history,
                 "window": window, "elapsed": time.monotonic() - t0},
            )  # fmt: skip
    bar.close()
    wall = time.monotonic() - t0
    final = {**_window_mean(window), "test_nll": history[-1]["test_nll"] if history else math.nan}
    final.update(
        iters=cfg.iters, n_test=int(x_test.shape[0]), wall_time_s=wall, end_time=_t_end(model),
        params=sum(p.numel() for p in model.parameters()), nfe_source=_NFE_SOURCE[0],
    )  # fmt: skip
    with torch.no_grad(), _eval_mode(model, cfg.eval_tol), _timer() as tm:
        out = model(x_test[:1000], divergence="exact")
    final["eval_nfe_1000"] = out.stats.nfe or out.dynamics.n_evals
    final["eval_time_1000_s"] = tm["s"]
    final.update(_reference(cfg.data, x_test, final["test_nll"]))
    run.write_json("metrics.json", final)
    if cfg.plots:
        with _eval_mode(model, cfg.eval_tol):
            _plot_cnf(model, cfg, run)
    return final


_NFE_SOURCE = ["record_stats"]


def _nfe(stats, n_total: int, n_fwd: int) -> tuple[int, int]:
    """NFE from ``record_stats``; while the solver core is the temporary torchdiffeq shim (which reports
    zeros) fall back to counting the dynamics' calls (forward = calls in the forward solve)."""
    if stats.nfe:
        return stats.nfe, stats.nfe_backward
    _NFE_SOURCE[0] = "call-counter"
    return n_fwd, n_total - n_fwd


def _t_end(model: CNF) -> float:
    return float(torch.as_tensor(model.end_time()).detach())


def _window_mean(window: list[dict]) -> dict[str, float]:
    keys = [k for k in window[0] if k != "iter"] if window else []
    return {k: sum(w[k] for w in window) / len(window) for k in keys}


@contextlib.contextmanager
def _eval_mode(model: CNF, tol: float):
    """Evaluation settings for a block: ``model.eval()`` and, if ``tol > 0``, ``rtol = atol = tol``."""
    saved = model.rtol, model.atol
    if tol > 0:
        model.rtol = model.atol = tol
    model.eval()
    try:
        yield
    finally:
        model.rtol, model.atol = saved
        model.train()


class _timer:
    def __enter__(self):
        self.d = {"s": 0.0}
        self.t = time.perf_counter()
        return self.d

    def __exit__(self, *exc):
        self.d["s"] = time.perf_counter() - self.t


def train_nf(cfg: NFConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train a planar NF by maximum likelihood (layers map data → base); returns the final metrics."""
    _check_data(cfg.data)
    torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out)
    seed_everything(cfg.seed)
    model = PlanarNF(2, cfg.layers, direction="data_to_base", base_std=cfg.base_std)
    opt = _optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    sched = _schedule(opt, cfg.lr_schedule, cfg.iters)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    start, history, elapsed, window = _start_or_resume(run, resume, model, opt, sched, data_gen)
    run.write_json("config.json", cfg)
    x_test = _test_set(cfg)
    t0 = time.monotonic() - elapsed
    bar = progress(total=cfg.iters, initial=start, desc=f"nf {cfg.data}")
    for it in range(start, cfg.iters):
        x = sample_toy(cfg.data, cfg.batch, generator=data_gen)
        nll = -model.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        nll.backward()
        opt.step()
        sched.step()
        window = [*window[-99:], float(nll.detach())]
        bar.update(1)
        bar.set_postfix(nll=f"{window[-1]:.3f}")
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            ev = {
                "iter": it + 1,
                "train_nll": sum(window) / len(window),
                "test_nll": _nll(model.log_prob, x_test),
            }
            ev["time_s"] = time.monotonic() - t0
            run.append_jsonl("metrics.jsonl", ev)
            history.append(ev)
            save_checkpoint(
                run.checkpoint,
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "rng": get_rng_state(), "data_rng": data_gen.get_state(), "iter": it + 1, "history": history,
                 "window": window, "elapsed": time.monotonic() - t0},
            )  # fmt: skip
    bar.close()
    final = {
        "train_nll": sum(window) / max(len(window), 1),
        "test_nll": history[-1]["test_nll"] if history else math.nan,
        "nfe_forward": 0, "nfe_backward": 0, "iters": cfg.iters, "n_test": int(x_test.shape[0]),
        "wall_time_s": time.monotonic() - t0, "params": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    final.update(_reference(cfg.data, x_test, final["test_nll"]))
    run.write_json("metrics.json", final)
    if cfg.plots:
        _plot_nf(model, cfg, run)
    return final


def _schedule(opt, name: str, iters: int):
    if name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1))
    raise ValueError(f"lr_schedule={name!r} is unknown; expected 'constant' or 'cosine'")


def _reference(data: str, x_test: torch.Tensor, test_nll: float) -> dict[str, float]:
    """NLL of the data's own density on the test set: exact for 8gaussians (``true_test_nll``), the
    large-n limit by quadrature for moons/circles (``reference_test_nll``), and the model's gap to it."""
    if data not in REFERENCE_LOG_PROBS:
        return {}
    ref = float(-REFERENCE_LOG_PROBS[data](x_test.double()).mean())
    key = "true_test_nll" if data == "8gaussians" else "reference_test_nll"
    return {key: ref, "nll_gap": test_nll - ref}


def _optimizer(name: str, params, lr: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"optimizer={name!r} is unknown; expected 'adam' or 'rmsprop'")


# --- Figure 4: density matching -------------------------------------------------------------------------


def run_figure4(cfg: Figure4Config) -> dict[str, Any]:
    """Fit NF (K layers, RMSprop) and CNF (M units, Adam) to each target by minimising KL(q‖p)."""
    torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.out)
    run.write_json("config.json", cfg)
    targets = [t for t in cfg.targets.split(",") if t]
    sizes = [int(s) for s in cfg.sizes.split(",") if s]
    for t in targets:
        if t not in TARGET_ENERGIES:
            raise ValueError(
                f"--targets: {t!r} is not a target; expected names from {sorted(TARGET_ENERGIES)}"
            )
    results: dict[str, Any] = {"targets": targets, "sizes": sizes, "kl": {}, "time_s": {}, "nfe": {}}
    samples: dict[tuple[str, str, int], torch.Tensor] = {}
    t_start = time.monotonic()
    for target in targets:
        energy = TARGET_ENERGIES[target]
        log_z = target_log_normalizer(target)
        for kind in ("nf", "cnf"):
            for size in sizes:
                seed_everything(cfg.seed)
                t0 = time.monotonic()
                if kind == "nf":
                    model = PlanarNF(2, size, direction="base_to_data")
                    opt, iters = torch.optim.RMSprop(model.parameters(), lr=cfg.nf_lr), cfg.nf_iters
                    draw = model.sample_with_log_prob
                else:
                    model = CNF(
                        GatedPlanarField(2, size), 2, end_time=cfg.end_time, rtol=cfg.rtol, atol=cfg.atol
                    )
                    opt, iters = torch.optim.Adam(model.parameters(), lr=cfg.cnf_lr), cfg.cnf_iters
                    draw = lambda n, m=model: m.sample(n, with_log_prob=True)  # noqa: E731
                bar = progress(total=iters, desc=f"fig4 {target} {kind} {size}", leave=False)
                for _ in range(iters):
                    x, log_q = draw(cfg.batch)
                    loss = (log_q + energy(x)).mean()  # KL(q‖p) - log Z
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                    bar.set_postfix(kl=f"{float(loss.detach()) + log_z:.3f}")
                bar.close()
                with torch.no_grad():
                    x, log_q = draw(cfg.n_eval)
                    kl = float((log_q + energy(x)).mean()) + log_z
                key = f"{target}/{kind}/{size}"
                results["kl"][key] = kl
                results["time_s"][key] = time.monotonic() - t0
                if kind == "cnf":
                    results["nfe"][key] = model.last_stats.nfe or None
                samples[(target, kind, size)] = x[:5000]
                run.write_json("figure4.json", results)
    results["wall_time_s"] = time.monotonic() - t_start
    run.write_json("figure4.json", results)
    run.write_json("metrics.json", {"kl": results["kl"], "wall_time_s": results["wall_time_s"]})
    _plot_figure4(results, samples, run)
    return results


# --- plots ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, half: float = _PLOT_BOX):
    c = torch.linspace(-half, half, n)
    xx, yy = torch.meshgrid(c, c, indexing="xy")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), xx, yy


def _hist(ax, x: torch.Tensor, title: str = "", half: float = _PLOT_BOX):
    ax.hist2d(
        x[:, 0].numpy(), x[:, 1].numpy(), bins=100, range=[[-half, half], [-half, half]], cmap="viridis"
    )
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")


def _show_density(ax, logp: torch.Tensor, xx, title: str = ""):
    n = xx.shape[0]
    ax.imshow(
        logp.exp().reshape(n, n).numpy(), origin="lower", extent=[-_PLOT_BOX, _PLOT_BOX] * 2, cmap="viridis"
    )
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)


@torch.no_grad()
def _plot_cnf(model: CNF, cfg: CNFConfig, run: RunDir) -> None:
    plt = _plt()
    model.eval()
    g = torch.Generator().manual_seed(123)
    data = sample_toy(cfg.data, 20000, generator=g)
    fig, ax = plt.subplots(figsize=(3, 3))
    _hist(ax, data, f"data: {cfg.data}")
    _save(fig, run.path("data.png"))

    pts, xx, _ = _grid(100)
    logp = torch.cat(
        [model.log_prob(pts[i : i + 5000], divergence="exact") for i in range(0, len(pts), 5000)]
    )
    fig, ax = plt.subplots(figsize=(3, 3))
    _show_density(ax, logp, xx, "CNF density")
    _save(fig, run.path("density.png"))

    z = model.base_sample(20000, generator=g)
    fracs = (0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 1.0)
    path = model.sample(z=z, times=fracs)
    fig, ax = plt.subplots(figsize=(3, 3))
    _hist(ax, path[-1], "CNF samples")
    _save(fig, run.path("samples.png"))

    # Figure 5: samples (top) and density (bottom) from noise (t = 0) to data (t = T)
    pts, xx, _ = _grid(60)
    fig, axes = plt.subplots(2, len(fracs), figsize=(1.8 * len(fracs), 3.8))
    for j, s in enumerate(fracs):
        _hist(axes[0, j], path[j], f"t = {s:.0%} T")
        lp = model.base_log_prob(pts) if s == 0 else model.log_prob(pts, divergence="exact", at=s)
        _show_density(axes[1, j], lp, xx)
    _save(fig, run.path("flow.png"))

    # vector field at a few times
    pts, _, _ = _grid(20)
    big_t = _t_end(model)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, s in zip(axes, (0.0, 0.5, 1.0)):
        f = model.field(torch.tensor(s * big_t), pts)
        ax.quiver(pts[:, 0], pts[:, 1], f[:, 0], f[:, 1], (f.norm(dim=1)).numpy(), cmap="viridis")
        ax.set_title(f"f(t = {s:.0%} T, z)", fontsize=8)
        ax.set_aspect("equal")
    _save(fig, run.path("vector_field.png"))
    _flow_gif(model, z[:5000], run.path("flow.gif"))
    _plot_curves(run)


def _flow_gif(model: CNF, z: torch.Tensor, path: Path, frames: int = 25) -> None:
    """Animated samples from noise (t = 0) to data (t = T); needs Pillow (skipped without it)."""
    try:
        from matplotlib.animation import PillowWriter
    except ImportError:  # pragma: no cover
        return
    plt = _plt()
    traj = model.sample(z=z, times=torch.linspace(0, 1, frames).tolist())
    fig, ax = plt.subplots(figsize=(3, 3))
    writer = PillowWriter(fps=8)
    with writer.saving(fig, str(path), dpi=60):
        for k in range(frames):
            ax.clear()
            ax.scatter(traj[k, :, 0], traj[k, :, 1], s=0.5, alpha=0.5)
            ax.set_xlim(-_PLOT_BOX, _PLOT_BOX)
            ax.set_ylim(-_PLOT_BOX, _PLOT_BOX)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"t = {k / (frames - 1):.0%} T", fontsize=8)
            writer.grab_frame()
    plt.close(fig)


@torch.no_grad()
def _plot_nf(model: PlanarNF, cfg: NFConfig, run: RunDir) -> None:
    plt = _plt()
    g = torch.Generator().manual_seed(123)
    data = sample_toy(cfg.data, 20000, generator=g)
    pts, xx, _ = _grid(100)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    _hist(axes[0], data, f"data: {cfg.data}")
    _show_density(axes[1], model.log_prob(pts), xx, f"planar NF (K={cfg.layers}) density")
    _hist(axes[2], model.sample(20000, generator=g), "NF samples")
    _save(fig, run.path("nf.png"))
    _plot_curves(run)


def _plot_curves(run: RunDir) -> None:
    plt = _plt()
    lines = [json.loads(v) for v in run.path("metrics.jsonl").read_text().splitlines() if v]
    if not lines:
        return
    it = [v["iter"] for v in lines]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    axes[0].plot(it, [v["train_nll"] for v in lines], label="train (last 100 it.)")
    axes[0].plot(it, [v["test_nll"] for v in lines], label="test")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("NLL (nats)")
    axes[0].legend(fontsize=7)
    if "nfe_forward" in lines[0]:
        axes[1].plot(it, [v["nfe_forward"] for v in lines], label="forward")
        axes[1].plot(it, [v["nfe_backward"] for v in lines], label="backward")
        axes[1].set_ylabel("NFE per iteration")
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("iteration")
    _save(fig, run.path("curves.png"))


def _plot_figure4(results: dict, samples: dict, run: RunDir) -> None:
    plt = _plt()
    targets, sizes = results["targets"], results["sizes"]
    ncol = 1 + 2 * len(sizes)
    fig, axes = plt.subplots(len(targets), ncol, figsize=(1.7 * ncol, 1.8 * len(targets)), squeeze=False)
    pts, xx, _ = _grid(200)
    for i, target in enumerate(targets):
        u = TARGET_ENERGIES[target](pts)
        _show_density(axes[i, 0], -u - target_log_normalizer(target), xx, f"target {target}")
        for j, kind in enumerate(("nf", "cnf")):
            for k, size in enumerate(sizes):
                label = f"{'NF K' if kind == 'nf' else 'CNF M'}={size}"
                kl = results["kl"][f"{target}/{kind}/{size}"]
                _hist(axes[i, 1 + j * len(sizes) + k], samples[(target, kind, size)], f"{label}\nKL {kl:.2f}")
    _save(fig, run.path("figure4.png"))
    fig, axes = plt.subplots(1, len(targets), figsize=(3 * len(targets), 2.8), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for kind, style in (("nf", "o--"), ("cnf", "s-")):
            ax.plot(sizes, [results["kl"][f"{target}/{kind}/{s}"] for s in sizes], style, label=kind.upper())
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("K (NF layers) / M (CNF units)")
        ax.set_ylabel("KL(q‖p) (nats)")
        ax.legend(fontsize=7)
    _save(fig, run.path("figure4_loss.png"))


# --- command line ------------------------------------------------------------------------------------


_HELP = {
    "data": "toy data set",
    "field": "vector field: 'planar' (paper's gated planar hypernetwork) or 'mlp' (FFJORD concat-squash)",
    "width": "planar: number of units M",
    "hyper_hidden": "planar: hypernetwork width",
    "hidden": "mlp: hidden widths, e.g. 64-64-64",
    "activation": "mlp: tanh, softplus or elu",
    "end_time": "initial end time T (data at t = T, base at t = 0)",
    "learn_end_time": "train T",
    "base_std": "standard deviation of the Gaussian base density",
    "divergence": "trace during training: 'exact' (D VJPs) or 'hutchinson' (evaluation is always exact)",
    "noise": "Hutchinson noise: gaussian or rademacher (drawn once per solve)",
    "method": "ODE solver",
    "eval_tol": "rtol = atol for test NLL and plots (0: the training tolerances)",
    "gradient": "direct, adjoint or checkpoint",
    "seminorm": "adjoint: leave the parameter adjoints out of the backward error norm",
    "kinetic": "RNODE kinetic-energy weight",
    "jacobian": "RNODE Jacobian-Frobenius weight",
    "iters": "training iterations (fresh data every iteration)",
    "lr_schedule": "constant or cosine (to 0 over --iters)",
    "eval_every": "evaluate the test NLL (1000 points) and checkpoint every this many iterations",
    "n_test": "held-out test points (final NLL on all of them)",
    "threads": "torch CPU threads",
    "out": "run folder",
    "layers": "planar NF: number of layers K",
    "optimizer": "adam or rmsprop",
    "targets": "comma-separated target energies (Rezende & Mohamed's U1..U4)",
    "sizes": "comma-separated K (NF layers) = M (CNF units)",
    "n_eval": "samples for the final KL estimate",
}
_CHOICES = {
    "data": sorted(TOY_DATASETS),
    "field": list(_FIELDS),
    "divergence": ["exact", "hutchinson"],
    "noise": ["gaussian", "rademacher"],
    "gradient": ["direct", "adjoint", "checkpoint"],
    "lr_schedule": ["constant", "cosine"],
    "optimizer": ["adam", "rmsprop"],
}


def _add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        helptext = _HELP.get(f.name, "") + f" (default: {f.default})"
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=_HELP.get(f.name)
            )
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, type(f.default))
            parser.add_argument(
                flag,
                type=typ,
                default=f.default,
                metavar=f.name.upper(),
                help=helptext,
                choices=_CHOICES.get(f.name),
            )


def _config_from(args, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _run_cnf(args) -> int:
    metrics = train_cnf(_config_from(args, CNFConfig), resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def _run_nf(args) -> int:
    metrics = train_nf(_config_from(args, NFConfig), resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def _run_figure4(args) -> int:
    results = run_figure4(_config_from(args, Figure4Config))
    print(json.dumps(results["kl"], indent=2))
    return 0


def register(commands, train) -> None:
    p = train.add_parser(
        "cnf", help="continuous normalizing flow on 2-D toy data (paper Fig. 5, FFJORD, RNODE)"
    )
    _add_config_args(p, CNFConfig)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_run_cnf)
    p = train.add_parser("nf", help="planar normalizing flow baseline on 2-D toy data")
    _add_config_args(p, NFConfig)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_run_nf)
    p = commands.add_parser("figure4", help="paper Figure 4: density matching, planar NF vs CNF")
    _add_config_args(p, Figure4Config)
    p.set_defaults(func=_run_figure4)


def _start_or_resume(run: RunDir, resume: bool, model, opt, sched, data_gen: torch.Generator):
    """Fresh start, or the state of ``run``'s checkpoint: ``(iteration, history, elapsed s, window)``."""
    if not (resume and run.checkpoint.exists()):
        run.path("metrics.jsonl").unlink(missing_ok=True)
        return 0, [], 0.0, []
    ck = load_checkpoint(run.checkpoint)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    data_gen.set_state(ck["data_rng"])
    run.truncate_jsonl("metrics.jsonl", len(ck["history"]))
    return ck["iter"], ck["history"], ck["elapsed"], ck["window"]
