"""Continuous normalizing flows on 2-D toy data (paper §4, Figures 4-5; FFJORD; RNODE).

Commands (see ``docs/cnf.md``)::

    neuralode train cnf --data moons --field planar --width 64 --iters 2000 --out runs/cnf-moons
    neuralode train nf  --data moons --layers 64 --iters 2000 --out runs/nf-moons
    neuralode figure4   --out runs/figure4

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per evaluation), ``metrics.json`` (final:
``train_nll``, ``test_nll`` in nats, ``nfe_forward``, ``nfe_backward``, ...), ``checkpoint.pt`` and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from neuralode import ADAPTIVE_METHODS, GRADIENT_METHODS, SOLVERS
from neuralode.datasets.toy2d import (
    REFERENCE_LOG_PROBS,
    TARGET_ENERGIES,
    TOY_DATASETS,
    sample_toy,
    target_log_normalizer,
)
from neuralode.experiments._config import (
    UsageError,
    add_config_options,
    check_choice,
    check_nonneg_float,
    check_positive_float,
    check_positive_int,
    opt,
    resolve_config,
    typed_options,
)
from neuralode.experiments._runs import RunDir, check_device_name, progress, resolve_device, seed_everything
from neuralode.experiments._trainer import (
    Experiment,
    RunFolder,
    Trainer,
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
from neuralode.models.cnf import CNF, ConcatSquashMLP, GatedPlanarField
from neuralode.models.planar_flow import PlanarNF

__all__ = [
    "CNF_EXPERIMENT",
    "NF_EXPERIMENT",
    "CNFConfig",
    "Figure4Config",
    "NFConfig",
    "build_cnf",
    "evaluate_run",
    "register",
    "run_figure4",
    "train_cnf",
    "train_nf",
]

_FIELDS = ("planar", "mlp")  # the CNF vector fields
PLOT_DPI = 150
_PLOT_BOX = 4.0  # half-width of the plotted square; the toy data sets live inside [-4, 4]^2


# --- configs ------------------------------------------------------------------------------------------

_DATA = sorted(TOY_DATASETS)


@dataclasses.dataclass
class CNFConfig:
    """One CNF training run (maximum likelihood on a toy data set)."""

    dataset: str = opt("moons", "toy data set", choices=_DATA, aliases=("--data",))
    field: str = opt(
        "planar", "vector field: 'planar' (the paper's gated hypernetwork) or 'mlp' (FFJORD's concat-squash)",
        choices=_FIELDS,
    )  # fmt: skip
    width: int = opt(64, "planar: number of units M")
    hyper_hidden: int = opt(32, "planar: hypernetwork width")
    hidden: str = opt("64-64-64", "mlp: hidden widths joined by '-'")
    activation: str = opt("tanh", "mlp: activation", choices=("tanh", "softplus", "elu"))
    end_time: float = opt(1.0, "initial end time T (data at t = T, base at t = 0)")
    learn_end_time: bool = opt(True, "train T")
    base_std: float = opt(1.0, "standard deviation of the Gaussian base density")
    divergence: str = opt(
        "exact", "trace during training (evaluation is always exact)", choices=("exact", "hutchinson")
    )
    noise: str = opt(
        "gaussian", "Hutchinson noise (drawn once per solve)", choices=("gaussian", "rademacher")
    )
    method: str = opt("dopri5", "ODE solver", choices=SOLVERS, metavar="NAME")
    rtol: float = opt(1e-5, "relative tolerance")
    atol: float = opt(1e-5, "absolute tolerance")
    max_steps: int = opt(1000, "work budget: solver steps per solve (adaptive methods); more is divergence")
    eval_tol: float = opt(0.0, "rtol = atol for the test NLL and plots (0: the training tolerances)")
    gradient: str = opt("direct", "gradient method", choices=GRADIENT_METHODS)
    seminorm: bool = opt(False, "adjoint: leave the parameter adjoints out of the backward error norm")
    kinetic: float = opt(0.0, "RNODE kinetic-energy weight")
    jacobian: float = opt(0.0, "RNODE Jacobian-Frobenius weight")
    iters: int = opt(2000, "training iterations (fresh data every iteration)")
    batch_size: int = opt(256, "samples per iteration", aliases=("--batch",))
    lr: float = opt(1e-3, "Adam learning rate")
    lr_schedule: str = opt(
        "constant", "constant, or cosine (to 0 over --iters)", choices=("constant", "cosine")
    )
    weight_decay: float = opt(1e-5, "Adam weight decay")
    eval_every: int = opt(250, "evaluate the test NLL (1000 points) and checkpoint every N iterations")
    eval_size: int = opt(5000, "held-out test points (the final NLL uses all of them)", aliases=("--n-test",))
    seed: int = opt(0, "random seed")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    threads: int = opt(1, "torch CPU threads")
    plots: bool = opt(True, "write the plots at the end")

    def __post_init__(self) -> None:
        check_choice(self, "dataset", _DATA)
        check_choice(self, "field", _FIELDS)
        check_choice(self, "method", SOLVERS)
        check_choice(self, "gradient", GRADIENT_METHODS)
        check_positive_int(self, "width", "hyper_hidden", "iters", "batch_size", "eval_every", "eval_size")
        check_positive_int(self, "threads", "max_steps")
        check_positive_float(self, "end_time", "base_std", "rtol", "atol", "lr")
        check_nonneg_float(self, "eval_tol", "kinetic", "jacobian", "weight_decay")
        _parse_dims(self.hidden)
        check_device_name(self.device)


@dataclasses.dataclass
class NFConfig:
    """One planar-NF training run (maximum likelihood, layers in the data → base direction)."""

    dataset: str = opt("moons", "toy data set", choices=_DATA, aliases=("--data",))
    layers: int = opt(64, "planar NF: number of layers K")
    base_std: float = opt(1.0, "standard deviation of the Gaussian base density")
    iters: int = opt(2000, "training iterations (fresh data every iteration)")
    batch_size: int = opt(256, "samples per iteration", aliases=("--batch",))
    lr: float = opt(1e-3, "learning rate")
    lr_schedule: str = opt(
        "constant", "constant, or cosine (to 0 over --iters)", choices=("constant", "cosine")
    )
    optimizer: str = opt("adam", "optimizer", choices=("adam", "rmsprop"))
    eval_every: int = opt(250, "evaluate the test NLL and checkpoint every N iterations")
    eval_size: int = opt(5000, "held-out test points", aliases=("--n-test",))
    seed: int = opt(0, "random seed")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    threads: int = opt(1, "torch CPU threads")
    plots: bool = opt(True, "write the plots at the end")

    def __post_init__(self) -> None:
        check_choice(self, "dataset", _DATA)
        check_choice(self, "optimizer", ("adam", "rmsprop"))
        check_positive_int(self, "layers", "iters", "batch_size", "eval_every", "eval_size", "threads")
        check_positive_float(self, "base_std", "lr")
        check_device_name(self.device)


@dataclasses.dataclass
class Figure4Config:
    """Density matching, KL(q‖p), NF with K layers vs CNF with M units (paper Figure 4, reduced budget)."""

    targets: str = opt("U1,U2,U3", "comma-separated target energies (Rezende & Mohamed's U1..U4)")
    sizes: str = opt("2,8,32", "comma-separated K (NF layers) = M (CNF units)")
    nf_iters: int = opt(5000, "NF iterations (paper: 500,000 with RMSprop)")
    cnf_iters: int = opt(500, "CNF iterations (paper: 10,000 with Adam)")
    batch_size: int = opt(256, "samples per iteration", aliases=("--batch",))
    nf_lr: float = opt(1e-3, "NF RMSprop learning rate")
    cnf_lr: float = opt(1e-2, "CNF Adam learning rate")
    end_time: float = opt(1.0, "CNF end time T")
    rtol: float = opt(1e-5, "relative tolerance")
    atol: float = opt(1e-5, "absolute tolerance")
    eval_size: int = opt(10000, "samples for the final KL estimate", aliases=("--n-eval",))
    seed: int = opt(0, "random seed")
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    threads: int = opt(1, "torch CPU threads")

    def __post_init__(self) -> None:
        check_positive_int(self, "nf_iters", "cnf_iters", "batch_size", "eval_size", "threads")
        check_positive_float(self, "nf_lr", "cnf_lr", "end_time", "rtol", "atol")
        for t in (t for t in self.targets.split(",") if t):
            if t not in TARGET_ENERGIES:
                raise UsageError(
                    f"targets: {t!r} is not a target; expected names from {sorted(TARGET_ENERGIES)}"
                )
        try:
            sizes = [int(v) for v in self.sizes.split(",") if v]
        except ValueError:
            raise UsageError(f"sizes={self.sizes!r} must be integers joined by ',', e.g. '2,8,32'") from None
        if not sizes or min(sizes) < 1:
            raise UsageError(f"sizes={self.sizes!r} must list positive integers")
        check_device_name(self.device)


# --- builders -----------------------------------------------------------------------------------------


def _parse_dims(s: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in s.replace(",", "-").split("-") if v)
    except ValueError:
        raise UsageError(f"hidden={s!r} must be widths joined by '-', e.g. '64-64-64'") from None
    if not dims or min(dims) < 1:
        raise UsageError(f"hidden={s!r} must list positive widths, e.g. '64-64-64'")
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
        options={"max_num_steps": cfg.max_steps} if cfg.method in ADAPTIVE_METHODS else None,
        gradient=cfg.gradient, adjoint_options={"norm": "seminorm"} if cfg.seminorm else None,
        regularize=bool(cfg.kinetic or cfg.jacobian),
    )  # fmt: skip


def _test_set(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + cfg.seed)  # disjoint from the training stream's seed
    return sample_toy(cfg.dataset, cfg.eval_size, generator=g)


@torch.no_grad()
def _nll(log_prob_fn, x: torch.Tensor, chunk: int = 2500) -> float:
    vals = [log_prob_fn(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    return float(-torch.cat(vals).mean())


# --- training loops -----------------------------------------------------------------------------------


class _FlowTask:
    """Maximum likelihood on fresh toy samples every iteration; the test NLL at each evaluation.

    The running window (last 100 iterations) gives the ``train_nll`` of each ``metrics.jsonl`` line.
    """

    def __init__(self, cfg, model, optimizer, scheduler, device: torch.device, total: int, dist=None):
        self.cfg, self.model, self.opt, self.sched, self.device, self.total = (
            cfg, model, optimizer, scheduler, device, total,
        )  # fmt: skip
        self.dist = dist if dist is not None else _Single()
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.x_test = _test_set(cfg).to(device)
        self.window: list[dict[str, float]] = []
        self.test_nll = math.nan

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any], Any]:
        raise NotImplementedError

    def step(self, it: int) -> dict[str, Any]:
        x = sample_toy(self.cfg.dataset, self.cfg.batch_size, generator=self.data_gen).to(self.device)
        x = x[self.dist.shard(x.shape[0])]  # under torchrun: this process's part of the global batch
        loss, rec, after = self.forward(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(self.model.parameters(), x.shape[0])
        self.opt.step()
        self.sched.step()
        rec = {
            "iter": it + 1,
            **self.dist.mean({**rec, **(after() if after else {})}, x.shape[0], self.device),
        }
        self.window = [*self.window[-99:], rec]
        return {**rec, "loss": rec["train_nll"]}

    def test_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, done: int) -> dict[str, Any]:
        xt = self.x_test if done == self.total else self.x_test[:1000]
        self.test_nll = _nll(self.test_log_prob, xt)
        return {**_window_mean(self.window), "test_nll": self.test_nll, "n_test": int(xt.shape[0])}

    def state(self) -> dict[str, Any]:
        return {"data_rng": self.data_gen.get_state(), "window": list(self.window), "test_nll": self.test_nll}

    def load_state(self, state: dict[str, Any]) -> None:
        self.data_gen.set_state(state["data_rng"])
        self.window, self.test_nll = list(state["window"]), state["test_nll"]

    def postfix(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {"nll": f"{rec['train_nll']:.3f}", "nfe": rec.get("nfe_forward", 0)}


class _CNFTask(_FlowTask):
    def forward(self, x):
        out = self.model(x)
        nll = -out.log_prob.mean()
        loss = nll
        rec: dict[str, Any] = {"train_nll": float(nll.detach())}
        if out.kinetic is not None:
            loss = loss + self.cfg.kinetic * out.kinetic.mean() + self.cfg.jacobian * out.jacobian.mean()
            rec["kinetic"] = float(out.kinetic.mean().detach())
            rec["jacobian"] = float(out.jacobian.mean().detach())
        n_fwd = out.dynamics.n_evals

        def after() -> dict[str, Any]:  # the backward pass has run: its NFE are known
            nfe_f, nfe_b = _nfe(out.stats, out.dynamics.n_evals, n_fwd)
            return {"nfe_forward": nfe_f, "nfe_backward": nfe_b}

        return loss, rec, after

    def test_log_prob(self, x):
        return self.model.log_prob(x, divergence="exact")

    def evaluate(self, done: int) -> dict[str, Any]:
        with _eval_mode(self.model, self.cfg.eval_tol):
            ev = super().evaluate(done)
        return {**ev, "end_time": _t_end(self.model)}

    def postfix(self, rec):
        return {**super().postfix(rec), "T": f"{_t_end(self.model):.2f}"}


class _NFTask(_FlowTask):
    def forward(self, x):
        nll = -self.model.log_prob(x).mean()
        return nll, {"train_nll": float(nll.detach())}, None

    def test_log_prob(self, x):
        return self.model.log_prob(x)


@on_device
def _train_cnf(cfg: CNFConfig, run: RunFolder, ckpt, stop, device: torch.device, dist) -> dict[str, Any]:
    write_config(run, "cnf", cfg, device=str(device), threads=torch.get_num_threads(), world_size=dist.world)
    seed_everything(cfg.seed)
    model = build_cnf(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.lr_schedule, cfg.iters)
    task = _CNFTask(cfg, model, opt, sched, device, cfg.iters, dist)
    trainer = Trainer(
        run, "cnf", cfg, model, opt, sched, total=cfg.iters, eval_every=cfg.eval_every,
        desc=f"cnf {cfg.dataset}", stop=stop, dist=dist,
    )  # fmt: skip
    if ckpt is not None:
        trainer.resume(ckpt, task)
    trainer.fit(task)
    x_test = task.x_test
    final = {**_window_mean(task.window), "test_nll": task.test_nll}
    final.pop("iter", None)
    final.update(
        iters=cfg.iters, n_test=int(x_test.shape[0]), wall_time_s=trainer.totals["wall_time_s"],
        nfe_forward_total=trainer.totals["nfe_forward"], nfe_backward_total=trainer.totals["nfe_backward"],
        end_time=_t_end(model), params=sum(p.numel() for p in model.parameters()), nfe_source=_NFE_SOURCE[0],
        device=str(device),
    )  # fmt: skip
    with torch.no_grad(), _eval_mode(model, cfg.eval_tol), _timer() as tm:
        out = model(x_test[:1000], divergence="exact")
    final["eval_nfe_1000"] = out.stats.nfe or out.dynamics.n_evals
    final["eval_time_1000_s"] = tm["s"]
    final.update(_reference(cfg.dataset, x_test.cpu(), final["test_nll"]))
    run.write_json("metrics.json", final)
    if cfg.plots and run.main:
        model.cpu()
        with _eval_mode(model, cfg.eval_tol):
            _plot_cnf(model, cfg, run)
    return final


@on_device
def _train_nf(cfg: NFConfig, run: RunFolder, ckpt, stop, device: torch.device, dist) -> dict[str, Any]:
    write_config(run, "nf", cfg, device=str(device), threads=torch.get_num_threads(), world_size=dist.world)
    seed_everything(cfg.seed)
    model = PlanarNF(2, cfg.layers, direction="data_to_base", base_std=cfg.base_std).to(device)
    opt = _optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    sched = _schedule(opt, cfg.lr_schedule, cfg.iters)
    task = _NFTask(cfg, model, opt, sched, device, cfg.iters, dist)
    trainer = Trainer(
        run, "nf", cfg, model, opt, sched, total=cfg.iters, eval_every=cfg.eval_every,
        desc=f"nf {cfg.dataset}", stop=stop, dist=dist,
    )  # fmt: skip
    if ckpt is not None:
        trainer.resume(ckpt, task)
    trainer.fit(task)
    final = {
        "train_nll": _window_mean(task.window)["train_nll"], "test_nll": task.test_nll,
        "nfe_forward": 0, "nfe_backward": 0, "iters": cfg.iters, "n_test": int(task.x_test.shape[0]),
        "wall_time_s": trainer.totals["wall_time_s"], "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }  # fmt: skip
    final.update(_reference(cfg.dataset, task.x_test.cpu(), final["test_nll"]))
    run.write_json("metrics.json", final)
    if cfg.plots and run.main:
        _plot_nf(model.cpu(), cfg, run)
    return final


def evaluate_run(
    run_dir: str | Path, *, experiment: str = "cnf", device: str | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Test NLL of a ``train cnf`` (``experiment="cnf"``) or ``train nf`` run folder: the weights in its
    ``checkpoint.pt`` (loaded with ``weights_only=True``) on the run's full test set, at the run's
    evaluation tolerance. Returns ``test_nll``, ``n_test`` and the reference NLL where the data set has
    one, equal to the run's ``metrics.json`` entries on the same device and thread count."""
    if experiment not in ("cnf", "nf"):
        raise ValueError(f"experiment={experiment!r} is unknown; expected 'cnf' or 'nf'")
    run_dir, kind = Path(run_dir), experiment
    cfg = load_run_config(run_dir, kind, CNFConfig if kind == "cnf" else NFConfig)
    dev = eval_device(device, cfg)
    torch.set_num_threads(threads or cfg.threads)
    weights, ckpt = read_weights(run_dir / "checkpoint.pt", kind)
    if kind == "cnf":
        model = build_cnf(cfg)
    else:
        model = PlanarNF(2, cfg.layers, direction="data_to_base", base_std=cfg.base_std)
    model = model.to(dev)
    model.load_state_dict(weights)
    if ckpt["step"] != cfg.iters:
        print(f"note: the checkpoint is at iteration {ckpt['step']} of {cfg.iters}", file=sys.stderr)
    x_test = _test_set(cfg).to(dev)
    if kind == "cnf":
        with _eval_mode(model, cfg.eval_tol):
            nll = _nll(lambda x: model.log_prob(x, divergence="exact"), x_test)
    else:
        nll = _nll(model.log_prob, x_test)
    return {"test_nll": nll, "n_test": int(x_test.shape[0]), **_reference(cfg.dataset, x_test.cpu(), nll)}


