"""Smoke test of benchmarks/data_loading.py on tiny phantoms (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "data_loading.py"
_spec = importlib.util.spec_from_file_location("data_loading", PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["data_loading"] = bench
_spec.loader.exec_module(bench)


def test_every_dataset_class_reads_every_case_each_epoch(tmp_path):
    args = ["--cases", "3", "--size", "16", "--roi", "16", "--epochs", "2", "--real_repeats", "0"]
    assert bench.main([*args, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 0
    out = json.loads((tmp_path / "out" / "data_loading.json").read_text())
    assert [r["kind"] for r in out["rows"]] == ["Dataset", "CacheDataset", "PersistentDataset"]
    for r in out["rows"]:
        assert r["cases"] == 3 and len(r["epoch_s"]) == 2 and all(v > 0 for v in r["cases_per_s"])
    md = (tmp_path / "out" / "data_loading.md").read_text()
    assert md.count("| phantoms 16^3 |") == 3 and "epoch 2 cases/s" in md
