"""Compiled fixed-grid solves: a ``torch.compile``'d Runge-Kutta step, or one CUDA graph per solve.

A fixed-grid solve does the same work every call: the same number of steps, the same kernels, only the
numbers change. That is what compilers and CUDA graphs are for:

* ``mode="compile"``: the whole RK step (every stage's ``func`` call and linear combination) is one
  ``torch.compile`` graph; Inductor fuses the combinations into the network's kernels. The Python loop
  over steps stays (one compiled call per step). Works with autograd (training).
* ``mode="cuda_graph"`` (CUDA only, inference): the whole solve, every step, is captured once into a
  CUDA graph and replayed: one launch per solve, no Python in the loop. The outputs carry no gradient.
  Combine with ``compile=True`` to capture the compiled step.
* ``mode="eager"``: the library's ordinary loop (``odeint``), for comparison.

The first call of a compiled solver pays the compilation (``compile_time_s``; tens of seconds for
Inductor on a small CPU) and each new input shape/dtype/device pays it again; later calls reuse it.
Results equal ``odeint(func, y0, t, method=method, options={"step_size": step_size})`` to rounding.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable

import torch

from neuralode._errors import SolverError
from neuralode._integrate.joint import last_finite_grid_time, nonfinite_outputs, outputs_reached
from neuralode._interpolation import step_outputs
from neuralode._odeint import odeint
from neuralode._problem import check_func, check_step_options, check_t, fixed_grid
from neuralode._solvers.explicit import FIXED_METHODS, TABLEAUS
from neuralode._solvers.rk import ROWS, coefficients, rk_step
from neuralode._solvers.tableau import ButcherTableau
from neuralode._stats import SolveStats, _report_forward

__all__ = ["FixedGridSolver"]

MODES = ("eager", "compile", "cuda_graph")


def _rk_step_fn(func: Callable, tab: ButcherTableau) -> Callable:
    """A pure ``step(t, h, y) -> y1`` on tensors (``t``, ``h`` 0-d, in y's dtype), traceable by dynamo."""
    co = coefficients(tab)

    def step(t: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return rk_step(func, co, t, (h, h), y, None, ROWS)[0]

    return step


class FixedGridSolver:
    """A fixed-grid explicit Runge-Kutta solve of ``dy/dt = func(t, y)``, prepared once, run many times.

    Args:
        func: ``func(t, y)`` as for :func:`neuralode.odeint` (``t`` a 0-d tensor in ``y``'s dtype).
            For ``compile`` it must be traceable by ``torch.compile`` (no data-dependent Python control
            flow); it is traced with its parameters, so changing them in place (training) is fine.
        t: 1-D tensor of output times (increasing or decreasing); ``t[0]`` is the start.
        method: a fixed-step method (``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``).
        step_size: grid spacing; ``None`` steps on ``t`` itself. Outputs between grid points are linear
            interpolations, as ``odeint``'s default ``interp="linear"``.
        mode: ``"compile"`` (default), ``"cuda_graph"`` or ``"eager"`` (see the module docstring).
        compile: with ``mode="cuda_graph"``, capture the compiled step instead of the eager one.
        compile_options: keyword arguments for ``torch.compile`` (default ``fullgraph=True,
            dynamic=False``; e.g. ``backend="aot_eager"`` to skip code generation).
        throw: as ``odeint``'s ``options["throw"]``: ``True`` (default) raises ``SolverError`` when the
            solution is not finite; ``False`` returns it up to the last finite grid state, NaN after
            (constants, without gradient), with ``status``/``t_reached`` in the solve's ``SolveStats``.

    Attributes:
        compile_time_s: wall seconds of the first call (tracing, compilation, or graph capture, plus one
            solve), ``None`` before it; ``n_steps``: grid intervals per solve.

    Example::

        solver = FixedGridSolver(model, torch.linspace(0, 1, 2), method="rk4", step_size=0.05)
        y1 = solver(y0)[-1]        # first call compiles; later calls are fast
    """

    def __init__(
        self,
        func: Callable,
        t: torch.Tensor,
        *,
        method: str = "rk4",
        step_size: float | None = None,
        mode: str = "compile",
        compile: bool = False,
        compile_options: dict | None = None,
        throw: bool = True,
    ):
        check_func(func)
        if method not in FIXED_METHODS:
            raise ValueError(
                f"method={method!r} is not a fixed-step method; valid: {', '.join(FIXED_METHODS)}"
            )
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a mode; expected one of {', '.join(MODES)}")
        self.t_list = check_t(t, min_len=2)
        options = {"throw": throw} if step_size is None else {"step_size": step_size, "throw": throw}
        check_step_options(options, what="FixedGridSolver")
        step_size = options.get("step_size")
        self.func, self.method, self.mode, self.step_size = func, method, mode, step_size
        self.throw = throw
        self.tab = TABLEAUS[method]
        self.t = t.detach()
        self.grid = fixed_grid(self.t_list, step_size)
        self.n_steps = len(self.grid) - 1
        self._plan = _output_plan(self.t_list, self.grid)
        step = _rk_step_fn(func, self.tab)
        opts = {"fullgraph": True, "dynamic": False, **(compile_options or {})}
        use_compile = mode == "compile" or (mode == "cuda_graph" and compile)
        self._step = torch.compile(step, **opts) if use_compile else step
        self._times: dict = {}
        self._graphs: dict = {}
        self.compile_time_s: float | None = None

    # -- public -----------------------------------------------------------------------------------------
    def __call__(self, y0: torch.Tensor, *, stats: SolveStats | None = None) -> torch.Tensor:
        """Solve from ``y0``; returns ``(len(t), *y0.shape)``. ``stats``: a :class:`SolveStats` to add
        this solve's counters (and its ``status``/``t_reached``) to, as ``odeint``'s."""
        if not isinstance(y0, torch.Tensor) or not y0.is_floating_point():
            raise TypeError(f"y0 must be a floating-point tensor, got {type(y0).__name__}")
        first = self.compile_time_s is None
        start = time.perf_counter()
        if self.mode == "eager":
            opts = {"throw": self.throw}
            if self.step_size is not None:
                opts["step_size"] = self.step_size
            out = odeint(self.func, y0, self.t.to(y0.device), method=self.method, options=opts, stats=stats)
        else:
            if self.mode == "cuda_graph":
                out, sums = self._graph_solve(y0)
            else:
                with warnings.catch_warnings():
                    # Dynamo peeks at .grad of non-leaf inputs while tracing (the state of a training solve).
                    warnings.filterwarnings(
                        "ignore", message="The .grad attribute of a Tensor that is not a leaf"
                    )
                    outs, sums = self._solve(y0, not self.throw)
                out = torch.stack(outs)
            solve_stats = SolveStats(n_solves=1, nfe=self.tab.stages * self.n_steps, n_steps=self.n_steps)
            solve_stats.n_accepted = self.n_steps
            solve_stats.status, solve_stats.t_reached = "success", self.t_list[-1]
            if not bool(torch.isfinite(out[-1]).all()):  # one sync per solve
                error = nonfinite_outputs(self.t_list, out, self.n_steps)
                if self.throw:
                    raise error
                out = self._cut(outs if self.mode == "compile" else out, sums, solve_stats, error)
            if stats is not None:
                stats.add(solve_stats)
            _report_forward(solve_stats)
        if first:
            if y0.is_cuda:
                torch.cuda.synchronize(y0.device)
            self.compile_time_s = time.perf_counter() - start
        return out

    # -- internals --------------------------------------------------------------------------------------
    def _time_tensors(self, like: torch.Tensor) -> tuple[tuple, tuple]:
        key = (like.dtype, like.device)
        if key not in self._times:
            ts = torch.tensor(self.grid[:-1], dtype=torch.float64).to(dtype=like.dtype, device=like.device)
            hs = torch.tensor([b - a for a, b in itertools.pairwise(self.grid)], dtype=torch.float64)
            hs = hs.to(dtype=like.dtype, device=like.device)
            self._times[key] = (ts.unbind(), hs.unbind())
        return self._times[key]

    def _solve(self, y0: torch.Tensor, track: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(outputs, sums)``; ``track``: ``sums`` holds each step's new state summed (finite while the
        state is: what ``throw=False`` needs to find the last finite grid state; one small reduction per
        step, no sync), else it is ``None``."""
        ts, hs = self._time_tensors(y0)
        outs = [y0]
        sums = [] if track else None
        y = y0
        for i in range(self.n_steps):
            y1 = self._step(ts[i], hs[i], y)
            if sums is not None:
                sums.append(y1.detach().sum())
            for theta in self._plan[i]:
                outs.append(y1 if theta == 1.0 else torch.lerp(y, y1, theta))
            y = y1
        return outs, (torch.stack(sums) if sums else None)

    def _cut(self, out, sums, stats: SolveStats, error: SolverError) -> torch.Tensor:
        """``throw=False`` after a non-finite solve: the outputs up to the last finite grid state, NaN
        after; ``stats`` records where it stopped. ``out``: ``_solve``'s list of outputs (restacked
        here, so that no gradient flows back through the non-finite steps), or a stacked tensor."""
        t_reached = last_finite_grid_time(self.grid, sums)
        n = outputs_reached(self.t_list, t_reached)
        stats.status, stats.t_reached = error.reason, t_reached
        rows = list(out)
        nan = torch.full_like(rows[0].detach(), float("nan"))
        return torch.stack(rows[:n] + [nan] * (len(rows) - n))

    def _graph_solve(self, y0: torch.Tensor) -> torch.Tensor:
        if not y0.is_cuda:
            raise ValueError(f"mode='cuda_graph' needs a CUDA y0, got a tensor on {y0.device}")
        key = (y0.shape, y0.dtype, y0.device)
        if key not in self._graphs:
            with torch.no_grad():
                static_y0 = y0.detach().clone()
                self._time_tensors(static_y0)
                side = torch.cuda.Stream(device=y0.device)
                side.wait_stream(torch.cuda.current_stream(y0.device))
                with torch.cuda.stream(side):  # warm-up outside the capture (allocations, lazy init)
                    for _ in range(3):
                        self._solve(static_y0, not self.throw)
                torch.cuda.current_stream(y0.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs, static_sums = self._solve(static_y0, not self.throw)
                    static_out = torch.stack(outs)
            self._graphs[key] = (graph, static_y0, static_out, static_sums)
        graph, static_y0, static_out, static_sums = self._graphs[key]
        with torch.no_grad():
            static_y0.copy_(y0)
            graph.replay()
            return static_out.clone(), (None if static_sums is None else static_sums.clone())


def _output_plan(t: list[float], grid: list[float]) -> list[list[float]]:
    """For each grid interval, the interpolation weights θ of the outputs in (g0, g1] (1.0 = at g1)."""
    direction = 1.0 if t[-1] > t[0] else -1.0
    plan, i_out = [], 1
    for g0, g1 in itertools.pairwise(grid):
        thetas, i_out, at_end = step_outputs(t, i_out, g0, g1 - g0, g1, direction)
        if at_end:
            thetas.append(1.0)
            i_out += 1
        plan.append(thetas)
    return plan
