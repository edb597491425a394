"""2D/3D ResNet encoders (MONAI's ``ResNet`` with MedicalNet's layout) for images and volumes.

Registered as ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` and ``"resnet50"``. The backbone is
:class:`monai.networks.nets.ResNet` built like :class:`monai.networks.nets.ResNetFeatures`
(stem stride 2, max-pool, no classification layer), so a MedicalNet state dict loads into
``ResNetEncoder.net`` unchanged. Weights come only from a local file (``pretrained_path``); nothing
is downloaded.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import get_inplanes, resnet_params
from torch import nn

from medfusion.encoders.base import Encoder, EncoderOutput, FeatureInfo, register_encoder

__all__ = ["ResNetEncoder", "load_resnet_state_dict"]

logger = logging.getLogger(__name__)

RESNET_DEPTHS = ("resnet10", "resnet18", "resnet34", "resnet50")
# Keys of classification/segmentation heads found in MedicalNet/ImageNet checkpoints; the encoder has no head.
_HEAD_PREFIXES = ("fc.", "conv_seg.")


class _ZeroPadShortcut(nn.Module):
    """Parameter-free type-"A" shortcut: strided sub-sampling plus zero channels.

    Replaces MONAI's ``ResNet._downsample_basic_block`` (a ``functools.partial`` that detaches the
    identity path via ``.data`` and cannot be scripted). It has no parameters, so state dicts are
    unchanged.

    Args:
        out_channels: channels after zero padding.
        stride: spatial stride.
        spatial_dims: 2 or 3.
    """

    def __init__(self, out_channels: int, stride: int, spatial_dims: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *S]`` -> ``[B, out_channels, *ceil(S / stride)]``."""
        if self.spatial_dims == 2:
            out = x[:, :, :: self.stride, :: self.stride]
        else:
            out = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        pad = out.new_zeros((out.shape[0], self.out_channels - out.shape[1]) + tuple(out.shape[2:]))
        return torch.cat([out, pad], dim=1)


