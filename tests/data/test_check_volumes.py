"""medfusion.data.check, volume parts: 2D volumes, empty volumes, z-scored backgrounds, grids, brain masks,
duplicate case ids, label conventions and volume manifests (BRATS 2015 toolkit exports)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medfusion.cli import main
from medfusion.data.brats import discover_brats
from medfusion.data.check import check_brats, check_datalist, check_path, detect_check_layout, validate_before_training
from medfusion.data.synth_brats import write_brats_cohort

BRAIN = np.pad(np.arange(1, 65, dtype=np.float32).reshape(4, 4, 4), 2)  # 8^3, background 0


def _nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def export2015(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("check15") / "brats2015"
    write_brats_cohort(out, cases=2, size=16, seed=4, style="brats2015")
    return out


def _entry(case: str, **mods: str | None) -> dict:
    return {"case_id": case, "label": None, "label_convention": "brats", **mods}


def test_2d_volume_is_an_error_naming_the_file(tmp_path):
    flat = _nii(tmp_path / "a_flair.nii.gz", BRAIN[:, :, 4])  # a case stored as 2D slices
    single = _nii(tmp_path / "a_t1.nii.gz", BRAIN[:, :, 4:5])  # one slice stored as 3D
    rep = check_datalist([_entry("a", flair=flat, t1=single)], ["flair", "t1"], require_label=False, progress=False)
    errors = rep.cases[0].errors
    assert f"flair file {flat} has shape (8, 8); expected a 3D volume" in errors[0]
    assert f"t1 file {single} has shape (8, 8, 1); expected a 3D volume" in errors[1]


def test_all_zero_volume_and_zscored_background_are_warnings(tmp_path):
    zero = _nii(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), np.float32))
    z = _nii(tmp_path / "z.nii.gz", ((BRAIN - 30.0) / 10.0).astype(np.float32))  # background -3
    ok = _nii(tmp_path / "ok.nii.gz", BRAIN)
    mask = _nii(tmp_path / "mask.nii.gz", (BRAIN > 0).astype(np.uint8))
    entries = [
        _entry("empty", flair=zero, t1=ok),
        _entry("zscored", flair=z, t1=ok),
        {**_entry("zscored_mask", flair=z, t1=ok), "brain_mask": mask},
    ]
    rep = check_datalist(entries, ["flair", "t1"], require_label=False, progress=False)
    by_id = {c.case_id: c for c in rep.cases}
    assert rep.ok  # warnings only
    assert by_id["empty"].warnings == [f"flair file {zero} holds only zeros (an empty volume); check the export."]
    (w,) = by_id["zscored"].warnings
    assert f"flair file {z}: the background is not 0 (border value -3; z-scored?) and no brain mask is given" in w
    assert by_id["zscored_mask"].status == "ok"  # the mask is the foreground: nothing to warn about
    # a generic manifest volume (e.g. CT at -1000 HU) is not a BraTS input: no background warning
    generic = check_datalist(entries[1:2], ["flair", "t1"], require_label=False, same_grid=False, progress=False)
    assert generic.cases[0].status == "ok"


def test_orientation_only_mismatch_prints_both_orientations(tmp_path):
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # same spacing and origin, other orientation
    a = _nii(tmp_path / "flair.nii.gz", BRAIN)
    b = _nii(tmp_path / "t1.nii.gz", BRAIN, affine=lps)
    rep = check_datalist([_entry("c", flair=a, t1=b)], ["flair", "t1"], require_label=False, progress=False)
    (err,) = rep.cases[0].errors
    assert err.startswith("grid mismatch (different orientation)")
    assert f"flair {a} (spacing (1.0, 1.0, 1.0), origin [0.0, 0.0, 0.0], orientation RAS)" in err
    assert f"t1 {b} (spacing (1.0, 1.0, 1.0), origin [0.0, 0.0, 0.0], orientation LPS)" in err
    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0.0, 0.0]
    c = _nii(tmp_path / "t2.nii.gz", BRAIN, affine=shifted)
    rep = check_datalist([_entry("c", flair=a, t2=c)], ["flair", "t2"], require_label=False, progress=False)
    assert rep.cases[0].errors[0].startswith("grid mismatch (different origin)")


def test_brain_mask_problems_are_errors(tmp_path):
    img = _nii(tmp_path / "flair.nii.gz", BRAIN)
    empty = _nii(tmp_path / "empty.nii.gz", np.zeros((8, 8, 8), np.uint8))
    small = _nii(tmp_path / "small.nii.gz", np.ones((4, 4, 4), np.uint8))
    moved = _nii(tmp_path / "moved.nii.gz", np.ones((8, 8, 8), np.uint8), affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    entries = [
        {**_entry(name, flair=img), "brain_mask": path}
        for name, path in (("empty", empty), ("small", small), ("moved", moved), ("absent", str(tmp_path / "no.nii")))
    ]
    by_id = {c.case_id: c for c in check_datalist(entries, ["flair"], require_label=False, progress=False).cases}
    assert by_id["empty"].errors == [f"brain mask {empty} holds no voxel > 0; expected the brain (foreground) voxels."]
    assert by_id["small"].errors == [f"brain mask {small} has shape (4, 4, 4), flair {img} has (8, 8, 8)."]
    assert by_id["moved"].errors[0].startswith("grid mismatch (different spacing): brain mask")
    assert by_id["absent"].errors == [f"brain mask file {tmp_path / 'no.nii'} does not exist."]


def test_duplicate_case_folders_name_both_paths(tmp_path):
    src = tmp_path / "src"
    write_brats_cohort(src, cases=2, size=16, seed=1)
    root = tmp_path / "data"
    shutil.copytree(src / "BraTS2021_00000", root / "a" / "BraTS2021_00000")
    shutil.copytree(src / "BraTS2021_00000", root / "b" / "BraTS2021_00000")
    shutil.copytree(src / "BraTS2021_00001", root / "b" / "BraTS2021_00001")
    both = f"{root / 'a' / 'BraTS2021_00000'} and {root / 'b' / 'BraTS2021_00000'}"
    with pytest.raises(ValueError, match=f"duplicate case id BraTS2021_00000: found in {both}"):
        discover_brats(root)
    rep = check_brats(root, num_workers=0, progress=False)
    assert not rep.ok and f"duplicate case id BraTS2021_00000: found in {both}" in rep.dataset_errors[0]


def test_label_convention_of_a_brats2015_manifest(export2015, tmp_path, capsys):
    manifest = export2015 / "manifest.csv"
    assert detect_check_layout(manifest) == "brats"
    rep = check_path(manifest, progress=False)
    assert rep.ok and rep.layout == "volume_manifest"  # mask given, label 3 = brats2015
    assert {w for c in rep.cases for w in c.warnings} == {
        "no t1 file; treated as missing.",
        "no t2 file; treated as missing.",
    }
    assert check_path(manifest, modalities=["flair", "t1ce"], progress=False).n_warnings == 0
    plain = tmp_path / "plain.csv"
    df = pd.read_csv(manifest).drop(columns=["label_convention"])
    df[["flair", "t1ce", "label", "brain_mask"]] = df[["flair", "t1ce", "label", "brain_mask"]].map(
        lambda v: str(export2015 / v)
    )
    df.to_csv(plain, index=False)
    rep = check_path(plain, progress=False)  # default convention brats: 3 is not a value
    (err,) = rep.cases[0].errors
    assert "holds value(s) [3] (found [0, 1, 2, 3, 4]); convention 'brats' expects [0, 1, 2, 4]" in err
    assert "the values fit ['brats2015']" in err and "set label_convention" in err
    assert check_path(plain, label_convention="brats2015", progress=False).ok
    assert check_path(plain, label_convention="TC=1,3,4;WT=1,2,3,4;ET=4", progress=False).ok
    assert main(["check-data", str(plain)]) == 1
    assert main(["check-data", str(plain), "--label-convention", "brats2015"]) == 0
    assert "OK: volume_manifest" in capsys.readouterr().out
    assert validate_before_training(plain, layout="brats", label_convention="brats2015").ok


def test_volume_manifest_rows_are_reported_per_case(export2015, tmp_path):
    df = pd.read_csv(export2015 / "manifest.csv")
    for col in ("flair", "t1ce", "label", "brain_mask"):
        df[col] = [str(export2015 / v) for v in df[col]]
    df.loc[0, "t1ce"] = str(tmp_path / "gone.nii.gz")
    df.loc[1, "brain_mask"] = ""
    df.to_csv(tmp_path / "m.csv", index=False)
    rep = check_brats(tmp_path / "m.csv", ["flair", "t1ce"], num_workers=0, progress=False)
    by_id = {c.case_id: c for c in rep.cases}
    assert rep.ok and set(by_id) == {"brats2015_pat0000", "brats2015_pat0001"}
    assert by_id["brats2015_pat0000"].warnings[0].startswith(f"t1ce file {tmp_path / 'gone.nii.gz'} (line 2)")
    bg = by_id["brats2015_pat0001"].warnings
    assert len(bg) == 2 and all("the background is not 0" in w for w in bg)  # flair and t1c, no mask
    # a duplicate id is an error of that case naming both lines; the other rows are still checked
    df.loc[1, "case_id"] = "brats2015_pat0000"
    df.to_csv(tmp_path / "dup.csv", index=False)
    rep = check_brats(tmp_path / "dup.csv", num_workers=0, progress=False)
    assert not rep.ok and "duplicate case_id 'brats2015_pat0000': line 2" in rep.cases[0].errors[0]


def test_real_case_zscored_is_warned_about_unless_its_mask_is_given(real_case, tmp_path):
    from medfusion.data.synth_brats import write_brats2015_case

    images = {
        m: np.asarray(nib.load(str(real_case / f"{real_case.name}_{m}.nii.gz")).dataobj) for m in ("flair", "t1ce")
    }
    seg = nib.load(str(real_case / f"{real_case.name}_seg.nii.gz"))
    files = write_brats2015_case(tmp_path / "case", images, np.asarray(seg.dataobj), affine=seg.affine)
    row = {"case_id": "real", **{k: f"case/{v}" for k, v in files.items()}, "label_convention": "brats2015"}
    pd.DataFrame([row]).to_csv(tmp_path / "mask.csv", index=False)
    pd.DataFrame([{k: v for k, v in row.items() if k != "brain_mask"}]).to_csv(tmp_path / "nomask.csv", index=False)
    with_mask = check_path(tmp_path / "mask.csv", modalities=["flair", "t1ce"], num_workers=0, progress=False)
    assert with_mask.ok and with_mask.n_warnings == 0
    without = check_path(tmp_path / "nomask.csv", modalities=["flair", "t1ce"], num_workers=0, progress=False)
    assert without.ok and len(without.cases[0].warnings) == 2
    assert all("the background is not 0" in w for w in without.cases[0].warnings)
    assert check_path(real_case.parent, num_workers=0, progress=False).n_warnings == 0  # the release: background 0


def test_dangling_symlinks_in_a_brats_folder_or_volume_manifest_are_errors(tmp_path, export2015):
    """Issue #12.8: a dangling link was 'no flair file; treated as missing' (folder) or 'does not exist' (manifest)."""
    root = tmp_path / "data"
    write_brats_cohort(root, cases=2, size=16, seed=1)
    flair = root / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz"
    flair.unlink()
    flair.symlink_to(tmp_path / "moved" / "flair.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"case BraTS2021_00000: flair file .* is a dangling symbolic link"):
        discover_brats(root)
    rep = check_brats(root, num_workers=0, progress=False)
    errors = {c.case_id: c.errors for c in rep.cases if c.errors}
    assert list(errors) == ["BraTS2021_00000"] and str(flair) in errors["BraTS2021_00000"][0]
    assert "dangling symbolic link" in errors["BraTS2021_00000"][0]
    seg = root / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    seg.unlink()
    seg.symlink_to(tmp_path / "moved" / "seg.nii.gz")
    assert "label file" in _dangling_error(check_brats(root, num_workers=0, progress=False), "BraTS2021_00001")
    # the same in a volume manifest: an error for a modality column too (not "treated as missing")
    table = pd.read_csv(export2015 / "manifest.csv")
    link = tmp_path / "t1ce_link.nii.gz"
    link.symlink_to(tmp_path / "gone.nii.gz")
    table.loc[0, "t1ce"] = str(link)
    table.to_csv(tmp_path / "manifest.csv", index=False)
    rep = check_path(tmp_path / "manifest.csv", num_workers=0, progress=False)
    assert not rep.ok and str(link) in _dangling_error(rep, str(table.loc[0, "case_id"]))


def _dangling_error(report, case_id: str) -> str:
    (case,) = [c for c in report.cases if c.case_id == case_id]
    (msg,) = [e for e in case.errors if "dangling symbolic link" in e]
    return msg
