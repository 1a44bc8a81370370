"""TEMPORARY: delegates to torchdiffeq while the real solver core is written. Must not land."""

import torchdiffeq


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    return torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options)


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, **kw):
    return torchdiffeq.odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, **kw)
