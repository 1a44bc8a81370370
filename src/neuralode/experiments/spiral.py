"""The spiral demo: learn the dynamics dy/dt = y³·A from one trajectory (``neuralode demo``).

This is torchdiffeq's ``examples/ode_demo.py`` experiment (EXPERIMENTS.md §1.8) as a reproducible program:

- ground truth: dy/dt = (y∘y∘y)·A with A = [[-0.1, 2.0], [-2.0, -0.1]] (row vector times A), y0 = (2, 0),
  ``data_size`` = 1000 points on t ∈ [0, 25], solved once by dopri5 in float64 at rtol=1e-7, atol=1e-9;
- model: f(t, y) = Linear(2→50)–tanh–Linear(50→2) applied to y³; weights N(0, 0.1), biases 0; float32;
- training: each iteration draws ``batch_size`` = 20 distinct start indices, integrates the model from
  those states over the first ``batch_time`` = 10 time points, and takes the mean |pred − true| (L1);
  RMSprop, lr 1e-3; 2000 iterations; the full trajectory from y0 is evaluated every 20 iterations.

Outputs, in the run folder (``--out``, default ``runs/demo-<timestamp>``):
``config.json``; ``metrics.jsonl`` (one line per evaluation); ``metrics.json`` (final numbers);
``checkpoint.pt`` (written atomically at every evaluation; ``--resume RUN_DIR`` continues bit-exactly);
``trajectories.png``, ``phase.png``, ``vector_field.png``, ``loss.png``.

Python API: ``train_spiral(SpiralConfig(iters=500), "runs/x")`` returns the final metrics dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuralode
from neuralode import ADAPTIVE_METHODS, GRADIENT_METHODS, SOLVERS, TABLEAUS, NeuralODE, odeint, record_stats
from neuralode.experiments._config import UsageError, check_positive_float, check_positive_int, opt
from neuralode.experiments._runs import (
    check_device_name,
    peak_memory_mb,
    plot_nfe,
    seed_everything,
)
from neuralode.experiments._trainer import (
    Experiment,
    RunFolder,
    Trainer,
    _Single,
    execute,
    on_device,
    register_experiment,
    write_config,
)

__all__ = ["SPIRAL", "SpiralConfig", "SpiralFunc", "make_spiral_data", "register", "train_spiral"]

#: The true dynamics matrix (row-vector convention: dy/dt = y³ @ TRUE_A).
TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
TRUE_Y0 = (2.0, 0.0)
#: Tolerances of the one float64 solve that produces the ground-truth trajectory.
TRUTH_RTOL, TRUTH_ATOL = 1e-7, 1e-9

#: An evaluation solve (the whole trajectory) may take this many times ``max_steps``.
EVAL_BUDGET_FACTOR = 10


@dataclasses.dataclass
class SpiralConfig:
    """Everything that defines a spiral run. Defaults reproduce torchdiffeq's ``ode_demo.py``.

    ``iters`` counts every iteration, including a resumed part; ``method`` is one of
    ``neuralode.SOLVERS`` (fixed-step methods step on the output grid); ``max_steps`` is the work budget
    of one training solve (adaptive methods): a solve that needs more is reported as divergence.
    """

    iters: int = opt(2000, "training iterations, in total")
    batch_size: int = opt(20, "windows per minibatch (distinct random start indices)")
    batch_time: int = opt(10, "points per window")
    data_size: int = opt(1000, "points of the ground-truth trajectory on [0, t_end]")
    t_end: float = opt(25.0, "end of the time span")
    hidden: int = opt(50, "hidden width of the vector field")
    lr: float = opt(1e-3, "RMSprop learning rate")
    method: str = opt("dopri5", "ODE solver", choices=SOLVERS, metavar="NAME")
    rtol: float = opt(1e-7, "relative tolerance (training and evaluation)")
    atol: float = opt(1e-9, "absolute tolerance (training and evaluation)")
    max_steps: int = opt(
        1000, "work budget: solver steps per training solve (evaluation solves: 10x); more is divergence"
    )
    gradient: str = opt("direct", "gradient method", choices=GRADIENT_METHODS)
    seed: int = opt(0, "seeds the weights and the minibatch sampler")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto (the model is tiny: the CPU is usually faster)")
    eval_every: int = opt(20, "evaluate the full trajectory and checkpoint every N iterations")
    threads: int = opt(1, "torch CPU threads (1 is fastest for a 2-50-2 network)")
    compile: bool = opt(False, "each solver step as one torch.compile graph (explicit RK methods)")
    plots: bool = opt(True, "write the PNG plots at the end")

    def __post_init__(self) -> None:
        check_positive_int(
            self,
            "iters",
            "batch_size",
            "batch_time",
            "data_size",
            "hidden",
            "eval_every",
            "threads",
            "max_steps",
        )
        check_positive_float(self, "t_end", "lr", "rtol", "atol")
        if self.batch_time < 2:
            raise UsageError(
                f"batch_time must be at least 2 (a window needs two points), got {self.batch_time}"
            )
        if self.batch_time >= self.data_size:
            raise UsageError(f"batch_time={self.batch_time} must be smaller than data_size={self.data_size}")
        n_starts = self.data_size - self.batch_time
        if self.batch_size > n_starts:
            raise UsageError(
                f"batch_size={self.batch_size} exceeds the {n_starts} possible window starts "
                f"(data_size - batch_time); lower batch_size or raise data_size"
            )
        if self.method not in SOLVERS:
            raise UsageError(f"method={self.method!r} is not a solver; expected one of {SOLVERS}")
        if self.gradient not in GRADIENT_METHODS:
            raise UsageError(f"gradient={self.gradient!r} is not one of {GRADIENT_METHODS}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UsageError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.compile, bool):
            raise UsageError(f"compile must be True or False, got {self.compile!r}")
        if self.compile and self.method not in TABLEAUS:
            raise UsageError(
                f"compile=True needs an explicit Runge-Kutta method (one of {', '.join(TABLEAUS)}), "
                f"got {self.method!r}"
            )
        check_device_name(self.device)


#: Fields a resumed run may change: they do not alter the sequence of weights.
RESUMABLE_FIELDS = ("iters", "eval_every", "device", "threads", "plots", "max_steps")


# ----------------------------------------------------------------------------------------------- model


class TrueDynamics(nn.Module):
    """dy/dt = y³ · A (row-vector convention)."""

    def __init__(self, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.register_buffer("A", torch.tensor(TRUE_A, dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**3) @ self.A


class SpiralFunc(nn.Module):
    """The learned vector field f(t, y) = W2·tanh(W1·y³ + b1) + b2 (autonomous).

    Shapes: ``y`` is ``(..., 2)``, the result too. Weights start N(0, 0.1), biases 0 (as ``ode_demo.py``).
    """

    def __init__(self, hidden: int = 50):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def make_spiral_data(
    data_size: int = 1000, t_end: float = 25.0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth: returns ``t`` of shape ``(data_size,)`` and ``y`` of shape ``(data_size, 2)``, float32.

    Solved once in float64 by dopri5 at rtol=1e-7, atol=1e-9, then cast to float32.
    """
    t = torch.linspace(0.0, t_end, data_size, dtype=torch.float64)
    y0 = torch.tensor(TRUE_Y0, dtype=torch.float64)
    with torch.no_grad():
        y = odeint(TrueDynamics(), y0, t, rtol=TRUTH_RTOL, atol=TRUTH_ATOL, method="dopri5")
    return t.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.float32)


