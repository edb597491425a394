"""Tests of the synthetic MIMIC-style clinical cohort and its PET/CT manifest cohort."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from medfusion.data import synth_clinical as sc
from medfusion.data.synth_clinical import EHR_VARIABLES, write_clinical_cohort

TASK = "in-hospital-mortality"
MIMIC_EYE = {"To Pain", "3 To speech", "1 No Response", "4 Spontaneously", "None", "To Speech", "Spontaneously",
             "2 To pain"}  # fmt: skip
MIMIC_MOTOR = {"1 No Response", "3 Abnorm flexion", "Abnormal extension", "No response", "4 Flex-withdraws",
               "Localizes Pain", "Flex-withdraws", "Obeys Commands", "Abnormal Flexion", "6 Obeys Commands",
               "5 Localizes Pain", "2 Abnorm extensn"}  # fmt: skip
MIMIC_VERBAL = {"1 No Response", "No Response", "Confused", "Inappropriate Words", "Oriented", "No Response-ETT",
                "5 Oriented", "Incomprehensible sounds", "1.0 ET/Trach", "4 Confused", "2 Incomp sounds",
                "3 Inapprop words"}  # fmt: skip
SCORE = {s: int(s.split()[0][0]) for s in (MIMIC_EYE | MIMIC_MOTOR | MIMIC_VERBAL) if s[0].isdigit()}
SCORE.update({"To Pain": 2, "To Speech": 3, "Spontaneously": 4, "No response": 1, "Abnormal extension": 2,
              "Abnormal Flexion": 3, "Flex-withdraws": 4, "Localizes Pain": 5, "Obeys Commands": 6,
              "No Response": 1, "No Response-ETT": 1, "Incomprehensible sounds": 2, "Inappropriate Words": 3,
              "Confused": 4, "Oriented": 5})  # fmt: skip


def _ts_path(root: Path, row: pd.Series) -> Path:
    return root / "ehr" / TASK / ("test" if row.split == "test" else "train") / row.stay


def _study_dir(root: Path, kind: str, row: pd.Series) -> Path:
    sid = str(row.subject_id)
    return root / kind / "files" / f"p{sid[:2]}" / f"p{sid}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clin") / "cohort"
    info = write_clinical_cohort(
        out, samples=30, seed=3, image_size=32, dicom_fraction=0.5, missing={"cxr": 0.2, "report": 0.3, "pet": 0.2}
    )
    return out, info


def test_layout_and_columns(cohort: tuple[Path, dict]) -> None:
    root, info = cohort
    labels = pd.read_csv(root / "labels.csv")
    assert len(labels) == 30 and labels.subject_id.is_unique
    assert info["splits"] == {"train": 21, "val": 3, "test": 6}  # 70/10/20 of 30
    ts_files = sorted((root / "ehr" / TASK).glob("*/*_timeseries.csv"))
    assert ts_files and all(re.fullmatch(r"\d{8}_episode1_timeseries\.csv", p.name) for p in ts_files)
    assert {p.parent.name for p in ts_files} == {"train", "test"}
    with ts_files[0].open() as fh:
        header = fh.readline().rstrip("\n").split(",")
    assert header == ["Hours", *EHR_VARIABLES] and len(header) == 18
    assert "Glascow coma scale total" in header and "Glasgow coma scale total" not in header
    for split in ("train", "val", "test"):
        lf = pd.read_csv(root / "ehr" / TASK / f"{split}_listfile.csv")
        assert list(lf.columns) == ["stay", "period_length", "stay_id", "y_true"]
        assert (lf.period_length == 48.0).all() and set(lf.y_true) <= {0, 1}
    stays = pd.read_csv(root / "ehr" / "root" / "all_stays.csv")
    assert {"subject_id", "stay_id", "intime", "outtime"} <= set(stays.columns)
    assert (pd.to_datetime(stays.outtime) - pd.to_datetime(stays.intime) > pd.Timedelta(hours=48)).all()
    meta = pd.read_csv(root / "cxr" / "mimic-cxr-2.0.0-metadata.csv", dtype={"StudyDate": str, "StudyTime": str})
    assert list(meta.columns[:3]) == ["dicom_id", "subject_id", "study_id"]
    assert {"ViewPosition", "StudyDate", "StudyTime"} <= set(meta.columns)
    assert meta.StudyDate.str.fullmatch(r"\d{8}").all() and meta.StudyTime.str.fullmatch(r"\d{6}\.\d+").all()
    assert set(meta.ViewPosition) == {"AP", "PA"} and (meta.ViewPosition == "AP").mean() > 0.5
    split = pd.read_csv(root / "cxr" / "mimic-cxr-2.0.0-split.csv")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split.split) <= {"train", "validate", "test"}
    for p in (root / "cxr" / "files").rglob("*.*"):
        assert re.fullmatch(
            r"cxr/files/p10/p1\d{7}/s5\d{7}/[0-9a-f]{8}(-[0-9a-f]{8}){4}\.(jpg|dcm)", str(p.relative_to(root))
        )
    for p in (root / "reports" / "files").rglob("*.txt"):
        assert re.fullmatch(r"reports/files/p10/p1\d{7}/s5\d{7}\.txt", str(p.relative_to(root)))
    signal = json.loads((root / "signal.json").read_text())
    assert signal["signal_shares"] == {"ehr": 0.4, "cxr": 0.35, "report": 0.25}
    assert abs(sum(signal["signal_shares"].values()) - 1.0) < 1e-9


def test_listfile_stays_exist_and_labels_agree(cohort: tuple[Path, dict]) -> None:
    root, _ = cohort
    labels = pd.read_csv(root / "labels.csv").set_index("stay")
    seen = 0
    for split in ("train", "val", "test"):
        lf = pd.read_csv(root / "ehr" / TASK / f"{split}_listfile.csv")
        for row in lf.itertuples():
            truth = labels.loc[row.stay]
            assert truth.split == split and truth.y_true == row.y_true and truth.stay_id == row.stay_id
            folder = "test" if split == "test" else "train"
            assert (root / "ehr" / TASK / folder / row.stay).is_file() == bool(truth.present_ehr)
            seen += 1
    assert seen == 30


def test_ehr_values_follow_mimic(cohort: tuple[Path, dict]) -> None:
    root, _ = cohort
    labels = pd.read_csv(root / "labels.csv")
    styles_numbered = styles_plain = 0
    for _, row in labels.iterrows():
        ts = pd.read_csv(_ts_path(root, row), dtype=str)
        hours = ts.Hours.astype(float)
        assert (hours >= 0).all() and (hours < 48).all() and hours.is_monotonic_increasing
        assert ts.isna().any().any()  # gaps: empty cells
        eye = ts["Glascow coma scale eye opening"].dropna()
        motor = ts["Glascow coma scale motor response"].dropna()
        verbal = ts["Glascow coma scale verbal response"].dropna()
        total = ts["Glascow coma scale total"].dropna()
        assert set(eye) <= MIMIC_EYE and set(motor) <= MIMIC_MOTOR and set(verbal) <= MIMIC_VERBAL
        assert set(total) <= {str(k) for k in range(3, 16)}
        assert set(ts["Capillary refill rate"].dropna()) <= {"0.0", "1.0"}
        gcs = ts.dropna(subset=["Glascow coma scale total"])
        cols = [f"Glascow coma scale {c}" for c in ("eye opening", "motor response", "verbal response", "total")]
        for e, m, v, t in gcs[cols].itertuples(index=False):
            assert SCORE[e] + SCORE[m] + SCORE[v] == int(t)
        styles_numbered += int(any(s[0].isdigit() for s in motor))
        styles_plain += int(any(not s[0].isdigit() for s in motor))
        num = ts.drop(columns=["Hours", *sc.CATEGORICAL_VARIABLES]).astype(float)
        assert num["Heart Rate"].dropna().between(25, 220).all()
        assert num["Oxygen saturation"].dropna().between(60, 100).all()
        assert num["Temperature"].dropna().between(33, 42).all() and num["pH"].dropna().between(6.8, 7.8).all()
        assert num["Fraction inspired oxygen"].dropna().between(0.21, 1.0).all()
        assert num["Heart Rate"].notna().sum() > 20  # roughly hourly vitals
    assert styles_numbered > styles_plain > 0  # mostly MetaVision strings, some CareVue strings


def test_cxr_images_metadata_and_pairing(cohort: tuple[Path, dict]) -> None:
    root, info = cohort
    labels = pd.read_csv(root / "labels.csv")
    meta = pd.read_csv(root / "cxr" / "mimic-cxr-2.0.0-metadata.csv", dtype={"StudyDate": str, "StudyTime": str})
    stays = pd.read_csv(root / "ehr" / "root" / "all_stays.csv")
    assert len(meta) == 30  # rows kept for missing files (the study happened, the image is unavailable)
    formats = set()
    for _, row in labels.iterrows():
        path = _study_dir(root, "cxr", row) / f"s{row.study_id}" / f"{row.dicom_id}.{row.cxr_format}"
        assert path.is_file() == bool(row.present_cxr)
        if not row.present_cxr:
            continue
        formats.add(row.cxr_format)
        if row.cxr_format == "jpg":
            img = Image.open(path)
            assert img.mode == "L" and img.size == (32, 32)
        else:
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
            assert arr.shape == (32, 32) and arr.dtype == np.uint16 and 0 < arr.max() <= 4095
            assert ds.BitsAllocated == 16 and ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.ViewPosition == row.view_position and ds.PatientID == str(row.subject_id)
        # pairing: study time - intime reproduces the documented offset and the 48 h window flag
        m = meta.set_index("dicom_id").loc[row.dicom_id]
        when = dt.datetime.strptime(m.StudyDate + m.StudyTime.split(".")[0], "%Y%m%d%H%M%S")
        intime = pd.Timestamp(stays.set_index("stay_id").loc[row.stay_id].intime).to_pydatetime()
        hours = (when - intime).total_seconds() / 3600
        assert abs(hours - row.study_offset_hours) < 1 / 60
        assert bool(0 <= hours <= 48) == bool(row.cxr_in_window)
        assert m.ViewPosition == row.view_position
    assert formats == {"jpg", "dcm"}
    assert 0 < (labels.cxr_in_window == 0).sum() < 15  # some studies a loader must reject
    assert info["cxr_pairable"] == int((labels.present_cxr & labels.cxr_pairable).sum())


def test_reports_have_sections(cohort: tuple[Path, dict]) -> None:
    root, _ = cohort
    labels = pd.read_csv(root / "labels.csv")
    for _, row in labels.iterrows():
        path = _study_dir(root, "reports", row) / f"s{row.study_id}.txt"
        assert path.is_file() == bool(row.present_report)
        if row.present_report:
            text = path.read_text()
            assert "FINDINGS:" in text and "IMPRESSION:" in text and text.index("FINDINGS:") < text.index("IMPRESSION:")


def test_missing_counts_exact_and_one_modality_kept(tmp_path: Path) -> None:
    info = write_clinical_cohort(
        tmp_path / "m", samples=40, seed=1, image_size=16, missing={"ehr": 0.25, "cxr": 0.5, "report": 0.5, "labs": 0.3}
    )
    labels = pd.read_csv(tmp_path / "m" / "labels.csv")
    flags = labels[["present_ehr", "present_cxr", "present_report"]].to_numpy()
    assert (flags.sum(axis=1) >= 1).all()
    assert (40 - flags.sum(axis=0)).tolist() == [10, 20, 20]  # round(rate * 40)
    assert info["present"] == {"ehr": 30, "cxr": 20, "report": 20}
    assert len(list((tmp_path / "m" / "ehr" / TASK).glob("*/*.csv"))) == 30
    assert len(list((tmp_path / "m" / "reports").rglob("*.txt"))) == 20
    man = pd.read_csv(tmp_path / "m" / "manifest" / "manifest.csv", keep_default_na=False)
    labs = man[[f"lab_{k}" for k in range(5)]]
    assert ((labs == "").all(axis=1)).sum() == 12 and ((labs == "").any(axis=1) == (labs == "").all(axis=1)).all()
    assert (man.report == "").sum() == 20  # "report" applies to both cohorts
    m_flags = (man[["pet", "ct", "report", "lab_0"]] != "").to_numpy()
    assert (m_flags.sum(axis=1) >= 1).all()


def test_missing_rates_that_cannot_keep_one_modality_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one modality"):
        write_clinical_cohort(tmp_path / "x", samples=20, missing={"ehr": 0.9, "cxr": 0.9, "report": 0.9})
    assert not (tmp_path / "x").exists()


def test_determinism(tmp_path: Path) -> None:
    kw = dict(samples=12, image_size=16, dicom_fraction=0.5, missing={"cxr": 0.25}, noise={"report": 0.2})
    write_clinical_cohort(tmp_path / "a", seed=7, **kw)
    write_clinical_cohort(tmp_path / "b", seed=7, **kw)
    write_clinical_cohort(tmp_path / "c", seed=8, **kw)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 40
    for rel in files_a:
        if rel.name.endswith(".nii.gz"):
            a = np.asarray(nib.load(tmp_path / "a" / rel).dataobj)
            np.testing.assert_array_equal(a, np.asarray(nib.load(tmp_path / "b" / rel).dataobj))
        else:
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "labels.csv").read_text() != (tmp_path / "c" / "labels.csv").read_text()


def test_noise_touches_only_its_modality(tmp_path: Path) -> None:
    kw = dict(samples=10, seed=2, image_size=16, dicom_fraction=0.0, manifest_cohort=False)
    write_clinical_cohort(tmp_path / "clean", **kw)
    write_clinical_cohort(tmp_path / "noisy", noise={"cxr": 0.3, "report": 1.0}, **kw)
    ehr = sorted((tmp_path / "clean" / "ehr").rglob("*.csv"))
    for p in ehr:
        assert p.read_bytes() == (tmp_path / "noisy" / p.relative_to(tmp_path / "clean")).read_bytes()
    diffs = []
    for p in sorted((tmp_path / "clean" / "cxr" / "files").rglob("*.jpg")):
        a = np.asarray(Image.open(p), dtype=float)
        b = np.asarray(Image.open(tmp_path / "noisy" / p.relative_to(tmp_path / "clean")), dtype=float)
        diffs.append(np.abs(a - b).mean())
    assert min(diffs) > 20  # std 0.3 of the range = 76 grey levels before clipping
    vocab = set(sc._vocabulary())
    for p in sorted((tmp_path / "noisy" / "reports").rglob("*.txt")):
        clean = (tmp_path / "clean" / p.relative_to(tmp_path / "noisy")).read_text()
        noisy = p.read_text()
        assert noisy != clean and "FINDINGS:" in noisy  # headers kept, every body word swapped (p = 1)
        body = noisy.split("FINDINGS:")[1].replace("IMPRESSION:", "").split()
        assert set(body) <= vocab


def test_signal_present(tmp_path: Path) -> None:
    info = write_clinical_cohort(tmp_path / "s", samples=200, seed=0, image_size=32, dicom_fraction=0.0,
                                 manifest_cohort=False)  # fmt: skip
    root = tmp_path / "s"
    labels = pd.read_csv(root / "labels.csv")
    assert 0.2 <= labels.y_true.mean() <= 0.4
    hr, lung = [], []
    for _, row in labels.iterrows():
        hr.append(pd.read_csv(_ts_path(root, row))["Heart Rate"].mean())
        img = np.asarray(Image.open(_study_dir(root, "cxr", row) / f"s{row.study_id}" / f"{row.dicom_id}.jpg"), float)
        band = img[9:17]
        lung.append(band[:, 5:11].mean() + band[:, 21:27].mean())
    y = labels.y_true.to_numpy()
    assert np.corrcoef(hr, y)[0, 1] > 0.2
    assert np.corrcoef(lung, y)[0, 1] > 0.2
    assert np.corrcoef(hr, labels.u_ehr)[0, 1] > 0.6 and np.corrcoef(lung, labels.u_cxr)[0, 1] > 0.6
    assert abs(np.corrcoef(hr, labels.u_cxr)[0, 1]) < 0.25  # each modality carries its own component
    auc = info["oracle_auroc"]
    assert all(0.6 < auc[m] < auc["all"] for m in ("ehr", "cxr", "report"))


def test_manifest_cohort(cohort: tuple[Path, dict]) -> None:
    root, info = cohort
    mdir = root / "manifest"
    man = pd.read_csv(mdir / "manifest.csv", keep_default_na=False)
    assert list(man.columns) == ["case_id", "label", "pet", "ct", "report", *[f"lab_{k}" for k in range(5)]]
    assert set(man.label) <= {0, 1} and man.case_id.is_unique and len(man) == 30
    assert (man.pet == "").sum() == 6 and info["manifest"]["present"]["pet"] == 24
    inline = paths = 0
    for row in man.itertuples():
        for col in ("pet", "ct"):
            cell = getattr(row, col)
            if cell:
                vol = nib.load(mdir / cell)
                assert vol.shape == (16, 16, 16) and vol.get_data_dtype() == np.float32
        if row.report.endswith(".txt"):
            assert (mdir / row.report).is_file() and "FDG" in (mdir / row.report).read_text()
            paths += 1
        elif row.report:
            assert "FDG" in row.report and "IMPRESSION" in row.report
            inline += 1
        pd.to_numeric(man.loc[row.Index, [f"lab_{k}" for k in range(5)]].replace("", np.nan))
    assert inline > 0 and paths > 0
    pet = nib.load(mdir / man.pet[man.pet != ""].iloc[0]).get_fdata()
    assert pet.max() > 2.0  # a lesion hotter than background


def test_overwrite_refusal_and_replace(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_clinical_cohort(out, samples=10, image_size=16, manifest_cohort=False)
    assert (out / "keep.txt").is_file()
    write_clinical_cohort(out, samples=10, image_size=16, manifest_cohort=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "labels.csv").is_file()


def test_no_leftover_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sc, "_write_manifest_cohort", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_clinical_cohort(tmp_path / "f", samples=10, image_size=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"samples": 5}, "samples"),
        ({"missing": {"mri": 0.1}}, "missing: unknown modality 'mri'"),
        ({"missing": {"cxr": 1.0}}, r"missing\['cxr'\].*\[0, 1\)"),
        ({"missing": {"ehr": -0.1}}, r"missing\['ehr'\]"),
        ({"noise": {"cxr": -1}}, r"noise\['cxr'\]"),
        ({"noise": {"report": 2.0}}, r"noise\['report'\]"),
        ({"noise": {"xray": 0.1}}, "noise: unknown modality 'xray'"),
        ({"task": "phenotyping"}, "task"),
        ({"image_size": 8}, "image_size"),
        ({"dicom_fraction": 1.5}, "dicom_fraction"),
    ],
)
def test_argument_errors(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    args = {"samples": 10, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        write_clinical_cohort(tmp_path / "e", **args)
    assert not (tmp_path / "e").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medfusion.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "clinical", str(out), "--samples", "10", "--seed", "1", "--missing", "cxr=0.2"]) == 0
    printed = capsys.readouterr().out
    assert "'present': {'ehr': 10, 'cxr': 8, 'report': 10}" in printed
    assert main(["synth", "clinical", str(out), "--samples", "10", "--missing", "bogus=0.2"]) == 2
    assert "bogus" in capsys.readouterr().err
