"""Encoder output type and registry.

Every encoder maps ONE modality's tensor to an :class:`EncoderOutput` and exposes ``out_dim``
(size of ``pooled``) and ``feature_info`` (one :class:`FeatureInfo` per entry of ``maps``,
shallow to deep), after timm's ``features_only`` and MONAI's ``ResNetFeatures``.
Constructor kwargs are plain JSON types so a bundle can ``_target_`` them.
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from medfusion.registry import Registry

__all__ = [
    "fast_instance_norm",
    "EncoderOutput",
    "FeatureInfo",
    "Encoder",
    "ENCODERS",
    "register_encoder",
    "create_encoder",
    "list_encoders",
]


class EncoderOutput(NamedTuple):
    """What an encoder returns.

    Attributes:
        pooled: ``[B, out_dim]`` global feature (always present).
        maps: feature maps shallow to deep, e.g. the 3D UNet encoder's skips + bottleneck
            ``[B, C_i, D_i, H_i, W_i]``, BERT's token states ``[B, L, H]``; empty for the EHR MLP.
    """

    pooled: torch.Tensor
    maps: tuple[torch.Tensor, ...] = ()


class FeatureInfo(NamedTuple):
    """Channels and spatial reduction of one entry of ``EncoderOutput.maps``.

    Attributes:
        channels: channel (or hidden) size of the map (dim 1, or the last dim for token states).
        reduction: input size / map size along each spatial dim (1 for token states).
        name: short description (``"enc0"``, ``"bottleneck"``, ``"tokens"``).
    """

    channels: int
    reduction: int
    name: str


class Encoder(nn.Module):
    """Base class: subclasses set ``out_dim`` and ``feature_info`` and implement ``forward``.

    Attributes:
        out_dim: size of ``pooled``.
        feature_info: one entry per element of ``maps``.
        input_kind: ``"volume"``, ``"image"``, ``"text"``, ``"tabular"`` or ``"sequence"`` (used by
            the contract tests and the export command to build example inputs).
    """

    out_dim: int
    feature_info: list[FeatureInfo]
    input_kind: str = "tabular"

    def example_input(self, batch_size: int = 2, size: int = 16) -> torch.Tensor:
        """A small valid input for tests/tracing (subclasses override)."""
        raise NotImplementedError  # abstract: every registered encoder overrides it


_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def fast_instance_norm(module: _ModuleT) -> _ModuleT:
    """Replace every non-affine ``InstanceNorm{1,2,3}d`` in ``module`` by the equivalent ``GroupNorm(C, C)``.

    Same statistics (per sample and channel), same output up to float rounding, no parameters or buffers
    on either side, so checkpoints are unchanged. Why: on CPU ``torch.instance_norm`` measured 3x slower
    than ``group_norm`` for ``[4, 16, 32^3]`` (0.032 s vs 0.011 s, 2 threads) and was 30% of full-size
    inference time. Norms with affine weights or running statistics are left as they are.

    Returns:
        ``module`` (changed in place).
    """
    for name, child in module.named_children():
        if (
            isinstance(child, nn.modules.instancenorm._InstanceNorm)
            and not child.affine
            and not child.track_running_stats
        ):
            setattr(module, name, nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=False))
        else:
            fast_instance_norm(child)
    return module


ENCODERS: Registry[Encoder] = Registry("encoder")
register_encoder = ENCODERS.register


def create_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a registered encoder by name, e.g. ``create_encoder("resnet18", spatial_dims=2)``."""
    import medfusion.encoders  # noqa: F401  (registers the built-in encoders)

    return ENCODERS.create(name, **kwargs)


def list_encoders() -> list[str]:
    """Names of all registered encoders."""
    import medfusion.encoders  # noqa: F401

    return ENCODERS.names()
