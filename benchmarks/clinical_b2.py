"""B2: clinical phantom (EHR + CXR + report), noise (QMF protocol) and missingness (OmniFuse protocol).

Data: ``write_clinical_cohort`` (MIMIC-style layout, known signal shares ehr 0.40 / cxr 0.35 / report 0.25),
read with ``discover_mimic`` (AP and PA views, 48 h window, only stays with all three modalities so that the
noise protocol and the per-combination evaluation start from complete samples), transformed ONCE with
``clinical_transforms(mode="eval")`` (EHR standardised with a normaliser fitted on the training files) and stacked
in memory by ``medfusion.apps.api.stack_datalist`` into ``TensorData`` splits that every arm and seed reuses (cached
on disk too). No training augmentation (documented simplification for speed).

Every trained arm goes through the library's in-memory API (``medfusion.apps.api``), i.e. the clinical bundle's
components: ``fit`` (the recipe's head and kwargs from the method registry, ``build_method``, the bundles'
``MethodTrainer`` with per-epoch re-seeding; AdamW with weight decay 0 = Adam's update, no scheduler, no
validation), ``predict`` (the bundle's per-sample prediction rows, with the method outputs: QMF weights, OmniFuse
omega, per-modality logits, from which the per-modality CE is computed) and ``evaluate`` (``evaluate_classification``
without bootstrap: AUROC per combination). Cache version ``b2-v4``: the shuffling draws from the re-seeded global
generator, so the trained networks differ from those of the ``b2-v3`` runs behind the committed
``results/clinical_b2.*`` (same protocol, same settings, same noise draws and masks).

Noise protocol (QMF): every arm is trained on clean data; at test time, with probability 0.5 per sample and
modality, noise of strength eps in {0, 5, 10} (``medfusion.data.noise.add_modality_noise``, a batch-level
function: image Gaussian std 10*eps grey levels, report tokens -> [MASK] with probability 0.1*eps, EHR Gaussian
std ``--ehr_std_per_eps``*eps on the standardised continuous columns). ``--noise_draws`` noise draws per
(seed, eps); the same draws are used for every arm of a seed (paired comparison).
  * mean  = mean over seeds of the per-seed mean over draws; SE = std over seeds / sqrt(#seeds);
  * worst = minimum over all (seed, draw) evaluations (the QMF paper's "worst-case" reading), plus the
    mean +- SE over seeds of the per-seed minimum over draws.
  * Pearson r between QMF's per-sample fusion weight w_m and the per-sample CE of modality m's own logits
    (per modality and pooled over modalities; per seed, then mean +- SE); the same for OmniFuse's omega_m;
    late fusion's weights are constant (1/M) -> r undefined (n/a); MetaKD's IWV is global -> n/a.
  * QMF (weights detached in the fusion, the library default) against ``late_modality_ce`` (late fusion trained
    with the same per-modality cross-entropy, its fair baseline) and ``qmf_no_detach`` (gradient through the weights,
    the earlier default), paired per seed; on the clean test set each QMF network's logit level per modality (mean
    logsumexp of z_m, = 10 w_m) and its AUROC with energy weights vs equal weights (sum of the modality logits).
  * Every arm's training losses over the last epoch (``final_losses``), so the ablations can be seen exercised
    (e.g. OmniFuse's imputation loss L_fw, MetaKD's KD share and how far its weights moved).

Missingness protocol (OmniFuse): per-modality missing rate r in --missing_rates: each (sample, modality) is
dropped independently with probability r by a seeded numpy generator at load time (mask + zeroed input, train
AND test); when all three are dropped one uniformly chosen modality is restored (so the effective rate is
slightly below r, reported). Rate 0 reuses the noise protocol's clean-trained models (identical setup).
Reported: AUROC on the test set masked at the same rate, and AUROC per modality combination on the
full-modality test set (each sample evaluated under all 7 combinations) with the mean over combinations.
Arms: concat, OmniFuse full, OmniFuse without imputation (``omnifuse_no_imputation``, the architecture-preserving
ablation ``OmniFuseHead(impute="off")``: same predictor and joint head, classifiers on the observed embeddings, no
L_fw/L_bw), QMF, MetaKD; rates 0, 10, ..., 90 % by default; seeds
``--missing_seeds`` (default: ``--seeds``). "One modality missing at a time" (test-time variant): every model of
the sweep is also evaluated with ONLY modality m dropped, from each test sample w.p. r, for each m (the limit
"m removed from every sample" is the two-modality combination column). The paired difference OmniFuse full -
without imputation is tabulated per rate.

Every unit (one noise seed incl. its rate-0 evaluations, one missing (rate, seed, arm)) is cached as JSON under
``--data``/b2_runs/<hash of the configuration>, so an interrupted run resumes and several processes can share
the work (``--no_cache`` disables it). The interpretation section of the markdown is generated from the numbers.

Meta Fusion arm (``meta_fusion``, issue #5; ``--skip_meta_fusion`` leaves it out): the bundle recipe
(``bundles/clinical_fusion/configs/meta_fusion.json``) without extra encoder training. Stage (a) = the concat arm
of the same seed (noise protocol) / the same (rate, seed) (missingness protocol); stages (b)-(d) = pooled encoder
features of train (the protocol's train mask) and val (complete, as MetaKD's meta steps use it; ``--mf_val masked``
drops val at the same rate with its own seeded generator, which makes the per-student validation losses
incomparable: a three-modality student is then scored on the few complete val samples), ``fit_meta_fusion`` over
``default_grids`` (null / identity / pca:8 per modality -> 26 students), ``attach_head`` on a deep copy of the
concat network; then evaluated exactly like the other arms (same noise draws, same test masks). Its units are
cached separately (name prefix = hash of the Meta Fusion settings ``--mf_*``), so adding the arm keeps the other
arms' cache; when the concat unit is cached but its network is gone, concat is retrained with the same seed and
the clean/masked test AUROC is compared with the cached one (``concat_checks`` in the json). The paired difference
meta_fusion - concat (same encoders) is tabulated, and what Meta Fusion chose (rho, teachers, committee) per seed.

Usage (results land in benchmarks/results/clinical_b2.{json,md} and figures beside them):

    OMP_NUM_THREADS=1 python benchmarks/clinical_b2.py --seeds 0 1 2 3 4 --missing_seeds 0 1 2 --overwrite
    OMP_NUM_THREADS=1 python benchmarks/clinical_b2.py --quick        # smoke run (tiny, seconds)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from scipy.special import logsumexp

from medfusion.apps.api import FittedModel, TensorData, evaluate, fit, predict, stack_datalist
from medfusion.apps.meta_fusion_stages import extract_features
from medfusion.data.clinical import clinical_transforms
from medfusion.data.ehr import fit_ehr_normalizer
from medfusion.data.mimic import discover_mimic
from medfusion.data.noise import add_modality_noise
from medfusion.data.synth_clinical import write_clinical_cohort
from medfusion.evaluation.classification import classification_metrics
from medfusion.fusion.meta_fusion_head import attach_head, default_grids, fit_meta_fusion
from medfusion.fusion.omnifuse import OmniFuseHead
from medfusion.modality import combination_name, combinations

RESULTS = Path(__file__).resolve().parent / "results"
MODS = ("ehr", "cxr", "report")
KINDS = {"ehr": "ehr", "cxr": "image", "report": "text"}
NOISE_ARMS = [
    "ehr_only",
    "cxr_only",
    "report_only",
    "concat",
    "late",
    "late_modality_ce",
    "mean_features",
    "qmf",
    "qmf_no_detach",
    "omnifuse",
    "omnifuse_no_imputation",
    "metakd",
]
"""Arm names = recipe names of ``medfusion.fusion.recipes`` (``<modality>_only`` = concat on one modality)."""
MISSING_ARMS = ["concat", "omnifuse", "omnifuse_no_imputation", "qmf", "metakd"]
META = "meta_fusion"  # fitted on the concat arm's encoders (stages (b)-(d)); not trained by ``train_arm``
META_VERSION = "mf-v2"  # v2: rho chosen on the selected ensemble's validation loss
LOADS: list[dict[str, Any]] = []
CACHE_VERSION = "b2-v4"  # v4: arms trained by medfusion.apps.api.fit (per-epoch re-seeding, global-RNG shuffling)
# v3: QMF weights detached, MetaKD meta_steps, omnifuse_no_imputation, recipe names


def record_load(phase: str) -> None:
    la = os.getloadavg()
    LOADS.append({"phase": phase, "time": time.time(), "load_1m": la[0], "load_5m": la[1], "load_15m": la[2]})


# ----------------------------------------------------------------------------------------------- data
def load_data(args: argparse.Namespace) -> tuple[dict[str, TensorData], dict[str, Any]]:
    """Generate (once) the cohort, transform every split ONCE and stack it in memory (``stack_datalist``)."""
    cohort = args.data / f"cohort{args.samples}"
    info_path = args.data / f"cohort{args.samples}.json"
    if not info_path.exists():
        info = write_clinical_cohort(
            cohort, samples=args.samples, seed=args.cohort_seed, image_size=64, manifest_cohort=False, overwrite=True
        )
        info_path.write_text(json.dumps(info, default=str))
    info = json.loads(info_path.read_text())
    key = f"s{args.image_size}_l{args.max_length}_t{args.ehr_timestep}"
    cache = args.data / f"tensors{args.samples}_{key}_v2.pt"
    if cache.exists():
        stored = torch.load(cache, weights_only=False)
        return {s: TensorData.from_batch(b, MODS) for s, b in stored.items()}, info
    lists = {
        s: discover_mimic(
            cohort / "ehr",
            cohort / "cxr",
            cohort / "reports",
            split=s,
            views=("AP", "PA"),
            require=MODS,
        )
        for s in ("train", "val", "test")
    }
    normalizer = fit_ehr_normalizer([d["ehr"] for d in lists["train"]], timestep=args.ehr_timestep)
    tf = clinical_transforms(
        KINDS,
        mode="eval",
        image_size=args.image_size,
        ehr_timestep=args.ehr_timestep,
        ehr_normalizer=normalizer,
        max_length=args.max_length,
    )
    data = {s: stack_datalist(dl, tf, MODS) for s, dl in lists.items()}
    torch.save({s: d.as_batch() for s, d in data.items()}, cache)
    return data, info


def masked(data: TensorData, mask: np.ndarray | None) -> TensorData:
    """``data`` with modalities removed where the bool [N, 3] ``mask`` is False (``None``: unchanged)."""
    return data if mask is None else data.with_mask(mask)


# ----------------------------------------------------------------------------------------------- models
def encoder_specs(args: argparse.Namespace, t_steps: int) -> dict[str, dict[str, Any]]:
    return {
        "ehr": {"name": "mlp", "in_features": t_steps * 76, "hidden": [64], "out_dim": 32, "dropout": 0.2},
        "cxr": {"name": "resnet10", "spatial_dims": 2, "widen_factor": args.cnn_width},
        "report": {"name": "bert_tiny"},
    }


def train_arm(arm: str, data: dict[str, TensorData], args, seed: int, mask=None) -> FittedModel:
    """Train one arm (recipe name, or ``<modality>_only`` = concat on one modality) with ``medfusion.apps.api.fit``.

    ``mask``: bool [N_train, 3] presence mask of the training split (missingness protocol; ``None`` = complete).
    """
    specs = encoder_specs(args, int(data["train"].inputs["ehr"].shape[1]))
    recipe = "concat" if arm.endswith("_only") else arm
    mods = (arm[: -len("_only")],) if arm.endswith("_only") else MODS
    kw: dict[str, Any] = {}
    meta = None
    if recipe.startswith("metakd"):
        kw = {
            "alpha": args.metakd_alpha if recipe != "metakd_no_kd" else 0.0,
            "meta_interval": args.meta_interval,
            "meta_steps": args.meta_steps,
        }
        meta = data["val"]  # complete val split, shuffled: MetaKD's meta-validation batches
    elif recipe.startswith("qmf"):
        kw = {"lam": args.qmf_lambda}
    return fit(
        recipe,
        {m: specs[m] for m in mods},
        masked(data["train"], mask),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        method_kwargs=kw,
        meta=meta,
        seed=seed,
        device="cpu",
    )


def per_sample(model: Any, data: TensorData) -> dict[str, np.ndarray]:
    """``medfusion.apps.api.predict`` as arrays: P(class 1), label and, when the head has them, the fusion weights
    [N, M], OmniFuse's omega [N, M], the per-modality logits z [N, M, K] and each modality's own CE [N, M]."""
    p = predict(model, data, device="cpu")
    res = {"prob": p["prob_1"].to_numpy(float), "label": p["label"].to_numpy(float)}
    for key in ("weights", "omega"):
        cols = [f"{key}_{m}" for m in MODS]
        if all(c in p for c in cols):
            res[key] = p[cols].to_numpy(float)
    k = sum(c.startswith("prob_") for c in p.columns)
    if all(f"modality_logits_{m}_0" in p for m in MODS):
        z = np.stack([p[[f"modality_logits_{m}_{j}" for j in range(k)]].to_numpy(float) for m in MODS], 1)
        y = res["label"].astype(int)
        res["z"] = z
        res["ce"] = logsumexp(z, axis=-1) - np.take_along_axis(z, y[:, None, None].repeat(len(MODS), 1), -1)[..., 0]
    return res


def qmf_levels(model: FittedModel, test: TensorData) -> dict[str, Any]:
    """A QMF network on a clean set: logit level per modality (mean logsumexp z_m), mean weight, and the AUROC
    with the energy weights vs equal weights (softmax of the sum of the present modalities' logits)."""
    pr = per_sample(model, test)
    z, w, y = pr["z"], pr["weights"], pr["label"]
    lse = logsumexp(z, axis=-1)  # [N, M]
    zsum = z.sum(1)
    eq = np.exp(zsum[:, 1] - logsumexp(zsum, axis=-1))
    return {
        "logit_level": {m: float(lse[:, j].mean()) for j, m in enumerate(MODS)},
        "mean_weight": {m: float(w[:, j].mean()) for j, m in enumerate(MODS)},
        "auroc_energy_weights": metrics(pr["prob"], y)["auroc"],
        "auroc_equal_weights": metrics(eq, y)["auroc"],
    }


def metrics(prob: np.ndarray, label: np.ndarray) -> dict[str, float]:
    m = classification_metrics(np.stack([1 - prob, prob], 1), label.astype(int))
    return {"accuracy": m["accuracy"], "auroc": m["auroc"]}


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def mean_se(values) -> tuple[float, float]:
    a = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), (float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan"))


def drop_mask(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """bool [n, 3]: each modality dropped w.p. ``rate``; a sample losing all gets one random modality back."""
    keep = rng.random((n, len(MODS))) >= rate
    empty = ~keep.any(1)
    keep[np.flatnonzero(empty), rng.integers(0, len(MODS), int(empty.sum()))] = True
    return keep


# ----------------------------------------------------------------------------------------------- run cache
class RunCache:
    """Per-unit JSON results (one noise seed, one missing (rate, seed, arm)) so an interrupted run can resume.

    Args:
        root: directory of this configuration's results (``None`` disables caching).
    """

    def __init__(self, root: Path | None):
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> Any:
        if self.root is None or not (self.root / f"{name}.json").exists():
            return None
        return json.loads((self.root / f"{name}.json").read_text())

    def put(self, name: str, obj: Any) -> None:
        if self.root is None:
            return
        tmp = self.root / f"{name}.json.tmp"
        tmp.write_text(json.dumps(obj, default=float))
        tmp.replace(self.root / f"{name}.json")


def cache_root(args: argparse.Namespace) -> Path | None:
    """Directory keyed by every argument that changes a trained model or an evaluation."""
    if args.no_cache:
        return None
    keys = (
        "samples cohort_seed image_size max_length ehr_timestep cnn_width epochs batch_size lr qmf_lambda "
        "metakd_alpha meta_interval meta_steps eps noise_draws ehr_std_per_eps"
    ).split()
    blob = json.dumps({"version": CACHE_VERSION, **{k: getattr(args, k) for k in keys}}, sort_keys=True)
    return args.data / "b2_runs" / hashlib.sha1(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- meta fusion
def noise_arms(args: argparse.Namespace) -> list[str]:
    """Arms reported in the noise protocol (the trained arms + Meta Fusion unless skipped)."""
    return NOISE_ARMS + ([] if args.skip_meta_fusion else [META])


def missing_arms(args: argparse.Namespace) -> list[str]:
    """Arms of the missingness sweep (the trained arms + Meta Fusion unless skipped)."""
    return MISSING_ARMS + ([] if args.skip_meta_fusion else [META])


def meta_kwargs(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """``MetaFusion`` keyword arguments of the arm (CLI ``--mf_*``; the student seed is the arm's seed)."""
    return {
        "epochs": int(args.mf_epochs),
        "hidden": [int(h) for h in args.mf_hidden],
        "rho_grid": tuple(float(r) for r in args.mf_rho_grid),
        "lr": float(args.mf_lr),
        "batch_size": int(args.mf_batch_size),
        "seed": int(seed),
    }


def meta_tag(args: argparse.Namespace, missing: bool = True) -> str:
    """Cache-name prefix of the Meta Fusion units: hash of every Meta Fusion setting (the rest is in the root).

    ``missing=False`` (noise units, complete data): ``--mf_val`` does not matter and is left out.
    """
    val = {"val": args.mf_val} if missing else {}
    blob = json.dumps({"version": META_VERSION, **val, **meta_kwargs(args, 0)}, sort_keys=True)
    return "mf" + hashlib.sha1(blob.encode()).hexdigest()[:8]


def meta_val_mask(args: argparse.Namespace, seed: int, rate: float, n_val: int) -> np.ndarray | None:
    """Presence mask of the val split for Meta Fusion's selection steps (``None`` = complete val).

    ``--mf_val full`` (default): the complete val split (as MetaKD uses it); ``masked``: dropped at the protocol's
    rate like train and test, from a generator of its own (the train/test draws of :func:`missing_masks` are
    unchanged).
    """
    if rate == 0 or args.mf_val == "full":
        return None
    return drop_mask(n_val, rate, np.random.default_rng([seed, int(round(rate * 100)), 13]))


def fit_meta_fusion_arm(
    concat_net: torch.nn.Module,
    data: dict[str, TensorData],
    args: argparse.Namespace,
    seed: int,
    tr_mask: np.ndarray | None = None,
    val_mask: np.ndarray | None = None,
) -> tuple[torch.nn.Module, dict[str, Any], float]:
    """Meta Fusion stages (b)-(d) on a trained concat network (which is left unchanged).

    Args:
        concat_net: the concat arm's trained network (stage (a)).
        data: stacked splits.
        args: CLI arguments (``--mf_*``).
        seed: the arm's seed (Meta Fusion student seed).
        tr_mask: bool [N_train, 3] presence mask of the training split (``None`` = complete).
        val_mask: bool [N_val, 3] presence mask of the val split (``None`` = complete).

    Returns:
        (deep copy of ``concat_net`` with the fitted ``meta_fusion`` head, in eval mode; what Meta Fusion chose;
        seconds of stages (b)-(d)).
    """
    t0 = time.time()
    net = copy.deepcopy(concat_net).eval()
    feats = {
        split: extract_features(net, masked(data[split], mask).batches(256), MODS, device="cpu")
        for split, mask in (("train", tr_mask), ("val", val_mask))
    }
    grids = default_grids(MODS, {m: int(feats["train"].x[m].shape[1]) for m in MODS})
    head = fit_meta_fusion(feats["train"], feats["val"], grids, num_classes=2, **meta_kwargs(args, seed))
    attach_head(net, head)
    s = head.meta.summary()
    committee = {k: int(v) for k, v in s["committee"].items()}
    choices = {
        "rho": float(s["rho"]),
        "rho_scores": [float(v) for v in s["rho_scores"]],
        "rho_criterion": s["rho_criterion"],
        "rho_ties": s["rho_ties"],
        "rho_report": head.meta.rho_report,
        "n_students": len(s["students"]),
        "n_clusters": int(s["n_clusters"]),
        "n_teachers": len(s["teachers"]),
        "teachers": s["teachers"],
        "committee_size": int(sum(committee.values())),
        "committee_distinct": len(committee),
        "committee": committee,
        "in_dims": {m: int(feats["train"].x[m].shape[1]) for m in MODS},
    }
    return net.eval(), choices, time.time() - t0


def concat_check(net: Any, data, cached_auroc: float, te_mask: np.ndarray | None) -> dict[str, Any]:
    """Retrained concat network vs the cached concat unit: same test AUROC (deterministic retraining)?"""
    pr = per_sample(net, masked(data["test"], te_mask))
    got = metrics(pr["prob"], pr["label"])["auroc"]
    same = bool(abs(got - cached_auroc) < 1e-9)
    if not same:
        logging.getLogger("clinical_b2").warning(
            "retrained concat AUROC %.6f differs from the cached %.6f (Meta Fusion uses the retrained one)",
            got,
            cached_auroc,
        )
    return {"cached_auroc": float(cached_auroc), "retrained_auroc": float(got), "identical": same}


def meta_noise_unit(data, args, seed: int, concat_net: torch.nn.Module, concat_sec: float) -> dict[str, Any]:
    """Meta Fusion unit of one noise seed: clean fit, clean test row, noise evaluations, rate-0 evaluations."""
    net, choices, sec = fit_meta_fusion_arm(concat_net, data, args, seed)
    pr = per_sample(net, data["test"])
    m = metrics(pr["prob"], pr["label"])
    row = {"seed": seed, "arm": META, "train_s": concat_sec + sec, "fit_s": sec, **m, "choices": choices}
    print(
        f"seed {seed} {META}: stages (b)-(d) {sec:.0f}s, clean test acc {m['accuracy']:.3f} auroc {m['auroc']:.3f}; "
        f"rho {choices['rho']:g}, {choices['n_teachers']} teachers, committee {choices['committee_size']} "
        f"({choices['committee_distinct']} distinct)",
        flush=True,
    )
    full = np.ones((len(data["test"]), len(MODS)), dtype=bool)
    return {
        "extras": [row],
        "noise": noise_eval_seed(data, args, seed, {META: net}),
        "rate0": {META: missing_eval(net, data, 0.0, seed, META, full, float("nan"))},
    }


def paired_stats(series: pd.Series, a: str, b: str, at: float) -> dict[str, Any]:
    """Paired difference a - b over seeds of a per-(arm, level, seed) series at one level (eps or rate)."""
    series = series.sort_index()
    x, y = series.loc[a, at], series.loc[b, at]
    diff = (x - y.reindex(x.index)).to_numpy()
    m, s = mean_se(diff)
    return {"mean": m, "se": s, "positive_seeds": int((diff > 0).sum()), "seeds": int(np.isfinite(diff).sum())}


# ----------------------------------------------------------------------------------------------- protocols
def noise_eval_seed(data, args, seed, models) -> dict[str, list[dict[str, Any]]]:
    """All noise evaluations of one training seed (every eps and draw, every arm on the same noisy test set)."""
    rows, corr_rows, weight_rows = [], [], []
    test = data["test"]
    for ei, eps in enumerate(args.eps):
        draws = 1 if eps == 0 else args.noise_draws
        for d in range(draws):
            gen = torch.Generator().manual_seed(10_000 + 100 * seed + 10 * ei + d)
            noisy_batch, noisy_mask = add_modality_noise(
                test.as_batch(),
                KINDS,
                float(eps),
                p=0.5,
                generator=gen,
                modalities=MODS,
                ehr_std_per_eps=args.ehr_std_per_eps,
            )
            noisy = TensorData.from_batch(noisy_batch, MODS)
            for arm, model in models.items():
                pr = per_sample(model, noisy)
                rows.append({"seed": seed, "eps": eps, "draw": d, "arm": arm, **metrics(pr["prob"], pr["label"])})
                for key, name in (("weights", "qmf_weight"), ("omega", "omnifuse_omega")):
                    if key not in pr or "ce" not in pr:
                        continue
                    w, ce = pr[key], pr["ce"]
                    r_mod = {m: pearson(w[:, j], ce[:, j]) for j, m in enumerate(MODS)}
                    corr_rows.append(
                        {
                            "seed": seed,
                            "eps": eps,
                            "draw": d,
                            "arm": arm,
                            "quantity": name,
                            **{f"r_{m}": v for m, v in r_mod.items()},
                            "r_pooled": pearson(w.reshape(-1), ce.reshape(-1)),
                        }
                    )
                    nm = noisy_mask.numpy()
                    for j, m in enumerate(MODS):
                        weight_rows.append(
                            {
                                "seed": seed,
                                "eps": eps,
                                "draw": d,
                                "arm": arm,
                                "quantity": name,
                                "modality": m,
                                "mean_weight_clean": float(w[~nm[:, j], j].mean()) if (~nm[:, j]).any() else np.nan,
                                "mean_weight_noisy": float(w[nm[:, j], j].mean()) if nm[:, j].any() else np.nan,
                            }
                        )
    return {"rows": rows, "corr": corr_rows, "weights": weight_rows}


def noise_protocol(raw: dict[str, list[dict[str, Any]]], results: dict[str, Any]):
    """Summarise the noise evaluations of all seeds (mean, worst case, weight/loss correlation)."""
    df = pd.DataFrame(raw["rows"])
    summary = []
    for (arm, eps), part in df.groupby(["arm", "eps"], sort=False):
        per_seed = part.groupby("seed")
        row: dict[str, Any] = {"arm": arm, "eps": eps, "evaluations": len(part), "seeds": int(part["seed"].nunique())}
        for met in ("accuracy", "auroc"):
            row[f"{met}_mean"], row[f"{met}_se"] = mean_se(per_seed[met].mean().to_numpy())
            row[f"{met}_worst"] = float(part[met].min())
            row[f"{met}_seedworst_mean"], row[f"{met}_seedworst_se"] = mean_se(per_seed[met].min().to_numpy())
        summary.append(row)
    summary_df = pd.DataFrame(summary)
    corr_df = pd.DataFrame(raw["corr"])
    corr_summary = []
    if not corr_df.empty:
        for (arm, q, eps), part in corr_df.groupby(["arm", "quantity", "eps"], sort=False):
            per_seed = part.groupby("seed")[[c for c in part.columns if c.startswith("r_")]].mean()
            row = {"arm": arm, "quantity": q, "eps": eps}
            for c in per_seed.columns:
                row[f"{c}_mean"], row[f"{c}_se"] = mean_se(per_seed[c].to_numpy())
            corr_summary.append(row)
    weight_df = pd.DataFrame(raw["weights"])
    weight_summary = (
        weight_df.groupby(["arm", "quantity", "eps", "modality"])[["mean_weight_clean", "mean_weight_noisy"]]
        .mean()
        .reset_index()
        if not weight_df.empty
        else pd.DataFrame()
    )
    results["noise"] = {
        "raw": df.to_dict(orient="records"),
        "summary": summary_df.to_dict(orient="records"),
        "correlation": corr_summary,
        "weights_clean_vs_noisy": weight_summary.to_dict(orient="records"),
    }
    return summary_df, pd.DataFrame(corr_summary), weight_summary


def missing_masks(seed: int, rate: float, n_tr: int, n_te: int) -> tuple[np.ndarray, np.ndarray]:
    """Random-modality-missing train and test masks of one (seed, rate) (same draws as earlier runs)."""
    rng = np.random.default_rng([seed, int(round(rate * 100)), 7])
    return drop_mask(n_tr, rate, rng), drop_mask(n_te, rate, rng)


def single_missing_mask(n: int, rate: float, seed: int, j: int) -> np.ndarray:
    """bool [n, 3]: only modality ``j`` is dropped, from each sample independently w.p. ``rate``."""
    rng = np.random.default_rng([seed, int(round(rate * 100)), 11, j])
    keep = np.ones((n, len(MODS)), dtype=bool)
    keep[:, j] = rng.random(n) >= rate
    return keep


def missing_eval(net, data, rate: float, seed: int, arm: str, te_mask: np.ndarray, sec: float) -> dict[str, Any]:
    """Masked-test AUROC, per-combination AUROC (full test) and one-modality-at-a-time AUROC of one model."""
    test = data["test"]
    n_te = len(test)
    pr = per_sample(net, masked(test, te_mask))
    row = {"rate": rate, "seed": seed, "arm": arm, "train_s": sec, **metrics(pr["prob"], pr["label"])}
    summary = evaluate(net, test, n_bootstrap=0, device="cpu")  # every sample under every combination it can form
    combo_rows = [
        {
            "rate": rate,
            "seed": seed,
            "arm": arm,
            "combination": name,
            **{k: float(summary.loc[name, k]) for k in ("accuracy", "auroc")},
        }
        for name in [combination_name(c) for c in combinations(MODS)]
    ]
    single_rows = []
    for j, mod in enumerate(MODS):
        mask = single_missing_mask(n_te, rate, seed, j)
        ps = per_sample(net, masked(test, mask))
        single_rows.append(
            {
                "rate": rate,
                "seed": seed,
                "arm": arm,
                "removed": mod,
                "removed_fraction": float(1 - mask[:, j].mean()),
                **metrics(ps["prob"], ps["label"]),
            }
        )
    return {"row": row, "combo_rows": combo_rows, "single_rows": single_rows}


def missing_protocol(data, args, rate0: dict[tuple[int, str], dict[str, Any]], cache: RunCache, results):
    """Random-missing sweep (train AND test at rate r), evaluated masked, per combination and one-at-a-time.

    Meta Fusion (unless skipped) is fitted on the concat network of the same (rate, seed): the one trained just
    before in this loop, or, when the concat unit came from the cache, concat retrained with the same seed and mask.
    Its choices and concat reproducibility checks are appended to ``results["meta_fusion"]``.
    """
    rows, combo_rows, single_rows, eff = [], [], [], []
    test = data["test"]
    combo_names = [combination_name(c) for c in combinations(MODS)]
    n_tr, n_te, n_val = len(data["train"]), len(test), len(data["val"])
    tag = meta_tag(args)
    for seed in args.missing_seeds:
        for rate in args.missing_rates:
            tr_mask, te_mask = missing_masks(seed, rate, n_tr, n_te)
            eff.append(
                {
                    "rate": rate,
                    "seed": seed,
                    "train_missing_fraction": float(1 - tr_mask.mean()),
                    "test_missing_fraction": float(1 - te_mask.mean()),
                    "train_complete_fraction": float(tr_mask.all(1).mean()),
                }
            )
            concat_live: tuple[torch.nn.Module, float] | None = None  # concat network trained in this (seed, rate)
            concat_res: dict[str, Any] | None = None
            for arm in missing_arms(args):
                if rate == 0:
                    res = rate0[(seed, arm)]
                elif arm == META:
                    name = f"{tag}_missing_r{int(round(rate * 100)):02d}_s{seed}"
                    res = cache.get(name)
                    if res is None:
                        check = None
                        if concat_live is None:
                            if concat_res is None:
                                raise RuntimeError("missing protocol: the concat arm must run before meta_fusion")
                            fitted = train_arm("concat", data, args, seed, mask=tr_mask)
                            check = concat_check(fitted, data, concat_res["row"]["auroc"], te_mask)
                            concat_live = (fitted.network, fitted.seconds)
                        mf_net, choices, sec = fit_meta_fusion_arm(
                            concat_live[0], data, args, seed, tr_mask, meta_val_mask(args, seed, rate, n_val)
                        )
                        res = missing_eval(mf_net, data, rate, seed, arm, te_mask, concat_live[1] + sec)
                        res.update(choices=choices, fit_s=sec, concat_check=check)
                        cache.put(name, res)
                    results["meta_fusion"]["choices"].append(
                        {"protocol": "missing", "rate": rate, "seed": seed, **res["choices"]}
                    )
                    if res["concat_check"] is not None:
                        results["meta_fusion"]["concat_checks"].append(
                            {"protocol": "missing", "rate": rate, "seed": seed, **res["concat_check"]}
                        )
                else:
                    name = f"missing_r{int(round(rate * 100)):02d}_s{seed}_{arm}"
                    res = cache.get(name)
                    if res is None:
                        fitted = train_arm(arm, data, args, seed, mask=tr_mask)
                        res = missing_eval(fitted, data, rate, seed, arm, te_mask, fitted.seconds)
                        res["final_losses"] = fitted.epoch_losses()
                        cache.put(name, res)
                        if arm == "concat":
                            concat_live = (fitted.network, fitted.seconds)
                    if arm == "concat":
                        concat_res = res
                rows.append(res["row"])
                combo_rows += res["combo_rows"]
                single_rows += res["single_rows"]
                print(
                    f"missing {rate:.1f} seed {seed} {arm}: auroc {res['row']['auroc']:.3f} "
                    f"({res['row']['train_s']:.0f}s)",
                    flush=True,
                )
            record_load(f"missing seed {seed} rate {rate}")
    df, cdf, sgl = pd.DataFrame(rows), pd.DataFrame(combo_rows), pd.DataFrame(single_rows)
    summary = []
    for (arm, rate), part in df.groupby(["arm", "rate"], sort=False):
        row: dict[str, Any] = {"arm": arm, "rate": rate, "seeds": int(part["seed"].nunique())}
        row["auroc_masked_test_mean"], row["auroc_masked_test_se"] = mean_se(part["auroc"])
        row["accuracy_masked_test_mean"], row["accuracy_masked_test_se"] = mean_se(part["accuracy"])
        cpart = cdf[(cdf["arm"] == arm) & (cdf["rate"] == rate)]
        per_seed_mean = cpart.groupby("seed")["auroc"].mean()
        row["auroc_combo_mean_mean"], row["auroc_combo_mean_se"] = mean_se(per_seed_mean.to_numpy())
        for name in combo_names:
            row[f"auroc_{name}_mean"], row[f"auroc_{name}_se"] = mean_se(
                cpart[cpart["combination"] == name]["auroc"].to_numpy()
            )
        spart = sgl[(sgl["arm"] == arm) & (sgl["rate"] == rate)]
        row["auroc_single_mean_mean"], row["auroc_single_mean_se"] = mean_se(
            spart.groupby("seed")["auroc"].mean().to_numpy()
        )
        for mod in MODS:
            row[f"auroc_minus_{mod}_mean"], row[f"auroc_minus_{mod}_se"] = mean_se(
                spart[spart["removed"] == mod]["auroc"].to_numpy()
            )
        summary.append(row)
    sdf = pd.DataFrame(summary)
    # paired (same seed, same masks) differences: OmniFuse full - without imputation; Meta Fusion - concat
    # (same encoders)
    per_seed = {
        "masked_test": df.set_index(["arm", "rate", "seed"])["auroc"],
        "combo_mean": cdf.groupby(["arm", "rate", "seed"])["auroc"].mean(),
        "single_mean": sgl.groupby(["arm", "rate", "seed"])["auroc"].mean(),
    }

    def paired_by_rate(a: str, b: str) -> list[dict[str, Any]]:
        out = []
        for rate in args.missing_rates:
            row: dict[str, Any] = {"rate": rate}
            for label, series in per_seed.items():
                st = paired_stats(series, a, b, rate)
                row["seeds"] = st["seeds"]
                row[f"diff_{label}_mean"], row[f"diff_{label}_se"] = st["mean"], st["se"]
                row[f"diff_{label}_positive_seeds"] = st["positive_seeds"]
            out.append(row)
        return out

    paired = paired_by_rate("omnifuse", "omnifuse_no_imputation")
    pdf = pd.DataFrame(paired)
    mf_paired = [] if args.skip_meta_fusion else paired_by_rate(META, "concat")
    if not args.skip_meta_fusion:
        results["meta_fusion"]["minus_concat_missing"] = mf_paired
    results["missing"] = {
        "raw": df.to_dict(orient="records"),
        "per_combination_raw": cdf.to_dict(orient="records"),
        "one_at_a_time_raw": sgl.to_dict(orient="records"),
        "summary": sdf.to_dict(orient="records"),
        "omnifuse_minus_no_imputation": pdf.to_dict(orient="records"),
        "effective_missingness": eff,
    }
    return sdf, combo_names, pd.DataFrame(eff), pdf, pd.DataFrame(mf_paired)


# ----------------------------------------------------------------------------------------------- report
def paired_rate_rows(paired: pd.DataFrame) -> list[str]:
    """Markdown rows of a paired-difference table per missing rate (masked test, 7-combo mean, one at a time)."""
    rows = []
    for _, r in paired.iterrows():
        cells = []
        for k in ("masked_test", "combo_mean", "single_mean"):
            cells += [fmt(r[f"diff_{k}_mean"], r[f"diff_{k}_se"]), str(int(r[f"diff_{k}_positive_seeds"]))]
        rows.append(f"| {100 * r['rate']:.0f}% | {int(r['seeds'])} | " + " | ".join(cells) + " |")
    return rows


def fmt(m: float, s: float, scale: float = 100.0) -> str:
    if not np.isfinite(m):
        return "n/a"
    return f"{scale * m:.1f}" + ("" if not np.isfinite(s) else f" ± {scale * s:.1f}")


def plot_missing(sdf: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    panels = [
        ("auroc_masked_test", "test masked at the same rate (random modality missing)"),
        ("auroc_single_mean", "test: one modality missing at a time at rate r\n(mean over the 3 modalities)"),
        ("auroc_combo_mean", "full test set, mean over 7 combinations"),
        ("auroc_ehr+cxr+report", "full test set, all three modalities"),
    ]
    for ax, (col, title) in zip(axes, panels):
        for arm, part in sdf.groupby("arm", sort=False):
            part = part.sort_values("rate")
            ax.errorbar(
                100 * part["rate"],
                part[f"{col}_mean"],
                yerr=part[f"{col}_se"],
                marker="o",
                ms=3,
                capsize=2,
                ls="--" if arm == "omnifuse_no_imputation" else "-",
                label=arm,
            )
        ax.set_xlabel("training missing rate per modality (%)")
        ax.set_ylabel("AUROC")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("B2 missingness: AUROC vs train+test missing rate (mean ± SE over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_single(sdf: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODS), figsize=(13, 3.8), sharey=True)
    for ax, mod in zip(axes, MODS):
        for arm, part in sdf.groupby("arm", sort=False):
            part = part.sort_values("rate")
            ax.errorbar(
                100 * part["rate"],
                part[f"auroc_minus_{mod}_mean"],
                yerr=part[f"auroc_minus_{mod}_se"],
                marker="o",
                ms=3,
                capsize=2,
                ls="--" if arm == "omnifuse_no_imputation" else "-",
                label=arm,
            )
        ax.set_xlabel("missing rate r (%)")
        ax.set_title(f"test: only {mod} missing, in a fraction r of samples", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AUROC")
    axes[0].legend(fontsize=7)
    fig.suptitle("B2 one modality missing at a time (models trained with random missing at rate r)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_noise(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, met in zip(axes, ("accuracy", "auroc")):
        for arm, part in summary.groupby("arm", sort=False):
            part = part.sort_values("eps")
            style = "--" if arm.endswith("_only") else "-"
            ax.errorbar(
                part["eps"], part[f"{met}_mean"], yerr=part[f"{met}_se"], ls=style, marker="o", capsize=3, label=arm
            )
        ax.set_xlabel("noise strength epsilon (50% of samples per modality)")
        ax.set_ylabel(met)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("B2 noise (QMF protocol): mean ± SE over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def qmf_md(
    args: argparse.Namespace, extras: list[dict[str, Any]], noise_rows: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown: QMF vs its fair baseline and vs the non-detached variant (paired), and what its weights did."""
    per_seed = pd.DataFrame(noise_rows).groupby(["arm", "eps", "seed"])["auroc"].mean().sort_index()
    L = [
        "### QMF against late fusion with the same per-modality loss, and the fusion-weight detach",
        "",
        "Paired AUROC differences (points; per-seed mean over draws, then mean ± SE over seeds; seeds > 0). "
        "`late_modality_ce` trains late fusion with QMF's per-modality cross-entropy (weight 1), so qmf − "
        "late_modality_ce isolates the energy weighting (+ ranking regulariser); qmf − qmf_no_detach isolates the "
        "detach of the weights in the fused prediction.",
        "",
        "| eps | qmf − late_modality_ce | seeds > 0 | qmf − qmf_no_detach | seeds > 0 | late_modality_ce − late "
        "| seeds > 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    paired = []
    for e in args.eps:
        cells, row = [], {"eps": e}
        for a, b in (("qmf", "late_modality_ce"), ("qmf", "qmf_no_detach"), ("late_modality_ce", "late")):
            st = paired_stats(per_seed, a, b, e)
            row[f"{a}-{b}"] = st
            cells += [fmt(st["mean"], st["se"]), f"{st['positive_seeds']}/{st['seeds']}"]
        paired.append(row)
        L.append(f"| {e:g} | " + " | ".join(cells) + " |")
    L += [
        "",
        "Each QMF network on the clean test set (mean over seeds): logit level per modality = mean logsumexp(z_m) "
        "(= 10 w_m), and the AUROC of the same network fused with its energy weights vs with equal weights (sum of "
        "the modality logits). With gradient through the weights the fused loss can be lowered by raising one "
        "modality's logit level.",
        "",
        "| arm | " + " | ".join(f"level {m}" for m in MODS) + " | AUROC energy weights | AUROC equal weights |",
        "|---|" + "---|" * (len(MODS) + 2),
    ]
    for arm in ("qmf", "qmf_no_detach"):
        rows = [e["qmf"] for e in extras if e["arm"] == arm and "qmf" in e]
        if not rows:
            continue
        lv = {m: mean_se([r["logit_level"][m] for r in rows]) for m in MODS}
        en, eq = mean_se([r["auroc_energy_weights"] for r in rows]), mean_se([r["auroc_equal_weights"] for r in rows])
        L.append(f"| {arm} | " + " | ".join(fmt(*lv[m], scale=1.0) for m in MODS) + f" | {fmt(*en)} | {fmt(*eq)} |")
    return L + [""], paired


def exercised_md(extras: list[dict[str, Any]]) -> list[str]:
    """Markdown: every trained arm's losses over its last epoch (mean over seeds), to show each was exercised."""
    L = [
        "### Were the methods exercised? Training losses over the last epoch (mean over seeds)",
        "",
        "| arm | losses (last epoch) | other |",
        "|---|---|---|",
    ]
    for arm in NOISE_ARMS:
        rows = [e for e in extras if e["arm"] == arm and "final_losses" in e]
        if not rows:
            continue
        keys = list(rows[0]["final_losses"])
        cells = ", ".join(f"{k} {np.mean([r['final_losses'].get(k, np.nan) for r in rows]):.3f}" for k in keys)
        other = ""
        if arm.startswith("metakd") and "iwv" in rows[0]:
            dev = np.mean([max(abs(v - 1 / len(MODS)) for v in r["iwv"].values()) for r in rows])
            kd = np.mean([r["final_losses"].get("kd_loss", 0.0) for r in rows])
            task = np.mean([r["final_losses"].get("task_loss", np.nan) for r in rows])
            other = (
                f"alpha·KD / task {0.1 * kd / task:.3f}; max abs(softmax(w) − 1/3) {dev:.3f}; meta steps "
                f"{int(np.mean([r.get('meta_steps', 0) for r in rows]))}"
            )
        if arm.startswith("omnifuse") and "fw_loss" in keys:
            other = "imputation losses off" if np.mean([r["final_losses"]["fw_loss"] for r in rows]) == 0 else ""
        L.append(f"| {arm} | {cells} | {other} |")
    return L + [""]


def meta_fusion_md(args: argparse.Namespace, results: dict[str, Any], mf_noise: pd.DataFrame) -> list[str]:
    """Markdown: what Meta Fusion chose per (protocol, rate) and seed, and its paired noise difference to concat."""
    ch = pd.DataFrame(results["meta_fusion"]["choices"])
    L = [
        "### Meta Fusion: what it chose (per seed) and the paired difference to concat under noise",
        "",
        "Per fit: rho chosen on validation (grid "
        f"{list(args.mf_rho_grid)}), number of teachers (lowest-loss K-means cluster of the screened students), "
        "committee size with multiplicity / distinct students (Caruana selection), out of "
        f"{int(ch['n_students'].iloc[0]) if len(ch) else 'n/a'} students. Values listed per seed "
        "(noise protocol: clean training; missingness: trained at rate r).",
        "",
        "| protocol | rate | seeds | rho | teachers | committee (size/distinct) |",
        "|---|---|---|---|---|---|",
    ]
    for (proto, rate), part in ch.groupby(["protocol", "rate"], sort=False):
        part = part.sort_values("seed")
        L.append(
            f"| {proto} | {100 * rate:.0f}% | {', '.join(str(s) for s in part['seed'])} | "
            + ", ".join(f"{r:g}" for r in part["rho"])
            + " | "
            + ", ".join(str(int(t)) for t in part["n_teachers"])
            + " | "
            + ", ".join(f"{int(a)}/{int(b)}" for a, b in zip(part["committee_size"], part["committee_distinct"]))
            + " |"
        )
    if "rho_report" in ch:
        counter = rho_counterfactual(ch)
        L += [
            "",
            f"rho rule: chosen on the validation loss of the selected ensemble (`rho_criterion="
            f"{ch['rho_criterion'].iloc[0]}`). Over the {len(ch)} fits: rho > 0 chosen {counter['chosen_positive']}x; "
            f"ties reported {counter['ties']}x; the public package's rule (teachers' mean validation loss) would "
            f"have chosen rho > 0 {counter['teachers_positive']}x and tied {counter['teachers_ties']}x (fits with one "
            f"teacher: {counter['one_teacher']}); the two rules agree in {counter['agree']}/{len(ch)} fits.",
        ]
    checks = results["meta_fusion"]["concat_checks"]
    if checks:
        same = sum(bool(c["identical"]) for c in checks)
        L += [
            "",
            f"Concat retrained for Meta Fusion (its unit was cached without the network) {len(checks)}x; test AUROC "
            f"identical to the cached concat unit in {same}/{len(checks)} cases"
            + ("." if same == len(checks) else " — the Meta Fusion of the others uses a slightly different network."),
        ]
    L += [
        "",
        "Noise protocol, meta_fusion − concat AUROC (points; per-seed mean over draws, then mean ± SE over seeds):",
        "",
        "| eps | seeds | difference | seeds > 0 |",
        "|---|---|---|---|",
    ]
    for _, r in mf_noise.iterrows():
        L.append(
            f"| {r['eps']:g} | {int(r['diff_auroc_seeds'])} | {fmt(r['diff_auroc_mean'], r['diff_auroc_se'])} | "
            f"{int(r['diff_auroc_positive_seeds'])} |"
        )
    return L + [""]


def rho_counterfactual(ch: pd.DataFrame) -> dict[str, int]:
    """How often rho > 0 was chosen, ties, and what the teachers' rule would have chosen from the same cohorts."""
    from medfusion.fusion.meta_fusion import choose_rho

    teach_pos = teach_ties = agree = 0
    for _, r in ch.iterrows():
        t_rho, tied = choose_rho(r["rho_report"], "teachers")
        teach_pos += int(t_rho > 0)
        teach_ties += int(len(tied) > 1)
        agree += int(t_rho == r["rho"])
    return {
        "chosen_positive": int((ch["rho"] > 0).sum()),
        "ties": int(sum(len(t) > 1 for t in ch["rho_ties"])),
        "teachers_positive": teach_pos,
        "teachers_ties": teach_ties,
        "one_teacher": int((ch["n_teachers"] == 1).sum()),
        "agree": agree,
    }


def _sig(mean: float, se: float) -> str:
    """'beyond +2 SE' / 'beyond -2 SE' / 'within 2 SE' / 'SE n/a' for a paired difference."""
    if not np.isfinite(se):
        return "SE n/a"
    return "beyond +2 SE" if mean > 2 * se else "beyond −2 SE" if mean < -2 * se else "within 2 SE"


def meta_fusion_reading(
    args: argparse.Namespace, results: dict[str, Any], mf_noise: pd.DataFrame | None, mf_missing: pd.DataFrame | None
) -> list[str]:
    """Generated reading lines of the Meta Fusion arm (paired difference to concat, what it chose)."""
    L = []
    if mf_noise is not None and len(mf_noise):
        L.append(
            "* Meta Fusion − concat (same encoders, paired over seeds), noise: "
            + "; ".join(
                f"eps={r['eps']:g} {100 * r['diff_auroc_mean']:+.1f} points "
                f"({_sig(r['diff_auroc_mean'], r['diff_auroc_se'])}, "
                f"{int(r['diff_auroc_positive_seeds'])}/{int(r['diff_auroc_seeds'])} seeds > 0)"
                for _, r in mf_noise.iterrows()
            )
            + "."
        )
    if mf_missing is not None and len(mf_missing):
        pos = mf_missing[mf_missing["rate"] > 0]
        parts = []
        for k, label in (
            ("masked_test", "masked test"),
            ("combo_mean", "mean of 7 combinations"),
            ("single_mean", "one-at-a-time"),
        ):
            d = pos[f"diff_{k}_mean"].to_numpy()
            if not len(d):
                continue
            sig_pos = int((pos[f"diff_{k}_mean"] > 2 * pos[f"diff_{k}_se"]).sum())
            sig_neg = int((pos[f"diff_{k}_mean"] < -2 * pos[f"diff_{k}_se"]).sum())
            parts.append(
                f"{label} mean over r>0 {100 * np.nanmean(d):+.1f} points, positive at {int((d > 0).sum())}/{len(d)} "
                f"rates, beyond +2 SE at {sig_pos}, beyond −2 SE at {sig_neg}"
            )
        if parts:
            L.append("* Meta Fusion − concat, missingness: " + "; ".join(parts) + ".")
    ch = pd.DataFrame(results["meta_fusion"]["choices"])
    if len(ch):
        rho = ch["rho"].value_counts().sort_index()
        L.append(
            f"* Meta Fusion choices over its {len(ch)} fits: rho "
            + ", ".join(f"{r:g} {n}x" for r, n in rho.items())
            + f"; teachers {ch['n_teachers'].min()}–{ch['n_teachers'].max()} (mean {ch['n_teachers'].mean():.1f}) of "
            f"{int(ch['n_students'].iloc[0])} students; committee {ch['committee_size'].min()}–"
            f"{ch['committee_size'].max()} members ({ch['committee_distinct'].mean():.1f} distinct on average)."
        )
    return L


def reading(args, nsum, csum, wsum, msum, paired, results, mf_noise=None, mf_missing=None) -> list[str]:
    """The interpretation section, generated from the numbers of this run (no hand-written claims)."""
    L = ["## Reading of this run (generated from the numbers above by the script)", ""]
    emax = max(args.eps)
    fusion = [a for a in noise_arms(args) if not a.endswith("_only")]
    ns = nsum.set_index(["arm", "eps"])

    def au(arm, eps, col="auroc_mean"):
        return 100 * float(ns.loc[(arm, eps), col])

    for e in args.eps:
        part = nsum[(nsum["eps"] == e) & nsum["arm"].isin(fusion)].sort_values("auroc_mean", ascending=False)
        top, second = part.iloc[0], part.iloc[1]
        gap = 100 * (top["auroc_mean"] - second["auroc_mean"])
        se = 100 * max(top["auroc_se"], second["auroc_se"])
        L.append(
            f"* Noise eps={e:g}: best fusion arm by mean AUROC is **{top['arm']}** ({100 * top['auroc_mean']:.1f}), "
            f"then {second['arm']} ({100 * second['auroc_mean']:.1f}); gap {gap:.1f} points "
            + ("(SE n/a)" if not np.isfinite(se) else "(within 2 SE)" if gap <= 2 * se else "(more than 2 SE)")
            + f"; concat {au('concat', e):.1f}, late {au('late', e):.1f}, qmf {au('qmf', e):.1f}"
            + ("." if args.skip_meta_fusion else f", meta_fusion {au(META, e):.1f}.")
        )
    wc = nsum[(nsum["eps"] == emax) & nsum["arm"].isin(fusion)].sort_values("auroc_worst", ascending=False)
    L.append(
        f"* Worst case at eps={emax:g} (minimum over all seeds and draws): best {wc.iloc[0]['arm']} "
        f"({100 * wc.iloc[0]['auroc_worst']:.1f}), worst {wc.iloc[-1]['arm']} ({100 * wc.iloc[-1]['auroc_worst']:.1f})."
    )
    singles = {a: au(a, 0.0) for a in NOISE_ARMS if a.endswith("_only")}
    best_single = max(singles, key=singles.__getitem__)
    L.append(
        f"* Clean (eps=0): QMF {au('qmf', 0.0):.1f} vs late fusion {au('late', 0.0):.1f} and the best single "
        f"modality {best_single} {singles[best_single]:.1f}"
        + (" — QMF is below the best single modality." if au("qmf", 0.0) < singles[best_single] else ".")
    )
    if not wsum.empty:
        q0 = wsum[(wsum["arm"] == "qmf") & (wsum["eps"] == 0)].set_index("modality")["mean_weight_clean"]
        qn = wsum[(wsum["arm"] == "qmf") & (wsum["eps"] == emax)].set_index("modality")
        if len(q0):
            L.append(
                "* QMF mean energy weight on clean data: "
                + ", ".join(f"{m} {q0[m]:.2f}" for m in MODS)
                + f"; at eps={emax:g}, weight on clean vs noisy samples: "
                + ", ".join(
                    f"{m} {qn.loc[m, 'mean_weight_clean']:.2f} -> {qn.loc[m, 'mean_weight_noisy']:.2f}" for m in MODS
                )
                + " (a quality-aware weight should DROP on noisy samples)."
            )
    if not csum.empty:
        for arm in ("qmf", "qmf_no_detach", "omnifuse", "omnifuse_no_imputation"):
            part = csum[(csum["arm"] == arm) & (csum["eps"] == emax)]
            if len(part):
                r = part.iloc[0]
                L.append(
                    f"* Pearson r (weight vs the modality's own per-sample CE) for {arm} at eps={emax:g}: "
                    + ", ".join(f"{m} {r[f'r_{m}_mean']:+.2f}" for m in MODS)
                    + f", pooled {r['r_pooled_mean']:+.2f} (negative = weight tracks quality)."
                )
        L.append(
            "  (OmniFuse's omega_m is built from the OTHER modalities' confidences, so a positive r for the OmniFuse "
            "arms is not a quality signal in QMF's sense.)"
        )
    if msum is not None and paired is not None:
        ms = msum.set_index(["arm", "rate"])
        rates = [r for r in args.missing_rates if r > 0]
        for col, label in (
            ("auroc_masked_test_mean", "masked test"),
            ("auroc_single_mean_mean", "one-at-a-time test"),
            ("auroc_combo_mean_mean", "mean of 7 combinations"),
        ):
            wins = {a: 0 for a in missing_arms(args)}
            for r in rates:
                wins[max(missing_arms(args), key=lambda a: ms.loc[(a, r), col])] += 1
            L.append(
                f"* Missingness, {label}: best arm per rate (r>0, {len(rates)} rates) — "
                + ", ".join(f"{a} {n}x" for a, n in wins.items() if n)
                + "; mean over r>0: "
                + ", ".join(
                    f"{a} {100 * np.mean([ms.loc[(a, r), col] for r in rates]):.1f}" for a in missing_arms(args)
                )
                + "."
            )
        for k, label in (("masked_test", "masked test"), ("combo_mean", "mean of 7 combinations")):
            pos = paired[paired["rate"] > 0]
            d = pos[f"diff_{k}_mean"].to_numpy()
            sig_pos = int((pos[f"diff_{k}_mean"] > 2 * pos[f"diff_{k}_se"]).sum())
            sig_neg = int((pos[f"diff_{k}_mean"] < -2 * pos[f"diff_{k}_se"]).sum())
            L.append(
                f"* Imputation (omnifuse − omnifuse_no_imputation), {label}: mean over r>0 {100 * d.mean():+.1f} "
                "points; "
                f"positive at {int((d > 0).sum())}/{len(d)} rates; beyond +2 SE at {sig_pos}, beyond −2 SE at "
                f"{sig_neg} rates. At r=0: {100 * float(paired[paired['rate'] == 0][f'diff_{k}_mean'].iloc[0]):+.1f}."
            )
        drop = {
            m: np.mean([ms.loc[(a, r), f"auroc_minus_{m}_mean"] for a in missing_arms(args) for r in rates])
            for m in MODS
        }
        worst = min(drop, key=drop.__getitem__)
        L.append(
            "* One modality missing at a time: mean AUROC over arms and r>0 when only m is missing — "
            + ", ".join(f"{m} {100 * v:.1f}" for m, v in drop.items())
            + f"; losing {worst} hurts most."
        )
    if not args.skip_meta_fusion:
        L += meta_fusion_reading(args, results, mf_noise, mf_missing)
    L += [
        "",
        f"Caveats: {results['split_sizes_complete_cases']['test']} complete test cases, "
        f"{len(args.seeds)} seeds (noise) / {len(args.missing_seeds)} seeds (missingness), small encoders, "
        f"{args.epochs} epochs, no augmentation; SEs are over seeds only (test set fixed). The EHR noise scale "
        f"({args.ehr_std_per_eps}·eps SD) is a choice of this benchmark (`--ehr_std_per_eps`).",
        "",
    ]
    return L


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (noise protocol)")
    p.add_argument(
        "--missing_seeds", type=int, nargs="+", default=None, help="seeds of the missingness sweep (subset of --seeds)"
    )
    p.add_argument("--samples", type=int, default=900, help="cohort size (70/10/20 split by the generator)")
    p.add_argument("--cohort_seed", type=int, default=1234)
    p.add_argument("--image_size", type=int, default=48)
    p.add_argument("--max_length", type=int, default=96)
    p.add_argument("--ehr_timestep", type=float, default=2.0)
    p.add_argument("--cnn_width", type=float, default=0.25, help="ResNet10 widen_factor")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--qmf_lambda", type=float, default=0.1)
    p.add_argument("--metakd_alpha", type=float, default=0.1)
    p.add_argument("--meta_interval", type=int, default=10)
    p.add_argument("--meta_steps", type=int, default=20, help="MetaKD meta steps per meta update")
    p.add_argument("--eps", type=float, nargs="+", default=[0.0, 5.0, 10.0])
    p.add_argument("--noise_draws", type=int, default=3)
    p.add_argument("--ehr_std_per_eps", type=float, default=0.2)
    p.add_argument("--missing_rates", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(10)])
    p.add_argument("--no_cache", action="store_true", help="do not read/write the per-unit result cache")
    p.add_argument("--skip_missing", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 200 samples, 2 epochs")
    p.add_argument("--skip_meta_fusion", action="store_true", help="leave out the meta_fusion arm")
    p.add_argument("--mf_epochs", type=int, default=30, help="Meta Fusion epochs per student run")
    p.add_argument("--mf_hidden", type=int, nargs="+", default=[64, 32], help="Meta Fusion student hidden sizes")
    p.add_argument("--mf_rho_grid", type=float, nargs="+", default=[0.0, 0.99, 3.0], help="mutual-learning rho grid")
    p.add_argument("--mf_lr", type=float, default=1e-3)
    p.add_argument("--mf_batch_size", type=int, default=64)
    p.add_argument(
        "--mf_val",
        choices=("masked", "full"),
        default="full",
        help="missingness protocol: Meta Fusion's val split complete (default, as MetaKD) or masked at the rate",
    )
    p.add_argument("--data", type=Path, default=Path("/tmp/medfusion_bench_clinical"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--overwrite", action="store_true", help="replace existing clinical_b2.{md,json} results")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.samples, args.epochs, args.noise_draws = [0], 200, 2, 1
        args.missing_rates = [0.0, 0.6]
        args.missing_seeds = [0]
        args.out = args.out / "quick"
    if (args.out / "clinical_b2.md").exists() and not args.overwrite:
        p.error(f"{args.out / 'clinical_b2.md'} exists; pass --overwrite to replace it")
    if args.missing_seeds is None:
        args.missing_seeds = list(args.seeds)
    if not set(args.missing_seeds) <= set(args.seeds):
        p.error(f"--missing_seeds {args.missing_seeds} must be a subset of --seeds {args.seeds} (rate 0 reuses them)")
    if 0.0 not in args.missing_rates:
        p.error(f"--missing_rates {args.missing_rates} must contain 0 (the clean-trained reference)")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    args.data.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    record_load("start")

    data, info = load_data(args)
    sizes = {s: len(d) for s, d in data.items()}
    prevalence = {s: float(cast(torch.Tensor, d.label).float().mean()) for s, d in data.items()}  # labelled splits
    print(f"data loaded in {time.time() - t_start:.0f}s: {sizes}, prevalence {prevalence}", flush=True)
    record_load("data loaded")
    import monai

    results: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "cohort": {k: v for k, v in info.items() if k not in ("out",)},
        "split_sizes_complete_cases": sizes,
        "prevalence": prevalence,
    }

    # ---- noise protocol: train every arm on clean data (one cached unit per seed; the clean models' rate-0
    # missingness evaluations are computed here too, so the models are not kept in memory)
    cache = RunCache(cache_root(args))
    results["cache_dir"] = str(cache.root)
    train_time: dict[str, list[float]] = {a: [] for a in noise_arms(args)}
    results["meta_fusion"] = {
        "enabled": not args.skip_meta_fusion,
        "kwargs": {k: v for k, v in meta_kwargs(args, 0).items() if k != "seed"},
        "seed": "the arm's training seed",
        "grids": "default_grids (null / identity / pca:8 per modality)",
        "val": args.mf_val,
        "cache_prefix": {"noise": meta_tag(args, missing=False), "missing": meta_tag(args)},
        "choices": [],
        "concat_checks": [],
    }
    extras: list[dict[str, Any]] = []
    noise_raw: dict[str, list[dict[str, Any]]] = {"rows": [], "corr": [], "weights": []}
    rate0: dict[tuple[int, str], dict[str, Any]] = {}
    n_te = len(data["test"])
    logging.getLogger("medfusion.train").setLevel(logging.WARNING)
    for seed in args.seeds:
        unit = cache.get(f"noise_s{seed}")
        concat_live: tuple[torch.nn.Module, float] | None = None
        if unit is None:
            models: dict[str, Any] = {}
            unit = {"extras": [], "rate0": {}}
            for arm in NOISE_ARMS:
                fitted = train_arm(arm, data, args, seed)
                models[arm] = fitted
                sec = fitted.seconds
                pr = per_sample(fitted, data["test"])
                m = metrics(pr["prob"], pr["label"])
                row = {"seed": seed, "arm": arm, "train_s": sec, **m, "final_losses": fitted.epoch_losses()}
                if arm.startswith("metakd"):
                    state = fitted.method.state  # type: ignore[attr-defined]
                    row["iwv"] = state.as_dict()
                    row["meta_steps"] = int(state.meta_steps)
                if arm.startswith("qmf"):
                    row["qmf"] = qmf_levels(fitted, data["test"])
                if arm.startswith("omnifuse"):
                    head = cast(OmniFuseHead, fitted.network.head)
                    row["lazy_combination"] = (
                        combination_name(combinations(MODS)[int(head.lazy_combination)])
                        if int(head.lazy_combination) >= 0
                        else None
                    )
                unit["extras"].append(row)
                print(
                    f"seed {seed} {arm}: train {sec:.0f}s, clean test acc {m['accuracy']:.3f} auroc {m['auroc']:.3f}",
                    flush=True,
                )
            unit["noise"] = noise_eval_seed(data, args, seed, models)
            full = np.ones((n_te, len(MODS)), dtype=bool)
            for arm in MISSING_ARMS:
                unit["rate0"][arm] = missing_eval(models[arm], data, 0.0, seed, arm, full, float("nan"))
            cache.put(f"noise_s{seed}", unit)
            concat_sec = next(r["train_s"] for r in unit["extras"] if r["arm"] == "concat")
            concat_live = (models["concat"].network, concat_sec)
            del models
        else:
            print(f"seed {seed}: noise unit loaded from {cache.root}", flush=True)
        if not args.skip_meta_fusion:
            mf_name = f"{meta_tag(args, missing=False)}_noise_s{seed}"
            mf_unit = cache.get(mf_name)
            if mf_unit is None:
                check = None
                if concat_live is None:  # concat cached, network gone: retrain it (same seed -> same network)
                    fitted = train_arm("concat", data, args, seed)
                    cached = next(r["auroc"] for r in unit["extras"] if r["arm"] == "concat")
                    check = concat_check(fitted, data, cached, None)
                    concat_live = (fitted.network, fitted.seconds)
                mf_unit = meta_noise_unit(data, args, seed, *concat_live)
                mf_unit["concat_check"] = check
                cache.put(mf_name, mf_unit)
            else:
                print(f"seed {seed}: {META} unit loaded from {cache.root}", flush=True)
            mf_row = mf_unit["extras"][0]
            results["meta_fusion"]["choices"].append(
                {"protocol": "noise", "rate": 0.0, "seed": seed, **mf_row["choices"]}
            )
            if mf_unit["concat_check"] is not None:
                results["meta_fusion"]["concat_checks"].append(
                    {"protocol": "noise", "rate": 0.0, "seed": seed, **mf_unit["concat_check"]}
                )
            unit = {
                "extras": unit["extras"] + mf_unit["extras"],
                "noise": {k: unit["noise"][k] + mf_unit["noise"][k] for k in noise_raw},
                "rate0": {**unit["rate0"], **mf_unit["rate0"]},
            }
        extras += unit["extras"]
        for row in unit["extras"]:
            train_time[row["arm"]].append(row["train_s"])
        for k in noise_raw:
            noise_raw[k] += unit["noise"][k]
        for arm, res in unit["rate0"].items():
            rate0[(seed, arm)] = res
        record_load(f"noise arms trained+evaluated seed {seed}")
    results["clean_training"] = extras
    results["train_seconds"] = {a: mean_se(v) for a, v in train_time.items()}
    nsum, csum, wsum = noise_protocol(noise_raw, results)
    mf_noise = pd.DataFrame()
    if not args.skip_meta_fusion:
        per_seed = pd.DataFrame(noise_raw["rows"]).groupby(["arm", "eps", "seed"])["auroc"].mean().sort_index()
        mf_noise = pd.DataFrame(
            [
                {"eps": e, **{f"diff_auroc_{k}": v for k, v in paired_stats(per_seed, META, "concat", e).items()}}
                for e in args.eps
            ]
        )
        results["meta_fusion"]["minus_concat_noise"] = mf_noise.to_dict(orient="records")
    record_load("noise evaluated")
    plot_noise(nsum, args.out / "clinical_b2_noise.png")

    # ---- missingness protocol
    msum, mf_missing = None, pd.DataFrame()
    if not args.skip_missing:
        msum, combo_names, eff, paired, mf_missing = missing_protocol(data, args, rate0, cache, results)
        plot_missing(msum, args.out / "clinical_b2_missing.png")
        plot_single(msum, args.out / "clinical_b2_missing_one_at_a_time.png")
    results["total_seconds"] = time.time() - t_start
    record_load("end")
    results["load_average"] = LOADS

    # ---- markdown
    L = [
        "# B2: clinical phantom — noise (QMF protocol) and missingness (OmniFuse protocol)",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {results['command']}`",
        "",
        f"Cohort: `write_clinical_cohort(samples={args.samples}, seed={args.cohort_seed})` (signal shares "
        f"ehr 0.40 / cxr 0.35 / report 0.25; oracle AUROC {info.get('oracle_auroc')}); complete cases "
        f"(EHR + AP/PA CXR in the 48 h window + report) per split {sizes}, prevalence "
        f"{ {k: round(v, 3) for k, v in prevalence.items()} }. Seeds: noise protocol {args.seeds}, missingness "
        f"protocol {args.missing_seeds} (training seeds; the noise "
        f"draws are seeded by (seed, eps, draw) and shared by all arms of a seed). Encoders: EHR MLP on "
        f"[{data['train'].inputs['ehr'].shape[1]}, 76] (2 h bins, standardised), CXR ResNet10-2D (widen "
        f"{args.cnn_width}) at {args.image_size}², report bert_tiny (random init, {args.max_length} tokens). "
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, no augmentation; QMF lambda "
        f"{args.qmf_lambda}; MetaKD alpha {args.metakd_alpha}, meta update every {args.meta_interval} iterations on "
        f"the val split, uniform modality dropout (its recipe); OmniFuse library defaults (its own simulated "
        f"missingness, TLA mining every epoch), omnifuse_no_imputation the same with `impute='off'`; "
        f"late_modality_ce = late fusion + the per-modality CE of QMF (weight 1); qmf_no_detach = QMF with gradient "
        f"through its weights in the fusion; MetaKD {args.meta_steps} meta steps per update. "
        + (
            ""
            if args.skip_meta_fusion
            else f"meta_fusion: stages (b)-(d) of the bundle recipe on the concat arm's encoders of the same seed "
            f"(and missing rate), default grids (null / identity / pca:8 per modality, 26 students), "
            f"{meta_kwargs(args, 0) | {'seed': 'training seed'}}, val split "
            f"{'masked at the same rate' if args.mf_val == 'masked' else 'complete'} in the missingness protocol; "
            "prediction by the committee students whose modalities are present (fallback otherwise). "
        )
        + f"Versions: {results['versions']}. Total time "
        f"{results['total_seconds'] / 60:.1f} min; load average (1 min) "
        + ", ".join(f"{x['phase']}: {x['load_1m']:.2f}" for x in LOADS)
        + ".",
        "",
        "## Noise (QMF protocol): trained clean, tested with noise of strength eps on 50% of samples per modality",
        "",
        f"Noise: image Gaussian std 10·eps grey levels (clipped), report tokens -> [MASK] w.p. 0.1·eps, EHR "
        f"Gaussian std {args.ehr_std_per_eps}·eps on the standardised continuous columns. {args.noise_draws} draws "
        "per (seed, eps>0). Mean ± SE over seeds (of the per-seed mean over draws); **worst** = minimum over all "
        "(seed, draw) evaluations; 'seed-worst' = mean ± SE over seeds of the per-seed minimum over draws. In %.",
        "",
        "| arm | "
        + " | ".join(f"acc eps={e:g}" for e in args.eps)
        + " | "
        + " | ".join(f"AUROC eps={e:g}" for e in args.eps)
        + " | worst acc eps="
        + f"{max(args.eps):g} | worst AUROC eps={max(args.eps):g} | seed-worst AUROC eps={max(args.eps):g} |",
        "|---|" + "---|" * (2 * len(args.eps) + 3),
    ]
    emax = max(args.eps)
    for arm in noise_arms(args):
        part = nsum[nsum["arm"] == arm].set_index("eps")
        cells = [fmt(part.loc[e, "accuracy_mean"], part.loc[e, "accuracy_se"]) for e in args.eps]
        cells += [fmt(part.loc[e, "auroc_mean"], part.loc[e, "auroc_se"]) for e in args.eps]
        cells += [
            fmt(part.loc[emax, "accuracy_worst"], float("nan")),
            fmt(part.loc[emax, "auroc_worst"], float("nan")),
            fmt(part.loc[emax, "auroc_seedworst_mean"], part.loc[emax, "auroc_seedworst_se"]),
        ]
        L.append(f"| {arm} | " + " | ".join(cells) + " |")
    fusion_arms = [a for a in noise_arms(args) if not a.endswith("_only")]
    best_at = {
        e: nsum[(nsum["eps"] == e) & nsum["arm"].isin(fusion_arms)].sort_values("auroc_mean").iloc[-1]["arm"]
        for e in args.eps
    }
    L += ["", f"Best fusion arm by mean AUROC per eps: {best_at}.", ""]
    L += [
        "### Fusion weight vs per-sample modality loss (Pearson r; negative = lower weight where the modality's own "
        "CE is higher, i.e. the weight tracks quality)",
        "",
        "| arm | quantity | eps | r ehr | r cxr | r report | r pooled |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in csum.iterrows():
        cells = [fmt(r[f"r_{m}_mean"], r[f"r_{m}_se"], 1.0) for m in (*MODS, "pooled")]
        L.append(f"| {r['arm']} | {r['quantity']} | {r['eps']:g} | " + " | ".join(cells) + " |")
    L += [
        "| late | constant 1/M | all | n/a | n/a | n/a | n/a |",
        "| metakd | global IWV (not per sample) | all | n/a | n/a | n/a | n/a |",
        *(
            []
            if args.skip_meta_fusion
            else ["| meta_fusion | committee of students (no per-modality weight) | all | n/a | n/a | n/a | n/a |"]
        ),
        "",
        "Mean fusion weight on noisy vs clean (sample, modality) pairs (averaged over seeds and draws):",
        "",
        "| arm | quantity | eps | modality | clean | noisy |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in wsum.iterrows():
        if r["eps"] == 0:
            continue
        L.append(
            f"| {r['arm']} | {r['quantity']} | {r['eps']:g} | {r['modality']} | {r['mean_weight_clean']:.3f} | "
            f"{r['mean_weight_noisy']:.3f} |"
        )
    iwv = [e["iwv"] for e in extras if "iwv" in e]
    lazy = {
        a: [e.get("lazy_combination") for e in extras if e["arm"] == a] for a in ("omnifuse", "omnifuse_no_imputation")
    }
    L += ["", f"MetaKD learned IWV per seed: {iwv}. OmniFuse final lazy combination per seed: {lazy}.", ""]
    qmf_lines, qmf_paired = qmf_md(args, extras, noise_raw["rows"])
    results["qmf_paired"] = qmf_paired
    L += qmf_lines
    L += exercised_md(extras)
    if not args.skip_meta_fusion:
        L += meta_fusion_md(args, results, mf_noise)
    if msum is not None:
        L += [
            "## Missingness (OmniFuse protocol): train and test with modalities missing at rate r",
            "",
            f"Seeds {args.missing_seeds}; rates {[f'{100 * r:.0f}%' for r in args.missing_rates]}. "
            "**Random modality missing**: each (sample, modality) dropped independently w.p. r, drawn at load time "
            "(seeded numpy generator per (seed, rate), input zeroed, mask False; at least one modality kept), for "
            "training AND test. Effective missing fraction (mean over seeds): "
            + ", ".join(
                f"r={r:g}: train {g['train_missing_fraction'].mean():.3f}, "
                f"complete samples {g['train_complete_fraction'].mean():.3f}"
                for r, g in eff.groupby("rate")
            )
            + ". Rate 0 reuses the clean-trained models of the noise protocol. AUROC in %, mean ± SE over seeds. "
            "`omnifuse_no_imputation` = `OmniFuseHead(impute='off')`: the same predictor with the same initial "
            "weights (projections, forward CRA, classifiers, joint head on the CRA codes), but the per-modality "
            "classifiers and the weighted average read the observed embeddings (an absent modality keeps its "
            "zero-input embedding) and L_fw/L_bw are off; otherwise identical to `omnifuse` (same seeds, masks, "
            "simulated missingness, TLA).",
            "",
            "| arm | rate | AUROC masked test | AUROC mean of 7 combos (full test) | " + " | ".join(combo_names) + " |",
            "|---|---|---|---|" + "---|" * len(combo_names),
        ]
        for _, r in msum.sort_values(["arm", "rate"]).iterrows():
            cells = [
                fmt(r["auroc_masked_test_mean"], r["auroc_masked_test_se"]),
                fmt(r["auroc_combo_mean_mean"], r["auroc_combo_mean_se"]),
            ]
            cells += [fmt(r[f"auroc_{n}_mean"], r[f"auroc_{n}_se"]) for n in combo_names]
            L.append(f"| {r['arm']} | {100 * r['rate']:.0f}% | " + " | ".join(cells) + " |")
        L += [
            "",
            "### One modality missing at a time",
            "",
            "Protocol (test-time variant, documented choice): each model of the sweep above (trained with random "
            "modality missing at rate r) is evaluated on the test set where ONLY modality m is dropped, from each "
            "sample independently w.p. r (the other two always present; seeded per (seed, rate, m)), for each m. "
            "At r=0 this is the full test set. The limit 'm removed from every sample' is the two-modality column "
            "of the table above (e.g. 'cxr+report' = EHR removed). Models were NOT retrained with one-at-a-time "
            "missingness (that would be 3 more sweeps). AUROC in %, mean ± SE over seeds.",
            "",
            "| arm | rate | mean over m | " + " | ".join(f"{m} missing" for m in MODS) + " |",
            "|---|---|---|" + "---|" * len(MODS),
        ]
        for _, r in msum.sort_values(["arm", "rate"]).iterrows():
            cells = [fmt(r["auroc_single_mean_mean"], r["auroc_single_mean_se"])]
            cells += [fmt(r[f"auroc_minus_{m}_mean"], r[f"auroc_minus_{m}_se"]) for m in MODS]
            L.append(f"| {r['arm']} | {100 * r['rate']:.0f}% | " + " | ".join(cells) + " |")
        L += [
            "",
            "### OmniFuse with vs without imputation (paired: same seed, same masks)",
            "",
            "Difference omnifuse − omnifuse_no_imputation in AUROC points, mean ± SE over seeds, and the number of "
            "seeds "
            "with a positive difference.",
            "",
            "| rate | seeds | masked test | seeds > 0 | mean of 7 combos | seeds > 0 | one-at-a-time mean "
            "| seeds > 0 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        L += paired_rate_rows(paired)
        if not args.skip_meta_fusion:
            L += [
                "",
                "### Meta Fusion vs concat (paired: same seed, same masks, same encoders)",
                "",
                "Difference meta_fusion − concat in AUROC points, mean ± SE over seeds, and the number of seeds with a "
                "positive difference (Meta Fusion replaces only the concat head, so this is the effect of the "
                "cohort + committee over a linear head on the same features).",
                "",
                "| rate | seeds | masked test | seeds > 0 | mean of 7 combos | seeds > 0 | one-at-a-time mean "
                "| seeds > 0 |",
                "|---|---|---|---|---|---|---|---|",
            ]
            L += paired_rate_rows(mf_missing)
        L += [
            "",
            "Figures: `clinical_b2_missing.png` (curves over the missing rate), "
            "`clinical_b2_missing_one_at_a_time.png`; noise figure: `clinical_b2_noise.png`.",
            "",
        ]
    L += reading(args, nsum, csum, wsum, msum, paired if msum is not None else None, results, mf_noise, mf_missing)
    md = "\n".join(L) + "\n"
    (args.out / "clinical_b2.md").write_text(md)
    (args.out / "clinical_b2.json").write_text(json.dumps(results, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
