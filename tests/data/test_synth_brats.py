"""Tests of the BraTS phantom generator: layout, dtypes, labels, determinism, documented contrast, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medfusion.data import synth_brats as sb
from medfusion.data.labels import get_convention
from medfusion.data.synth_brats import (
    CONTRAST,
    expected_region_ranking,
    load_contrast_table,
    make_phantom,
    region_contrast,
    write_brats_cohort,
)

MODS = ("flair", "t1", "t1ce", "t2")
SIZE = 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synth") / "phantoms"
    return out, write_brats_cohort(out, cases=3, size=SIZE, seed=5)


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    return [make_phantom(SIZE, np.random.default_rng([1, i])) for i in range(8)]


def _load(case_dir: Path, key: str) -> nib.Nifti1Image:
    return nib.load(str(case_dir / f"{case_dir.name}_{key}.nii.gz"))


def _near_brain(seg: np.ndarray, img: np.ndarray, margin: float = 4.0) -> np.ndarray:
    """Normal-brain voxels within ``margin`` voxels beyond the tumour's radius around its centroid."""
    idx = np.argwhere(seg > 0)
    centre = idx.mean(axis=0)
    radius = np.sqrt(((idx - centre) ** 2).sum(axis=1)).max()
    grid = np.indices(seg.shape)
    dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(axis=0))
    return (seg == 0) & (img > 0) & (dist < radius + margin)


def _ratio(img: np.ndarray, seg: np.ndarray, labels: list[int]) -> float:
    return float(img[np.isin(seg, labels)].mean() / img[_near_brain(seg, img)].mean())


def _touch_count(seg: np.ndarray, label: int, others: list[int]) -> int:
    """Voxels of ``label`` with a 6-neighbour in ``others`` (the phantom has a zero border, so roll is safe)."""
    inside = seg == label
    return sum(
        int((inside & np.isin(np.roll(seg, shift, axis=axis), others)).sum()) for axis in range(3) for shift in (1, -1)
    )


# ------------------------------------------------------------------------------------------------ layout


def test_layout_and_file_names(cohort: tuple[Path, list[Path]]) -> None:
    out, cases = cohort
    names = ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert cases == [out / n for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "README.txt", "brats_contrast.json"])
    for case in cases:
        expected = sorted(f"{case.name}_{k}.nii.gz" for k in (*MODS, "seg"))
        assert sorted(p.name for p in case.iterdir()) == expected
    readme = (out / "README.txt").read_text()
    assert "--cases 3 --size 32 --seed 5" in readme


def test_nifti_shapes_dtypes_affine(cohort: tuple[Path, list[Path]]) -> None:
    _, cases = cohort
    for case in cases:
        for key in (*MODS, "seg"):
            img = _load(case, key)
            assert img.shape == (SIZE, SIZE, SIZE)
            assert img.header.get_data_dtype() == (np.uint8 if key == "seg" else np.float32)
            np.testing.assert_array_equal(img.affine, np.eye(4))
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)
        assert np.asarray(_load(case, "seg").dataobj).dtype == np.uint8
        assert np.asarray(_load(case, "t1ce").dataobj).dtype == np.float32


def test_labels_all_present_and_inside_brain(cohort: tuple[Path, list[Path]]) -> None:
    _, cases = cohort
    assert set(sb.LABELS.values()) == set(get_convention("brats").values)
    for case in cases:
        seg = np.asarray(_load(case, "seg").dataobj)
        values, counts = np.unique(seg, return_counts=True)
        assert values.tolist() == [0, 1, 2, 4]
        assert counts.min() >= 5  # several voxels of every label at size 32
        t1ce = np.asarray(_load(case, "t1ce").dataobj)
        assert np.all(t1ce[seg > 0] > 0)  # tumour only inside the (non-zero) brain
        assert t1ce.min() >= 0
        brain_fraction = float((t1ce > 0).mean())
        assert 0.15 < brain_fraction < 0.35  # ellipsoid of semi-axes ~0.42/0.36/0.40 S: 4/3*pi*0.06 ~ 0.25
        for mod in MODS:  # exact-zero (skull-stripped) background, same brain in every modality
            img = np.asarray(_load(case, mod).dataobj)
            assert img[0, 0, 0] == 0 and img[-1, -1, -1] == 0
            assert np.array_equal(img > 0, t1ce > 0)


