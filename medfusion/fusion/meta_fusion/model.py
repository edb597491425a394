"""Meta Fusion: a cohort of students with adaptive mutual learning (docs/method_spec.md section 4).

Pieces (each maps to a test with hand-computed values, see ``docs/methods.md``):

* latent extractors per modality, written as strings: ``null`` (modality dropped), ``identity``,
  ``pca:<k>`` (fitted on the training split, stored as buffers), ``slice:<k>`` (first ``k`` columns of a
  given feature matrix, e.g. a supervised encoder's output) and ``mlp:<k>`` (a trainable
  ``F -> extractor_hidden -> k`` projection owned by the student) (:class:`ExtractorSpec`);
* the cohort = cartesian product of the per-modality extractor lists minus the all-null student
  (:func:`build_cohort`); early / late fusion are presets of the same code
  (:func:`early_fusion_spec`, :func:`late_fusion_spec`);
* screening (rho = 0), teachers by 1-D K-means on the validation losses with silhouette-chosen ``k``
  (:func:`select_teachers_kmeans`);
* mutual learning ``L_s = task_s + rho * sum_{t in T, t != s} w_t * D(out_s, stopgrad(out_t))``,
  ``D = KL(teacher || student)`` (softmax, ``batchmean``) or MSE (:func:`mutual_learning_loss`);
* Caruana ensemble selection with replacement (:func:`ensemble_selection`) and the ablation rules
  (best single with and without mutual learning, simple / weighted average, stacking, majority /
  weighted vote), selectable at predict time (:meth:`MetaFusion.predict`);
* missing modalities: a student trains on, and predicts for, only the samples that have all its
  non-null modalities; at inference the committee is restricted to the available students, falling
  back to the best available student (lowest validation loss) when no member qualifies.

All state a checkpoint needs (student weights, PCA buffers, screening copies, teachers, weights, rho,
committee multiplicities, stacking coefficients, stage) is in parameters/buffers, so
``MetaFusion(**same_config).load_state_dict(sd)`` reproduces every prediction rule.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medfusion.encoders.base import EncoderOutput
from medfusion.modality import check_mask, validate_modalities

__all__ = [
    "EXTRACTOR_KINDS",
    "RHO_CRITERIA",
    "RULES",
    "STAGES",
    "ExtractorSpec",
    "StudentSpec",
    "MetaFusionData",
    "build_cohort",
    "early_fusion_spec",
    "late_fusion_spec",
    "select_teachers_kmeans",
    "choose_rho",
    "mutual_learning_loss",
    "ensemble_selection",
    "Student",
    "MetaFusion",
    "pooled_features",
]

logger = logging.getLogger(__name__)

EXTRACTOR_KINDS: tuple[str, ...] = ("null", "identity", "pca", "slice", "mlp")
"""Latent extractor kinds; ``pca``, ``slice`` and ``mlp`` take an output size (``"pca:20"``)."""

RULES: tuple[str, ...] = (
    "ensemble",
    "ensemble_screen",
    "best_single",
    "best_single_screen",
    "average",
    "weighted_average",
    "stacking",
    "majority_vote",
    "weighted_vote",
)
"""Aggregation rules accepted by :meth:`MetaFusion.predict`."""

RHO_CRITERIA: tuple[str, ...] = ("ensemble", "cohort", "teachers")
"""Validation scores a rho can be chosen by (``MetaFusion(rho_criterion=...)``)."""

STAGES: tuple[str, ...] = ("init", "extractors_fitted", "screened", "teachers_selected", "mutual_learned", "ensembled")
"""Workflow stages; ``MetaFusion.stage`` holds the index of the last completed one."""

_PROB_FLOOR = 1e-12


# ----------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ExtractorSpec:
    """One latent extractor of one modality.

    Attributes:
        kind: one of :data:`EXTRACTOR_KINDS`.
        dim: output size for ``pca``/``slice``/``mlp``; ``None`` for ``null``/``identity``.
    """

    kind: str
    dim: int | None = None

    @classmethod
    def parse(cls, text: str | ExtractorSpec, *, field: str = "extractor") -> ExtractorSpec:
        """Parse ``"null"``, ``"identity"``, ``"pca:20"``, ``"slice:8"`` or ``"mlp:16"``.

        Args:
            text: the spec string (or an :class:`ExtractorSpec`, returned unchanged).
            field: config field named in error messages.

        Raises:
            ValueError: unknown kind, missing/extra size, or a size < 1.
        """
        if isinstance(text, ExtractorSpec):
            return text
        kind, _, size = str(text).strip().partition(":")
        if kind not in EXTRACTOR_KINDS:
            raise ValueError(f"{field}: unknown extractor {text!r}; expected one of {list(EXTRACTOR_KINDS)}.")
        if kind in ("null", "identity"):
            if size:
                raise ValueError(f"{field}: extractor {kind!r} takes no size, got {text!r}.")
            return cls(kind)
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"{field}: extractor {kind!r} needs a positive size like '{kind}:16', got {text!r}.")
        return cls(kind, int(size))

    def __str__(self) -> str:
        return self.kind if self.dim is None else f"{self.kind}:{self.dim}"


@dataclass(frozen=True)
class StudentSpec:
    """Which extractor each modality uses in one student.

    Attributes:
        extractors: ``((modality, ExtractorSpec), ...)`` in modality order.
    """

    extractors: tuple[tuple[str, ExtractorSpec], ...]

    @classmethod
    def from_mapping(cls, spec: Mapping[str, str | ExtractorSpec], modalities: Sequence[str]) -> StudentSpec:
        """Build from ``{modality: "pca:8", ...}``; modalities not named are ``null``.

        Raises:
            ValueError: a key is not a modality, a spec string is invalid, or every modality is null.
        """
        mods = validate_modalities(modalities)
        bad = [k for k in spec if k not in mods]
        if bad:
            raise ValueError(f"cohort: student spec names unknown modalities {bad}; expected some of {list(mods)}.")
        out = cls(tuple((m, ExtractorSpec.parse(spec.get(m, "null"), field=f"cohort[{m}]")) for m in mods))
        if not out.modalities:
            raise ValueError(f"cohort: student {dict(spec)} uses no modality; at least one must be non-null.")
        return out

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the non-null modalities (the student needs all of them present)."""
        return tuple(m for m, e in self.extractors if e.kind != "null")

    @property
    def name(self) -> str:
        """Readable name, e.g. ``"a=pca:8+b=identity"`` (null modalities omitted)."""
        return "+".join(f"{m}={e}" for m, e in self.extractors if e.kind != "null")

    def as_dict(self) -> dict[str, str]:
        """JSON form ``{modality: spec string}`` (all modalities, null included)."""
        return {m: str(e) for m, e in self.extractors}


class MetaFusionData(NamedTuple):
    """One split for :class:`MetaFusion`.

    Attributes:
        x: ``{modality: [N, F_m]}`` float features (absent rows may hold anything; zero by convention).
        mask: bool ``[N, M]`` in the model's modality order, True = present.
        y: ``[N]`` long class indices (classification) or float targets (regression).
    """

    x: Mapping[str, torch.Tensor]
    mask: torch.Tensor
    y: torch.Tensor


