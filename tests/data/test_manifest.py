"""medfusion.data.manifest: cells read by modality kind, sparse tabular columns, absent files, labels, groups."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest

from medfusion.data.manifest import discover_manifest, guess_kind, looks_like_patient_id, read_manifest
from medfusion.data.synth_manifest import cohort_bundle_overrides

MODS = {"pet": "pet", "report": "report", "labs": ["lab_0", "lab_1"]}
KINDS = {"pet": "volume", "report": "text"}


def _setup(tmp_path, rows, header="case_id,label,pet,report,lab_0,lab_1"):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / "a_pet.nii.gz").write_bytes(b"x")
    (tmp_path / "dicom_series").mkdir(exist_ok=True)
    (tmp_path / "r1.txt").write_text("FINDINGS: clear.")
    csv = tmp_path / "manifest.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    return csv


def test_items(tmp_path):
    abs_txt = tmp_path / "r1.txt"
    csv = _setup(
        tmp_path,
        [
            "a,1,img/a_pet.nii.gz,Heart size normal.,1.5,2",
            f"b,0,,{abs_txt},,",
            'c,0,dicom_series,"multi word, with comma",-1,0.25',
        ],
    )
    items = discover_manifest(csv, MODS, label_values=[0, 1], kinds=KINDS)
    a, b, c = items
    assert [it["sample_index"] for it in items] == [0, 1, 2]
    assert a == {
        "case_id": "a",
        "sample_index": 0,
        "label": 1.0,
        "pet": str((tmp_path / "img" / "a_pet.nii.gz").resolve()),
        "report": "Heart size normal.",
        "labs": [1.5, 2.0],
        "modality_mask": [True, True, True],
    }
    assert b["pet"] is None and b["report"] == str(abs_txt.resolve()) and b["labs"] is None
    assert b["modality_mask"] == [False, True, False]
    assert c["pet"] == str((tmp_path / "dicom_series").resolve())  # a DICOM folder
    assert c["report"] == "multi word, with comma" and c["labs"] == [-1.0, 0.25]


def test_default_modalities_multilabel_and_guessed_kinds(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("id,y1,y2,note,img,age\nx,0,1,hello there,scan.png,61\n")
    (tmp_path / "scan.png").write_bytes(b"png")
    man = read_manifest(csv, id_column="id", label_columns=("y1", "y2"))
    (item,) = man.items
    assert item["label"] == [0.0, 1.0] and item["note"] == "hello there" and item["modality_mask"] == [True] * 3
    assert man.kinds == {"note": "text", "img": "image", "age": "tabular"} and man.guessed == ["note", "img", "age"]
    assert item["age"] == [61.0]
    (unl,) = discover_manifest(csv, {"note": "note"}, id_column="id", label_columns=())
    assert "label" not in unl
    assert guess_kind(["a/b.nii.gz", "c.nii", ""]) == "volume" and guess_kind(["1", "NA", "2.5"]) == "tabular"
    assert guess_kind(["x.csv"]) == "ehr" and guess_kind(["free text, no suffix"]) == "text"


def test_long_notes_are_text_by_kind_never_probed_as_paths(tmp_path):
    """Issue #11.1: a note longer than 255 bytes reached Path.is_dir() and raised 'File name too long'."""
    long_line = "Patient/family meeting held; " * 40  # one line, > 255 bytes, contains '/'
    multi = "FINDINGS:\n" + "bilateral opacities, " * 300  # > 4096 characters with a newline
    pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d"],
            "label": [0, 1, 0, 1],
            "report": [long_line, multi, "reports/r.txt", "notes/see_attached"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    man = read_manifest(tmp_path / "m.csv", {"report": "report"}, kinds={"report": "text"})
    a, b, d = man.items  # c: a report file that does not exist -> missing -> the row has nothing left
    assert a["report"] == long_line.strip() and len(a["report"].encode()) > 255
    assert b["report"].startswith("FINDINGS:") and len(b["report"]) > 4096
    assert man.absent == {"report": [("c", str(tmp_path / "reports" / "r.txt"))]} and man.dropped == ["c"]
    assert (
        d["report"] == "notes/see_attached"
        and man.notes[0][0] == "report"
        and "looks like a file path" in (man.notes[0][1])
    )
    # an image column holding a long note (wrong column) is one clear error naming the row, not an OSError
    pd.DataFrame({"case_id": ["a"], "label": [0], "cxr": ["x" * 300]}).to_csv(tmp_path / "w.csv", index=False)
    with pytest.raises(ValueError, match=r"row 'a' \(line 2\), column 'cxr'.*not a usable path"):
        read_manifest(tmp_path / "w.csv", {"cxr": "cxr"}, kinds={"cxr": "image"})


def test_sparse_tabular_columns_categories_and_absent_ehr(tmp_path):
    pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d"],
            "label": [0, 1, 0, 1],
            "hr": ["80", "", "NA", "101.5"],
            "sex": ["M", "f", "", "F"],
            "vent": ["yes", "No", "n/a", ""],
            "lactate": ["", "", "", "2.5"],
            "note": ["x", "y", "z", "w"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    spec = {"note": "note", "ehr": ["hr", "sex", "vent", "lactate"]}
    man = read_manifest(tmp_path / "m.csv", spec, kinds={"note": "text"})
    a, b, c, d = man.items
    assert a["ehr"][:3] == [80.0, 1.0, 1.0] and math.isnan(a["ehr"][3])
    assert math.isnan(b["ehr"][0]) and b["ehr"][1:3] == [0.0, 0.0]
    assert c["ehr"] is None and c["modality_mask"] == [True, False]  # every feature empty: EHR absent
    assert d["ehr"][:2] == [101.5, 0.0] and math.isnan(d["ehr"][2]) and d["ehr"][3] == 2.5
    assert man.encodings == {"sex": {"f": 0.0, "m": 1.0}, "vent": {"no": 0.0, "yes": 1.0}}
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"case_id": ["a", "b"], "label": [0, 1], "hr": ["80", "high"], "grade": ["low", "mid"]}).to_csv(
        bad, index=False
    )
    with pytest.raises(ValueError, match=r"column 'hr' holds non-numeric value\(s\) in row\(s\) 'b' \('high'\)"):
        read_manifest(bad, {"ehr": ["hr"]})
    with pytest.raises(ValueError, match=r"column 'grade'.*'a' \('low'\), 'b' \('mid'\)"):
        read_manifest(bad, {"ehr": ["grade"]})
    pd.DataFrame({"case_id": ["a"], "label": [0], "hr": ["inf"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"column 'hr' holds non-finite value\(s\) in row\(s\) 'a'"):
        read_manifest(bad, {"ehr": ["hr"]})
    with pytest.raises(ValueError, match="group of columns.*'tabular'"):
        read_manifest(tmp_path / "m.csv", spec, kinds={"ehr": "ehr"})


def test_absent_files_are_missing_by_default_and_all_listed_with_error(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    pd.DataFrame(
        {
            "case_id": ["a", "b", "c", "d"],
            "label": [0, 1, 0, 1],
            "cxr": ["img/a.png", "img/gone.png", "img/no_suffix_scan", ""],  # a suffix-less path is a path by kind
            "note": ["n1", "n2", "n3", "n4"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    spec, kinds = {"cxr": "cxr", "note": "note"}, {"cxr": "image", "note": "text"}
    man = read_manifest(tmp_path / "m.csv", spec, kinds=kinds)
    assert [it["cxr"] is not None for it in man.items] == [True, False, False, False]
    assert [rid for rid, _ in man.absent["cxr"]] == ["b", "c"]
    (line,) = man.summary_lines()
    assert line.startswith("cxr: 2 of 4 file(s) do not exist; treated as missing (rows b, c)")
    with pytest.raises(FileNotFoundError) as exc:
        read_manifest(tmp_path / "m.csv", spec, kinds=kinds, missing_files="error")
    msg = str(exc.value)
    assert "2 referenced file(s) do not exist" in msg
    assert "row 'b', column 'cxr'" in msg and "gone.png" in msg and "row 'c'" in msg and "no_suffix_scan" in msg
    with pytest.raises(ValueError, match="missing_files must be one of"):
        read_manifest(tmp_path / "m.csv", spec, kinds=kinds, missing_files="skip")


def test_dangling_symlink_is_an_error(tmp_path):
    os.symlink(tmp_path / "nowhere.png", tmp_path / "link.png")
    pd.DataFrame({"case_id": ["a"], "label": [0], "cxr": ["link.png"], "note": ["x"]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    with pytest.raises(ValueError, match=r"row 'a'.*link\.png is a dangling symbolic link.*nowhere\.png"):
        read_manifest(tmp_path / "m.csv", {"cxr": "cxr", "note": "note"}, kinds={"cxr": "image", "note": "text"})


def test_errors(tmp_path):
    ok = "a,1,img/a_pet.nii.gz,text here,1,2"
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['lab_9'\]"):
        discover_manifest(_setup(tmp_path, [ok]), {"pet": "pet", "labs": ["lab_0", "lab_9"]})
    with pytest.raises(ValueError, match=r"label column 'label': expected one of \[0.0, 1.0\].*'g' \('2'\)"):
        discover_manifest(_setup(tmp_path, [ok, "g,2,,txt,,"]), MODS, label_values=[0, 1], kinds=KINDS)
    with pytest.raises(ValueError, match=r"duplicate 'case_id' value\(s\): 'a' on lines \[2, 4\]"):  # #12.5
        discover_manifest(_setup(tmp_path, [ok, "b,0,,t,,", ok]), MODS, kinds=KINDS)
    with pytest.raises(ValueError, match=r"'lab_0' holds non-numeric.*'i' \('high'\)"):
        discover_manifest(_setup(tmp_path, [ok, "i,0,,,high,1"]), MODS, kinds=KINDS)
    with pytest.raises(ValueError) as exc:  # every bad label row is named, not only the first
        discover_manifest(_setup(tmp_path, [ok, "j,yes,,t,,", "k,,,t,,", "l,nan,,t,,"]), MODS, kinds=KINDS)
    assert "expected a finite number; found in 3 row(s): 'j' ('yes'), 'k' (''), 'l' ('nan')" in str(exc.value)
    with pytest.raises(ValueError, match=r"header \(.*\) but no data rows"):
        discover_manifest(_setup(tmp_path, []), MODS)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        discover_manifest(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown modality kind"):
        discover_manifest(_setup(tmp_path, [ok]), MODS, kinds={"pet": "nifti"})
    # a row with nothing present is left out (and listed), the others are kept
    man = read_manifest(_setup(tmp_path, [ok, "e,0,,,,"]), MODS, kinds=KINDS)
    assert [it["case_id"] for it in man.items] == ["a"] and man.dropped == ["e"]


def test_id_label_group_and_split_columns(tmp_path):
    pd.DataFrame(
        {
            "image_id": ["i1", "i2", "i3"],
            "patient": ["p1", "p1", "p2"],
            "outcome": [1, 1, 0],
            "fold": ["train", "validation", "test"],
            "note": ["a", "b", "c"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    items = discover_manifest(
        tmp_path / "m.csv",
        {"note": "note"},
        id_column="image_id",
        label_columns="outcome",
        kinds={"note": "text"},
        group_column="patient",
        split_column="fold",
    )
    assert [(it["case_id"], it["group"], it["split"], it["label"]) for it in items] == [
        ("i1", "p1", "train", 1.0),
        ("i2", "p1", "validation", 1.0),
        ("i3", "p2", "test", 0.0),
    ]
    assert looks_like_patient_id("patient_id") and looks_like_patient_id("PatientID") and looks_like_patient_id("mrn")
    assert looks_like_patient_id("subject") and not looks_like_patient_id("image_id")
    assert not looks_like_patient_id("case_id") and not looks_like_patient_id("study_id")


def test_generated_cohort_reads_back(sparse_cohort):
    ov = cohort_bundle_overrides(sparse_cohort)
    man = read_manifest(
        ov["manifest_csv"],
        ov["manifest_columns"],
        id_column=ov["case_id_column"],
        label_columns=ov["label_column"],
        kinds={"cxr": "image", "report": "text"},
        group_column=ov["group_column"],
    )
    n = sparse_cohort["rows"]
    assert man.n_rows == n and len(man.items) + len(man.dropped) == n
    assert man.kinds == {"cxr": "image", "report": "text", "vitals": "tabular"}
    assert len(man.absent["cxr"]) == sparse_cohort["absent_files"]
    present = {m: sum(it[m] is not None for it in man.items) for m in ("cxr", "report", "vitals")}
    assert present == {
        m: sparse_cohort["present"][k] for m, k in (("cxr", "cxr"), ("report", "note"), ("vitals", "ehr"))
    }
    assert sum(len(it["report"]) > 4096 for it in man.items if it["report"]) == sparse_cohort["notes_over_4096_chars"]
    assert len({it["group"] for it in man.items}) == sparse_cohort["patients"]
    labels = [it["label"] for it in man.items]
    assert 0.1 < sum(labels) / len(labels) < 0.3  # imbalanced outcome
    assert set(man.encodings) == {"sex", "ventilated"}
