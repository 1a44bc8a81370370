"""Latent ODE vs RNN on irregularly sampled spirals: the paper's Table 2 and Figures 8-9.

Commands::

    neuralode train latent --obs 30 --model latent-ode --out runs/latent-obs30
    neuralode train latent --obs 30 --model rnn --out runs/rnn-obs30
    neuralode table2 --iters 2000 --runs-dir runs/table2 --out docs/results/latent

Model selection: ``n_val`` of the ``n_train`` training spirals are the validation split. Every
``eval_every`` iterations the model is evaluated on it (``metrics.jsonl``); the weights with the lowest
validation ``rmse_extrapolation_noisy`` (what can be measured without a noise-free truth) are kept in
``best.pt``. The test split is evaluated once, at the end, with those selected weights.

A run folder holds ``config.json``, ``metrics.jsonl`` (validation metrics, one line per evaluation),
``metrics.json`` (final: test ``rmse_extrapolation``/``rmse_interpolation`` against the clean truth,
``*_noisy`` against the noisy data, ``nfe_forward``; the selected iteration and its ``val_*`` metrics;
wall time), ``best.pt`` (selected weights), ``checkpoint.pt`` and plots. Evaluation conditions on each
spiral's observed points (first 100 time steps) and predicts all 200; the latent ODE decodes the
posterior mean of its anchor state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from neuralode import ADAPTIVE_METHODS, GRADIENT_METHODS, SOLVERS, record_stats
from neuralode.datasets.spirals import SpiralData, make_spirals
from neuralode.experiments._config import (
    UsageError,
    add_config_options,
    check_choice,
    check_nonneg_float,
    check_nonneg_int,
    check_positive_float,
    check_positive_int,
    opt,
    resolve_config,
    typed_options,
)
from neuralode.experiments._runs import check_device_name, plot_nfe, save_checkpoint, seed_everything
from neuralode.experiments._trainer import (
    Experiment,
    RunFolder,
    Trainer,
    TrainingDiverged,
    _Single,
    check_device,
    eval_device,
    execute,
    load_run_config,
    on_device,
    read_weights,
    register_experiment,
    write_config,
)
from neuralode.experiments._trainer import register_eval as _register_eval
from neuralode.models.latent_ode import ANCHORS, ENCODERS, LatentODE, pack_observations
from neuralode.models.rnn_baseline import RNNBaseline

__all__ = [
    "LATENT",
    "TABLE2_GRID",
    "LatentConfig",
    "evaluate",
    "evaluate_run",
    "register",
    "run_table2",
    "run_table2_protocol",
    "train",
]  # fmt: skip

MODELS = ("latent-ode", "rnn")
PLOT_DPI = 150

# Chen et al. 2018, Table 2: predictive RMSE on 100 time points after the observed window.
PAPER_TABLE2 = {
    "rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813},
    "latent-ode": {30: 0.1642, 50: 0.1502, 100: 0.1346},
}


@dataclasses.dataclass
class LatentConfig:
    """Everything that defines one run (written to ``config.json``)."""

    model: str = opt("latent-ode", "model", choices=MODELS)
    obs: int = opt(30, "observed points of the first 100 time steps (paper: 30, 50, 100)")
    # data (see neuralode.datasets.spirals)
    noise_std: float = opt(0.3, "observation noise of the data")
    clockwise_shape: str = opt(
        "mirror", "clockwise spirals: mirror image of the Archimedean one, or torchdiffeq's hyperbolic one",
        choices=("mirror", "hyperbolic"),
    )  # fmt: skip
    n_spirals: int = opt(1000, "spirals in the data set")
    n_train: int = opt(800, "training spirals (the rest are test spirals), validation split included")
    n_val: int | None = opt(
        None, "validation spirals, carved from the n_train training spirals, for model selection (none: "
        "n_train // 8, 100 of 800; 0: no validation split, the last iterate is kept)",
    )  # fmt: skip
    data_seed: int = opt(0, "seed of the data set")
    train_horizon: int = opt(
        200, "steps of each training spiral the likelihood scores (the encoder sees observed points of the "
        "first 100 only); 100 = reconstruction-only objective",
    )  # fmt: skip
    # latent ODE
    latent_dim: int = opt(4, "latent dimension")
    encoder: str = opt("rnn", "latent ODE recognition network", choices=ENCODERS)
    enc_cell: str = opt("gru", "encoder RNN cell", choices=("gru", "rnn"))
    enc_hidden: int = opt(25, "encoder width")
    dyn_hidden: int = opt(20, "latent dynamics width")
    dyn_layers: int = opt(2, "latent dynamics hidden layers")
    dyn_activation: str = opt("elu", "latent dynamics activation", choices=("elu", "tanh"))
    dec_hidden: int = opt(20, "decoder width (one ReLU layer)")
    poisson: bool = opt(False, "add the Poisson-process likelihood of the observation times")
    anchor: str = opt("start", "posterior at the window's start (paper) or end", choices=ANCHORS)
    # RNN baseline
    rnn_hidden: int = opt(25, "RNN baseline width")
    rnn_cell: str = opt("gru", "RNN baseline cell", choices=("gru", "rnn"))
    rnn_time_input: bool = opt(True, "RNN baseline: feed the time gaps", aliases=("--no-time-input",))
    obs_std: float | None = opt(None, "likelihood std (none: --noise-std, at least 0.01)")
    # solver
    method: str = opt("dopri5", "latent ODE solver", choices=SOLVERS, metavar="NAME")
    rtol: float = opt(1e-3, "relative tolerance")
    atol: float = opt(1e-4, "absolute tolerance")
    max_steps: int = opt(1000, "work budget: solver steps per solve (adaptive methods); more is divergence")
    gradient: str = opt("direct", "gradient method", choices=GRADIENT_METHODS)
    # optimisation
    iters: int = opt(2000, "training iterations, in total")
    lr: float = opt(1e-2, "Adam learning rate")
    lr_decay: float = opt(0.999, "lr * max(lr_decay^i, 0.1), as in Rubanova et al.'s code")
    grad_clip: float = opt(0.0, "clip the gradient's global L2 norm to this (0: no clipping)")
    batch_size: int = opt(0, "spirals per iteration (0: full batch, as torchdiffeq's example)")
    eval_every: int = opt(100, "evaluate on the validation spirals and checkpoint every N iterations")
    seed: int = opt(0, "random seed of the weights and minibatches")
    threads: int = opt(1, "torch CPU threads")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    plots: bool = opt(True, "write the plots at the end")

    def __post_init__(self):
        check_choice(self, "model", MODELS)
        check_choice(self, "encoder", ENCODERS)
        check_choice(self, "gradient", GRADIENT_METHODS)
        check_choice(self, "method", SOLVERS)
        check_positive_int(self, "obs", "n_spirals", "n_train", "latent_dim", "enc_hidden", "dyn_hidden")
        check_positive_int(self, "dyn_layers", "dec_hidden", "rnn_hidden", "iters", "eval_every", "threads")
        check_positive_int(self, "max_steps")
        check_nonneg_int(self, "batch_size")
        check_nonneg_int(self, "n_val", allow_none=True)
        if self.n_val is None:  # resolved here, so that config.json records the split
            self.n_val = self.n_train // 8
        check_positive_float(self, "rtol", "atol", "lr")
        check_positive_float(self, "obs_std", allow_none=True)
        check_nonneg_float(self, "noise_std", "grad_clip")
        if self.obs > 100:
            raise UsageError(
                f"obs={self.obs} is invalid; at most 100 of the first 100 time steps can be observed"
            )
        if self.n_train >= self.n_spirals:
            raise UsageError(
                f"n_train={self.n_train} leaves no test spirals out of n_spirals={self.n_spirals}"
            )
        if self.n_val >= self.n_train:
            raise UsageError(f"n_val={self.n_val} leaves no training spirals out of n_train={self.n_train}")
        if self.batch_size > self.n_train - self.n_val:
            raise UsageError(
                f"batch_size={self.batch_size} exceeds the {self.n_train - self.n_val} training spirals "
                f"(n_train={self.n_train} minus {self.n_val} validation spirals; 0: full batch)"
            )
        if not 100 <= self.train_horizon <= 200:
            raise UsageError(
                f"train_horizon={self.train_horizon} is invalid; expected 100 ≤ train_horizon ≤ 200"
            )
        if self.poisson and self.train_horizon != 100:
            raise UsageError(
                "poisson=True needs train_horizon=100 (the Poisson term covers the observed window)"
            )
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"lr_decay must satisfy 0 < lr_decay ≤ 1, got {self.lr_decay}")
        check_device_name(self.device)

    @property
    def likelihood_std(self) -> float:
        return self.obs_std if self.obs_std is not None else max(self.noise_std, 0.01)


def make_data(cfg: LatentConfig) -> SpiralData:
    return make_spirals(
        n_spirals=cfg.n_spirals,
        n_train=cfg.n_train,
        n_val=cfg.n_val,
        noise_std=cfg.noise_std,
        n_obs=cfg.obs,
        seed=cfg.data_seed,
        clockwise_shape=cfg.clockwise_shape,
        train_horizon=cfg.train_horizon,
    )


def build_model(cfg: LatentConfig) -> torch.nn.Module:
    if cfg.model == "rnn":
        return RNNBaseline(
            2, cfg.rnn_hidden, cell=cfg.rnn_cell, time_input=cfg.rnn_time_input, obs_std=cfg.likelihood_std
        )
    return LatentODE(
        2, cfg.latent_dim, encoder=cfg.encoder, enc_hidden=cfg.enc_hidden, enc_cell=cfg.enc_cell,
        dyn_hidden=cfg.dyn_hidden, dyn_layers=cfg.dyn_layers, dyn_activation=cfg.dyn_activation,
        dec_hidden=cfg.dec_hidden,
        obs_std=cfg.likelihood_std, method=cfg.method, rtol=cfg.rtol, atol=cfg.atol, gradient=cfg.gradient,
        options={"max_num_steps": cfg.max_steps} if cfg.method in ADAPTIVE_METHODS else None,
        poisson=cfg.poisson, anchor=cfg.anchor,
    )  # fmt: skip


# Values of fields added later, as runs saved before they existed effectively used them.
_LEGACY_DEFAULTS = {"train_horizon": 100, "n_val": 0}


# Fields that do not change what a model of the other kind trains or computes.
_IRRELEVANT = {
    "latent-ode": ("rnn_hidden", "rnn_cell", "rnn_time_input"),
    "rnn": ("latent_dim", "encoder", "enc_cell", "enc_hidden", "dyn_hidden", "dyn_layers",
            "dyn_activation", "dec_hidden", "poisson", "anchor", "method", "rtol", "atol", "gradient"),
}  # fmt: skip


def _same_config(saved: dict, cfg: LatentConfig, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a saved config (from an older version, maybe lacking newer fields) equals ``cfg`` in
    every field that matters to ``cfg.model``."""
    defaults = {**dataclasses.asdict(LatentConfig()), **_LEGACY_DEFAULTS}
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    skip = set(ignore) | set(_IRRELEVANT[cfg.model])
    return all(saved.get(k, defaults[k]) == v for k, v in now.items() if k not in skip)