def build_cohort(grids: Mapping[str, Sequence[str]]) -> list[StudentSpec]:
    """Cartesian product of the per-modality extractor lists minus the all-null student.

    Args:
        grids: ``{modality: [extractor spec, ...]}``; the dict order is the modality order, and the
            product is enumerated with the LAST modality varying fastest (``itertools.product``).

    Returns:
        The students, in product order.

    Raises:
        ValueError: an empty grid, a duplicate or invalid spec, or no student left.
    """
    mods = validate_modalities(list(grids), field="cohort grids")
    parsed: list[list[ExtractorSpec]] = []
    for m in mods:
        specs = [ExtractorSpec.parse(s, field=f"cohort grids[{m}]") for s in grids[m]]
        if not specs:
            raise ValueError(f"cohort grids[{m}]: expected at least one extractor, got none.")
        if len(set(specs)) != len(specs):
            raise ValueError(f"cohort grids[{m}]: duplicate extractors in {[str(s) for s in specs]}.")
        parsed.append(specs)
    cohort = [
        StudentSpec(tuple(zip(mods, combo)))
        for combo in itertools.product(*parsed)
        if any(e.kind != "null" for e in combo)
    ]
    if not cohort:
        raise ValueError(f"cohort grids: every combination is all-null ({dict(grids)}); add a non-null extractor.")
    return cohort


def early_fusion_spec(modalities: Sequence[str]) -> dict[str, Any]:
    """Early fusion as a Meta Fusion config: one student on all modalities' raw features.

    Returns:
        Keyword arguments for :class:`MetaFusion` (``cohort``, ``rho_grid=(0.0,)``,
        ``default_rule="best_single"``), e.g. ``MetaFusion(mods, dims, **early_fusion_spec(mods))``.
    """
    mods = validate_modalities(modalities)
    return {"cohort": [{m: "identity" for m in mods}], "rho_grid": (0.0,), "default_rule": "best_single"}


def late_fusion_spec(modalities: Sequence[str]) -> dict[str, Any]:
    """Late fusion as a Meta Fusion config: one identity student per modality, simple average, no mutual learning.

    Returns:
        Keyword arguments for :class:`MetaFusion` (``cohort``, ``rho_grid=(0.0,)``, ``default_rule="average"``).
    """
    mods = validate_modalities(modalities)
    return {"cohort": [{m: "identity"} for m in mods], "rho_grid": (0.0,), "default_rule": "average"}


# -------------------------------------------------------------------------------------- pure functions
def select_teachers_kmeans(
    losses: Sequence[float] | torch.Tensor, k_max: int = 10, seed: int = 0
) -> tuple[list[int], torch.Tensor, int]:
    """Teachers = the 1-D K-means cluster of validation losses with the lowest mean.

    ``k`` maximises the silhouette score over ``2..min(k_max, n - 1, #distinct losses)`` (ties: the
    smallest ``k``). Fallbacks (documented in docs/methods.md): non-finite losses (a student
    with no validation sample) are never teachers; fewer than 3 finite losses -> the single best student;
    all finite losses equal -> every finite student is a teacher.

    Args:
        losses: ``[S]`` per-student validation losses from screening.
        k_max: upper bound of the k range (the paper: 10).
        seed: K-means ``random_state``.

    Returns:
        ``(teacher indices sorted, weights [S] float with 1/|T| on teachers and 0 elsewhere, chosen k)``;
        ``k`` is 1 for the fallbacks.

    Raises:
        ValueError: no finite loss at all.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    vals = torch.as_tensor(losses, dtype=torch.float64).flatten()
    finite = torch.isfinite(vals)
    if not bool(finite.any()):
        raise ValueError(f"select_teachers_kmeans: no finite validation loss among {vals.tolist()}.")
    idx = finite.nonzero().flatten().tolist()
    v = vals[finite].numpy()
    n_distinct = len(np.unique(v))
    k_hi = min(k_max, len(v) - 1, n_distinct)
    if len(v) < 3:
        teachers, k_best = [idx[int(np.argmin(v))]], 1
    elif n_distinct == 1:
        teachers, k_best = idx, 1
    else:
        best_score, labels_best, k_best = -math.inf, None, 1
        for k in range(2, k_hi + 1):
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(v[:, None])
            score = float(silhouette_score(v[:, None], labels))
            if score > best_score + 1e-12:
                best_score, labels_best, k_best = score, labels, k
        assert labels_best is not None  # k_hi >= 2 here (n >= 3 and >= 2 distinct values)
        means = {c: v[labels_best == c].mean() for c in set(labels_best.tolist())}
        best_c = min(means, key=lambda c: means[c])
        teachers = [idx[i] for i in range(len(v)) if labels_best[i] == best_c]
    weights = torch.zeros(len(vals), dtype=torch.float32)
    weights[teachers] = 1.0 / len(teachers)
    return sorted(teachers), weights, k_best


def _masked_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [B]`` over ``rows`` (bool [B]); 0 (graph-connected) when no row is selected."""
    if not bool(rows.any()):
        return values.sum() * 0.0
    return values[rows].mean()


