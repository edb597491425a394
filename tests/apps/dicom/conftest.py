"""Fixtures of the DICOM pipeline tests: a real Orthanc PACS, the real BraTS case (downsampled), a fixed model."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfusion.apps.dicom.orthanc import LocalOrthanc, orthanc_available
from medfusion.modality import BRATS_MODALITIES

REAL_CASE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "real" / "BraTS2021_00006"
BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "brats_metakd"
#: tiny network + sliding window (the model is built with these overrides everywhere in these tests)
TINY = {"network_def#channels": [8, 16, 32, 64]}
ROI = [64, 64, 48]  # one window over the 60x60x39 volume
STRIDE = 4  # 240x240x155 -> 60x60x39 (4 mm): the full-size path is the tutorial's


@pytest.fixture(scope="session")
def orthanc():
    """A real Orthanc with the DICOMweb plugin on a free localhost port, temporary storage; stopped after.

    A missing Orthanc is a failure, not a skip: ``make test`` installs it (``make orthanc``). Only an explicit
    ``MEDFUSION_SKIP_PACS=1`` (a developer machine without root or apt) turns the failure into a skip.
    """
    missing = orthanc_available()
    if missing:
        if os.environ.get("MEDFUSION_SKIP_PACS") == "1":
            pytest.skip(f"MEDFUSION_SKIP_PACS=1: {missing}")
        pytest.fail(f"the PACS tests need Orthanc ({missing}); run `make orthanc` or set MEDFUSION_SKIP_PACS=1")
    with LocalOrthanc() as server:
        yield server


@pytest.fixture(scope="session")
def small_case(tmp_path_factory) -> Path:
    """The real case every 4th voxel (int16 kept, affine scaled), in the BraTS 2021 layout: ``<root>/<case>/``."""
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not found at {REAL_CASE} (expected ../shared/data/real/ beside the project)")
    root = tmp_path_factory.mktemp("brats_small")
    case = root / REAL_CASE.name
    case.mkdir()
    for m in (*BRATS_MODALITIES, "seg"):
        img = nib.load(REAL_CASE / f"{REAL_CASE.name}_{m}.nii.gz")
        arr = np.asarray(img.dataobj)[::STRIDE, ::STRIDE, ::STRIDE]
        affine = img.affine.copy()
        affine[:3, :3] *= STRIDE
        nib.save(nib.Nifti1Image(arr, affine), case / f"{REAL_CASE.name}_{m}.nii.gz")
    return case


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """Fixed-seed weights of the bundle's network (tiny channels) saved as a MONAI CheckpointSaver file."""
    from medfusion.models.segmenter import Segmenter

    torch.manual_seed(1234)
    net = Segmenter(BRATS_MODALITIES, channels=TINY["network_def#channels"], out_channels=3)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save({"model": net.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def seg_model(checkpoint):
    from medfusion.apps.dicom.models import load_segmentation_model

    return load_segmentation_model(BUNDLE, checkpoint, overrides=TINY, roi_size=ROI, device="cpu")


@pytest.fixture(scope="session")
def bundle_nifti_inference(checkpoint, tmp_path_factory):
    """``run(case_dir, combination) -> label map`` from the bundle's own ``configs/inference.json`` (NIfTI path)."""
    from medfusion.apps.bundle import bundle_workflow

    def run(case_dir: Path, combination: str) -> nib.Nifti1Image:
        out = tmp_path_factory.mktemp("bundle_pred")
        overrides = {
            **TINY,
            "dataset_dir": str(case_dir.parent),
            "output_dir": str(out),
            "ckpt_path": str(checkpoint),
            "combination": combination,
            "roi_size": ROI,
            "device": "$torch.device('cpu')",
        }
        wf = bundle_workflow(BUNDLE, ["inference.json"], "infer", overrides)
        wf.initialize()
        wf.run()
        wf.finalize()
        (pred,) = sorted(out.glob("*.nii.gz"))
        return nib.load(pred)

    return run
