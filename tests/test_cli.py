"""The ``medfusion`` command: help, synth layouts read back by the discoverers, check-data exit codes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfusion.cli import build_parser, main
from medfusion.data.brats import discover_brats
from medfusion.data.mimic import discover_mimic


@pytest.fixture(scope="module")
def brats_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "brats"
    assert main(["synth", "brats", str(out), "--cases", "2", "--size", "16", "--seed", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def clinical_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "clinical"
    assert main(["synth", "clinical", str(out), "--samples", "10", "--missing", "cxr=0.2"]) == 0
    return out


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("synth", "check-data", "evaluate"):
        assert cmd in text
    help_check = build_parser().parse_args(["check-data", "x"])
    assert help_check.layout == "auto" and help_check.modalities is None and not help_check.no_labels


def test_synth_brats_is_read_back(brats_dir):
    items = discover_brats(brats_dir, require_label=True)
    assert [i["case_id"] for i in items] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert all(i["modality_mask"] == [True] * 4 and i["label_convention"] == "brats" for i in items)
    assert nib.load(items[0]["t1ce"]).shape == (16, 16, 16)


def test_synth_clinical_is_read_back(clinical_dir):
    import pandas as pd

    truth = pd.read_csv(clinical_dir / "labels.csv").set_index("stay")
    items = []
    for split in ("train", "val", "test"):
        part = discover_mimic(clinical_dir / "ehr", clinical_dir / "cxr", clinical_dir / "reports", split=split)
        assert all(truth.loc[i["case_id"], "split"] == split for i in part)
        items += part
    assert len(items) == 10 and all(i["ehr"] is not None for i in items)  # no EHR missingness requested
    assert int(truth["present_cxr"].sum()) == 8  # --missing cxr=0.2 removed 2 of 10 image files
    for i in items:
        if not truth.loc[i["case_id"], "present_cxr"]:
            assert i["cxr"] is None
        if i["cxr"] is not None:
            assert Path(i["cxr"]).is_file() and truth.loc[i["case_id"], "cxr_pairable"] == 1


def test_check_data_clean_is_exit_0(brats_dir, clinical_dir, capsys):
    assert main(["check-data", str(brats_dir), "--details"]) == 0
    out = capsys.readouterr().out
    assert "ok       BraTS2021_00001" in out and out.strip().splitlines()[-1].startswith("OK: brats")
    assert main(["check-data", str(brats_dir)]) == 0  # summary only: no line per clean case
    assert capsys.readouterr().out.strip().splitlines() == [
        f"OK: brats dataset {brats_dir}: 2 case(s): 2 ok, 0 with warnings, 0 with errors"
    ]
    assert main(["check-data", str(clinical_dir)]) == 0  # auto: a folder holding ehr/ is MIMIC-style
    out = capsys.readouterr().out
    assert "OK: mimic" in out and "no cxr file; treated as missing." in out  # warnings allowed
    assert main(["check-data", str(clinical_dir / "manifest" / "manifest.csv")]) == 0  # auto: .csv
    assert "OK: manifest" in capsys.readouterr().out


def test_check_data_problems_are_exit_1(brats_dir, tmp_path, capsys):
    import shutil

    ds = Path(shutil.copytree(brats_dir, tmp_path / "ds"))
    seg = ds / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    img = nib.load(str(seg))
    nib.save(nib.Nifti1Image(np.full(img.shape, 9, np.uint8), img.affine), str(seg))
    assert main(["check-data", str(ds), "--layout", "brats"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR    BraTS2021_00001: label {seg} holds value(s) [9]" in out
    assert out.strip().splitlines()[-1].startswith("FAILED: brats")
    assert main(["check-data", str(ds), "--no-labels"]) == 0  # label values not checked
    assert main(["check-data", str(ds), "--modalities", "flair", "t2"]) == 1


def test_synth_brats2015_style_is_checked_through_its_manifest(tmp_path, capsys):
    out = tmp_path / "b15"
    assert main(["synth", "brats", str(out), "--cases", "2", "--size", "16", "--style", "brats2015"]) == 0
    assert "BRATS 2015 toolkit-style" in capsys.readouterr().out
    assert main(["check-data", str(out / "manifest.csv"), "--modalities", "flair", "t1ce"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("OK: volume_manifest")
    assert main(["check-data", str(out)]) == 1  # the folder itself is not named like BraTS
    text = capsys.readouterr().out
    assert "searched it and 3 folder levels below it" in text and "volume manifest" in text


def test_check_data_usage_errors_are_exit_2(brats_dir, tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["check-data", str(tmp_path), "--layout", "nifti"])
    assert exc.value.code == 2
    assert main(["check-data", str(brats_dir), "--modalities", "ct"]) == 2
    assert "'ct'" in capsys.readouterr().err
    assert main(["check-data", str(tmp_path), "--layout", "brats", "--modalities", "ct"]) == 2


def test_check_data_on_a_folder_of_no_known_layout_names_it_and_the_layouts_tried(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a dataset")
    assert main(["check-data", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert (
        out[0]
        == f"DATASET ERROR  No known dataset layout at {tmp_path}; tried volume_manifest, mimic, manifest, msd, brats:"
    )
    assert out[-1].startswith(f"FAILED: unknown dataset {tmp_path}: 0 case(s)")


def test_synth_latent_writes_a_table_the_regression_runner_reads(tmp_path):
    import json

    import pandas as pd

    from medfusion.apps.meta_fusion_tabular import TabularMetaFusion

    out = tmp_path / "latent"
    args = ["synth", "latent", str(out), "--p", "6", "5", "--latent", "2", "3", "1", "--n", "100"]
    assert main([*args, "--missing-rate", "0.25", "--g", "quad", "lin", "lin", "--seed", "3"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 100 and [c for c in table.columns if c.startswith("m1_")] == [f"m1_{k}" for k in range(6)]
    assert table["split"].value_counts().to_dict() == {"train": 64, "test": 20, "val": 16}
    meta = json.loads((out / "signal.json").read_text())
    assert meta["g"] == ["quad", "lin", "lin"] and meta["missing_rate"] == 0.25
    m1_missing = table[[f"m1_{k}" for k in range(6)]].isna().all(axis=1)
    assert 0 < m1_missing.mean() < 0.5 and not (m1_missing & table["m2_0"].isna()).any()
    runner = TabularMetaFusion(out / "table.csv", tmp_path / "models")
    assert runner.split_data("val").mask.shape == (16, 2)
    assert main(args) != 0  # an existing folder is not overwritten without --overwrite


def test_check_data_manifest_with_kinds_tabular_columns_or_the_bundle(sparse_cohort, capsys):
    """The check reads values by the kinds the bundle would use; given on the command line or taken from the bundle."""
    import json

    cols = sparse_cohort["columns"]
    csv = sparse_cohort["manifest"]
    common = ["--id-column", "image_id", "--label-column", "outcome", "--num-classes", "2"]
    args = ["check-data", csv, "--kinds", "cxr=image,report=text", "--columns", "cxr=image_path,report=note",
            "--tabular", "vitals=" + ",".join(cols["ehr"]), *common]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "NOTE     modality kinds: cxr=image (column 'image_path'), report=text (column 'note'), vitals=tabular (9"
        in out
    )
    assert "looks like a patient id" in out and len(out.splitlines()) < 15
    assert main([*args, "--group-column", "patient_id"]) == 0
    assert "looks like a patient id" not in capsys.readouterr().out
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "clinical_fusion"
    overrides = [
        "data_layout=manifest",
        'modalities=["cxr", "report", "vitals"]',
        "manifest_columns=" + json.dumps({"cxr": cols["image"], "report": cols["note"], "vitals": cols["ehr"]}),
        "case_id_column=image_id",
        "label_column=outcome",
        "group_column=patient_id",
    ]
    assert main(["check-data", csv, "--bundle", str(bundle), "--override", *overrides]) == 0
    out = capsys.readouterr().out
    assert "cxr=image (column 'image_path'), report=text (column 'note'), vitals=tabular" in out
    assert "no kind given" not in out and "looks like a patient id" not in out
    with pytest.raises(SystemExit, match="--kinds: expected name=value"):
        main(["check-data", csv, "--kinds", "cxr"])
