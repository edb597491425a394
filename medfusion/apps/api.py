"""In-memory Python API: fit a fusion method, predict per sample, evaluate every modality combination.

The clinical bundle's components called from Python (notebooks, benchmarks, tests), without a config file:

* :func:`fit` builds the network and the recipe as the bundle does (:class:`~medfusion.models.classifier.Classifier`
  with :func:`~medfusion.fusion.recipes.head_name` / :func:`~medfusion.fusion.recipes.default_head_kwargs`,
  :func:`~medfusion.fusion.recipes.build_method`) and trains it with the bundles' trainer
  (:func:`~medfusion.engines.trainer.build_trainer`: :class:`~medfusion.engines.trainer.MethodTrainer`, per-epoch
  re-seeding, and, given a folder, the atomic resumable checkpoints that refuse to replace another run unless
  ``overwrite=True``). Validation, when given, is the bundle's (AUROC of :class:`ModalityBatch` batches; the best
  ``model.pt`` saved atomically beside the checkpoints). The result, :class:`FittedModel`, keeps the network, the
  recipe, the run record (:class:`~medfusion.engines.record.RunRecord`, the one every bundle checkpoint holds)
  and the training losses.
* :func:`predict` runs a MONAI ``SupervisedEvaluator`` with the bundle's
  :class:`~medfusion.apps.clinical_bundle.PredictionWriter` and returns its table: one row per sample with the
  modalities used, class probabilities and the method's per-sample outputs (QMF ``weights_<m>``, OmniFuse
  ``omega_<m>``, ``modality_logits_<m>_<k>``, ...). ``combination=`` restricts every sample to a modality
  combination with the bundle's rule (:func:`~medfusion.apps.clinical_bundle.restrict_to_combination`).
* :func:`evaluate` is :func:`~medfusion.evaluation.classification.evaluate_classification` (every combination,
  metrics with bootstrap CIs) plus, given a folder, the method's own evaluation files, written as the bundle's
  ``evaluate.json`` writes them (all or nothing, no overwrite without ``overwrite=True``).

Data are named modalities with a ``modality_mask`` presence convention (bool ``[N, M]``, True = present, absent
inputs zero-filled): a :class:`TensorData` (stacked tensors, e.g. from :func:`stack_datalist`), or any re-iterable
of collated batch dicts (a ``torch.utils.data.DataLoader`` over a bundle's transforms). A fitted model refuses
data without the modalities it was trained on (the run record's modalities; data with more modalities are
selected by name).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medfusion.apps.clinical_bundle import (
    ModalityBatch,
    PredictionWriter,
    auroc_output,
    requested_mask,
    restrict_to_combination,
    val_score,
)
from medfusion.batch import unwrap
from medfusion.engines.record import RunRecord, model_difference
from medfusion.engines.trainer import build_trainer
from medfusion.engines.utils import resolve_device
from medfusion.fusion.method import Method
from medfusion.modality import Keys, validate_modalities

__all__ = ["TensorData", "TensorBatches", "stack_datalist", "FittedModel", "fit", "load_fitted", "predict", "evaluate"]

logger = logging.getLogger(__name__)

Data = Any
"""What :func:`fit`, :func:`predict` and :func:`evaluate` read: a :class:`TensorData` or a re-iterable of batch
dicts (modality keys, ``modality_mask`` bool ``[B, M]`` in the model's order, ``label``, ``sample_index``)."""


@dataclass(frozen=True)
class TensorData:
    """A split held in memory: one stacked tensor per named modality, the presence mask, labels and ids.

    Attributes:
        inputs: ``{modality: [N, ...]}``; the keys' order is the order of the mask's columns. Absent inputs are
            zero-filled (the batch convention).
        modality_mask: bool ``[N, M]``, True = present (``None``: every modality present).
        label: ``[N]`` class indices (or ``[N, L]``; the first column is the class), ``None`` for unlabelled data.
        case_id: ``N`` ids (default ``"0" .. "N-1"``).
        sample_index: int ``[N]``: stable position of each sample in its split (QMF's loss history, OmniFuse's
            mining); default ``0 .. N-1``.

    Raises:
        ValueError: no modality, duplicate names, or tensors/ids whose first dimension is not ``N`` (the message
            names the field).
    """

    inputs: Mapping[str, torch.Tensor]
    modality_mask: torch.Tensor | None = None
    label: torch.Tensor | None = None
    case_id: Sequence[str] | None = None
    sample_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("TensorData: inputs is empty; give {modality: tensor [N, ...]}.")
        mods = validate_modalities(list(self.inputs))
        inputs = {m: torch.as_tensor(self.inputs[m]) for m in mods}
        n = int(next(iter(inputs.values())).shape[0])
        for m, x in inputs.items():
            if x.ndim == 0 or int(x.shape[0]) != n:
                raise ValueError(f"TensorData: inputs[{m!r}] has shape {tuple(x.shape)}; expected {n} samples first.")
        mask = (
            torch.ones(n, len(mods), dtype=torch.bool)
            if self.modality_mask is None
            else torch.as_tensor(self.modality_mask).bool()
        )
        if tuple(mask.shape) != (n, len(mods)):
            raise ValueError(
                f"TensorData: modality_mask has shape {tuple(mask.shape)}; expected [{n}, {len(mods)}] "
                f"(samples x modalities {list(mods)})."
            )
        label = None if self.label is None else torch.as_tensor(self.label)
        if label is not None and (label.ndim == 0 or int(label.shape[0]) != n):
            raise ValueError(f"TensorData: label has shape {tuple(label.shape)}; expected {n} samples first.")
        ids = [str(i) for i in range(n)] if self.case_id is None else [str(c) for c in self.case_id]
        if len(ids) != n:
            raise ValueError(f"TensorData: {len(ids)} case ids for {n} samples.")
        index = torch.arange(n) if self.sample_index is None else torch.as_tensor(self.sample_index).reshape(-1)
        if int(index.shape[0]) != n:
            raise ValueError(f"TensorData: {int(index.shape[0])} sample indices for {n} samples.")
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "modality_mask", mask)
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "case_id", ids)
        object.__setattr__(self, "sample_index", index.long())

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in the order of the mask's columns."""
        return tuple(self.inputs)

    @property
    def mask(self) -> torch.Tensor:
        """The presence mask, bool ``[N, M]``."""
        assert self.modality_mask is not None  # set in __post_init__
        return self.modality_mask

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], modalities: Sequence[str]) -> TensorData:
        """From one dict following the batch convention (e.g. a whole split collated, or :meth:`as_batch`).

        Args:
            batch: ``{modality: [N, ...], "modality_mask": [N, M], "label", "case_id", "sample_index"}``.
            modalities: the modality keys, in the order of the mask's columns.

        Raises:
            KeyError: a modality without a key in ``batch``.
        """
        mods = validate_modalities(modalities)
        absent = [m for m in mods if m not in batch]
        if absent:
            raise KeyError(f"TensorData.from_batch: no key for modalities {absent}; keys present: {sorted(batch)}.")
        return cls(
            {m: batch[m] for m in mods},
            batch.get(Keys.MASK),
            batch.get(Keys.LABEL),
            batch.get(Keys.CASE_ID),
            batch.get(Keys.INDEX),
        )

    def as_batch(self) -> dict[str, Any]:
        """The whole split as one batch dict (what the noise and dropout functions of :mod:`medfusion.data` take).

        Returns:
            ``{modality: [N, ...], "modality_mask", "sample_index", "label" (labelled data), "case_id"}``.
        """
        out: dict[str, Any] = {**self.inputs, Keys.MASK: self.mask, Keys.INDEX: self.sample_index}
        if self.label is not None:
            out[Keys.LABEL] = self.label
        out[Keys.CASE_ID] = list(self.case_id or [])
        return out

    def select(self, modalities: Sequence[str]) -> TensorData:
        """The same samples with only ``modalities`` (in that order).

        Raises:
            ValueError: a modality the data does not have (the message lists both).
        """
        mods = validate_modalities(modalities)
        absent = [m for m in mods if m not in self.inputs]
        if absent:
            raise ValueError(f"the data has no modalities {absent} (it has {list(self.modalities)}).")
        cols = [self.modalities.index(m) for m in mods]
        return TensorData({m: self.inputs[m] for m in mods}, self.mask[:, cols], self.label, self.case_id,
                          self.sample_index)  # fmt: skip

    def with_mask(self, presence: torch.Tensor | np.ndarray) -> TensorData:
        """The same samples with modalities removed where ``presence`` is False (their inputs zero-filled).

        Args:
            presence: bool ``[N, M]`` in the order of :attr:`modalities`; the new mask is
                ``modality_mask & presence``.

        Raises:
            ValueError: ``presence`` is not ``[N, M]``.
        """
        keep = torch.as_tensor(np.asarray(presence)).bool()
        if tuple(keep.shape) != tuple(self.mask.shape):
            raise ValueError(f"with_mask: presence has shape {tuple(keep.shape)}; expected {tuple(self.mask.shape)}.")
        mask = self.mask & keep
        inputs = {
            m: x * mask[:, j].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            for j, (m, x) in enumerate(self.inputs.items())
        }
        return TensorData(inputs, mask, self.label, self.case_id, self.sample_index)

    def batches(self, batch_size: int, shuffle: bool = False) -> TensorBatches:
        """Re-iterable batches of this split (see :class:`TensorBatches`)."""
        return TensorBatches(self, batch_size, shuffle)


