"""Modality encoders and their registry (importing this package registers the built-ins)."""

from __future__ import annotations

from medfusion.encoders import unet3d  # noqa: F401  (registers)
from medfusion.encoders.base import ENCODERS, Encoder, EncoderOutput, FeatureInfo, create_encoder, list_encoders

__all__ = ["ENCODERS", "Encoder", "EncoderOutput", "FeatureInfo", "create_encoder", "list_encoders"]
