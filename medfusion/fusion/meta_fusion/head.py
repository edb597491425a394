"""Meta Fusion as a fusion head: :class:`MetaFusionHead` over a fitted cohort, and fitting it.

Meta Fusion (:mod:`medfusion.fusion.meta_fusion`) trains in stages, not in one loop; this module holds the
stages that are fusion operations: :func:`tabular_data` (a table as
:class:`~medfusion.fusion.meta_fusion.MetaFusionData`), :func:`fit_meta_fusion` (cohort from per-modality
extractor grids, PCA fitted on train, screening, teachers, mutual learning, ensemble selection -> a fitted
:class:`MetaFusionHead`) and :func:`attach_head` (the network's head becomes the fitted head). The bundle
stage runner (feature extraction, saving, :class:`~medfusion.apps.meta_fusion_stages.MetaFusionStages`) is
application glue in :mod:`medfusion.apps.meta_fusion_stages`. Importing this module registers the
``"meta_fusion"`` fusion head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfusion.batch import unwrap
from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionHead, FusionOutput, register_fusion
from medfusion.fusion.meta_fusion.aggregation import get_rule
from medfusion.fusion.meta_fusion.cohort import MetaFusionData, build_cohort, pooled_features
from medfusion.fusion.meta_fusion.model import MetaFusion
from medfusion.fusion.meta_fusion.training import STAGES
from medfusion.io import atomic_file
from medfusion.modality import check_mask, validate_modalities

__all__ = ["default_grids", "MetaFusionHead", "tabular_data", "fit_meta_fusion", "attach_head"]

logger = logging.getLogger(__name__)


def default_grids(modalities: Sequence[str], in_dims: Mapping[str, int], n_components: int = 8) -> dict[str, list[str]]:
    """Default extractor grid per modality: ``["null", "identity", "pca:<min(n_components, F)>"]``.

    Args:
        modalities: ordered modality names.
        in_dims: ``{modality: F}`` feature sizes.
        n_components: PCA size (capped at the modality's feature size).

    Returns:
        ``{modality: [extractor spec, ...]}`` for :func:`~medfusion.fusion.meta_fusion.build_cohort`.
    """
    mods = validate_modalities(modalities)
    return {m: ["null", "identity", f"pca:{max(1, min(int(n_components), int(in_dims[m])))}"] for m in mods}


# ------------------------------------------------------------------------------------------------ head
@register_fusion("meta_fusion")
class MetaFusionHead(FusionHead):
    """Fusion head wrapping a :class:`~medfusion.fusion.meta_fusion.MetaFusion` over pooled encoder features.

    Built either for fitting (``grids`` or ``cohort`` + Meta Fusion hyper-parameters) or, from a checkpoint,
    with ``config`` = :meth:`MetaFusion.get_config` (what :meth:`head_kwargs` returns), so the cohort
    architecture exists before ``load_state_dict``.

    Args:
        modalities: ordered modality names.
        in_dims: ``{modality: pooled feature size}``.
        num_classes: number of classes (classification).
        grids: ``{modality: [extractor spec, ...]}``; default :func:`default_grids`.
        cohort: explicit students (``[{modality: spec}, ...]``), instead of ``grids``.
        config: a :meth:`MetaFusion.get_config` dict (rebuild from a checkpoint); excludes the other options.
        rule: aggregation rule of ``forward`` (a key of
            :data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES`; default
            the Meta Fusion ``default_rule``, ``"ensemble"``).
        **meta_kwargs: further :class:`MetaFusion` arguments (``task``, ``epochs``, ``rho_grid``, ``hidden``, ...).

    Raises:
        ValueError: ``config`` combined with other options, a ``config`` that does not match ``modalities`` /
            ``in_dims`` / ``num_classes``, ``grids`` and ``cohort`` both given, or an unknown rule.

    ``forward`` returns ``FusionOutput(logits, embeddings, aux)``: ``logits`` = log-probabilities ``[B, K]``
    of the rule (regression: ``[B, 1]``), ``embeddings`` = pooled features with absent modalities zeroed,
    ``aux`` = ``{"students_used": long [B] (students behind each prediction; weighted-mean rules, else the
    available ones), "student_logits": [S, B, K] or [S, B]}``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int = 2,
        grids: Mapping[str, Sequence[str]] | None = None,
        cohort: Sequence[Mapping[str, str]] | None = None,
        config: Mapping[str, Any] | None = None,
        rule: str | None = None,
        **meta_kwargs: Any,
    ) -> None:
        super().__init__(modalities)
        dims = {m: int(in_dims[m]) for m in self.modalities if m in in_dims}
        if len(dims) != len(self.modalities):
            missing = [m for m in self.modalities if m not in in_dims]
            raise ValueError(f"MetaFusionHead in_dims: no feature size for modalities {missing}.")
        if config is not None:
            extra = [k for k, v in (("grids", grids), ("cohort", cohort)) if v is not None] + sorted(meta_kwargs)
            if extra:
                raise ValueError(f"MetaFusionHead: 'config' rebuilds a fitted head; do not also give {extra}.")
            cfg = dict(config)
            if list(cfg.get("modalities", [])) != list(self.modalities):
                raise ValueError(
                    f"MetaFusionHead config: modalities {cfg.get('modalities')} differ from the network's "
                    f"{list(self.modalities)}."
                )
            saved_dims = {m: int(v) for m, v in dict(cfg.get("in_dims", {})).items()}
            if saved_dims != dims:
                raise ValueError(
                    f"MetaFusionHead config: in_dims {saved_dims} differ from the encoders' pooled sizes {dims} "
                    "(use the encoder settings of training)."
                )
            if cfg.get("task", "classification") == "classification" and int(cfg.get("num_classes", 2)) != num_classes:
                raise ValueError(
                    f"MetaFusionHead config: num_classes {cfg.get('num_classes')} differs from {num_classes}."
                )
            self.meta = MetaFusion(**cfg)
        else:
            if grids is not None and cohort is not None:
                raise ValueError("MetaFusionHead: give either 'grids' or 'cohort', not both.")
            students = (
                list(cohort)
                if cohort is not None
                else build_cohort(
                    {m: list(grids[m]) for m in grids} if grids is not None else default_grids(self.modalities, dims)
                )
            )
            if grids is not None and list(grids) != list(self.modalities):
                raise ValueError(
                    f"MetaFusionHead grids: keys {list(grids)} must be the modalities in order {list(self.modalities)}."
                )
            self.meta = MetaFusion(self.modalities, dims, students, num_classes=num_classes, **meta_kwargs)
        if rule is not None:
            get_rule(rule, self.meta.task, "MetaFusionHead rule")
        self.rule: str = rule if rule is not None else self.meta.default_rule

    @property
    def fitted(self) -> bool:
        """Whether the stage the rule needs has run (``screened``; ``ensembled`` for the ensembles and stacking)."""
        return int(self.meta.stage) >= STAGES.index(get_rule(self.rule).stage)

    def head_kwargs(self) -> dict[str, Any]:
        """Plain-JSON kwargs rebuilding this head's architecture: ``{"config": ..., "rule": ...}``."""
        return {"config": self.meta.get_config(), "rule": self.rule}

    def fit(
        self,
        train: MetaFusionData,
        val: MetaFusionData,
        rho_grid: Sequence[float] | None = None,
        resume: bool = False,
        after_stage: Callable[[str], None] | None = None,
    ) -> MetaFusionHead:
        """Run every Meta Fusion stage (:meth:`MetaFusion.fit`) on precomputed features.

        Args:
            train: training split (PCA and students).
            val: validation split (best epochs, teachers, rho, committee, stacking).
            rho_grid: overrides the configured grid.
            resume: skip the stages already reached (see :meth:`MetaFusion.fit`).
            after_stage: called with each finished stage's name.

        Returns:
            ``self``.
        """
        self.meta.fit(train, val, rho_grid, resume=resume, after_stage=after_stage)
        logger.info(
            "meta fusion head fitted: teachers %s, rho %s", self.meta.summary()["teachers"], float(self.meta.rho)
        )
        return self

    def forward(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> FusionOutput:
        """Aggregate the students that each sample can feed.

        Args:
            features: ``{modality: EncoderOutput}`` (``pooled`` ``[B, F_m]`` is used; a bare tensor is accepted).
            modality_mask: bool ``[B, M]``.

        Returns:
            ``FusionOutput`` (see the class docstring).

        Raises:
            RuntimeError: the cohort is not fitted yet.
        """
        if not self.fitted:
            raise RuntimeError(
                f"MetaFusionHead: the Meta Fusion cohort is not fitted (stage {STAGES[int(self.meta.stage)]!r}, "
                f"rule {self.rule!r}); fit it with medfusion.fusion.meta_fusion_head.fit_meta_fusion (bundle: "
                "configs/meta_fusion.json) or load a fitted checkpoint first."
            )
        mask = check_mask(modality_mask, len(self.modalities))
        x = {m: pooled_features(features[m]) for m in self.modalities}
        out = self.meta.predict(x, mask, self.rule)
        logits = out if self.meta.task == "classification" else out[:, None]
        with torch.no_grad():
            student = self.meta.student_outputs(x, mask)
            if get_rule(self.rule).weights is not None:
                used = self.meta.used_students(mask, self.rule).T  # [S, B]
            else:
                used = self.meta.availability(mask)
        emb = {
            m: torch.where(mask[:, i, None], x[m], torch.zeros((), dtype=x[m].dtype, device=x[m].device))
            for i, m in enumerate(self.modalities)
        }
        return FusionOutput(logits, emb, {"students_used": used.sum(dim=0), "student_logits": student})


def tabular_data(
    frame: Any, columns: Mapping[str, Sequence[str]], target: str, task: str = "regression"
) -> MetaFusionData:
    """Stage (b) for tabular cohorts: modalities are column groups of a table; a NaN makes a modality absent.

    Args:
        frame: a ``pandas.DataFrame``.
        columns: ``{modality: [column, ...]}`` in modality order.
        target: target column (no missing values).
        task: ``"regression"`` (float y) or ``"classification"`` (long y).

    Returns:
        ``MetaFusionData``; absent modalities are zero-filled, a row with every modality absent is an error.

    Raises:
        KeyError: a column does not exist (the message names it).
        ValueError: missing targets, or a row without any modality.
    """
    mods = validate_modalities(list(columns), field="columns")
    absent = [c for m in mods for c in [*columns[m], target] if c not in frame.columns]
    if absent:
        raise KeyError(f"tabular_data: columns {sorted(set(absent))} not in the table (has {list(frame.columns)}).")
    if frame[target].isna().any():
        raise ValueError(f"tabular_data: target column {target!r} has missing values.")
    x, present = {}, []
    for m in mods:
        values = torch.as_tensor(frame[list(columns[m])].to_numpy(dtype=float, copy=True), dtype=torch.float32)
        ok = ~torch.isnan(values).any(dim=1)
        x[m] = torch.where(ok[:, None], values, torch.zeros(()))
        present.append(ok)
    mask = torch.stack(present, dim=1)
    check_mask(mask, len(mods))
    y = torch.as_tensor(frame[target].to_numpy(copy=True))
    return MetaFusionData(x, mask, y.long() if task == "classification" else y.float())


def fit_meta_fusion(
    train: MetaFusionData,
    val: MetaFusionData,
    grids: Mapping[str, Sequence[str]] | None = None,
    num_classes: int = 2,
    rule: str | None = None,
    stage_checkpoint: str | Path | None = None,
    resume: bool = False,
    **meta_kwargs: Any,
) -> MetaFusionHead:
    """Stage (c): build the cohort from ``grids`` and fit every Meta Fusion stage.

    Args:
        train: training features (PCA fitted here).
        val: validation features.
        grids: ``{modality: [extractor, ...]}`` in modality order (default :func:`default_grids` over the
            modalities of ``train.x`` in its key order).
        num_classes: classes (classification).
        rule: the head's aggregation rule (default ``"ensemble"``).
        stage_checkpoint: file written atomically after every Meta Fusion stage (``{"config", "stage",
            "state"}``); ``None`` writes nothing.
        resume: with an existing ``stage_checkpoint``, load it and run only the stages it has not reached
            (the result equals an uninterrupted fit: every stage is deterministic given the seed).
        **meta_kwargs: :class:`MetaFusion` arguments (``task``, ``epochs``, ``rho_grid``, ...).

    Returns:
        The fitted :class:`MetaFusionHead`.

    Raises:
        ValueError: ``stage_checkpoint`` holds a different Meta Fusion configuration than the one requested.
    """
    mods = list(grids) if grids is not None else list(train.x)
    dims = {m: int(pooled_features(train.x[m]).shape[1]) for m in mods}
    head = MetaFusionHead(mods, dims, num_classes=num_classes, grids=grids, rule=rule, **meta_kwargs)
    if stage_checkpoint is None:
        return head.fit(train, val)
    path = Path(stage_checkpoint)
    if resume and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("config") != head.meta.get_config():
            raise ValueError(
                f"fit_meta_fusion stage_checkpoint {path}: saved for a different Meta Fusion configuration; "
                "delete it or run without resume."
            )
        head.load_state_dict(saved["state"])
        logger.info("meta fusion: resuming after stage %r from %s", saved.get("stage"), path)

    def save(stage: str) -> None:
        with atomic_file(path) as tmp:
            torch.save({"config": head.meta.get_config(), "stage": stage, "state": head.state_dict()}, tmp)

    return head.fit(train, val, resume=resume, after_stage=save)


def attach_head(model: nn.Module, head: MetaFusionHead) -> nn.Module:
    """Stage (d): make the fitted ``head`` the network's head (moved to the network's device).

    Args:
        model: the :class:`FusionModel` whose encoders produced the head's features.
        head: the fitted head.

    Returns:
        ``model``.

    Raises:
        ValueError: modality orders differ.
    """
    net: Any = unwrap(model)  # a FusionModel (its head_name, if any, is updated too)
    if tuple(head.modalities) != tuple(net.modalities):
        raise ValueError(f"attach_head: head modalities {head.modalities} differ from the model's {net.modalities}.")
    param = next(net.parameters(), None)
    net.head = head.to(param.device if param is not None else torch.device("cpu"))
    if hasattr(net, "head_name"):
        net.head_name = "meta_fusion"
    return model
