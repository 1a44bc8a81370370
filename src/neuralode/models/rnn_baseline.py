"""Autoregressive RNN baseline for irregular time series (paper §5.1, Table 2).

The cell reads a sample's observations in time order and after each one predicts the next observation
(Gaussian likelihood with fixed std, so training is mean squared error). Two input variants, as in the
paper:

* ``time_input=False``: input ``x_i`` only (the plain RNN; it cannot know the gaps).
* ``time_input=True`` (default): input ``[x_i, Δt_i]`` with ``Δt_i`` the time to the point being
  predicted (the next observation in training; the next prediction time when extrapolating).

Extrapolation feeds the model's own predictions back in, one target time after another.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralode.models.latent_ode import _cell, _check_obs, gaussian_log_likelihood, pack_observations

__all__ = ["RNNBaseline"]


class RNNBaseline(nn.Module):
    """Args: obs_dim; hidden (paper: 25); cell ``"gru"`` or ``"rnn"``; time_input (see module docstring);
    obs_std: the fixed std of the Gaussian likelihood."""

    def __init__(
        self,
        obs_dim: int = 2,
        hidden: int = 25,
        *,
        cell: str = "gru",
        time_input: bool = True,
        obs_std: float = 0.3,
    ):
        super().__init__()
        if obs_std <= 0:
            raise ValueError(f"obs_std must be > 0, got {obs_std}")
        self.hidden, self.time_input, self.obs_std = hidden, time_input, float(obs_std)
        self.cell = _cell(cell, obs_dim + int(time_input), hidden)
        self.head = nn.Linear(hidden, obs_dim)

    def _step(self, x: torch.Tensor, dt: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        inp = torch.cat([x, dt.unsqueeze(1)], dim=1) if self.time_input else x
        return self.cell(inp, h)

    def _run(self, obs_t, obs_x, valid, next_t) -> tuple[torch.Tensor, torch.Tensor]:
        """Consume the packed observations; returns the one-step predictions ``(B, N, D)`` (prediction
        ``k`` is for the time ``next_t[:, k]``; entries past a sample's last observation are padding)
        and the hidden state after each sample's last observation ``(B, H)``."""
        B, N = valid.shape
        # ``valid`` is a prefix of each row (pack_observations left-aligns), so the cell may run through
        # the padding unmasked: the outputs at valid entries are the same, and the final state is read
        # at each row's last valid entry. The inputs and the head are batched over all steps at once.
        gaps = (next_t - obs_t).unsqueeze(-1)
        inp = torch.cat([obs_x, gaps], dim=-1) if self.time_input else obs_x
        h = obs_x.new_zeros(B, self.hidden)
        hs = [h]
        for k in range(N):
            h = self.cell(inp[:, k], h)
            hs.append(h)
        states = torch.stack(hs, dim=1)  # (B, N + 1, H); states[:, 0] is the initial state
        last = valid.sum(dim=1)  # 0 for a sample without observations: its initial state
        final = states[torch.arange(B, device=last.device), last]
        return self.head(states[:, 1:]), final

    def loss(self, times, values, mask) -> dict[str, torch.Tensor]:
        """Teacher-forced one-step-ahead negative log-likelihood: ``loss`` (scalar batch mean), ``loglik``
        ``(B,)``, ``pred`` ``(B, N−1, D)`` and ``target``/``target_valid`` on the packed layout."""
        _check_obs(times, values, mask)
        obs_t, obs_x, valid = pack_observations(times, values, mask, pad_time=times[-1])
        next_t = torch.cat([obs_t[:, 1:], obs_t[:, -1:]], dim=1)
        preds, _ = self._run(obs_t, obs_x, valid, next_t)
        pred, target, tvalid = preds[:, :-1], obs_x[:, 1:], valid[:, 1:]
        loglik = gaussian_log_likelihood(target, pred, self.obs_std, tvalid)
        return {"loss": -loglik.mean(), "loglik": loglik, "pred": pred, "target": target,
                "target_valid": tvalid, "target_times": obs_t[:, 1:]}  # fmt: skip

    def forecast(self, times, values, mask, targets: torch.Tensor) -> torch.Tensor:
        """Predict at sorted ``targets (T',)`` after each sample's last observation: ``(B, T', D)``.
        The first prediction uses the last observation and the gap to ``targets[0]``; later ones feed the
        previous prediction back."""
        _check_obs(times, values, mask)
        if targets.dim() != 1 or targets.numel() == 0:
            raise ValueError(f"targets must be a non-empty 1-D tensor, got shape {tuple(targets.shape)}")
        obs_t, obs_x, valid = pack_observations(times, values, mask, pad_time=times[-1])
        nxt_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        first = targets[0].to(obs_t.dtype)
        next_t = torch.where(nxt_valid, torch.cat([obs_t[:, 1:], obs_t[:, -1:]], dim=1), first)
        _, h = self._run(obs_t, obs_x, valid, next_t)
        y = self.head(h)
        out = [y]
        t_prev = targets[0]
        for t in targets[1:]:
            h = self._step(y, (t - t_prev).to(y.dtype).expand(y.shape[0]), h)
            y = self.head(h)
            out.append(y)
            t_prev = t
        return torch.stack(out, dim=1)
