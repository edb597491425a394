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


def test_brats2015_regions_and_write_back():
    # 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing: TC = {1, 3, 4}, WT = {1, 2, 3, 4}, ET = {4}
    lab = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.uint8)
    regions = labels_to_regions(lab, "brats2015")
    assert regions.tolist() == [[0, 1, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    # TC-but-not-ET cannot tell necrosis from non-enhancing: written as 1 (the documented write value)
    assert regions_to_labels(regions, "brats2015").tolist() == [[0, 1, 2, 1, 4]]
    # label 3 is not a value of the 2018-2021 convention
    with pytest.raises(ValueError, match="values \\[3\\]"):
        labels_to_regions(lab, "brats")


def test_convention_from_values_mapping_and_string():
    from medfusion.data.labels import CONVENTIONS, convention_key, get_convention

    by_map = get_convention({"TC": [1, 3, 4], "WT": [1, 2, 3, 4], "ET": [4], "name": "my2015"})
    by_str = get_convention("TC=1,3,4;WT=1,2,3,4;ET=4")
    assert by_map.regions == by_str.regions == CONVENTIONS["brats2015"].regions
    assert by_map.name == "my2015" and by_map.write == (4, 1, 2)
    # the string key round-trips (what datalist entries carry), built-in names stay names
    assert get_convention(by_map.key)[1:] == by_map[1:]
    assert convention_key("msd") == "msd" and convention_key(CONVENTIONS["brats2015"]) == "brats2015"
    # explicit write values: TC-only voxels written as 3 instead of 1
    custom = get_convention({"TC": [1, 3, 4], "WT": [1, 2, 3, 4], "ET": [4], "write": {"ET": 4, "TC": 3, "WT": 2}})
    regions = labels_to_regions(torch.tensor([[0, 1, 2, 3, 4]]), custom)
    assert regions_to_labels(regions, custom.key).tolist() == [[0, 3, 2, 3, 4]]
    assert custom.to_dict()["write"] == {"ET": 4, "TC": 3, "WT": 2}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("brats2019", "unknown label convention 'brats2019'.*brats2015"),
        ("TC=1;WT=2;ET=1", "must nest ET <= TC <= WT"),
        ("TC=0,4;WT=1,2,4;ET=4", "positive integers"),
        ("TC=4;WT=2,4;ET=4", "TC minus ET and WT minus TC"),
        ({"TC": [1, 4], "WT": [1, 2, 4]}, "missing \\['ET'\\]"),
        ({"TC": [1, 4], "WT": [1, 2, 4], "ET": [4], "write": [4, 2, 2]}, "write value 2 is not in its region"),
        ("TC:1", "unknown label convention"),
    ],
)
def test_bad_conventions_say_what_is_wrong(spec, message):
    from medfusion.data.labels import get_convention

    with pytest.raises(ValueError, match=message):
        get_convention(spec)


def test_custom_convention_travels_per_sample():
    # a datalist entry carries the key string; the dict transforms rebuild the convention from it
    key = "TC=1,3,4;WT=1,2,3,4;ET=4"
    d = {"label": torch.tensor([[0, 3, 2]]), "label_convention": key}
    regions = ConvertLabelToRegionsd("label")(d)["label"]
    assert regions.tolist() == [[0, 1, 0], [0, 1, 1], [0, 0, 0]]
    pred = ConvertRegionsToLabeld("pred")({"pred": regions, "label_convention": [key]})["pred"]
    assert pred.tolist() == [[0, 1, 2]]


def test_datalist_conventions_for_model_metadata():
    from medfusion.data.labels import datalist_conventions

    entries = [
        {"label_convention": "brats"},
        {"label_convention": "TC=1,3,4;WT=1,2,3,4;ET=4"},
        {"label_convention": "brats"},
    ]
    out = datalist_conventions([*entries, {"case_id": "no label convention"}])
    assert list(out) == ["brats", "TC=1,3,4;WT=1,2,3,4;ET=4;write=4,1,2"]
    assert out["brats"] == {"name": "brats", "key": "brats", "TC": [1, 4], "WT": [1, 2, 4], "ET": [4],
                            "write": {"ET": 4, "TC": 1, "WT": 2}}  # fmt: skip
