"""medfusion: multimodal medical learning with missing, noisy or imbalanced modalities."""

from __future__ import annotations

from medfusion.modality import BRATS_MODALITIES, CLINICAL_MODALITIES, Keys

__version__ = "0.1.0"
__all__ = ["Keys", "BRATS_MODALITIES", "CLINICAL_MODALITIES", "__version__"]
