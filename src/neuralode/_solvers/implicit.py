"""Implicit Runge-Kutta methods on a fixed grid: tableaus as data, matrix-free nonlinear stage solves.

Methods (torchdiffeq's names): ``implicit_euler`` (order 1), ``implicit_midpoint`` (2), ``trapezoid``
(2, Crank-Nicolson), ``gl4``/``gl6`` (Gauss-Legendre, 4 and 6, symplectic), ``radauIIA3``/``radauIIA5``
(3 and 5, L-stable, stiffly accurate), ``sdirk2`` (2, L-stable SDIRK), ``trbdf2`` (2, TR-BDF2 as a
three-stage ESDIRK). Use them for stiff problems on a fixed grid, or when a symplectic integrator is
wanted (Gauss-Legendre); for non-stiff problems the explicit adaptive methods are faster.

A step solves the stage equations ``K_i = f(t + c_i h, y + h Σ_j a_ij K_j)`` for all stages at once.
``options['nonlinear_solver']``: ``"newton"`` (default) is a Jacobian-free Newton-Krylov iteration: each
Newton correction is found by GMRES, whose matrix-vector products are finite-difference directional
derivatives of ``f`` (one evaluation per implicit stage); no Jacobian, dense or otherwise, is ever formed,
so the cost stays linear in the batch. ``"fixed_point"`` iterates ``K ← G(K)`` (cheaper per iteration,
converges only when ``h · ‖∂f/∂y‖`` is small, i.e. not for stiff problems). ``max_iters`` (default 100,
as torchdiffeq) caps the iterations; ``nonlinear_tol`` sets the stopping threshold on the RMS residual
relative to ``1 + RMS(K)`` (default ``10 · eps^(3/4)`` of the state's dtype). If the iteration does not
converge, torchdiffeq's warning is raised and the last iterate is used.

Gradients (``odeint``'s direct mode) do not flow through the iterations: the converged stages are
differentiated by the implicit function theorem (one adjoint linear solve, again by GMRES with
vector-Jacobian products), which is exact for the discrete method and needs no stored iterations.
The iterations synchronise with the host (convergence tests, GMRES coefficients); implicit methods are
not sync-free.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable

import torch

from neuralode._callbacks import FIXED_CALLBACKS
from neuralode._errors import SolverError
from neuralode._solvers.tableau import MethodSpec, _check_order

__all__ = ["IMPLICIT_TABLEAUS", "ImplicitTableau"]


@dataclasses.dataclass(frozen=True)
class ImplicitTableau:
    """An implicit Runge-Kutta method: full ``a`` (``s × s``), nodes ``c``, weights ``b``.

    ``stiffly_accurate`` (derived): ``b`` equals the last row of ``a`` and ``c[-1] = 1``, so ``y1`` is the
    last stage's state and its stage value is ``f(t1, y1)``, free for the next step.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    reference: str = ""

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(r) != s for r in self.a) or len(self.b) != s:
            raise ValueError(f"{self.name}: a must be {s}×{s} and b have {s} entries")

    @property
    def stages(self) -> int:
        return len(self.c)

    @functools.cached_property
    def explicit_stages(self) -> tuple[bool, ...]:
        """Stages whose row of ``a`` is zero: ``K_i = f(t + c_i h, y)``, no solve."""
        return tuple(all(v == 0.0 for v in row) for row in self.a)

    @functools.cached_property
    def stiffly_accurate(self) -> bool:
        return self.c[-1] == 1.0 and all(abs(p - q) < 1e-15 for p, q in zip(self.a[-1], self.b))

    def check(self, tol: float = 1e-10) -> None:
        """Raise ``ValueError`` unless rows sum to ``c`` and the order conditions hold up to ``order``."""
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > tol:
                raise ValueError(f"{self.name}: row {i} of a sums to {sum(row)}, c[{i}] = {self.c[i]}")
        _check_order(self.name, "b", self.c, self.a, self.b, self.order, tol)


