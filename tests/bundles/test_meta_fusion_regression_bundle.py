"""bundles/clinical_fusion/configs/meta_fusion_regression.json: Meta Fusion regression on a latent factor table.

``run`` fits + saves + evaluates the test split on every modality combination; the ``evaluate`` expression
list (``--run_id evaluate``) rebuilds the model from the saved files and reproduces the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from medfusion.apps.bundle import bundle_workflow

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"
CONFIG = "meta_fusion_regression.json"
FAST: dict[str, Any] = {"epochs": 60, "hidden": [32], "lr": 0.01, "batch_size": 0, "rho_grid": [0.0, 1.0], "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def table(latent_table: Path) -> Path:
    return latent_table


def _run(overrides: dict[str, Any]) -> None:
    wf = bundle_workflow(BUNDLE, [CONFIG], "train", overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def test_bundle_fits_saves_evaluates_and_evaluate_only_reproduces(table, tmp_path):
    ov = {
        "table": str(table),
        "ckpt_dir": str(tmp_path / "models"),
        "output_dir": str(tmp_path / "runs"),
        "meta_fusion_kwargs": FAST,
    }
    _run(ov)
    models, runs = tmp_path / "models", tmp_path / "runs"
    cfg = json.loads((models / "meta_fusion_config.json").read_text())["head_kwargs"]["config"]
    assert cfg["task"] == "regression" and cfg["modalities"] == ["m1", "m2"]
    assert cfg["in_dims"] == {"m1": 8, "m2": 6} and cfg["epochs"] == 60
    assert len(cfg["cohort"]) == 8  # 3 x 3 default grids minus the all-null student
    assert (models / "model.pt").is_file() and (models / "tabular_meta_fusion.json").is_file()
    assert json.loads((runs / "meta_fusion_summary.json").read_text())["stage"] == "ensembled"
    metrics = pd.read_csv(runs / "metrics.csv", index_col=0)
    assert list(metrics.index) == ["m1", "m2", "m1+m2", "mean"]
    test = pd.read_csv(table).query("split == 'test'")
    assert metrics.loc["m1+m2", "mse"] < 0.6 * float(test["y"].var())  # fusion beats predicting the mean
    assert metrics.loc["m1+m2", "r2"] > 0.4
    assert (runs / "mse.png").is_file() and (runs / "predictions.csv").is_file()

    _run({**ov, "output_dir": str(tmp_path / "eval"), "run_id": "evaluate"})  # = --run_id evaluate
    again = pd.read_csv(tmp_path / "eval" / "metrics.csv", index_col=0)
    pd.testing.assert_frame_equal(again, metrics)
    assert not (tmp_path / "eval" / "meta_fusion_summary.json").exists()  # nothing was fitted


def test_columns_by_prefix_and_a_missing_column_names_it(table, tmp_path):
    ov = {
        "table": str(table),
        "ckpt_dir": str(tmp_path / "m"),
        "output_dir": str(tmp_path / "r"),
        "target": "y",
        "modality_prefixes": {"labs": "m1_", "vitals": "m2_"},
        "meta_fusion_grids": {"labs": ["null", "identity"], "vitals": ["null", "identity"]},
        "meta_fusion_kwargs": {**FAST, "epochs": 5},
        "eval_combinations": ["labs+vitals"],
    }
    _run(ov)
    metrics = pd.read_csv(tmp_path / "r" / "metrics.csv", index_col=0)
    assert list(metrics.index) == ["labs+vitals", "mean"]
    with pytest.raises(RuntimeError) as err:
        _run({**ov, "target": "outcome"})
    cause = err.value.__cause__
    assert isinstance(cause, KeyError) and "'outcome'" in str(cause) and str(table) in str(cause)
