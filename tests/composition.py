"""The composition matrix: every method under every mode, gradient method, event setting and dtype.

A cell is ``(method, mode, execution, gradient, event, dtype)``:

* mode: ``joint`` (one step size for the whole state) or ``per_sample`` (a step size per batch row);
* execution: ``eager`` or ``compiled`` (``options["compile"]``);
* gradient: ``direct`` (backprop through the solver), ``adjoint`` (``odeint_adjoint``) or ``checkpoint``
  (``odeint_checkpoint``);
* event: ``none`` (solve to fixed output times) or ``event`` (``odeint_event``, a terminal event whose time
  and state are differentiated; in per-sample mode each row stops at its own event, with event times of
  shape ``(B,)``);
* dtype: ``float32`` or ``float64``.

Every cell either matches the reference or raises, at the call, a ``ValueError``/``TypeError``/
``NotImplementedError`` that says what is supported. The reference is analytic: a damped rotation
``dy/dt = y Aᵀ`` with ``y(t) = y0 exp(Aᵀ t)`` (``torch.linalg.matrix_exp``, differentiable, so the
reference gradients with respect to ``A`` and ``y0`` are exact); the event is the first zero of the first
state component, located on the analytic solution by bisection. Tolerances per method come from its own
baseline cell (joint, eager, direct, no event, float64), which is itself checked against the analytic
solution with a bound from the method's order.

Run as a script to print the matrix as a markdown table (``python tests/composition.py [--all]``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
import warnings

import torch
from torch import nn

import neuralode
from neuralode import SolverError, SolveStats, odeint, odeint_adjoint, odeint_checkpoint, odeint_event

MODES = ("joint", "per_sample")
EXECUTIONS = ("eager", "compiled")
GRADIENTS = ("direct", "adjoint", "checkpoint")
EVENTS = ("none", "event")
DTYPES = ("float64", "float32")
#: Errors that count as "raises at the call with a clear message".
CLEAR_ERRORS = (ValueError, TypeError, NotImplementedError)

T_END = 2.0
FIXED_STEP = 1.0 / 32
A_TRUE = ((-0.3, 1.0), (-1.0, -0.3))
Y0_TRUE = ((1.0, 0.0), (0.8, 0.5))


def methods() -> list[str]:
    """Every method in ``neuralode.SOLVERS``."""
    return sorted(neuralode.SOLVERS)


def is_adaptive(method: str) -> bool:
    from neuralode._solvers.registry import EXTRA_METHODS

    spec = EXTRA_METHODS.get(method)
    return method in neuralode.ADAPTIVE_METHODS or (spec is not None and "step_size" not in spec.options)


class Linear(nn.Module):
    """``f(t, y) = y Aᵀ`` for a batch ``y`` of shape ``(B, 2)``; ``t`` may be 0-d or ``(B,)``."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(A_TRUE, dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A.T


