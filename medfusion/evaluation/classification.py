"""All-combination evaluation of a classification :class:`~medfusion.fusion.base.FusionModel`.

Each batch is encoded ONCE (every modality's encoder runs once) and the fusion head is applied
for every combination's mask, which equals running the model per combination because heads only
read the mask (tested). Metrics per combination: AUROC (MONAI ``compute_roc_auc``), AUPRC,
accuracy, F1, balanced accuracy (scikit-learn) and the expected calibration error
(:mod:`medfusion.evaluation.calibration`), each with a percentile-bootstrap 95% CI over samples, plus a
reliability diagram per combination. Accuracy, F1 and balanced accuracy use the argmax (0.5 for two
classes); with a validation loader, binary tasks also get a threshold chosen per combination on the
validation split (maximum Youden's J) and the thresholded metrics at it (``*_at_thr``), which stay
meaningful when a model predicts one class at 0.5 (imbalanced labels). Per-sample method outputs found in
the head's ``aux`` (QMF weights, OmniFuse omega, per-modality logits, ...; :func:`per_sample_aux`) are exported
beside the predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_roc_auc
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, f1_score
from tqdm.auto import tqdm

from medfusion.batch import model_inputs, to_device, unwrap
from medfusion.engines.utils import resolve_device
from medfusion.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    plot_reliability,
    reliability_curve,
)
from medfusion.evaluation.report import plot_heatmap, to_markdown, write_record
from medfusion.modality import Keys, combination_mask, combination_name, combinations, parse_combination

__all__ = [
    "CLS_METRICS",
    "THR_METRICS",
    "classification_metrics",
    "choose_threshold",
    "threshold_metrics",
    "bootstrap_ci",
    "per_sample_aux",
    "predict_combinations",
    "evaluate_classification",
]

logger = logging.getLogger(__name__)

CLS_METRICS: tuple[str, ...] = ("auroc", "auprc", "accuracy", "f1", "balanced_accuracy", "ece")
THR_METRICS: tuple[str, ...] = (
    "accuracy_at_thr",
    "f1_at_thr",
    "balanced_accuracy_at_thr",
    "sensitivity_at_thr",
    "specificity_at_thr",
)
"""Binary metrics at the threshold chosen on the validation split (column ``threshold``)."""


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one combination.

    Args:
        probs: ``[N, K]`` class probabilities.
        labels: ``[N]`` integer labels.

    Returns:
        ``{"auroc", "auprc", "accuracy", "f1", "balanced_accuracy", "ece"}``; AUROC/AUPRC are NaN when
        only one class is present. Multi-class: macro one-vs-rest AUROC/AUPRC and macro F1. ``ece``: top-label
        expected calibration error with 10 bins (lower is better).
    """
    labels = labels.astype(int)
    n_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if len(np.unique(labels)) > 1 else np.nan,
        "f1": float(f1_score(labels, pred, average="binary" if n_classes == 2 else "macro", zero_division=0)),
        "ece": expected_calibration_error(probs, labels),
    }
    if len(np.unique(labels)) < 2:
        out.update({"auroc": np.nan, "auprc": np.nan})
        return out
    if n_classes == 2:
        score = torch.tensor(np.array(probs[:, 1]))
        # a scalar for 1-D scores and for average="macro" (MONAI's return type also covers average="none")
        out["auroc"] = float(cast(float, compute_roc_auc(score, torch.as_tensor(labels))))
        out["auprc"] = float(average_precision_score(labels, probs[:, 1]))
    else:
        onehot = np.eye(n_classes)[labels]
        auroc = compute_roc_auc(torch.as_tensor(probs), torch.as_tensor(onehot), average="macro")
        out["auroc"] = float(cast(float, auroc))
        out["auprc"] = float(average_precision_score(onehot, probs, average="macro"))
    return out


def choose_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """Threshold on ``P(class 1)`` with the largest Youden's J (sensitivity + specificity - 1) on these samples.

    Uses scikit-learn's ``roc_curve``; ties go to the first (highest) threshold. NaN when only one class is
    present (no threshold can be chosen).

    Args:
        probs: ``[N, 2]`` probabilities (or ``[N]`` probabilities of class 1).
        labels: ``[N]`` 0/1 labels.
    """
    from sklearn.metrics import roc_curve

    score = probs[:, 1] if probs.ndim == 2 else probs
    labels = labels.astype(int)
    if len(np.unique(labels)) < 2:
        return float("nan")
    fpr, tpr, thr = roc_curve(labels, score)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # thr[0] is +inf (nothing predicted positive)
    return float(min(thr[best], 1.0))


