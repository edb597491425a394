from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.evaluation.calibration import (
    TemperatureScaledClassifier,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    fit_temperatures,
    load_temperatures,
    plot_reliability,
    reliability_curve,
    save_temperatures,
)


def test_ece_hand_computed():
    # confidences 0.9, 0.8 (bin 0.8-0.9 / 0.7-0.8 ...) with 10 bins:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 1])
    # top labels 0,1,0,1 -> correct 1,0,1,1; bins: 0.9 -> [0.8,0.9], 0.8 -> [0.7,0.8], 0.6 -> [0.5,0.6], 0.55 -> same
    # ECE = 1/4 |1-0.9| + 1/4 |0-0.8| + 2/4 |1 - 0.575| = 0.025 + 0.2 + 0.2125
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4375)
    curve = reliability_curve(probs, labels)
    assert curve["count"].sum() == 4 and curve.loc[5, "count"] == 2 and curve.loc[5, "accuracy"] == 1.0
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_fit_temperature_recovers_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(4000, 3))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in true])
    over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)  # logits 3x too large
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    np.testing.assert_allclose(apply_temperature(over, 3.0), true, atol=1e-9)  # softmax(log p / T) undoes it
    assert expected_calibration_error(apply_temperature(over, t), labels) < expected_calibration_error(over, labels)


def test_fit_temperatures_per_combination_and_file(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for combo, k in (("ehr", 1.0), ("ehr+cxr", 4.0), ("cxr", 1.0)):
        z = rng.normal(scale=1.5, size=(600 if combo != "cxr" else 5, 2))
        true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        y = (rng.random(len(z)) < true[:, 1]).astype(int)
        p = np.exp(k * z) / np.exp(k * z).sum(1, keepdims=True)
        rows.append(pd.DataFrame({"combination": combo, "label": y, "prob_0": p[:, 0], "prob_1": p[:, 1]}))
    temps = fit_temperatures(pd.concat(rows))
    assert temps["ehr"] == pytest.approx(1.0, rel=0.2) and temps["ehr+cxr"] == pytest.approx(4.0, rel=0.2)
    assert temps["cxr"] == 1.0  # too few samples: kept
    path = save_temperatures(temps, tmp_path / "calibration.json", ["ehr", "cxr"])
    assert load_temperatures(path, ["ehr", "cxr"]) == pytest.approx(temps)
    with pytest.raises(ValueError, match="fitted for modalities"):
        load_temperatures(path, ["cxr", "ehr"])
    assert plot_reliability(
        {"ehr": reliability_curve(rows[0][["prob_0", "prob_1"]].to_numpy(), rows[0]["label"])}, tmp_path / "rel.png"
    ).is_file()


class _Const(torch.nn.Module):
    def forward(self, inputs, modality_mask):
        return torch.tensor([[2.0, -2.0]]).repeat(modality_mask.shape[0], 1)


def test_temperature_scaled_classifier_divides_per_combination():
    model = TemperatureScaledClassifier(_Const(), ["ehr", "cxr"], {"ehr": 2.0, "ehr+cxr": 4.0})
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    out = model({}, mask)
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 0.5, 2.0]))  # cxr alone: no temperature -> 1
    assert "temperature" in model.state_dict()
    with pytest.raises(ValueError, match="unknown combinations"):
        TemperatureScaledClassifier(_Const(), ["ehr", "cxr"], {"t1": 2.0})


def test_prediction_writer_applies_temperatures_per_combination(tmp_path):
    from types import SimpleNamespace

    from medfusion.apps.clinical_bundle import PredictionWriter

    cal = save_temperatures({"ehr": 2.0}, tmp_path / "calibration.json", ["ehr", "cxr"])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    batch = {"modality_mask": torch.tensor([[True, False], [True, True]]), "case_id": ["a", "b"]}
    engine = SimpleNamespace(state=SimpleNamespace(batch=batch, output={"pred": logits}))
    writer = PredictionWriter(tmp_path / "p.csv", ["ehr", "cxr"], calibration_file=cal)
    writer._collect(engine)
    writer._write(engine)
    out = pd.read_csv(tmp_path / "p.csv")
    assert out["prob_0"].tolist() == pytest.approx([1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-2.0))])  # T=2, T=1