def _window(data: SpiralData) -> tuple[float, float]:
    """``(t0, t_end)`` of the observation window."""
    return float(data.times[0]), float(data.times[data.config.n_context - 1])


def _loss(model, cfg: LatentConfig, batch, data: SpiralData, enc_mask=None) -> dict[str, torch.Tensor]:
    """Training loss. ``batch.mask`` marks what the likelihood scores; ``enc_mask`` (forecasting objective)
    what the latent ODE's encoder sees. The RNN is teacher-forced on every scored point."""
    if cfg.model == "rnn":
        return model.loss(batch.times, batch.values, batch.mask)
    t0, t_end = _window(data)
    return model.elbo(batch.times, batch.values, batch.mask, t0=t0, t_end=t_end, encoder_mask=enc_mask)


def _training_data(cfg: LatentConfig, data: SpiralData, device):
    """``(batch, enc_mask)`` of all training spirals; ``enc_mask`` is None for the reconstruction-only
    objective (``train_horizon == 100``), whose batch is the union of the observation times."""
    if cfg.train_horizon == data.config.n_context:
        return data.observed("train").to(device), None
    batch, enc = data.training()
    return batch.to(device), enc.to(device)


def _rmse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    sq = (a - b).pow(2)
    if mask is None:
        return math.sqrt(float(sq.mean()))
    m = mask.unsqueeze(-1).expand_as(sq).to(sq.dtype)
    return math.sqrt(float((sq * m).sum() / m.sum()))


@torch.no_grad()
def predict_all(model, cfg: LatentConfig, data: SpiralData, idx: torch.Tensor) -> dict[str, Any]:
    """Predictions for spirals ``idx`` conditioned on their observations: ``full`` ``(B, 200, 2)`` (latent
    ODE: decoded posterior mean at every time; RNN: NaN in the observed window) and, for the RNN,
    one-step-ahead predictions at the observed points."""
    batch = data.observed(idx)
    device = next(model.parameters()).device
    batch = batch.to(device)
    times = data.times.to(device)
    with record_stats() as stats:
        if cfg.model == "rnn":
            fut = model.forecast(batch.times, batch.values, batch.mask, times[data.future_slice])
            full = torch.full((len(idx), data.config.window, 2), float("nan"), device=device)
            full[:, data.future_slice] = fut
            one = model.loss(batch.times, batch.values, batch.mask)
            out: dict[str, Any] = {"full": full, "one_step": one}
        else:
            t0, t_end = _window(data)
            mean, logvar = model.encode(batch.times, batch.values, batch.mask, t0, t_end)
            full = model.predict(mean, model.anchor_time(t0, t_end), times)
            out = {"full": full, "z0_mean": mean, "z0_logvar": logvar}
    out["nfe"] = stats.nfe
    out["batch"] = batch
    return out


