"""Foreground crop of the sliding-window inference: same prediction inside the box, background outside, full size."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from torch import nn

from medfusion.evaluation.report import read_record
from medfusion.evaluation.segmentation import (
    BACKGROUND_LOGIT,
    ForegroundCropInferer,
    evaluate_segmentation,
    foreground_box,
    predict_all_combinations,
    segmentation_metrics,
)
from medfusion.modality import all_combination_masks
from medfusion.models.segmenter import Segmenter

MODS = ("flair", "t1", "t1ce", "t2")
BOX = (slice(5, 30), slice(8, 28), slice(4, 20))
SPATIAL = (40, 36, 32)


def brain_case(seed: int = 0) -> torch.Tensor:
    """``[1, 4, 40, 36, 32]``: random inside ``BOX``, 0 outside (a normalised, skull-stripped volume)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 4, *SPATIAL)
    img[(slice(None), slice(None), *BOX)] = torch.randn(1, 4, 25, 20, 16, generator=g)
    return img


class Pointwise(nn.Module):
    """Voxel-wise network (1x1x1 conv of the masked channels): its output cannot depend on window placement."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        return self.conv(x * modality_mask.to(x.dtype).view(-1, 4, 1, 1, 1))


def test_foreground_box():
    img = brain_case()[0]
    assert foreground_box(img) == BOX
    assert foreground_box(img, margin=6) == (slice(0, 36), slice(2, 34), slice(0, 26))  # clipped at the edges
    assert foreground_box(torch.zeros(2, 8, 8, 8)) is None  # nothing non-zero: no crop
    assert foreground_box(torch.randn(2, 8, 8, 8)) is None  # no zero background: no crop
    neg = torch.zeros(1, 8, 8, 8)
    neg[0, 2, 3, 4] = -1.5  # z-scored values are negative too
    assert foreground_box(neg) == (slice(2, 3), slice(3, 4), slice(4, 5))


def test_crop_is_the_uncropped_prediction_inside_the_box_for_a_voxelwise_network():
    img, masks = brain_case(), all_combination_masks(MODS)
    kw = {"roi_size": (16, 16, 16), "overlap": 0.25, "cached": False}
    full = predict_all_combinations(Pointwise(), img, masks, crop_foreground=False, **kw)
    crop = predict_all_combinations(Pointwise(), img, masks, crop_foreground=True, **kw)
    assert crop.shape == full.shape == (15, 3, *SPATIAL)
    inside = (slice(None), slice(None), *BOX)
    torch.testing.assert_close(crop[inside], full[inside], rtol=1e-5, atol=1e-6)
    outside = torch.ones(SPATIAL, dtype=torch.bool)
    outside[BOX] = False
    assert bool((crop[:, :, outside] == BACKGROUND_LOGIT).all())
    assert not bool((crop[:, :, outside].sigmoid() > 0.5).any())  # background: no region
    assert not torch.equal(crop[:, :, outside], full[:, :, outside])  # the crop did change the outside


def test_crop_runs_the_windows_over_the_box_only():
    net = Segmenter(MODS, channels=(4, 8, 16)).eval()
    img, masks = brain_case(1), all_combination_masks(MODS)
    kw = {"roi_size": (16, 16, 16), "overlap": 0.25}
    crop = predict_all_combinations(net, img, masks, **kw)  # cropping is the default
    on_box = predict_all_combinations(net, img[(slice(None), slice(None), *BOX)], masks, crop_foreground=False, **kw)
    assert crop.shape == (15, 3, *SPATIAL)
    assert torch.equal(crop[(slice(None), slice(None), *BOX)], on_box)
    assert int((crop != BACKGROUND_LOGIT).sum()) == on_box.numel()


@pytest.mark.parametrize("label_outside_box", [False, True])
def test_evaluation_with_crop_scores_the_pasted_full_size_prediction(label_outside_box, tmp_path):
    net = Segmenter(MODS, channels=(4, 8, 16)).eval()
    img = brain_case(2)
    label = torch.zeros(3, *SPATIAL)
    label[:, 10:20, 12:22, 6:14] = 1
    label[2, 12:15, 14:18, 8:12] = 0
    if label_outside_box:  # ground truth outside the brain box: the full volume is scored
        label[1, 35:38, 2:4, 25:30] = 1
    case = {"image": img[0], "label": label, "modality_mask": torch.ones(4, dtype=torch.bool), "case_id": "c0"}
    kw = {"roi_size": (16, 16, 16), "overlap": 0.25}
    table = evaluate_segmentation(net, [case], MODS, None, hd95=True, progress=False, et_min_voxels=10, **kw)
    logits = predict_all_combinations(net, img, all_combination_masks(MODS), **kw)
    for k, row in table.iterrows():
        ref = segmentation_metrics(logits[k : k + 1].sigmoid() > 0.5, label[None], et_min_voxels=10, hd95=True)
        for name, value in ref.items():
            assert row[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (row["combination"], name)
    off = evaluate_segmentation(net, [case], MODS, tmp_path, hd95=False, progress=False, crop_foreground=False, **kw)
    assert len(off) == 15 and off["dice_wt"].notna().all()  # the option switches the crop off
    assert read_record(tmp_path)["crop_foreground"] is False  # the evaluation says how it was run


def test_inferer_keeps_full_shape_and_metadata():
    affine = torch.diag(torch.tensor([2.0, 1.5, 1.0, 1.0]))
    affine[:3, 3] = torch.tensor([-10.0, 4.0, 7.0])
    img = MetaTensor(brain_case(3), affine=affine)
    mask = torch.ones(1, 4, dtype=torch.bool)
    inner = SlidingWindowInferer((16, 16, 16), overlap=0.25, mode="gaussian")
    with torch.no_grad():  # as in an evaluator
        out = ForegroundCropInferer(inner)(img, Pointwise(), modality_mask=mask)
        ref = inner(img.as_tensor()[(slice(None), slice(None), *BOX)], Pointwise(), modality_mask=mask)
        plain = ForegroundCropInferer(inner, enabled=False)(img, Pointwise(), modality_mask=mask)
    assert isinstance(out, MetaTensor) and out.shape == (1, 3, *SPATIAL)
    assert ForegroundCropInferer(inner).roi_size == (16, 16, 16)  # callers read the window settings through it
    torch.testing.assert_close(out.affine, img.affine)
    ref = ref.as_tensor() if isinstance(ref, MetaTensor) else ref
    assert torch.equal(out.as_tensor()[(slice(None), slice(None), *BOX)], ref)
    assert float(out.as_tensor()[0, :, 0, 0, 0].max()) == BACKGROUND_LOGIT
    assert plain.shape == out.shape and float(plain.as_tensor()[0, :, 0, 0, 0].abs().max()) < 10
