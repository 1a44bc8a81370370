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
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import neuralode
from neuralode import GRADIENT_METHODS, SOLVERS, NeuralODE, odeint, record_stats
from neuralode._methods import TABLEAUS
from neuralode.experiments._runs import (
    RunDir,
    get_rng_state,
    load_checkpoint,
    peak_memory_mb,
    progress,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)

__all__ = ["RunFolderError", "SpiralConfig", "SpiralFunc", "make_spiral_data", "register", "train_spiral"]

#: The true dynamics matrix (row-vector convention: dy/dt = y³ @ TRUE_A).
TRUE_A = ((-0.1, 2.0), (-2.0, -0.1))
TRUE_Y0 = (2.0, 0.0)
#: Tolerances of the one float64 solve that produces the ground-truth trajectory.
TRUTH_RTOL, TRUTH_ATOL = 1e-7, 1e-9

CHECKPOINT_VERSION = 1


@dataclasses.dataclass
class SpiralConfig:
    """Everything that defines a spiral run. Defaults reproduce torchdiffeq's ``ode_demo.py``.

    Attributes:
        iters: training iterations (total, counting any resumed part).
        batch_size: windows per minibatch (distinct random start indices).
        batch_time: points per window (the model integrates over ``t[:batch_time]``).
        data_size: points of the ground-truth trajectory on ``[0, t_end]``.
        t_end: end of the time span.
        hidden: width of the hidden layer of the vector field.
        lr: RMSprop learning rate.
        method: solver for the model (one of ``neuralode.SOLVERS``); fixed-step methods step on the
            output grid.
        rtol, atol: solver tolerances for training and evaluation.
        gradient: ``"direct"`` (backprop through the solver), ``"adjoint"`` or ``"checkpoint"``.
        seed: seeds the weights and the minibatch sampler.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"`` (this problem is tiny: the CPU is
            usually faster).
        eval_every: evaluate the full trajectory (and write the checkpoint) every this many iterations.
        threads: torch intra-op threads (1 is fastest for a 2→50→2 network).
        compile: run each solver step as one ``torch.compile`` graph (``options={"compile": True}``;
            explicit Runge-Kutta methods); the first iteration pays the compilation.
    """

    iters: int = 2000
    batch_size: int = 20
    batch_time: int = 10
    data_size: int = 1000
    t_end: float = 25.0
    hidden: int = 50
    lr: float = 1e-3
    method: str = "dopri5"
    rtol: float = 1e-7
    atol: float = 1e-9
    gradient: str = "direct"
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 20
    threads: int = 1
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "batch_time", "data_size", "hidden", "eval_every", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("t_end", "lr", "rtol", "atol"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.batch_time < 2:
            raise ValueError(
                f"batch_time must be at least 2 (a window needs two points), got {self.batch_time}"
            )
        if self.batch_time >= self.data_size:
            raise ValueError(f"batch_time={self.batch_time} must be smaller than data_size={self.data_size}")
        n_starts = self.data_size - self.batch_time
        if self.batch_size > n_starts:
            raise ValueError(
                f"batch_size={self.batch_size} exceeds the {n_starts} possible window starts "
                f"(data_size - batch_time); lower batch_size or raise data_size"
            )
        if self.method not in SOLVERS:
            raise ValueError(f"method={self.method!r} is not a solver; expected one of {SOLVERS}")
        if self.gradient not in GRADIENT_METHODS:
            raise ValueError(f"gradient={self.gradient!r} is not one of {GRADIENT_METHODS}")
        if self.gradient == "checkpoint" and not hasattr(neuralode, "odeint_checkpoint"):
            raise ValueError(
                "gradient='checkpoint' needs neuralode.odeint_checkpoint, which this build does not have yet; "
                "use 'direct' or 'adjoint'"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.compile and self.method not in TABLEAUS:
            raise ValueError(
                f"compile=True needs an explicit Runge-Kutta method (one of {', '.join(TABLEAUS)}), "
                f"got {self.method!r}"
            )
        try:
            torch.device("cpu" if self.device == "auto" else self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device={self.device!r} is not a device (expected cpu, cuda, cuda:N or auto)"
            ) from exc


class RunFolderError(ValueError):
    """The run folder does not fit the request (a finished run in the way, a checkpoint too far along)."""


#: Fields a resumed run may change: they do not alter the sequence of weights.
RESUMABLE_FIELDS = ("iters", "eval_every", "device", "threads")


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


def _options(cfg: SpiralConfig) -> dict[str, Any] | None:
    return {"compile": True} if cfg.compile else None


def _evaluate(func: nn.Module, t: torch.Tensor, true_y: torch.Tensor, cfg: SpiralConfig):
    """Full trajectory from y(0): returns ``(pred (N, 2), L1 loss, forward NFE)``."""
    with torch.no_grad(), record_stats() as stats:
        pred = odeint(
            func, true_y[0], t, rtol=cfg.rtol, atol=cfg.atol, method=cfg.method, options=_options(cfg)
        )
    return pred, float((pred - true_y).abs().mean()), stats.nfe


def train_spiral(
    cfg: SpiralConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    plots: bool = True,
) -> dict[str, Any]:
    """Train the spiral model, writing the run folder ``out``; returns the final metrics.

    With ``resume=True``, ``out`` must hold a checkpoint from an earlier run with the same config
    (except :data:`RESUMABLE_FIELDS`); training continues from it to ``cfg.iters`` and gives the same
    weights, bit for bit, as an uninterrupted run on the same device and thread count.
    """
    run = RunDir(out)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    t, true_y = make_spiral_data(cfg.data_size, cfg.t_end, device)

    seed_everything(cfg.seed)
    func = SpiralFunc(cfg.hidden).to(device)
    node = NeuralODE(
        func, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol, gradient=cfg.gradient, options=_options(cfg)
    )
    optimizer = torch.optim.RMSprop(func.parameters(), lr=cfg.lr)
    batch_gen = torch.Generator().manual_seed(cfg.seed)

    counters: dict[str, Any] = {
        "nfe_forward": 0,  # training solves, summed over iterations
        "nfe_backward": 0,
        "nfe_eval": 0,
        "wall_time_s": 0.0,  # training and evaluations, summed over resumed parts
        "cpu_time_s": 0.0,  # the same span in process CPU time (steadier on a shared machine)
        "initial_loss": None,
        "best_loss": math.inf,
        "best_iter": 0,
        "metrics_lines": 0,
    }
    start = 0
    if resume:
        ckpt = load_checkpoint(run.checkpoint, map_location=device)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise RunFolderError(
                f"checkpoint {str(run.checkpoint)!r} has version {ckpt.get('version')!r}; "
                f"this code reads version {CHECKPOINT_VERSION}"
            )
        func.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        batch_gen.set_state(ckpt["batch_rng"])
        set_rng_state(ckpt["rng"])
        counters.update(ckpt["counters"])
        start = int(ckpt["iteration"])
        if cfg.iters < start:
            raise RunFolderError(
                f"iters={cfg.iters} is below the checkpoint's iteration {start} in {str(run.root)!r}; "
                f"pass --iters {start} or more"
            )
        run.truncate_jsonl("metrics.jsonl", counters["metrics_lines"])
    else:
        if run.checkpoint.exists():
            raise RunFolderError(
                f"{str(run.root)!r} already holds a run (checkpoint.pt); pass --resume {run.root} to continue it "
                "or choose another --out"
            )
        run.path("metrics.jsonl").unlink(missing_ok=True)
    run.write_json("config.json", cfg)

    def checkpoint(iteration: int) -> None:
        save_checkpoint(
            run.checkpoint,
            {
                "version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "config": dataclasses.asdict(cfg),
                "model": func.state_dict(),
                "optimizer": optimizer.state_dict(),
                "batch_rng": batch_gen.get_state(),
                "rng": get_rng_state(),
                "counters": counters,
            },
        )

    def log_eval(iteration: int, window: dict[str, float]) -> tuple[torch.Tensor, float, int]:
        pred, loss, nfe = _evaluate(func, t, true_y, cfg)
        counters["nfe_eval"] += nfe
        if counters["initial_loss"] is None:
            counters["initial_loss"] = loss
        if loss < counters["best_loss"]:
            counters["best_loss"], counters["best_iter"] = loss, iteration
        n = max(window["n"], 1)
        run.append_jsonl(
            "metrics.jsonl",
            {
                "iter": iteration,
                "eval_l1": loss,
                "train_l1": window["loss"] / n if window["n"] else None,
                "nfe_forward_per_iter": window["nfe_f"] / n if window["n"] else None,
                "nfe_backward_per_iter": window["nfe_b"] / n if window["n"] else None,
                "nfe_eval": nfe,
                "wall_time_s": counters["wall_time_s"] + (time.perf_counter() - t_start),
            },
        )
        counters["metrics_lines"] += 1
        return pred, loss, nfe

    def new_window() -> dict[str, float]:
        return {"n": 0, "loss": 0.0, "nfe_f": 0, "nfe_b": 0}

    t_start, c_start = time.perf_counter(), time.process_time()

    def _add_elapsed() -> None:
        nonlocal t_start, c_start
        now, cnow = time.perf_counter(), time.process_time()
        counters["wall_time_s"] += now - t_start
        counters["cpu_time_s"] += cnow - c_start
        t_start, c_start = now, cnow

    window = new_window()
    pred, eval_loss, eval_nfe = None, math.nan, None
    if start == 0:
        pred, eval_loss, eval_nfe = log_eval(0, window)
    bar = progress(total=cfg.iters, initial=min(start, cfg.iters), desc="spiral")
    try:
        for it in range(start + 1, cfg.iters + 1):
            y0b, tb, yb = _get_batch(t, true_y, cfg, batch_gen)
            pred_b = node(y0b, tb)
            loss = (pred_b - yb).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_loss = loss.item()
            stats = node.last_stats  # its .backward filled in during loss.backward()
            window["n"] += 1
            window["loss"] += batch_loss
            window["nfe_f"] += stats.nfe
            window["nfe_b"] += stats.nfe_backward
            counters["nfe_forward"] += stats.nfe
            counters["nfe_backward"] += stats.nfe_backward
            bar.update(1)
            if it % cfg.eval_every == 0 or it == cfg.iters:
                pred, eval_loss, eval_nfe = log_eval(it, window)
                window = new_window()
                _add_elapsed()
                checkpoint(it)
            if it % 10 == 0 or it == cfg.iters:
                bar.set_postfix(
                    loss=f"{eval_loss:.4f}",
                    batch=f"{batch_loss:.4f}",
                    nfe=stats.nfe,
                    nfe_b=stats.nfe_backward,
                )
    finally:
        bar.close()
    _add_elapsed()
    if pred is None:  # resumed at the end: nothing to train, evaluate once for the report
        pred, eval_loss, eval_nfe = _evaluate(func, t, true_y, cfg)
    iters_done = cfg.iters

    metrics = {
        "final_loss": eval_loss,
        "initial_loss": counters["initial_loss"],
        "best_loss": counters["best_loss"],
        "best_iter": counters["best_iter"],
        "iters": iters_done,
        "nfe_forward": counters["nfe_forward"],
        "nfe_backward": counters["nfe_backward"],
        "nfe_forward_per_iter": counters["nfe_forward"] / iters_done,
        "nfe_backward_per_iter": counters["nfe_backward"] / iters_done,
        "nfe_eval_final": eval_nfe,
        "nfe_eval_total": counters["nfe_eval"],
        "wall_time_s": counters["wall_time_s"],
        "cpu_time_s": counters["cpu_time_s"],
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "torch": torch.__version__,
        "neuralode": neuralode.__version__,
    }
    run.write_json("metrics.json", metrics)
    if plots:
        write_plots(run.root, func, t, true_y, pred, _read_jsonl(run.path("metrics.jsonl")))
    return metrics


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -------------------------------------------------------------------------------------------- plotting

PLOT_FILES = ("trajectories.png", "phase.png", "vector_field.png", "loss.png")


def write_plots(
    root: str | os.PathLike,
    func: nn.Module,
    t: torch.Tensor,
    true_y: torch.Tensor,
    pred_y: torch.Tensor,
    records: list[dict[str, Any]],
    dpi: int = 110,
) -> list[Path]:
    """Write :data:`PLOT_FILES` into ``root``: x(t) and y(t) true vs learned, the phase portrait, the true
    and learned vector fields, and the loss curve. Needs matplotlib (the ``experiments`` extra)."""
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
    return paths


# ------------------------------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


#: (option, config field, argparse kwargs). Defaults are None so that explicit options can be told apart
#: from defaults (needed on --resume).
_OPTIONS = (
    ("--iters", "iters", {"type": _positive_int, "help": "training iterations, in total (default 2000)"}),
    ("--batch-size", "batch_size", {"type": _positive_int, "help": "windows per minibatch (default 20)"}),
    ("--batch-time", "batch_time", {"type": _positive_int, "help": "points per window (default 10)"}),
    ("--data-size", "data_size", {"type": _positive_int, "help": "points on the trajectory (default 1000)"}),
    ("--hidden", "hidden", {"type": _positive_int, "help": "hidden width of the vector field (default 50)"}),
    ("--lr", "lr", {"type": _positive_float, "help": "RMSprop learning rate (default 1e-3)"}),
    (
        "--method",
        "method",
        {
            "choices": SOLVERS,
            "metavar": "NAME",
            "help": f"solver, one of {', '.join(SOLVERS)} (default dopri5)",
        },
    ),
    ("--rtol", "rtol", {"type": _positive_float, "help": "relative tolerance (default 1e-7)"}),
    ("--atol", "atol", {"type": _positive_float, "help": "absolute tolerance (default 1e-9)"}),
    ("--gradient", "gradient", {"choices": GRADIENT_METHODS, "help": "gradient method (default direct)"}),
    ("--seed", "seed", {"type": int, "help": "random seed (default 0)"}),
    ("--device", "device", {"help": "cpu, cuda, cuda:N or auto (default cpu: the model is tiny)"}),
    (
        "--eval-every",
        "eval_every",
        {"type": _positive_int, "help": "evaluate and checkpoint every N iterations (default 20)"},
    ),
    ("--threads", "threads", {"type": _positive_int, "help": "torch CPU threads (default 1)"}),
    (
        "--compile",
        "compile",
        {
            "action": "store_true",
            "help": "each solver step as one torch.compile graph (explicit RK methods; the first iteration compiles)",
        },
    ),
)


def _add_options(parser: argparse.ArgumentParser, prefix: str) -> None:
    for flag, field, kw in _OPTIONS:
        parser.add_argument(flag, dest=field, default=None, **kw)
    parser.add_argument(
        "--out",
        default=None,
        help=f"run folder (default runs/{prefix}-<timestamp>; with --resume, that folder)",
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR from its checkpoint"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(func=_run_command, _parser=parser, _prefix=prefix)


def _default_out(prefix: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{prefix}-{stamp}"
    n = 2
    while out.exists():
        out = Path("runs") / f"{prefix}-{stamp}-{n}"
        n += 1
    return out


def config_from_args(args: argparse.Namespace) -> tuple[SpiralConfig, Path, bool]:
    """Turn parsed options into ``(config, run folder, resume)``; raises ``ValueError`` on bad values."""
    explicit = {field: getattr(args, field) for _, field, _ in _OPTIONS if getattr(args, field) is not None}
    if args.resume is None:
        return SpiralConfig(**explicit), Path(args.out) if args.out else _default_out(args._prefix), False
    root = Path(args.resume)
    if root.name == "checkpoint.pt":
        root = root.parent
    if args.out is not None and Path(args.out).resolve() != root.resolve():
        raise ValueError(
            f"--out {args.out} differs from --resume {args.resume}; a resumed run stays in its folder"
        )
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--resume {args.resume}: no config.json there; expected a spiral run folder")
    import json

    saved = json.loads(config_file.read_text())
    known = {f.name for f in dataclasses.fields(SpiralConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"--resume {args.resume}: config.json has unknown fields {unknown}")
    for field, value in explicit.items():
        if field not in RESUMABLE_FIELDS and value != saved.get(field):
            raise ValueError(
                f"--{field.replace('_', '-')} {value} differs from the resumed run's {field}={saved.get(field)!r}; "
                f"a resumed run keeps its config (only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE_FIELDS)} may change)"
            )
    return SpiralConfig(**{**saved, **explicit}), root, True


def _run_command(args: argparse.Namespace) -> int:
    try:
        cfg, out, resume = config_from_args(args)
        resolve_device(cfg.device)  # e.g. --device cuda on a machine without CUDA
    except ValueError as exc:
        args._parser.error(str(exc))  # prints usage and the message, exits with status 2
    print(f"spiral: run folder {out}" + (" (resumed)" if resume else ""), flush=True)
    try:
        metrics = train_spiral(cfg, out, resume=resume, plots=not args.no_plots)
    except (RunFolderError, FileNotFoundError) as exc:
        args._parser.error(str(exc))
    print(
        f"spiral: full-trajectory L1 {metrics['initial_loss']:.4f} -> {metrics['final_loss']:.4f} "
        f"(best {metrics['best_loss']:.4f} at iter {metrics['best_iter']}); "
        f"NFE forward {metrics['nfe_forward']} ({metrics['nfe_forward_per_iter']:.1f}/iter), "
        f"backward {metrics['nfe_backward']}; {metrics['wall_time_s']:.1f} s ({metrics['cpu_time_s']:.1f} s CPU); results in {out}",
        flush=True,
    )
    return 0


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``neuralode demo`` and ``neuralode train spiral`` to the command line."""
    demo = commands.add_parser(
        "demo",
        help="the main job: learn the spiral dy/dt = y³·A (a few minutes on a CPU)",
        description="Learn the spiral dynamics dy/dt = y³·A from one trajectory by backprop through the "
        "solver (torchdiffeq's ode_demo.py). Writes config.json, metrics.jsonl, metrics.json, "
        "checkpoint.pt and PNG plots into the run folder.",
    )
    _add_options(demo, "demo")
    spiral = train.add_parser(
        "spiral",
        help="the spiral demo with every option",
        description="Learn the spiral dynamics dy/dt = y³·A from one trajectory (same as `neuralode demo`).",
    )
    _add_options(spiral, "spiral")
