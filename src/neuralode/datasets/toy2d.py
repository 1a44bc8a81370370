"""Two-dimensional toy densities: sampled data sets and evaluable target energies.

Data sets (FFJORD's ``lib/toy_data.py`` recipes, re-implemented in torch, see ``docs/cnf.md``):
``moons``, ``circles``, ``8gaussians``, ``pinwheel``, ``checkerboard``, ``2spirals``, ``rings``,
``swissroll``. ``sample_toy(name, n, generator=g)`` returns a ``(n, 2)`` float tensor (``pinwheel``:
``5 * (n // 5)`` rows). ``moons``/``circles``/``swissroll`` follow scikit-learn's generators exactly
(evenly spaced angles, then shuffled) without importing scikit-learn.

``gaussians8_log_prob(x)`` is the exact log-density of ``8gaussians`` (a mixture of 8 isotropic
Gaussians), so a model's held-out NLL can be compared with the true one. ``moons_log_prob`` and
``circles_log_prob`` give the large-``n`` limit of those data sets (uniform on the arcs, blurred by the
Gaussian noise) by quadrature: reference NLLs (``REFERENCE_LOG_PROBS`` maps names to all three).

Density-matching targets (paper Figure 4): the paper does not name its three targets (they appear only
as images). **Substitution**: we use Rezende & Mohamed (2015, Table 1)'s unnormalised energies
``U1``..``U4`` with ``p(z) ∝ exp(-U(z))`` (``U2``..``U4`` plus a soft wall at ``|z1| = 4`` that makes
them normalisable); ``TARGET_ENERGIES`` maps names to functions ``(N, 2) -> (N,)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "REFERENCE_LOG_PROBS",
    "TARGET_ENERGIES",
    "TOY_DATASETS",
    "circles_log_prob",
    "gaussians8_log_prob",
    "moons_log_prob",
    "sample_toy",
    "target_log_normalizer",
]

_Sampler = Callable[[int, torch.Generator], torch.Tensor]


def _randn(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def _rand(n: int, g: torch.Generator, d: int | None = None) -> torch.Tensor:
    shape = (n,) if d is None else (n, d)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _shuffle(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return x[torch.randperm(x.shape[0], generator=g)]


def _moons(n: int, g: torch.Generator) -> torch.Tensor:
    # sklearn.datasets.make_moons(n, noise=0.1), then *2 and shift by (-1, -0.2) [FFJORD].
    n_out = n // 2
    n_in = n - n_out
    a_out = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    a_in = torch.linspace(0, math.pi, n_in, dtype=torch.float64)
    outer = torch.stack([a_out.cos(), a_out.sin()], dim=1)
    inner = torch.stack([1 - a_in.cos(), 1 - a_in.sin() - 0.5], dim=1)
    x = _shuffle(torch.cat([outer, inner]), g) + 0.1 * _randn(n, 2, g)
    return 2 * x + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def _circles(n: int, g: torch.Generator) -> torch.Tensor:
    # sklearn.datasets.make_circles(n, factor=0.5, noise=0.08), then *3 [FFJORD].
    n_out = n // 2
    n_in = n - n_out
    a_out = torch.linspace(0, 2 * math.pi, n_out + 1, dtype=torch.float64)[:-1]
    a_in = torch.linspace(0, 2 * math.pi, n_in + 1, dtype=torch.float64)[:-1]
    outer = torch.stack([a_out.cos(), a_out.sin()], dim=1)
    inner = 0.5 * torch.stack([a_in.cos(), a_in.sin()], dim=1)
    x = _shuffle(torch.cat([outer, inner]), g) + 0.08 * _randn(n, 2, g)
    return 3 * x


_G8_SCALE = 4.0
_G8_STD = 0.5
_G8_DIV = 1.414  # FFJORD divides by the literal 1.414, not sqrt(2)


def _g8_centres(dtype=torch.float64) -> torch.Tensor:
    a = torch.arange(8, dtype=dtype) * (math.pi / 4)
    return _G8_SCALE * torch.stack([a.cos(), a.sin()], dim=1)


def _gaussians8(n: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, 8, (n,), generator=g)
    x = _g8_centres()[idx] + _G8_STD * _randn(n, 2, g)
    return x / _G8_DIV


def gaussians8_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Exact ``log p(x)`` of the ``8gaussians`` data, ``(N, 2) -> (N,)``, in nats.

    The data are ``(c_k + 0.5 ε) / 1.414`` with ``k`` uniform over 8 centres ``c_k = 4 (cos, sin)(k π/4)``,
    i.e. an equal-weight mixture of ``N(c_k / 1.414, (0.5 / 1.414)^2 I)``.
    """
    _check_points(x, "x")
    mu = _g8_centres(x.dtype).to(x.device) / _G8_DIV
    s = _G8_STD / _G8_DIV
    d2 = ((x.unsqueeze(1) - mu) ** 2).sum(-1)  # (N, 8)
    comp = -0.5 * d2 / s**2 - math.log(2 * math.pi * s**2)
    return torch.logsumexp(comp, dim=1) - math.log(8)


