from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfusion.evaluation.stats import delong_components, delong_test, holm, paired_bootstrap


def _psi(x, y):
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _naive_components(scores, labels):
    """DeLong's structural components by their O(mn) definition (the reference the fast algorithm must match)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    v10 = np.array([np.mean([_psi(x, y) for y in neg]) for x in pos])
    v01 = np.array([np.mean([_psi(x, y) for x in pos]) for y in neg])
    return v10.mean(), v10, v01


def test_delong_components_hand_computed():
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.3: 5 of 6 pairs ordered -> AUC 5/6
    scores = np.array([0.9, 0.7, 0.8, 0.3, 0.4])
    labels = np.array([1, 0, 1, 0, 1])
    auc, v10, v01 = delong_components(scores, labels)
    assert auc[0] == pytest.approx(5 / 6)
    np.testing.assert_allclose(v10[0], [1.0, 1.0, 0.5])  # per positive: share of negatives below it
    np.testing.assert_allclose(v01[0], [2 / 3, 1.0])  # per negative: share of positives above it
    # Var(AUC) = S10/m + S01/n = (1/12)/3 + (1/18)/2 = 1/18 (hand computed)
    s10, s01 = np.var(v10[0], ddof=1), np.var(v01[0], ddof=1)
    assert s10 == pytest.approx(1 / 12) and s01 == pytest.approx(1 / 18)
    assert s10 / 3 + s01 / 2 == pytest.approx(1 / 18)


def test_delong_fast_equals_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    a = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
    b = np.round(rng.normal(size=60) + 0.5 * labels, 1)
    auc, v10, v01 = delong_components(np.stack([a, b]), labels)
    for k, s in enumerate((a, b)):
        ref_auc, ref_v10, ref_v01 = _naive_components(s, labels)
        assert auc[k] == pytest.approx(ref_auc) == pytest.approx(roc_auc_score(labels, s))
        np.testing.assert_allclose(v10[k], ref_v10)
        np.testing.assert_allclose(v01[k], ref_v01)


def test_delong_test_hand_computed_z():
    # a: perfect ranking (AUC 1, zero variance); b: the example above (AUC 5/6)
    labels = np.array([1, 0, 1, 0, 1])
    a = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    b = np.array([0.9, 0.7, 0.8, 0.3, 0.4])
    r = delong_test(a, b, labels)
    # components of a are constant -> var(diff) = var(b) = 1/18; z = (1/6) / sqrt(1/18)
    z = (1 / 6) / np.sqrt(1 / 18)
    from scipy.stats import norm

    assert r.diff == pytest.approx(1 / 6)
    assert r.p_value == pytest.approx(2 * norm.sf(z))
    assert r.ci_low == pytest.approx(1 / 6 - 1.959964 * np.sqrt(1 / 18), abs=1e-5)
    assert delong_test(b, a, labels).diff == pytest.approx(-1 / 6)


def test_delong_identical_and_clear_difference():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    good = rng.normal(size=300) + 2 * labels
    bad = rng.normal(size=300) + 0.2 * labels
    assert delong_test(good, good, labels).p_value == 1.0
    r = delong_test(good, bad, labels)
    assert r.diff > 0.2 and r.p_value < 1e-6 and r.ci_low > 0
    assert np.isnan(delong_test([0.9, 0.2, 0.8], [0.1, 0.2, 0.3], [1, 0, 1]).p_value)  # one negative: no test
    with pytest.raises(ValueError, match="both classes"):
        delong_test(good[labels == 1], bad[labels == 1], labels[labels == 1])


def test_paired_bootstrap_detects_shift_and_not_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(size=80)
    a, b = base + 0.3 + 0.05 * rng.normal(size=80), base + 0.05 * rng.normal(size=80)
    r = paired_bootstrap(lambda i: (a[i].mean(), b[i].mean()), 80, n_boot=500)
    assert r.diff == pytest.approx(a.mean() - b.mean())
    assert r.p_value < 0.01 and r.ci_low > 0.25
    # pairing matters: between-case spread (sd 1) is large, the paired difference is tiny and consistent
    c = base + 0.02 + 0.05 * rng.normal(size=80)
    pv = [paired_bootstrap(lambda i, s=s: (c[i].mean(), b[i].mean()), 80, n_boot=500, seed=s).p_value for s in (0, 1)]
    assert all(p > 0.0 for p in pv)
    null = [
        paired_bootstrap(lambda i, x=x: (x[i].mean(), b[i].mean()), 80, n_boot=300, seed=0).p_value
        for x in (base + 0.05 * rng.normal(size=80) for _ in range(20))
    ]
    assert np.mean(np.asarray(null) < 0.05) <= 0.15  # about alpha under the null
    assert np.isnan(paired_bootstrap(lambda i: (a[i].mean(), b[i].mean()), 1).p_value)  # one case: no test


def test_holm_hand_computed():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])
    np.testing.assert_allclose(holm([0.5]), [0.5])
