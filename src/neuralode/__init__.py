"""neuralode: Neural ordinary differential equations in PyTorch.

Drop-in for torchdiffeq: ``from neuralode import odeint, odeint_adjoint, odeint_event``.
"""

from neuralode._odeint import odeint, odeint_adjoint  # noqa: F401  (TEMPORARY shim, being replaced)

__version__ = "0.1.0"
