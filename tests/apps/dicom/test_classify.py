"""dicom-classify: a chest X-ray study in Orthanc + report/EHR CSV keyed by accession -> JSON + SR, as the bundle."""

from __future__ import annotations

import glob
from pathlib import Path

import highdicom as hd
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigParser

from medfusion.apps.dicom.classify import dicom_classify, load_classification_model, read_clinical_row
from medfusion.apps.dicom.convert import image_to_dicom_dx, nifti_to_dicom_study, write_datasets
from medfusion.apps.dicom.source import DicomStore

BUNDLE = Path(__file__).resolve().parents[3] / "bundles" / "clinical_fusion"
TINY = {
    "encoders#report": {"name": "bert_tiny"},
    "encoders#ehr": {"name": "gru", "in_features": 76, "hidden": 16},
    "image_size": 64,
    "method_name": "concat",
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from medfusion.data.synth_clinical import write_clinical_cohort

    out = tmp_path_factory.mktemp("clinical") / "cohort"
    write_clinical_cohort(out, samples=10, seed=0)
    return out


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    parser["ckpt_path"] = "absent.pt"
    for key, value in TINY.items():
        parser[key] = value
    torch.manual_seed(7)
    net = parser.get_parsed_content("network_def", instantiate=True)
    path = tmp_path_factory.mktemp("cls") / "model.pt"
    torch.save({"model": net.state_dict()}, path)
    return load_classification_model(BUNDLE, path, TINY, "cpu")


def _roundtrip(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _bundle_probability(model, manifest: Path, out: Path) -> pd.DataFrame:
    from medfusion.apps.bundle import bundle_workflow

    overrides = {
        **TINY,
        "data_layout": "manifest",
        "manifest_csv": str(manifest),
        "manifest_columns": {"ehr": "ehr", "cxr": "cxr", "report": "report"},
        "label_columns": [],
        "ckpt_path": str(model.loaded.checkpoint),
        "output_csv": str(out),
        "device": "$torch.device('cpu')",
    }
    wf = bundle_workflow(BUNDLE, ["inference.json"], "infer", overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return pd.read_csv(out).set_index("case_id")


def test_classify_against_orthanc_equals_the_bundle(orthanc, cohort, cls_model, tmp_path):
    jpg = sorted(glob.glob(str(cohort / "cxr" / "files" / "**" / "*.jpg"), recursive=True))
    reports = sorted(glob.glob(str(cohort / "reports" / "files" / "**" / "*.txt"), recursive=True))
    ehr = sorted(glob.glob(str(cohort / "ehr" / "in-hospital-mortality" / "*" / "*_timeseries.csv")))
    full = image_to_dicom_dx(jpg[0], "cxr-full", accession_number="CXR-1", patient_id="P1")
    lateral = image_to_dicom_dx(jpg[1], "cxr-full", accession_number="CXR-1", patient_id="P1", view_position="LL")
    lateral.SeriesInstanceUID, lateral.SOPInstanceUID = "1.2.3.4.5.1", "1.2.3.4.5.1.1"
    lateral.file_meta.MediaStorageSOPInstanceUID = lateral.SOPInstanceUID
    lateral.SeriesNumber = 2
    alone = image_to_dicom_dx(jpg[2], "cxr-alone", accession_number="CXR-2", patient_id="P2", view_position="AP")
    pacs = DicomStore.open(orthanc.dicomweb_url)
    pacs.store([full, lateral, alone])
    # the clinical CSV: free text with commas and line breaks inline, a report file, relative paths, an empty cell
    csv = tmp_path / "clinical" / "ehr.csv"
    csv.parent.mkdir()
    rel_ehr = Path(ehr[0]).relative_to(cohort)
    (tmp_path / "clinical" / rel_ehr.parent).mkdir(parents=True)
    (tmp_path / "clinical" / rel_ehr).write_bytes(Path(ehr[0]).read_bytes())
    text = Path(reports[0]).read_text()
    pd.DataFrame(
        [{"accession_number": "CXR-1", "report": text, "ehr": str(rel_ehr)},
         {"accession_number": "CXR-3", "report": "", "ehr": ""}]
    ).to_csv(csv, index=False)  # fmt: skip

    res = dicom_classify(pacs, cls_model, tmp_path / "out", accession_number="CXR-1", clinical_csv=csv, sr=True,
                         send="source")  # fmt: skip
    side = res.sidecar
    assert side["combination"] == "ehr+cxr+report" and side["missing_modalities"] == []
    assert side["image"]["view_position"] == "PA" and side["image"]["series_uid"] == full.SeriesInstanceUID
    assert "another radiograph" in side["unused_series"][0]["reason"]  # the lateral view
    assert side["clinical"]["row"] == 1 and side["clinical"]["values"]["ehr"].endswith(rel_ehr.name)

    # the same inputs through the bundle's own inference.json (manifest layout, same DICOM file)
    cxr_file = tmp_path / "cxr_full.dcm"
    full.save_as(cxr_file, enforce_file_format=True)
    manifest = tmp_path / "manifest.csv"
    row = {"case_id": "a", "ehr": str(tmp_path / "clinical" / rel_ehr), "cxr": str(cxr_file), "report": text}
    pd.DataFrame([row]).to_csv(manifest, index=False)
    bundle = _bundle_probability(cls_model, manifest, tmp_path / "pred.csv")
    assert side["probability"] == pytest.approx(bundle.loc["a", "prob_1"], abs=1e-6)
    assert bundle.loc["a", "modalities"] == "ehr+cxr+report"

    # the SR as the PACS returns it: probability and modalities used
    (sr_ds,) = pacs.retrieve(side["study_instance_uid"], side["sr"]["series_instance_uid"])
    assert sr_ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    sr = hd.sr.srread(_roundtrip(sr_ds, tmp_path / "sr.dcm"))
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert float(items["Probability"].MeasuredValueSequence[0].NumericValue) == pytest.approx(side["probability"], 1e-6)
    assert items["Modalities used"].TextValue == "ehr+cxr+report"
    again = dicom_classify(pacs, cls_model, tmp_path / "out", accession_number="CXR-1", clinical_csv=csv, sr=True,
                           send="source")  # fmt: skip
    assert again.reused and again.sidecar["sent"][-1]["stored"] == []
    assert len(pacs.series_with(side["study_instance_uid"], "SR")) == 1

    # no CSV row for this accession number: the X-ray alone, and it says so
    alone_res = dicom_classify(pacs, cls_model, tmp_path / "out", accession_number="CXR-2", clinical_csv=csv)
    assert alone_res.sidecar["combination"] == "cxr"
    assert alone_res.sidecar["missing_modalities"] == ["ehr", "report"]
    assert "no row for accession number" in alone_res.sidecar["clinical"]["missing_reason"]["report"]
    manifest_b = tmp_path / "manifest_b.csv"
    alone_file = tmp_path / "cxr_alone.dcm"
    alone.save_as(alone_file, enforce_file_format=True)
    pd.DataFrame([{"case_id": "c", "ehr": "", "cxr": str(alone_file), "report": ""}]).to_csv(manifest_b, index=False)
    bundle_b = _bundle_probability(cls_model, manifest_b, tmp_path / "pred_b.csv")
    assert alone_res.sidecar["probability"] == pytest.approx(bundle_b.loc["c", "prob_1"], abs=1e-6)
    assert bundle_b.loc["c", "modalities"] == "cxr"


def test_bad_inputs_name_what_is_wrong(tmp_path, cls_model):
    csv = tmp_path / "c.csv"
    csv.write_text("id,report\n1,x\n")
    with pytest.raises(ValueError, match="no accession number column"):
        read_clinical_row(csv, "1", {"report": "text"})
    csv.write_text("accession_number,report,ehr\nA,x,\nA,y,\n")
    with pytest.raises(ValueError, match=r"2 rows \(data rows \[1, 2\]\)"):
        read_clinical_row(csv, "A", {"report": "text"})
    csv.write_text("accession_number,report,ehr\nA,x,missing.csv\n")
    with pytest.raises(FileNotFoundError, match="data row 1, column 'ehr'"):
        read_clinical_row(csv, "A", {"report": "text", "ehr": "ehr"})
    # an MR-only study with no CSV: nothing this model can use
    import nibabel as nib
    import numpy as np

    study = nifti_to_dicom_study({"flair": nib.Nifti1Image(np.ones((4, 4, 3), np.int16), np.eye(4))}, "mr")
    write_datasets(study, tmp_path / "mr")
    with pytest.raises(ValueError, match="none of the modalities") as err:
        dicom_classify(tmp_path / "mr", cls_model, tmp_path / "out")
    assert "not a radiograph (Modality MR" in str(err.value)


def test_cli_classify_from_a_folder(cohort, cls_model, tmp_path, capsys):
    import json

    from medfusion.cli import main

    jpg = sorted(glob.glob(str(cohort / "cxr" / "files" / "**" / "*.jpg"), recursive=True))[0]
    write_datasets([image_to_dicom_dx(jpg, "cli", accession_number="A-7")], tmp_path / "in")
    csv = tmp_path / "clinical.csv"
    pd.DataFrame([{"AccessionNumber": "A-7", "report": "No focal consolidation. IMPRESSION: normal."}]).to_csv(csv)
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    args = ["dicom-classify", str(tmp_path / "in"), "--bundle", str(BUNDLE), "--checkpoint",
            str(cls_model.loaded.checkpoint), "--override", *overrides, "--device", "cpu", "--clinical_csv", str(csv),
            "--output_dir", str(tmp_path / "out"), "--sr", "--send", str(tmp_path / "archive")]  # fmt: skip
    code = main(args)
    assert code == 0
    printed = capsys.readouterr().out
    assert "with cxr+report (missing: ehr)" in printed
    (result,) = (tmp_path / "out").rglob("result.json")
    side = json.loads(result.read_text())
    assert side["clinical"]["missing_reason"] == {"ehr": "no column 'ehr'"}
    assert (result.parent / "sr.dcm").is_file()
    assert DicomStore.open(tmp_path / "archive").series_with(side["study_instance_uid"], "SR")
