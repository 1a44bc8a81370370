"""Step-size control: error norms, Hairer's initial step, integral and PI controllers.

All controller arithmetic is on Python floats: the error ratio is fetched once per step (the loop's one
host-device synchronisation), and everything after it costs no kernel launches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["Controller", "combine_dop853", "initial_step", "make_norm", "rms_norm"]

Norm = Callable[[torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over all elements (0-d tensor)."""
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


def combine_dop853(r: torch.Tensor, r3: torch.Tensor) -> torch.Tensor:
    """Hairer's DOP853 error ratio from the 5th-order (``r``) and 3rd-order (``r3``) estimates:
    ``r² / sqrt(r² + 0.01 r3²)`` (0 where both are 0); elementwise, so per-sample ratios work too."""
    den = torch.sqrt(r * r + 0.01 * r3 * r3)
    return torch.where(den > 0, r * r / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(r))


def make_norm(user_norm: Callable | None, sizes: Sequence[int] | None, shapes=None) -> Norm:
    """The error norm on the (flattened) state.

    Single tensor: ``user_norm`` or RMS. Tuple state (``sizes`` given): ``user_norm`` receives the tuple of
    tensors; the default is the max over the tensors of each one's RMS (torchdiffeq's mixed norm).
    """
    if sizes is None:
        return user_norm if user_norm is not None else rms_norm
    if user_norm is not None:

        def tuple_user_norm(x: torch.Tensor) -> torch.Tensor:
            parts = x.split(list(sizes))
            return torch.as_tensor(user_norm(tuple(p.view(s) for p, s in zip(parts, shapes))))

        return tuple_user_norm

    def mixed(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([rms_norm(p) for p in x.split(list(sizes))]).max()

    return mixed


@dataclasses.dataclass(frozen=True)
class Controller:
    """Integral (default) or PI step-size controller on the error ratio r (accept when r ≤ 1).

    ``factor = safety · r^(−(pcoeff+icoeff)/k) · r_prev^(pcoeff/k)``, clipped to ``[dfactor, ifactor]``
    (to ``[1, ifactor]`` after an accepted step, as torchdiffeq), ``k`` the method's order.
    ``pcoeff = 0, icoeff = 1`` is the classic integral controller.
    """

    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    pcoeff: float = 0.0
    icoeff: float = 1.0

    def factor(self, ratio: float, prev_ratio: float, accepted: bool) -> float:
        if not math.isfinite(ratio):
            return self.dfactor
        if ratio == 0.0:
            return self.ifactor
        k = self.order
        f = self.safety * ratio ** (-(self.pcoeff + self.icoeff) / k)
        if self.pcoeff:
            f *= max(prev_ratio, 1e-4) ** (self.pcoeff / k)
        lower = 1.0 if ratio < 1.0 else self.dfactor
        return min(self.ifactor, max(f, lower))


@torch.no_grad()
def initial_step(
    f: Callable[[float, torch.Tensor], torch.Tensor],
    t0: float,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    rtol,
    atol,
    norm: Norm,
    direction: float,
) -> float:
    """Hairer, Nørsett & Wanner (1993, II.4) starting step; one evaluation of ``f``. Returns |h|."""
    scale = y0.abs().mul_(rtol).add_(atol)
    if norm is rms_norm:  # both norms in one reduction, 1/sqrt(n) on the host: 7 kernels fewer
        inv_sqrt_n = 1.0 / math.sqrt(max(y0.numel(), 1))
        both = torch.stack([y0.reshape(-1), f0.reshape(-1)]).div_(scale.reshape(-1))
        d0, d1 = (v * inv_sqrt_n for v in torch.linalg.vector_norm(both, dim=1).tolist())
    else:
        d0, d1 = (
            float(v)
            for v in torch.stack(
                [torch.as_tensor(norm(y0 / scale)), torch.as_tensor(norm(f0 / scale))]
            ).tolist()
        )
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    f1 = f(t0 + direction * h0, torch.add(y0, f0, alpha=direction * h0))
    diff = torch.sub(f1, f0).div_(scale)
    if norm is rms_norm:
        d2 = float(torch.linalg.vector_norm(diff)) * inv_sqrt_n / h0
    else:
        d2 = float(norm(diff)) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return min(100 * h0, h1)