def train_cnf(
    cfg: CNFConfig, out: str = "runs/cnf", *, resume: bool = False, overwrite: bool = False
) -> dict:
    """Train a CNF by maximum likelihood into the run folder ``out``; returns the final metrics."""
    return execute(CNF_EXPERIMENT, cfg, out, resume=resume, overwrite=overwrite)


def train_nf(cfg: NFConfig, out: str = "runs/nf", *, resume: bool = False, overwrite: bool = False) -> dict:
    """Train a planar NF by maximum likelihood (layers map data → base) into ``out``; returns the metrics."""
    return execute(NF_EXPERIMENT, cfg, out, resume=resume, overwrite=overwrite)


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
    # (the config validated the name)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"optimizer={name!r} is unknown; expected 'adam' or 'rmsprop'")


# --- Figure 4: density matching -------------------------------------------------------------------------


def run_figure4(
    cfg: Figure4Config, out: str | Path = "runs/figure4", *, overwrite: bool = False
) -> dict[str, Any]:
    """Fit NF (K layers, RMSprop) and CNF (M units, Adam) to each target by minimising KL(q‖p).

    Writes ``config.json``, ``figure4.json``, ``metrics.json`` and the two PNGs into ``out`` (refused if
    it already holds results, unless ``overwrite``).
    """
    device = resolve_device(cfg.device)
    RunFolder.check(Path(out), resume=False, overwrite=overwrite)
    run = RunFolder(out).open(fresh=True, overwrite=overwrite)
    try:
        torch.set_num_threads(cfg.threads)
        write_config(run, "figure4", cfg, device=str(device), threads=torch.get_num_threads())
        return _figure4(cfg, run, device)
    finally:
        run.close()


