"""Python glue of the ``bundles/clinical_fusion`` MONAI bundle (multimodal classification, any fusion method).

The bundle's JSON stays declarative; what JSON cannot express cleanly lives here:

* :func:`ordered_kinds`, :func:`select_encoders`: per-modality settings in the order of ``modalities``
  (with one clear error for a modality without a setting);
* :func:`clinical_splits` / :func:`clinical_datalist`: datalists of the MIMIC-style layout (listfile
  splits, a meta-validation part carved out of train) or a CSV manifest (seeded random split);
* :class:`ModalityBatch`: ``prepare_batch`` for MONAI evaluators (dict inputs + ``modality_mask``);
* :func:`auroc_output`: ``output_transform`` of MONAI's ``ROCAUC`` handler;
* :class:`PredictionWriter`: inference handler writing per-sample probabilities to CSV;
* :func:`qmf_weight_loss`, :func:`plot_weights_vs_loss`, :func:`method_figures`: the QMF
  weight-vs-loss figure of the evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ignite.engine import Events

from medfusion.data.splits import random_split, renumber
from medfusion.engines.method import model_inputs, to_device, unwrap
from medfusion.engines.utils import resolve_device
from medfusion.evaluation.report import save_figure
from medfusion.modality import Keys, combination_name, validate_modalities

__all__ = [
    "DATA_LAYOUTS",
    "ordered_kinds",
    "select_encoders",
    "clinical_preprocessing",
    "checkpoint_num_samples",
    "clinical_datalist",
    "clinical_splits",
    "ModalityBatch",
    "auroc_output",
    "PredictionWriter",
    "qmf_weight_loss",
    "plot_weights_vs_loss",
    "method_figures",
]

logger = logging.getLogger(__name__)

DATA_LAYOUTS = ("mimic", "manifest")


def _per_modality(what: str, modalities: Sequence[str], values: Mapping[str, Any]) -> dict[str, Any]:
    mods = validate_modalities(modalities)
    missing = [m for m in mods if m not in values]
    if missing:
        raise ValueError(
            f"clinical_fusion bundle: {what} has no entry for modalities {missing} (modalities {list(mods)}, "
            f"{what} keys {sorted(values)}); override {what} too when changing modalities."
        )
    return {m: values[m] for m in mods}


def ordered_kinds(modalities: Sequence[str], kinds: Mapping[str, str]) -> dict[str, str]:
    """``{modality: kind}`` in the order of ``modalities`` (for :func:`~medfusion.data.clinical.clinical_transforms`).

    Raises:
        ValueError: a modality without a kind (the message names it and the config key ``modality_kinds``).
    """
    return _per_modality("modality_kinds", modalities, kinds)


def select_encoders(modalities: Sequence[str], encoders: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{modality: encoder spec}`` in the order of ``modalities`` (for ``Classifier(encoders=...)``).

    Raises:
        ValueError: a modality without an encoder spec (names it and the config key ``encoders``).
    """
    return {m: dict(v) for m, v in _per_modality("encoders", modalities, encoders).items()}