def _arc_mixture_log_prob(x: torch.Tensor, centres: torch.Tensor, std: float) -> torch.Tensor:
    # In row blocks: the (rows, centres) distance matrix of a whole density grid would take gigabytes.
    rows = max(1, 2**22 // max(centres.shape[0], 1))
    const = math.log(2 * math.pi * std**2) + math.log(centres.shape[0])
    out = []
    for xb in x.to(torch.float64).split(rows):
        comp = torch.cdist(xb, centres).pow_(2).mul_(-0.5 / std**2)
        out.append(torch.logsumexp(comp, dim=1) - const)
    return (torch.cat(out) if out else x.new_zeros(0, dtype=torch.float64)).to(x.dtype)


def moons_log_prob(x: torch.Tensor, n_angles: int = 2000) -> torch.Tensor:
    """``log p(x)`` of ``moons`` for large ``n``: two half-circles (equal mass) blurred by ``N(0, 0.2² I)``,
    by quadrature over ``n_angles`` angles per arc (``(N, 2) -> (N,)``; accurate to ~1e-4 nats)."""
    _check_points(x, "x")
    a = (torch.arange(n_angles, dtype=torch.float64) + 0.5) * (math.pi / n_angles)
    outer = torch.stack([a.cos(), a.sin()], 1)
    inner = torch.stack([1 - a.cos(), 1 - a.sin() - 0.5], 1)
    centres = 2 * torch.cat([outer, inner]) + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    return _arc_mixture_log_prob(x, centres, 0.2)


def circles_log_prob(x: torch.Tensor, n_angles: int = 2000) -> torch.Tensor:
    """``log p(x)`` of ``circles`` for large ``n``: circles of radius 3 and 1.5 (equal mass) blurred by
    ``N(0, 0.24² I)``, by quadrature over ``n_angles`` angles per circle (``(N, 2) -> (N,)``)."""
    _check_points(x, "x")
    a = torch.arange(n_angles, dtype=torch.float64) * (2 * math.pi / n_angles)
    ring = torch.stack([a.cos(), a.sin()], 1)
    return _arc_mixture_log_prob(x, torch.cat([3 * ring, 1.5 * ring]), 0.24)


REFERENCE_LOG_PROBS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # filled below


def _pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    per = n // num_classes
    rads = torch.linspace(0, 2 * math.pi, num_classes + 1, dtype=torch.float64)[:-1]
    feats = _randn(num_classes * per, 2, g) * torch.tensor([radial_std, tangential_std], dtype=torch.float64)
    feats[:, 0] += 1.0
    labels = torch.arange(num_classes).repeat_interleave(per)
    angles = rads[labels] + rate * feats[:, 0].exp()
    c, s = angles.cos(), angles.sin()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (n, 2, 2)
    x = torch.einsum("ti,tij->tj", feats, rot)
    return 2 * _shuffle(x, g)


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    x1 = _rand(n, g) * 4 - 2
    x2_ = _rand(n, g) - torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2
    x2 = x2_ + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1)


def _spirals(n: int, g: torch.Generator) -> torch.Tensor:
    m = n // 2
    r = _rand(m, g).sqrt() * 540 * (2 * math.pi) / 360
    d1x = -r.cos() * r + _rand(m, g) * 0.5
    d1y = r.sin() * r + _rand(m, g) * 0.5
    arm = torch.stack([d1x, d1y], dim=1)
    x = torch.cat([arm, -arm]) / 3
    x = x + 0.1 * _randn(x.shape[0], 2, g)
    if x.shape[0] < n:  # odd n: one extra point from arm 1
        x = torch.cat([x, x[:1]])
    return x


