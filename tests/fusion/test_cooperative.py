"""Cooperative learning baseline: the objective on hand-computed values, masking, rho selection, errors."""

from __future__ import annotations

import pytest
import torch

from medfusion.fusion.cooperative import CooperativeRegressor, cooperative_loss, fit_cooperative
from medfusion.fusion.meta_fusion import MetaFusionData


def test_cooperative_loss_hand_computed():
    views = torch.tensor([[1.0, 2.0], [3.0, 1.0]])  # f_1 = (1, 2), f_2 = (3, 1)
    y = torch.tensor([5.0, 2.0])
    # fit: residuals 5-4 = 1, 2-3 = -1 -> 1/2 * mean(1, 1) = 0.5 ; agreement: (1-3)^2 = 4, (2-1)^2 = 1 -> mean 2.5
    assert cooperative_loss(views, y, 0.0).item() == pytest.approx(0.5)
    assert cooperative_loss(views, y, 1.0).item() == pytest.approx(0.5 + 0.5 * 2.5)
    assert cooperative_loss(views, y, 3.0).item() == pytest.approx(0.5 + 1.5 * 2.5)


def test_cooperative_loss_three_views_and_mask():
    views = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 4.0]])
    y = torch.tensor([4.0, 7.0])
    # all present: residuals 4-4 = 0, 7-7 = 0 ; pairs row0: (1-3)^2 + (1-0)^2 + (3-0)^2 = 14, row1: 1 + 4 + 9 = 14
    assert cooperative_loss(views, y, 2.0).item() == pytest.approx(0.0 + 1.0 * 14.0)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    # row0 sum 4 (res 0), pair (1,3) -> 4 ; row1 sum 6 (res 1), pair (2,4) -> 4 ; fit 0.25, agreement mean 4
    assert cooperative_loss(views, y, 1.0, mask).item() == pytest.approx(0.25 + 0.5 * 4.0)


def test_regressor_sums_present_views():
    torch.manual_seed(0)
    model = CooperativeRegressor(["a", "b"], {"a": 3, "b": 2}, hidden=[4])
    x = {"a": torch.randn(5, 3), "b": torch.randn(5, 2)}
    views = model.view_outputs(x)
    assert views.shape == (2, 5)
    mask = torch.tensor([[True, True], [True, False], [False, True], [True, True], [False, True]])
    expected = views[0] * mask[:, 0] + views[1] * mask[:, 1]
    assert torch.allclose(model(x, mask), expected)
    assert torch.allclose(model(x), views.sum(0))


def _data(n: int, seed: int) -> MetaFusionData:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    y = 2 * a[:, 0] - a[:, 1] + 3 * b[:, 0]
    return MetaFusionData({"a": a, "b": b}, torch.ones(n, 2, dtype=torch.bool), y)


def test_fit_cooperative_learns_additive_signal_and_picks_best_rho():
    tr, va = _data(256, 0), _data(128, 1)
    model, scores = fit_cooperative(tr, va, ["a", "b"], hidden=[16], rho_grid=(0.0, 1.0, 9.0), epochs=40, lr=1e-2)
    assert set(scores) == {0.0, 1.0, 9.0}
    assert float(model.rho) == min(scores, key=scores.get)
    var = float(va.y.var())
    assert scores[float(model.rho)] < 0.1 * var  # the additive truth is learnable
    # strong agreement forces f_a ~ f_b, which cannot fit y = g(a) + h(b) with independent a, b
    assert scores[9.0] > scores[0.0]
    with torch.no_grad():
        assert float(((model(va.x, va.mask) - va.y) ** 2).mean()) == pytest.approx(scores[float(model.rho)], rel=1e-5)


def test_fit_cooperative_errors():
    tr = _data(8, 0)
    with pytest.raises(ValueError, match="rho_grid"):
        fit_cooperative(tr, tr, ["a", "b"], rho_grid=(-1.0,))
    with pytest.raises(ValueError, match=r"train\.x: no features for modalities \['c'\]"):
        fit_cooperative(tr, tr, ["a", "c"], rho_grid=(0.0,))
    with pytest.raises(ValueError, match="modality_mask"):
        bad = MetaFusionData(tr.x, torch.ones(8, 3, dtype=torch.bool), tr.y)
        fit_cooperative(bad, tr, ["a", "b"], rho_grid=(0.0,))
