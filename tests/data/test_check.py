"""Unit tests of medfusion.data.check: report object, layouts, datalists, validate_before_training."""

from __future__ import annotations

import json
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
    rep = check_manifest(tmp_path / "m.csv", mods, progress=False)
    assert rep.ok
    a, b = rep.cases
    assert a.status == "ok"
    assert b.warnings == [
        "no pet file; treated as missing.",
        "no ct file; treated as missing.",
        f"report {(tmp_path / 'r.txt').resolve()} is empty; treated as missing.",
    ]
    assert check_path(tmp_path / "m.csv", progress=False).layout == "manifest"


def test_detect_layout(tmp_path):
    (tmp_path / "ehr").mkdir()
    assert detect_check_layout(tmp_path) == "mimic"
    assert detect_check_layout(tmp_path / "x.CSV") == "manifest"
    assert detect_check_layout(tmp_path / "ehr") == "brats"
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
