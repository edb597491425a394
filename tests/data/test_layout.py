"""medfusion.data.layout: one DatasetLayout per layout, used by the loaders, the bundles and check-data."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfusion.data.brats import discover_brats
from medfusion.data.check import check_path
from medfusion.data.layout import (
    LAYOUT_FAMILIES,
    DatasetLayout,
    NoLayoutError,
    detect_layout,
    get_layout,
    layouts,
    register_layout,
    resolve_layout,
)
from medfusion.data.synth_brats import write_brats_cohort
from medfusion.data.synth_clinical import write_clinical_cohort

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout") / "brats"
    write_brats_cohort(out, cases=3, size=16, seed=5)
    return out


@pytest.fixture(scope="module")
def brats2015(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout") / "b15"
    write_brats_cohort(out, cases=2, size=16, seed=5, style="brats2015")
    return out


@pytest.fixture(scope="module")
def clinical(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layout") / "clinical"
    write_clinical_cohort(out, samples=10, seed=2, image_size=32, missing={"cxr": 0.3})
    return out


def _msd(root: Path) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6, 4), np.float32), np.eye(4)), str(root / "imagesTr" / "BRATS_001.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), np.eye(4)), str(root / "labelsTr" / "BRATS_001.nii.gz"))
    meta = {
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_registry_holds_every_layout_in_detection_order():
    assert list(layouts()) == ["volume_manifest", "mimic", "manifest", "msd", "brats"]
    assert {lay.family for lay in layouts().values()} == set(LAYOUT_FAMILIES)
    for family, members in LAYOUT_FAMILIES.items():
        assert all(get_layout(n).family == family for n in members)
    with pytest.raises(ValueError, match=r"unknown dataset layout 'nifti'; registered: \['volume_manifest'"):
        get_layout("nifti")

    class Other(DatasetLayout):
        name = "brats"

    with pytest.raises(ValueError, match="a layout named 'brats' is already registered"):
        register_layout(Other())
    assert type(get_layout("brats")).__name__ == "BratsLayout"


def test_each_layout_is_detected_on_generated_data(brats, brats2015, clinical, sparse_cohort, tmp_path):
    assert detect_layout(brats).name == "brats"
    assert detect_layout(brats.parent).name == "brats"  # the cases one level below
    assert detect_layout(brats2015 / "manifest.csv").name == "volume_manifest"
    assert detect_layout(_msd(tmp_path / "Task01_BrainTumour")).name == "msd"
    assert detect_layout(tmp_path).name == "msd"  # dataset.json in a child folder
    assert detect_layout(clinical).name == "mimic"  # it also holds manifest/: MIMIC is tried first
    assert detect_layout(clinical / "manifest" / "manifest.csv").name == "manifest"
    assert detect_layout(sparse_cohort["manifest"]).name == "manifest"
    only_manifest = tmp_path / "cohort"
    shutil.copytree(clinical / "manifest", only_manifest / "manifest")
    assert detect_layout(only_manifest).name == "manifest"
    assert get_layout("manifest").roots(only_manifest) == {"csv": only_manifest / "manifest" / "manifest.csv"}
    mimic_roots = get_layout("mimic").roots(clinical)
    assert mimic_roots == {"ehr": clinical / "ehr", "cxr": clinical / "cxr", "reports": clinical / "reports"}
    assert get_layout("mimic").roots(clinical / "ehr") == {"ehr": clinical / "ehr", "cxr": None, "reports": None}


def test_real_brats_case_is_detected(real_case):
    lay = detect_layout(real_case.parent)
    assert lay.name == "brats"
    (entry,) = lay.discover(real_case.parent, require_label=True)
    assert entry["case_id"] == real_case.name and entry["source"] == "brats2021"
    assert entry["modality_mask"] == [True] * 4


def test_no_layout_names_the_folder_every_layout_tried_and_what_it_found(brats2015, tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(NoLayoutError) as err:
        detect_layout(tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"No known dataset layout at {tmp_path}; tried volume_manifest, mimic, manifest, msd, brats:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(layouts())
    assert isinstance(err.value, FileNotFoundError)  # callers that caught "No BraTS cases" still catch it
    with pytest.raises(NoLayoutError) as err:  # a BRATS 2015 export: the CSV beside it and the unmatched files
        detect_layout(brats2015)
    msg = str(err.value)
    assert "The folder holds manifest.csv: pass the CSV file itself." in msg
    assert "NIfTI file(s) in 2 folder(s) not named like BraTS" in msg and "searched it and 3 folder levels" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_layout(tmp_path / "nope")
    report = check_path(tmp_path, progress=False)  # check-data: the same message as one dataset error
    assert report.layout == "unknown" and not report.ok
    assert report.dataset_errors[0].startswith(f"No known dataset layout at {tmp_path}")


def test_a_family_falls_back_to_the_member_that_reads_the_path(tmp_path):
    assert resolve_layout(tmp_path, "brats").name == "brats"  # an empty folder: "No BraTS cases" says why
    csv = tmp_path / "cohort.csv"
    csv.write_text("case_id,label,note\na,0,text\n")
    assert resolve_layout(csv, "brats").name == "volume_manifest"  # its column error says why
    assert resolve_layout(csv, "auto").name == "manifest"
    with pytest.raises(ValueError, match="Volume manifest .*cohort.csv: columns"):
        discover_brats(csv)
    with pytest.raises(FileNotFoundError, match="No BraTS cases under"):
        discover_brats(tmp_path)


def _without_index(entries):
    return [{k: v for k, v in e.items() if k != "sample_index"} for e in entries]


def test_brats_loader_check_data_and_bundle_agree_on_the_datalist(brats, brats2015):
    from monai.bundle import ConfigParser

    for path in (brats, brats2015 / "manifest.csv"):
        lay = detect_layout(path)
        loader = discover_brats(path)
        assert loader == lay.discover(path)
        assert lay.scan(path).entries == loader  # what check-data checks
        report = check_path(path, progress=False, num_workers=0)
        assert [c.case_id for c in report.cases] == [e["case_id"] for e in loader]
        parser = ConfigParser()
        parser.read_config(str(PROJECT / "bundles" / "brats_metakd" / "configs" / "train.json"))
        parser["dataset_dir"] = str(path)
        assert parser.get_parsed_content("datalist") == discover_brats(path, require_label=True)


def test_clinical_loader_check_data_and_bundle_agree_on_the_datalist(clinical):
    from monai.bundle import ConfigParser

    from medfusion.apps.clinical_bundle import clinical_datalist

    mimic = get_layout("mimic")
    mods = ["ehr", "cxr", "report"]
    report = check_path(clinical, progress=False, num_workers=0)
    checked = [c.case_id for c in report.cases]
    discovered = []
    for split in ("train", "val", "test"):
        items = mimic.discover(clinical, mods, split=split)
        assert items == clinical_datalist("mimic", clinical, mods, split=split)
        discovered += [f"{split}/{e['case_id']}" for e in items]
    assert checked == discovered and len(checked) == 10
    assert [e["case_id"] for e in mimic.scan(clinical).entries] == discovered

    parser = ConfigParser()
    parser.read_config(str(PROJECT / "bundles" / "clinical_fusion" / "configs" / "inference.json"))
    parser["dataset_dir"] = str(clinical)
    assert parser.get_parsed_content("datalist") == mimic.discover(clinical, mods, split="test")
    parser["data_layout"] = "manifest"
    parser["modalities"] = ["pet", "ct", "report", "labs"]
    bundle = parser.get_parsed_content("datalist")
    manifest = get_layout("manifest")
    spec = {"pet": "pet", "ct": "ct", "report": "report", "labs": [f"lab_{i}" for i in range(5)]}
    kinds = {"pet": "volume", "ct": "volume", "report": "text", "labs": "tabular"}
    assert _without_index(bundle) == _without_index(manifest.discover(clinical, spec, kinds=kinds))
    scan = manifest.scan(clinical, spec, kinds=kinds)
    assert scan.root == str(clinical / "manifest" / "manifest.csv")
    assert _without_index(scan.entries) == _without_index(bundle)


def test_scanning_logs_nothing_and_leaves_other_loggers_alone(brats, tmp_path, caplog):
    ds = Path(shutil.copytree(brats, tmp_path / "ds"))
    (ds / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").unlink()
    brats_logger = logging.getLogger("medfusion.data.brats")
    before = brats_logger.level
    with caplog.at_level(logging.WARNING):
        report = check_path(ds, progress=False, num_workers=0)
    assert brats_logger.level == before
    assert not [r for r in caplog.records if r.name == "medfusion.data.brats"]
    assert {w for c in report.cases for w in c.warnings} == {"no t2 file; treated as missing."}
    with caplog.at_level(logging.WARNING):
        discover_brats(ds)  # the loader does log it
    assert any("no t2 file" in r.getMessage() for r in caplog.records if r.name == "medfusion.data.brats")


def test_mimic_roots_of_a_mimic3_benchmarks_root_and_a_missing_cxr_root(clinical):
    mimic = get_layout("mimic")
    ehr = clinical / "ehr"  # a mimic3-benchmarks root: root/all_stays.csv, <task>/ listfiles
    assert mimic.detect(ehr)
    items = mimic.discover(ehr, ["ehr"], split="test")
    assert items == mimic.discover(clinical, ["ehr"], split="test")
    with pytest.raises(ValueError, match=r"MIMIC-style dataset .*ehr: modalities \['ehr', 'cxr'\] include cxr/report"):
        mimic.discover(ehr, ["ehr", "cxr"], split="test")
    scan = mimic.scan(ehr)  # check-data leaves cxr/report out when there is no CXR root
    assert scan.modalities == ("ehr",) and not scan.dataset_errors
