"""dicom-segment against a real Orthanc PACS: the SEG read back equals the bundle's NIfTI inference voxel for voxel."""

from __future__ import annotations

import json
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest

from medfusion.apps.dicom.convert import SeriesSpec, nifti_to_dicom_study
from medfusion.apps.dicom.segment import dicom_segment
from medfusion.apps.dicom.source import DicomStore
from medfusion.apps.dicom.volumes import read_series_volume
from medfusion.cli import main
from medfusion.data.labels import labels_to_regions
from medfusion.modality import BRATS_MODALITIES


def _upload(store: DicomStore, study: dict) -> None:
    store.store([ds for group in study.values() for ds in group])


def _seg_regions_on_grid(seg: hd.seg.Segmentation, ref_datasets: list) -> np.ndarray:
    """SEG segments 1..3 (TC, WT, ET) as ``[slices, rows, cols, 3]`` in the reference series' slice order."""
    uids = [str(ds.SOPInstanceUID) for ds in ref_datasets]
    return seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True)


def _nifti_regions_on_grid(pred: nib.Nifti1Image, ref: hd.Volume) -> np.ndarray:
    """Bundle label map -> TC/WT/ET ``[slices, rows, cols, 3]`` on the reference series' grid (exact, no resampling)."""
    vol = hd.Volume.from_nibabel(pred, frame_of_reference_uid=ref.frame_of_reference_uid).match_geometry(ref)
    return np.moveaxis(labels_to_regions(np.ascontiguousarray(vol.array)).numpy(), 0, -1).astype(np.uint8)


