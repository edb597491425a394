"""Two-modality latent factor regression data (the Meta Fusion paper's simulation, BENCHMARKS.md B3).

Model per repetition with seed ``s`` (the settings table of ``docs/benchmark_spec.md`` "B3 settings"):

1. coefficients from ``np.random.RandomState(s)`` in the order beta1, beta2, betaS ~ U(-3, 3), interaction
   coefficients on a random 10% of the d1*d2 pairs (U(-3, 3) truncated towards zero, i.e. integers in
   {-2..2}, as the public package stores them), loading matrices T_i ~ N(0, 1) of shape (d_i + dS) x p_i;
2. latents re-seeded with ``s``: Z1, Z2, S ~ N(0, 1);
3. B_i = [Z_i, S] T_i column-standardised over all rows (population std), X_i = r_i N(0, 1) + (1 - r_i) B_i
   (modality 1's noise is drawn before modality 2's);
4. y = w1 g1(Z1) beta1 + w2 g2(Z2) beta2 + wS gS(S) betaS + wI (Z1 (x) Z2) betaI with g = identity ("lin")
   or z^2 - z ("quad"); no noise, y not standardised.

:func:`latent_factor_data` draws the arrays; :func:`write_latent_table` writes them as one CSV table
(``m1_0..m1_{p1-1}``, ``m2_0..``, ``y``, ``split``, optionally NaN blocks for missing modalities) that
:func:`medfusion.fusion.meta_fusion_head.tabular_data` and the Meta Fusion regression bundle config read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfusion.io import atomic_output_dir

__all__ = ["LINKS", "latent_factor_data", "paper_split", "write_latent_table"]

LINKS = ("lin", "quad")
"""Link functions g: ``lin`` = identity, ``quad`` = z^2 - z."""


def _g(z: np.ndarray, kind: str) -> np.ndarray:
    if kind == "lin":
        return z
    if kind == "quad":
        return z**2 - z
    raise ValueError(f"latent_factor_data g: expected one of {LINKS}, got {kind!r}.")


def latent_factor_data(
    latent: Sequence[int],
    p: Sequence[int],
    r: Sequence[float],
    g: Sequence[str],
    w: Sequence[float],
    seed: int,
    n: int = 2000,
) -> dict[str, np.ndarray]:
    """Draw one repetition of the latent factor model.

    Args:
        latent: ``(d1, d2, dS)`` modality-1, modality-2 and shared latent sizes.
        p: ``(p1, p2)`` observed feature sizes.
        r: ``(r1, r2)`` noise mixing weights in [0, 1].
        g: ``(g1, g2, gS)`` link of each latent block, ``"lin"`` or ``"quad"``.
        w: ``(w1, w2, wS, wI)`` weights of the three main effects and the interaction.
        seed: repetition seed ``s`` (coefficients and latents are both seeded with it).
        n: number of samples.

    Returns:
        ``{"x1": [n, p1], "x2": [n, p2], "y": [n], "z1", "z2", "s", "beta1", "beta2", "betaS", "betaI",
        "T1", "T2"}`` (float64).

    Raises:
        ValueError: a size, ratio or link is out of range (the message names the argument).
    """
    if len(latent) != 3 or min(latent) < 0 or latent[0] + latent[2] == 0 or latent[1] + latent[2] == 0:
        raise ValueError(f"latent_factor_data latent: expected (d1, d2, dS) >= 0 with d_i + dS > 0, got {latent}.")
    if len(p) != 2 or min(p) < 1:
        raise ValueError(f"latent_factor_data p: expected two feature sizes >= 1, got {p}.")
    if len(r) != 2 or not all(0.0 <= v <= 1.0 for v in r):
        raise ValueError(f"latent_factor_data r: expected two noise ratios in [0, 1], got {r}.")
    if len(g) != 3 or len(w) != 4:
        raise ValueError(f"latent_factor_data: expected g = (g1, g2, gS) and w = (w1, w2, wS, wI), got {g}, {w}.")
    if n < 2:
        raise ValueError(f"latent_factor_data n: expected at least 2 samples, got {n}.")
    d1, d2, ds = (int(v) for v in latent)
    rng = np.random.RandomState(seed)
    beta1 = rng.uniform(-3, 3, d1)
    beta2 = rng.uniform(-3, 3, d2)
    beta_s = rng.uniform(-3, 3, ds)
    beta_i = np.zeros(d1 * d2)
    nz = rng.choice(d1 * d2, size=int(d1 * d2 * 0.1), replace=False)
    beta_i[nz] = np.trunc(rng.uniform(-3, 3, len(nz)))  # the public code stores them in an int array
    t1 = rng.normal(0, 1, (d1 + ds, int(p[0])))
    t2 = rng.normal(0, 1, (d2 + ds, int(p[1])))

    rng = np.random.RandomState(seed)
    z1 = rng.normal(0, 1, (n, d1))
    z2 = rng.normal(0, 1, (n, d2))
    s = rng.normal(0, 1, (n, ds))
    xs = []
    for z, t, ratio, pi in ((z1, t1, r[0], p[0]), (z2, t2, r[1], p[1])):
        noise = rng.normal(0, 1, (n, int(pi)))
        base = np.hstack([z, s]) @ t
        base = (base - base.mean(axis=0)) / base.std(axis=0)
        xs.append(ratio * noise + (1 - ratio) * base)

    w1, w2, ws, wi = w
    y = w1 * (_g(z1, g[0]) @ beta1) + w2 * (_g(z2, g[1]) @ beta2) + ws * (_g(s, g[2]) @ beta_s)
    if wi != 0:
        y = y + wi * (np.einsum("ni,nj->nij", z1, z2).reshape(n, d1 * d2) @ beta_i)
    return {
        "x1": xs[0], "x2": xs[1], "y": y, "z1": z1, "z2": z2, "s": s,
        "beta1": beta1, "beta2": beta2, "betaS": beta_s, "betaI": beta_i, "T1": t1, "T2": t2,
    }  # fmt: skip


def paper_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """The public package's split: 20% test, then 20% of the rest as validation (1280 / 320 / 400 for n = 2000).

    Args:
        n: number of samples.
        seed: ``random_state`` of both ``train_test_split`` calls.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}`` row indices.
    """
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(np.arange(n), test_size=0.2, random_state=seed)
    train, val = train_test_split(rest, test_size=0.2, random_state=seed)
    return {"train": train, "val": val, "test": test}


def write_latent_table(
    out_dir: str | Path,
    latent: Sequence[int] = (20, 30, 0),
    p: Sequence[int] = (50, 40),
    r: Sequence[float] = (0.4, 0.4),
    g: Sequence[str] = ("lin", "lin", "lin"),
    w: Sequence[float] = (1.0, 1.0, 0.0, 0.0),
    seed: int = 1,
    n: int = 2000,
    missing_rate: float = 0.0,
    overwrite: bool = False,
) -> Path:
    """Write one draw as ``table.csv`` (+ ``signal.json``) for tabular Meta Fusion (regression).

    Columns: ``case_id``, ``m1_0 .. m1_{p1-1}``, ``m2_0 .. m2_{p2-1}``, ``y``, ``split`` (train/val/test by
    :func:`paper_split`). With ``missing_rate > 0`` each (row, modality) block is set to NaN with that
    probability (a row keeps at least one modality: when both are dropped, one is restored at random).

    Args:
        out_dir: folder to create (written atomically).
        latent: ``(d1, d2, dS)``.
        p: ``(p1, p2)``.
        r: ``(r1, r2)``.
        g: ``(g1, g2, gS)``.
        w: ``(w1, w2, wS, wI)``.
        seed: draw and split seed.
        n: rows.
        missing_rate: probability that a modality block of a row is missing.
        overwrite: replace an existing folder.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``missing_rate`` outside [0, 1) or invalid model arguments.
    """
    import pandas as pd

    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"write_latent_table missing_rate: expected a value in [0, 1), got {missing_rate}.")
    d = latent_factor_data(latent, p, r, g, w, seed, n)
    sp = paper_split(n, seed)
    split = np.empty(n, dtype=object)
    for name, idx in sp.items():
        split[idx] = name
    drop = np.random.default_rng(seed).random((n, 2)) < missing_rate
    both = drop.all(axis=1)
    keep = np.random.default_rng(seed + 1).integers(0, 2, n)
    drop[both, keep[both]] = False
    cols: dict[str, np.ndarray] = {"case_id": np.array([f"case_{i:05d}" for i in range(n)])}
    for j, key in enumerate(("x1", "x2")):
        x = d[key].copy()
        x[drop[:, j]] = np.nan
        cols.update({f"m{j + 1}_{k}": x[:, k] for k in range(x.shape[1])})
    frame = pd.DataFrame({**cols, "y": d["y"], "split": split})
    meta = {
        "model": "latent factor (BENCHMARKS.md B3)",
        "latent": list(latent), "p": list(p), "r": list(r), "g": list(g), "w": list(w),
        "seed": seed, "n": n, "missing_rate": missing_rate,
        "modalities": {"m1": [f"m1_{k}" for k in range(int(p[0]))], "m2": [f"m2_{k}" for k in range(int(p[1]))]},
        "target": "y",
        "missing_fraction": {"m1": float(drop[:, 0].mean()), "m2": float(drop[:, 1].mean())},
    }  # fmt: skip
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        frame.to_csv(tmp / "table.csv", index=False)
        (tmp / "signal.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)