def _rings(n: int, g: torch.Generator) -> torch.Tensor:
    n4 = n // 4
    sizes = [n - 3 * n4, n4, n4, n4]
    parts = []
    for radius, k in zip((1.0, 0.75, 0.5, 0.25), sizes):
        a = torch.linspace(0, 2 * math.pi, k + 1, dtype=torch.float64)[:-1]
        parts.append(radius * torch.stack([a.cos(), a.sin()], dim=1))
    x = 3 * torch.cat(parts)
    return _shuffle(x, g) + 0.08 * _randn(n, 2, g)


def _swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    # sklearn.datasets.make_swiss_roll(n, noise=1.0), keep coordinates 0 and 2, divide by 5.
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    _height = 21 * _rand(n, g)  # coordinate 1 (dropped); drawn to keep sklearn's draw order
    x = torch.stack([t * t.cos(), t * t.sin()], dim=1) + 1.0 * _randn(n, 2, g)
    return x / 5


REFERENCE_LOG_PROBS.update(moons=moons_log_prob, circles=circles_log_prob)
REFERENCE_LOG_PROBS["8gaussians"] = gaussians8_log_prob

TOY_DATASETS: dict[str, _Sampler] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _gaussians8,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "2spirals": _spirals,
    "rings": _rings,
    "swissroll": _swissroll,
}


def sample_toy(
    name: str,
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``n`` samples of the toy data set ``name`` as an ``(n, 2)`` tensor (``pinwheel``: ``5 * (n // 5)``).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones) or ``n < 1``.
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"data={name!r} is not a toy data set; expected one of {sorted(TOY_DATASETS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return TOY_DATASETS[name](n, generator).to(device=device, dtype=dtype)


# --- density-matching targets (Rezende & Mohamed 2015, Table 1; a labelled substitution) ------------------


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def _w2(z: torch.Tensor) -> torch.Tensor:
    return 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)


def _w3(z: torch.Tensor) -> torch.Tensor:
    return 3 * torch.sigmoid((z[:, 0] - 1) / 0.3)


def _u1(z: torch.Tensor) -> torch.Tensor:
    r = z.norm(dim=1)
    a = -0.5 * ((z[:, 0] - 2) / 0.6) ** 2
    b = -0.5 * ((z[:, 0] + 2) / 0.6) ** 2
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(a, b)


def _box(z: torch.Tensor) -> torch.Tensor:
    # U2..U4 do not confine z1, so exp(-U) is not normalisable; we add a soft wall at |z1| = 4 (the edge
    # of Rezende & Mohamed's plots). Inside the box the target is unchanged.
    return 0.5 * (torch.relu(z[:, 0].abs() - 4) / 0.4) ** 2


def _u2(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2 + _box(z)


def _u3(z: torch.Tensor) -> torch.Tensor:
    a = -0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2
    b = -0.5 * ((z[:, 1] - _w1(z) + _w2(z)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _box(z)


def _u4(z: torch.Tensor) -> torch.Tensor:
    a = -0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2
    b = -0.5 * ((z[:, 1] - _w1(z) + _w3(z)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _box(z)


TARGET_ENERGIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "U1": _u1,
    "U2": _u2,
    "U3": _u3,
    "U4": _u4,
}


def target_log_normalizer(name: str, *, half_width: float = 6.0, n: int = 1201) -> float:
    """``log Z = log ∫ exp(-U(z)) dz`` of a target by the trapezoid-free midpoint rule on a square grid.

    ``U2``..``U4`` carry a soft wall at ``|z1| = 4`` (see ``_box``) so that they are normalisable; the
    default grid ``[-6, 6]^2`` holds all but a negligible part of every target's mass.
    """
    if name not in TARGET_ENERGIES:
        raise ValueError(f"target={name!r} is not a target energy; expected one of {sorted(TARGET_ENERGIES)}")
    h = 2 * half_width / n
    c = -half_width + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    zz = torch.cartesian_prod(c, c)
    neg_u = -TARGET_ENERGIES[name](zz)
    return float(torch.logsumexp(neg_u, 0) + 2 * math.log(h))


def _check_points(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape (N, 2), got {got}")