def _get_batch(
    t: torch.Tensor, y: torch.Tensor, cfg: SpiralConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y0 (M, 2), t (T,), y (T, M, 2))`` for ``batch_size`` = M windows of ``batch_time`` = T points."""
    starts = torch.randperm(cfg.data_size - cfg.batch_time, generator=gen)[: cfg.batch_size].to(y.device)
    idx = starts[None, :] + torch.arange(cfg.batch_time, device=y.device)[:, None]  # (T, M)
    return y[starts], t[: cfg.batch_time], y[idx]


# -------------------------------------------------------------------------------------------- training


def _options(cfg: SpiralConfig, *, training: bool = False) -> dict[str, Any] | None:
    options: dict[str, Any] = {"compile": True} if cfg.compile else {}
    if cfg.method in ADAPTIVE_METHODS:  # the evaluation spans the whole trajectory: a larger budget
        options["max_num_steps"] = cfg.max_steps * (1 if training else EVAL_BUDGET_FACTOR)
    return options or None


def _evaluate(func: nn.Module, t: torch.Tensor, true_y: torch.Tensor, cfg: SpiralConfig):
    """Full trajectory from y(0): returns ``(pred (N, 2), L1 loss, forward NFE)``."""
    with torch.no_grad(), record_stats() as stats:
        pred = odeint(
            func, true_y[0], t, rtol=cfg.rtol, atol=cfg.atol, method=cfg.method, options=_options(cfg)
        )
    return pred, float((pred - true_y).abs().mean()), stats.nfe


class _SpiralTask:
    """One minibatch step and one full-trajectory evaluation (see :class:`neuralode.experiments._trainer.Task`)."""

    def __init__(self, cfg: SpiralConfig, func, node, optimizer, t, true_y, dist=None):
        self.cfg, self.func, self.node, self.optimizer, self.t, self.true_y = (
            cfg,
            func,
            node,
            optimizer,
            t,
            true_y,
        )
        self.dist = dist if dist is not None else _Single()
        self.batch_gen = torch.Generator().manual_seed(cfg.seed)
        self.window = self._new_window()
        self.summary: dict[str, Any] = {
            "initial_loss": None,
            "best_loss": math.inf,
            "best_iter": 0,
            "nfe_eval": 0,
        }
        self.pred: torch.Tensor | None = None
        self.eval_loss, self.eval_nfe = math.nan, None

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {"n": 0, "loss": 0.0, "nfe_f": 0, "nfe_b": 0}

    def step(self, it: int) -> dict[str, Any]:
        y0b, tb, yb = _get_batch(self.t, self.true_y, self.cfg, self.batch_gen)
        part = self.dist.shard(y0b.shape[0])  # under torchrun: this process's windows of the global batch
        y0b, yb = y0b[part], yb[:, part]
        pred_b = self.node(y0b, tb)
        loss = (pred_b - yb).abs().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(self.func.parameters(), y0b.shape[0])
        self.optimizer.step()
        stats = self.node.last_stats  # its .backward filled in during loss.backward()
        rec = {"loss": loss.item(), "nfe_forward": stats.nfe, "nfe_backward": stats.nfe_backward}
        rec = self.dist.mean(rec, y0b.shape[0], self.t.device)
        w = self.window
        w["n"] += 1
        w["loss"] += rec["loss"]
        w["nfe_f"] += rec["nfe_forward"]
        w["nfe_b"] += rec["nfe_backward"]
        return rec

    def evaluate(self, done: int) -> dict[str, Any]:
        self.pred, loss, nfe = _evaluate(self.func, self.t, self.true_y, self.cfg)
        self.eval_loss, self.eval_nfe = loss, nfe
        s = self.summary
        s["nfe_eval"] += nfe
        if s["initial_loss"] is None:
            s["initial_loss"] = loss
        if loss < s["best_loss"]:
            s["best_loss"], s["best_iter"] = loss, done
        w, self.window = self.window, self._new_window()
        n = w["n"]
        return {
            "eval_l1": loss,
            "train_l1": w["loss"] / n if n else None,
            "nfe_forward_per_iter": w["nfe_f"] / n if n else None,
            "nfe_backward_per_iter": w["nfe_b"] / n if n else None,
            "nfe_eval": nfe,
        }

    def state(self) -> dict[str, Any]:
        return {
            "batch_rng": self.batch_gen.get_state(),
            "window": dict(self.window),
            "summary": dict(self.summary),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.batch_gen.set_state(state["batch_rng"])
        self.window, self.summary = dict(state["window"]), dict(state["summary"])

    def postfix(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {"loss": f"{self.eval_loss:.4f}", "batch": f"{rec['loss']:.4f}", "nfe": rec["nfe_forward"]}


@on_device
def _train(cfg: SpiralConfig, run: RunFolder, ckpt, stop, device: torch.device, dist) -> dict[str, Any]:
    write_config(
        run, "spiral", cfg, device=str(device), threads=torch.get_num_threads(), world_size=dist.world
    )
    t, true_y = make_spiral_data(cfg.data_size, cfg.t_end, device)
    seed_everything(cfg.seed)
    func = SpiralFunc(cfg.hidden).to(device)
    node = NeuralODE(
        func,
        method=cfg.method,
        rtol=cfg.rtol,
        atol=cfg.atol,
        gradient=cfg.gradient,
        options=_options(cfg, training=True),
    )
    optimizer = torch.optim.RMSprop(func.parameters(), lr=cfg.lr)
    task = _SpiralTask(cfg, func, node, optimizer, t, true_y, dist)
    trainer = Trainer(
        run, "spiral", cfg, func, optimizer, total=cfg.iters, eval_every=cfg.eval_every,
        eval_at_start=True, desc="spiral", stop=stop, dist=dist,
    )  # fmt: skip
    if ckpt is not None:
        trainer.resume(ckpt, task)
    trainer.fit(task)
    if task.pred is None:  # resumed at the end: nothing to train, evaluate once for the report
        task.pred, task.eval_loss, task.eval_nfe = _evaluate(func, t, true_y, cfg)
    s, totals, n = task.summary, trainer.totals, cfg.iters
    metrics = {
        "final_loss": task.eval_loss,
        "initial_loss": s["initial_loss"],
        "best_loss": s["best_loss"],
        "best_iter": s["best_iter"],
        "iters": n,
        "nfe_forward": totals["nfe_forward"],
        "nfe_backward": totals["nfe_backward"],
        "nfe_forward_per_iter": totals["nfe_forward"] / n,
        "nfe_backward_per_iter": totals["nfe_backward"] / n,
        "nfe_eval_final": task.eval_nfe,
        "nfe_eval_total": s["nfe_eval"],
        "wall_time_s": totals["wall_time_s"],
        "cpu_time_s": totals["cpu_time_s"],
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "world_size": dist.world,
        "torch": torch.__version__,
        "neuralode": neuralode.__version__,
    }
    run.write_json("metrics.json", metrics)
    if cfg.plots and run.main:
        write_plots(run.root, func, t, true_y, task.pred, _read_jsonl(run.path("metrics.jsonl")))
    return metrics


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_spiral(
    cfg: SpiralConfig, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train the spiral model into the run folder ``out``; returns the final metrics.

    With ``resume=True``, ``out`` must hold a checkpoint of a run with the same config (except
    :data:`RESUMABLE_FIELDS`); training continues to ``cfg.iters`` and gives the same weights, bit for
    bit, as an uninterrupted run on the same device and thread count.
    """
    return execute(SPIRAL, cfg, out, resume=resume, overwrite=overwrite)


