"""Executes tutorials/brats_missing_modalities.py on tiny data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

TUTORIAL = Path(__file__).resolve().parents[2] / "tutorials" / "brats_missing_modalities.py"


def test_brats_tutorial_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("brats_tutorial", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(tmp_path, tiny=True)
    for name in ("shared", "per_modality"):
        summary = out[name]
        assert len(summary) == 16 and summary.index[-1] == "mean"
        assert np.isfinite(summary[["dice_tc", "dice_wt", "dice_et"]].to_numpy()).all()
        assert (tmp_path / name / "eval" / "heatmap.png").is_file()
    printed = capsys.readouterr().out
    assert "best combination by mean Dice" in printed and "per_modality" in printed
