from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfusion.data.brats import brats_case_split, discover_brats
from medfusion.data.volume import LoadModalitiesd, brats_transforms
from medfusion.modality import BRATS_MODALITIES

SHAPE = (6, 5, 4)


def _nii(path: Path, value: float = 1.0, shape=SHAPE, label: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if label:
        arr = np.zeros(shape, np.uint8)
        arr[1, 1, 1], arr[2, 2, 2], arr[3, 3, 3] = 1, 2, 4
    else:
        arr = np.full(shape, value, np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _classic_case(root: Path, case: str, mods=("flair", "t1", "t1ce", "t2"), seg="seg", ext=".nii.gz") -> Path:
    d = root / case
    for i, m in enumerate(mods):
        _nii(d / f"{case}_{m}{ext}", value=i + 1)
    if seg:
        _nii(d / (f"{case}_{seg}{ext}" if seg == "seg" else seg), label=True)
    return d


def test_brats2018_hgg_lgg(tmp_path):
    root = tmp_path / "MICCAI_BraTS_2018_Data_Training"
    _classic_case(root / "HGG", "Brats18_2013_2_1")
    _classic_case(root / "LGG", "Brats18_2013_0_1")
    items = discover_brats(tmp_path, require_label=True)
    assert [i["case_id"] for i in items] == ["Brats18_2013_0_1", "Brats18_2013_2_1"]
    assert items[0]["source"] == "brats2018" and items[0]["label_convention"] == "brats"
    assert items[0]["flair"].endswith("LGG/Brats18_2013_0_1/Brats18_2013_0_1_flair.nii.gz")
    assert [i["sample_index"] for i in items] == [0, 1]


def test_brats2019_and_2021(tmp_path):
    _classic_case(tmp_path / "MICCAI_BraTS_2019_Data_Training" / "HGG", "BraTS19_CBICA_AAB_1")
    _classic_case(tmp_path / "x", "BraTS2021_00000")
    items = discover_brats(tmp_path)
    assert {i["source"] for i in items} == {"brats2019", "brats2021"}


def test_brats2020_nii_quirk_and_missing_modality(tmp_path):
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    _classic_case(root, "BraTS20_Training_001", ext=".nii")
    _classic_case(root, "BraTS20_Training_355", seg="W39_1998.09.19_Segm.nii")
    _classic_case(root, "BraTS20_Training_012", mods=("flair", "t1", "t2"))
    (root / "name_mapping.csv").write_text("a,b\n")
    items = {i["case_id"]: i for i in discover_brats(root, require_label=True)}
    assert items["BraTS20_Training_001"]["t2"].endswith("_t2.nii")
    assert items["BraTS20_Training_355"]["label"].endswith("W39_1998.09.19_Segm.nii")
    assert items["BraTS20_Training_012"]["t1ce"] is None
    assert items["BraTS20_Training_012"]["modality_mask"] == [True, True, False, True]
    with pytest.raises(
        FileNotFoundError,
        match=r"brats2020 case BraTS20_Training_012: no t1ce file \(looked for BraTS20_Training_012_t1ce.nii.gz",
    ):
        discover_brats(root, allow_missing_modalities=False)


def test_validation_cases_without_label(tmp_path):
    _classic_case(tmp_path, "BraTS20_Validation_001", seg=None)
    assert discover_brats(tmp_path)[0]["label"] is None
    with pytest.raises(FileNotFoundError, match="BraTS20_Validation_001: no label file"):
        discover_brats(tmp_path, require_label=True)


def test_brats2023_names(tmp_path):
    d = tmp_path / "BraTS-GLI-00000-000"
    for i, suffix in enumerate(["t1c", "t1n", "t2f", "t2w"]):
        _nii(d / f"BraTS-GLI-00000-000-{suffix}.nii.gz", value=i + 1)
    _nii(d / "BraTS-GLI-00000-000-seg.nii.gz", label=True)
    item = discover_brats(tmp_path, modalities=("t1ce", "flair"))[0]
    assert item["t1ce"].endswith("-t1c.nii.gz") and item["flair"].endswith("-t2f.nii.gz")
    assert item["label_convention"] == "brats2023" and item["source"] == "brats2023"
    loaded = LoadModalitiesd(("t1ce", "flair"))(item)
    assert loaded["image"][:, 0, 0, 0].tolist() == [1.0, 3.0]  # by name, not file order


def test_msd_4d_channel_order_by_name(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    (root / "imagesTr").mkdir(parents=True)
    vol = np.stack([np.full(SHAPE, v, np.float32) for v in (10, 20, 30, 40)], axis=-1)  # FLAIR, T1w, t1gd, T2w
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "imagesTr" / "BRATS_001.nii.gz"))
    _nii(root / "labelsTr" / "BRATS_001.nii.gz", label=False, value=0)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"junk")
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "training": [
            {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"},
            {"image": "./imagesTr/._BRATS_001.nii.gz", "label": "./labelsTr/._BRATS_001.nii.gz"},
        ],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    items = discover_brats(tmp_path, modalities=("t2", "t1ce", "t1", "flair"), require_label=True)
    assert len(items) == 1 and items[0]["label_convention"] == "msd"
    loaded = LoadModalitiesd(("t2", "t1ce", "t1", "flair"))(items[0])
    assert loaded["image"].shape == (4, *SHAPE)
    assert loaded["image"][:, 0, 0, 0].tolist() == [40.0, 30.0, 20.0, 10.0]
    assert loaded["label"].shape == (1, *SHAPE)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_brats(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No BraTS cases under"):
        discover_brats(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown|not one of|expected"):
        discover_brats(tmp_path, modalities=("flair", "pet"))
    d = _classic_case(tmp_path / "c", "BraTS2021_00001")
    _nii(d / "BraTS2021_00001_t2.nii.gz", shape=(6, 5, 3))
    item = discover_brats(tmp_path / "c")[0]
    with pytest.raises(ValueError, match=r"case BraTS2021_00001: volumes differ in shape.*t2 .*\(6, 5, 3\)"):
        LoadModalitiesd()(item)
    (d / "BraTS2021_00001_t1.nii.gz").write_bytes(b"not a nifti")
    _nii(d / "BraTS2021_00001_t2.nii.gz")
    with pytest.raises(ValueError, match="case BraTS2021_00001: cannot read t1 file .*_t1.nii.gz"):
        LoadModalitiesd()(discover_brats(tmp_path / "c")[0])


def test_split_is_deterministic_and_disjoint():
    items = [{"case_id": f"c{i}", "sample_index": i} for i in range(20)]
    a = brats_case_split(items, {"meta_val": 0.1, "val": 0.1, "test": 0.2}, seed=3)
    b = brats_case_split(items, {"meta_val": 0.1, "val": 0.1, "test": 0.2}, seed=3)
    assert {k: len(v) for k, v in a.items()} == {"meta_val": 2, "val": 2, "test": 4, "train": 12}
    ids = [e["case_id"] for part in a.values() for e in part]
    assert sorted(ids) == sorted(i["case_id"] for i in items)
    assert a == b and [e["sample_index"] for e in a["train"]] == list(range(12))
    small = brats_case_split(items[:4], {"meta_val": 0.1, "val": 0.1, "test": 0.2})
    assert all(len(v) == 1 for v in small.values())
    with pytest.raises(ValueError, match="cannot fill"):
        brats_case_split(items[:3], {"meta_val": 0.1, "val": 0.1, "test": 0.2})


def test_train_transform_crops_and_regions(tmp_path):
    _classic_case(tmp_path, "BraTS2021_00002")
    item = discover_brats(tmp_path)[0]
    out = brats_transforms(BRATS_MODALITIES, "train", roi_size=(8, 8, 8))(item)
    sample = out[0] if isinstance(out, list) else out
    assert sample["image"].shape == (4, 8, 8, 8) and sample["label"].shape == (3, 8, 8, 8)
    assert sample["modality_mask"].dtype == torch.bool


def test_real_brats2021_case(real_case):
    items = discover_brats(real_case.parent, require_label=True)
    item = next(i for i in items if i["case_id"] == "BraTS2021_00006")
    sample = brats_transforms(BRATS_MODALITIES, "eval")(item)
    assert sample["image"].shape == (4, 240, 240, 155)
    assert sample["modality_mask"].all()
    raw = LoadModalitiesd()(item)
    assert sorted(torch.unique(raw["label"]).int().tolist()) == [0, 1, 2, 4]
    counts = sample["label"].sum(dim=(1, 2, 3)).int().tolist()
    assert counts == [25506 + 26448, 25506 + 85957 + 26448, 26448]  # TC, WT, ET


def test_config_convention_overrides_the_detected_one(tmp_path):
    _classic_case(tmp_path, "BraTS2021_00003")
    assert discover_brats(tmp_path)[0]["label_convention"] == "brats"
    assert discover_brats(tmp_path, label_convention="brats2015")[0]["label_convention"] == "brats2015"
    spec = discover_brats(tmp_path, label_convention={"TC": [1, 4], "WT": [1, 2, 4], "ET": [4]})[0]
    assert spec["label_convention"] == "TC=1,4;WT=1,2,4;ET=4;write=4,1,2"
    with pytest.raises(ValueError, match="unknown label convention 'brats2013'"):
        discover_brats(tmp_path, label_convention="brats2013")
