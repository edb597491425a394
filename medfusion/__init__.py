"""medfusion: multimodal medical learning with missing, noisy or imbalanced modalities."""

from __future__ import annotations

from typing import Any

from medfusion.modality import BRATS_MODALITIES, CLINICAL_MODALITIES, Keys

__version__ = "0.1.0"
__all__ = ["Keys", "BRATS_MODALITIES", "CLINICAL_MODALITIES", "load_encoder", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy ``medfusion.load_encoder`` (importing it pulls in torch and MONAI; ``import medfusion`` stays light)."""
    if name == "load_encoder":
        from medfusion.apps.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'medfusion' has no attribute {name!r}")
