"""Calibration of classifiers per modality combination: ECE, reliability diagrams, temperature scaling.

* Expected calibration error (Guo et al., 2017, "On Calibration of Modern Neural Networks"): samples are
  binned by their top-label confidence ``c_i = max_k p_ik`` into ``B`` equal-width bins on ``[0, 1]``;
  ``ECE = sum_b |S_b| / N * |acc(S_b) - conf(S_b)|`` with ``acc`` the share of correct top labels and
  ``conf`` the mean confidence of the bin.
* Temperature scaling (same paper): ``p = softmax(z / T)`` with one ``T > 0`` per combination fitted by
  minimising the negative log-likelihood on the validation split. Evaluation folders store probabilities,
  not logits; ``log p`` differs from the logits by a per-sample constant, which softmax ignores, so
  ``softmax(log p / T) = softmax(z / T)`` and temperatures are fitted from ``predictions.csv`` without
  re-running a model.
* :class:`TemperatureScaledClassifier` applies the per-combination temperatures of ``calibration.json``
  inside the network, so MONAI inferers, the all-combination evaluator and inference use it unchanged.

Equations -> code -> tests: docs/compare.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from medfusion.io import save_figure
from medfusion.modality import combination_name, combinations, mask_to_name, validate_modalities

__all__ = [
    "expected_calibration_error",
    "reliability_curve",
    "plot_reliability",
    "fit_temperature",
    "fit_temperatures",
    "apply_temperature",
    "save_temperatures",
    "load_temperatures",
    "TemperatureScaledClassifier",
]

logger = logging.getLogger(__name__)


def reliability_curve(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Per-bin confidence, accuracy and count of the top-label predictions.

    Args:
        probs: ``[N, K]`` class probabilities.
        labels: ``[N]`` integer labels.
        n_bins: equal-width confidence bins on ``[0, 1]`` (a confidence of exactly 1 goes in the last bin).

    Returns:
        One row per bin: ``bin_low``, ``bin_high``, ``confidence`` (mean), ``accuracy``, ``count``
        (empty bins have NaN confidence/accuracy and count 0).
    """
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels).astype(int).reshape(-1)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        sel = idx == b
        cnt = int(sel.sum())
        rows.append(
            {
                "bin_low": edges[b],
                "bin_high": edges[b + 1],
                "confidence": float(conf[sel].mean()) if cnt else np.nan,
                "accuracy": float(correct[sel].mean()) if cnt else np.nan,
                "count": cnt,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Top-label expected calibration error (see module doc).

    Args:
        probs: ``[N, K]`` class probabilities.
        labels: ``[N]`` integer labels.
        n_bins: equal-width bins.

    Returns:
        ECE in ``[0, 1]`` (NaN for no sample).
    """
    curve = reliability_curve(probs, labels, n_bins)
    n = curve["count"].sum()
    if n == 0:
        return float("nan")
    used = curve[curve["count"] > 0]
    return float((used["count"] / n * (used["accuracy"] - used["confidence"]).abs()).sum())


def plot_reliability(
    curves: Mapping[str, pd.DataFrame],
    path: str | Path,
    title: str = "Reliability per modality combination",
    ece: Mapping[str, float] | None = None,
) -> Path:
    """Reliability diagrams, one panel per combination (accuracy vs confidence per bin, the diagonal = calibrated).

    Args:
        curves: ``{combination: reliability_curve(...)}``.
        path: PNG file.
        title: figure title.
        ece: optional ``{combination: ECE}`` written in each panel's title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    cols = min(4, max(1, len(names)))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        c = curves[name]
        used = c[c["count"] > 0]
        width = float(c["bin_high"].iloc[0] - c["bin_low"].iloc[0])
        ax.bar(used["bin_low"], used["accuracy"], width=width, align="edge", alpha=0.7, edgecolor="k", lw=0.5)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        label = f"{name}" + (f" (ECE {ece[name]:.3f})" if ece and name in ece else "")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("confidence", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` of ``[N, K]`` probabilities (= ``softmax(z / T)`` of the logits)."""
    logp = np.log(np.clip(np.asarray(probs, dtype=float), 1e-300, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    q = apply_temperature(probs, temperature)
    return float(-np.log(np.clip(q[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature minimising the NLL of ``softmax(log p / T)`` (bounded scalar search over ``log T``).

    Args:
        probs: ``[N, K]`` validation probabilities.
        labels: ``[N]`` integer labels.
        bounds: search interval of ``T``.

    Returns:
        The fitted ``T`` (``> 1`` softens over-confident predictions, ``< 1`` sharpens).

    Raises:
        ValueError: no samples.
    """
    y = np.asarray(labels).astype(int).reshape(-1)
    if len(y) == 0:
        raise ValueError("fit_temperature: no samples.")
    res = minimize_scalar(
        lambda lt: _nll(probs, y, float(np.exp(lt))),
        bounds=(float(np.log(bounds[0])), float(np.log(bounds[1]))),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def fit_temperatures(predictions: pd.DataFrame, min_samples: int = 10) -> dict[str, float]:
    """One temperature per combination from an evaluation's ``predictions.csv`` (fit on the VALIDATION split).

    Args:
        predictions: rows with ``combination``, ``label`` and ``prob_<k>`` columns.
        min_samples: combinations with fewer samples (or one class only) get ``T = 1`` (a warning says so).

    Returns:
        ``{combination: T}``.
    """
    prob_cols = sorted((c for c in predictions.columns if c.startswith("prob_")), key=lambda c: int(c[5:]))
    out: dict[str, float] = {}
    for name, part in predictions.groupby("combination", sort=False):
        y = part["label"].to_numpy().astype(int)
        if len(part) < min_samples or len(np.unique(y)) < 2:
            logger.warning("temperature of %s: %d samples / one class, kept T = 1", name, len(part))
            out[str(name)] = 1.0
            continue
        out[str(name)] = fit_temperature(part[prob_cols].to_numpy(), y)
    return out


def save_temperatures(
    temperatures: Mapping[str, float], path: str | Path, modalities: Sequence[str], source: str = ""
) -> Path:
    """Write ``calibration.json`` ``{"modalities", "temperatures": {combination: T}, "source"}``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "modalities": list(validate_modalities(modalities)),
        "temperatures": {k: float(v) for k, v in temperatures.items()},
        "source": source,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_temperatures(path: str | Path, modalities: Sequence[str]) -> dict[str, float]:
    """Read ``calibration.json`` and check it was fitted for ``modalities`` (same names and order).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is for other modalities, or a temperature is not positive.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} does not exist.")
    record = json.loads(p.read_text())
    mods = list(validate_modalities(modalities))
    if record.get("modalities") != mods:
        raise ValueError(f"{p}: temperatures were fitted for modalities {record.get('modalities')}, model has {mods}.")
    temps = {str(k): float(v) for k, v in record.get("temperatures", {}).items()}
    bad = {k: v for k, v in temps.items() if not v > 0}
    if bad:
        raise ValueError(f"{p}: temperatures must be > 0, got {bad}.")
    return temps


class TemperatureScaledClassifier(nn.Module):
    """A classifier whose logits are divided by the temperature of each sample's modality combination.

    ``forward(inputs, modality_mask) -> logits / T[combination]``; the temperatures live in a buffer
    ``[2^M - 1]`` (saved with the module's state). Combinations without a fitted temperature use 1.

    Args:
        model: a classification ``FusionModel`` (``forward(inputs, mask)`` and ``forward_outputs``).
        modalities: the model's ordered modality names.
        temperatures: ``{combination name: T}``.
    """

    temperature: torch.Tensor

    def __init__(self, model: nn.Module, modalities: Sequence[str], temperatures: Mapping[str, float]) -> None:
        super().__init__()
        self.model = model
        self.modalities = validate_modalities(modalities)
        names = [combination_name(c) for c in combinations(self.modalities)]
        unknown = sorted(set(temperatures) - set(names))
        if unknown:
            raise ValueError(f"temperatures for unknown combinations {unknown} (modalities {list(self.modalities)}).")
        self._index = {n: i for i, n in enumerate(names)}
        self.register_buffer("temperature", torch.tensor([float(temperatures.get(n, 1.0)) for n in names]))

    def _temps(self, mask: torch.Tensor) -> torch.Tensor:
        idx = [self._index[mask_to_name(row, self.modalities)] for row in mask.bool().cpu()]
        return self.temperature[torch.as_tensor(idx, device=self.temperature.device)].unsqueeze(1)

    def forward_outputs(self, inputs: Mapping[str, torch.Tensor], mask: torch.Tensor) -> Any:
        """The wrapped model's ``FusionOutput`` with temperature-scaled ``logits`` ``[B, K]``."""
        out = cast(Any, self.model).forward_outputs(inputs, mask)  # a FusionModel (class doc)
        return out._replace(logits=out.logits / self._temps(mask).to(out.logits))

    def forward(self, inputs: Mapping[str, torch.Tensor], modality_mask: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``[B, K]``."""
        logits = self.model(inputs, modality_mask)
        return logits / self._temps(modality_mask).to(logits)