def clinical_preprocessing(
    modalities: Sequence[str],
    kinds: Mapping[str, str],
    mode: str = "eval",
    tabular_features: Mapping[str, int] | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`~medfusion.data.clinical.clinical_transforms` for the selected ``modalities``.

    Args:
        modalities: ordered modality names (the network's order).
        kinds: ``{modality: kind}`` (may hold more modalities than used).
        mode: ``"train"`` (augmentation) or ``"eval"``.
        tabular_features: ``{modality: F}`` (may hold more modalities than used; only tabular ones of
            ``modalities`` are passed on).
        **kwargs: further :func:`~medfusion.data.clinical.clinical_transforms` arguments.

    Raises:
        ValueError: a modality without a kind.
    """
    from medfusion.data.clinical import clinical_transforms

    ordered = ordered_kinds(modalities, kinds)
    tab = {m: int(f) for m, f in (tabular_features or {}).items() if ordered.get(m) == "tabular"}
    return clinical_transforms(ordered, mode=mode, tabular_features=tab or None, **kwargs)


def checkpoint_num_samples(path: str | Path, key: str = "model") -> int:
    """Training-set size stored in a QMF checkpoint (rows of ``head.history``), 0 when absent.

    Inference builds the QMF head with this ``num_samples`` so the checkpoint loads strictly.
    """
    p = Path(path)
    if not p.is_file():
        return 0
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    state = ckpt.get(key, ckpt) if isinstance(ckpt, Mapping) else {}
    hist = state.get("head.history") if isinstance(state, Mapping) else None
    return int(hist.shape[0]) if isinstance(hist, torch.Tensor) else 0


def _manifest_spec(modalities: Sequence[str], columns: Mapping[str, Any] | None) -> dict[str, Any]:
    if columns is None:
        return {m: m for m in validate_modalities(modalities)}
    return _per_modality("manifest_columns", modalities, columns)


def clinical_datalist(
    layout: str,
    dataset_dir: str | Path,
    modalities: Sequence[str],
    split: str = "test",
    ehr_root: str | Path | None = None,
    cxr_root: str | Path | None = None,
    reports_root: str | Path | None = None,
    mimic_task: str = "in-hospital-mortality",
    manifest_csv: str | Path | None = None,
    manifest_columns: Mapping[str, Any] | None = None,
    label_columns: Sequence[str] = ("label",),
) -> list[dict[str, Any]]:
    """One datalist of a dataset, without splitting (inference).

    Args:
        layout: ``"mimic"`` (``split`` = a listfile split ``train``/``val``/``test``) or ``"manifest"``
            (every row; ``split`` ignored).
        dataset_dir: dataset root; the default sub-folders are ``ehr/``, ``cxr/``, ``reports/`` and
            ``manifest/manifest.csv`` (the synthetic cohort's layout).
        modalities: ordered modality names.
        split: listfile split of the MIMIC layout.
        ehr_root: mimic3-benchmarks root (default ``<dataset_dir>/ehr``).
        cxr_root: MIMIC-CXR root (default ``<dataset_dir>/cxr``).
        reports_root: MIMIC-CXR reports root (default ``<dataset_dir>/reports``).
        mimic_task: ``"in-hospital-mortality"`` or ``"phenotyping"``.
        manifest_csv: manifest path (default ``<dataset_dir>/manifest/manifest.csv``).
        manifest_columns: ``{modality: column or [columns]}`` (default: the modality's own column).
        label_columns: label column(s) of the manifest (``[]`` for unlabelled data).

    Raises:
        ValueError: unknown layout (the data layers raise for malformed data).
    """
    root = Path(dataset_dir)
    if layout == "mimic":
        from medfusion.data.mimic import discover_mimic

        return discover_mimic(
            ehr_root if ehr_root is not None else root / "ehr",
            cxr_root if cxr_root is not None else root / "cxr",
            reports_root if reports_root is not None else root / "reports",
            task=mimic_task,
            split=split,
            modalities=modalities,
        )
    if layout == "manifest":
        from medfusion.data.manifest import discover_manifest

        csv = Path(manifest_csv) if manifest_csv is not None else root / "manifest" / "manifest.csv"
        return discover_manifest(csv, _manifest_spec(modalities, manifest_columns), label_columns=label_columns)
    raise ValueError(f"clinical_fusion bundle: data_layout must be one of {DATA_LAYOUTS}, got {layout!r}.")


def clinical_splits(
    layout: str,
    dataset_dir: str | Path,
    modalities: Sequence[str],
    split_fractions: Mapping[str, float] | None = None,
    meta_fraction: float = 0.1,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Datalists ``{"train", "meta_val", "val", "test"}`` with ``sample_index`` ``0..n-1`` in each part.

    * ``"mimic"``: ``val``/``test`` are the listfiles' splits; ``meta_val`` (MetaKD's held-out
      meta-validation part, ``meta_fraction`` of the train listfile) is carved out of ``train`` with ``seed``.
    * ``"manifest"``: a seeded random split of every row by ``split_fractions`` (default
      ``{"meta_val": 0.1, "val": 0.1, "test": 0.2}``, the rest is train).

    Args:
        layout: ``"mimic"`` or ``"manifest"``.
        dataset_dir: dataset root.
        modalities: ordered modality names.
        split_fractions: fractions of the manifest split.
        meta_fraction: MIMIC layout: fraction of the train listfile held out as ``meta_val`` (0 = empty).
        seed: split seed.
        **kwargs: passed to :func:`clinical_datalist` (roots, task, manifest columns).

    Raises:
        ValueError: unknown layout, bad fractions, an empty split.
    """
    if layout == "mimic":
        train = clinical_datalist(layout, dataset_dir, modalities, split="train", **kwargs)
        parts = random_split(train, {"meta_val": float(meta_fraction)}, seed=seed)
        parts["val"] = renumber(clinical_datalist(layout, dataset_dir, modalities, split="val", **kwargs))
        parts["test"] = renumber(clinical_datalist(layout, dataset_dir, modalities, split="test", **kwargs))
    elif layout == "manifest":
        fractions = dict(split_fractions) if split_fractions else {"meta_val": 0.1, "val": 0.1, "test": 0.2}
        parts = random_split(clinical_datalist(layout, dataset_dir, modalities, **kwargs), fractions, seed=seed)
    else:
        raise ValueError(f"clinical_fusion bundle: data_layout must be one of {DATA_LAYOUTS}, got {layout!r}.")
    for name in ("train", "val", "test"):
        if not parts.get(name):
            raise ValueError(
                f"clinical_fusion bundle: the {name!r} split of {dataset_dir} ({layout} layout) is empty; "
                "check dataset_dir / split_fractions."
            )
    parts.setdefault("meta_val", [])
    logger.info("clinical_fusion splits: %s", {k: len(v) for k, v in parts.items()})
    return parts


class ModalityBatch:
    """``prepare_batch`` of a MONAI evaluator for medfusion classifiers.

    Returns ``({modality: tensor}, label long [B] or None, (modality_mask,), {})`` so that
    ``SimpleInferer`` calls ``network(inputs, modality_mask)``.

    Args:
        modalities: the network's ordered modality names.
    """

    def __init__(self, modalities: Sequence[str]) -> None:
        self.modalities = validate_modalities(modalities)

    def __call__(
        self, batchdata: Mapping[str, Any], device: Any = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[Any, Any, tuple[Any, ...], dict[str, Any]]:
        """Move the batch to ``device`` and split it into inputs, labels and the mask."""
        batch = to_device(batchdata, device if device is not None else "cpu", non_blocking)
        label = batch.get(Keys.LABEL)
        if isinstance(label, torch.Tensor):
            label = label.reshape(label.shape[0], -1)[:, 0].long()
        return model_inputs(batch, self.modalities), label, (batch[Keys.MASK].bool(),), {}


def auroc_output(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``output_transform`` of MONAI's ``ROCAUC`` handler on an evaluator output ``{"pred": logits, "label"}``.

    Binary: ``(softmax(pred)[:, 1] [B], label [B])``; multi-class: ``(softmax(pred) [B, K], one-hot [B, K])``.
    """
    logits = output[Keys.PRED].detach().float()
    label = output[Keys.LABEL].detach().long().reshape(-1)
    probs = torch.softmax(logits, dim=1)
    if probs.shape[1] == 2:
        return probs[:, 1], label
    return probs, F.one_hot(label, probs.shape[1])


class PredictionWriter:
    """Inference handler: per-sample class probabilities with the modalities used, written as one CSV.

    Columns: ``case_id``, ``modalities`` (the combination the model saw), ``prob_0 .. prob_{K-1}``,
    ``pred`` (argmax) and ``label`` when the data has labels.

    Args:
        output_csv: the CSV file (parent folders are created).
        modalities: the network's ordered modality names.
        calibration_file: optional ``calibration.json`` (``medfusion calibrate``, fitted on validation): each
            sample's logits are divided by the temperature of its combination before the softmax.
    """

    def __init__(
        self, output_csv: str | Path, modalities: Sequence[str], calibration_file: str | Path | None = None
    ) -> None:
        from medfusion.evaluation.calibration import load_temperatures

        self.output_csv = Path(output_csv)
        self.modalities = validate_modalities(modalities)
        self.temperatures = load_temperatures(calibration_file, self.modalities) if calibration_file else {}
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        """Register on ``STARTED`` (reset), ``ITERATION_COMPLETED`` (collect) and ``COMPLETED`` (write)."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        self.rows = []

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        logits = engine.state.output[Keys.PRED].detach().float().cpu()
        mask = batch[Keys.MASK].bool().cpu().numpy().reshape(logits.shape[0], -1)
        if self.temperatures:
            names = [combination_name(m for m, f in zip(self.modalities, row) if f) for row in mask]
            logits = logits / torch.tensor([[self.temperatures.get(n, 1.0)] for n in names])
        probs = torch.softmax(logits, dim=1).numpy()
        ids = batch.get(Keys.CASE_ID, [str(len(self.rows) + i) for i in range(probs.shape[0])])
        labels = batch.get(Keys.LABEL)
        for i in range(probs.shape[0]):
            row: dict[str, Any] = {
                "case_id": str(ids[i]),
                "modalities": combination_name(m for m, f in zip(self.modalities, mask[i]) if f),
            }
            row.update({f"prob_{k}": float(probs[i, k]) for k in range(probs.shape[1])})
            row["pred"] = int(probs[i].argmax())
            if isinstance(labels, torch.Tensor):
                row["label"] = float(labels.reshape(probs.shape[0], -1)[i, 0])
            self.rows.append(row)

    def _write(self, engine: Any) -> None:
        self.output_csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows).to_csv(self.output_csv, index=False)
        logger.info("clinical_fusion inference: %d predictions written to %s", len(self.rows), self.output_csv)


@torch.no_grad()
def qmf_weight_loss(
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Per-sample QMF fusion weight and per-modality cross-entropy, every sample with ALL its available modalities.

    Args:
        model: a classifier whose head is QMF (``aux["weights"]`` [B, M], ``aux["modality_logits"]``).
        loader: labelled batches.
        modalities: the model's ordered modality names.
        device: default automatic.

    Returns:
        One row per (sample, present modality): ``sample_index``, ``case_id``, ``modality``, ``weight``,
        ``loss`` (CE of that modality's own logits against the label), ``label``.

    Raises:
        ValueError: the model's head does not expose QMF ``weights`` / ``modality_logits``.
    """
    dev = resolve_device(device)
    net = unwrap(model).to(dev).eval()
    mods = validate_modalities(modalities)
    rows: list[dict[str, Any]] = []
    for batch in loader:
        batch = to_device(batch, dev)
        mask = batch[Keys.MASK].bool()
        out = net.forward_outputs(model_inputs(batch, mods), mask)
        if "weights" not in out.aux or "modality_logits" not in out.aux:
            raise ValueError("qmf_weight_loss: the model's head exposes no QMF 'weights'/'modality_logits' aux.")
        labels = batch[Keys.LABEL].reshape(mask.shape[0], -1)[:, 0].long()
        weights = out.aux["weights"].float().cpu().numpy()
        idx = batch.get(Keys.INDEX, torch.arange(mask.shape[0])).reshape(-1).cpu().numpy()
        ids = batch.get(Keys.CASE_ID, [str(i) for i in idx])
        for j, m in enumerate(mods):
            ce = F.cross_entropy(out.aux["modality_logits"][m].float(), labels, reduction="none").cpu().numpy()
            for i in np.flatnonzero(mask[:, j].cpu().numpy()):
                rows.append(
                    {
                        "sample_index": int(idx[i]),
                        "case_id": str(ids[i]),
                        "modality": m,
                        "weight": float(weights[i, j]),
                        "loss": float(ce[i]),
                        "label": int(labels[i]),
                    }
                )
    return pd.DataFrame(rows, columns=["sample_index", "case_id", "modality", "weight", "loss", "label"])


def plot_weights_vs_loss(table: pd.DataFrame, path: str | Path, title: str = "QMF weight vs modality loss") -> Path:
    """Scatter of per-sample fusion weight against the modality's own cross-entropy, one panel per modality.

    Args:
        table: rows of :func:`qmf_weight_loss`.
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: an empty table.
    """
    if table.empty:
        raise ValueError("plot_weights_vs_loss: the table is empty (no sample had a present modality).")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = list(dict.fromkeys(table["modality"].tolist()))
    fig, axes = plt.subplots(1, len(mods), figsize=(3.2 * len(mods), 3.0), squeeze=False)
    for ax, m in zip(axes[0], mods):
        part = table[table["modality"] == m]
        ax.scatter(part["loss"], part["weight"], s=10, alpha=0.7, c=part["label"], cmap="coolwarm", vmin=0, vmax=1)
        rho = part[["loss", "weight"]].corr(method="spearman").iloc[0, 1] if len(part) > 2 else float("nan")
        ax.set_title(f"{m} (Spearman {rho:.2f})", fontsize=9)
        ax.set_xlabel("per-sample CE of the modality")
        ax.set_ylabel("fusion weight")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def method_figures(
    method_name: str,
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    output_dir: str | Path,
    device: str | torch.device | None = None,
) -> list[Path]:
    """Method-specific evaluation outputs (QMF: ``qmf_weight_loss.csv`` and ``qmf_weight_vs_loss.png``).

    Args:
        method_name: the bundle's ``method_name``.
        model: the trained classifier.
        loader: evaluation batches.
        modalities: ordered modality names.
        output_dir: evaluation folder.
        device: default automatic.

    Returns:
        Files written (empty for methods without extra outputs).
    """
    if method_name != "qmf":
        return []
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = qmf_weight_loss(model, loader, modalities, device)
    table.to_csv(out / "qmf_weight_loss.csv", index=False)
    return [out / "qmf_weight_loss.csv", plot_weights_vs_loss(table, out / "qmf_weight_vs_loss.png")]
