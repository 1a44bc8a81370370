"""``use_as_torchdiffeq``: run code written against torchdiffeq on neuralode without editing it.

Libraries that call torchdiffeq internally (torchcde, flow-matching samplers, ...) ``import torchdiffeq``
themselves. While the alias is active, that import gives a stand-in module whose ``odeint``,
``odeint_adjoint`` and ``odeint_event`` are neuralode's, and names bound from an already-imported
torchdiffeq are pointed at neuralode too; undoing the alias puts everything back.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from typing import Any

__all__ = ["TorchdiffeqAlias", "use_as_torchdiffeq"]

_NAME = "torchdiffeq"
_PUBLIC = ("odeint", "odeint_adjoint", "odeint_event")


class _PrivateSubmoduleBlocker(importlib.abc.MetaPathFinder):
    """Turns ``import torchdiffeq.<anything>`` into an ImportError that says why, while the alias is active."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.startswith(_NAME + "."):
            raise ImportError(
                f"neuralode.use_as_torchdiffeq() is active: 'import torchdiffeq' gives neuralode, which provides "
                f"torchdiffeq's public API ({', '.join(_PUBLIC)}) but not its private modules; "
                f"{fullname!r} has no neuralode counterpart. Import the public names from 'torchdiffeq' "
                f"instead, or undo the alias to use the real torchdiffeq.",
                name=fullname,
            )
        return None


def _make_stand_in() -> types.ModuleType:
    import neuralode

    module = types.ModuleType(
        _NAME, "neuralode standing in for torchdiffeq (see neuralode.use_as_torchdiffeq)."
    )
    for name in _PUBLIC:
        setattr(module, name, getattr(neuralode, name))
    module.__all__ = list(_PUBLIC)
    module.__version__ = neuralode.__version__
    module.__neuralode__ = True
    # A package spec with no search locations: importlib.util.find_spec("torchdiffeq") finds it (libraries
    # probe for optional dependencies that way), and submodule imports reach the blocker's clear error.
    module.__spec__ = importlib.machinery.ModuleSpec(_NAME, None, origin="neuralode", is_package=True)
    module.__path__ = []
    return module


class _Installed:
    """Everything the alias changed, so that removing it restores exactly that."""

    def __init__(self) -> None:
        import neuralode

        self.stand_in = _make_stand_in()
        self.blocker = _PrivateSubmoduleBlocker()
        # torchdiffeq's own modules, taken out of sys.modules while the alias is active.
        self.saved_modules = {
            name: module
            for name, module in sys.modules.items()
            if name == _NAME or name.startswith(_NAME + ".")
        }
        self.patched: list[tuple[dict[str, Any], str, Any, Any]] = []  # (namespace, name, old, new)

        real = self.saved_modules.get(_NAME)
        replacements: dict[int, Any] = {}
        if real is not None and not getattr(real, "__neuralode__", False):
            for name in _PUBLIC:
                old = real.__dict__.get(name)
                if old is not None:
                    replacements[id(old)] = getattr(neuralode, name)
                    self.patched.append((real.__dict__, name, old, getattr(neuralode, name)))
        for name in self.saved_modules:
            del sys.modules[name]
        sys.modules[_NAME] = self.stand_in
        sys.meta_path.insert(0, self.blocker)

        # `from torchdiffeq import odeint` done before the alias: point those names at neuralode as well.
        # (`import torchdiffeq` done before is covered by patching the real module's attributes above.)
        if replacements:
            for module_name, module in list(sys.modules.items()):
                if module_name.startswith(("neuralode.", _NAME + ".")) or module_name == "neuralode":
                    continue
                try:  # sys.modules may hold lazy stand-ins whose attribute access runs code
                    namespace = vars(module)
                except Exception:
                    continue
                if not isinstance(namespace, dict):
                    continue
                for name, value in list(namespace.items()):
                    new = replacements.get(id(value))
                    if new is not None:
                        self.patched.append((namespace, name, value, new))
        for namespace, name, _old, new in self.patched:
            namespace[name] = new

    def remove(self) -> None:
        for namespace, name, old, new in reversed(self.patched):
            if namespace.get(name) is new:  # leave alone what someone rebound since
                namespace[name] = old
        if sys.modules.get(_NAME) is self.stand_in:
            del sys.modules[_NAME]
        for name in [n for n in sys.modules if n.startswith(_NAME + ".")]:
            del sys.modules[name]
        sys.modules.update(self.saved_modules)
        if self.blocker in sys.meta_path:
            sys.meta_path.remove(self.blocker)


_lock = threading.Lock()
_installed: _Installed | None = None
_holders = 0


class TorchdiffeqAlias:
    """The handle :func:`use_as_torchdiffeq` returns: a context manager, or call :meth:`undo`.

    Handles are counted: the alias stays active until every handle is undone, so nested uses and
    repeated calls are safe. Undoing one handle twice does nothing the second time.
    """

    def __init__(self) -> None:
        self._undone = False

    @property
    def active(self) -> bool:
        """Whether this handle still holds the alias."""
        return not self._undone

    def undo(self) -> None:
        """Release this handle; when it was the last one, restore the real torchdiffeq (if installed)."""
        global _installed, _holders
        with _lock:
            if self._undone:
                return
            self._undone = True
            _holders -= 1
            if _holders == 0 and _installed is not None:
                _installed.remove()
                _installed = None

    def __enter__(self) -> TorchdiffeqAlias:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


def use_as_torchdiffeq() -> TorchdiffeqAlias:
    """Make ``import torchdiffeq`` resolve to neuralode, so that libraries built on torchdiffeq run on it.

    After ``neuralode.use_as_torchdiffeq()``, ``import torchdiffeq`` and
    ``from torchdiffeq import odeint, odeint_adjoint, odeint_event`` give neuralode's functions, in every
    module, whether or not the real torchdiffeq is installed. Call it before the library runs; ideally
    before it is imported. If torchdiffeq was already imported, its ``odeint``, ``odeint_adjoint`` and
    ``odeint_event`` attributes, and module-level names bound to them by ``from torchdiffeq import ...``,
    are pointed at neuralode's functions as well, and restored by :meth:`TorchdiffeqAlias.undo`.

    Only torchdiffeq's public API is provided: importing one of its private modules (``torchdiffeq._impl``,
    ...) raises an ``ImportError`` that says so. ``torchdiffeq.__version__`` is neuralode's version, and
    ``torchdiffeq.__neuralode__`` is ``True``.

    Example:
        ```python
        import neuralode

        neuralode.use_as_torchdiffeq()      # for the rest of the program
        import torchcde                     # its torchdiffeq.odeint calls now run neuralode

        with neuralode.use_as_torchdiffeq():   # or only inside a block
            samples = sampler.sample(x0)
        ```

    Returns:
        A :class:`TorchdiffeqAlias`: use it as a context manager, or call its ``undo()`` to restore the
        real torchdiffeq. Calls nest: the alias is removed when every handle is undone.
    """
    global _installed, _holders
    with _lock:
        if _installed is None:
            _installed = _Installed()
        _holders += 1
        return TorchdiffeqAlias()