def _task_loss_rows(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample task loss ``[B]``: CE on logits ``[B, K]`` or squared error on ``[B]``."""
    if task == "classification":
        return F.cross_entropy(out, y.long(), reduction="none")
    return (out - y.float()) ** 2


def _divergence_rows(student: torch.Tensor, teacher: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample ``D(student, teacher)`` ``[B]``: KL(teacher || student) on softmax, or squared error."""
    if task == "classification":
        log_s = F.log_softmax(student, dim=-1)
        log_t = F.log_softmax(teacher, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return (student - teacher) ** 2


def mutual_learning_loss(
    outputs: torch.Tensor,
    y: torch.Tensor,
    teacher_weights: torch.Tensor,
    rho: float,
    task: str,
    available: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cohort loss ``sum_s L_s`` with ``L_s = task_s + rho * sum_{t != s} w_t D(out_s, stopgrad(out_t))``.

    ``task_s`` is the mean task loss over the rows student ``s`` can see; each divergence term is the mean
    over rows both ``s`` and ``t`` can see (``batchmean`` on that subset); empty subsets contribute 0.

    Args:
        outputs: ``[S, B, K]`` logits (classification) or ``[S, B]`` predictions (regression).
        y: ``[B]`` targets.
        teacher_weights: ``[S]``, ``w_t`` (0 for non-teachers).
        rho: divergence weight (0 = independent training).
        task: ``"classification"`` or ``"regression"``.
        available: bool ``[S, B]``, True where the student has all its modalities (default all True).

    Returns:
        ``(total scalar, per-student losses [S])``.
    """
    n_students, batch = outputs.shape[0], outputs.shape[1]
    if available is None:
        available = torch.ones(n_students, batch, dtype=torch.bool, device=outputs.device)
    detached = outputs.detach()
    per = []
    for s in range(n_students):
        loss = _masked_mean(_task_loss_rows(outputs[s], y, task), available[s])
        if rho != 0.0:
            for t in range(n_students):
                w = float(teacher_weights[t])
                if t == s or w == 0.0:
                    continue
                rows = available[s] & available[t]
                loss = loss + rho * w * _masked_mean(_divergence_rows(outputs[s], detached[t], task), rows)
        per.append(loss)
    per_t = torch.stack(per)
    return per_t.sum(), per_t


def _combine(
    preds: torch.Tensor, available: torch.Tensor, weights: torch.Tensor, fallback_order: torch.Tensor
) -> torch.Tensor:
    """Weighted mean of available student predictions per sample, fallback to the best available student.

    Args:
        preds: ``[S, N, K]`` probabilities or ``[S, N]`` regression outputs.
        available: bool ``[S, N]``.
        weights: ``[S]`` non-negative member weights (0 = not a member).
        fallback_order: ``[S]`` student indices, best first (rows no member covers use the first
            available student in this order).

    Returns:
        ``[N, K]`` or ``[N]``.
    """
    weights, fallback_order = weights.to(preds.device), fallback_order.to(preds.device)
    available = available.to(preds.device)
    w = torch.where(
        available, weights[:, None].to(preds.dtype), torch.zeros((), dtype=preds.dtype, device=preds.device)
    )
    uncovered = w.sum(dim=0) <= 0
    if bool(uncovered.any()):
        rank = torch.empty_like(fallback_order)
        rank[fallback_order] = torch.arange(len(fallback_order), device=fallback_order.device)
        score = torch.where(available, rank[:, None], torch.full_like(rank[:, None], len(rank)))  # [S, N]
        best = score.argmin(dim=0)  # [N]
        one_hot = F.one_hot(best, preds.shape[0]).T.to(preds.dtype)  # [S, N]
        w = torch.where(uncovered[None, :], one_hot, w)
    w = w / w.sum(dim=0, keepdim=True).clamp_min(1e-30)
    safe = torch.where(available.reshape(available.shape + (1,) * (preds.ndim - 2)), preds, torch.zeros_like(preds))
    return (w.reshape(w.shape + (1,) * (preds.ndim - 2)) * safe).sum(dim=0)


def _aggregate_loss(pred: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """Loss of an aggregated prediction: NLL of probabilities ``[N, K]`` or MSE of ``[N]``."""
    if task == "classification":
        return float(F.nll_loss(pred.clamp_min(_PROB_FLOOR).log(), y.long()))
    return float(((pred - y.float()) ** 2).mean())


def ensemble_selection(
    preds: torch.Tensor,
    y: torch.Tensor,
    val_losses: torch.Tensor,
    task: str,
    available: torch.Tensor | None = None,
    prune_fraction: float = 0.2,
    init_size: int = 3,
    max_size: int = 30,
    member_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Caruana ensemble selection with replacement on validation predictions.

    Rank students by validation loss, drop the worst ``floor(prune_fraction * S)``, start with the best
    ``init_size`` (one copy each), then repeatedly add the candidate (replacement allowed) whose addition
    gives the lowest ensemble validation loss, while that loss is strictly lower than the current one and
    the ensemble has fewer than ``max_size`` members. Ties go to the better-ranked student. The ensemble
    prediction is the mean of member predictions weighted by multiplicity (times ``member_weights``).

    Args:
        preds: ``[S, N, K]`` validation probabilities (classification) or ``[S, N]`` predictions.
        y: ``[N]`` validation targets.
        val_losses: ``[S]`` per-student validation losses (non-finite = never selected).
        task: ``"classification"`` (loss = NLL of the averaged probabilities) or ``"regression"`` (MSE).
        available: bool ``[S, N]`` (default all True); rows without a member use the best available student.
        prune_fraction: fraction of the cohort pruned before selection.
        init_size: number of best students the ensemble starts from.
        max_size: maximum number of members counted with multiplicity.
        member_weights: optional ``[S]`` per-student factor (e.g. 1 / validation loss), default 1.

    Returns:
        Long ``[S]`` multiplicities (0 = not selected).

    Raises:
        ValueError: no student with a finite validation loss, or non-positive ``init_size``/``max_size``.
    """
    n = preds.shape[0]
    losses = torch.as_tensor(val_losses, dtype=torch.float64)
    if init_size < 1 or max_size < 1:
        raise ValueError(f"ensemble_selection: init_size and max_size must be >= 1, got {init_size}, {max_size}.")
    finite = torch.isfinite(losses)
    if not bool(finite.any()):
        raise ValueError("ensemble_selection: no student has a finite validation loss.")
    if available is None:
        available = torch.ones(preds.shape[:2], dtype=torch.bool)
    mw = torch.ones(n, dtype=preds.dtype) if member_weights is None else member_weights.to(preds.dtype)
    order = torch.argsort(torch.where(finite, losses, torch.full_like(losses, math.inf)), stable=True)
    n_keep = max(1, n - int(math.floor(prune_fraction * n)))
    keep = [int(i) for i in order[:n_keep] if bool(finite[i])]
    counts = torch.zeros(n, dtype=torch.long)
    for i in keep[: min(init_size, max_size)]:
        counts[i] += 1

    def loss_of(c: torch.Tensor) -> float:
        return _aggregate_loss(_combine(preds, available, c.to(preds.dtype) * mw, order), y, task)

    current = loss_of(counts)
    while int(counts.sum()) < max_size:
        best_i, best_loss = -1, current
        for i in keep:
            trial = counts.clone()
            trial[i] += 1
            trial_loss = loss_of(trial)
            if trial_loss < best_loss:
                best_i, best_loss = i, trial_loss
        if best_i < 0:
            break
        counts[best_i] += 1
        current = best_loss
    return counts


# ------------------------------------------------------------------------------------------- modules
class Student(nn.Module):
    """One cohort member: optional trainable ``mlp`` extractors + an MLP head on the concatenated latents.

    Args:
        spec: which extractor each modality uses.
        latent_dims: ``{modality: latent size}`` for the non-null modalities.
        in_dims: ``{modality: raw feature size}`` (inputs of ``mlp`` extractors).
        out_dim: ``num_classes`` (classification) or 1 (regression).
        hidden: hidden sizes of the head (ReLU between layers).
        extractor_hidden: hidden size of ``mlp:<k>`` extractors.
    """

    def __init__(
        self,
        spec: StudentSpec,
        latent_dims: Mapping[str, int],
        in_dims: Mapping[str, int],
        out_dim: int,
        hidden: Sequence[int],
        extractor_hidden: int,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.keys: tuple[tuple[str, str], ...] = tuple(
            (m, _extractor_key(m, e)) for m, e in spec.extractors if e.kind != "null"
        )
        self.trainable_extractors = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(in_dims[m], extractor_hidden), nn.ReLU(), nn.Linear(extractor_hidden, e.dim or 1)
                )
                for m, e in spec.extractors
                if e.kind == "mlp"
            }
        )
        layers: list[nn.Module] = []
        width = sum(latent_dims[m] for m in spec.modalities)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, out_dim))
        self.head = nn.Sequential(*layers)

    def forward(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Student output from precomputed latents.

        Args:
            latents: ``{extractor key: [N, d]}`` as built by :meth:`MetaFusion.latents`.

        Returns:
            ``[N, out_dim]``.
        """
        parts = []
        for m, key in self.keys:
            if m in self.trainable_extractors:
                parts.append(self.trainable_extractors[m](latents[_extractor_key(m, ExtractorSpec("identity"))]))
            else:
                parts.append(latents[key])
        return self.head(torch.cat(parts, dim=-1))


def _extractor_key(modality: str, spec: ExtractorSpec) -> str:
    kind = "identity" if spec.kind == "mlp" else spec.kind  # mlp extractors read the raw features
    return f"{modality}__{kind}" if kind == "identity" or spec.dim is None else f"{modality}__{kind}{spec.dim}"


class MetaFusion(nn.Module):
    """Meta Fusion cohort, its training stages and every aggregation rule.

    Args:
        modalities: ordered modality names (the mask's column order).
        in_dims: ``{modality: F_m}`` raw feature sizes.
        cohort: students as :class:`StudentSpec` or JSON mappings ``{modality: "pca:8"}`` (missing = null);
            e.g. ``build_cohort(grids)``, or the ``cohort`` of :func:`early_fusion_spec`/:func:`late_fusion_spec`.
        task: ``"classification"`` (cross-entropy, ``num_classes`` logits) or ``"regression"`` (MSE).
        num_classes: number of classes (classification only).
        hidden: student head hidden sizes (paper: ``[64, 32]``; B3 uses ``[128, 64]`` / ``[300, 200, 100]``).
        extractor_hidden: hidden size of ``mlp:<k>`` extractors (B3: 256).
        epochs: training epochs per run (screening and each rho of mutual learning).
        lr: Adam learning rate.
        batch_size: mini-batch size (``0`` = full batch).
        weight_decay: Adam weight decay.
        rho_grid: default mutual-learning grid (public code: ``(0, 0.99, 3)``); ``fit`` may override.
        rho_criterion: how rho is chosen on validation: ``"ensemble"`` (default: the validation loss of the
            ensemble that :func:`ensemble_selection` picks from that rho's cohort, i.e. the prediction mutual
            learning is for), ``"cohort"`` (mean validation loss over all students with a finite loss) or
            ``"teachers"`` (mean validation loss of the teachers, as in the public code; with one teacher every
            rho trains it identically, so the scores tie and rho = 0 is kept).
        k_max: upper bound of the K-means k range.
        prune_fraction: ensemble selection prunes this fraction of worst students.
        init_size: ensemble selection starts from the best ``init_size`` students.
        max_ensemble_size: ensemble selection stops at this many members (with multiplicity).
        ensemble_weighting: ``"count"`` (members weighted by multiplicity, Caruana) or ``"inverse_loss"``
            (multiplicity times 1 / validation loss).
        pca_fit_on: ``"train"`` or ``"train+val"`` (B3 fits PCA on train + validation).
        default_rule: rule used by ``forward`` (one of :data:`RULES`).
        seed: seeds student initialisation, shuffling and K-means.

    Raises:
        ValueError: any invalid setting (the message names the field).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        cohort: Sequence[StudentSpec | Mapping[str, str]],
        task: str = "classification",
        num_classes: int = 2,
        hidden: Sequence[int] = (64, 32),
        extractor_hidden: int = 256,
        epochs: int = 10,
        lr: float = 1e-3,
        batch_size: int = 64,
        weight_decay: float = 0.0,
        rho_grid: Sequence[float] = (0.0, 0.99, 3.0),
        rho_criterion: str = "ensemble",
        k_max: int = 10,
        prune_fraction: float = 0.2,
        init_size: int = 3,
        max_ensemble_size: int = 30,
        ensemble_weighting: str = "count",
        pca_fit_on: str = "train",
        default_rule: str = "ensemble",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.modalities = validate_modalities(modalities)
        missing = [m for m in self.modalities if m not in in_dims]
        if missing:
            raise ValueError(f"MetaFusion in_dims: no feature size for modalities {missing}.")
        self.in_dims = {m: int(in_dims[m]) for m in self.modalities}
        if task not in ("classification", "regression"):
            raise ValueError(f"MetaFusion task: expected 'classification' or 'regression', got {task!r}.")
        if task == "classification" and num_classes < 2:
            raise ValueError(f"MetaFusion num_classes: expected >= 2 for classification, got {num_classes}.")
        for name, value, allowed in (
            ("rho_criterion", rho_criterion, RHO_CRITERIA),
            ("ensemble_weighting", ensemble_weighting, ("count", "inverse_loss")),
            ("pca_fit_on", pca_fit_on, ("train", "train+val")),
            ("default_rule", default_rule, RULES),
        ):
            if value not in allowed:
                raise ValueError(f"MetaFusion {name}: expected one of {list(allowed)}, got {value!r}.")
        if not rho_grid or any(r < 0 for r in rho_grid):
            raise ValueError(f"MetaFusion rho_grid: expected a non-empty list of rho >= 0, got {list(rho_grid)}.")
        if not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"MetaFusion prune_fraction: expected a value in [0, 1), got {prune_fraction}.")
        self.task = task
        self.num_classes = int(num_classes) if task == "classification" else 1
        self.hidden = tuple(int(h) for h in hidden)
        self.extractor_hidden = int(extractor_hidden)
        self.epochs, self.lr, self.batch_size, self.weight_decay = int(epochs), float(lr), int(batch_size), weight_decay
        self.rho_grid = tuple(float(r) for r in rho_grid)
        self.rho_criterion, self.k_max = rho_criterion, int(k_max)
        self.prune_fraction, self.init_size, self.max_ensemble_size = prune_fraction, int(init_size), max_ensemble_size
        self.ensemble_weighting, self.pca_fit_on, self.default_rule, self.seed = (
            ensemble_weighting,
            pca_fit_on,
            default_rule,
            int(seed),
        )
        self.cohort: list[StudentSpec] = [
            c if isinstance(c, StudentSpec) else StudentSpec.from_mapping(c, self.modalities) for c in cohort
        ]
        if not self.cohort:
            raise ValueError("MetaFusion cohort: expected at least one student, got none.")
        for c in self.cohort:
            if tuple(m for m, _ in c.extractors) != self.modalities:
                raise ValueError(
                    f"MetaFusion cohort: student {c.name!r} is not built for modalities {self.modalities}."
                )
            if not c.modalities:
                raise ValueError("MetaFusion cohort: a student has only null extractors; it needs >= 1 modality.")

        # fixed (non-trainable) extractors shared by students: PCA buffers, slice/identity are stateless
        self._fixed: dict[str, tuple[str, ExtractorSpec]] = {}
        for c in self.cohort:
            for m, e in c.extractors:
                if e.kind == "null":
                    continue
                if e.kind in ("pca", "slice") and (e.dim or 0) > self.in_dims[m]:
                    raise ValueError(
                        f"MetaFusion cohort: extractor '{e}' of modality {m!r} exceeds its {self.in_dims[m]} features."
                    )
                self._fixed.setdefault(_extractor_key(m, e), (m, e if e.kind != "mlp" else ExtractorSpec("identity")))
        for key, (m, e) in self._fixed.items():
            if e.kind == "pca":
                self.register_buffer(f"pca_mean__{key}", torch.zeros(self.in_dims[m]))
                self.register_buffer(f"pca_components__{key}", torch.zeros(self.in_dims[m], e.dim or 1))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.students = nn.ModuleList([self._make_student(c) for c in self.cohort])
        self.screen_students = copy.deepcopy(self.students)
        self._init_state = copy.deepcopy(self.students.state_dict())

        s, k = len(self.cohort), self.num_classes
        k_in = k if task == "classification" else 1
        self.register_buffer("stage", torch.tensor(0, dtype=torch.long))
        self.register_buffer("screen_val_loss", torch.full((s,), math.inf))
        self.register_buffer("val_loss", torch.full((s,), math.inf))
        self.register_buffer("teacher_weights", torch.zeros(s))
        self.register_buffer("n_clusters", torch.tensor(0, dtype=torch.long))
        self.register_buffer("rho", torch.tensor(0.0))
        self.register_buffer("rho_scores", torch.full((len(self.rho_grid),), math.nan))
        # per rho of the last mutual_learning run (not checkpointed): its score under every criterion
        self.rho_report: list[dict[str, float]] = []
        self.register_buffer("committee", torch.zeros(s, dtype=torch.long))
        self.register_buffer("screen_committee", torch.zeros(s, dtype=torch.long))
        self.register_buffer("stack_fill", torch.zeros(s, k_in))
        self.register_buffer("stack_coef", torch.zeros(s * k_in, k))
        self.register_buffer("stack_intercept", torch.zeros(k))

    # ------------------------------------------------------------------------------------ building
    def _make_student(self, spec: StudentSpec) -> Student:
        dims = {m: (self.in_dims[m] if e.kind == "identity" else int(e.dim or 0)) for m, e in spec.extractors}
        return Student(spec, dims, self.in_dims, self.num_classes, self.hidden, self.extractor_hidden)

    @property
    def student_names(self) -> list[str]:
        """Readable student names in cohort order."""
        return [c.name for c in self.cohort]

    @property
    def teachers(self) -> list[int]:
        """Indices of the teachers (non-zero teacher weight)."""
        return self.teacher_weights.nonzero().flatten().tolist()

    def _check_stage(self, needed: str, action: str) -> None:
        if int(self.stage) < STAGES.index(needed):
            raise RuntimeError(
                f"MetaFusion.{action}: needs stage {needed!r} but the model is at {STAGES[int(self.stage)]!r}; "
                "run the earlier stages (or fit) first."
            )

    def _set_stage(self, name: str) -> None:
        self.stage.fill_(STAGES.index(name))

    # ------------------------------------------------------------------------------- data helpers
    def _check_data(self, data: MetaFusionData | Sequence[Any], field: str) -> MetaFusionData:
        if not isinstance(data, MetaFusionData):
            if len(data) != 3:
                raise ValueError(f"MetaFusion {field}: expected (x, mask, y), got {len(data)} items.")
            data = MetaFusionData(*data)
        mask = self._check_inputs(data.x, data.mask, field)
        n = mask.shape[0]
        if data.y.ndim != 1 or data.y.shape[0] != n:
            raise ValueError(f"MetaFusion {field}.y: expected shape [{n}], got {list(data.y.shape)}.")
        if self.task == "classification" and (data.y.dtype.is_floating_point or int(data.y.max()) >= self.num_classes):
            raise ValueError(f"MetaFusion {field}.y: expected long class indices < {self.num_classes}.")
        return MetaFusionData(data.x, mask, data.y)

    def _check_inputs(self, x: Mapping[str, Any], mask: torch.Tensor, field: str = "x") -> torch.Tensor:
        absent = [m for m in self.modalities if m not in x]
        if absent:
            raise KeyError(
                f"MetaFusion {field}: no features for modalities {absent} (expected {list(self.modalities)})."
            )
        mask = check_mask(mask, len(self.modalities))
        for m in self.modalities:
            t = pooled_features(x[m])
            if t.ndim != 2 or t.shape[1] != self.in_dims[m] or t.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"MetaFusion {field}[{m!r}]: expected shape [{mask.shape[0]}, {self.in_dims[m]}], "
                    f"got {list(t.shape)}."
                )
        return mask

    def availability(self, mask: torch.Tensor) -> torch.Tensor:
        """Which students can predict which samples.

        Args:
            mask: bool ``[N, M]``.

        Returns:
            bool ``[S, N]``: True where every non-null modality of the student is present.
        """
        cols = torch.tensor(
            [[e.kind != "null" for _, e in c.extractors] for c in self.cohort], dtype=torch.bool, device=mask.device
        )  # [S, M]
        return ~((cols[:, None, :] & ~mask.bool()[None, :, :]).any(dim=-1))

    def latents(self, x: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the shared fixed extractors (absent modalities zero-filled first).

        Args:
            x: ``{modality: [N, F_m]}`` (or :class:`EncoderOutput`, whose ``pooled`` is used).
            mask: bool ``[N, M]``.

        Returns:
            ``{extractor key: [N, d]}``.
        """
        raw = {
            m: torch.where(mask[:, i, None], pooled_features(x[m]).float(), torch.zeros((), device=mask.device))
            for i, m in enumerate(self.modalities)
        }
        out = {}
        for key, (m, e) in self._fixed.items():
            if e.kind == "identity":
                out[key] = raw[m]
            elif e.kind == "slice":
                out[key] = raw[m][:, : e.dim]
            else:  # pca
                out[key] = (raw[m] - getattr(self, f"pca_mean__{key}")) @ getattr(self, f"pca_components__{key}")
        return out

    def fit_extractors(self, data: MetaFusionData | Sequence[Any]) -> None:
        """Fit the PCA extractors on the rows where their modality is present.

        Args:
            data: the split(s) to fit on (``MetaFusionData``).

        Raises:
            ValueError: fewer present rows than the PCA size.
        """
        data = self._check_data(data, "extractor data")
        axes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one SVD per modality; pca:k takes the first k axes
        for key, (m, e) in self._fixed.items():
            if e.kind != "pca":
                continue
            i = self.modalities.index(m)
            k = int(e.dim or 1)
            n_rows = int(data.mask[:, i].sum())
            if n_rows < k:
                raise ValueError(f"MetaFusion pca:{k} of {m!r}: needs >= {k} samples with {m!r} present, got {n_rows}.")
            if m not in axes:
                xm = pooled_features(data.x[m])[data.mask[:, i]].double()
                mean = xm.mean(dim=0)
                _, _, vh = torch.linalg.svd(xm - mean, full_matrices=False)
                comps = vh.T  # [F, r]
                signs = torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))  # sklearn's svd_flip
                axes[m] = (mean, comps * torch.where(signs == 0, torch.ones_like(signs), signs))
            mean, comps = axes[m]
            getattr(self, f"pca_mean__{key}").copy_(mean.float())
            getattr(self, f"pca_components__{key}").copy_(comps[:, :k].float())
        self._set_stage("extractors_fitted")

    # ----------------------------------------------------------------------------------- outputs
    def student_outputs(
        self, x: Mapping[str, torch.Tensor], mask: torch.Tensor, students: nn.ModuleList | None = None
    ) -> torch.Tensor:
        """Raw outputs of every student on every sample (unavailable rows are meaningless; see ``availability``).

        Args:
            x: ``{modality: [N, F_m]}``.
            mask: bool ``[N, M]``.
            students: cohort to run (default the mutual-learning cohort ``self.students``).

        Returns:
            ``[S, N, K]`` logits (classification) or ``[S, N]`` predictions (regression).
        """
        lat = self.latents(x, mask)
        return self._run(students if students is not None else self.students, lat)

    def _run(self, students: nn.ModuleList, lat: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = torch.stack([st(lat) for st in students])
        return out if self.task == "classification" else out.squeeze(-1)

    def _as_pred(self, out: torch.Tensor) -> torch.Tensor:
        """Student outputs in aggregation space: probabilities ``[S, N, K]`` or regression ``[S, N]``."""
        return out.softmax(dim=-1) if self.task == "classification" else out

    def _per_student_loss(self, out: torch.Tensor, y: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        """Validation loss per student ``[S]`` over its available rows (inf when it has none)."""
        res = []
        for s in range(out.shape[0]):
            if bool(avail[s].any()):
                res.append(float(_task_loss_rows(out[s], y, self.task)[avail[s]].mean()))
            else:
                res.append(math.inf)
        return torch.tensor(res)

    # ----------------------------------------------------------------------------------- training
    def _train(
        self, students: nn.ModuleList, train: MetaFusionData, val: MetaFusionData, rho: float, weights: torch.Tensor
    ) -> torch.Tensor:
        """Train the cohort jointly from the shared initial state; keep each student's best-validation epoch."""
        students.load_state_dict(self._init_state)
        students.train()
        with torch.no_grad():
            lat_tr, lat_va = self.latents(train.x, train.mask), self.latents(val.x, val.mask)
        av_tr, av_va = self.availability(train.mask), self.availability(val.mask)
        n = train.mask.shape[0]
        bs = n if self.batch_size <= 0 else self.batch_size
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(students.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        best = torch.full((len(students),), math.inf)
        best_state = [copy.deepcopy(st.state_dict()) for st in students]
        for epoch in range(self.epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                out = self._run(students, {k: v[idx] for k, v in lat_tr.items()})
                loss, _ = mutual_learning_loss(out, train.y[idx], weights, rho, self.task, av_tr[:, idx])
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    opt.step()
            students.eval()
            with torch.no_grad():
                vl = self._per_student_loss(self._run(students, lat_va), val.y, av_va)
            students.train()
            for s in range(len(students)):
                if vl[s] < best[s]:
                    best[s] = vl[s]
                    best_state[s] = copy.deepcopy(students[s].state_dict())
            logger.debug("meta fusion rho=%s epoch %d: val losses %s", rho, epoch, vl.tolist())
        for s, st in enumerate(students):
            st.load_state_dict(best_state[s])
        students.eval()
        return best

    def screen(self, train: MetaFusionData | Sequence[Any], val: MetaFusionData | Sequence[Any]) -> torch.Tensor:
        """Stage (a): fit extractors if needed, train every student independently (rho = 0).

        The screened cohort is kept in ``screen_students`` (rule ``"best_single_screen"``) and, until
        mutual learning runs, copied into ``students``.

        Args:
            train: training split.
            val: validation split (best-epoch selection and the screening losses).

        Returns:
            ``screen_val_loss`` ``[S]``.
        """
        train, val = self._check_data(train, "train"), self._check_data(val, "val")
        if int(self.stage) < STAGES.index("extractors_fitted"):
            if self.pca_fit_on == "train+val":
                both = MetaFusionData(
                    {m: torch.cat([pooled_features(train.x[m]), pooled_features(val.x[m])]) for m in self.modalities},
                    torch.cat([train.mask, val.mask]),
                    torch.cat([train.y, val.y]),
                )
                self.fit_extractors(both)
            else:
                self.fit_extractors(train)
        losses = self._train(self.screen_students, train, val, 0.0, torch.zeros(len(self.cohort)))
        self.screen_val_loss.copy_(losses)
        self.students.load_state_dict(self.screen_students.state_dict())
        self.val_loss.copy_(losses)
        self._set_stage("screened")
        return losses

    def select_teachers(self) -> list[int]:
        """Stage (b): teachers by 1-D K-means on the screening losses (:func:`select_teachers_kmeans`).

        Returns:
            Teacher indices; ``teacher_weights`` and ``n_clusters`` are updated.
        """
        self._check_stage("screened", "select_teachers")
        teachers, weights, k = select_teachers_kmeans(self.screen_val_loss, self.k_max, self.seed)
        self.teacher_weights.copy_(weights)
        self.n_clusters.fill_(k)
        self._set_stage("teachers_selected")
        logger.info("meta fusion: k=%d, teachers %s", k, [self.student_names[t] for t in teachers])
        return teachers

    def mutual_learning(
        self,
        train: MetaFusionData | Sequence[Any],
        val: MetaFusionData | Sequence[Any],
        rho_grid: Sequence[float] | None = None,
    ) -> float:
        """Stage (c): retrain the cohort from the initial state with mutual learning for each rho; keep the best.

        rho = 0 reuses the screened cohort (same initial state, seed and data order, hence identical).
        The score of a rho (``rho_criterion``): the validation loss of the ensemble selected from that rho's
        cohort (``"ensemble"``, default), the mean best-epoch validation loss of all students (``"cohort"``) or
        of the teachers (``"teachers"``). Ties (scores equal up to a relative 1e-9) keep the smaller rho and are
        logged as a warning; :meth:`summary` lists them (``rho_ties``). :attr:`rho_report` keeps every rho's
        score under all three criteria.

        Args:
            train: training split.
            val: validation split.
            rho_grid: candidate rho values (default ``self.rho_grid``); ``rho_scores`` is stored only when the
                grid has the configured length.

        Returns:
            The chosen rho.
        """
        self._check_stage("teachers_selected", "mutual_learning")
        train, val = self._check_data(train, "train"), self._check_data(val, "val")
        grid = tuple(float(r) for r in (rho_grid if rho_grid is not None else self.rho_grid))
        if not grid or any(r < 0 for r in grid):
            raise ValueError(f"MetaFusion.mutual_learning rho_grid: expected rho >= 0 values, got {list(grid)}.")
        teachers = self.teacher_weights > 0
        states, all_losses, report = [], [], []
        for rho in grid:
            if rho == 0.0:
                cohort, losses = self.screen_students, self.screen_val_loss.clone()
            else:
                cohort = copy.deepcopy(self.screen_students)
                losses = self._train(cohort, train, val, rho, self.teacher_weights)
            finite = torch.isfinite(losses)
            row = {
                "rho": rho,
                "teachers": float(losses[teachers & finite].mean()) if bool((teachers & finite).any()) else math.inf,
                "cohort": float(losses[finite].mean()) if bool(finite.any()) else math.inf,
                "ensemble": self._selected_ensemble(cohort, losses, val)[1],
            }
            report.append(row)
            states.append(copy.deepcopy(cohort.state_dict()))
            all_losses.append(losses)
            logger.info("meta fusion: rho=%s score=%.6g (%s)", rho, row[self.rho_criterion], self.rho_criterion)
        best_rho, ties = choose_rho(report, self.rho_criterion)
        scores = [r[self.rho_criterion] for r in report]
        best = grid.index(best_rho)
        if len(ties) > 1:
            logger.warning(
                "meta fusion: rho values %s tie on the %s score %.6g; keeping the smallest, %s",
                ties,
                self.rho_criterion,
                scores[best],
                best_rho,
            )
        self.rho_report = report
        self.students.load_state_dict(states[best])
        self.val_loss.copy_(all_losses[best])
        self.rho.fill_(best_rho)
        if len(grid) == len(self.rho_grid):
            self.rho_scores.copy_(torch.tensor(scores))
        self._set_stage("mutual_learned")
        return best_rho

    def _selected_ensemble(
        self, students: nn.ModuleList, losses: torch.Tensor, val: MetaFusionData
    ) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """Caruana selection over ``students`` on the validation split and the selected ensemble's loss.

        Returns:
            ``(multiplicities [S], ensemble validation loss, validation predictions, availability [S, N])``.
        """
        with torch.no_grad():
            preds = self._as_pred(self.student_outputs(val.x, val.mask, students))
        avail = self.availability(val.mask)
        weights = self._member_weights(losses)
        counts = ensemble_selection(
            preds,
            val.y,
            losses,
            self.task,
            avail,
            self.prune_fraction,
            self.init_size,
            self.max_ensemble_size,
            weights,
        )
        combined = _combine(preds, avail, counts.to(preds.dtype) * weights, self._fallback_order(losses))
        return counts, _aggregate_loss(combined, val.y, self.task), preds, avail

    def select_ensemble(self, val: MetaFusionData | Sequence[Any]) -> torch.Tensor:
        """Stage (d): Caruana ensemble selection and the stacking fit on validation predictions.

        The same selection also runs over the screened cohort (rho = 0, no mutual learning) into
        ``screen_committee``: rule ``"ensemble_screen"``, the ablation "Meta Fusion without mutual learning".

        Args:
            val: validation split.

        Returns:
            ``committee`` ``[S]`` multiplicities.
        """
        self._check_stage("screened", "select_ensemble")
        val = self._check_data(val, "val")
        counts, _, preds, avail = self._selected_ensemble(self.students, self.val_loss, val)
        self.committee.copy_(counts)
        self.screen_committee.copy_(self._selected_ensemble(self.screen_students, self.screen_val_loss, val)[0])
        self._fit_stacking(preds, avail, val.y)
        self._set_stage("ensembled")
        logger.info("meta fusion committee: %s", self.committee_summary())
        return counts

    def fit(
        self,
        train: MetaFusionData | Sequence[Any],
        val: MetaFusionData | Sequence[Any],
        rho_grid: Sequence[float] | None = None,
        resume: bool = False,
        after_stage: Callable[[str], None] | None = None,
    ) -> MetaFusion:
        """Run ``screen -> select_teachers -> mutual_learning -> select_ensemble``.

        Args:
            train: ``MetaFusionData(x, mask, y)`` (or a 3-tuple) for training.
            val: the same for validation (checkpointing, teachers, rho, committee, stacking).
            rho_grid: overrides ``self.rho_grid``.
            resume: skip the stages this model has already reached (``stage`` buffer, e.g. after loading a
                state saved by ``after_stage``); every stage is deterministic given the seed, so a resumed fit
                ends where an uninterrupted one does. ``False`` refits every stage.
            after_stage: called with the stage name (``"screened"``, ``"teachers_selected"``,
                ``"mutual_learned"``, ``"ensembled"``) after each stage that ran, e.g. to checkpoint.

        Returns:
            ``self``.
        """
        reached = int(self.stage) if resume else -1
        steps: tuple[tuple[str, Callable[[], Any]], ...] = (
            ("screened", lambda: self.screen(train, val)),
            ("teachers_selected", self.select_teachers),
            ("mutual_learned", lambda: self.mutual_learning(train, val, rho_grid)),
            ("ensembled", lambda: self.select_ensemble(val)),
        )
        for name, step in steps:
            if reached >= STAGES.index(name):
                logger.info("meta fusion: stage %r already done (resume)", name)
                continue
            step()
            if after_stage is not None:
                after_stage(name)
        return self

    # ------------------------------------------------------------------------------- aggregation
    def _member_weights(self, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Per-student factor of the ensemble weights: 1, or ``1 / validation loss`` (``"inverse_loss"``)."""
        if self.ensemble_weighting == "inverse_loss":
            return 1.0 / (self.val_loss if losses is None else losses).clamp_min(1e-12)
        return torch.ones(len(self.cohort))

    def _fallback_order(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.nan_to_num(losses, nan=math.inf), stable=True)

    def _stack_features(self, preds: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        p = preds if preds.ndim == 3 else preds[..., None]  # [S, N, k_in]
        filled = torch.where(avail[..., None], p, self.stack_fill[:, None, :].to(p.dtype))
        return filled.permute(1, 0, 2).reshape(p.shape[1], -1)  # [N, S * k_in]

    def _fit_stacking(self, preds: torch.Tensor, avail: torch.Tensor, y: torch.Tensor) -> None:
        from sklearn.linear_model import LogisticRegression, Ridge

        p = preds if preds.ndim == 3 else preds[..., None]
        fill = torch.stack(
            [p[s][avail[s]].mean(dim=0) if bool(avail[s].any()) else p[s].mean(dim=0) for s in range(p.shape[0])]
        )
        self.stack_fill.copy_(fill)
        feats = self._stack_features(preds, avail).double().numpy()
        target = y.numpy()
        coef = np.zeros((feats.shape[1], self.num_classes))
        intercept = np.zeros(self.num_classes)
        if self.task == "regression":
            reg = Ridge(alpha=1.0).fit(feats, target.astype(float))
            coef[:, 0], intercept[0] = reg.coef_, reg.intercept_
        elif len(np.unique(target)) < 2:
            intercept[:] = -30.0
            intercept[int(target[0])] = 0.0
        else:
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(feats, target)
            classes = clf.classes_.astype(int)
            intercept[:] = -30.0  # classes absent from validation get ~0 probability
            if len(classes) == 2:
                intercept[classes[0]], intercept[classes[1]] = 0.0, clf.intercept_[0]
                coef[:, classes[1]] = clf.coef_[0]
            else:
                coef[:, classes] = clf.coef_.T
                intercept[classes] = clf.intercept_
        self.stack_coef.copy_(torch.from_numpy(coef).float())
        self.stack_intercept.copy_(torch.from_numpy(intercept).float())

    def _rule_weights(self, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-student weights ``[S]`` and the fallback order of a weighted-mean rule."""
        s = len(self.cohort)
        order = self._fallback_order(self.val_loss)
        if rule == "ensemble":
            return self.committee.float() * self._member_weights(), order
        if rule in ("best_single", "best_single_screen"):
            return torch.zeros(s), order  # every row falls back to its best available student
        if rule == "average":
            return torch.ones(s), order
        return 1.0 / self.val_loss.clamp_min(1e-12), order  # weighted_average / weighted_vote

    @torch.no_grad()
    def predict(self, x: Mapping[str, torch.Tensor], mask: torch.Tensor, rule: str | None = None) -> torch.Tensor:
        """Aggregated prediction with the given rule, using only the students each sample can feed.

        Rules (see :data:`RULES`): ``ensemble`` (committee weighted by multiplicity, restricted per sample to
        available members, else the best available student), ``ensemble_screen`` (the same selection over the
        screened cohort: Meta Fusion without mutual learning), ``best_single`` / ``best_single_screen`` (the
        best available student by validation loss after / without mutual learning), ``average``,
        ``weighted_average`` (weights ``1 / validation loss``), ``stacking`` (logistic / ridge on student
        predictions, unavailable ones replaced by the student's mean validation prediction),
        ``majority_vote`` / ``weighted_vote`` (argmax votes, weights 1 or ``1 / validation loss``; ties go to
        the lower class index).

        Args:
            x: ``{modality: [N, F_m]}`` (absent modalities zero-filled; their content is ignored).
            mask: bool ``[N, M]``.
            rule: one of :data:`RULES` (default ``self.default_rule``).

        Returns:
            Classification: log-probabilities ``[N, K]`` (floored at ``log(1e-12)``; votes give the log vote
            share). Regression: ``[N]``.

        Raises:
            ValueError: unknown rule, or a vote rule for regression.
            RuntimeError: the stage the rule needs has not run.
        """
        rule = self.default_rule if rule is None else rule
        if rule not in RULES:
            raise ValueError(f"MetaFusion.predict rule: expected one of {list(RULES)}, got {rule!r}.")
        if rule in ("majority_vote", "weighted_vote") and self.task != "classification":
            raise ValueError(f"MetaFusion.predict rule {rule!r}: votes need task='classification'.")
        ensembled = ("ensemble", "ensemble_screen", "stacking")
        self._check_stage("ensembled" if rule in ensembled else "screened", f"predict(rule={rule!r})")
        mask = self._check_inputs(x, mask)
        avail = self.availability(mask)
        if rule in ("best_single_screen", "ensemble_screen"):
            preds = self._as_pred(self.student_outputs(x, mask, self.screen_students))
            w = torch.zeros(len(self.cohort))
            if rule == "ensemble_screen":
                w = self.screen_committee.float() * self._member_weights(self.screen_val_loss)
            out = _combine(preds, avail, w, self._fallback_order(self.screen_val_loss))
        else:
            preds = self._as_pred(self.student_outputs(x, mask))
            if rule == "stacking":
                z = self._stack_features(preds, avail) @ self.stack_coef + self.stack_intercept
                out = z.softmax(dim=-1) if self.task == "classification" else z[:, 0]
            elif rule in ("majority_vote", "weighted_vote"):
                w, order = self._rule_weights("average" if rule == "majority_vote" else rule)
                votes = F.one_hot(preds.argmax(dim=-1), self.num_classes).to(preds.dtype)
                out = _combine(votes, avail, w, order)  # vote shares [N, K]
            else:
                w, order = self._rule_weights(rule)
                out = _combine(preds, avail, w, order)
        return out.clamp_min(_PROB_FLOOR).log() if self.task == "classification" else out

    @torch.no_grad()
    def used_students(self, mask: torch.Tensor, rule: str = "ensemble") -> torch.Tensor:
        """Which students contribute to each sample's prediction under a weighted-mean rule.

        Args:
            mask: bool ``[N, M]``.
            rule: ``"ensemble"``, ``"best_single"``, ``"best_single_screen"``, ``"average"`` or
                ``"weighted_average"``.

        Returns:
            bool ``[N, S]``.
        """
        if rule not in ("ensemble", "best_single", "best_single_screen", "average", "weighted_average"):
            raise ValueError(f"MetaFusion.used_students rule: {rule!r} is not a weighted-mean rule.")
        mask = check_mask(mask, len(self.modalities))
        avail = self.availability(mask)
        if rule == "best_single_screen":
            w, order = torch.zeros(len(self.cohort)), self._fallback_order(self.screen_val_loss)
        else:
            w, order = self._rule_weights(rule)
        one = torch.eye(len(self.cohort), device=mask.device)[:, None, :].expand(-1, mask.shape[0], -1)  # [S, N, S]
        return _combine(one, avail, w, order) > 0

    def forward(
        self, x: Mapping[str, torch.Tensor | EncoderOutput], modality_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Deployable prediction with ``default_rule`` (mask defaults to all present).

        Args:
            x: ``{modality: [B, F_m]}`` or ``{modality: EncoderOutput}`` (``pooled`` is used).
            modality_mask: bool ``[B, M]``.

        Returns:
            ``[B, K]`` log-probabilities (classification) or ``[B, 1]`` (regression).
        """
        if modality_mask is None:
            first = pooled_features(x[self.modalities[0]])
            modality_mask = torch.ones(first.shape[0], len(self.modalities), dtype=torch.bool, device=first.device)
        out = self.predict(x, modality_mask)  # type: ignore[arg-type]
        return out if self.task == "classification" else out[:, None]

    # ---------------------------------------------------------------------------------- reporting
    def committee_summary(self) -> dict[str, int]:
        """``{student name: multiplicity}`` of the selected committee."""
        return {self.student_names[i]: int(c) for i, c in enumerate(self.committee.tolist()) if c > 0}

    def summary(self) -> dict[str, Any]:
        """What the method decided: stage, per-student losses, k, teachers, rho (+ scores) and committee."""
        return {
            "stage": STAGES[int(self.stage)],
            "students": self.student_names,
            "screen_val_loss": self.screen_val_loss.tolist(),
            "val_loss": self.val_loss.tolist(),
            "n_clusters": int(self.n_clusters),
            "teachers": [self.student_names[t] for t in self.teachers],
            "teacher_weight": float(self.teacher_weights.max()) if self.teachers else 0.0,
            "rho": float(self.rho),
            "rho_grid": list(self.rho_grid),
            "rho_scores": self.rho_scores.tolist(),
            "rho_criterion": self.rho_criterion,
            "rho_ties": _tied(self.rho_grid, self.rho_scores.tolist()),
            "committee": self.committee_summary(),
        }

    def get_config(self) -> dict[str, Any]:
        """Plain-JSON constructor arguments: ``MetaFusion(**m.get_config())`` rebuilds the architecture."""
        return {
            "modalities": list(self.modalities),
            "in_dims": dict(self.in_dims),
            "cohort": [c.as_dict() for c in self.cohort],
            "task": self.task,
            "num_classes": self.num_classes if self.task == "classification" else 2,
            "hidden": list(self.hidden),
            "extractor_hidden": self.extractor_hidden,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "weight_decay": self.weight_decay,
            "rho_grid": list(self.rho_grid),
            "rho_criterion": self.rho_criterion,
            "k_max": self.k_max,
            "prune_fraction": self.prune_fraction,
            "init_size": self.init_size,
            "max_ensemble_size": self.max_ensemble_size,
            "ensemble_weighting": self.ensemble_weighting,
            "pca_fit_on": self.pca_fit_on,
            "default_rule": self.default_rule,
            "seed": self.seed,
        }


def choose_rho(report: Sequence[Mapping[str, float]], criterion: str = "ensemble") -> tuple[float, list[float]]:
    """The rho a criterion picks from :attr:`MetaFusion.rho_report` rows, and the rho values tied with it.

    The lowest score wins; scores equal up to a relative 1e-9 tie and the first (smallest) grid value is kept.

    Args:
        report: rows ``{"rho", "teachers", "cohort", "ensemble"}`` in grid order.
        criterion: one of :data:`RHO_CRITERIA`.

    Returns:
        ``(chosen rho, tied rho values)``; ``(first rho, [])`` when no score is finite.
    """
    if criterion not in RHO_CRITERIA:
        raise ValueError(f"choose_rho criterion: expected one of {list(RHO_CRITERIA)}, got {criterion!r}.")
    grid = [float(r["rho"]) for r in report]
    ties = _tied(grid, [float(r[criterion]) for r in report])
    return (ties[0] if ties else grid[0]), ties


def _tied(grid: Sequence[float], scores: Sequence[float]) -> list[float]:
    """Grid values whose score equals the best one (relative tolerance 1e-9); ``[]`` without finite scores."""
    finite = [sc for sc in scores if math.isfinite(sc)]
    if not finite:
        return []
    best = min(finite)
    return [float(r) for r, sc in zip(grid, scores) if math.isfinite(sc) and math.isclose(sc, best, rel_tol=1e-9)]


def pooled_features(value: torch.Tensor | EncoderOutput) -> torch.Tensor:
    """The feature matrix of one modality: the tensor itself or an encoder output's ``pooled``."""
    return value.pooled if isinstance(value, EncoderOutput) else value