@torch.no_grad()
def evaluate(model, cfg: LatentConfig, data: SpiralData, split: str = "test") -> dict[str, float]:
    """RMSE of extrapolation (time steps 100..199) and interpolation against clean and noisy data.

    Interpolation: the latent ODE's reconstruction at all 100 time steps of the observed window; the RNN's
    one-step-ahead predictions at the observed points (it cannot predict between them without seeing them).
    """
    model.eval()
    idx = data.split(split)
    p = predict_all(model, cfg, data, idx)
    dev = p["full"].device
    clean, noisy = data.clean[idx].to(dev), data.noisy[idx].to(dev)
    fut, ctx = data.future_slice, data.context_slice
    m: dict[str, float] = {
        "rmse_extrapolation": _rmse(p["full"][:, fut], clean[:, fut]),
        "rmse_extrapolation_noisy": _rmse(p["full"][:, fut], noisy[:, fut]),
        "nfe_forward": float(p["nfe"]),
    }
    if cfg.model == "rnn":
        b, one = p["batch"], p["one_step"]
        clean_packed = pack_observations(b.times, _on(clean, data, b), b.mask, pad_time=b.times[-1])[1][:, 1:]
        m["rmse_interpolation"] = _rmse(one["pred"], clean_packed, one["target_valid"])
        m["rmse_interpolation_noisy"] = _rmse(one["pred"], one["target"], one["target_valid"])
    else:
        m["rmse_interpolation"] = _rmse(p["full"][:, ctx], clean[:, ctx])
        m["rmse_interpolation_noisy"] = _rmse(p["full"][:, ctx], noisy[:, ctx])
    model.train()
    return m


def _on(values: torch.Tensor, data: SpiralData, batch) -> torch.Tensor:
    """``values (B, window, D)`` restricted to the time points of ``batch.times`` (a subset of the grid)."""
    j = torch.searchsorted(data.times.to(batch.times.device), batch.times)
    return values[:, j]


@contextlib.contextmanager
def _global_noise(model, dist, n: int, cfg: LatentConfig):
    """Under ``torchrun``: the latent ODE's reparameterisation noise for this process's rows, cut from
    the noise of the whole batch (every process draws it from the same generator state, as one
    process does for the whole batch), so that N processes train what one process trains."""
    if not dist.enabled or cfg.model != "latent-ode":
        yield
        return
    eps = torch.randn(n, cfg.latent_dim, device=next(model.parameters()).device)[dist.shard(n)]
    model.sample = lambda mean, logvar: mean + eps.to(mean.dtype) * (0.5 * logvar).exp()
    try:
        yield
    finally:
        del model.sample


SELECT_ON = "rmse_extrapolation_noisy"  # the validation metric that selects the weights


class _LatentTask:
    """Full-batch (or minibatch) ELBO / teacher-forced RNN loss; validation RMSEs at each evaluation,
    the best weights so far (lowest validation :data:`SELECT_ON`) written to ``best``."""

    def __init__(
        self,
        cfg: LatentConfig,
        model,
        opt,
        sched,
        data: SpiralData,
        device,
        dist=None,
        best: Path | None = None,
    ):
        self.cfg, self.model, self.opt, self.sched, self.data, self.device = (
            cfg,
            model,
            opt,
            sched,
            data,
            device,
        )
        self.dist = dist if dist is not None else _Single()
        self.train_all, self.enc_all = _training_data(cfg, data, device)
        self.n_train = data.train_idx.numel()
        self.last: dict[str, float] = {}
        self._out: dict[str, torch.Tensor] = {}
        self._rec: dict[str, Any] = {}
        self.best_path = best
        self.best: dict[str, Any] = {}  # {"iter": ..., "val": metrics} of the selected weights
        self.best_weights: dict[str, torch.Tensor] | None = None  # those weights, when selected here

    def step(self, it: int) -> dict[str, Any]:
        cfg, batch, enc = self.cfg, self.train_all, self.enc_all
        if cfg.batch_size and cfg.batch_size < self.n_train:
            pick = torch.randperm(self.n_train, device=self.device)[: cfg.batch_size]
            if enc is None:
                batch = batch[pick]
            else:  # keep the full grid so that the two masks stay aligned
                batch = type(batch)(batch.times, batch.values[pick], batch.mask[pick])
                enc = enc[pick]
        n = batch.values.shape[0]
        if self.dist.enabled:  # this process's part of the global batch
            part = torch.arange(n, device=self.device)[self.dist.shard(n)]
            if enc is None:
                batch = batch[part]
            else:
                batch, enc = type(batch)(batch.times, batch.values[part], batch.mask[part]), enc[part]
        with record_stats() as stats, _global_noise(self.model, self.dist, n, cfg):
            out = _loss(self.model, cfg, batch, self.data, enc)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
        self.dist.average_gradients(self.model.parameters(), batch.values.shape[0])
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self._out = out
        self._rec = {
            "loss": float(out["loss"].detach()),
            "nfe_forward": stats.nfe,
            "nfe_backward": stats.backward.nfe,
        }
        self._rec = self.dist.mean(self._rec, batch.values.shape[0], self.device)
        return self._rec

    def evaluate(self, done: int) -> dict[str, Any]:
        r = self._rec
        row = {"loss": r.get("loss"), "nfe_train": r.get("nfe_forward"), "nfe_train_backward": r.get("nfe_backward"),
               "lr": self.sched.get_last_lr()[0]}  # fmt: skip
        if self.cfg.n_val:
            self.last = evaluate(self.model, self.cfg, self.data, split="val")
            row.update({f"val_{k}": v for k, v in self.last.items()})
            if not self.best or self.last[SELECT_ON] < self.best["val"][SELECT_ON]:
                self.best = {"iter": done, "val": dict(self.last)}
                self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                if self.best_path is not None and self.dist.main:
                    save_checkpoint(self.best_path, {"model": self.model.state_dict(), **self.best})
            row["selected_iter"] = self.best["iter"]
        if self.cfg.model == "latent-ode" and self._out:
            row["elbo"] = float(self._out["elbo"].detach().mean())
            row["kl"] = float(self._out["kl"].detach().mean())
        return row

    def state(self) -> dict[str, Any]:
        return {"last": dict(self.last), "rec": dict(self._rec), "best": dict(self.best)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.last, self._rec = dict(state["last"]), dict(state["rec"])
        self.best = dict(state.get("best", {}))

    def postfix(self, rec: dict[str, Any]) -> dict[str, Any]:
        post = {"loss": f"{rec['loss']:.4g}", "nfe": rec["nfe_forward"]}
        if self.last:
            post["val_rmse_ext"] = f"{self.last['rmse_extrapolation']:.4f}"
        return post


@on_device
def _train(cfg: LatentConfig, run: RunFolder, ckpt, stop, device: torch.device, dist) -> dict[str, Any]:
    write_config(
        run, "latent", cfg, device=str(device), threads=torch.get_num_threads(), world_size=dist.world
    )
    seed_everything(cfg.seed)
    data = make_data(cfg)
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(cfg.lr_decay**i, 0.1))
    task = _LatentTask(cfg, model, opt, sched, data, device, dist, best=run.path("best.pt"))
    trainer = Trainer(
        run, "latent", cfg, model, opt, sched, total=cfg.iters, eval_every=cfg.eval_every,
        desc=f"{cfg.model} obs={cfg.obs}", stop=stop, dist=dist,
    )  # fmt: skip
    if ckpt is not None:
        trainer.resume(ckpt, task)
    trainer.fit(task)
    if task.best:  # the test split, once, with the weights the validation split selected
        weights = task.best_weights  # selected before a resume: from best.pt
        model.load_state_dict(
            weights if weights is not None else read_weights(run.path("best.pt"), "latent")[0]
        )
        selected = {
            "selected_iter": task.best["iter"],
            **{f"val_{k}": v for k, v in task.best["val"].items()},
        }
    else:
        selected = {"selected_iter": cfg.iters}
    final = evaluate(model, cfg, data, split="test")
    metrics = {**final, **selected, "iterations": cfg.iters, "wall_time_s": trainer.totals["wall_time_s"], "model": cfg.model,
               "obs": cfg.obs, "n_parameters": sum(p.numel() for p in model.parameters()),
               "nfe_forward_total": trainer.totals["nfe_forward"],
               "nfe_backward_total": trainer.totals["nfe_backward"], "device": str(device),
               "world_size": dist.world}  # fmt: skip
    run.write_json("metrics.json", metrics)
    if cfg.plots and run.main:
        try:
            make_plots(model, cfg, data, run.root)
            records = [json.loads(v) for v in run.path("metrics.jsonl").read_text().splitlines() if v]
            series = {"forward": "nfe_train", "backward (adjoint)": "nfe_train_backward"}
            plot_nfe(run.path("nfe.png"), records, series, dpi=PLOT_DPI)
        except ImportError as exc:  # matplotlib is an optional extra
            print(f"plots skipped: {exc}", file=sys.stderr)
    return metrics


