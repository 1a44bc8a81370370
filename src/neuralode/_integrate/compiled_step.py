"""``options={"compile": ...}``: one ``torch.compile`` graph per explicit Runge-Kutta step.

In eager mode every stage combination, every time value and every piece of the error estimate is a
kernel launch of its own (about 7 per function evaluation for dopri5), each costing microseconds of
Python and dispatcher time: on small networks that is as much as the network itself. Compiled, the
whole step (every ``func`` call, the stage combinations and the error ratio) is one graph; Inductor fuses
the combinations into the network's kernels. The loop around it (accept/reject, step-size control, dense
output, events, ``step_t``/``jump_t``, callbacks) is the ordinary one in ``_integrate/adaptive.py``, so
everything ``odeint`` does still works; steps that must evaluate ``func`` as a one-sided limit at a
``jump_t`` run eagerly. On a fixed grid the step of a non-FSAL method also evaluates its first stage
inside the graph (so only ``interp="linear"`` without ``perturb`` is offered: neither needs that stage
afterwards).

The step takes the time and step size as one float64 tensor ``[t, h]``, so a new step size never
recompiles (as 0-d tensors or floats they would be guarded as Python scalars, through a slower Python
guard function); float tolerances are constants of the graph, tensor tolerances its inputs. It
reaches ``func`` through a weak reference in its closure: passed as an argument, an ``nn.Module``'s
guards (every parameter's metadata) cost more per call than the compiled step saves. Compiled steps are
cached per ``func`` (weakly: the cache keeps no model alive; a plain function, lambdas included, per
code object through :class:`_FunctionSlot`), method, state layout, norm and compile options, each with
a code object of its own so that ``torch.compile``'s recompile limit counts per cache entry; a new input
shape, dtype or device recompiles (``torch.compile``'s own guards). The first solve pays the
compilation (seconds to tens of seconds with Inductor on a CPU).
"""

from __future__ import annotations

import inspect
import math
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from neuralode._solvers.rk import ROWS, coefficients, error_ratio, rk_step
from neuralode._solvers.tableau import ButcherTableau
from neuralode._step_size import make_norm, rms_rows

__all__ = ["check_compile_option", "compiled_step", "dynamo_flags", "holder", "own_code"]

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DEFAULTS = {"fullgraph": False, "dynamic": None}


def check_compile_option(value: Any, what: str = "options") -> dict | None:
    """``options["compile"]`` (``what``: the name of the dict, for the error messages): ``False``/``None``
    (off), ``True`` (Inductor defaults) or a dict of ``torch.compile`` keyword arguments (e.g.
    ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune"}``). Returns the keyword arguments, or
    ``None`` when off."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(_DEFAULTS)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{what}['compile'] as a dict must have torch.compile keyword names as keys")
        return {**_DEFAULTS, **value}
    raise TypeError(
        f"{what}['compile'] must be a bool or a dict of torch.compile keyword arguments, "
        f"got {type(value).__name__}"
    )


def _make_step(
    get_func: Callable[[], Callable], tab: ButcherTableau, shapes, user_norm, rtol_c, atol_c, rows=None
) -> Callable:
    # The step reads the tableau as plain data (its cached properties take a lock on first use, which
    # would break the graph).
    co = coefficients(tab)
    if rows is None:
        sizes = None if shapes is None else [math.prod(s) for s in shapes]
        norm = make_norm(user_norm, sizes, shapes)
    else:
        state_shape, groups = rows

        def norm(x):
            return rms_rows(x, groups)

    def step(th, y, f0, rtol_t, atol_t):
        """``(y1, stages, error ratio)`` of one step of size ``h`` from ``(t, y)``; ``th = [t, h]``
        (float64), or per sample (``rows``) the pair ``(t, h)`` of ``(B,)`` tensors with ``y`` of shape
        ``(B, n)`` and a ratio per row. ``rtol_t``/``atol_t`` are used where the float tolerances
        ``rtol_c``/``atol_c`` are None. ``f0=None`` evaluates the first stage inside the graph; a
        fixed-step tableau's ratio is None."""
        func = get_func()
        t, h = th[0], th[1]
        rtol = rtol_t if rtol_c is None else rtol_c
        atol = atol_t if atol_c is None else atol_c
        if rows is not None:

            def call(tt, yy):
                return func(tt.to(yy.dtype), yy.view(state_shape)).reshape(yy.shape)

            hy = h.to(y.dtype).unsqueeze(1)
        elif shapes is None:

            def call(tt, yy):
                return func(tt.to(yy.dtype), yy)

            hy = h.to(y.dtype)
        else:

            def call(tt, yy):
                parts = tuple(p.view(s) for p, s in zip(yy.split(sizes), shapes))
                return torch.cat([o.reshape(-1) for o in func(tt.to(yy.dtype), parts)])

            hy = h.to(y.dtype)
        hp = (hy, h)
        y1, k = rk_step(call, co, t, hp, y, f0, ROWS)
        if not co.b_error_nonzero:
            return y1, k, None
        with torch.no_grad():
            ks = [x.detach() for x in k]
            r = error_ratio(co, ks, hp, y.detach(), y1.detach(), rtol, atol, norm, ROWS)
        return y1, k, r

    return own_code(step, f"neuralode_{tab.name}_{'rows_' if rows is not None else ''}step")


