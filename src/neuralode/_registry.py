"""Methods that are not explicit Runge-Kutta tableaus: Adams, implicit Runge-Kutta, the SciPy wrapper.

Each is described by a :class:`MethodSpec`; ``odeint`` looks names up in :data:`EXTRA_METHODS` after
``TABLEAUS``. A fixed-grid method supplies a stepper for the shared fixed-grid loop (so ``step_size``,
``grid_constructor``, ``interp``, ``perturb``, callbacks and events work the same for every method);
a method with its own driver (``scipy_solver``) supplies ``run``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

__all__ = ["EXTRA_METHODS", "MethodSpec"]


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A non-tableau method.

    Attributes:
        name: the ``method=`` string.
        options: the option names it accepts.
        callbacks: the callback names it calls (see ``_callbacks``).
        order: order of accuracy (for documentation and tests).
        make_stepper: fixed-grid methods: ``make_stepper(problem) -> stepper`` (a fresh stepper per solve;
            the Adams stepper keeps its history of ``f`` values for that one solve).
        run: methods with their own driver: ``run(problem, stats, y0) -> list of flat states at problem.t``.
        events: whether ``event_fn`` is supported.
    """

    name: str
    options: frozenset[str]
    callbacks: frozenset[str]
    order: int
    make_stepper: Callable | None = None
    run: Callable | None = None
    events: bool = True


def _build() -> dict[str, MethodSpec]:
    from neuralode import _adams, _implicit, _scipy_solver, _stiff

    specs = [*_adams.SPECS, *_implicit.SPECS, *_scipy_solver.SPECS, *_stiff.SPECS]
    return {s.name: s for s in specs}


#: Every non-tableau method by name.
EXTRA_METHODS: dict[str, MethodSpec] = _build()
