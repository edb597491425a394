"""All-combination evaluation of a regression model over tabular modality features (Meta Fusion regression).

For each of the ``2^M - 1`` modality combinations the samples that have EVERY modality of the
combination are predicted with their mask restricted to the combination (the other modalities marked
absent and zero-filled), so a combination's row answers "how good is the model when only these
modalities are available". Metrics per combination: MSE, RMSE, MAE, R^2 and ``n``; a ``mean`` row
averages the combinations (its ``n`` is the smallest combination's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medfusion.fusion.meta_fusion import MetaFusionData
from medfusion.io import atomic_file
from medfusion.modality import combination_mask, combination_name, combinations, parse_combination

__all__ = ["REG_METRICS", "regression_metrics", "predict_regression", "evaluate_regression", "plot_mse"]

logger = logging.getLogger(__name__)

REG_METRICS: tuple[str, ...] = ("mse", "rmse", "mae", "r2")
"""Metric columns of :func:`evaluate_regression`."""


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Metrics of one combination.

    Args:
        y: ``[N]`` targets.
        pred: ``[N]`` predictions.

    Returns:
        ``{"mse", "rmse", "mae", "r2"}``; ``r2 = 1 - SS_res / SS_tot`` is NaN when the targets are constant
        (``SS_tot = 0``); every metric is NaN for ``N = 0``.

    Raises:
        ValueError: ``y`` and ``pred`` differ in length.
    """
    y = np.asarray(y, dtype=float).reshape(-1)
    pred = np.asarray(pred, dtype=float).reshape(-1)
    if y.shape != pred.shape:
        raise ValueError(f"regression_metrics: {len(y)} targets but {len(pred)} predictions.")
    if len(y) == 0:
        return dict.fromkeys(REG_METRICS, float("nan"))
    err = pred - y
    mse = float(np.mean(err**2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    return {"mse": mse, "rmse": float(np.sqrt(mse)), "mae": float(np.mean(np.abs(err))), "r2": r2}


def _as_vector(out: Any, n: int) -> torch.Tensor:
    """Predictions ``[N]`` from a model output (tensor ``[N]`` / ``[N, 1]`` or an object with ``logits``)."""
    if hasattr(out, "logits"):
        out = out.logits
    out = torch.as_tensor(out)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.shape != (n,):
        raise ValueError(
            f"evaluate_regression: the model returned shape {list(out.shape)}, expected [{n}] or [{n}, 1]."
        )
    return out.detach().float().cpu()


@torch.no_grad()
def predict_regression(
    model: Callable[[Mapping[str, torch.Tensor], torch.Tensor], Any],
    data: MetaFusionData,
    modalities: Sequence[str],
    combo: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predict the samples of ``data`` that have every modality of ``combo``, seeing only ``combo``.

    Args:
        model: ``model(x, mask)`` with ``x = {modality: [N, F_m]}``, ``mask`` bool ``[N, M]``, returning ``[N]``,
            ``[N, 1]`` or an object with ``logits`` ``[N, 1]`` (a ``MetaFusion``, a ``MetaFusionHead``, a function).
        data: ``MetaFusionData(x, mask, y)``.
        modalities: ordered modality names (the mask's columns).
        combo: the combination.

    Returns:
        ``(rows, predictions)``: long row indices ``[n]`` into ``data`` and float predictions ``[n]`` (CPU).
    """
    cmask = combination_mask(combo, modalities, device=data.mask.device)
    rows = (data.mask.bool() | ~cmask).all(dim=1).nonzero().flatten()
    if len(rows) == 0:
        return rows.cpu(), torch.zeros(0)
    mask = cmask.expand(len(rows), -1).clone()
    x = {
        m: (data.x[m][rows] if m in combo else torch.zeros_like(data.x[m][rows])) for m in modalities
    }  # absent modalities zero-filled, like a sample that lacks them
    return rows.cpu(), _as_vector(model(x, mask), len(rows))


def evaluate_regression(
    model: Callable[[Mapping[str, torch.Tensor], torch.Tensor], Any],
    data: MetaFusionData,
    modalities: Sequence[str],
    output_dir: str | Path | None = None,
    combinations_to_run: Sequence[str] | None = None,
    case_ids: Sequence[Any] | None = None,
    title: str = "MSE per modality combination",
) -> pd.DataFrame:
    """Evaluate a regression model on every modality combination.

    Args:
        model: see :func:`predict_regression` (an ``nn.Module`` is put in eval mode and restored afterwards).
        data: ``MetaFusionData(x={modality: [N, F_m]}, mask bool [N, M], y [N])``.
        modalities: ordered modality names (the mask's columns).
        output_dir: writes ``metrics.csv`` (the returned table), ``predictions.csv`` (``case_id``,
            ``combination``, ``y``, ``prediction``) and ``mse.png`` (bar chart of MSE per combination).
        combinations_to_run: names such as ``["m1", "m1+m2"]`` (default all ``2^M - 1``).
        case_ids: ``[N]`` identifiers for ``predictions.csv`` (default the row index).
        title: figure title.

    Returns:
        Table indexed by combination (+ ``mean``): ``mse``, ``rmse``, ``mae``, ``r2``, ``n``. Combinations
        without any sample are left out.

    Raises:
        ValueError: ``case_ids`` of the wrong length, a mask of the wrong width, or no combination has samples.
    """
    mods = tuple(modalities)
    n = len(data.y)
    if data.mask.ndim != 2 or data.mask.shape[1] != len(mods):
        raise ValueError(f"evaluate_regression: mask shape {list(data.mask.shape)}, expected [{n}, {len(mods)}].")
    ids = list(range(n)) if case_ids is None else list(case_ids)
    if len(ids) != n:
        raise ValueError(f"evaluate_regression case_ids: {len(ids)} ids for {n} samples.")
    combos = [parse_combination(c, mods) for c in combinations_to_run] if combinations_to_run else combinations(mods)
    y_all = data.y.detach().float().cpu().numpy()
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        parts, rows_out = [], {}
        for combo in combos:
            name = combination_name(combo)
            rows, pred = predict_regression(model, data, mods, combo)
            if len(rows) == 0:
                logger.warning("evaluate_regression: no sample has every modality of %s; skipped.", name)
                continue
            idx = rows.numpy()
            y, p = y_all[idx], pred.numpy().astype(float)
            rows_out[name] = {**regression_metrics(y, p), "n": len(idx)}
            parts.append(pd.DataFrame({"case_id": [ids[i] for i in idx], "combination": name, "y": y, "prediction": p}))
    finally:
        if isinstance(model, torch.nn.Module) and was_training is not None:
            model.train(was_training)
    if not rows_out:
        raise ValueError(
            f"evaluate_regression: no sample could be evaluated on {[combination_name(c) for c in combos]}."
        )
    metrics = pd.DataFrame.from_dict(rows_out, orient="index")
    mean = metrics.drop(columns="n").mean(axis=0, skipna=True)
    mean["n"] = metrics["n"].min()
    metrics.loc["mean"] = mean
    metrics["n"] = metrics["n"].astype(int)
    metrics.index.name = "combination"
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "predictions.csv") as tmp:
            pd.concat(parts, ignore_index=True).to_csv(tmp, index=False)
        with atomic_file(out / "metrics.csv") as tmp:
            metrics.to_csv(tmp)
        plot_mse(metrics, out / "mse.png", title=title)
        logger.info("regression evaluation written to %s", out)
    return metrics


def plot_mse(metrics: pd.DataFrame, path: str | Path, title: str = "MSE per modality combination") -> Path:
    """Bar chart of ``metrics["mse"]`` per combination (the ``mean`` row is left out), values written on the bars.

    Args:
        metrics: output of :func:`evaluate_regression`.
        path: PNG path.
        title: figure title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = metrics.drop(index="mean", errors="ignore")
    names, values = [str(i) for i in part.index], part["mse"].to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 0.9 * len(names)), 3.6))
    bars = ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)), labels=names, rotation=30, ha="right")
    ax.set_ylabel("MSE (lower is better)")
    for bar, v in zip(bars, values):
        if np.isfinite(v):
            ax.text(
                bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3g}", ha="center", va="bottom", fontsize=8
            )
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
