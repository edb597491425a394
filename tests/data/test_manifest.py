from __future__ import annotations

import pytest

from medfusion.data.manifest import discover_manifest

MODS = {"pet": "pet", "report": "report", "labs": ["lab_0", "lab_1"]}


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
    items = discover_manifest(csv, MODS, label_values=[0, 1])
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


def test_default_modalities_and_multilabel(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("id,y1,y2,note\nx,0,1,hello there\n")
    (item,) = discover_manifest(csv, id_column="id", label_columns=("y1", "y2"))
    assert item["label"] == [0.0, 1.0] and item["note"] == "hello there" and item["modality_mask"] == [True]
    (unl,) = discover_manifest(csv, {"note": "note"}, id_column="id", label_columns=())
    assert "label" not in unl


def test_errors(tmp_path):
    ok = "a,1,img/a_pet.nii.gz,text here,1,2"
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['lab_9'\]"):
        discover_manifest(_setup(tmp_path, [ok]), {"pet": "pet", "labs": ["lab_0", "lab_9"]})
    with pytest.raises(ValueError, match=r"row 'e'.*every modality"):
        discover_manifest(_setup(tmp_path, [ok, "e,0,,,,"]), MODS)
    with pytest.raises(FileNotFoundError, match=r"row 'f'.*column 'pet'.*img/missing\.nii\.gz"):
        discover_manifest(_setup(tmp_path, [ok, "f,0,img/missing.nii.gz,,,"]), MODS)
    with pytest.raises(ValueError, match=r"row 'g'.*label value '2'"):
        discover_manifest(_setup(tmp_path, [ok, "g,2,,txt,,"]), MODS, label_values=[0, 1])
    with pytest.raises(ValueError, match=r"duplicate 'case_id' value\(s\) \['a'\]"):
        discover_manifest(_setup(tmp_path, [ok, ok]), MODS)
    with pytest.raises(ValueError, match=r"row 'h'.*'labs' is partially empty \(columns \['lab_1'\]\)"):
        discover_manifest(_setup(tmp_path, [ok, "h,0,,,3,"]), MODS)
    with pytest.raises(ValueError, match=r"row 'i'.*'lab_0' holds 'high'"):
        discover_manifest(_setup(tmp_path, [ok, "i,0,,,high,1"]), MODS)
    with pytest.raises(ValueError, match=r"row 'j'.*label column 'label' holds 'yes'"):
        discover_manifest(_setup(tmp_path, [ok, "j,yes,,t,,"]), MODS)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        discover_manifest(tmp_path / "nope.csv")
