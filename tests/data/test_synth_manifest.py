"""medfusion.data.synth_manifest: the real-shaped manifest cohort (what it promises is what the file holds)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medfusion.cli import main
from medfusion.data.synth_manifest import EHR_COLUMNS, cohort_bundle_overrides, write_manifest_cohort


def test_cohort_has_the_real_world_problems_it_promises(sparse_cohort):
    out = Path(sparse_cohort["manifest"]).parent
    table = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["image_id", "patient_id", "outcome", "image_path", "note", *EHR_COLUMNS]
    assert len(table) == 60 and table["patient_id"].nunique() == sparse_cohort["patients"] < 60
    assert table.groupby("patient_id")["outcome"].nunique().max() == 1  # outcome per patient
    assert sparse_cohort["positive_rate"] == pytest.approx((table["outcome"] == "1").mean())
    exists = table["image_path"].map(lambda p: bool(p) and (out / p).is_file())
    assert int(((table["image_path"] != "") & ~exists).sum()) == sparse_cohort["absent_files"] > 0
    notes = table["note"]
    assert int((notes.str.len() > 4096).sum()) == sparse_cohort["notes_over_4096_chars"] > 0
    assert notes.str.contains("\n").any() and notes.str.contains(",").any()
    assert (table["lactate"] == "NA").any() and (table["heart_rate"] == "").any()
    assert set(table["sex"]) <= {"M", "F", ""} and set(table["ventilated"]) <= {"yes", "no", ""}
    ehr_empty = table[list(EHR_COLUMNS)].isin(["", "NA"]).all(axis=1)
    assert int(ehr_empty.sum()) == sparse_cohort["ehr_absent_rows"]
    truth = pd.read_csv(out / "truth.csv")
    assert (truth["image"] == "absent").sum() == sparse_cohort["absent_files"]
    assert json.loads((out / "signal.json").read_text())["rows"] == 60
    ov = cohort_bundle_overrides(out)
    assert ov["manifest_columns"]["vitals"] == list(EHR_COLUMNS) and ov["group_column"] == "patient_id"


def test_deterministic_arguments_and_cli(tmp_path, capsys):
    a = write_manifest_cohort(tmp_path / "a", rows=30, seed=1, image_size=16)
    b = write_manifest_cohort(tmp_path / "b", rows=30, seed=1, image_size=16)
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    assert a["oracle_auroc"] == b["oracle_auroc"]
    with pytest.raises(FileExistsError):
        write_manifest_cohort(tmp_path / "a", rows=30, seed=1, image_size=16)
    for kwargs, match in (
        ({"rows": 5}, "rows"),
        ({"positive_rate": 0.7}, "positive_rate"),
        ({"image_size": 8}, "image_size"),
    ):
        with pytest.raises(ValueError, match=match):
            write_manifest_cohort(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()
    assert main(["synth", "manifest", str(tmp_path / "d"), "--rows", "25", "--image-size", "16"]) == 0
    assert "wrote a 25-row manifest" in capsys.readouterr().out