def _figure4(cfg: Figure4Config, run: RunFolder, device: torch.device) -> dict[str, Any]:
    targets = [t for t in cfg.targets.split(",") if t]
    sizes = [int(s) for s in cfg.sizes.split(",") if s]
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
                    model = PlanarNF(2, size, direction="base_to_data").to(device)
                    opt, iters = torch.optim.RMSprop(model.parameters(), lr=cfg.nf_lr), cfg.nf_iters
                    draw = model.sample_with_log_prob
                else:
                    model = CNF(
                        GatedPlanarField(2, size), 2, end_time=cfg.end_time, rtol=cfg.rtol, atol=cfg.atol
                    ).to(device)
                    opt, iters = torch.optim.Adam(model.parameters(), lr=cfg.cnf_lr), cfg.cnf_iters
                    draw = lambda n, m=model: m.sample(n, with_log_prob=True)  # noqa: E731
                bar = progress(total=iters, desc=f"fig4 {target} {kind} {size}", leave=False)
                for _ in range(iters):
                    x, log_q = draw(cfg.batch_size)
                    loss = (log_q + energy(x)).mean()  # KL(q‖p) - log Z
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                    bar.set_postfix(kl=f"{float(loss.detach()) + log_z:.3f}")
                bar.close()
                with torch.no_grad():
                    x, log_q = draw(cfg.eval_size)
                    kl = float((log_q + energy(x)).mean()) + log_z
                key = f"{target}/{kind}/{size}"
                results["kl"][key] = kl
                results["time_s"][key] = time.monotonic() - t0
                if kind == "cnf":
                    results["nfe"][key] = model.last_stats.nfe or None
                samples[(target, kind, size)] = x[:5000].cpu()
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
    fig.savefig(path, dpi=PLOT_DPI)
    _plt().close(fig)


