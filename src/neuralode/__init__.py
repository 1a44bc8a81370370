"""neuralode: Neural ordinary differential equations in PyTorch.

Drop-in for torchdiffeq: ``from neuralode import odeint, odeint_adjoint, odeint_event``.
"""

from neuralode._errors import SolverError
from neuralode._methods import ADAPTIVE_METHODS, FIXED_METHODS, TABLEAUS
from neuralode._module import GRADIENT_METHODS, NeuralODE
from neuralode._odeint import SOLVERS, odeint
from neuralode._shim import odeint_adjoint  # TEMPORARY until the adjoint lands
from neuralode._stats import SolveStats, record_stats
from neuralode._tableau import ButcherTableau

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "GRADIENT_METHODS",
    "SOLVERS",
    "TABLEAUS",
    "ButcherTableau",
    "NeuralODE",
    "SolveStats",
    "SolverError",
    "odeint",
    "odeint_adjoint",
    "record_stats",
]

__version__ = "0.1.0"
