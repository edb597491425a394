from __future__ import annotations

import pandas as pd
import pytest
import torch

from medfusion.evaluation.segmentation import (
    HD95_EMPTY,
    evaluate_segmentation,
    predict_all_combinations,
    segmentation_metrics,
)
from medfusion.modality import all_combination_masks
from medfusion.models.segmenter import Segmenter

MODS = ("flair", "t1", "t1ce", "t2")


def _maps(shape=(1, 3, 4, 4, 4)):
    return torch.zeros(shape, dtype=torch.bool), torch.zeros(shape)


def test_dice_and_et_rule_hand_computed():
    pred, label = _maps()
    # TC: pred 4 voxels, label 2 voxels, overlap 2 -> 2*2/(4+2) = 2/3
    pred[0, 0, 0, 0, :4] = True
    label[0, 0, 0, 0, :2] = 1
    # WT: identical 3 voxels -> 1
    pred[0, 1, 1, 1, :3] = True
    label[0, 1, 1, 1, :3] = 1
    # ET: pred 2 voxels, label empty -> Dice 0; with the "< 3 voxels -> empty" rule -> 1
    pred[0, 2, 2, 2, :2] = True
    m = segmentation_metrics(pred, label, et_min_voxels=3, hd95=True)
    assert m["dice_tc"] == pytest.approx(2 / 3)
    assert m["dice_wt"] == pytest.approx(1.0)
    assert m["dice_et"] == pytest.approx(0.0)
    assert m["dice_et_pp"] == pytest.approx(1.0)
    assert m["hd95_wt"] == pytest.approx(0.0)
    assert m["hd95_et"] == pytest.approx(HD95_EMPTY)  # prediction without ground truth
    # rule only empties small predictions: 2 voxels >= threshold 2 stays
    assert segmentation_metrics(pred, label, et_min_voxels=2, hd95=False)["dice_et_pp"] == pytest.approx(0.0)


def test_both_empty_is_perfect():
    pred, label = _maps()
    m = segmentation_metrics(pred, label)
    assert m["dice_tc"] == 1.0 and m["hd95_tc"] == 0.0


@pytest.fixture(scope="module")
def tiny_cases():
    g = torch.Generator().manual_seed(3)
    cases = []
    for i in range(2):
        img = torch.randn(4, 32, 16, 16, generator=g)
        lab = torch.zeros(3, 32, 16, 16)
        lab[:, 8:20, 4:12, 4:12] = 1
        lab[2, 12:16, 6:10, 6:10] = 1
        mask = torch.tensor([True, True, True, True]) if i == 0 else torch.tensor([True, False, True, True])
        cases.append({"image": img, "label": lab, "modality_mask": mask, "case_id": f"c{i}"})
    return cases


def test_cached_equals_naive(tiny_cases, tmp_path):
    net = Segmenter(MODS, channels=(4, 8, 16)).eval()
    masks = all_combination_masks(MODS)
    img = tiny_cases[0]["image"][None]
    kw = {"roi_size": (16, 16, 16), "overlap": 0.5}
    a = predict_all_combinations(net, img, masks, cached=True, batch_combinations=False, **kw)
    b = predict_all_combinations(net, img, masks, cached=False, **kw)
    assert a.shape == (15, 3, 32, 16, 16)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # batched decoding (the default)
    c = predict_all_combinations(net, img, masks, cached=True, **kw)
    torch.testing.assert_close(c, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(c.sigmoid() > 0.5, b.sigmoid() > 0.5)
    cached = evaluate_segmentation(
        net, tiny_cases, MODS, tmp_path / "c", roi_size=(16, 16, 16), hd95=False, progress=False
    )
    naive = evaluate_segmentation(
        net, tiny_cases, MODS, None, roi_size=(16, 16, 16), hd95=False, cached=False, progress=False
    )
    pd.testing.assert_frame_equal(cached, naive)
    # case 1 lacks t1: only the 7 combinations without t1 are scored for it
    assert (cached["case_id"] == "c0").sum() == 15
    assert (cached["case_id"] == "c1").sum() == 7
    assert not cached[cached["case_id"] == "c1"]["combination"].str.contains("t1\\b|t1\\+|\\+t1$").any()
    summary = (tmp_path / "c" / "summary.md").read_text()
    assert summary.count("\n| ") == 17  # header + 15 combinations + mean
    assert (tmp_path / "c" / "heatmap.png").stat().st_size > 1000


def test_no_cases_error():
    with pytest.raises(ValueError, match="no cases"):
        evaluate_segmentation(Segmenter(MODS, channels=(4, 8)), [], MODS)


def test_progress_shows_cases_combinations_and_windows(tiny_cases, capsys):
    net = Segmenter(MODS, channels=(4, 8, 16)).eval()
    evaluate_segmentation(net, tiny_cases[1:], MODS, None, roi_size=(16, 16, 16), hd95=False, progress=True)
    err = capsys.readouterr().err
    assert "evaluate" in err and "c1: 7 combinations" in err  # the case bar names the case and its combinations
    assert "3/3" in err  # the sliding-window bar of the 32x16x16 case (three 16^3 windows at overlap 0.25)
    evaluate_segmentation(net, tiny_cases[1:], MODS, None, roi_size=(16, 16, 16), hd95=False, progress=False)
    assert capsys.readouterr().err == ""
