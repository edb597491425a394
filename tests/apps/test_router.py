from __future__ import annotations

import pytest
import torch
from torch import nn

from medfusion.apps.router import RoutedModel
from medfusion.modality import all_combination_masks, combination_name, combinations
from medfusion.models.segmenter import Segmenter

MODS = ("ehr", "cxr")


class _Const(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, inputs, modality_mask):
        return torch.full((inputs["ehr"].shape[0], 2), self.value) + inputs["ehr"][:, :1]


def test_routes_each_sample_to_its_combination_model():
    router = RoutedModel({"a": _Const(1.0), "b": _Const(2.0)}, {"ehr": "a", "cxr": "b", "ehr+cxr": "a"}, MODS)
    mask = torch.tensor([[True, False], [False, True], [True, True], [False, True]])
    inputs = {"ehr": torch.arange(4.0).reshape(4, 1), "cxr": torch.zeros(4, 3)}
    out = router(inputs, mask)
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 3.0, 3.0, 5.0]))  # value + own row's input
    assert router.route(mask) == ["a", "b", "a", "b"]
    assert router.forward_outputs(inputs, mask).aux["route"].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="no modality present"):
        router.route(torch.tensor([[False, False]]))


def test_router_refuses_incomplete_or_unknown_routes():
    with pytest.raises(ValueError, match=r"no route for combination\(s\) \['ehr\+cxr'\]"):
        RoutedModel({"a": _Const(1.0)}, {"ehr": "a", "cxr": "a"}, MODS)
    with pytest.raises(ValueError, match=r"run\(s\) \['z'\] without a model"):
        RoutedModel({"a": _Const(1.0)}, {"ehr": "a", "cxr": "z", "ehr+cxr": "a"}, MODS)
    with pytest.raises(ValueError, match="unknown combinations"):
        RoutedModel({"a": _Const(1.0)}, {"t1": "a", "ehr": "a", "cxr": "a", "ehr+cxr": "a"}, MODS)


def test_segmentation_router_matches_routed_models():
    mods = ("flair", "t1", "t1ce")
    torch.manual_seed(0)
    nets = {
        k: Segmenter(mods, channels=(4, 8, 8, 8), impute=imp).eval() for k, imp in (("mean", "mean"), ("zero", "zero"))
    }
    names = [combination_name(c) for c in combinations(mods)]
    routes = {n: ("mean" if "t1ce" in n else "zero") for n in names}
    router = RoutedModel(nets, routes, mods).eval()
    image = torch.randn(1, 3, 16, 16, 16)
    masks = all_combination_masks(mods)
    with torch.no_grad():
        out = router.predict_combinations(image, masks)
        for c, name in enumerate(names):
            ref = nets[routes[name]].predict_combinations(image, masks[c : c + 1])
            torch.testing.assert_close(out[:, 3 * c : 3 * (c + 1)], ref)
            # the naive path (forward with the combination's mask) agrees with the cached one
            torch.testing.assert_close(router(image, masks[c : c + 1]), ref, atol=1e-5, rtol=1e-4)
