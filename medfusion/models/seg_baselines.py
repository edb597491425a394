"""Segmentation heads on the MetaKD Segmenter encoders: the common base, HeMIS and late fusion.

docs/method_spec.md ("Shared by all methods"); docs/methods.md, "Segmentation heads". Every head keeps the
:class:`~medfusion.models.segmenter.Segmenter` encoder (one shared 3D UNet encoder per 1-channel modality,
absent channels zeroed before encoding) and its decoder layers; only the fusion between encoder and decoder
changes, so ``bundles/brats_metakd`` switches between them with ``--method_name`` and the same
15-combination evaluator (:func:`medfusion.evaluation.segmentation.evaluate_segmentation`) scores all.

* ``mean`` is the Segmenter itself (mean imputation at every level, paper Eq. 2) trained without KD.
* ``hemis`` (:class:`HeMISSegmenter`): per level, the mean and the variance over the PRESENT modalities'
  features, concatenated (``2 * C_l`` channels), decoded (HeMIS, Havaei et al. 2016).
* ``late`` (:class:`LateSegmenter`): each present modality's features are decoded ALONE by one shared
  decoder (modalities folded into the batch); the fused probability is the voxel-wise mean of the present
  modalities' sigmoid probabilities and the logits are its logit, so ``sigmoid(logits)`` is that mean.

Decisions (the classification heads of :mod:`medfusion.fusion.baselines` leave them open for volumes):

* HeMIS variance is the population variance ``mean_p (f_p - mean)^2`` over the present modalities, 0 with
  one present modality (HeMIS sets the variance of a single modality to 0).
* Late fusion decodes a modality from its own skips and bottleneck only; absent modalities are not decoded
  at all (their rows of ``aux["modality_logits"]`` are 0), so their content cannot reach the output.
* The logit of the averaged probability is taken in float32 with the probability clamped to
  ``[1e-6, 1 - 1e-6]`` (finite logits; the clamp changes the loss only beyond |logit| 13.8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medfusion.fusion.base import FusionOutput
from medfusion.fusion.metakd import MetaKDMethod
from medfusion.modality import BRATS_MODALITIES
from medfusion.models.seg_recipes import register_seg_method
from medfusion.models.segmenter import DEFAULT_MEMORY_BUDGET_GB, Segmenter

__all__ = [
    "PROB_EPS",
    "masked_moments",
    "prob_logit",
    "SegmentationHead",
    "HeMISSegmenter",
    "LateSegmenter",
]

PROB_EPS = 1e-6
"""Probabilities are clamped to ``[PROB_EPS, 1 - PROB_EPS]`` before :func:`prob_logit`."""


def masked_moments(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HeMIS moments: mean and population variance over the present modalities.

    Args:
        feats: ``[B, M, C, *spatial]``.
        mask: bool ``[B, M]`` (at least one True per row).

    Returns:
        ``(mean, var)``, each ``[B, C, *spatial]``; ``var`` is 0 when one modality is present.
    """
    m = mask.to(feats.dtype).view(*mask.shape, *([1] * (feats.ndim - 2)))
    count = m.sum(dim=1).clamp_min(1.0)
    mean = (feats * m).sum(dim=1) / count
    var = (((feats - mean.unsqueeze(1)) ** 2) * m).sum(dim=1) / count
    return mean, var


