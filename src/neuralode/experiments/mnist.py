"""MNIST classification (paper Table 1 and Figure 3): ``neuralode train mnist``, ``neuralode figure3``,
``neuralode table1``.

Recipe (authors' code, EXPERIMENTS.md §2.4): SGD with momentum 0.9, batch 128 (drop last), learning rate
``lr * batch / 128`` with ``lr = 0.1``, piecewise constant ×1, ×0.1, ×0.01, ×0.001 with boundaries at 60/160,
100/160 and 140/160 of the run (so the schedule scales with ``--epochs``; set every iteration),
RandomCrop(28, padding 4) on training images. Unlike the authors' code, the model is selected on a
validation split held out of the training file (default 5 000 images); the test set is evaluated once,
at the end, with the selected weights.

Run folder: ``config.json``, ``metrics.jsonl`` (one line per epoch), ``iterations.jsonl`` (every
``log_every`` steps: loss, forward/backward NFE, lr), ``checkpoint.pt`` (latest state, written atomically
every ``checkpoint_every`` steps and at each epoch end), ``best.pt`` (weights with the lowest validation
error), ``metrics.json`` (final numbers) and ``training.png``.

Determinism: the batch order of epoch ``e`` and the crop offsets of step ``k`` come from generators seeded
by ``(seed, e)`` and ``(seed, e, k)``, so a run resumed from any checkpoint repeats the same steps and ends
with bit-identical weights (same device and thread count). Under ``torchrun`` every process draws the same
global batch and keeps its slice, so ``N`` processes see the same data as one process with the same global
batch. Adaptive solvers choose their steps from the error of the batch they integrate, so with
``dopri5`` each process's solve (and hence its gradient) can differ slightly from the one-process solve
of the whole batch; with a fixed-step solver the two agree to rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuralode import ADAPTIVE_METHODS, GRADIENT_METHODS, SOLVERS, record_stats
from neuralode.datasets import mnist as data
from neuralode.experiments._config import (
    UsageError,
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    opt,
)
from neuralode.experiments._runs import (
    check_device_name,
    load_checkpoint,
    peak_memory_mb,
    progress,
    resolve_device,
    save_checkpoint,
    seed_everything,
)
from neuralode.experiments._trainer import (
    Experiment,
    RunFolder,
    StopSignal,
    Trainer,
    _Single,
    eval_device,
    execute,
    load_run_config,
    read_weights,
    register_experiment,
    start_distributed,
    write_config,
)
from neuralode.experiments._trainer import (
    register_eval as _register_eval,
)
from neuralode.models.odenet import MODELS, ODENet, build_model, count_parameters

__all__ = [
    "MNIST", "PAPER_TABLE1", "MNISTConfig", "evaluate_run", "figure3", "lr_at", "register", "table1", "train",
]  # fmt: skip

# Paper Table 1 (test error, parameters).
PAPER_TABLE1 = {
    "mlp": ("1-layer MLP", "1.60%", "0.24 M", "-", "-"),
    "resnet": ("ResNet", "0.41%", "0.60 M", "O(L)", "O(L)"),
    "rknet": ("RK-Net", "0.47%", "0.22 M", "O(L~)", "O(L~)"),
    "odenet": ("ODE-Net", "0.42%", "0.22 M", "O(1)", "O(L~)"),
    "downsample": ("Downsampling + head (ablation)", "-", "-", "-", "-"),
}

PLOT_DPI = 150
LR_BOUNDARIES = (60 / 160, 100 / 160, 140 / 160)
LR_DECAYS = (1.0, 0.1, 0.01, 0.001)
LR_SCHEDULES = ("paper", "onecycle", "constant")


@dataclasses.dataclass
class MNISTConfig:
    """Everything a run depends on (written to ``config.json``)."""

    model: str = opt("odenet", "classifier", choices=MODELS)
    dataset: str = opt("mnist", "data set", choices=sorted(data.DATASETS))
    data_dir: str | None = opt(
        None,
        "folder with the four IDX .gz files (none: $NEURALODE_DATA/<dataset> or ~/.cache/neuralode/<dataset>)",
    )
    download: bool = opt(False, "fetch missing files into --data-dir first (needs internet)")
    epochs: int = opt(160, "training epochs (the LR schedule scales with it)")
    train_size: int | None = opt(None, "train on this many images (none: all but the validation split)")
    val_size: int = opt(5000, "validation images held out of the training file (0: select the last epoch)")
    test_size: int | None = opt(None, "evaluate on the first N test images (none: all 10 000)")
    batch_size: int = opt(128, "global batch (split across processes under torchrun)")
    lr: float = opt(0.1, "base learning rate for batch 128 (scaled by batch/128)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "SGD weight decay")
    lr_schedule: str = opt(
        "paper",
        "paper: x0.1 at 60/160, 100/160, 140/160 of the run; onecycle: linear warm-up over the first"
        " --warmup of the run, then cosine to zero (made for short runs); constant: no decay",
        choices=LR_SCHEDULES,
    )
    warmup: float = opt(0.15, "onecycle: fraction of the run spent warming up from lr/25 to lr")
    rtol: float = opt(1e-3, "forward relative tolerance")
    atol: float = opt(1e-3, "forward absolute tolerance")
    adjoint_tol: float | None = opt(None, "backward rtol = atol (none: the forward tolerances)")
    gradient: str | None = opt(
        None, "direct, adjoint or checkpoint (none: adjoint for odenet, direct for rknet)"
    )
    method: str = opt(
        "dopri5", "ODE solver (fixed-step ones need --step-size)", aliases=("--solver",), metavar="NAME"
    )
    step_size: float | None = opt(None, "step of fixed-step solvers")
    max_steps: int = opt(1000, "work budget: solver steps per solve (adaptive methods); more is divergence")
    seminorm: bool = opt(False, "adjoint error norm over the state only")
    downsampling: str = opt("conv", "downsampling block", choices=("conv", "res"))
    channels: int = opt(64, "feature channels (64 in the paper; smaller only for tests)")
    augment: bool = opt(True, "RandomCrop(28, padding 4) on training images", aliases=("--no-augment",))
    seed: int = opt(0, "random seed (weights, batch order, crops, validation split)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (CUDA when present)")
    threads: int | None = opt(None, "torch intra-op threads (none: torch's default)")
    eval_batch_size: int = opt(1000, "batch size of the validation and test passes")
    checkpoint_every: int = opt(50, "iterations between checkpoints (and one at each epoch end)")
    log_every: int = opt(10, "iterations between iterations.jsonl lines")
    plots: bool = opt(True, "write training.png at the end")

    def __post_init__(self) -> None:
        check_choice(self, "model", MODELS)
        check_choice(self, "dataset", sorted(data.DATASETS))
        check_choice(self, "lr_schedule", LR_SCHEDULES)
        if not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"warmup={self.warmup} must be a fraction of the run in [0, 1)")
        check_positive_int(self, "epochs", "batch_size", "eval_batch_size", "checkpoint_every", "log_every")
        check_positive_int(self, "channels", "max_steps")
        check_positive_int(self, "train_size", "test_size", "threads", allow_none=True)
        check_nonneg_int(self, "val_size")
        check_positive_float(self, "lr", "rtol", "atol")
        check_positive_float(self, "adjoint_tol", "step_size", allow_none=True)
        check_nonneg_float(self, "momentum", "weight_decay")
        if self.gradient is not None:
            check_choice(self, "gradient", GRADIENT_METHODS)
        if self.method not in SOLVERS:
            raise UsageError(f"method={self.method!r} is not a solver; expected one of {SOLVERS}")
        if self.model == "rknet" and self.gradient not in (None, "direct"):
            raise UsageError(
                f"rknet trains by backprop through the solver; gradient must be 'direct', got {self.gradient!r}"
            )
        n_train = self.train_size if self.train_size is not None else 60_000 - self.val_size
        if self.val_size >= 60_000 or n_train < 1:
            raise UsageError(f"val-size={self.val_size} leaves no training images out of 60000")
        if self.batch_size > n_train:
            raise UsageError(f"batch-size={self.batch_size} is larger than the {n_train} training images")
        check_device_name(self.device)

    def validate(self) -> None:
        """Kept for callers of the earlier API: the config validates itself when it is made."""
        self.__post_init__()


def lr_at(step: int, steps_per_epoch: int, cfg: MNISTConfig) -> float:
    """Learning rate at global step ``step``: ``lr * batch/128`` times the schedule's factor.

    ``"paper"``: piecewise constant, x0.1 at 60/160, 100/160 and 140/160 of the run. ``"onecycle"``: linear
    from 1/25 to 1 over the first ``warmup`` of the run, then a cosine from 1 to 0 at the last step.
    ``"constant"``: 1.
    """
    base = cfg.lr * cfg.batch_size / 128
    if cfg.lr_schedule == "constant":
        return base
    total = cfg.epochs * steps_per_epoch
    if cfg.lr_schedule == "onecycle":
        n_warm = int(cfg.warmup * total)
        if step < n_warm:
            return base * (1 / 25 + (1 - 1 / 25) * step / n_warm)
        frac = (step - n_warm) / max(total - n_warm, 1)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    epoch = step / steps_per_epoch
    k = sum(epoch >= b * cfg.epochs for b in LR_BOUNDARIES)
    return base * LR_DECAYS[k]


def make_model(cfg: MNISTConfig) -> nn.Module:
    if cfg.model in ("odenet", "rknet"):
        options: dict[str, Any] | None = {"step_size": cfg.step_size} if cfg.step_size is not None else None
        if cfg.method in ADAPTIVE_METHODS:
            options = {**(options or {}), "max_num_steps": cfg.max_steps}
        adjoint_options = dict(options or {})
        if cfg.seminorm:
            adjoint_options["norm"] = "seminorm"
        kw: dict[str, Any] = dict(
            channels=cfg.channels,
            downsampling=cfg.downsampling,
            method=cfg.method,
            rtol=cfg.rtol,
            atol=cfg.atol,
            adjoint_rtol=cfg.adjoint_tol,
            adjoint_atol=cfg.adjoint_tol,
            options=options,
            adjoint_options=adjoint_options or None,
        )
        if cfg.gradient is not None:
            kw["gradient"] = cfg.gradient
        return build_model(cfg.model, **kw)
    if cfg.model in ("resnet", "downsample"):
        return build_model(cfg.model, channels=cfg.channels, downsampling=cfg.downsampling)
    return build_model("mlp")


def _odefunc(model: nn.Module):
    m = getattr(model, "module", model)  # unwrap DDP
    return m.odefunc if isinstance(m, ODENet) else None


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (for per-epoch and per-step generators)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the ``n`` training images used in ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))


def global_batch(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, cfg: MNISTConfig, epoch: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of step ``step`` of ``epoch`` (whole global batch, augmented if configured)."""
    idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
    xb, yb = x[idx], y[idx]
    if cfg.augment:
        xb = data.random_crop(xb, 4, torch.Generator().manual_seed(_mix(cfg.seed, epoch, step, 1)))
    return xb, yb


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a global batch whose size is divisible by ``world``."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: MNISTConfig,
    device: torch.device,
    dist,
    desc: str = "",
):
    """Mean loss, error rate and mean forward NFE per batch over ``(x, y)`` (sharded across processes)."""
    model.eval()
    idx = torch.arange(dist.rank, x.shape[0], dist.world)
    loss_sum = wrong = count = nfe_sum = batches = 0.0
    starts = range(0, idx.numel(), cfg.eval_batch_size)
    bar = progress(total=len(starts), desc=desc, leave=False) if dist.main and desc else None
    for start in starts:
        b = idx[start : start + cfg.eval_batch_size]
        xb, yb = x[b].to(device), y[b].to(device)
        with record_stats() as stats:
            logits = model(xb)
        nfe_sum += stats.nfe
        batches += 1
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        wrong += (logits.argmax(1) != yb).sum().item()
        count += yb.numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    loss_sum, wrong, count, nfe_sum, batches = dist.sum([loss_sum, wrong, count, nfe_sum, batches], device)
    model.train()
    return {
        "loss": loss_sum / max(count, 1),
        "error": wrong / max(count, 1),
        "nfe": nfe_sum / max(batches, 1),
    }


