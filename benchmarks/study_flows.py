"""Controlled study of the paper's flow experiments: planar NF vs CNF (Chen et al. 2018, Figures 4-5).

Two studies, each a grid of cells x seeds run in one process at one thread, written to ``--out``:

``fig5``: maximum likelihood with a planar NF (Rezende & Mohamed 2015) on a toy data set. A baseline
(``K = 64`` one-unit layers trained in the normalising direction data → base, Adam 2e-3 with cosine decay,
1000 iterations of 256 fresh samples, base ``N(0, I)``, the near-identity ``û`` of ``PlanarFlow``) and
one-factor-at-a-time changes of it (``CELLS``): the direction the layers point in (``base_to_data``, the
generative direction, with the exact implicit-function gradient through ``z = F⁻¹(x)``, or with that path
detached), the optimiser and learning-rate schedule, the iteration budget, the base density's scale,
``K``, the data's scale and Rezende & Mohamed's original ``û``. Metric: held-out NLL (nats) on a fixed
test set minus the reference NLL of the data's own density (``toy2d.REFERENCE_LOG_PROBS``), the *gap*
(invariant to the data's scale).

``fig4``: density matching, ``KL(q‖p)`` with ``p ∝ exp(-U)`` for the targets ``U1``-``U3`` (nats,
``≥ 0``, ``log Z`` from a grid). Planar NF with ``K`` layers (base → data, RMSprop 1e-3) against the
paper's gated planar CNF with ``M`` units (Adam 1e-2, ``T = 1``, dopri5); the NF runs ``--nf-ratio``
times the CNF's iterations (the paper: 10,000 vs 500,000, a ratio of 50) and is also read out at the
CNF's iteration count and at equal process CPU time (the last readout whose cumulative CPU time does not
exceed the CNF run's of the same cell and seed).

Outputs: ``config.json``, ``runs.jsonl`` (one line per run, appended as runs finish), ``summary.json``
(mean, std, n per cell), ``table.md``, and plots at 150 dpi (``fig5_gap.png``, ``fig5_curves.png``,
``fig5_panels.png``; ``fig4_kl.png``, ``fig4_samples.png``). An existing ``--out`` folder is refused
unless ``--overwrite`` (replace it) or ``--resume`` (skip the runs already in its ``runs.jsonl``).

    python benchmarks/study_flows.py fig5 --out study/fig5 --seeds 0,1,2
    python benchmarks/study_flows.py fig5 --out tmp --cells baseline,base_to_data --iters 200
    python benchmarks/study_flows.py fig4 --out study/fig4 --seeds 0,1,2 --cnf-iters 200 --nf-ratio 50
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuralode.datasets.toy2d import (
    REFERENCE_LOG_PROBS,
    TARGET_ENERGIES,
    sample_toy,
    target_log_normalizer,
)
from neuralode.models.cnf import CNF, GatedPlanarField
from neuralode.models.planar_flow import PlanarFlow, PlanarNF

TEST_SEED = 2**20  # the held-out set is the same for every cell and seed
BOX = 4.0  # plots show [-BOX, BOX]^2

# --- Figure 5: maximum likelihood -------------------------------------------------------------------------

BASELINE: dict[str, Any] = {
    "data": "moons",
    "layers": 64,
    "direction": "data_to_base",
    "gradient": "full",  # base_to_data only: "full" (implicit-function) or "detached" (z = F⁻¹(x) constant)
    "optimizer": "adam",
    "lr": 2e-3,
    "schedule": "cosine",
    "iters": 1000,
    "batch": 256,
    "base_std": 1.0,
    "scale": 1.0,  # the data are multiplied by this
    "init": "identity",  # "identity": PlanarFlow's û (m(0) = 0); "rm": Rezende & Mohamed's m(a) = -1 + softplus(a)
}

# name -> (factor group, changes to BASELINE)
CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("baseline", {}),
    "base_to_data": ("direction", {"direction": "base_to_data"}),
    "base_to_data_detached": ("direction", {"direction": "base_to_data", "gradient": "detached"}),
    "rmsprop_1e-3": ("optimiser", {"optimizer": "rmsprop", "lr": 1e-3, "schedule": "constant"}),
    "adam_1e-3_const": ("optimiser", {"lr": 1e-3, "schedule": "constant"}),
    "iters_250": ("iterations", {"iters": 250}),
    "iters_4000": ("iterations", {"iters": 4000}),
    "base_std_0.316": ("base scale", {"base_std": math.sqrt(0.1)}),
    "base_std_3": ("base scale", {"base_std": 3.0}),
    "K_8": ("K", {"layers": 8}),
    "K_16": ("K", {"layers": 16}),
    "K_32": ("K", {"layers": 32}),
    "scale_0.5": ("data scale", {"scale": 0.5}),
    "scale_3": ("data scale", {"scale": 3.0}),
    "scale_0.5_base_std_0.316": ("data scale", {"scale": 0.5, "base_std": math.sqrt(0.1)}),
    "init_rm": ("init", {"init": "rm"}),
    "b2d_rmsprop_rm": (
        "combined",
        {
            "direction": "base_to_data",
            "optimizer": "rmsprop",
            "lr": 1e-3,
            "schedule": "constant",
            "init": "rm",
        },
    ),
    "circles_baseline": ("circles", {"data": "circles"}),
    "circles_base_to_data": ("circles", {"data": "circles", "direction": "base_to_data"}),
}
BISECTION_ITERS = 20  # with the inverse's closing Newton step, float32 round-off is reached after ~15


class _RezendeMohamedFlow(PlanarFlow):
    """``PlanarFlow`` with Rezende & Mohamed's ``m(a) = -1 + softplus(a)`` (``m(0) ≈ -0.31``)."""

    def u_hat(self) -> torch.Tensor:
        wu = (self.w * self.u).sum(-1, keepdim=True)
        m = -1 + F.softplus(wu)
        return self.u + (m - wu) * self.w / self.w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)