@torch.no_grad()
def _plot_cnf(model: CNF, cfg: CNFConfig, run: RunDir) -> None:
    plt = _plt()
    model.eval()
    g = torch.Generator().manual_seed(123)
    data = sample_toy(cfg.dataset, 20000, generator=g)
    fig, ax = plt.subplots(figsize=(3, 3))
    _hist(ax, data, f"data: {cfg.dataset}")
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
    data = sample_toy(cfg.dataset, 20000, generator=g)
    pts, xx, _ = _grid(100)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    _hist(axes[0], data, f"data: {cfg.dataset}")
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


def _flow_resumable(saved: dict[str, Any]) -> tuple[str, ...]:
    """The iteration budget may change unless a cosine schedule was laid out over it."""
    fields = ("eval_every", "eval_size", "device", "threads", "plots", "eval_tol", "max_steps")
    fields += ("iters",) if saved.get("lr_schedule", "constant") == "constant" else ()
    return tuple(f for f in fields if f in saved)  # (the NF has no solver options)


def _flow_headline(m: dict[str, Any]) -> str:
    ref = next((f"; reference {m[k]:.4f}" for k in ("true_test_nll", "reference_test_nll") if k in m), "")
    return f"test NLL {m['test_nll']:.4f} nats{ref} (train {m['train_nll']:.4f}), {m['wall_time_s']:.1f} s"


