"""Meta Fusion (docs/method_spec.md section 4): :class:`MetaFusion`, its configuration, state and stages.

The pieces live by responsibility (each maps to a test with hand-computed values, see ``docs/methods.md``):

* :mod:`~medfusion.fusion.meta_fusion.cohort`: extractor and student specs, the cohort grid, the students
  and their latent maps (:class:`~medfusion.fusion.meta_fusion.cohort.StudentCohort`, the base class here);
* :mod:`~medfusion.fusion.meta_fusion.training`: screening, teachers, the mutual-learning loss and loop,
  rho selection;
* :mod:`~medfusion.fusion.meta_fusion.aggregation`: ensemble selection, stacking and every aggregation rule
  as one table (:data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES`);
* :mod:`~medfusion.fusion.meta_fusion.head`: the fusion head over a fitted cohort.

:class:`MetaFusion` holds the configuration and the state, runs the stages in order (:meth:`MetaFusion.fit`)
and predicts with any rule of the table (:meth:`MetaFusion.predict`). Missing modalities: a student trains
on, and predicts for, only the samples that have all its non-null modalities; at inference the committee is
restricted to the available students, falling back to the best available student (lowest validation loss)
when no member qualifies.

All state a checkpoint needs (student weights, PCA buffers, screening copies, teachers, weights, rho,
committee multiplicities, stacking coefficients, stage) is in parameters/buffers, so
``MetaFusion(**same_config).load_state_dict(sd)`` reproduces every prediction rule.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.meta_fusion.aggregation import (
    PROB_FLOOR,
    aggregate_loss,
    combine,
    ensemble_selection,
    fallback_order,
    fit_stacking,
    get_rule,
    member_weights,
)
from medfusion.fusion.meta_fusion.cohort import MetaFusionData, StudentCohort, StudentSpec, pooled_features
from medfusion.fusion.meta_fusion.training import (
    RHO_CRITERIA,
    STAGES,
    _tied,
    choose_rho,
    select_teachers_kmeans,
    train_cohort,
)
from medfusion.modality import check_mask

__all__ = ["MetaFusion"]

logger = logging.getLogger(__name__)


class MetaFusion(StudentCohort):
    """Meta Fusion: a student cohort (:class:`StudentCohort`), its training stages and its aggregation rules.

    Args:
        modalities: ordered modality names (the mask's column order).
        in_dims: ``{modality: F_m}`` raw feature sizes.
        cohort: students as :class:`StudentSpec` or JSON mappings ``{modality: "pca:8"}`` (missing = null);
            e.g. ``build_cohort(grids)``, or the ``cohort`` of ``early_fusion_spec``/``late_fusion_spec``.
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
        default_rule: rule used by ``forward`` (a key of
            :data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES`).
        seed: seeds student initialisation, shuffling and K-means.

    Raises:
        ValueError: any invalid setting (the message names the field).
    """

    stage: torch.Tensor
    screen_val_loss: torch.Tensor
    val_loss: torch.Tensor
    teacher_weights: torch.Tensor
    n_clusters: torch.Tensor
    rho: torch.Tensor
    rho_scores: torch.Tensor
    committee: torch.Tensor
    screen_committee: torch.Tensor
    stack_fill: torch.Tensor
    stack_coef: torch.Tensor
    stack_intercept: torch.Tensor

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
        for name, value, allowed in (
            ("rho_criterion", rho_criterion, RHO_CRITERIA),
            ("ensemble_weighting", ensemble_weighting, ("count", "inverse_loss")),
            ("pca_fit_on", pca_fit_on, ("train", "train+val")),
        ):
            if value not in allowed:
                raise ValueError(f"MetaFusion {name}: expected one of {list(allowed)}, got {value!r}.")
        if not rho_grid or any(r < 0 for r in rho_grid):
            raise ValueError(f"MetaFusion rho_grid: expected a non-empty list of rho >= 0, got {list(rho_grid)}.")
        if not 0.0 <= prune_fraction < 1.0:
            raise ValueError(f"MetaFusion prune_fraction: expected a value in [0, 1), got {prune_fraction}.")
        super().__init__(modalities, in_dims, cohort, task, num_classes, hidden, extractor_hidden, seed)
        get_rule(default_rule, task, "MetaFusion default_rule")
        self.epochs, self.lr, self.batch_size, self.weight_decay = int(epochs), float(lr), int(batch_size), weight_decay
        self.rho_grid = tuple(float(r) for r in rho_grid)
        self.rho_criterion, self.k_max = rho_criterion, int(k_max)
        self.prune_fraction, self.init_size, self.max_ensemble_size = prune_fraction, int(init_size), max_ensemble_size
        self.ensemble_weighting, self.pca_fit_on, self.default_rule = ensemble_weighting, pca_fit_on, default_rule

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

    # ----------------------------------------------------------------------------------- training
    def fit_extractors(self, data: MetaFusionData | Sequence[Any]) -> None:
        """Fit the PCA extractors on the rows where their modality is present.

        Args:
            data: the split(s) to fit on (``MetaFusionData``).

        Raises:
            ValueError: fewer present rows than the PCA size.
        """
        self.fit_latent_maps(self.check_data(data, "extractor data"))
        self._set_stage("extractors_fitted")

    def _train(
        self, students: nn.ModuleList, train: MetaFusionData, val: MetaFusionData, rho: float, weights: torch.Tensor
    ) -> torch.Tensor:
        """:func:`train_cohort` with this model's optimisation settings; returns the best validation losses ``[S]``."""
        return train_cohort(
            self,
            students,
            train,
            val,
            rho,
            weights,
            self.epochs,
            self.lr,
            self.batch_size,
            self.weight_decay,
            self.seed,
        )

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
        train, val = self.check_data(train, "train"), self.check_data(val, "val")
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
        train, val = self.check_data(train, "train"), self.check_data(val, "val")
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
            preds = self.as_predictions(self.student_outputs(val.x, val.mask, students))
        avail = self.availability(val.mask)
        weights = member_weights(self.ensemble_weighting, losses)
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
        combined = combine(preds, avail, counts.to(preds.dtype) * weights, fallback_order(losses))
        return counts, aggregate_loss(combined, val.y, self.task), preds, avail

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
        val = self.check_data(val, "val")
        counts, _, preds, avail = self._selected_ensemble(self.students, self.val_loss, val)
        self.committee.copy_(counts)
        self.screen_committee.copy_(self._selected_ensemble(self.screen_students, self.screen_val_loss, val)[0])
        fill, coef, intercept = fit_stacking(preds, avail, val.y, self.task, self.num_classes)
        self.stack_fill.copy_(fill)
        self.stack_coef.copy_(coef)
        self.stack_intercept.copy_(intercept)
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
    @torch.no_grad()
    def predict(self, x: Mapping[str, torch.Tensor], mask: torch.Tensor, rule: str | None = None) -> torch.Tensor:
        """Aggregated prediction with the given rule, using only the students each sample can feed.

        The rules are the table :data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES`:
        ``ensemble`` (committee weighted by multiplicity, restricted per sample to available members, else the
        best available student), ``ensemble_screen`` (the same selection over the screened cohort: Meta Fusion
        without mutual learning), ``best_single`` / ``best_single_screen`` (the best available student by
        validation loss after / without mutual learning), ``average``, ``weighted_average`` (weights
        ``1 / validation loss``), ``stacking`` (logistic / ridge on student predictions, unavailable ones
        replaced by the student's mean validation prediction), ``majority_vote`` / ``weighted_vote`` (argmax
        votes, weights 1 or ``1 / validation loss``; ties go to the lower class index).

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
        spec = get_rule(self.default_rule if rule is None else rule, self.task, "MetaFusion.predict rule")
        self._check_stage(spec.stage, f"predict(rule={spec.name!r})")
        mask = self.check_inputs(x, mask)
        avail = self.availability(mask)
        preds = self.as_predictions(self.student_outputs(x, mask, self.screen_students if spec.screened else None))
        out = spec.aggregate(self, preds, avail)
        return out.clamp_min(PROB_FLOOR).log() if self.task == "classification" else out

    @torch.no_grad()
    def used_students(self, mask: torch.Tensor, rule: str = "ensemble") -> torch.Tensor:
        """Which students contribute to each sample's prediction under a weighted-mean rule.

        Args:
            mask: bool ``[N, M]``.
            rule: a rule of :data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES` with
                ``weights`` (``ensemble``, ``ensemble_screen``, ``best_single``, ``best_single_screen``,
                ``average``, ``weighted_average``).

        Returns:
            bool ``[N, S]``.

        Raises:
            ValueError: unknown rule, or a rule that is not a weighted mean (stacking, votes).
        """
        spec = get_rule(rule, field="MetaFusion.used_students rule")
        if spec.weights is None:
            raise ValueError(f"MetaFusion.used_students rule: {rule!r} is not a weighted-mean rule.")
        mask = check_mask(mask, len(self.modalities))
        avail = self.availability(mask)
        w, order = spec.weights(self)
        one = torch.eye(len(self.cohort), device=mask.device)[:, None, :].expand(-1, mask.shape[0], -1)  # [S, N, S]
        return combine(one, avail, w, order) > 0

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
