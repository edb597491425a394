"""Compatibility module: the Meta Fusion head lives in :mod:`medfusion.fusion.meta_fusion.head`.

``from medfusion.fusion.meta_fusion_head import X`` keeps working for every name below.
"""

from __future__ import annotations

from medfusion.fusion.meta_fusion.head import (
    MetaFusionHead,
    attach_head,
    default_grids,
    fit_meta_fusion,
    tabular_data,
)

__all__ = ["default_grids", "MetaFusionHead", "tabular_data", "fit_meta_fusion", "attach_head"]