_S2, _S3, _S6, _S15 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0), math.sqrt(15.0)
_G_SDIRK = (2.0 - _S2) / 2.0  # γ = 1 − 1/√2: L-stable two-stage SDIRK
_G_TRBDF = 1.0 - _S2 / 2.0  # TR-BDF2: trapezoid to 2γ, then BDF2
_W_TRBDF = _S2 / 4.0

IMPLICIT_TABLEAUS: dict[str, ImplicitTableau] = {
    t.name: t
    for t in (
        ImplicitTableau("implicit_euler", (1.0,), ((1.0,),), (1.0,), 1, "backward Euler"),
        ImplicitTableau(
            "implicit_midpoint", (0.5,), ((0.5,),), (1.0,), 2, "implicit midpoint rule (Gauss, s=1)"
        ),
        ImplicitTableau(
            "trapezoid",
            (0.0, 1.0),
            ((0.0, 0.0), (0.5, 0.5)),
            (0.5, 0.5),
            2,
            "trapezoidal rule (Lobatto IIIA)",
        ),
        ImplicitTableau(
            "gl4",
            (0.5 - _S3 / 6, 0.5 + _S3 / 6),
            ((0.25, 0.25 - _S3 / 6), (0.25 + _S3 / 6, 0.25)),
            (0.5, 0.5),
            4,
            "Gauss-Legendre, 2 stages (Hairer & Wanner II, Table IV.5.1)",
        ),
        ImplicitTableau(
            "gl6",
            (0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10),
            (
                (5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
                (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
                (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36),
            ),
            (5 / 18, 4 / 9, 5 / 18),
            6,
            "Gauss-Legendre, 3 stages (Hairer & Wanner II, Table IV.5.2)",
        ),
        ImplicitTableau(
            "radauIIA3",
            (1 / 3, 1.0),
            ((5 / 12, -1 / 12), (3 / 4, 1 / 4)),
            (3 / 4, 1 / 4),
            3,
            "Radau IIA, 2 stages (Hairer & Wanner II, Table IV.5.5)",
        ),
        ImplicitTableau(
            "radauIIA5",
            (0.4 - _S6 / 10, 0.4 + _S6 / 10, 1.0),
            (
                (11 / 45 - 7 * _S6 / 360, 37 / 225 - 169 * _S6 / 1800, -2 / 225 + _S6 / 75),
                (37 / 225 + 169 * _S6 / 1800, 11 / 45 + 7 * _S6 / 360, -2 / 225 - _S6 / 75),
                (4 / 9 - _S6 / 36, 4 / 9 + _S6 / 36, 1 / 9),
            ),
            (4 / 9 - _S6 / 36, 4 / 9 + _S6 / 36, 1 / 9),
            5,
            "Radau IIA, 3 stages (Hairer & Wanner II, Table IV.5.6)",
        ),
        ImplicitTableau(
            "sdirk2",
            (_G_SDIRK, 1.0),
            ((_G_SDIRK, 0.0), (1 - _G_SDIRK, _G_SDIRK)),
            (1 - _G_SDIRK, _G_SDIRK),
            2,
            "two-stage L-stable SDIRK, γ = 1 − 1/√2 (Alexander 1977)",
        ),
        ImplicitTableau(
            "trbdf2",
            (0.0, 2 * _G_TRBDF, 1.0),
            ((0.0, 0.0, 0.0), (_G_TRBDF, _G_TRBDF, 0.0), (_W_TRBDF, _W_TRBDF, _G_TRBDF)),
            (_W_TRBDF, _W_TRBDF, _G_TRBDF),
            2,
            "TR-BDF2 (Bank et al. 1985; Hosea & Shampine 1996) as an ESDIRK",
        ),
    )
}

OPTIONS = frozenset(
    {
        "step_size",
        "grid_constructor",
        "interp",
        "perturb",
        "max_num_steps",
        "throw",
        "dtype",
        "max_iters",
        "nonlinear_solver",
        "nonlinear_tol",
    }
)


# -- linear algebra ------------------------------------------------------------------------------------


def gmres(
    op: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *, rtol: float, max_iter: int = 30
) -> torch.Tensor:
    """Solve ``op(x) = rhs`` by GMRES (no restart) from ``x = 0``; ``op`` is matrix-free.

    Stops when the residual norm is below ``rtol · ‖rhs‖`` or after ``max_iter`` Krylov vectors. The small
    Hessenberg least-squares problem lives on the host (one synchronisation per iteration).
    """
    beta = float(torch.linalg.vector_norm(rhs))
    if beta == 0.0 or not math.isfinite(beta):
        return torch.zeros_like(rhs)
    basis = [rhs / beta]
    hess = torch.zeros(max_iter + 1, max_iter, dtype=torch.float64)
    coeffs = torch.zeros(0, dtype=torch.float64)
    for j in range(max_iter):
        w = op(basis[j])
        dots = []
        for v in basis:  # modified Gram-Schmidt
            d = torch.sum(w * v)
            w = w - d * v
            dots.append(d)
        hj = torch.stack([*dots, torch.linalg.vector_norm(w)]).to(torch.float64).cpu()
        hess[: j + 2, j] = hj
        e1 = torch.zeros(j + 2, dtype=torch.float64)
        e1[0] = beta
        coeffs = torch.linalg.lstsq(hess[: j + 2, : j + 1], e1[:, None]).solution[:, 0]
        res = float(torch.linalg.vector_norm(hess[: j + 2, : j + 1] @ coeffs - e1))
        if res <= rtol * beta or float(hj[-1]) <= 1e-14 * beta:
            break
        basis.append(w / hj[-1].item())
    x = torch.zeros_like(rhs)
    for cj, v in zip(coeffs.tolist(), basis):
        x = x + cj * v
    return x


def _rms(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x)) / math.sqrt(max(x.numel(), 1))


class _ImplicitGrad(torch.autograd.Function):
    """Value: the converged stages ``K*``. Gradient: by the implicit function theorem for ``K = G(K)``:
    the incoming gradient ``g`` becomes ``λ = (I − ∂G/∂K)^{-T} g``, passed on to ``G``'s live evaluation
    (which carries the dependence on ``y``, ``t``, ``h`` and the parameters of ``f``)."""

    @staticmethod
    def forward(ctx, g_live, k_star, make_vjp, lin_tol):
        ctx.make_vjp, ctx.lin_tol = make_vjp, lin_tol
        return k_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives through the solve: not supported
    def backward(ctx, grad):
        with torch.enable_grad():
            vjp = ctx.make_vjp()
            lam = gmres(lambda v: v - vjp(v), grad, rtol=ctx.lin_tol)
        return lam, None, None, None


class _ImplicitStepper:
    """The fixed-grid stepper of one implicit tableau (see ``integrate_fixed``); holds no solve state."""

    def __init__(self, tab: ImplicitTableau, opts: tuple, dtype: torch.dtype, device: torch.device):
        self.tab = tab
        self.max_iters, self.newton, tol = opts
        eps = torch.finfo(dtype).eps
        self.tol = 10 * eps**0.75 if tol is None else tol
        self.fd_eps = math.sqrt(eps)
        self.implicit = [i for i, e in enumerate(tab.explicit_stages) if not e]

    def _g(self, f, t, h, y, k, fixed, stats):
        """``G(K)``: the stage derivatives at the stage states built from ``K`` (explicit stages fixed)."""
        s = self.tab.stages
        ys = [_combine(y, k, row, h) for row in self.tab.a]
        out = []
        for i in range(s):
            if fixed[i] is not None:
                out.append(fixed[i])
            else:
                out.append(f(t + self.tab.c[i] * h, ys[i]))
                stats.nfe += 1
        return torch.stack(out)

    def __call__(self, f, t, h, y, f0, stats):
        tab = self.tab
        s = tab.stages
        fixed = []
        for i, explicit in enumerate(tab.explicit_stages):
            if not explicit:
                fixed.append(None)
            elif tab.c[i] == 0.0:
                fixed.append(f0)
            else:
                fixed.append(f(t + tab.c[i] * h, y))
                stats.nfe += 1
        with torch.no_grad():
            fixed_d = [None if x is None else x.detach() for x in fixed]
            yd = y.detach()
            k = torch.stack([f0.detach()] * s)
            converged = False
            for _ in range(self.max_iters):
                gk = self._g(f, t, h, yd, k, fixed_d, stats)
                r = k - gk
                r_rms = _rms(r)
                # NaN: func returned NaN (or the iteration diverged to inf - inf); no iteration recovers.
                # A large but finite divergence only overflows the norm (inf) and ends in the warning.
                if math.isnan(r_rms):
                    raise SolverError(
                        "nonfinite",
                        "func returned NaN in an implicit stage (or the stage iteration diverged)",
                        t=t,
                        step_size=h,
                        n_steps=stats.n_steps,
                    )
                if r_rms <= self.tol * (1.0 + _rms(k)):
                    converged = True
                    break
                if not self.newton:
                    k = gk
                    continue

                def jvp(v, k=k, gk=gk):
                    # Directional derivative of G by a forward difference (Jacobian-free Newton-Krylov).
                    nv = float(torch.linalg.vector_norm(v))
                    if nv == 0.0:
                        return torch.zeros_like(v)
                    e = self.fd_eps * (1.0 + float(torch.linalg.vector_norm(k))) / nv
                    return (self._g(f, t, h, yd, k + e * v, fixed_d, stats) - gk) / e

                k = k + gmres(lambda v: v - jvp(v), -r, rtol=1e-3)
            if not converged:
                warnings.warn(
                    "Functional iteration did not converge. Solution may be incorrect.", stacklevel=2
                )
        if torch.is_grad_enabled():
            g_live = self._g(f, t, h, y, k, fixed, stats)

            def make_vjp(k=k):
                kd = k.detach().requires_grad_(True)
                gk = self._g(f, t, h, yd, kd, fixed_d, stats)

                def vjp(v):
                    return torch.autograd.grad(gk, kd, v, retain_graph=True)[0]

                return vjp

            k = _ImplicitGrad.apply(g_live, k, make_vjp, self.tol)
        y1 = _combine(y, k, self.tab.b, h)
        f1 = k[-1] if tab.stiffly_accurate else None
        return y1, f1


def _combine(y: torch.Tensor, k: torch.Tensor, row, h: float) -> torch.Tensor:
    """``y + h Σ_j row_j K_j`` with host-side coefficients (cheaper than a matmul over the stage axis for
    the two or three stages these methods have)."""
    out = y
    for j, a in enumerate(row):
        if a != 0.0:
            out = out + (a * h) * k[j]
    return out


def _make_stepper(name: str):
    def make(problem) -> _ImplicitStepper:
        opts = problem.settings.method_options
        return _ImplicitStepper(IMPLICIT_TABLEAUS[name], opts, problem.y0.dtype, problem.y0.device)

    return make


def _parse(options: dict) -> tuple[int, bool, float | None]:
    """``(max_iters, newton?, nonlinear_tol or None for the dtype's default)`` of the options."""
    max_iters = options.get("max_iters", 100)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters <= 0:
        raise ValueError(f"options['max_iters'] must be a positive int, got {max_iters!r}")
    solver = options.get("nonlinear_solver", "newton")
    if solver not in ("newton", "fixed_point"):
        raise ValueError(f"options['nonlinear_solver']={solver!r}; expected 'newton' or 'fixed_point'")
    tol = options.get("nonlinear_tol")
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"options['nonlinear_tol'] must be a positive float, got {tol!r}")
        if not tol > 0:
            raise ValueError(f"options['nonlinear_tol'] must be positive, got {tol}")
        tol = float(tol)
    return max_iters, solver == "newton", tol


SPECS = [
    MethodSpec(
        name=n,
        options=OPTIONS,
        callbacks=FIXED_CALLBACKS,
        order=t.order,
        make_stepper=_make_stepper(n),
        parse=_parse,
    )
    for n, t in IMPLICIT_TABLEAUS.items()
]
