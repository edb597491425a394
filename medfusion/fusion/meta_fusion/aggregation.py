"""Meta Fusion's aggregation: Caruana ensemble selection, stacking and every rule as ONE table.

:data:`AGGREGATION_RULES` maps each rule name to its :class:`AggregationRule` (the function that combines
the students' predictions, the stage it needs, which cohort it reads, whether it is a weighted mean or a
vote). Every other place that needs rule names (:data:`RULES`, ``MetaFusion(default_rule=...)``,
:meth:`~medfusion.fusion.meta_fusion.model.MetaFusion.predict`, the head's ``rule``, the bundle's
``meta_fusion_rule``, benchmarks) reads this table through :func:`get_rule`.

Missing modalities: every rule combines, per sample, only the students whose modalities are all present
(``available``); a row no member covers falls back to the best available student (lowest validation loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from medfusion.fusion.meta_fusion.model import MetaFusion

__all__ = [
    "PROB_FLOOR",
    "AggregationRule",
    "AGGREGATION_RULES",
    "RULES",
    "get_rule",
    "combine",
    "aggregate_loss",
    "ensemble_selection",
    "member_weights",
    "fallback_order",
    "fit_stacking",
    "stack_features",
]

PROB_FLOOR = 1e-12
"""Probabilities are floored here before taking logs."""


def combine(
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


def aggregate_loss(pred: torch.Tensor, y: torch.Tensor, task: str) -> float:
    """Loss of an aggregated prediction: NLL of probabilities ``[N, K]`` or MSE of ``[N]``."""
    if task == "classification":
        return float(F.nll_loss(pred.clamp_min(PROB_FLOOR).log(), y.long()))
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
        return aggregate_loss(combine(preds, available, c.to(preds.dtype) * mw, order), y, task)

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


def member_weights(weighting: str, losses: torch.Tensor) -> torch.Tensor:
    """Per-student factor ``[S]`` of the ensemble weights: 1 (``"count"``) or 1 / validation loss (``"inverse_loss"``).

    Args:
        weighting: ``"count"`` or ``"inverse_loss"`` (``MetaFusion(ensemble_weighting=...)``).
        losses: ``[S]`` validation losses.
    """
    if weighting == "inverse_loss":
        return 1.0 / losses.clamp_min(1e-12)
    return torch.ones(len(losses))


def fallback_order(losses: torch.Tensor) -> torch.Tensor:
    """Student indices ``[S]`` by validation loss, best first (NaN last; ties keep cohort order)."""
    return torch.argsort(torch.nan_to_num(losses, nan=math.inf), stable=True)


def stack_features(preds: torch.Tensor, avail: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Stacking inputs: student predictions side by side, unavailable ones replaced by ``fill``.

    Args:
        preds: ``[S, N, K]`` probabilities or ``[S, N]`` regression outputs.
        avail: bool ``[S, N]``.
        fill: ``[S, K]`` (regression ``[S, 1]``) per-student replacement value.

    Returns:
        ``[N, S * K]`` (regression ``[N, S]``).
    """
    p = preds if preds.ndim == 3 else preds[..., None]  # [S, N, k_in]
    filled = torch.where(avail[..., None], p, fill[:, None, :].to(p.dtype))
    return filled.permute(1, 0, 2).reshape(p.shape[1], -1)  # [N, S * k_in]


