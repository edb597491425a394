"""B3: Meta Fusion simulation (paper Tables 1, 2, A5, A6) with ``medfusion.fusion.meta_fusion``.

Two-modality regression from a latent factor model (docs/benchmark_spec.md, sections "B3" and "B3 settings").
Per repetition with seed ``s`` (repetition r uses s = r + 1, as the paper's s = 1..100):

1. coefficients from ``np.random.RandomState(s)`` in the order beta1, beta2, betaS ~ U(-3, 3), interaction
   coefficients on a random 10% of the d1*d2 pairs (U(-3, 3) truncated towards zero, i.e. stored as integers
   in {-2..2}, as the public package does), loading matrices T_i ~ N(0, 1) of shape (d_i + dS) x p_i;
2. latents re-seeded with ``s``: Z1, Z2, S ~ N(0, 1), n = 2000;
3. B_i = [Z_i, S] T_i column-standardised over all n rows (population std), X_i = r_i N(0, 1) + (1 - r_i) B_i
   (modality 1's noise is drawn before modality 2's);
4. y = w1 g1(Z1) beta1 + w2 g2(Z2) beta2 + wS gS(S) betaS + wI (Z1 (x) Z2) betaI, g = identity ("lin") or
   z^2 - z ("quad"); no noise, y not standardised;
5. split with scikit-learn ``train_test_split(random_state=s)``: 400 test, then 320 validation of the remaining
   1600, leaving 1280 training rows (the public package's two-stage 80/20 split).

Arms (all MLPs trained with Adam lr 1e-3, MSE, batch 64, best-validation epoch kept):

* ``modality_1``, ``modality_2``: an MLP on raw X1 / X2 (the setting's student head sizes);
* ``early_fusion``: the same MLP on [X1, X2] (``early_fusion_spec``);
* ``late_fusion``: mean of the two unimodal predictions (``late_fusion_spec``, rule ``average``);
* ``meta_fusion``: the 24-student cohort (``build_cohort`` on the setting's latent grids; ``mlp:k`` extractors
  p -> 256 -> k for 1.1/2.1, ``pca:k`` fitted on train+validation otherwise), rho grid {0, 0.99, 3} chosen on the
  validation MSE of the selected ensemble (the library default; every rho's score under the three criteria is
  recorded, so the report also says what the public package's teachers rule would have chosen), K-means teachers,
  ensemble selection with weights ~ 1 / validation loss (rule ``ensemble``);
* ablations of the same fitted cohort: ``meta_fusion_no_ml`` (the same ensemble selection on the screened cohort,
  rho = 0: what mutual learning changes), ``best_single`` (after mutual learning), ``best_single_no_ml``
  (screening cohort, rho = 0), ``stacking`` (ridge on validation predictions), ``average``, ``weighted_average``;
* sanity rows: scikit-learn ``Ridge`` on raw X1, X2 and [X1, X2] (alpha chosen on validation from a log grid,
  refitted on train).

Metric: test MSE, mean (SE) over repetitions; the paper's values (100 repetitions) are printed beside ours.

Usage (results land in benchmarks/results/meta_fusion_simulation.{json,md,png}):

    OMP_NUM_THREADS=1 python benchmarks/meta_fusion_simulation.py --reps 10 --workers 2 --overwrite
    OMP_NUM_THREADS=1 python benchmarks/meta_fusion_simulation.py --quick      # smoke: 1 rep, 2 epochs
    OMP_NUM_THREADS=1 python benchmarks/meta_fusion_simulation.py --settings 1.1 2.1 --epochs 5 --reps 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from medfusion.data.synth_latent import latent_factor_data, paper_split  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_SAMPLES = 2000
MODS = ("m1", "m2")


@dataclass(frozen=True)
class Setting:
    """One B3 setting (BENCHMARKS.md "B3 settings" table)."""

    name: str
    latent: tuple[int, int, int]  # d1, d2, dS
    p: tuple[int, int]
    r: tuple[float, float]
    g: tuple[str, str, str]  # m1, m2, shared: "lin" or "quad"
    w: tuple[float, float, float, float]  # w1, w2, wS, wI
    extractor: str  # "mlp" or "pca"
    grid1: tuple[int, ...]  # latent sizes of modality 1 (0 = dropped)
    grid2: tuple[int, ...]
    head: tuple[int, ...]
    epochs: int


SETTINGS: dict[str, Setting] = {
    "1.1": Setting(
        "1.1",
        (20, 30, 0),
        (500, 400),
        (0.4, 0.4),
        ("lin", "lin", "lin"),
        (1, 1, 0, 0),
        "mlp",
        (0, 200, 300, 400, 500),
        (0, 100, 200, 300, 400),
        (128, 64),
        10,
    ),
    "1.2": Setting(
        "1.2",
        (20, 20, 0),
        (2000, 100),
        (0.1, 0.1),
        ("quad", "lin", "lin"),
        (1, 1, 0, 1),
        "pca",
        (0, 50, 60, 70, 80),
        (0, 60, 70, 80, 90),
        (300, 200, 100),
        30,
    ),
    "1.3": Setting(
        "1.3",
        (20, 20, 0),
        (2000, 100),
        (0.5, 0.1),
        ("quad", "lin", "lin"),
        (1, 1, 0, 1),
        "pca",
        (0, 50, 60, 70, 80),
        (0, 60, 70, 80, 90),
        (300, 200, 100),
        30,
    ),
    "2.1": Setting(
        "2.1",
        (50, 30, 20),
        (500, 400),
        (0.4, 0.4),
        ("lin", "lin", "lin"),
        (0, 0, 1, 0),
        "mlp",
        (0, 200, 300, 400, 500),
        (0, 100, 200, 300, 400),
        (128, 64),
        30,
    ),
    "2.2": Setting(
        "2.2",
        (50, 30, 20),
        (2000, 400),
        (0.3, 0.3),
        ("lin", "lin", "quad"),
        (0, 0, 1, 0),
        "pca",
        (0, 60, 80, 100, 120),
        (0, 60, 80, 100, 120),
        (300, 200, 100),
        30,
    ),
    "2.3": Setting(
        "2.3",
        (50, 30, 20),
        (2000, 400),
        (0.5, 0.3),
        ("lin", "lin", "quad"),
        (0, 0, 1, 0),
        "pca",
        (0, 60, 80, 100, 120),
        (0, 60, 80, 100, 120),
        (300, 200, 100),
        30,
    ),
}

# Paper values (test MSE, 100 repetitions), copied from docs/benchmark_spec.md section B3.
PAPER: dict[str, dict[str, float]] = {
    "modality_1": {"1.1": 94.18, "1.2": 180.71, "1.3": 206.44, "2.1": 5.30, "2.2": 75.23, "2.3": 113.93},
    "modality_2": {"1.1": 64.56, "1.2": 256.50, "1.3": 256.50, "2.1": 4.33, "2.2": 64.68, "2.3": 64.69},
    "early_fusion": {"1.1": 5.38, "1.2": 64.37, "1.3": 122.78, "2.1": 2.67, "2.2": 71.57, "2.3": 100.05},
    "late_fusion": {"1.1": 41.98, "1.2": 161.04, "1.3": 185.83, "2.1": 2.70, "2.2": 59.35, "2.3": 74.75},
    "cooperative_learning": {"1.1": 5.45, "1.2": 109.53, "1.3": 139.14, "2.1": 2.71, "2.2": 58.17, "2.3": 73.94},
    "meta_fusion": {"1.1": 5.07, "1.2": 38.51, "1.3": 49.59, "2.1": 2.47, "2.2": 52.27, "2.3": 53.38},
}

ARMS = [
    "modality_1",
    "modality_2",
    "early_fusion",
    "late_fusion",
    "cooperative_learning",
    "meta_fusion",
    "meta_fusion_no_ml",
    "best_single",
    "best_single_no_ml",
    "stacking",
    "average",
    "weighted_average",
    "ridge_modality_1",
    "ridge_modality_2",
    "ridge_early",
]
ARM_LABELS = {
    "modality_1": "Modality 1 (MLP)",
    "modality_2": "Modality 2 (MLP)",
    "early_fusion": "Early fusion (MLP)",
    "late_fusion": "Late fusion",
    "cooperative_learning": "Cooperative learning",
    "meta_fusion": "Meta Fusion (ensemble selection)",
    "meta_fusion_no_ml": "Ablation: ensemble selection, no mutual learning",
    "best_single": "Ablation: best single, with mutual learning",
    "best_single_no_ml": "Ablation: best single, no mutual learning",
    "stacking": "Ablation: stacking (ridge)",
    "average": "Ablation: simple average",
    "weighted_average": "Ablation: weighted average (1/val loss)",
    "ridge_modality_1": "Sanity: ridge on X1",
    "ridge_modality_2": "Sanity: ridge on X2",
    "ridge_early": "Sanity: ridge on [X1, X2]",
}
META_RULES = {  # arm -> a rule of medfusion.fusion.meta_fusion.AGGREGATION_RULES (checked in run_rep)
    "meta_fusion": "ensemble",
    "meta_fusion_no_ml": "ensemble_screen",
    "best_single": "best_single",
    "best_single_no_ml": "best_single_screen",
    "stacking": "stacking",
    "average": "average",
    "weighted_average": "weighted_average",
}
RIDGE_ALPHAS = tuple(10.0**k for k in range(-2, 5))


# ----------------------------------------------------------------------------------------------- data
def generate(setting: Setting, seed: int, n: int = N_SAMPLES) -> dict[str, np.ndarray]:
    """Draw one repetition of a B3 setting (:func:`medfusion.data.synth_latent.latent_factor_data`)."""
    return latent_factor_data(setting.latent, setting.p, setting.r, setting.g, setting.w, seed, n)


split_indices = paper_split


# ----------------------------------------------------------------------------------------------- arms
def _mf_data(d: dict[str, np.ndarray], idx: np.ndarray) -> Any:
    import torch

    from medfusion.fusion.meta_fusion import MetaFusionData

    x = {"m1": torch.tensor(d["x1"][idx], dtype=torch.float32), "m2": torch.tensor(d["x2"][idx], dtype=torch.float32)}
    return MetaFusionData(x, torch.ones(len(idx), 2, dtype=torch.bool), torch.tensor(d["y"][idx], dtype=torch.float32))


def _mse(pred: Any, y: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, dtype=np.float64) - y) ** 2))


def cohort_grids(setting: Setting) -> dict[str, list[str]]:
    """Per-modality extractor lists of the 24-student cohort (0 -> ``null``)."""
    kind = setting.extractor
    return {
        m: ["null" if k == 0 else f"{kind}:{k}" for k in grid] for m, grid in zip(MODS, (setting.grid1, setting.grid2))
    }


def ridge_arms(d: dict[str, np.ndarray], sp: dict[str, np.ndarray]) -> dict[str, float]:
    """Ridge on raw X1, X2, [X1, X2]: alpha picked on validation MSE, model refitted on train only."""
    from sklearn.linear_model import Ridge

    feats = {"ridge_modality_1": d["x1"], "ridge_modality_2": d["x2"], "ridge_early": np.hstack([d["x1"], d["x2"]])}
    out = {}
    y = d["y"]
    tr, va, te = sp["train"], sp["val"], sp["test"]
    for arm, x in feats.items():
        # alpha on validation with one SVD of the centred training matrix (= sklearn Ridge with intercept)
        mu, y_mu = x[tr].mean(axis=0), y[tr].mean()
        u, sv, vt = np.linalg.svd(x[tr] - mu, full_matrices=False)
        uty = u.T @ (y[tr] - y_mu)
        val_mse = []
        for a in RIDGE_ALPHAS:
            coef = vt.T @ (sv / (sv**2 + a) * uty)
            val_mse.append(_mse((x[va] - mu) @ coef + y_mu, y[va]))
        best = RIDGE_ALPHAS[int(np.argmin(val_mse))]
        model = Ridge(alpha=best).fit(x[tr], y[tr])
        out[arm] = _mse(model.predict(x[te]), y[te])
        out[f"{arm}_alpha"] = best
    return out


def run_rep(task: tuple[str, int, int | None]) -> dict[str, Any]:
    """One (setting, repetition): generate data, fit every arm, return the test MSEs and what Meta Fusion chose."""
    import torch

    from medfusion.fusion.cooperative import DEFAULT_RHO_GRID, fit_cooperative
    from medfusion.fusion.meta_fusion import MetaFusion, build_cohort, early_fusion_spec, get_rule, late_fusion_spec

    for arm, rule in META_RULES.items():  # names from the rule table: a typo fails before any fit
        get_rule(rule, "regression", f"META_RULES[{arm!r}]")
    torch.set_num_threads(1)
    name, seed, epochs_override = task
    st = SETTINGS[name]
    epochs = epochs_override or st.epochs
    t0 = time.time()
    d = generate(st, seed)
    sp = split_indices(N_SAMPLES, seed)
    tr, va, te = (_mf_data(d, sp[k]) for k in ("train", "val", "test"))
    y_te = d["y"][sp["test"]]
    in_dims = {"m1": st.p[0], "m2": st.p[1]}
    common: dict[str, Any] = {
        "task": "regression",
        "hidden": st.head,
        "epochs": epochs,
        "lr": 1e-3,
        "batch_size": 64,
        "seed": seed,
    }
    res: dict[str, Any] = {"setting": name, "seed": seed, "epochs": epochs}
    timing = {}

    t = time.time()
    late = MetaFusion(MODS, in_dims, **late_fusion_spec(MODS), **common).fit(tr, va)
    with torch.no_grad():
        outs = late.student_outputs(te.x, te.mask).numpy()  # [2, N]: the unimodal MLPs
        res["modality_1"] = _mse(outs[0], y_te)
        res["modality_2"] = _mse(outs[1], y_te)
        res["late_fusion"] = _mse(late.predict(te.x, te.mask, rule="average").numpy(), y_te)
    timing["unimodal_late"] = time.time() - t

    t = time.time()
    early = MetaFusion(MODS, in_dims, **early_fusion_spec(MODS), **common).fit(tr, va)
    with torch.no_grad():
        res["early_fusion"] = _mse(early.predict(te.x, te.mask, rule="best_single").numpy(), y_te)
    timing["early"] = time.time() - t

    t = time.time()
    coop, coop_scores = fit_cooperative(
        tr, va, MODS, hidden=st.head, rho_grid=DEFAULT_RHO_GRID, epochs=epochs, lr=1e-3, batch_size=64, seed=seed
    )
    with torch.no_grad():
        res["cooperative_learning"] = _mse(coop(te.x, te.mask).numpy(), y_te)
    res["coop_rho"] = float(coop.rho)
    res["coop_val_mse"] = {str(k): v for k, v in coop_scores.items()}
    timing["cooperative"] = time.time() - t

    t = time.time()
    mf = MetaFusion(
        MODS,
        in_dims,
        cohort=build_cohort(cohort_grids(st)),
        extractor_hidden=256,
        rho_grid=(0.0, 0.99, 3.0),
        pca_fit_on="train+val",
        ensemble_weighting="inverse_loss",
        **common,
    ).fit(tr, va)
    with torch.no_grad():
        for arm, rule in META_RULES.items():
            res[arm] = _mse(mf.predict(te.x, te.mask, rule=rule).numpy(), y_te)
    timing["meta_fusion"] = time.time() - t
    res["mf_rho"] = round(float(mf.rho), 4)  # float32 buffer: 0.99 -> 0.99000001
    res["mf_rho_scores"] = [float(v) for v in mf.rho_scores]
    res["mf_rho_criterion"] = mf.rho_criterion
    res["mf_rho_report"] = mf.rho_report
    res["mf_rho_ties"] = mf.summary()["rho_ties"]
    res["mf_n_clusters"] = int(mf.n_clusters)
    res["mf_teachers"] = [mf.student_names[i] for i in mf.teachers]
    res["mf_committee"] = mf.committee_summary()
    best = int(torch.argmin(mf.val_loss))
    res["mf_best_student"] = mf.student_names[best]

    t = time.time()
    res.update(ridge_arms(d, sp))
    timing["ridge"] = time.time() - t
    res["timing_s"] = timing
    res["wall_s"] = time.time() - t0
    res["load_end"] = list(os.getloadavg())
    return res


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    logging.getLogger("medfusion").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------- report
def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def summarise(records: list[dict[str, Any]], settings: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in ARMS:
        out[arm] = {}
        for s in settings:
            vals = [r[arm] for r in records if r["setting"] == s]
            m, se = mean_se(vals)
            out[arm][s] = {"mean": m, "se": se, "n": len(vals)}
    return out


def wins(records: list[dict[str, Any]], settings: list[str], a: str, b: str) -> dict[str, int]:
    """Per setting, the number of repetitions where arm ``a`` has a lower test MSE than arm ``b``."""
    return {s: sum(r[a] < r[b] for r in records if r["setting"] == s) for s in settings}


def fmt(m: float, se: float) -> str:
    if np.isnan(m):
        return "n/a"
    return f"{m:.2f} ({se:.2f})" if not np.isnan(se) else f"{m:.2f}"


def write_markdown(path: Path, meta: dict[str, Any], summary: dict, records: list[dict[str, Any]]) -> None:
    settings = meta["settings"]
    lines = ["# B3: Meta Fusion simulation", ""]
    if meta["reduced_budget"]:
        lines += [
            f"**Reduced budget (deviation from the paper's protocol): {meta['epochs_note']}.** "
            f"Repetitions: {meta.get('reps_done', meta['reps'])} per setting (paper: 100).",
            "",
        ]
    lines += [
        f"Command: `{meta['command']}`  ",
        f"Seeds: s = {meta['seeds']} (coefficients, latents, split and model initialisation all use s).  ",
        f"Wall time: {meta['wall_s'] / 60:.1f} min with {meta['workers']} worker process(es), one thread each; "
        f"load average at start {meta['load_start']}, at end {meta['load_end']}.  ",
        f"Versions: {meta['versions']}; machine: {meta['machine']}.",
        "",
        "## Test MSE, mean (SE) over repetitions: ours",
        "",
        "| arm | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for arm in ARMS:
        lines.append(
            f"| {ARM_LABELS[arm]} | "
            + " | ".join(fmt(summary[arm][s]["mean"], summary[arm][s]["se"]) for s in settings)
            + " |"
        )
    lines += ["", "## The paper's values (100 repetitions, copied from docs/benchmark_spec.md)", ""]
    lines += ["| arm | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for arm, vals in PAPER.items():
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(f"{vals[s]:.2f}" for s in settings) + " |")
    lines += ["", "## Ours vs paper, side by side (ours mean / paper)", ""]
    lines += ["| arm | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for arm in PAPER:
        if arm not in summary:
            lines.append(
                f"| {ARM_LABELS[arm]} | " + " | ".join(f"not run / {PAPER[arm][s]:.2f}" for s in settings) + " |"
            )
            continue
        lines.append(
            f"| {ARM_LABELS[arm]} | "
            + " | ".join(f"{summary[arm][s]['mean']:.2f} / {PAPER[arm][s]:.2f}" for s in settings)
            + " |"
        )
    lines += ["", "## Where Meta Fusion wins (repetitions with lower test MSE, out of n)", ""]
    lines += ["| Meta Fusion vs | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for other in ["modality_1", "modality_2", "early_fusion", "late_fusion", "cooperative_learning",
                  "meta_fusion_no_ml", "best_single", "best_single_no_ml", "stacking", "average", "weighted_average",
                  "ridge_early"]:  # fmt: skip
        w = wins(records, settings, "meta_fusion", other)
        lines.append(
            f"| {ARM_LABELS[other]} | "
            + " | ".join(f"{w[s]}/{summary['meta_fusion'][s]['n']}" for s in settings)
            + " |"
        )
    lines += ["", "## What Meta Fusion chose (per setting)", ""]
    lines += [
        "| setting | rho chosen (counts) | K-means k (median) | committee size (median, with multiplicity) "
        "| cooperative learning: rho chosen (counts) |"
    ]
    lines += ["|---|---|---|---|---|"]
    for s in settings:
        rs = [r for r in records if r["setting"] == s]
        rhos: dict[str, int] = {}
        for r in rs:
            key = f"{r['mf_rho']:g}"
            rhos[key] = rhos.get(key, 0) + 1
        ks = [r["mf_n_clusters"] for r in rs]
        sizes = [sum(r["mf_committee"].values()) for r in rs]
        coop: dict[str, int] = {}
        for r in rs:
            key = f"{r['coop_rho']:g}" if "coop_rho" in r else "not run"
            coop[key] = coop.get(key, 0) + 1
        lines.append(f"| {s} | {rhos} | {np.median(ks):.0f} | {np.median(sizes):.0f} | {coop} |")
    lines += mutual_learning_md(records, settings)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    path.write_text("\n".join(lines))


def mutual_learning_md(records: list[dict[str, Any]], settings: list[str]) -> list[str]:
    """How rho was chosen (ties, what the teachers' rule would have chosen) and what mutual learning changed."""
    from medfusion.fusion.meta_fusion import choose_rho

    lines = [
        "",
        "## The rho rule and what mutual learning changes",
        "",
        "rho is chosen on the validation MSE of the ensemble selected from each rho's cohort (`rho_criterion` "
        "below). 'teachers rule' = the public package's criterion (the teachers' mean validation MSE) applied to the "
        "same trained cohorts. Paired test-MSE differences (mean ± SE over repetitions, negative = mutual learning "
        "helped): Meta Fusion − the same ensemble selection without mutual learning (`meta_fusion_no_ml`), and best "
        "single student with − without mutual learning; 'fits with rho > 0' restricts to the repetitions where "
        "mutual learning was actually used.",
        "",
        "| setting | criterion | rho > 0 chosen | ties | teachers rule: rho > 0 | teachers rule: ties | one teacher "
        "| Δ ensemble (all) | Δ ensemble (fits with rho > 0) | Δ best single (all) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        rs = [r for r in records if r["setting"] == s and "mf_rho_report" in r]
        if not rs:
            continue
        teach = [choose_rho(r["mf_rho_report"], "teachers") for r in rs]
        d_ens = [r["meta_fusion"] - r["meta_fusion_no_ml"] for r in rs]
        d_pos = [r["meta_fusion"] - r["meta_fusion_no_ml"] for r in rs if r["mf_rho"] > 0]
        d_best = [r["best_single"] - r["best_single_no_ml"] for r in rs]
        lines.append(
            f"| {s} | {rs[0]['mf_rho_criterion']} | {sum(r['mf_rho'] > 0 for r in rs)}/{len(rs)} | "
            f"{sum(len(r['mf_rho_ties']) > 1 for r in rs)} | {sum(t[0] > 0 for t in teach)}/{len(rs)} | "
            f"{sum(len(t[1]) > 1 for t in teach)} | {sum(len(r['mf_teachers']) == 1 for r in rs)} | "
            f"{fmt(*mean_se(d_ens))} | {fmt(*mean_se(d_pos)) if d_pos else 'n/a'} (n={len(d_pos)}) | "
            f"{fmt(*mean_se(d_best))} |"
        )
    return lines


def plot(path: Path, summary: dict, settings: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ["modality_1", "modality_2", "early_fusion", "late_fusion", "cooperative_learning", "meta_fusion",
            "best_single", "best_single_no_ml", "stacking", "average", "weighted_average", "ridge_early"]  # fmt: skip
    ncol = min(3, len(settings))
    nrow = int(np.ceil(len(settings) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for ax, s in zip(axes.flat, settings):
        m = [summary[a][s]["mean"] for a in arms]
        se = [summary[a][s]["se"] for a in arms]
        colors = [
            "tab:red" if a == "meta_fusion" else ("tab:gray" if a.startswith("ridge") else "tab:blue") for a in arms
        ]
        ax.bar(range(len(arms)), m, yerr=np.nan_to_num(se), color=colors, alpha=0.8)
        for i, a in enumerate(arms):
            if a in PAPER:
                ax.plot(i, PAPER[a][s], "k_", markersize=14, markeredgewidth=2)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([a.replace("_", " ") for a in arms], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"setting {s} (black tick = paper)")
        ax.set_ylabel("test MSE")
    for ax in list(axes.flat)[len(settings) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--reps", type=int, default=10, help="repetitions per setting (seeds first_seed..)")
    p.add_argument("--first_seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=None, help="override every setting's epochs (reduced budget)")
    p.add_argument(
        "--max_epochs", type=int, default=None, help="cap: each setting uses min(its paper epochs, max_epochs)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 2 epochs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="meta_fusion_simulation", help="output file stem")
    p.add_argument("--overwrite", action="store_true", help="replace existing results with the same --out/--tag")
    p.add_argument("--render", type=Path, default=None, help="only rewrite the .md/.png from this results .json")
    p.add_argument(
        "--partial",
        type=Path,
        default=Path("/tmp/meta_fusion_simulation.partial.jsonl"),
        help="per-task records are appended here as they finish (header line first)",
    )
    p.add_argument(
        "--finalize_from", type=Path, default=None, help="write the results from a (possibly incomplete) --partial file"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        stem = args.render.with_suffix("")
        write_markdown(stem.with_suffix(".md"), saved["meta"], saved["summary"], saved["records"])
        plot(stem.with_suffix(".png"), saved["summary"], saved["meta"]["settings"])
        return 0
    if args.finalize_from is not None:
        lines = [json.loads(x) for x in args.finalize_from.read_text().splitlines() if x.strip()]
        head, recs = lines[0], lines[1:]
        wall = max(r["finished_at"] for r in recs) - head["t0"] if recs else 0.0
        finish(recs, head, wall, args.out / head["tag"], partial=True)
        return 0
    if (args.out / f"{args.tag}.md").exists() and not args.overwrite:
        p.error(f"{args.out / args.tag}.md exists; pass --overwrite to replace it")
    if args.quick:
        args.reps, args.epochs = 1, args.epochs or 2
    seeds = list(range(args.first_seed, args.first_seed + args.reps))
    epochs_used = {s: args.epochs or SETTINGS[s].epochs for s in args.settings}
    if args.max_epochs is not None:
        epochs_used = {s: min(e, args.max_epochs) for s, e in epochs_used.items()}
    # longest settings first so that the pool drains evenly
    order = sorted(args.settings, key=lambda s: -SETTINGS[s].epochs * SETTINGS[s].p[0])
    tasks = [(s, seed, epochs_used[s]) for seed in seeds for s in order]
    t0 = time.time()
    head = {
        "t0": t0,
        "tag": args.tag,
        "command": "OMP_NUM_THREADS=1 " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "settings": [s for s in SETTINGS if s in args.settings],
        "reps": args.reps,
        "seeds": seeds,
        "workers": args.workers,
        "epochs_used": epochs_used,
        "load_start": [round(v, 2) for v in os.getloadavg()],
    }
    args.partial.parent.mkdir(parents=True, exist_ok=True)
    args.partial.write_text(json.dumps(head) + "\n")
    records: list[dict[str, Any]] = []
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers, initializer=_init_worker) as pool:
        for r in pool.imap_unordered(run_rep, tasks):
            r["finished_at"] = time.time()
            records.append(r)
            with args.partial.open("a") as fh:
                fh.write(json.dumps(r, default=str) + "\n")
            logging.info(
                "done %s seed %d in %.0fs: MF %.2f early %.2f m1 %.2f m2 %.2f late %.2f ridge %.2f (%d/%d)",
                r["setting"], r["seed"], r["wall_s"], r["meta_fusion"], r["early_fusion"], r["modality_1"],
                r["modality_2"], r["late_fusion"], r["ridge_early"], len(records), len(tasks),
            )  # fmt: skip
    finish(records, head, time.time() - t0, args.out / args.tag, partial=False)
    return 0


def finish(records: list[dict[str, Any]], head: dict[str, Any], wall: float, stem: Path, partial: bool) -> None:
    """Summarise the records and write ``stem.{json,md,png}``."""
    import sklearn
    import torch

    records = sorted(records, key=lambda r: (r["setting"], r["seed"]))
    settings = [s for s in head["settings"] if any(r["setting"] == s for r in records)]
    summary = summarise(records, settings)
    epochs_used = {s: head["epochs_used"][s] for s in settings}
    reduced = any(epochs_used[s] < SETTINGS[s].epochs for s in settings)
    reps_done = {s: sum(r["setting"] == s for r in records) for s in settings}
    notes = [
        "Every number is the test MSE on 400 held-out rows; mean (SE) over repetitions, SE = sd / sqrt(reps).",
        "The unimodal, early and late baselines are MLPs with the setting's student head sizes on raw "
        "features, trained like the students (one MetaFusion preset each); late fusion averages the two "
        "unimodal MLPs' predictions.",
        "Meta Fusion = medfusion.fusion.meta_fusion.MetaFusion with the 24-student cohort, rho grid "
        "{0, 0.99, 3} (rho chosen by the validation MSE of the selected ensemble, the library default; the "
        "public package chooses it by the teachers' mean validation MSE), ensemble_weighting='inverse_loss'.",
        "Cooperative learning = medfusion.fusion.cooperative.fit_cooperative: one MLP per modality (the "
        "setting's head sizes) on raw features, prediction = sum of the two, loss 1/2 (y - f1 - f2)^2 + rho/2 "
        "(f1 - f2)^2 trained jointly by Adam (the neural variant of Ding et al.), rho in "
        "{0, 0.2, 0.4, 0.6, 0.8, 1, 3, 5, 9} chosen on validation MSE, best-validation epoch per rho.",
        "Ridge rows: scikit-learn Ridge on raw features, alpha in {1e-2..1e4} chosen on validation MSE "
        "(closed form via one SVD), refitted on the training split.",
        "The generator draws its random numbers in the public package's order (np.random.RandomState(s)), "
        "but the paper's exact numbers are not expected to be reproduced (different training code).",
    ]
    if partial:
        notes.insert(0, f"INCOMPLETE run finalised from the per-task log: repetitions done per setting {reps_done}.")
    meta = {
        **{k: v for k, v in head.items() if k not in ("t0", "epochs_used")},
        "settings": settings,
        "reps_done": reps_done,
        "epochs_used": epochs_used,
        "epochs_paper": {s: SETTINGS[s].epochs for s in settings},
        "reduced_budget": reduced,
        "epochs_note": ", ".join(f"{s}: {epochs_used[s]} epochs (paper {SETTINGS[s].epochs})" for s in settings),
        "wall_s": wall,
        "worker_s_per_rep": {s: float(np.mean([r["wall_s"] for r in records if r["setting"] == s])) for s in settings},
        "load_end": [round(v, 2) for v in os.getloadavg()],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
        },
        "machine": f"{platform.platform()}, {os.cpu_count()} cpus",
        "settings_table": {s: asdict(SETTINGS[s]) for s in settings},
        "notes": notes,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "paper": PAPER, "records": records}, indent=1, default=str)
    )
    write_markdown(stem.with_suffix(".md"), meta, summary, records)
    plot(stem.with_suffix(".png"), summary, settings)
    logging.info("wrote %s.{json,md,png} (wall %.1f min)", stem, wall / 60)


if __name__ == "__main__":
    sys.exit(main())
