"""Meta Fusion in bundles/clinical_fusion: train.json + meta_fusion.json trains the encoders, fits the cohort and
saves it; + evaluate.json rebuilds the network from the saved config and evaluates all 2^3 - 1 combinations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.apps.bundle import bundle_workflow, run_bundle

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"
TINY: dict[str, Any] = {
    "image_size": 32,
    "volume_size": 16,
    "max_length": 32,
    "batch_size": 8,
    "num_workers": 0,
    "encoders#report": {"name": "bert_tiny"},
    "encoders#ehr#hidden": 16,
    "device": "$torch.device('cpu')",
    "max_epochs": 1,
    "meta_fusion_kwargs": {"epochs": 3, "hidden": [16], "rho_grid": [0.0, 1.0], "batch_size": 0},
    "meta_fusion_grids": {"ehr": ["null", "identity"], "cxr": ["null", "pca:4"], "report": ["null", "pca:4"]},
}
COMBOS = {"ehr", "cxr", "report", "ehr+cxr", "ehr+report", "cxr+report", "ehr+cxr+report"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from medfusion.data.synth_clinical import write_clinical_cohort

    out = tmp_path_factory.mktemp("clinical_mf") / "cohort"
    write_clinical_cohort(out, samples=60, seed=0)
    return out


def _run(configs: list[str], overrides: dict[str, Any]) -> None:
    run_bundle(BUNDLE, configs, "train", overrides)


def _check_inference(
    configs: list[str], extra: dict[str, Any], cohort: Path, ckpt: Path, preds: pd.DataFrame, tmp_path: Path
) -> None:
    """Inference on ehr+report gives the evaluation's probabilities for that combination."""
    base = {k: v for k, v in TINY.items() if not k.startswith("meta_fusion") and k != "max_epochs"}
    ov = {**base, **extra, "dataset_dir": str(cohort), "ckpt_path": str(ckpt), "output_dir": str(tmp_path / "pred")}
    run_bundle(BUNDLE, configs, "infer", {**ov, "combination": "ehr+report"})
    out = pd.read_csv(tmp_path / "pred" / "predictions.csv").set_index("case_id")
    ref = preds[preds["combination"] == "ehr+report"].set_index("case_id")["prob_1"]
    assert len(ref) > 0 and set(ref.index) <= set(out.index)
    np.testing.assert_allclose(out.loc[ref.index, "prob_1"], ref, atol=1e-5)


def test_meta_fusion_fragment_trains_fits_saves_and_evaluates(cohort, tmp_path):
    ov = {
        **TINY,
        "dataset_dir": str(cohort),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs"),
    }
    _run(["train.json", "meta_fusion.json"], ov)
    models = tmp_path / "models"
    assert (models / "supervised_model.pt").is_file()  # stage (a): best epoch of the concat encoders
    assert not (models / "meta_fusion_stages.pt").exists()  # resume file removed once model.pt is saved
    cfg = json.loads((models / "meta_fusion_config.json").read_text())["head_kwargs"]
    assert cfg["config"]["modalities"] == ["ehr", "cxr", "report"] and len(cfg["config"]["cohort"]) == 7
    summary = json.loads((tmp_path / "runs" / "meta_fusion_summary.json").read_text())
    assert summary["stage"] == "ensembled" and len(summary["students"]) == 7
    assert summary["teachers"] and sum(summary["committee"].values()) >= 1 and summary["rho"] in (0.0, 1.0)
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert int(state["head.meta.stage"]) == 5 and int(state["head.meta.committee"].sum()) >= 1
    assert any(k.startswith("encoders.cxr.") for k in state)

    _run(
        ["train.json", "meta_fusion.json", "evaluate.json"],
        {**ov, "eval_output_dir": str(tmp_path / "eval"), "eval_n_bootstrap": 0},
    )
    table = pd.read_csv(tmp_path / "eval" / "summary.csv", index_col=0)
    assert set(table.index[:-1]) == COMBOS and table.index[-1] == "mean"
    assert np.isfinite(table[["accuracy", "auroc"]].to_numpy()).all()
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert "students_used" in preds and (preds["students_used"] >= 1).all()
    np.testing.assert_allclose(preds["prob_0"] + preds["prob_1"], 1.0, atol=1e-5)
    # an ehr-only prediction can only use the ehr-only student (the others need cxr or report)
    assert (preds.loc[preds["combination"] == "ehr", "students_used"] == 1).all()

    # inference.json + meta_fusion_inference.json: same probabilities as the evaluation of that combination
    _check_inference(["inference.json", "meta_fusion_inference.json"], {}, cohort, models / "model.pt", preds, tmp_path)


def test_fragment_passes_check_properties_and_needs_fit_before_eval(cohort, tmp_path):
    ov = {**TINY, "dataset_dir": str(cohort), "ckpt_dir": str(tmp_path / "m"), "output_dir": str(tmp_path / "r")}
    wf = bundle_workflow(BUNDLE, ["train.json", "meta_fusion.json"], "train", ov)
    wf.initialize()
    assert not wf.check_properties()
    with pytest.raises(RuntimeError) as err:  # the deployable network needs the fitted cohort's config
        wf.parser.get_parsed_content("network_def")
    assert isinstance(err.value.__cause__, FileNotFoundError) and "meta_fusion_config.json" in str(err.value.__cause__)


def test_method_name_meta_fusion_on_train_json_alone(cohort, tmp_path):
    """`--method_name meta_fusion` on train.json alone: concat encoders, then the stages; evaluate.json and
    inference.json with the same method_name rebuild the fitted head from the saved config."""
    head = {
        "epochs": 3,
        "hidden": [16],
        "rho_grid": [0.0, 1.0],
        "batch_size": 0,
        "grids": TINY["meta_fusion_grids"],
        "rule": "ensemble",
    }
    base = {k: v for k, v in TINY.items() if not k.startswith("meta_fusion")}
    ov = {
        **base,
        "method_name": "meta_fusion",
        "head_kwargs": head,
        "dataset_dir": str(cohort),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs"),
    }
    wf = bundle_workflow(BUNDLE, ["train.json"], "train", ov)
    wf.initialize()
    assert wf.parser.get_parsed_content("network").head_name == "concat"  # stage (a) trains the concat head
    wf.run()
    wf.finalize()
    models = tmp_path / "models"
    assert (models / "supervised_model.pt").is_file() and not (models / "meta_fusion_stages.pt").exists()
    cfg = json.loads((models / "meta_fusion_config.json").read_text())["head_kwargs"]
    assert len(cfg["config"]["cohort"]) == 7 and cfg["rule"] == "ensemble" and cfg["config"]["epochs"] == 3
    summary = json.loads((tmp_path / "runs" / "meta_fusion_summary.json").read_text())
    assert summary["stage"] == "ensembled" and summary["rho"] in (0.0, 1.0)
    ckpt = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert int(ckpt["model"]["head.meta.stage"]) == 5 and ckpt["record"]["model"]["head"] == "meta_fusion"

    _run(["train.json", "evaluate.json"], {**ov, "eval_output_dir": str(tmp_path / "eval"), "eval_n_bootstrap": 0})
    table = pd.read_csv(tmp_path / "eval" / "summary.csv", index_col=0)
    assert set(table.index[:-1]) == COMBOS and np.isfinite(table[["accuracy", "auroc"]].to_numpy()).all()
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert (preds.loc[preds["combination"] == "ehr", "students_used"] == 1).all()

    _check_inference(["inference.json"], {"method_name": "meta_fusion"}, cohort, models / "model.pt", preds, tmp_path)
