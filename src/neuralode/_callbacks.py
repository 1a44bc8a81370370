"""torchdiffeq's step callbacks, found as attributes of ``func``.

A vector field may define ``callback_step(t0, y0, dt)`` (before every attempted step),
``callback_accept_step(t0, y0, dt)`` and ``callback_reject_step(t0, y0, dt)`` (after the error test), and
``..._adjoint`` variants of each for the backward solve of ``odeint_adjoint``. ``t0`` and ``dt`` arrive as
0-d float64 tensors on the state's device (``dt`` is signed: negative when integrating backwards in
time), ``y0`` as the state in the user's layout (a tuple for tuple states).

Which callbacks a method calls follows torchdiffeq: adaptive Runge-Kutta methods all three, fixed-grid
methods (explicit and implicit RK, Adams) only ``callback_step``, ``scipy_solver`` none. Defining one a
method does not call warns, with torchdiffeq's message.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = ["CALLBACK_NAMES", "Callbacks", "CheckpointKeeper", "chain_callbacks", "collect_callbacks"]

#: The callback attribute names, in the order (step, accept, reject).
CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")
ADJOINT_CALLBACK_NAMES = tuple(n + "_adjoint" for n in CALLBACK_NAMES)
ADAPTIVE_CALLBACKS = frozenset(CALLBACK_NAMES)
FIXED_CALLBACKS = frozenset({"callback_step"})


class Callbacks:
    """The ``callbacks=`` object the integration loops call: ``.step/.accept/.reject(t, y, h)`` with
    host floats and the flat state; converts to what the user's callbacks expect."""

    def __init__(self, fns: dict[str, Callable], shapes: Sequence[torch.Size] | None):
        self._fns = fns
        self._shapes = shapes

    def _call(self, name: str, t: float, y: torch.Tensor, h: float) -> None:
        fn = self._fns.get(name)
        if fn is None:
            return
        tt = torch.tensor(t, dtype=torch.float64, device=y.device)
        hh = torch.tensor(h, dtype=torch.float64, device=y.device)
        if self._shapes is not None:
            sizes = [math.prod(s) for s in self._shapes]
            y = tuple(p.view(s) for p, s in zip(y.split(sizes), self._shapes))
        fn(tt, y, hh)

    def step(self, t: float, y: torch.Tensor, h: float) -> None:
        self._call("callback_step", t, y, h)

    def accept(self, t: float, y: torch.Tensor, h: float) -> None:
        self._call("callback_accept_step", t, y, h)

    def reject(self, t: float, y: torch.Tensor, h: float) -> None:
        self._call("callback_reject_step", t, y, h)


def collect_callbacks(
    func, method: str, supported: frozenset[str], shapes=None, *, adjoint: bool = False
) -> Callbacks | None:
    """The callbacks ``func`` defines that ``method`` supports (``None`` if none), warning about the rest.

    ``adjoint=True`` reads the ``..._adjoint`` attributes instead (for the backward solve).
    """
    names = ADJOINT_CALLBACK_NAMES if adjoint else CALLBACK_NAMES
    found = {}
    for plain, name in zip(CALLBACK_NAMES, names):
        fn = _attribute(func, name)
        if fn is None:
            continue
        if not callable(fn):
            raise TypeError(f"func.{name} must be callable as {name}(t0, y0, dt), got {type(fn).__name__}")
        found[plain] = fn
    unsupported = set(found) - supported
    if unsupported:
        warnings.warn(f"Solver '{method}' does not support callbacks {unsupported}", stacklevel=3)
    fns = {k: v for k, v in found.items() if k in supported}
    return Callbacks(fns, shapes) if fns else None


def _attribute(obj, name: str):
    """``getattr(obj, name, None)``; on an ``nn.Module`` a missing name is found missing without its
    ``__getattr__`` (which raises and catches an exception per miss, ~1.5 µs: three per solve)."""
    if isinstance(obj, torch.nn.Module):
        if name in obj.__dict__ or hasattr(type(obj), name) or name in obj._modules:
            return getattr(obj, name)
        return None
    return getattr(obj, name, None)


class _Chain:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def step(self, t, y, h):
        self.first.step(t, y, h)
        self.second.step(t, y, h)

    def accept(self, t, y, h):
        self.first.accept(t, y, h)
        self.second.accept(t, y, h)

    def reject(self, t, y, h):
        self.first.reject(t, y, h)
        self.second.reject(t, y, h)


def chain_callbacks(first, second):
    """Both callback objects (either may be ``None``), called in order."""
    if first is None or second is None:
        return second if first is None else first
    return _Chain(first, second)


class CheckpointKeeper:
    """Engine callbacks that keep the state at the start of every ``stride``-th accepted step (the
    checkpoints of ``odeint_checkpoint`` and of the adjoint's forward solve): at most ``cap`` states, or
    about √(2n) of n steps when ``cap`` is None; the stride doubles as the solve grows."""

    def __init__(self, cap: int | None):
        self.cap, self.stride = cap, 1
        self.n = 0
        self.states: dict[int, torch.Tensor] = {}

    def step(self, t, y, h) -> None:
        pass

    def reject(self, t, y, h) -> None:
        pass

    def accept(self, t, y, h) -> None:
        if self.n % self.stride == 0:
            self.states[self.n] = y
            cap = 2 * self.stride if self.cap is None else self.cap
            if len(self.states) > max(cap, 1):
                self.stride *= 2
                self.states = {i: s for i, s in self.states.items() if i % self.stride == 0}
        self.n += 1