# -------------------------------------------------------------------------------------------- plotting

PLOT_FILES = ("trajectories.png", "phase.png", "vector_field.png", "loss.png", "nfe.png")


def write_plots(
    root: str | os.PathLike,
    func: nn.Module,
    t: torch.Tensor,
    true_y: torch.Tensor,
    pred_y: torch.Tensor,
    records: list[dict[str, Any]],
    dpi: int = 150,
) -> list[Path]:
    """Write :data:`PLOT_FILES` into ``root``: x(t) and y(t) true vs learned, the phase portrait, the true
    and learned vector fields, the loss curve and the NFE per training iteration. Needs matplotlib (the ``experiments`` extra)."""
    try:
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: pip install 'neuralode[experiments]' (or pass --no-plots)"
        ) from exc

    root = Path(root)
    tt = t.detach().cpu().numpy()
    ty = true_y.detach().cpu().numpy()
    py = pred_y.detach().cpu().numpy()
    paths = [root / name for name in PLOT_FILES]

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for k, (ax, name) in enumerate(zip(axes, ("x", "y"))):
        ax.plot(tt, ty[:, k], color="black", lw=1.5, label="true")
        ax.plot(tt, py[:, k], color="tab:orange", lw=1.2, ls="--", label="learned")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right")
    axes[0].set_title("Trajectories from y(0) = (2, 0)")
    axes[1].set_xlabel("t")
    fig.savefig(paths[0], dpi=dpi)

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot(ty[:, 0], ty[:, 1], color="black", lw=1.5, label="true")
    ax.plot(py[:, 0], py[:, 1], color="tab:orange", lw=1.2, ls="--", label="learned")
    ax.plot(ty[0, 0], ty[0, 1], "o", color="black", ms=4)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_aspect("equal")
    fig.legend(loc="outside lower center", ncols=2)
    ax.set_title("Phase portrait")
    ax.grid(alpha=0.3)
    fig.savefig(paths[1], dpi=dpi)

    lim = 1.15 * max(float(abs(ty).max()), 1e-3)
    grid = torch.linspace(-lim, lim, 41)
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([gx, gy], dim=-1).to(device=true_y.device, dtype=true_y.dtype)
    with torch.no_grad():
        learned = func(torch.zeros((), dtype=pts.dtype, device=pts.device), pts).cpu()
        true_f = TrueDynamics(torch.float32)(torch.zeros(()), pts.cpu())
    speed_max = float(max(true_f.norm(dim=-1).max(), learned.norm(dim=-1).max()))
    norm = Normalize(0.0, max(speed_max, 1e-12))  # one colour scale for both panels
    fig = Figure(figsize=(10, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, field, title in ((axes[0], true_f, "true field y³·A"), (axes[1], learned, "learned field")):
        u, v = field[..., 0].numpy(), field[..., 1].numpy()
        speed = (u**2 + v**2) ** 0.5
        stream = ax.streamplot(
            gx.numpy(), gy.numpy(), u, v, color=speed, cmap="viridis", norm=norm, density=1.2, linewidth=0.8
        )
        ax.plot(ty[:, 0], ty[:, 1], color="black", lw=1.0, alpha=0.6)
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    axes[0].set_ylabel("y")
    fig.colorbar(stream.lines, ax=axes, shrink=0.8, label="speed |dy/dt|")
    fig.suptitle("Vector fields (streamlines coloured by speed; black: true trajectory)")
    fig.savefig(paths[2], dpi=dpi)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ev = [(r["iter"], r["eval_l1"]) for r in records]
    tr = [(r["iter"], r["train_l1"]) for r in records if r.get("train_l1") is not None]
    if tr:
        ax.plot(*zip(*tr), color="tab:blue", lw=1.0, alpha=0.7, label="minibatch L1 (mean since last eval)")
    if ev:
        ax.plot(*zip(*ev), color="black", lw=1.5, label="full-trajectory L1")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean |pred − true|")
    ax.set_title("Loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(paths[3], dpi=dpi)
    series = {"forward (training solve)": "nfe_forward_per_iter", "backward": "nfe_backward_per_iter"}
    if not any(r.get("nfe_backward_per_iter") for r in records):
        del series["backward"]  # direct backprop evaluates no vector field backwards
    plot_nfe(paths[4], records, series, dpi=dpi)
    return paths


# ------------------------------------------------------------------------------------------ command line


def _default_out(prefix: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{prefix}-{stamp}"
    n = 2
    while out.exists():
        out = Path("runs") / f"{prefix}-{stamp}-{n}"
        n += 1
    return out


def _headline(m: dict[str, Any]) -> str:
    return (
        f"full-trajectory L1 {m['initial_loss']:.4f} -> {m['final_loss']:.4f} "
        f"(best {m['best_loss']:.4f} at iter {m['best_iter']}); NFE forward {m['nfe_forward']} "
        f"({m['nfe_forward_per_iter']:.1f}/iter), backward {m['nfe_backward']}; "
        f"{m['wall_time_s']:.1f} s ({m['cpu_time_s']:.1f} s CPU)"
    )


SPIRAL = Experiment(
    name="spiral",
    config_cls=SpiralConfig,
    train=_train,
    default_out=lambda cfg: "runs/spiral",
    headline=_headline,
    resumable=lambda saved: RESUMABLE_FIELDS,
    distributed=True,
)
_DESCRIPTION = (
    "Learn the spiral dynamics dy/dt = y^3 A from one trajectory by backprop through the solver "
    "(torchdiffeq's ode_demo.py).\nWrites config.json, run.json, metrics.jsonl, metrics.json, checkpoint.pt "
    "and PNG plots into the run folder; the last line names the folder and the final L1 loss."
)


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``neuralode demo`` and ``neuralode train spiral`` to the command line."""
    demo = dataclasses.replace(
        SPIRAL, default_out=lambda cfg: str(_default_out("demo")), command="neuralode demo"
    )
    register_experiment(
        commands, demo, names=("demo",), help="the main job: learn the spiral dy/dt = y^3 A (minutes on a CPU)",
        description=_DESCRIPTION,
    )  # fmt: skip
    register_experiment(
        train, SPIRAL, names=("spiral",), help="the spiral demo with every option", description=_DESCRIPTION
    )
