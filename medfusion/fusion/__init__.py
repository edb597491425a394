"""Fusion heads (one file per method) and baselines; importing this package registers them."""

from __future__ import annotations

from medfusion.fusion.base import FUSIONS, FusionHead, FusionModel, FusionOutput, create_fusion, list_fusions

__all__ = ["FUSIONS", "FusionHead", "FusionModel", "FusionOutput", "create_fusion", "list_fusions"]
from medfusion.fusion import baselines, meta_fusion, metakd, omnifuse, qmf  # noqa: F401,E402
