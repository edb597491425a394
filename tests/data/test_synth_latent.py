"""Latent factor regression data (Meta Fusion B3 simulation) and its table writer."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medfusion.data.synth_latent import latent_factor_data, paper_split, write_latent_table

SMALL = {"latent": (3, 2, 2), "p": (5, 4), "r": (0.4, 0.4), "g": ("lin", "lin", "lin"), "w": (1.0, 1.0, 0.0, 0.0)}


def test_shapes_and_determinism_per_seed():
    a = latent_factor_data(**SMALL, seed=3, n=50)
    assert a["x1"].shape == (50, 5) and a["x2"].shape == (50, 4) and a["y"].shape == (50,)
    assert a["z1"].shape == (50, 3) and a["z2"].shape == (50, 2) and a["s"].shape == (50, 2)
    assert a["T1"].shape == (5, 5) and a["T2"].shape == (4, 4) and a["betaI"].shape == (6,)
    b = latent_factor_data(**SMALL, seed=3, n=50)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = latent_factor_data(**SMALL, seed=4, n=50)
    assert not np.allclose(a["y"], c["y"])


def test_y_is_the_formula_of_the_returned_coefficients():
    d = latent_factor_data((3, 2, 2), (5, 4), (0.4, 0.4), ("lin", "quad", "lin"), (0.5, 2.0, 1.5, 1.0), seed=0, n=40)
    z1, z2, s = d["z1"], d["z2"], d["s"]
    inter = np.array(
        [sum(d["betaI"][i * 2 + j] * z1[k, i] * z2[k, j] for i in range(3) for j in range(2)) for k in range(40)]
    )
    expected = 0.5 * z1 @ d["beta1"] + 2.0 * (z2**2 - z2) @ d["beta2"] + 1.5 * s @ d["betaS"] + inter
    np.testing.assert_allclose(d["y"], expected, rtol=1e-10, atol=1e-10)
    assert np.all(np.abs(d["beta1"]) <= 3) and set(np.unique(d["betaI"])) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert np.count_nonzero(d["betaI"] != 0) <= int(3 * 2 * 0.1)  # 10% of the pairs drawn (0 here)


def test_no_noise_gives_standardised_loadings():
    d = latent_factor_data((3, 2, 2), (5, 4), (0.0, 0.0), ("lin",) * 3, (1.0, 1.0, 0.0, 0.0), seed=1, n=100)
    for key, z in (("x1", np.hstack([d["z1"], d["s"]]) @ d["T1"]), ("x2", np.hstack([d["z2"], d["s"]]) @ d["T2"])):
        np.testing.assert_allclose(d[key].mean(axis=0), 0.0, atol=1e-10)
        np.testing.assert_allclose(d[key].std(axis=0), 1.0, atol=1e-10)
        np.testing.assert_allclose(d[key], (z - z.mean(axis=0)) / z.std(axis=0), atol=1e-10)


def test_paper_split_sizes_disjoint_and_seeded():
    sp = paper_split(2000, seed=1)
    assert (len(sp["train"]), len(sp["val"]), len(sp["test"])) == (1280, 320, 400)
    allidx = np.concatenate([sp["train"], sp["val"], sp["test"]])
    assert sorted(allidx.tolist()) == list(range(2000))
    np.testing.assert_array_equal(paper_split(2000, seed=1)["test"], sp["test"])
    assert not np.array_equal(paper_split(2000, seed=2)["test"], sp["test"])


def test_table_missing_blocks_and_signal(tmp_path):
    out = write_latent_table(tmp_path / "t", **SMALL, seed=0, n=200, missing_rate=0.3)
    frame = pd.read_csv(out / "table.csv")
    signal = json.loads((out / "signal.json").read_text())
    m1, m2 = signal["modalities"]["m1"], signal["modalities"]["m2"]
    assert m1 == [f"m1_{k}" for k in range(5)] and m2 == [f"m2_{k}" for k in range(4)] and signal["target"] == "y"
    assert list(frame.columns) == ["case_id", *m1, *m2, "y", "split"]
    assert frame["split"].value_counts().to_dict() == {"train": 128, "test": 40, "val": 32}
    miss1, miss2 = frame[m1].isna(), frame[m2].isna()
    assert (miss1.all(axis=1) == miss1.any(axis=1)).all() and (miss2.all(axis=1) == miss2.any(axis=1)).all()  # blocks
    assert not (miss1.all(axis=1) & miss2.all(axis=1)).any()  # every row keeps a modality
    assert 0.15 < miss1.all(axis=1).mean() < 0.4 and 0.15 < miss2.all(axis=1).mean() < 0.4
    assert signal["missing_fraction"]["m1"] == pytest.approx(miss1.all(axis=1).mean())
    d = latent_factor_data(**SMALL, seed=0, n=200)
    np.testing.assert_allclose(frame["y"].to_numpy(), d["y"], rtol=1e-12)
    keep = ~miss1.all(axis=1).to_numpy()
    np.testing.assert_allclose(frame[m1].to_numpy()[keep], d["x1"][keep], rtol=1e-12)
    with pytest.raises(FileExistsError):
        write_latent_table(tmp_path / "t", **SMALL, seed=0, n=200)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latent": (3, 2)}, "latent"),
        ({"latent": (0, 2, 0)}, "latent"),
        ({"p": (5, 0)}, "p:"),
        ({"r": (0.4, 1.5)}, "r:"),
        ({"g": ("lin", "cube", "lin")}, "cube"),
        ({"w": (1.0, 1.0, 0.0)}, "w = "),
        ({"n": 1}, "n:"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latent_factor_data(**{**SMALL, "seed": 0, "n": 20, **kwargs})


def test_bad_missing_rate_raises(tmp_path):
    with pytest.raises(ValueError, match="missing_rate"):
        write_latent_table(tmp_path / "x", **SMALL, n=20, missing_rate=1.0)
    assert not (tmp_path / "x").exists()