def own_code(fn: types.FunctionType, name: str) -> types.FunctionType:
    """``fn`` with a code object of its own, named ``name``: ``torch.compile`` keeps its cache, and its
    recompile limit, per code object, so each cache entry gets both to itself."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class _FunctionSlot:
    """A stable stand-in for a plain Python function, lambdas included.

    ``odeint(lambda t, y: net(y), ...)`` in a training loop makes a new function object every iteration:
    keyed on it, every solve would trace and compile again (~0.2 s each with Inductor's cache warm). The
    slot is one function per code object with closure cells of its own; for a solve they are filled
    with the user's function's cell contents (the same ``net`` every time, so ``torch.compile``'s guards
    pass) and emptied afterwards, so the cache keeps no model alive between solves.
    """

    def __init__(self, func: types.FunctionType):
        self.cells = tuple(types.CellType() for _ in func.__closure__ or ())
        self.fn = types.FunctionType(
            func.__code__, func.__globals__, func.__name__, func.__defaults__, self.cells or None
        )
        self.fn.__kwdefaults__ = func.__kwdefaults__
        self.steps: dict = {}

    def bind(self, func: types.FunctionType) -> None:
        for mine, theirs in zip(self.cells, func.__closure__ or ()):
            mine.cell_contents = theirs.cell_contents
        self.fn.__defaults__, self.fn.__kwdefaults__ = func.__defaults__, func.__kwdefaults__

    def release(self) -> None:
        for cell in self.cells:
            try:
                del cell.cell_contents
            except ValueError:  # already empty
                pass


_SLOTS: dict = {}  # code object -> _FunctionSlot


def holder(func: Callable) -> tuple[dict, Callable[[], Callable], Callable[[], None]] | None:
    """``(steps, get_func, release)``: the cache of compiled steps for ``func``, a closure returning the
    callable the step calls, and what to call when the solve ends. Plain functions go through a
    :class:`_FunctionSlot`; a bound method is held weakly through its instance (the method object is
    made afresh at every attribute access); other callables (``nn.Module``) weakly. ``None`` when
    ``func`` can be neither."""
    if isinstance(func, types.FunctionType):
        if any(_empty(c) for c in func.__closure__ or ()):
            return None
        slot = _SLOTS.get(func.__code__)
        if slot is None:
            slot = _SLOTS[func.__code__] = _FunctionSlot(func)
        slot.bind(func)
        return slot.steps, lambda: slot.fn, slot.release
    if inspect.ismethod(func):
        owner, unbound = func.__self__, func.__func__
        try:
            ref = weakref.ref(owner)
        except TypeError:
            return None
        return _CACHE.setdefault(owner, {}), lambda: types.MethodType(unbound, ref()), _noop
    try:
        ref = weakref.ref(func)
    except TypeError:
        return None
    return _CACHE.setdefault(func, {}), ref, _noop


def _empty(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return True
    return False


def _noop() -> None:
    pass


def compiled_step(
    func: Callable, tab: ButcherTableau, shapes, user_norm, rtol, atol, compile_kwargs: dict, rows=None
) -> tuple[Callable[..., tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]], Callable[[], None]]:
    """``(step, release)``: the compiled ``step([t, h], y, f0, rtol, atol) -> (y1, stages, ratio)`` of
    ``func`` (float ``rtol``/``atol`` are compiled in; the step's own arguments are then ignored), and
    the function to call when the solve is over (it drops the references a plain function's slot holds).
    ``rows=(state_shape, groups)``: the per-sample step ``step((t, h), y, f0, rtol, atol)``, a time and
    step size per row, on the flat ``(B, n)`` state (``func`` sees ``state_shape``), with a ratio per row
    (the RMS over each row, or the max over its column ``groups`` of each group's RMS)."""
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
        None if rows is None else (tuple(rows[0]), None if rows[1] is None else tuple(rows[1])),
    )

    def make(get_func):
        return _make_step(get_func, tab, shapes, user_norm, rtol_c, atol_c, rows)

    held = holder(func)
    if held is None:  # e.g. a builtin: compiled afresh for this solve
        return dynamo_flags(torch.compile(make(lambda: func), **compile_kwargs)), _noop
    steps, get_func, release = held
    fn = steps.get(key)
    if fn is None:
        fn = steps[key] = dynamo_flags(torch.compile(make(get_func), **compile_kwargs))
    return fn, release


def dynamo_flags(fn: Callable, *extra: str) -> Callable:
    """``fn`` traced with integer attributes of modules as dynamic values (and the dynamo settings named
    in ``extra`` switched on).

    Vector fields often count their own evaluations (``self.nfe += 1``, as in torchdiffeq's examples). By
    default dynamo specialises on such an integer, so every call fails the guard and recompiles, until the
    recompile limit drops the step to eager. The settings are read while tracing, which can happen on any
    call (a new shape, dtype or grad mode), so they are switched on around every call (~4 µs) rather than
    changed for the whole process. Settings this torch does not have are left out.
    """
    cfg = torch._dynamo.config
    names = [n for n in ("allow_unspec_int_on_nn_module", *extra) if hasattr(cfg, n)]
    if not names:  # older torch
        return fn

    def call(*args):
        off = [n for n in names if not getattr(cfg, n)]
        if not off:
            return fn(*args)
        for n in off:
            setattr(cfg, n, True)
        try:
            return fn(*args)
        finally:
            for n in off:
                setattr(cfg, n, False)

    return call
