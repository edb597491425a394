"""Series -> modality rules: scanner names, contrast, acquisition parameters, ignores, duplicates, rule files."""

from __future__ import annotations

import json

import pytest

from medfusion.apps.dicom.rules import SeriesInfo, SeriesRule, default_rules, load_rules, map_series
from medfusion.modality import BRATS_MODALITIES

NAMES = {
    "AX T2 FLAIR": "flair",
    "tirm_tra_dark-fluid": "flair",
    "Ax FLAIR T2": "flair",
    "AX T1 SE": "t1",
    "t1_mprage_sag_p2_iso": "t1",
    "sT1W_3D_TFE": "t1",
    "T1 pre gad": "t1",
    "AX T1 PRE": "t1",
    "T1 precontrast": "t1",
    "Ax T1 FLAIR": "t1",
    "Ax T1 +C": "t1ce",
    "t1_mprage_sag_p2_iso POST": "t1ce",
    "T1W_SE_GD": "t1ce",
    "t1_se_tra+c": "t1ce",
    "Ax T1 FLAIR +C": "t1ce",
    "T1_MPRAGE_GD": "t1ce",
    "AX T2 FSE": "t2",
    "t2_tse_tra": "t2",
    "T2W_TSE": "t2",
}


def _one(description: str, **kw) -> tuple[str, ...]:
    return map_series([SeriesInfo("1.2.3", "MR", description, **kw)], BRATS_MODALITIES).present


@pytest.mark.parametrize("name, modality", sorted(NAMES.items()))
def test_default_rules_map_scanner_names(name, modality):
    assert _one(name) == (modality,)


@pytest.mark.parametrize("name", ["3 PLANE LOC", "ep2d_diff_3scan_trace", "ADC", "SWI_Images", "Localizer", "DWI"])
def test_localizers_and_non_structural_series_are_ignored(name):
    mapping = map_series([SeriesInfo("1", "MR", name)], BRATS_MODALITIES)
    assert mapping.present == () and "ignored" in mapping.unmatched[0][1]


def test_contrast_agent_attribute_makes_t1_post_contrast():
    assert _one("AX T1 SE", attributes={"ContrastBolusAgent": "GADOBUTROL"}) == ("t1ce",)
    assert _one("AX T1 SE", attributes={"ContrastBolusAgent": ""}) == ("t1",)


def test_acquisition_parameters_when_the_name_says_nothing():
    flair = {"ScanningSequence": ["SE", "IR"], "InversionTime": 2500.0, "EchoTime": 120.0, "RepetitionTime": 9000.0}
    assert _one("series 7", attributes=flair) == ("flair",)
    assert _one("series 8", attributes={"EchoTime": 100.0, "RepetitionTime": 4000.0, "ScanningSequence": "SE"}) == (
        "t2",
    )
    t1 = {"EchoTime": 10.0, "RepetitionTime": 500.0}
    assert _one("series 9", attributes=t1) == ("t1",)
    assert _one("series 9", attributes={**t1, "ContrastBolusAgent": "GD"}) == ("t1ce",)
    assert _one("series 10", attributes={"EchoTime": 30.0, "RepetitionTime": 2500.0}) == ()


def test_non_mr_series_duplicates_and_report():
    series = [
        SeriesInfo("a", "MR", "AX T1 POST GD", number=5, instances=150),
        SeriesInfo("b", "MR", "COR T1 POST GD", number=6, instances=150, attributes={"ImageType": ["DERIVED"]}),
        SeriesInfo("c", "MR", "AX T1 POST GD", number=7, instances=40),
        SeriesInfo("d", "SEG", "medfusion TC/WT/ET flair", number=9001),
        SeriesInfo("e", "MR", "AX T2 FLAIR", number=2, instances=30),
        SeriesInfo("f", "MR", "", number=3),
    ]
    mapping = map_series(series, BRATS_MODALITIES)
    assert mapping.used["t1ce"].series_uid == "a"  # original, most slices
    assert mapping.present == ("flair", "t1ce") and mapping.missing == ("t1", "t2")
    reasons = {s.series_uid: r for s, r in mapping.unmatched}
    assert "also matches t1ce" in reasons["b"] and "also matches t1ce" in reasons["c"]
    assert "not an MR image series (Modality SEG)" in reasons["d"]
    assert "no rule matched" in reasons["f"]
    report = mapping.report()
    assert report["missing"] == ["t1", "t2"] and report["used"]["flair"]["series_uid"] == "e"
    text = mapping.to_text()
    assert "t2     <- (no series: missing modality)" in text


def test_rules_file_round_trip_and_custom_rules(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(default_rules().to_dict()))
    assert load_rules(path) == default_rules()
    path.write_text(json.dumps({"rules": [{"modality": "flair", "include": ["^mystery"]}], "ignore": []}))
    rules = load_rules(path)
    assert map_series([SeriesInfo("1", "MR", "mystery 3")], BRATS_MODALITIES, rules).present == ("flair",)
    assert map_series([SeriesInfo("1", "MR", "AX T2 FLAIR")], BRATS_MODALITIES, rules).present == ()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"rules": []}), "at least one rule"),
        (json.dumps({"rules": [{"include": ["x"]}]}), "rule 0 must be an object with 'modality'"),
        (json.dumps({"rules": [{"modality": "t1", "include": ["("]}]}), "invalid regular expression"),
        (json.dumps({"rules": [{"modality": "t1", "include": ["x"], "contrast": "maybe"}]}), "contrast must be"),
        (json.dumps({"rules": [{"modality": "t1", "where": {"EchoTime": [1]}}]}), "must be a substring or [min, max]"),
        (json.dumps({"rules": [{"modality": "t1"}]}), "give 'include' patterns"),
    ],
)
def test_bad_rules_files_name_the_file_and_rule(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json") as err:
        load_rules(path)
    assert message in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rules(tmp_path / "absent.json")


def test_rule_requires_a_condition():
    with pytest.raises(ValueError, match="give 'include'"):
        SeriesRule("t1")
