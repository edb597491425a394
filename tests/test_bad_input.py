"""Bad input end to end: every broken dataset or config fails with one clear error naming the file/field/key.

Each test asserts the exception (or report) type, that the message names the offending file, field or
key, and that nothing partial is left behind. Data are tiny: 16^3 BraTS phantoms, a 10-stay
MIMIC-style cohort, hand-written NIfTIs and CSVs.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medfusion.cli import main
from medfusion.data.check import check_brats, check_clinical, check_manifest, validate_before_training
from medfusion.data.synth_brats import write_brats_cohort
from medfusion.data.synth_clinical import write_clinical_cohort
from medfusion.io import check_output_dir

ROOT = Path(__file__).resolve().parents[1]
TRAIN_JSON = ROOT / "bundles" / "brats_metakd" / "configs" / "train.json"


@pytest.fixture(scope="module")
def brats_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_brats") / "cohort"
    write_brats_cohort(out, cases=3, size=16, seed=1)
    return out


@pytest.fixture
def brats(brats_src, tmp_path) -> Path:
    """A private copy of the 3-case cohort that a test may break."""
    return Path(shutil.copytree(brats_src, tmp_path / "brats"))


@pytest.fixture(scope="module")
def clinical_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bad_clinical") / "cohort"
    write_clinical_cohort(out, samples=10, seed=3, manifest_cohort=False, dicom_fraction=0.0)
    return out


@pytest.fixture
def clinical(clinical_src, tmp_path) -> Path:
    return Path(shutil.copytree(clinical_src, tmp_path / "clinical"))


def _case(root: Path, i: int) -> tuple[str, Path]:
    name = f"BraTS2021_{i:05d}"
    return name, root / name


def _errors(report, case_id: str) -> str:
    (case,) = [c for c in report.cases if c.case_id == case_id]
    return " | ".join(case.errors)


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------------------------------ BraTS files
def test_missing_file_is_named(brats):
    name, case = _case(brats, 1)
    before = _listing(brats)
    (case / f"{name}_t1ce.nii.gz").unlink()
    (case / f"{name}_seg.nii.gz").unlink()
    report = check_brats(brats, num_workers=0, progress=False)
    assert not report.ok
    (c,) = [c for c in report.cases if c.case_id == name]
    assert c.status == "error"
    assert any("t1ce" in w and "missing" in w for w in c.warnings)  # absent modality: usable, but flagged
    assert any("no label file" in e for e in c.errors)  # absent label: training cannot use the case
    with pytest.raises(ValueError, match=rf"case {name}: no label file"):
        validate_before_training(brats, layout="brats")
    assert len(_listing(brats)) == len(before) - 2  # the check wrote nothing


def test_truncated_nifti_is_caught(brats):
    name, case = _case(brats, 0)
    path = case / f"{name}_flair.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, gzip stream cut
    nib.load(str(path))  # the header alone still reads: only decompressing the data exposes the damage
    report = check_brats(brats, progress=False)
    msg = _errors(report, name)
    assert str(path) in msg and "truncated" in msg
    assert [c.status for c in report.cases].count("ok") == 2


def test_corrupt_nifti_is_caught(brats):
    name, case = _case(brats, 2)
    path = case / f"{name}_t2.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 10)
    report = check_brats(brats, progress=False)
    msg = _errors(report, name)
    assert str(path) in msg and "not a readable NIfTI" in msg


def test_mismatched_shapes_in_one_case(brats):
    name, case = _case(brats, 1)
    path = case / f"{name}_t1.nii.gz"
    ref = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.ones((16, 16, 12), np.float32), ref.affine), str(path))
    report = check_brats(brats, progress=False)
    msg = _errors(report, name)
    assert "differ in shape" in msg and str(path) in msg and "(16, 16, 12)" in msg
    assert f"{name}_flair.nii.gz (16, 16, 16)" in msg
    with pytest.raises(ValueError, match="1 case"):
        validate_before_training(brats, require_label=True)


def test_mismatched_spacing_in_one_case(brats):
    name, case = _case(brats, 0)
    path = case / f"{name}_t2.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([1.0, 1.0, 2.5, 1.0])), str(path))
    msg = _errors(check_brats(brats, progress=False), name)
    assert "grid mismatch" in msg and str(path) in msg and "2.5" in msg


def test_wrong_label_values_name_file_and_values(brats):
    name, case = _case(brats, 2)
    path = case / f"{name}_seg.nii.gz"
    img = nib.load(str(path))
    lab = np.asanyarray(img.dataobj).astype(np.uint8)
    lab[0, 0, :2] = [3, 5]  # 3 is a BraTS 2023 / MSD value, not a 2018-2021 one
    nib.save(nib.Nifti1Image(lab, img.affine), str(path))
    msg = _errors(check_brats(brats, progress=False), name)
    assert str(path) in msg and "[3, 5]" in msg and "'brats' expects [0, 1, 2, 4]" in msg
    assert check_brats(brats, check_labels=False, progress=False).ok  # values not checked on request


def test_all_modalities_missing(brats):
    name, case = _case(brats, 1)
    for mod in ("flair", "t1", "t1ce", "t2"):
        (case / f"{name}_{mod}.nii.gz").unlink()
    report = check_brats(brats, progress=False)
    assert "none of the modalities" in _errors(report, name)
    assert sum(c.status == "ok" for c in report.cases) == 2  # the other cases are still checked


def test_unknown_modality_name():
    with pytest.raises(ValueError, match=r"unknown modality name\(s\) \['t1gd'\]"):
        check_brats("/nonexistent", modalities=("flair", "t1gd"))
    assert main(["check-data", "/nonexistent", "--modalities", "flair", "t1gd", "--layout", "brats"]) == 2


def test_handwritten_nifti_with_nan(tmp_path):
    case = tmp_path / "ds" / "BraTS2021_00042"
    case.mkdir(parents=True)
    vol = np.zeros((8, 8, 8), np.float32)
    for mod in ("flair", "t1"):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(case / f"BraTS2021_00042_{mod}.nii.gz"))
    vol[1, 2, 3] = np.nan
    bad = case / "BraTS2021_00042_t2.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(bad))
    report = check_brats(tmp_path / "ds", require_label=False, progress=False)
    (c,) = report.cases
    assert str(bad) in c.errors[0] and "NaN/inf" in c.errors[0]
    assert any("t1ce" in w for w in c.warnings)


# ------------------------------------------------------------------------------------- clinical data
def _first_ehr(root: Path) -> Path:
    return sorted((root / "ehr" / "in-hospital-mortality" / "train").glob("*.csv"))[0]


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_inf_in_ehr(clinical, bad):
    path = _first_ehr(clinical)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[0, "Heart Rate"] = bad
    df.to_csv(path, index=False)
    report = check_clinical(clinical, progress=False)
    (c,) = [c for c in report.cases if c.case_id == f"train/{path.name}"]
    assert c.status == "error"
    assert str(path) in c.errors[0] and "'Heart Rate'" in c.errors[0] and "not finite" in c.errors[0]
    assert sum(x.status == "error" for x in report.cases) == 1


def test_empty_report_is_a_warning(clinical):
    reports = sorted((clinical / "reports").rglob("*.txt"))
    reports[0].write_text("   \n\n")
    report = check_clinical(clinical, progress=False)
    assert report.ok  # an empty report is a missing modality, not an error
    warned = [w for c in report.cases for w in c.warnings if str(reports[0]) in w]
    assert warned and "treated as missing" in warned[0]


def _non_image_dicom(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixels
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.save_as(path, enforce_file_format=True)


def test_dicom_that_is_not_an_image(clinical):
    jpg = sorted((clinical / "cxr" / "files").rglob("*.jpg"))[0]
    dcm = jpg.with_suffix(".dcm")
    jpg.unlink()
    _non_image_dicom(dcm)  # discovery now pairs the stay with this .dcm
    report = check_clinical(clinical, progress=False)
    msgs = [e for c in report.cases for e in c.errors]
    assert len(msgs) == 1 and str(dcm) in msgs[0] and "without pixel data" in msgs[0] and "SR" in msgs[0]


def test_corrupt_jpg_and_manifest_row(tmp_path):
    bad = tmp_path / "img.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    pd.DataFrame({"case_id": ["a"], "label": [1], "cxr": ["img.png"]}).to_csv(tmp_path / "m.csv", index=False)
    report = check_manifest(tmp_path / "m.csv", progress=False)
    assert str(bad) in _errors(report, "a") and "cannot be decoded" in _errors(report, "a")
    # a manifest row referring to an absent file: a missing modality (one summary line per modality); with
    # missing_files="error" one dataset error naming row, column and path
    pd.DataFrame({"case_id": ["a", "b"], "label": [1, 0], "cxr": ["gone.png", "img.png"], "note": ["x", "y"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    report = check_manifest(tmp_path / "m.csv", progress=False)
    assert "cxr: 1 of 2 file(s) do not exist; treated as missing (rows a)" in report.dataset_warnings[1]
    report = check_manifest(tmp_path / "m.csv", progress=False, missing_files="error")
    assert (
        not report.ok and "row 'a', column 'cxr'" in report.dataset_errors[0] and "gone.png" in report.dataset_errors[0]
    )


# ------------------------------------------------------------------------------------------- configs
def test_model_kwarg_typo_names_the_key():
    from medfusion.models.classifier import Classifier
    from medfusion.models.segmenter import Segmenter

    with pytest.raises(TypeError, match="chanels"):
        Segmenter(modalities=("flair", "t1"), chanels=(8, 16))
    with pytest.raises(TypeError, match="in_featurs"):
        Classifier({"ehr": {"name": "mlp", "in_featurs": 4}}, head="concat", num_classes=2)
    with pytest.raises(KeyError, match=r"unknown encoder 'mpl'.*'mlp'"):
        Classifier({"ehr": {"name": "mpl", "in_features": 4}}, head="concat", num_classes=2)
    with pytest.raises(KeyError, match=r"unknown fusion head 'concatt'.*'concat'"):
        Classifier({"ehr": {"name": "mlp", "in_features": 4}}, head="concatt", num_classes=2)


def test_bundle_id_typo_is_a_clear_error():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN_JSON))
    with pytest.raises(KeyError, match=r"train::trainerr"):
        parser.get_parsed_content("train#trainerr")
    parser.update({"network_def#chanels": [8, 16]})  # misspelled override of a network kwarg
    with pytest.raises(RuntimeError, match=r"(Segmenter|create_segmenter).*chanels"):
        parser.get_parsed_content("network_def")


# -------------------------------------------------------------------------------------- output folders
def test_output_folder_with_results_is_refused(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "model.pt").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match=rf"{out}.*--overwrite"):
        check_output_dir(out)
    assert main(["synth", "brats", str(out), "--cases", "1", "--size", "16"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _listing(tmp_path) == ["results", "results/model.pt"]  # untouched, no temporary folder left
    assert main(["synth", "brats", str(out), "--cases", "1", "--size", "16", "--overwrite"]) == 0
    assert not (out / "model.pt").exists() and (out / "BraTS2021_00000").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_failed_synth_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="size"):
        write_brats_cohort(tmp_path / "out", cases=2, size=8)
    assert list(tmp_path.iterdir()) == []


def test_bundle_initialize_stops_bad_data_before_training(brats):
    """bundles/brats_metakd/configs/train.json's ``data_check`` component (run by ``initialize``) fails fast."""
    from monai.bundle import ConfigParser

    def parser_for(dataset: Path) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(TRAIN_JSON))
        parser["dataset_dir"] = str(dataset)
        return parser

    parser_for(brats).get_parsed_content("initialize")  # clean data: passes
    name, case = _case(brats, 2)
    (case / f"{name}_t1.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(RuntimeError, match="validate_before_training") as exc:  # MONAI wraps component errors
        parser_for(brats).get_parsed_content("initialize")
    cause = exc.value.__cause__  # printed under "The above exception was the direct cause of ..."
    assert isinstance(cause, ValueError)
    assert re.search(rf"1 problem\(s\) in 1 case\(s\).*case {name}: t1 file \S*{name}_t1.nii.gz", str(cause), re.S)
