"""The paper's MNIST classifiers (Chen et al. 2018, Table 1): ODE-Net, RK-Net, ResNet and the MLP baseline.

Architecture as in the authors' re-implementation (torchdiffeq ``examples/odenet_mnist.py``; see
EXPERIMENTS.md §2.2), with GroupNorm(min(32, c), c) everywhere and no BatchNorm:

* downsampling (``"conv"``): Conv(1→64, 3) → GN → ReLU → Conv(64→64, 4, s2, p1) → GN → ReLU →
  Conv(64→64, 4, s2, p1); 28×28 → 6×6. ``"res"``: Conv(1→64, 3) then two stride-2 pre-activation blocks.
* feature stage: ODE-Net/RK-Net integrate ``f(t, h) = GN(TConv(ReLU(GN(TConv(ReLU(GN(h)))))))`` from t=0 to
  1, where TConv is a 3×3 conv whose input has t prepended as a constant channel; ResNet stacks 6
  pre-activation residual blocks.
* head: GN → ReLU → global average pool → Linear(64 → 10).

Parameter counts (64 channels): ODE-Net 208,266 (conv) / 232,970 (res); ResNet 576,778 / 601,482; MLP
784-300-10 238,510. The paper's "RK-Net" is the same network as ODE-Net trained with ``gradient="direct"``
(backprop through the Runge-Kutta solver's operations); ODE-Net uses the adjoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from neuralode import NeuralODE

__all__ = [
    "MLP",
    "MODELS",
    "ConcatConv2d",
    "ODEBlockFunc",
    "ODENet",
    "PreActBlock",
    "ResNet",
    "build_model",
    "count_parameters",
    "downsampling_layers",
]


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``min(32, channels)`` groups, as in the authors' code."""
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """A 2-D convolution whose input gets the scalar time ``t`` prepended as a constant channel.

    ``forward(t, x)``: ``x`` is ``(N, C_in, H, W)``, ``t`` a 0-d tensor; returns ``(N, C_out, H', W')``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels + 1, out_channels, kernel_size, stride=stride, padding=padding, bias=True
        )

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1]) * t.to(x.dtype)
        return self.conv(torch.cat([tt, x], dim=1))


class ODEBlockFunc(nn.Module):
    """The ODE-Net vector field ``f(t, h) = GN(TConv(ReLU(GN(TConv(ReLU(GN(h)))))))``, state ``(N, C, H, W)``.

    ``nfe`` counts calls (forward and, with the adjoint, backward); the training loop resets and reads it.
    """

    def __init__(self, channels: int = 64):
        super().__init__()
        self.norm1 = norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.nfe = 0

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.relu(self.norm1(h))
        out = self.conv1(t, out)
        out = self.relu(self.norm2(out))
        out = self.conv2(t, out)
        return self.norm3(out)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b), GroupNorm; 1×1 conv shortcut when it downsamples."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.norm2(out)))
        return out + shortcut


def downsampling_layers(kind: str = "conv", channels: int = 64) -> nn.Sequential:
    """``(N, 1, 28, 28)`` → ``(N, channels, 6, 6)`` (``"conv"``) or ``(N, channels, 7, 7)`` (``"res"``)."""
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(1, channels, 3, 1),
            norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 4, 2, 1),
            norm(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 4, 2, 1),
        )
    if kind == "res":
        return nn.Sequential(
            nn.Conv2d(1, channels, 3, 1),
            PreActBlock(channels, channels, stride=2),
            PreActBlock(channels, channels, stride=2),
        )
    raise ValueError(f"downsampling={kind!r} is unknown; expected 'conv' or 'res'")


def _head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        norm(channels),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


class ODENet(nn.Module):
    """Downsampling → one ODE block on ``[0, 1]`` → head. ``(N, 1, 28, 28)`` → logits ``(N, classes)``.

    Args:
        channels: feature channels (64 in the paper).
        downsampling: ``"conv"`` (default, 208,266 parameters) or ``"res"`` (232,970).
        method, rtol, atol, adjoint_rtol, adjoint_atol, options, adjoint_options, gradient: passed to
            :class:`neuralode.NeuralODE`. ``gradient="adjoint"`` is the paper's ODE-Net,
            ``gradient="direct"`` its RK-Net.
        num_classes: outputs of the head.

    The vector field is ``self.odefunc`` (its ``nfe`` counter is how the training loop reads NFE).
    """

    def __init__(
        self,
        channels: int = 64,
        downsampling: str = "conv",
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        options: dict[str, Any] | None = None,
        adjoint_options: dict[str, Any] | None = None,
        gradient: str = "adjoint",
        num_classes: int = 10,
    ):
        super().__init__()
        self.downsampling = downsampling_layers(downsampling, channels)
        self.odefunc = ODEBlockFunc(channels)
        self.ode = NeuralODE(
            self.odefunc,
            (0.0, 1.0),
            method=method,
            rtol=rtol,
            atol=atol,
            adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol,
            options=options,
            adjoint_options=adjoint_options,
            gradient=gradient,
            only_last=True,
        )
        self.head = _head(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ODE block's initial state ``h(0)``, ``(N, channels, 6, 6)``."""
        return self.downsampling(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ode(self.downsampling(x)))


class ResNet(nn.Module):
    """Downsampling → ``n_blocks`` pre-activation residual blocks → head (576,778 parameters by default)."""

    def __init__(
        self, channels: int = 64, downsampling: str = "conv", n_blocks: int = 6, num_classes: int = 10
    ):
        super().__init__()
        self.downsampling = downsampling_layers(downsampling, channels)
        self.blocks = nn.Sequential(*[PreActBlock(channels, channels) for _ in range(n_blocks)])
        self.head = _head(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.downsampling(x)))


class MLP(nn.Module):
    """784-``hidden``-10 perceptron with one ReLU hidden layer (238,510 parameters for 300 units)."""

    def __init__(self, hidden: int = 300, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = ("odenet", "rknet", "resnet", "mlp", "downsample")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """``"odenet"`` (adjoint gradient), ``"rknet"`` (backprop through the solver), ``"resnet"``, ``"mlp"``,
    ``"downsample"`` (the ablation: the downsampling layers and the head alone, a ResNet with no blocks).

    Keyword arguments go to the class; for ``"rknet"`` a given ``gradient`` must be ``"direct"``.
    """
    if name == "odenet":
        kwargs.setdefault("gradient", "adjoint")
        return ODENet(**kwargs)
    if name == "rknet":
        if kwargs.setdefault("gradient", "direct") != "direct":
            raise ValueError(
                f"rknet backpropagates through the solver: gradient must be 'direct', "
                f"got {kwargs['gradient']!r}"
            )
        return ODENet(**kwargs)
    if name == "resnet":
        return ResNet(**kwargs)
    if name == "mlp":
        return MLP(**kwargs)
    if name == "downsample":
        return ResNet(**{**kwargs, "n_blocks": 0})
    raise ValueError(f"model={name!r} is unknown; expected one of {MODELS}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