def analytic(A: torch.Tensor, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``y(t)`` for every ``t``: ``(len(t), B, 2)``."""
    return torch.stack([y0 @ torch.linalg.matrix_exp(A.T * ti) for ti in t])


def _root(A: torch.Tensor, y0row: torch.Tensor) -> float:
    """First zero of ``y(t)[0]`` for one row, by bracketing on a fine grid then bisection (float64)."""
    A, y0row = A.detach().double(), y0row.detach().double()

    def g(s: float) -> float:
        return float((y0row @ torch.linalg.matrix_exp(A.T * s))[0])

    lo, step = 0.0, 0.01
    while g(lo + step) > 0:
        lo += step
        if lo > 20:
            raise RuntimeError("the reference event never fires")
    hi = lo + step
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def event_reference(A: torch.Tensor, y0: torch.Tensor, per_sample: bool):
    """``(t_event, y_event)`` with exact gradients through the implicit function theorem.

    Joint mode: the event is row 0's first component (scalar time, state ``(B, 2)`` at it).
    Per-sample mode: each row's own first zero (times ``(B,)``, states ``(B, 2)``).
    """
    rows = range(y0.shape[0]) if per_sample else range(1)
    times, states = [], []
    for r in rows:
        t_star = torch.tensor(_root(A, y0[r]), dtype=torch.float64)
        # t* depends on (A, y0) through g(t*; A, y0) = 0: dt* = -dg / g_t, written as a correction term.
        yr = y0[r] @ torch.linalg.matrix_exp(A.T * t_star.to(A.dtype))
        g_t = (yr @ A.T)[0].detach()
        t_diff = t_star.to(A.dtype) - (yr[0] - yr[0].detach()) / g_t
        times.append(t_diff)
        at = y0 @ torch.linalg.matrix_exp(A.T * t_diff) if not per_sample else None
        states.append(at if not per_sample else y0[r] @ torch.linalg.matrix_exp(A.T * t_diff))
    if per_sample:
        return torch.stack(times), torch.stack(states)
    return times[0], states[0]


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    mode: str
    execution: str
    gradient: str
    event: str
    dtype: str

    @property
    def id(self) -> str:
        return "-".join(dataclasses.astuple(self))


def cells(methods_: list[str] | None = None, *, everything: bool = True) -> list[Cell]:
    """All cells, or (``everything=False``) the default suite's share: every method eager in float64, plus
    float32 and the compiled execution for one adaptive and one fixed-grid method."""
    out = []
    for m, mode, ex, gr, ev, dt in itertools.product(
        methods_ or methods(), MODES, EXECUTIONS, GRADIENTS, EVENTS, DTYPES
    ):
        if not everything:
            light = m in ("dopri5", "rk4")
            if ex == "compiled" and not light:
                continue
            if dt == "float32" and not light:
                continue
        out.append(Cell(m, mode, ex, gr, ev, dt))
    return out


def _solver_args(cell: Cell) -> dict:
    dtype = getattr(torch, cell.dtype)
    options: dict = {}
    if is_adaptive(cell.method):
        # Low-order methods at tight tolerances take thousands of steps: loosen with the order.
        order = _order(cell.method) if cell.method != "scipy_solver" else 5
        rtol, atol = {1: (1e-4, 1e-6), 2: (1e-4, 1e-6), 3: (1e-6, 1e-8)}.get(order, (1e-7, 1e-9))
        if dtype == torch.float32:
            rtol, atol = max(rtol, 1e-5), max(atol, 1e-6)
    else:
        rtol, atol = 1e-7, 1e-9
        options["step_size"] = FIXED_STEP
    if cell.mode == "per_sample":
        options["per_sample"] = True
    if cell.execution == "compiled":
        options["compile"] = {"backend": "aot_eager"}
    return dict(rtol=rtol, atol=atol, method=cell.method, options=options)


def run_cell(cell: Cell) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The cell's output and its gradients with respect to ``(A, y0)``; raises whatever the solver raises."""
    dtype = getattr(torch, cell.dtype)
    func = Linear(dtype)
    y0 = torch.tensor(Y0_TRUE, dtype=dtype, requires_grad=True)
    kw = _solver_args(cell)
    interface = {"direct": odeint, "adjoint": odeint_adjoint, "checkpoint": odeint_checkpoint}[cell.gradient]
    if cell.event == "none":
        t = torch.linspace(0, T_END, 5, dtype=torch.float64)
        out = interface(func, y0, t, **kw)
    else:
        if cell.mode == "per_sample":

            def event_fn(t, y):
                return y[:, 0]
        else:

            def event_fn(t, y):
                return y[0, 0]

        t_e, sol = odeint_event(
            func,
            y0,
            torch.tensor(0.0, dtype=torch.float64),
            event_fn=event_fn,
            odeint_interface=interface,
            **kw,
        )
        out = torch.cat([t_e.reshape(-1).to(dtype), sol[-1].reshape(-1)])
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), [func.A, y0], allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros(()) for g in grads]