class TensorBatches:
    """Re-iterable batch dicts of a :class:`TensorData` (what the trainer and the evaluators iterate).

    Each pass yields ``{modality: [B, ...], "modality_mask": bool [B, M], "sample_index": [B], "label": [B],
    "case_id": [B ids]}``. With ``shuffle`` every pass draws a permutation from torch's global generator, like a
    shuffling ``DataLoader``, so the bundles' per-epoch re-seeding makes training reproducible.

    Args:
        data: the split.
        batch_size: samples per batch (the last batch may be smaller).
        shuffle: a new random order every pass.
    """

    def __init__(self, data: TensorData, batch_size: int, shuffle: bool = False) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.dataset = data  # ``len(loader.dataset)``, as a DataLoader

    def __len__(self) -> int:
        return (len(self.data) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self.data)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        whole = self.data.as_batch()
        ids = np.asarray(whole.pop(Keys.CASE_ID), dtype=object)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            batch = {k: v[idx] for k, v in whole.items()}
            batch[Keys.CASE_ID] = ids[idx.numpy()].tolist()
            yield batch


def stack_datalist(datalist: Sequence[Mapping[str, Any]], transform: Any, modalities: Sequence[str]) -> TensorData:
    """Transform every item of a datalist ONCE (as a MONAI ``Dataset`` would) and stack the split in memory.

    Args:
        datalist: items as the discovery functions return them (``medfusion.data.mimic.discover_mimic``,
            :func:`~medfusion.apps.clinical_bundle.clinical_datalist`, ...).
        transform: e.g. :func:`~medfusion.data.clinical.clinical_transforms` in ``"eval"`` mode (no random
            augmentation: the stacked split is reused every epoch).
        modalities: the modality keys, in the order of the items' ``modality_mask``.

    Returns:
        The split: ``label`` ``[N]`` (the first label column), ``case_id`` and ``sample_index`` ``0 .. N-1``.
    """
    from monai.transforms import apply_transform

    mods = validate_modalities(modalities)
    if not datalist:
        raise ValueError("stack_datalist: the datalist is empty.")
    items: list[dict[str, Any]] = []
    for item in datalist:
        out = apply_transform(transform, dict(item))
        if not isinstance(out, Mapping):
            raise TypeError(f"stack_datalist: the transform returned a {type(out).__name__}, expected a dict.")
        items.append(dict(out))
    label = None
    if all(Keys.LABEL in it for it in items):
        label = torch.tensor([float(np.asarray(it[Keys.LABEL]).astype(float).reshape(-1)[0]) for it in items])
    return TensorData(
        {m: torch.stack([torch.as_tensor(it[m]) for it in items]) for m in mods},
        torch.stack([torch.as_tensor(it[Keys.MASK]).reshape(-1) for it in items]).bool(),
        label,
        [str(it.get(Keys.CASE_ID, i)) for i, it in enumerate(items)],
    )


