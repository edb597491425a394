"""QMF: quality-aware multimodal fusion.

docs/method_spec.md section 2; ICML 2023 "Provable Dynamic Fusion for Low-Quality Multimodal Data".

Pieces (each maps to a test with hand-computed values, see docs/methods.md):

* energy ``E_m = -T * logsumexp(z_m / T)`` (:func:`energy_score`);
* fusion weight ``w_m = -weight_scale * E_m`` (``= logsumexp(z_m) / 10`` at ``T = 1`` and the default
  ``weight_scale = 0.1``: the reference code's form; the paper's ``alpha * E + beta`` with ``alpha < 0``
  and ``beta = 0``), ``w_m = 0`` where the modality is absent (:func:`qmf_weights`);
* fused logits ``z = sum_m stopgrad(w_m) z_m`` (:func:`qmf_fuse`; ``w`` detached in the fusion by default, the
  ranking regulariser trains the non-detached ``w``);
* per-sample loss history ``kappa`` (head buffers ``history``/``history_count``, :meth:`QMFHead.update_history`),
  min-max normalised per modality over the samples seen so far (:func:`minmax_normalise`);
* ranking regulariser, paper Eq. 16 as written (:func:`eq16_pair_loss`, :func:`qmf_rank_regulariser`);
* ``L = CE(z, y) + sum_m CE(z_m, y) + lambda * L_reg`` (:class:`QMFMethod`);
* evaluation outputs: per-sample fusion weight against the modality's own loss (:func:`qmf_weight_loss`,
  :func:`plot_weights_vs_loss`, written by the :meth:`QMFMethod.evaluation_outputs` hook).

The history buffers take the checkpoint's size when a checkpoint is loaded, so inference builds the head
without ``num_samples``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from medfusion.batch import forward_outputs, model_inputs, to_device, unwrap
from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionHead, FusionOutput, register_fusion
from medfusion.fusion.baselines import (
    check_in_dims,
    masked_pooled,
    mlp,
    modality_ce_loss,
    per_modality_ce,
    stack_modality_logits,
)
from medfusion.fusion.method import DropoutMethod
from medfusion.fusion.recipes import register_method
from medfusion.io import save_figure
from medfusion.modality import Keys, validate_modalities

__all__ = [
    "energy_score",
    "qmf_weights",
    "qmf_fuse",
    "minmax_normalise",
    "eq16_pair_loss",
    "qmf_rank_regulariser",
    "LossHistoryMixin",
    "QMFHead",
    "QMFMethod",
    "qmf_weight_loss",
    "plot_weights_vs_loss",
]


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Energy ``E = -T * logsumexp(z / T)`` over the last (class) dimension.

    Args:
        logits: ``[..., K]``.
        temperature: ``T``.

    Returns:
        ``[...]``.
    """
    return -temperature * torch.logsumexp(logits / temperature, dim=-1)


