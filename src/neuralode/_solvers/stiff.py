"""Adaptive stiff solvers: Kværnø's ESDIRK methods with Newton iterations and error control.

Methods: ``kvaerno3`` (order 3, embedded 2, 4 stages), ``kvaerno4`` (4(3), 5 stages), ``kvaerno5`` (5(4),
7 stages); A. Kværnø, "Singly diagonally implicit Runge-Kutta methods with an explicit first stage",
BIT 44 (2004). Each is an ESDIRK (explicit first stage, one diagonal coefficient γ for every implicit
stage), L-stable and stiffly accurate: the step's result is its last stage, the embedded solution its
second-to-last (also at ``c = 1``), and the error estimate is their difference. The first stage is the
previous step's last (FSAL). Dense output: cubic Hermite through ``(y0, f0)`` and ``(y1, f1)``.

Each implicit stage solves ``Y = ψ + hγ f(t + c_i h, Y)`` by a simplified Newton iteration with the
matrix ``M = I − hγ J``. ``options['jacobian']`` chooses how ``J`` is formed and ``M`` solved:

- ``"dense"``: the full Jacobian of the (flattened) state by autograd, one LU factorisation
  (``torch.linalg.lu_factor``) shared by every stage of a step. ``"auto"`` (the default) picks it for
  states of at most 256 elements.
- ``"batch"``: ``y0`` of shape ``(batch, ...)`` whose rows are independent problems (row ``b`` of ``f``
  depends only on row ``b`` of ``y``): one ``(d, d)`` Jacobian block per row and a batched LU, so the cost
  stays linear in the batch. The error and the Newton convergence are then measured per row (the worst
  row decides), unless ``options['norm']`` is given. All rows share the step size (joint stepping).
- ``"krylov"``: matrix-free: each Newton correction comes from GMRES whose products ``J v`` are
  finite-difference directional derivatives of ``f``; no Jacobian is stored. ``"auto"`` picks it for
  states of more than 256 elements.

As in Hairer and Wanner's codes, the Jacobian is kept across steps while Newton converges fast (every
stage within two iterations, or contracting below ``1e-3``) and refreshed otherwise; the LU factorisation is kept while the step size
stays within a factor ``[1, 1.2]`` of the one it was built for (the step is then not enlarged). A stage
whose Newton iteration diverges or has not converged after ``options['max_iters']`` (default 7)
iterations rejects the step: ``h`` is halved and a stale Jacobian refreshed. ``options['newton_tol']``
is the Newton stopping threshold relative to the tolerances (default Hairer's
``max(10 eps / rtol, min(0.03, sqrt(rtol)))``).

Gradients (``odeint``'s direct mode) do not flow through the Newton iterations: each converged stage is
differentiated by the implicit function theorem, ``dY = (I − hγ J(Y))⁻¹ (dψ + hγ ∂f/∂θ dθ)``, with the
exact Jacobian at the converged stage (one linear solve per stage in the backward pass: dense or batched
solve, or GMRES with vector-Jacobian products in the Krylov mode). This costs one extra evaluation of
``f`` per stage in the forward pass when gradients are enabled. Step sizes carry no gradient.
``odeint_checkpoint`` replays the recorded steps the same way (:class:`EsdirkReplay`); the adjoint's
backward solve applies its jumps at the output times inside one solve (the driver's ``jump`` hook).

The iterations synchronise with the host (one norm per Newton iteration and the error ratio per step);
like the other implicit methods these solvers are not sync-free.

Per-sample mode (``odeint(..., options={"per_sample": True})`` or ``odeint_per_sample``): the rows of
``y0`` (``(batch, d)``) are independent problems, each with its own step size and controller (the
per-sample loop's) and, here, its own Newton iteration, ``(d, d)`` Jacobian block, LU, Jacobian reuse
and refresh, and failure (:class:`EsdirkRows`). ``options['throw'] = False`` (both modes): a failed solve
returns what it reached, NaN after, with the status and the time reached in its ``SolveStats``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch

from neuralode._callbacks import ADAPTIVE_CALLBACKS
from neuralode._errors import SolverError, step_limit_error
from neuralode._integrate.adaptive import KEEP_H, adaptive_loop
from neuralode._solvers.implicit import ImplicitTableau, _combine, gmres
from neuralode._solvers.rk import ROWS
from neuralode._solvers.tableau import MethodSpec, hermite_dense
from neuralode._step_size import (
    STEP_SIZE_OPTIONS,
    first_step,
    make_norm,
    rms_rows,
)

__all__ = ["ESDIRK_TABLEAUS", "EsdirkTableau"]


@dataclasses.dataclass(frozen=True)
class EsdirkTableau:
    """A stiffly accurate ESDIRK method with an embedded stiffly accurate solution.

    Attributes:
        name: the ``method=`` string.
        gamma: the diagonal coefficient of every implicit stage.
        c: nodes (``c[0] = 0``; ``c[-2] = c[-1] = 1``).
        a: full ``s × s`` lower-triangular coefficients: row 0 zero, ``a[i][i] = γ`` for ``i ≥ 1``.
        order: order of the propagated solution ``b = a[-1]``.
        error_order: order of the embedded solution ``b̂ = a[-2]``.
        reference: where the coefficients come from.
    """

    name: str
    gamma: float
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    order: int
    error_order: int
    reference: str = ""

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def b(self) -> tuple[float, ...]:
        return self.a[-1]

    @functools.cached_property
    def method(self) -> ImplicitTableau:
        """The propagated method as an :class:`ImplicitTableau` (its order check is reused)."""
        return ImplicitTableau(self.name, self.c, self.a, self.b, self.order, self.reference)

    @functools.cached_property
    def embedded(self) -> ImplicitTableau:
        """The embedded method (weights ``a[-2]``) as an :class:`ImplicitTableau`."""
        return ImplicitTableau(f"{self.name} (embedded)", self.c, self.a, self.a[-2], self.error_order)

    def check(self, tol: float = 1e-10) -> None:
        """Raise ``ValueError`` unless the structure is ESDIRK, both solutions are stiffly accurate and the
        order conditions hold (rows sum to ``c``; rooted trees up to ``order`` and ``error_order``)."""
        s = self.stages
        if any(v != 0.0 for v in self.a[0]):
            raise ValueError(f"{self.name}: the first stage must be explicit (row 0 of a zero)")
        for i in range(1, s):
            if self.a[i][i] != self.gamma or any(v != 0.0 for v in self.a[i][i + 1 :]):
                raise ValueError(f"{self.name}: row {i} must end with γ={self.gamma} on the diagonal")
        if self.c[-1] != 1.0 or self.c[-2] != 1.0 or self.a[-2][-1] != 0.0:
            raise ValueError(f"{self.name}: the last two stages must sit at c = 1 (stiffly accurate)")
        self.method.check(tol)
        self.embedded.check(tol)

    def stability(self, z: complex) -> complex:
        """The linear stability function ``R(z) = 1 + z bᵀ (I − zA)⁻¹ 𝟙`` (``y' = λy``, ``z = hλ``)."""
        x: list[complex] = []
        for i, row in enumerate(self.a):  # forward substitution, A is lower triangular
            x.append((1.0 + z * sum(row[j] * x[j] for j in range(i))) / (1.0 - z * row[i]))
        return 1.0 + z * sum(bj * xj for bj, xj in zip(self.b, x))

    uses_extra_stages = False  # (read by the per-sample dense output, as for explicit tableaus)

    @functools.cached_property
    def dense(self) -> tuple[tuple[float, ...], ...]:
        """Cubic Hermite weights over ``[K_0, ..., K_{s-1}, f(t1, y1)]``."""
        return hermite_dense(self.b)


def _kvaerno3() -> EsdirkTableau:
    g = 0.43586652150  # root of the L-stability condition
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    a = ((0.0,) * 4, (g, g, 0.0, 0.0), (a31, a32, g, 0.0), (a41, a42, a43, g))
    return EsdirkTableau("kvaerno3", g, (0.0, 2 * g, 1.0, 1.0), a, 3, 2, _REF + ", ESDIRK 3(2)")


def _kvaerno4() -> EsdirkTableau:
    g = 0.5728160625

    def p(*coeffs: float) -> float:  # polynomial in γ, highest power first
        return functools.reduce(lambda acc, x: acc * g + x, coeffs, 0.0)

    a31 = p(144, -180, 81, -15, 1) * g / p(12, -6, 1) ** 2
    a32 = p(-36, 39, -15, 2) * g / p(12, -6, 1) ** 2
    a41 = p(-144, 396, -330, 117, -18, 1) / (12 * g**2 * p(12, -9, 2))
    a42 = p(72, -126, 69, -15, 1) / (12 * g**2 * p(3, -1))
    a43 = p(-6, 6, -1) * p(12, -6, 1) ** 2 / (12 * g**2 * p(12, -9, 2) * p(3, -1))
    a51 = p(288, -312, 120, -18, 1) / (48 * g**2 * p(12, -9, 2))
    a52 = p(24, -12, 1) / (48 * g**2 * p(3, -1))
    a53 = -(p(12, -6, 1) ** 3) / (48 * g**2 * p(3, -1) * p(12, -9, 2) * p(6, -6, 1))
    a54 = p(-24, 36, -12, 1) / p(24, -24, 4)
    a = (
        (0.0,) * 5,
        (g, g, 0.0, 0.0, 0.0),
        (a31, a32, g, 0.0, 0.0),
        (a41, a42, a43, g, 0.0),
        (a51, a52, a53, a54, g),
    )
    c = (0.0, 2 * g, a31 + a32 + g, 1.0, 1.0)
    return EsdirkTableau("kvaerno4", g, c, a, 4, 3, _REF + ", ESDIRK 4(3)")


def _kvaerno5() -> EsdirkTableau:
    g = 0.26
    rows = (
        (0.13, 0.84033320996790809),
        (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
        (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
        (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676),
        (
            0.13659751177640291,
            0.0,
            -0.05496908796538376,
            -0.04118626728321046,
            0.62993304899016403,
            0.06962479448202728,
        ),
    )
    s = 7
    a = [(0.0,) * s, (g, g) + (0.0,) * (s - 2)]
    for r in rows:
        a.append((*r, g) + (0.0,) * (s - len(r) - 1))
    c = (*(sum(r) for r in a[:-2]), 1.0, 1.0)
    return EsdirkTableau("kvaerno5", g, c, tuple(a), 5, 4, _REF + ", ESDIRK 5(4)")


_REF = "Kværnø (2004), BIT 44:489-502"
ESDIRK_TABLEAUS: dict[str, EsdirkTableau] = {t.name: t for t in (_kvaerno3(), _kvaerno4(), _kvaerno5())}

OPTIONS = STEP_SIZE_OPTIONS | {
    "norm",
    "dtype",
    "step_t",
    "jump_t",
    "jacobian",
    "max_iters",
    "newton_tol",
    "throw",
}
ROW_OPTIONS = STEP_SIZE_OPTIONS | {"jacobian", "max_iters", "newton_tol", "throw"}  # per-sample mode
JACOBIANS = ("auto", "dense", "batch", "krylov")
_AUTO_DENSE_MAX = 256  # "auto": dense Jacobian up to this many state elements, Krylov above
_REUSE_THETA = 1e-3  # keep the Jacobian for the next step when Newton contracted at least this fast
_KAPPA = 0.03  # Newton stops when its estimated error is this fraction of the tolerance


# -- Jacobians and linear solves -------------------------------------------------------------------------


def jacobian(f: Callable, t: float, z: torch.Tensor, batch: bool) -> torch.Tensor:
    """``∂f/∂y`` at ``(t, z)`` by reverse-mode autograd: ``(n, n)`` over the flattened state, or with
    ``batch`` the ``(B, d, d)`` diagonal blocks of independent rows (``d`` elements per row)."""
    shape = z.shape
    n = z[0].numel() if batch else z.numel()
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    basis = eye.reshape(n, 1, *shape[1:]).expand(n, *shape) if batch else eye.reshape(n, *shape)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        out = f(t, zz)
        if not out.requires_grad:  # f does not depend on y
            rows = torch.zeros(n, *shape, dtype=z.dtype, device=z.device)
        else:
            try:
                with warnings.catch_warnings():  # vmap's "performance drop" fallbacks are harmless here
                    warnings.simplefilter("ignore")
                    rows = torch.autograd.grad(out, zz, basis, is_grads_batched=True, allow_unused=True)[0]
            except RuntimeError:  # an operation without a batching rule: one backward pass per row
                rows = torch.stack(
                    [torch.autograd.grad(out, zz, v, retain_graph=True, allow_unused=True)[0] for v in basis]
                )
            if rows is None:
                rows = torch.zeros(n, *shape, dtype=z.dtype, device=z.device)
    # rows[k] = e_kᵀ J: row k of J (of every block, with batch)
    if batch:
        return rows.reshape(n, shape[0], n).transpose(0, 1)
    return rows.reshape(n, n)


def lu_factor(jac: torch.Tensor, hg: float):
    """The LU factorisation of ``I − hγ J`` (``jac`` ``(n, n)``, or ``(B, d, d)`` blocks)."""
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    return torch.linalg.lu_factor(eye - hg * jac)


def lu_apply(lu, r: torch.Tensor, batch: bool) -> torch.Tensor:
    """``(I − hγ J)⁻¹ r`` from :func:`lu_factor`'s result, ``r`` shaped like the state (differentiable
    in ``r``)."""
    rr = r.reshape(r.shape[0], -1, 1) if batch else r.reshape(-1, 1)
    return torch.linalg.lu_solve(*lu, rr).reshape(r.shape)


class _StageGrad(torch.autograd.Function):
    """Value: the converged stage ``Y*``. Gradient by the implicit function theorem for
    ``Y = G(Y) = ψ + hγ f(t, Y)``: the incoming ``g`` becomes ``λ = (I − hγ J(Y*))⁻ᵀ g``, passed to the
    live evaluation ``G(Y*)`` (which carries the dependence on ψ and on the parameters of ``f``)."""

    @staticmethod
    def forward(ctx, g_live, z_star, solve_transposed):
        ctx.solve_transposed = solve_transposed
        return z_star.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return ctx.solve_transposed(grad), None, None


# -- the solve ---------------------------------------------------------------------------------------------


def newton_settings(opts: dict, rtol, dtype: torch.dtype) -> tuple[int, float]:
    """``(max_iters, kappa)`` from ``options['max_iters']`` and ``options['newton_tol']`` (checked)."""
    max_iters = opts.get("max_iters", 7)
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise ValueError(f"options['max_iters'] must be a positive int, got {max_iters!r}")
    eps = torch.finfo(dtype).eps
    rtol = rtol if isinstance(rtol, float) else float(rtol.min())
    kappa = opts.get("newton_tol", max(10 * eps / rtol, min(_KAPPA, math.sqrt(rtol))))
    if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or not kappa > 0:
        raise ValueError(f"options['newton_tol'] must be a positive float, got {kappa!r}")
    return max_iters, float(kappa)


class _Newton:
    """Stage solves of one solve: the Jacobian, the LU of ``I − hγ J`` and Hairer's convergence state.

    One instance per solve (it is the solve's working memory, not reused across solves)."""

    def __init__(self, problem, tab: EsdirkTableau, mode: str, y0: torch.Tensor, stats):
        self.f, self.tab, self.mode, self.stats = problem.f, tab, mode, stats
        self.max_iters, self.kappa = newton_settings(problem.options, problem.rtol, y0.dtype)
        self.eps = torch.finfo(y0.dtype).eps
        self.jac = None  # J at the start of the step it was computed for
        self.fresh = False  # J computed at this step's start
        self.lu = None  # (LU, pivots) of I − hγ J for h = self.h_lu
        self.h_lu = None
        self.eta = 1.0  # Hairer's η = θ/(1 − θ) of the last iteration, carried over
        self.theta = 0.0  # worst contraction rate of the current step

    def prepare(self, t: float, y: torch.Tensor, h: float) -> None:
        """Make sure a Jacobian and an LU for step ``h`` exist (dense and batch modes)."""
        if self.mode == "krylov":
            return
        if self.jac is None:
            self.jac = jacobian(self.f, t, y.detach(), self.mode == "batch")
            self.stats.n_jac += 1
            self.fresh = True
            self.lu = None
        if self.lu is None or h != self.h_lu:
            self.lu = lu_factor(self.jac, h * self.tab.gamma)
            self.h_lu = h
            self.stats.n_lu += 1

    def _solve(self, r: torch.Tensor, t: float, z: torch.Tensor, fz: torch.Tensor, hg: float) -> torch.Tensor:
        """``(I − hγ J)⁻¹ r``."""
        if self.mode == "krylov":
            fd = math.sqrt(self.eps)

            def op(v: torch.Tensor) -> torch.Tensor:
                nv = float(torch.linalg.vector_norm(v))
                if nv == 0.0:
                    return v
                e = fd * (1.0 + float(torch.linalg.vector_norm(z))) / nv
                self.stats.nfe += 1
                return v - hg * (self.f(t, z + e * v) - fz) / e

            return gmres(op, r, rtol=1e-3)
        return lu_apply(self.lu, r, self.mode == "batch")

    def stage(self, t: float, psi: torch.Tensor, z0: torch.Tensor, hg: float, scale, norm):
        """Solve ``Z = ψ + hγ f(t, Z)`` from ``z0`` (all detached). Returns ``Z`` or ``None`` (diverged or
        not converged: the caller rejects the step)."""
        z = z0
        prev = None
        theta = 0.0
        self.fail_factor = 0.5
        eta = max(self.eta, self.eps) ** 0.8
        for k in range(self.max_iters):
            fz = self.f(t, z)
            self.stats.nfe += 1
            dz = self._solve(psi + hg * fz - z, t, z, fz, hg)
            z = z + dz
            ndz = float(norm(dz / scale))  # one synchronisation per iteration
            if not math.isfinite(ndz):
                return None
            if prev is not None:
                theta = ndz / prev if prev > 0 else 0.0
                if theta >= 0.99:
                    return None
                eta = theta / (1.0 - theta)
                # Hairer: give up early when the remaining iterations cannot reach the tolerance.
                remaining = self.max_iters - 1 - k
                predicted = eta * ndz * theta**remaining / self.kappa
                if predicted >= 1.0:
                    self.fail_factor = 0.8 * min(20.0, predicted) ** (-1.0 / (4 + remaining))
                    return None
            if eta * ndz <= self.kappa or ndz == 0.0:
                self.eta = eta
                if k >= 2:  # converged in two iterations: the Jacobian is good enough whatever θ was
                    self.theta = max(self.theta, theta)
                return z
            prev = ndz
        return None

    def transposed_solver(self, t: float, z_star: torch.Tensor, hg: float):
        """``g ↦ (I − hγ J(Z*))⁻ᵀ g`` with the exact Jacobian at the converged stage (for backward)."""
        return transposed_solver(self.f, self.mode, t, z_star, hg, self.eps)


def transposed_solver(f: Callable, mode: str, t, z_star: torch.Tensor, hg, eps: float):
    """``g ↦ (I − hγ J(Z*))⁻ᵀ g`` with the exact Jacobian of ``f`` at the converged stage ``Z*`` (for the
    backward pass); ``hg`` a float, or with ``mode="batch"`` a ``(B, 1)`` tensor (a step size per row)."""

    def solve(g: torch.Tensor) -> torch.Tensor:
        if mode == "krylov":
            with torch.enable_grad():
                zz = z_star.detach().requires_grad_(True)
                out = f(t, zz)

            def op(v: torch.Tensor) -> torch.Tensor:
                if not out.requires_grad:
                    return v
                (u,) = torch.autograd.grad(out, zz, v, retain_graph=True, allow_unused=True)
                return v if u is None else v - hg * u

            return gmres(op, g, rtol=max(eps**0.75, 1e-10))
        jac = jacobian(f, t, z_star, mode == "batch")
        n = jac.shape[-1]
        hgm = hg if isinstance(hg, float) else hg.reshape(-1, 1, 1)
        m = torch.eye(n, dtype=jac.dtype, device=jac.device) - hgm * jac
        rhs = g.reshape(g.shape[0], n, 1) if mode == "batch" else g.reshape(n, 1)
        return torch.linalg.solve(m.mT, rhs).reshape(g.shape)

    return solve


def _step(newton: _Newton, tab: EsdirkTableau, t: float, h: float, y, k0, scale, norm, grad: bool):
    """One ESDIRK step from ``(t, y)`` with ``k0 = f(t, y)``: ``(y1, y_embedded, stages)`` or ``None`` when
    a stage's Newton iteration fails."""
    hg = h * tab.gamma
    ks = [k0]
    zs = [y]
    newton.theta = 0.0
    for i in range(1, tab.stages):
        ti = t + tab.c[i] * h
        psi = _combine(y, ks, tab.a[i][:i], h)
        with torch.no_grad():
            z = newton.stage(ti, psi.detach(), psi.detach() + hg * ks[-1].detach(), hg, scale, norm)
        if z is None:
            return None
        if grad:
            g_live = psi + hg * newton.f(ti, z)
            newton.stats.nfe += 1
            if g_live.requires_grad:
                z = _StageGrad.apply(g_live, z, newton.transposed_solver(ti, z, hg))
        ks.append((z - psi) / hg)
        zs.append(z)
    return zs[-1], zs[-2], ks


def _row_max_norm(x: torch.Tensor) -> torch.Tensor:
    """The worst row's RMS (rows: the first dimension)."""
    return x.reshape(x.shape[0], -1).pow(2).mean(dim=1).max().sqrt()


def dense_output(tab: EsdirkTableau, y: torch.Tensor, ks, f1, h: float, thetas) -> list[torch.Tensor]:
    """The step's cubic Hermite interpolant at ``t + θh`` for each θ (``ks`` its stages, ``f1`` the last)."""
    k = torch.stack([*ks, f1]).reshape(len(ks) + 1, -1)
    w = torch.tensor(
        [[h * sum(p * th ** (j + 1) for j, p in enumerate(poly)) for poly in tab.dense] for th in thetas],
        dtype=y.dtype,
        device=y.device,
    )
    out = torch.addmm(y.reshape(1, -1), w, k)
    return list(out.view(len(thetas), *y.shape).unbind(0))


def _dense_stages(tab: EsdirkTableau, y: torch.Tensor, stages, h: float, thetas) -> list[torch.Tensor]:
    """:func:`dense_output` in ``MethodSpec.dense_output``'s form (``stages = (ks, f1)``)."""
    return dense_output(tab, y, *stages, h, thetas)


def _mode(opts: dict, y0: torch.Tensor, shapes) -> str:
    mode = opts.get("jacobian", "auto")
    if mode not in JACOBIANS:
        raise ValueError(f"options['jacobian']={mode!r}; expected one of {', '.join(map(repr, JACOBIANS))}")
    if mode == "batch" and (shapes is not None or y0.dim() < 2):
        raise ValueError(
            "options['jacobian']='batch' needs a single tensor y0 of shape (batch, ...) whose rows are "
            f"independent problems, got {'a tuple state' if shapes is not None else tuple(y0.shape)}"
        )
    if mode == "auto":
        mode = "dense" if y0.numel() <= _AUTO_DENSE_MAX else "krylov"
    return mode


def _run(
    problem, stats, y0: torch.Tensor, on_accept=None, jump=None, trace=None, callbacks=None
) -> list[torch.Tensor]:
    """The adaptive ESDIRK solve (``MethodSpec.run``): the shared adaptive loop with the
    :class:`_EsdirkStep` strategy. ``on_accept(t, h, y, (stages, f1))``, if given, sees every accepted
    step (its start, signed size, start state, stages and ``f`` at its end): what :func:`dense_output`
    needs to evaluate the step anywhere inside.

    ``jump(j, y) -> (y, f(t_j, y))`` (the adjoint's hook of ``_integrate/adaptive.py``): the inner output
    times ``t[1:-1]`` become stops that steps end on, and at each the state is replaced by what
    ``jump`` returns, inside the one solve: the step size, the controller's history, the Jacobian and its
    LU carry over (the Newton iteration refreshes the Jacobian if the new state makes it converge
    slowly), and the initial step is selected once. ``trace`` (a list) receives ``(t, h)`` of every
    accepted step (what :class:`EsdirkReplay` replays). ``callbacks``: replaces ``problem.callbacks``
    (the engine passes them chained with its own)."""
    tab = ESDIRK_TABLEAUS[problem.method]
    mode = _mode(problem.options, y0, problem.shapes)
    norm = _esdirk_norm(problem, mode)
    step = _EsdirkStep(problem, tab, mode, y0, norm, stats)
    f0, h = first_step(problem, stats, y0, tab.order, norm, problem.direction)
    hooks = {"trace": trace, "jump": jump, "on_accept": on_accept}
    callbacks = problem.callbacks if callbacks is None else callbacks
    return adaptive_loop(step, problem, stats, y0, f0, h, callbacks=callbacks, **hooks)


def _esdirk_norm(problem, mode: str):
    """The error norm: the worst row's RMS with ``jacobian="batch"`` (unless ``options['norm']``)."""
    user_norm = problem.settings.user_norm
    if mode == "batch" and user_norm is None:
        return _row_max_norm
    sizes = None if problem.shapes is None else [math.prod(s) for s in problem.shapes]
    return make_norm(user_norm, sizes, problem.shapes)


class _EsdirkStep:
    """The ESDIRK step strategy of the shared adaptive loop: each implicit stage by the simplified Newton
    iteration of :class:`_Newton` (the stages use ``problem.f`` throughout, also on a step onto a jump),
    the error ratio of the embedded solution (synchronised here), FSAL (the last stage is ``f(t1, y1)``).
    A stage that does not converge fails the try: ``h`` times Hairer's factor, a stale Jacobian
    refreshed. The Jacobian is kept across accepted steps while Newton converges fast, refreshed after
    a jump; the step size is kept while that keeps the LU."""

    fsal = True
    rms_factor = None
    aux_of = None
    evals = 0  # (the Newton iterations count their own)
    attempt_failure = "the Newton iteration did not converge at the minimum step size (options['min_step'])"

    def __init__(self, problem, tab: EsdirkTableau, mode: str, y0: torch.Tensor, norm, stats) -> None:
        self.tab, self.norm = tab, norm
        self.rtol, self.atol = problem.rtol, problem.atol
        self.newton = _Newton(problem, tab, mode, y0, stats)
        self.grad = torch.is_grad_enabled()

    def attempt(self, f, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, aux):
        newton, rtol, atol = self.newton, self.rtol, self.atol
        yd = y.detach()
        scale = yd.abs() * rtol + atol
        newton.prepare(t, yd, h)
        out = _step(newton, self.tab, t, h, y, f0, scale, self.norm, self.grad)
        if out is None:  # Newton failed: a rejected step with h reduced (and a fresh Jacobian)
            if not newton.fresh:
                newton.jac = None
            return None
        y1, y_emb, ks = out
        with torch.no_grad():
            y1d = y1.detach()
            err_scale = torch.maximum(yd.abs(), y1d.abs()) * rtol + atol
            ratio = float(self.norm((y1d - y_emb.detach()) / err_scale))
        return y1, ratio, ks, None

    @property
    def retry_factor(self) -> float:
        return self.newton.fail_factor

    def limit_error(self, t: float, h: float, n_steps: int, max_num_steps: int, failed) -> SolverError | None:
        return step_limit_error(t, h, n_steps, max_num_steps)

    def nonfinite(self, t: float, h: float, y, f0: torch.Tensor, n_steps: int) -> SolverError | None:
        if not bool(torch.isfinite(f0).all()):
            return SolverError("nonfinite", "func returned NaN/inf", t=t, step_size=h, n_steps=n_steps)
        return None

    def stages(self, ks, f1):
        return ks, ks[-1]  # (f at t1 from the step's side, also when f1 is the limit past a jump)

    def dense(self, t: float, h: float, y: torch.Tensor, ks, f1, thetas) -> list[torch.Tensor]:
        return dense_output(self.tab, y, ks, ks[-1], h, thetas)

    def accepted(self, onto_jump: bool) -> None:
        newton = self.newton
        if onto_jump or newton.theta > _REUSE_THETA:  # past a jump, or Newton slow: a fresh Jacobian
            newton.jac = None
        newton.fresh = False

    def keep_lu(self) -> bool:
        return self.newton.lu is not None and self.newton.jac is not None


class EsdirkReplay:
    """Re-takes accepted steps of a joint ESDIRK solve at their recorded sizes, with autograd
    (``odeint_checkpoint``'s backward pass): :meth:`step` is the step of :func:`_run` at the given ``h``,
    each stage's Newton iteration to convergence and the converged stage differentiated by the implicit
    function theorem, as in direct mode. The Newton iteration's Jacobian is kept and refreshed as in the
    solve, but its history differs from the forward solve's (that also saw rejected steps), so the
    replayed stages agree with the forward ones to the Newton tolerance, not to rounding."""

    def __init__(self, problem, stats, y0: torch.Tensor) -> None:
        self.tab = ESDIRK_TABLEAUS[problem.method]
        self.problem, self.stats = problem, stats
        mode = _mode(problem.options, y0, problem.shapes)
        self.norm = _esdirk_norm(problem, mode)
        self.newton = _Newton(problem, self.tab, mode, y0, stats)

    def step(self, t: float, h: float, y: torch.Tensor, f0: torch.Tensor):
        """``(y1, stages)`` of the step from ``(t, y)`` (``f0 = f(t, y)``) of size ``h``; ``stages[-1]`` is
        ``f`` at its end. Raises :class:`SolverError` if a stage does not converge, even with a fresh
        Jacobian."""
        p, newton = self.problem, self.newton
        yd = y.detach()
        scale = yd.abs() * p.rtol + p.atol
        for _ in range(2):
            newton.prepare(t, yd, h)
            out = _step(newton, self.tab, t, h, y, f0, scale, self.norm, torch.is_grad_enabled())
            if out is not None:
                break
            newton.jac = None  # a stale Jacobian: retry once with a fresh one
        else:
            raise SolverError(
                "underflow",
                "replaying an accepted step, its Newton iteration did not converge",
                t=t,
                step_size=h,
                n_steps=0,
            )
        if newton.theta > _REUSE_THETA:
            newton.jac = None
        newton.fresh = False
        y1, _, ks = out
        return y1, ks

    def after_jump(self) -> None:
        """The step ended on a discontinuity of ``f`` (``jump_t``): the next one needs a fresh Jacobian."""
        self.newton.jac = None


# -- per-sample stepping: every row its own step size, Newton iteration and Jacobian ----------------------


def _parse(options: dict) -> dict:
    """The Newton options, checked (their defaults that depend on rtol and dtype are applied per solve)."""
    own = {k: options[k] for k in ("jacobian", "max_iters", "newton_tol") if k in options}
    newton_settings(own, 1.0, torch.float64)
    if own.get("jacobian", "auto") not in JACOBIANS:
        raise ValueError(
            f"options['jacobian']={own['jacobian']!r}; expected one of {', '.join(map(repr, JACOBIANS))}"
        )
    return own


class EsdirkRows:
    """The ESDIRK methods in the per-sample loop (``odeint_per_sample``, ``options={"per_sample": True}``):
    a ``RowStepper`` (see ``_integrate/per_sample.py``).

    Each row of the ``(B, d)`` state has its own step size and controller (the loop's), and here its own
    simplified Newton iteration: a ``(d, d)`` Jacobian block (one batched reverse-mode pass over the
    batch), an LU factorisation of ``I − h_b γ J_b`` (batched ``lu_factor``/``lu_solve``), its own
    convergence test, contraction rate and failure. As in the joint solver, but row by row: a row keeps
    its Jacobian while its Newton iteration converges fast and refreshes it when it does not; its LU is
    kept while its step size stays within ``[1, 1.2]`` of the one it was built for; a row whose Newton
    iteration fails rejects its step with ``h`` reduced (Hairer's factor, at most 0.5), the others go on.

    Work per step: every stage iteration evaluates ``func`` on the whole batch (rows are not split out
    of ``func``), until every running row of that stage has converged or failed; rows that converged,
    failed or finished take no further Newton corrections; a Jacobian pass runs only when some running
    row needs a fresh block, and LU factorisations only for the rows whose block or step size changed.
    The per-row Newton decisions run on the host, on the ``(B,)`` norm of each iteration's correction.
    Synchronisations: one per Newton iteration, three per step (the rows running, and the Jacobian and
    LU decisions), besides the loop's one. Gradients as in the joint mode: each converged stage by the
    implicit function theorem, per row.
    """

    def __init__(self, problem, stats) -> None:
        opts = problem.settings.method_options or {}
        if opts.get("jacobian", "auto") not in ("auto", "batch"):
            raise ValueError(
                f"options['jacobian']={opts['jacobian']!r} in per-sample mode: each row has its own (d, d) "
                "Jacobian block, so only 'batch' (the default there, also 'auto') is supported"
            )
        y0 = problem.y0
        B, n = y0.shape
        self.problem, self.stats, self.f = problem, stats, problem.f
        self.tab = tab = problem.tab
        self.order = tab.order
        self.controller = problem.settings.controller
        self.max_iters, self.kappa = newton_settings(opts, problem.rtol, y0.dtype)
        self.eps = torch.finfo(y0.dtype).eps
        self.pairs = tuple(
            tuple((j, v) for j, v in enumerate(row[:i]) if v != 0.0) for i, row in enumerate(tab.a)
        )
        dev, dt = y0.device, y0.dtype
        self.eye = torch.eye(n, dtype=dt, device=dev)
        self.jac = None  # (B, d, d): each row's Jacobian block
        self.stale = torch.ones(B, dtype=torch.bool, device=dev)  # needs a fresh block before its next step
        self.fresh = torch.zeros(B, dtype=torch.bool, device=dev)  # block computed at this step's start
        # (in lu_factor's own memory layout, which lu_solve reads without a copy)
        self.lu, self.piv = torch.linalg.lu_factor(self.eye.expand(B, n, n))
        self.hg_lu = torch.full((B,), math.nan, dtype=dt, device=dev)  # h γ each LU was built for
        # The Newton iteration's per-row decisions, on the host (NumPy, float64 like the joint solver's
        # Python floats): one (B,) norm comes back per iteration anyway (the iteration's one sync), and
        # a dozen decisions on it cost a dozen kernel launches on the device, microseconds here.
        self.eta = np.ones(B)  # Hairer's η, carried over
        self.theta = np.zeros(B)  # worst contraction rate of the step
        self.failed_h = np.zeros(B, dtype=bool)  # rows whose Newton iteration failed this step
        self.fail_factor = np.full(B, 0.5)
        self.failed = torch.zeros(B, dtype=torch.bool, device=dev)  # the same on the device
        self.n_jac = torch.zeros(B, dtype=torch.int64, device=dev)
        self.n_lu = torch.zeros(B, dtype=torch.int64, device=dev)

    @staticmethod
    def tableau(method: str) -> EsdirkTableau:
        return ESDIRK_TABLEAUS[method]

    def row_counters(self) -> dict[str, torch.Tensor]:
        return {"n_jac": self.n_jac, "n_lu": self.n_lu}

    def _prepare(self, t: torch.Tensor, y: torch.Tensor, hg: torch.Tensor, running: torch.Tensor) -> None:
        """Fresh Jacobian blocks for the running rows that need one, LUs for the rows whose block or
        ``h γ`` changed."""
        need_jac = running & self.stale
        if bool(need_jac.any()):
            jac = jacobian(self.f, t, y, True)
            self.stats.n_jac += 1
            self.jac = jac if self.jac is None else torch.where(need_jac.view(-1, 1, 1), jac, self.jac)
            self.n_jac += need_jac
            self.fresh = self.fresh | need_jac
            self.stale = self.stale & ~need_jac
            self.hg_lu = torch.where(need_jac, math.nan, self.hg_lu)
        idx = (running & (hg != self.hg_lu)).nonzero().squeeze(1)
        if idx.numel():
            lu, piv = torch.linalg.lu_factor(self.eye - hg[idx].view(-1, 1, 1) * self.jac[idx])
            self.lu[idx], self.piv[idx], self.hg_lu[idx] = lu, piv, hg[idx]
            self.n_lu[idx] += 1
            self.stats.n_lu += 1

    def _stage(self, t, psi, z, hg, inv_scale, active: np.ndarray):
        """Newton for ``Z = ψ + hγ f(t, Z)`` on the ``active`` rows (a host mask) from ``z`` (no grad;
        ``inv_scale`` is ``1 / (atol + rtol |y|)``); marks the rows that fail in ``self.failed_h`` (and
        ``self.fail_factor``). The same decisions as :meth:`_Newton.stage`, row by row: norms are
        2-norms (the RMS's ``1/sqrt(d)`` is folded into κ), and a NaN/inf correction fails its row
        through ``¬(θ < 0.99)`` one iteration later."""
        f, stats, max_iters = self.f, self.stats, self.max_iters
        kappa = self.kappa * math.sqrt(z.shape[1])
        eta = np.maximum(self.eta, self.eps) ** 0.8
        prev = None
        mask = self._device_mask(active)
        for k in range(max_iters):
            fz = f(t, z)
            stats.nfe += 1
            r = torch.addcmul(psi - z, hg, fz).unsqueeze(2)
            dz = torch.where(mask, torch.linalg.lu_solve(self.lu, self.piv, r).squeeze(2), 0.0)
            z = z + dz
            # the one synchronisation per iteration
            ndz = torch.linalg.vector_norm(dz * inv_scale, dim=1).to("cpu", torch.float64).numpy()
            with np.errstate(all="ignore"):  # (rows that are not active may divide 0 by 0)
                if prev is not None:
                    theta = ndz / prev  # (prev > 0 on every active row: a zero correction has converged)
                    eta = theta / (1.0 - theta)
                    eta_ndz = eta * ndz
                    ok = active & (theta < 0.99)  # the others diverge, or met NaN/inf
                    # Hairer: give up early when the remaining iterations cannot reach the tolerance.
                    remaining = max_iters - 1 - k
                    predicted = eta_ndz * theta**remaining
                    give_up = ok & (predicted >= kappa)
                    if give_up.any():
                        pred = np.minimum(20.0, predicted[give_up] / kappa)
                        self.fail_factor[give_up] = 0.8 * pred ** (-1.0 / (4 + remaining))
                        ok &= ~give_up
                    converged = ok & (eta_ndz <= kappa)
                    self.failed_h |= active & ~ok
                    active = ok & ~converged
                    if k >= 2:  # converged in two iterations: the Jacobian is good enough whatever θ was
                        self.theta[converged] = np.maximum(self.theta[converged], theta[converged])
                else:
                    converged = active & (eta * ndz <= kappa)
                    active = active & ~converged
            self.eta[converged] = eta[converged]
            prev = ndz
            if not active.any():
                break
            mask = self._device_mask(active)
        else:
            self.failed_h |= active  # not converged within max_iters
        return z

    def _device_mask(self, rows: np.ndarray) -> torch.Tensor:
        """A host row mask as a ``(B, 1)`` device tensor."""
        return torch.from_numpy(rows.copy()).to(self.eye.device, non_blocking=True).unsqueeze(1)

    def step(self, t, t_lo, t_to, last, h_signed, hp, y, f0, running):
        tab, p, f = self.tab, self.problem, self.f
        hy = hp[0]
        hg = hy * tab.gamma  # (B, 1)
        yd = y.detach()
        inv_scale = (yd.abs() * p.rtol + p.atol).reciprocal_()
        self._prepare(t_lo, yd, hg.squeeze(1), running)
        self.theta[:] = 0.0
        self.failed_h[:] = False
        self.fail_factor[:] = 0.5
        failed = torch.zeros_like(running)
        running_h = running.cpu().numpy()
        hg_safe = torch.where(hg == 0, 1.0, hg)  # rows that do not step: h = 0
        nonfinite = torch.zeros_like(running)  # rows whose Newton iteration met NaN/inf
        grad = torch.is_grad_enabled()
        ks, zs = [f0], [y]
        for i in range(1, tab.stages):
            ti = torch.add(t_lo, hp[1], alpha=tab.c[i])
            psi = ROWS.comb(y, ks, self.pairs[i], hp)
            psi_d = psi.detach()
            with torch.no_grad():
                z0 = torch.addcmul(psi_d, hg, ks[-1].detach())
                z = self._stage(ti, psi_d, z0, hg, inv_scale, running_h & ~self.failed_h)
                failed = self._device_mask(self.failed_h).squeeze(1)
                nonfinite = nonfinite | (failed & ~torch.isfinite(z).all(1))
                z = torch.where(failed.unsqueeze(1), psi_d, z)  # failed rows: finite placeholders
            if grad:
                g_live = psi + hg * f(ti, z)
                self.stats.nfe += 1
                if g_live.requires_grad:
                    solve = transposed_solver(f, "batch", ti, z, hg, self.eps)
                    z = _StageGrad.apply(g_live, z, solve)
            ks.append((z - psi) / hg_safe)
            zs.append(z)
        y1 = zs[-1]
        with torch.no_grad():
            y1d = y1.detach()
            err_scale = torch.maximum(yd.abs(), y1d.abs()) * p.rtol + p.atol
            ratio = rms_rows((y1d - zs[-2].detach()) / err_scale, p.groups).to(t.dtype)
            # A row whose Newton iteration failed is rejected whatever this says (NaN if it met NaN/inf).
            ratio = torch.where(failed, torch.where(nonfinite, math.nan, 2.0), ratio)
        self.failed = failed
        return y1, (*ks, ks[-1]), ratio, failed

    def factor(self, ratio, prev_ratio, all_finite: bool, accept) -> torch.Tensor:
        fac = self.controller.factor_rows(ratio, prev_ratio, all_finite)
        dev = fac.device
        fail_factor = torch.from_numpy(self.fail_factor.copy()).to(dev, fac.dtype, non_blocking=True)
        slow = torch.from_numpy(self.theta > _REUSE_THETA).to(dev, non_blocking=True)
        fac = torch.where(self.failed, fail_factor, fac)
        self.stale = self.stale | (accept & slow) | (self.failed & ~self.fresh)
        self.fresh = self.fresh & ~accept
        keep = accept & ~self.stale & (fac >= KEEP_H[0]) & (fac <= KEEP_H[1])
        return torch.where(keep, 1.0, fac)  # 1: keep the LU factorisation


SPECS = [
    MethodSpec(
        name=n,
        options=OPTIONS,
        callbacks=ADAPTIVE_CALLBACKS,
        order=t.order,
        run=_run,
        events=False,
        parse=_parse,
        rows=EsdirkRows,
        rows_options=ROW_OPTIONS,
        dense_output=functools.partial(_dense_stages, t),
    )
    for n, t in ESDIRK_TABLEAUS.items()
]