def load_resnet_state_dict(net: nn.Module, path: str) -> None:
    """Load a local ResNet state dict (MONAI/MedicalNet key layout) into ``net`` strictly.

    Accepts a plain state dict or a checkpoint dict with a ``"state_dict"`` entry; strips the
    ``"module."`` prefix of DataParallel checkpoints and drops classification/segmentation head keys
    (``fc.*``, ``conv_seg.*``).

    Args:
        net: the backbone (``ResNetEncoder.net``).
        path: local file written by ``torch.save``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, or keys/shapes do not match ``net`` (the message lists them).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"ResNetEncoder: pretrained_path {str(file)!r} does not exist (expected a local state-dict file)."
        )
    obj = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"ResNetEncoder: {str(file)!r} is not a state dict of tensors (got {type(obj).__name__}).")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    dropped = sorted(k for k in state if k.startswith(_HEAD_PREFIXES))
    if dropped:
        logger.info("ResNetEncoder: ignoring head keys in %s: %s", file, dropped)
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"ResNetEncoder: state dict {str(file)!r} does not match the network "
            f"(check depth, spatial_dims, in_channels, shortcut_type). "
            f"missing={missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected={unexpected[:10]}{'...' if len(unexpected) > 10 else ''}, shape mismatches={wrong[:10]}"
        )
    net.load_state_dict(state, strict=True)
    logger.info("ResNetEncoder: loaded %d tensors from %s", len(state), file)


class ResNetEncoder(Encoder):
    """ResNet backbone returning the stem and the four stage outputs plus a global average.

    Args:
        depth: ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"`` (block type, layers,
            shortcut type and bias as in MONAI's ``resnet_params``, i.e. MedicalNet's layout).
        spatial_dims: 2 (``[B, C, H, W]``, e.g. chest X-ray) or 3 (``[B, C, D, H, W]``, e.g. PET/CT).
        in_channels: input channels.
        pretrained_path: local state-dict file for ``net`` (MONAI/MedicalNet keys); ``None``: random init.
        widen_factor: multiplies the stage widths ``(64, 128, 256, 512)`` (e.g. 0.125 for tests).
        conv1_t_size: kernel size of the stem convolution.
        conv1_t_stride: stride of the stem convolution.
        no_max_pool: skip the max-pool after the stem.
        shortcut_type: ``"A"`` (zero padding) or ``"B"`` (1x1 convolution); ``None``: MedicalNet's
            choice for ``depth``.

    Returns (forward):
        ``EncoderOutput(pooled [B, out_dim], maps)``: ``maps`` are the stem and ``layer1..layer4``
        outputs ``[B, C_i, *S / r_i]`` (``feature_info`` gives ``C_i`` and ``r_i``); ``pooled`` is the
        global average of ``layer4``. Spatial sizes divisible by :attr:`divisor` give exact reductions.

    Raises:
        ValueError: unknown ``depth``, ``spatial_dims`` not 2/3, bad ``shortcut_type``, or a
            ``pretrained_path`` that does not match.
        FileNotFoundError: ``pretrained_path`` does not exist.
    """

    def __init__(
        self,
        depth: str = "resnet18",
        spatial_dims: int = 2,
        in_channels: int = 1,
        pretrained_path: str | None = None,
        widen_factor: float = 1.0,
        conv1_t_size: int = 7,
        conv1_t_stride: int = 2,
        no_max_pool: bool = False,
        shortcut_type: str | None = None,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNetEncoder: depth must be one of {RESNET_DEPTHS}, got {depth!r}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"ResNetEncoder: spatial_dims must be 2 or 3, got {spatial_dims}.")
        block, layers, default_shortcut, bias_downsample, _ = resnet_params[depth]
        shortcut = default_shortcut if shortcut_type is None else shortcut_type
        if shortcut not in ("A", "B"):
            raise ValueError(f"ResNetEncoder: shortcut_type must be 'A', 'B' or None, got {shortcut_type!r}.")
        self.depth = depth
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.net = ResNet(
            block=block,
            layers=list(layers),
            block_inplanes=get_inplanes(),
            spatial_dims=self.spatial_dims,
            n_input_channels=self.in_channels,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            no_max_pool=no_max_pool,
            shortcut_type=shortcut,
            widen_factor=widen_factor,
            feed_forward=False,
            bias_downsample=bias_downsample,
        )
        for stage in self.stages:
            for blk in stage:
                if isinstance(blk.downsample, functools.partial):
                    kw = blk.downsample.keywords
                    blk.downsample = _ZeroPadShortcut(int(kw["planes"]), int(kw["stride"]), self.spatial_dims)
        expansion = 4 if block == "bottleneck" else 1
        widths = [int(c * widen_factor) for c in get_inplanes()]
        stem_r = int(conv1_t_stride)
        r = stem_r * (1 if no_max_pool else 2)
        self.feature_info = [FeatureInfo(widths[0], stem_r, "stem")] + [
            FeatureInfo(w * expansion, r * 2**i, f"layer{i + 1}") for i, w in enumerate(widths)
        ]
        self.out_dim = self.feature_info[-1].channels
        self.input_kind = "image" if self.spatial_dims == 2 else "volume"
        if pretrained_path is not None:
            load_resnet_state_dict(self.net, pretrained_path)

    @property
    def stages(self) -> list[nn.Sequential]:
        """``layer1..layer4`` of the backbone."""
        return [self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4]

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this for exact reductions."""
        return self.feature_info[-1].reduction

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` ``[B, in_channels, H, W]`` (2D) or ``[B, in_channels, D, H, W]`` (3D)."""
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        maps = [x]
        if not net.no_max_pool:
            x = net.maxpool(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        pooled = x.flatten(2).mean(dim=2)
        return EncoderOutput(pooled, tuple(maps))

    def example_input(self, batch_size: int = 2, size: int = 32) -> torch.Tensor:
        """Random ``[B, in_channels, S, S(, S)]`` with ``S`` = ``size`` rounded up to :attr:`divisor`."""
        s = -(-size // self.divisor) * self.divisor
        return torch.randn(batch_size, self.in_channels, *([s] * self.spatial_dims))


def _factory(depth: str) -> Any:
    def make(**kwargs: Any) -> ResNetEncoder:
        return ResNetEncoder(depth=depth, **kwargs)

    make.__name__ = depth
    make.__doc__ = f'Factory: ``create_encoder("{depth}", spatial_dims=2)`` (see :class:`ResNetEncoder`).'
    return make


for _depth in RESNET_DEPTHS:
    register_encoder(_depth)(_factory(_depth))
