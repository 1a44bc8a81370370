"""neuralode vs torchdiffeq vs torchode (vs torchdyn) on neural vector fields, in one process.

Rows (issue #2): MLPs 2→64→64→2 and 32→256→256→32 (tanh), batch 1, 64, 1024, dopri5 at
float32 rtol=1e-3/atol=1e-4 and float64 rtol=1e-6/atol=1e-8, t in [0, 1] and [0, 10]. Every library
solves the same problem with the same network; the solves of one row are interleaved (library order
rotates every repeat) so that the load of a shared machine hits them alike; ``--block N`` makes each
timing sample N consecutive solves of one library (steady state, as in a training loop) instead of one
solve between other libraries' solves (which also measures their code evicting its own from the
caches: ~15% on neuralode's small rows). Reported per library:
median wall time and median process CPU time of one solve, NFE, and against the bare network:

    overhead ratio  = solve time / (NFE × time of one bare func call)
    overhead/eval   = (solve time − NFE × func time) / NFE        [µs per evaluation]

plus the speed ratio ``peer time / neuralode time`` for each peer. Solves run under ``torch.no_grad()``
(the cost of the solver itself; training cost is the spiral row). torchode steps every sample with its
own step size, so its NFE differs from the joint-step libraries at batch > 1.

The spiral row (``--spiral``) times one training iteration (forward, backward, RMSprop step) of the
torchdiffeq ``ode_demo`` spiral model, with backprop through the solver and with the adjoint.

Usage::

    python benchmarks/bench_solvers.py --quick            # 4 rows, ~1 min
    python benchmarks/bench_solvers.py                    # all 24 rows + spiral
    python benchmarks/bench_solvers.py --json out.json --markdown out.md

Before/after a change of the library: ``--baseline DIR`` adds the packages ``neuralode_base`` (and, if
present, ``neuralode_base2``, an identical second copy whose difference to the first is the noise of the
run) found in ``DIR`` as contenders, timed interleaved with ``neuralode`` in the same process. Make them
from a git revision with ``benchmarks/make_baseline.sh REV DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import neuralode

try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional peer
    torchdiffeq = None
try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None
try:
    from torchdyn.numerics import odeint as torchdyn_odeint
except ImportError:  # pragma: no cover - optional peer
    torchdyn_odeint = None

PRECISIONS = {
    "f32": (torch.float32, 1e-3, 1e-4),
    "f64": (torch.float64, 1e-6, 1e-8),
}
NETS = {"small": (2, 64), "large": (32, 256)}


@dataclasses.dataclass(frozen=True)
class Row:
    net: str
    batch: int
    precision: str
    t1: float

    @property
    def label(self) -> str:
        d, w = NETS[self.net]
        return f"{d}-{w}-{w}-{d} b={self.batch} {self.precision} t1={self.t1:g}"


def all_rows() -> list[Row]:
    return [
        Row(net, batch, prec, t1)
        for net in NETS
        for batch in (1, 64, 1024)
        for prec in PRECISIONS
        for t1 in (1.0, 10.0)
    ]


def quick_rows() -> list[Row]:
    return [
        Row("small", 1, "f32", 1.0),
        Row("small", 64, "f32", 1.0),
        Row("small", 64, "f64", 10.0),
        Row("large", 1024, "f32", 1.0),
    ]


class MLP(torch.nn.Module):
    """d → w → w → d with tanh; ``forward(t, y)`` ignores t (all libraries call it as func(t, y))."""

    def __init__(self, d: int, w: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d, w),
            torch.nn.Tanh(),
            torch.nn.Linear(w, w),
            torch.nn.Tanh(),
            torch.nn.Linear(w, d),
        )

    def forward(self, t, y):
        return self.net(y)


class Counter:
    """Counts calls of ``f`` (used in a separate, untimed solve to get each library's NFE)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, t, y):
        self.n += 1
        return self.f(t, y)


def make_solvers(
    f, y0: torch.Tensor, t: torch.Tensor, rtol: float, atol: float, libs: list[str]
) -> dict[str, Callable[[Callable], torch.Tensor]]:
    """One ``solve(func) -> y(t1)`` closure per library (``func`` lets the caller pass a counter)."""
    out: dict[str, Callable] = {}
    for name, mod in _ours(libs).items():
        out[name] = lambda fn, mod=mod: mod.odeint(fn, y0, t, rtol=rtol, atol=atol, method="dopri5")[-1]
    if "torchdiffeq" in libs and torchdiffeq is not None:
        out["torchdiffeq"] = lambda fn: torchdiffeq.odeint(fn, y0, t, rtol=rtol, atol=atol, method="dopri5")[
            -1
        ]
    if "torchode" in libs and torchode is not None:
        y2 = y0.reshape(y0.shape[0], -1)
        t_start = torch.full((y2.shape[0],), float(t[0]), dtype=y0.dtype, device=y0.device)
        t_end = torch.full((y2.shape[0],), float(t[-1]), dtype=y0.dtype, device=y0.device)

        def to_solve(fn):
            term = torchode.ODETerm(lambda tt, yy: fn(tt, yy.view_as(y0)).reshape(yy.shape))
            step = torchode.Dopri5(term=term)
            ctrl = torchode.IntegralController(atol=atol, rtol=rtol, term=term)
            solver = torchode.AutoDiffAdjoint(step, ctrl)
            sol = solver.solve(torchode.InitialValueProblem(y0=y2, t_start=t_start, t_end=t_end))
            return sol.ys[:, -1]

        out["torchode"] = to_solve
    if "torchdyn" in libs and torchdyn_odeint is not None:
        out["torchdyn"] = lambda fn: torchdyn_odeint(fn, y0, t, solver="dopri5", atol=atol, rtol=rtol)[1][-1]
    return out


def _time_call(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bench_row(
    row: Row, libs: list[str], repeats: int, budget_s: float, device: torch.device, block: int = 1
) -> dict:
    """One row; each timing sample is ``block`` consecutive solves of one library (per solve)."""
    dtype, rtol, atol = PRECISIONS[row.precision]
    d, w = NETS[row.net]
    torch.manual_seed(0)
    f = MLP(d, w).to(device=device, dtype=dtype)
    y0 = torch.randn(row.batch, d, dtype=dtype, device=device)
    t = torch.tensor([0.0, row.t1], dtype=dtype, device=device)
    solvers = make_solvers(f, y0, t, rtol, atol, libs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"row": dataclasses.asdict(row), "label": row.label, "libs": {}}
    with torch.no_grad():
        ref = None
        for name, solve in solvers.items():  # warm-up, NFE, and agreement with neuralode
            counter = Counter(f)
            y1 = solve(counter)
            sync()
            ref = y1 if ref is None else ref
            err = float((y1 - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            result["libs"][name] = {"nfe": counter.n, "rel_diff_vs_first": err, "wall": [], "cpu": []}
        t0_ = t[0]
        n_block = 10 * block

        def bare():
            for _ in range(n_block):
                f(t0_, y0)
            sync()

        bare()
        func_wall, func_cpu = [], []
        names = list(solvers)
        start = time.perf_counter()
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                solve = solvers[name]
                wt, ct = _time_call(lambda solve=solve: ([solve(f) for _ in range(block)], sync()))
                result["libs"][name]["wall"].append(wt / block)
                result["libs"][name]["cpu"].append(ct / block)
            wt, ct = _time_call(bare)
            func_wall.append(wt / n_block)
            func_cpu.append(ct / n_block)
            if r >= 2 and time.perf_counter() - start > budget_s:
                break
    fw, fc = statistics.median(func_wall), statistics.median(func_cpu)
    result["func_wall"], result["func_cpu"], result["repeats"] = fw, fc, len(func_wall)
    for lib in result["libs"].values():
        lib["wall_med"] = statistics.median(lib.pop("wall"))
        lib["cpu_med"] = statistics.median(lib.pop("cpu"))
        nfe = max(lib["nfe"], 1)
        lib["overhead_ratio_wall"] = lib["wall_med"] / (nfe * fw)
        lib["overhead_ratio_cpu"] = lib["cpu_med"] / (nfe * fc)
        lib["overhead_us_per_eval_cpu"] = (lib["cpu_med"] - nfe * fc) / nfe * 1e6
        lib["overhead_us_per_eval_wall"] = (lib["wall_med"] - nfe * fw) / nfe * 1e6
    nd = result["libs"].get("neuralode")
    if nd is not None:
        for lib in result["libs"].values():
            lib["speedup_wall"] = lib["wall_med"] / nd["wall_med"]  # peer / neuralode
            lib["speedup_cpu"] = lib["cpu_med"] / nd["cpu_med"]
    return result


# -- spiral training iteration --------------------------------------------------------------------------


class SpiralFunc(torch.nn.Module):
    """torchdiffeq ``ode_demo``: Linear(2→50)–tanh–Linear(50→2) applied to y³."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 50), torch.nn.Tanh(), torch.nn.Linear(50, 2))
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, mean=0, std=0.1)
                torch.nn.init.constant_(m.bias, val=0)

    def forward(self, t, y):
        return self.net(y**3)


BASELINES: dict = {}  # name -> module, filled by --baseline


def _ours(libs: list[str]) -> dict:
    """``neuralode`` and the baseline copies among ``libs``, name -> module (``neuralode`` first)."""
    mods = {"neuralode": neuralode, **BASELINES}
    return {name: mod for name, mod in mods.items() if name in libs}


def _adjoint_is_ours() -> bool:
    return getattr(neuralode.odeint_adjoint, "__module__", "") != "neuralode._shim"


def bench_spiral(iters: int, libs: list[str], compiled: bool = False) -> dict:
    """Median time of one training iteration (batch 20 windows of 10 points, dopri5, default tolerances).

    ``compiled`` adds neuralode with ``options={"compile": True}`` (the adaptive step as one Inductor
    graph; with the adjoint only the forward solve is compiled). Its compilation falls in the two
    warm-up iterations, which are not timed."""
    torch.manual_seed(0)
    A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    t_all = torch.linspace(0.0, 25.0, 1000)
    with torch.no_grad():
        true_y = neuralode.odeint(lambda t, y: (y**3) @ A, torch.tensor([[2.0, 0.0]]), t_all, method="dopri5")
    batches = []
    for _ in range(iters):
        s = torch.randperm(1000 - 10)[:20]
        batches.append((true_y[s], t_all[:10], torch.stack([true_y[s + i] for i in range(10)], dim=0)))

    def odeint_torchode(func, y0, t):  # (20, 1, 2) → (10, 20, 1, 2)
        y2 = y0.reshape(y0.shape[0], -1)
        term = torchode.ODETerm(lambda tt, yy: func(tt, yy.view_as(y0)).reshape(yy.shape))
        step = torchode.Dopri5(term=term)
        ctrl = torchode.IntegralController(atol=1e-9, rtol=1e-7, term=term)
        sol = torchode.AutoDiffAdjoint(step, ctrl).solve(
            torchode.InitialValueProblem(y0=y2, t_eval=t.expand(y2.shape[0], -1))
        )
        return sol.ys.transpose(0, 1).reshape(len(t), *y0.shape)

    variants: dict[str, Callable] = {}
    for lib, mod in _ours(libs).items():
        variants[f"{lib} backprop"] = lambda fn, y0, t, mod=mod: mod.odeint(fn, y0, t, method="dopri5")
        if _adjoint_is_ours():
            variants[f"{lib} adjoint"] = lambda fn, y0, t, mod=mod: mod.odeint_adjoint(
                fn, y0, t, method="dopri5"
            )
    if "neuralode" in libs:
        if compiled:
            variants["neuralode backprop compiled"] = lambda fn, y0, t: neuralode.odeint(
                fn, y0, t, method="dopri5", options={"compile": True}
            )
            variants["neuralode adjoint compiled"] = lambda fn, y0, t: neuralode.odeint_adjoint(
                fn, y0, t, method="dopri5", options={"compile": True}
            )
    if "torchdiffeq" in libs and torchdiffeq is not None:
        variants["torchdiffeq backprop"] = lambda fn, y0, t: torchdiffeq.odeint(fn, y0, t, method="dopri5")
        variants["torchdiffeq adjoint"] = lambda fn, y0, t: torchdiffeq.odeint_adjoint(
            fn, y0, t, method="dopri5"
        )
    if "torchode" in libs and torchode is not None:
        variants["torchode backprop"] = odeint_torchode
    if "torchdyn" in libs and torchdyn_odeint is not None:
        variants["torchdyn backprop"] = lambda fn, y0, t: torchdyn_odeint(
            fn, y0, t, solver="dopri5", atol=1e-9, rtol=1e-7
        )[1]
    models, opts = {}, {}
    for name in variants:
        torch.manual_seed(1)
        models[name] = SpiralFunc()
        opts[name] = torch.optim.RMSprop(models[name].parameters(), lr=1e-3)
    times = {name: {"wall": [], "cpu": []} for name in variants}
    names = list(variants)
    for it, (y0, t, y_true) in enumerate(batches):
        order = names[it % len(names) :] + names[: it % len(names)]
        for name in order:

            def step(name=name, y0=y0, t=t, y_true=y_true):
                opts[name].zero_grad()
                pred = variants[name](models[name], y0, t)
                loss = (pred - y_true).abs().mean()
                loss.backward()
                opts[name].step()

            wt, ct = _time_call(step)
            if it >= 2:  # warm-up
                times[name]["wall"].append(wt)
                times[name]["cpu"].append(ct)
    out = {
        name: {"wall_med": statistics.median(v["wall"]), "cpu_med": statistics.median(v["cpu"])}
        for name, v in times.items()
    }
    if not _adjoint_is_ours():
        out["neuralode adjoint"] = {"skipped": "neuralode.odeint_adjoint is still the torchdiffeq shim"}
    return out


# -- output -----------------------------------------------------------------------------------------------


def markdown(results: list[dict], spiral: dict | None, clock: str) -> str:
    key = "cpu_med" if clock == "cpu" else "wall_med"
    libs = []
    for r in results:
        for name in r["libs"]:
            if name not in libs:
                libs.append(name)
    peers = [x for x in libs if x != "neuralode"]
    head = ["row", "func µs"]
    for lib in libs:
        head += [f"{lib} ms", "NFE", "ovh ratio", "ovh µs/eval"]
    head += [f"× vs {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        fc = r["func_cpu"] if clock == "cpu" else r["func_wall"]
        cells = [r["label"], f"{fc * 1e6:.0f}"]
        for lib in libs:
            x = r["libs"].get(lib)
            if x is None:
                cells += ["-"] * 4
                continue
            ratio = x["overhead_ratio_cpu"] if clock == "cpu" else x["overhead_ratio_wall"]
            us = x["overhead_us_per_eval_cpu"] if clock == "cpu" else x["overhead_us_per_eval_wall"]
            cells += [f"{x[key] * 1e3:.2f}", str(x["nfe"]), f"{ratio:.2f}", f"{us:.0f}"]
        for p in peers:
            x = r["libs"].get(p)
            s = x.get("speedup_cpu" if clock == "cpu" else "speedup_wall") if x else None
            cells.append("-" if s is None else f"{s:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if spiral:
        lines += [
            "",
            "| spiral training iteration | ms (median) | × vs neuralode backprop |",
            "|---|---|---|",
        ]
        base = spiral.get("neuralode backprop", {}).get(key)
        for name, v in spiral.items():
            if "skipped" in v:
                lines.append(f"| {name} | skipped: {v['skipped']} | - |")
                continue
            ratio = "-" if not base else f"{v[key] / base:.2f}"
            lines.append(f"| {name} | {v[key] * 1e3:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 representative rows, short spiral run")
    p.add_argument("--repeats", type=int, default=15, help="max interleaved repeats per row (default 15)")
    p.add_argument(
        "--budget", type=float, default=20.0, help="seconds per row before stopping repeats (min 3)"
    )
    p.add_argument("--libs", default="neuralode,torchdiffeq,torchode,torchdyn")
    p.add_argument(
        "--baseline",
        help="folder holding packages neuralode_base (and neuralode_base2) to time against neuralode; "
        "adds them to --libs",
    )
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive solves per timing sample (default 1: every solve sits between other libraries' "
        "solves, which also measures their code evicting its own from the caches)",
    )
    p.add_argument("--rows", default="", help="substring filter on row labels, e.g. 'b=64'")
    p.add_argument("--no-spiral", action="store_true")
    p.add_argument("--spiral-iters", type=int, default=30)
    p.add_argument(
        "--spiral-compile",
        action="store_true",
        help="add neuralode with options={'compile': True} to the spiral",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="clock of the printed table")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and args.clock == "cpu":
        args.clock = "wall"  # process CPU time does not see GPU work
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    if args.baseline:
        sys.path.insert(0, args.baseline)
        import importlib

        for name in ("neuralode_base", "neuralode_base2"):
            try:
                BASELINES[name] = importlib.import_module(name)
            except ImportError:
                continue
            libs.append(name)
    rows = quick_rows() if args.quick else all_rows()
    rows = [r for r in rows if args.rows in r.label]
    env = {
        "block": args.block,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "torchdiffeq": getattr(torchdiffeq, "__version__", None),
        "torchode": getattr(torchode, "__version__", None),
        "torchdyn": torchdyn_odeint is not None,
        "adjoint": "neuralode" if _adjoint_is_ours() else "shim",
    }
    print(json.dumps(env), flush=True)
    results = []
    for row in rows:
        r = bench_row(row, libs, args.repeats, max(args.budget, 3.0), device, max(args.block, 1))
        results.append(r)
        nd = r["libs"].get("neuralode", {})
        peers = ", ".join(
            f"{k} ×{v.get('speedup_cpu', math.nan):.2f}" for k, v in r["libs"].items() if k != "neuralode"
        )
        print(
            f"{row.label:32s} nfe {nd.get('nfe')} ovh {nd.get('overhead_ratio_cpu', math.nan):.2f} "
            f"({nd.get('overhead_us_per_eval_cpu', math.nan):.0f} µs/eval) | {peers} [{r['repeats']} reps]",
            flush=True,
        )
    spiral = None
    if not args.no_spiral and device.type == "cpu":
        spiral = bench_spiral(10 if args.quick else args.spiral_iters, libs, args.spiral_compile)
    table = markdown(results, spiral, args.clock)
    print(f"\nclock: {args.clock} (median per solve)\n")
    print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "rows": results, "spiral": spiral}, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
