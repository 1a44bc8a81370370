"""``NeuralODE``: an ``nn.Module`` that integrates a vector-field module, with a choice of gradient method."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from neuralode._gradients.adjoint import SENSITIVITIES, inherited_options
from neuralode._problem import SOLVERS, method_options
from neuralode._stats import SolveStats, record_stats

__all__ = ["GRADIENT_METHODS", "NeuralODE"]

GRADIENT_METHODS = ("direct", "adjoint", "checkpoint")


class NeuralODE(nn.Module):
    """Integrate ``func`` (an ``nn.Module`` with ``forward(t, y)``) from ``t[0]`` to ``t[-1]``.

    Args:
        func: the vector field; its parameters are trained.
        t: output times, 1-D, strictly monotonic (default ``(0, 1)``). Can be overridden per call.
        method: solver name (see ``neuralode.SOLVERS``); default ``"dopri5"``.
        rtol, atol: forward tolerances.
        adjoint_rtol, adjoint_atol: backward tolerances (adjoint only); default the forward ones.
        options, adjoint_options: solver options dicts, as for ``odeint``/``odeint_adjoint``. Unlike
            ``odeint_adjoint``, the backward error norm defaults to ``"seminorm"`` here (the parameter
            adjoint left out of step-size control, which saves backward steps); pass
            ``adjoint_options={"norm": ...}`` to choose another.
        gradient: ``"direct"`` (backprop through the solver, the paper's RK-Net), ``"adjoint"``
            (the paper's ODE-Net; variant chosen by ``sensitivity``), or ``"checkpoint"`` (exact
            discrete gradient at O(checkpoints) memory).
        sensitivity: with ``gradient="adjoint"``: ``"backsolve"`` (default; O(1) memory),
            ``"interpolating"`` or ``"quadrature"`` (the state read from the forward pass instead of
            solved backwards); see :func:`~neuralode.odeint_adjoint`.
        only_last: return only the state at ``t[-1]`` instead of the whole trajectory.
        checkpoints: with ``gradient="checkpoint"``, how many states the forward pass keeps (default
            about √(2·steps)); with ``gradient="adjoint"`` and an interpolating or quadrature
            sensitivity, likewise (default: the dense output of every step).

    Shapes: ``forward(y0)`` returns ``(len(t), *y0.shape)``, or ``y0.shape`` when ``only_last``.
    After each forward, ``last_stats`` holds the solve's :class:`SolveStats`; its ``.backward`` fills in
    when the backward pass runs.

    ``torch.compile(model, fullgraph=True)`` and ``torch.export.export(model, (y0,))`` work for a
    fixed-grid explicit Runge-Kutta ``method`` (``euler``, ``midpoint``, ``rk4``, ...) with
    ``gradient="direct"``, the times given at construction and ``options`` at most ``step_size``: the
    traced forward runs the same steps and linear interpolation as ``odeint``, with the grid fixed at
    trace time and without input validation, the final finiteness check or ``last_stats``.
    """

    def __init__(
        self,
        func: nn.Module,
        t: torch.Tensor | Sequence[float] = (0.0, 1.0),
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        options: dict[str, Any] | None = None,
        adjoint_options: dict[str, Any] | None = None,
        gradient: str = "direct",
        sensitivity: str = "backsolve",
        only_last: bool = False,
        checkpoints: int | None = None,
    ):
        super().__init__()
        if gradient not in GRADIENT_METHODS:
            raise ValueError(
                f"gradient={gradient!r} is not a gradient method; expected one of {GRADIENT_METHODS}"
            )
        if sensitivity not in SENSITIVITIES:
            raise ValueError(
                f"sensitivity={sensitivity!r} is not an adjoint sensitivity; expected one of {SENSITIVITIES}"
            )
        if sensitivity != "backsolve" and gradient != "adjoint":
            raise ValueError(
                f"sensitivity={sensitivity!r} chooses the adjoint's variant; it needs gradient='adjoint', "
                f"got gradient={gradient!r}"
            )
        if not isinstance(func, nn.Module):
            raise TypeError(f"func must be an nn.Module, got {type(func).__name__}")
        self.func = func
        self.register_buffer("t", torch.as_tensor(t, dtype=torch.float64), persistent=False)
        self._t_values = [float(x) for x in self.t.tolist()]  # the output plan of a traced solve
        self.method, self.rtol, self.atol = method, rtol, atol
        self.adjoint_rtol, self.adjoint_atol = adjoint_rtol, adjoint_atol
        self.options, self.adjoint_options = options, adjoint_options
        self.gradient, self.sensitivity, self.only_last = gradient, sensitivity, only_last
        if checkpoints is not None and (not isinstance(checkpoints, int) or checkpoints < 1):
            raise ValueError(f"checkpoints must be a positive int, got {checkpoints!r}")
        self.checkpoints = checkpoints
        self._grid_values = self._fixed_grid()
        self.last_stats: SolveStats = SolveStats(backward=SolveStats())

    def forward(self, y0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        from neuralode import odeint, odeint_adjoint, odeint_checkpoint

        if t is None and torch.compiler.is_compiling() and self._traceable():
            ys = self._traced_fixed_grid(y0)
            return ys[-1] if self.only_last else ys
        t = self.t if t is None else t
        common = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=self.options)
        with record_stats() as stats:
            if self.gradient == "adjoint":
                adjoint_options = self.adjoint_options
                if self.method in SOLVERS and method_options(self.method)[1]:  # adaptive: seminorm default
                    if adjoint_options is None:
                        adjoint_options = inherited_options(self.options, self.method)
                    adjoint_options = {"norm": "seminorm", **adjoint_options}
                ys = odeint_adjoint(
                    self.func, y0, t, **common, adjoint_rtol=self.adjoint_rtol, adjoint_atol=self.adjoint_atol,
                    adjoint_options=adjoint_options, sensitivity=self.sensitivity,
                    checkpoints=self.checkpoints,
                )  # fmt: skip
            elif self.gradient == "checkpoint":
                ys = odeint_checkpoint(self.func, y0, t, **common, checkpoints=self.checkpoints)
            else:
                ys = odeint(self.func, y0, t, **common)
        self.last_stats = stats
        return ys[-1] if self.only_last else ys

    def _fixed_grid(self) -> list[float] | None:
        """The step grid of a traced forward (see the class docstring), or ``None`` when not traceable."""
        from neuralode._problem import check_step_options, fixed_grid
        from neuralode._solvers.explicit import TABLEAUS

        tab = TABLEAUS.get(self.method)
        opts = dict(self.options or {})
        if tab is None or tab.adaptive or set(opts) - {"step_size"} or len(self._t_values) < 2:
            return None
        check_step_options(opts)
        # Fill the tableau's cached properties now: dynamo cannot trace their first (locked) computation.
        tab.fsal, tab.a_nonzero, tab.b_nonzero  # noqa: B018
        return fixed_grid(self._t_values, opts.get("step_size"))

    def _traceable(self) -> bool:
        return self._grid_values is not None and self.gradient == "direct"

    def _traced_fixed_grid(self, y0: torch.Tensor) -> torch.Tensor:
        """The fixed-grid solve as a trace: Python numbers decide everything (grid, outputs), so
        ``torch.compile(fullgraph=True)`` and ``torch.export`` see one straight-line graph."""
        from neuralode._interpolation import interpolate, step_outputs
        from neuralode._solvers.explicit import TABLEAUS
        from neuralode._solvers.rk import rk_step

        tab = TABLEAUS[self.method]
        t_out, grid = self._t_values, self._grid_values
        direction = 1.0 if t_out[-1] > t_out[0] else -1.0
        dtype, device = y0.dtype, y0.device

        def f(tt: float, y: torch.Tensor) -> torch.Tensor:
            return self.func(torch.scalar_tensor(tt, dtype=dtype, device=device), y)

        outputs, i_out, y, f0 = [y0], 1, y0, None
        for g0, g1 in itertools.pairwise(grid):
            h = g1 - g0
            y1, k = rk_step(f, tab, g0, h, y, f0)
            thetas, i_out, at_end = step_outputs(t_out, i_out, g0, h, g1, direction)
            if thetas:
                outputs.extend(interpolate("linear", y, y1, None, None, h, thetas))
            if at_end:
                outputs.append(y1)
                i_out += 1
            y, f0 = y1, (k[-1] if tab.fsal else None)
        return torch.stack(outputs)

    def extra_repr(self) -> str:
        extra = f", sensitivity={self.sensitivity!r}" if self.gradient == "adjoint" else ""
        return (
            f"method={self.method!r}, rtol={self.rtol}, atol={self.atol}, gradient={self.gradient!r}{extra}"
        )
