"""Meta Fusion's bundle stages: a fitted :class:`~medfusion.fusion.meta_fusion_head.MetaFusionHead` in a network.

Meta Fusion (:mod:`medfusion.fusion.meta_fusion`) trains in stages, not in one loop, so it is wired as
plain functions a bundle calls one after the other (no trainer fork):

(a) supervised encoders: the normal MONAI trainer with a simple head (``concat``);
(b) :func:`extract_features`: pooled encoder features of a split (eval mode, no grad) as
    :class:`~medfusion.fusion.meta_fusion.MetaFusionData` (mask from ``modality_mask``, y from ``label``);
    :func:`tabular_data` builds the same from a table (pure-tabular cohorts, regression);
(c) :func:`fit_meta_fusion`: cohort from per-modality extractor grids, PCA fitted on train, screening,
    teachers, mutual learning, ensemble selection -> a fitted :class:`MetaFusionHead`;
(d) :func:`attach_head` + :func:`save_meta_fusion`: the network's head becomes the fitted head, the
    weights (all Meta Fusion state is in buffers/parameters) go to ``model.pt`` and the head's
    constructor arguments to ``meta_fusion_config.json``, from which :func:`meta_fusion_classifier`
    rebuilds the network before ``load_state_dict``;
(e) evaluation over every modality combination is the usual
    :func:`~medfusion.evaluation.classification.evaluate_classification` (the head restricts the
    committee to the students whose modalities are present).

:class:`MetaFusionStages` runs (b)-(d) from a bundle's ``"run"`` list. The head, :func:`tabular_data`,
:func:`fit_meta_fusion` and :func:`attach_head` are fusion operations in
:mod:`medfusion.fusion.meta_fusion_head`; this module is the application glue around them.

Under ``torchrun`` (an initialised :mod:`torch.distributed` process group) :class:`MetaFusionStages` runs
multi-process: the encoders are synchronised from rank 0, each rank extracts a shard of every split
(:func:`extract_features_distributed`; gathered back in loader order), rank 0 alone fits the cohort and
writes the files, and the fitted head is broadcast to the other ranks. The result equals the
single-process one (``tests/bundles/test_clinical_meta_fusion_multi_gpu.py``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from medfusion.batch import to_device, unwrap
from medfusion.engines.utils import resolve_device
from medfusion.fusion.base import FusionModel
from medfusion.fusion.meta_fusion import MetaFusionData, get_rule
from medfusion.fusion.meta_fusion_head import (
    MetaFusionHead,
    attach_head,
    default_grids,
    fit_meta_fusion,
)
from medfusion.io import atomic_file
from medfusion.modality import Keys, validate_modalities

__all__ = [
    "CONFIG_NAME",
    "SUMMARY_NAME",
    "STAGE_CHECKPOINT_NAME",
    "extract_features",
    "extract_features_distributed",
    "save_meta_fusion",
    "load_head_kwargs",
    "meta_fusion_classifier",
    "MetaFusionStages",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "meta_fusion_config.json"
"""File (in the checkpoint folder) holding the head's constructor arguments."""
STAGE_CHECKPOINT_NAME = "meta_fusion_stages.pt"
"""File (in the checkpoint folder) holding the Meta Fusion state after its last finished stage (resume)."""
SUMMARY_NAME = "meta_fusion_summary.json"
"""File (in the output folder) holding :meth:`MetaFusion.summary` (teachers, rho, committee, ...)."""