@dataclass
class FittedModel:
    """What :func:`fit` returns: the trained network, its recipe and what the run recorded.

    Attributes:
        network: the trained classifier (eval mode).
        method: the training recipe (its state, e.g. MetaKD's learned weights ``method.state``).
        record: the run record (:meth:`~medfusion.engines.record.RunRecord.state_dict`; the same dict every
            checkpoint of the run holds under ``"record"``): ``modalities``, ``method``, ``seed``, ``model`` (head,
            kwargs, encoders, number of classes) and the configuration hash.
        history: one dict per training iteration: ``epoch``, ``iteration`` and every scalar loss of the recipe.
        validation: one dict per validation: ``epoch`` and ``val_auroc``.
        seconds: wall time of training.
        output_dir: the checkpoint folder (``None`` when nothing was saved).
    """

    network: nn.Module
    method: Method
    record: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    output_dir: Path | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the model was trained on, in its order (from the run record)."""
        return tuple(self.record["modalities"])

    @property
    def method_name(self) -> str:
        """The recipe name."""
        return str(self.record["method"])

    def epoch_losses(self, epoch: int | None = None) -> dict[str, float]:
        """Mean of every logged loss over one epoch (default: the last).

        Raises:
            ValueError: no iteration of that epoch was recorded.
        """
        if not self.history:
            raise ValueError("epoch_losses: no training iteration was recorded.")
        ep = int(self.history[-1]["epoch"]) if epoch is None else int(epoch)
        rows = [r for r in self.history if int(r["epoch"]) == ep]
        if not rows:
            raise ValueError(f"epoch_losses: no iteration of epoch {ep} was recorded.")
        keys = [k for k in rows[0] if k not in ("epoch", "iteration")]
        return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


class _LossHistory:
    """Ignite handler appending every iteration's scalar losses (``engine.state.output``) to ``rows``."""

    def __init__(self, rows: list[dict[str, float]]) -> None:
        self.rows = rows

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        out = engine.state.output or {}
        row: dict[str, float] = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)}
        row.update({k: float(v) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1})
        self.rows.append(row)


