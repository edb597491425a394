"""OmniFuse for segmentation: bottleneck CRA imputation, voxel-wise DWFuse, laziness activation.

docs/method_spec.md section 3 (OmniFuse, written for classification); docs/methods.md, "Segmentation heads".
The classification pieces of :mod:`medfusion.fusion.omnifuse` are reused, not rewritten:
:class:`~medfusion.fusion.omnifuse.CascadeResidualAutoencoder` (applied per voxel), :func:`dwfuse_omega`,
:func:`dwfuse_loss`, :func:`tla_loss`, :func:`lazy_from_losses`, the missingness simulation and epoch handler
of :class:`~medfusion.fusion.omnifuse.OmniFuseMethod`.

Network (:class:`OmniFuseSegmenter`), on the Segmenter encoders:

* bottleneck ``v`` ``[B, M, C, d, h, w]``; an absent modality's entry is the encoder's output on a zero
  image (the Segmenter zeroes absent channels before encoding);
* forward CRA per bottleneck voxel on the ``M * C`` vector: ``v' = v + sum_k dz_k``; backward CRA
  ``v'' = CRA_bw(v')``;
* skip levels: mean of the present modalities (Segmenter Eq. 2) for the absent ones;
* joint prediction ``o``: the Segmenter decoder on ``[skips, v']`` (all M modality slots);
* per-modality predictions ``z_m``: one shared decoder on modality m's own skips and ``v'_m`` (modalities
  folded into the batch, as :class:`~medfusion.models.seg_baselines.LateSegmenter`);
* deployable ``sigmoid(logits) = 0.5 * (sigmoid(o) + sum_m omega_m p_m / sum_m omega_m)`` over the PRESENT
  modalities, ``omega_m = [prod_{n != m} (1 - q_n)]^(beta / (M - 1))`` per voxel and region with
  ``q = max(p, 1 - p)`` (the probability of the predicted class).

Loss (:class:`SegOmniFuseMethod`): ``L = L_fw + lambda_bw L_bw + lambda_dw L_DWFuse + lambda_tla L_TLA``.

Decisions where the paper (classification) does not say:

* Binary region voxels are 2-class problems with logits ``[-z/2, z/2]`` (softmax = ``[1 - sigmoid(z),
  sigmoid(z)]``), so DWFuse's ``p_n[y]``, its cross-entropies and ``L_TLA`` are the classification functions
  applied per voxel and region: ``L_enc = sum_m mean_voxels(omega_m BCE(z_m, y))`` (omega from ``p[y]``,
  detached, all M modalities), ``L_ra = mean_voxels BCE(o, y)``; no Dice term (the paper's losses are CE).
* Imputation at the bottleneck only (the issue's minimum); skip levels use the Segmenter's mean imputation.
  The CRA is a per-voxel MLP (``nn.Linear`` on the channel vector), so it sees no spatial context.
* The joint head decodes ``v'`` instead of the CRA codes (the classification joint head reads the codes):
  a decoder needs the skip-compatible bottleneck layout.
* ``L_fw`` = mean squared error between ``v'`` and ``v`` under the OBSERVED mask (detached) over the
  observed modalities' entries (all voxels and channels); ``L_bw = mse(v'', stopgrad(v))``.
* Zero-image features: no buffer (the classification head's ``zero_pooled``): the Segmenter encodes the zero
  image with the batch (instance norm: no running statistics), and gradient reaches the encoder through it.
* TLA distance: per case the voxel-mean BCE of the deployable logits, averaged over the cases that have all
  the combination's modalities; mined at every epoch end over the training loader (random crops), one
  encoding per batch and 15 decodings (:func:`seg_combination_losses`); ``L_TLA`` is the voxel-mean BCE of
  the deployable logits over the batch's cases whose simulated combination is the lazy one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from medfusion.batch import forward_outputs, model_inputs, to_device, unwrap
from medfusion.fusion.base import FusionOutput, impute_features
from medfusion.fusion.omnifuse import (
    OBSERVED_MASK_KEY,
    CascadeResidualAutoencoder,
    LazyCombinationMixin,
    OmniFuseMethod,
    dwfuse_loss,
    dwfuse_omega,
    store_lazy,
    tla_loss,
)
from medfusion.modality import BRATS_MODALITIES, Keys, all_combination_masks
from medfusion.models.seg_baselines import LateSegmenter, prob_logit
from medfusion.models.seg_qmf import binary_class_logits
from medfusion.models.seg_recipes import register_seg_method
from medfusion.models.segmenter import Segmenter, build_decoder

__all__ = [
    "UNetDecoder",
    "voxel_omega",
    "seg_combination_losses",
    "OmniFuseSegmenter",
    "SegOmniFuseMethod",
]

logger = logging.getLogger(__name__)


class UNetDecoder(nn.Module):
    """A second Segmenter-layout decoder (:func:`build_decoder`; ``forward`` is :meth:`Segmenter.decode`)."""

    def __init__(
        self, channels: Sequence[int], width: int, out_channels: int, norm: str, subunits: int, first_stride: int
    ) -> None:
        super().__init__()
        self.ups, self.blocks, self.head = build_decoder(channels, width, out_channels, norm, subunits, first_stride)

    forward = Segmenter.decode


def voxel_omega(probs: torch.Tensor, use: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Inference DWFuse weights per voxel: :func:`dwfuse_omega` with ``q = max(p, 1 - p)``.

    Args:
        probs: ``[B, M, R, *spatial]`` sigmoid probabilities.
        use: bool ``[B, M]`` modalities taking part.
        beta: exponent numerator.

    Returns:
        ``[B, M, R, *spatial]``, 0 where ``use`` is False.
    """
    q = torch.maximum(probs, 1.0 - probs).movedim(1, -1)  # [B, R, *spatial, M]
    shape = q.shape
    u = use.view(use.shape[0], *([1] * (probs.ndim - 2)), use.shape[1]).expand(shape)
    omega = dwfuse_omega(q.reshape(-1, shape[-1]), u.reshape(-1, shape[-1]), beta)
    return omega.view(shape).movedim(-1, 1)


