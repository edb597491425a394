"""Python glue of the ``bundles/clinical_fusion`` MONAI bundle (multimodal classification, any fusion method).

The bundle's JSON stays declarative; what JSON cannot express cleanly lives here:

* :func:`ordered_kinds`, :func:`resolve_kinds`, :func:`tabular_sizes`, :func:`select_encoders`: per-modality
  settings in the order of ``modalities`` (kinds from ``modality_kinds``, a manifest column group is
  ``tabular``; encoders from ``encoders`` or the kind's default in ``kind_encoders``), with one clear error for
  a modality without a setting;
* :func:`fit_tabular`: fit the tabular encoders' imputation/standardisation on the training split;
* :func:`clinical_splits` / :func:`clinical_datalist` / :func:`split_rule`: datalists of the MIMIC-style
  layout (listfile splits, a meta-validation part carved out of train) or a CSV manifest (split by patient
  with ``group_column`` and stratified by label, or as given by ``split_column``), and the rule in words;
* :func:`class_sampler`: ``class_weights`` (``"auto"``: class-balanced sampling of the training rows);
* :func:`restrict_to_combination` / :class:`RestrictToCombinationd`: inference with ``--combination``; rows lacking
  it get a line, not an abort;
* :class:`ModalityBatch`: ``prepare_batch`` for MONAI evaluators (dict inputs + ``modality_mask``);
* :func:`auroc_output`: ``output_transform`` of MONAI's ``ROCAUC`` handler;
* :func:`prediction_rows` / :class:`PredictionWriter`: per-sample probabilities and method outputs (the one
  format of the bundle's ``predictions.csv`` and of :func:`medfusion.apps.api.predict`);
* :func:`qmf_weight_loss`, :func:`plot_weights_vs_loss`, :func:`method_figures`: the QMF
  weight-vs-loss figure of the evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.transforms import MapTransform

from medfusion.batch import model_inputs, to_device
from medfusion.data.splits import random_split, renumber
from medfusion.engines.utils import resolve_device
from medfusion.modality import Keys, combination_name, validate_modalities

__all__ = [
    "DATA_LAYOUTS",
    "ENCODER_KINDS",
    "ordered_kinds",
    "resolve_kinds",
    "tabular_sizes",
    "select_encoders",
    "fit_tabular",
    "split_rule",
    "class_sampler",
    "val_score",
    "no_class_weights_in_ddp",
    "bundle_check_settings",
    "RestrictToCombinationd",
    "requested_mask",
    "restrict_to_combination",
    "prediction_rows",
    "prediction_table",
    "clinical_preprocessing",
    "clinical_datalist",
    "clinical_splits",
    "ModalityBatch",
    "auroc_output",
    "PredictionWriter",
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


ENCODER_KINDS: dict[str, tuple[str, ...]] = {
    "gru": ("ehr",),
    "mlp": ("ehr", "tabular", "image", "volume"),  # flattens any numeric input
    "tabular": ("tabular",),
    "bert": ("text",),
    "bert_tiny": ("text",),
    "unet3d": ("volume",),
}
"""Registered encoder name -> modality kinds it reads (ResNets read ``image`` or ``volume`` by ``spatial_dims``)."""


def _layout_columns(manifest_columns: Mapping[str, Any] | None, layout: str | None) -> Mapping[str, Any]:
    """The manifest columns that apply: none unless ``layout`` is ``"manifest"`` (``None``: as given)."""
    return {} if layout not in (None, "manifest") else (manifest_columns or {})


def resolve_kinds(
    modalities: Sequence[str],
    kinds: Mapping[str, str],
    manifest_columns: Mapping[str, Any] | None = None,
    layout: str | None = None,
) -> dict[str, str]:
    """``{modality: kind}`` in the order of ``modalities``; a manifest column group (a list) is ``tabular``.

    Args:
        modalities: ordered modality names.
        kinds: the bundle's ``modality_kinds`` (may hold more modalities).
        manifest_columns: the manifest layout's ``{modality: column or [columns]}`` (``None`` for MIMIC).
        layout: the bundle's ``data_layout``: ``manifest_columns`` are read only for ``"manifest"``
            (``None``: read as given).

    Raises:
        ValueError: a modality without a kind (and not a column group), or an unknown kind.
    """
    from medfusion.data.manifest import MODALITY_KINDS

    groups = {m for m, c in _layout_columns(manifest_columns, layout).items() if not isinstance(c, str)}
    merged = {**dict(kinds), **{m: "tabular" for m in groups}}
    out = _per_modality("modality_kinds", modalities, merged)
    bad = {m: k for m, k in out.items() if k not in MODALITY_KINDS}
    if bad:
        raise ValueError(f"clinical_fusion bundle: unknown modality kind(s) {bad}; expected one of {MODALITY_KINDS}.")
    return out


def tabular_sizes(
    kinds: Mapping[str, str],
    tabular_features: Mapping[str, int] | None = None,
    manifest_columns: Mapping[str, Any] | None = None,
    layout: str | None = None,
) -> dict[str, int]:
    """``{modality: F}`` of the tabular modalities: the manifest column group's length, else ``tabular_features``.

    Args:
        kinds: ``{modality: kind}`` (:func:`resolve_kinds`).
        tabular_features: the bundle's ``tabular_features`` (``{modality: F}``).
        manifest_columns: the manifest layout's ``{modality: column or [columns]}``.
        layout: the bundle's ``data_layout``: ``manifest_columns`` are read only for ``"manifest"``
            (``None``: read as given).

    Raises:
        ValueError: a tabular modality whose size is known from neither, or given twice differently.
    """
    columns = _layout_columns(manifest_columns, layout)
    out: dict[str, int] = {}
    for m, kind in kinds.items():
        if kind != "tabular":
            continue
        cols = columns.get(m)
        from_cols = (1 if isinstance(cols, str) else len(cols)) if cols is not None else None
        given = (tabular_features or {}).get(m)
        if from_cols is not None and given is not None and int(given) != from_cols:
            raise ValueError(
                f"clinical_fusion bundle: tabular modality {m!r} has {from_cols} manifest column(s) but "
                f"tabular_features says {given}; drop tabular_features#{m} (it is derived from manifest_columns)."
            )
        size = from_cols if from_cols is not None else given
        if size is None:
            raise ValueError(
                f"clinical_fusion bundle: the feature count of tabular modality {m!r} is unknown; give its columns "
                f"in manifest_columns or set tabular_features#{m}."
            )
        out[m] = int(size)
    return out


def select_encoders(
    modalities: Sequence[str],
    encoders: Mapping[str, Mapping[str, Any]],
    kinds: Mapping[str, str] | None = None,
    sizes: Mapping[str, int] | None = None,
    kind_encoders: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{modality: encoder spec}`` in the order of ``modalities`` (for ``Classifier(encoders=...)``).

    A modality without an entry in ``encoders`` gets its kind's default from ``kind_encoders``. A tabular
    modality's ``in_features`` is filled in from ``sizes`` (the number of its columns).

    Raises:
        ValueError: a modality without an encoder spec, an encoder that cannot read the modality's kind, or an
            ``in_features`` that differs from the number of columns (the message names the config keys).
    """
    kinds = dict(kinds or {})
    defaults = dict(kind_encoders or {})
    merged = {**{m: defaults[k] for m, k in kinds.items() if k in defaults and m not in encoders}, **encoders}
    out = {m: dict(v) for m, v in _per_modality("encoders", modalities, merged).items()}
    for m, spec in out.items():
        kind = kinds.get(m)
        name = str(spec.get("name", ""))
        readable = ENCODER_KINDS.get(name)
        if kind is not None and readable is not None and kind not in readable:
            raise ValueError(
                f"clinical_fusion bundle: modality {m!r} is of kind {kind!r} but encoders#{m} is {name!r}, which reads "
                f"{list(readable)}; set --encoders#{m} (e.g. the kind's default {dict(defaults.get(kind, {}))})."
            )
        if kind == "tabular" and sizes and m in sizes:
            given = spec.get("in_features")
            if given is not None and int(given) != int(sizes[m]):
                raise ValueError(
                    f"clinical_fusion bundle: encoders#{m}#in_features is {given} but modality {m!r} has {sizes[m]} "
                    "column(s); leave in_features out (it is derived from the columns)."
                )
            spec["in_features"] = int(sizes[m])
    return out