def evaluate_run(
    run_dir: str | Path, *, device: str | None = None, threads: int | None = None, split: str = "test"
) -> dict[str, Any]:
    """RMSEs of a run folder's selected weights (``best.pt``; ``checkpoint.pt``, the last iterate, for a
    run without a validation split), loaded with ``weights_only=True``, on the ``split`` (``"test"`` or
    ``"val"``) its ``config.json`` generates. Returns the ``rmse_*`` entries and ``nfe_forward``, equal on
    the same device and thread count to the run's ``metrics.json`` (its ``val_*`` entries for
    ``split="val"``)."""
    if split not in ("test", "val"):
        raise UsageError(f"split={split!r} is unknown; expected 'test' or 'val'")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, "latent", LatentConfig)
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = dataclasses.replace(cfg, **{k: v for k, v in _LEGACY_DEFAULTS.items() if k not in saved})
    if split == "val" and not cfg.n_val:
        raise UsageError(f"{str(run_dir)!r} was trained without a validation split (n_val=0)")
    dev = eval_device(device, cfg)
    torch.set_num_threads(threads or cfg.threads)
    best = run_dir / "best.pt"
    if best.is_file():
        weights, _ = read_weights(best, "latent")
    else:
        weights, ckpt = read_weights(run_dir / "checkpoint.pt", "latent")
        if ckpt["step"] != cfg.iters:
            print(f"note: the checkpoint is at iteration {ckpt['step']} of {cfg.iters}", file=sys.stderr)
    model = build_model(cfg).to(dev)
    model.load_state_dict(weights)
    return evaluate(model, cfg, make_data(cfg), split=split)


