"""EHR encoders: MLP on hand-set weights, GRU final state / directions / causality."""

from __future__ import annotations

import pytest
import torch

from medfusion.encoders import create_encoder
from medfusion.encoders.base import FeatureInfo


def test_mlp_single_linear_layer_by_hand() -> None:
    enc = create_encoder("mlp", in_features=2, hidden=[], out_dim=1)
    lin = enc.mlp[0]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.fill_(0.5)
    out = enc(torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
    assert torch.equal(out.pooled, torch.tensor([[-0.5], [0.5]]))  # 2*1 - 3 + 0.5, 0.5
    assert out.maps == () and enc.feature_info == [] and enc.input_kind == "tabular"


def test_mlp_relu_hidden_by_hand() -> None:
    enc = create_encoder("mlp", in_features=1, hidden=[2], out_dim=1).eval()
    with torch.no_grad():
        enc.mlp[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        enc.mlp[0].bias.zero_()
        enc.mlp[3].weight.copy_(torch.tensor([[1.0, 10.0]]))
        enc.mlp[3].bias.zero_()
    # x=2: relu([2, -2]) = [2, 0] -> 2 ; x=-3: relu([-3, 3]) = [0, 3] -> 30
    assert torch.equal(enc(torch.tensor([[2.0], [-3.0]])).pooled, torch.tensor([[2.0], [30.0]]))


def test_mlp_flattens_time_series() -> None:
    enc = create_encoder("mlp", in_features=12, hidden=[8], out_dim=4).eval()
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(enc(x).pooled, enc(x.reshape(2, 12)).pooled)
    with pytest.raises(ValueError, match="expected 12"):
        enc(torch.randn(2, 5))
    with pytest.raises(ValueError, match="positive"):
        create_encoder("mlp", in_features=0)
    with pytest.raises(ValueError, match="dropout"):
        create_encoder("mlp", in_features=3, dropout=1.0)


def test_gru_pooled_is_last_state_unidirectional() -> None:
    enc = create_encoder("gru", in_features=3, hidden=4).eval()
    assert enc.out_dim == 4 and enc.feature_info == [FeatureInfo(4, 1, "sequence")] and enc.input_kind == "sequence"
    x = enc.example_input(2, 5)
    assert x.shape == (2, 5, 3)
    out = enc(x)
    assert out.maps[0].shape == (2, 5, 4)
    assert torch.equal(out.pooled, out.maps[0][:, -1])


def test_gru_bidirectional_concatenates_directions() -> None:
    enc = create_encoder("gru", in_features=3, hidden=4, num_layers=2, bidirectional=True).eval()
    out = enc(torch.randn(2, 6, 3))
    states = out.maps[0]
    assert states.shape == (2, 6, 8) and enc.out_dim == 8
    # forward direction ends at t = T-1, backward direction at t = 0
    torch.testing.assert_close(out.pooled, torch.cat([states[:, -1, :4], states[:, 0, 4:]], dim=1))
    proj = create_encoder("gru", in_features=3, hidden=4, bidirectional=True, out_dim=5)
    assert proj.out_dim == 5 and proj(torch.randn(2, 6, 3)).pooled.shape == (2, 5)
    assert proj.feature_info == [FeatureInfo(8, 1, "sequence")]


def test_gru_is_causal_and_checks_input() -> None:
    enc = create_encoder("gru", in_features=2, hidden=3).eval()
    x = torch.randn(1, 6, 2)
    x2 = x.clone()
    x2[:, 4:] = 5.0
    a, b = enc(x).maps[0], enc(x2).maps[0]
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:], b[:, 4:])
    with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
        enc(torch.randn(1, 6, 3))
    with pytest.raises(ValueError, match=r"\[B, T, 2\]"):
        enc(torch.randn(1, 2))


# ------------------------------------------------------------------------------- tabular (sparse, raw units)
def test_tabular_preprocessing_median_indicators_standardisation_by_hand() -> None:
    from medfusion.encoders.tabular import TabularPreprocessing

    nan = float("nan")
    train = [[1.0, 10.0, nan], [3.0, nan, nan], [5.0, 30.0, nan], [nan, 20.0, nan]]
    pre = TabularPreprocessing(3, "median").fit(train)
    # feature 0: median of 1,3,5 = 3 -> imputed column 1,3,5,3: mean 3, std sqrt(2); feature 1: median 20 ->
    # 10,20,30,20: mean 20, std sqrt(50); feature 2 never measured: fill 0, centre 0, scale 1
    torch.testing.assert_close(pre.fill, torch.tensor([3.0, 20.0, 0.0]))
    torch.testing.assert_close(pre.center, torch.tensor([3.0, 20.0, 0.0]))
    torch.testing.assert_close(pre.scale, torch.tensor([2.0**0.5, 50.0**0.5, 1.0]))
    out = pre(torch.tensor([[5.0, nan, 7.0], [nan, 30.0, nan]]))
    expected = torch.tensor(
        [[2 / 2**0.5, 0.0, 7.0, 0.0, 1.0, 0.0], [0.0, 10 / 50**0.5, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float32
    )
    torch.testing.assert_close(out, expected)
    mean = TabularPreprocessing(1, "mean").fit([[1.0], [2.0], [6.0], [nan]])
    assert float(mean.fill) == 3.0  # mean of 1, 2, 6
    assert TabularPreprocessing(2, indicators=False).out_features == 2
    with pytest.raises(ValueError, match="expected rows"):
        pre.fit([[1.0, 2.0]])
    with pytest.raises(ValueError, match="strategy"):
        TabularPreprocessing(2, "mode")


def test_tabular_encoder_state_travels_and_mlp_refuses_nan() -> None:
    from medfusion.encoders.tabular import fit_tabular_preprocessing
    from medfusion.models.classifier import Classifier

    model = Classifier({"labs": {"name": "tabular", "in_features": 2, "hidden": [4], "out_dim": 3}}, "concat", 2)
    rows = [{"case_id": "a", "labs": [1.0, float("nan")]}, {"case_id": "b", "labs": [3.0, 4.0]}, {"labs": None}]
    fit_tabular_preprocessing(model, rows)
    pre = model.encoders["labs"].preprocess
    assert bool(pre.fitted) and pre.fill.tolist() == [2.0, 4.0]
    state = model.state_dict()
    assert {"encoders.labs.preprocess.fill", "encoders.labs.preprocess.center"} <= set(state)
    clone = Classifier({"labs": {"name": "tabular", "in_features": 2, "hidden": [4], "out_dim": 3}}, "concat", 2)
    clone.load_state_dict(state)
    x = torch.tensor([[float("nan"), 5.0]])
    torch.testing.assert_close(clone.encoders["labs"](x).pooled, model.encoders["labs"](x).pooled)
    assert torch.isfinite(clone.encoders["labs"](x).pooled).all()
    with pytest.raises(ValueError, match="different number"):
        fit_tabular_preprocessing(model, [{"case_id": "z", "labs": [1.0, 2.0, 3.0]}])
    with pytest.raises(ValueError, match="'tabular' encoder"):
        create_encoder("mlp", in_features=2)(torch.tensor([[1.0, float("nan")]]))