# ----------------------------------------------------------------------------------------------- stages
@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    task: str = "classification",
    target_key: str = Keys.LABEL,
) -> MetaFusionData:
    """Stage (b): pooled encoder features of every sample of ``loader`` (model in eval mode, no grad).

    Args:
        model: a :class:`~medfusion.fusion.base.FusionModel` (or a wrapped one); its training mode is restored.
        loader: batches with one key per modality, ``modality_mask`` and ``target_key``.
        modalities: ordered names (default the model's).
        device: where the encoders run (default automatic); features are returned on the CPU.
        task: ``"classification"`` (y = long class index) or ``"regression"`` (y = float).
        target_key: batch key of the target (first column when it is ``[B, C]``).

    Returns:
        ``MetaFusionData(x={m: [N, F_m]}, mask bool [N, M], y [N])`` in loader order.

    Raises:
        KeyError: a batch lacks a modality, ``modality_mask`` or ``target_key`` (the message names it).
        ValueError: the loader is empty.
    """
    net = unwrap(model)
    if not isinstance(net, FusionModel):
        raise TypeError(f"extract_features: expected a FusionModel, got {type(net).__name__}.")
    mods = validate_modalities(modalities) if modalities is not None else net.modalities
    dev = resolve_device(device)
    was_training = net.training
    net.to(dev).eval()
    xs: dict[str, list[torch.Tensor]] = {m: [] for m in mods}
    masks, ys = [], []
    try:
        for i, batch in enumerate(loader):
            needed = [*mods, Keys.MASK, target_key]
            absent = [k for k in needed if k not in batch]
            if absent:
                raise KeyError(f"extract_features: batch {i} has no key(s) {absent}; keys present: {sorted(batch)}.")
            batch = to_device(batch, dev)
            feats = net.encode({m: batch[m] for m in mods})
            for m in mods:
                xs[m].append(feats[m].pooled.float().cpu())
            masks.append(batch[Keys.MASK].bool().cpu())
            y = batch[target_key]
            y = torch.as_tensor(y).reshape(len(masks[-1]), -1)[:, 0].cpu()
            ys.append(y.long() if task == "classification" else y.float())
    finally:
        net.train(was_training)
    if not masks:
        raise ValueError("extract_features: the loader yielded no batch.")
    return MetaFusionData({m: torch.cat(xs[m]) for m in mods}, torch.cat(masks), torch.cat(ys))


