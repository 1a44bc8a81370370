"""``neuralode.use_as_torchdiffeq``: a library that imports torchdiffeq itself runs on neuralode."""

import importlib
import importlib.util
import sys
import textwrap

import pytest
import torch
import torchdiffeq

import neuralode

REAL_ODEINT = torchdiffeq.odeint

# A stand-in for a library built on torchdiffeq (torchcde calls `torchdiffeq.odeint`, flow-matching
# samplers do `from torchdiffeq import odeint`): both styles, plus the adjoint and the event function.
LIBRARY = """
import torch
import torchdiffeq
from torchdiffeq import odeint, odeint_adjoint, odeint_event


def decay(t, y):
    return -y


def solve_module_style(y0, t):
    return torchdiffeq.odeint(decay, y0, t, rtol=1e-8, atol=1e-10)


def solve_from_import(y0, t):
    return odeint(decay, y0, t, rtol=1e-8, atol=1e-10)


def solve_adjoint(y0, t):
    return odeint_adjoint(decay, y0, t, rtol=1e-8, atol=1e-10, adjoint_params=())


def hit_half(y0):
    return odeint_event(decay, y0, torch.tensor(0.0, dtype=y0.dtype), event_fn=lambda t, y: y.sum() - 0.5)
"""


@pytest.fixture
def make_library(tmp_path, monkeypatch):
    """Writes the stand-in library as a package under tmp_path; returns a function importing it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def make(name):
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text(textwrap.dedent(LIBRARY))
        names.append(name)
        return importlib.import_module(name)

    yield make
    for name in names:
        sys.modules.pop(name, None)


def _nfe(fn, *args):
    """Evaluations neuralode's solvers report while fn runs (0 when the real torchdiffeq ran)."""
    with neuralode.record_stats() as stats:
        out = fn(*args)
    return stats.nfe, out


Y0 = torch.tensor([1.0], dtype=torch.float64)
T = torch.tensor([0.0, 1.0], dtype=torch.float64)


def test_library_imported_under_the_alias_runs_neuralode(make_library):
    with neuralode.use_as_torchdiffeq():
        lib = make_library("lib_after")
        assert lib.torchdiffeq.__neuralode__ is True
        assert lib.odeint is neuralode.odeint and lib.odeint_adjoint is neuralode.odeint_adjoint
        for solve in (lib.solve_module_style, lib.solve_from_import, lib.solve_adjoint):
            nfe, ys = _nfe(solve, Y0, T)
            assert nfe > 0
            torch.testing.assert_close(ys[-1], torch.exp(-T[-1:]), rtol=1e-7, atol=0)
        nfe, (event_t, _) = _nfe(lib.hit_half, Y0)
        assert nfe > 0
        torch.testing.assert_close(
            event_t, torch.log(torch.tensor(2.0, dtype=torch.float64)), rtol=1e-6, atol=0
        )
    # Undone: the real torchdiffeq is back for new imports, and a fresh import of the library uses it.
    assert sys.modules["torchdiffeq"] is torchdiffeq
    assert importlib.import_module("torchdiffeq").odeint is REAL_ODEINT
    importlib.import_module("torchdiffeq._impl")
    assert not hasattr(torchdiffeq, "__neuralode__")


def test_library_imported_before_the_alias_is_redirected_and_restored(make_library):
    lib = make_library("lib_before")  # bound the real torchdiffeq and its odeint at import time
    assert _nfe(lib.solve_from_import, Y0, T)[0] == 0
    alias = neuralode.use_as_torchdiffeq()
    try:
        assert _nfe(lib.solve_module_style, Y0, T)[0] > 0
        assert _nfe(lib.solve_from_import, Y0, T)[0] > 0
        assert importlib.import_module("torchdiffeq").__neuralode__ is True
    finally:
        alias.undo()
    assert lib.odeint is REAL_ODEINT and torchdiffeq.odeint is REAL_ODEINT
    assert _nfe(lib.solve_module_style, Y0, T)[0] == 0
    assert _nfe(lib.solve_from_import, Y0, T)[0] == 0


def test_nested_and_repeated_calls_undo_once_all_handles_are_released():
    outer = neuralode.use_as_torchdiffeq()
    inner = neuralode.use_as_torchdiffeq()
    assert sys.modules["torchdiffeq"].__neuralode__ is True
    inner.undo()
    inner.undo()  # a second undo of one handle does nothing
    assert outer.active and not inner.active
    assert sys.modules["torchdiffeq"].__neuralode__ is True
    outer.undo()
    assert sys.modules["torchdiffeq"] is torchdiffeq


def test_private_modules_are_a_clear_import_error_and_the_spec_is_findable():
    with neuralode.use_as_torchdiffeq():
        assert importlib.util.find_spec("torchdiffeq") is not None
        with pytest.raises(ImportError, match=r"'torchdiffeq\._impl' has no neuralode counterpart"):
            importlib.import_module("torchdiffeq._impl.odeint")
        assert sys.modules["torchdiffeq"].__version__ == neuralode.__version__
    assert importlib.import_module("torchdiffeq._impl.odeint").odeint is REAL_ODEINT
