"""Foreground without a zero background: brain mask or non-zero region for normalisation and crops."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.transforms import NormalizeIntensityd

from medfusion.data.brats import discover_brats
from medfusion.data.synth_brats import write_brats2015_case, write_brats_cohort
from medfusion.data.volume import ForegroundNormalized, LoadModalitiesd, brats_transforms, nonzero_background
from medfusion.modality import BRATS_MODALITIES


def _nii(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return str(path)


def test_foreground_normalisation_hand_computed():
    # channel 0: brain voxels 1, 2, 3 (mean 2, population sd sqrt(2/3)); background -5 (z-scored export)
    img = torch.tensor([[[[-5.0, 1.0, 2.0, 3.0]]], [[[0.0, 0.0, 0.0, 0.0]]]])  # [2, 1, 1, 4]; channel 1 missing
    mask = torch.tensor([[[[0, 1, 1, 1]]]], dtype=torch.uint8)
    out = ForegroundNormalized("image")({"image": img, "brain_mask": mask})["image"]
    sd = (2 / 3) ** 0.5
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.0, -1 / sd, 0.0, 1 / sd]))
    assert torch.equal(out[1], torch.zeros(1, 1, 4))  # an all-zero (missing) channel stays 0
    assert torch.equal(img[0, 0, 0, 0], torch.tensor(-5.0))  # input untouched
    # no mask key (an already stacked image): the non-zero region, as MONAI's nonzero normalisation
    z = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]], [[[0.0, 5.0, 5.0, 8.0]]]])
    out = ForegroundNormalized("image")({"image": z})
    expected = NormalizeIntensityd("image", nonzero=True, channel_wise=True)({"image": z})["image"]
    assert torch.allclose(out["image"], expected) and out["brain_mask"].tolist() == [[[[0, 1, 1, 1]]]]


def test_nonzero_background_reads_the_border():
    vol = np.zeros((8, 8, 8), np.float32)
    vol[2:6, 2:6, 2:6] = 3.0
    assert nonzero_background(vol) is None  # skull-stripped: border 0
    z = (vol - 3.0) / 2.0  # z-scored: border -1.5
    assert nonzero_background(z) == pytest.approx(-1.5)
    assert nonzero_background(np.zeros((8, 8, 8))) is None


@pytest.fixture(scope="module")
def export2015(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b15vol") / "brats2015"
    write_brats_cohort(out, cases=1, size=32, seed=11, style="brats2015")
    return out


def _without_mask(export: Path, path: Path) -> Path:
    df = pd.read_csv(export / "manifest.csv").drop(columns=["brain_mask"])
    df[["flair", "t1ce", "label"]] = df[["flair", "t1ce", "label"]].map(lambda v: str(export / v))
    df.to_csv(path, index=False)
    return path


def test_mask_gives_the_foreground_and_zero_outside(export2015):
    item = discover_brats(export2015 / "manifest.csv", require_label=True)[0]
    raw = LoadModalitiesd()(dict(item))
    mask = np.asarray(nib.load(item["brain_mask"]).dataobj) > 0
    assert torch.equal(raw["brain_mask"][0].bool(), torch.from_numpy(mask))
    assert float(raw["image"][0][~torch.from_numpy(mask)].abs().min()) > 0  # z-scored: background not 0
    img = brats_transforms(BRATS_MODALITIES, "eval")(dict(item))["image"]
    inside = torch.from_numpy(mask)
    for c in (0, 2):  # flair, t1ce present
        assert float(img[c][~inside].abs().max()) == 0.0
        assert float(img[c][inside].mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(img[c][inside].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert float(img[1].abs().max()) == 0.0  # t1 missing
    assert "brain_mask" not in brats_transforms(BRATS_MODALITIES, "eval")(dict(item))


def test_negative_crops_are_centred_in_the_brain_only_with_the_mask(export2015, tmp_path, caplog):
    def centres(item: dict) -> list[float]:
        t = brats_transforms(
            BRATS_MODALITIES, "train", roi_size=(8, 8, 8), num_samples=60, flip_prob=0, intensity_aug=False
        )
        t.set_random_state(seed=0)
        return [float(s["image"][0, 4, 4, 4]) for s in t(dict(item))]  # crop centre voxel of flair

    with_mask = discover_brats(export2015 / "manifest.csv", require_label=True)[0]
    assert all(v != 0.0 for v in centres(with_mask))  # every centre inside the brain (0 only outside)
    # without the mask the whole z-scored volume is "non-zero": background centres appear (the failure)
    plain = discover_brats(_without_mask(export2015, tmp_path / "m.csv"), require_label=True)[0]
    with caplog.at_level(logging.WARNING, logger="medfusion.data.volume"):
        vals = centres(plain)
    warnings = [r.getMessage() for r in caplog.records if "is not 0" in r.getMessage()]
    assert len(warnings) == 1 and "no brain mask is given" in warnings[0]  # once per case, not per crop
    corner = float(brats_transforms(BRATS_MODALITIES, "eval")(dict(plain))["image"][0, 0, 0, 0])
    assert sum(v == pytest.approx(corner) for v in vals) > 5


def test_load_errors_name_the_file(tmp_path):
    vol = np.pad(np.ones((6, 6, 6), np.float32), 1)
    flair = _nii(tmp_path / "c" / "flair.nii.gz", vol)
    flat = _nii(tmp_path / "c" / "t1.nii.gz", vol[:, :, 4])  # a 2D slice
    with pytest.raises(ValueError, match=r"case c: t1 file .*t1.nii.gz has shape \(8, 8\); expected a 3D volume"):
        LoadModalitiesd(("flair", "t1"))({"case_id": "c", "flair": flair, "t1": flat})
    small = _nii(tmp_path / "c" / "mask_small.nii.gz", np.ones((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"brain mask .*mask_small.nii.gz has shape \(4, 4, 4\), images \(8, 8, 8\)"):
        LoadModalitiesd(("flair",))({"case_id": "c", "flair": flair, "brain_mask": small})
    empty = _nii(tmp_path / "c" / "mask_empty.nii.gz", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="mask_empty.nii.gz holds no voxel > 0"):
        LoadModalitiesd(("flair",))({"case_id": "c", "flair": flair, "brain_mask": empty})


def test_real_case_zscored_with_mask_equals_the_original(real_case, tmp_path):
    images = {
        m: np.asarray(nib.load(str(real_case / f"{real_case.name}_{m}.nii.gz")).dataobj) for m in ("flair", "t1ce")
    }
    seg = nib.load(str(real_case / f"{real_case.name}_seg.nii.gz"))
    files = write_brats2015_case(tmp_path / "case", images, np.asarray(seg.dataobj), affine=seg.affine)
    rows = {"case_id": "real", **{k: f"case/{v}" for k, v in files.items()}}
    pd.DataFrame([rows]).to_csv(tmp_path / "mask.csv", index=False)
    pd.DataFrame([{k: v for k, v in rows.items() if k != "brain_mask"}]).to_csv(tmp_path / "nomask.csv", index=False)
    assert nonzero_background(nib.load(str(tmp_path / "case" / files["flair"])).dataobj) is not None
    mods = ("flair", "t1ce")
    t = brats_transforms(mods, "eval")
    original = t(discover_brats(real_case.parent, mods, require_label=True)[0])
    zscored = t(discover_brats(tmp_path / "mask.csv", mods, require_label=True, label_convention="brats2015")[0])
    assert torch.allclose(zscored["image"], original["image"], atol=1e-4)
    assert torch.equal(zscored["label"], original["label"])  # 1/2/4 are brats2015 values with the same regions
    nomask = t(discover_brats(tmp_path / "nomask.csv", mods, require_label=True, label_convention="brats2015")[0])
    assert float((nomask["image"] - original["image"]).abs().max()) > 1.0
