"""Executes tutorials/compare_and_route.py on tiny data: three heads, compare, router evaluated and deployed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

TUTORIAL = Path(__file__).resolve().parents[2] / "tutorials" / "compare_and_route.py"


def test_compare_and_route_tutorial_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_and_route_tutorial", TUTORIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    boards = module.main(tmp_path, tiny=True, n_boot=50)
    out = capsys.readouterr().out
    assert "# Comparison of 4 classification runs" in out and "before/after temperature scaling" in out

    test = boards["test"]
    assert set(test["run"]) == {"concat", "late", "qmf", "router"}
    routing = json.loads((tmp_path / "compare_val" / "routing.json").read_text())
    assert routing["split"] == "val" and len(routing["routes"]) == 7

    # the router's test predictions equal, combination by combination, those of the run routed to it
    router = pd.read_csv(tmp_path / "router" / "test" / "predictions.csv")
    record = json.loads((tmp_path / "router" / "test" / "evaluation.json").read_text())
    assert record["method"] == "router" and record["routes"] == routing["routes"]
    for combo, run in routing["routes"].items():
        mine = router[router["combination"] == combo].sort_values("sample_index")
        theirs = pd.read_csv(tmp_path / run / "test" / "predictions.csv")
        theirs = theirs[theirs["combination"] == combo].sort_values("sample_index")
        assert (mine["prob_1"].to_numpy() - theirs["prob_1"].to_numpy()).__abs__().max() < 1e-5, combo
        assert {record["router_runs"][int(i)] for i in mine["route"]} == {run}

    # deployment: every test sample got a prediction and the model that made it is named
    routes = pd.read_csv(tmp_path / "router" / "predictions" / "routes.csv")
    preds = pd.read_csv(tmp_path / "router" / "predictions" / "predictions.csv")
    assert len(routes) == len(preds) > 0
    assert (routes["model"] == routes["modalities"].map(routing["routes"])).all()

    # calibration: temperatures fitted on validation, applied on test
    cal = json.loads((tmp_path / "qmf" / "models" / "calibration.json").read_text())
    assert set(cal["temperatures"]) <= set(routing["routes"])
    calibrated = json.loads((tmp_path / "qmf" / "test_calibrated" / "evaluation.json").read_text())
    assert calibrated["temperature_scaled"] is True
