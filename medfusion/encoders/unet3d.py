"""3D UNet encoder for ONE MRI modality (the contracting half of a MONAI-style residual UNet).

Weights are shared across modalities by folding modalities into the batch dimension
(``[B, M, D, H, W] -> [B*M, 1, D, H, W]``), which measured 4.5x faster than a Python loop over
modalities on 2 CPU cores (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from medfusion.encoders.base import Encoder, EncoderOutput, FeatureInfo, fast_instance_norm, register_encoder

__all__ = ["UNet3DEncoder"]


class UNet3DEncoder(Encoder):
    """Residual 3D UNet encoder returning every level (skips + bottleneck) and a pooled vector.

    Every level is a MONAI ``ResidualUnit`` (instance norm, PReLU); level 0 has stride
    ``first_stride`` and each further level halves the resolution. With ``first_stride=2`` (default,
    as MONAI's ``UNet``) no convolution runs at full resolution: measured 25x faster per training step
    than ``first_stride=1`` at 64^3 on 2 CPU cores, where full-resolution 3D convolutions over 4
    modalities dominate. Inputs must be divisible by :attr:`divisor`.

    Args:
        in_channels: input channels (1 for one modality).
        channels: output channels per level, shallow to deep; the last is the bottleneck.
        spatial_dims: 3 (2 works too, for tests of 2D variants).
        norm: MONAI norm name.
        dropout: dropout probability inside the residual units.
        subunits: convolutions per residual unit.
        first_stride: stride of level 0 (2: every map is down-sampled; 1: level 0 at full size).

    Returns (forward):
        ``EncoderOutput(pooled [B, channels[-1]], maps)`` with ``maps[i]`` of shape
        ``[B, channels[i], D / r_i, H / r_i, W / r_i]``, ``r_i = first_stride * 2**i``.
    """

    input_kind = "volume"

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        spatial_dims: int = 3,
        norm: str = "instance",
        dropout: float = 0.0,
        subunits: int = 2,
        first_stride: int = 2,
    ) -> None:
        super().__init__()
        chans = [int(c) for c in channels]
        if len(chans) < 2:
            raise ValueError(f"UNet3DEncoder: channels needs at least 2 levels, got {chans}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.channels = tuple(chans)
        if first_stride not in (1, 2):
            raise ValueError(f"UNet3DEncoder: first_stride must be 1 or 2, got {first_stride}.")
        self.first_stride = int(first_stride)
        levels = []
        prev = in_channels
        for i, c in enumerate(chans):
            levels.append(
                ResidualUnit(
                    spatial_dims,
                    prev,
                    c,
                    strides=self.first_stride if i == 0 else 2,
                    subunits=subunits,
                    norm=norm,
                    dropout=dropout or None,
                )
            )
            prev = c
        self.levels = fast_instance_norm(nn.ModuleList(levels))
        self.out_dim = chans[-1]
        self.feature_info = [
            FeatureInfo(c, self.first_stride * 2**i, "bottleneck" if i == len(chans) - 1 else f"enc{i}")
            for i, c in enumerate(chans)
        ]

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return self.first_stride * 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` ``[B, in_channels, D, H, W]``."""
        maps: list[torch.Tensor] = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        pooled = x.flatten(2).mean(dim=2)
        return EncoderOutput(pooled, tuple(maps))

    def example_input(self, batch_size: int = 2, size: int = 16) -> torch.Tensor:
        """Random ``[B, in_channels, S, S, S]`` with ``S`` rounded up to the divisor."""
        s = -(-size // self.divisor) * self.divisor
        return torch.randn(batch_size, self.in_channels, *([s] * self.spatial_dims))


@register_encoder("unet3d")
def unet3d(**kwargs: object) -> UNet3DEncoder:
    """Factory: ``create_encoder("unet3d", channels=[16, 32, 64, 128])``."""
    return UNet3DEncoder(**kwargs)  # type: ignore[arg-type]
