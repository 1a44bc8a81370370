"""Stiff work-precision: neuralode's ``kvaerno3/4/5`` and ``ros34pw2`` against SciPy's ``Radau`` and ``BDF``.

Four classic stiff problems (Hairer and Wanner, "Solving ODEs II"): Robertson's chemical kinetics to
t = 1e5, Van der Pol with μ = 1000 over [0, 3000] (about two relaxation periods), HIRES (8 species, to
t = 321.8122) and the Oregonator (to t = 360). Each solver runs at a few tolerances; the error of a solve
is the largest deviation, over the output times and components, from a tight reference (SciPy ``Radau``
at rtol 1e-12), each component measured relative to its largest magnitude on the reference trajectory.
Reported per solve: that error, NFE (calls of the vector field, not counting the ones that build
Jacobians), Jacobian evaluations, LU factorisations, steps, median wall and process CPU time. Then the
costs at matched error: each solver's log-log work-precision line interpolated at common error levels.

How each side gets its Jacobian is each library's default: neuralode by reverse-mode autograd (one
batched vector-Jacobian pass), SciPy by finite differences of its NumPy vector field (``n`` extra calls
each, not in its ``nfev``). The vector fields are the same formulas, in torch for neuralode and in NumPy
for SciPy (SciPy's natural use; a torch field behind NumPy conversions would only slow it down).

Then a batch of 1 024 Robertson problems with rate constants varied log-uniformly by a factor of up to 2
(``--spread``):
one per-sample neuralode call (``odeint_per_sample``: every row its own step size, Newton iteration,
Jacobian block and LU), one joint call with ``options={"jacobian": "batch"}`` (one step size for the
batch, set by the worst row; a (3, 3) Jacobian block and LU per row), against SciPy solving them one by
one on a subset of them (time extrapolated to the batch, stated), at the same tolerances; error against
per-problem Radau references on that subset (``--only-batch`` runs only this part).

Last, torchdiffeq's only implicit method, the fixed-grid ``implicit_adams`` (Adams-Bashforth-Moulton
with a functional-iteration corrector), on HIRES: the step it needs for the error the adaptive solvers
reach at rtol 1e-6 (the functional iteration converges only for steps below the stiff time scale).

    python benchmarks/bench_stiff.py                        # everything, ~6 min at one thread
    python benchmarks/bench_stiff.py --problems robertson --repeats 1
    python benchmarks/bench_stiff.py --json out.json --markdown out.md
    python benchmarks/bench_stiff.py --only-batch --repeats 3   # the batch of 1 024 Robertson problems
    # one solver's rows only, compared at matched error with the rows of an earlier run's JSON
    python benchmarks/bench_stiff.py --solvers ros34pw2 --rtols 1e-4,1e-5,1e-6,1e-7 --batch 0 --ia-t1 0 \
        --merge docs/results/stiff/bench_stiff.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import neuralode

try:
    from scipy.integrate import solve_ivp
except ImportError:  # pragma: no cover
    print("error: this benchmark needs scipy", file=sys.stderr)
    sys.exit(2)
try:
    import torchdiffeq
except ImportError:  # pragma: no cover
    torchdiffeq = None

F64 = torch.float64
OURS = ("kvaerno3", "kvaerno4", "kvaerno5", "ros34pw2")
SCIPY = ("Radau", "BDF")


# -- problems: one formula each, evaluated with torch (neuralode) or NumPy (SciPy) --------------------------


def robertson_rhs(y, stack, k1=0.04, k2=3e7, k3=1e4):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    r1, r2, r3 = k1 * y1, k2 * y2 * y2, k3 * y2 * y3
    return stack([-r1 + r3, r1 - r2 - r3, r2])


def van_der_pol_rhs(y, stack, mu=1000.0):
    x, v = y[..., 0], y[..., 1]
    return stack([v, mu * (1 - x * x) * v - x])


def hires_rhs(y, stack):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[..., i] for i in range(8))
    r = 280.0 * y6 * y8
    return stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -r + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            r - 1.81 * y7,
            -r + 1.81 * y7,
        ]
    )


def oregonator_rhs(y, stack):
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    return stack(
        [
            77.27 * (y2 + y1 * (1.0 - 8.375e-6 * y1 - y2)),
            (y3 - (1.0 + y1) * y2) / 77.27,
            0.161 * (y1 - y3),
        ]
    )


# name: (rhs, y0, output times, atol as a multiple of rtol)
PROBLEMS = {
    "robertson": (robertson_rhs, [1.0, 0.0, 0.0], [0.0] + [10.0**k for k in range(-3, 6)], 1e-6),
    "vdp1000": (van_der_pol_rhs, [2.0, 0.0], list(np.linspace(0.0, 3000.0, 7)), 1.0),
    "hires": (hires_rhs, [1, 0, 0, 0, 0, 0, 0, 0.0057], [0.0, 1.0, 5.0, 20.0, 100.0, 321.8122], 1e-4),
    "oregonator": (oregonator_rhs, [1.0, 2.0, 3.0], list(np.linspace(0.0, 360.0, 9)), 1e-2),
}
RTOLS = (1e-4, 1e-6, 1e-8)
SINGLE_ABOVE_S = 1.5  # a solve slower than this (first call) is timed once
KVAERNO3_MIN_RTOL = 1e-7  # order 3 below this takes ~10^4 steps per problem: left out to keep the run short
ORDER3 = ("kvaerno3", "ros34pw2")  # the methods KVAERNO3_MIN_RTOL applies to


def torch_field(rhs, **kw):
    def f(t, y):
        return rhs(y, lambda xs: torch.stack(xs, -1), **kw)

    return f


def numpy_field(rhs, **kw):
    def f(t, y):
        return rhs(y, np.array, **kw)

    return f


def reference(rhs, y0, t_out, rtol=1e-12, atol_scale=1e-4, **kw):
    sol = solve_ivp(
        numpy_field(rhs, **kw),
        (t_out[0], t_out[-1]),
        np.asarray(y0, dtype=float),
        method="Radau",
        rtol=rtol,
        atol=rtol * atol_scale,
        t_eval=t_out,
    )
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    return sol.y.T  # (T, n)


def error(y: np.ndarray, ref: np.ndarray) -> float:
    """Max over times and components of |y − ref|, each component relative to its largest |ref|."""
    scale = np.abs(ref).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return float((np.abs(y - ref) / scale).max())


# -- one solve of each kind, returning (solution (T, n), counters) ------------------------------------------


def solve_ours(method, rhs, y0, t_out, rtol, atol, options=None, **kw):
    f = torch_field(rhs, **kw)
    y0t = torch.as_tensor(np.asarray(y0, dtype=float), dtype=F64)
    tt = torch.tensor(t_out, dtype=F64)
    stats = neuralode.SolveStats()
    with torch.no_grad():
        ys = neuralode.odeint(f, y0t, tt, method=method, rtol=rtol, atol=atol, options=options, stats=stats)
    c = {"nfe": stats.nfe, "n_jac": stats.n_jac, "n_lu": stats.n_lu, "n_steps": stats.n_steps}
    return ys.numpy(), c


def solve_scipy(method, rhs, y0, t_out, rtol, atol, **kw):
    sol = solve_ivp(
        numpy_field(rhs, **kw),
        (t_out[0], t_out[-1]),
        np.asarray(y0, dtype=float),
        method=method,
        rtol=rtol,
        atol=atol,
        dense_output=True,  # (with t_eval, solve_ivp would not report its steps)
    )
    if not sol.success:
        raise RuntimeError(f"scipy {method} failed: {sol.message}")
    c = {"nfe": int(sol.nfev), "n_jac": int(sol.njev), "n_lu": int(sol.nlu), "n_steps": len(sol.t) - 1}
    return sol.sol(t_out).T, c


def timed(fns: dict, repeats: int, record=None, single_above_s: float = math.inf) -> dict:
    """Median wall and CPU seconds of each zero-argument callable over ``repeats`` calls, interleaved
    (the order rotates); a callable whose first call took longer than ``single_above_s`` runs once.
    ``record(name, result)`` sees every result."""
    names = list(fns)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if wall[n] and wall[n][0] > single_above_s:
                continue
            w0, c0 = time.perf_counter(), time.process_time()
            out = fns[n]()
            wall[n].append(time.perf_counter() - w0)
            cpu[n].append(time.process_time() - c0)
            if record is not None:
                record(n, out)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


# -- work-precision -----------------------------------------------------------------------------------------


def work_precision(name: str, rtols, repeats: int, solvers=(*OURS, *SCIPY)) -> dict:
    rhs, y0, t_out, atol_scale = PROBLEMS[name]
    ref = reference(rhs, y0, t_out, atol_scale=atol_scale)
    ref_check = reference(rhs, y0, t_out, rtol=1e-11, atol_scale=atol_scale)
    rows = []
    for rtol in rtols:
        atol = rtol * atol_scale
        fns = {}
        for m in OURS:
            if m not in solvers or (m in ORDER3 and rtol < KVAERNO3_MIN_RTOL):
                continue
            fns[m] = functools.partial(solve_ours, m, rhs, y0, t_out, rtol, atol)
        for m in SCIPY:
            if m in solvers:
                fns[m] = functools.partial(solve_scipy, m, rhs, y0, t_out, rtol, atol)
        counts = {}

        def record(m, out, counts=counts):
            if m not in counts:
                y, c = out
                counts[m] = {**c, "err": error(y, ref), "err_end": error(y[-1:], ref[-1:])}

        times = timed(fns, repeats, record, SINGLE_ABOVE_S)
        for m in fns:
            rows.append(
                {
                    "solver": m,
                    "rtol": rtol,
                    "atol": atol,
                    **counts[m],
                    "wall_s": times[m][0],
                    "cpu_s": times[m][1],
                }
            )
    return {"problem": name, "reference_self_error": error(ref_check, ref), "rows": rows}


def matched(rows: list[dict], solvers, keys=("wall_s", "nfe", "n_jac", "n_lu")) -> list[dict]:
    """Each solver's costs interpolated (log-log, piecewise linear in the error) at the decades of error
    its tolerance sweep brackets (``None`` for a solver whose sweep does not reach a decade)."""
    by = {s: sorted((r for r in rows if r["solver"] == s), key=lambda r: r["err"]) for s in solvers}
    lo = min(v[0]["err"] for v in by.values())
    hi = max(v[-1]["err"] for v in by.values())
    out = []
    for k in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1):
        target = math.log(10.0**k)
        entry = {}
        for s, v in by.items():
            le = [math.log(r["err"]) for r in v]
            i = next((i for i in range(1, len(v)) if le[i - 1] <= target <= le[i]), None)
            if i is None:
                entry[s] = None
                continue
            w = (target - le[i - 1]) / (le[i] - le[i - 1]) if le[i] > le[i - 1] else 0.0
            entry[s] = {
                key: math.exp(
                    (1 - w) * math.log(max(v[i - 1][key], 1e-12)) + w * math.log(max(v[i][key], 1e-12))
                )
                for key in keys
            }
        if sum(c is not None for c in entry.values()) >= 2:
            out.append({"err": 10.0**k, "solvers": entry})
    return out


# -- the batch of Robertson problems -----------------------------------------------------------------------


def robertson_batch(
    batch: int, subset: int, rtol: float, atol: float, repeats: int, spread: float = 2.0
) -> dict:
    g = torch.Generator().manual_seed(0)
    s = math.log(spread)
    factors = torch.exp(torch.empty(batch, 3, dtype=F64).uniform_(-s, s, generator=g))
    k = factors * torch.tensor([0.04, 3e7, 1e4], dtype=F64)
    _, _, t_out, atol_scale = PROBLEMS["robertson"]
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64).repeat(batch, 1)
    tt = torch.tensor(t_out, dtype=F64)
    k1, k2, k3 = k.unbind(-1)
    f = torch_field(robertson_rhs, k1=k1, k2=k2, k3=k3)
    sub = range(subset)
    refs = [reference(robertson_rhs, [1, 0, 0], t_out, 1e-11, atol_scale, **_k(k[i])) for i in sub]

    def errors(ys) -> tuple[float, float]:
        return (max(error(ys[i], refs[i]) for i in sub), max(error(ys[i][-1:], refs[i][-1:]) for i in sub))

    rows = []
    for method in ("kvaerno4", "kvaerno5"):
        found = {}

        def per_sample(method=method):
            stats = neuralode.SolveStats()
            with torch.no_grad():
                ys, info = neuralode.odeint_per_sample(
                    f, y0, tt, method=method, rtol=rtol, atol=atol, stats=stats, return_info=True
                )
            return ys, (stats, info)

        def record_rows(name, out, found=found):
            if not found:
                ys, (stats, info) = out
                found["err"], found["err_end"] = errors(ys.transpose(0, 1).numpy())
                found["stats"], found["info"] = stats, info

        wall, cpu = timed({method: per_sample}, repeats, record_rows)[method]
        st, info = found["stats"], found["info"]
        steps = info.n_steps.double()
        counters = (
            f"{st.nfe} batched calls, {st.n_jac} batched Jacobians, {st.n_lu} batched LU; steps per row "
            f"{int(steps.min())}-{int(steps.max())} (median {int(steps.median())}), Jacobian blocks per row "
            f"median {int(info.n_jac.double().median())}"
        )
        rows.append(
            _batch_row(
                f"{method} per sample (batch={batch}, one call)", found, counters, wall, cpu, batch, batch
            )
        )
        found = {}

        def ours(method=method):
            stats = neuralode.SolveStats()
            with torch.no_grad():
                ys = neuralode.odeint(
                    f, y0, tt, method=method, rtol=rtol, atol=atol, options={"jacobian": "batch"}, stats=stats
                )
            return ys, stats

        def record(name, out, found=found):
            if not found:
                ys, stats = out
                found["err"], found["err_end"] = errors(ys.transpose(0, 1).numpy())
                found["stats"] = stats

        wall, cpu = timed({method: ours}, repeats, record)[method]
        st = found["stats"]
        counters = (
            f"{st.n_steps} steps, {st.nfe} batched calls, {st.n_jac} batched Jacobians, {st.n_lu} batched LU"
        )
        rows.append(
            _batch_row(f"{method} (batch={batch}, one call)", found, counters, wall, cpu, batch, batch)
        )
    for method in SCIPY:
        found = {}

        def loop(method=method):
            return [solve_scipy(method, robertson_rhs, [1, 0, 0], t_out, rtol, atol, **_k(k[i])) for i in sub]

        def record(name, out, found=found):
            if not found:
                found["err"], found["err_end"] = errors([y for y, _ in out])
                found["c"] = {key: sum(c[key] for _, c in out) / subset for key in ("nfe", "n_jac", "n_lu")}

        wall, cpu = timed({method: loop}, repeats, record)[method]
        c = found["c"]
        counters = f"{c['nfe']:.0f} calls, {c['n_jac']:.0f} Jacobians, {c['n_lu']:.0f} LU per problem"
        name = f"SciPy {method} (one by one; {subset} of {batch} timed, extrapolated)"
        rows.append(_batch_row(name, found, counters, wall, cpu, subset, batch))
    return {
        "batch": batch,
        "scipy_subset": subset,
        "rtol": rtol,
        "atol": atol,
        "spread": spread,
        "rows": rows,
    }


def _batch_row(solver: str, found: dict, counters: str, wall: float, cpu: float, solved: int, batch: int):
    """A row of the batch table; ``wall``/``cpu`` are for ``solved`` problems, extrapolated to ``batch``."""
    return {
        "solver": solver,
        "err_subset": found["err"],
        "err_end_subset": found["err_end"],
        "counters": counters,
        "wall_s_total": wall * batch / solved,
        "cpu_s_total": cpu * batch / solved,
        "ms_per_problem": 1e3 * wall / solved,
    }


def _k(row: torch.Tensor) -> dict:
    return {"k1": float(row[0]), "k2": float(row[1]), "k3": float(row[2])}


# -- torchdiffeq's implicit_adams ----------------------------------------------------------------------------


def implicit_adams(t1: float, steps, rtol: float = 1e-6) -> dict:
    """torchdiffeq's fixed-grid ``implicit_adams`` on HIRES over ``[0, t1]`` at decreasing steps until it
    reaches the error of kvaerno5 at ``rtol`` on the same span."""
    rhs, y0, _, atol_scale = PROBLEMS["hires"]
    t_out = [0.0, t1 / 5, t1]
    ref = reference(rhs, y0, t_out, atol_scale=atol_scale)
    w0, c0 = time.perf_counter(), time.process_time()
    y, c = solve_ours("kvaerno5", rhs, y0, t_out, rtol, rtol * atol_scale)
    ours = {"err": error(y, ref), **c, "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    f = torch_field(rhs)
    y0t = torch.tensor(y0, dtype=F64)
    tt = torch.tensor(t_out, dtype=F64)
    rows = []
    for h in steps:
        n = [0]

        def counted(t, y, n=n):
            n[0] += 1
            return f(t, y)

        w0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ys = torchdiffeq.odeint(counted, y0t, tt, method="implicit_adams", options={"step_size": h})
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        y = ys.numpy()
        err = error(y, ref) if np.isfinite(y).all() else math.nan
        rows.append(
            {
                "step_size": h,
                "err": err,
                "nfe": n[0],
                "not_converged_warnings": len(caught),
                "wall_s": wall,
                "cpu_s": cpu,
            }
        )
        if err <= ours["err"]:
            break
    return {"problem": "hires", "t1": t1, "rtol": rtol, "kvaerno5": ours, "rows": rows}


# -- output -------------------------------------------------------------------------------------------------


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def markdown(res: dict) -> str:
    lines = [
        "# Stiff work-precision: kvaerno3/4/5 and ros34pw2 against SciPy Radau and BDF",
        "",
        res["header"],
        "",
    ]
    for wp in res["work_precision"]:
        lines += [
            f"## {wp['problem']}",
            "",
            f"Reference: SciPy Radau at rtol 1e-12 (its distance to Radau at rtol 1e-11: "
            f"{wp['reference_self_error']:.1e}). Error: at the output times; error at end: at the last "
            "time only (a step end for every solver, no interpolation)."
            + (
                " Rows marked * come from the merged earlier run (its own timings)."
                if wp.get("merged")
                else ""
            ),
            "",
            "| solver | rtol | error | error at end | NFE | Jacobians | LU | steps | wall ms | CPU ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in wp["rows"]:
            lines.append(
                f"| {r['solver']}{'*' if r.get('merged') else ''} | {r['rtol']:.0e} | {r['err']:.1e} | {r['err_end']:.1e} | {r['nfe']} | "
                f"{r['n_jac']} | {r['n_lu']} | {r['n_steps']} | {1e3 * r['wall_s']:.1f} | {1e3 * r['cpu_s']:.1f} |"
            )
        lines.append("")
        if wp["matched"]:
            solvers = list(wp["matched"][0]["solvers"])
            lines += [
                "At matched error (each solver's sweep interpolated log-log at the decades of error it brackets; "
                "-: not reached by its tolerances): wall ms / NFE / Jacobians / LU",
                "",
                "| error | " + " | ".join(solvers) + " |",
                "|---|" + "---|" * len(solvers),
            ]
            for e in wp["matched"]:
                cells = [
                    "-"
                    if c is None
                    else f"{1e3 * c['wall_s']:.0f} / {c['nfe']:.0f} / {c['n_jac']:.0f} / {c['n_lu']:.0f}"
                    for c in e["solvers"].values()
                ]
                lines.append(f"| {e['err']:.0e} | " + " | ".join(cells) + " |")
            lines.append("")
    if res.get("batch"):
        b = res["batch"]
        lines += [
            f"## {b['batch']} Robertson problems (rate constants varied), rtol {b['rtol']:g}, atol {b['atol']:g}",
            "",
            f"Rate constants: each of k1, k2, k3 times a log-uniform factor in [1/{b['spread']:g}, "
            f"{b['spread']:g}] (seed 0). neuralode per "
            "sample: one `odeint_per_sample` call (every row its own step size, Newton iteration, Jacobian "
            "block and LU). neuralode batch: one `odeint` call with `options={'jacobian': 'batch'}`: joint "
            "stepping (one step size for the whole batch, set by the worst row), a 3x3 Jacobian block and LU "
            "per row. SciPy: one `solve_ivp` per "
            f"problem on the first {b['scipy_subset']} problems, time extrapolated linearly to {b['batch']}. "
            f"Errors: worst over those {b['scipy_subset']} problems against Radau at rtol 1e-11.",
            "",
            "| solver | error | error at end | counters | total wall s | CPU s | wall ms per problem |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in b["rows"]:
            lines.append(
                f"| {r['solver']} | {r['err_subset']:.1e} | {r['err_end_subset']:.1e} | {r['counters']} | "
                f"{r['wall_s_total']:.2f} | {r['cpu_s_total']:.2f} | {r['ms_per_problem']:.3f} |"
            )
        lines.append("")
    if res.get("implicit_adams"):
        ia = res["implicit_adams"]
        k5 = ia["kvaerno5"]
        lines += [
            f"## torchdiffeq `implicit_adams` (fixed grid) on HIRES over [0, {ia['t1']:g}]",
            "",
            f"Target: the error of kvaerno5 at rtol {ia['rtol']:g} on the same span, {k5['err']:.1e} "
            f"({k5['n_steps']} steps, NFE {k5['nfe']}, {1e3 * k5['wall_s']:.0f} ms wall). NaN: the solve "
            "diverged.",
            "",
            "| step | error | NFE | 'did not converge' warnings | wall s | CPU s |",
            "|---|---|---|---|---|---|",
        ]
        for r in ia["rows"]:
            lines.append(
                f"| {r['step_size']:g} | {r['err']:.1e} | {r['nfe']} | {r['not_converged_warnings']} | "
                f"{r['wall_s']:.2f} | {r['cpu_s']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--problems", default=",".join(PROBLEMS), help="comma-separated subset of " + ", ".join(PROBLEMS)
    )
    p.add_argument("--rtols", default=",".join(f"{r:g}" for r in RTOLS))
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per solve (the first also gives the counters)"
    )
    p.add_argument("--batch", type=int, default=1024, help="Robertson batch size (0: skip)")
    p.add_argument("--subset", type=int, default=16, help="problems of the batch SciPy solves (timed)")
    p.add_argument(
        "--spread",
        type=float,
        default=2.0,
        help="batch rate constants: each times a log-uniform factor in [1/spread, spread]",
    )
    p.add_argument(
        "--only-batch",
        action="store_true",
        help="run only the batch of Robertson problems (per-sample, joint batch and SciPy one by one)",
    )
    p.add_argument(
        "--ia-t1", type=float, default=5.0, help="end of the HIRES span for implicit_adams (0: skip)"
    )
    p.add_argument(
        "--ia-steps", default="0.004,0.002,0.001", help="implicit_adams step sizes to try, in order"
    )
    p.add_argument("--solvers", default=",".join((*OURS, *SCIPY)), help="comma-separated subset of solvers")
    p.add_argument(
        "--merge",
        help="JSON of an earlier run: its rows of the solvers not run here join the tables and the matched-error "
        "comparison (counts are deterministic; its times are from that run)",
    )
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    solvers = [s for s in args.solvers.split(",") if s]
    bad = sorted(set(solvers) - {*OURS, *SCIPY})
    if bad:
        print(f"error: unknown solver(s) {bad}; valid: {', '.join((*OURS, *SCIPY))}", file=sys.stderr)
        return 2
    merged = {}
    if args.merge:
        with open(args.merge) as fh:
            merged = {wp["problem"]: wp for wp in json.load(fh)["work_precision"]}
    names = [s for s in args.problems.split(",") if s]
    unknown = sorted(set(names) - set(PROBLEMS))
    if unknown:
        print(f"error: unknown problem(s) {unknown}; valid: {', '.join(PROBLEMS)}", file=sys.stderr)
        return 2
    if args.only_batch:
        names, args.ia_t1 = [], 0.0
    torch.set_num_threads(1)
    rtols = [float(x) for x in args.rtols.split(",")]
    t_start = time.perf_counter()
    solve_ours("kvaerno5", *PROBLEMS["hires"][:3], 1e-4, 1e-8)  # warm-up: imports, first-call paths
    res = {
        "header": (
            f"float64, one thread (`torch.set_num_threads(1)`), medians of {args.repeats} interleaved runs "
            f"(the order rotates; a solve over {SINGLE_ABOVE_S:g} s runs once) of wall and process CPU time. The machine was shared with other jobs while "
            f"this ran: read ratios, not absolute times. torch {torch.__version__}, numpy {np.__version__}. "
            "NFE counts calls of the vector field, not the ones that build Jacobians (neuralode: one batched "
            "reverse-mode pass per Jacobian; SciPy: n finite-difference calls). kvaerno3 and ros34pw2 run at "
            f"rtol >= {KVAERNO3_MIN_RTOL:g} only (order 3 needs ~10^4 steps below)."
            + (
                f" Rows marked * are from {args.merge} (an earlier run: compare their counts; their times come "
                "from another load of the machine)."
                if args.merge
                else ""
            )
        ),
        "args": vars(args),
        "work_precision": [],
    }
    for name in names:
        wp = work_precision(name, rtols, args.repeats, solvers)
        if name in merged:
            extra = [{**r, "merged": True} for r in merged[name]["rows"] if r["solver"] not in solvers]
            wp["rows"] = sorted(
                wp["rows"] + extra, key=lambda r: (-r["rtol"], (*OURS, *SCIPY).index(r["solver"]))
            )
            wp["merged"] = True
        wp["matched"] = matched(
            wp["rows"], [s for s in (*OURS, *SCIPY) if any(r["solver"] == s for r in wp["rows"])]
        )
        res["work_precision"].append(wp)
        print(f"{name}: done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    if args.batch:
        res["batch"] = robertson_batch(
            args.batch, min(args.subset, args.batch), 1e-6, 1e-12, args.repeats, args.spread
        )
        print(f"batch: done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    if torchdiffeq is not None and args.ia_t1 > 0:
        res["implicit_adams"] = implicit_adams(args.ia_t1, [float(x) for x in args.ia_steps.split(",")])
        print(f"implicit_adams: done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    res["total_s"] = time.perf_counter() - t_start
    md = markdown(res) + f"\nTotal run time {res['total_s']:.0f} s.\n"
    print(md)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