def threshold_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """:data:`THR_METRICS` of a binary task when ``P(class 1) >= threshold`` is predicted positive (NaN thr -> NaN)."""
    labels = labels.astype(int)
    if not np.isfinite(threshold):
        return {k: np.nan for k in THR_METRICS}
    pred = (probs[:, 1] >= threshold).astype(int)
    pos, neg = labels == 1, labels == 0
    return {
        "accuracy_at_thr": float(accuracy_score(labels, pred)),
        "f1_at_thr": float(f1_score(labels, pred, average="binary", zero_division=0)),
        "balanced_accuracy_at_thr": float(balanced_accuracy_score(labels, pred)) if pos.any() and neg.any() else np.nan,
        "sensitivity_at_thr": float(pred[pos].mean()) if pos.any() else np.nan,
        "specificity_at_thr": float(1 - pred[neg].mean()) if neg.any() else np.nan,
    }


def bootstrap_ci(
    probs: np.ndarray,
    labels: np.ndarray,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(1 - alpha)`` CIs of :func:`classification_metrics` over samples.

    With ``threshold`` (binary), also the CIs of :func:`threshold_metrics` at that fixed threshold.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    names = list(CLS_METRICS) + (list(THR_METRICS) if threshold is not None else [])
    draws: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        m = classification_metrics(probs[idx], labels[idx])
        if threshold is not None:
            m.update(threshold_metrics(probs[idx], labels[idx], threshold))
        for k in names:
            draws[k].append(m[k])
    out = {}
    for k, v in draws.items():
        a = np.asarray(v, dtype=float)
        a = a[np.isfinite(a)]
        out[k] = (
            (float(np.quantile(a, alpha / 2)), float(np.quantile(a, 1 - alpha / 2))) if len(a) else (np.nan, np.nan)
        )
    return out


def per_sample_aux(
    aux: Mapping[str, Any], batch_size: int, modalities: Sequence[str], per_modality: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Named per-sample columns of a fusion head's ``aux`` (the method outputs of ``predictions.csv``).

    A ``[B]`` tensor ``x`` becomes column ``x``; a key ``w`` the head declares per-modality
    (``FusionHead.per_modality_aux``, ``[B, M]``: QMF's ``weights``/``energy``, OmniFuse's ``omega``) becomes
    ``w_<modality>``; a ``{modality: [B, K]}`` dict ``z`` (e.g. ``modality_logits``) becomes ``z_<modality>_<k>``.
    Other entries (scalars, undeclared ``[B, X]`` tensors such as ``joint_logits`` ``[B, K]``, features, nested
    outputs) are left out: a ``[B, K]`` tensor is never named by modality because ``K`` happens to equal ``M``.

    Args:
        aux: ``FusionOutput.aux`` of one batch.
        batch_size: ``B``.
        modalities: the head's ordered modality names (``M``).
        per_modality: the head's ``per_modality_aux`` keys.

    Returns:
        ``{column: float array [B]}``.

    Raises:
        ValueError: a declared per-modality entry is not ``[B, M]``.
    """
    cols: dict[str, np.ndarray] = {}
    for name, v in aux.items():
        if isinstance(v, Mapping) and v and set(v) <= set(modalities):
            for m in modalities:
                z = v.get(m)
                if isinstance(z, torch.Tensor) and z.ndim == 2 and z.shape[0] == batch_size:
                    for k, col in enumerate(z.detach().float().cpu().unbind(1)):
                        cols[f"{name}_{m}_{k}"] = col.numpy()
            continue
        if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] != batch_size:
            continue
        a = v.detach().float().cpu()
        if name in per_modality:
            if tuple(a.shape) != (batch_size, len(modalities)):
                raise ValueError(
                    f"aux[{name!r}] is declared per-modality ([B, M] = [{batch_size}, {len(modalities)}]) "
                    f"but has shape {list(a.shape)}."
                )
            for i, m in enumerate(modalities):
                cols[f"{name}_{m}"] = a[:, i].numpy()
        elif a.ndim == 1:
            cols[name] = a.numpy()
    return cols


@torch.no_grad()
def predict_combinations(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    combination_masks: torch.Tensor,
    device: torch.device,
    cached: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-(sample, combination) probabilities, labels and per-sample aux outputs.

    Returns:
        Tidy table with ``sample_index``, ``case_id``, ``combination``, ``label``, ``prob_<k>`` and
        aux columns. Combinations a sample cannot form (a needed modality absent) are skipped.
    """
    net = cast(Any, unwrap(model)).to(device).eval()  # duck-typed: encode/head (cached) or forward_outputs
    per_modality = tuple(getattr(getattr(net, "head", None), "per_modality_aux", ()))
    frames = []
    for batch in tqdm(loader, desc="evaluate", disable=not progress):
        batch = to_device(batch, device)
        inputs = model_inputs(batch, tuple(modalities))
        avail = batch[Keys.MASK].bool()
        b = avail.shape[0]
        feats = net.encode(inputs) if cached else None
        for combo_mask in combination_masks.to(device):
            ok = (combo_mask.unsqueeze(0) <= avail).all(dim=1)
            if not bool(ok.any()):
                continue
            mask = (avail & combo_mask.unsqueeze(0)) | (~ok.unsqueeze(1) & avail)  # rows not ok are dropped below
            out = net.head(feats, mask) if cached else net.forward_outputs(inputs, mask)
            probs = torch.softmax(out.logits.float(), dim=1).cpu().numpy()
            keep = ok.cpu().numpy()
            frame: dict[str, Any] = {
                "sample_index": batch.get(Keys.INDEX, torch.arange(b)).cpu().numpy().reshape(-1)[keep],
                "combination": combination_name(m for m, f in zip(modalities, combo_mask.tolist()) if f),
                "label": batch[Keys.LABEL].cpu().numpy().reshape(b, -1)[keep, 0],
            }
            if Keys.CASE_ID in batch:
                frame["case_id"] = np.asarray(batch[Keys.CASE_ID], dtype=object)[keep]
            for k in range(probs.shape[1]):
                frame[f"prob_{k}"] = probs[keep, k]
            for name, col in per_sample_aux(out.aux, b, modalities, per_modality).items():
                frame[name] = col[keep]
            frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def evaluate_classification(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    output_dir: str | Path | None = None,
    combinations_to_run: Sequence[str] | None = None,
    n_bootstrap: int = 200,
    cached: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    title: str = "AUROC per modality combination",
    seed: int = 0,
    temperatures: Mapping[str, float] | None = None,
    record: Mapping[str, Any] | None = None,
    threshold_loader: Iterable[Mapping[str, Any]] | None = None,
    notes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Evaluate a classifier on every modality combination.

    Args:
        model: a ``FusionModel`` (or DDP-wrapped one).
        loader: batches following the batch convention (modality keys, ``modality_mask``,
            ``label``, ``sample_index``).
        modalities: the model's ordered modality names.
        output_dir: writes ``predictions.csv`` (per sample and combination, with aux outputs),
            ``summary.csv``, ``summary.md`` (metrics with 95% CIs), ``heatmap.png``, ``reliability.png``
            (one reliability diagram per combination), ``reliability.csv`` and ``evaluation.json``.
        combinations_to_run: names (default all ``2^M - 1``).
        n_bootstrap: bootstrap resamples for the CIs (0 = none).
        cached: encode once per batch and re-run only the head per combination.
        device: default automatic.
        progress: tqdm bar.
        title: heading of the summary / heatmap.
        seed: bootstrap seed.
        temperatures: ``{combination: T}`` fitted on the validation split
            (:func:`~medfusion.evaluation.calibration.fit_temperatures`); probabilities become
            ``softmax(log p / T)`` per combination before any metric (``None`` = uncalibrated).
        record: facts about the run written to ``evaluation.json`` (split, method, checkpoint, ...;
            ``medfusion compare`` checks that compared runs share them).
        threshold_loader: validation batches (binary tasks): per combination, the threshold with the largest
            Youden's J on them goes to column ``threshold`` and :data:`THR_METRICS` are computed at it.
        notes: paragraphs written under the table of ``summary.md`` (e.g. the split rule).

    Returns:
        Summary indexed by combination (+ ``mean``): metric columns, ``<metric>_lo``/``_hi`` CIs, ``n``
        (with ``threshold_loader``: also ``threshold`` and :data:`THR_METRICS`).
    """
    dev = resolve_device(device)
    combos = (
        [parse_combination(c, modalities) for c in combinations_to_run]
        if combinations_to_run
        else combinations(modalities)
    )
    masks = torch.stack([combination_mask(c, modalities) for c in combos])
    preds = predict_combinations(model, loader, modalities, masks, dev, cached=cached, progress=progress)
    if preds.empty:
        raise ValueError(
            "evaluate_classification: no sample could be evaluated (empty loader or no combination available)."
        )
    prob_cols = [c for c in preds.columns if c.startswith("prob_")]
    if temperatures:
        preds[prob_cols] = preds[prob_cols].astype(float)
        for name, part in preds.groupby("combination", sort=False):
            t = float(temperatures.get(str(name), 1.0))
            preds.loc[part.index, prob_cols] = apply_temperature(part[prob_cols].to_numpy(), t)
    thresholds: dict[str, float] | None = None
    if threshold_loader is not None and len(prob_cols) == 2:
        val = predict_combinations(model, threshold_loader, modalities, masks, dev, cached=cached, progress=progress)
        thresholds = {}
        for name, part in val.groupby("combination", sort=False) if not val.empty else []:
            p_val = part[prob_cols].to_numpy(dtype=float)
            if temperatures:  # the threshold applies to the probabilities as reported (calibrated)
                p_val = apply_temperature(p_val, float(temperatures.get(str(name), 1.0)))
            thresholds[str(name)] = choose_threshold(p_val, part["label"].to_numpy())
    rows = {}
    curves = {}
    for name in [combination_name(c) for c in combos]:
        part = preds[preds["combination"] == name]
        if part.empty:
            continue
        p, y = part[prob_cols].to_numpy(), part["label"].to_numpy()
        row: dict[str, float] = dict(classification_metrics(p, y))
        curves[name] = reliability_curve(p, y)
        thr = None
        if thresholds is not None:
            thr = thresholds.get(name, float("nan"))
            row["threshold"] = thr
            row.update(threshold_metrics(p, y, thr))
        if n_bootstrap > 0:
            for k, (lo, hi) in bootstrap_ci(p, y, n_bootstrap, seed, threshold=thr).items():
                row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        row["n"] = len(part)
        rows[name] = row
    summary = pd.DataFrame.from_dict(rows, orient="index")
    mean = summary.drop(columns="n").mean(axis=0, skipna=True)
    mean["n"] = summary["n"].min()
    summary.loc["mean"] = mean
    summary.index.name = "combination"
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        preds.to_csv(out / "predictions.csv", index=False)
        summary.to_csv(out / "summary.csv")
        shown = list(CLS_METRICS) + (["threshold", *THR_METRICS] if thresholds is not None else [])
        md = to_markdown(summary, shown, digits=3, ci=n_bootstrap > 0)
        (out / "summary.md").write_text(
            f"# {title}\n\n" + md + "\n" + "\n\n".join(_summary_notes(summary, n_bootstrap, thresholds, notes)) + "\n"
        )
        plot_heatmap(summary, list(CLS_METRICS), out / "heatmap.png", title=title)
        pd.concat(curves, names=["combination", "bin"]).to_csv(out / "reliability.csv")
        ece = {k: float(v) for k, v in summary["ece"].items() if k in curves}
        plot_reliability(curves, out / "reliability.png", title=f"Reliability ({title})", ece=ece)
        write_record(
            out,
            {
                **dict(record or {}),
                "task": "classification",
                "modalities": list(modalities),
                "temperature_scaled": bool(temperatures),
            },
        )
    return summary


def _summary_notes(
    summary: pd.DataFrame, n_bootstrap: int, thresholds: Mapping[str, float] | None, notes: Sequence[str] | None
) -> list[str]:
    """The paragraphs under the table of ``summary.md``."""
    n_combos = len(summary) - 1
    out = [
        "Each cell: the value on the evaluated split"
        + (f" [95% percentile-bootstrap CI over samples, {n_bootstrap} resamples]." if n_bootstrap > 0 else ".")
        + " n: samples that have every modality of the combination (a sample counts in every combination it can"
        " form, with the other modalities masked).",
        f"mean: unweighted mean of the {n_combos} combination rows (each combination counts once, whatever its n);"
        " its CI columns are the means of the combinations' CI bounds (not a CI of the mean), and its n is the"
        " smallest n of any combination.",
        "accuracy, f1, balanced_accuracy: predicted class = argmax (P(class 1) >= 0.5 for two classes).",
    ]
    if thresholds is not None:
        missing = [k for k, v in thresholds.items() if not np.isfinite(v)]
        out.append(
            "threshold, *_at_thr: per combination, the threshold on P(class 1) with the largest Youden's J"
            " (sensitivity + specificity - 1) on the validation split, then the metrics on this split at that"
            " threshold" + (f" (no threshold for {missing}: one class only in validation)." if missing else ".")
        )
    out += [str(n) for n in (notes or [])]
    return out
