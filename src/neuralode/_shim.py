"""TEMPORARY: odeint_adjoint delegates to torchdiffeq until the adjoint lands. Must not land on main."""

import torchdiffeq


def odeint_adjoint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, **kw):
    return torchdiffeq.odeint_adjoint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options, **kw)
