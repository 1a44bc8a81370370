"""``method="scipy_solver"``: ``scipy.integrate.solve_ivp`` behind ``odeint``'s interface.

Options: ``solver`` (any ``solve_ivp`` method: ``"RK45"``, ``"RK23"``, ``"DOP853"``, ``"Radau"``,
``"BDF"``, ``"LSODA"``; default ``"LSODA"`` as torchdiffeq), ``min_step`` (LSODA only), ``max_step``,
``first_step``; ``norm`` and ``dtype`` are accepted and ignored (SciPy uses its own norm and float64).

As in torchdiffeq, the solve runs in NumPy on the host: backpropagating through the result raises
``NotImplementedError`` (use ``odeint_adjoint`` for gradients), ``func`` is called
under ``torch.no_grad()`` with the state copied to and from the host, and events and callbacks are not
supported. SciPy is an optional dependency (``pip install neuralode[scipy]``).
"""

from __future__ import annotations

import torch

from neuralode._errors import SolverError
from neuralode._solvers.tableau import MethodSpec

OPTIONS = frozenset({"solver", "min_step", "max_step", "first_step", "norm", "dtype"})
SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


def _import_scipy():
    try:
        from scipy.integrate import solve_ivp
    except ImportError as err:  # pragma: no cover - scipy is installed in the dev environment
        raise ImportError(
            "method='scipy_solver' needs SciPy, which is not installed; install it with "
            "`pip install scipy` (or `pip install neuralode[scipy]`), or pick another method"
        ) from err
    return solve_ivp


def _parse(options: dict) -> tuple:
    """``(solver, solve_ivp step keyword arguments)`` of the options (already checked as numbers)."""
    solver = options.get("solver", "LSODA")
    if not (isinstance(solver, str) and solver in SOLVERS) and not isinstance(solver, type):
        raise ValueError(f"options['solver']={solver!r}; expected one of {', '.join(SOLVERS)}")
    kwargs = {k: float(options[k]) for k in ("max_step", "first_step") if k in options}
    if "min_step" in options or solver == "LSODA":
        kwargs["min_step"] = float(options.get("min_step", 0.0))
    return solver, kwargs


def _run(problem, stats, y0):
    solve_ivp = _import_scipy()
    import numpy as np

    solver, kwargs = problem.settings.method_options
    shape, dtype, device = y0.shape, y0.dtype, y0.device

    def rhs(t, y):
        with torch.no_grad():
            yy = torch.as_tensor(y, dtype=dtype).to(device).reshape(shape)
            return problem.f(float(t), yy).detach().cpu().double().numpy().reshape(-1)

    def tol(x):
        return x.detach().cpu().double().numpy().reshape(-1) if isinstance(x, torch.Tensor) else x

    t = problem.t
    sol = solve_ivp(
        rhs,
        t_span=(t[0], t[-1]),
        y0=y0.detach().cpu().double().numpy().reshape(-1),
        t_eval=np.asarray(t),
        method=solver,
        rtol=tol(problem.rtol),
        atol=tol(problem.atol),
        **kwargs,
    )
    stats.nfe += int(sol.nfev)
    if not sol.success:
        raise RuntimeError(f"scipy_solver ({solver}) failed: {sol.message}")
    finite = np.isfinite(sol.y).all(axis=0)
    if not finite.all():  # SciPy's steppers carry NaN/inf on without complaint
        i = int(np.argmin(finite))
        raise SolverError(
            "nonfinite",
            f"func returned NaN/inf: the scipy_solver ({solver}) solution is not finite from output {i} on",
            t=float(t[i]),
            step_size=float("nan"),
            n_steps=stats.n_steps,
        )
    ys = torch.as_tensor(sol.y.T, dtype=dtype).to(device)
    if torch.is_grad_enabled() and y0.requires_grad:
        # The host solve cuts the graph: a gradient asked of it must say so instead of silently being 0.
        ys = _NotDifferentiable.apply(ys, y0)
    return [ys[i].reshape(shape) for i in range(ys.shape[0])]


class _NotDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        return ys.clone()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError(
            "method='scipy_solver' solves on the host in NumPy and cannot be backpropagated through; "
            "use odeint_adjoint(..., method='scipy_solver') for gradients, or an adaptive method such "
            "as 'dopri5' with odeint"
        )


SPECS = [
    MethodSpec(
        name="scipy_solver",
        options=OPTIONS,
        callbacks=frozenset(),
        order=0,
        run=_run,
        events=False,
        parse=_parse,
    )
]