def _batches(data: Data, batch_size: int, shuffle: bool, modalities: Sequence[str] | None = None) -> Any:
    """Batches of ``data`` (a :class:`TensorData`, with ``modalities`` selected by name) or ``data`` itself."""
    if isinstance(data, TensorData):
        return (data.select(modalities) if modalities is not None else data).batches(batch_size, shuffle)
    if isinstance(data, Mapping):
        raise TypeError(
            "pass a TensorData (TensorData.from_batch(batch, modalities)) or an iterable of batch dicts, not a dict."
        )
    return data


def _plain_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(kwargs or {})


def _network(
    method_name: str,
    encoders: Mapping[str, Mapping[str, Any]],
    num_classes: int,
    head_kwargs: Mapping[str, Any] | None,
    num_train_samples: int | None,
) -> nn.Module:
    """The bundle's ``network_def``: encoders by name + the recipe's head with its default kwargs.

    ``num_train_samples=None`` (loading) leaves the data-sized head kwargs out: loading the weights sizes them.
    """
    from medfusion.fusion.recipes import default_head_kwargs, head_name
    from medfusion.models.classifier import Classifier

    kwargs = default_head_kwargs(method_name, num_train_samples, head_kwargs)
    return Classifier({m: dict(spec) for m, spec in encoders.items()}, head=head_name(method_name),
                      num_classes=int(num_classes), head_kwargs=kwargs)  # fmt: skip