def fit_stacking(
    preds: torch.Tensor, avail: torch.Tensor, y: torch.Tensor, task: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit the stacking combiner on validation predictions: logistic regression (C=1) or ridge (alpha=1).

    A student's fill value is its mean prediction over the rows it can see. Classes absent from ``y`` get an
    intercept of -30 (probability ~0); a single-class ``y`` predicts that class.

    Args:
        preds: ``[S, N, K]`` validation probabilities or ``[S, N]`` regression outputs.
        avail: bool ``[S, N]``.
        y: ``[N]`` validation targets.
        task: ``"classification"`` or ``"regression"``.
        num_classes: ``K`` (1 for regression).

    Returns:
        ``(fill [S, k_in], coef [S * k_in, K], intercept [K])`` float32, ``k_in`` = ``K`` (regression 1).
    """
    from sklearn.linear_model import LogisticRegression, Ridge

    p = preds if preds.ndim == 3 else preds[..., None]
    fill = torch.stack(
        [p[s][avail[s]].mean(dim=0) if bool(avail[s].any()) else p[s].mean(dim=0) for s in range(p.shape[0])]
    )
    feats = stack_features(preds, avail, fill).double().numpy()
    target = y.numpy()
    coef = np.zeros((feats.shape[1], num_classes))
    intercept = np.zeros(num_classes)
    if task == "regression":
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
    return fill, torch.from_numpy(coef).float(), torch.from_numpy(intercept).float()


# ------------------------------------------------------------------------------------------ the rule table
WeightFn = Callable[["MetaFusion"], tuple[torch.Tensor, torch.Tensor]]
"""``model -> (member weights [S], fallback order [S])`` of a weighted-mean or vote rule."""
AggregateFn = Callable[["MetaFusion", torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model, preds [S, N, K] or [S, N], available bool [S, N]) -> probabilities [N, K] or predictions [N]``."""


@dataclass(frozen=True)
class AggregationRule:
    """One aggregation rule of :meth:`~medfusion.fusion.meta_fusion.model.MetaFusion.predict`.

    Attributes:
        name: the rule's key in :data:`AGGREGATION_RULES`.
        description: what the rule computes (one line).
        aggregate: combines the students' predictions (probabilities, not logits) into one per sample.
        stage: the Meta Fusion stage the rule needs (``"screened"`` or ``"ensembled"``).
        screened: the rule reads the screened cohort (trained without mutual learning) instead of the
            mutual-learning one.
        weights: member weights and fallback order of a weighted-mean rule (what
            :meth:`~medfusion.fusion.meta_fusion.model.MetaFusion.used_students` reports); ``None`` for
            stacking and votes.
        classification_only: the rule needs ``task="classification"`` (votes).
    """

    name: str
    description: str
    aggregate: AggregateFn
    stage: str
    screened: bool = False
    weights: WeightFn | None = None
    classification_only: bool = False


def _committee(m: MetaFusion) -> tuple[torch.Tensor, torch.Tensor]:
    return m.committee.float() * member_weights(m.ensemble_weighting, m.val_loss), fallback_order(m.val_loss)


def _screen_committee(m: MetaFusion) -> tuple[torch.Tensor, torch.Tensor]:
    weights = m.screen_committee.float() * member_weights(m.ensemble_weighting, m.screen_val_loss)
    return weights, fallback_order(m.screen_val_loss)


def _best_single(m: MetaFusion) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(len(m.cohort)), fallback_order(m.val_loss)  # every row falls back to its best student


def _best_single_screen(m: MetaFusion) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(len(m.cohort)), fallback_order(m.screen_val_loss)


def _uniform(m: MetaFusion) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(len(m.cohort)), fallback_order(m.val_loss)


def _inverse_loss(m: MetaFusion) -> tuple[torch.Tensor, torch.Tensor]:
    return 1.0 / m.val_loss.clamp_min(1e-12), fallback_order(m.val_loss)


def _weighted_mean(weights: WeightFn) -> AggregateFn:
    def aggregate(m: MetaFusion, preds: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        return combine(preds, avail, *weights(m))

    return aggregate


def _vote(weights: WeightFn) -> AggregateFn:
    def aggregate(m: MetaFusion, preds: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        votes = F.one_hot(preds.argmax(dim=-1), m.num_classes).to(preds.dtype)
        return combine(votes, avail, *weights(m))  # vote shares [N, K]; ties go to the lower class index

    return aggregate


def _stacking(m: MetaFusion, preds: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    z = stack_features(preds, avail, m.stack_fill) @ m.stack_coef + m.stack_intercept
    return z.softmax(dim=-1) if m.task == "classification" else z[:, 0]


AGGREGATION_RULES: dict[str, AggregationRule] = {
    r.name: r
    for r in (
        AggregationRule(
            "ensemble",
            "Caruana committee, members weighted by multiplicity (times 1 / validation loss with "
            "ensemble_weighting='inverse_loss')",
            _weighted_mean(_committee),
            "ensembled",
            weights=_committee,
        ),
        AggregationRule(
            "ensemble_screen",
            "the same selection over the screened cohort: Meta Fusion without mutual learning",
            _weighted_mean(_screen_committee),
            "ensembled",
            screened=True,
            weights=_screen_committee,
        ),
        AggregationRule(
            "best_single",
            "the best available student by validation loss, after mutual learning",
            _weighted_mean(_best_single),
            "screened",
            weights=_best_single,
        ),
        AggregationRule(
            "best_single_screen",
            "the best available student by validation loss, without mutual learning",
            _weighted_mean(_best_single_screen),
            "screened",
            screened=True,
            weights=_best_single_screen,
        ),
        AggregationRule(
            "average",
            "simple average of the available students",
            _weighted_mean(_uniform),
            "screened",
            weights=_uniform,
        ),
        AggregationRule(
            "weighted_average",
            "average weighted by 1 / validation loss",
            _weighted_mean(_inverse_loss),
            "screened",
            weights=_inverse_loss,
        ),
        AggregationRule(
            "stacking",
            "logistic (classification) / ridge (regression) on the student predictions; an unavailable student's "
            "prediction is replaced by its mean validation prediction",
            _stacking,
            "ensembled",
        ),
        AggregationRule(
            "majority_vote", "argmax votes, weight 1", _vote(_uniform), "screened", classification_only=True
        ),
        AggregationRule(
            "weighted_vote",
            "argmax votes weighted by 1 / validation loss",
            _vote(_inverse_loss),
            "screened",
            classification_only=True,
        ),
    )
}
"""Every aggregation rule by name: the one place rule names are defined."""

RULES: tuple[str, ...] = tuple(AGGREGATION_RULES)
"""Aggregation rule names (the keys of :data:`AGGREGATION_RULES`), accepted by ``MetaFusion.predict``."""


def get_rule(name: str, task: str | None = None, field: str = "rule") -> AggregationRule:
    """Look a rule up in :data:`AGGREGATION_RULES` and check it suits the task.

    Args:
        name: rule name.
        task: ``"classification"`` / ``"regression"``; ``None`` skips the task check.
        field: config field named in error messages.

    Returns:
        The :class:`AggregationRule`.

    Raises:
        ValueError: unknown rule, or a classification-only rule (votes) for regression.
    """
    rule = AGGREGATION_RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ValueError(f"{field}: expected one of {list(RULES)}, got {name!r}.")
    if rule.classification_only and task is not None and task != "classification":
        raise ValueError(f"{field} {name!r}: votes need task='classification'.")
    return rule
