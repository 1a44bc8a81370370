"""Noisy 2-D spirals, half clockwise and half counter-clockwise (paper §5.1, Table 2, Figure 8).

The recipe (every number is a field of :class:`SpiralConfig`):

* A grid of ``n_grid`` angles ``θ_k = k · θ_max / (n_grid − 1)``, ``θ_max = 6π`` (torchdiffeq's
  ``examples/latent_ode.py``, whose script effectively uses ``n_grid = 500``).
* Counter-clockwise spiral (Archimedean): ``r = a + b θ``, ``x = (r cos θ + 5, r sin θ)``.
  Clockwise spiral, ``clockwise_shape``:

  - ``"mirror"`` (default): the mirror image of the counter-clockwise one,
    ``x = (−r cos θ − 5, r sin θ)``, ``r = a + b θ``: both directions have the same shape and scale.
  - ``"hyperbolic"`` (torchdiffeq's example): ``θ' = θ_max + 1 − θ``, ``r = a + 50 b / θ'``,
    ``x = (r cos θ' − 5, r sin θ')``; its radius grows like 1/(c − t), which a latent ODE trained on
    100-step windows extrapolates badly (see docs/latent.md).

  Defaults ``a = 0``, ``b = 0.3``. The paper names neither shape nor scale.
* Exactly half of the ``n_spirals`` spirals turn each way; a fixed random ``n_train`` of them are the
  training set, the rest the test set (fixed by ``seed``). ``n_val`` of the ``n_train`` training
  spirals are set aside as the validation set (model selection); the model is fitted on the other
  ``n_train − n_val``. The test set does not depend on ``n_val``. A validation spiral is a window like
  a test spiral's (below), so validation measures what the test measures.
* A test spiral is a window of ``window = 200`` consecutive grid points starting at a uniformly random
  index in ``[0, start_max]``; ``start_max = 250`` keeps every point at grid index ≤ 449 (radius
  ≤ 5.1; the hyperbolic clockwise radius stays ≤ 5.2 there too). A training spiral is a window of
  ``n_context = 100`` points (the paper's length) starting uniformly in ``[0, start_max + window −
  n_context]``, so the training windows cover the same grid range [0, 449] as the test windows, their
  futures included: extrapolation asks for the future of a spiral never seen, not for a part of the
  curve family no training spiral ever reached. Points 100..199 of training spirals are NaN (unused).
  With ``train_horizon = H > n_context`` (the forecasting objective) a training spiral has ``H`` points
  (start uniform in ``[0, start_max + window − H]``); an encoder still sees only its ``n_obs`` observed
  points of the first ``n_context``, and the likelihood may also use its points ``n_context .. H − 1``
  (:meth:`SpiralData.training`). Test spirals' futures are never used for training.
  All windows share the time stamps ``t_i = i · θ_max / (n_grid − 1)``, ``i = 0..199`` (the dynamics
  are time-invariant, so this is legal); ``t`` runs over [0, 7.5].
* I.i.d. Gaussian noise of std ``noise_std`` (default 0.3, torchdiffeq's value; the paper does not
  give one) on both coordinates of every point.
* Protocol of Table 2: each spiral is observed at ``n_obs`` distinct grid indices drawn uniformly
  without replacement from the first ``n_context = 100``; a model predicts the next 100 points
  (indices 100..199). The observation pattern is fixed per (``seed``, ``n_obs``); the spirals and their
  noise do not depend on ``n_obs``, so the 30/50/100 rows see the same curves.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from neuralode.datasets.irregular import IrregularBatch

__all__ = ["SpiralConfig", "SpiralData", "make_spirals", "spiral_points"]


@dataclasses.dataclass(frozen=True)
class SpiralConfig:
    """Every knob of the spiral data set; see the module docstring for what each means."""

    n_spirals: int = 1000
    n_train: int = 800
    n_val: int = 0
    n_grid: int = 500
    theta_max: float = 6 * math.pi
    window: int = 200
    n_context: int = 100
    start_max: int = 250
    a: float = 0.0
    b: float = 0.3
    clockwise_shape: str = "mirror"
    noise_std: float = 0.3
    n_obs: int = 30
    seed: int = 0
    train_horizon: int | None = None

    @property
    def horizon(self) -> int:
        """Length of a training spiral (``train_horizon``, default ``n_context``)."""
        return self.n_context if self.train_horizon is None else self.train_horizon

    def __post_init__(self):
        def bad(name, expected):
            raise ValueError(f"SpiralConfig.{name}={getattr(self, name)!r} is invalid; expected {expected}")

        if self.n_spirals < 2:
            bad("n_spirals", "an integer ≥ 2")
        if not 1 <= self.n_train < self.n_spirals:
            bad("n_train", f"1 ≤ n_train < n_spirals={self.n_spirals}")
        if not 0 <= self.n_val < self.n_train:
            bad("n_val", f"0 ≤ n_val < n_train={self.n_train} (some training spirals must remain)")
        if not 2 <= self.n_context <= self.window:
            bad("n_context", f"2 ≤ n_context ≤ window={self.window}")
        if self.start_max < 0 or self.start_max + self.window > self.n_grid:
            bad("start_max", f"0 ≤ start_max ≤ n_grid − window = {self.n_grid - self.window}")
        if not 1 <= self.n_obs <= self.n_context:
            bad("n_obs", f"1 ≤ n_obs ≤ n_context={self.n_context}")
        if not self.n_context <= self.horizon <= self.window:
            bad("train_horizon", f"n_context={self.n_context} ≤ train_horizon ≤ window={self.window}")
        if self.noise_std < 0:
            bad("noise_std", "≥ 0")
        if self.clockwise_shape not in ("mirror", "hyperbolic"):
            bad("clockwise_shape", "'mirror' or 'hyperbolic'")

    @property
    def dt(self) -> float:
        """Time between consecutive grid points."""
        return self.theta_max / (self.n_grid - 1)


def spiral_points(theta: torch.Tensor, clockwise: torch.Tensor, cfg: SpiralConfig) -> torch.Tensor:
    """Noise-free points ``(..., 2)`` of the spirals at grid angles ``theta`` (``clockwise`` broadcasts)."""
    ccw_r = cfg.a + cfg.b * theta
    ccw = torch.stack([ccw_r * torch.cos(theta) + 5.0, ccw_r * torch.sin(theta)], dim=-1)
    if cfg.clockwise_shape == "mirror":
        cw = torch.stack([-ccw_r * torch.cos(theta) - 5.0, ccw_r * torch.sin(theta)], dim=-1)
    else:
        th_cw = cfg.theta_max + 1.0 - theta
        cw_r = cfg.a + 50.0 * cfg.b / th_cw
        cw = torch.stack([cw_r * torch.cos(th_cw) - 5.0, cw_r * torch.sin(th_cw)], dim=-1)
    return torch.where(clockwise.unsqueeze(-1), cw, ccw)


@dataclasses.dataclass(frozen=True)
class SpiralData:
    """The generated data set.

    Attributes:
        config: the recipe.
        times: ``(window,)`` shared time stamps.
        clean: ``(n_spirals, window, 2)`` noise-free points.
        noisy: ``(n_spirals, window, 2)`` points with noise (what models see).
        clockwise: ``(n_spirals,)`` bool direction.
        starts: ``(n_spirals,)`` grid index of each window's first point.
        obs_mask: ``(n_spirals, window)`` bool: the ``n_obs`` observed indices, all in the first
            ``n_context``.
        train_idx, val_idx, test_idx: ``(n_train − n_val,)``, ``(n_val,)``, ``(n_spirals − n_train,)``
            index tensors, pairwise disjoint.
    """

    config: SpiralConfig
    times: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor
    clockwise: torch.Tensor
    starts: torch.Tensor
    obs_mask: torch.Tensor
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    val_idx: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def split(self, name: str) -> torch.Tensor:
        """Indices of the ``"train"``, ``"val"`` or ``"test"`` spirals."""
        if name == "train":
            return self.train_idx
        if name == "test":
            return self.test_idx
        if name == "val":
            if self.val_idx.numel() == 0:
                raise ValueError("split='val' is empty: the data set was made with n_val=0")
            return self.val_idx
        raise ValueError(f"split={name!r} is unknown; expected 'train', 'val' or 'test'")

    def observed(self, split: str | torch.Tensor) -> IrregularBatch:
        """The observations (noisy values at the observed indices) of a split or index tensor, as an
        :class:`IrregularBatch` on the union of their times."""
        idx = self.split(split) if isinstance(split, str) else split
        return IrregularBatch.from_grid(self.times, self.noisy[idx], self.obs_mask[idx])

    def training(self, idx: torch.Tensor | None = None) -> tuple[IrregularBatch, torch.Tensor]:
        """Training data on the full time grid: an :class:`IrregularBatch` whose mask marks every point
        the likelihood may use (the observed points of the first ``n_context`` steps, plus every point of
        steps ``n_context .. train_horizon − 1``), and the ``(B, window)`` mask of what an encoder may see
        (the observed points only). With ``train_horizon == n_context`` both masks are ``obs_mask``."""
        idx = self.train_idx if idx is None else idx
        cfg = self.config
        steps = torch.arange(cfg.window)
        future = ((steps >= cfg.n_context) & (steps < cfg.horizon)).unsqueeze(0).expand(len(idx), -1)
        enc = self.obs_mask[idx]
        target = enc | future
        vals = torch.where(target.unsqueeze(-1), self.noisy[idx], torch.zeros_like(self.noisy[idx]))
        return IrregularBatch(self.times, vals, target), enc

    @property
    def context_slice(self) -> slice:
        return slice(0, self.config.n_context)

    @property
    def future_slice(self) -> slice:
        return slice(self.config.n_context, self.config.window)


def make_spirals(config: SpiralConfig | None = None, **overrides) -> SpiralData:
    """Generate the data set deterministically from ``config`` (fields can be overridden by keyword)."""
    cfg = config or SpiralConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_spirals
    clockwise = torch.zeros(n, dtype=torch.bool)
    clockwise[: n // 2] = True
    clockwise = clockwise[torch.randperm(n, generator=gen)]
    perm = torch.randperm(n, generator=gen)
    fit = cfg.n_train - cfg.n_val
    train_idx, val_idx = perm[:fit].sort().values, perm[fit : cfg.n_train].sort().values
    test_idx = perm[cfg.n_train :].sort().values
    is_train = torch.zeros(n, dtype=torch.bool)
    is_train[train_idx] = True
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    last_start = torch.where(is_train, cfg.start_max + cfg.window - cfg.horizon, cfg.start_max)
    starts = (u * (last_start + 1)).floor().long()
    grid_k = (starts.unsqueeze(1) + torch.arange(cfg.window)).clamp(max=cfg.n_grid - 1)
    theta = torch.linspace(0.0, cfg.theta_max, cfg.n_grid, dtype=torch.float64)[grid_k]  # (n, window)
    clean = spiral_points(theta, clockwise.unsqueeze(1), cfg).float()
    noisy = clean + cfg.noise_std * torch.randn(clean.shape, generator=gen)
    unused = is_train.unsqueeze(1) & (torch.arange(cfg.window) >= cfg.horizon)
    clean = clean.masked_fill(unused.unsqueeze(-1), float("nan"))
    noisy = noisy.masked_fill(unused.unsqueeze(-1), float("nan"))
    # The observation pattern has its own generator so that it is the only thing n_obs changes.
    obs_gen = torch.Generator().manual_seed(cfg.seed * 1000 + cfg.n_obs)
    scores = torch.rand(n, cfg.n_context, generator=obs_gen)
    chosen = scores.argsort(dim=1)[:, : cfg.n_obs]
    obs_mask = torch.zeros(n, cfg.window, dtype=torch.bool)
    obs_mask.scatter_(1, chosen, True)
    times = (torch.arange(cfg.window, dtype=torch.float64) * cfg.dt).float()
    return SpiralData(cfg, times, clean, noisy, clockwise, starts, obs_mask, train_idx, test_idx, val_idx)