def cell_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full configuration of a Figure 5 cell (``BASELINE`` with the cell's changes and ``overrides``)."""
    if name not in CELLS:
        raise ValueError(f"cell {name!r} is unknown; expected one of {sorted(CELLS)}")
    cfg = {**BASELINE, **CELLS[name][1], **{k: v for k, v in overrides.items() if v is not None}}
    if cfg["direction"] == "data_to_base":
        cfg["gradient"] = "full"
    return cfg


def _build_nf(cfg: dict[str, Any], seed: int) -> PlanarNF:
    torch.manual_seed(seed)
    nf = PlanarNF(2, cfg["layers"], direction=cfg["direction"], base_std=cfg["base_std"])
    if cfg["init"] == "rm":
        torch.manual_seed(seed)
        nf.flow = _RezendeMohamedFlow(2, cfg["layers"])
    return nf


def _nf_log_prob(nf: PlanarNF, x: torch.Tensor, gradient: str) -> torch.Tensor:
    if nf.direction == "data_to_base":
        return nf.log_prob(x)
    if gradient == "full":
        z, logdet = nf.flow.inverse_and_log_det(x, BISECTION_ITERS)
    else:  # the density is exact; only the training gradient misses the path through z
        with torch.no_grad():
            z = nf.flow.inverse(x, BISECTION_ITERS)
        _, logdet = nf.flow(z)
    return nf.base_log_prob(z) - logdet


def _optimizer(cfg: dict[str, Any], params):
    if cfg["optimizer"] == "adam":
        opt = torch.optim.Adam(params, lr=cfg["lr"])
    elif cfg["optimizer"] == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=cfg["lr"])
    else:
        raise ValueError(f"optimizer={cfg['optimizer']!r} is unknown; expected 'adam' or 'rmsprop'")
    if cfg["schedule"] == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["iters"])
    return opt, None


def _test_set(data: str, n: int, scale: float) -> tuple[torch.Tensor, float]:
    """The fixed held-out points and the reference NLL of the data's own density on them (nats)."""
    x = sample_toy(data, n, generator=torch.Generator().manual_seed(TEST_SEED))
    ref = -(REFERENCE_LOG_PROBS[data](x.double()) - 2 * math.log(scale)).mean()
    return scale * x, float(ref)


