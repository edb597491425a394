"""Meta Fusion's training: screening, teachers, rho and the mutual-learning loop.

* stages (:data:`STAGES`): screening (every student trained independently, rho = 0), teachers by 1-D
  K-means on the screening validation losses with silhouette-chosen ``k`` (:func:`select_teachers_kmeans`),
  mutual learning for each rho of a grid, rho chosen on validation (:func:`choose_rho`, :data:`RHO_CRITERIA`);
* mutual learning ``L_s = task_s + rho * sum_{t in T, t != s} w_t * D(out_s, stopgrad(out_t))``,
  ``D = KL(teacher || student)`` (softmax, ``batchmean``) or MSE (:func:`mutual_learning_loss`);
* :func:`train_cohort`: the training loop (Adam, shared initial state, best validation epoch per student).

:class:`~medfusion.fusion.meta_fusion.model.MetaFusion` runs these stages on its cohort.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medfusion.fusion.meta_fusion.cohort import MetaFusionData, StudentCohort

__all__ = [
    "RHO_CRITERIA",
    "STAGES",
    "select_teachers_kmeans",
    "mutual_learning_loss",
    "per_student_loss",
    "train_cohort",
    "choose_rho",
]

logger = logging.getLogger(__name__)

RHO_CRITERIA: tuple[str, ...] = ("ensemble", "cohort", "teachers")
"""Validation scores a rho can be chosen by (``MetaFusion(rho_criterion=...)``)."""

STAGES: tuple[str, ...] = ("init", "extractors_fitted", "screened", "teachers_selected", "mutual_learned", "ensembled")
"""Workflow stages; ``MetaFusion.stage`` holds the index of the last completed one."""


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


def per_student_loss(out: torch.Tensor, y: torch.Tensor, avail: torch.Tensor, task: str) -> torch.Tensor:
    """Validation loss per student over its available rows.

    Args:
        out: ``[S, N, K]`` logits or ``[S, N]`` predictions.
        y: ``[N]`` targets.
        avail: bool ``[S, N]``.
        task: ``"classification"`` (cross-entropy) or ``"regression"`` (squared error).

    Returns:
        ``[S]`` float losses (inf for a student without an available row).
    """
    res = []
    for s in range(out.shape[0]):
        if bool(avail[s].any()):
            res.append(float(_task_loss_rows(out[s], y, task)[avail[s]].mean()))
        else:
            res.append(math.inf)
    return torch.tensor(res)


def train_cohort(
    cohort: StudentCohort,
    students: nn.ModuleList,
    train: MetaFusionData,
    val: MetaFusionData,
    rho: float,
    weights: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> torch.Tensor:
    """Train ``students`` jointly from the cohort's initial state; keep each student's best-validation epoch.

    Adam on :func:`mutual_learning_loss`, mini-batches in a seeded random order, one validation pass per epoch;
    at the end every student holds its weights of the epoch with its lowest validation loss (eval mode).

    Args:
        cohort: the :class:`StudentCohort` (latent maps, availability, ``initial_state``).
        students: the students to train (``cohort.students`` or ``cohort.screen_students`` or a copy).
        train: checked training split.
        val: checked validation split.
        rho: divergence weight (0 = independent training).
        weights: ``[S]`` teacher weights ``w_t``.
        epochs: training epochs.
        lr: Adam learning rate.
        batch_size: mini-batch size (``<= 0`` = full batch).
        weight_decay: Adam weight decay.
        seed: seeds the data order.

    Returns:
        ``[S]`` best validation loss per student (inf for a student without a validation row).
    """
    students.load_state_dict(cohort.initial_state)
    students.train()
    with torch.no_grad():
        lat_tr, lat_va = cohort.latents(train.x, train.mask), cohort.latents(val.x, val.mask)
    av_tr, av_va = cohort.availability(train.mask), cohort.availability(val.mask)
    n = train.mask.shape[0]
    bs = n if batch_size <= 0 else batch_size
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(students.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    best = torch.full((len(students),), math.inf)
    best_state = [copy.deepcopy(st.state_dict()) for st in students]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            out = cohort.run_students(students, {k: v[idx] for k, v in lat_tr.items()})
            loss, _ = mutual_learning_loss(out, train.y[idx], weights, rho, cohort.task, av_tr[:, idx])
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                opt.step()
        students.eval()
        with torch.no_grad():
            vl = per_student_loss(cohort.run_students(students, lat_va), val.y, av_va, cohort.task)
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
