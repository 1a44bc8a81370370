"""Butcher tableaus as data, with their own validation (order conditions by rooted trees).

A tableau is a frozen dataclass with textbook names. Everything a solver needs is derived from it:
whether it is FSAL, its dense-output weights, the non-zero stage coefficients the stepper loops over.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

__all__ = ["ButcherTableau", "MethodSpec", "hermite_dense", "rooted_trees"]

Poly = tuple[float, ...]  # coefficients of θ^1, θ^2, ... (no constant term)


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method.

    Attributes:
        name: solver name as given to ``odeint(method=...)``.
        c: nodes, one per stage.
        a: strictly lower-triangular coefficients; row ``i`` has ``i`` entries.
        b: weights of the propagated solution.
        order: order of the propagated solution.
        b_error: ``b - b_embedded``: weights of the local error estimate (``None`` for fixed-step methods).
        error_order: order of the embedded solution ``b - b_error``.
        b_error_aux: optional second error estimate, combined as in Hairer's DOP853
            (``r5² / sqrt(r5² + 0.01 r3²)``).
        aux_order: order of ``b - b_error_aux``.
        dense: dense-output weights over the extended stage list ``[k_0..k_{s-1}, f(t1, y1), extra...]``:
            ``dense[i]`` are the coefficients of θ, θ², ... of the weight of stage ``i``, so that
            ``y(t0 + θh) = y0 + h Σ_i w_i(θ) k_i``. ``None`` means cubic Hermite.
        dense_order: order of the dense output.
        extra_c, extra_a: extra stages evaluated only when dense output is needed inside a step
            (rows over all previous stages, the f(t1, y1) slot included).
        reference: where the coefficients come from.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_error: tuple[float, ...] | None = None
    error_order: int | None = None
    b_error_aux: tuple[float, ...] | None = None
    aux_order: int | None = None
    dense: tuple[Poly, ...] | None = None
    dense_order: int | None = None
    extra_c: tuple[float, ...] = ()
    extra_a: tuple[tuple[float, ...], ...] = ()
    reference: str = ""

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: a must be strictly lower triangular with {s} rows")
        if len(self.b) != s:
            raise ValueError(f"{self.name}: b has {len(self.b)} entries for {s} stages")
        for w in (self.b_error, self.b_error_aux):
            if w is not None and len(w) != s:
                raise ValueError(f"{self.name}: error weights have {len(w)} entries for {s} stages")
        if self.dense is None and self.dense_order is None:
            object.__setattr__(self, "dense", hermite_dense(self.b))
            object.__setattr__(self, "dense_order", min(3, self.order))

    # -- derived properties -------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_error is not None

    @functools.cached_property
    def fsal(self) -> bool:
        """First-same-as-last: the last stage is evaluated at (t1, y1), so it is the next step's first."""
        return self.stages > 1 and self.c[-1] == 1.0 and _close(self.a[-1], self.b[:-1]) and self.b[-1] == 0.0

    @functools.cached_property
    def a_nonzero(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        """Per stage, the (j, a_ij) pairs with a_ij != 0."""
        return tuple(tuple((j, v) for j, v in enumerate(row) if v != 0.0) for row in self.a)

    @functools.cached_property
    def b_nonzero(self) -> tuple[tuple[int, float], ...]:
        """The (j, b_j) pairs with b_j != 0."""
        return tuple((j, v) for j, v in enumerate(self.b) if v != 0.0)

    @functools.cached_property
    def b_error_nonzero(self) -> tuple[tuple[int, float], ...]:
        """The (j, e_j) pairs of ``b_error`` with e_j != 0 (empty for fixed-step methods)."""
        return tuple((j, v) for j, v in enumerate(self.b_error or ()) if v != 0.0)

    @functools.cached_property
    def b_error_aux_nonzero(self) -> tuple[tuple[int, float], ...]:
        """The (j, e_j) pairs of ``b_error_aux`` with e_j != 0 (empty without a second estimate)."""
        return tuple((j, v) for j, v in enumerate(self.b_error_aux or ()) if v != 0.0)

    @functools.cached_property
    def extra_nonzero(self) -> tuple[tuple[tuple[int, float], ...], ...]:
        return tuple(tuple((j, v) for j, v in enumerate(row) if v != 0.0) for row in self.extra_a)

    def dense_weights(self, theta: float) -> list[float]:
        """Weights w_i(θ) over the extended stage list, for one θ in [0, 1]."""
        return [sum(p * theta ** (k + 1) for k, p in enumerate(poly)) for poly in self.dense]

    @functools.cached_property
    def uses_extra_stages(self) -> bool:
        return bool(self.extra_c)

    # -- validation ---------------------------------------------------------------------------------
    def check(self, tol: float = 1e-10) -> None:
        """Raise ``ValueError`` unless rows sum to ``c``, weights sum to 1 (error weights to 0) and the
        order conditions hold up to each claimed order (solution, embedded, dense output)."""
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > tol:
                raise ValueError(f"{self.name}: row {i} of a sums to {sum(row)}, c[{i}] = {self.c[i]}")
        _check_order(self.name, "b", self.c, self.a, self.b, self.order, tol)
        if self.b_error is not None:
            if abs(sum(self.b_error)) > tol:
                raise ValueError(f"{self.name}: error weights sum to {sum(self.b_error)}, expected 0")
            emb = tuple(x - e for x, e in zip(self.b, self.b_error))
            _check_order(self.name, "embedded b", self.c, self.a, emb, self.error_order, tol)
        if self.b_error_aux is not None:
            emb = tuple(x - e for x, e in zip(self.b, self.b_error_aux))
            _check_order(self.name, "auxiliary embedded b", self.c, self.a, emb, self.aux_order, tol)
        # Dense output: at θ = 1 it reproduces b; and it satisfies the continuous order conditions
        # Σ_i w_i(θ) Φ_i(τ) = θ^|τ| / γ(τ) up to dense_order.
        c_ext, a_ext = self.extended_stages()
        w1 = self.dense_weights(1.0)
        b_ext = list(self.b) + [0.0] * (len(c_ext) - self.stages)
        # f(t1, y1) is a stage of its own in the extended list; its weight may stand in for the last
        # stage of an FSAL method, so compare the solutions, not the weights.
        if not _same_solution(w1, b_ext, c_ext, a_ext, tol):
            raise ValueError(f"{self.name}: dense output at θ=1 does not reproduce the step")
        for theta in (0.3, 0.5, 0.85):
            w = self.dense_weights(theta)
            for tree in rooted_trees(self.dense_order):
                phi = _elementary_weight(tree, c_ext, a_ext)
                got = sum(wi * p for wi, p in zip(w, phi))
                want = theta ** _size(tree) / _gamma(tree)
                if abs(got - want) > 1e3 * tol:
                    raise ValueError(
                        f"{self.name}: dense output violates an order-{_size(tree)} condition at θ={theta}"
                    )

    def extended_stages(self) -> tuple[list[float], list[list[float]]]:
        """Nodes and coefficients of ``[stages..., f(t1, y1), extra stages...]`` as one explicit method."""
        s = self.stages
        c = [*list(self.c), 1.0, *list(self.extra_c)]
        a = [list(r) + [0.0] * (len(c) - len(r)) for r in self.a]
        a.append(list(self.b) + [0.0] * (len(c) - s))
        for r in self.extra_a:
            a.append(list(r) + [0.0] * (len(c) - len(r)))
        return c, a


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method that is not an explicit Runge-Kutta tableau (Adams, implicit Runge-Kutta, SciPy, ...).

    Attributes:
        name: the ``method=`` string.
        options: the option names it accepts.
        callbacks: the callback names it calls (see ``_callbacks``).
        order: order of accuracy (for documentation and tests).
        make_stepper: fixed-grid methods: ``make_stepper(problem) -> stepper`` (a fresh stepper per solve;
            the Adams stepper keeps its history of ``f`` values for that one solve).
        run: methods with their own driver: ``run(problem, stats, y0) -> list of flat states at problem.t``.
        events: whether ``event_fn`` is supported.
        parse: ``parse(options) -> value``: checks the method's own options (``ValueError``/``TypeError``
            naming them) when the problem is built; the value is ``problem.settings.method_options``.
        rows: per-sample stepping (``odeint_per_sample``): ``rows(problem, stats) -> RowStepper`` (see
            ``_integrate/per_sample.py``), a fresh one per solve; ``None``: not available.
        rows_options: the option names it accepts in per-sample mode.
        dense_output: adaptive drivers whose ``run`` takes ``on_accept(t, h, y, stages)`` (called on every
            accepted step): ``dense_output(y, stages, h, thetas) -> [state at t + θh for each θ]``, the
            step's interpolant (what ``odeint_dense`` evaluates later).
    """

    name: str
    options: frozenset[str]
    callbacks: frozenset[str]
    order: int
    make_stepper: Callable | None = None
    run: Callable | None = None
    events: bool = True
    parse: Callable | None = None
    rows: Callable | None = None
    rows_options: frozenset[str] = frozenset()
    dense_output: Callable | None = None


def hermite_dense(b: Sequence[float]) -> tuple[Poly, ...]:
    """Cubic Hermite interpolation through (y0, f0) and (y1, f1), as weights over ``[k.., f1]``.

    ``y(θ) = y0 + h[(3θ² − 2θ³) Σ b_i k_i + (θ − 2θ² + θ³) k_0 + (θ³ − θ²) f1]``.
    """
    h01 = (0.0, 3.0, -2.0)
    h10 = (1.0, -2.0, 1.0)
    h11 = (0.0, -1.0, 1.0)
    polys = [tuple(bi * x for x in h01) for bi in b]
    polys[0] = tuple(p + q for p, q in zip(polys[0], h10))
    polys.append(h11)
    return tuple(polys)


# -- rooted trees and order conditions ---------------------------------------------------------------
# A rooted tree is the sorted tuple of its children's trees; the single node is ().


@functools.cache
def _trees_of_size(n: int) -> tuple[tuple, ...]:
    if n == 1:
        return ((),)
    out: set[tuple] = set()
    for kids in _forests(n - 1, n - 1):
        out.add(tuple(sorted(kids)))
    return tuple(sorted(out))


def _forests(n: int, max_size: int) -> list[list[tuple]]:
    """Multisets of trees with total size n, each tree of size ≤ max_size (non-increasing sizes)."""
    if n == 0:
        return [[]]
    result = []
    for size in range(min(n, max_size), 0, -1):
        for tree in _trees_of_size(size):
            for rest in _forests(n - size, size):
                result.append([tree, *rest])
    return result


def rooted_trees(max_order: int) -> list[tuple]:
    """All rooted trees with 1..max_order nodes (1, 1, 2, 4, 9, 20, 48, 115 of each size)."""
    return [t for n in range(1, max_order + 1) for t in _trees_of_size(n)]


def _size(tree: tuple) -> int:
    return 1 + sum(_size(k) for k in tree)


def _gamma(tree: tuple) -> int:
    return _size(tree) * math.prod(_gamma(k) for k in tree)


def _elementary_weight(tree: tuple, c: Sequence[float], a: Sequence[Sequence[float]]) -> list[float]:
    """Φ_i(τ) per stage i: Π over children of Σ_j a_ij Φ_j(child)."""
    s = len(c)
    phi = [1.0] * s
    for kid in tree:
        pk = _elementary_weight(kid, c, a)
        for i in range(s):
            phi[i] *= sum(a[i][j] * pk[j] for j in range(len(a[i])))
    return phi


def _check_order(name: str, what: str, c, a, b, order: int | None, tol: float) -> None:
    if order is None:
        return
    if abs(sum(b) - 1.0) > tol:
        raise ValueError(f"{name}: {what} sums to {sum(b)}, expected 1")
    for tree in rooted_trees(order):
        got = sum(bi * p for bi, p in zip(b, _elementary_weight(tree, c, a)))
        if abs(got - 1.0 / _gamma(tree)) > 1e2 * tol:
            raise ValueError(
                f"{name}: {what} violates an order-{_size(tree)} condition ({got} vs 1/{_gamma(tree)})"
            )


def _same_solution(w, b, c, a, tol) -> bool:
    return all(
        abs(
            sum(x * p for x, p in zip(w, _elementary_weight(t, c, a)))
            - sum(x * p for x, p in zip(b, _elementary_weight(t, c, a)))
        )
        <= 1e3 * tol
        for t in rooted_trees(3)
    )


def _close(x: Sequence[float], y: Sequence[float], tol: float = 1e-14) -> bool:
    return len(x) == len(y) and all(abs(p - q) <= tol * max(1.0, abs(q)) for p, q in zip(x, y))