CNF_EXPERIMENT = Experiment(
    name="cnf", config_cls=CNFConfig, train=_train_cnf, default_out=lambda cfg: "runs/cnf",
    headline=_flow_headline, resumable=_flow_resumable, distributed=True,
)  # fmt: skip
NF_EXPERIMENT = Experiment(
    name="nf", config_cls=NFConfig, train=_train_nf, default_out=lambda cfg: "runs/nf",
    headline=_flow_headline, resumable=_flow_resumable, distributed=True,
)  # fmt: skip


def _run_figure4(args, parser) -> int:
    try:
        cfg = resolve_config(Figure4Config, typed_options(args, Figure4Config))
        check_device(cfg)
        results = run_figure4(cfg, args.out, overwrite=args.overwrite)
    except UsageError as exc:
        parser.error(str(exc))
    print(json.dumps(results["kl"], indent=2))
    print(
        f"figure4: results in {args.out}; KL(q||p) of {len(results['kl'])} fits, {results['wall_time_s']:.0f} s"
    )
    return 0


def register_eval(evals) -> None:
    """``neuralode eval cnf RUN_DIR`` and ``neuralode eval nf RUN_DIR``."""
    for name in ("cnf", "nf"):
        _register_eval(
            evals, name, lambda run, _n=name, **kw: evaluate_run(run, experiment=_n, **kw), help=f"test NLL of a `train {name}` run folder",
            description=f"Evaluate a `neuralode train {name}` run folder's final weights (checkpoint.pt) on "
            "its full test set; print test_nll (nats), n_test and the reference NLL as JSON (the values in the "
            "run's metrics.json, on the same device and thread count).",
        )  # fmt: skip


