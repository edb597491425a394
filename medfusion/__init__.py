"""medfusion: multimodal medical learning with missing, noisy or imbalanced modalities."""

from __future__ import annotations

from typing import Any

from medfusion.modality import BRATS_MODALITIES, CLINICAL_MODALITIES, Keys

__version__ = "0.1.0"
__all__ = [
    "Keys",
    "BRATS_MODALITIES",
    "CLINICAL_MODALITIES",
    "load_encoder",
    "fit",
    "load_fitted",
    "predict",
    "evaluate",
    "TensorData",
    "stack_datalist",
    "__version__",
]

#: Lazy top-level names -> their module (importing them pulls in torch and MONAI; ``import medfusion`` stays light).
_LAZY = {
    "load_encoder": "medfusion.apps.export",
    "fit": "medfusion.apps.api",
    "load_fitted": "medfusion.apps.api",
    "predict": "medfusion.apps.api",
    "evaluate": "medfusion.apps.api",
    "TensorData": "medfusion.apps.api",
    "stack_datalist": "medfusion.apps.api",
}


def __getattr__(name: str) -> Any:
    """Lazy ``medfusion.load_encoder`` and the in-memory API (``medfusion.fit``, ``predict``, ``evaluate``, ...)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medfusion' has no attribute {name!r}")