def test_geometry_ed_encloses_et_shell_around_ncr(phantoms: list) -> None:
    for _, seg in phantoms:
        assert _touch_count(seg, 1, [0, 2]) == 0  # NCR touches only ET (or itself)
        assert _touch_count(seg, 4, [0]) == 0  # ET is wrapped in edema


@pytest.mark.parametrize("size", [16, 48])
def test_other_sizes(size: int) -> None:
    images, seg = make_phantom(size, np.random.default_rng(0))
    assert set(images) == set(MODS)
    assert all(v.shape == (size,) * 3 and v.dtype == np.float32 for v in images.values())
    assert seg.shape == (size,) * 3 and seg.dtype == np.uint8
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}


# ------------------------------------------------------------------------------------------------ determinism


def test_make_phantom_deterministic() -> None:
    a_img, a_seg = make_phantom(SIZE, np.random.default_rng([3, 0]))
    b_img, b_seg = make_phantom(SIZE, np.random.default_rng([3, 0]))
    c_img, c_seg = make_phantom(SIZE, np.random.default_rng([4, 0]))
    np.testing.assert_array_equal(a_seg, b_seg)
    for mod in MODS:
        np.testing.assert_array_equal(a_img[mod], b_img[mod])
        assert not np.array_equal(a_img[mod], c_img[mod])
    assert not np.array_equal(a_seg, c_seg)


def test_cohort_deterministic_and_case_independent_of_count(tmp_path: Path, cohort: tuple[Path, list[Path]]) -> None:
    _, cases = cohort
    again = write_brats_cohort(tmp_path / "again", cases=1, size=SIZE, seed=5)
    other = write_brats_cohort(tmp_path / "other", cases=1, size=SIZE, seed=6)
    for key in (*MODS, "seg"):
        ref = np.asarray(_load(cases[0], key).dataobj)
        np.testing.assert_array_equal(np.asarray(_load(again[0], key).dataobj), ref)
        assert not np.array_equal(np.asarray(_load(other[0], key).dataobj), ref)
    # case i == make_phantom(rng=default_rng([seed, i]))
    images, seg = make_phantom(SIZE, np.random.default_rng([5, 2]))
    np.testing.assert_array_equal(np.asarray(_load(cases[2], "seg").dataobj), seg)
    np.testing.assert_array_equal(np.asarray(_load(cases[2], "flair").dataobj), images["flair"])


# ------------------------------------------------------------------------------------------------ contrast


def test_t1ce_et_contrast_matches_table(phantoms: list) -> None:
    # table: t1ce ET 2.0 vs brain 1.0 -> ratio 2.0 (the per-case scale cancels in a ratio; the bias field does not
    # quite: per-case sd ~0.12 (measured on 100 cases), hence 20 % per case and 7.5 % on the mean of 8 cases)
    ratios = [_ratio(img["t1ce"], seg, [4]) for img, seg in phantoms]
    assert min(ratios) > 1.6 and max(ratios) < 2.4
    assert abs(np.mean(ratios) - 2.0) < 0.15
    # NCR dark in t1ce (0.55)
    ncr = [_ratio(img["t1ce"], seg, [1]) for img, seg in phantoms]
    assert max(ncr) < 0.75 and abs(np.mean(ncr) - 0.55) < 0.05