class OmniFuseSegmenter(LateSegmenter, LazyCombinationMixin):
    """OmniFuse segmentation network (see the module docstring).

    Args:
        modalities: ordered modality names.
        code_dim: bottleneck size of each CRA block (default: the encoder's bottleneck channels).
        num_blocks: CRA blocks K (5).
        beta: omega exponent numerator (0.5).
        **kwargs: Segmenter arguments (``channels``, ``norm``, ``subunits``, ``first_stride``, ...).

    Buffers: ``lazy_combination`` (long, index into ``combinations(modalities)``, -1 = none) and
    ``combination_distance`` ``[2^M - 1]`` (last TLA mining).

    Returns (forward_outputs):
        ``FusionOutput(logits [B, out, D, H, W], embeddings {}, aux)`` with ``aux``: ``"modality_logits"``
        ``[B, M, out, D, H, W]`` (0 for modalities not decoded), ``"joint_logits"`` ``[B, out, D, H, W]``,
        ``"omega"`` ``[B, M, out, D, H, W]``, ``"observed"`` ``v``, ``"imputed"`` ``v'``, ``"cycle"`` ``v''``
        (``[B, M, C, d, h, w]``), and ``"target"`` (``v`` under ``target_mask``, detached) when given.
    """

    def __init__(
        self,
        modalities: Sequence[str] = BRATS_MODALITIES,
        code_dim: int | None = None,
        num_blocks: int = 5,
        beta: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(modalities, **kwargs)
        n_mod = len(self.modalities)
        dim = n_mod * self.channels[-1]
        code = self.channels[-1] if code_dim is None else int(code_dim)
        self.beta = float(beta)
        self.forward_cra = CascadeResidualAutoencoder(dim, code, num_blocks)
        self.backward_cra = CascadeResidualAutoencoder(dim, code, num_blocks)
        self.joint_decoder = UNetDecoder(
            self.channels,
            n_mod,
            self.out_channels,
            kwargs.get("norm", "instance"),
            kwargs.get("subunits", 2),
            self.first_stride,
        )
        self.register_buffer("lazy_combination", torch.full((), -1, dtype=torch.long))
        self.register_buffer("combination_distance", torch.full((2**n_mod - 1,), float("nan")))

    shared_modality_decodings = False  # z_m reads v'_m, which the CRA computes from every modality

    def _needs_zero_feats(self) -> bool:
        return True

    @staticmethod
    def _cra(cra: CascadeResidualAutoencoder, v: torch.Tensor) -> torch.Tensor:
        """Run a CRA per voxel on ``[B, M, C, *spatial]`` (the ``M * C`` vector of each voxel)."""
        u = v.flatten(1, 2).movedim(1, -1)  # [B, *spatial, M*C]
        out, _ = cra(u)
        return out.movedim(-1, 1).view_as(v)

    def head_outputs(
        self,
        feats: Sequence[torch.Tensor],
        mask: torch.Tensor,
        zero_feats: Sequence[torch.Tensor] | None = None,
        decode_all: bool = False,
    ) -> FusionOutput:
        """Impute the bottleneck, decode jointly and per modality, combine with DWFuse weights.

        Args:
            feats: one ``[B, M, C_l, ...]`` per level.
            mask: bool ``[B, M]`` present modalities.
            zero_feats: zero-image features (``[1, M, C_l, ...]``): replace the absent modalities' entries
                (``None``: ``feats`` already hold them, as after ``encode(x, mask)``).
            decode_all: decode every modality (training: ``L_enc`` covers all M), not only the present ones.
        """
        if zero_feats is not None:
            m = mask.view(*mask.shape, 1, 1, 1, 1)
            feats = [torch.where(m, f, z.expand_as(f)) for f, z in zip(feats, zero_feats)]
        skips = [impute_features(f, mask, "mean") for f in feats[:-1]]
        v = feats[-1]
        imputed = self._cra(self.forward_cra, v)
        cycle = self._cra(self.backward_cra, imputed)
        joint = self.joint_decoder([s.flatten(1, 2) for s in skips] + [imputed.flatten(1, 2)])
        z = self.modality_logits([*skips, imputed], torch.ones_like(mask) if decode_all else mask)
        probs = torch.sigmoid(z)
        omega = voxel_omega(probs, mask, self.beta)
        weighted = (omega * probs).sum(dim=1) / omega.sum(dim=1).clamp_min(1e-12)
        combined = 0.5 * (torch.sigmoid(joint) + weighted)
        aux = {
            "modality_logits": z,
            "joint_logits": joint,
            "omega": omega,
            "observed": v,
            "imputed": imputed,
            "cycle": cycle,
        }
        return FusionOutput(prob_logit(combined).to(z.dtype), {}, aux)

    def forward_outputs(
        self,
        image: torch.Tensor | Mapping[str, torch.Tensor],
        modality_mask: torch.Tensor | None = None,
        modality_weights: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Full output; with ``target_mask`` (training) every modality is decoded and ``aux["target"]`` is set.

        Args:
            image: ``[B, M, D, H, W]`` or ``{name: [B, 1, D, H, W]}``.
            modality_mask: bool ``[B, M]`` (simulated) present modalities.
            modality_weights: unsupported (MetaKD only).
            target_mask: bool ``[B, M]`` observed modalities (a superset of ``modality_mask``): the input is
                encoded once under it, the modalities it has and ``modality_mask`` lacks get the zero-image
                features, and ``aux["target"]`` is the observed bottleneck (detached, ``L_fw``'s target).
        """
        if target_mask is None:
            return super().forward_outputs(image, modality_mask, modality_weights)
        if modality_weights is not None:
            raise ValueError("OmniFuseSegmenter: modality_weights is MetaKD's meta step; use the Segmenter.")
        x = self.stack_inputs(image)
        mask = self._mask(x, modality_mask)
        observed = self._mask(x, target_mask) | mask
        feats = self.encode(x, observed)
        out = self.head_outputs(feats, mask, self.encode(torch.zeros_like(x[:1])), decode_all=True)
        out.aux["target"] = feats[-1].detach()
        return out


@torch.no_grad()
def seg_combination_losses(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed per-case voxel-mean BCE of the deployable logits for every combination (TLA mining).

    One encoding per batch (``predict_combinations``); a case counts for combination ``c`` only when all of
    ``c``'s modalities are observed in it. The network is put in eval mode (and restored).

    Returns:
        ``(sum [C], number of cases [C])`` in ``combinations(modalities)`` order.
    """
    net = cast(Segmenter, unwrap(model))  # a segmentation network (its predict_combinations)
    combos = all_combination_masks(tuple(modalities))
    sums = torch.zeros(len(combos), dtype=torch.float64)
    counts = torch.zeros(len(combos), dtype=torch.long)
    was_training = net.training
    net.eval()
    try:
        for raw in loader:
            batch = to_device(raw, device) if device is not None else dict(raw)
            observed = batch[Keys.MASK].bool()
            label = batch[Keys.LABEL].float()
            rows = combos.to(observed.device)
            logits = net.predict_combinations(model_inputs(batch, tuple(modalities)), rows, observed)
            logits = logits.view(logits.shape[0], len(combos), -1, *logits.shape[2:]).float()
            for c in range(len(combos)):
                valid = (observed | ~rows[c]).all(dim=1)
                if not bool(valid.any()):
                    continue
                bce = F.binary_cross_entropy_with_logits(logits[valid, c], label[valid], reduction="none")
                sums[c] += float(bce.flatten(1).mean(dim=1).sum())
                counts[c] += int(valid.sum())
    finally:
        net.train(was_training)
    return sums, counts


def _omnifuse_net(model: nn.Module) -> OmniFuseSegmenter:
    net = unwrap(model)
    if not isinstance(net, OmniFuseSegmenter):
        raise TypeError(f"SegOmniFuseMethod needs an OmniFuseSegmenter, got {type(net).__name__}.")
    return net


# alpha is OmniFuse's L_ra weight (0.1), not MetaKD's KD weight of the bundle's shared settings
@register_seg_method(
    "omnifuse",
    OmniFuseSegmenter,
    method_kwargs={"alpha": 0.1},
    description="OmniFuse: bottleneck CRA imputation + DWFuse + TLA",
)
class SegOmniFuseMethod(OmniFuseMethod):
    """OmniFuse training recipe for segmentation (see the module docstring).

    Same arguments as :class:`~medfusion.fusion.omnifuse.OmniFuseMethod` (``lambda_bw`` 1, ``lambda_dw`` 10,
    ``lambda_tla`` 0.5, ``alpha`` 0.1, ``simulate``, ``tla_loader``, ``seed``); missingness is simulated
    per case uniformly over the non-empty subsets of its observed modalities (the bundle's
    ``dropout_mode`` does not apply).
    """

    name = "omnifuse"

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """All OmniFuse losses on the (simulated-missing) batch."""
        net = _omnifuse_net(model)
        mask = batch[Keys.MASK].bool()
        observed = batch.get(OBSERVED_MASK_KEY, mask).bool()
        label = batch[Keys.LABEL].long()
        out = forward_outputs(model, model_inputs(batch, self.modalities), mask, target_mask=observed)
        aux = out.aux
        sq = ((aux["imputed"] - aux["target"]) ** 2).flatten(2).mean(dim=2)  # [B, M]
        obs = observed.to(sq.dtype)
        l_fw = (sq * obs).sum() / obs.sum().clamp_min(1.0)
        l_bw = F.mse_loss(aux["cycle"], aux["observed"].detach())
        n_mod = mask.shape[1]
        z2 = binary_class_logits(aux["modality_logits"].movedim(1, -1)).reshape(-1, n_mod, 2)
        o2 = binary_class_logits(aux["joint_logits"]).reshape(-1, 2)
        dw = dwfuse_loss(z2, o2, label.reshape(-1), net.beta, self.alpha)
        l_tla = out.logits.new_zeros(())
        if self.lambda_tla > 0:
            l_tla = tla_loss(binary_class_logits(out.logits).movedim(-1, 1), label, mask, net.lazy_mask())
        loss = l_fw + self.lambda_bw * l_bw + self.lambda_dw * dw["dwfuse"] + self.lambda_tla * l_tla
        return {
            "loss": loss,
            "fw_loss": l_fw,
            "bw_loss": l_bw,
            "dwfuse_loss": dw["dwfuse"],
            "enc_loss": dw["enc"],
            "ra_loss": dw["ra"],
            "tla_loss": l_tla,
        }

    def mine(
        self, model: nn.Module, loader: Iterable[Mapping[str, Any]], device: Any = None
    ) -> tuple[torch.Tensor, int]:
        """TLA mining over ``loader``; the result goes to the network's buffers.

        Returns:
            ``(distance per combination [C], lazy index or -1)``.
        """
        sums, counts = seg_combination_losses(model, loader, self.modalities, device)
        return store_lazy(_omnifuse_net(model), sums, counts, self.modalities)
