"""``method="scipy_solver"``: ``scipy.integrate.solve_ivp`` behind ``odeint``'s interface.

Options: ``solver`` (any ``solve_ivp`` method: ``"RK45"``, ``"RK23"``, ``"DOP853"``, ``"Radau"``,
``"BDF"``, ``"LSODA"``, or an ``OdeSolver`` subclass; default ``"LSODA"`` as torchdiffeq), ``min_step``
(LSODA only), ``max_step``, ``first_step``; ``norm`` and ``dtype`` are accepted and ignored (SciPy uses
its own norm and float64); ``throw``: ``False`` returns what was reached instead of raising (below).

The solve steps the SciPy solver object as ``solve_ivp`` does (outputs from each step's dense output)
and stops at the first step whose state is not finite (SciPy's steppers would carry NaN/inf on). A
failure raises: ``RuntimeError`` with SciPy's message when the SciPy solver fails (or raises inside,
e.g. on a NaN Jacobian), :class:`~neuralode.SolverError` (``"nonfinite"``) for a non-finite state. With
``options["throw"] = False`` the outputs up to the time reached (the end of the last finite step) are
returned, the rest are NaN, and ``SolveStats.status`` says ``"nonfinite"`` for a non-finite state or
value of ``func``, ``"underflow"`` for a failure of the SciPy solver (its step-size failure, "Required
step size is less than spacing between numbers", is the common one), with ``SolveStats.t_reached``.

As in torchdiffeq, the solve runs in NumPy on the host: backpropagating through the result raises
``NotImplementedError`` (use ``odeint_adjoint`` for gradients), ``func`` is called
under ``torch.no_grad()`` with the state copied to and from the host, and events and callbacks are not
supported. SciPy is an optional dependency (``pip install neuralode[scipy]``).
"""

from __future__ import annotations

import math

import torch

from neuralode._errors import SolverError
from neuralode._solvers.tableau import MethodSpec

OPTIONS = frozenset({"solver", "min_step", "max_step", "first_step", "norm", "dtype", "throw"})
SOLVERS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")


def _import_scipy():
    try:
        import scipy.integrate
    except ImportError as err:  # pragma: no cover - scipy is installed in the dev environment
        raise ImportError(
            "method='scipy_solver' needs SciPy, which is not installed; install it with "
            "`pip install scipy` (or `pip install neuralode[scipy]`), or pick another method"
        ) from err
    return scipy.integrate


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
    integrate = _import_scipy()
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
    cls = getattr(integrate, solver) if isinstance(solver, str) else solver
    y_start = y0.detach().cpu().double().numpy().reshape(-1)
    ode = cls(rhs, t[0], y_start, t[-1], rtol=tol(problem.rtol), atol=tol(problem.atol), **kwargs)
    direction = 1.0 if t[-1] > t[0] else -1.0
    ys, i, n_steps, error, failed = [y_start], 1, 0, None, None
    t_reached = t[-1]
    while i < len(t):
        try:
            message = ode.step()
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as err:  # e.g. a NaN Jacobian
            message = f"{type(err).__name__}: {err}"
            ode.status = "failed"
        if ode.status == "failed":
            failed = f"scipy_solver ({solver}) failed: {message}"
            t_reached = float(ode.t)
            finite = "nan" not in message.lower() and "inf" not in message.lower()
            error = SolverError(
                "underflow" if finite else "nonfinite",
                failed,
                t=float(ode.t),
                step_size=float("nan"),
                n_steps=n_steps,
            )
            break
        n_steps += 1
        if not np.isfinite(ode.y).all():  # SciPy's steppers carry NaN/inf on without complaint
            t_reached = float(ode.t_old)
            error = SolverError(
                "nonfinite",
                f"func returned NaN/inf: the scipy_solver ({solver}) state is not finite after t={ode.t_old:.6g}",
                t=float(ode.t),
                step_size=float(ode.t - ode.t_old),
                n_steps=n_steps,
            )
            break
        j = i
        while j < len(t) and direction * (t[j] - ode.t) <= 0:
            j += 1
        if j > i:
            inside = ode.dense_output()
            ys.extend(ode.y if t[k] == ode.t else inside(t[k]) for k in range(i, j))
        i = j
    stats.nfe += int(ode.nfev)
    stats.n_steps += n_steps
    stats.n_accepted += n_steps
    stats.n_jac += int(getattr(ode, "njev", 0))
    stats.n_lu += int(getattr(ode, "nlu", 0))
    if error is not None and problem.settings.throw:
        if failed is not None:
            raise RuntimeError(failed)
        raise error
    stats.status = "success" if error is None else error.reason
    stats.t_reached = t_reached
    out = torch.as_tensor(np.stack(ys), dtype=dtype).to(device)
    if torch.is_grad_enabled() and y0.requires_grad:
        # The host solve cuts the graph: a gradient asked of it must say so instead of silently being 0.
        out = _NotDifferentiable.apply(out, y0)
    result = [out[k].reshape(shape) for k in range(out.shape[0])]
    if len(result) < len(t):
        nan = torch.full_like(y0, math.nan)
        result.extend([nan] * (len(t) - len(result)))
    return result


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