def test_flair_wt_contrast_matches_table(phantoms: list) -> None:
    for img, seg in phantoms:
        n = {lab: int((seg == lab).sum()) for lab in (1, 2, 4)}
        # volume-weighted table mean of WT in flair: (1.5 n1 + 1.8 n2 + 1.65 n4) / (n1 + n2 + n4) ~ 1.78
        expected = (1.5 * n[1] + 1.8 * n[2] + 1.65 * n[4]) / sum(n.values())
        ratio = _ratio(img["flair"], seg, [1, 2, 4])
        assert abs(ratio - expected) < 0.2 * expected
        assert ratio > 1.5
        # t2 bright on WT too, but less than flair on the same case (1.5 vs 1.8 on ED)
        assert 1.2 < _ratio(img["t2"], seg, [1, 2, 4]) < ratio


def test_t1_weaker_than_t1ce_for_et(phantoms: list) -> None:
    for img, seg in phantoms:
        t1 = abs(_ratio(img["t1"], seg, [4]) - 1.0)  # table: |0.97 - 1| = 0.03
        t1ce = abs(_ratio(img["t1ce"], seg, [4]) - 1.0)  # table: |2.0 - 1| = 1.0
        assert t1 < 0.2 < 0.6 < t1ce


def test_noise_sd_and_per_case_scale(phantoms: list) -> None:
    medians = []
    for img, seg in phantoms:
        t1 = img["t1"]
        brain = (seg == 0) & (t1 > 0)
        pair = brain[1:] & brain[:-1]
        # neighbouring voxels share the smooth texture/bias, so their difference is ~ noise * sqrt(2)
        noise_rel = np.diff(t1, axis=0)[pair].std() / np.sqrt(2) / np.median(t1[brain])
        assert 0.08 < noise_rel < 0.12  # table noise_sd 0.1
        medians.append(float(np.median(t1[brain])))
    assert max(medians) / min(medians) > 1.5  # per-case scale U(0.5, 2)


def test_table_argument_drives_intensities() -> None:
    table = json.loads(json.dumps(CONTRAST))
    table["t1ce"]["ET"] = 1.0
    img, seg = make_phantom(SIZE, np.random.default_rng([1, 0]), table=table)
    assert abs(_ratio(img["t1ce"], seg, [4]) - 1.0) < 0.15


# ------------------------------------------------------------------------------------------------ table API


def test_region_contrast_and_ranking_hand_computed() -> None:
    wt = region_contrast("WT")  # |ED - brain| / 0.1
    assert wt == pytest.approx({"flair": 8.0, "t1": 0.6, "t1ce": 1.2, "t2": 5.0})
    tc = region_contrast("TC")  # |ET - ED| / 0.1
    assert tc == pytest.approx({"flair": 1.5, "t1": 0.3, "t1ce": 11.2, "t2": 2.5})
    et = region_contrast("ET")  # min(|ET - ED|, |ET - NCR|) / 0.1
    assert et == pytest.approx({"flair": 1.5, "t1": 0.3, "t1ce": 11.2, "t2": 2.5})
    assert expected_region_ranking("ET") == ["t1ce", "t2", "flair", "t1"]
    assert expected_region_ranking("TC") == ["t1ce", "t2", "flair", "t1"]
    assert expected_region_ranking("WT") == ["flair", "t2", "t1ce", "t1"]
    assert expected_region_ranking("ET")[0] == "t1ce" and expected_region_ranking("WT")[0] == "flair"
    for region in ("TC", "WT", "ET"):
        assert expected_region_ranking(region)[-1] == "t1"


def test_ranking_follows_a_custom_table() -> None:
    table = load_contrast_table()
    table["t1"].update(ET=3.0)  # ET|ED = 2.06, ET|NCR = 2.2 -> t1 becomes the best ET modality
    table["t1"]["noise_sd"] = 0.5  # 2.06 / 0.5 = 4.12 < t1ce 11.2: noise matters
    assert expected_region_ranking("ET", table)[:2] == ["t1ce", "t1"]
    table["t1"]["noise_sd"] = 0.1
    assert expected_region_ranking("ET", table)[0] == "t1"
    with pytest.raises(ValueError, match="region"):
        expected_region_ranking("XX")