def reference(cell: Cell) -> tuple[torch.Tensor, list[torch.Tensor]]:
    A = torch.tensor(A_TRUE, dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor(Y0_TRUE, dtype=torch.float64, requires_grad=True)
    if cell.event == "none":
        out = analytic(A, y0, torch.linspace(0, T_END, 5, dtype=torch.float64))
    else:
        t_e, y_e = event_reference(A, y0, cell.mode == "per_sample")
        out = torch.cat([t_e.reshape(-1), y_e.reshape(-1)])
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    grads = torch.autograd.grad((out * w).sum(), [A, y0])
    return out.detach(), list(grads)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@functools.cache
def baseline_error(method: str) -> float:
    """Max error (value and gradients) of the method's baseline cell against the analytic reference."""
    errs = []
    for ev in EVENTS:
        cell = Cell(method, "joint", "eager", "direct", ev, "float64")
        try:
            out, grads = run_cell(cell)
        except Exception:  # the baseline cell's own outcome reports it; fall back to the order bound
            errs.append(order_bound(method) / 10)
            continue
        ref_out, ref_grads = reference(cell)
        errs.append(max([_err(out, ref_out)] + [_err(g, r) for g, r in zip(grads, ref_grads)]))
    return max(errs)


def _order(method: str) -> int:
    from neuralode._solvers.registry import EXTRA_METHODS

    tab = neuralode.TABLEAUS.get(method)
    return tab.order if tab is not None else EXTRA_METHODS[method].order


def order_bound(method: str) -> float:
    """What the baseline cell may miss the analytic solution by."""
    if is_adaptive(method):
        return 1e-4
    return 20.0 * FIXED_STEP ** min(_order(method), 6) + 1e-6


def tolerance(cell: Cell) -> float:
    # A cell may differ from its baseline by the method's own error (another step sequence, another
    # gradient discretisation) plus float32 rounding.
    tol = max(10 * baseline_error(cell.method), 1e-6)
    if cell.gradient == "adjoint" and not is_adaptive(cell.method):
        tol = max(tol, 20.0 * order_bound(cell.method))  # the backward solve's own discretisation error
    if cell.event == "event" and cell.gradient == "adjoint" and not is_adaptive(cell.method):
        # odeint_adjoint solves to the located event time, which is off the grid: the last step is
        # shortened, and the multistep (Adams) formulas, which assume equal spacing (as torchdiffeq's do),
        # are only about second-order accurate over it (4e-5 at step 1/32, in both libraries).
        tol = max(tol, 0.1 * FIXED_STEP**2)
    if cell.dtype == "float32":
        tol += 2e-3
    return tol


def outcome(cell: Cell) -> tuple[str, str]:
    """``("ok", detail)``, ``("raises", message)`` for a clear error at the call, or ``("WRONG", why)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, grads = run_cell(cell)
    except CLEAR_ERRORS as e:
        return "raises", f"{type(e).__name__}: {e}"
    except SolverError as e:
        return "WRONG", f"SolverError: {e}"
    except Exception as e:  # anything else is not a clear error at the call
        return "WRONG", f"{type(e).__name__}: {e}"
    ref_out, ref_grads = reference(cell)
    err_v = _err(out, ref_out)
    err_g = max(_err(g, r) for g, r in zip(grads, ref_grads))
    tol = tolerance(cell)
    if not (err_v <= tol and err_g <= 10 * tol):
        return "WRONG", f"value error {err_v:.2e}, gradient error {err_g:.2e}, tolerance {tol:.1e}"
    return "ok", f"value error {err_v:.1e}, gradient error {err_g:.1e}"


def _reason(cell: Cell, message: str) -> str:
    """An error message with the cell's own method name taken out, so that equal reasons group."""
    return message.replace(f"'{cell.method}'", "'<method>'").split("; valid options")[0]


def markdown(results: dict[Cell, tuple[str, str]]) -> str:
    """Rows ``(method, mode, execution)``; columns ``(gradient, event, dtype)``; errors as numbered notes."""
    cols = list(itertools.product(GRADIENTS, EVENTS, DTYPES))
    cols = [c for c in cols if any((r.gradient, r.event, r.dtype) == c for r in results)]
    reasons: dict[str, int] = {}
    lines = [
        "| method | mode | execution | " + " | ".join(f"{g} / {e} / {d}" for g, e, d in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    rows = sorted({(c.method, c.mode, c.execution) for c in results})
    for m, mode, ex in rows:
        out = []
        for col in cols:
            cell = Cell(m, mode, ex, *col)
            r = results.get(cell)
            if r is None:
                out.append("")
            elif r[0] == "ok":
                out.append("ok")
            elif r[0] == "raises":
                key = _reason(cell, r[1])
                n = reasons.setdefault(key, len(reasons) + 1)
                out.append(f"error [{n}]")
            else:
                out.append("**WRONG**")
        lines.append(f"| {m} | {mode} | {ex} | " + " | ".join(out) + " |")
    lines.append("")
    lines.append("Errors (raised at the call, before any solve):")
    lines.append("")
    for key, n in reasons.items():
        lines.append(f"{n}. `{key}`")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    everything = "--all" in argv
    torch.manual_seed(0)
    results = {c: outcome(c) for c in cells(everything=everything)}
    counts = {k: sum(1 for v in results.values() if v[0] == k) for k in ("ok", "raises", "WRONG")}
    summary = f"{len(results)} cells: {counts['ok']} ok, {counts['raises']} raise a clear error, {counts['WRONG']} wrong"
    text = markdown(results)
    if "--markdown" in argv:
        with open(argv[argv.index("--markdown") + 1], "w") as fh:
            fh.write(HEADER + summary + ".\n\n" + text + "\n")
    print(text)
    print(f"\n{summary}")
    for c, (kind, why) in results.items():
        if kind == "WRONG":
            print(f"WRONG {c.id}: {why[:200]}")


# -- failure without raising (options["throw"] = False) ----------------------------------------------------
#
# A separate block: cells (method, mode, execution, gradient) on a problem that blows up, solved with
# options["throw"] = False. "ok": the status says it failed, the outputs up to the time reached (and
# their gradients) equal those of a normal solve to those outputs, the rest are NaN; "raises": a clear
# error at the call (e.g. a method without throw=False), or, for odeint_adjoint, the documented
# SolverError of its backward pass; anything else is "WRONG".

FAIL_Y0 = ((1.0,), (0.25,))  # dy/dt = a·y²: row 0 blows up at t = 1, row 1 at t = 4
FAIL_T = (0.0, 2.0, 9)
FAIL_METHODS = (
    "dopri5",
    "tsit5",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "gl4",
    "kvaerno3",
    "ros34pw2",
    "scipy_solver",
)


@dataclasses.dataclass(frozen=True)
class FailureCell:
    method: str
    mode: str
    execution: str
    gradient: str

    @property
    def id(self) -> str:
        return "throw-" + "-".join(dataclasses.astuple(self))


class Square(nn.Module):
    """``f(t, y) = a·y²`` (``a = 1``), NaN where ``|y| > 1000`` (so that the implicit methods, which step
    across the pole onto the other branch, fail too); ``t`` may be 0-d or ``(B,)``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y.abs() > 1000, math.nan, self.a * y**2)


def failure_cells(*, everything: bool = True) -> list[FailureCell]:
    """All failure cells, or (``everything=False``) the eager ones of dopri5 and rk4 plus every method's
    baseline (joint, eager, direct) but the stiff ones' (seconds each; ``tests/test_stiff_rows.py``
    checks ``throw=False`` for them)."""
    out = []
    for m, mode, ex, gr in itertools.product(FAIL_METHODS, MODES, EXECUTIONS, GRADIENTS):
        baseline = mode == "joint" and ex == "eager" and gr == "direct" and not m.startswith("kvaerno")
        if everything or baseline or (ex == "eager" and m in ("dopri5", "rk4")):
            out.append(FailureCell(m, mode, ex, gr))
    return out


def _failure_solve(cell: FailureCell, y0: torch.Tensor, t: torch.Tensor, throw: bool):
    """``(outputs, stats, gradient of Σ w·(finite outputs) w.r.t. (a, y0))``."""
    func = Square()
    y0 = y0.clone().requires_grad_(True)
    options: dict = {} if is_adaptive(cell.method) else {"step_size": FIXED_STEP}
    if cell.mode == "per_sample":
        options["per_sample"] = True
    if cell.execution == "compiled":
        options["compile"] = {"backend": "aot_eager"}
    if not throw:
        options["throw"] = False
    interface = {"direct": odeint, "adjoint": odeint_adjoint, "checkpoint": odeint_checkpoint}[cell.gradient]
    with neuralode.record_stats() as stats:
        out = interface(func, y0, t, rtol=1e-6, atol=1e-9, method=cell.method, options=options)
    loss = torch.nan_to_num(out, nan=0.0).sum()  # the unreached outputs are NaN constants: masked out
    grads = torch.autograd.grad(loss, [func.a, y0], allow_unused=True)
    return out.detach(), stats, [g if g is not None else torch.zeros(()) for g in grads]


def says_what_to_do(message: str) -> bool:
    """A clear error names what is supported, what was expected or what to use instead."""
    return any(w in message.lower() for w in ("expected", "supported", "valid", "use ", "needs", "cannot"))


def failure_outcome(cell: FailureCell) -> tuple[str, str]:
    """``("ok", detail)``, ``("raises", message)`` or ``("WRONG", why)`` (see the block's comment)."""
    t = torch.linspace(*FAIL_T[:2], FAIL_T[2], dtype=torch.float64)
    y0 = torch.tensor(FAIL_Y0, dtype=torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, stats, grads = _failure_solve(cell, y0, t, throw=False)
    except CLEAR_ERRORS as e:
        return "raises", f"{type(e).__name__}: {e}"
    except SolverError as e:
        if cell.gradient == "adjoint" and "cannot differentiate a solve" in str(e):
            return "raises", f"SolverError (backward): {str(e).split(' (options')[0]}"
        return "WRONG", f"SolverError: {e}"
    except Exception as e:
        return "WRONG", f"{type(e).__name__}: {e}"
    per_sample = cell.mode == "per_sample"
    status = stats.status[0] if per_sample else stats.status
    if (status == 0) if per_sample else (status == "success"):
        return "WRONG", "the solve reports success past the blow-up"
    t_reached = stats.t_reached if per_sample else torch.full((2,), stats.t_reached, dtype=torch.float64)
    rows = (0, 1) if per_sample else ((0, 1),)
    err, ref_a, ref_y0 = 0.0, 0.0, []
    for r in rows:
        r = list(r) if isinstance(r, tuple) else [r]
        n_ok = int((t <= t_reached[r[0]]).sum())
        if not (torch.isfinite(out[:n_ok, r]).all() and torch.isnan(out[n_ok:, r]).all()):
            return "WRONG", f"rows {r}: outputs up to t_reached not finite, or after it not NaN"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _failure_solve(cell, y0[r], t[:n_ok], throw=True)
        err = max(err, float(((out[:n_ok, r] - ref[0]).abs() / ref[0].abs().clamp(min=1)).max()))
        ref_a, ref_y0 = ref_a + ref[2][0], [*ref_y0, ref[2][1]]
    # (adaptive: the normal solve clips its last step onto the last output, so agreement is to tolerance)
    tol = 1e-4 if is_adaptive(cell.method) else 1e-9
    if err > tol:
        return "WRONG", f"outputs before the failure differ from a normal solve by {err:.1e}"
    # The gradient of the reached outputs: that of the normal solves (per sample: summed over the rows).
    ref_y0 = torch.cat(ref_y0)
    err_g = max(
        _err(grads[0], ref_a) / max(1.0, abs(float(ref_a))),
        _err(grads[1], ref_y0) / max(1.0, _err(ref_y0, 0 * ref_y0)),
    )
    if not err_g <= 10 * tol:
        return "WRONG", f"gradient of the reached outputs differs from a normal solve's by {err_g:.1e}"
    return (
        "ok",
        f"status {status if isinstance(status, str) else SolveStats.STATUS[int(status)]}, t_reached {float(t_reached[0]):.4g}",
    )


HEADER = """# Composition matrix

Which combinations of method, stepping mode, execution, gradient method, event handling and dtype work.
Each cell solves the damped rotation `dy/dt = y Aᵀ` (a batch of two 2-vectors) and differentiates a
weighted sum of the outputs with respect to `A` and `y0`; "ok" means the values and gradients match the
analytic solution (matrix exponential) within the method's own accuracy; "error" means the call raises a
`ValueError`/`TypeError` that says what is supported instead. No cell may be silently wrong: the
test suite (`tests/test_composition.py`) runs the matrix, and this page is generated from the same
registry by `python tests/composition.py --markdown docs/composition.md` (the default suite's share of the
cells; `--all` runs every cell, compiled ones included, in about ten minutes).

Columns: gradient method (`direct` = backprop through `odeint`, `adjoint` = `odeint_adjoint`,
`checkpoint` = `odeint_checkpoint`) / `none` = fixed output times, `event` = `odeint_event` with a terminal
event / dtype. Rows: `joint` = one step size for the whole batch, `per_sample` = `options={"per_sample":
True}`; `compiled` = `options={"compile": True}`. In the joint rows the event is the first zero of row 0's
first component (one time for the batch); in the per-sample rows every row stops at the first zero of its
own first component (event times of shape `(batch,)`, each differentiated by the implicit function
theorem), and the reference locates each row's event on the analytic solution.

"""


if __name__ == "__main__":
    sys.path.insert(0, "src")
    main(sys.argv[1:])
