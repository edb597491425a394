"""Trained bundle models for the DICOM pipeline: the ONE place that loads them.

:func:`load_bundle_network` is the single function every DICOM command loads weights through (today
:func:`medfusion.apps.export.load_bundle_model`: the bundle's ``network_def`` + the checkpoint's ``"model"`` weights,
strict). It also fingerprints the checkpoint (SHA-256), which the pipeline puts into the result UIDs so a re-run of
the same model on the same series is recognised, and a different model makes a new result version.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfusion.apps.export import load_bundle_model
from medfusion.data.labels import LabelConvention, get_convention
from medfusion.models.segmenter import Segmenter

__all__ = ["LoadedModel", "load_bundle_network", "SegmentationModel", "load_segmentation_model", "file_sha256"]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A bundle network with its weights.

    Attributes:
        network: eval mode, on ``device``.
        parser: the bundle's ``monai.bundle.ConfigParser`` (with the overrides applied).
        bundle: bundle folder.
        checkpoint: weights file.
        checkpoint_sha256: its fingerprint.
        overrides: the config overrides used.
        device: where the network runs.
    """

    network: nn.Module
    parser: Any
    bundle: Path
    checkpoint: Path
    checkpoint_sha256: str
    overrides: dict[str, Any]
    device: torch.device


def load_bundle_network(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Build a bundle's ``network_def`` and load trained weights (strict) -- the pipeline's only model loader.

    Args:
        bundle_dir: bundle folder (``configs/inference.json``).
        checkpoint: weights (default ``<bundle>/models/model.pt``).
        overrides: config overrides the model was trained with (``{"network_def#channels": [8, 16, 32, 64]}``).
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).

    Raises:
        FileNotFoundError: no bundle config or checkpoint.
        ValueError: the checkpoint does not fit the network.
    """
    root = Path(bundle_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else root / "models" / "model.pt"
    network, parser = load_bundle_model(root, ckpt, overrides=overrides)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedModel(
        network=network.to(dev).eval(),
        parser=parser,
        bundle=root,
        checkpoint=ckpt,
        checkpoint_sha256=file_sha256(ckpt),
        overrides=dict(overrides or {}),
        device=dev,
    )


@dataclass
class SegmentationModel:
    """A BraTS-style segmenter ready for the DICOM pipeline.

    Attributes:
        loaded: network and provenance.
        modalities: the network's modality order.
        inferer: the bundle's sliding-window inferer (``roi_size``, ``sw_overlap``, ``mode`` from the config).
        label_convention: label values written for the regions (the model's convention).
        settings: inference settings that change the result (part of the result's identity).
    """

    loaded: LoadedModel
    modalities: tuple[str, ...]
    inferer: Any
    label_convention: LabelConvention
    settings: dict[str, Any]

    @property
    def network(self) -> nn.Module:
        """The network."""
        return self.loaded.network


def load_segmentation_model(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    roi_size: Sequence[int] | None = None,
    label_convention: str | None = None,
    device: str | torch.device | None = None,
) -> SegmentationModel:
    """Load a segmentation bundle (``bundles/brats_metakd``) for :func:`~medfusion.apps.dicom.segment.dicom_segment`.

    Args:
        bundle_dir: bundle folder.
        checkpoint: weights (default ``<bundle>/models/model.pt``).
        overrides: config overrides the model was trained with.
        roi_size: sliding-window size (default: the bundle's ``roi_size``).
        label_convention: label values of the written label map (``brats``, ``brats2023``, ``msd``); default: the
            bundle config's ``label_convention`` when it sets one, else ``brats`` (1 NCR, 2 ED, 4 ET).
        device: default automatic.

    Raises:
        ValueError: the bundle's network is not a medfusion ``Segmenter``.
    """
    extra = dict(overrides or {})
    if roi_size is not None:
        extra["roi_size"] = [int(r) for r in roi_size]
    loaded = load_bundle_network(bundle_dir, checkpoint, extra, device)
    if not isinstance(loaded.network, Segmenter):
        raise ValueError(
            f"bundle {bundle_dir}: network_def builds a {type(loaded.network).__name__}; dicom-segment needs a "
            "medfusion Segmenter (a segmentation bundle such as bundles/brats_metakd)."
        )
    parser = loaded.parser
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    # the bundle's label_convention is null when the dataset's own is used (then BraTS 2018-2021 labels)
    conv_name = label_convention or (parser["label_convention"] if "label_convention" in parser else None) or "brats"
    conv = get_convention(str(conv_name))
    settings = {
        "roi_size": [int(r) for r in getattr(inferer, "roi_size", [])],
        "sw_overlap": getattr(inferer, "overlap", None),
        "sw_mode": str(getattr(inferer, "mode", "")),
        "label_convention": conv.name,
    }
    return SegmentationModel(
        loaded=loaded,
        modalities=tuple(loaded.network.modalities),
        inferer=inferer,
        label_convention=conv,
        settings=settings,
    )
