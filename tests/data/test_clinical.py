from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import DataLoader, Dataset
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medfusion.data.clinical import LoadModalitiesByKindd, clinical_transforms
from medfusion.data.ehr import EHR_CHANNELS

MODS = {"ehr": "ehr", "cxr": "image", "report": "text", "pet": "volume", "labs": "tabular"}
TAB = {"labs": 3}


def _ehr(path):
    header = ["Hours", *EHR_CHANNELS]
    row = ["0.5"] + ["" for _ in EHR_CHANNELS]
    row[header.index("Heart Rate")] = "80"
    path.write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    return str(path)


def _dcm(path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = 20, 30
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(600, dtype=np.uint16).reshape(20, 30).tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == (20, 30)
    return str(path)


@pytest.fixture
def datalist(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray((np.arange(600).reshape(20, 30) % 251).astype(np.uint8)).save(png)
    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(np.full((20, 30, 3), (10, 200, 30), dtype=np.uint8)).save(rgb)
    nii = tmp_path / "pet.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((10, 12, 8)).astype(np.float32), np.eye(4)), nii)
    rep = tmp_path / "r.txt"
    rep.write_text("FINDINGS: The lungs are clear.\nIMPRESSION: none")
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    ehr = _ehr(tmp_path / "ts.csv")
    return [
        {"case_id": "a", "sample_index": 0, "label": 1.0, "ehr": ehr, "cxr": str(png), "report": str(rep),
         "pet": str(nii), "labs": [1.0, 2.0, 3.0]},
        {"case_id": "b", "sample_index": 1, "label": 0.0, "ehr": ehr, "cxr": _dcm(tmp_path / "x.dcm"),
         "report": None, "pet": None, "labs": None},
        {"case_id": "c", "sample_index": 2, "label": 0.0, "ehr": None, "cxr": str(rgb), "report": str(empty),
         "pet": str(nii), "labs": [0.5, 0.5, 0.5]},
    ]  # fmt: skip


def test_shapes_missing_and_mask(datalist):
    t = clinical_transforms(MODS, mode="eval", image_size=16, volume_size=8, max_length=12, tabular_features=TAB)
    a, b, c = (t(item) for item in datalist)
    assert a["ehr"].shape == (24, 76) and a["ehr"].dtype == torch.float32
    assert a["ehr"][0, 50] == 80  # heart rate column, 2 h bins
    assert a["cxr"].shape == (1, 16, 16) and a["cxr"].dtype == torch.float32
    assert type(a["cxr"]) is torch.Tensor  # no MetaTensor: mixes with zero tensors in collate
    assert float(a["cxr"].min()) == 0.0 and float(a["cxr"].max()) == pytest.approx(1.0)
    assert a["report"].shape == (2, 12) and a["report"].dtype == torch.long and a["report"][1].sum() > 2
    assert a["pet"].shape == (1, 8, 8, 8) and a["pet"].dtype == torch.float32
    assert a["labs"].tolist() == [1.0, 2.0, 3.0] and a["labs"].dtype == torch.float32
    assert a["label"].dtype == torch.float32 and a["label"].shape == ()
    assert a["modality_mask"].dtype == torch.bool and a["modality_mask"].tolist() == [True] * 5
    # b: DICOM image present; report, pet, labs missing -> zeros of the right shape
    assert b["cxr"].shape == (1, 16, 16) and b["cxr"].max() > 0
    assert b["modality_mask"].tolist() == [True, True, False, False, False]
    assert torch.equal(b["report"], torch.zeros(2, 12, dtype=torch.long))
    assert torch.equal(b["pet"], torch.zeros(1, 8, 8, 8)) and torch.equal(b["labs"], torch.zeros(3))
    # c: EHR missing; empty report file counts as missing; RGB jpg becomes one channel
    assert c["modality_mask"].tolist() == [False, True, False, True, True]
    assert torch.equal(c["ehr"], torch.zeros(24, 76))
    assert c["cxr"].shape == (1, 16, 16)


def test_collate_three_items(datalist):
    t = clinical_transforms(MODS, mode="train", image_size=16, volume_size=8, max_length=12, tabular_features=TAB)
    batch = next(iter(DataLoader(Dataset(datalist, t), batch_size=3, num_workers=0)))
    assert batch["ehr"].shape == (3, 24, 76)
    assert batch["cxr"].shape == (3, 1, 16, 16)
    assert batch["report"].shape == (3, 2, 12)
    assert batch["pet"].shape == (3, 1, 8, 8, 8)
    assert batch["labs"].shape == (3, 3)
    assert batch["modality_mask"].shape == (3, 5) and batch["modality_mask"].dtype == torch.bool
    assert batch["label"].tolist() == [1.0, 0.0, 0.0]
    assert batch["case_id"] == ["a", "b", "c"]


def test_seeded_train_mode_is_reproducible(datalist):
    kw = {"image_size": 16, "volume_size": 8, "max_length": 12, "tabular_features": TAB}
    x1 = clinical_transforms(MODS, mode="train", seed=3, **kw)(datalist[0])
    x2 = clinical_transforms(MODS, mode="train", seed=3, **kw)(datalist[0])
    assert torch.equal(x1["cxr"], x2["cxr"]) and torch.equal(x1["pet"], x2["pet"])


def test_errors(datalist):
    with pytest.raises(ValueError, match="unknown modality kind"):
        LoadModalitiesByKindd({"x": "video"})
    t = LoadModalitiesByKindd({"labs": "tabular"})
    with pytest.raises(ValueError, match=r"'labs' is missing .*tabular_features"):
        t({"labs": None})
    with pytest.raises(ValueError, match=r"lacks key 'labs'"):
        t({"case_id": "z"})
    t3 = LoadModalitiesByKindd({"labs": "tabular"}, tabular_features={"labs": 3})
    with pytest.raises(ValueError, match=r"'labs' of case 'z': expected 3 features"):
        t3({"case_id": "z", "labs": [1.0, 2.0]})


def test_train_mode_augments(datalist):
    kw = {"image_size": 16, "volume_size": 8, "max_length": 12, "tabular_features": TAB}
    ev = clinical_transforms(MODS, mode="eval", **kw)(datalist[0])
    outs = [clinical_transforms(MODS, mode="train", seed=s, **kw)(datalist[0]) for s in range(4)]
    assert any(not torch.equal(o["cxr"], ev["cxr"]) for o in outs)
    assert any(not torch.equal(o["pet"], ev["pet"]) for o in outs)
    # EHR, text and tabular are never augmented
    assert all(torch.equal(o["ehr"], ev["ehr"]) and torch.equal(o["report"], ev["report"]) for o in outs)