@pytest.mark.timeout(600)
def test_full_and_missing_series_studies_against_orthanc(
    orthanc, small_case, seg_model, bundle_nifti_inference, tmp_path
):
    volumes = {m: small_case / f"{small_case.name}_{m}.nii.gz" for m in BRATS_MODALITIES}
    full = nifti_to_dicom_study(
        volumes, "full-study", accession_number="ACC-FULL", extra_series={"loc": SeriesSpec("3 PLANE LOC")}
    )
    partial = nifti_to_dicom_study(
        {m: volumes[m] for m in ("flair", "t1ce")}, "partial-study", patient_id="ANON0002", accession_number="ACC-PART"
    )
    pacs = DicomStore.open(orthanc.dicomweb_url)
    _upload(pacs, full)
    _upload(pacs, partial)
    uploaded = {str(full["flair"][0].StudyInstanceUID), str(partial["flair"][0].StudyInstanceUID)}
    assert uploaded <= set(pacs.studies())  # (the session's PACS may hold other tests' studies too)

    # ---------------------------------------------------------------- all four series, SEG stored back to the PACS
    study_uid = str(full["flair"][0].StudyInstanceUID)
    res = dicom_segment(pacs, seg_model, tmp_path / "out", accession_number="ACC-FULL", nifti=True, send="source")
    side = res.sidecar
    assert side["study_instance_uid"] == study_uid
    assert side["used_modalities"] == list(BRATS_MODALITIES) and side["missing_modalities"] == []
    assert side["combination"] == "flair+t1+t1ce+t2"
    used = side["series_mapping"]["used"]
    assert (
        used["t1ce"]["description"] == "AX T1 POST GD"
        and used["t1ce"]["series_uid"] == full["t1ce"][0].SeriesInstanceUID
    )
    (unmatched,) = side["series_mapping"]["unmatched"]
    assert unmatched["description"] == "3 PLANE LOC" and "ignored" in unmatched["reason"]
    assert side["sent"][-1]["stored"] == [side["seg"]["sop_instance_uid"]]
    assert res.qa_path.is_file() and (res.folder / "seg.nii.gz").is_file()

    # the SEG as the PACS returns it (WADO-RS), read with highdicom
    seg_series = pacs.series_with(study_uid, "SEG")
    assert [s["series_uid"] for s in seg_series] == [side["seg"]["series_instance_uid"]]
    (seg_ds,) = pacs.retrieve(study_uid, side["seg"]["series_instance_uid"])
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    assert seg.SeriesDescription == "medfusion TC/WT/ET flair+t1+t1ce+t2"
    assert [d.SegmentLabel.split()[0] for d in seg.SegmentSequence] == ["TC", "WT", "ET"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert seg.FrameOfReferenceUID == full["flair"][0].FrameOfReferenceUID
    referenced = {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence}
    assert referenced == {str(full[m][0].SeriesInstanceUID) for m in BRATS_MODALITIES}

    ref = read_series_volume(pacs.retrieve(study_uid, str(full["flair"][0].SeriesInstanceUID)), "flair")
    got = _seg_regions_on_grid(seg, ref.datasets)
    expected = _nifti_regions_on_grid(bundle_nifti_inference(small_case, "all"), ref.volume)
    assert got.shape == expected.shape == (*ref.volume.spatial_shape, 3)
    for i in range(3):  # a non-trivial prediction: every region present, none everywhere
        assert 0 < expected[..., i].sum() < expected[..., i].size
    np.testing.assert_array_equal(got, expected)
    # the optional NIfTI holds the same labels
    nifti = nib.load(res.folder / "seg.nii.gz")
    np.testing.assert_array_equal(_nifti_regions_on_grid(nifti, ref.volume), expected)

    # ---------------------------------------------------------------- idempotent: a re-run stores nothing new
    again = dicom_segment(pacs, seg_model, tmp_path / "out", study_uid=study_uid, send="source")
    assert again.reused and again.folder == res.folder
    assert again.sidecar["sent"][-1]["stored"] == [] and again.sidecar["sent"][-1]["already_present"]
    assert len(pacs.series_with(study_uid, "SEG")) == 1
    assert len(pacs.client.search_for_instances(study_uid, side["seg"]["series_instance_uid"])) == 1

    # ---------------------------------------------------------------- FLAIR + T1c only, through the CLI
    part_uid = str(partial["flair"][0].StudyInstanceUID)
    code = main([
        "dicom-segment", orthanc.dicomweb_url, "--accession", "ACC-PART", "--bundle", str(seg_model.loaded.bundle),
        "--checkpoint", str(seg_model.loaded.checkpoint), "--override", "network_def#channels=[8,16,32,64]",
        "--roi_size", "64", "64", "48", "--device", "cpu", "--output_dir", str(tmp_path / "out"), "--send", "source",
    ])  # fmt: skip
    assert code == 0
    (folder,) = (tmp_path / "out" / part_uid).iterdir()
    pside = json.loads((folder / "result.json").read_text())
    assert pside["combination"] == "flair+t1ce"
    assert pside["used_modalities"] == ["flair", "t1ce"] and pside["missing_modalities"] == ["t1", "t2"]
    assert pside["seg"]["series_description"] == "medfusion TC/WT/ET flair+t1ce (missing t1,t2)"
    (pseg_ds,) = pacs.retrieve(part_uid, pside["seg"]["series_instance_uid"])
    pseg = hd.seg.Segmentation.from_dataset(pseg_ds)
    assert pseg.SeriesDescription == pside["seg"]["series_description"]
    pref = read_series_volume(pacs.retrieve(part_uid, str(partial["flair"][0].SeriesInstanceUID)), "flair")
    only = tmp_path / "partial" / small_case.name
    only.mkdir(parents=True)
    for m in ("flair", "t1ce"):
        shutil.copy(volumes[m], only / volumes[m].name)
    expected_part = _nifti_regions_on_grid(bundle_nifti_inference(only, "flair+t1ce"), pref.volume)
    np.testing.assert_array_equal(_seg_regions_on_grid(pseg, pref.datasets), expected_part)
    assert not np.array_equal(expected_part, expected)  # the combination changed the prediction
    # the same result asked again with a NIfTI it lacks: recomputed into the same folder, same SEG UIDs
    with_nifti = dicom_segment(pacs, seg_model, tmp_path / "out", accession_number="ACC-PART", nifti=True)
    assert not with_nifti.reused and with_nifti.folder == folder and (folder / "seg.nii.gz").is_file()
    assert with_nifti.sidecar["seg"] == pside["seg"]


def test_folder_study_label_segments_sent_to_a_folder(small_case, seg_model, tmp_path):
    """A folder source with T2 alone; one segment per label value; STOW to a folder; a new model = a new version."""
    from medfusion.apps.dicom.convert import write_datasets

    study = nifti_to_dicom_study({"t2": small_case / f"{small_case.name}_t2.nii.gz"}, "t2-only")
    write_datasets(study, tmp_path / "in")
    res = dicom_segment(tmp_path / "in", seg_model, tmp_path / "out", segments="labels", nifti=True,
                        send=tmp_path / "archive")  # fmt: skip
    side = res.sidecar
    assert side["combination"] == "t2" and side["missing_modalities"] == ["flair", "t1", "t1ce"]
    seg = hd.seg.segread(res.seg_path)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [
        "NCR necrotic/non-enhancing core (label 1)", "ED edema (label 2)", "ET enhancing tumor (label 4)"
    ]  # fmt: skip
    codes_ = [d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence]
    assert codes_ == ["6574001", "79654002", "108369006"]
    ref = read_series_volume(study["t2"], "t2")
    got = _seg_regions_on_grid(seg, ref.datasets)
    labels = hd.Volume.from_nibabel(nib.load(res.folder / "seg.nii.gz")).match_geometry(ref.volume).array
    for i, value in enumerate((1, 2, 4)):
        np.testing.assert_array_equal(got[..., i], (labels == value).astype(np.uint8))
    archive = DicomStore.open(tmp_path / "archive")
    uid = side["study_instance_uid"]
    assert [s["series_uid"] for s in archive.series_with(uid, "SEG")] == [side["seg"]["series_instance_uid"]]
    # another model (other weights) on the same study: a new SEG series beside the first, nothing replaced
    import torch

    other_ckpt = tmp_path / "other.pt"
    state = torch.load(seg_model.loaded.checkpoint, weights_only=True)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, other_ckpt)
    from medfusion.apps.dicom.models import load_segmentation_model

    other = load_segmentation_model(seg_model.loaded.bundle, other_ckpt, overrides=seg_model.loaded.overrides,
                                    roi_size=seg_model.settings["roi_size"], device="cpu")  # fmt: skip
    res2 = dicom_segment(tmp_path / "in", other, tmp_path / "out", segments="labels", send=tmp_path / "archive")
    assert res2.folder != res.folder and not res2.reused
    assert res2.sidecar["other_versions"][0]["series_uid"] == side["seg"]["series_instance_uid"]
    assert len(DicomStore.open(tmp_path / "archive").series_with(uid, "SEG")) == 2