def _resolve_data_dir(cfg: MNISTConfig, dist=None) -> Path:
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else data.default_data_dir(cfg.dataset)
    if cfg.download and (dist is None or dist.main):  # one process downloads, the others wait
        data.download(root, cfg.dataset)
    if dist is not None:
        dist.barrier()
    return root


class _MNISTTask:
    """SGD on one global batch per iteration (each process keeps its shard); validation at epoch ends."""

    def __init__(self, cfg: MNISTConfig, model, ddp_model, optimizer, splits, device, dist, out: Path):
        self.cfg, self.model, self.ddp_model, self.opt = cfg, model, ddp_model, optimizer
        self.splits, self.device, self.dist, self.out = splits, device, dist, out
        self.n_train = splits.train_x.shape[0]
        self.spe = self.n_train // cfg.batch_size
        self.trainer: Trainer | None = None
        self.acc = _zero_acc()
        self.best = {"val_error": float("inf"), "epoch": -1}
        self._order: tuple[int, torch.Tensor] | None = None
        self._t = time.perf_counter()
        self.baseline_mb = _reset_peak_rss()
        self.train_peak_mb: float | None = None

    def step(self, gstep: int) -> dict[str, Any]:
        cfg, dist, device = self.cfg, self.dist, self.device
        epoch, step = divmod(gstep, self.spe)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n_train, cfg.seed, epoch))
        if step == 0:
            self.acc = _zero_acc()
            self._t = time.perf_counter()
        lr = lr_at(gstep, self.spe, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        xb, yb = global_batch(self.splits.train_x, self.splits.train_y, self._order[1], cfg, epoch, step)
        xb, yb = shard(xb, dist.rank, dist.world).to(device), shard(yb, dist.rank, dist.world).to(device)
        self.opt.zero_grad(set_to_none=True)
        with record_stats() as stats:
            logits = self.ddp_model(xb)
        loss = F.cross_entropy(logits, yb)
        loss.backward()
        self.opt.step()
        wrong = (logits.argmax(1) != yb).sum().item()
        red = dist.sum([loss.item() * yb.numel(), wrong, yb.numel(), stats.nfe, stats.backward.nfe], device)
        for k, v in zip(("loss_sum", "wrong", "count", "nfe_f", "nfe_b"), red):
            self.acc[k] += v
        self.acc["steps"] += 1
        now = time.perf_counter()
        self.acc["time"] += now - self._t
        self._t = now
        nproc = dist.world
        rec = {"loss": red[0] / red[2], "error": red[1] / red[2], "nfe_forward": red[3] / nproc,
               "nfe_backward": red[4] / nproc}  # fmt: skip
        if (step + 1) % cfg.log_every == 0 or step + 1 == self.spe:
            self.trainer.log(
                "iterations.jsonl",
                {"epoch": epoch, "step": step + 1, "global_step": gstep + 1,
                 "epoch_float": epoch + (step + 1) / self.spe, **rec, "lr": lr},
            )  # fmt: skip
        return rec

    def evaluate(self, done: int) -> dict[str, Any]:
        cfg, splits, acc = self.cfg, self.splits, self.acc
        epoch = done // self.spe
        if self.train_peak_mb is None:  # training steps only: before any evaluation with its larger batches
            self.train_peak_mb = _train_peak_mb(self.device, self.baseline_mb)
        val = (
            evaluate(self.model, splits.val_x, splits.val_y, cfg, self.device, self.dist, desc="validation")
            if splits.val_x.shape[0]
            else {"loss": float("nan"), "error": float("nan"), "nfe": float("nan")}
        )
        row = {
            "epoch": epoch,
            "train_loss": acc["loss_sum"] / acc["count"],
            "train_error": acc["wrong"] / acc["count"],
            "val_loss": val["loss"],
            "val_error": val["error"],
            "val_nfe_forward": val["nfe"],
            "nfe_forward": acc["nfe_f"] / acc["steps"] / self.dist.world,
            "nfe_backward": acc["nfe_b"] / acc["steps"] / self.dist.world,
            "lr": lr_at(epoch * self.spe - 1, self.spe, cfg),
            "epoch_time_s": acc["time"],
            "images_per_s": acc["count"] / max(acc["time"], 1e-9),
        }
        if not splits.val_x.shape[0] or val["error"] <= self.best["val_error"]:
            self.best = {"val_error": val["error"], "epoch": epoch}
            if self.dist.main:
                save_checkpoint(self.out / "best.pt", {"model": self.model.state_dict(), "epoch": epoch})
        if self.dist.main:
            print(
                f"epoch {epoch}: train loss {row['train_loss']:.4f} error {row['train_error']:.4f}, "
                f"val error {row['val_error']:.4f}, NFE fwd {row['nfe_forward']:.1f} "
                f"bwd {row['nfe_backward']:.1f}, {row['epoch_time_s']:.0f} s",
                file=sys.stderr,
            )
        return row

    def state(self) -> dict[str, Any]:
        return {"acc": dict(self.acc), "best": dict(self.best)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.acc, self.best = dict(state["acc"]), dict(state["best"])

    def postfix(self, rec: dict[str, Any]) -> dict[str, Any]:
        a = self.acc
        return {"loss": f"{a['loss_sum'] / a['count']:.3f}",
                "acc": f"{1 - a['wrong'] / a['count']:.3f}", "nfe_f": f"{rec['nfe_forward']:.0f}",
                "nfe_b": f"{rec['nfe_backward']:.0f}"}  # fmt: skip


def _setup_device(cfg: MNISTConfig) -> tuple[torch.device, Any]:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device, dist = start_distributed(resolve_device(cfg.device))
    if cfg.batch_size % dist.world:
        dist.close()
        raise UsageError(
            f"batch-size={cfg.batch_size} must be divisible by the number of processes ({dist.world})"
        )
    return device, dist


def _train_run(
    cfg: MNISTConfig, run: RunFolder, ckpt: dict | None, stop: StopSignal | None
) -> dict[str, Any]:
    device, dist = _setup_device(cfg)
    try:
        return _train(cfg, run, ckpt, stop, device, dist)
    finally:
        dist.close()


def _train(cfg, run: RunFolder, ckpt, stop, device: torch.device, dist: Any) -> dict[str, Any]:
    out = run.root
    splits = data.load_splits(
        _resolve_data_dir(cfg, dist), name=cfg.dataset, val_size=cfg.val_size, train_size=cfg.train_size,
        test_size=cfg.test_size, seed=cfg.seed,
    )  # fmt: skip
    n_train = splits.train_x.shape[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cfg.seed)
    model = make_model(cfg).to(device)
    n_params = count_parameters(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    spe = n_train // cfg.batch_size
    write_config(
        run, "mnist", cfg, device=str(device), threads=torch.get_num_threads(), params=n_params,
        world_size=dist.world, n_train=n_train, steps_per_epoch=spe,
    )  # fmt: skip
    if dist.main:
        print(
            f"{cfg.model}: {n_params:,} parameters; {n_train} train / {splits.val_x.shape[0]} validation / "
            f"{splits.test_x.shape[0]} test images; {dist.world} process(es); device {device}",
            file=sys.stderr,
        )
    ddp_model: nn.Module = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    task = _MNISTTask(cfg, model, ddp_model, optimizer, splits, device, dist, out)
    trainer = Trainer(
        run, "mnist", cfg, model, optimizer, total=cfg.epochs * spe, eval_every=spe,
        checkpoint_every=cfg.checkpoint_every, desc=f"{cfg.model}", stop=stop, dist=dist,
    )  # fmt: skip
    task.trainer = trainer
    if ckpt is not None:
        trainer.resume(ckpt, task)
    model.train()
    trainer.fit(task)

    # Test once, with the weights selected on validation.
    dist.barrier()
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    best_ckpt = load_checkpoint(out / "best.pt", map_location=device)
    model.load_state_dict(best_ckpt["model"])
    t_test = time.perf_counter()
    test = evaluate(model, splits.test_x, splits.test_y, cfg, device, dist, desc="test")
    test_time = time.perf_counter() - t_test
    model.load_state_dict(final_state)
    history = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()] if dist.main else []
    last = history[-1] if history else {}
    metrics = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "test_error": test["error"],
        "test_loss": test["loss"],
        "test_nfe_forward": test["nfe"],
        "test_time_s": test_time,
        "val_error": task.best["val_error"],
        "selected_epoch": best_ckpt["epoch"],
        "epochs": cfg.epochs,
        "params": n_params,
        "nfe_forward": last.get("nfe_forward", 0.0),
        "nfe_backward": last.get("nfe_backward", 0.0),
        "wall_time_s": trainer.totals["wall_time_s"],
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        "images_per_s": last.get("images_per_s"),
        **_memory(device, task.baseline_mb, task.train_peak_mb),
        "world_size": dist.world,
        "n_train": n_train,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if dist.main:
        run.write_json("metrics.json", metrics)
        if cfg.plots:
            _plot_training(out, history)
    return metrics


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    device: str | None = None,
    threads: int | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Test metrics of a finished run folder: its selected weights (``best.pt``, loaded with
    ``weights_only=True``) on the test split its ``config.json`` names. Returns ``test_error``,
    ``test_loss`` and ``test_nfe_forward``, equal to the run's ``metrics.json`` entries on the same
    device and thread count. ``data_dir`` overrides the run's data folder."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, "mnist", MNISTConfig)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    cfg = dataclasses.replace(cfg, download=False)
    _check(cfg)
    dev = eval_device(device, cfg)
    if threads or cfg.threads:
        torch.set_num_threads(threads or cfg.threads)
    weights, saved = read_weights(run_dir / "best.pt", "mnist")
    model = make_model(cfg).to(dev)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UsageError(f"{str(run_dir / 'best.pt')!r} does not fit the run's model: {exc}") from None
    splits = data.load_splits(
        _resolve_data_dir(cfg), name=cfg.dataset, val_size=cfg.val_size, train_size=cfg.train_size,
        test_size=cfg.test_size, seed=cfg.seed,
    )  # fmt: skip
    print(
        f"mnist: {cfg.model} from {run_dir / 'best.pt'} (epoch {saved.get('epoch')}), "
        f"{splits.test_x.shape[0]} test images, device {dev}, {torch.get_num_threads()} thread(s)",
        file=sys.stderr,
    )
    test = evaluate(model, splits.test_x, splits.test_y, cfg, dev, _Single(), desc="test")
    return {"test_error": test["error"], "test_loss": test["loss"], "test_nfe_forward": test["nfe"]}


def train(
    cfg: MNISTConfig, out: str | os.PathLike = "runs/mnist", *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train, select on validation, test once; returns the final metrics (also in ``out/metrics.json``)."""
    return execute(MNIST, cfg, out, resume=resume, overwrite=overwrite)


def _reset_peak_rss() -> float | None:
    """Linux: reset this process's peak RSS (VmHWM) and return the current RSS in MiB; ``None`` elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_mb("VmRSS")
    except OSError:
        return None


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _train_peak_mb(device: torch.device, baseline_mb: float | None) -> float | None:
    """Memory the training steps needed: CUDA allocator peak, or (Linux CPU) peak RSS minus the RSS after
    data loading. Read at the end of the first epoch's steps, before any evaluation."""
    if device.type == "cuda":
        return peak_memory_mb(device)
    hwm = _proc_status_mb("VmHWM") if baseline_mb is not None else None
    return None if hwm is None else hwm - baseline_mb


def _memory(device: torch.device, baseline_mb: float | None, train_peak_mb: float | None) -> dict[str, Any]:
    """``train_memory_mb``: see :func:`_train_peak_mb` (model, optimizer, activations and solver state of
    the training steps, without the in-memory dataset). ``peak_memory_mb``: the whole run's peak (CUDA
    allocator, or the process's peak RSS since the data was loaded, which includes the dataset and the
    evaluation batches)."""
    if device.type == "cuda":
        return {
            "peak_memory_mb": peak_memory_mb(device),
            "train_memory_mb": train_peak_mb,
            "memory_kind": "CUDA allocator peak",
        }
    hwm = _proc_status_mb("VmHWM") if baseline_mb is not None else None
    if hwm is None:
        return {
            "peak_memory_mb": peak_memory_mb(device),
            "train_memory_mb": None,
            "memory_kind": "process peak RSS (rank 0)",
        }
    return {
        "peak_memory_mb": hwm,
        "train_memory_mb": train_peak_mb,
        "baseline_memory_mb": baseline_mb,
        "memory_kind": "training steps: peak RSS minus RSS after data loading (rank 0, first epoch)",
    }


def _zero_acc() -> dict[str, float]:
    return {
        "loss_sum": 0.0,
        "wrong": 0.0,
        "count": 0.0,
        "nfe_f": 0.0,
        "nfe_b": 0.0,
        "steps": 0.0,
        "time": 0.0,
    }


def _plot_training(out: Path, history: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    its = (
        [json.loads(s) for s in (out / "iterations.jsonl").read_text().splitlines()]
        if (out / "iterations.jsonl").exists()
        else []
    )
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    if its:
        ef = [r["epoch_float"] for r in its]
        axes[0].plot(ef, [r["loss"] for r in its], lw=0.8, label="train loss (batch)")
        axes[1].plot(ef, [r["nfe_forward"] for r in its], lw=0.8, label="forward NFE")
        axes[1].plot(ef, [r["nfe_backward"] for r in its], lw=0.8, label="backward NFE")
    if history:
        axes[0].plot(
            [h["epoch"] for h in history], [h["val_loss"] for h in history], "o-", label="validation loss"
        )
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("loss", "NFE per iteration")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=PLOT_DPI)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- figure 3


def figure3(
    run_dir: str | os.PathLike,
    *,
    tols: tuple[float, ...] = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5),
    n_images: int = 256,
    ref_tol: float = 1e-9,
    repeats: int = 3,
    out: str | os.PathLike | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """The paper's Figure 3 panels from a trained ODE-Net run folder.

    (a) forward NFE against numerical error, over ``tols``: error = mean over ``n_images`` validation images
        of ``‖h_tol(1) − h_ref(1)‖ / ‖h_ref(1)‖``, the reference solved in float64 at ``ref_tol``;
    (b) wall time of the forward solve against forward NFE (median of ``repeats``);
    (c) backward (adjoint) against forward NFE: every logged training iteration, plus the tolerance sweep;
    (d) forward NFE over training epochs (logged iterations and per-epoch means).
    Writes ``figure3.json``, ``figure3.png`` and one PNG per panel into ``out`` (default: the run folder).
    """
    from neuralode import odeint

    run_dir = Path(run_dir)
    cfgd = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(MNISTConfig)}
    cfg = MNISTConfig(**{k: v for k, v in cfgd.items() if k in fields})  # validates
    if cfg.model not in ("odenet", "rknet"):
        raise ValueError(f"figure3 needs an ODE-Net run; {str(run_dir)!r} trained model={cfg.model!r}")
    if data_dir is not None:
        cfg.data_dir = data_dir
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "checkpoint.pt"
    cfg.device = "cpu" if cfg.device == "auto" and not torch.cuda.is_available() else cfg.device
    device = resolve_device(cfg.device)
    model = make_model(cfg).to(device)
    model.load_state_dict(load_checkpoint(ckpt_path, map_location=device)["model"])
    model.eval()
    splits = data.load_splits(
        _resolve_data_dir(cfg),
        name=cfg.dataset,
        val_size=cfg.val_size,
        train_size=cfg.train_size,
        seed=cfg.seed,
    )
    src_x, src_y = (splits.val_x, splits.val_y) if splits.val_x.shape[0] else (splits.train_x, splits.train_y)
    x, y = src_x[:n_images].to(device), src_y[:n_images].to(device)
    func = model.odefunc
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    with torch.no_grad():
        h0 = model.features(x)
        func64 = make_model(cfg).to(device).double().odefunc
        func64.load_state_dict(func.state_dict())
        ref = odeint(func64, h0.double(), t, rtol=ref_tol, atol=ref_tol, method="dopri5")[-1]
    ref_flat = ref.flatten(1)
    sweep = []
    for tol in tols:
        with torch.no_grad():
            times = []
            for _ in range(repeats):
                func.nfe = 0
                t0 = time.perf_counter()
                h1 = odeint(func, h0, t, rtol=tol, atol=tol, method="dopri5")[-1]
                times.append(time.perf_counter() - t0)
            nfe_f = func.nfe  # the same every repeat (deterministic)
            err = ((h1.double().flatten(1) - ref_flat).norm(dim=1) / ref_flat.norm(dim=1)).mean().item()
            wrong = (model.head(h1).argmax(1) != y).float().mean().item()
        # backward NFE of the adjoint at this tolerance (a fresh model view with these tolerances)
        model.ode.rtol = model.ode.atol = tol
        model.ode.adjoint_rtol = model.ode.adjoint_atol = tol
        grad_mode, model.ode.gradient = model.ode.gradient, "adjoint"
        h0g = h0.detach().requires_grad_(True)
        func.nfe = 0
        logits = model.head(model.ode(h0g))
        nfe_fg = func.nfe
        func.nfe = 0
        F.cross_entropy(logits, y).backward()
        nfe_b = func.nfe
        model.ode.gradient = grad_mode
        model.zero_grad(set_to_none=True)
        sweep.append(
            {
                "tol": tol,
                "nfe_forward": nfe_f,
                "rel_error": err,
                "time_s": sorted(times)[len(times) // 2],
                "error_rate": wrong,
                "adjoint_nfe_forward": nfe_fg,
                "adjoint_nfe_backward": nfe_b,
            }
        )
        print(
            f"tol {tol:.0e}: NFE {nfe_f}, rel. error {err:.2e}, {sweep[-1]['time_s'] * 1e3:.0f} ms, "
            f"adjoint NFE fwd {nfe_fg} bwd {nfe_b}",
            file=sys.stderr,
        )
    its = (
        [json.loads(s) for s in (run_dir / "iterations.jsonl").read_text().splitlines()]
        if (run_dir / "iterations.jsonl").exists()
        else []
    )
    epochs = (
        [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if (run_dir / "metrics.jsonl").exists()
        else []
    )
    result = {
        "run": str(run_dir),
        "checkpoint": ckpt_path.name,
        "n_images": int(x.shape[0]),
        "ref_tol": ref_tol,
        "images": "validation" if splits.val_x.shape[0] else "train",
        "sweep": sweep,
        "training": [{k: r[k] for k in ("epoch_float", "nfe_forward", "nfe_backward", "loss")} for r in its],
        "epochs": [{k: r[k] for k in ("epoch", "nfe_forward", "nfe_backward")} for r in epochs],
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    (out / "figure3.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot_figure3(out, result)
    return result


def _plot_figure3(out: Path, r: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw, tr, ep = r["sweep"], r["training"], r["epochs"]

    def panel_a(ax):
        ax.semilogx([s["rel_error"] for s in sw], [s["nfe_forward"] for s in sw], "o-")
        for s in sw:
            ax.annotate(f"{s['tol']:.0e}", (s["rel_error"], s["nfe_forward"]), fontsize=6)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("numerical error (relative, vs reference)")
        ax.set_ylabel("forward NFE")
        ax.set_title("(a) NFE vs error")

    def panel_b(ax):
        ax.plot([s["nfe_forward"] for s in sw], [s["time_s"] * 1e3 for s in sw], "o-")
        ax.set_xlabel("forward NFE")
        ax.set_ylabel("wall time of forward solve (ms)")
        ax.set_title(f"(b) time vs NFE ({r['n_images']} images)")

    def panel_c(ax):
        if (
            tr
        ):  # many iterations share an (NFE forward, NFE backward) pair: one marker per pair, sized by count
            pairs: dict[tuple[float, float], int] = {}
            for p in tr:
                key = (p["nfe_forward"], p["nfe_backward"])
                pairs[key] = pairs.get(key, 0) + 1
            ax.scatter(
                [k[0] for k in pairs],
                [k[1] for k in pairs],
                s=[10 + 60 * c / len(tr) for c in pairs.values()],
                alpha=0.6,
                label="training iterations",
            )
            for (f, b), c in pairs.items():
                ax.annotate(f"{c}", (f, b), fontsize=6, xytext=(3, -8), textcoords="offset points")
        ax.scatter(
            [s["adjoint_nfe_forward"] for s in sw],
            [s["adjoint_nfe_backward"] for s in sw],
            marker="x",
            color="C3",
            label="tolerance sweep",
        )
        xs = [p["nfe_forward"] for p in tr] + [s["adjoint_nfe_forward"] for s in sw]
        if xs:
            lim = max(xs) * 1.1
            ax.plot([0, lim], [0, lim], "k:", lw=0.8, label="y = x")
            ax.plot([0, lim], [0, lim / 2], "k--", lw=0.8, label="y = x/2")
        ax.set_xlabel("forward NFE")
        ax.set_ylabel("backward NFE")
        ax.set_title("(c) backward vs forward NFE")
        ax.legend(fontsize=6)

    def panel_d(ax):
        if tr:
            ax.plot(
                [p["epoch_float"] for p in tr],
                [p["nfe_forward"] for p in tr],
                lw=0.8,
                label="per logged step",
            )
        if ep:
            ax.plot([e["epoch"] for e in ep], [e["nfe_forward"] for e in ep], "o-", label="epoch mean")
        ax.set_xlabel("training epoch")
        ax.set_ylabel("forward NFE")
        ax.set_title("(d) NFE over training")
        ax.legend(fontsize=6)

    panels = {
        "a_nfe_vs_error": panel_a,
        "b_time_vs_nfe": panel_b,
        "c_backward_vs_forward": panel_c,
        "d_nfe_vs_epoch": panel_d,
    }
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, fn in zip(axes, panels.values()):
        fn(ax)
    fig.tight_layout()
    fig.savefig(out / "figure3.png", dpi=PLOT_DPI)
    plt.close(fig)
    for name, fn in panels.items():
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        fn(ax)
        fig.tight_layout()
        fig.savefig(out / f"figure3_{name}.png", dpi=PLOT_DPI)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------- table 1


def table1(
    out: str | os.PathLike,
    *,
    models: tuple[str, ...] = MODELS,
    epochs: int = 160,
    extra_args: tuple[str, ...] = (),
    resume: bool = False,
    overwrite: bool = False,
) -> str:
    """Train each model in its own process (so peak memory is per model), then write ``table1.md``/``.json``.

    ``extra_args`` go to every ``neuralode train mnist`` call (``--train-size``, ``--data-dir``, ...).
    A model whose run folder already has ``metrics.json`` is not retrained when ``resume`` is set.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = {}
    for m in models:
        if m not in MODELS:
            raise ValueError(f"model {m!r} is unknown; expected a subset of {MODELS}")
        run = out / m
        if not (resume and (run / "metrics.json").exists()):
            cmd = [
                sys.executable,
                "-m",
                "neuralode",
                "train",
                "mnist",
                "--model",
                m,
                "--epochs",
                str(epochs),
                "--out",
                str(run),
                *extra_args,
            ]
            if resume and (run / "checkpoint.pt").exists():
                cmd.append("--resume")
            elif overwrite or resume:  # resume: a folder the interrupted run left without a checkpoint
                cmd.append("--overwrite")
            print("$ " + " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True, env=env)
        rows[m] = json.loads((run / "metrics.json").read_text())
    lines = [
        f"# Table 1 reproduction ({epochs} epoch(s); {next(iter(rows.values()))['n_train']} training images; "
        f"device {next(iter(rows.values()))['device']})",
        "",
        "| model | test error | paper | params | paper | memory (MiB) | paper | train time (s) | s/iter "
        "| paper | NFE fwd | NFE bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        name, p_err, p_par, p_mem, p_time = PAPER_TABLE1[m]
        steps = max(
            1, (r["n_train"] // json.loads((out / m / "config.json").read_text())["batch_size"]) * epochs
        )
        lines.append(
            f"| {name} | {r['test_error']:.2%} | {p_err} | {r['params']:,} | {p_par} | "
            f"{_table_memory(r):.0f} | "
            f"{p_mem} | {r['train_time_s']:.0f} | {r['train_time_s'] / steps:.3f} | {p_time} | "
            f"{r['nfe_forward']:.1f} | {r['nfe_backward']:.1f} |"
        )
    lines += [
        "",
        f"Memory: {next(iter(rows.values()))['memory_kind']}. NFE: mean per training iteration, "
        "last epoch. Test error with the weights selected on the validation split.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "table1.md").write_text(text)
    (out / "table1.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return text


def _table_memory(r: dict[str, Any]) -> float:
    return r["train_memory_mb"] if r.get("train_memory_mb") is not None else r["peak_memory_mb"]


# ----------------------------------------------------------------------------------------------- CLI


def _check(cfg: MNISTConfig) -> None:
    """Data files that are missing or corrupt (md5), before any folder is made. The files read here are
    cached in the process, so training does not read them again. Under ``torchrun`` the global batch
    must split evenly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % world:
        raise UsageError(
            f"batch-size={cfg.batch_size} must be divisible by the number of processes ({world})"
        )
    if not cfg.download:
        root = Path(cfg.data_dir).expanduser() if cfg.data_dir else data.default_data_dir(cfg.dataset)
        try:
            data.check_files(root, cfg.dataset)
            for split in ("train", "test"):
                data.load_split(root, split, name=cfg.dataset)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None


def _resumable(saved: dict[str, Any]) -> tuple[str, ...]:
    """The epoch budget may change only without the paper's schedule (which is laid out over it)."""
    fields = ("device", "threads", "eval_batch_size", "checkpoint_every", "log_every", "plots", "data_dir",
              "download", "max_steps")  # fmt: skip
    return fields + (("epochs",) if saved.get("lr_schedule") == "constant" else ())


MNIST = Experiment(
    name="mnist",
    config_cls=MNISTConfig,
    train=_train_run,
    default_out=lambda cfg: f"runs/mnist-{cfg.model}",
    headline=lambda m: (
        f"test error {m['test_error']:.2%} (selected epoch {m['selected_epoch']}, validation error "
        f"{m['val_error']:.2%}); {m['wall_time_s']:.0f} s"
    ),
    resumable=_resumable,
    check=_check,
    distributed=True,
)


class _BothTolerances(argparse.Action):
    """``--tol X``: the older spelling of ``--rtol X --atol X``."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.rtol = namespace.atol = values


def _run_figure3(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    run = Path(args.run)
    if not (run / "config.json").is_file() or not any(
        (run / n).is_file() for n in ("best.pt", "checkpoint.pt")
    ):
        parser.error(
            f"{str(run)!r} is not a finished `neuralode train mnist` run folder (config.json, best.pt)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        figure3(run, n_images=args.n_images, tols=tuple(args.tols), out=args.out, data_dir=args.data_dir)
    except (UsageError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(f"figure3: results in {args.out or run} (figure3.json, figure3*.png)")
    return 0


def _run_table1(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    passthrough = []
    for name in ("data_dir", "train_size", "val_size", "test_size", "batch_size", "device", "threads",
                 "rtol", "atol", "seed", "dataset"):  # fmt: skip
        v = getattr(args, name)
        if v is not None:
            passthrough += ["--" + name.replace("_", "-"), str(v)]
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.epochs < 1:
        parser.error(f"epochs must be a positive integer, got {args.epochs}")
    if not (args.resume or args.overwrite):
        taken = [m for m in args.models if (Path(args.out) / m).exists()]
        if taken:
            parser.error(
                f"{args.out} already holds runs of {', '.join(taken)}; pass --resume to reuse/continue them, "
                "--overwrite to retrain them, or choose another --out"
            )
    try:
        table1(
            args.out, models=tuple(args.models), epochs=args.epochs, extra_args=tuple(passthrough + extra),
            resume=args.resume, overwrite=args.overwrite,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        print(
            f"error: a training run failed (exit status {exc.returncode}): {' '.join(exc.cmd)}",
            file=sys.stderr,
        )
        return exc.returncode or 1
    return 0


def register_eval(evals: argparse._SubParsersAction) -> None:
    """``neuralode eval mnist RUN_DIR``."""
    _register_eval(
        evals, "mnist", evaluate_run, data_dir=True, help="test error of a run folder's selected weights",
        description="Evaluate a `neuralode train mnist` run folder's selected weights (best.pt) on the test "
        "split of its config.json; print test_error, test_loss and test_nfe_forward as JSON (the values in "
        "the run's metrics.json, on the same device and thread count).",
    )  # fmt: skip


def register(commands: argparse._SubParsersAction, train_cmds: argparse._SubParsersAction) -> None:
    (p,) = register_experiment(
        train_cmds, MNIST, names=("mnist",), help="MNIST classifier: ODE-Net, RK-Net, ResNet or MLP (paper Table 1)",
        description="Train an MNIST classifier, select it on a validation split, test it once (paper Table 1).\n"
        "Writes config.json, run.json, metrics.jsonl (one line per epoch), iterations.jsonl, checkpoint.pt, "
        "best.pt, metrics.json (test error) and training.png into the run folder.",
    )  # fmt: skip
    p.add_argument(
        "--tol", type=float, action=_BothTolerances, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    f = commands.add_parser(
        "figure3", help="paper Figure 3 (NFE statistics) from a trained ODE-Net run folder",
        description="Paper Figure 3 from a trained ODE-Net run folder: NFE vs numerical error, time vs NFE, "
        "backward vs forward NFE, NFE over training. Writes figure3.json and figure3*.png.",
    )  # fmt: skip
    f.add_argument("run", help="run folder of `neuralode train mnist --model odenet`")
    f.add_argument(
        "--out", default=None, help="where to write the PNGs and figure3.json (default: the run folder)"
    )
    f.add_argument("--n-images", type=int, default=256, help="validation images for the sweep (default: 256)")
    f.add_argument(
        "--tols", type=float, nargs="+", default=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5],
        help="tolerances of the sweep (default: 1e-1 ... 1e-5)",
    )  # fmt: skip
    f.add_argument("--data-dir", default=None, help="data folder (default: the run's)")
    f.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    f.set_defaults(func=lambda args, _p=f: _run_figure3(args, _p))

    t = commands.add_parser(
        "table1", help="paper Table 1: train the four models and write a markdown table",
        description="Paper Table 1: train each model with `neuralode train mnist` (one process each), then "
        "write table1.md and table1.json into --out.",
    )  # fmt: skip
    t.add_argument("--out", default="runs/table1", help="default: runs/table1")
    t.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: all four")
    t.add_argument("--epochs", type=int, default=160, help="epochs per model (default: 160)")
    t.add_argument(
        "--data-dir", default=None, help="default: $NEURALODE_DATA/mnist or ~/.cache/neuralode/mnist"
    )
    t.add_argument("--dataset", default=None, choices=sorted(data.DATASETS), help="default: mnist")
    for flag, typ, what in (("--train-size", int, "all"), ("--val-size", int, "5000"), ("--test-size", int, "all"),
                            ("--batch-size", int, "128"), ("--rtol", float, "1e-3"), ("--atol", float, "1e-3"),
                            ("--seed", int, "0"), ("--threads", int, "torch's")):  # fmt: skip
        t.add_argument(flag, type=typ, default=None, help=f"passed to every run (default: {what})")
    t.add_argument(
        "--tol", type=float, action=_BothTolerances, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    t.add_argument("--device", default=None, help="passed to every run (default: auto)")
    t.add_argument("--resume", action="store_true", help="reuse finished models, resume interrupted ones")
    t.add_argument("--overwrite", action="store_true", help="retrain models whose run folders exist")
    t.add_argument("extra", nargs=argparse.REMAINDER, help="after `--`: more options for every `train mnist`")
    t.set_defaults(func=lambda args, _p=t: _run_table1(args, _p))
