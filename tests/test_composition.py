"""The composition matrix (see ``tests/composition.py``): no cell may be silently wrong.

The default suite runs ``dopri5``, ``rk4`` and ``bosh3`` eagerly in float64 in every mode, gradient
method and event setting, the other explicit Runge-Kutta methods in their baseline cell, the Adams and SciPy methods in their baseline cell (joint, direct, no event; the
implicit and stiff methods have their own test files), and
float32 and one compiled cell for ``dopri5`` and ``rk4``; ``-m slow`` runs every cell.
"""

from __future__ import annotations

import pytest

from composition import Cell, cells, outcome
from neuralode import TABLEAUS
from neuralode._solvers.implicit import IMPLICIT_TABLEAUS
from neuralode._solvers.stiff import ESDIRK_TABLEAUS

# Cells known to be wrong: each shows as an expected failure, and the test fails once it is fixed.
KNOWN_WRONG: dict[str, str] = {}


def _default(c: Cell) -> bool:
    baseline = c.mode == "joint" and c.gradient == "direct" and c.event == "none" and c.dtype == "float64"
    if c.execution == "compiled":  # a compile costs seconds: one cell per method here, the rest when slow
        return baseline
    if c.method in TABLEAUS:  # every mode for a few tableaus, the baseline cell for the others
        return baseline or c.method in ("dopri5", "rk4", "bosh3")
    # The implicit methods' Newton iterations are the expensive ones; test_methods_extra and
    # test_stiff*.py cover them.
    return baseline and c.method not in IMPLICIT_TABLEAUS and c.method not in ESDIRK_TABLEAUS


_FAST = [c for c in cells(everything=False) if _default(c)]
_SLOW = [c for c in cells(everything=True) if c not in set(_FAST)]


def _check(cell: Cell) -> None:
    kind, detail = outcome(cell)
    if cell.id in KNOWN_WRONG:
        assert kind == "WRONG", f"{cell.id} is fixed ({kind}): remove it from KNOWN_WRONG"
        pytest.xfail(KNOWN_WRONG[cell.id])
    assert kind != "WRONG", f"{cell.id}: {detail}"
    if kind == "raises":  # a clear error names what is supported or what to use instead
        low = detail.lower()
        assert any(w in low for w in ("expected", "supported", "valid", "use ", "needs", "one of")), detail


@pytest.mark.parametrize("cell", _FAST, ids=lambda c: c.id)
def test_cell(cell: Cell) -> None:
    _check(cell)


@pytest.mark.slow
@pytest.mark.parametrize("cell", _SLOW, ids=lambda c: c.id)
def test_cell_exhaustive(cell: Cell) -> None:
    _check(cell)
