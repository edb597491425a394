"""All-combination regression evaluation: hand-computed metrics, sample selection per combination, files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.evaluation.regression import evaluate_regression, regression_metrics
from medfusion.fusion.meta_fusion import MetaFusionData


def test_regression_metrics_hand_computed():
    # errors (1, -1, 2, 0): MSE = 6/4 = 1.5, MAE = 4/4 = 1; y mean 2.5, SS_tot = 2.25+0.25+0.25+2.25 = 5
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 5.0, 4.0]))
    assert m["mse"] == pytest.approx(1.5)
    assert m["rmse"] == pytest.approx(math.sqrt(1.5))
    assert m["mae"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1 - 6 / 5)
    assert math.isnan(regression_metrics(np.ones(3), np.zeros(3))["r2"])  # constant targets
    assert all(math.isnan(v) for v in regression_metrics(np.zeros(0), np.zeros(0)).values())
    with pytest.raises(ValueError, match="3 targets but 2"):
        regression_metrics(np.zeros(3), np.zeros(2))


def _data() -> MetaFusionData:
    # rows: 0 a+b, 1 a only, 2 b only, 3 a+b
    x = {"a": torch.tensor([[1.0], [2.0], [0.0], [4.0]]), "b": torch.tensor([[10.0], [0.0], [30.0], [40.0]])}
    mask = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    return MetaFusionData(x, mask, torch.tensor([11.0, 3.0, 30.0, 40.0]))


def _sum_model(calls: list):
    def model(x, mask):  # sum of the PRESENT features; records what it was given
        calls.append((mask.clone(), {k: v.clone() for k, v in x.items()}))
        return (x["a"][:, 0] * mask[:, 0] + x["b"][:, 0] * mask[:, 1])[:, None]  # [N, 1] is accepted

    return model


def test_each_combination_uses_the_samples_that_have_it_with_the_mask_restricted(tmp_path):
    calls: list = []
    out = evaluate_regression(_sum_model(calls), _data(), ["a", "b"], tmp_path, case_ids=["c0", "c1", "c2", "c3"])
    assert list(out.index) == ["a", "b", "a+b", "mean"]
    # a: rows 0, 1, 3 -> preds 1, 2, 4 vs y 11, 3, 40 -> errors -10, -1, -36
    assert out.loc["a", "n"] == 3
    assert out.loc["a", "mse"] == pytest.approx((100 + 1 + 1296) / 3)
    assert out.loc["a", "mae"] == pytest.approx(47 / 3)
    # b: rows 0, 2, 3 -> preds 10, 30, 40 vs 11, 30, 40 -> errors -1, 0, 0
    assert out.loc["b", "mse"] == pytest.approx(1 / 3)
    y = np.array([11.0, 30.0, 40.0])
    assert out.loc["b", "r2"] == pytest.approx(1 - 1 / float(((y - y.mean()) ** 2).sum()))
    # a+b: rows 0, 3 -> preds 11, 44 vs 11, 40 -> MSE 8
    assert out.loc["a+b", "n"] == 2 and out.loc["a+b", "mse"] == pytest.approx(8.0)
    assert out.loc["mean", "mse"] == pytest.approx(((1397 / 3) + 1 / 3 + 8) / 3)
    assert out.loc["mean", "n"] == 2
    # the model saw only the combination: mask restricted, other modality zero-filled
    mask_a, x_a = calls[0]
    assert mask_a.tolist() == [[True, False]] * 3 and x_a["b"].abs().sum() == 0
    assert calls[2][0].tolist() == [[True, True]] * 2
    # files
    saved = pd.read_csv(tmp_path / "metrics.csv", index_col=0)
    np.testing.assert_allclose(saved["mse"].to_numpy(), out["mse"].to_numpy())
    preds = pd.read_csv(tmp_path / "predictions.csv")
    assert list(preds.columns) == ["case_id", "combination", "y", "prediction"]
    assert preds[preds["combination"] == "a"]["case_id"].tolist() == ["c0", "c1", "c3"]
    assert preds[preds["combination"] == "a+b"]["prediction"].tolist() == [11.0, 44.0]
    assert (tmp_path / "mse.png").stat().st_size > 1000


def test_selected_combinations_module_eval_mode_and_bad_input():
    class Net(torch.nn.Module):
        def forward(self, x, mask):
            assert not self.training
            return x["a"][:, 0] * 2  # [N]

    net = Net().train()
    out = evaluate_regression(net, _data(), ["a", "b"], combinations_to_run=["a"])
    assert list(out.index) == ["a", "mean"] and out.loc["a", "mse"] == pytest.approx((81 + 1 + 1024) / 3)
    assert net.training  # mode restored
    with pytest.raises(ValueError, match="case_ids"):
        evaluate_regression(net, _data(), ["a", "b"], case_ids=["x"])
    with pytest.raises(ValueError, match="returned shape"):
        evaluate_regression(lambda x, m: torch.zeros(len(m), 2), _data(), ["a", "b"])
    with pytest.raises(ValueError, match="mask shape"):
        evaluate_regression(net, _data(), ["a", "b", "c"])
