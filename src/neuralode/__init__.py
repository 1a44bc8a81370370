"""neuralode: Neural ordinary differential equations in PyTorch.

Drop-in for torchdiffeq: ``from neuralode import odeint, odeint_adjoint, odeint_event``.
"""

from importlib import metadata as _metadata

from neuralode._adjoint import SENSITIVITIES, odeint_adjoint
from neuralode._batched import PerSampleInfo, odeint_per_sample
from neuralode._batched_adjoint import odeint_per_sample_adjoint
from neuralode._checkpoint import odeint_checkpoint
from neuralode._compat import use_as_torchdiffeq
from neuralode._compiled import FixedGridSolver
from neuralode._dense_solution import DenseSolution, odeint_dense
from neuralode._errors import SolverError
from neuralode._event import odeint_event
from neuralode._methods import ADAPTIVE_METHODS, FIXED_METHODS, TABLEAUS
from neuralode._module import GRADIENT_METHODS, NeuralODE
from neuralode._odeint import SOLVERS, odeint
from neuralode._stats import SolveStats, record_stats
from neuralode._tableau import ButcherTableau

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