def _world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(loader: Iterable[Mapping[str, Any]], rank: int, world: int) -> tuple[Iterable[Any], list[int]] | None:
    """The current rank's part of ``loader`` and its dataset indices in order; ``None``: cannot be sharded.

    A loader with a :class:`~torch.utils.data.DistributedSampler` is used as it is (its indices for the
    current epoch; padding duplicates are dropped when gathering). A ``DataLoader`` over a sequential sampler
    (``shuffle=False``) is rebuilt with rank ``r`` reading samples ``r, r + W, r + 2W, ...``.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(loader, DataLoader) and isinstance(sampler, DistributedSampler):
        return loader, [int(i) for i in sampler]
    if not isinstance(loader, DataLoader) or not isinstance(sampler, SequentialSampler):
        return None
    indices = list(range(rank, len(loader.dataset), world))  # type: ignore[arg-type]
    part = DataLoader(
        torch.utils.data.Subset(loader.dataset, indices),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    return part, indices


def extract_features_distributed(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    task: str = "classification",
    target_key: str = Keys.LABEL,
) -> MetaFusionData | None:
    """Stage (b) split across the ranks of the process group; every rank gets the whole split back.

    Each rank runs :func:`extract_features` on its shard (see :func:`_shard`: a ``DataLoader`` with a
    ``DistributedSampler`` or ``shuffle=False``), the shards are all-gathered and put back in dataset order
    (duplicates from sampler padding dropped), which is the order of a single-process ``shuffle=False``
    loader. Without a process group (or with one process) this is :func:`extract_features`. A loader that
    cannot be sharded is extracted by rank 0 alone (the other ranks return ``None``).

    Args:
        model: as for :func:`extract_features`; the encoders must be identical on every rank.
        loader: the whole split's loader (every rank passes the same one).
        modalities: as for :func:`extract_features`.
        device: as for :func:`extract_features`.
        task: as for :func:`extract_features`.
        target_key: as for :func:`extract_features`.

    Returns:
        ``MetaFusionData`` of the whole split (``None`` on ranks > 0 for a loader that cannot be sharded).

    Raises:
        ValueError: the gathered indices do not cover the dataset, or the split is empty.
    """
    rank, world = _world()
    if world == 1:
        return extract_features(model, loader, modalities, device, task, target_key)
    shard = _shard(loader, rank, world)
    if shard is None:
        logger.warning("meta fusion: loader %s cannot be sharded; rank 0 extracts it alone", type(loader).__name__)
        return extract_features(model, loader, modalities, device, task, target_key) if rank == 0 else None
    part, indices = shard
    local = extract_features(model, part, modalities, device, task, target_key) if indices else None
    logger.info("meta fusion: rank %d of %d extracted %d samples", rank, world, len(indices))
    if local is not None and len(local.mask) != len(indices):
        raise ValueError(
            f"extract_features_distributed: rank {rank} got {len(local.mask)} samples, expected {len(indices)}."
        )
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (indices, None if local is None else (local.x, local.mask, local.y)))
    n = len(loader.dataset) if hasattr(loader, "dataset") else None
    return _reassemble(parts, n)


def _reassemble(parts: Sequence[tuple[Sequence[int], Any]], n: int | None) -> MetaFusionData:
    """The ranks' ``(dataset indices, (x, mask, y) or None)`` shards as one split in dataset order.

    A dataset index met twice (a ``DistributedSampler``'s padding) keeps its first row; the indices must be
    exactly ``0..n-1`` (``n=None``: whatever they cover, without gaps).
    """
    filled = [(idx, data) for idx, data in parts if data is not None]
    first: dict[int, int] = {}  # dataset index -> row in the rank-ordered concatenation
    for row, i in enumerate(int(i) for idx, _ in filled for i in idx):
        first.setdefault(i, row)
    order = sorted(first)
    n = len(order) if n is None else n
    if not order or order != list(range(n)):
        raise ValueError(
            f"extract_features_distributed: the ranks' shards cover {len(order)} distinct samples, expected "
            f"indices 0..{n - 1} (a sampler that drops samples?)."
        )
    take = torch.tensor([first[i] for i in order], dtype=torch.long)
    x = {m: torch.cat([d[0][m] for _, d in filled])[take] for m in filled[0][1][0]}
    return MetaFusionData(x, torch.cat([d[1] for _, d in filled])[take], torch.cat([d[2] for _, d in filled])[take])


def _finite_json(value: Any) -> Any:
    """Replace non-finite floats by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _atomic_write(path: Path, write: Any) -> None:
    with atomic_file(path) as tmp:
        write(tmp)


def save_meta_fusion(
    model: nn.Module,
    ckpt_dir: str | Path,
    output_dir: str | Path | None = None,
    filename: str = "model.pt",
) -> dict[str, Path]:
    """Stage (d): save the network with its Meta Fusion head.

    Writes ``<ckpt_dir>/<filename>`` (``{"model": state_dict}``, the layout ``evaluate.json`` loads; frozen
    encoders by reference, see :mod:`medfusion.engines.frozen`),
    ``<ckpt_dir>/meta_fusion_config.json`` (``{"head_kwargs": ...}`` for :func:`meta_fusion_classifier`) and,
    with ``output_dir``, ``<output_dir>/meta_fusion_summary.json`` (:meth:`MetaFusion.summary` + the rule;
    non-finite losses as ``null``).

    Args:
        model: a :class:`FusionModel` whose head is a :class:`MetaFusionHead`.
        ckpt_dir: checkpoint folder.
        output_dir: where the summary goes (``None``: not written).
        filename: checkpoint file name.

    Returns:
        ``{"checkpoint", "config"[, "summary"]: path}``.

    Raises:
        TypeError: the model's head is not a :class:`MetaFusionHead`.
    """
    net = unwrap(model)
    head = getattr(net, "head", None)
    if not isinstance(head, MetaFusionHead):
        raise TypeError(f"save_meta_fusion: the model's head is {type(head).__name__}, expected MetaFusionHead.")
    ckpt = Path(ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    paths = {"checkpoint": ckpt / filename, "config": ckpt / CONFIG_NAME}
    from medfusion.engines.frozen import ByReference  # frozen encoders by reference, not their weights

    state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in ByReference(net).state_dict().items()}
    _atomic_write(paths["checkpoint"], lambda p: torch.save({"model": state}, p))
    config = {"head_kwargs": head.head_kwargs()}
    _atomic_write(paths["config"], lambda p: p.write_text(json.dumps(config, indent=2)))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths["summary"] = out / SUMMARY_NAME
        summary = _finite_json({**head.meta.summary(), "rule": head.rule})
        _atomic_write(paths["summary"], lambda p: p.write_text(json.dumps(summary, indent=2, allow_nan=False)))
    logger.info("meta fusion saved: %s", {k: str(v) for k, v in paths.items()})
    return paths


def load_head_kwargs(config_path: str | Path) -> dict[str, Any]:
    """The ``head_kwargs`` stored by :func:`save_meta_fusion`.

    Raises:
        FileNotFoundError: the file does not exist (fit Meta Fusion first).
        KeyError: the file has no ``head_kwargs``.
    """
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Meta Fusion config {path} does not exist; run the Meta Fusion training first "
            "(configs/train.json + configs/meta_fusion.json) or set meta_fusion_config."
        )
    data = json.loads(path.read_text())
    if "head_kwargs" not in data:
        raise KeyError(f"Meta Fusion config {path}: expected a 'head_kwargs' entry, got keys {sorted(data)}.")
    return dict(data["head_kwargs"])


