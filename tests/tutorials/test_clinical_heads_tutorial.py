"""Executes tutorials/clinical_fusion_heads.py on tiny data with three heads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

TUTORIAL = Path(__file__).resolve().parents[2] / "tutorials" / "clinical_fusion_heads.py"


def test_clinical_heads_tutorial_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("clinical_heads_tutorial", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    auroc = module.main(tmp_path, tiny=True, methods=["concat", "qmf", "omnifuse"])
    assert list(auroc.columns) == ["concat", "qmf", "omnifuse"]
    assert len(auroc) == 8 and auroc.index[-1] == "mean"  # 7 combinations + mean
    assert np.isfinite(auroc.to_numpy()).all()
    assert "best head per combination" in capsys.readouterr().out
