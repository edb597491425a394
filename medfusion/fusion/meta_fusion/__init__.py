"""Meta Fusion (docs/method_spec.md section 4): a cohort of students with adaptive mutual learning.

Importing this package registers the ``"meta_fusion"`` fusion head. Every public name is re-exported here, so
``from medfusion.fusion.meta_fusion import MetaFusion`` keeps working.
"""

from __future__ import annotations

from medfusion.fusion.meta_fusion.head import (
    MetaFusionHead,
    attach_head,
    default_grids,
    fit_meta_fusion,
    tabular_data,
)
from medfusion.fusion.meta_fusion.model import (
    EXTRACTOR_KINDS,
    RHO_CRITERIA,
    RULES,
    STAGES,
    ExtractorSpec,
    MetaFusion,
    MetaFusionData,
    Student,
    StudentSpec,
    build_cohort,
    choose_rho,
    early_fusion_spec,
    ensemble_selection,
    late_fusion_spec,
    mutual_learning_loss,
    pooled_features,
    select_teachers_kmeans,
)

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
    "MetaFusionHead",
    "default_grids",
    "tabular_data",
    "fit_meta_fusion",
    "attach_head",
]
