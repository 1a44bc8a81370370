"""Adaptive Rosenbrock-W method ``ros34pw2``: linearly implicit, no Newton iteration, a Jacobian kept across steps.

Method: ROS34PW2 of J. Rang and L. Angermann, "New Rosenbrock W-methods of order 3 for partial
differential algebraic equations of index 1", BIT 45 (2005): 4 stages, order 3 with an embedded order-2
solution, L-stable and stiffly accurate, and a *W-method*: both orders hold for any matrix ``W`` in place
of the Jacobian (Steihaug and Wolfbrandt's conditions, checked by :meth:`RosenbrockTableau.check`).
Rang and Angermann write a step as

    (I − hγW) k_i = h f(t + α_i h, y + Σ_{j<i} α_ij k_j) + hW Σ_{j<i} γ_ij k_j,    y1 = y + Σ b_i k_i,

with ``ŷ1 = y + Σ b̂_i k_i`` the embedded solution. The loop uses the equivalent form without products
``W k`` (Hairer and Wanner, *Solving ODEs II*, IV.7): with ``u = Γk`` (``Γ`` the lower-triangular
``γ_ij`` with ``γ`` on the diagonal), ``(I − hγW) u_i = γh f(t + α_i h, y + Σ a_ij u_j) + γ Σ c_ij u_j``
and ``y1 = y + Σ m_i u_i`` (``a = αΓ⁻¹``, ``C = diag(1/γ) − Γ⁻¹``, ``m = bΓ⁻¹``). Each step costs 4
evaluations of ``f`` (3 stages and ``f(t1, y1)``, which is the next step's first stage) and 4
triangular solves with one LU factorisation of ``I − hγW``; the error estimate is ``y1 − ŷ1``.

Non-autonomous ``f``: the stages are evaluated at ``t + α_i h`` and the ``∂f/∂t`` term of a Rosenbrock
method is left out. That is the W-method applied to the autonomous system in ``(y, t)`` with the matrix
``[[W, 0], [0, 0]]``, so the order is 3 without ``∂f/∂t`` (and no autograd with respect to ``t``).

Being a W-method, it keeps ``W`` (the Jacobian ``∂f/∂y`` at the start of an earlier step) and the LU of
``I − hγW`` across steps while the step size stays the same: the step size is kept (not enlarged) while
the controller proposes a factor in ``[1, 1.2]``, as in Hairer and Wanner's codes. When ``h`` changes
(a rejected step, or a factor outside that range) the LU is redone, with a fresh Jacobian unless the one
in hand is from the same step start (a rejected step retries with it); after a jump
(``options['jump_t']``) the Jacobian is refreshed. Keeping an older Jacobian while ``h`` changes is
allowed by the W-property but costs steps on the benchmark problems: a stale ``W`` makes the error
estimate, and with it the step size, worse (on Van der Pol, μ = 1000, rtol 1e-4: 73 129 steps against
743), so the Jacobian is renewed with each new factorisation.
``options['jacobian']``: ``"dense"`` (the Jacobian of the flattened state by autograd; ``"auto"``, the
default, for states of up to 256 elements) or ``"batch"`` (``y0`` of shape ``(batch, ...)`` with
independent rows: one ``(d, d)`` block and LU per row, error measured per row). There is no Krylov mode:
the linear solves enter the solution directly (no Newton iteration corrects them), so they are done
exactly; use ``kvaerno*`` with ``"krylov"`` for large states.

Dense output: ``y(t + θh) = y + Σ b_i(θ) k_i`` with cubic weights ``b_i(θ)`` (``b_i(1) = b_i``), the unique
ones of order 3 with the exact Jacobian (they are order 2 as a W-method). It uses the stages only: a
cubic Hermite interpolant needs ``h f(t, y)`` and ``h f(t1, y1)``, which for a stiff component far from
its equilibrium time scale (``h|λ| ≫ 1``) amplify the tolerance-sized distance from the slow manifold
by ``h|λ|``; the stages ``k_i`` are damped by ``(I − hγW)⁻¹`` and do not.

Gradients (``odeint``'s direct mode) flow through the stages and the triangular solves, with ``W`` held
constant (it is computed without a graph). That is the exact derivative of the W-method's step map for
that fixed ``W``, which is itself an order-3 method for every ``W``: the gradient is consistent to the
method's order, with no extra solves. Step sizes carry no gradient. Each step synchronises with the host
once (the error ratio).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import torch

from neuralode._callbacks import ADAPTIVE_CALLBACKS
from neuralode._errors import SolverError, step_limit_error
from neuralode._integrate.adaptive import adaptive_loop
from neuralode._interpolation import stage_sum
from neuralode._solvers.stiff import _AUTO_DENSE_MAX, _row_max_norm, jacobian, lu_apply, lu_factor
from neuralode._solvers.stiff import _mode as _jacobian_mode
from neuralode._solvers.tableau import MethodSpec, _gamma, _size, rooted_trees
from neuralode._step_size import STEP_SIZE_OPTIONS, first_step

__all__ = ["ROSENBROCK_TABLEAUS", "RosenbrockTableau", "w_trees"]

Matrix = tuple[tuple[float, ...], ...]


@dataclasses.dataclass(frozen=True)
class RosenbrockTableau:
    """A Rosenbrock(-W) method with an embedded solution, in Rang and Angermann's (and Hairer and
    Wanner's) coefficients.

    Attributes:
        name: the ``method=`` string.
        gamma: the diagonal coefficient ``γ``.
        alpha: ``α_ij``, ``s × s``, strictly lower triangular (stage arguments).
        gammas: ``γ_ij``, ``s × s``, lower triangular with ``γ`` on the diagonal (the ``W`` terms).
        b: weights of the propagated solution.
        b_hat: weights of the embedded solution.
        order: order of ``b``, as a W-method (any ``W``) when ``w_method``, else with the exact Jacobian.
        error_order: order of ``b_hat``, in the same sense.
        w_method: whether the orders hold for any ``W``.
        dense: dense-output weights ``b_i(θ)``: per stage the coefficients of θ, θ², θ³.
        dense_order: order of the dense output with the exact Jacobian (``dense_w_order``: as a W-method).
        reference: where the coefficients come from.
    """

    name: str
    gamma: float
    alpha: Matrix
    gammas: Matrix
    b: tuple[float, ...]
    b_hat: tuple[float, ...]
    order: int
    error_order: int
    w_method: bool = True
    dense: tuple[tuple[float, ...], ...] = ()
    dense_order: int = 0
    dense_w_order: int = 0
    reference: str = ""

    def __post_init__(self) -> None:
        s = len(self.b)
        shapes = [len(self.alpha), len(self.gammas), len(self.b_hat)] + [
            len(r) for r in (*self.alpha, *self.gammas)
        ]
        if any(n != s for n in shapes):
            raise ValueError(f"{self.name}: alpha and gammas must be {s}×{s}, b and b_hat have {s} entries")

    @property
    def stages(self) -> int:
        return len(self.b)

    @functools.cached_property
    def c(self) -> tuple[float, ...]:
        """Stage times ``α_i = Σ_j α_ij``."""
        return tuple(sum(r) for r in self.alpha)

    @functools.cached_property
    def transformed(self) -> tuple[Matrix, Matrix, tuple[float, ...], tuple[float, ...]]:
        """``(a, C, m, m̂)`` of the form without ``W``-products: ``a = αΓ⁻¹``, ``C = diag(1/γ) − Γ⁻¹``
        (strictly lower), ``m = bΓ⁻¹``, ``m̂ = b̂Γ⁻¹``."""
        s = self.stages
        inv = _lower_inverse(self.gammas)
        a = tuple(
            tuple(sum(self.alpha[i][k] * inv[k][j] for k in range(s)) for j in range(s)) for i in range(s)
        )
        c = tuple(
            tuple(
                (1.0 / self.gammas[i][i] if i == j else 0.0) - inv[i][j] if j <= i else 0.0 for j in range(s)
            )
            for i in range(s)
        )
        m = tuple(sum(self.b[k] * inv[k][j] for k in range(s)) for j in range(s))
        m_hat = tuple(sum(self.b_hat[k] * inv[k][j] for k in range(s)) for j in range(s))
        return a, c, m, m_hat

    def dense_weights(self, theta: float) -> list[float]:
        """``b_i(θ)``, the dense-output weights over the stages ``k_i`` at ``t + θh``."""
        return [sum(p * theta ** (q + 1) for q, p in enumerate(poly)) for poly in self.dense]

    @functools.cached_property
    def _dense_inverse(self) -> list[list[float]]:
        return _lower_inverse(self.gammas)

    def dense_u_weights(self, theta: float) -> list[float]:
        """The dense-output weights over the transformed stages ``u = Γk``: ``b(θ)Γ⁻¹``."""
        bt, inv, s = self.dense_weights(theta), self._dense_inverse, self.stages
        return [sum(bt[k] * inv[k][j] for k in range(s)) for j in range(s)]

    @functools.cached_property
    def stiffly_accurate(self) -> bool:
        """``b_i = α_si + γ_si`` (and ``α_s = 1``): ``y1`` is the last stage's argument plus its own
        increment, so the method is exact at infinite stiffness (``R(∞) = 0`` with L-stability)."""
        last = [a + g for a, g in zip(self.alpha[-1], self.gammas[-1])]
        return abs(self.c[-1] - 1.0) < 1e-14 and all(abs(p - q) < 1e-14 for p, q in zip(last, self.b))

    def check(self, tol: float = 1e-10) -> None:
        """Raise ``ValueError`` unless the structure holds (``α`` strictly lower, ``Γ`` lower with ``γ``
        on the diagonal) and both solutions satisfy their order conditions: the W-conditions (trees
        with ``W`` vertices, :func:`w_trees`) up to ``order``/``error_order`` when ``w_method``, and
        always the Rosenbrock conditions (exact Jacobian) up to those orders."""
        s = self.stages
        for i in range(s):
            if any(self.alpha[i][j] != 0.0 for j in range(i, s)):
                raise ValueError(f"{self.name}: alpha must be strictly lower triangular (row {i})")
            if self.gammas[i][i] != self.gamma or any(self.gammas[i][j] != 0.0 for j in range(i + 1, s)):
                raise ValueError(
                    f"{self.name}: row {i} of gammas must end with γ={self.gamma} on the diagonal"
                )
        for what, w, order in (("b", self.b, self.order), ("b_hat", self.b_hat, self.error_order)):
            if self.w_method:
                for tree in w_trees(order):
                    got = sum(bi * p for bi, p in zip(w, self.w_weight(tree)))
                    want = _w_exact(tree)
                    if abs(got - want) > tol:
                        raise ValueError(
                            f"{self.name}: {what} violates the W-condition of order {_w_size(tree)} for "
                            f"{tree} ({got} vs {want})"
                        )
            for tree in rooted_trees(order):
                got = sum(bi * p for bi, p in zip(w, self.row_weight(tree)))
                if abs(got - 1.0 / _gamma(tree)) > tol:
                    raise ValueError(
                        f"{self.name}: {what} violates an order-{_size(tree)} condition "
                        f"({got} vs 1/{_gamma(tree)})"
                    )
        if self.dense:
            if any(abs(p - q) > tol for p, q in zip(self.dense_weights(1.0), self.b)):
                raise ValueError(f"{self.name}: the dense output at θ=1 is not the step's b")
            for theta in (0.3, 0.5, 0.85):  # the continuous conditions: θ^|t| times the step's
                w = self.dense_weights(theta)
                for tree in rooted_trees(self.dense_order):
                    got = sum(bi * p for bi, p in zip(w, self.row_weight(tree)))
                    if abs(got - theta ** _size(tree) / _gamma(tree)) > tol:
                        raise ValueError(
                            f"{self.name}: the dense output violates an order-{_size(tree)} condition at θ={theta}"
                        )
                for tree in w_trees(self.dense_w_order):
                    got = sum(bi * p for bi, p in zip(w, self.w_weight(tree)))
                    if abs(got - theta ** _w_size(tree) * _w_exact(tree)) > tol:
                        raise ValueError(
                            f"{self.name}: the dense output violates a W-condition of order {_w_size(tree)} "
                            f"at θ={theta}"
                        )

    def w_weight(self, tree) -> list[float]:
        """Per stage, the elementary weight of a W-tree: a vertex ``("f", children)`` contributes
        ``Π_children Σ_j α_ij Φ_j``, a vertex ``("W", child)`` ``Σ_{j≤i} γ_ij Φ_j``."""
        kind, kids = tree
        s = self.stages
        if kind == "W":
            phi = self.w_weight(kids[0])
            return [sum(self.gammas[i][j] * phi[j] for j in range(i + 1)) for i in range(s)]
        out = [1.0] * s
        for kid in kids:
            phi = self.w_weight(kid)
            for i in range(s):
                out[i] *= sum(self.alpha[i][j] * phi[j] for j in range(i))
        return out

    def row_weight(self, tree: tuple) -> list[float]:
        """Per stage, the elementary weight of a rooted tree (``_solvers.tableau``'s form) with the exact
        Jacobian: the sum of :meth:`w_weight` over the ways to make single-child vertices ``W``
        vertices (``W = ∂f/∂y`` turns a ``W`` vertex into an ``f`` vertex with one child)."""
        return [sum(col) for col in zip(*(self.w_weight(t) for t in _colourings(tree)))]

    def stability(self, z: complex) -> complex:
        """``R(z) = 1 + z bᵀ (I − zB)⁻¹ 𝟙`` with ``B = α + Γ`` (``y' = λy``, ``W = λ``, ``z = hλ``)."""
        x: list[complex] = []
        for i in range(self.stages):  # forward substitution, B is lower triangular
            acc = 1.0 + z * sum((self.alpha[i][j] + self.gammas[i][j]) * x[j] for j in range(i))
            x.append(acc / (1.0 - z * self.gammas[i][i]))
        return 1.0 + z * sum(bj * xj for bj, xj in zip(self.b, x))


def _lower_inverse(g: Matrix) -> list[list[float]]:
    """Inverse of a lower-triangular matrix by forward substitution."""
    s = len(g)
    inv = [[0.0] * s for _ in range(s)]
    for j in range(s):
        for i in range(j, s):
            acc = (1.0 if i == j else 0.0) - sum(g[i][k] * inv[k][j] for k in range(j, i))
            inv[i][j] = acc / g[i][i]
    return inv


# -- W-trees: rooted trees whose vertices are f (any number of children) or W (exactly one child) ---------


@functools.cache
def _w_trees_of_size(n: int) -> tuple:
    if n == 1:
        return (("f", ()),)
    out = [("W", (t,)) for t in _w_trees_of_size(n - 1)]
    for kids in _w_forests(n - 1, n - 1):
        out.append(("f", tuple(kids)))
    return tuple(out)


def _w_forests(n: int, max_size: int) -> list[list]:
    """Multisets of W-trees of total size ``n`` (each of size ≤ ``max_size``), as sorted lists."""
    if n == 0:
        return [[]]
    result = []
    for size in range(min(n, max_size), 0, -1):
        trees = _w_trees_of_size(size)
        for k, tree in enumerate(trees):
            for rest in _w_forests(n - size, size):
                # a multiset: within one size, keep the trees in non-decreasing index order
                if rest and _w_size(rest[0]) == size and trees.index(rest[0]) < k:
                    continue
                result.append([tree, *rest])
    return result


def w_trees(max_order: int) -> list:
    """All W-trees with 1..``max_order`` vertices (1, 2, 5, 13 of sizes 1-4): the order conditions of a
    W-method. Trees of ``f`` vertices only must get ``1/γ(t)``; a tree with a ``W`` vertex must get 0,
    since the exact solution does not depend on ``W``."""
    return [t for n in range(1, max_order + 1) for t in _w_trees_of_size(n)]


def _w_size(tree) -> int:
    return 1 + sum(_w_size(k) for k in tree[1])


def _w_exact(tree) -> float:
    """``1/γ(t)`` for a tree of ``f`` vertices, 0 with a ``W`` vertex."""

    def strip(t):  # the plain rooted tree, or None with a W vertex
        kind, kids = t
        if kind == "W":
            return None
        plain = [strip(k) for k in kids]
        return None if any(p is None for p in plain) else tuple(sorted(plain))

    plain = strip(tree)
    return 0.0 if plain is None else 1.0 / _gamma(plain)


def _colourings(tree: tuple) -> Iterator:
    """The W-trees that a rooted tree becomes when each single-child vertex is ``f`` or ``W``."""
    kid_options = [list(_colourings(k)) for k in tree]

    def products(i):
        if i == len(kid_options):
            yield ()
            return
        for first in kid_options[i]:
            for rest in products(i + 1):
                yield (first, *rest)

    for kids in products(0):
        yield ("f", kids)
        if len(kids) == 1:
            yield ("W", kids)


def _ros34pw2() -> RosenbrockTableau:
    g = 4.3586652150845900e-01
    alpha = (
        (0.0, 0.0, 0.0, 0.0),
        (8.7173304301691801e-01, 0.0, 0.0, 0.0),
        (8.4457060015369423e-01, -1.1299064236484185e-01, 0.0, 0.0),
        (0.0, 0.0, 1.0, 0.0),
    )
    gammas = (
        (g, 0.0, 0.0, 0.0),
        (-8.7173304301691801e-01, g, 0.0, 0.0),
        (-9.0338057013044082e-01, 5.4180672388095326e-02, g, 0.0),
        (2.4212380706095346e-01, -1.2232505839045147e00, 5.4526025533510214e-01, g),
    )
    b = (2.4212380706095346e-01, -1.2232505839045147e00, 1.5452602553351020e00, 4.3586652150845900e-01)
    b_hat = (3.7810903145819369e-01, -9.6042292212423178e-02, 0.5, 2.1793326075422950e-01)
    # b(θ) solves the four order-3 conditions Σ b_i(θ) Φ_i(t) = θ^|t|/γ(t) (exact Jacobian) for each θ
    dense = (
        (1.056429845579408, -1.3864882699759509, 0.5721822314574978),
        (2.2964299742810637, -8.262611700275654, 4.742931142090082),
        (-1.3075995645253708, 7.25097989505603, -4.398120075195564),
        (-1.045260255335101, 2.398120075195575, -0.9169932983520166),
    )
    return RosenbrockTableau(
        "ros34pw2",
        g,
        alpha,
        gammas,
        b,
        b_hat,
        order=3,
        error_order=2,
        w_method=True,
        dense=dense,
        dense_order=3,
        dense_w_order=2,
        reference="Rang & Angermann (2005), BIT 45:761-787, ROS34PW2; dense output solved from its order conditions",
    )


ROSENBROCK_TABLEAUS: dict[str, RosenbrockTableau] = {t.name: t for t in (_ros34pw2(),)}


OPTIONS = STEP_SIZE_OPTIONS | {"norm", "dtype", "step_t", "jump_t", "jacobian", "throw"}


# -- the solve ---------------------------------------------------------------------------------------------


def _mode(opts: dict, y0: torch.Tensor, shapes, method: str) -> str:
    """``"dense"`` or ``"batch"`` (``options['jacobian']`` checked as for ``kvaerno*``, less ``"krylov"``)."""
    mode = opts.get("jacobian", "auto")
    if mode == "krylov":
        raise ValueError(
            f"options['jacobian']='krylov' is not supported by method={method!r}: a Rosenbrock method's "
            "linear solves enter the solution directly, so it needs the matrix itself; use 'dense' or "
            "'batch', or a kvaerno* method with 'krylov'"
        )
    if mode == "auto" and y0.numel() > _AUTO_DENSE_MAX:
        raise ValueError(
            f"method={method!r} forms the dense Jacobian, and the state has {y0.numel()} elements (over "
            f"{_AUTO_DENSE_MAX}, where options['jacobian']='auto' stops): pass options={{'jacobian': 'dense'}} "
            "to accept an n×n Jacobian, 'batch' for a batch of independent rows, or use a kvaerno* method "
            "with 'krylov'"
        )
    return _jacobian_mode(opts, y0, shapes)


class _WMatrix:
    """``W`` (a Jacobian from the start of some step) and the LU of ``I − hγW`` for the current ``h``.

    One instance per solve (its working memory)."""

    def __init__(self, f, gamma: float, batch: bool, stats):
        self.f, self.gamma, self.batch, self.stats = f, gamma, batch, stats
        self.jac = None
        self.fresh = False  # computed at the start of the current step
        self.lu = None
        self.h_lu = None

    def prepare(self, t: float, y: torch.Tensor, h: float) -> None:
        """A new step from ``(t, y)`` of size ``h``: keep ``W`` and its LU if ``h`` is the size they were
        made for; else a new LU, with a new Jacobian unless the current one is from this ``(t, y)``."""
        if self.jac is not None and h != self.h_lu and not self.fresh:
            self.jac = None
        if self.jac is None:
            self.jac = jacobian(self.f, t, y, self.batch)
            self.stats.n_jac += 1
            self.fresh, self.lu = True, None
        if self.lu is None or h != self.h_lu:
            self.lu = lu_factor(self.jac, h * self.gamma)
            self.h_lu = h
            self.stats.n_lu += 1

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        return lu_apply(self.lu, r, self.batch)


def _step(f, tab: RosenbrockTableau, w: _WMatrix, t: float, h: float, y: torch.Tensor, f0: torch.Tensor):
    """One step from ``(t, y)`` with ``f0 = f(t, y)``: ``(y1, y1 − ŷ1 (detached), transformed stages u)``."""
    a, c, m, m_hat = tab.transformed
    g = tab.gamma
    us: list[torch.Tensor] = []
    for i in range(tab.stages):
        if i == 0:
            fi = f0
        else:
            yi = y
            for j in range(i):
                if a[i][j] != 0.0:
                    yi = yi + a[i][j] * us[j]
            fi = f(t + tab.c[i] * h, yi)
        r = (h * g) * fi
        for j in range(i):
            if c[i][j] != 0.0:
                r = r + (g * c[i][j]) * us[j]
        us.append(w.solve(r))
    y1, err = y, None
    for j in range(tab.stages):
        y1 = y1 + m[j] * us[j]
        e = (m[j] - m_hat[j]) * us[j].detach()
        err = e if err is None else err + e
    return y1, err, us


def dense_output(tab: RosenbrockTableau, y: torch.Tensor, us, h: float, thetas) -> list[torch.Tensor]:
    """The step's continuous extension at ``t + θh`` for each θ (``us``: its transformed stages)."""
    return stage_sum(y, [tab.dense_u_weights(th) for th in thetas], us)


def _run(problem, stats, y0: torch.Tensor, on_accept=None) -> list[torch.Tensor]:
    """The adaptive solve (``MethodSpec.run``): the shared adaptive loop with the :class:`_RosenbrockStep`
    strategy. ``on_accept(t, h, y, us)``, if given, sees every accepted step (start, signed size, start
    state, transformed stages): what :func:`dense_output` needs to evaluate it anywhere inside."""
    tab = ROSENBROCK_TABLEAUS[problem.method]
    settings = problem.settings
    mode = _mode(problem.options, y0, problem.shapes, problem.method)
    norm = _row_max_norm if mode == "batch" and settings.user_norm is None else problem.norm
    step = _RosenbrockStep(problem, tab, mode == "batch", norm, stats)
    f0, h = first_step(problem, stats, y0, tab.order, norm, problem.direction)
    return adaptive_loop(step, problem, stats, y0, f0, h, callbacks=problem.callbacks, on_accept=on_accept)


class _RosenbrockStep:
    """The Rosenbrock-W step strategy of the shared adaptive loop: :func:`_step` with the
    :class:`_WMatrix` kept across steps (a fresh Jacobian after a jump), the error ratio of the embedded
    solution (synchronised here), ``f(t1, y1)`` evaluated by the loop, dense output from the stages; the
    step size is kept while that keeps the LU."""

    fsal = False
    rms_factor = None
    aux_of = None

    def __init__(self, problem, tab: RosenbrockTableau, batch: bool, norm, stats) -> None:
        self.tab, self.norm = tab, norm
        self.evals = tab.stages - 1  # per try: the stages after the first (f(t1, y1) is the loop's)
        self.rtol, self.atol = problem.rtol, problem.atol
        self.w = _WMatrix(problem.f, tab.gamma, batch, stats)

    def attempt(self, f, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, aux):
        tab = self.tab
        yd = y.detach()
        self.w.prepare(t, yd, h)
        y1, err, us = _step(f, tab, self.w, t, h, y, f0)
        with torch.no_grad():
            err_scale = torch.maximum(yd.abs(), y1.detach().abs()) * self.rtol + self.atol
            ratio = float(self.norm(err / err_scale))  # the one synchronisation per step
        return y1, ratio, us, None

    def limit_error(self, t: float, h: float, n_steps: int, max_num_steps: int, failed) -> SolverError | None:
        if failed is not None or not math.isfinite(h):  # the last try failed on a NaN/inf stage
            return SolverError("nonfinite", "func returned NaN/inf", t=t, step_size=h, n_steps=n_steps)
        return step_limit_error(t, h, n_steps, max_num_steps)

    def nonfinite(
        self, t: float, h: float, y: torch.Tensor, f0: torch.Tensor, n_steps: int
    ) -> SolverError | None:
        if not bool(torch.isfinite(y).all()) or not bool(torch.isfinite(f0).all()):
            return SolverError("nonfinite", "func returned NaN/inf", t=t, step_size=h, n_steps=n_steps)
        return None

    def stages(self, us, f1):
        return us

    def dense(self, t: float, h: float, y: torch.Tensor, us, f1, thetas) -> list[torch.Tensor]:
        return dense_output(self.tab, y, us, h, thetas)

    def accepted(self, onto_jump: bool) -> None:
        self.w.fresh = False
        if onto_jump:  # f is discontinuous there: a Jacobian from before the jump is no guide after it
            self.w.jac = None

    def keep_lu(self) -> bool:
        return self.w.jac is not None


SPECS = [
    MethodSpec(
        name=n,
        options=OPTIONS,
        callbacks=ADAPTIVE_CALLBACKS,
        order=t.order,
        run=_run,
        events=False,
        dense_output=functools.partial(dense_output, t),
    )
    for n, t in ROSENBROCK_TABLEAUS.items()
]
