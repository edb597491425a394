"""Batch and network-wrapper helpers shared by training, evaluation and the apps.

A collated batch is a dict (``image`` [B, M, ...] for volume models, or one key per modality, plus
``modality_mask`` and ``label``); these helpers move it to a device, pick what the network takes from it, and
reach the bare network inside DDP wrappers. They depend on torch only, so evaluation code imports them without
importing the training engine (:mod:`medfusion.engines`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

__all__ = ["to_device", "model_inputs", "OutputsWrapper", "unwrap", "forward_outputs"]


def to_device(batch: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False) -> dict[str, Any]:
    """Move every tensor of a collated batch dict to ``device`` (other values pass through)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            # MetaTensor -> plain tensor: keeps the hot path free of MONAI meta bookkeeping.
            out[k] = (
                v.as_tensor().to(device, non_blocking=non_blocking)
                if hasattr(v, "as_tensor")
                else v.to(device, non_blocking=non_blocking)
            )
        else:
            out[k] = v
    return out


def model_inputs(batch: Mapping[str, Any], modalities: tuple[str, ...]) -> Any:
    """What a medfusion network takes from a batch.

    The stacked ``image`` [B, M, ...] when the batch has one (volume models), else ``{name: tensor}``
    for every modality.
    """
    if "image" in batch:
        return batch["image"]
    absent = [m for m in modalities if m not in batch]
    if absent:
        raise KeyError(f"batch has no key for modalities {absent}; keys present: {sorted(batch)}.")
    return {m: batch[m] for m in modalities}


class OutputsWrapper(nn.Module):
    """Makes ``forward`` return ``forward_outputs`` so a model can be wrapped in DistributedDataParallel.

    DDP synchronises gradients only through its own ``forward``; methods need the full
    ``FusionOutput`` (aux features) for their losses, so multi-process training wraps
    ``DDP(OutputsWrapper(network))`` and :func:`forward_outputs` calls it.

    Args:
        module: a network with ``forward_outputs``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module.forward_outputs(*args, **kwargs)``."""
        return cast(Any, self.module).forward_outputs(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / :class:`OutputsWrapper` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, OutputsWrapper)):
        model = model.module
    return model


def forward_outputs(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Full ``FusionOutput`` of ``model``, through DDP when the model is wrapped (see :class:`OutputsWrapper`)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model(*args, **kwargs)
    return cast(Any, unwrap(model)).forward_outputs(*args, **kwargs)
