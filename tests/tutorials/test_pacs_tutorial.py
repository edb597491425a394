"""Executes tutorials/pacs_pipeline.py on the downsampled real case against a local Orthanc."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from medfusion.apps.dicom.orthanc import orthanc_available

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "tutorials" / "pacs_pipeline.py"
REAL_CASE = ROOT.parent / "shared" / "data" / "real" / "BraTS2021_00006"


@pytest.mark.timeout(600)
def test_pacs_tutorial_runs(tmp_path, capsys):
    missing = orthanc_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PACS tutorial: {missing}")
        pytest.skip(missing)
    if not REAL_CASE.is_dir():
        pytest.skip(f"real BraTS case not found at {REAL_CASE}")
    spec = importlib.util.spec_from_file_location("pacs_tutorial", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(tmp_path, tiny=True)
    assert out["full"]["combination"] == "flair+t1+t1ce+t2"
    assert out["partial"]["combination"] == "flair+t1ce" and out["partial"]["missing_modalities"] == ["t1", "t2"]
    assert out["rerun_reused"] is True
    printed = capsys.readouterr().out
    assert "re-run reused: True; SEG series in the study: 1" in printed
    assert "'3 PLANE LOC'" in printed and "one study, query to SEG stored" in printed
