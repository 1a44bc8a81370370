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
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuralode.datasets import mnist as data
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
from neuralode.models.odenet import MODELS, ODENet, build_model, count_parameters

__all__ = ["PAPER_TABLE1", "MNISTConfig", "figure3", "lr_at", "register", "table1", "train"]

# Paper Table 1 (test error, parameters).
PAPER_TABLE1 = {
    "mlp": ("1-layer MLP", "1.60%", "0.24 M", "-", "-"),
    "resnet": ("ResNet", "0.41%", "0.60 M", "O(L)", "O(L)"),
    "rknet": ("RK-Net", "0.47%", "0.22 M", "O(L~)", "O(L~)"),
    "odenet": ("ODE-Net", "0.42%", "0.22 M", "O(1)", "O(L~)"),
}

LR_BOUNDARIES = (60 / 160, 100 / 160, 140 / 160)
LR_DECAYS = (1.0, 0.1, 0.01, 0.001)


@dataclasses.dataclass
class MNISTConfig:
    """Everything a run depends on (written to ``config.json``)."""

    model: str = "odenet"
    dataset: str = "mnist"
    data_dir: str | None = None
    download: bool = False
    epochs: int = 160
    train_size: int | None = None
    val_size: int = 5000
    test_size: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "paper"
    tol: float = 1e-3
    adjoint_tol: float | None = None
    gradient: str | None = None
    solver: str = "dopri5"
    step_size: float | None = None
    seminorm: bool = False
    downsampling: str = "conv"
    channels: int = 64
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    eval_batch_size: int = 1000
    checkpoint_every: int = 50
    log_every: int = 10
    out: str = "runs/mnist"

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} is unknown; expected one of {MODELS}")
        if self.dataset not in data.DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is unknown; expected one of {sorted(data.DATASETS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "log_every", "channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lr_schedule not in ("paper", "constant"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; expected 'paper' or 'constant'")
        if self.adjoint_tol is not None and not self.adjoint_tol > 0:
            raise ValueError(f"adjoint_tol must be > 0 or None, got {self.adjoint_tol!r}")
        if self.model == "rknet" and self.gradient not in (None, "direct"):
            raise ValueError(
                f"rknet trains by backprop through the solver; gradient must be 'direct', "
                f"got {self.gradient!r}"
            )


def lr_at(step: int, steps_per_epoch: int, cfg: MNISTConfig) -> float:
    """Learning rate at global step ``step``: ``lr * batch/128`` times the piecewise-constant decay
    (``lr_schedule="paper"``) or times 1 (``"constant"``)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr * cfg.batch_size / 128
    epoch = step / steps_per_epoch
    k = sum(epoch >= b * cfg.epochs for b in LR_BOUNDARIES)
    return cfg.lr * cfg.batch_size / 128 * LR_DECAYS[k]


def make_model(cfg: MNISTConfig) -> nn.Module:
    if cfg.model in ("odenet", "rknet"):
        options = {"step_size": cfg.step_size} if cfg.step_size is not None else None
        adjoint_options = dict(options or {})
        if cfg.seminorm:
            adjoint_options["norm"] = "seminorm"
        kw: dict[str, Any] = dict(
            channels=cfg.channels,
            downsampling=cfg.downsampling,
            method=cfg.solver,
            rtol=cfg.tol,
            atol=cfg.tol,
            adjoint_rtol=cfg.adjoint_tol,
            adjoint_atol=cfg.adjoint_tol,
            options=options,
            adjoint_options=adjoint_options or None,
        )
        if cfg.gradient is not None:
            kw["gradient"] = cfg.gradient
        return build_model(cfg.model, **kw)
    if cfg.model == "resnet":
        return build_model("resnet", channels=cfg.channels, downsampling=cfg.downsampling)
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


class _Dist:
    """Rank, world size and reductions; a no-op without ``torchrun``."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MNISTConfig, device: torch.device, dist: _Dist
):
    """Mean loss, error rate and mean forward NFE per batch over ``(x, y)`` (sharded across processes)."""
    model.eval()
    func = _odefunc(model)
    idx = torch.arange(dist.rank, x.shape[0], dist.world)
    loss_sum = wrong = count = nfe_sum = batches = 0.0
    for start in range(0, idx.numel(), cfg.eval_batch_size):
        b = idx[start : start + cfg.eval_batch_size]
        xb, yb = x[b].to(device), y[b].to(device)
        if func is not None:
            func.nfe = 0
        logits = model(xb)
        if func is not None:
            nfe_sum += func.nfe
        batches += 1
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        wrong += (logits.argmax(1) != yb).sum().item()
        count += yb.numel()
    loss_sum, wrong, count, nfe_sum, batches = dist.sum([loss_sum, wrong, count, nfe_sum, batches], device)
    model.train()
    return {
        "loss": loss_sum / max(count, 1),
        "error": wrong / max(count, 1),
        "nfe": nfe_sum / max(batches, 1),
    }


