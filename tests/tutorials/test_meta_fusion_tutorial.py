"""Executes tutorials/meta_fusion_cohort.py on tiny data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

TUTORIAL = Path(__file__).resolve().parents[2] / "tutorials" / "meta_fusion_cohort.py"


def test_meta_fusion_tutorial_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("meta_fusion_tutorial", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(tmp_path, tiny=True)
    summary = out["summary"]
    assert summary["stage"] == "ensembled" and len(summary["students"]) == 3 * 2 * 2 - 1
    assert summary["teachers"] and sum(summary["committee"].values()) >= 1
    rules = out["rules"]
    assert list(rules.index) == ["ensemble", "best_single", "average"]
    assert np.isfinite(rules.to_numpy()).all()
    assert rules.loc["ensemble", "accuracy"] > 0.6  # labs carry a strong signal
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "rules.csv").is_file()
    printed = capsys.readouterr().out
    assert "teachers" in printed and "committee" in printed and "without labs: students used" in printed