def _mean_nll(nf: PlanarNF, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(-torch.cat([_nf_log_prob(nf, xb, "full") for xb in x.split(2500)]).mean())


def fit_ml(cfg: dict[str, Any], seed: int, *, n_test: int = 5000, evals: int = 4) -> tuple[dict, PlanarNF]:
    """Train one planar NF by maximum likelihood; returns (metrics, model).

    Metrics: ``test_nll``, ``reference_nll``, ``gap`` (nats), ``curve`` (iteration, test NLL on the first
    1000 test points) at ``evals`` evenly spaced points, ``wall_s``, ``cpu_s``, ``diverged``.
    """
    nf = _build_nf(cfg, seed)
    opt, sched = _optimizer(cfg, nf.parameters())
    gen = torch.Generator().manual_seed(1000 + seed)
    x_test, ref = _test_set(cfg["data"], n_test, cfg["scale"])
    every = max(cfg["iters"] // max(evals, 1), 1)
    curve, diverged = [], False
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for it in range(cfg["iters"]):
        x = cfg["scale"] * sample_toy(cfg["data"], cfg["batch"], generator=gen)
        loss = -_nf_log_prob(nf, x, cfg["gradient"]).mean()
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if (it + 1) % every == 0 or it + 1 == cfg["iters"]:
            curve.append([it + 1, _mean_nll(nf, x_test[:1000])])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    test_nll = math.nan if diverged else _mean_nll(nf, x_test)
    out = {"test_nll": test_nll, "reference_nll": ref, "gap": test_nll - ref, "curve": curve,
           "wall_s": wall, "cpu_s": cpu, "diverged": diverged}  # fmt: skip
    return out, nf


# --- Figure 4: density matching ---------------------------------------------------------------------------


def _readout_iters(cnf_iters: int, ratio: int) -> list[int]:
    marks = {cnf_iters * r for r in (1, 2, 4, 10, 20, ratio) if r <= ratio}
    marks |= {max(cnf_iters * ratio // 64, 1) * 2**i for i in range(7)}
    return sorted(m for m in marks if 1 <= m <= cnf_iters * ratio)


def _kl(draw, energy, log_z: float, n: int) -> tuple[float, float]:
    """Monte-Carlo ``KL(q‖p)`` (nats) and its standard error from ``n`` samples of ``q``."""
    with torch.no_grad():
        x, log_q = draw(n)
        terms = (log_q + energy(x)).double() + log_z
    return float(terms.mean()), float(terms.std() / math.sqrt(n))


def fit_kl(kind: str, target: str, size: int, seed: int, *, iters: int, batch: int = 128,
           readouts: list[int] | None = None, n_eval: int = 5000, rtol: float = 1e-4,
           nf_lr: float = 1e-3, cnf_lr: float = 1e-2) -> tuple[dict, torch.Tensor]:  # fmt: skip
    """Fit ``q`` (``kind`` ``"nf"``: ``size`` planar layers; ``"cnf"``: ``size`` gated planar units) to
    ``p ∝ exp(-U_target)`` by minimising ``KL(q‖p)``; returns (metrics, the trained model).

    Metrics: ``kl``, ``kl_se`` (nats), ``readouts`` (``[iteration, kl, cpu_s, wall_s]`` at each iteration
    of ``readouts``, NF only; times are the training's, without the readouts'), ``wall_s``, ``cpu_s``
    (training only), ``nfe`` (CNF: mean forward NFE of the last 50 iterations' sampling solves).
    """
    energy, log_z = TARGET_ENERGIES[target], target_log_normalizer(target)
    torch.manual_seed(seed)
    model = _kl_model(kind, size, rtol)
    if kind == "nf":
        opt = torch.optim.RMSprop(model.parameters(), lr=nf_lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cnf_lr)
    draw = _kl_sampler(model, kind, 1000 + seed)
    marks, out_readouts, nfe = set(readouts or []), [], []
    eval_cpu = eval_wall = 0.0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for it in range(iters):
        x, log_q = draw(batch)
        loss = (log_q + energy(x)).mean()  # KL(q‖p) - log Z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if kind == "cnf":
            nfe.append(model.last_stats.nfe)
        if it + 1 in marks:  # the readouts' own cost is left out of the training times
            cpu, wall = time.process_time() - cpu0 - eval_cpu, time.perf_counter() - wall0 - eval_wall
            out_readouts.append([it + 1, _kl(draw, energy, log_z, n_eval)[0], cpu, wall])
            eval_cpu += time.process_time() - cpu0 - eval_cpu - cpu
            eval_wall += time.perf_counter() - wall0 - eval_wall - wall
    wall, cpu = time.perf_counter() - wall0 - eval_wall, time.process_time() - cpu0 - eval_cpu
    kl, se = _kl(draw, energy, log_z, n_eval)
    out = {"kl": kl, "kl_se": se, "readouts": out_readouts, "wall_s": wall, "cpu_s": cpu,
           "nfe": sum(nfe[-50:]) / len(nfe[-50:]) if nfe else None}  # fmt: skip
    return out, model


def _kl_model(kind: str, size: int, rtol: float) -> PlanarNF | CNF:
    if kind == "nf":
        return PlanarNF(2, size, direction="base_to_data")
    if kind == "cnf":
        return CNF(GatedPlanarField(2, size), 2, end_time=1.0, rtol=rtol, atol=rtol)
    raise ValueError(f"kind={kind!r} is unknown; expected 'nf' or 'cnf'")


def _kl_sampler(model: PlanarNF | CNF, kind: str, seed: int):
    """``n -> (x, log q(x))``, ``(n, 2), (n,)``; the NF draws from its own seeded generator."""
    if kind == "nf":
        gen = torch.Generator().manual_seed(seed)
        return lambda n: model.sample_with_log_prob(n, generator=gen)
    torch.manual_seed(seed)
    return lambda n: model.sample(n, with_log_prob=True)


def compute_matched(nf_run: dict, cnf_cpu_s: float) -> dict | None:
    """The NF readout at the most iterations whose cumulative CPU time stays within ``cnf_cpu_s``."""
    fit = [r for r in nf_run["readouts"] if r[2] <= cnf_cpu_s]
    if not fit:
        return None
    it, kl, cpu, _wall = fit[-1]
    return {"iters": it, "kl": kl, "cpu_s": cpu}


# --- the run folder ---------------------------------------------------------------------------------------


def _open_out(path: Path, overwrite: bool, resume: bool) -> list[dict]:
    if path.exists() and overwrite:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    runs = path / "runs.jsonl"
    return [json.loads(line) for line in runs.read_text().splitlines() if line] if runs.exists() else []


def _keep(out: Path, runs: list[dict], rec: dict, msg: str, model: torch.nn.Module | None, name: str) -> None:
    """Record a finished run: ``runs.jsonl``, a progress line, and ``models/NAME.pt`` when ``model``."""
    runs.append(rec)
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    _log(f"{msg}, {rec['wall_s']:.1f} s wall, {rec['cpu_s']:.1f} s CPU")
    if model is not None:
        (out / "models").mkdir(exist_ok=True)
        torch.save(model.state_dict(), out / "models" / f"{name}.pt")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _stats(values: list[float]) -> dict[str, float]:
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    n = int(v.numel())
    return {"mean": float(v.mean()) if n else math.nan, "std": float(v.std()) if n > 1 else 0.0, "n": n,
            "n_failed": len(values) - n}  # fmt: skip


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}" + (f" ({s['n_failed']} diverged)" if s.get("n_failed") else "")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the studies ------------------------------------------------------------------------------------------


def study_fig5(args) -> dict:
    out = Path(args.out)
    done = _open_out(out, args.overwrite, args.resume)
    cells = args.cells.split(",") if args.cells else list(CELLS)
    configs = {
        c: cell_config(c, iters=None if c.startswith("iters_") else args.iters,
                       layers=None if c.startswith("K_") else args.layers)
        for c in cells
    }  # fmt: skip
    _write_json(out / "config.json", {"study": "fig5", "seeds": args.seeds, "n_test": args.n_test,
                                      "bisection_iters": BISECTION_ITERS, "cells": configs})  # fmt: skip
    have = {(r["cell"], r["seed"]) for r in done}
    runs, panels = list(done), {}
    todo = [(s, c) for s in args.seeds for c in cells if (c, s) not in have]
    for i, (seed, cell) in enumerate(todo):
        res, nf = fit_ml(configs[cell], seed, n_test=args.n_test)
        msg = f"fig5 {i + 1}/{len(todo)} {cell} seed {seed}: gap {res['gap']:.3f} nats"
        _keep(
            out, runs, {"cell": cell, "seed": seed, **res}, msg, nf if seed == args.seeds[0] else None, cell
        )
    if args.plots:
        for cell in cells:
            path = out / "models" / f"{cell}.pt"
            if path.exists():
                nf = _build_nf(configs[cell], args.seeds[0])
                nf.load_state_dict(torch.load(path, weights_only=True))
                panels[cell] = _panel_data(nf, configs[cell])
    summary = {"cells": {}}
    for cell in cells:
        rs = [r for r in runs if r["cell"] == cell]
        summary["cells"][cell] = {
            "group": CELLS[cell][0], "config": configs[cell], "seeds": [r["seed"] for r in rs],
            "gap": _stats([r["gap"] for r in rs]), "test_nll": _stats([r["test_nll"] for r in rs]),
            "reference_nll": rs[0]["reference_nll"] if rs else None,
            "wall_s": _stats([r["wall_s"] for r in rs]), "cpu_s": _stats([r["cpu_s"] for r in rs]),
        }  # fmt: skip
    _write_json(out / "summary.json", summary)
    (out / "table.md").write_text(_fig5_table(summary))
    if args.plots:
        _plot_fig5(out, summary, runs, panels)
    return summary


def _fig5_table(summary: dict) -> str:
    lines = ["| cell | factor | changes from the baseline | test NLL | reference NLL | gap (nats) | wall / run (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell, s in summary["cells"].items():
        diff = {k: v for k, v in s["config"].items() if BASELINE.get(k) != v and k != "gradient"}
        if s["config"]["gradient"] == "detached":
            diff["gradient"] = "detached"
        changes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in diff.items())
        ref = f"{s['reference_nll']:.3f}" if s["reference_nll"] is not None else "-"
        lines.append(f"| {cell} | {s['group']} | {changes or '-'} | {_pm(s['test_nll'])} | {ref} | "
                     f"{_pm(s['gap'])} | {s['wall_s']['mean']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def study_fig4(args) -> dict:
    out = Path(args.out)
    done = _open_out(out, args.overwrite, args.resume)
    targets, sizes = args.targets.split(","), [int(s) for s in args.sizes.split(",")]
    nf_iters = args.cnf_iters * args.nf_ratio
    readouts = _readout_iters(args.cnf_iters, args.nf_ratio)
    _write_json(out / "config.json", {
        "study": "fig4", "seeds": args.seeds, "targets": targets, "sizes": sizes, "cnf_iters": args.cnf_iters,
        "nf_iters": nf_iters, "nf_ratio": args.nf_ratio, "batch": args.batch, "rtol": args.rtol,
        "atol": args.rtol, "n_eval": args.n_eval, "nf": "PlanarNF base_to_data, RMSprop lr 1e-3",
        "cnf": "GatedPlanarField (hypernetwork width 32), T = 1, dopri5, Adam lr 1e-2", "readouts": readouts,
    })  # fmt: skip
    have = {(r["kind"], r["target"], r["size"], r["seed"]) for r in done}
    runs, samples = list(done), {}
    todo = [(s, t, m, k) for s in args.seeds for t in targets for m in sizes for k in ("cnf", "nf")]
    todo = [x for x in todo if (x[3], x[1], x[2], x[0]) not in have]
    for i, (seed, target, size, kind) in enumerate(todo):
        iters = args.cnf_iters if kind == "cnf" else nf_iters
        res, model = fit_kl(kind, target, size, seed, iters=iters, batch=args.batch, n_eval=args.n_eval,
                         rtol=args.rtol, readouts=readouts if kind == "nf" else None)  # fmt: skip
        rec = {"kind": kind, "target": target, "size": size, "seed": seed, "iters": iters, **res}
        msg = f"fig4 {i + 1}/{len(todo)} {target} {kind} {size} seed {seed}: KL {res['kl']:.3f} nats"
        _keep(out, runs, rec, msg, model if seed == args.seeds[0] else None, f"{target}-{kind}-{size}")
    if args.plots:
        for target in targets:
            for size in sizes:
                for kind in ("nf", "cnf"):
                    path = out / "models" / f"{target}-{kind}-{size}.pt"
                    if path.exists():
                        model = _kl_model(kind, size, args.rtol)
                        model.load_state_dict(torch.load(path, weights_only=True))
                        samples[(target, kind, size)] = _kl_sampler(model, kind, 10**6)(2000)[0].detach()
    summary = _fig4_summary(runs, targets, sizes, args.cnf_iters)
    _write_json(out / "summary.json", summary)
    (out / "table.md").write_text(_fig4_table(summary, args.cnf_iters, nf_iters))
    if args.plots:
        _plot_fig4(out, summary, samples, targets, sizes)
    return summary


def _fig4_summary(runs: list[dict], targets: list[str], sizes: list[int], cnf_iters: int) -> dict:
    cells: dict[str, Any] = {}
    for t in targets:
        for m in sizes:
            cnf = {r["seed"]: r for r in runs if (r["kind"], r["target"], r["size"]) == ("cnf", t, m)}
            nf = {r["seed"]: r for r in runs if (r["kind"], r["target"], r["size"]) == ("nf", t, m)}
            at_cnf = [next((ro[1] for ro in r["readouts"] if ro[0] == cnf_iters), None) for r in nf.values()]
            matched = [compute_matched(nf[s], cnf[s]["cpu_s"]) for s in nf if s in cnf]
            cells[f"{t}/{m}"] = {
                "cnf": _stats([r["kl"] for r in cnf.values()]),
                "nf_full": _stats([r["kl"] for r in nf.values()]),
                "nf_at_cnf_iters": _stats(at_cnf),
                "nf_cpu_matched": _stats([c["kl"] if c else None for c in matched]),
                "nf_cpu_matched_iters": [c["iters"] if c else None for c in matched],
                "cnf_cpu_s": _stats([r["cpu_s"] for r in cnf.values()]),
                "nf_cpu_s": _stats([r["cpu_s"] for r in nf.values()]),
                "cnf_wall_s": _stats([r["wall_s"] for r in cnf.values()]),
                "nf_wall_s": _stats([r["wall_s"] for r in nf.values()]),
                "cnf_nfe": _stats([r["nfe"] for r in cnf.values()]),
                "seeds": sorted(cnf),
            }
    return {"cells": cells}


def _fig4_table(summary: dict, cnf_iters: int, nf_iters: int) -> str:
    lines = [f"| target | K = M | CNF ({cnf_iters} it.) | NF ({cnf_iters} it.) | NF (equal CPU: it.) | "
             f"NF ({nf_iters} it.) | CPU / run CNF, NF (s) | CNF NFE |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, c in summary["cells"].items():
        t, m = key.split("/")
        its = [i for i in c["nf_cpu_matched_iters"] if i is not None]
        its_s = f"{min(its)}-{max(its)}" if its else "-"
        lines.append(f"| {t} | {m} | {_pm(c['cnf'])} | {_pm(c['nf_at_cnf_iters'])} | "
                     f"{_pm(c['nf_cpu_matched'])} ({its_s}) | {_pm(c['nf_full'])} | "
                     f"{c['cnf_cpu_s']['mean']:.0f}, {c['nf_cpu_s']['mean']:.0f} | {c['cnf_nfe']['mean']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# --- plots ------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int = 100) -> tuple[torch.Tensor, float]:
    c = torch.linspace(-BOX, BOX, n)
    return torch.cartesian_prod(c, c).flip(-1), float(c[1] - c[0])  # rows: y, columns: x


def _panel_data(nf: PlanarNF, cfg: dict) -> dict:
    pts, _ = _grid()
    s = cfg["scale"]
    with torch.no_grad():  # the density of the data in their original units, to compare across scales
        logp = torch.cat([nf.log_prob(p) for p in (s * pts).split(2500)]) + 2 * math.log(s)
        xs = nf.sample(2000, generator=torch.Generator().manual_seed(7)) / s
    return {"density": logp.exp().reshape(100, 100), "samples": xs}


def _plot_fig5(out: Path, summary: dict, runs: list[dict], panels: dict) -> None:
    plt = _plt()
    cells = list(summary["cells"])
    groups = list(dict.fromkeys(summary["cells"][c]["group"] for c in cells))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(cells) + 1.5))
    for i, c in enumerate(cells):
        s = summary["cells"][c]
        ax.barh(i, s["gap"]["mean"], xerr=s["gap"]["std"], color=colors[s["group"]], capsize=3)
        for r in runs:
            if r["cell"] == c and math.isfinite(r["gap"]):
                ax.plot(r["gap"], i, "k.", ms=4)
    ax.set_yticks(range(len(cells)), cells)
    ax.invert_yaxis()
    ax.set_xlabel("held-out NLL − reference NLL (nats)")
    ax.set_title("Planar NF, maximum likelihood (mean ± std over seeds; dots: seeds)", fontsize=9)
    ax.set_xscale("symlog", linthresh=0.1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[g]) for g in groups]
    ax.legend(handles, groups, title="factor", loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig5_gap.png", dpi=150)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, c in enumerate(cells):
        curves = [r["curve"] for r in runs if r["cell"] == c and r["curve"]]
        if not curves:
            continue
        ref = summary["cells"][c]["reference_nll"]
        n = min(len(k) for k in curves)
        its = [k[0] for k in curves[0][:n]]
        mean = [sum(k[j][1] for k in curves) / len(curves) - ref for j in range(n)]
        ax.plot(its, mean, "o-", ms=3, color=plt.cm.tab20(i % 20), label=c)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("NLL − reference on 1000 test points (nats)")
    ax.set_title("Training curves (mean over seeds)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig5_curves.png", dpi=150)
    plt.close(fig)

    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(2.2 * len(panels), 4.6), squeeze=False)
    for j, (c, p) in enumerate(panels.items()):
        axes[0, j].imshow(p["density"], extent=(-BOX, BOX, -BOX, BOX), origin="lower", cmap="viridis")
        axes[0, j].set_title(c, fontsize=7)
        xs = p["samples"].clamp(-BOX, BOX)
        axes[1, j].hist2d(xs[:, 0].numpy(), xs[:, 1].numpy(), bins=60, range=[[-BOX, BOX]] * 2, cmap="magma")
        for a in axes[:, j]:
            a.set_xticks([-4, 0, 4])
            a.set_yticks([-4, 0, 4])
            a.tick_params(labelsize=6)
            a.set_xlabel("x₁", fontsize=7)
        axes[0, j].set_ylabel("density, x₂", fontsize=7)
        axes[1, j].set_ylabel("samples, x₂", fontsize=7)
    fig.suptitle("Planar NF, first seed: density (top) and 2000 samples (bottom), data units", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig5_panels.png", dpi=150)
    plt.close(fig)


def _plot_fig4(out: Path, summary: dict, samples: dict, targets: list[str], sizes: list[int]) -> None:
    plt = _plt()
    series = (("cnf", "CNF (M units)", "C0", "o-"), ("nf_at_cnf_iters", "NF, CNF's iterations", "C1", "s:"),
              ("nf_cpu_matched", "NF, CNF's CPU time", "C2", "^--"), ("nf_full", "NF, ratio × iterations", "C3", "d-"))  # fmt: skip
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for key, label, color, style in series:
            st = [summary["cells"][f"{t}/{m}"][key] for m in sizes]
            ax.errorbar(sizes, [s["mean"] for s in st], yerr=[s["std"] for s in st], fmt=style, color=color,
                        capsize=3, label=label)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(m) for m in sizes])
        ax.set_xlabel("K (NF layers) = M (CNF units)")
        ax.set_ylabel("KL(q‖p) (nats)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Density matching, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig4_kl.png", dpi=150)
    plt.close(fig)

    if not samples:
        return
    pts, _ = _grid()
    cols = [("target", None)] + [(k, m) for k in ("nf", "cnf") for m in sizes]
    fig, axes = plt.subplots(
        len(targets), len(cols), figsize=(1.9 * len(cols), 2 * len(targets)), squeeze=False
    )
    for i, t in enumerate(targets):
        for j, (k, m) in enumerate(cols):
            ax = axes[i, j]
            if k == "target":
                dens = (-TARGET_ENERGIES[t](pts)).exp().reshape(100, 100)
                ax.imshow(dens, extent=(-BOX, BOX, -BOX, BOX), origin="lower", cmap="viridis")
                ax.set_title(f"{t}: exp(−U)", fontsize=7)
            elif (t, k, m) in samples:
                xs = samples[(t, k, m)].clamp(-BOX, BOX)
                ax.hist2d(xs[:, 0].numpy(), xs[:, 1].numpy(), bins=60, range=[[-BOX, BOX]] * 2, cmap="magma")
                ax.set_title(f"{k.upper()} {'K' if k == 'nf' else 'M'} = {m}", fontsize=7)
            ax.set_xticks([-4, 0, 4])
            ax.set_yticks([-4, 0, 4])
            ax.tick_params(labelsize=6)
            ax.set_xlabel("z₁", fontsize=6)
            ax.set_ylabel("z₂", fontsize=6)
    fig.suptitle("Samples of q after training (first seed; NF after all its iterations)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig4_samples.png", dpi=150)
    plt.close(fig)


# --- command line -----------------------------------------------------------------------------------------


def _seeds(s: str) -> list[int]:
    try:
        seeds = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="study", required=True)
    for name in ("fig5", "fig4"):
        q = sub.add_parser(name)
        q.add_argument("--out", required=True, help="output folder (refused if it exists)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
        q.add_argument("--resume", action="store_true", help="continue in --out, skipping finished runs")
        q.add_argument(
            "--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)"
        )
        q.add_argument("--no-plots", dest="plots", action="store_false")
    f5 = sub.choices["fig5"]
    f5.add_argument("--cells", default="", help=f"comma-separated cells (default all: {','.join(CELLS)})")
    f5.add_argument(
        "--iters", type=int, default=None, help="iterations for every cell but iters_* (default 1000)"
    )
    f5.add_argument("--layers", type=int, default=None, help="K for every cell but K_* (default 64)")
    f5.add_argument("--n-test", type=int, default=5000)
    f4 = sub.choices["fig4"]
    f4.add_argument("--targets", default="U1,U2,U3")
    f4.add_argument("--sizes", default="2,8,32")
    f4.add_argument("--cnf-iters", type=int, default=200)
    f4.add_argument("--nf-ratio", type=int, default=50, help="NF iterations / CNF iterations (paper: 50)")
    f4.add_argument("--batch", type=int, default=128)
    f4.add_argument("--rtol", type=float, default=1e-4, help="CNF solver rtol = atol")
    f4.add_argument("--n-eval", type=int, default=5000, help="samples per KL estimate")
    args = p.parse_args(argv)
    if args.overwrite and args.resume:
        p.error("--overwrite and --resume exclude each other")
    if Path(args.out).exists() and not (args.overwrite or args.resume):
        p.error(f"--out {args.out} exists; pass --overwrite to replace it or --resume to continue it")
    if args.study == "fig5":
        bad = [c for c in (args.cells.split(",") if args.cells else []) if c not in CELLS]
        if bad:
            p.error(f"--cells: unknown {bad}; expected names from {list(CELLS)}")
        for name in ("iters", "layers"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                p.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    else:
        bad = [t for t in args.targets.split(",") if t not in TARGET_ENERGIES]
        if bad:
            p.error(f"--targets: unknown {bad}; expected names from {sorted(TARGET_ENERGIES)}")
        if args.cnf_iters < 1 or args.nf_ratio < 1:
            p.error("--cnf-iters and --nf-ratio must be positive ints")
    torch.set_num_threads(1)
    (study_fig5 if args.study == "fig5" else study_fig4)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