def train(
    cfg: LatentConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train one model into the run folder ``out``; returns the final metrics (also in ``metrics.json``)."""
    return execute(LATENT, cfg, out, resume=resume, overwrite=overwrite)


# -- plots -----------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pick_examples(data: SpiralData, k: int = 6) -> torch.Tensor:
    test = data.test_idx
    cw, ccw = test[data.clockwise[test]], test[~data.clockwise[test]]
    return torch.cat([ccw[: k // 2], cw[: k - k // 2]])


@torch.no_grad()
def make_plots(model, cfg: LatentConfig, data: SpiralData, folder: Path) -> list[Path]:
    """Figure 8 (observations, reconstruction, extrapolation); for the latent ODE also the latent
    trajectories projected to 2-D and a traversal of one latent dimension (Figure 9)."""
    plt = _plt()
    model.eval()
    folder = Path(folder)
    paths = []
    idx = _pick_examples(data)
    p = predict_all(model, cfg, data, idx)
    full = p["full"].cpu()
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    back = None
    if cfg.model == "latent-ode":  # also integrate backwards, before the first observation time
        t0, t_end = _window(data)
        t_back = torch.linspace(t0 - 1.5, t0, 40)[:-1].to(p["z0_mean"].device)
        back = model.predict(p["z0_mean"], model.anchor_time(t0, t_end), t_back).cpu()
    n_ctx = data.config.n_context
    for ax, k, i in zip(axes.flat, range(len(idx)), idx.tolist()):
        ax.plot(*data.clean[i].T, color="0.75", lw=1, label="truth")
        obs = data.obs_mask[i]
        ax.scatter(*data.noisy[i][obs].T, s=9, color="k", zorder=3, label="observed")
        if cfg.model == "latent-ode":
            ax.plot(*full[k, :n_ctx].T, color="tab:blue", lw=1.5, label="reconstruction")
            ax.plot(*back[k].T, color="tab:green", lw=1.2, ls="--", label="backwards")
        else:
            one = p["one_step"]
            v = one["target_valid"][k].cpu()
            ax.plot(*one["pred"][k].cpu()[v].T, ".", color="tab:blue", ms=4, label="one-step")
        ax.plot(*full[k, n_ctx:].T, color="tab:red", lw=1.5, label="extrapolation")
        ax.set_title(f"test #{i} ({'cw' if data.clockwise[i] else 'ccw'})", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7, loc="best")
    name = "Latent ODE" if cfg.model == "latent-ode" else "RNN"
    fig.suptitle(f"{name}, {cfg.obs} observations of the first {n_ctx} steps", fontsize=11)
    fig.tight_layout()
    paths.append(folder / "fig8_reconstructions.png")
    fig.savefig(paths[-1], dpi=PLOT_DPI)
    plt.close(fig)

    if cfg.model == "latent-ode":
        paths += _latent_plots(model, cfg, data, folder, plt)
    model.train()
    return paths


def _latent_plots(model, cfg, data, folder, plt) -> list[Path]:
    test = data.test_idx[:200]
    p = predict_all(model, cfg, data, test)
    mean = p["z0_mean"]
    t_a = model.anchor_time(*_window(data))
    zs = model.latent_trajectory(mean, t_a, data.times.to(mean.device))
    zs = (zs[0] if cfg.poisson else zs).cpu()  # (B, T, L)
    flat = zs[:, : data.config.n_context].reshape(-1, zs.shape[-1])
    centre = flat.mean(0)
    _, _, v = torch.linalg.svd(flat - centre, full_matrices=False)
    proj = (zs - centre) @ v[:2].T  # (B, T, 2)
    cw = data.clockwise[test]
    n_ctx = data.config.n_context
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, stop, title in ((axes[0], n_ctx, "observed window"), (axes[1], None, "with extrapolation")):
        p2 = proj[:, :n_ctx] if stop else proj  # the projection is fitted on the observed window only
        for j in range(p2.shape[0]):
            ax.plot(*p2[j].T, color="tab:red" if cw[j] else "tab:blue", lw=0.6, alpha=0.6)
        ax.scatter(*p2[:, 0].T, s=5, c=["tab:red" if c else "tab:blue" for c in cw.tolist()], zorder=3)
        ax.set_title(f"z(t), 2 principal components: {title}", fontsize=9)
    axes[0].plot([], [], color="tab:blue", label="counter-clockwise")
    axes[0].plot([], [], color="tab:red", label="clockwise")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = [folder / "latent_trajectories.png"]
    fig.savefig(out[-1], dpi=PLOT_DPI)
    plt.close(fig)

    # Figure 9: vary the latent dimension that best separates the two directions.
    m0 = mean.cpu()
    sep = (m0[cw].mean(0) - m0[~cw].mean(0)).abs() / (m0.std(0) + 1e-8)
    d = int(sep.argmax())
    lo, hi = (float(q) for q in torch.quantile(m0[:, d], torch.tensor([0.05, 0.95])))
    values = torch.linspace(lo, hi, 9)
    base = m0[~cw][0] if (~cw).any() else m0[0]
    z0 = base.repeat(len(values), 1)
    z0[:, d] = values
    window = data.times[: data.config.n_context].to(mean.device)  # the span the model was trained on
    traj = model.predict(z0.to(mean.device), t_a, window).cpu()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cmap = plt.get_cmap("coolwarm")
    for j, val in enumerate(values.tolist()):
        ax.plot(*traj[j].T, color=cmap(j / (len(values) - 1)), lw=1.2, label=f"z[{d}]={val:.2f}")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=6, ncol=3, loc="best")
    ax.set_title(f"Figure 9: decoded z(t), t in the observed window, as z0[{d}] varies", fontsize=9)
    fig.tight_layout()
    out.append(folder / "fig9_traversal.png")
    fig.savefig(out[-1], dpi=PLOT_DPI)
    plt.close(fig)
    return out


# -- Table 2 ---------------------------------------------------------------------------------------
def _train_cell(args: tuple[LatentConfig, str, bool]) -> dict[str, Any]:
    cfg, folder, force = args
    print(f"== training {cfg.model} with {cfg.obs} observations, seed {cfg.seed} → {folder}", flush=True)
    saved = Path(folder) / "config.json"
    same = saved.is_file() and _same_config(json.loads(saved.read_text()), cfg)
    resume = not force and same and (Path(folder) / "checkpoint.pt").is_file()  # else: start over
    try:
        return train(cfg, folder, resume=resume, overwrite=not resume)
    except TrainingDiverged as exc:  # a tuning candidate may; the caller decides what that means
        print(f"== {folder}: {exc}", flush=True)
        return {"diverged": str(exc), "model": cfg.model, "obs": cfg.obs}


def _train_cells(cells: dict[Any, tuple[LatentConfig, Path]], jobs: int, force: bool) -> dict[Any, dict]:
    """``metrics.json`` of every cell ``key → (config, folder)``: a finished run in ``folder`` with the
    same config is reused, an interrupted one resumed, the rest trained (``force``: all retrained),
    ``jobs`` at a time in separate processes. Keys that share a folder are trained once."""
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    metrics, todo = {}, {}
    for key, (cfg, folder) in cells.items():
        done = folder / "metrics.json"
        same = done.exists() and _same_config(json.loads((folder / "config.json").read_text()), cfg)
        if same and not force:
            metrics[key] = json.loads(done.read_text())
        else:
            todo.setdefault(str(folder), (cfg, []))[1].append(key)
    work = [(cfg, folder, force) for folder, (cfg, _) in todo.items()]
    if jobs > 1 and len(work) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(work)), mp_context=ctx) as pool:
            trained = list(pool.map(_train_cell, work))
    else:
        trained = list(map(_train_cell, work))
    for (_, keys), m in zip(todo.values(), trained):
        metrics.update(dict.fromkeys(keys, m))
    return metrics


def run_table2(
    base: LatentConfig,
    runs_dir: str | Path,
    out: str | Path,
    obs_list=(30, 50, 100),
    models=MODELS,
    force: bool = False,
    seeds: tuple[int, ...] | None = None,
    jobs: int = 1,
) -> str:
    """Train every (model, n_obs, seed) cell (reusing finished runs with the same config), then write
    ``table2.md``/``table2.json`` and copy the small Figure 8/9 PNGs to ``out``.

    ``seeds`` (default: ``base.seed`` only): with more than one, each cell is trained once per seed in
    ``MODEL-obsN-seedS`` and the table reports the mean over seeds next to every seed's value.
    ``jobs`` > 1 trains that many cells at once in separate processes (each with ``base.threads``
    threads)."""
    runs_dir, out = Path(runs_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = (base.seed,) if not seeds else tuple(dict.fromkeys(seeds))
    cells = {}
    for n in obs_list:
        for model in models:
            for seed in seeds:
                cfg = dataclasses.replace(base, model=model, obs=n, seed=seed)
                name = f"{model}-obs{n}" if len(seeds) == 1 else f"{model}-obs{n}-seed{seed}"
                cells[(model, n, seed)] = (cfg, runs_dir / name)
    metrics = _train_cells(cells, jobs, force)
    failed = [str(cells[k][1]) for k, m in metrics.items() if "diverged" in m]
    if failed:
        raise TrainingDiverged(0, "the runs " + ", ".join(failed) + " diverged")
    results: dict[str, dict[int, dict[int, dict]]] = {m: {} for m in models}
    for (model, n, seed), (_, folder) in cells.items():
        results[model].setdefault(n, {})[seed] = metrics[(model, n, seed)]
        if seed == seeds[0]:
            for png in ("fig8_reconstructions.png", "latent_trajectories.png", "fig9_traversal.png"):
                if (folder / png).exists():
                    shutil.copy(folder / png, out / f"{Path(png).stem}_{model}_obs{n}.png")
    text = format_table2(results, base, obs_list)
    (out / "table2.md").write_text(text)
    as_json = {
        m: {str(n): {"mean": _mean_metrics(by_seed), "seeds": {str(s): r for s, r in by_seed.items()}}
            for n, by_seed in v.items()}
        for m, v in results.items()
    }  # fmt: skip
    (out / "table2.json").write_text(json.dumps(as_json, indent=2) + "\n")
    print(text)
    return text


_TABLE_KEYS = ("rmse_extrapolation", "rmse_extrapolation_noisy", "rmse_interpolation", "wall_time_s")


def _mean_metrics(by_seed: dict[int, dict]) -> dict[str, float]:
    return {k: sum(r[k] for r in by_seed.values()) / len(by_seed) for k in _TABLE_KEYS}


def format_table2(results: dict[str, dict[int, dict[int, dict]]], base: LatentConfig, obs_list) -> str:
    """Markdown for ``results[model][n_obs][seed] = metrics``; cells are means over the seeds."""
    names = {"rnn": "RNN", "latent-ode": "Latent ODE"}
    head = "| model | " + " | ".join(f"{n}/100" for n in obs_list) + " |"
    sep = "|---|" + "---|" * len(obs_list)
    seeds = sorted({s for res in results.values() for by_seed in res.values() for s in by_seed})
    sizes = (
        f"latent {base.latent_dim}, encoder {base.encoder} {base.enc_hidden}, dynamics {base.dyn_layers}×"
        f"{base.dyn_hidden} {base.dyn_activation}, decoder {base.dec_hidden}, anchor {base.anchor}; "
        f"RNN {base.rnn_hidden}"
    )
    lines = [
        f"Extrapolation RMSE on time steps 101-200 of the {base.n_spirals - base.n_train} test spirals "
        f"(noise std {base.noise_std}; {base.iters} iterations; solver {base.method} rtol={base.rtol} "
        f"atol={base.atol}; {sizes}; "
        + (f"seed {seeds[0]})." if len(seeds) == 1 else f"mean over seeds {', '.join(map(str, seeds))})."),
        "",
        "Training objective: "
        + (
            "reconstruction of the observed window only (train horizon 100)."
            if base.train_horizon == 100
            else f"forecasting: the encoder sees the observed points of a training spiral's first 100 steps, "
            f"the likelihood scores them and every step 101-{base.train_horizon} of that training spiral "
            "(test spirals' futures are never used); the RNN is teacher-forced on the same points."
        ),
        "",
        head,
        sep,
    ]

    means = {m: {n: _mean_metrics(by_seed) for n, by_seed in res.items()} for m, res in results.items()}
    for key, label in (
        ("rmse_extrapolation", "vs clean truth"),
        ("rmse_extrapolation_noisy", "vs noisy data"),
    ):
        for m, res in means.items():
            cells = [f"{res[n][key]:.4f}" if n in res else "—" for n in obs_list]
            lines.append(f"| {names[m]} (ours, {label}) | " + " | ".join(cells) + " |")
    for m in results:
        paper = [f"{PAPER_TABLE2[m][n]:.4f}" if n in PAPER_TABLE2[m] else "—" for n in obs_list]
        lines.append(f"| {names[m]} (paper) | " + " | ".join(paper) + " |")
    if len(seeds) > 1:
        lines += ["", "Every seed, extrapolation RMSE vs clean truth:", "", head, sep]
        for m, res in results.items():
            for s in seeds:
                cells = [f"{res[n][s]['rmse_extrapolation']:.4f}" if s in res.get(n, {}) else "—"
                         for n in obs_list]  # fmt: skip
                lines.append(f"| {names[m]}, seed {s} | " + " | ".join(cells) + " |")
    lines += ["", "Interpolation RMSE vs clean truth (latent ODE: all 100 window points; RNN: one-step-ahead "
              "at observed points), mean wall time per run:", "", head, sep]  # fmt: skip
    for m, res in means.items():
        cells = [
            f"{res[n]['rmse_interpolation']:.4f} ({res[n]['wall_time_s'] / 60:.1f} min)" if n in res else "—"
            for n in obs_list
        ]
        lines.append(f"| {names[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- Table 2 with selection on the validation split ------------------------------------------------
# The tuning grid: configuration name → the fields it sets (the rest is the base config). "paper" is the
# paper's sizes (§5.1: latent 4, recognition RNN 25, dynamics and decoder one hidden layer of 20; RNN
# baseline 25 units), also the reference row. Both models get as many configurations.
TABLE2_GRID: dict[str, dict[str, dict[str, Any]]] = {
    "latent-ode": {
        "paper": {"latent_dim": 4, "enc_hidden": 25, "dyn_hidden": 20, "dyn_layers": 1, "dec_hidden": 20,
                  "anchor": "start"},
        "wide-start": {"latent_dim": 4, "enc_hidden": 25, "dyn_hidden": 64, "dyn_layers": 2, "dec_hidden": 100,
                       "anchor": "start"},
        "wide-end": {"latent_dim": 4, "enc_hidden": 25, "dyn_hidden": 64, "dyn_layers": 2, "dec_hidden": 100,
                     "anchor": "end"},
    },
    "rnn": {"paper": {"rnn_hidden": 25}, "h48": {"rnn_hidden": 48}, "h64": {"rnn_hidden": 64}},
}  # fmt: skip
TABLE2_TUNE_LRS = (0.02,)


def _score(metrics: dict) -> float:
    return math.inf if "diverged" in metrics else metrics[f"val_{SELECT_ON}"]


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (``None`` for fewer than two values)."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def run_table2_protocol(
    base: LatentConfig,
    runs_dir: str | Path,
    out: str | Path,
    *,
    obs_list=(30, 50, 100),
    models=MODELS,
    seeds: tuple[int, ...] = (0, 1, 2),
    tune_obs: int = 50,
    tune_lrs: tuple[float, ...] = TABLE2_TUNE_LRS,
    reference_seeds: tuple[int, ...] | None = None,
    grid: dict[str, dict[str, dict[str, Any]]] | None = None,
    jobs: int = 1,
    force: bool = False,
) -> dict[str, Any]:
    """Table 2 with every choice made on the validation split (``base.n_val`` > 0 spirals carved from the
    training spirals), the same tuning budget for both models, then the test split once per final run.

    1. Tuning, at ``tune_obs`` observations and seed ``seeds[0]``: every configuration of ``grid[model]``
       (default :data:`TABLE2_GRID`) at ``base.lr``; then the best of them at each learning rate of
       ``tune_lrs``. Within a run the iteration is selected on the validation split too (``best.pt``).
       The best run of a model (lowest validation :data:`SELECT_ON`) fixes its configuration.
    2. Final cells: that configuration at every ``obs_list`` × ``seeds`` (mean ± sample std over seeds).
    3. Reference row: the ``"paper"`` configuration at ``base.lr`` at every ``obs_list`` ×
       ``reference_seeds`` (default ``seeds[:1]``; empty: no reference row).

    Run folders: ``runs_dir/tune/`` and ``runs_dir/final/``, named ``MODEL-CONFIG-lrLR-obsN-seedS``; a cell
    identical to a tuning run reuses its folder, finished runs are reused, interrupted ones resumed.
    Writes ``table2.md`` and ``table2.json`` (and the seed-``seeds[0]`` Figure 8/9 PNGs) to ``out``;
    returns what ``table2.json`` holds."""
    if base.n_val < 1:
        raise UsageError("the validation protocol needs a validation split: n_val ≥ 1")
    grid = TABLE2_GRID if grid is None else grid
    seeds = tuple(dict.fromkeys(seeds))
    ref_seeds = seeds[:1] if reference_seeds is None else tuple(dict.fromkeys(reference_seeds))
    runs_dir, out = Path(runs_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def cell(model: str, name: str, lr: float, n: int, seed: int, stage: str) -> tuple[LatentConfig, Path]:
        cfg = dataclasses.replace(base, model=model, obs=n, seed=seed, lr=lr, **grid[model][name])
        return cfg, runs_dir / stage / f"{model}-{name}-lr{lr:g}-obs{n}-seed{seed}"

    stage1 = {(m, name, base.lr): cell(m, name, base.lr, tune_obs, seeds[0], "tune") for m in models
              for name in grid[m]}  # fmt: skip
    tuned = _train_cells(stage1, jobs, force)
    best1 = {m: min((k for k in stage1 if k[0] == m), key=lambda k: _score(tuned[k])) for m in models}
    stage2 = {(m, name, lr): cell(m, name, lr, tune_obs, seeds[0], "tune") for m, (_, name, _) in best1.items()
              for lr in tune_lrs if lr != base.lr}  # fmt: skip
    tuned.update(_train_cells(stage2, jobs, force))
    tune_cells = {**stage1, **stage2}
    winners = {m: min((k for k in tune_cells if k[0] == m), key=lambda k: _score(tuned[k])) for m in models}

    # Submission order: the final cells (the models interleaved, so that parallel jobs take both), then
    # the reference row.
    final: dict[tuple, tuple[LatentConfig, Path]] = {}
    for s in seeds:
        for n in obs_list:
            for m in models:
                _, name, lr = winners[m]
                final[("final", m, n, s)] = cell(m, name, lr, n, s, "final")
    for s in ref_seeds:
        for n in obs_list:
            for m in models:
                if "paper" in grid[m]:
                    final[("reference", m, n, s)] = cell(m, "paper", base.lr, n, s, "final")
    for key, (cfg, _) in final.items():  # identical to a tuning run: that run is the cell
        same = [f for c, f in tune_cells.values() if c == cfg]
        if same:
            final[key] = (cfg, same[0])
    done = _train_cells(final, jobs, force)
    failed = [str(final[k][1]) for k, m in done.items() if "diverged" in m]
    if failed:
        raise TrainingDiverged(0, "the table's runs " + ", ".join(failed) + " diverged")

    def rel(folder: Path) -> str:
        return folder.relative_to(runs_dir).as_posix()

    def row(m: str, name: str, lr: float, metrics: dict, folder: Path) -> dict[str, Any]:
        return {"model": m, "config": name, "lr": lr, "fields": grid[m][name], "folder": rel(folder),
                **{k: metrics.get(k) for k in ("selected_iter", "n_parameters", "wall_time_s", "diverged")},
                **{k: v for k, v in metrics.items() if k.startswith("val_")}}  # fmt: skip

    def by_cell(kind: str) -> dict[str, dict[str, dict[str, Any]]]:
        res: dict[str, dict[str, dict[str, Any]]] = {}
        for (k, m, n, s), (_, folder) in final.items():
            if k == kind:
                res.setdefault(m, {}).setdefault(str(n), {"seeds": {}})["seeds"][str(s)] = {
                    **done[(k, m, n, s)], "folder": rel(folder)}  # fmt: skip
        for per_n in res.values():
            for entry in per_n.values():
                runs = list(entry["seeds"].values())
                entry["mean"] = {key: sum(r[key] for r in runs) / len(runs) for key in _TABLE_KEYS}
                entry["std"] = {key: _std([r[key] for r in runs]) for key in _TABLE_KEYS}
        return res

    result = {
        "protocol": {
            "fit_spirals": base.n_train - base.n_val, "val_spirals": base.n_val,
            "test_spirals": base.n_spirals - base.n_train, "select_on": f"val_{SELECT_ON}", "tune_obs": tune_obs,
            "tune_seed": seeds[0], "base_lr": base.lr, "tune_lrs": list(tune_lrs), "seeds": list(seeds),
            "reference_seeds": list(ref_seeds), "iters": base.iters, "batch_size": base.batch_size,
            "eval_every": base.eval_every, "train_horizon": base.train_horizon, "noise_std": base.noise_std,
            "method": base.method, "rtol": base.rtol, "atol": base.atol, "lr_decay": base.lr_decay,
        },
        "tuning": [row(m, name, lr, tuned[(m, name, lr)], tune_cells[(m, name, lr)][1])
                   for (m, name, lr) in tune_cells],
        "winners": {m: {"config": name, "lr": lr, "fields": grid[m][name]} for m, (_, name, lr) in winners.items()},
        "final": by_cell("final"),
        "reference": by_cell("reference"),
        "paper": {m: {str(n): v for n, v in PAPER_TABLE2[m].items()} for m in models},
    }  # fmt: skip
    for m in models:
        for n in obs_list:
            folder = final[("final", m, n, seeds[0])][1]
            for png in ("fig8_reconstructions.png", "latent_trajectories.png", "fig9_traversal.png"):
                if (folder / png).exists():
                    shutil.copy(folder / png, out / f"{Path(png).stem}_{m}_obs{n}.png")
    (out / "table2.json").write_text(json.dumps(result, indent=2) + "\n")
    text = format_table2_protocol(result, obs_list)
    (out / "table2.md").write_text(text)
    print(text)
    return result


_NAMES = {"rnn": "RNN", "latent-ode": "Latent ODE"}


def _pm(entry: dict | None, key: str = "rmse_extrapolation") -> str:
    if entry is None:
        return "—"
    mean, std = entry["mean"][key], entry["std"][key]
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table2_protocol(result: dict[str, Any], obs_list) -> str:
    """Markdown of :func:`run_table2_protocol`'s result."""
    p = result["protocol"]
    head = "| model | " + " | ".join(f"{n}/100" for n in obs_list) + " |"
    sep = "|---|" + "---|" * len(obs_list)
    seeds = ", ".join(map(str, p["seeds"]))
    lines = [
        f"Data: {p['fit_spirals']} training spirals fitted, {p['val_spirals']} validation spirals carved from "
        f"the training spirals, {p['test_spirals']} test spirals (noise std {p['noise_std']}). Every run: "
        f"{p['iters']} iterations, batch {p['batch_size'] or 'full'}, Adam lr·max({p['lr_decay']}^i, 0.1), "
        f"train horizon {p['train_horizon']}, solver {p['method']} rtol={p['rtol']} atol={p['atol']}; the "
        f"weights kept are those of the evaluation (every {p['eval_every']} iterations) with the lowest "
        f"`{p['select_on']}`; the test split is evaluated once, with them.",
        "",
        f"Tuning at {p['tune_obs']} observations, seed {p['tune_seed']}, validation RMSE (extrapolation, vs "
        f"noisy data / vs clean truth); every configuration at lr {p['base_lr']:g}, then the best one at lr "
        + ", ".join(f"{lr:g}" for lr in p["tune_lrs"])
        + ":",
        "",
        "| model | configuration | lr | val RMSE vs noisy | val RMSE vs clean | selected iteration | parameters "
        "| wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["tuning"]:
        fields = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in r["fields"].items())
        win = result["winners"][r["model"]]
        mark = "**" if (win["config"], win["lr"]) == (r["config"], r["lr"]) else ""
        if r.get("diverged"):
            lines.append(
                f"| {_NAMES[r['model']]} | {r['config']} ({fields}) | {r['lr']:g} | diverged | | | | |"
            )
            continue
        lines.append(
            f"| {_NAMES[r['model']]} | {mark}{r['config']}{mark} ({fields}) | {r['lr']:g} | "
            f"{r['val_rmse_extrapolation_noisy']:.4f} | {r['val_rmse_extrapolation']:.4f} | {r['selected_iter']} | "
            f"{r['n_parameters']} | {r['wall_time_s'] / 60:.1f} min |"
        )
    lines += ["", f"Test extrapolation RMSE vs clean truth (time steps 101-200), mean ± sample std over seeds "
              f"{seeds}:", "", head, sep]  # fmt: skip
    for kind, label in (("final", "selected on validation"), ("reference", "paper sizes")):
        for m, per_n in result[kind].items():
            name = result["winners"][m]["config"] if kind == "final" else "paper"
            lr = result["winners"][m]["lr"] if kind == "final" else p["base_lr"]
            n_seeds = len(next(iter(per_n.values()))["seeds"])
            cells = [_pm(per_n.get(str(n))) for n in obs_list]
            lines.append(f"| {_NAMES[m]}, {label} ({name}, lr {lr:g}; {n_seeds} seed{'s' * (n_seeds > 1)}) | "
                         + " | ".join(cells) + " |")  # fmt: skip
    for m, per_n in result["paper"].items():
        lines.append(
            f"| {_NAMES[m]} (paper) | "
            + " | ".join(f"{per_n[str(n)]:.4f}" if str(n) in per_n else "—" for n in obs_list)
            + " |"
        )
    lines += ["", "Every run, test extrapolation RMSE vs clean truth:", "", head, sep]
    for kind in ("final", "reference"):
        for m, per_n in result[kind].items():
            label = result["winners"][m]["config"] if kind == "final" else "paper"
            for s in sorted({s for e in per_n.values() for s in e["seeds"]}, key=int):
                cells = [f"{per_n[str(n)]['seeds'][s]['rmse_extrapolation']:.4f}" if s in per_n.get(str(n), {})
                         .get("seeds", {}) else "—" for n in obs_list]  # fmt: skip
                lines.append(f"| {_NAMES[m]} {label}, seed {s} | " + " | ".join(cells) + " |")
    lines += ["", "Test extrapolation RMSE vs noisy data; interpolation RMSE vs clean truth (latent ODE: all 100 "
              "window steps; RNN: one-step-ahead at the observed points); mean wall time per run:", "", head,
              sep]  # fmt: skip
    for kind in ("final", "reference"):
        for m, per_n in result[kind].items():
            label = result["winners"][m]["config"] if kind == "final" else "paper"
            cells = [
                f"{_pm(e, 'rmse_extrapolation_noisy')}; {_pm(e, 'rmse_interpolation')} "
                f"({e['mean']['wall_time_s'] / 60:.1f} min)"
                if (e := per_n.get(str(n)))
                else "—"
                for n in obs_list
            ]
            lines.append(f"| {_NAMES[m]} {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- command line ----------------------------------------------------------------------------------


LATENT = Experiment(
    name="latent",
    config_cls=LatentConfig,
    train=_train,
    default_out=lambda cfg: f"runs/latent/{cfg.model}-obs{cfg.obs}",
    headline=lambda m: (
        f"extrapolation RMSE {m['rmse_extrapolation']:.4f} (vs noisy data {m['rmse_extrapolation_noisy']:.4f}), "
        f"interpolation RMSE {m['rmse_interpolation']:.4f}; {m['wall_time_s']:.1f} s"
    ),
    resumable=lambda saved: ("iters", "eval_every", "threads", "device", "plots", "max_steps"),
    distributed=True,
)


def _cmd_table2(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        base = resolve_config(LatentConfig, typed_options(args, LatentConfig))
        check_device(base)
        if args.jobs < 1:
            raise UsageError(f"--jobs must be a positive integer, got {args.jobs}")
        for n in args.obs_list:
            dataclasses.replace(base, obs=n)  # validates each
        if args.tune:
            if args.tune_obs not in args.obs_list:
                raise UsageError(f"--tune-obs {args.tune_obs} is not one of --obs {args.obs_list}")
            if any(lr <= 0 for lr in args.tune_lrs):
                raise UsageError(f"--tune-lrs must be positive, got {args.tune_lrs}")
            run_table2_protocol(
                base, args.runs_dir, args.out, obs_list=tuple(args.obs_list), models=tuple(args.models),
                seeds=tuple(args.seeds) if args.seeds else (0, 1, 2), tune_obs=args.tune_obs,
                tune_lrs=tuple(args.tune_lrs),
                reference_seeds=None if args.reference_seeds is None else tuple(args.reference_seeds),
                jobs=args.jobs, force=args.force,
            )  # fmt: skip
        else:
            run_table2(
                base, args.runs_dir, args.out, obs_list=args.obs_list, models=args.models, force=args.force,
                seeds=tuple(args.seeds) if args.seeds else None, jobs=args.jobs,
            )  # fmt: skip
    except UsageError as exc:
        parser.error(str(exc))
    print(f"table2: results in {args.out} (table2.md, table2.json); runs in {args.runs_dir}")
    return 0


def register_eval(evals) -> None:
    """``neuralode eval latent RUN_DIR``."""
    p = _register_eval(
        evals, "latent", evaluate_run, help="test RMSEs of a `train latent` run folder",
        description="Evaluate a `neuralode train latent` run folder's selected weights (best.pt, chosen on the "
        "validation split; checkpoint.pt for a run without one) on its test (or validation) spirals; print the "
        "extrapolation/interpolation RMSEs and nfe_forward as JSON (the values in the run's metrics.json, "
        "val_* for --split val, on the same device and thread count).", forward=("split",),
    )  # fmt: skip
    p.add_argument("--split", choices=("test", "val"), default="test", help="default: test")


def register(commands, train_parsers) -> None:
    register_experiment(
        train_parsers, LATENT, names=("latent",), help="latent ODE or RNN on irregular spirals (Table 2)",
        description="Train a latent ODE (or the RNN baseline) on irregularly observed noisy spirals.\n"
        "Writes config.json, run.json, metrics.jsonl, metrics.json (extrapolation/interpolation RMSE), "
        "checkpoint.pt and the Figure 8/9 plots into the run folder.",
    )  # fmt: skip
    t = commands.add_parser(
        "table2", help="Table 2: latent ODE and RNN at 30/50/100 observations",
        description="Paper Table 2: train every (model, observations, seed) cell, reusing finished runs, "
        "then write table2.md, table2.json and the Figure 8/9 PNGs. With --tune, the validation protocol: "
        "each model's configuration (sizes, anchor, learning rate: a fixed grid, as many configurations for "
        "both) is chosen on the validation split at --tune-obs observations, then trained at every --obs "
        "for each of --seeds (default 0 1 2) and evaluated on the test split once, with a reference row "
        "at the paper's sizes; run folders go to RUNS_DIR/tune and RUNS_DIR/final.",
    )  # fmt: skip
    t.add_argument(
        "--obs", dest="obs_list", type=int, nargs="+", default=[30, 50, 100], help="default: 30 50 100"
    )
    t.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="default: both")
    t.add_argument(
        "--runs-dir", default="runs/table2", help="where the run folders go (default: runs/table2)"
    )
    t.add_argument(
        "--out", default="runs/table2", help="where table2.md and the PNGs go (default: runs/table2)"
    )
    t.add_argument("--force", action="store_true", help="retrain even if a finished run exists")
    t.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="train each cell once per seed (default: --seed)"
    )
    t.add_argument(
        "--jobs", type=int, default=1, help="cells trained at once in separate processes (default: 1)"
    )
    t.add_argument("--tune", action="store_true", help="the validation protocol (see above)")
    t.add_argument(
        "--tune-obs", type=int, default=50, help="--tune: observations of the tuning runs (default: 50)"
    )
    t.add_argument(
        "--tune-lrs", type=float, nargs="+", default=list(TABLE2_TUNE_LRS),
        help="--tune: learning rates tried for each model's best configuration besides --lr (default: 0.02)",
    )  # fmt: skip
    t.add_argument(
        "--reference-seeds", type=int, nargs="*", default=None,
        help="--tune: seeds of the paper-size reference row (default: the first of --seeds; the option "
        "without seeds: no reference row)",
    )  # fmt: skip
    add_config_options(t, LatentConfig, hidden=("model", "obs"))
    t.set_defaults(func=lambda args, _p=t: _cmd_table2(args, _p))
