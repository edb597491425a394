"""Paired statistical tests for comparing two models evaluated on the SAME cases.

* :func:`delong_test`: DeLong, DeLong & Clarke-Pearson (1988) test of two correlated AUROCs, computed
  with the fast O(N log N) algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11)). No
  installed library provides it (scikit-learn and SciPy have no DeLong test; MONAI only computes the
  AUROC), so it is implemented here and tested against hand-computed structural components
  (``tests/evaluation/test_stats.py``).
* :func:`paired_bootstrap`: paired bootstrap of the difference of any metric computed on the same
  resampled cases for both models (resampling cases keeps the pairing).
* :func:`holm`: Holm's step-down adjustment of a family of p-values.

Equations (docs/compare.md):

* AUROC of scores ``X`` (positives, ``m``) and ``Y`` (negatives, ``n``): ``A = mean_ij psi(X_i, Y_j)``
  with ``psi = 1`` if ``X_i > Y_j``, ``1/2`` if equal, ``0`` otherwise.
* Structural components ``V10_i = mean_j psi(X_i, Y_j)``, ``V01_j = mean_i psi(X_i, Y_j)``; fast form with
  midranks: ``V10_i = (R_i - T^X_i) / n``, ``V01_j = 1 - (R_j - T^Y_j) / m`` where ``R`` are midranks in the
  pooled sample and ``T^X``/``T^Y`` midranks within positives / negatives.
* ``S10 = cov(V10)``, ``S01 = cov(V01)`` (over models, ``ddof=1``), ``S = S10 / m + S01 / n``;
  ``z = (A_1 - A_2) / sqrt(S_11 + S_22 - 2 S_12)``, two-sided ``p = 2 (1 - Phi(|z|))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

__all__ = ["PairedResult", "delong_components", "delong_test", "paired_bootstrap", "holm"]


@dataclass(frozen=True)
class PairedResult:
    """Outcome of a paired comparison of model ``a`` against model ``b``.

    Attributes:
        estimate_a: metric of ``a`` on all cases.
        estimate_b: metric of ``b`` on all cases.
        diff: ``estimate_a - estimate_b``.
        ci_low: lower end of the ``1 - alpha`` interval of ``diff``.
        ci_high: upper end.
        p_value: two-sided p-value of "no difference".
        test: ``"delong"`` or ``"bootstrap"``.
    """

    estimate_a: float
    estimate_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str


def delong_components(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUROCs and DeLong structural components of several score vectors on the same samples (fast algorithm).

    Args:
        scores: ``[K, N]`` scores of ``K`` models (higher = more likely positive) or ``[N]``.
        labels: ``[N]`` binary labels (1 = positive).

    Returns:
        ``(auc [K], v10 [K, m], v01 [K, n])`` with ``m`` positives and ``n`` negatives.

    Raises:
        ValueError: labels not binary, a class absent, or shapes that do not match.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    y = np.asarray(labels).reshape(-1)
    if s.shape[1] != y.shape[0]:
        raise ValueError(f"delong: scores have {s.shape[1]} samples, labels {y.shape[0]}.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"delong: labels must be 0/1, got values {sorted(set(y.tolist()))[:5]}.")
    pos, neg = s[:, y == 1], s[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError(f"delong: needs both classes ({m} positives, {n} negatives).")
    tx = rankdata(pos, axis=1)  # midranks within positives
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks in the pooled sample
    auc = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return auc, v10, v01


def _delong_cov(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    m, n = v10.shape[1], v01.shape[1]
    return np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n


def delong_test(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, alpha: float = 0.05) -> PairedResult:
    """DeLong's test of two correlated AUROCs on the same samples.

    Args:
        scores_a: ``[N]`` scores of model ``a``.
        scores_b: ``[N]`` scores of model ``b``.
        labels: ``[N]`` 0/1 labels.
        alpha: the interval is ``1 - alpha`` (normal approximation with DeLong's variance).

    Returns:
        :class:`PairedResult` with ``test="delong"``. Identical score rankings give ``p = 1``; fewer than two
        positives or negatives give NaN (no test).
    """
    auc, v10, v01 = delong_components(np.stack([np.asarray(scores_a), np.asarray(scores_b)]), labels)
    if v10.shape[1] < 2 or v01.shape[1] < 2:  # a variance needs two samples of each class
        diff = float(auc[0] - auc[1])
        return PairedResult(float(auc[0]), float(auc[1]), diff, np.nan, np.nan, np.nan, "delong")
    cov = _delong_cov(v10, v01)
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    if var <= 1e-15:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
        return PairedResult(float(auc[0]), float(auc[1]), diff, diff, diff, p, "delong")
    se = float(np.sqrt(var))
    z = diff / se
    half = float(norm.ppf(1 - alpha / 2)) * se
    p = float(2 * norm.sf(abs(z)))
    return PairedResult(float(auc[0]), float(auc[1]), diff, diff - half, diff + half, p, "delong")


def paired_bootstrap(
    metric: Callable[[np.ndarray], tuple[float, float]],
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedResult:
    """Paired bootstrap of a metric difference: both models are scored on the same resampled cases.

    Args:
        metric: ``metric(idx) -> (metric of a, metric of b)`` on the cases ``idx`` (``[k]`` int indices,
            repeats allowed). For per-case metrics (Dice) this is the mean over ``idx`` of each model's
            values; for sample-level metrics (AUPRC) it recomputes the metric on the resampled samples.
        n: number of cases.
        n_boot: bootstrap resamples.
        seed: resampling seed.
        alpha: the percentile interval is ``1 - alpha``.

    Returns:
        :class:`PairedResult` with ``test="bootstrap"``: the percentile interval of the resampled
        differences ``d*``, and the two-sided p-value ``2 (1 - Phi(|d| / sd(d*)))`` with the bootstrap
        standard error (a count-based p-value ``#{d* <= 0} / B`` cannot go below ``1 / B``, which after a
        Holm adjustment over 15 combinations would forbid any finding at ``B = 1000``). A resample whose
        metric is undefined (AUPRC without a positive) is dropped. One case gives NaN (no test).
    """
    if n < 1:
        raise ValueError("paired_bootstrap: no cases.")
    est_a, est_b = metric(np.arange(n))
    if n < 2:  # one case: no variability to test against
        return PairedResult(float(est_a), float(est_b), float(est_a - est_b), np.nan, np.nan, np.nan, "bootstrap")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        a, b = metric(rng.integers(0, n, n))
        diffs[i] = a - b
    diffs = diffs[np.isfinite(diffs)]
    diff = float(est_a - est_b)
    if len(diffs) == 0 or not np.isfinite(diff):
        return PairedResult(float(est_a), float(est_b), diff, np.nan, np.nan, np.nan, "bootstrap")
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    se = float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0
    if se <= 1e-15:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    else:
        p = float(2 * norm.sf(abs(diff) / se))
    return PairedResult(float(est_a), float(est_b), diff, float(lo), float(hi), float(p), "bootstrap")


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries stay NaN.

    Args:
        p_values: raw p-values.

    Returns:
        Adjusted p-values in the input order (``p_(i) * (k - i + 1)``, made monotone, capped at 1).
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    k = len(ok)
    if k == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate(np.minimum(1.0, p[order] * (k - np.arange(k))))
    out[order] = adj
    return out
