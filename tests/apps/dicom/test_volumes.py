"""DICOM series -> volumes: exact round trip of NIfTI geometry, frame of reference checks, grids, float volumes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage, Orientation

from medfusion.apps.dicom.convert import SeriesSpec, nifti_to_dicom_study, write_datasets
from medfusion.apps.dicom.segment import dicom_segment
from medfusion.apps.dicom.volumes import (
    check_frame_of_reference,
    read_series_volume,
    stack_on_grid,
    volume_to_metatensor,
)


def _nifti(shape=(16, 18, 12), spacing=(1.0, 1.2, 2.0), seed=0, dtype=np.int16) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 800, size=shape).astype(dtype)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    return nib.Nifti1Image(arr, affine)


def test_dicom_series_read_back_equals_the_nifti_in_monai(small_case, tmp_path):
    """NIfTI -> DICOM MR series -> volume -> MetaTensor equals MONAI's own NIfTI load after Orientation (RAS)."""
    path = small_case / f"{small_case.name}_t1ce.nii.gz"
    study = nifti_to_dicom_study({"t1ce": path}, "roundtrip")
    shuffled = [study["t1ce"][i] for i in np.random.default_rng(0).permutation(len(study["t1ce"]))]
    sv = read_series_volume(shuffled, "t1ce")
    assert [int(d.InstanceNumber) for d in sv.datasets] != [int(d.InstanceNumber) for d in shuffled]
    ras = Orientation(axcodes="RAS")
    ours = ras(volume_to_metatensor(np.asarray(sv.volume.array)[None], sv.volume))
    monai = ras(LoadImage(image_only=True, ensure_channel_first=True)(str(path)))
    assert torch.equal(ours.as_tensor().float(), monai.as_tensor().float())
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(monai.affine), atol=1e-5)


def test_float_volumes_are_stored_with_rescale_and_uids_are_stable():
    img = _nifti(dtype=np.float32)
    data = np.asarray(img.dataobj).astype(np.float32) / 100.0 - 3.0  # z-scored-like, negative background
    img = nib.Nifti1Image(data, img.affine)
    first = nifti_to_dicom_study({"flair": img}, "k")
    assert first["flair"][0].SOPInstanceUID == nifti_to_dicom_study({"flair": img}, "k")["flair"][0].SOPInstanceUID
    assert first["flair"][0].SOPInstanceUID != nifti_to_dicom_study({"flair": img}, "other")["flair"][0].SOPInstanceUID
    vol = read_series_volume(first["flair"], "flair").volume
    back = np.sort(np.asarray(vol.array).ravel())
    step = (data.max() - data.min()) / 65535
    np.testing.assert_allclose(back, np.sort(data.ravel()), atol=step)


def test_frame_of_reference_mismatch_names_the_series(tmp_path, seg_model):
    a = nifti_to_dicom_study({"flair": _nifti()}, "study-x")
    b = nifti_to_dicom_study({"t1ce": _nifti(seed=1)}, "study-y")  # other frame of reference
    for ds in b["t1ce"]:
        ds.StudyInstanceUID = a["flair"][0].StudyInstanceUID
    vols = {
        "flair": read_series_volume(a["flair"], "flair: #1 AX T2 FLAIR"),
        "t1ce": read_series_volume(b["t1ce"], "t1ce: X"),
    }
    with pytest.raises(ValueError, match="not in one frame of reference") as err:
        check_frame_of_reference(vols)
    assert "flair: #1 AX T2 FLAIR" in str(err.value) and "t1ce: X" in str(err.value)
    folder = tmp_path / "dicom"
    write_datasets({**a, **b}, folder)
    with pytest.raises(ValueError, match="not in one frame of reference"):
        dicom_segment(folder, seg_model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("seg.dcm"))


def test_no_usable_series_is_an_error_listing_them(tmp_path, seg_model):
    study = nifti_to_dicom_study({"loc": _nifti()}, "s", series={"loc": SeriesSpec("3 PLANE LOC")})
    write_datasets(study, tmp_path / "dicom")
    with pytest.raises(ValueError, match="no series maps to any of the model's modalities") as err:
        dicom_segment(tmp_path / "dicom", seg_model, tmp_path / "out")
    assert "3 PLANE LOC" in str(err.value) and "ignored" in str(err.value)


def test_other_grids_are_reoriented_or_resampled_onto_the_reference():
    ref_img = _nifti()
    coarse_affine = ref_img.affine.copy()
    coarse_affine[:3, :3] *= 2
    coarse = nib.Nifti1Image(np.asarray(ref_img.dataobj)[::2, ::2, ::2].copy(), coarse_affine)
    specs = {
        "flair": SeriesSpec("AX FLAIR"),
        "t1": SeriesSpec("SAG T1", orientation="LFP"),  # same voxels written as sagittal slices
        "t2": SeriesSpec("AX T2 4mm"),
    }
    study = nifti_to_dicom_study({"flair": ref_img, "t1": ref_img, "t2": coarse}, "grids", series=specs)
    assert study["t1"][0].ImageOrientationPatient != study["flair"][0].ImageOrientationPatient
    vols = {m: read_series_volume(study[m], m) for m in study}
    image, mask, how = stack_on_grid(vols, ("flair", "t1", "t1ce", "t2"), "flair")
    assert how == {"flair": "same grid", "t1": "reoriented", "t2": "resampled"}
    assert mask.tolist() == [True, True, False, True]
    np.testing.assert_array_equal(image[1], image[0])  # exact: no interpolation for a permuted/flipped grid
    assert not image[2].any()
    # linear resampling of the 2x coarser copy: exact where the fine voxel centres coincide with coarse ones
    # (compared in the NIfTI's own index order, where fine voxel 2i is coarse voxel i)
    native = Orientation(axcodes="".join(nib.aff2axcodes(ref_img.affine)))
    arr = native(volume_to_metatensor(image, vols["flair"].volume)).numpy()
    np.testing.assert_array_equal(arr[0], np.asarray(ref_img.dataobj))
    np.testing.assert_allclose(arr[3][::2, ::2, ::2], np.asarray(coarse.dataobj), atol=1e-3)
