"""Latent ODE for irregularly sampled time series (Chen et al. 2018, §5; Rubanova et al. 2019).

Generative model: ``z(t0) ~ N(0, I)``; ``z(t) = ODESolve(z(t0), f, t0, t)`` with a time-invariant
``f``; each observation ``x(t_i) ~ N(decoder(z(t_i)), obs_std²)``. Recognition: an encoder run over
the observations in REVERSE time order outputs the mean and log-variance of ``q(z(t0) | x)``. Training
maximises the ELBO ``E_q[Σ_i log p(x_i | z(t_i))] − KL(q(z0) ‖ N(0, I))`` with one reparameterised
sample and the analytic Gaussian KL.

Observations are passed as ``(times, values, mask)``: ``times (T,)`` the sorted union of every sample's
observation times, ``values (B, T, D)`` and ``mask (B, T)`` bool (see
``neuralode.datasets.irregular.IrregularBatch``). The latent ODE is solved once for the batch on
``times``; the likelihood counts masked entries only.

Encoders:
    * :class:`RNNEncoder` (the paper's): a recurrent cell over the observations in reverse order, each
      input ``[x_i, gap to the previously processed observation, t_i − t0]``.
    * :class:`ODERNNEncoder` (Rubanova et al. 2019): between observations the hidden state follows an
      ODE backwards in time; at each observation a GRU cell updates it; finally it is evolved to ``t0``.

Optional Poisson-process likelihood of the observation times (paper §5): an intensity
``λ(z) ≥ 0``; ``log p(t_1..t_N) = Σ_i log λ(z(t_i)) − ∫_{t0}^{t_end} λ(z(t)) dt``, the integral
carried as an extra ODE state ``Λ`` in a tuple state ``(z, Λ)`` in the same solve.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from neuralode import NeuralODE

__all__ = [
    "ANCHORS",
    "ENCODERS",
    "LatentODE",
    "ODERNNEncoder",
    "RNNEncoder",
    "gaussian_kl",
    "gaussian_log_likelihood",
    "pack_observations",
]

ENCODERS = ("rnn", "ode-rnn")
ANCHORS = ("start", "end")


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, exp(logvar)) ‖ N(0, I))`` summed over the last dimension: shape ``mean.shape[:-1]``."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, std: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ log N(x; mean, std²)`` over time and feature dims (``(B, T, D)`` → ``(B,)``), masked by
    ``mask (B, T)`` when given."""
    ll = -0.5 * ((x - mean) / std).pow(2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    if mask is not None:
        ll = ll * mask.unsqueeze(-1).to(ll.dtype)
    return ll.sum(dim=(1, 2))


def pack_observations(
    times: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, pad_time: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-align each sample's observations: returns ``obs_t (B, N)``, ``obs_x (B, N, D)``,
    ``valid (B, N)`` with ``N = max_b n_b``, in increasing time. Padding entries have
    ``obs_t = pad_time``, ``obs_x = 0`` and ``valid = False``."""
    B = mask.shape[0]
    n = mask.sum(dim=1)
    N = max(int(n.max()), 1) if B else 1  # one host sync per batch, outside any solve
    # Stable sort puts observed entries (key 0) first, in time order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :N]
    valid = torch.arange(N, device=mask.device).unsqueeze(0) < n.unsqueeze(1)
    obs_t = torch.where(valid, times[order].to(values.dtype), torch.as_tensor(pad_time, dtype=values.dtype))
    obs_x = torch.gather(values, 1, order.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    obs_x = obs_x * valid.unsqueeze(-1).to(values.dtype)
    return obs_t, obs_x, valid


def _mlp(sizes: list[int], act: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _cell(kind: str, n_in: int, hidden: int) -> nn.Module:
    if kind == "gru":
        return nn.GRUCell(n_in, hidden)
    if kind == "rnn":
        return nn.RNNCell(n_in, hidden, nonlinearity="tanh")
    raise ValueError(f"cell={kind!r} is unknown; expected 'gru' or 'rnn'")


class LatentDynamics(nn.Module):
    """Time-invariant ``f(z)``: an MLP with ``layers`` hidden layers of ``hidden`` units and ``activation``
    (``"elu"``, torchdiffeq's example, or ``"tanh"``, which bounds ``|f|`` and so how fast ``z`` can run off
    into regions no training trajectory visited)."""

    def __init__(self, dim: int, hidden: int = 20, layers: int = 2, activation: str = "elu"):
        super().__init__()
        acts = {"elu": nn.ELU, "tanh": nn.Tanh}
        if activation not in acts:
            raise ValueError(f"activation={activation!r} is unknown; expected one of {tuple(acts)}")
        self.net = _mlp([dim] + [hidden] * layers + [dim], acts[activation])

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _WithIntensity(nn.Module):
    """Tuple-state field ``(z, Λ) ↦ (f(z), λ(z))`` for the Poisson-process likelihood."""

    def __init__(self, dynamics: nn.Module, intensity: nn.Module):
        super().__init__()
        self.dynamics, self.intensity = dynamics, intensity

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z, _ = state
        return self.dynamics(t, z), self.intensity(z)


class _RescaledField(nn.Module):
    """Tuple-state field ``(h, Δ) ↦ (Δ·f(h), 0)`` on ``s ∈ [0, 1]``: integrates ``dh/dt = f(h)`` over a
    per-sample interval of length ``Δ (B, 1)`` (negative runs backwards) in one batched solve."""

    def __init__(self, dynamics: nn.Module):
        super().__init__()
        self.dynamics = dynamics

    def forward(self, s: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        h, delta = state
        return delta * self.dynamics(s, h), torch.zeros_like(delta)


class RNNEncoder(nn.Module):
    """Recurrent recognition network run over the observations in reverse time order (the paper's), or
    in time order (``reverse=False``: its final state then summarises the data at the window's end).

    Input at observation ``i`` in reverse order: ``[x_i, t_prev − t_i, t_i − t0]``, where ``t_prev`` is
    the time of the previously processed (later) observation, ``t_end`` for the first processed one. In
    time order: ``[x_i, t_i − t_prev, t_end − t_i]`` with ``t_prev`` the earlier observation (``t0`` for
    the first). Gaps and distances are non-negative either way. Output: ``(mean, logvar)``, each
    ``(B, latent_dim)``.
    """

    def __init__(
        self, obs_dim: int, latent_dim: int, hidden: int = 25, cell: str = "gru", reverse: bool = True
    ):
        super().__init__()
        self.hidden, self.reverse = hidden, reverse
        self.cell = _cell(cell, obs_dim + 2, hidden)
        self.out = nn.Linear(hidden, 2 * latent_dim)

    def forward(self, times, values, mask, t0, t_end) -> tuple[torch.Tensor, torch.Tensor]:
        obs_t, obs_x, valid = pack_observations(times, values, mask, pad_time=t_end)
        B, N = valid.shape
        h = values.new_zeros(B, self.hidden)
        t_prev = obs_t.new_full((B,), float(t_end if self.reverse else t0))
        for k in range(N - 1, -1, -1) if self.reverse else range(N):
            tk = obs_t[:, k]
            gap, dist = (t_prev - tk, tk - t0) if self.reverse else (tk - t_prev, t_end - tk)
            inp = torch.cat([obs_x[:, k], gap.unsqueeze(1), dist.unsqueeze(1)], dim=1)
            h = torch.where(valid[:, k : k + 1], self.cell(inp, h), h)
            t_prev = tk
        mean, logvar = self.out(h).chunk(2, dim=-1)
        return mean, logvar


class ODERNNEncoder(nn.Module):
    """ODE-RNN run backwards in time (Rubanova et al. 2019): ``h`` starts at zero at ``t_end``, follows
    ``dh/dt = g(h)`` back to each observation, where a GRU cell takes ``x_i``; after the earliest one it
    is evolved to ``t0``. Per-sample intervals are handled in one solve per step by rescaling time to
    ``s ∈ [0, 1]`` (see :class:`_RescaledField`). ``method``/``options`` choose the encoder's solver
    (default: two RK4 steps per interval)."""

    def __init__(
        self,
        obs_dim: int,
        latent_dim: int,
        hidden: int = 25,
        ode_hidden: int = 25,
        method: str = "rk4",
        options: dict[str, Any] | None = None,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        gradient: str = "direct",
    ):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(obs_dim, hidden)
        if options is None and method in ("euler", "midpoint", "rk4"):
            options = {"step_size": 0.5}
        # tanh (bounded, as in Rubanova et al.'s code) and a zero last layer: h starts out constant between
        # observations and cannot be driven into the GRU's saturated range by long gaps.
        dyn = LatentDynamics(hidden, ode_hidden, layers=1, activation="tanh")
        nn.init.zeros_(dyn.net[-1].weight)
        nn.init.zeros_(dyn.net[-1].bias)
        self.ode = NeuralODE(
            _RescaledField(dyn), t=(0.0, 1.0), method=method, rtol=rtol, atol=atol, options=options,
            gradient=gradient,
        )  # fmt: skip
        self.out = _mlp([hidden, hidden, 2 * latent_dim], nn.Tanh)

    def _evolve(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        hs, _ = self.ode((h, delta.unsqueeze(1)), t=s)
        return hs[-1]

    def forward(self, times, values, mask, t0, t_end) -> tuple[torch.Tensor, torch.Tensor]:
        obs_t, obs_x, valid = pack_observations(times, values, mask, pad_time=t_end)
        B, N = valid.shape
        h = values.new_zeros(B, self.hidden)
        t_prev = obs_t.new_full((B,), float(t_end))
        for k in range(N - 1, -1, -1):
            tk = obs_t[:, k]  # padding sits at t_end, so its interval is empty
            h = self._evolve(h, tk - t_prev)
            h = torch.where(valid[:, k : k + 1], self.cell(obs_x[:, k], h), h)
            t_prev = tk
        h = self._evolve(h, torch.as_tensor(t0, dtype=h.dtype) - t_prev)
        mean, logvar = self.out(h).chunk(2, dim=-1)
        return mean, logvar


class LatentODE(nn.Module):
    """Variational latent ODE model.

    Args:
        obs_dim: observation dimension ``D``.
        latent_dim: ``z`` dimension (paper: 4).
        encoder: ``"rnn"`` (paper) or ``"ode-rnn"`` (Rubanova et al. 2019).
        enc_hidden: encoder hidden units (paper: 25). enc_cell: ``"gru"`` or ``"rnn"`` (RNN encoder).
        dyn_hidden, dyn_layers, dyn_activation: the latent dynamics MLP (torchdiffeq example: 2 layers of
            20, ELU).
        dec_hidden: decoder hidden units (one ReLU layer; paper: 20).
        obs_std: the likelihood's fixed observation noise std.
        method, rtol, atol, options, gradient: the latent ODE solve (see :class:`neuralode.NeuralODE`).
        poisson: also model the observation times with a Poisson process (adds ``poisson_loglik``).
        poisson_weight: weight of that term in the objective.
        anchor: where the posterior lives. ``"start"`` (the paper): ``q(z(t0))``, encoder in reverse time,
            the latent ODE runs forwards through the window and on into the future. ``"end"``:
            ``q(z(t_end))`` from the encoder run in time order; the window is reconstructed by solving
            backwards from ``t_end`` and the future forwards, so extrapolation starts from the latest
            data instead of integrating across the whole window first (RNN encoder only, no Poisson term).
    """

    def __init__(
        self,
        obs_dim: int = 2,
        latent_dim: int = 4,
        *,
        encoder: str = "rnn",
        enc_hidden: int = 25,
        enc_cell: str = "gru",
        dyn_hidden: int = 20,
        dyn_layers: int = 2,
        dyn_activation: str = "elu",
        dec_hidden: int = 20,
        obs_std: float = 0.3,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        options: dict[str, Any] | None = None,
        gradient: str = "direct",
        poisson: bool = False,
        poisson_weight: float = 1.0,
        encoder_method: str = "rk4",
        anchor: str = "start",
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder={encoder!r} is unknown; expected one of {ENCODERS}")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor={anchor!r} is unknown; expected one of {ANCHORS}")
        if anchor == "end" and (encoder != "rnn" or poisson):
            raise ValueError("anchor='end' needs encoder='rnn' and poisson=False")
        self.anchor = anchor
        if obs_std <= 0:
            raise ValueError(f"obs_std must be > 0, got {obs_std}")
        self.latent_dim, self.obs_std = latent_dim, float(obs_std)
        self.poisson, self.poisson_weight = poisson, float(poisson_weight)
        if encoder == "rnn":
            self.encoder: nn.Module = RNNEncoder(
                obs_dim, latent_dim, enc_hidden, cell=enc_cell, reverse=anchor == "start"
            )
        else:
            self.encoder = ODERNNEncoder(
                obs_dim,
                latent_dim,
                enc_hidden,
                method=encoder_method,
                rtol=rtol,
                atol=atol,
                gradient=gradient,
            )
        self.dynamics = LatentDynamics(latent_dim, dyn_hidden, dyn_layers, dyn_activation)
        self.decoder = _mlp([latent_dim, dec_hidden, obs_dim], nn.ReLU)
        field: nn.Module = self.dynamics
        if poisson:
            self.intensity = nn.Sequential(_mlp([latent_dim, dyn_hidden, 1], nn.ReLU), nn.Softplus())
            field = _WithIntensity(self.dynamics, self.intensity)
        self.ode = NeuralODE(field, method=method, rtol=rtol, atol=atol, options=options, gradient=gradient)

    # -- inference ---------------------------------------------------------------------------------
    def anchor_time(self, t0, t_end):
        """The time of the encoded state: ``t0`` (``anchor="start"``) or ``t_end``."""
        return t0 if self.anchor == "start" else t_end

    def encode(self, times, values, mask, t0=None, t_end=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logvar)`` of ``q(z(t_a) | observations)``, each ``(B, latent_dim)``, at the anchor
        time ``t_a = anchor_time(t0, t_end)``. ``t0`` defaults to ``times[0]``, ``t_end`` (end of the
        observation window) to ``times[-1]``."""
        _check_obs(times, values, mask)
        t0 = times[0] if t0 is None else torch.as_tensor(t0, dtype=times.dtype)
        t_end = times[-1] if t_end is None else torch.as_tensor(t_end, dtype=times.dtype)
        return self.encoder(times, values, mask, t0.to(values.dtype), t_end.to(values.dtype))

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp()

    # -- generation --------------------------------------------------------------------------------
    def latent_trajectory(self, z0: torch.Tensor, t0: float | torch.Tensor, times: torch.Tensor):
        """``z(times)`` from ``z(t0) = z0`` (``(B, L)``) → ``(B, T, L)``. ``times`` is 1-D and sorted;
        points before ``t0`` are reached by integrating backwards. With ``poisson``, returns the tuple
        ``(z, Λ)`` with ``Λ (B, T, 1) = ∫_{t0}^{t} λ``."""
        if times.dim() != 1:
            raise ValueError(f"times must be 1-D (T,), got shape {tuple(times.shape)}")
        t0 = torch.as_tensor(t0, dtype=times.dtype, device=times.device).reshape(())
        state0: Any = (z0, z0.new_zeros(z0.shape[0], 1)) if self.poisson else z0
        pieces = []
        before, after = times[times < t0], times[times >= t0]
        if before.numel():  # backwards in time: t0 > before[-1] > ... > before[0]
            grid = torch.cat([t0.reshape(1), before.flip(0)])
            pieces.append(_map(lambda y: y[1:].flip(0), self.ode(state0, t=grid)))
        if after.numel():
            starts_at_t0 = bool(after[0] == t0)
            grid = after if starts_at_t0 else torch.cat([t0.reshape(1), after])
            ys = self.ode(state0, t=grid)
            pieces.append(ys if starts_at_t0 else _map(lambda y: y[1:], ys))
        if len(pieces) == 2:
            out = _map2(lambda a, b: torch.cat([a, b], dim=0), pieces[0], pieces[1])
        else:
            out = pieces[0]
        return _map(lambda y: y.transpose(0, 1), out)  # (T, B, ·) → (B, T, ·)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def predict(self, z0: torch.Tensor, t0, times: torch.Tensor) -> torch.Tensor:
        """Decoded means ``(B, T, D)`` at ``times`` (any sorted times, forwards or backwards of ``t0``)."""
        zs = self.latent_trajectory(z0, t0, times)
        return self.decode(zs[0] if self.poisson else zs)

    # -- objective ---------------------------------------------------------------------------------
    def elbo(
        self, times, values, mask, t0=None, t_end=None, kl_weight: float = 1.0, encoder_mask=None
    ) -> dict[str, torch.Tensor]:
        """One-sample ELBO per sample and its parts (all ``(B,)``): ``elbo``, ``loglik``, ``kl`` and, with
        ``poisson``, ``poisson_loglik``; ``loss`` is the batch mean of
        ``−(loglik + w·poisson − kl_weight·kl)``
        (a scalar); ``pred`` ``(B, T, D)`` are the decoded means at ``times``.

        ``encoder_mask`` ``(B, T)`` (default ``mask``): the entries the encoder sees; ``mask`` then selects
        the entries of the likelihood, which may include points after ``t_end`` (a forecasting objective:
        the encoder sees the observed window, the decoder is also scored on the future)."""
        _check_obs(times, values, mask)
        enc_mask = mask if encoder_mask is None else encoder_mask
        if enc_mask.shape != mask.shape or enc_mask.dtype != torch.bool:
            raise ValueError(f"encoder_mask must be a bool tensor of shape {tuple(mask.shape)}, got "
                             f"{enc_mask.dtype} {tuple(enc_mask.shape)}")  # fmt: skip
        t0 = times[0] if t0 is None else torch.as_tensor(t0, dtype=times.dtype)
        t_end = times[-1] if t_end is None else torch.as_tensor(t_end, dtype=times.dtype)
        mean, logvar = self.encode(times, values, enc_mask, t0, t_end)
        z0 = self.sample(mean, logvar)
        t_a = self.anchor_time(t0, t_end)
        out: dict[str, torch.Tensor] = {}
        if self.poisson:
            if encoder_mask is not None and bool(times[-1] > t_end):
                raise ValueError("the Poisson likelihood needs t_end ≥ times[-1] (no forecasting objective)")
            add_end = bool(t_end > times[-1])
            grid = torch.cat([times, t_end.reshape(1)]) if add_end else times
            zs, lam_int = self.latent_trajectory(z0, t0, grid)
            if add_end:
                zs = zs[:, :-1]
            log_lam = torch.log(self.intensity(zs).squeeze(-1) + 1e-8)  # (B, T)
            lam_int_t0 = 0.0  # Λ(t0) = 0 by construction
            out["poisson_loglik"] = (log_lam * enc_mask.to(log_lam.dtype)).sum(1) - (
                lam_int[:, -1, 0] - lam_int_t0
            )
        else:
            zs = self.latent_trajectory(z0, t_a, times)
        pred = self.decode(zs)
        loglik = gaussian_log_likelihood(values, pred, self.obs_std, mask)
        kl = gaussian_kl(mean, logvar)
        elbo = loglik - kl
        objective = loglik - kl_weight * kl
        if self.poisson:
            elbo = elbo + out["poisson_loglik"]
            objective = objective + self.poisson_weight * out["poisson_loglik"]
        out.update(elbo=elbo, loglik=loglik, kl=kl, loss=-objective.mean(), pred=pred, z0=z0, mean=mean)
        return out


def _map(fn, y):
    return tuple(fn(v) for v in y) if isinstance(y, tuple) else fn(y)


def _map2(fn, a, b):
    return tuple(fn(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) else fn(a, b)


def _check_obs(times: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
    if times.dim() != 1:
        raise ValueError(f"times must be 1-D (T,), got shape {tuple(times.shape)}")
    if values.dim() != 3 or values.shape[1] != times.shape[0]:
        raise ValueError(f"values must be (B, T={times.shape[0]}, D), got {tuple(values.shape)}")
    if mask.shape != values.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(values.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")  # fmt: skip
