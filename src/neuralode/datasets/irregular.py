"""Irregularly sampled time series as one batch: the union of all observation times plus a mask.

Each sample ``b`` has its own sorted observation times ``t_b`` (length ``n_b``, ragged across samples).
:class:`IrregularBatch` stores them on the sorted union ``times`` of every sample's times, with
``values[b, j]`` the observation of sample ``b`` at ``times[j]`` (zero where it has none) and
``mask[b, j]`` telling which entries are real. An ODE is then solved once on ``times`` for the whole
batch, and losses are summed over the mask only (the minibatch scheme of Rubanova et al. 2019).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

__all__ = ["IrregularBatch"]


@dataclasses.dataclass(frozen=True)
class IrregularBatch:
    """A batch of ragged time series on the union of their observation times.

    Attributes:
        times: ``(T,)`` strictly increasing union of the observation times.
        values: ``(B, T, D)`` observations; entries where ``mask`` is False are zero.
        mask: ``(B, T)`` bool, True where sample ``b`` is observed at ``times[j]``.
    """

    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        t, v, m = self.times, self.values, self.mask
        if t.dim() != 1:
            raise ValueError(f"times must be 1-D (T,), got shape {tuple(t.shape)}")
        if v.dim() != 3 or v.shape[1] != t.shape[0]:
            raise ValueError(f"values must have shape (B, T={t.shape[0]}, D), got {tuple(v.shape)}")
        if m.shape != v.shape[:2]:
            raise ValueError(f"mask must have shape {tuple(v.shape[:2])} (B, T), got {tuple(m.shape)}")
        if m.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {m.dtype}")
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise ValueError("times must be strictly increasing (the sorted union of observation times)")

    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def n_observed(self) -> torch.Tensor:
        """``(B,)`` number of observations of each sample."""
        return self.mask.sum(dim=1)

    @classmethod
    def from_ragged(cls, times: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> IrregularBatch:
        """Build a batch from per-sample ``times[b]`` ``(n_b,)`` and ``values[b]`` ``(n_b, D)``.

        Times of one sample must be distinct; they need not be sorted. The union is taken over all
        samples, so a time shared by several samples appears once.
        """
        if len(times) != len(values) or len(times) == 0:
            raise ValueError(
                "times and values must be non-empty lists of equal length, "
                f"got {len(times)} and {len(values)}"
            )
        dims = {v.shape[-1] for v in values}
        if len(dims) != 1 or any(v.dim() != 2 for v in values):
            raise ValueError("every values[b] must have shape (n_b, D) with the same D")
        for b, (t, v) in enumerate(zip(times, values)):
            if t.dim() != 1 or t.shape[0] != v.shape[0]:
                raise ValueError(f"times[{b}] must have shape ({v.shape[0]},), got {tuple(t.shape)}")
            if torch.unique(t).numel() != t.numel():
                raise ValueError(f"times[{b}] has repeated time stamps; merge them first")
        union = torch.unique(torch.cat([t.reshape(-1) for t in times]))  # sorted
        B, T, D = len(times), union.numel(), dims.pop()
        out = torch.zeros(B, T, D, dtype=values[0].dtype, device=values[0].device)
        mask = torch.zeros(B, T, dtype=torch.bool, device=values[0].device)
        for b, (t, v) in enumerate(zip(times, values)):
            j = torch.searchsorted(union, t)
            out[b, j] = v
            mask[b, j] = True
        return cls(union, out, mask)

    @classmethod
    def from_grid(cls, times: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> IrregularBatch:
        """Restrict a shared grid ``times`` ``(T,)`` with per-sample ``mask`` ``(B, T)`` to the union of
        the observed times (grid points nobody observes are dropped)."""
        keep = mask.any(dim=0)
        vals = torch.where(mask.unsqueeze(-1), values, torch.zeros_like(values))
        return cls(times[keep], vals[:, keep], mask[:, keep])

    def to_ragged(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The inverse of :meth:`from_ragged`: per-sample ``(times_b, values_b)`` lists."""
        ts = [self.times[m] for m in self.mask]
        vs = [v[m] for v, m in zip(self.values, self.mask)]
        return ts, vs

    def __getitem__(self, idx) -> IrregularBatch:
        """A sub-batch (``idx``: index tensor, slice or list); the union shrinks to what it observes."""
        v, m = self.values[idx], self.mask[idx]
        if v.dim() == 2:  # a single integer index
            v, m = v.unsqueeze(0), m.unsqueeze(0)
        return IrregularBatch.from_grid(self.times, v, m)

    def to(self, device: torch.device | str) -> IrregularBatch:
        return IrregularBatch(self.times.to(device), self.values.to(device), self.mask.to(device))
