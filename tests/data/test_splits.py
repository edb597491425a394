"""medfusion.data.splits: patient-level stratified splits, split columns, leakage detection."""

from __future__ import annotations

import numpy as np
import pytest

from medfusion.data.splits import group_split, groups_in_several_parts, random_split, split_by_column

FRACTIONS = {"meta_val": 0.1, "val": 0.1, "test": 0.2}


def _cohort(n_patients: int = 80, seed: int = 0) -> list[dict]:
    """1-5 rows per patient, ~20% of patients positive (label per patient)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        y = float(rng.random() < 0.2)
        for k in range(int(rng.integers(1, 6))):
            rows.append({"case_id": f"p{p}_img{k}", "group": f"p{p}", "label": y, "sample_index": 99})
    return rows


def test_group_split_keeps_patients_together_and_stratifies():
    data = _cohort()
    parts = group_split(data, FRACTIONS, seed=1)
    assert set(parts) == {"meta_val", "val", "test", "train"}
    assert groups_in_several_parts(parts) == {}  # no patient in two parts
    assert sorted(e["case_id"] for p in parts.values() for e in p) == sorted(e["case_id"] for e in data)
    n = len(data)
    for name, frac in FRACTIONS.items():
        assert abs(len(parts[name]) - frac * n) <= 6, (name, len(parts[name]))  # up to one large patient off
    overall = np.mean([e["label"] for e in data])
    for name in ("train", "test"):
        rate = np.mean([e["label"] for e in parts[name]])
        assert abs(rate - overall) < 0.08, (name, rate, overall)  # stratified by label
    for part in parts.values():
        assert [e["sample_index"] for e in part] == list(range(len(part)))
    again = group_split(data, FRACTIONS, seed=1)
    assert [e["case_id"] for e in again["test"]] == [e["case_id"] for e in parts["test"]]
    assert [e["case_id"] for e in group_split(data, FRACTIONS, seed=2)["test"]] != [e["case_id"] for e in parts["test"]]


def test_group_split_without_groups_is_a_stratified_row_split():
    data = [{"case_id": f"r{i}", "label": float(i % 5 == 0)} for i in range(100)]  # 20 % positive
    parts = group_split(data, {"val": 0.2, "test": 0.2}, seed=0)
    assert [len(parts[k]) for k in ("val", "test", "train")] == [20, 20, 60]
    assert [sum(e["label"] for e in parts[k]) for k in ("val", "test", "train")] == [4, 4, 12]
    tiny = group_split(data[:5], {"val": 0.1, "test": 0.1}, seed=0)
    assert all(len(tiny[k]) >= 1 for k in ("val", "test", "train"))  # every part gets a group
    with pytest.raises(ValueError, match="cannot fill"):
        group_split(data[:2], {"val": 0.1, "test": 0.1})
    with pytest.raises(ValueError, match="remainder"):
        group_split(data, {"train": 0.5})


def test_a_random_row_split_leaks_patients():
    """What the issue measured: a per-row split puts images of one patient in train and test."""
    data = _cohort()
    leaked = groups_in_several_parts(random_split(data, FRACTIONS, seed=0))
    assert len(leaked) > 10


def test_split_by_column():
    data = [
        {"case_id": "a", "split": "train", "group": "p1"},
        {"case_id": "b", "split": "Validation", "group": "p1"},
        {"case_id": "c", "split": "test", "group": "p2"},
        {"case_id": "d", "split": "TRAIN", "group": "p3"},
    ]
    parts = split_by_column(data)
    assert {k: [e["case_id"] for e in v] for k, v in parts.items()} == {
        "train": ["a", "d"],
        "meta_val": [],
        "val": ["b"],
        "test": ["c"],
    }
    assert groups_in_several_parts(parts) == {"p1": ["train", "val"]}
    with pytest.raises(ValueError, match=r"unknown split value\(s\) in row\(s\) 'x' \('holdout'\)"):
        split_by_column([*data, {"case_id": "x", "split": "holdout"}])
    with pytest.raises(ValueError, match=r"no row is in split\(s\) \['test'\]"):
        split_by_column(data[:2])


def test_small_cohort_every_part_gets_both_classes():
    """5 positive patients among 25: validation and test must still hold positives (else AUROC is undefined)."""
    data = []
    for p in range(25):
        for k in range(1 + p % 3):
            data.append({"case_id": f"p{p}_{k}", "group": f"p{p}", "label": float(p % 5 == 0)})
    parts = group_split(data, FRACTIONS, seed=0)
    for name in ("meta_val", "val", "test", "train"):
        assert {e["label"] for e in parts[name]} == {0.0, 1.0}, name
    assert groups_in_several_parts(parts) == {}