def test_load_contrast_table(cohort: tuple[Path, list[Path]], tmp_path: Path) -> None:
    out, _ = cohort
    default = load_contrast_table()
    assert default == CONTRAST
    default["t1ce"]["ET"] = 0.0
    assert CONTRAST["t1ce"]["ET"] == 2.0  # a copy
    assert load_contrast_table(out) == CONTRAST
    assert load_contrast_table(out / "brats_contrast.json") == CONTRAST
    doc = json.loads((out / "brats_contrast.json").read_text())
    assert doc["expected_ranking"] == {r: expected_region_ranking(r) for r in ("TC", "WT", "ET")}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(CONTRAST))
    assert load_contrast_table(bare) == CONTRAST
    broken = json.loads(json.dumps(CONTRAST))
    del broken["t2"]["ED"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"table": broken}))
    with pytest.raises(ValueError, match=r"'t2' lacks keys \['ED'\]"):
        load_contrast_table(bad)
    with pytest.raises(FileNotFoundError, match="brats_contrast.json"):
        load_contrast_table(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ arguments, atomicity


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"cases": 0}, "cases"), ({"cases": 1, "size": 15}, "size"), ({"cases": 1, "seed": -1}, "seed")],
)
def test_invalid_arguments_write_nothing(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_brats_cohort(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_make_phantom_argument_errors() -> None:
    with pytest.raises(ValueError, match="size"):
        make_phantom(8, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        make_phantom(SIZE, 0)  # type: ignore[arg-type]


def test_overwrite_refusal_and_replacement(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_brats_cohort(out, cases=1, size=16)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    write_brats_cohort(out, cases=1, size=16, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["BraTS2021_00000", "README.txt", "brats_contrast.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old copies left


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_save = nib.save

    def flaky_save(img: nib.Nifti1Image, path: str) -> None:
        calls.append(path)
        if len(calls) == 7:  # second case, second file
            raise OSError("disk full (simulated)")
        real_save(img, path)

    monkeypatch.setattr(sb.nib, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        write_brats_cohort(tmp_path / "out", cases=2, size=16)
    assert len(calls) == 7
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_cohort(tmp_path: Path) -> None:
    from medfusion.cli import main

    assert main(["synth", "brats", str(tmp_path / "cli"), "--cases", "2", "--size", "16", "--seed", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir())[:2] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert main(["synth", "brats", str(tmp_path / "cli"), "--cases", "1", "--size", "16"]) == 2  # refuses


# ------------------------------------------------------------------------------------------ brats2015 style


def test_brats2015_style_export(tmp_path: Path) -> None:
    out = tmp_path / "b15"
    cases = write_brats_cohort(out, cases=2, size=SIZE, seed=5, style="brats2015")
    assert [c.name for c in cases] == ["brats2015_pat0000", "brats2015_pat0001"]
    assert sorted(p.name for p in cases[0].iterdir()) == [
        "Flair_subtrMeanDivStd.nii.gz",
        "OTMultiClass.nii.gz",
        "T1c_subtrMeanDivStd.nii.gz",
        "brainmask.nii.gz",
    ]
    # the same phantom as the brats2021 style with the same seed, z-scored over the brain
    images, seg = make_phantom(SIZE, np.random.default_rng([5, 0]))
    brain = np.any([images[m] != 0 for m in MODS], axis=0)
    mask = np.asarray(nib.load(str(cases[0] / "brainmask.nii.gz")).dataobj)
    assert np.array_equal(mask > 0, brain)
    flair = np.asarray(nib.load(str(cases[0] / "Flair_subtrMeanDivStd.nii.gz")).dataobj)
    ref = images["flair"][brain]
    np.testing.assert_allclose(flair[brain], (ref - ref.mean()) / ref.std(), atol=1e-4)
    assert flair[~brain].max() == flair[~brain].min() == pytest.approx(-ref.mean() / ref.std(), rel=1e-4)
    assert flair[~brain].max() < 0  # background not 0
    ot = np.asarray(nib.load(str(cases[0] / "OTMultiClass.nii.gz")).dataobj)
    assert set(np.unique(ot).tolist()) == {0, 1, 2, 3, 4}
    assert np.array_equal(ot == 2, seg == 2) and np.array_equal(ot == 4, seg == 4)
    assert np.array_equal(np.isin(ot, [1, 3]), seg == 1)  # 3 = part of the old core 1
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns) == ["case_id", "flair", "t1ce", "label", "brain_mask", "label_convention"]
    assert manifest.loc[0, "flair"] == "brats2015_pat0000/Flair_subtrMeanDivStd.nii.gz"
    assert set(manifest["label_convention"]) == {"brats2015"}
    assert "--style brats2015" in (out / "README.txt").read_text()
    again = tmp_path / "again"
    write_brats_cohort(again, cases=1, size=SIZE, seed=5, style="brats2015")
    for name in ("Flair_subtrMeanDivStd.nii.gz", "OTMultiClass.nii.gz"):
        a = np.asarray(nib.load(str(cases[0] / name)).dataobj)
        assert np.array_equal(a, np.asarray(nib.load(str(again / cases[0].name / name)).dataobj))
    with pytest.raises(ValueError, match="style must be one of"):
        write_brats_cohort(tmp_path / "x", cases=1, size=SIZE, style="brats2013")


# ------------------------------------------------------------------------------------------------ unequal profile


@pytest.fixture(scope="module")
def unequal_phantoms() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    table = sb.contrast_profile("unequal")
    return [make_phantom(SIZE, np.random.default_rng([3, i]), table) for i in range(6)]


def test_unequal_profile_table_one_modality_per_region() -> None:
    table = sb.contrast_profile("unequal")
    assert table == sb.CONTRAST_UNEQUAL and sb.contrast_profile("default") == CONTRAST
    assert region_contrast("WT", table) == pytest.approx({"flair": 8.0, "t1": 0.2, "t1ce": 0.2, "t2": 0.2})
    assert region_contrast("TC", table) == pytest.approx({"flair": 0.2, "t1": 0.2, "t1ce": 9.8, "t2": 0.2})
    assert region_contrast("ET", table) == pytest.approx({"flair": 0.2, "t1": 0.2, "t1ce": 9.8, "t2": 0.2})
    assert expected_region_ranking("WT", table)[0] == "flair"
    assert expected_region_ranking("TC", table)[0] == expected_region_ranking("ET", table)[0] == "t1ce"
    for region in ("TC", "WT", "ET"):  # the dominant modality is ~40x every other one
        c = sorted(region_contrast(region, table).values())
        assert c[-1] > 39 * c[-2]
    with pytest.raises(ValueError, match="contrast profile"):
        sb.contrast_profile("flat")


def test_unequal_profile_realised_contrast_follows_its_table(unequal_phantoms: list) -> None:
    """Measured class / normal-brain ratios match the unequal table; the default's t2 / flair-core contrast is gone."""
    table = sb.CONTRAST_UNEQUAL
    for mod in MODS:
        for cls, lab in (("NCR", 1), ("ED", 2), ("ET", 4)):
            ratios = [_ratio(img[mod], seg, [lab]) for img, seg in unequal_phantoms]
            assert abs(np.mean(ratios) - table[mod][cls]) < 0.06, (mod, cls, np.mean(ratios))
    # the smooth bias field moves a per-case ratio by up to ~0.13 (measured); the mean over cases is tighter
    wt_edge, tc_edge = [], []
    for img, seg in unequal_phantoms:
        wt_edge.append({m: _ratio(img[m], seg, [2]) for m in MODS})  # ED / brain: the WT edge
        tc_edge.append({m: float(img[m][seg == 4].mean() / img[m][seg == 2].mean()) for m in MODS})  # ET / ED
        # flair ~1.8 on the WT edge, t1ce ~2 on the TC edge, the rest within 0.15 of no contrast per case
        assert wt_edge[-1]["flair"] > 1.6 and tc_edge[-1]["t1ce"] > 1.6
        assert all(abs(wt_edge[-1][m] - 1) < 0.15 for m in ("t1", "t1ce", "t2")), wt_edge[-1]
        assert all(abs(tc_edge[-1][m] - 1) < 0.15 for m in ("flair", "t1", "t2")), tc_edge[-1]
    # on the mean of the cases, within 0.05 of no contrast (the default table: t2 1.5 on WT, flair 0.92 and
    # t2 0.83 on the TC edge)
    for m in ("t1", "t1ce", "t2"):
        assert abs(np.mean([r[m] for r in wt_edge]) - 1) < 0.05, m
    for m in ("flair", "t1", "t2"):
        assert abs(np.mean([r[m] for r in tc_edge]) - 1) < 0.05, m


def test_cohort_writes_the_requested_profile(tmp_path: Path) -> None:
    out = tmp_path / "unequal"
    write_brats_cohort(out, cases=1, size=16, seed=2, contrast="unequal")
    doc = json.loads((out / "brats_contrast.json").read_text())
    assert doc["profile"] == "unequal" and load_contrast_table(out) == sb.CONTRAST_UNEQUAL
    assert doc["expected_ranking"]["WT"][0] == "flair" and doc["expected_ranking"]["ET"][0] == "t1ce"
    assert "--contrast unequal" in (out / "README.txt").read_text()
    # same geometry as the default profile (same seed): only the intensities change
    write_brats_cohort(tmp_path / "default", cases=1, size=16, seed=2)
    name = "BraTS2021_00000"
    seg_u = nib.load(str(out / name / f"{name}_seg.nii.gz")).get_fdata()
    seg_d = nib.load(str(tmp_path / "default" / name / f"{name}_seg.nii.gz")).get_fdata()
    assert np.array_equal(seg_u, seg_d)
    assert json.loads((tmp_path / "default" / "brats_contrast.json").read_text())["profile"] == "default"
    with pytest.raises(ValueError, match="contrast profile"):
        write_brats_cohort(tmp_path / "bad", cases=1, size=16, contrast="flat")
    assert not (tmp_path / "bad").exists()
    from medfusion.cli import main

    assert main(["synth", "brats", str(tmp_path / "cli"), "--cases", "1", "--size", "16", "--contrast", "unequal"]) == 0
    assert load_contrast_table(tmp_path / "cli") == sb.CONTRAST_UNEQUAL


# ------------------------------------------------------------------------------------------------ exclusive profile


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    both = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), both, side="right") / a.size
    cdf_b = np.searchsorted(np.sort(b), both, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def test_exclusive_profile_table_zero_contrast_outside_the_dominant_modality() -> None:
    table = sb.contrast_profile("exclusive")
    assert table == sb.CONTRAST_EXCLUSIVE
    assert sb.contrast_profile("unequal") == sb.CONTRAST_UNEQUAL and sb.contrast_profile("default") == CONTRAST
    assert region_contrast("WT", table) == pytest.approx({"flair": 8.0, "t1": 0.0, "t1ce": 0.0, "t2": 0.0})
    for region in ("TC", "ET"):
        assert region_contrast(region, table) == pytest.approx({"flair": 0.0, "t1": 0.0, "t1ce": 10.0, "t2": 0.0})
    assert expected_region_ranking("WT", table)[0] == "flair"
    assert expected_region_ranking("TC", table)[0] == expected_region_ranking("ET", table)[0] == "t1ce"
    for cls in ("NCR", "ED", "ET"):  # t1 and t2: every class equals normal brain
        assert table["t1"][cls] == table["t2"][cls] == table["t1"]["brain"]


def test_exclusive_zero_contrast_modalities_are_the_tumour_free_images() -> None:
    """With the same generator state, a zero-contrast modality is bit-identical to a phantom without any tumour."""
    exclusive = sb.contrast_profile("exclusive")
    flat = {m: {**row, "NCR": 1.0, "ED": 1.0, "ET": 1.0} for m, row in exclusive.items()}
    for i in range(2):
        img, seg = make_phantom(SIZE, np.random.default_rng([4, i]), exclusive)
        ref, seg_ref = make_phantom(SIZE, np.random.default_rng([4, i]), flat)
        np.testing.assert_array_equal(seg, seg_ref)
        for mod in ("t1", "t2"):
            np.testing.assert_array_equal(img[mod], ref[mod])
        # t1ce differs from the tumour-free image only on the ET ring, flair only inside the whole tumour
        np.testing.assert_array_equal(img["t1ce"][seg != 4], ref["t1ce"][seg != 4])
        np.testing.assert_array_equal(img["flair"][seg == 0], ref["flair"][seg == 0])
        assert (img["t1ce"][seg == 4] > ref["t1ce"][seg == 4]).mean() > 0.9
        assert (img["flair"][seg > 0] > ref["flair"][seg > 0]).mean() > 0.9


def test_exclusive_realised_contrast_follows_its_table() -> None:
    """Zero-contrast pairs: tumour and background intensities have the same distribution; dominant pairs: disjoint.

    Pooled over 6 cases, each case divided by its near-brain median (removes the per-case scale). Measured KS:
    zero-contrast pairs 0.01-0.10 (the smooth bias field differs between a tumour and its surroundings), the
    dominant ones 0.996 (flair WT) and 1.0 (t1ce ET vs ED); the default table gives 0.18 (t1 WT), 0.90 (t2 WT),
    0.38 (t1ce NCR+ED) and 0.33 (flair ET vs ED), the unequal one 0.15 (t2 WT).
    """
    phantoms = [make_phantom(SIZE, np.random.default_rng([4, i]), sb.CONTRAST_EXCLUSIVE) for i in range(6)]

    def ks(mod: str, inside, outside) -> float:
        a, b = [], []
        for img, seg in phantoms:
            near = _near_brain(seg, img[mod])
            ref = np.median(img[mod][near])
            a.append(img[mod][inside(seg)] / ref)
            b.append(img[mod][outside(seg, near)] / ref)
        return _ks(np.concatenate(a), np.concatenate(b))

    def wt(seg):
        return seg > 0

    def brain(seg, near):
        return near

    def ed(seg, near):
        return seg == 2

    same = {
        "t1 WT vs brain": ks("t1", wt, brain),
        "t2 WT vs brain": ks("t2", wt, brain),
        "t1ce NCR+ED vs brain": ks("t1ce", lambda s: np.isin(s, [1, 2]), brain),
        "flair ET vs ED": ks("flair", lambda s: s == 4, ed),
        "flair NCR vs ED": ks("flair", lambda s: s == 1, ed),
    }
    assert all(v < 0.12 for v in same.values()), same
    assert ks("flair", wt, brain) > 0.95 and ks("t1ce", lambda s: s == 4, ed) > 0.95


def test_cohort_and_cli_write_the_exclusive_profile(tmp_path: Path) -> None:
    from medfusion.cli import main

    argv = ["synth", "brats", str(tmp_path / "ex"), "--cases", "1", "--size", "16", "--contrast", "exclusive"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "ex" / "brats_contrast.json").read_text())
    assert doc["profile"] == "exclusive" and load_contrast_table(tmp_path / "ex") == sb.CONTRAST_EXCLUSIVE
    assert doc["region_contrast"]["WT"]["t1"] == 0.0 and doc["expected_ranking"]["TC"][0] == "t1ce"
    assert "--contrast exclusive" in (tmp_path / "ex" / "README.txt").read_text()
