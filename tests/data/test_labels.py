from __future__ import annotations

import pytest
import torch

from medfusion.data.labels import (
    ConvertLabelToRegionsd,
    ConvertRegionsToLabeld,
    labels_to_regions,
    regions_to_labels,
)

# one voxel per label value, hand-written regions [TC, WT, ET] per convention
CASES = {
    "brats": ([0, 1, 2, 4], [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
    "brats2023": ([0, 1, 2, 3], [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
    "msd": ([0, 1, 2, 3], [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("conv", sorted(CASES))
def test_round_trip(conv):
    values, regions = CASES[conv]
    lab = torch.tensor(values, dtype=torch.uint8)[None]
    out = labels_to_regions(lab, conv)
    assert out.tolist() == [[float(x) for x in r] for r in regions]
    back = regions_to_labels(out, conv)
    assert back.tolist() == [values]


def test_region_precedence_et_over_tc_over_wt():
    # ET predicted outside TC and WT still becomes ET; TC outside WT becomes necrosis
    regions = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float32)
    assert regions_to_labels(regions, "brats").tolist() == [[4, 1, 2]]
    assert regions_to_labels(regions, "msd").tolist() == [[3, 2, 1]]


def test_unexpected_values_name_case():
    t = ConvertLabelToRegionsd("label")
    with pytest.raises(ValueError, match="case X.*values \\[3\\].*'brats' expects \\[0, 1, 2, 4\\]"):
        t({"label": torch.tensor([[0, 1, 3]]), "label_convention": "brats", "case_id": "X"})
    with pytest.raises(ValueError, match="unknown label convention"):
        ConvertLabelToRegionsd("label", convention="brats2019")


def test_per_sample_convention_in_dict_transforms():
    d = {"label": torch.tensor([[0, 2, 3]]), "label_convention": "msd"}
    regions = ConvertLabelToRegionsd("label")(d)["label"]
    assert regions.tolist() == [[0, 1, 1], [0, 1, 1], [0, 0, 1]]
    pred = ConvertRegionsToLabeld("pred")({"pred": regions, "label_convention": ["msd"]})["pred"]
    assert pred.tolist() == [[0, 2, 3]]
