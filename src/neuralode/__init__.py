"""neuralode: Neural ordinary differential equations in PyTorch.

Drop-in for torchdiffeq: ``from neuralode import odeint, odeint_adjoint, odeint_event``.
"""

from importlib import metadata as _metadata

from neuralode._compat import use_as_torchdiffeq
from neuralode._dense_solution import DenseSolution, odeint_dense
from neuralode._errors import SolverError
from neuralode._events import odeint_event
from neuralode._gradients.adjoint import SENSITIVITIES, odeint_adjoint
from neuralode._gradients.checkpoint import odeint_checkpoint
from neuralode._gradients.per_sample_adjoint import odeint_per_sample_adjoint
from neuralode._integrate.fixed_grid import FixedGridSolver
from neuralode._integrate.per_sample import PerSampleInfo, odeint_per_sample
from neuralode._module import GRADIENT_METHODS, NeuralODE
from neuralode._odeint import SOLVERS, odeint
from neuralode._solvers.explicit import ADAPTIVE_METHODS, FIXED_METHODS, TABLEAUS
from neuralode._solvers.tableau import ButcherTableau
from neuralode._stats import SolveStats, record_stats

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "GRADIENT_METHODS",
    "SENSITIVITIES",
    "SOLVERS",
    "TABLEAUS",
    "ButcherTableau",
    "DenseSolution",
    "FixedGridSolver",
    "NeuralODE",
    "PerSampleInfo",
    "SolveStats",
    "SolverError",
    "odeint",
    "odeint_adjoint",
    "odeint_checkpoint",
    "odeint_dense",
    "odeint_event",
    "odeint_per_sample",
    "odeint_per_sample_adjoint",
    "record_stats",
    "use_as_torchdiffeq",
]

try:  # the one version source is pyproject.toml, read from the installed metadata
    __version__ = _metadata.version("neuralode")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
