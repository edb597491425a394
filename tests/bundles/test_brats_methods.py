"""bundles/brats_metakd with every ``--method_name``: train a tiny run, evaluate 15 combinations, infer.

One small harness parametrised over the methods (tiny network and volumes): the training config, the
evaluation config and the inference config are the bundle's own, only ``method_name`` changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.apps.bundle import evaluate_bundle, run_bundle, train_bundle
from medfusion.models.seg_recipes import list_seg_methods, segmenter_class

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"
ROI = [16, 16, 16]
CHANNELS = [4, 8, 16]
METHODS = [m for m in list_seg_methods() if m != "metakd"]  # metakd: tests/bundles/test_brats_metakd_bundle.py
#: one tiny epoch of the bundle's training: 3 train cases in batches of 2 = 2 iterations per epoch
TRAIN = {
    "network_def#channels": CHANNELS,
    "roi_size": ROI,
    "batch_size": 2,
    "num_workers": 0,
    "cache_rate": 0.0,
    "max_epochs": 1,
    "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.0},
}


@pytest.fixture(scope="module")
def cohort(brats_cohort) -> Path:
    return brats_cohort(5, 16, 3)


def test_every_method_is_tested():
    assert set(METHODS) | {"metakd"} == {"metakd", "mean", "hemis", "late", "qmf", "omnifuse"}


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.usefixtures("one_thread")  # tiny tensors: 2 threads on the busy 2-core machine are far slower
def test_method_trains_evaluates_and_infers(method_name, cohort, tmp_path, work_dirs):
    net = {"network_def#channels": CHANNELS, "method_name": method_name}
    wf = train_bundle(BUNDLE, {**TRAIN, **net, "dataset_dir": str(cohort), **work_dirs(tmp_path)})
    assert type(wf.parser.get_parsed_content("network")) is segmenter_class(method_name)
    last = torch.load(tmp_path / "models" / "last_checkpoint_epoch=1.pt", weights_only=False)
    assert last["trainer"]["iteration"] == 2
    method_state = last["method"]
    if method_name == "qmf":  # per-case history of the 3 training cases, present modalities only
        assert int(method_state["history"]["history_count"].sum()) > 0
        assert method_state["history"]["history"].shape == (3, 4)
    if method_name == "omnifuse":  # TLA mining at the epoch end stored a lazy combination
        assert 0 <= int(last["model"]["lazy_combination"]) < 15
        assert torch.isfinite(last["model"]["combination_distance"]).all()

    table = evaluate_bundle(
        BUNDLE,
        cohort,
        tmp_path / "eval",
        checkpoint=tmp_path / "models" / "model.pt",
        roi_size=ROI,
        hd95=False,
        split="all",
        extra_overrides=net,
    )
    assert "flair+t1+t1ce+t2" in table
    summary = pd.read_csv(tmp_path / "eval" / "summary.csv", index_col=0)
    assert len(summary) == 16 and summary.index[-1] == "mean"
    per_case = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    assert len(per_case) == 5 * 15
    assert per_case["dice_wt"].between(0, 1).all()

    inference = {"ckpt_path": str(tmp_path / "models" / "model.pt"), "output_dir": str(tmp_path / "pred")}
    inference.update(dataset_dir=str(cohort), combination="t1ce+t2", roi_size=ROI)
    run_bundle(BUNDLE, ["inference.json"], "infer", {**inference, **net})
    preds = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(preds) == 5
    assert set(np.unique(np.asarray(nib.load(str(preds[0])).dataobj)).tolist()) <= {0, 1, 2, 4}


@pytest.mark.parametrize("method_name", ["qmf", "omnifuse"])  # the methods with their own training state
@pytest.mark.usefixtures("one_thread")
def test_resume_after_an_epoch_matches_an_uninterrupted_run(method_name, cohort, tmp_path, work_dirs):
    def run(work: Path, epochs: int, resume: bool) -> None:
        ov = {**TRAIN, "method_name": method_name, "dataset_dir": str(cohort), **work_dirs(work)}
        # lr_scheduler#T_max: the schedule of the 2-epoch run in both
        train_bundle(BUNDLE, {**ov, "max_epochs": epochs, "lr_scheduler#T_max": 2, "resume": resume})

    run(tmp_path / "full", 2, False)
    run(tmp_path / "cut", 1, False)
    run(tmp_path / "cut", 2, True)
    a, b = (
        torch.load(tmp_path / w / "models" / "last_checkpoint_epoch=2.pt", weights_only=False) for w in ("full", "cut")
    )
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 4
    for k, v in a["model"].items():  # omnifuse: includes the lazy combination mined after each epoch
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=f"model weight {k}")
    if method_name == "qmf":  # the per-case loss history is method state
        for k, v in a["method"]["history"].items():
            torch.testing.assert_close(b["method"]["history"][k], v, rtol=1e-5, atol=1e-6)
        assert int(a["method"]["history"]["history_count"].sum()) > 0
    else:  # the missingness generator continues where the uninterrupted run's is
        assert torch.equal(b["method"]["generator"], a["method"]["generator"])


@pytest.mark.usefixtures("one_thread")
def test_router_runs_a_different_method_per_combination(cohort, tmp_path, work_dirs):
    """Compare two methods and route each combination to one of them (issue #14's use case)."""
    from medfusion.evaluation.compare import compare_runs

    base = {**TRAIN, "dataset_dir": str(cohort), "eval_hd95": False, "eval_split": "all"}
    for name in ("hemis", "late"):
        ov = {**base, "method_name": name, **work_dirs(tmp_path / name)}
        train_bundle(BUNDLE, ov)
        run_bundle(
            BUNDLE, ["train.json", "evaluate.json"], "train", {**ov, "eval_output_dir": str(tmp_path / name / "eval")}
        )
    compare_runs([tmp_path / "hemis" / "eval", tmp_path / "late" / "eval"], tmp_path / "cmp", n_boot=20,
                 routing_metric="dice_wt")  # fmt: skip
    table = json.loads((tmp_path / "cmp" / "routing.json").read_text())
    # after one epoch one method may win everywhere: send the single-modality combinations to the other one, so
    # the router runs both networks (each rebuilt from its evaluation record, method_name included)
    winner = table["routes"]["flair+t1+t1ce+t2"]
    other = "late" if winner == "hemis" else "hemis"
    if other not in table["runs"]:  # a run spec as compare writes it: checkpoint + the record's network keys
        record = json.loads((tmp_path / other / "eval" / "evaluation.json").read_text())
        spec = {"ckpt_path": record["ckpt_path"], "overrides": record["network"]}
        table["runs"][other] = {**table["runs"][winner], **spec}
    for combo in ("flair", "t1", "t1ce", "t2"):
        table["routes"][combo] = other
    assert {table["runs"][r]["overrides"]["method_name"] for r in ("hemis", "late")} == {"hemis", "late"}
    (tmp_path / "cmp" / "routing.json").write_text(json.dumps(table))
    routes = table["routes"]
    run_bundle(
        BUNDLE,
        ["train.json", "evaluate.json", "router_evaluate.json"],
        "train",
        {**base, "routing_file": str(tmp_path / "cmp" / "routing.json"), "eval_output_dir": str(tmp_path / "router")},
    )
    mine = pd.read_csv(tmp_path / "router" / "per_case.csv")
    for combo, name in routes.items():  # every combination decoded by the method routed to it
        theirs = pd.read_csv(tmp_path / name / "eval" / "per_case.csv")
        a = mine[mine["combination"] == combo].set_index("case_id")["dice_wt"]
        b = theirs[theirs["combination"] == combo].set_index("case_id")["dice_wt"]
        pd.testing.assert_series_equal(a, b.loc[a.index], atol=1e-5, check_names=False)