def fit(
    method_name: str,
    encoders: Mapping[str, Mapping[str, Any]],
    train: Data,
    val: Data | None = None,
    *,
    num_classes: int = 2,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    cosine_schedule: bool = False,
    method_kwargs: Mapping[str, Any] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    modality_dropout: str | None = None,
    meta: Data | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    early_stop_patience: int | None = None,
    num_train_samples: int | None = None,
    handlers: Sequence[Any] = (),
) -> FittedModel:
    """Train method ``method_name`` with one encoder per named modality, as the clinical bundle's ``train.json``.

    The network is ``Classifier(encoders, head=head_name(method_name), num_classes, default_head_kwargs(...))``
    (data-sized head kwargs such as QMF's ``num_samples`` from the training split), the recipe
    ``build_method(method_name, modalities, method_kwargs, context)`` with the bundle's context (``meta`` as the
    meta-validation loader, ``seed``, ``modality_dropout``, ``output_dir``), the optimizer AdamW over the trainable
    parameters, and the trainer :func:`~medfusion.engines.trainer.build_trainer` (per-epoch re-seeding from
    ``seed``; with ``output_dir``, atomic ``last_checkpoint_epoch=N.pt`` checkpoints holding the run record).

    Args:
        method_name: a registered recipe (:func:`~medfusion.fusion.recipes.list_methods`).
        encoders: ``{modality: {"name": encoder, **kwargs}}``; the keys are the model's modalities, in order.
        train: the training split (shuffled every epoch when a :class:`TensorData`).
        val: validation split: AUROC after every epoch (``FittedModel.validation``); with ``output_dir`` the best
            model is saved as ``model.pt`` (with the run record), as in the bundle.
        num_classes: number of classes.
        epochs: training epochs.
        batch_size: batch size of :class:`TensorData` splits.
        lr: learning rate.
        weight_decay: AdamW weight decay (0: Adam's update).
        cosine_schedule: cosine learning-rate decay over ``epochs`` (the bundle's scheduler).
        method_kwargs: recipe hyper-parameters (e.g. ``{"lam": 0.1}`` for QMF, ``{"alpha": 0.1}`` for MetaKD).
        head_kwargs: head kwargs overriding the recipe's defaults.
        modality_dropout: batch-level modality dropout mode of the recipes that take one (``None``: the recipe's
            default).
        meta: meta-validation split of MetaKD (shuffled batches).
        seed: the run's seed (network initialisation, every epoch's re-seeding, the recipe's generators).
        device: ``None``/``"auto"`` = CUDA when available.
        output_dir: checkpoint folder (``None``: nothing is written); it must hold no other run unless ``resume``
            or ``overwrite``.
        overwrite: replace the run in ``output_dir``.
        resume: continue the run in ``output_dir`` from its newest checkpoint (same run record).
        early_stop_patience: stop after this many validations without improvement (needs ``val``).
        num_train_samples: the ``sample_index`` range of the training data (default ``len(train)`` or
            ``len(train.dataset)``).
        handlers: extra ignite handlers attached to the trainer.

    Returns:
        The :class:`FittedModel`.

    Raises:
        KeyError: unknown method name.
        ValueError: training data without a modality of ``encoders``, ``early_stop_patience`` without ``val``,
            an unknown size of a loader's dataset.
        FileExistsError: ``output_dir`` holds another run and neither ``resume`` nor ``overwrite`` is set.
    """
    from monai.engines import SupervisedEvaluator
    from monai.handlers import ROCAUC, EarlyStopHandler
    from monai.inferers import SimpleInferer
    from monai.utils import set_determinism

    from medfusion.engines.checkpoint import AtomicCheckpointSaver
    from medfusion.fusion.recipes import build_method, head_name

    mods = validate_modalities(list(encoders))
    if early_stop_patience is not None and val is None:
        raise ValueError("fit: early_stop_patience needs val data.")
    train_batches = _batches(train, batch_size, True, mods)
    if num_train_samples is None:
        sized = train if isinstance(train, TensorData) else getattr(train, "dataset", None)
        if sized is None or not hasattr(sized, "__len__"):
            raise ValueError("fit: give num_train_samples (the sample_index range) for a loader without a dataset.")
        num_train_samples = len(sized)
    dev = resolve_device(device)
    set_determinism(seed=int(seed))
    network = _network(method_name, {m: encoders[m] for m in mods}, num_classes, head_kwargs, num_train_samples)
    network = network.to(dev)
    context = {
        "meta_loader": _batches(meta, batch_size, True, mods) if meta is not None else None,
        "output_dir": str(output_dir) if output_dir is not None else None,
        "seed": int(seed),
        "modality_dropout": modality_dropout,
    }
    method = build_method(method_name, mods, method_kwargs, context)
    model_record = {
        "head": head_name(method_name),
        "head_kwargs": _plain_kwargs(head_kwargs),
        "num_classes": int(num_classes),
        "encoders": {m: dict(encoders[m]) for m in mods},
    }
    config = {
        "api": "medfusion.apps.api.fit",
        "method_name": method_name,
        **model_record,
        "method_kwargs": _plain_kwargs(method_kwargs),
        "modality_dropout": modality_dropout,
        "batch_size": int(batch_size),
        "learning_rate": float(lr),
        "weight_decay": float(weight_decay),
        "cosine_schedule": bool(cosine_schedule),
        "num_train_samples": int(num_train_samples),
        "seed": int(seed),
    }
    record = RunRecord(int(seed), mods, method_name, dict(model_record, method_kwargs=_plain_kwargs(method_kwargs)),
                       config=config)  # fmt: skip
    optimizer = torch.optim.AdamW(
        [p for p in network.parameters() if p.requires_grad], lr=float(lr), weight_decay=float(weight_decay)
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(epochs)) if cosine_schedule else None
    history: list[dict[str, float]] = []
    validation: list[dict[str, float]] = []
    validator, early_stop = None, None
    val_handlers: list[Any] = []
    if val is not None:
        if output_dir is not None:
            val_handlers.append(
                AtomicCheckpointSaver(
                    save_dir=str(output_dir),
                    save_dict={"model": network, "method": method, "record": record},
                    save_key_metric=True,
                    key_metric_filename="model.pt",
                )
            )
        if early_stop_patience is not None:
            early_stop = EarlyStopHandler(patience=int(early_stop_patience), score_function=val_score, epoch_level=True)
            val_handlers.append(early_stop)
        validator = SupervisedEvaluator(
            device=dev,
            val_data_loader=_batches(val, batch_size, False, mods),
            network=network,
            inferer=SimpleInferer(),
            prepare_batch=ModalityBatch(mods),
            key_val_metric={"val_auroc": ROCAUC(output_transform=auroc_output)},
            val_handlers=val_handlers,
            decollate=False,
        )

        def keep_score(engine: Any) -> None:
            validation.append({"epoch": int(engine.state.epoch), "val_auroc": float(engine.state.metrics["val_auroc"])})

        from ignite.engine import Events

        validator.add_event_handler(Events.COMPLETED, keep_score)
    trainer = build_trainer(
        network,
        method,
        train_batches,
        max_epochs=int(epochs),
        optimizer=optimizer,
        device=dev,
        handlers=[_LossHistory(history), *handlers],
        output_dir=output_dir,
        log_every=0,
        seed=int(seed),
        lr_scheduler=scheduler,
        validator=validator,
        val_handlers=val_handlers,
        resume=resume,
        overwrite=overwrite,
        record=record,
    )
    if early_stop is not None:
        early_stop.set_trainer(trainer)
    start = time.time()
    trainer.run()
    return FittedModel(
        network=network.eval(),
        method=method,
        record=record.state_dict(),
        history=history,
        validation=validation,
        seconds=time.time() - start,
        output_dir=Path(output_dir) if output_dir is not None else None,
    )


