"""QMF for segmentation: voxel-wise energy-weighted late fusion on the Segmenter encoders.

docs/method_spec.md section 2 (QMF, written for classification); docs/methods.md, "Segmentation heads". The
classification pieces of :mod:`medfusion.fusion.qmf` are reused, not rewritten: :func:`qmf_weights`
(energy and weight), :func:`qmf_rank_regulariser` (Eq. 16 on the batch pairs), and the per-sample loss
history of :class:`~medfusion.fusion.qmf.QMFHead` (``update_history``/``kappa`` of
:class:`~medfusion.fusion.qmf.LossHistoryMixin`, which :class:`CaseLossHistory` mixes in too).

* Each present modality is decoded alone by one shared decoder (:class:`~medfusion.models.seg_baselines.LateSegmenter`),
  giving sigmoid logits ``z_m`` ``[B, out, D, H, W]`` per region channel (TC, WT, ET).
* Energy per voxel and region: the binary region is the 2-class problem with logits ``[-z/2, z/2]``
  (their softmax is ``[1 - sigmoid(z), sigmoid(z)]``), ``E = -T logsumexp([-z/2, z/2] / T)``,
  ``w = -weight_scale * E`` (0 where the modality is absent) (:func:`voxel_qmf_weights`).
* Fused logits ``Z = sum_m stopgrad(w_m) z_m`` per voxel and region (= ``qmf_fuse`` on the 2-class form).
* ``L = L_task(Z, y) + sum_m L_task(z_m, y) [cases where m is present] + lam * L_reg`` with the Dice+BCE task
  loss of the bundle (:class:`SegQMFMethod`).

Decisions where the paper (classification) does not say:

* Binary logits to energy: the symmetric 2-class form ``[-z/2, z/2]``. The energy of a sigmoid output is not
  defined by ``z`` alone (any ``[a, a + z]`` has the same softmax); the symmetric choice makes the weight
  depend on the confidence ``|z|`` only (``w = weight_scale * log(2 cosh(z / 2))`` at ``T = 1``), so a
  confident background voxel weighs as much as a confident tumour voxel. ``[0, z]`` would give confident
  background a weight near 0.
* Weights per voxel AND per region channel (three binary problems, each fused on its own).
* The sample of Eq. 16-18 is the case: the history holds, per training case and modality, the running mean
  over visits of the case's voxel-mean BCE of ``z_m`` (the cross-entropy of the paper, per voxel); the
  weight that Eq. 16 ranks is the case's mean voxel weight (mean over regions and voxels, not detached).
  The history is method state (checkpointed under ``"method"``), not a network buffer, so evaluation and
  inference build the network without the training-set size.
* The fused and per-modality terms use the bundle's task loss (Dice + BCE, as every other method) where the
  paper has CE; the per-modality term is, per modality, the task loss over the batch's cases where the
  modality is present, summed over modalities (the paper's masked mean per modality).
* Pairs are ``(i, i+1 mod B)`` in the batch (reference code); with ``batch_size = 1`` the regulariser is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.batch import forward_outputs, model_inputs
from medfusion.fusion.base import FusionOutput
from medfusion.fusion.metakd import default_task_loss
from medfusion.fusion.qmf import LossHistoryMixin, QMFMethod, qmf_rank_regulariser, qmf_weights
from medfusion.modality import BRATS_MODALITIES, Keys
from medfusion.models.seg_baselines import LateSegmenter
from medfusion.models.seg_recipes import register_seg_method

__all__ = [
    "binary_class_logits",
    "voxel_qmf_weights",
    "case_voxel_bce",
    "CaseLossHistory",
    "QMFSegmenter",
    "SegQMFMethod",
]


def binary_class_logits(z: torch.Tensor) -> torch.Tensor:
    """Symmetric 2-class logits ``[-z/2, z/2]`` of sigmoid logits (new last dim of size 2)."""
    return torch.stack([-0.5 * z, 0.5 * z], dim=-1)


def voxel_qmf_weights(
    z: torch.Tensor, modality_mask: torch.Tensor, weight_scale: float = 0.1, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """QMF weights per modality, region and voxel (:func:`medfusion.fusion.qmf.qmf_weights` on ``[-z/2, z/2]``).

    Args:
        z: ``[B, M, R, *spatial]`` per-modality sigmoid logits.
        modality_mask: bool ``[B, M]``.
        weight_scale: ``w = -weight_scale * E``.
        temperature: energy temperature ``T``.

    Returns:
        ``(weights, energy)``, each ``[B, M, R, *spatial]``, 0 where the modality is absent.
    """
    logits = binary_class_logits(z.movedim(1, -1))  # [B, R, *spatial, M, 2]
    mask = modality_mask.view(modality_mask.shape[0], *([1] * (z.ndim - 2)), modality_mask.shape[1])
    weights, energy = qmf_weights(logits, mask, weight_scale, temperature)
    return weights.movedim(-1, 1), energy.movedim(-1, 1)


def case_voxel_bce(z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per case and modality, the voxel-mean binary cross-entropy (history value).

    Args:
        z: ``[B, M, R, *spatial]`` logits.
        label: ``[B, R, *spatial]`` in {0, 1}.

    Returns:
        ``[B, M]``.
    """
    target = label.to(z.dtype).unsqueeze(1).expand_as(z)
    return F.binary_cross_entropy_with_logits(z, target, reduction="none").flatten(2).mean(dim=2)


