"""Baseline classification fusion heads and the generic supervised recipe.

See docs/method_spec.md, "Shared by all methods".

Heads (registered by name, constructor kwargs are plain JSON):

* ``"concat"`` (:class:`ConcatHead`): early fusion. Absent modalities' pooled features are replaced by
  zeros (from the mask, never from the input content), concatenated, MLP classifier.
* ``"mean_features"`` (:class:`MeanFeaturesHead`): HeMIS-style. Each modality is projected to a common
  ``embed_dim``; the masked mean over PRESENT modalities (optionally with the masked variance, as in
  HeMIS) feeds an MLP classifier.
* ``"late"`` (:class:`LateFusionHead`): late fusion. One classifier per modality; the fused
  probability is the average of the PRESENT modalities' softmax probabilities and the deployable
  logits are its log (so ``softmax(logits)`` is that average and ``CrossEntropyLoss`` on the logits is
  the NLL of the averaged probability).

:class:`SupervisedMethod` trains any head with cross-entropy on ``logits``, plus (optionally) the
per-modality cross-entropy on ``aux["modality_logits"]`` over present modalities (late fusion).

Shared helpers used by the QMF and OmniFuse heads too: :func:`mlp`, :func:`masked_pooled`,
:func:`stack_modality_logits`, :func:`per_modality_ce`, :func:`modality_ce_loss`, :func:`safe_log`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.batch import forward_outputs, model_inputs
from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionHead, FusionOutput, register_fusion
from medfusion.fusion.method import DropoutMethod
from medfusion.fusion.recipes import register_method
from medfusion.modality import Keys, validate_modalities

__all__ = [
    "mlp",
    "check_in_dims",
    "masked_pooled",
    "stack_modality_logits",
    "per_modality_ce",
    "modality_ce_loss",
    "safe_log",
    "ConcatHead",
    "MeanFeaturesHead",
    "LateFusionHead",
    "SupervisedMethod",
]


def mlp(in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """``Linear`` (``hidden=0``) or ``Linear -> ReLU -> Dropout -> Linear``."""
    if hidden <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


def check_in_dims(head: str, modalities: Sequence[str], in_dims: Mapping[str, int]) -> dict[str, int]:
    """Validate ``in_dims`` (``{name: pooled dim}``) against the head's modalities.

    Raises:
        ValueError: a modality has no entry or a non-positive size (the message names the head).
    """
    missing = [m for m in modalities if m not in in_dims]
    if missing:
        raise ValueError(f"{head}: in_dims has no entry for modalities {missing}; got keys {sorted(in_dims)}.")
    dims = {m: int(in_dims[m]) for m in modalities}
    bad = {m: d for m, d in dims.items() if d <= 0}
    if bad:
        raise ValueError(f"{head}: in_dims must be positive pooled sizes, got {bad}.")
    return dims


def masked_pooled(
    features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor, modalities: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Pooled features with absent modalities replaced by zeros.

    Uses ``torch.where``: absent content and its gradient never reach the head, even if the content is
    non-finite.

    Args:
        features: ``{name: EncoderOutput}``.
        modality_mask: bool ``[B, M]``.
        modalities: the head's modality order.

    Returns:
        ``{name: [B, D_m]}``.
    """
    out = {}
    for i, m in enumerate(modalities):
        p = features[m].pooled
        out[m] = torch.where(modality_mask[:, i : i + 1], p, torch.zeros((), dtype=p.dtype, device=p.device))
    return out


def stack_modality_logits(modality_logits: Mapping[str, torch.Tensor], modalities: Sequence[str]) -> torch.Tensor:
    """``{name: [B, K]}`` -> ``[B, M, K]`` in modality order."""
    return torch.stack([modality_logits[m] for m in modalities], dim=1)


