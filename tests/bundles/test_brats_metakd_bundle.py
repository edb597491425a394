"""Smoke tests of bundles/brats_metakd through MONAI's ConfigWorkflow on generated data and the real case."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from monai.bundle import verify_metadata

from medfusion.apps.bundle import bundle_workflow, evaluate_bundle, run_bundle, train_bundle

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
ROI = [32, 32, 32]


@pytest.fixture(scope="module")
def cohort(brats_cohort) -> Path:
    return brats_cohort(6, 32, 7)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory, work_dirs) -> Path:
    work = tmp_path_factory.mktemp("bundle_run")
    train_bundle(
        BUNDLE,
        {
            "dataset_dir": str(cohort),
            **work_dirs(work),
            "max_epochs": 2,
            "roi_size": ROI,
            "batch_size": 2,
            "num_workers": 0,
            "cache_rate": 1.0,
            "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.2},
            "method#meta_interval": 1,
            "method#meta_steps": 2,
            "network_def#channels": [8, 16, 32, 64],
        },
    )
    return work


def test_metadata_validates_offline():
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA}")
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_check_properties(cohort):
    wf = bundle_workflow(BUNDLE, ["train.json"], "train", {"dataset_dir": str(cohort), "num_workers": 0})
    wf.initialize()
    assert not wf.check_properties()
    inf = bundle_workflow(BUNDLE, ["inference.json"], "infer", {"dataset_dir": str(cohort)})
    inf.initialize()
    assert not inf.check_properties()


def test_train_writes_checkpoints_and_iwv(trained):
    assert (trained / "models" / "model.pt").is_file()
    traj = pd.read_csv(trained / "runs" / "iwv_trajectory.csv")
    cols = [f"softmax_{m}" for m in ("flair", "t1", "t1ce", "t2")]
    assert len(traj) == 8  # meta_interval 1, 2 iterations x 2 epochs, 2 meta steps each
    assert np.allclose(traj[cols].sum(axis=1), 1.0, atol=1e-5)  # softmax(w)
    assert traj["meta_step"].tolist() == list(range(1, 9))
    assert traj["step_in_interval"].tolist() == [0, 1] * 4


def test_evaluate_all_15_combinations(cohort, trained, tmp_path):
    table = evaluate_bundle(
        BUNDLE,
        cohort,
        tmp_path / "eval",
        checkpoint=trained / "models" / "model.pt",
        roi_size=ROI,
        hd95=False,
        split="all",
        extra_overrides={"network_def#channels": [8, 16, 32, 64]},
    )
    summary = pd.read_csv(tmp_path / "eval" / "summary.csv", index_col=0)
    assert len(summary) == 16 and summary.index[-1] == "mean"
    assert "flair+t1+t1ce+t2" in table
    per_case = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    assert len(per_case) == 6 * 15
    assert (tmp_path / "eval" / "heatmap.png").stat().st_size > 1000


def _infer(dataset_dir: Path, ckpt: Path, out: Path, combination: str, roi, channels, overlap: float = 0.5) -> None:
    overrides = {"dataset_dir": str(dataset_dir), "ckpt_path": str(ckpt), "output_dir": str(out)}
    overrides.update(combination=combination, roi_size=roi, sw_overlap=overlap, **{"network_def#channels": channels})
    run_bundle(BUNDLE, ["inference.json"], "infer", overrides)


def test_inference_writes_labels_in_dataset_convention(cohort, trained, tmp_path):
    _infer(cohort, trained / "models" / "model.pt", tmp_path / "pred", "flair+t1ce", ROI, [8, 16, 32, 64])
    preds = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(preds) == 6
    img = nib.load(str(preds[0]))
    src = nib.load(str(next((cohort / preds[0].name.replace("_seg.nii.gz", "")).glob("*_flair.nii.gz"))))
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine)
    assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_real_case_full_size_inference_and_evaluation(real_case, trained, tmp_path):
    data = tmp_path / "real"
    data.mkdir()
    (data / real_case.name).symlink_to(real_case)
    # full size (240x240x155); windows without overlap keep the test short (the overlap is a config value)
    _infer(data, trained / "models" / "model.pt", tmp_path / "pred", "t1ce+t2", [64, 64, 64], [8, 16, 32, 64], 0.0)
    pred = nib.load(str(tmp_path / "pred" / "BraTS2021_00006_seg.nii.gz"))
    assert pred.shape == (240, 240, 155)
    evaluate_bundle(
        BUNDLE,
        data,
        tmp_path / "eval",
        checkpoint=trained / "models" / "model.pt",
        combinations=["t1ce", "flair+t1+t1ce+t2"],
        roi_size=[64, 64, 64],
        hd95=False,  # HD95 is tested on small volumes; at full size it dominates the run time
        split="all",
        extra_overrides={"network_def#channels": [8, 16, 32, 64]},
    )
    per_case = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    assert len(per_case) == 2 and per_case["case_id"].eq("BraTS2021_00006").all()
