"""bundles/brats_metakd on a BRATS 2015 toolkit-style export: volume manifest, brats2015 labels, brain mask,
a flair + t1ce model trained, evaluated from the CLI and used for inference in the dataset's convention."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from monai.bundle import ConfigWorkflow

from medfusion.apps.bundle import bundle_workflow, train_bundle
from medfusion.cli import main
from medfusion.data.synth_brats import write_brats_cohort

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"
CHANNELS = [4, 8, 16, 32]
COMMON = {
    "modalities": ["flair", "t1ce"],
    "label_convention": "brats2015",
    "network_def#channels": CHANNELS,
    "roi_size": [32, 32, 32],
}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b15bundle") / "export"
    write_brats_cohort(out, cases=6, size=32, seed=8, style="brats2015")
    # the manifest a user writes: no convention column, the bundle config chooses it
    pd.read_csv(out / "manifest.csv").drop(columns=["label_convention"]).to_csv(out / "cases.csv", index=False)
    return out


@pytest.fixture(scope="module")
def trained(export, tmp_path_factory, work_dirs) -> Path:
    work = tmp_path_factory.mktemp("b15run")
    train_bundle(
        BUNDLE,
        {
            **COMMON,
            "dataset_dir": str(export / "cases.csv"),
            **work_dirs(work),
            "max_epochs": 1,
            "batch_size": 2,
            "num_workers": 0,
            "cache_rate": 1.0,
            "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.2},
            "method#meta_interval": 1,
        },
    )
    return work


def test_without_the_convention_the_pre_training_check_names_it(export, tmp_path, work_dirs):
    overrides = {**COMMON, "label_convention": None, "dataset_dir": str(export / "cases.csv")}
    overrides.update({**work_dirs(tmp_path), "num_workers": 0})
    with pytest.raises(RuntimeError) as err:
        train_bundle(BUNDLE, overrides)
    cause = str(err.value.__cause__)
    assert "holds value(s) [3]" in cause and "the values fit ['brats2015']" in cause
    assert not (tmp_path / "models" / "model.pt").exists()


def test_flair_t1ce_model_evaluates_from_the_cli(export, trained, tmp_path, capsys):
    args = ["evaluate", "--bundle", str(BUNDLE), "--dataset_dir", str(export / "cases.csv")]
    args += ["--output_dir", str(tmp_path / "eval"), "--checkpoint", str(trained / "models" / "model.pt")]
    args += ["--roi_size", "32", "32", "32", "--no_hd95", "--modalities", "flair", "t1ce"]
    args += ["--override", f"network_def#channels={CHANNELS}".replace(" ", ""), "label_convention=brats2015"]
    assert main(args) == 0
    summary = pd.read_csv(tmp_path / "eval" / "summary.csv", index_col=0)
    assert list(summary.index) == ["flair", "t1ce", "flair+t1ce", "mean"]
    per_case = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    assert len(per_case) == 6 * 3 and per_case["dice_wt"].between(0, 1).all()
    assert "flair+t1ce" in capsys.readouterr().out


def _inference_workflow(dataset: Path, ckpt: Path, out: Path, **overrides) -> ConfigWorkflow:
    paths = {"dataset_dir": str(dataset), "ckpt_path": str(ckpt), "output_dir": str(out)}
    return bundle_workflow(BUNDLE, ["inference.json"], "infer", {**paths, **COMMON, **overrides})


def _infer(export: Path, trained: Path, out: Path, convention) -> ConfigWorkflow:
    wf = _inference_workflow(export / "cases.csv", trained / "models" / "model.pt", out, label_convention=convention)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.mark.parametrize(
    ("convention", "key", "allowed"),
    [
        ("brats2015", "brats2015", {0, 1, 2, 4}),
        (
            {"TC": [1, 3, 4], "WT": [1, 2, 3, 4], "ET": [4], "write": {"ET": 4, "TC": 3, "WT": 2}},
            "TC=1,3,4;WT=1,2,3,4;ET=4;write=4,3,2",
            {0, 2, 3, 4},
        ),
    ],
)
def test_inference_writes_the_configured_convention(export, trained, tmp_path, convention, key, allowed):
    wf = _infer(export, trained, tmp_path / "pred", convention)
    assert {e["label_convention"] for e in wf.parser.get_parsed_content("datalist")} == {key}
    preds = sorted((tmp_path / "pred").glob("*_seg.nii.gz"))
    assert [p.name for p in preds] == [f"brats2015_pat{i:04d}_seg.nii.gz" for i in range(6)]
    src = nib.load(str(export / "brats2015_pat0000" / "Flair_subtrMeanDivStd.nii.gz"))
    img = nib.load(str(preds[0]))
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine)
    values = set().union(*(np.unique(np.asarray(nib.load(str(p)).dataobj)).tolist() for p in preds))
    assert values <= allowed and len(values) > 1  # something was predicted, written in the configured values


def test_inference_checks_the_volumes_first_naming_a_2d_file(export, tmp_path):
    """Issue #12.7: a case stored as 2D volumes failed inside inference with 'Inputs must have 5 dimensions'."""
    flat = tmp_path / "flat_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), str(flat))
    table = pd.read_csv(export / "cases.csv", dtype=str, keep_default_na=False)
    for col in table.columns.drop("case_id"):
        table[col] = [str(export / p) if p else "" for p in table[col]]  # the copy lives elsewhere
    table.loc[1, "flair"] = str(flat)
    table.to_csv(tmp_path / "cases.csv", index=False)
    wf = _inference_workflow(tmp_path / "cases.csv", tmp_path / "no_model_needed.pt", tmp_path / "pred")
    with pytest.raises(RuntimeError) as err:
        wf.initialize()
    cause = str(err.value.__cause__)
    assert f"case {table.loc[1, 'case_id']}: flair file {flat} has shape (32, 32); expected a 3D volume" in cause
    assert not (tmp_path / "pred").exists()