def per_modality_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-modality cross-entropy.

    Args:
        logits: ``[B, M, K]``.
        labels: long ``[B]``.

    Returns:
        ``[B, M]`` (no reduction).
    """
    b, n_mod, k = logits.shape
    return F.cross_entropy(logits.reshape(b * n_mod, k), labels.repeat_interleave(n_mod), reduction="none").view(
        b, n_mod
    )


def modality_ce_loss(logits: torch.Tensor, labels: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
    """``sum_m mean_{b: m present in b} CE(z_m[b], y[b])`` (a modality absent from the whole batch adds 0).

    Args:
        logits: ``[B, M, K]`` per-modality logits.
        labels: long ``[B]``.
        modality_mask: bool ``[B, M]``.

    Returns:
        scalar.
    """
    ce = per_modality_ce(logits, labels)
    m = modality_mask.to(ce.dtype)
    ce = torch.where(modality_mask, ce, torch.zeros((), dtype=ce.dtype, device=ce.device))
    return (ce.sum(dim=0) / m.sum(dim=0).clamp_min(1.0)).sum()


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """``log(p)`` with ``p`` clamped to the dtype's smallest normal number (finite logits)."""
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


@register_fusion("concat")
class ConcatHead(FusionHead):
    """Early fusion: zero-filled pooled features (absent -> 0 from the mask), concatenated, MLP classifier.

    Args:
        modalities: ordered modality names.
        in_dims: ``{name: pooled dim}``.
        num_classes: number of classes ``K``.
        hidden: hidden size of the classifier MLP (0 = linear classifier).
        dropout: dropout inside the MLP.

    Returns (forward):
        ``FusionOutput(logits [B, K], embeddings {name: [B, D_m]} (pooled, absent = 0),
        aux={"fused": [B, sum D_m]})``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int,
        hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modalities)
        dims = check_in_dims("concat", self.modalities, in_dims)
        self.classifier = mlp(sum(dims.values()), int(num_classes), hidden, dropout)

    def forward(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> FusionOutput:
        """Concatenate zero-filled pooled features and classify."""
        emb = masked_pooled(features, modality_mask, self.modalities)
        fused = torch.cat([emb[m] for m in self.modalities], dim=1)
        return FusionOutput(self.classifier(fused), emb, {"fused": fused})


@register_fusion("mean_features")
class MeanFeaturesHead(FusionHead):
    """HeMIS-style fusion: per-modality projection, masked mean (and variance) over present modalities.

    ``h = (1/|P|) sum_{m in P} proj_m(f_m)``; with ``use_variance`` the HeMIS second moment
    ``(1/|P|) sum_{m in P} (proj_m(f_m) - h)^2`` (0 for a single present modality) is concatenated.

    Args:
        modalities: ordered modality names.
        in_dims: ``{name: pooled dim}``.
        num_classes: number of classes ``K``.
        embed_dim: common projection size.
        hidden: hidden size of the classifier MLP (0 = linear).
        dropout: dropout inside the MLP.
        use_variance: concatenate the masked variance (HeMIS) to the mean.

    Returns (forward):
        ``FusionOutput(logits [B, K], embeddings {name: [B, E]} (projections, absent = 0),
        aux={"fused": [B, E] or [B, 2E]})``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int,
        embed_dim: int = 64,
        hidden: int = 64,
        dropout: float = 0.0,
        use_variance: bool = False,
    ) -> None:
        super().__init__(modalities)
        dims = check_in_dims("mean_features", self.modalities, in_dims)
        self.use_variance = bool(use_variance)
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], embed_dim) for m in self.modalities})
        self.classifier = mlp(embed_dim * (2 if self.use_variance else 1), int(num_classes), hidden, dropout)

    def forward(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> FusionOutput:
        """Masked mean (and variance) of the projected present modalities, then classify."""
        pooled = masked_pooled(features, modality_mask, self.modalities)
        e = torch.stack([self.proj[m](pooled[m]) for m in self.modalities], dim=1)  # [B, M, E]
        w = modality_mask.to(e.dtype).unsqueeze(-1)
        e = e * w  # absent projections (= bias) drop out
        count = w.sum(dim=1).clamp_min(1.0)
        mean = e.sum(dim=1) / count
        fused = mean
        if self.use_variance:
            var = (((e - mean.unsqueeze(1)) * w) ** 2).sum(dim=1) / count
            fused = torch.cat([mean, var], dim=1)
        emb = {m: e[:, i] for i, m in enumerate(self.modalities)}
        return FusionOutput(self.classifier(fused), emb, {"fused": fused})


@register_fusion("late")
class LateFusionHead(FusionHead):
    """Late fusion: per-modality classifiers, average of the present modalities' softmax probabilities.

    ``p = (1/|P|) sum_{m in P} softmax(z_m)``; ``logits = log p`` (clamped, finite). Averaging
    probabilities rather than logits keeps ``softmax(logits)`` equal to the average prediction.

    Args:
        modalities: ordered modality names.
        in_dims: ``{name: pooled dim}``.
        num_classes: number of classes ``K``.
        hidden: hidden size of each per-modality classifier (0 = linear).
        dropout: dropout inside the classifiers.

    Returns (forward):
        ``FusionOutput(logits [B, K] = log of the averaged probability, embeddings {name: [B, D_m]}
        (pooled, absent = 0), aux={"modality_logits": {name: [B, K]} (absent rows = 0),
        "modality_probs": [B, M, K] (absent rows = 0)})``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int,
        hidden: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modalities)
        dims = check_in_dims("late", self.modalities, in_dims)
        self.classifiers = nn.ModuleDict({m: mlp(dims[m], int(num_classes), hidden, dropout) for m in self.modalities})

    def forward(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> FusionOutput:
        """Average the present modalities' probabilities."""
        emb = masked_pooled(features, modality_mask, self.modalities)
        z = torch.stack([self.classifiers[m](emb[m]) for m in self.modalities], dim=1)  # [B, M, K]
        present = modality_mask.unsqueeze(-1)
        z = torch.where(present, z, torch.zeros((), dtype=z.dtype, device=z.device))
        probs = torch.softmax(z, dim=-1) * present.to(z.dtype)
        fused = probs.sum(dim=1) / modality_mask.to(z.dtype).sum(dim=1, keepdim=True).clamp_min(1.0)
        aux = {"modality_logits": {m: z[:, i] for i, m in enumerate(self.modalities)}, "modality_probs": probs}
        return FusionOutput(safe_log(fused), emb, aux)


@register_method("concat", head="concat", description="early fusion: zero-filled features concatenated, MLP")
@register_method("late", head="late", description="late fusion: average of per-modality probabilities")
@register_method(
    "late_modality_ce",
    head="late",
    method_kwargs={"modality_loss_weight": 1.0},
    ablation_of="qmf",
    description="late fusion + the per-modality cross-entropy QMF adds (QMF's fair baseline)",
)
@register_method("mean_features", head="mean_features", description="HeMIS-style masked mean of features")
class SupervisedMethod(DropoutMethod):
    """Generic supervised recipe: ``L = CE(logits, y) [+ modality_loss_weight * sum_m CE(z_m, y)]``.

    The per-modality term (masked mean over samples where ``m`` is present, summed over modalities)
    is added when ``modality_loss_weight > 0`` and the head exposes ``aux["modality_logits"]`` (late
    fusion).

    Args:
        modalities: ordered modality names of the network.
        loss: ``"ce"`` (cross-entropy on ``logits``; the only loss so far).
        modality_loss_weight: weight of the per-modality cross-entropy (0 = off).
        dropout: optional batch transform applied in :meth:`prepare` (e.g. a modality-dropout callable
            taking and returning the batch dict).
    """

    name = "supervised"

    def __init__(
        self,
        modalities: Sequence[str],
        loss: str = "ce",
        modality_loss_weight: float = 0.0,
        dropout: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if loss != "ce":
            raise ValueError(f"SupervisedMethod: loss must be 'ce', got {loss!r}.")
        self.modalities = validate_modalities(modalities)
        self.modality_loss_weight = float(modality_loss_weight)
        self.dropout = dropout

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """Cross-entropy on the fused logits (+ per-modality cross-entropy)."""
        mask = batch[Keys.MASK].bool()
        labels = batch[Keys.LABEL].long()
        out = forward_outputs(model, model_inputs(batch, self.modalities), mask)
        task = F.cross_entropy(out.logits, labels)
        result = {"task_loss": task}
        loss = task
        if self.modality_loss_weight > 0 and "modality_logits" in out.aux:
            z = stack_modality_logits(out.aux["modality_logits"], self.modalities)
            mod = modality_ce_loss(z, labels, mask)
            loss = loss + self.modality_loss_weight * mod
            result["modality_loss"] = mod
        result["loss"] = loss
        return result
