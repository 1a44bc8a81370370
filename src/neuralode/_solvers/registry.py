"""Methods that are not explicit Runge-Kutta tableaus: Adams, implicit Runge-Kutta, the SciPy wrapper.

Each is described by a :class:`~neuralode._solvers.tableau.MethodSpec`; ``odeint`` looks names up in
:data:`EXTRA_METHODS` after ``TABLEAUS``. A fixed-grid method supplies a stepper for the shared
fixed-grid loop (so ``step_size``, ``grid_constructor``, ``interp``, ``perturb``, callbacks and events
work the same for every method); a method with its own driver (``scipy_solver``) supplies ``run``.
"""

from __future__ import annotations

from neuralode._solvers import adams, implicit, rosenbrock, scipy_ivp, stiff
from neuralode._solvers.tableau import MethodSpec

__all__ = ["EXTRA_METHODS"]

#: Every non-tableau method by name.
EXTRA_METHODS: dict[str, MethodSpec] = {
    s.name: s for s in (*adams.SPECS, *implicit.SPECS, *scipy_ivp.SPECS, *stiff.SPECS, *rosenbrock.SPECS)
}
