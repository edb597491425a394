"""Smoke tests of bundles/clinical_fusion through MONAI's ConfigWorkflow on the synthetic clinical cohort.

Every method of ``medfusion.fusion.recipes.list_methods()`` is trained for one epoch and evaluated on all
2^3 - 1 combinations by switching the ONE key ``method_name``; the manifest layout (PET, CT, report,
labs) runs for one method; inference writes per-sample probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import verify_metadata

from medfusion.apps.bundle import bundle_workflow, run_bundle
from medfusion.data.splits import random_split
from medfusion.fusion.recipes import build_method, default_head_kwargs, list_methods

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
MANIFEST: dict[str, Any] = {"data_layout": "manifest", "modalities": ["pet", "ct", "report", "labs"]}
#: per-method settings that keep a one-epoch run tiny (MetaKD's meta step, Meta Fusion's cohort fit)
METHOD_EXTRA: dict[str, dict[str, Any]] = {
    "metakd": {"method_kwargs": {"meta_interval": 1, "meta_steps": 2}},
    "meta_fusion": {"head_kwargs": {"epochs": 2, "hidden": [8], "rho_grid": [0.0, 1.0], "batch_size": 0}},
}


@pytest.fixture(scope="module")
def cohort(clinical_cohort) -> Path:
    return clinical_cohort(60, 0)


@pytest.fixture(scope="module")
def train_eval(clinical_tiny, work_dirs) -> Callable[..., pd.DataFrame]:
    """``train_eval(cohort, work, method, extra)``: one tiny epoch, then every combination of the test split."""

    def run(cohort: Path, work: Path, method: str, extra: dict[str, Any] | None = None) -> pd.DataFrame:
        ov = {**clinical_tiny, "dataset_dir": str(cohort), "method_name": method, **work_dirs(work), "max_epochs": 1}
        ov.update(extra or {})
        run_bundle(BUNDLE, ["train.json"], "train", ov)
        evaluation = {"eval_output_dir": str(work / "eval"), "eval_n_bootstrap": 0}
        run_bundle(BUNDLE, ["train.json", "evaluate.json"], "train", {**ov, **evaluation})
        return pd.read_csv(work / "eval" / "summary.csv", index_col=0)

    return run


@pytest.fixture(scope="module")
def trained_qmf(cohort, train_eval, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("qmf")
    train_eval(cohort, work, "qmf")
    return work


# ---------------------------------------------------------------- helpers (pure Python)
def test_random_split_sizes_renumbering_and_seed():
    data = [{"case_id": f"c{i}", "sample_index": 100 + i} for i in range(10)]
    parts = random_split(data, {"meta_val": 0.1, "val": 0.2, "test": 0.3}, seed=3)
    assert {k: len(v) for k, v in parts.items()} == {"meta_val": 1, "val": 2, "test": 3, "train": 4}
    for part in parts.values():
        assert [e["sample_index"] for e in part] == list(range(len(part)))
    ids = sorted(e["case_id"] for p in parts.values() for e in p)
    assert ids == sorted(e["case_id"] for e in data)  # a partition
    again = random_split(data, {"meta_val": 0.1, "val": 0.2, "test": 0.3}, seed=3)
    assert [e["case_id"] for e in again["train"]] == [e["case_id"] for e in parts["train"]]
    assert data[0]["sample_index"] == 100  # input untouched
    with pytest.raises(ValueError, match="train"):
        random_split(data, {"train": 0.5})


def test_recipe_context_routing():
    mods = ["ehr", "cxr", "report"]
    assert default_head_kwargs("qmf", 38) == {"num_samples": 38}
    assert default_head_kwargs("concat", 38, {"hidden": 8}) == {"hidden": 8}
    ctx = {"meta_loader": [1], "tla_loader": None, "output_dir": "/tmp/x", "seed": 1, "modality_dropout": "uniform"}
    metakd = build_method("metakd", mods, {"meta_interval": 5}, ctx)
    assert metakd.meta_loader == [1] and metakd.meta_interval == 5 and metakd.dropout.mode == "uniform"
    assert set(metakd.state_dict()) == {"iwv", "meta_optimizer", "dropout"}
    qmf = build_method("qmf", mods, None, ctx)
    assert qmf.dropout is not None and qmf.dropout.mode == "uniform"
    assert build_method("concat", mods, None, {**ctx, "modality_dropout": "none"}).dropout is None
    omni = build_method("omnifuse", mods, None, ctx)
    assert omni.tla_loader is None and set(omni.state_dict()) == {"generator", "online_sums", "online_counts"}
    with pytest.raises(KeyError, match="known methods"):
        build_method("nope", mods)


# ---------------------------------------------------------------- bundle
@pytest.mark.parametrize(
    ("method", "extra", "check"),
    [
        ("late_modality_ce", {}, lambda net, m: net.head_name == "late" and m.modality_loss_weight == 1.0),
        ("qmf_no_detach", {}, lambda net, m: not net.head.detach_weights and net.head.num_samples == 38),
        ("omnifuse_no_imputation", {}, lambda net, m: net.head.imputation == "off"),
        ("metakd_uniform_kd", {}, lambda net, m: m.kd_weights == "uniform" and m.handlers() == []),
        (
            "metakd_fixed_kd",
            {"method_kwargs": {"kd_weights": {"ehr": 2.0, "cxr": 1.0, "report": 1.0}}},
            lambda net, m: round(m.state.as_dict()["ehr"], 6) == 0.5,
        ),
    ],
)
def test_ablation_recipes_are_selected_by_method_name(cohort, tmp_path, method, extra, check, clinical_tiny, work_dirs):
    ov = {**clinical_tiny, **work_dirs(tmp_path), "dataset_dir": str(cohort), "method_name": method, **extra}
    wf = bundle_workflow(BUNDLE, ["train.json"], "train", ov)
    wf.initialize()
    assert check(wf.parser.get_parsed_content("network"), wf.parser.get_parsed_content("method"))


def test_metadata_validates_offline():
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA}")
    verify_metadata(meta_file=str(BUNDLE / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_check_properties(cohort, tmp_path, clinical_tiny, work_dirs):
    ov = {**clinical_tiny, **work_dirs(tmp_path), "dataset_dir": str(cohort)}  # work_dirs: keep the bundle clean
    wf = bundle_workflow(BUNDLE, ["train.json"], "train", ov)
    wf.initialize()
    assert not wf.check_properties()
    inf = bundle_workflow(
        BUNDLE,
        ["inference.json"],
        "infer",
        {**clinical_tiny, "dataset_dir": str(cohort), "ckpt_path": str(tmp_path / "none.pt")},
    )
    inf.initialize()
    assert not inf.check_properties()


@pytest.mark.parametrize("method", list_methods(include_ablations=False))
def test_every_method_trains_and_evaluates_all_7_combinations(cohort, tmp_path, method, request, train_eval):
    if method == "qmf":  # trained once, shared with the QMF/inference tests
        tmp_path = request.getfixturevalue("trained_qmf")
        summary = pd.read_csv(tmp_path / "eval" / "summary.csv", index_col=0)
    else:
        extra = METHOD_EXTRA.get(method, {})
        summary = train_eval(cohort, tmp_path, method, extra)
    assert len(summary) == 8 and summary.index[-1] == "mean"
    assert set(summary.index[:-1]) == {
        "ehr", "cxr", "report", "ehr+cxr", "ehr+report", "cxr+report", "ehr+cxr+report"
    }  # fmt: skip
    assert np.isfinite(summary[["accuracy", "auroc"]].to_numpy()).all()
    assert summary.loc["ehr", "n"] == 12 and (summary["n"] >= 5).all()  # 12 test stays; CXR/report pairable for 10
    ckpt = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    if method == "metakd":
        assert {"model", "method"} <= set(ckpt) and int(ckpt["method"]["iwv"]["meta_steps"]) == 10
        traj = pd.read_csv(tmp_path / "runs" / "iwv_trajectory.csv")
        assert traj["meta_step"].tolist() == list(range(1, 11))  # 38 train / batch 8 = 5 iterations x 2 steps
    if method == "omnifuse":
        state = ckpt.get("model", ckpt)
        assert torch.isfinite(state["head.combination_distance"]).all()  # TLA mining ran after the epoch
        assert int(state["head.lazy_combination"]) in range(7) and bool(state["head.zero_pooled_ready"])


def test_qmf_exports_weights_and_scatter(trained_qmf):
    preds = pd.read_csv(trained_qmf / "eval" / "predictions.csv")
    for m in ("ehr", "cxr", "report"):
        assert f"weights_{m}" in preds
    solo = preds[preds["combination"] == "cxr"]
    assert (solo["weights_ehr"] == 0).all() and (solo["weights_cxr"] > 0).all()  # absent modality weight 0
    table = pd.read_csv(trained_qmf / "eval" / "qmf_weight_loss.csv")
    present = preds[preds["combination"].isin(["ehr", "cxr", "report"])]  # one row per sample with that modality
    assert len(table) == len(present) == 32 and np.isfinite(table[["weight", "loss"]].to_numpy()).all()
    assert (trained_qmf / "eval" / "qmf_weight_vs_loss.png").stat().st_size > 5000
    ckpt = torch.load(trained_qmf / "models" / "model.pt", map_location="cpu", weights_only=True)
    hist_count = ckpt["model"]["head.history_count"]
    assert hist_count.shape == (38, 3) and int(hist_count.sum()) > 0  # per-sample loss history in the model


def test_inference_writes_probabilities_for_a_combination(cohort, trained_qmf, tmp_path, clinical_tiny):
    run_bundle(
        BUNDLE,
        ["inference.json"],
        "infer",
        {
            **clinical_tiny,
            "dataset_dir": str(cohort),
            "method_name": "qmf",
            "ckpt_path": str(trained_qmf / "models" / "model.pt"),
            "output_dir": str(tmp_path),
            "combination": "ehr+report",
        },
    )
    out = pd.read_csv(tmp_path / "predictions.csv")
    assert len(out) == 12 and set(out["modalities"]) == {"ehr+report", "ehr"}  # cxr dropped; 2 stays lack a report
    np.testing.assert_allclose(out["prob_0"] + out["prob_1"], 1.0, atol=1e-5)
    evaluated = pd.read_csv(trained_qmf / "eval" / "predictions.csv")
    ref = evaluated[evaluated["combination"] == "ehr+report"].set_index("case_id")["prob_1"]
    np.testing.assert_allclose(out.set_index("case_id")["prob_1"].loc[ref.index], ref, atol=1e-5)


@pytest.mark.parametrize("method", list_methods(include_ablations=False))
def test_manifest_layout_four_modalities_15_combinations(cohort, tmp_path, method, train_eval):
    extra = METHOD_EXTRA.get(method, {})
    summary = train_eval(cohort, tmp_path, method, {**MANIFEST, **extra})
    assert len(summary) == 16 and summary.index[-1] == "mean"
    assert "pet+ct+report+labs" in summary.index
    assert np.isfinite(summary["accuracy"].to_numpy()).all()