def fit_tabular(network: torch.nn.Module, datalist: Sequence[Mapping[str, Any]]) -> torch.nn.Module:
    """Fit the imputation/indicator/standardisation of every ``tabular`` encoder on ``datalist``; return ``network``.

    The bundle calls this on ``split["train"]`` only; the statistics are buffers of the network, so they are
    saved in ``model.pt`` and reused by evaluation, inference and ``medfusion.load_encoder``.
    """
    from medfusion.encoders.tabular import fit_tabular_preprocessing

    return fit_tabular_preprocessing(network, datalist)


def clinical_preprocessing(
    modalities: Sequence[str],
    kinds: Mapping[str, str],
    mode: str = "eval",
    tabular_features: Mapping[str, int] | None = None,
    transform_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`~medfusion.data.clinical.clinical_transforms` for the selected ``modalities``.

    Args:
        modalities: ordered modality names (the network's order).
        kinds: ``{modality: kind}`` (may hold more modalities than used).
        mode: ``"train"`` (augmentation) or ``"eval"``.
        tabular_features: ``{modality: F}`` (may hold more modalities than used; only tabular ones of
            ``modalities`` are passed on).
        transform_kwargs: further :func:`~medfusion.data.clinical.clinical_transforms` arguments as one mapping
            (the bundle's ``transform_kwargs``: sizes, tokenizer, seed).
        **kwargs: further :func:`~medfusion.data.clinical.clinical_transforms` arguments (win over
            ``transform_kwargs``).

    Raises:
        ValueError: a modality without a kind.
    """
    from medfusion.data.clinical import clinical_transforms

    ordered = ordered_kinds(modalities, kinds)
    tab = {m: int(f) for m, f in (tabular_features or {}).items() if ordered.get(m) == "tabular"}
    options = {**dict(transform_kwargs or {}), **kwargs}
    return clinical_transforms(ordered, mode=mode, tabular_features=tab or None, **options)


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
    kinds: Mapping[str, str] | None = None,
    case_id_column: str = "case_id",
    group_column: str | None = None,
    split_column: str | None = None,
    missing_files: str = "missing",
    labels_optional: bool = False,
) -> list[dict[str, Any]]:
    """One datalist of a dataset, without splitting (inference).

    Args:
        layout: ``"mimic"`` (``split`` = a listfile split ``train``/``val``/``test``) or ``"manifest"``
            (every row; ``split`` ignored).
        dataset_dir: dataset root; the roots default to the layout's (:meth:`medfusion.data.mimic.MimicLayout.roots`:
            ``ehr/``, ``cxr/``, ``reports/`` when they exist; :meth:`medfusion.data.manifest.ManifestLayout.roots`:
            ``manifest/manifest.csv``, or ``dataset_dir`` itself when it is a ``.csv``).
        modalities: ordered modality names.
        split: listfile split of the MIMIC layout.
        ehr_root: mimic3-benchmarks root (default ``<dataset_dir>/ehr``, else ``dataset_dir``).
        cxr_root: MIMIC-CXR root (default ``<dataset_dir>/cxr``).
        reports_root: MIMIC-CXR reports root (default ``<dataset_dir>/reports``, else the CXR root).
        mimic_task: ``"in-hospital-mortality"`` or ``"phenotyping"``.
        manifest_csv: manifest path (default ``<dataset_dir>/manifest/manifest.csv``).
        manifest_columns: ``{modality: column or [columns]}`` (default: the modality's own column).
        label_columns: label column(s) of the manifest (``[]`` for unlabelled data).
        kinds: ``{modality: kind}``: how each manifest cell is read (see :mod:`medfusion.data.manifest`).
        case_id_column: the manifest's row id column.
        group_column: the manifest's patient (group) column (items get ``group``).
        split_column: the manifest's split column (items get ``split``).
        missing_files: ``"missing"`` or ``"error"`` for manifest paths whose file does not exist.
        labels_optional: a manifest without the label column(s) is read unlabelled (inference) instead of failing.

    Raises:
        ValueError: unknown layout (the data layers raise for malformed data).
    """
    from medfusion.data.layout import get_layout

    if layout == "mimic":
        return get_layout("mimic").discover(
            dataset_dir,
            modalities,
            split=split,
            task=mimic_task,
            ehr_root=ehr_root,
            cxr_root=cxr_root,
            reports_root=reports_root,
        )
    if layout == "manifest":
        return get_layout("manifest").discover(
            dataset_dir,
            _manifest_spec(modalities, manifest_columns),
            id_column=case_id_column,
            label_columns=label_columns,
            kinds=kinds,
            missing_files=missing_files,
            group_column=group_column,
            split_column=split_column,
            manifest_csv=manifest_csv,
            labels_optional=labels_optional,
        )
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
    * ``"manifest"``: with ``split_column``, the parts it names; otherwise a seeded split of the rows by
      ``split_fractions`` (default ``{"meta_val": 0.1, "val": 0.1, "test": 0.2}``, the rest is train) that keeps
      every group of ``group_column`` (patient) in one part and is stratified by label
      (:func:`medfusion.data.splits.group_split`; without ``group_column`` every row is its own group).

    Args:
        layout: ``"mimic"`` or ``"manifest"``.
        dataset_dir: dataset root.
        modalities: ordered modality names.
        split_fractions: fractions of the manifest split.
        meta_fraction: MIMIC layout: fraction of the train listfile held out as ``meta_val`` (0 = empty).
        seed: split seed.
        **kwargs: passed to :func:`clinical_datalist` (roots, task, manifest columns, kinds, id/label/group/split
            columns, ``missing_files``).

    Raises:
        ValueError: unknown layout, bad fractions, an empty split, unknown split values.
    """
    from medfusion.data.splits import group_split, groups_in_several_parts, split_by_column

    if layout == "mimic":
        train = clinical_datalist(layout, dataset_dir, modalities, split="train", **kwargs)
        parts = random_split(train, {"meta_val": float(meta_fraction)}, seed=seed)
        parts["val"] = renumber(clinical_datalist(layout, dataset_dir, modalities, split="val", **kwargs))
        parts["test"] = renumber(clinical_datalist(layout, dataset_dir, modalities, split="test", **kwargs))
    elif layout == "manifest":
        items = clinical_datalist(layout, dataset_dir, modalities, **kwargs)
        if kwargs.get("split_column"):
            parts = split_by_column(items)
            leaked = groups_in_several_parts(parts)
            if leaked:
                logger.warning(
                    "clinical_fusion: %d group(s) of %r are in more than one split of %r (e.g. %s); test results on "
                    "them are optimistic.",
                    len(leaked),
                    kwargs.get("group_column"),
                    kwargs.get("split_column"),
                    dict(list(leaked.items())[:3]),
                )
        else:
            fractions = dict(split_fractions) if split_fractions else {"meta_val": 0.1, "val": 0.1, "test": 0.2}
            parts = group_split(items, fractions, seed=seed)
    else:
        raise ValueError(f"clinical_fusion bundle: data_layout must be one of {DATA_LAYOUTS}, got {layout!r}.")
    for name in ("train", "val", "test"):
        if not parts.get(name):
            raise ValueError(
                f"clinical_fusion bundle: the {name!r} split of {dataset_dir} ({layout} layout) is empty; "
                "check dataset_dir / split_fractions / split_column."
            )
    parts.setdefault("meta_val", [])
    logger.info("clinical_fusion splits: %s", {k: len(v) for k, v in parts.items()})
    return parts


def split_rule(
    layout: str,
    parts: Mapping[str, Sequence[Mapping[str, Any]]],
    split_fractions: Mapping[str, float] | None = None,
    seed: int = 0,
    group_column: str | None = None,
    split_column: str | None = None,
) -> str:
    """The split rule in one paragraph, with each part's rows, groups and label balance (for ``summary.md``)."""
    from medfusion.data.splits import groups_in_several_parts

    if layout == "mimic":
        rule = (
            "MIMIC-style listfiles: train/val/test as given by the listfiles (mimic3-benchmarks split by patient); "
            f"meta_val drawn at random from the train listfile (seed {seed})."
        )
    elif split_column:
        rule = f"given by the manifest column {split_column!r}."
    else:
        fractions = dict(split_fractions) if split_fractions else {"meta_val": 0.1, "val": 0.1, "test": 0.2}
        unit = f"patient (group_column {group_column!r})" if group_column else "row (no group_column set)"
        rule = (
            f"manifest split by {unit}: no {'patient' if group_column else 'row'} in two parts, stratified by label, "
            f"fractions {fractions} (rest train), seed {seed}."
        )
    counts = []
    for name in ("train", "meta_val", "val", "test"):
        part = parts.get(name, [])
        if not part:
            continue
        labels = [v for v in (e.get(Keys.LABEL) for e in part) if isinstance(v, (int, float))]
        pos = f", {100 * float(np.mean([float(v) > 0 for v in labels])):.0f}% label > 0" if labels else ""
        groups = {e[Keys.GROUP] for e in part if Keys.GROUP in e}
        grp = f", {len(groups)} groups" if groups else ""
        counts.append(f"{name} {len(part)} rows{grp}{pos}")
    leaked = groups_in_several_parts(parts)
    leak = f" WARNING: {len(leaked)} group(s) are in more than one part." if leaked else ""
    return f"Split: {rule} Parts: {'; '.join(counts)}.{leak}"


def class_sampler(
    datalist: Sequence[Mapping[str, Any]], class_weights: str | Sequence[float] | None, num_classes: int
) -> torch.utils.data.WeightedRandomSampler | None:
    """Training sampler for ``class_weights`` (``None`` = plain shuffling).

    ``"auto"`` weighs class ``k`` by ``n / (K n_k)`` (scikit-learn's ``"balanced"``); a list gives the weights.
    Each epoch draws ``len(datalist)`` rows with replacement, with probability proportional to their class
    weight: in expectation the same gradient as a class-weighted cross-entropy, and it works for every method,
    including those that compute their own losses (QMF, OmniFuse, MetaKD). It draws from torch's global generator,
    which the bundle re-seeds every epoch (exact resume).

    Raises:
        ValueError: unknown ``class_weights``, a weight list of the wrong length, or labels that are not class
            indices in ``[0, num_classes)``.
    """
    if class_weights is None:
        return None
    labels = []
    for e in datalist:
        v = e.get(Keys.LABEL)
        v = v[0] if isinstance(v, (list, tuple)) else v
        if v is None or float(v) != int(float(v)) or not 0 <= int(float(v)) < int(num_classes):
            raise ValueError(
                f"class_weights: row {e.get(Keys.CASE_ID, '?')!r} has label {v!r}; expected a class index in "
                f"[0, {num_classes})."
            )
        labels.append(int(float(v)))
    counts = np.bincount(labels, minlength=int(num_classes)).astype(float)
    if isinstance(class_weights, str):
        if class_weights != "auto":
            raise ValueError(
                f"class_weights must be null, 'auto' or a list of {num_classes} numbers, got {class_weights!r}."
            )
        weights = np.where(counts > 0, len(labels) / (int(num_classes) * np.maximum(counts, 1)), 0.0)
    else:
        weights = np.asarray([float(w) for w in class_weights])
        if weights.shape != (int(num_classes),) or (weights < 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"class_weights: expected {num_classes} non-negative numbers, got {list(class_weights)}.")
    logger.info(
        "class_weights: class counts %s, weights %s", counts.astype(int).tolist(), np.round(weights, 3).tolist()
    )
    return torch.utils.data.WeightedRandomSampler(
        # a tensor is what the sampler makes of its weights (torch.as_tensor); torch types them as Sequence[float]
        torch.as_tensor(weights[labels], dtype=torch.double),  # type: ignore[arg-type]
        num_samples=len(labels),
        replacement=True,
    )


def no_class_weights_in_ddp(class_weights: Any) -> None:
    """Refuse ``class_weights`` in ``multi_gpu_train.json`` (its ``DistributedSampler`` does not weigh classes).

    Raises:
        ValueError: ``class_weights`` is set.
    """
    if class_weights is not None:
        raise ValueError(
            "clinical_fusion bundle: class_weights is not supported with multi_gpu_train.json yet (the distributed "
            "sampler draws every row equally); train on one process or drop --class_weights."
        )


def val_score(engine: Any) -> float:
    """``score_function`` of MONAI's ``EarlyStopHandler``: the evaluator's key metric (validation AUROC)."""
    value = engine.state.metrics[engine.state.key_metric_name]
    return float(value) if np.isfinite(value) else -1.0


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
        """Move the batch to ``device`` and split it into inputs, labels and the mask.

        Raises:
            KeyError: the batch lacks a modality of the network (or ``modality_mask``).
            ValueError: ``modality_mask`` is not ``[B, M]`` for the network's ``M`` modalities (a loader built for
                other modalities: its mask columns would be read as the network's).
        """
        batch = to_device(batchdata, device if device is not None else "cpu", non_blocking)
        label = batch.get(Keys.LABEL)
        if isinstance(label, torch.Tensor):
            label = label.reshape(label.shape[0], -1)[:, 0].long()
        inputs = model_inputs(batch, self.modalities)
        if Keys.MASK not in batch:
            raise KeyError(f"batch has no {Keys.MASK!r}; keys present: {sorted(batch)}.")
        mask = batch[Keys.MASK]
        if mask.ndim != 2 or mask.shape[1] != len(self.modalities):
            raise ValueError(
                f"batch {Keys.MASK!r} has shape {list(mask.shape)}, expected [B, {len(self.modalities)}] for the "
                f"network's modalities [{', '.join(self.modalities)}]: build the loader for these modalities."
            )
        return inputs, label, (mask.bool(),), {}


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


MISSING_KEY = "missing_modalities"
"""Batch key (str per sample): requested modalities the sample does not have, joined with ``+``."""
PREDICTABLE_KEY = "predictable"
"""Batch key (bool per sample): the sample has at least one requested modality."""


def requested_mask(modalities: Sequence[str], combination: Sequence[str] | str | None = None) -> torch.Tensor:
    """Which of ``modalities`` a combination requests, bool ``[M]`` (``None`` or ``"all"``: every one).

    Raises:
        ValueError: a name that is not one of ``modalities``.
    """
    from medfusion.modality import parse_combination

    mods = validate_modalities(modalities)
    if combination is None or combination == "all":
        combo: Sequence[str] = mods
    elif isinstance(combination, str):
        combo = parse_combination(combination, mods)
    else:
        combo = tuple(parse_combination("+".join(combination), mods))
    return torch.tensor([m in combo for m in mods], dtype=torch.bool)


def restrict_to_combination(
    data: Mapping[Any, Any], modalities: Sequence[str], requested: torch.Tensor, mask_key: str = Keys.MASK
) -> dict[Any, Any]:
    """Keep only the ``requested`` modalities of one sample (mask ``[M]``) or a batch (mask ``[B, M]``).

    The one rule of inference with a combination (:class:`RestrictToCombinationd` per sample, the in-memory
    :func:`medfusion.apps.api.predict` per batch): the mask becomes ``modality_mask & requested`` and the
    dropped modalities' inputs are zeroed. A sample with none of the requested modalities keeps its own mask
    and inputs (so a batch can still run) and gets ``predictable = False``. Every sample gets
    ``missing_modalities``: the requested modalities it does not have (``""`` when none is missing).

    Args:
        data: a sample or a batch with one key per modality and ``mask_key``.
        modalities: the network's ordered modality names (the mask's columns).
        requested: bool ``[M]`` (:func:`requested_mask`).
        mask_key: where the mask lives.

    Returns:
        A copy of ``data`` with the restricted mask and inputs, ``missing_modalities`` (str, or a list of
        ``B`` str) and ``predictable`` (bool, or bool ``[B]``).
    """
    d = dict(data)
    raw = torch.as_tensor(d[mask_key], dtype=torch.bool)
    single = raw.ndim == 1
    have = raw.reshape(1, -1) if single else raw
    req = requested.to(have.device).reshape(1, -1)
    keep = have & req
    ok = keep.any(dim=1)  # [B]
    new_mask = torch.where(ok.unsqueeze(1), keep, have)
    missing = [
        combination_name(m for m, r, h in zip(modalities, req[0].tolist(), row) if r and not h) for row in have.tolist()
    ]
    for j, m in enumerate(modalities):
        drop = have[:, j] & ~new_mask[:, j]  # [B]: present, but not requested (in a predictable row)
        if bool(drop.any()):
            x = torch.as_tensor(d[m])
            if single:
                d[m] = torch.zeros_like(x)
            else:
                d[m] = torch.where(drop.to(x.device).reshape(-1, *([1] * (x.ndim - 1))), torch.zeros_like(x), x)
    d[mask_key] = new_mask[0] if single else new_mask
    d[MISSING_KEY] = missing[0] if single else missing
    d[PREDICTABLE_KEY] = bool(ok[0]) if single else ok
    return d


class RestrictToCombinationd(MapTransform):
    """Inference with a modality combination: keep only its modalities; never fail on a sample lacking all of them.

    Per sample, :func:`restrict_to_combination`: the mask becomes ``modality_mask & combination`` and the dropped
    modalities' inputs are zeroed. A sample with none of the requested modalities keeps its own mask (so the batch
    can still run) and gets ``predictable = False``; :class:`PredictionWriter` writes a line without probabilities
    for it. Every sample gets ``missing_modalities``: the requested modalities it does not have (``""`` when none
    is missing).

    Args:
        modalities: the network's ordered modality names.
        combination: requested modality names; ``None`` or ``"all"`` = every modality.
        mask_key: where the mask lives.
    """

    def __init__(
        self, modalities: Sequence[str], combination: Sequence[str] | str | None = None, mask_key: str = Keys.MASK
    ) -> None:
        self.modalities = validate_modalities(modalities)
        MapTransform.__init__(self, list(self.modalities))
        self.requested = requested_mask(self.modalities, combination)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        """Restrict one sample's mask; add ``missing_modalities`` and ``predictable``."""
        return restrict_to_combination(data, self.modalities, self.requested, self.mask_key)


def prediction_rows(
    logits: torch.Tensor,
    batch: Mapping[str, Any],
    modalities: Sequence[str],
    temperatures: Mapping[str, float] | None = None,
    aux: Mapping[str, Any] | None = None,
    first_row: int = 0,
    per_modality: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Per-sample prediction rows of one batch: the one format of ``predictions.csv`` and of ``api.predict``.

    Columns: ``case_id`` (``first_row + i`` without ids), ``modalities`` (the combination the model saw),
    ``missing_modalities``, ``prob_0 .. prob_{K-1}``, ``pred`` (argmax), ``note``, ``label`` (when the batch has
    labels), then the head's per-sample outputs (:func:`~medfusion.evaluation.classification.per_sample_aux`:
    QMF ``weights_<m>``, OmniFuse ``omega_<m>``, per-modality logits ``modality_logits_<m>_<k>``, ...). A sample
    without any requested modality (``predictable`` False) gets empty probabilities and outputs and a note.

    Args:
        logits: ``[B, K]`` network output.
        batch: the batch (``modality_mask`` ``[B, M]``; optional ``case_id``, ``label``, ``missing_modalities``,
            ``predictable``).
        modalities: the network's ordered modality names.
        temperatures: ``{combination: T}``: logits divided by the temperature of the sample's combination.
        aux: the head's ``FusionOutput.aux`` of this batch (``None``: no method outputs).
        first_row: running number of the batch's first sample (ids when the batch has no ``case_id``).
        per_modality: the head's ``per_modality_aux`` keys (``[B, M]`` entries of ``aux``).

    Returns:
        ``B`` rows (dicts).
    """
    from medfusion.evaluation.classification import per_sample_aux

    logits = logits.detach().float().cpu()
    n = logits.shape[0]
    mask = torch.as_tensor(batch[Keys.MASK]).bool().cpu().numpy().reshape(n, -1)
    if temperatures:
        names = [combination_name(m for m, f in zip(modalities, row) if f) for row in mask]
        logits = logits / torch.tensor([[temperatures.get(c, 1.0)] for c in names])
    probs = torch.softmax(logits, dim=1).numpy()
    ids = batch.get(Keys.CASE_ID, [str(first_row + i) for i in range(n)])
    labels = batch.get(Keys.LABEL)
    missing = batch.get(MISSING_KEY, [""] * n)
    ok = torch.as_tensor(batch.get(PREDICTABLE_KEY, torch.ones(n, dtype=torch.bool))).bool().reshape(-1).cpu().numpy()
    outputs = per_sample_aux(aux or {}, n, modalities, per_modality)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"case_id": str(ids[i])}
        if ok[i]:
            row["modalities"] = combination_name(m for m, f in zip(modalities, mask[i]) if f)
            row["missing_modalities"] = str(missing[i])
            row.update({f"prob_{k}": float(probs[i, k]) for k in range(probs.shape[1])})
            row["pred"] = int(probs[i].argmax())
            row["note"] = ""
        else:
            row["modalities"] = ""
            row["missing_modalities"] = str(missing[i])
            row.update({f"prob_{k}": float("nan") for k in range(probs.shape[1])})
            row["pred"] = pd.NA
            row["note"] = f"no prediction: none of the requested modalities ({missing[i]}) is present"
        if isinstance(labels, torch.Tensor):
            row["label"] = float(labels.reshape(n, -1)[i, 0])
        row.update({name: float(col[i]) if ok[i] else float("nan") for name, col in outputs.items()})
        rows.append(row)
    return rows


def prediction_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """:func:`prediction_rows` of every batch as one table (``pred`` as a nullable integer column)."""
    table = pd.DataFrame(list(rows))
    if "pred" in table:
        table["pred"] = table["pred"].astype("Int64")
    return table


class PredictionWriter:
    """Inference handler: per-sample class probabilities, the modalities used and the method's outputs, as one CSV.

    Rows are :func:`prediction_rows` (``case_id``, ``modalities``, ``missing_modalities``, ``prob_*``, ``pred``,
    ``note``, ``label`` when the data has labels, then the head's per-sample outputs such as QMF ``weights_<m>``
    or OmniFuse ``omega_<m>``, read from the fusion head's output by a forward hook while the engine runs). A
    sample with none of the requested modalities (see :class:`RestrictToCombinationd`) gets a line with empty
    probabilities and a note instead of stopping the run. :func:`medfusion.apps.api.predict` runs this handler
    (without a file) and returns :meth:`table`.

    Args:
        output_csv: the CSV file (parent folders are created); ``None``: keep the rows in memory only.
        modalities: the network's ordered modality names.
        calibration_file: optional ``calibration.json`` (``medfusion calibrate``, fitted on validation): each
            sample's logits are divided by the temperature of its combination before the softmax.
        method_outputs: add the head's per-sample outputs (``False``: probabilities only).
    """

    def __init__(
        self,
        output_csv: str | Path | None,
        modalities: Sequence[str],
        calibration_file: str | Path | None = None,
        method_outputs: bool = True,
    ) -> None:
        from medfusion.evaluation.calibration import load_temperatures

        self.output_csv = Path(output_csv) if output_csv is not None else None
        self.modalities = validate_modalities(modalities)
        self.temperatures = load_temperatures(calibration_file, self.modalities) if calibration_file else {}
        self.method_outputs = method_outputs
        self.rows: list[dict[str, Any]] = []
        self._aux: Mapping[str, Any] | None = None
        self._hook: Any = None
        self._per_modality: tuple[str, ...] = ()

    def attach(self, engine: Any) -> None:
        """Register on ``STARTED`` (reset, hook the head), ``ITERATION_COMPLETED`` (collect), ``COMPLETED`` (write)."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _reset(self, engine: Any) -> None:
        self.rows = []
        self._aux = None
        self._unhook(engine)
        from medfusion.batch import unwrap

        head = getattr(unwrap(engine.network), "head", None) if hasattr(engine, "network") else None
        if self.method_outputs and isinstance(head, torch.nn.Module):
            self._hook = head.register_forward_hook(self._keep_aux)

    def _keep_aux(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        aux = getattr(output, "aux", None)
        self._aux = aux if isinstance(aux, Mapping) else None
        self._per_modality = tuple(getattr(module, "per_modality_aux", ()))

    def _on_exception(self, engine: Any, e: BaseException) -> None:
        """Remove the head hook, then re-raise the exception.

        Ignite hands an exception to the ``EXCEPTION_RAISED`` handlers INSTEAD of raising it, so a handler that
        does not re-raise would turn a failed inference into a silent run without predictions.
        """
        self._unhook(engine)
        raise e

    def _unhook(self, engine: Any, *args: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _collect(self, engine: Any) -> None:
        self.rows += prediction_rows(
            engine.state.output[Keys.PRED],
            engine.state.batch,
            self.modalities,
            self.temperatures,
            self._aux,
            first_row=len(self.rows),
            per_modality=self._per_modality,
        )
        self._aux = None

    def table(self) -> pd.DataFrame:
        """The rows collected by the last run, as :func:`prediction_table`."""
        return prediction_table(self.rows)

    def _write(self, engine: Any) -> None:
        self._unhook(engine)
        if self.output_csv is None:
            return
        self.output_csv.parent.mkdir(parents=True, exist_ok=True)
        table = self.table()
        table.to_csv(self.output_csv, index=False)
        skipped = int((table.get("modalities", pd.Series(dtype=str)) == "").sum())
        logger.info(
            "clinical_fusion inference: %d predictions written to %s (%d row(s) without any requested modality)",
            len(self.rows) - skipped,
            self.output_csv,
            skipped,
        )


def bundle_check_settings(
    bundle_dir: str | Path, overrides: Mapping[str, Any] | None = None, config: str = "train.json"
) -> dict[str, Any]:
    """What ``medfusion check-data --bundle`` needs from a clinical bundle config (manifest layout).

    Returns:
        ``{"modalities": {name: column or [columns]}, "kinds": {name: kind}, "id_column", "label_columns",
        "group_column", "split_column", "missing_files", "num_classes"}``.

    Raises:
        FileNotFoundError: no ``configs/<config>`` in ``bundle_dir``.
    """
    from monai.bundle import ConfigParser

    cfg = Path(bundle_dir) / "configs" / config
    if not cfg.is_file():
        raise FileNotFoundError(f"bundle config {cfg} does not exist.")
    parser = ConfigParser()
    parser.read_config(str(cfg))
    for key, value in (overrides or {}).items():
        parser[key] = value

    def get(key: str, default: Any = None) -> Any:
        return parser.get_parsed_content(key) if key in parser else default

    modalities = list(get("modalities"))
    columns = _manifest_spec(modalities, get("manifest_columns"))
    label = get("label_column", "label")
    return {
        "modalities": columns,
        "kinds": resolve_kinds(modalities, get("modality_kinds", {}), columns),
        "id_column": get("case_id_column", "case_id"),
        "label_columns": [] if label is None else [label],
        "group_column": get("group_column"),
        "split_column": get("split_column"),
        "missing_files": get("missing_files", "missing"),
        "num_classes": get("num_classes"),
    }


def method_figures(
    method_name: str,
    model: torch.nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    output_dir: str | Path,
    device: str | torch.device | None = None,
) -> list[Path]:
    """Method-specific evaluation outputs: the method class's ``evaluation_outputs`` hook.

    QMF and its ablations write ``qmf_weight_loss.csv`` and ``qmf_weight_vs_loss.png``
    (:meth:`medfusion.fusion.qmf.QMFMethod.evaluation_outputs`); the other methods (Meta Fusion included)
    write nothing.

    Args:
        method_name: the bundle's ``method_name``.
        model: the trained classifier.
        loader: evaluation batches.
        modalities: ordered modality names.
        output_dir: evaluation folder.
        device: default automatic.

    Returns:
        Files written (empty for methods without extra outputs).

    Raises:
        KeyError: unknown method name.
    """
    from medfusion.fusion.recipes import method_class

    return method_class(method_name).evaluation_outputs(model, loader, modalities, output_dir, resolve_device(device))