def meta_fusion_classifier(
    encoders: Mapping[str, Mapping[str, Any]], num_classes: int, config_path: str | Path
) -> nn.Module:
    """A :class:`~medfusion.models.classifier.Classifier` with a (not yet loaded) ``meta_fusion`` head.

    The head's cohort is rebuilt from ``config_path`` (written by :func:`save_meta_fusion`), so the
    checkpoint's state dict loads with ``strict=True``.

    Args:
        encoders: ``{modality: encoder spec}`` as for ``Classifier``.
        num_classes: number of classes.
        config_path: ``meta_fusion_config.json``.

    Returns:
        The classifier.
    """
    from medfusion.models.classifier import Classifier

    return Classifier(encoders, head="meta_fusion", num_classes=num_classes, head_kwargs=load_head_kwargs(config_path))


class MetaFusionStages:
    """Stages (b)-(d) for a bundle's ``"run"`` list: extract features, fit, swap the head, save.

    Args:
        network: the :class:`FusionModel` trained in stage (a) (its head is replaced in place).
        loaders: ``{split name: loader}`` with at least ``train_split`` and ``val_split`` (eval transforms).
        ckpt_dir: checkpoint folder (``model.pt`` + ``meta_fusion_config.json``).
        output_dir: where ``meta_fusion_summary.json`` goes.
        num_classes: classes (classification).
        grids: ``{modality: [extractor, ...]}`` (default :func:`default_grids`).
        meta_kwargs: :class:`MetaFusion` arguments (``epochs``, ``rho_grid``, ``task``, ...).
        rule: the head's aggregation rule (a key of
            :data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES`; default ``"ensemble"``).
        target_key: batch key of the target.
        encoder_checkpoint: checkpoint of stage (a) loaded into ``network`` first (e.g. the best validation
            epoch); ``None`` or a missing file keeps the network as it is.
        device: where the encoders run.
        train_split: loader name used for training.
        val_split: loader name used for validation.
        filename: name of the saved checkpoint.
        resume: continue an interrupted fit from ``ckpt_dir/meta_fusion_stages.pt`` (written after every Meta
            Fusion stage, removed once ``model.pt`` is saved); features are re-extracted (deterministic).

    Raises:
        KeyError: no loader for ``train_split`` or ``val_split``.
        ValueError: an unknown ``rule`` (or a vote rule for regression), before anything runs.

    Multi-process (an initialised process group, e.g. under ``torchrun``): the network's weights are
    broadcast from rank 0 (after rank 0 loads ``encoder_checkpoint``), each rank extracts a shard of each
    split (:func:`extract_features_distributed`), rank 0 fits the cohort (stage checkpoint and resume
    included) while the others wait, the fitted head is broadcast to every rank (same head everywhere), and
    rank 0 alone writes ``model.pt``, ``meta_fusion_config.json`` and the summary. The other ranks wait in a
    collective during the fit: give ``init_process_group`` a ``timeout`` longer than the fit.
    """

    def __init__(
        self,
        network: nn.Module,
        loaders: Mapping[str, Iterable[Mapping[str, Any]]],
        ckpt_dir: str | Path,
        output_dir: str | Path | None = None,
        num_classes: int = 2,
        grids: Mapping[str, Sequence[str]] | None = None,
        meta_kwargs: Mapping[str, Any] | None = None,
        rule: str | None = None,
        target_key: str = Keys.LABEL,
        encoder_checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        train_split: str = "train",
        val_split: str = "val",
        filename: str = "model.pt",
        resume: bool = False,
    ) -> None:
        for split in (train_split, val_split):
            if split not in loaders:
                raise KeyError(f"MetaFusionStages loaders: no {split!r} loader (have {sorted(loaders)}).")
        if rule is not None:  # fail before any training, not after the encoders
            get_rule(rule, str((meta_kwargs or {}).get("task", "classification")), "MetaFusionStages rule")
        self.network = network
        self.loaders = dict(loaders)
        self.ckpt_dir, self.output_dir = Path(ckpt_dir), (Path(output_dir) if output_dir is not None else None)
        self.num_classes = int(num_classes)
        self.grids = {m: list(v) for m, v in grids.items()} if grids is not None else None
        self.meta_kwargs = dict(meta_kwargs or {})
        self.rule, self.target_key, self.device = rule, target_key, device
        self.encoder_checkpoint = encoder_checkpoint
        self.train_split, self.val_split, self.filename = train_split, val_split, filename
        self.resume = bool(resume)
        self.stage_checkpoint = self.ckpt_dir / STAGE_CHECKPOINT_NAME
        self.data: dict[str, MetaFusionData] = {}
        self.head: MetaFusionHead | None = None

    def extract(self) -> dict[str, MetaFusionData]:
        """Stage (b) on the train and validation loaders (after loading ``encoder_checkpoint``).

        Multi-process: rank 0's weights are broadcast first and each rank extracts a shard; every rank
        returns the whole splits (a split that cannot be sharded is missing on ranks > 0).
        """
        rank, world = _world()
        if rank == 0 and self.encoder_checkpoint is not None and Path(self.encoder_checkpoint).is_file():
            from medfusion.engines.checkpoint import load_checkpoint

            load_checkpoint(self.encoder_checkpoint, {"model": unwrap(self.network)})
            logger.info("meta fusion: encoders from %s", self.encoder_checkpoint)
        if world > 1:
            for tensor in unwrap(self.network).state_dict().values():
                dist.broadcast(tensor, 0)  # same encoders on every rank (rank 0 read the checkpoint)
        task = str(self.meta_kwargs.get("task", "classification"))
        data = {
            s: extract_features_distributed(self.network, self.loaders[s], None, self.device, task, self.target_key)
            for s in (self.train_split, self.val_split)
        }
        self.data = {s: d for s, d in data.items() if d is not None}
        return self.data

    def fit(self) -> MetaFusionHead:
        """Stage (c) on the extracted features (multi-process: on rank 0, then broadcast to every rank)."""
        if not self.data:
            self.extract()
        rank, world = _world()
        if world == 1:
            self.head = self._fit()
            return self.head
        message: list[Any] = [None]
        if rank == 0:
            try:
                head = self._fit()
                message = [(head.head_kwargs(), {k: v.cpu() for k, v in head.state_dict().items()})]
            except Exception as err:
                dist.broadcast_object_list([f"{type(err).__name__}: {err}"], src=0)  # release the waiting ranks
                raise
        dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], str):
            raise RuntimeError(f"MetaFusionStages: the Meta Fusion fit failed on rank 0 ({message[0]}).")
        if rank == 0:
            self.head = head
        else:
            dims = {m: int(d) for m, d in message[0][0]["config"]["in_dims"].items()}
            self.head = MetaFusionHead(self._modalities(), dims, num_classes=self.num_classes, **message[0][0])
            self.head.load_state_dict(message[0][1])
        return self.head

    def _modalities(self) -> tuple[str, ...]:
        """The network's modality order (the network must be a :class:`FusionModel`, as for feature extraction)."""
        net = unwrap(self.network)
        if not isinstance(net, FusionModel):
            raise TypeError(f"MetaFusionStages: expected a FusionModel network, got {type(net).__name__}.")
        return net.modalities

    def _fit(self) -> MetaFusionHead:
        mods = self._modalities()
        grids = self.grids
        if grids is not None and list(grids) != list(mods):
            raise ValueError(
                f"MetaFusionStages grids: keys {list(grids)} must be the modalities {list(mods)} in order."
            )
        train = self.data[self.train_split]
        if grids is None:
            grids = default_grids(mods, {m: int(train.x[m].shape[1]) for m in mods})
        return fit_meta_fusion(
            train,
            self.data[self.val_split],
            grids,
            self.num_classes,
            self.rule,
            stage_checkpoint=self.stage_checkpoint,
            resume=self.resume,
            **self.meta_kwargs,
        )

    def run(self) -> MetaFusionHead:
        """Stages (b)-(d): extract, fit, attach the head and save checkpoint, config and summary (rank 0 writes)."""
        head = self.fit()
        attach_head(self.network, head)
        rank, world = _world()
        if rank == 0:
            save_meta_fusion(self.network, self.ckpt_dir, self.output_dir, self.filename)
            self.stage_checkpoint.unlink(missing_ok=True)
        if world > 1:
            dist.barrier()  # the files exist once any rank returns
        return head
