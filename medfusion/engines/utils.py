"""Device selection and seeding."""

from __future__ import annotations

import torch

__all__ = ["default_device", "resolve_device"]


def default_device() -> torch.device:
    """CUDA when available, else CPU (never hard-coded ``.cuda()``)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` -> :func:`default_device`; otherwise ``torch.device(device)``."""
    if device is None or str(device) == "auto":
        return default_device()
    return torch.device(device)
