"""Continuous normalizing flows (Chen et al. 2018 §4; FFJORD, Grathwohl et al. 2019; RNODE, Finlay et al.
2020).

A CNF moves samples with ``dz/dt = f(t, z)`` and tracks the log-density with the instantaneous change of
variables ``d log p(z(t))/dt = -tr(∂f/∂z)``. The solver integrates the augmented state as a **tuple**
``(z, dlogp, *regularisers)`` with shapes ``(B, D), (B,), (B,)...``; nothing is packed into a column.

Conventions (as in the paper's code): the base density sits at ``t = 0`` and the data at ``t = T``.
Internally every solve runs on the unit interval ``s ∈ [0, 1]`` with ``t = s·T`` and the vector field
multiplied by ``T``; this makes a learnable end time ``T`` an ordinary parameter, so it trains with every
gradient method, the adjoint included, without needing gradients with respect to the output times.

Divergence: ``"exact"`` takes ``D`` vector-Jacobian products in one batched autograd call (cost O(D²),
fine for 2-D); ``"hutchinson"`` takes one VJP ``εᵀ ∂f/∂z`` with noise ``ε`` (``"gaussian"`` or
``"rademacher"``) **drawn once per solve** and held fixed through it (and through its adjoint backward
solve). Each solve builds a fresh :class:`CNFDynamics` holding its noise; nothing is re-sampled or
written to a module during a solve.

RNODE regularisers (optional states, per sample, in physical time):
``kinetic = ∫ ½·mean_d f_d² dt`` and ``jacobian = ∫ mean_d (εᵀ∂f/∂z)_d² dt`` (the Hutchinson product
reused; with the exact divergence the exact ``‖∂f/∂z‖_F² / D``), the per-dimension means of the RNODE code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import neuralode
from neuralode import SolveStats, record_stats

__all__ = [
    "CNF",
    "DIVERGENCES",
    "NOISES",
    "CNFDynamics",
    "CNFOutput",
    "ConcatSquashLinear",
    "ConcatSquashMLP",
    "GatedPlanarField",
    "divergence_exact",
    "divergence_hutchinson",
    "sample_noise",
]

DIVERGENCES = ("exact", "hutchinson")
NOISES = ("gaussian", "rademacher")
_GRADIENTS = ("direct", "adjoint", "checkpoint")


# --- vector fields ------------------------------------------------------------------------------------


class GatedPlanarField(nn.Module):
    """The paper's CNF vector field: ``M`` gated planar units whose parameters are functions of ``t``.

    ``f(t, z) = (1/M) Σ_n σ_n(t) u_n(t) tanh(w_n(t)ᵀ z + b_n(t))`` with a hypernetwork
    ``t → Linear(1, H)–tanh–Linear(H, H)–tanh–Linear(H, 2·M·D + 2·M)`` producing ``W, U`` (``M × D``),
    ``b`` and the gate logits (``M``). One scalar gate per unit as in the paper (§4, eq. 10); the
    authors' later example gates per unit and dimension. The mean over units (instead of the paper's sum)
    follows that example and only rescales ``U``.

    Args:
        dim: ``D``. width: ``M`` (number of planar units). hidden: ``H``, hypernetwork width.

    ``forward(t, z)``: ``t`` 0-d, ``z`` ``(B, D)`` → ``(B, D)``. ``divergence(t, z)``: the analytic trace
    ``(1/M) Σ_n σ_n (u_nᵀ w_n) tanh'(w_nᵀ z + b_n)``, ``(B,)``, used in tests.
    """

    def __init__(self, dim: int = 2, width: int = 64, hidden: int = 32):
        super().__init__()
        _check_pos_int(dim, "dim")
        _check_pos_int(width, "width")
        _check_pos_int(hidden, "hidden")
        self.dim, self.width = dim, width
        self.hyper = nn.Sequential(
            nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 2 * width * dim + 2 * width),
        )  # fmt: skip

    def _params(self, t: torch.Tensor, like: torch.Tensor):
        p = self.hyper(t.reshape(1, 1).to(like.dtype)).reshape(-1)
        m, d = self.width, self.dim
        w = p[: m * d].reshape(m, d)
        u = p[m * d : 2 * m * d].reshape(m, d)
        b = p[2 * m * d : 2 * m * d + m]
        gate = torch.sigmoid(p[2 * m * d + m :])
        return w, u, b, gate

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w, u, b, gate = self._params(t, z)
        h = torch.tanh(z @ w.T + b)  # (B, M)
        return (h * gate) @ u / self.width

    def divergence(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w, u, b, gate = self._params(t, z)
        h = torch.tanh(z @ w.T + b)
        return ((1 - h**2) * (gate * (u * w).sum(-1))).sum(-1) / self.width

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}"


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-conditioned linear layer: ``(W x + b) · sigmoid(a_g t + c_g) + a_b t``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.shift = nn.Linear(1, d_out, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(1, 1).to(x.dtype)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


class ConcatSquashMLP(nn.Module):
    """FFJORD's toy/tabular vector field: concat-squash layers ``D → H1 → … → Hk → D`` with activations.

    Args:
        dim: ``D``. hidden: hidden widths, e.g. ``(64, 64, 64)`` (FFJORD's toy default).
        activation: ``"tanh"`` (FFJORD toy default), ``"softplus"`` or ``"elu"``.
    """

    def __init__(self, dim: int = 2, hidden: Sequence[int] = (64, 64, 64), activation: str = "tanh"):
        super().__init__()
        _check_pos_int(dim, "dim")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is unknown; expected one of {sorted(_ACTIVATIONS)}")
        hidden = tuple(hidden)
        for h in hidden:
            _check_pos_int(h, "hidden")
        sizes = (dim, *hidden, dim)
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in itertools.pairwise(sizes))
        self.act = _ACTIVATIONS[activation]()
        self.dim = dim

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = z
        for i, layer in enumerate(self.layers):
            x = layer(t, x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x


# --- divergence ---------------------------------------------------------------------------------------


def divergence_exact(
    f: torch.Tensor, z: torch.Tensor, *, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``tr(∂f/∂z)`` of ``f (B, D)`` w.r.t. ``z (B, D)`` by ``D`` VJPs batched in one autograd call.

    Returns ``(div, sq_frobenius)``, both ``(B,)``; ``sq_frobenius = ‖∂f/∂z‖_F²``.
    """
    d = z.shape[-1]
    eye = torch.eye(d, dtype=f.dtype, device=f.device).unsqueeze(1).expand(d, *f.shape)
    (rows,) = torch.autograd.grad(f, z, eye, create_graph=create_graph, is_grads_batched=True)  # (D, B, D)
    div = torch.diagonal(rows, dim1=0, dim2=2).sum(-1)
    return div, rows.pow(2).sum((0, 2))


def divergence_hutchinson(
    f: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, *, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's ``εᵀ (∂f/∂z) ε`` with one VJP; returns ``(estimate, εᵀJ)``, shapes ``(B,)``,
    ``(B, D)``."""
    (e_j,) = torch.autograd.grad(f, z, noise, create_graph=create_graph)
    return (e_j * noise).sum(-1), e_j


def sample_noise(like: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-mean, identity-covariance noise shaped like ``like``: ``"gaussian"`` or ``"rademacher"`` (±1)."""
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ValueError(f"noise={kind!r} is unknown; expected one of {NOISES}")


# --- dynamics of one solve ---------------------------------------------------------------------------


class CNFDynamics(nn.Module):
    """The augmented dynamics of ONE solve on ``s ∈ [0, 1]``: ``(z, dlogp, *regs) ↦ (T f, -T div, ...)``.

    Built fresh for every solve by :class:`CNF`; ``noise`` (for the Hutchinson estimator) is fixed at
    construction and never re-drawn, so the adaptive solver sees deterministic dynamics, and an adjoint
    backward solve sees the same ones. ``n_evals`` counts calls (a fallback NFE counter; the canonical
    counts come from ``neuralode.record_stats``).
    """

    def __init__(
        self,
        field: nn.Module,
        end_time: nn.Module,
        *,
        divergence: str,
        noise: torch.Tensor | None,
        regularize: bool,
    ):
        super().__init__()
        self.field = field
        self.end_time = end_time
        self.divergence = divergence
        self.noise = noise
        self.regularize = regularize
        self.n_evals = 0

    def forward(self, s: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.n_evals += 1
        z = state[0]
        big_t = self.end_time()
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            t = s.to(z.dtype) * big_t
            f = self.field(t, z)
            if self.divergence == "exact":
                div, sq_fro = divergence_exact(f, z, create_graph=keep_graph)
                jac_rate = sq_fro / z.shape[-1]
            else:
                div, e_j = divergence_hutchinson(f, z, self.noise, create_graph=keep_graph)
                jac_rate = e_j.pow(2).mean(-1)
        out = [big_t * f, -big_t * div]
        if self.regularize:
            out.append(big_t * 0.5 * f.pow(2).mean(-1))
            out.append(big_t * jac_rate)
        if not keep_graph:
            out = [o.detach() for o in out]
        return tuple(out)


class _FlowDynamics(nn.Module):
    """Only the points: ``z ↦ T f(sT, z)`` on ``s ∈ [0, 1]`` (for moving points without log-densities)."""

    def __init__(self, field: nn.Module, end_time: nn.Module):
        super().__init__()
        self.field, self.end_time = field, end_time
        self.n_evals = 0

    def forward(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.n_evals += 1
        big_t = self.end_time()
        return big_t * self.field(s.to(z.dtype) * big_t, z)


class _EndTime(nn.Module):
    """``T``: a plain float when fixed (exact, dtype-neutral), ``sqrt_t²`` when learnable (FFJORD)."""

    def __init__(self, value: float, learnable: bool):
        super().__init__()
        self.value = value
        self.sqrt_t = nn.Parameter(torch.tensor(math.sqrt(value))) if learnable else None

    def forward(self) -> torch.Tensor | float:
        return self.value if self.sqrt_t is None else self.sqrt_t**2


@dataclasses.dataclass
class CNFOutput:
    """What :meth:`CNF.forward` returns for a data batch ``x (B, D)``.

    Attributes:
        log_prob: ``log p(x)``, ``(B,)`` nats. z: the base points ``z(0)``, ``(B, D)``.
        kinetic, jacobian: RNODE integrals per sample ``(B,)`` (``None`` when not regularising).
        stats: the solve's statistics (``stats.backward`` fills in at ``backward()``).
    """

    log_prob: torch.Tensor
    z: torch.Tensor
    kinetic: torch.Tensor | None
    jacobian: torch.Tensor | None
    stats: SolveStats
    dynamics: CNFDynamics


class CNF(nn.Module):
    """A continuous normalizing flow with a Gaussian base density at ``t = 0`` and data at ``t = T``.

    Args:
        field: the vector field module, ``field(t, z)`` with ``z (B, D)`` → ``(B, D)``
            (:class:`GatedPlanarField`, :class:`ConcatSquashMLP`, or your own).
        dim: ``D``.
        end_time: ``T > 0``; ``learn_end_time=True`` trains it (parameterised as ``sqrt_t²``).
        base_std: standard deviation of the isotropic Gaussian base density.
        divergence: ``"exact"`` or ``"hutchinson"``; ``noise``: ``"gaussian"`` or ``"rademacher"``.
        method, rtol, atol, options: solver settings (passed to ``neuralode.odeint``).
        gradient: ``"direct"`` (backprop through the solver), ``"adjoint"`` or ``"checkpoint"``.
        adjoint_rtol, adjoint_atol, adjoint_options: for the adjoint backward solve, e.g.
            ``adjoint_options={"norm": "seminorm"}``.
        regularize: integrate the RNODE states (kinetic energy, Jacobian Frobenius norm).

    Shapes: data ``x (B, D)``; ``log_prob(x)`` → ``(B,)``; ``sample(n)`` → ``(n, D)``.
    ``last_stats`` holds the statistics of the most recent solve.
    """

    def __init__(
        self,
        field: nn.Module,
        dim: int,
        *,
        end_time: float = 1.0,
        learn_end_time: bool = False,
        base_std: float = 1.0,
        divergence: str = "exact",
        noise: str = "gaussian",
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: dict[str, Any] | None = None,
        gradient: str = "direct",
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        adjoint_options: dict[str, Any] | None = None,
        regularize: bool = False,
    ):
        super().__init__()
        if not isinstance(field, nn.Module):
            raise TypeError(f"field must be an nn.Module with forward(t, z), got {type(field).__name__}")
        _check_pos_int(dim, "dim")
        if not (isinstance(end_time, (int, float)) and end_time > 0):
            raise ValueError(f"end_time must be a positive number, got {end_time!r}")
        if not (isinstance(base_std, (int, float)) and base_std > 0):
            raise ValueError(f"base_std must be a positive number, got {base_std!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r} is unknown; expected one of {DIVERGENCES}")
        if noise not in NOISES:
            raise ValueError(f"noise={noise!r} is unknown; expected one of {NOISES}")
        if gradient not in _GRADIENTS:
            raise ValueError(f"gradient={gradient!r} is not supported by CNF; expected one of {_GRADIENTS}")
        self.field, self.dim = field, dim
        self.end_time = _EndTime(float(end_time), learn_end_time)
        self.base_std = float(base_std)
        self.divergence, self.noise = divergence, noise
        self.method, self.rtol, self.atol, self.options = method, rtol, atol, options
        self.gradient = gradient
        self.adjoint_rtol, self.adjoint_atol, self.adjoint_options = (
            adjoint_rtol,
            adjoint_atol,
            adjoint_options,
        )
        self.regularize = regularize
        self.last_stats: SolveStats = SolveStats(backward=SolveStats())

    # -- densities --

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log N(z; 0, base_std² I)``, ``(B, D) -> (B,)``."""
        var = self.base_std**2
        return -0.5 * z.pow(2).sum(-1) / var - 0.5 * z.shape[-1] * math.log(2 * math.pi * var)

    def base_sample(self, n: int, *, dtype=None, device=None, generator=None) -> torch.Tensor:
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        return self.base_std * torch.randn(n, self.dim, dtype=dtype, device=device, generator=generator)

    def forward(self, x: torch.Tensor, *, divergence: str | None = None, at: float = 1.0) -> CNFOutput:
        """Integrate data ``x (B, D)`` from ``t = at·T`` (default the data end) down to ``t = 0``.

        Returns ``log p_t(x)`` (the flow's density at that time), the base points, the regularisers.
        """
        self._check_x(x)
        z0, dlogp, regs, stats, dyn = self._solve(x, torch.zeros_like(x[:, 0]), (at, 0.0), divergence)
        z0, dlogp = z0[-1], dlogp[-1]
        # d(dlogp)/dt = -tr integrated from t down to 0 gives dlogp(0) = ∫_0^t tr dt, and
        # log p_t(x) = log p_0(z(0)) - ∫_0^t tr dt (instantaneous change of variables).
        log_prob = self.base_log_prob(z0) - dlogp
        kin = jac = None
        if regs:  # integrated from t down to 0, so the integrals come out negated
            kin, jac = -regs[0][-1], -regs[1][-1]
        return CNFOutput(log_prob, z0, kin, jac, stats, dyn)

    def log_prob(self, x: torch.Tensor, *, divergence: str | None = None, at: float = 1.0) -> torch.Tensor:
        """``log p(x)`` in nats, ``(B, D) -> (B,)``. ``divergence`` overrides the module's for this call;
        ``at`` in ``(0, 1]`` gives the density of the flow at time ``at·T`` (Figure 5's panels)."""
        return self.forward(x, divergence=divergence, at=at).log_prob

    def sample(
        self,
        n: int | None = None,
        *,
        z: torch.Tensor | None = None,
        times: Sequence[float] | torch.Tensor | None = None,
        with_log_prob: bool = False,
        divergence: str | None = None,
    ):
        """Push base samples (``n`` fresh ones, or the given ``z (B, D)``) from ``t = 0`` to ``t = T``.

        ``times``: fractions of ``T`` in ``[0, 1]``, increasing from 0 to 1, to return the whole path
        ``(len(times), B, D)`` (Figure 5's panels); default only the end, ``(B, D)``.
        ``with_log_prob``: also integrate and return ``log q`` of the returned points (same leading shape).
        """
        if z is None:
            if n is None:
                raise ValueError("sample needs n (number of samples) or z (base points)")
            z = self.base_sample(n)
        self._check_x(z, "z")
        grid = (0.0, 1.0) if times is None else times
        if not with_log_prob:
            zs = self._move(z, grid)
            return zs[-1] if times is None else zs
        zs, logp, _regs, _stats, _ = self._solve(z, self.base_log_prob(z), grid, divergence, regularize=False)
        if times is None:
            zs, logp = zs[-1], logp[-1]
        return zs, logp

    def transform(self, x: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
        """Move points ``x (B, D)`` from time ``s_from·T`` to ``s_to·T`` without log-densities
        (e.g. data → base with ``(1, 0)``)."""
        self._check_x(x)
        return self._move(x, (s_from, s_to))[-1]

    def _move(self, z, grid):
        dyn = _FlowDynamics(self.field, self.end_time)
        zs, _ = self._integrate(dyn, z, grid)
        return zs

    # -- the solve --

    def _solve(self, z, logp, grid, divergence, regularize=None):
        divergence = self.divergence if divergence is None else divergence
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r} is unknown; expected one of {DIVERGENCES}")
        regularize = self.regularize if regularize is None else regularize
        noise = sample_noise(z, self.noise) if divergence == "hutchinson" else None  # once per solve
        dyn = CNFDynamics(
            self.field, self.end_time, divergence=divergence, noise=noise, regularize=regularize
        )
        state: tuple[torch.Tensor, ...] = (z, logp)
        if regularize:
            state = (*state, torch.zeros_like(logp), torch.zeros_like(logp))
        ys, stats = self._integrate(dyn, state, grid)
        return ys[0], ys[1], ys[2:], stats, dyn

    def _integrate(self, dyn: nn.Module, state, grid):
        """One solve of ``dyn`` over the grid of ``s`` values with the configured gradient method."""
        like = state[0] if isinstance(state, tuple) else state
        t = torch.as_tensor(grid, dtype=like.dtype, device=like.device)
        kw = {"rtol": self.rtol, "atol": self.atol, "method": self.method, "options": self.options}
        with record_stats() as stats:
            if self.gradient == "direct" or not torch.is_grad_enabled():
                ys = neuralode.odeint(dyn, state, t, **kw)
            elif self.gradient == "adjoint":
                ys = neuralode.odeint_adjoint(
                    dyn, state, t, **kw, adjoint_rtol=self.adjoint_rtol, adjoint_atol=self.adjoint_atol,
                    adjoint_options=self.adjoint_options, adjoint_params=tuple(dyn.parameters()),
                )  # fmt: skip
            else:  # "checkpoint"
                ys = _odeint_checkpoint()(dyn, state, t, **kw)
        self.last_stats = stats
        return ys, stats

    def _check_x(self, x, name="x"):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor of shape (B, {self.dim}), got {got}")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, divergence={self.divergence!r}, noise={self.noise!r}, method={self.method!r}, "
            f"rtol={self.rtol}, atol={self.atol}, gradient={self.gradient!r}, regularize={self.regularize}"
        )


def _odeint_checkpoint():
    fn = getattr(neuralode, "odeint_checkpoint", None)
    if fn is None:
        raise ValueError('gradient="checkpoint" needs neuralode.odeint_checkpoint, which this build lacks')
    return fn


def _check_pos_int(v, name):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