class CaseLossHistory(nn.Module, LossHistoryMixin):
    """Per-case, per-modality loss history: the buffers and methods of :class:`~medfusion.fusion.qmf.QMFHead`.

    ``update_history``, ``kappa``, ``num_samples`` are QMFHead's own (shared through
    :class:`~medfusion.fusion.qmf.LossHistoryMixin`, not copied): running sum and visit count per case and
    modality, min-max normalised per modality over the cases seen; identical on every rank under
    ``torch.distributed``.

    Args:
        num_samples: training-set size (``sample_index`` range).
        num_modalities: M.
        history_reduction: ``"mean"`` (sum / visits) or ``"sum"``.
    """

    def __init__(self, num_samples: int, num_modalities: int, history_reduction: str = "mean") -> None:
        super().__init__()
        if history_reduction not in ("mean", "sum"):
            raise ValueError(f"qmf: history_reduction must be 'mean' or 'sum', got {history_reduction!r}.")
        if int(num_samples) < 0:
            raise ValueError(f"qmf: num_samples must be >= 0 (training-set size), got {num_samples}.")
        self.history_reduction = history_reduction
        self.register_buffer("history", torch.zeros(int(num_samples), int(num_modalities)))
        self.register_buffer("history_count", torch.zeros(int(num_samples), int(num_modalities), dtype=torch.long))


class QMFSegmenter(LateSegmenter):
    """QMF head: per-modality decoding (as late fusion), voxel-wise energy weights, weighted sum of logits.

    Args:
        modalities: ordered modality names.
        weight_scale: ``w = -weight_scale * E`` (reference code 0.1).
        temperature: energy temperature ``T`` (1).
        detach_weights: detach ``w`` in the fused logits (default True, as for classification; the ranking
            regulariser reads the non-detached ``aux["weights"]``).
        **kwargs: Segmenter arguments.

    Returns (forward_outputs):
        ``FusionOutput(logits [B, out, D, H, W], embeddings {}, aux={"modality_logits": [B, M, out, D, H, W]
        (absent = 0), "weights": [B, M, out, D, H, W], "energy": same (both 0 where absent)})``.
    """

    def __init__(
        self,
        modalities: Sequence[str] = BRATS_MODALITIES,
        weight_scale: float = 0.1,
        temperature: float = 1.0,
        detach_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(modalities, **kwargs)
        self.weight_scale = float(weight_scale)
        self.temperature = float(temperature)
        self.detach_weights = bool(detach_weights)

    def fuse_modalities(self, z: torch.Tensor, mask: torch.Tensor) -> FusionOutput:
        """Energy-weighted sum of the present modalities' voxel logits (``z`` 0 where absent)."""
        weights, energy = voxel_qmf_weights(z, mask, self.weight_scale, self.temperature)
        w = weights.detach() if self.detach_weights else weights
        fused = (w * z).sum(dim=1)
        return FusionOutput(fused, {}, {"modality_logits": z, "weights": weights, "energy": energy})


@register_seg_method("qmf", QMFSegmenter, description="QMF: voxel-wise energy-weighted late fusion, weights detached")
class SegQMFMethod(QMFMethod):
    """QMF training recipe for segmentation: ``L = L_task(Z) + sum_m L_task(z_m) + lam * L_reg`` (Eq. 16-18).

    Args:
        modalities: ordered modality names.
        num_samples: training-set size (the history has one row per case; 0 disables the regulariser).
        lam: regulariser weight (0.1).
        update_history: record the per-case losses.
        dropout: optional batch transform (modality dropout) applied in :meth:`prepare`.
        task_loss: loss on logits ``[B, R, ...]`` and labels (default Dice + BCE, as every segmentation method).
        history_reduction: ``"mean"`` or ``"sum"`` (see :class:`~medfusion.fusion.qmf.QMFHead`).
    """

    name = "qmf"

    def __init__(
        self,
        modalities: Sequence[str],
        num_samples: int = 0,
        lam: float = 0.1,
        update_history: bool = True,
        dropout: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        history_reduction: str = "mean",
    ) -> None:
        super().__init__(modalities, lam=lam, update_history=update_history, dropout=dropout)
        self.task_loss = task_loss if task_loss is not None else default_task_loss("segmentation")
        self.history = CaseLossHistory(num_samples, len(self.modalities), history_reduction)

    def modality_loss(self, z: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``sum_m L_task(z_m[P_m], y[P_m])`` over the cases ``P_m`` where ``m`` is present."""
        total = z.new_zeros(())
        for i in range(z.shape[1]):
            sel = mask[:, i]
            if bool(sel.any()):
                total = total + self.task_loss(z[sel, i], label[sel])
        return total

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """Fused + per-modality task losses + Eq. 16 on the case history; then the history update."""
        mask = batch[Keys.MASK].bool()
        label = batch[Keys.LABEL]
        out = forward_outputs(model, model_inputs(batch, self.modalities), mask)
        fused = self.task_loss(out.logits, label)
        z = out.aux["modality_logits"]
        mod = self.modality_loss(z, label, mask)
        self.history.to(z.device)
        use_history = self.history.num_samples > 0 and Keys.INDEX in batch
        reg = z.new_zeros(())
        if use_history:
            idx = batch[Keys.INDEX].long()
            kappa, seen = self.history.kappa(idx)
            case_w = out.aux["weights"].flatten(2).mean(dim=2)  # [B, M]
            reg = qmf_rank_regulariser(case_w, kappa, mask & seen, idx)
            if self.update:
                self.history.update_history(idx, case_voxel_bce(z.detach(), label), mask)
        loss = fused + mod + self.lam * reg
        return {"loss": loss, "fused_loss": fused, "modality_loss": mod, "rank_loss": reg}

    def state_dict(self) -> dict[str, Any]:
        """Dropout generator and the loss history."""
        return {**super().state_dict(), "history": {k: v.cpu() for k, v in self.history.state_dict().items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        if "history" in state:
            self.history.load_state_dict(state["history"])