def load_fitted(path: str | Path, device: str | torch.device | None = None) -> FittedModel:
    """Load a model :func:`fit` saved (``model.pt`` or ``last_checkpoint_epoch=N.pt`` of its ``output_dir``).

    The file's run record says what to build; the weights go through the one checked loader
    (:func:`~medfusion.engines.record.load_model`). The network is rebuilt from the record's encoders, head
    kwargs and number of classes (QMF's loss history is sized by the weights); the recipe is rebuilt from the
    record's method kwargs and gets its saved state (without a meta-validation loader: enough to read it, e.g.
    MetaKD's learned weights, and to predict).

    Args:
        path: the checkpoint file.
        device: ``None``/``"auto"`` = CUDA when available.

    Returns:
        The :class:`FittedModel` (empty ``history``; ``output_dir`` = the file's folder).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, or a checkpoint without the record :func:`fit` writes (e.g. a bundle's
            ``model.pt``: its network is described by the bundle config; load it with the bundle).
    """
    from medfusion.engines.record import RECORD_KEY, load_model, read_checkpoint
    from medfusion.fusion.recipes import build_method

    p = Path(path)
    record = read_checkpoint(p).get(RECORD_KEY)
    model = record.get("model") if isinstance(record, Mapping) else None
    if not isinstance(model, Mapping) or "encoders" not in model:
        raise ValueError(
            f"checkpoint {p} has no record of fit's network (encoders, head, classes); a bundle checkpoint is "
            "loaded with its bundle (inference.json, medfusion.apps.export.load_bundle_model)."
        )
    assert isinstance(record, Mapping)
    mods = validate_modalities(record["modalities"])
    network = _network(record["method"], {m: model["encoders"][m] for m in mods}, model["num_classes"],
                       model.get("head_kwargs"), None)  # fmt: skip
    ckpt = load_model(p, network, model)
    method = build_method(record["method"], mods, model.get("method_kwargs"), {"seed": record.get("seed")})
    if isinstance(ckpt.get("method"), Mapping):
        method.load_state_dict(ckpt["method"])
    dev = resolve_device(device)
    return FittedModel(network=network.to(dev).eval(), method=method, record=dict(record), output_dir=p.parent)


