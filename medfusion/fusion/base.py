"""Fusion-head protocol and the generic :class:`FusionModel` (encoders + head).

A fusion head takes a mapping ``modality name -> EncoderOutput`` and the ``modality_mask`` and
returns a :class:`FusionOutput` (after torchmultimodal's dict-in fusion modules, with a mask).
The model's ``forward(inputs, modality_mask)`` returns only the deployable logits so MONAI
inferers, evaluators and TorchScript work unchanged; training calls ``forward_outputs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.modality import check_mask, full_mask, validate_modalities
from medfusion.registry import Registry

__all__ = [
    "FusionOutput",
    "FusionHead",
    "FusionModel",
    "FUSIONS",
    "register_fusion",
    "create_fusion",
    "list_fusions",
    "impute_features",
]


class FusionOutput(NamedTuple):
    """What a fusion head returns.

    Attributes:
        logits: ``[B, K]`` (classification/regression) or ``[B, K, *spatial]`` (segmentation): the
            deployable prediction.
        embeddings: per-modality features after masking/imputation, ``{name: [B, ...]}``.
        aux: method-specific extras, documented per head (per-modality logits for QMF/MetaKD,
            reconstructions for OmniFuse, student outputs for Meta Fusion, ...).
    """

    logits: torch.Tensor
    embeddings: dict[str, torch.Tensor]
    aux: dict[str, Any]


class FusionHead(nn.Module):
    """Base class of fusion heads.

    Args:
        modalities: ordered modality names the head is built for.

    Attributes:
        per_modality_aux: the ``aux`` keys holding one value per modality, ``[B, M]`` in ``modalities`` order
            (e.g. QMF's ``weights``); exported as ``<key>_<modality>`` columns of ``predictions.csv``. Other
            ``[B, X]`` entries (e.g. OmniFuse's ``joint_logits`` ``[B, K]``) are never read as per-modality, even
            when ``X == M``.
    """

    per_modality_aux: ClassVar[tuple[str, ...]] = ()

    def __init__(self, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities: tuple[str, ...] = validate_modalities(modalities)

    def forward(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> FusionOutput:
        """Fuse per-modality features.

        Args:
            features: ``{name: EncoderOutput}`` for every modality of the head (absent ones hold the
                encoder's output on the zero-filled input; heads must use ``modality_mask``).
            modality_mask: bool ``[B, M]``.
        """
        raise NotImplementedError  # abstract: implemented by each head


def impute_features(feats: torch.Tensor, mask: torch.Tensor, impute: str) -> torch.Tensor:
    """Replace missing modalities' features by the mean of the present ones (or zeros).

    Implements MetaKD Eq. 2: ``f_m = (1/|P|) * sum_{p in P} f_p`` for ``m`` not in the present set
    ``P``.

    Args:
        feats: ``[B, M, C, *spatial]`` per-modality features.
        mask: bool ``[B, M]``.
        impute: ``"mean"`` or ``"zero"``.

    Returns:
        ``[B, M, C, *spatial]`` with missing entries replaced.
    """
    m = mask.to(feats.dtype).view(*mask.shape, *([1] * (feats.ndim - 2)))
    if impute == "zero":
        return feats * m
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (feats * m).sum(dim=1, keepdim=True) / count
    return torch.where(m.bool(), feats, mean.expand_as(feats))


FUSIONS: Registry[FusionHead] = Registry("fusion head")
register_fusion = FUSIONS.register


def create_fusion(name: str, **kwargs: Any) -> FusionHead:
    """Build a registered fusion head by name."""
    import medfusion.fusion  # noqa: F401  (registers the built-in heads)

    return FUSIONS.create(name, **kwargs)


def list_fusions() -> list[str]:
    """Names of all registered fusion heads."""
    import medfusion.fusion  # noqa: F401

    return FUSIONS.names()


class FusionModel(nn.Module):
    """Per-modality encoders + a fusion head.

    Args:
        encoders: ``{modality name: encoder}``; the same module object may be given for several
            modalities to share weights.
        head: the fusion head; its ``modalities`` fixes the model's modality order.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], head: FusionHead) -> None:
        super().__init__()
        missing = [m for m in head.modalities if m not in encoders]
        if missing:
            raise ValueError(
                f"FusionModel: no encoder for modalities {missing}; encoders given for {sorted(encoders)}."
            )
        self.modalities: tuple[str, ...] = head.modalities
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.head = head

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, EncoderOutput]:
        """Run every modality's encoder once (missing ones on their zero-filled input).

        Args:
            inputs: ``{name: tensor}`` with the batch dimension first.

        Raises:
            KeyError: a modality of the model is not in ``inputs``.
        """
        absent = [m for m in self.modalities if m not in inputs]
        if absent:
            raise KeyError(
                f"FusionModel: batch has no key for modalities {absent} (expected keys {list(self.modalities)})."
            )
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def _mask(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None) -> torch.Tensor:
        if modality_mask is None:
            first = inputs[self.modalities[0]]
            return full_mask(first.shape[0], len(self.modalities), first.device)
        return check_mask(modality_mask, len(self.modalities))

    def forward_outputs(
        self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None, **head_kwargs: Any
    ) -> FusionOutput:
        """Full output for training: logits, embeddings and the head's aux.

        Args:
            inputs: ``{name: [B, ...]}``.
            modality_mask: bool ``[B, M]`` (default all present).
            head_kwargs: passed to the head (e.g. ``modality_weights`` for MetaKD's meta step).
        """
        mask = self._mask(inputs, modality_mask)
        return self.head(self.encode(inputs), mask, **head_kwargs)

    def forward(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Deployable prediction ``[B, K]`` (mask defaults to all present)."""
        return self.forward_outputs(inputs, modality_mask).logits
