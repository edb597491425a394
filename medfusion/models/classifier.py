"""Multimodal classifier = per-modality encoders (from the registry) + a fusion head (from the registry).

Built from plain JSON so a bundle can ``_target_`` it and switch the head by one key::

    {"_target_": "medfusion.models.classifier.Classifier",
     "encoders": {"ehr": {"name": "gru", "in_features": 76},
                  "cxr": {"name": "resnet18", "spatial_dims": 2},
                  "report": {"name": "bert", "freeze": true}},
     "head": "qmf", "num_classes": 2, "head_kwargs": {"num_samples": 1000}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfusion.encoders.base import create_encoder
from medfusion.fusion.base import FusionModel, create_fusion

__all__ = ["Classifier"]


class Classifier(FusionModel):
    """Encoders + fusion head built by name.

    Args:
        encoders: ``{modality: {"name": registered encoder name, **encoder kwargs}}`` in the model's
            modality order.
        head: registered fusion-head name (``"concat"``, ``"late"``, ``"mean_features"``, ``"qmf"``,
            ``"omnifuse"``, ``"metakd"``, ...).
        num_classes: number of classes.
        head_kwargs: further head kwargs (method hyper-parameters).

    Raises:
        ValueError: empty ``encoders`` or an encoder spec without ``"name"`` (the message names the
            modality).
    """

    def __init__(
        self,
        encoders: Mapping[str, Mapping[str, Any]],
        head: str,
        num_classes: int,
        head_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not encoders:
            raise ValueError("Classifier: encoders is empty; give {modality: {'name': ..., ...}}.")
        built = {}
        for modality, spec in encoders.items():
            if "name" not in spec:
                raise ValueError(f"Classifier: encoder spec for {modality!r} has no 'name' (got keys {sorted(spec)}).")
            kwargs = {k: v for k, v in spec.items() if k != "name"}
            built[modality] = create_encoder(str(spec["name"]), **kwargs)
        in_dims = {m: int(e.out_dim) for m, e in built.items()}
        fusion = create_fusion(
            head, modalities=list(encoders), in_dims=in_dims, num_classes=num_classes, **dict(head_kwargs or {})
        )
        super().__init__(built, fusion)
        self.head_name = head
        self.num_classes = num_classes
