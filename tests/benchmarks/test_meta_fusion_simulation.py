"""Fast tests of the B3 data generator (medfusion.data.synth_latent via benchmarks/meta_fusion_simulation.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from medfusion.data.synth_latent import _g

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "meta_fusion_simulation.py"
_spec = importlib.util.spec_from_file_location("meta_fusion_simulation", PATH)
sim = importlib.util.module_from_spec(_spec)
sys.modules["meta_fusion_simulation"] = sim
_spec.loader.exec_module(sim)


def tiny(**kw):
    base = dict(
        name="tiny", latent=(2, 3, 1), p=(4, 5), r=(0.0, 0.0), g=("quad", "lin", "quad"), w=(1.0, 2.0, 0.5, 1.0),
        extractor="pca", grid1=(0, 2), grid2=(0, 2), head=(4,), epochs=1,
    )  # fmt: skip
    base.update(kw)
    return sim.Setting(**base)


def test_g_by_hand():
    z = np.array([-1.0, 0.0, 2.0, 0.5])
    np.testing.assert_allclose(_g(z, "quad"), [2.0, 0.0, 2.0, -0.25])
    np.testing.assert_allclose(_g(z, "lin"), z)
    with pytest.raises(ValueError, match="lin.*quad"):
        _g(z, "sin")


@pytest.mark.parametrize("name", ["1.1", "1.2", "2.2"])
def test_shapes_of_real_settings(name):
    st = sim.SETTINGS[name]
    d = sim.generate(st, seed=1)
    d1, d2, ds = st.latent
    assert d["x1"].shape == (2000, st.p[0]) and d["x2"].shape == (2000, st.p[1])
    assert d["y"].shape == (2000,)
    assert d["z1"].shape == (2000, d1) and d["z2"].shape == (2000, d2) and d["s"].shape == (2000, ds)
    assert d["T1"].shape == (d1 + ds, st.p[0]) and d["T2"].shape == (d2 + ds, st.p[1])
    # interaction coefficients: at most 10% of the pairs non-zero, integers in {-2..2}
    bi = d["betaI"]
    assert bi.shape == (d1 * d2,)
    assert np.count_nonzero(bi) <= int(0.1 * d1 * d2)
    assert set(np.unique(bi)) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert np.all(np.abs(d["beta1"]) <= 3) and np.all(np.abs(d["betaS"]) <= 3)


def test_cohort_has_24_students():
    from medfusion.fusion.meta_fusion import build_cohort

    for st in sim.SETTINGS.values():
        assert len(build_cohort(sim.cohort_grids(st))) == 24
    assert sim.cohort_grids(sim.SETTINGS["1.1"])["m1"] == ["null", "mlp:200", "mlp:300", "mlp:400", "mlp:500"]
    assert sim.cohort_grids(sim.SETTINGS["2.2"])["m2"][-1] == "pca:120"


def test_standardisation_and_noise_mixing():
    # r = 0: X is the standardised signal -> every column has mean 0 and (population) std 1
    d = sim.generate(tiny(), seed=3, n=50)
    for x in (d["x1"], d["x2"]):
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-12)
        np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-12)
    # the signal is [Z_i, S] T_i standardised
    base = np.hstack([d["z1"], d["s"]]) @ d["T1"]
    np.testing.assert_allclose(d["x1"], (base - base.mean(0)) / base.std(0), atol=1e-12)
    # r = 0.25: X = 0.25 * noise + 0.75 * standardised signal, same latents and coefficients
    d2 = sim.generate(tiny(r=(0.25, 1.0)), seed=3, n=50)
    np.testing.assert_array_equal(d2["z1"], d["z1"])
    noise1 = (d2["x1"] - 0.75 * d["x1"]) / 0.25
    assert abs(noise1.mean()) < 0.3 and 0.6 < noise1.std() < 1.4
    assert not np.allclose(d2["x2"], d["x2"])  # r = 1: pure noise


def test_determinism_per_seed():
    a, b, c = (sim.generate(tiny(), seed=s, n=30) for s in (7, 7, 8))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.allclose(a["y"], c["y"]) and not np.allclose(a["x1"], c["x1"])
    sa, sb = sim.split_indices(2000, 5), sim.split_indices(2000, 5)
    assert [len(sa[k]) for k in ("train", "val", "test")] == [1280, 320, 400]
    assert len(np.unique(np.concatenate(list(sa.values())))) == 2000
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


def test_y_formula_by_hand():
    st = tiny()
    d = sim.generate(st, seed=11, n=6)
    z1, z2, s = d["z1"], d["z2"], d["s"]
    for i in range(6):
        m1 = sum((z1[i, j] ** 2 - z1[i, j]) * d["beta1"][j] for j in range(2))  # quad
        m2 = sum(z2[i, j] * d["beta2"][j] for j in range(3))  # lin
        sh = (s[i, 0] ** 2 - s[i, 0]) * d["betaS"][0]  # quad
        inter = sum(z1[i, a] * z2[i, b] * d["betaI"][a * 3 + b] for a in range(2) for b in range(3))
        assert d["y"][i] == pytest.approx(1.0 * m1 + 2.0 * m2 + 0.5 * sh + 1.0 * inter, rel=1e-12, abs=1e-12)
    # a hand-made case: only the interaction counts, one pair with coefficient 2 -> y = 2 * z1[:, a] * z2[:, b]
    st_i = dataclasses.replace(st, latent=(2, 5, 0), w=(0.0, 0.0, 0.0, 1.0))
    d = sim.generate(st_i, seed=2, n=4)
    (nz,) = np.nonzero(d["betaI"])
    assert len(nz) <= 1  # int(0.1 * 10) = 1 pair drawn (its truncated coefficient may be 0)
    expected = np.zeros(4)
    for k in nz:
        expected += d["betaI"][k] * d["z1"][:, k // 5] * d["z2"][:, k % 5]
    np.testing.assert_allclose(d["y"], expected, atol=1e-12)
    # no interaction weight -> y ignores betaI entirely
    st_l = dataclasses.replace(st, g=("lin", "lin", "lin"), w=(1.0, 0.0, 0.0, 0.0))
    d = sim.generate(st_l, seed=4, n=5)
    np.testing.assert_allclose(d["y"], d["z1"] @ d["beta1"], atol=1e-12)