def prob_logit(p: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p`` clamped to ``[PROB_EPS, 1 - PROB_EPS]`` (float32 at least)."""
    p = p.float().clamp(PROB_EPS, 1.0 - PROB_EPS)
    return torch.log(p) - torch.log1p(-p)


class SegmentationHead(Segmenter):
    """Base of the segmentation heads: the Segmenter encoder, a head from features to :class:`FusionOutput`.

    Subclasses implement :meth:`head_outputs`. ``forward``, ``forward_outputs`` and ``predict_combinations``
    (the evaluator's cached path: each modality encoded ONCE per window, every combination decoded from the
    shared features) go through it, so the evaluator and the bundles treat every head like the Segmenter.

    Args:
        modalities: ordered modality names.
        decoder_width: modality slots the decoder reads per level (1: one modality, 2: HeMIS moments).
        **kwargs: the :class:`~medfusion.models.segmenter.Segmenter` arguments (``channels``, ``norm``, ...).
    """

    def __init__(self, modalities: Sequence[str] = BRATS_MODALITIES, decoder_width: int = 1, **kwargs: Any) -> None:
        super().__init__(modalities, decoder_width=decoder_width, **kwargs)

    def head_outputs(
        self, feats: Sequence[torch.Tensor], mask: torch.Tensor, zero_feats: Sequence[torch.Tensor] | None = None
    ) -> FusionOutput:
        """Fused logits from per-modality features.

        Args:
            feats: :meth:`encode` output, one ``[B, M, C_l, ...]`` per level. Entries of modalities absent
                in ``mask`` may hold real features (cached evaluation): a head must not read them.
            mask: bool ``[B, M]``.
            zero_feats: the encoder's output on a zero image (``[1, M, C_l, ...]`` per level), for heads that
                give absent modalities that value (OmniFuse).
        """
        raise NotImplementedError  # abstract

    def _needs_zero_feats(self) -> bool:
        return False

    def forward_outputs(
        self,
        image: torch.Tensor | Mapping[str, torch.Tensor],
        modality_mask: torch.Tensor | None = None,
        modality_weights: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Full output for training (``modality_weights`` is MetaKD's meta step only: not supported here)."""
        if modality_weights is not None:
            raise ValueError(f"{type(self).__name__}: modality_weights is MetaKD's meta step; use the Segmenter.")
        x = self.stack_inputs(image)
        mask = self._mask(x, modality_mask)
        return self.head_outputs(self.encode(x, mask), mask)

    def forward(
        self, image: torch.Tensor | Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, out_channels, D, H, W]`` (mask defaults to all present)."""
        return self.forward_outputs(image, modality_mask).logits

    def predict_combinations(
        self,
        image: torch.Tensor,
        combination_masks: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        batch_combinations: bool = True,
        memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Logits for several combinations from ONE encoding (same layout as the Segmenter's).

        ``batch_combinations``, ``memory_budget_gb`` and ``kwargs`` (the Segmenter's decoding options) are
        accepted and ignored: the heads decode one combination at a time.

        Returns:
            ``[B, C * out_channels, D, H, W]``.
        """
        x = self.stack_inputs(image)
        avail = self._mask(x, modality_mask)
        feats = self.encode(x, avail)
        zero_feats = self.encode(torch.zeros_like(x[:1])) if self._needs_zero_feats() else None
        outs = []
        for combo in combination_masks.to(x.device).bool():
            mask = avail & combo.unsqueeze(0)
            outs.append(self.head_outputs(feats, mask, zero_feats).logits)
        return torch.cat(outs, dim=1)


class HeMISSegmenter(SegmentationHead):
    """HeMIS: per level ``[mean_p f_p, var_p f_p]`` over the present modalities, decoded.

    Args:
        modalities: ordered modality names.
        **kwargs: Segmenter arguments (``impute``/``impute_levels`` are unused: nothing is imputed).

    Returns (forward_outputs):
        ``FusionOutput(logits [B, out, D, H, W], embeddings {}, aux={"moments": bottleneck [B, 2C, d, h, w]})``.
    """

    def __init__(self, modalities: Sequence[str] = BRATS_MODALITIES, **kwargs: Any) -> None:
        super().__init__(modalities, decoder_width=2, **kwargs)

    def head_outputs(
        self, feats: Sequence[torch.Tensor], mask: torch.Tensor, zero_feats: Sequence[torch.Tensor] | None = None
    ) -> FusionOutput:
        """Decode the per-level moments."""
        levels = [torch.cat(masked_moments(f, mask), dim=1) for f in feats]
        return FusionOutput(self.decode(levels), {}, {"moments": levels[-1]})


class LateSegmenter(SegmentationHead):
    """Late fusion: each present modality decoded alone (shared decoder), sigmoid probabilities averaged.

    Args:
        modalities: ordered modality names.
        **kwargs: Segmenter arguments (``impute``/``impute_levels`` are unused).

    Returns (forward_outputs):
        ``FusionOutput(logits = logit(mean_p sigmoid(z_p)), embeddings {}, aux={"modality_logits": z
        [B, M, out, D, H, W] (absent = 0), "modality_probs": [B, M, out, D, H, W] (absent = 0)})``.
    """

    def __init__(self, modalities: Sequence[str] = BRATS_MODALITIES, **kwargs: Any) -> None:
        super().__init__(modalities, decoder_width=1, **kwargs)

    def modality_logits(self, feats: Sequence[torch.Tensor], use: torch.Tensor) -> torch.Tensor:
        """Decode each used (case, modality) pair alone, modalities folded into the batch.

        Args:
            feats: one ``[B, M, C_l, ...]`` per level.
            use: bool ``[B, M]``: pairs to decode (others are not computed and are 0).

        Returns:
            ``[B, M, out, D, H, W]``.
        """
        b, n_mod = use.shape
        rows = use.reshape(-1)
        z = self.decode([f.flatten(0, 1)[rows] for f in feats])  # [P, out, D, H, W]
        out = z.new_zeros(b * n_mod, *z.shape[1:])
        out[rows] = z
        return out.view(b, n_mod, *z.shape[1:])

    shared_modality_decodings: bool = True
    """Each modality's decoding is independent of the others (late fusion, QMF): the all-combination path
    decodes every available modality once and fuses per combination (:meth:`predict_combinations`)."""

    def fuse_modalities(self, z: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        """Average the present modalities' probabilities.

        Args:
            z: ``[B, M, out, D, H, W]`` per-modality logits, 0 for absent modalities.
            mask: bool ``[B, M]``.
        """
        present = mask.to(z.dtype).view(*mask.shape, *([1] * (z.ndim - 2)))
        probs = torch.sigmoid(z) * present
        fused = probs.sum(dim=1) / present.sum(dim=1).clamp_min(1.0)
        return FusionOutput(prob_logit(fused).to(z.dtype), {}, {"modality_logits": z, "modality_probs": probs})

    def head_outputs(
        self, feats: Sequence[torch.Tensor], mask: torch.Tensor, zero_feats: Sequence[torch.Tensor] | None = None
    ) -> FusionOutput:
        """Decode the present modalities alone and fuse them (:meth:`fuse_modalities`)."""
        return self.fuse_modalities(self.modality_logits(feats, mask), mask)

    def predict_combinations(
        self,
        image: torch.Tensor,
        combination_masks: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        batch_combinations: bool = True,
        memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
        **kwargs: Any,
    ) -> torch.Tensor:
        """All-combination logits: each available modality encoded AND decoded once, fused per combination.

        A modality's decoding does not depend on which other modalities are present, so ``M`` decodings serve
        all combinations (instead of one per present modality and combination). The decoding options
        (``batch_combinations``, ``memory_budget_gb``, ``kwargs``) are ignored.

        Returns:
            ``[B, C * out_channels, D, H, W]``.
        """
        if not self.shared_modality_decodings:
            return super().predict_combinations(
                image, combination_masks, modality_mask, batch_combinations, memory_budget_gb, **kwargs
            )
        x = self.stack_inputs(image)
        avail = self._mask(x, modality_mask)
        z = self.modality_logits(self.encode(x, avail), avail)
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        outs = []
        for combo in combination_masks.to(x.device).bool():
            mask = avail & combo.unsqueeze(0)
            present = mask.view(*mask.shape, *([1] * (z.ndim - 2)))
            outs.append(self.fuse_modalities(torch.where(present, z, zero), mask).logits)
        return torch.cat(outs, dim=1)


# MetaKD and the no-KD baselines (MetaKD's recipe at alpha = 0: the arms differ only in the fusion)
register_seg_method("metakd", Segmenter, description="MetaKD: KD weighted by meta-learned importance weights")(
    MetaKDMethod
)
register_seg_method("mean", Segmenter, method_kwargs={"alpha": 0.0}, description="mean imputation, no KD")(MetaKDMethod)
register_seg_method(
    "hemis", HeMISSegmenter, method_kwargs={"alpha": 0.0}, description="HeMIS: mean + variance per level"
)(MetaKDMethod)
register_seg_method(
    "late",
    LateSegmenter,
    method_kwargs={"alpha": 0.0},
    description="late fusion: average of per-modality probabilities",
)(MetaKDMethod)