def qmf_weights(
    logits: torch.Tensor, modality_mask: torch.Tensor, weight_scale: float = 0.1, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """QMF fusion weights ``w_m = -weight_scale * E_m`` (0 for absent modalities).

    Args:
        logits: per-modality logits ``[B, M, K]``.
        modality_mask: bool ``[B, M]``.
        weight_scale: ``-alpha`` of the paper's ``w = alpha * E + beta`` (``beta = 0``); reference code 0.1.
        temperature: energy temperature ``T``.

    Returns:
        ``(weights [B, M], energy [B, M])``, both 0 where the modality is absent.
    """
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    energy = torch.where(modality_mask, energy_score(logits, temperature), zero)
    weights = torch.where(modality_mask, -weight_scale * energy, zero)
    return weights, energy


def qmf_fuse(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z = sum_m w_m z_m``.

    Args:
        logits: ``[B, M, K]`` (absent rows should already be 0).
        weights: ``[B, M]`` (0 for absent modalities).

    Returns:
        ``[B, K]``.
    """
    return (weights.unsqueeze(-1) * logits).sum(dim=1)


def minmax_normalise(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-column min-max normalisation over the valid entries.

    Args:
        values: ``[N, M]`` (e.g. the loss history of every training sample and modality).
        valid: bool ``[N, M]`` (entries that take part; others are returned as 0).

    Returns:
        ``[N, M]`` in ``[0, 1]`` on valid entries; a column whose valid entries are all equal maps to 0.
    """
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    lo = torch.where(valid, values, inf).amin(dim=0, keepdim=True)  # +inf for a column without valid entries
    hi = torch.where(valid, values, -inf).amax(dim=0, keepdim=True)
    ok = (hi - lo) > 0  # False for empty (-inf, nan) or constant columns
    lo = torch.where(ok, lo, torch.zeros_like(lo))
    span = torch.where(ok, hi - lo, torch.ones_like(lo))
    return torch.where(valid & ok, (values - lo) / span, torch.zeros_like(values))


def eq16_pair_loss(w_i: torch.Tensor, w_j: torch.Tensor, kappa_i: torch.Tensor, kappa_j: torch.Tensor) -> torch.Tensor:
    """QMF paper Eq. 16 as written: ``max(0, g * (kappa_i - kappa_j) + |w_i - w_j|)``, ``g = sign(w_i - w_j)``.

    Note the difference to the reference code, which uses ``MarginRankingLoss`` and evaluates
    ``max(0, sign(kappa_i - kappa_j) * (w_i - w_j) - |kappa_i - kappa_j|)``: there the sign comes from the
    loss history and the history gap RELAXES the constraint (a weight gap in the wrong direction is
    tolerated up to the history gap), whereas Eq. 16 takes the sign from the weights and adds the weight
    gap as margin. ``sign`` has zero gradient, so under Eq. 16 ``w`` is trained only through
    ``|w_i - w_j|`` on pairs where the hinge is active (pairs ranked against their history, or with a
    weight gap larger than the history gap).

    Args:
        w_i: fusion weight of the first sample of each pair (any broadcastable shape).
        w_j: fusion weight of the second sample.
        kappa_i: normalised loss history of the first sample.
        kappa_j: normalised loss history of the second sample.

    Returns:
        elementwise loss.
    """
    return torch.clamp_min(torch.sign(w_i - w_j) * (kappa_i - kappa_j) + (w_i - w_j).abs(), 0.0)


def qmf_rank_regulariser(
    weights: torch.Tensor, kappa: torch.Tensor, valid: torch.Tensor, sample_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of Eq. 16 over the batch pairs ``(i, i+1 mod B)`` (reference code's ``roll(-1)``) and modalities.

    Only (pair, modality) entries where the modality is valid (present AND with a history) in both
    samples count; pairs of a sample with itself (``B = 1`` or repeated indices) are skipped.

    Args:
        weights: ``[B, M]`` fusion weights (not detached: the regulariser trains them).
        kappa: ``[B, M]`` normalised loss history of the batch's samples.
        valid: bool ``[B, M]``.
        sample_index: optional ``[B]`` ids used to skip self-pairs.

    Returns:
        scalar (0 when no entry is valid).
    """
    w_j, k_j, v_j = (torch.roll(t, -1, dims=0) for t in (weights, kappa, valid))
    pair_ok = valid & v_j
    ids = sample_index if sample_index is not None else torch.arange(weights.shape[0], device=weights.device)
    pair_ok = pair_ok & (ids != torch.roll(ids, -1, dims=0)).unsqueeze(1)
    loss = eq16_pair_loss(weights, w_j, kappa.to(weights.dtype), k_j.to(weights.dtype))
    loss = torch.where(pair_ok, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    return loss.sum() / pair_ok.sum().clamp_min(1).to(loss.dtype)


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) from all ranks along dim 0."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class LossHistoryMixin:
    """Per-sample, per-modality loss history of QMF: :meth:`update_history`, :meth:`kappa` and the buffers they use.

    Shared by :class:`QMFHead` and the segmentation head's ``CaseLossHistory`` (both ``nn.Module``s that register
    the buffers ``history`` and ``history_count`` ``[num_samples, M]`` and set ``history_reduction``).
    """

    history: torch.Tensor
    history_count: torch.Tensor
    history_reduction: str

    @property
    def num_samples(self) -> int:
        """Size of the history (training-set size)."""
        return int(self.history.shape[0])

    def _check_index(self, sample_index: torch.Tensor) -> torch.Tensor:
        idx = sample_index.long().to(self.history.device)
        if self.num_samples == 0:
            raise ValueError("qmf: the head was built with num_samples=0; set num_samples to the training-set size.")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise ValueError(
                f"qmf: sample_index must lie in [0, {self.num_samples}) (num_samples of the head), got values in "
                f"[{int(idx.min())}, {int(idx.max())}]."
            )
        return idx

    @torch.no_grad()
    def update_history(self, sample_index: torch.Tensor, losses: torch.Tensor, modality_mask: torch.Tensor) -> None:
        """Add the batch's detached per-modality losses to the history of its samples (present modalities only).

        Args:
            sample_index: long ``[B]``.
            losses: ``[B, M]`` per-sample per-modality cross-entropy.
            modality_mask: bool ``[B, M]``.
        """
        idx = self._check_index(sample_index)
        m = modality_mask.to(self.history.device)
        add = torch.where(
            m, losses.detach().to(self.history), torch.zeros((), dtype=self.history.dtype, device=m.device)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank applies every rank's updates, so the history is identical everywhere (DDP would
            # otherwise broadcast rank 0's buffers each forward and drop the other ranks' samples)
            idx, add, m = (_all_gather_cat(t) for t in (idx, add, m))
        self.history.index_put_((idx,), add, accumulate=True)
        self.history_count.index_put_((idx,), m.long(), accumulate=True)

    @torch.no_grad()
    def kappa(self, sample_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised loss history of the given samples.

        The per-sample value (mean or sum over visits, see ``history_reduction``) is min-max normalised per
        modality over every training sample that has a history for that modality.

        Args:
            sample_index: long ``[B]``.

        Returns:
            ``(kappa [B, M], has_history bool [B, M])``.
        """
        idx = self._check_index(sample_index)
        seen = self.history_count > 0
        values = self.history
        if self.history_reduction == "mean":
            values = values / self.history_count.clamp_min(1).to(values.dtype)
        norm = minmax_normalise(values, seen)
        return norm[idx], seen[idx]


@register_fusion("qmf")
class QMFHead(FusionHead, LossHistoryMixin):
    """QMF decision-level fusion head with energy-based, per-sample modality weights.

    Each modality has a classifier on its pooled feature giving ``z_m`` ``[B, K]``; ``w_m = -weight_scale *
    E_m`` (0 where absent); ``logits = sum_m w_m z_m``. The per-sample loss history (method state) lives in
    the buffers ``history`` (``[num_samples, M]``, running SUM over all training visits of the sample's
    detached per-modality cross-entropy, like the reference code's cumulative loss) and
    ``history_count`` (``[num_samples, M]``, number of visits), so a checkpoint of the model carries it.

    Args:
        modalities: ordered modality names.
        in_dims: ``{name: pooled dim}``.
        num_classes: number of classes ``K``.
        num_samples: training-set size (``sample_index`` must be in ``[0, num_samples)``); 0 disables the
            history (and the ranking regulariser).
        hidden: hidden size of each per-modality classifier (0 = linear, as the reference default).
        dropout: dropout inside the classifiers.
        weight_scale: ``w = -weight_scale * E`` (reference code 0.1).
        temperature: energy temperature ``T`` (1).
        detach_weights: detach ``w`` in the fused prediction (default True). Eq. 11 uses ``w`` as a quality
            estimate; with gradient through ``w`` the fused cross-entropy is lowered by inflating one modality's
            logit level (CE ignores a constant added to all of a modality's logits, ``w = logsumexp(z)/10``
            grows with it; measured on the B2 phantom: EHR mean logit 5.5 vs about 1, weights 0.68/0.20/0.16,
            and energy-weighted fusion 0.715 AUROC where equal weights gave 0.810 on the same network). The
            ranking regulariser (Eq. 16-18) reads the non-detached ``aux["weights"]`` either way. ``False``
            reproduces the reference code's image-image path.
        history_reduction: ``"mean"`` (default: ``history / history_count``, robust to modality dropout
            and to samples visited a different number of times) or ``"sum"`` (reference code's cumulative
            loss; identical ranking when every sample and modality is seen once per epoch).

    Returns (forward):
        ``FusionOutput(logits [B, K], embeddings {name: [B, D_m]} (pooled, absent = 0),
        aux={"modality_logits": {name: [B, K]} (absent rows = 0), "weights": [B, M], "energy": [B, M]})``.
    """

    per_modality_aux = ("weights", "energy")

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int,
        num_samples: int = 0,
        hidden: int = 0,
        dropout: float = 0.0,
        weight_scale: float = 0.1,
        temperature: float = 1.0,
        detach_weights: bool = True,
        history_reduction: str = "mean",
    ) -> None:
        super().__init__(modalities)
        dims = check_in_dims("qmf", self.modalities, in_dims)
        if history_reduction not in ("mean", "sum"):
            raise ValueError(f"qmf: history_reduction must be 'mean' or 'sum', got {history_reduction!r}.")
        if int(num_samples) < 0:
            raise ValueError(f"qmf: num_samples must be >= 0 (training-set size), got {num_samples}.")
        self.weight_scale = float(weight_scale)
        self.temperature = float(temperature)
        self.detach_weights = bool(detach_weights)
        self.history_reduction = history_reduction
        self.classifiers = nn.ModuleDict({m: mlp(dims[m], int(num_classes), hidden, dropout) for m in self.modalities})
        n_mod = len(self.modalities)
        self.register_buffer("history", torch.zeros(int(num_samples), n_mod))
        self.register_buffer("history_count", torch.zeros(int(num_samples), n_mod, dtype=torch.long))

    def forward(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> FusionOutput:
        """Energy-weighted sum of the present modalities' logits."""
        emb = masked_pooled(features, modality_mask, self.modalities)
        z = torch.stack([self.classifiers[m](emb[m]) for m in self.modalities], dim=1)  # [B, M, K]
        z = torch.where(modality_mask.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device))
        weights, energy = qmf_weights(z, modality_mask, self.weight_scale, self.temperature)
        fused = qmf_fuse(z, weights.detach() if self.detach_weights else weights)
        aux = {
            "modality_logits": {m: z[:, i] for i, m in enumerate(self.modalities)},
            "weights": weights,
            "energy": energy,
        }
        return FusionOutput(fused, emb, aux)

    # ------------------------------------------------------------ history
    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Resize ``history``/``history_count`` to the checkpoint's rows before loading.

        Inference then needs no ``num_samples``; a checkpoint for another number of modalities still fails to load.
        """
        for name in ("history", "history_count"):
            saved, own = state_dict.get(prefix + name), getattr(self, name)
            if (
                isinstance(saved, torch.Tensor)
                and saved.dim() == 2
                and saved.shape[1] == own.shape[1]
                and saved.shape[0] != own.shape[0]
            ):
                setattr(self, name, own.new_zeros(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _qmf_head(model: nn.Module) -> QMFHead:
    head = getattr(unwrap(model), "head", None)
    if not isinstance(head, QMFHead):
        raise TypeError(f"QMFMethod needs a FusionModel whose head is a QMFHead, got head {type(head).__name__}.")
    return head


@register_method("qmf", head="qmf", description="QMF: energy-weighted late fusion, weights detached in the fusion")
@register_method(
    "qmf_no_detach",
    head="qmf",
    head_kwargs={"detach_weights": False},
    ablation_of="qmf",
    description="QMF with gradient through the fusion weights in the fused prediction",
)
class QMFMethod(DropoutMethod):
    """QMF training recipe: ``L = CE(z, y) + sum_m CE(z_m, y) + lam * L_reg``.

    Per iteration: forward, fused CE, per-modality CE (masked mean over samples where the modality is
    present, summed over modalities), Eq. 16 regulariser on the batch pairs with the history as it stands
    BEFORE this batch (reference order), then the history update with this batch's detached per-modality
    CE at ``sample_index``. No epoch handler is needed: the history is updated in the loss step and lives
    in the head's buffers.

    Args:
        modalities: ordered modality names of the network.
        lam: regulariser weight (0.1 in the paper; the code uses 1 for image-text).
        update_history: record the per-sample losses (disable for fine-tuning without history).
        dropout: optional batch transform applied in :meth:`prepare` (e.g. modality dropout).
    """

    name = "qmf"

    def __init__(
        self,
        modalities: Sequence[str],
        lam: float = 0.1,
        update_history: bool = True,
        dropout: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.modalities = validate_modalities(modalities)
        self.lam = float(lam)
        self.update = bool(update_history)
        self.dropout = dropout

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """Fused + per-modality CE + ranking regulariser; updates the head's history."""
        head = _qmf_head(model)
        mask = batch[Keys.MASK].bool()
        labels = batch[Keys.LABEL].long()
        out = forward_outputs(model, model_inputs(batch, self.modalities), mask)
        fused = F.cross_entropy(out.logits, labels)
        z = stack_modality_logits(out.aux["modality_logits"], self.modalities)
        mod = modality_ce_loss(z, labels, mask)
        use_history = head.num_samples > 0 and Keys.INDEX in batch
        if use_history:
            idx = batch[Keys.INDEX].long()
            kappa, seen = head.kappa(idx)
            reg = qmf_rank_regulariser(out.aux["weights"], kappa.to(z.device), mask & seen.to(z.device), idx)
        else:
            reg = torch.zeros((), device=fused.device)
        if use_history and self.update:
            head.update_history(idx, per_modality_ce(z.detach(), labels), mask)
        loss = fused + mod + self.lam * reg
        return {"loss": loss, "fused_loss": fused, "modality_loss": mod, "rank_loss": reg}

    @classmethod
    def data_head_kwargs(cls, num_train_samples: int) -> dict[str, Any]:
        """``num_samples``: the head's loss history has one row per training sample."""
        return {"num_samples": int(num_train_samples)}

    @classmethod
    def evaluation_outputs(
        cls,
        model: nn.Module,
        loader: Iterable[Mapping[str, Any]],
        modalities: Sequence[str],
        output_dir: str | Path,
        device: str | torch.device | None = None,
    ) -> list[Path]:
        """``qmf_weight_loss.csv`` (:func:`qmf_weight_loss`) and ``qmf_weight_vs_loss.png`` in ``output_dir``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = qmf_weight_loss(model, loader, modalities, device)
        table.to_csv(out / "qmf_weight_loss.csv", index=False)
        return [out / "qmf_weight_loss.csv", plot_weights_vs_loss(table, out / "qmf_weight_vs_loss.png")]


@torch.no_grad()
def qmf_weight_loss(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Per-sample QMF fusion weight and per-modality cross-entropy, every sample with ALL its available modalities.

    Args:
        model: a classifier whose head is QMF (``aux["weights"]`` [B, M], ``aux["modality_logits"]``).
        loader: labelled batches.
        modalities: the model's ordered modality names.
        device: default the model's device.

    Returns:
        One row per (sample, present modality): ``sample_index``, ``case_id``, ``modality``, ``weight``,
        ``loss`` (CE of that modality's own logits against the label), ``label``.

    Raises:
        ValueError: the model's head does not expose QMF ``weights`` / ``modality_logits``.
    """
    net = unwrap(model)
    if device is None or str(device) == "auto":
        dev = next(net.parameters()).device
    else:
        dev = torch.device(device)
    net = net.to(dev).eval()
    mods = validate_modalities(modalities)
    rows: list[dict[str, Any]] = []
    for batch in loader:
        batch = to_device(batch, dev)
        mask = batch[Keys.MASK].bool()
        out = forward_outputs(net, model_inputs(batch, mods), mask)
        if "weights" not in out.aux or "modality_logits" not in out.aux:
            raise ValueError("qmf_weight_loss: the model's head exposes no QMF 'weights'/'modality_logits' aux.")
        labels = batch[Keys.LABEL].reshape(mask.shape[0], -1)[:, 0].long()
        weights = out.aux["weights"].float().cpu().numpy()
        idx = batch.get(Keys.INDEX, torch.arange(mask.shape[0])).reshape(-1).cpu().numpy()
        ids = batch.get(Keys.CASE_ID, [str(i) for i in idx])
        for j, m in enumerate(mods):
            ce = F.cross_entropy(out.aux["modality_logits"][m].float(), labels, reduction="none").cpu().numpy()
            for i in np.flatnonzero(mask[:, j].cpu().numpy()):
                rows.append(
                    {
                        "sample_index": int(idx[i]),
                        "case_id": str(ids[i]),
                        "modality": m,
                        "weight": float(weights[i, j]),
                        "loss": float(ce[i]),
                        "label": int(labels[i]),
                    }
                )
    return pd.DataFrame(rows, columns=["sample_index", "case_id", "modality", "weight", "loss", "label"])


def plot_weights_vs_loss(table: pd.DataFrame, path: str | Path, title: str = "QMF weight vs modality loss") -> Path:
    """Scatter of per-sample fusion weight against the modality's own cross-entropy, one panel per modality.

    Args:
        table: rows of :func:`qmf_weight_loss`.
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: an empty table.
    """
    if table.empty:
        raise ValueError("plot_weights_vs_loss: the table is empty (no sample had a present modality).")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = list(dict.fromkeys(table["modality"].tolist()))
    fig, axes = plt.subplots(1, len(mods), figsize=(3.2 * len(mods), 3.0), squeeze=False)
    for ax, m in zip(axes[0], mods):
        part = table[table["modality"] == m]
        ax.scatter(part["loss"], part["weight"], s=10, alpha=0.7, c=part["label"], cmap="coolwarm", vmin=0, vmax=1)
        rho = part[["loss", "weight"]].corr(method="spearman").iloc[0, 1] if len(part) > 2 else float("nan")
        ax.set_title(f"{m} (Spearman {rho:.2f})", fontsize=9)
        ax.set_xlabel("per-sample CE of the modality")
        ax.set_ylabel("fusion weight")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
