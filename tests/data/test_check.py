"""Unit tests of medfusion.data.check: report object, layouts, datalists, validate_before_training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medfusion.data.check import (
    CaseCheck,
    CheckReport,
    check_brats,
    check_datalist,
    check_manifest,
    check_path,
    detect_check_layout,
    validate_before_training,
)
from medfusion.data.layout import NoLayoutError
from medfusion.data.synth_brats import write_brats_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("check") / "cohort"
    write_brats_cohort(out, cases=2, size=16, seed=2)
    return out


def _nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_report_status_counts_text_and_frame():
    rep = CheckReport(
        "brats",
        "/d",
        [CaseCheck("a"), CaseCheck("b", warnings=["w1"]), CaseCheck("c", errors=["e1", "e2"], warnings=["w2"])],
    )
    assert [c.status for c in rep.cases] == ["ok", "warning", "error"]
    assert not rep.ok and rep.n_errors == 2 and rep.n_warnings == 2
    assert [c.case_id for c in rep.failing()] == ["c"]
    assert rep.cases[2].problems == ["error: e1", "error: e2", "warning: w2"]
    text = rep.to_text()
    assert text.splitlines() == [
        "ok       a",
        "WARNING  b: w1",
        "ERROR    c: e1",
        "ERROR    c: e2",
        "WARNING  c: w2",
        "FAILED: brats dataset /d: 3 case(s): 1 ok, 1 with warnings, 1 with errors",
    ]
    assert "ok       a" not in rep.to_text(show_ok=False)
    df = rep.to_frame()
    assert list(df.columns) == ["case_id", "status", "problems", "n_errors", "n_warnings"]
    assert df["n_errors"].tolist() == [0, 0, 2] and df.loc[2, "problems"] == "error: e1; error: e2; warning: w2"
    warn_only = CheckReport("mimic", "/m", [CaseCheck("x", warnings=["empty report"])])
    assert warn_only.ok
    assert not CheckReport("mimic", "/m", dataset_errors=["no listfile"]).ok


def test_report_summarises_warnings_per_group():
    rep = CheckReport(
        "brats",
        "/d",
        [CaseCheck("a"), CaseCheck("b", warnings=["w1"]), CaseCheck("c", errors=["e1", "e2"], warnings=["w2"])],
    )
    # summarised: errors per case, warnings one line per group with the case count and ids
    rep.cases.append(CaseCheck("d", warnings=["w1"]))
    rep.cases[1].warn("no cxr file; treated as missing.", "cxr: file absent")
    rep.cases[3].warn("no cxr file (other path); treated as missing.", "cxr: file absent")
    rep.dataset_warnings.append("column 'pid' repeats")
    rep.notes.append("kinds: cxr=image")
    assert rep.to_text(details=False).splitlines() == [
        "NOTE     kinds: cxr=image",
        "WARNING  column 'pid' repeats",
        "ERROR    c: e1",
        "ERROR    c: e2",
        "WARNING  w1 [2 case(s): b, d]",
        "WARNING  cxr: file absent [2 case(s): b, d]",
        "WARNING  c: w2",
        "FAILED: brats dataset /d: 4 case(s): 1 ok, 2 with warnings, 1 with errors, 1 dataset warning(s)",
    ]
    assert rep.n_warnings == 6 and rep.to_frame()["status"].tolist()[0] == "warning"


def test_clean_cohort_threaded_and_serial_agree(cohort):
    a = check_brats(cohort, num_workers=2, progress=False)
    b = check_brats(cohort, num_workers=0, progress=False)
    assert a.ok and a.layout == "brats" and [c.case_id for c in a.cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert a.to_frame().equals(b.to_frame())


def test_datalist_input_and_label_checks(tmp_path):
    vol = np.pad(np.ones((4, 4, 4), np.float32), 1)  # skull-stripped: background 0
    flair = _nii(tmp_path / "c1_flair.nii.gz", vol)
    seg_float = _nii(tmp_path / "c1_seg.nii.gz", np.full((6, 6, 6), 1.5, np.float32))
    seg_2023 = _nii(tmp_path / "c2_seg.nii.gz", np.full((6, 6, 6), 3, np.uint8))
    entries = [
        {"case_id": "c1", "flair": flair, "t1": None, "label": seg_float, "label_convention": "brats"},
        {"case_id": "c2", "flair": flair, "t1": None, "label": seg_2023, "label_convention": "brats2023"},
        {"case_id": "c3", "flair": flair, "t1": None, "label": None, "label_convention": "brats"},
        {"case_id": "c4", "flair": flair, "t1": None, "label": seg_2023, "label_convention": "brats2019"},
    ]
    rep = check_datalist(entries, ["flair", "t1"], num_workers=0, progress=False)
    by_id = {c.case_id: c for c in rep.cases}
    assert "non-integer" in by_id["c1"].errors[0] and seg_float in by_id["c1"].errors[0]
    assert by_id["c2"].status == "warning" and by_id["c2"].warnings == ["no t1 file; treated as missing."]
    assert by_id["c3"].errors == ["no label file, but training/evaluation needs one."]
    assert "unknown label convention 'brats2019'" in by_id["c4"].errors[0]
    assert check_datalist(entries[2:3], ["flair", "t1"], require_label=False, progress=False).ok
    # modalities inferred from the entry's non-reserved keys
    assert [c.case_id for c in check_datalist(entries[1:2], progress=False).cases] == ["c2"]


def test_msd_layout(tmp_path):
    root = tmp_path / "Task01_BrainTumour"
    img = _nii(root / "imagesTr" / "BRATS_001.nii.gz", np.ones((6, 6, 6, 4), np.float32))
    _nii(root / "labelsTr" / "BRATS_001.nii.gz", np.full((6, 6, 6), 4, np.uint8))  # 4 is not an MSD label
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    rep = check_brats(tmp_path, progress=False)
    assert rep.layout == "msd" and len(rep.cases) == 1
    (err,) = rep.cases[0].errors
    assert "[4]" in err and "'msd' expects [0, 1, 2, 3]" in err
    _nii(Path(img), np.ones((6, 6, 6, 3), np.float32))
    (err, _) = check_brats(tmp_path, progress=False).cases[0].errors
    assert "has 3 channel(s); dataset.json names 4" in err


def test_empty_folder_is_a_dataset_error(tmp_path):
    rep = check_brats(tmp_path, progress=False)
    assert not rep.ok and rep.cases == [] and "No BraTS cases" in rep.dataset_errors[0]
    assert "searched it and 3 folder levels below it" in rep.dataset_errors[0]
    with pytest.raises(FileNotFoundError, match="nope"):
        check_brats(tmp_path / "nope")


def test_manifest_tabular_text_and_volumes(tmp_path):
    _nii(tmp_path / "pet" / "a.nii.gz", np.ones((4, 4, 4), np.float32))
    _nii(tmp_path / "ct" / "a.nii.gz", np.ones((8, 8, 8), np.float32))  # other grid: fine for a manifest
    (tmp_path / "r.txt").write_text("")
    pd.DataFrame(
        {
            "case_id": ["a", "b"],
            "label": [0, 1],
            "pet": ["pet/a.nii.gz", ""],
            "ct": ["ct/a.nii.gz", ""],
            "report": ["Hypermetabolic nodule.", "r.txt"],
            "lab_0": ["1.5", "2.0"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    mods = {"pet": "pet", "ct": "ct", "report": "report", "labs": ["lab_0"]}
    kinds = {"pet": "volume", "ct": "volume", "report": "text"}
    rep = check_manifest(tmp_path / "m.csv", mods, progress=False, kinds=kinds)
    assert rep.ok
    a, b = rep.cases
    assert a.status == "ok"
    assert b.warnings == [
        "no pet file; treated as missing.",
        "no ct file; treated as missing.",
        f"report file {(tmp_path / 'r.txt').resolve()} is empty; treated as missing.",
    ]
    assert rep.notes[0] == (
        "modality kinds: pet=volume (column 'pet'), ct=volume (column 'ct'), report=text (column 'report'), "
        "labs=tabular (1 columns)"
    )
    assert not rep.dataset_warnings
    guessed = check_manifest(tmp_path / "m.csv", mods, progress=False)  # no kinds: guessed, and said so
    assert "no kind given for ['pet', 'ct', 'report']" in guessed.dataset_warnings[0]
    assert check_path(tmp_path / "m.csv", progress=False).layout == "manifest"


def test_detect_layout(tmp_path, cohort):
    (tmp_path / "ehr").mkdir()
    assert detect_check_layout(tmp_path) == "mimic"
    (tmp_path / "x.CSV").write_text("case_id,label,note\na,0,text\n")
    assert detect_check_layout(tmp_path / "x.CSV") == "manifest"
    assert detect_check_layout(cohort) == "brats"
    with pytest.raises(NoLayoutError, match="No known dataset layout at .*ehr; tried volume_manifest, mimic"):
        detect_check_layout(tmp_path / "ehr")  # an empty folder is no layout (it used to be called BraTS)
    with pytest.raises(ValueError, match="layout must be one of"):
        check_path(tmp_path, layout="nifti")


def test_validate_before_training(cohort, tmp_path):
    assert validate_before_training(cohort, layout="brats").ok
    ds = Path(shutil.copytree(cohort, tmp_path / "ds"))
    for i in range(2):
        name = f"BraTS2021_{i:05d}"
        (ds / name / f"{name}_seg.nii.gz").unlink()
        (ds / name / f"{name}_t1.nii.gz").write_bytes(b"junk")
    with pytest.raises(ValueError) as exc:
        validate_before_training(ds, max_problems=3)
    msg = str(exc.value)
    assert msg.startswith("data check failed: 4 problem(s) in 2 case(s)")
    assert msg.count("\n  case ") == 3 and "... and 1 more" in msg
    assert "case BraTS2021_00000:" in msg and "BraTS2021_00000_t1.nii.gz" in msg
    assert "medfusion check-data" in msg
    # a datalist (what the bundle already discovered) is accepted too
    from medfusion.data.brats import discover_brats

    assert validate_before_training(discover_brats(cohort), modalities=["flair", "t1", "t1ce", "t2"]).ok


# ------------------------------------------------------------------------- manifests read by modality kind
def test_generated_cohort_summary_is_short_and_names_what_matters(sparse_cohort):
    """Long notes, repeated patients, sparse columns, absent files: one line per kind of warning, not per row."""
    from medfusion.data.synth_manifest import cohort_bundle_overrides

    ov = cohort_bundle_overrides(sparse_cohort)
    kw = dict(
        modalities=ov["manifest_columns"],
        id_column="image_id",
        label_columns=["outcome"],
        kinds={"cxr": "image", "report": "text", "vitals": "tabular"},
        num_classes=2,
        progress=False,
    )
    rep = check_manifest(ov["manifest_csv"], **kw)
    assert rep.ok, rep.to_text()
    text = rep.to_text(details=False)
    lines = text.splitlines()
    assert len(lines) < 15, text  # 60 rows, but a summary
    assert any(
        line.startswith(f"WARNING  cxr: {sparse_cohort['absent_files']} of 60 file(s) do not exist") for line in lines
    )
    patient = [line for line in lines if "looks like a patient id" in line]
    assert len(patient) == 1 and "'patient_id'" in patient[0] and "--group_column patient_id" in patient[0]
    assert any("no cxr file; treated as missing." in line and "case(s)" in line for line in lines)
    assert any(line.startswith("WARNING  report: empty report; treated as missing.") for line in lines)
    assert any("present per modality" in line for line in lines)
    grouped = check_manifest(ov["manifest_csv"], **kw, group_column="patient_id")
    assert not any("looks like a patient id" in w for w in grouped.dataset_warnings)


def test_values_are_read_by_kind_and_errors_name_file_and_row(tmp_path):
    """Issue #12.7: a 3D file in a 2D image column, or a suffix-less path, fails in the check naming file and row."""
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    vol3d = _nii(tmp_path / "ct_in_cxr.nii.gz", np.ones((6, 6, 6), np.float32))
    img2d = _nii(tmp_path / "flat.nii.gz", np.ones((6, 6), np.float32))
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d", "e"],
            "label": [0, 1, 0, 1, 0],
            "cxr": ["ok.png", "ct_in_cxr.nii.gz", "scan_without_suffix", "ok.png", "ok.png"],
            "pet": ["", "", "", "flat.nii.gz", ""],
            "note": ["fine", "fine", "fine", "fine", "fine"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    mods = {"cxr": "cxr", "pet": "pet", "note": "note"}
    kinds = {"cxr": "image", "pet": "volume", "note": "text"}
    rep = check_manifest(tmp_path / "m.csv", mods, kinds=kinds, progress=False)
    errors = {c.case_id: c.errors for c in rep.cases if c.errors}
    assert set(errors) == {"b", "d"}
    assert vol3d in errors["b"][0] and "3D array" in errors["b"][0] and "2D image (kind 'image')" in errors["b"][0]
    assert img2d in errors["d"][0] and "expected a 3D volume" in errors["d"][0]
    assert any("cxr: 1 of 5 file(s) do not exist" in w and "(rows c)" in w for w in rep.dataset_warnings)
    strict = check_manifest(tmp_path / "m.csv", mods, kinds=kinds, progress=False, missing_files="error")
    assert not strict.ok and "row 'c', column 'cxr'" in strict.dataset_errors[0]
    pd.DataFrame({"case_id": ["a"], "label": [0], "cxr": ["dangling.png"], "note": ["x"]}).to_csv(
        tmp_path / "s.csv", index=False
    )
    dangling = check_manifest(tmp_path / "s.csv", {"cxr": "cxr", "note": "note"}, kinds=kinds, progress=False)
    assert not dangling.ok and "dangling symbolic link" in dangling.dataset_errors[0]
    # a datalist entry pointing at a dangling link (e.g. a BraTS folder) is an error too, not "treated as missing"
    (c,) = check_datalist([{"case_id": "x", "cxr": str(tmp_path / "dangling.png")}], ["cxr"], progress=False).cases
    assert "dangling symbolic link" in c.errors[0]


def _dicom(path: Path, frames: int) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CT", 8, 6, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.arange(frames * 48, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_3d_dicom_in_an_image_column_is_an_error_naming_file_and_row(tmp_path):
    """Issue #12.7: a multi-frame (3D) DICOM in a 2D image column passed the check and crashed training."""
    flat, stack = _dicom(tmp_path / "flat.dcm", 1), _dicom(tmp_path / "stack.dcm", 5)
    pd.DataFrame({"case_id": ["a", "b"], "label": [0, 1], "cxr": [flat.name, stack.name]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    rep = check_manifest(tmp_path / "m.csv", {"cxr": "cxr"}, kinds={"cxr": "image"}, num_workers=0, progress=False)
    errors = {c.case_id: c.errors for c in rep.cases if c.errors}
    assert list(errors) == ["b"]
    assert str(stack.resolve()) in errors["b"][0] and "3D DICOM (5 frame(s)" in errors["b"][0]
    assert "kind 'image'" in errors["b"][0]


def test_labels_are_checked_against_the_task_naming_rows(tmp_path):
    """Issue #12.6: 0.5 / -1 were truncated to 0, 2 with num_classes 2 crashed mid-training."""
    pd.DataFrame(
        {"case_id": ["a", "b", "c", "d"], "label": ["1", "0.5", "-1", "2"], "note": ["x", "y", "z", "w"]}
    ).to_csv(tmp_path / "m.csv", index=False)
    rep = check_manifest(tmp_path / "m.csv", {"note": "note"}, kinds={"note": "text"}, num_classes=2, progress=False)
    errors = {c.case_id: c.errors for c in rep.cases if c.errors}
    assert set(errors) == {"b", "c", "d"}
    assert "label 0.5 is not a class index [0, 2) (num_classes 2)" in errors["b"][0]
    assert "label -1.0" in errors["c"][0] and "label 2.0" in errors["d"][0]
    open_ended = check_manifest(tmp_path / "m.csv", {"note": "note"}, kinds={"note": "text"}, class_labels=True)
    assert {c.case_id for c in open_ended.cases if c.errors} == {"b", "c"}  # no upper bound without num_classes
    bad_entry = {"case_id": "b", "note": "x", "label": 0.5, "modality_mask": [True]}
    with pytest.raises(ValueError, match=r"case b: label 0.5 is not a class index"):
        validate_before_training([bad_entry], modalities=["note"], kinds={"note": "text"}, num_classes=2)


def test_empty_reports_ehr_without_measurement_and_header_only(tmp_path, tmp_path_factory):
    from medfusion.data.synth_clinical import EHR_VARIABLES

    ehr = tmp_path / "stay.csv"
    table = pd.DataFrame({"Hours": ["1.0", "60.0"], **{v: ["", ""] for v in EHR_VARIABLES}})
    table.assign(**{"Heart Rate": ["", "80"]}).to_csv(ehr, index=False)  # a value only after 48 h
    table.assign(**{"Heart Rate": ["80", ""]}).to_csv(tmp_path / "measured.csv", index=False)
    pd.DataFrame(
        {"case_id": ["a", "b"], "label": [0, 1], "ehr": ["measured.csv", "stay.csv"], "note": [" ", "ok"]}
    ).to_csv(tmp_path / "m.csv", index=False)
    rep = check_manifest(tmp_path / "m.csv", {"ehr": "ehr", "note": "note"}, kinds={"ehr": "ehr", "note": "text"})
    a, b = rep.cases
    assert a.warnings == ["note: empty report; treated as missing."]  # not "no note file"
    assert b.warnings == [f"ehr time series {ehr.resolve()} has no measurement in the first 48 h; treated as missing."]
    assert rep.ok
    (tmp_path / "h.csv").write_text("case_id,label,note\n")
    header_only = check_manifest(tmp_path / "h.csv", progress=False)
    assert not header_only.ok and "no data rows" in header_only.dataset_errors[0]


def test_validate_before_training_logs_one_line_per_kind_of_warning(sparse_cohort, caplog):
    from medfusion.apps.clinical_bundle import clinical_datalist
    from medfusion.data.synth_manifest import cohort_bundle_overrides

    ov = cohort_bundle_overrides(sparse_cohort)
    kinds = {"cxr": "image", "report": "text", "vitals": "tabular"}
    items = clinical_datalist(
        "manifest", ".", ov["modalities"], manifest_csv=ov["manifest_csv"], manifest_columns=ov["manifest_columns"],
        label_columns=["outcome"], kinds=kinds, case_id_column="image_id",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="medfusion.data.check"):
        validate_before_training(items, modalities=ov["modalities"], kinds=kinds, num_classes=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "medfusion.data.check"]
    assert 1 <= len(lines) <= 5 and any("case(s):" in line for line in lines)
