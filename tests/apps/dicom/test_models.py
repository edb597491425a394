"""The pipeline's one model loader: bundle + checkpoint, fingerprint, label convention, refusals."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes

from medfusion.apps.dicom.models import file_sha256, load_segmentation_model
from medfusion.apps.dicom.segment import segment_descriptions

ROOT = Path(__file__).resolve().parents[3]
TINY = {"network_def#channels": [8, 16, 32, 64]}


def test_label_convention_and_settings(checkpoint):
    bundle = ROOT / "bundles" / "brats_metakd"
    model = load_segmentation_model(bundle, checkpoint, TINY, roi_size=[32, 32, 32], device="cpu")
    assert model.label_convention.name == "brats" and model.settings["roi_size"] == [32, 32, 32]
    assert model.loaded.checkpoint_sha256 == file_sha256(checkpoint) and len(model.loaded.checkpoint_sha256) == 64
    assert model.modalities == ("flair", "t1", "t1ce", "t2")
    msd = load_segmentation_model(bundle, checkpoint, TINY, label_convention="msd", device="cpu")
    algorithm = hd.AlgorithmIdentificationSequence("test", codes.DCM.ArtificialIntelligence, "0")
    labels = [d.SegmentLabel for d in segment_descriptions("labels", msd.label_convention, algorithm)]
    assert labels == ["NCR necrotic/non-enhancing core (label 2)", "ED edema (label 1)", "ET enhancing tumor (label 3)"]
    configured = load_segmentation_model(bundle, checkpoint, {**TINY, "label_convention": "brats2023"}, device="cpu")
    assert configured.label_convention.name == "brats2023"
    with pytest.raises(ValueError, match="unknown label convention"):
        load_segmentation_model(bundle, checkpoint, TINY, label_convention="nope", device="cpu")


def test_refuses_a_checkpoint_that_does_not_fit(checkpoint):
    shapes = r"does not fit the configured network: .*\[8, 1, 3, 3, 3\] in the file, \[16, 1, 3, 3, 3\] here"
    with pytest.raises(ValueError, match=shapes):
        load_segmentation_model(ROOT / "bundles" / "brats_metakd", checkpoint, device="cpu")  # default channels
