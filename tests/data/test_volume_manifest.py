"""Volume manifests: BRATS 2015 toolkit exports (names not like BraTS) load without symlinks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medfusion.data.brats import discover_brats
from medfusion.data.synth_brats import write_brats_cohort
from medfusion.data.volume_manifest import is_volume_manifest, read_volume_manifest, read_volume_rows


@pytest.fixture(scope="module")
def export2015(tmp_path_factory) -> Path:
    """A generated BRATS-2015-style folder: FLAIR + T1c z-scored, brain mask, OTMultiClass with label 3."""
    out = tmp_path_factory.mktemp("b15") / "brats2015"
    write_brats_cohort(out, cases=3, size=32, seed=3, style="brats2015")
    return out


def _manifest(
    export: Path, path: Path, drop: tuple[str, ...] = (), absolute: bool = False, cells: dict | None = None
) -> Path:
    """The generated manifest rewritten as a user would (columns dropped, paths absolute, cells changed)."""
    df = pd.read_csv(export / "manifest.csv", dtype=str, keep_default_na=False)
    df = df.drop(columns=list(drop))
    for col in ("flair", "t1ce", "label", "brain_mask"):
        if col in df and absolute:
            df[col] = [str(export / v) if v else v for v in df[col]]
    for (col, row), value in (cells or {}).items():
        df.loc[row, col] = value
    df.to_csv(path, index=False)
    return path


def test_folder_without_brats_names_says_where_it_searched_and_what_it_found(export2015):
    with pytest.raises(FileNotFoundError) as err:
        discover_brats(export2015)
    msg = str(err.value)
    assert "searched it and 3 folder levels below it" in msg
    assert "Found 12 NIfTI file(s) in 3 folder(s) not named like BraTS" in msg
    assert "Flair_subtrMeanDivStd.nii.gz" in msg and "volume manifest" in msg


def test_generated_manifest_reads_by_name_with_missing_modalities(export2015):
    items = discover_brats(export2015 / "manifest.csv", require_label=True)
    assert [i["case_id"] for i in items] == ["brats2015_pat0000", "brats2015_pat0001", "brats2015_pat0002"]
    first = items[0]
    assert first["flair"].endswith("brats2015_pat0000/Flair_subtrMeanDivStd.nii.gz") and Path(first["flair"]).is_file()
    assert first["t1ce"].endswith("T1c_subtrMeanDivStd.nii.gz")
    assert first["t1"] is None and first["t2"] is None  # absent columns = missing modalities
    assert first["modality_mask"] == [True, False, True, False]
    assert first["label"].endswith("OTMultiClass.nii.gz") and first["brain_mask"].endswith("brainmask.nii.gz")
    assert first["label_convention"] == "brats2015" and first["source"] == "volume_manifest"
    assert [i["sample_index"] for i in items] == [0, 1, 2]
    # the model's modality order decides the keys
    two = discover_brats(export2015 / "manifest.csv", ["t1ce", "flair"])
    assert two[0]["modality_mask"] == [True, True] and "t1" not in two[0]


def test_config_convention_applies_to_every_row(export2015, tmp_path):
    plain = _manifest(export2015, tmp_path / "plain.csv", drop=("label_convention",), absolute=True)
    assert {i["label_convention"] for i in read_volume_manifest(plain)} == {"brats"}  # the documented default
    assert {i["label_convention"] for i in read_volume_manifest(plain, label_convention="brats2015")} == {"brats2015"}
    spec = {"TC": [1, 3, 4], "WT": [1, 2, 3, 4], "ET": [4], "write": {"ET": 4, "TC": 3, "WT": 2}}
    keys = {i["label_convention"] for i in discover_brats(plain, label_convention=spec)}
    assert keys == {"TC=1,3,4;WT=1,2,3,4;ET=4;write=4,3,2"}


def test_missing_files_are_missing_modalities_or_errors(export2015, tmp_path):
    m = _manifest(export2015, tmp_path / "m.csv", cells={("t1ce", 1): "brats2015_pat0001/nope.nii.gz"})
    (tmp_path / "brats2015_pat0001").symlink_to(export2015 / "brats2015_pat0001")
    for d in ("brats2015_pat0000", "brats2015_pat0002"):
        (tmp_path / d).symlink_to(export2015 / d)
    items = read_volume_manifest(m)
    assert items[1]["t1ce"] is None and items[1]["modality_mask"] == [True, False, False, False]
    with pytest.raises(ValueError, match=r"case brats2015_pat0001: t1ce file .*nope.nii.gz \(line 3\) does not exist"):
        read_volume_manifest(m, missing_files="error")
    with pytest.raises(ValueError, match="missing_files must be one of"):
        read_volume_manifest(m, missing_files="ignore")


def test_row_problems_are_all_reported(export2015, tmp_path):
    m = _manifest(
        export2015,
        tmp_path / "bad.csv",
        absolute=True,
        cells={
            ("case_id", 2): "brats2015_pat0000",  # duplicate id
            ("label", 1): "/nowhere/OT.nii.gz",  # a given label must exist
            ("label_convention", 1): "brats2019",
        },
    )
    _, errors, _ = read_volume_rows(m)
    dup = errors["brats2015_pat0000"][0]
    assert "duplicate case_id 'brats2015_pat0000': line 2" in dup and "line 4" in dup
    assert "brats2015_pat0000/Flair_subtrMeanDivStd.nii.gz" in dup and "brats2015_pat0002/Flair" in dup
    assert any("label file /nowhere/OT.nii.gz (line 3) does not exist" in e for e in errors["brats2015_pat0001"])
    assert any("unknown label convention 'brats2019'" in e for e in errors["brats2015_pat0001"])
    with pytest.raises(ValueError, match="3 problem\\(s\\)"):
        read_volume_manifest(m)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["case_id", "flair", "notes"], "unknown: \\['notes'\\]"),
        (["id", "flair"], "expected case_id"),
        (["case_id", "label"], "at least one of"),
    ],
)
def test_bad_columns(tmp_path, columns, message):
    path = tmp_path / "m.csv"
    pd.DataFrame([dict.fromkeys(columns, "")]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=message):
        read_volume_manifest(path)


def test_require_label_and_empty_rows(export2015, tmp_path):
    m = _manifest(
        export2015, tmp_path / "m.csv", absolute=True, cells={("label", 0): "", ("flair", 2): "", ("t1ce", 2): ""}
    )
    with pytest.raises(ValueError) as err:
        read_volume_manifest(m, require_label=True)
    assert "case brats2015_pat0000: no label file" in str(err.value)
    assert "case brats2015_pat0002: line 4: none of the modalities" in str(err.value)


def test_detection_of_volume_manifests(export2015, tmp_path):
    assert is_volume_manifest(export2015 / "manifest.csv")
    generic = tmp_path / "generic.csv"
    pd.DataFrame([{"case_id": "a", "flair": "x.nii.gz", "report": "text", "label": 1}]).to_csv(generic, index=False)
    assert not is_volume_manifest(generic)
    classification = tmp_path / "classification.csv"  # a FLAIR classifier's manifest: numeric labels
    pd.DataFrame([{"case_id": "a", "flair": "a.nii.gz", "label": "1"}]).to_csv(classification, index=False)
    assert not is_volume_manifest(classification)
    assert not is_volume_manifest(export2015)


def test_header_only_manifest_is_an_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("case_id,flair,label\n")
    with pytest.raises(ValueError, match="header .* but no data rows"):
        read_volume_manifest(path)
