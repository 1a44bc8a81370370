"""``adjoint_options={"compile": ...}``: the adjoint's backward evaluation as one ``torch.compile`` graph.

One evaluation of the backward dynamics is ``func(t, y)`` with an autograd graph and the
vector-Jacobian product ``−aᵀ ∂f/∂(y, θ[, t])`` of that graph. Eagerly that is two trips through the
dispatcher (the forward ops, recorded, then the autograd engine replaying their derivatives), each op a
kernel of its own: on small networks the Python and dispatcher time is several times the arithmetic.
Compiled, the product is traced by dynamo (``torch.autograd.grad`` inside the compiled region, with
``torch._dynamo.config.trace_autograd_ops`` on during the calls) and AOTAutograd into one graph of
forward and derivative ops; Inductor fuses them with the concatenation into the flat backward state,
and no autograd graph is built at run time.

The graph reaches ``func`` as the forward's compiled step does (``_integrate/compiled_step.py``: weakly
through its closure, plain functions through a per-code-object slot), so a new solve with the same
``func`` reuses it, and takes ``(t, y, a, *θ)`` as tensors: new times, states and parameter values never
recompile; a new shape, dtype or device does (``torch.compile``'s own guards). Compiled evaluations are
cached per ``func``, layout of the backward state and compile options, and hold for the parameter
tensors they were compiled with: other ``θ`` (``adjoint_params`` another subset or order of the tensors
``func`` reads) compile afresh, as ``torch.compile`` does not guard how an argument aliases a global
tensor ``func`` reads (the graph would keep differentiating the first ones). Where the dynamics are linear in
the adjoint (``"interpolating"``, ``"quadrature"``), a second graph serves the evaluations at an output
time: it also returns the evaluation after the jump ``a += dL/dy(t_i)``, a second product of the same
forward, so a jump costs no evaluation. The first backward pass pays the compilation (seconds with
Inductor on a CPU, more with a cold cache).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator

import torch

from neuralode._integrate.compiled_step import holder, own_code

__all__ = ["compiled_available", "compiled_backward_eval", "compiled_evals", "tracing_settings"]

# Read by dynamo while it traces, which can happen on any call (a new shape, dtype or grad mode):
# torch.autograd.grad traced into the graph, and integer attributes of modules (evaluation counters,
# ``self.nfe += 1``) as dynamic values, not constants that fail the guard at every call.
_SETTINGS = ("trace_autograd_ops", "allow_unspec_int_on_nn_module")


def compiled_available() -> bool:
    """Whether this torch can trace ``torch.autograd.grad`` into a compiled graph."""
    return hasattr(torch._dynamo.config, _SETTINGS[0])


@contextlib.contextmanager
def tracing_settings() -> Iterator[None]:
    """The dynamo settings the compiled evaluation is traced with, switched on for a backward pass (once
    per pass: setting them costs ~5 µs each, as much per evaluation as a small network's kernels)."""
    cfg = torch._dynamo.config
    off = [n for n in _SETTINGS if hasattr(cfg, n) and not getattr(cfg, n)]
    for n in off:
        setattr(cfg, n, True)
    try:
        yield
    finally:
        for n in off:
            setattr(cfg, n, False)


def _make_eval(
    get_func: Callable[[], Callable], shapes, y_shape, with_y: bool, t_grad: bool, n_params: int, jump: bool
) -> Callable:
    sizes = None if shapes is None else [math.prod(s) for s in shapes]

    def backward_eval(tt, y, a, *args):
        """``(out, f, out_jump)``: ``out = [f?, −aᵀ∂f/∂y, −aᵀ∂f/∂θ, −aᵀ∂f/∂t?]`` flat in ``a``'s dtype
        (``f`` first for backsolve), ``f = func(tt, y)`` flat when ``t_grad`` (for the jumps' ``dL/dt_i``),
        else None. ``tt`` 0-d, ``y`` and ``a`` flat; ``args`` the parameters, after the jump ``g`` (flat)
        when ``jump``: then ``out_jump`` is ``out`` at ``a + g``, as ``out`` plus the products with ``−g``
        of the same graph (the dynamics are linear in ``a``), else None."""
        func = get_func()
        g_jump, params = (args[0], args[1:]) if jump else (None, args)
        with torch.enable_grad():
            y_ = y.detach().reshape(y_shape).requires_grad_(True)
            tt_ = tt.detach().requires_grad_(True) if t_grad else tt
            if sizes is None:
                fy = func(tt_, y_)
            else:
                parts = tuple(p.view(s) for p, s in zip(y_.split(sizes), shapes))
                fy = torch.cat([o.reshape(-1) for o in func(tt_, parts)])
            inputs = (y_, *params, tt_) if t_grad else (y_, *params)
            if fy.requires_grad:
                grads = torch.autograd.grad(fy, inputs, -a.view_as(fy), allow_unused=True, retain_graph=jump)
                if jump:
                    extra = torch.autograd.grad(fy, inputs, -g_jump.view_as(fy), allow_unused=True)
            else:  # f depends on nothing differentiable
                grads = extra = (None,) * len(inputs)
        fy = fy.detach().reshape(-1)
        out = flat([fy] if with_y else [], grads, inputs, a.dtype)
        return out, fy if t_grad else None, out + flat([], extra, inputs, a.dtype) if jump else None

    def flat(out, grads, inputs, dtype):
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        out.extend(g.reshape(-1).to(dtype) for g in grads[: 1 + n_params])
        if t_grad:
            out.append(grads[-1].reshape(1).to(dtype))
        return torch.cat(out)

    name = f"neuralode_adjoint_{'backsolve' if with_y else 'state'}_{'jump_' if jump else ''}eval"
    return own_code(backward_eval, name)


def compiled_backward_eval(
    func: Callable,
    shapes,
    y_shape,
    with_y: bool,
    t_grad: bool,
    n_params: int,
    compile_kwargs: dict,
    jump: bool = False,
    params: tuple[torch.Tensor, ...] = (),
) -> tuple[Callable, Callable[[], None]]:
    """``(evaluate, release)``: the compiled ``evaluate(t, y, a, *θ) -> (out, f or None, None)`` of the
    backward dynamics of ``func`` (see ``backward_eval`` above; ``shapes``: a tuple state's part shapes or
    None, ``y_shape`` the shape ``func`` sees a plain state in, ``with_y``: backsolve's layout with ``f``
    first, ``t_grad``: the product with respect to ``t`` too, ``n_params``: how many ``θ``), and the
    function to call when the backward solve is over. ``jump`` (not with ``with_y``): ``evaluate(t, y, a,
    g, *θ) -> (out, f or None, out at a + g)``, for an evaluation at an output time where ``a`` jumps by
    ``g``. ``params``: the ``θ`` it will be called with (``n_params`` of them); a cached evaluation
    compiled for other tensors is compiled afresh. Call ``evaluate`` inside :func:`tracing_settings`."""
    if jump and with_y:
        raise ValueError("the jump evaluation needs dynamics linear in the state (not backsolve's)")
    key = (
        "adjoint",
        getattr(func, "__func__", None),
        None if shapes is None else tuple(tuple(s) for s in shapes),
        tuple(y_shape),
        with_y,
        t_grad,
        n_params,
        tuple(sorted((k, repr(v)) for k, v in compile_kwargs.items())),
        jump,
    )

    def make(get_func):
        fn = _make_eval(get_func, shapes, y_shape, with_y, t_grad, n_params, jump)
        return torch.compile(fn, **compile_kwargs)

    held = holder(func)
    if held is None:  # e.g. a builtin: compiled afresh for this backward pass
        return make(lambda: func), _release_nothing
    cache, get_func, release = held
    entry = cache.get(key)
    if entry is None or len(entry[1]) != len(params) or any(r() is not p for r, p in zip(entry[1], params)):
        entry = cache[key] = (make(get_func), tuple(weakref.ref(p) for p in params))
    return entry[0], release


def _release_nothing() -> None:
    pass


@contextlib.contextmanager
def compiled_evals(
    func: Callable,
    shapes,
    y_shape,
    with_y: bool,
    t_grad: bool,
    params: tuple[torch.Tensor, ...],
    compile_kwargs: dict,
) -> Iterator[tuple[Callable, Callable | None]]:
    """For one backward pass (arguments as :func:`compiled_backward_eval`, ``params`` the ``θ``):
    ``(evaluate, at_jump)``, the compiled evaluation and, where the dynamics are linear in the state (not
    ``with_y``), its variant at the jumps (None for backsolve), called under :func:`tracing_settings`;
    released at the end."""
    layout = (shapes, y_shape, with_y, t_grad, len(params), compile_kwargs)
    evaluate, release = compiled_backward_eval(func, *layout, params=params)
    at_jump = None if with_y else compiled_backward_eval(func, *layout, jump=True, params=params)[0]
    try:
        with tracing_settings():
            yield evaluate, at_jump
    finally:
        release()