def _resolve_data_dir(cfg: MNISTConfig, dist: _Dist | None = None) -> Path:
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else data.default_data_dir(cfg.dataset)
    if cfg.download and (dist is None or dist.main):  # one process downloads, the others wait
        data.download(root, cfg.dataset)
    if dist is not None:
        dist.barrier()
    return root


def train(cfg: MNISTConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train, select on validation, test once; returns the final metrics (also in ``metrics.json``)."""
    cfg.validate()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist = _Dist(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % dist.world:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the number of processes ({dist.world})"
        )
    try:
        return _train(cfg, resume, device, dist)
    finally:
        dist.close()


def _train(cfg: MNISTConfig, resume: bool, device: torch.device, dist: _Dist) -> dict[str, Any]:
    run = RunDir(cfg.out) if dist.main else None
    out = Path(cfg.out)
    splits = data.load_splits(
        _resolve_data_dir(cfg, dist),
        name=cfg.dataset,
        val_size=cfg.val_size,
        train_size=cfg.train_size,
        test_size=cfg.test_size,
        seed=cfg.seed,
    )
    n_train = splits.train_x.shape[0]
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n_train} training images")

    baseline_mb = _reset_peak_rss()
    train_peak_mb: float | None = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cfg.seed)
    model = make_model(cfg).to(device)
    n_params = count_parameters(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )

    start_epoch, start_step, wall_before = 0, 0, 0.0
    acc = _zero_acc()
    best = {"val_error": float("inf"), "epoch": -1}
    if resume:
        ckpt = load_checkpoint(out / "checkpoint.pt", map_location=device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, start_step = ckpt["epoch"], ckpt["step"]
        acc, best, wall_before = dict(ckpt["acc"]), dict(ckpt["best"]), ckpt["wall_time_s"]
        set_rng_state(ckpt["rng"])
        if run is not None:
            run.truncate_jsonl("metrics.jsonl", ckpt["metrics_lines"])
            run.truncate_jsonl("iterations.jsonl", ckpt["iteration_lines"])
    elif run is not None:
        for name in ("metrics.jsonl", "iterations.jsonl", "metrics.json"):
            if run.path(name).exists():
                run.path(name).unlink()
    if run is not None:
        run.write_json(
            "config.json",
            {
                **dataclasses.asdict(cfg),
                "params": n_params,
                "world_size": dist.world,
                "n_train": n_train,
                "steps_per_epoch": steps_per_epoch,
            },
        )
        print(
            f"{cfg.model}: {n_params:,} parameters; {n_train} train / {splits.val_x.shape[0]} validation / "
            f"{splits.test_x.shape[0]} test images; {dist.world} process(es); run folder {out}",
            file=sys.stderr,
        )

    ddp_model: nn.Module = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    func = _odefunc(model)
    lines = _count_lines(out, "metrics.jsonl") if run is not None else 0
    it_lines = _count_lines(out, "iterations.jsonl") if run is not None else 0
    t_resumed = time.perf_counter()

    def checkpoint(epoch: int, step: int) -> None:
        nonlocal lines, it_lines
        if run is None:
            return
        save_checkpoint(
            run.checkpoint,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step": step,
                "acc": acc,
                "best": best,
                "rng": get_rng_state(),
                "metrics_lines": lines,
                "iteration_lines": it_lines,
                "wall_time_s": wall_before + time.perf_counter() - t_resumed,
            },
        )

    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(n_train, cfg.seed, epoch)
        first = start_step if epoch == start_epoch else 0
        if first == 0:
            acc = _zero_acc()
        bar = (
            progress(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            if dist.main
            else _NullBar()
        )
        t_epoch = time.perf_counter()
        for step in range(first, steps_per_epoch):
            gstep = epoch * steps_per_epoch + step
            lr = lr_at(gstep, steps_per_epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            xb, yb = global_batch(splits.train_x, splits.train_y, order, cfg, epoch, step)
            xb, yb = shard(xb, dist.rank, dist.world).to(device), shard(yb, dist.rank, dist.world).to(device)
            optimizer.zero_grad(set_to_none=True)
            if func is not None:
                func.nfe = 0
            logits = ddp_model(xb)
            nfe_f = func.nfe if func is not None else 0
            loss = F.cross_entropy(logits, yb)
            if func is not None:
                func.nfe = 0
            loss.backward()
            nfe_b = func.nfe if func is not None else 0
            optimizer.step()
            wrong = (logits.argmax(1) != yb).sum().item()
            stats = dist.sum([loss.item() * yb.numel(), wrong, yb.numel(), nfe_f, nfe_b], device)
            for k, v in zip(("loss_sum", "wrong", "count", "nfe_f", "nfe_b"), stats):
                acc[k] += v
            acc["steps"] += 1
            acc["time"] += time.perf_counter() - t_epoch
            t_epoch = time.perf_counter()
            if run is not None:
                nproc = dist.world
                postfix = {
                    "loss": f"{acc['loss_sum'] / acc['count']:.3f}",
                    "acc": f"{1 - acc['wrong'] / acc['count']:.3f}",
                    "nfe_f": f"{stats[3] / nproc:.0f}",
                    "nfe_b": f"{stats[4] / nproc:.0f}",
                }
                bar.set_postfix(**postfix)
                if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                    run.append_jsonl(
                        "iterations.jsonl",
                        {
                            "epoch": epoch,
                            "step": step + 1,
                            "global_step": gstep + 1,
                            "epoch_float": epoch + (step + 1) / steps_per_epoch,
                            "loss": stats[0] / stats[2],
                            "error": stats[1] / stats[2],
                            "nfe_forward": stats[3] / nproc,
                            "nfe_backward": stats[4] / nproc,
                            "lr": lr,
                        },
                    )
                    it_lines += 1
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                checkpoint(epoch, step + 1)
        bar.close()
        if train_peak_mb is None:  # training steps only: before any evaluation with its larger batches
            train_peak_mb = _train_peak_mb(device, baseline_mb)

        val = (
            evaluate(
                ddp_model.module if dist.enabled else model, splits.val_x, splits.val_y, cfg, device, dist
            )
            if splits.val_x.shape[0]
            else {"loss": float("nan"), "error": float("nan"), "nfe": float("nan")}
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": acc["loss_sum"] / acc["count"],
            "train_error": acc["wrong"] / acc["count"],
            "val_loss": val["loss"],
            "val_error": val["error"],
            "val_nfe_forward": val["nfe"],
            "nfe_forward": acc["nfe_f"] / acc["steps"] / dist.world,
            "nfe_backward": acc["nfe_b"] / acc["steps"] / dist.world,
            "lr": lr_at((epoch + 1) * steps_per_epoch - 1, steps_per_epoch, cfg),
            "epoch_time_s": acc["time"],
            "images_per_s": acc["count"] / max(acc["time"], 1e-9),
        }
        selected = not splits.val_x.shape[0] or val["error"] <= best["val_error"]
        if run is not None:
            run.append_jsonl("metrics.jsonl", row)
            lines += 1
            if selected:
                best = {"val_error": val["error"], "epoch": epoch + 1}
                save_checkpoint(out / "best.pt", {"model": model.state_dict(), "epoch": epoch + 1})
            print(
                f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} error {row['train_error']:.4f}, "
                f"val error {row['val_error']:.4f}, NFE fwd {row['nfe_forward']:.1f} "
                f"bwd {row['nfe_backward']:.1f}, "
                f"{row['epoch_time_s']:.0f} s",
                file=sys.stderr,
            )
        checkpoint(epoch + 1, 0)
        dist.barrier()

    # Test once, with the weights selected on validation.
    dist.barrier()
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    best_ckpt = load_checkpoint(out / "best.pt", map_location=device)
    model.load_state_dict(best_ckpt["model"])
    t_test = time.perf_counter()
    test = evaluate(model, splits.test_x, splits.test_y, cfg, device, dist)
    test_time = time.perf_counter() - t_test
    model.load_state_dict(final_state)
    wall = wall_before + time.perf_counter() - t_resumed
    history = (
        [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()] if run is not None else []
    )
    last = history[-1] if history else {}
    metrics = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "test_error": test["error"],
        "test_loss": test["loss"],
        "test_nfe_forward": test["nfe"],
        "test_time_s": test_time,
        "val_error": best["val_error"],
        "selected_epoch": best_ckpt["epoch"],
        "epochs": cfg.epochs,
        "params": n_params,
        "nfe_forward": last.get("nfe_forward", 0.0),
        "nfe_backward": last.get("nfe_backward", 0.0),
        "wall_time_s": wall,
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        "images_per_s": last.get("images_per_s"),
        **_memory(device, baseline_mb, train_peak_mb),
        "world_size": dist.world,
        "n_train": n_train,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if run is not None:
        run.write_json("metrics.json", metrics)
        _plot_training(out, history)
        print(
            f"test error {metrics['test_error']:.4%} (selected epoch {metrics['selected_epoch']}, "
            f"val error {metrics['val_error']:.4%}); wall time {wall:.0f} s",
            file=sys.stderr,
        )
    return metrics


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


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


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


def _count_lines(out: Path, name: str) -> int:
    p = out / name
    return len(p.read_text().splitlines()) if p.exists() else 0


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
    fig.savefig(out / "training.png", dpi=110)
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
    cfg = MNISTConfig(**{k: v for k, v in cfgd.items() if k in fields})
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
    fig.savefig(out / "figure3.png", dpi=100)
    plt.close(fig)
    for name, fn in panels.items():
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        fn(ax)
        fig.tight_layout()
        fig.savefig(out / f"figure3_{name}.png", dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------- table 1


def table1(
    out: str | os.PathLike,
    *,
    models: tuple[str, ...] = MODELS,
    epochs: int = 160,
    extra_args: tuple[str, ...] = (),
    resume: bool = False,
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


def _add_train_args(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    d = MNISTConfig()
    if model:
        p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default=d.dataset)
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four IDX .gz files "
        "(default $NEURALODE_DATA/<dataset> or ~/.cache/neuralode/<dataset>)",
    )
    p.add_argument(
        "--download", action="store_true", help="fetch missing files into --data-dir first (internet)"
    )
    if model:
        p.add_argument("--epochs", type=int, default=d.epochs, help="the LR schedule scales with it")
    p.add_argument("--train-size", type=int, default=None, help="train on this many images (quick runs)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images held out of train")
    p.add_argument(
        "--test-size", type=int, default=None, help="evaluate on the first N test images (quick runs)"
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch (split across processes)"
    )
    p.add_argument("--lr", type=float, default=d.lr, help="base LR for batch 128 (scaled by batch/128)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--lr-schedule",
        choices=("paper", "constant"),
        default=d.lr_schedule,
        help="paper: x0.1 at 60/160, 100/160, 140/160 of the run; constant: no decay",
    )
    p.add_argument("--tol", type=float, default=d.tol, help="forward rtol = atol")
    p.add_argument("--adjoint-tol", type=float, default=None, help="backward rtol = atol (default: --tol)")
    p.add_argument(
        "--gradient",
        choices=("direct", "adjoint", "checkpoint"),
        default=None,
        help="default: adjoint for odenet, direct for rknet",
    )
    p.add_argument(
        "--solver", default=d.solver, help="dopri5, rk4, euler, ... (fixed-step ones need --step-size)"
    )
    p.add_argument("--step-size", type=float, default=None)
    p.add_argument("--seminorm", action="store_true", help="adjoint error norm over the state only")
    p.add_argument("--downsampling", choices=("conv", "res"), default=d.downsampling)
    p.add_argument(
        "--channels", type=int, default=d.channels, help="64 in the paper (smaller only for tests)"
    )
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints"
    )
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between iterations.jsonl lines")


def _cfg_from_args(args: argparse.Namespace) -> MNISTConfig:
    fields = {f.name for f in dataclasses.fields(MNISTConfig)}
    return MNISTConfig(**{k: v for k, v in vars(args).items() if k in fields})


def _run_train(args: argparse.Namespace) -> int:
    train(_cfg_from_args(args), resume=args.resume)
    return 0


def _run_figure3(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    figure3(args.run, n_images=args.n_images, tols=tuple(args.tols), out=args.out, data_dir=args.data_dir)
    return 0


def _run_table1(args: argparse.Namespace) -> int:
    passthrough = []
    for name in (
        "data_dir",
        "train_size",
        "val_size",
        "test_size",
        "batch_size",
        "device",
        "threads",
        "tol",
        "seed",
        "dataset",
    ):
        v = getattr(args, name)
        if v is not None:
            passthrough += ["--" + name.replace("_", "-"), str(v)]
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    table1(
        args.out,
        models=tuple(args.models),
        epochs=args.epochs,
        extra_args=tuple(passthrough + extra),
        resume=args.resume,
    )
    return 0


def register(commands: argparse._SubParsersAction, train_cmds: argparse._SubParsersAction) -> None:
    p = train_cmds.add_parser(
        "mnist", help="MNIST classifier: ODE-Net, RK-Net, ResNet or MLP (paper Table 1)"
    )
    _add_train_args(p)
    p.add_argument("--out", default="runs/mnist", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.set_defaults(func=_run_train)

    f = commands.add_parser(
        "figure3", help="paper Figure 3 (NFE statistics) from a trained ODE-Net run folder"
    )
    f.add_argument("run", help="run folder of `neuralode train mnist --model odenet`")
    f.add_argument(
        "--out", default=None, help="where to write the PNGs and figure3.json (default: the run folder)"
    )
    f.add_argument("--n-images", type=int, default=256, help="validation images for the tolerance sweep")
    f.add_argument(
        "--tols", type=float, nargs="+", default=[1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]
    )
    f.add_argument("--data-dir", default=None)
    f.add_argument("--threads", type=int, default=None)
    f.set_defaults(func=_run_figure3)

    t = commands.add_parser("table1", help="paper Table 1: train the four models and write a markdown table")
    t.add_argument("--out", default="runs/table1")
    t.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    t.add_argument(
        "--epochs", type=int, default=160, help="epoch budget per model (LR schedule scales with it)"
    )
    t.add_argument("--data-dir", default=None)
    t.add_argument("--dataset", default=None)
    t.add_argument("--train-size", type=int, default=None)
    t.add_argument("--val-size", type=int, default=None)
    t.add_argument("--test-size", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--tol", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="skip finished models, resume interrupted ones")
    t.add_argument("extra", nargs=argparse.REMAINDER, help="after `--`: more options for every `train mnist`")
    t.set_defaults(func=_run_table1)
