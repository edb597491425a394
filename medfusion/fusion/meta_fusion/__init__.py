"""Meta Fusion (docs/method_spec.md section 4): a cohort of students with adaptive mutual learning.

One module per responsibility: :mod:`.cohort` (extractor/student specs, the cohort grid, students and their
latent maps), :mod:`.training` (screening, teachers, the mutual-learning loss and loop, rho),
:mod:`.aggregation` (ensemble selection, stacking and every aggregation rule as one table,
:data:`AGGREGATION_RULES`), :mod:`.model` (:class:`MetaFusion`: configuration, state, stages, predict) and
:mod:`.head` (:class:`MetaFusionHead` and fitting it), :mod:`.method` (the registered ``"meta_fusion"`` method:
stage (a), the encoder training). The bundle stages are application glue in
:mod:`medfusion.apps.meta_fusion_stages`.

Importing this package registers the ``"meta_fusion"`` fusion head. Every public name is re-exported here, so
``from medfusion.fusion.meta_fusion import MetaFusion`` keeps working.
"""

from __future__ import annotations

from medfusion.fusion.meta_fusion.aggregation import (
    AGGREGATION_RULES,
    RULES,
    AggregationRule,
    ensemble_selection,
    get_rule,
)
from medfusion.fusion.meta_fusion.cohort import (
    EXTRACTOR_KINDS,
    ExtractorSpec,
    MetaFusionData,
    Student,
    StudentCohort,
    StudentSpec,
    build_cohort,
    early_fusion_spec,
    late_fusion_spec,
    pooled_features,
)
from medfusion.fusion.meta_fusion.head import MetaFusionHead, attach_head, default_grids, fit_meta_fusion, tabular_data
from medfusion.fusion.meta_fusion.method import MetaFusionMethod
from medfusion.fusion.meta_fusion.model import MetaFusion
from medfusion.fusion.meta_fusion.training import (
    RHO_CRITERIA,
    STAGES,
    choose_rho,
    mutual_learning_loss,
    select_teachers_kmeans,
)

__all__ = [
    "EXTRACTOR_KINDS",
    "RHO_CRITERIA",
    "RULES",
    "AGGREGATION_RULES",
    "AggregationRule",
    "get_rule",
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
    "StudentCohort",
    "MetaFusion",
    "pooled_features",
    "MetaFusionHead",
    "MetaFusionMethod",
    "default_grids",
    "tabular_data",
    "fit_meta_fusion",
    "attach_head",
]
