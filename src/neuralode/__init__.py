"""neuralode: Neural ordinary differential equations in PyTorch.

Drop-in for torchdiffeq: ``from neuralode import odeint, odeint_adjoint, odeint_event``.
"""

from neuralode._module import GRADIENT_METHODS, NeuralODE
from neuralode._odeint import odeint, odeint_adjoint  # TEMPORARY shim, being replaced
from neuralode._stats import SolveStats, record_stats

__all__ = ["GRADIENT_METHODS", "NeuralODE", "SolveStats", "odeint", "odeint_adjoint", "record_stats"]

__version__ = "0.1.0"