def register(commands, train) -> None:
    register_experiment(
        train, CNF_EXPERIMENT, names=("cnf",),
        help="continuous normalizing flow on 2-D toy data (paper Fig. 5, FFJORD, RNODE)",
        description="Fit a continuous normalizing flow to a 2-D toy data set by maximum likelihood.\n"
        "Writes config.json, run.json, metrics.jsonl, metrics.json (test NLL in nats), checkpoint.pt and "
        "plots (density, samples, flow, vector field, curves) into the run folder.",
    )  # fmt: skip
    register_experiment(
        train, NF_EXPERIMENT, names=("nf",), help="planar normalizing flow baseline on 2-D toy data",
        description="Fit a planar normalizing flow (K layers) to a 2-D toy data set by maximum likelihood.\n"
        "Writes config.json, run.json, metrics.jsonl, metrics.json, checkpoint.pt and nf.png/curves.png.",
    )  # fmt: skip
    p = commands.add_parser(
        "figure4", help="paper Figure 4: density matching, planar NF vs CNF",
        description="Paper Figure 4: fit planar NFs (K layers) and CNFs (M units) to target energies by "
        "minimising KL(q||p). Writes figure4.json, metrics.json, figure4.png and figure4_loss.png.",
    )  # fmt: skip
    add_config_options(p, Figure4Config)
    p.add_argument(
        "--out", default="runs/figure4", metavar="DIR", help="output folder (default: runs/figure4)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.set_defaults(func=lambda args, _p=p: _run_figure4(args, _p))
