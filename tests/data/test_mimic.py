from __future__ import annotations

import gzip
import logging

import pytest

from medfusion.data.mimic import cxr_study_dir, discover_mimic

IHM = "in-hospital-mortality"
A, B, C = "10000032_episode1_timeseries.csv", "11000011_episode1_timeseries.csv", "12000012_episode2_timeseries.csv"

# dicom_id, subject, study, view, StudyDate, StudyTime, file suffix (None = no file on disk)
META = [
    ("a_before", 10000032, 50000000, "AP", 21800506, "095959.5", ".jpg"),  # before intime
    ("a_early", 10000032, 50000001, "AP", 21800506, "120000.123", ".jpg"),
    ("a_late", 10000032, 50000002, "AP", 21800507, "200000", ".jpg"),  # latest within 48 h
    ("a_pa", 10000032, 50000003, "PA", 21800507, "210000", ".jpg"),  # wrong view
    ("a_day3", 10000032, 50000004, "AP", 21800508, "100001", ".png"),  # after 48 h, within stay
    ("c_first", 12000012, 50000010, "AP", 21500101, "010000", ".dcm"),
    ("c_nofile", 12000012, 50000011, "AP", 21500101, "020000", None),
]


def _tree(tmp_path, gz=False):
    ehr, cxr = tmp_path / "ehr", tmp_path / "cxr"
    (ehr / IHM / "train").mkdir(parents=True)
    (ehr / IHM / "test").mkdir(parents=True)
    (ehr / "root").mkdir(parents=True)
    for name in (A, B, C):
        (ehr / IHM / "train" / name).write_text("Hours\n")
    (ehr / IHM / "test" / A).write_text("Hours\n")
    head = "stay,period_length,stay_id,y_true\n"
    (ehr / IHM / "train_listfile.csv").write_text(head + f"{A},48,30000001,1\n{B},48,30000002,0\n")
    (ehr / IHM / "val_listfile.csv").write_text(head + f"{C},48,30000003,0\n")
    (ehr / IHM / "test_listfile.csv").write_text(head + f"{A},48,30000001,1\n")
    (ehr / "root" / "all_stays.csv").write_text(
        "subject_id,hadm_id,stay_id,intime,outtime\n"
        "10000032,1,30000001,2180-05-06 10:00:00,2180-05-12 10:00:00\n"
        "11000011,2,30000002,2170-01-01 00:00:00,2170-01-05 00:00:00\n"
        "12000012,3,30000003,2150-01-01 00:00:00,2150-01-03 00:00:00\n"
    )
    lines = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,StudyDate,StudyTime"]
    for d, subj, study, view, date, time, suffix in META:
        lines.append(f"{d},{subj},{study},CHEST,{view},{date},{time}")
        if suffix:
            sd = cxr_study_dir(cxr, subj, study)
            sd.mkdir(parents=True, exist_ok=True)
            (sd / f"{d}{suffix}").write_bytes(b"x")
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(cxr / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as f:
            f.write(text)
    else:
        (cxr / "mimic-cxr-2.0.0-metadata.csv").write_text(text)
    for study in (50000002, 50000004):
        cxr_study_dir(cxr, 10000032, study).with_suffix(".txt").write_text("FINDINGS: clear.")
    return ehr, cxr


def test_study_dir_scheme(tmp_path):
    assert cxr_study_dir(tmp_path, 10000032, 50414267) == tmp_path / "files/p10/p10000032/s50414267"


def test_mortality_pairing(tmp_path):
    ehr, cxr = _tree(tmp_path)
    items = discover_mimic(ehr, cxr, task=IHM, split="train")
    assert [it["case_id"] for it in items] == [A, B]
    a, b = items
    assert a["sample_index"] == 0 and b["sample_index"] == 1
    assert a["label"] == 1.0 and b["label"] == 0.0 and isinstance(a["label"], float)
    assert a["ehr"] == str(ehr / IHM / "train" / A)
    assert a["cxr"] == str(cxr / "files/p10/p10000032/s50000002/a_late.jpg")
    assert a["report"] == str(cxr / "files/p10/p10000032/s50000002.txt")
    assert a["modality_mask"] == [True, True, True]
    assert b["cxr"] is None and b["report"] is None and b["modality_mask"] == [True, False, False]


def test_val_in_train_folder_dcm_and_missing_file(tmp_path, caplog):
    ehr, cxr = _tree(tmp_path, gz=True)
    with caplog.at_level(logging.WARNING, logger="medfusion.data.mimic"):
        (c,) = discover_mimic(ehr, cxr, split="val")
    assert c["ehr"] == str(ehr / IHM / "train" / C)
    # latest metadata row has no file -> the earlier DICOM; its study has no report
    assert c["cxr"].endswith("s50000010/c_first.dcm") and c["report"] is None
    assert "no image file" in caplog.text


def test_phenotyping_whole_stay_and_labels(tmp_path):
    ehr, cxr = _tree(tmp_path)
    (ehr / "phenotyping" / "test").mkdir(parents=True)
    (ehr / "phenotyping" / "test" / A).write_text("Hours\n")
    names = [f"pheno {i}" for i in range(25)]
    labels = [str(i % 2) for i in range(25)]
    (ehr / "phenotyping" / "test_listfile.csv").write_text(
        "stay,period_length,stay_id," + ",".join(names) + "\n" + f"{A},140.5,30000001," + ",".join(labels) + "\n"
    )
    (a,) = discover_mimic(ehr, cxr, task="phenotyping", split="test", modalities=("cxr", "ehr"))
    assert a["label"] == [float(i % 2) for i in range(25)]
    assert a["cxr"].endswith("s50000004/a_day3.png")  # latest within the stay, beyond 48 h
    assert "report" not in a and a["modality_mask"] == [True, True]
    assert a["ehr"] == str(ehr / "phenotyping" / "test" / A)


def test_views_require_and_ehr_only(tmp_path):
    ehr, cxr = _tree(tmp_path)
    items = discover_mimic(ehr, cxr, views=("PA",), modalities=("ehr", "cxr"))
    assert items[0]["cxr"].endswith("a_pa.jpg")
    paired = discover_mimic(ehr, cxr, require=("cxr",))
    assert [it["case_id"] for it in paired] == [A] and paired[0]["sample_index"] == 0
    only = discover_mimic(ehr, modalities=("ehr",))
    assert [it["modality_mask"] for it in only] == [[True], [True]]
    # a stay with no modality at all is dropped
    no_ehr = discover_mimic(ehr, cxr, modalities=("cxr", "report"))
    assert [it["case_id"] for it in no_ehr] == [A]


def test_errors(tmp_path):
    ehr, cxr = _tree(tmp_path)
    (ehr / IHM / "train_listfile.csv").write_text("stay,period_length,stay_id\nx,48,1\n")
    with pytest.raises(ValueError, match=r"listfile .*train_listfile\.csv lacks column y_true"):
        discover_mimic(ehr, cxr)
    with pytest.raises(FileNotFoundError, match="test_listfile.csv"):
        discover_mimic(tmp_path / "nowhere", modalities=("ehr",), split="test")
    (ehr / IHM / "train_listfile.csv").write_text(f"stay,period_length,stay_id,y_true\n{A},48,99,1\n")
    with pytest.raises(ValueError, match=r"stay_id 99 .*all_stays\.csv"):
        discover_mimic(ehr, cxr)
    (ehr / IHM / "train_listfile.csv").write_text("stay,period_length,stay_id,y_true\ngone.csv,48,30000001,1\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.csv"):
        discover_mimic(ehr, cxr)
    with pytest.raises(ValueError, match="cxr_root is None"):
        discover_mimic(ehr)
    with pytest.raises(ValueError, match="task"):
        discover_mimic(ehr, cxr, task="los")
    (cxr / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,subject_id\n")
    (ehr / IHM / "train_listfile.csv").write_text(f"stay,period_length,stay_id,y_true\n{A},48,30000001,1\n")
    with pytest.raises(ValueError, match=r"CXR metadata .*lacks columns study_id, ViewPosition"):
        discover_mimic(ehr, cxr)


def test_absent_timeseries_is_missing_ehr(tmp_path, caplog):
    ehr, cxr = _tree(tmp_path)
    (ehr / IHM / "train" / B).unlink()
    with caplog.at_level(logging.WARNING, logger="medfusion.data.mimic"):
        items = discover_mimic(ehr, cxr)
    assert items[0]["ehr"] is not None and items[0]["modality_mask"] == [True, True, True]
    assert [it["case_id"] for it in items] == [A]  # B has neither EHR nor CXR/report -> dropped
    assert B in caplog.text and "no modality present" in caplog.text
    (ehr / IHM / "train" / A).unlink()
    with pytest.raises(FileNotFoundError, match=r"none of the 2 EHR time series"):
        discover_mimic(ehr, cxr)
