"""Modality encoders and their registry (importing this package registers the built-ins).

Built-ins: ``unet3d`` (MRI volumes), ``resnet10/18/34/50`` (2D images, 3D volumes), ``bert`` and
``bert_tiny`` (reports), ``mlp`` and ``gru`` (EHR). ``transformers`` is imported only when a text
encoder is built.
"""

from __future__ import annotations

from medfusion.encoders import resnet, tabular, text, unet3d  # noqa: F401  (registers)
from medfusion.encoders.base import ENCODERS, Encoder, EncoderOutput, FeatureInfo, create_encoder, list_encoders

__all__ = ["ENCODERS", "Encoder", "EncoderOutput", "FeatureInfo", "create_encoder", "list_encoders"]
