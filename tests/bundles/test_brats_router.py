"""bundles/brats_metakd: two trained segmenters, compare on validation, router evaluated on test and deployed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medfusion.apps.bundle import run_bundle, train_bundle
from medfusion.evaluation.compare import compare_runs

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"
COMMON = {
    "roi_size": [32, 32, 32],
    "batch_size": 2,
    "num_workers": 0,
    "cache_rate": 1.0,
    "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.2},
    "method#meta_interval": 1,
    "network_def#channels": [8, 16, 32, 64],
    "max_epochs": 1,
    "eval_hd95": False,
    "device": "$torch.device('cpu')",
}


def test_brats_router_evaluates_and_infers(tmp_path, brats_cohort):
    cohort = brats_cohort(6, 32, 7)
    base = {**COMMON, "dataset_dir": str(cohort)}
    for name, impute in (("mean", "mean"), ("zero", "zero")):
        ov = {**base, "network_def#impute": impute, "ckpt_dir": str(tmp_path / name / "models")}
        train_bundle(BUNDLE, {**ov, "output_dir": str(tmp_path / name / "runs")})
        for split in ("val", "test"):
            evaluation = {"eval_split": split, "eval_output_dir": str(tmp_path / name / split)}
            run_bundle(BUNDLE, ["train.json", "evaluate.json"], "train", {**ov, **evaluation})
    record = json.loads((tmp_path / "zero" / "val" / "evaluation.json").read_text())
    assert record["network"]["network_def"]["impute"] == "zero" and record["split"] == "val"

    compare_runs(
        [tmp_path / "mean" / "val", tmp_path / "zero" / "val"], tmp_path / "cmp", n_boot=50, routing_metric="dice_wt"
    )
    routing = json.loads((tmp_path / "cmp" / "routing.json").read_text())
    assert len(routing["routes"]) == 15
    assert "hd95_wt" not in set(pd.read_csv(tmp_path / "cmp" / "leaderboard.csv")["metric"])  # HD95 not computed

    # evaluated on test like any model: per combination, identical to the run routed to it
    routed = str(tmp_path / "cmp" / "routing.json")
    run_bundle(
        BUNDLE,
        ["train.json", "evaluate.json", "router_evaluate.json"],
        "train",
        {**base, "routing_file": routed, "eval_split": "test", "eval_output_dir": str(tmp_path / "router")},
    )
    mine = pd.read_csv(tmp_path / "router" / "per_case.csv")
    for combo, run in routing["routes"].items():
        theirs = pd.read_csv(tmp_path / run / "test" / "per_case.csv")
        a = mine[mine["combination"] == combo].set_index("case_id")["dice_wt"]
        b = theirs[theirs["combination"] == combo].set_index("case_id")["dice_wt"]
        pd.testing.assert_series_equal(a, b.loc[a.index], atol=1e-5, check_names=False)
    compare_runs(
        [tmp_path / "mean" / "test", tmp_path / "router"], tmp_path / "cmp_test", names=["mean", "router"], n_boot=20
    )
    assert (tmp_path / "cmp_test" / "report.md").is_file()

    # deployed: segmentations written and the model used per case recorded
    inf = {k: v for k, v in base.items() if k in ("device", "roi_size")}
    run_bundle(
        BUNDLE,
        ["inference.json", "router_inference.json"],
        "infer",
        {**inf, "dataset_dir": str(cohort), "routing_file": routed, "combination": "flair+t1ce",
         "output_dir": str(tmp_path / "pred")},
    )  # fmt: skip
    routes = pd.read_csv(tmp_path / "pred" / "routes.csv")
    assert len(routes) == 6 and set(routes["modalities"]) == {"flair+t1ce"}
    assert set(routes["model"]) == {routing["routes"]["flair+t1ce"]}
    assert len(list((tmp_path / "pred").glob("*seg*.nii.gz"))) == 6
