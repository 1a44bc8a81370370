"""``options={"compile": ...}``: one ``torch.compile`` graph per explicit Runge-Kutta step.

In eager mode every stage combination, every time value and every piece of the error estimate is a
kernel launch of its own (about 7 per function evaluation for dopri5), each costing microseconds of
Python and dispatcher time: on small networks that is as much as the network itself. Compiled, the
whole step (every ``func`` call, the stage combinations and the error ratio) is one graph; Inductor fuses
the combinations into the network's kernels. The loop around it (accept/reject, step-size control, dense
output, events, ``step_t``/``jump_t``, callbacks) is the ordinary one in ``_solve.py``, so everything
``odeint`` does still works; steps that must evaluate ``func`` as a one-sided limit at a ``jump_t`` run
eagerly. On a fixed grid the step of a non-FSAL method also evaluates its first stage inside the graph
(so only ``interp="linear"`` without ``perturb`` is offered: neither needs that stage afterwards).

The step takes the time and step size as one float64 tensor ``[t, h]``, so a new step size never
recompiles (as 0-d tensors or floats they would be guarded as Python scalars, through a slower Python
guard function); float tolerances are constants of the graph, tensor tolerances its inputs. It
reaches ``func`` through a weak reference in its closure: passed as an argument, an ``nn.Module``'s
guards (every parameter's metadata) cost more per call than the compiled step saves. Compiled steps are
cached per ``func`` (weakly: the cache keeps no model alive), method, state layout, norm and compile
options, each with a code object of its own so that ``torch.compile``'s recompile limit counts per
cache entry; a new input shape, dtype or device recompiles (``torch.compile``'s own guards). The first
solve pays the compilation (seconds to tens of seconds with Inductor on a CPU).
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from neuralode._control import make_norm
from neuralode._tableau import ButcherTableau

__all__ = ["check_compile_option", "compiled_step"]

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DEFAULTS = {"fullgraph": False, "dynamic": None}


def check_compile_option(value: Any) -> dict | None:
    """``options["compile"]``: ``False``/``None`` (off), ``True`` (Inductor defaults) or a dict of
    ``torch.compile`` keyword arguments (e.g. ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``).
    Returns the keyword arguments, or ``None`` when off."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(_DEFAULTS)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("options['compile'] as a dict must have torch.compile keyword names as keys")
        return {**_DEFAULTS, **value}
    raise TypeError(
        f"options['compile'] must be a bool or a dict of torch.compile keyword arguments, "
        f"got {type(value).__name__}"
    )


def _lin(k, pairs):
    """``Σ_j w_j k_j`` over non-zero ``(j, w_j)`` pairs (traced: the compiler fuses the sum)."""
    acc = None
    for j, w in pairs:
        acc = k[j] * w if acc is None else acc + k[j] * w
    return acc


def _make_step(
    get_func: Callable[[], Callable], tab: ButcherTableau, shapes, user_norm, rtol_c, atol_c
) -> Callable:
    # Everything read from the tableau is read here: its cached properties take a lock on first use,
    # which would break the graph.
    a, b, c, stages, fsal = tab.a_nonzero, tab.b_nonzero, tab.c, tab.stages, tab.fsal
    e, e_aux = tab.b_error_nonzero, None
    if tab.b_error_aux is not None:
        e_aux = tuple((j, v) for j, v in enumerate(tab.b_error_aux) if v != 0.0)
    sizes = None if shapes is None else [math.prod(s) for s in shapes]
    norm = make_norm(user_norm, sizes, shapes)

    def step(th, y, f0, rtol_t, atol_t):
        """``(y1, stages, error ratio)`` of one step of size ``h`` from ``(t, y)``; ``th = [t, h]``
        (float64); ``rtol_t``/``atol_t`` are used where the float tolerances ``rtol_c``/``atol_c`` are None.
        ``f0=None`` evaluates the first stage inside the graph; a fixed-step tableau's ratio is None."""
        func = get_func()
        t, h = th[0], th[1]
        rtol = rtol_t if rtol_c is None else rtol_c
        atol = atol_t if atol_c is None else atol_c
        if shapes is None:
            call = func
        else:

            def call(tt, yy):
                parts = tuple(p.view(s) for p, s in zip(yy.split(sizes), shapes))
                return torch.cat([o.reshape(-1) for o in func(tt, parts)])

        hy = h.to(y.dtype)
        k = [call(t.to(y.dtype), y) if f0 is None else f0]
        y_stage = y
        for i in range(1, stages):
            y_stage = y + hy * _lin(k, a[i])
            k.append(call((t + c[i] * h).to(y.dtype), y_stage))
        y1 = y_stage if fsal else y + hy * _lin(k, b)
        if not e:
            return y1, k, None
        with torch.no_grad():
            tol = atol + rtol * torch.maximum(y.detach().abs(), y1.detach().abs())
            ks = [x.detach() for x in k]
            r = torch.as_tensor(norm(hy * _lin(ks, e) / tol))
            if e_aux is not None:  # Hairer's DOP853 combination of the two estimates
                r3 = torch.as_tensor(norm(hy * _lin(ks, e_aux) / tol))
                den = torch.sqrt(r * r + 0.01 * r3 * r3)
                r = torch.where(den > 0, r * r / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0 * r)
        return y1, k, r

    # A code object of its own: torch.compile keeps its cache, and its recompile limit, per code object.
    code = step.__code__.replace(co_name=f"neuralode_{tab.name}_step")
    return types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)


def _weak_func(func: Callable) -> tuple[Any, Callable[[], Callable]] | None:
    """``(owner, get_func)``: the object to key the cache on weakly and a closure returning ``func`` from a
    weak reference to it. A bound method is held through its instance (the method object itself is made
    afresh at every attribute access). ``None`` when ``func`` cannot be weakly referenced."""
    if inspect.ismethod(func):
        owner, unbound = func.__self__, func.__func__
        try:
            ref = weakref.ref(owner)
        except TypeError:
            return None
        return owner, lambda: types.MethodType(unbound, ref())
    try:
        ref = weakref.ref(func)
    except TypeError:
        return None
    return func, ref


def compiled_step(
    func: Callable, tab: ButcherTableau, shapes, user_norm, rtol, atol, compile_kwargs: dict
) -> Callable[..., tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]:
    """The compiled ``step([t, h], y, f0, rtol, atol) -> (y1, stages, ratio)`` of ``func``; float
    ``rtol``/``atol`` are compiled in (the step's own arguments are then ignored)."""
    rtol_c = rtol if isinstance(rtol, float) else None
    atol_c = atol if isinstance(atol, float) else None
    key = (
        getattr(func, "__func__", None),
        rtol_c,
        atol_c,
        tab.name,
        None if shapes is None else tuple(tuple(s) for s in shapes),
        user_norm,
        tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items())),
    )
    weak = _weak_func(func)
    if weak is None:  # e.g. a builtin: compiled afresh for this solve
        return torch.compile(
            _make_step(lambda: func, tab, shapes, user_norm, rtol_c, atol_c), **compile_kwargs
        )
    owner, get_func = weak
    per_owner = _CACHE.setdefault(owner, {})
    fn = per_owner.get(key)
    if fn is None:
        step = _make_step(get_func, tab, shapes, user_norm, rtol_c, atol_c)
        fn = per_owner[key] = torch.compile(step, **compile_kwargs)
    return fn