def _model(model: FittedModel | nn.Module, data: Data) -> tuple[nn.Module, tuple[str, ...]]:
    """The network and its modalities; a fitted model's record is checked against the data's modalities."""
    if isinstance(model, FittedModel):
        mods = model.modalities
        if isinstance(data, TensorData):
            have = [m for m in mods if m in data.modalities]
            diff = model_difference(model.record["model"], {"modalities": have})
            if diff:
                raise ValueError(
                    f"the data does not fit the model: {diff} (the data has [{', '.join(data.modalities)}])."
                )
        return model.network, mods
    names = getattr(unwrap(model), "modalities", None)
    if names is None:
        raise TypeError(f"{type(model).__name__} has no 'modalities'; pass a FittedModel or a FusionModel.")
    return model, tuple(names)


class _Restricted:
    """Batches of ``loader`` restricted to a modality combination (:func:`restrict_to_combination`)."""

    def __init__(self, loader: Any, modalities: Sequence[str], requested: torch.Tensor) -> None:
        self.loader, self.modalities, self.requested = loader, tuple(modalities), requested

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield restrict_to_combination(batch, self.modalities, self.requested)


def predict(
    model: FittedModel | nn.Module,
    data: Data,
    *,
    combination: Sequence[str] | str | None = None,
    batch_size: int = 256,
    calibration_file: str | Path | None = None,
    method_outputs: bool = True,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Per-sample predictions with the method's outputs: the rows the bundle's inference writes to ``predictions.csv``.

    Runs a MONAI ``SupervisedEvaluator`` (``network(inputs, modality_mask)``, :class:`ModalityBatch`) with the
    bundle's :class:`~medfusion.apps.clinical_bundle.PredictionWriter`.

    Args:
        model: a :class:`FittedModel` (its recorded modalities are enforced) or a fusion network.
        data: a :class:`TensorData` (its modalities are selected by name) or an iterable of batch dicts.
        combination: modality names (``"ehr+cxr"`` or a list) every sample is restricted to (``None``: each
            sample with all its modalities); samples without any of them get a row with a note and no
            probabilities.
        batch_size: batch size of a :class:`TensorData`.
        calibration_file: ``calibration.json`` of ``medfusion calibrate`` (per-combination temperatures).
        method_outputs: add the head's per-sample outputs (QMF ``weights_<m>``, OmniFuse ``omega_<m>``,
            ``modality_logits_<m>_<k>``, ...).
        device: ``None``/``"auto"`` = CUDA when available.

    Returns:
        One row per sample: ``case_id``, ``modalities``, ``missing_modalities``, ``prob_0 .. prob_{K-1}``, ``pred``,
        ``note``, ``label`` (labelled data), then the method outputs.

    Raises:
        ValueError: data without a modality the model was trained on, or an unknown combination name.
    """
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SimpleInferer

    network, mods = _model(model, data)
    loader = _batches(data, batch_size, False, mods)
    if combination is not None and combination != "all":
        loader = _Restricted(loader, mods, requested_mask(mods, combination))
    writer = PredictionWriter(None, mods, calibration_file=calibration_file, method_outputs=method_outputs)
    dev = resolve_device(device)
    evaluator = SupervisedEvaluator(
        device=dev,
        val_data_loader=loader,
        network=network.to(dev),
        inferer=SimpleInferer(),
        prepare_batch=ModalityBatch(mods),
        val_handlers=[writer],
        decollate=False,
    )
    evaluator.run()
    return writer.table()


def evaluate(
    model: FittedModel | nn.Module,
    data: Data,
    *,
    combinations: Sequence[str] | None = None,
    n_bootstrap: int = 200,
    threshold_data: Data | None = None,
    calibration_file: str | Path | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Metrics on every modality combination: :func:`~medfusion.evaluation.classification.evaluate_classification`.

    Each sample is evaluated under every combination it can form (the other modalities masked). With
    ``output_dir`` the folder gets what the bundle's ``evaluate.json`` writes (``predictions.csv`` per sample and
    combination with the method outputs, ``summary.csv``/``.md``, figures, ``evaluation.json``, and the
    method's own files such as QMF's weight-vs-loss figure), all or nothing
    (:class:`~medfusion.evaluation.report.ResultsFolder`).

    Args:
        model: a :class:`FittedModel` (its recorded modalities are enforced) or a fusion network.
        data: a :class:`TensorData` or an iterable of batch dicts (with labels).
        combinations: combination names (default all ``2^M - 1``).
        n_bootstrap: bootstrap resamples of the 95% CIs (0: none).
        threshold_data: validation split (binary tasks): per-combination thresholds (maximum Youden's J) and the
            thresholded metrics.
        calibration_file: ``calibration.json`` of ``medfusion calibrate``.
        output_dir: results folder (``None``: nothing is written).
        overwrite: replace a non-empty ``output_dir``.
        batch_size: batch size of a :class:`TensorData`.
        seed: bootstrap seed.
        device: ``None``/``"auto"`` = CUDA when available.

    Returns:
        Summary indexed by combination (+ ``mean``): ``auroc``, ``auprc``, ``accuracy``, ``f1``,
        ``balanced_accuracy``, ``ece`` (with ``_lo``/``_hi`` CIs when bootstrapping) and ``n``.

    Raises:
        ValueError: data without a modality the model was trained on.
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is not set.
    """
    from medfusion.apps.bundle import ClassificationEvaluation
    from medfusion.evaluation.report import ResultsFolder

    network, mods = _model(model, data)
    if threshold_data is not None:
        _model(model, threshold_data)
    loader = _batches(data, batch_size, False, mods)
    thr = _batches(threshold_data, batch_size, False, mods) if threshold_data is not None else None
    name = model.method_name if isinstance(model, FittedModel) else getattr(unwrap(model), "head_name", "model")
    record = {"method": name, "modalities": list(mods)}
    if isinstance(model, FittedModel):
        record["run"] = {"config_hash": model.record.get("config_hash"), "seed": model.record.get("seed")}

    # the bundle's evaluate.json component: the same evaluation, figures (FittedModel) and all-or-nothing folder
    evaluation = ClassificationEvaluation(
        results=ResultsFolder(output_dir, overwrite) if output_dir is not None else None,
        network=network, dataloader=loader, modalities=mods, method_name=name, combinations=combinations,
        n_bootstrap=int(n_bootstrap), device=device, progress=False, seed=int(seed),
        calibration_file=calibration_file, record=copy.deepcopy(record), threshold_loader=thr,
        figures=isinstance(model, FittedModel),
    )  # fmt: skip
    return evaluation.run()
