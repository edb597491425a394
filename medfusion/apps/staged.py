"""Every method behind one key: the bundle network of a method and the stages a staged method runs after training.

Most methods train their head end to end, so ``method_name`` picks the head and the recipe and the trainer does
the rest. A *staged* method (:attr:`~medfusion.fusion.method.Method.training_head` set; Meta Fusion) trains its
encoders with another head first and fits its own head afterwards in stages. The clinical bundle's
``train.json`` builds its network with :func:`method_network` and runs :class:`MethodStages` after the trainer,
so ``--method_name meta_fusion`` works like any other method name:

* training (``ckpt_path`` unset): the network has the method's *training* head (Meta Fusion: ``concat``) and
  the trainer writes the best epoch to :func:`training_checkpoint_name` (``supervised_model.pt`` for a staged
  method, so it never collides with the deployable ``model.pt``); :class:`MethodStages` then loads that
  checkpoint, fits the method's head (:class:`~medfusion.apps.meta_fusion_stages.MetaFusionStages`: features,
  cohort, head swap), writes ``model.pt`` + the head's saved constructor arguments and stamps the run record;
* evaluation / inference (``ckpt_path`` set, as ``evaluate.json`` and ``inference.json`` do): the network is the
  deployable one, its head rebuilt from what the stages saved beside ``ckpt_path``
  (``meta_fusion_config.json``), so ``model.pt`` loads strictly.

For the other methods both functions do what the configs did inline before (same network, nothing after training).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from medfusion.apps.meta_fusion_stages import CONFIG_NAME, MetaFusionStages, load_head_kwargs
from medfusion.engines.record import RunRecord, stamp_record
from medfusion.fusion.recipes import default_head_kwargs, head_name, training_head

__all__ = [
    "HeadStages",
    "HEAD_STAGES",
    "is_staged",
    "training_checkpoint_name",
    "method_network",
    "MethodStages",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadStages:
    """How the bundle fits, saves and rebuilds a head that is fitted in stages after training.

    Attributes:
        run: ``(network, loaders, ckpt_dir, output_dir, num_classes, head_kwargs, encoder_checkpoint, device,
            resume) -> None``: fit the head on the trained ``network`` (loaders ``{"train", "val"}``), attach
            it and write ``ckpt_dir/model.pt`` and whatever :attr:`saved_head_kwargs` reads.
        saved_head_kwargs: ``checkpoint folder -> head kwargs`` rebuilding the fitted head's architecture.
        check_head_kwargs: raises ``ValueError`` for head kwargs the stages would reject, so a typo fails when
            the network is built, before the encoders train.
        encoder_checkpoint: file (in the checkpoint folder) the trainer writes the best encoder epoch to.
    """

    run: Callable[..., Any]
    saved_head_kwargs: Callable[[Path], dict[str, Any]]
    check_head_kwargs: Callable[[Mapping[str, Any]], None]
    encoder_checkpoint: str = "supervised_model.pt"


def _run_meta_fusion(
    network: nn.Module,
    loaders: Mapping[str, Any],
    ckpt_dir: Path,
    output_dir: Path | None,
    num_classes: int,
    head_kwargs: Mapping[str, Any],
    encoder_checkpoint: Path,
    device: str | torch.device | None,
    resume: bool,
) -> None:
    kw = dict(head_kwargs)
    grids, rule = kw.pop("grids", None), kw.pop("rule", None)
    MetaFusionStages(
        network,
        loaders,
        ckpt_dir,
        output_dir,
        num_classes=num_classes,
        grids=grids,
        meta_kwargs=kw,
        rule=rule,
        encoder_checkpoint=encoder_checkpoint,
        device=device,
        resume=resume,
    ).run()


def _check_meta_fusion(head_kwargs: Mapping[str, Any]) -> None:
    """Meta Fusion head kwargs: ``grids``, ``rule`` (a key of the rule table) and :class:`MetaFusion` arguments."""
    from medfusion.fusion.meta_fusion import MetaFusion, get_rule

    allowed = set(inspect.signature(MetaFusion.__init__).parameters) - {"self", "modalities", "in_dims", "cohort"}
    allowed -= {"num_classes"}  # the bundle's num_classes
    unknown = sorted(set(head_kwargs) - allowed - {"grids", "rule"})
    if unknown:
        raise ValueError(
            f"meta_fusion head_kwargs: unknown keys {unknown}; expected 'grids', 'rule' or MetaFusion arguments "
            f"{sorted(allowed)}."
        )
    if head_kwargs.get("rule") is not None:
        get_rule(head_kwargs["rule"], str(head_kwargs.get("task", "classification")), "meta_fusion head_kwargs rule")


HEAD_STAGES: dict[str, HeadStages] = {
    "meta_fusion": HeadStages(
        _run_meta_fusion, lambda folder: load_head_kwargs(folder / CONFIG_NAME), _check_meta_fusion
    ),
}
"""Fusion head -> its stages (the heads of staged methods)."""


def is_staged(method_name: str) -> bool:
    """Whether method ``method_name`` trains with another head and fits its own in stages afterwards.

    Raises:
        KeyError: unknown method name, or a staged method whose head has no :data:`HEAD_STAGES` entry.
    """
    if training_head(method_name) == head_name(method_name):
        return False
    if head_name(method_name) not in HEAD_STAGES:
        raise KeyError(f"staged method {method_name!r}: no stages for head {head_name(method_name)!r} in HEAD_STAGES.")
    return True


def training_checkpoint_name(method_name: str) -> str:
    """File the trainer writes its best epoch to: ``model.pt``, or the encoder checkpoint of a staged method."""
    return HEAD_STAGES[head_name(method_name)].encoder_checkpoint if is_staged(method_name) else "model.pt"


def method_network(
    method_name: str,
    encoders: Mapping[str, Mapping[str, Any]],
    num_classes: int,
    head_kwargs: Mapping[str, Any] | None = None,
    num_train_samples: int | None = None,
    ckpt_path: str | Path | None = None,
) -> nn.Module:
    """The bundle's :class:`~medfusion.models.classifier.Classifier` for method ``method_name``.

    Args:
        method_name: a registered method (:func:`~medfusion.fusion.recipes.list_methods`).
        encoders: ``{modality: encoder spec}``.
        num_classes: number of classes.
        head_kwargs: the bundle's ``head_kwargs`` (for a staged method: its fitted head's options, used by
            :class:`MethodStages`, not by the training head).
        num_train_samples: training-set size (data-sized head kwargs, e.g. QMF's ``num_samples``); ``None`` at
            inference.
        ckpt_path: the trained checkpoint this network will load (evaluation, inference); ``None`` while
            training. A staged method's deployable head is rebuilt from the files its stages saved beside it.

    Returns:
        The classifier (head ``head_name(method_name)``; a staged method's training head while training).

    Raises:
        KeyError: unknown method name.
        ValueError: head kwargs a staged method's stages would reject (checked before training).
        FileNotFoundError: a staged method's saved head configuration is missing beside ``ckpt_path``.
    """
    from medfusion.models.classifier import Classifier

    if not is_staged(method_name):
        kwargs = default_head_kwargs(method_name, num_train_samples, head_kwargs)
        return Classifier(encoders, head=head_name(method_name), num_classes=num_classes, head_kwargs=kwargs)
    if ckpt_path is None:
        HEAD_STAGES[head_name(method_name)].check_head_kwargs(default_head_kwargs(method_name, None, head_kwargs))
        return Classifier(encoders, head=training_head(method_name), num_classes=num_classes)
    saved = HEAD_STAGES[head_name(method_name)].saved_head_kwargs(Path(ckpt_path).parent)
    return Classifier(encoders, head=head_name(method_name), num_classes=num_classes, head_kwargs=saved)


class MethodStages:
    """What runs after the trainer: the stages of a staged method (nothing for the other methods).

    Args:
        method_name: the bundle's ``method_name``.
        network: the trained network (its head is replaced in place by the fitted one).
        datalists: ``{split: datalist}`` (the bundle's ``split``) with ``train_split`` and ``val_split``.
        preprocessing: evaluation transforms (features are extracted without augmentation).
        ckpt_dir: checkpoint folder (the encoder checkpoint is read there; ``model.pt`` is written there).
        output_dir: where the stage summary goes.
        num_classes: number of classes.
        head_kwargs: the bundle's ``head_kwargs``, over the method's defaults (Meta Fusion: ``grids``, ``rule``
            and :class:`~medfusion.fusion.meta_fusion.model.MetaFusion` arguments; ``seed`` defaults to ``seed``).
        seed: the bundle's seed.
        batch_size: feature-extraction batch size.
        num_workers: data-loader workers.
        device: where the encoders run.
        resume: continue interrupted stages (Meta Fusion: from ``meta_fusion_stages.pt``).
        record: the run record stamped into ``model.pt`` once the stages saved it (rank 0).
        train_split: split the head is fitted on.
        val_split: split the head's validation choices are made on.

    Raises:
        KeyError: unknown method name.
    """

    def __init__(
        self,
        method_name: str,
        network: nn.Module,
        datalists: Mapping[str, Sequence[Mapping[str, Any]]],
        preprocessing: Callable[..., Any] | None,
        ckpt_dir: str | Path,
        output_dir: str | Path | None = None,
        num_classes: int = 2,
        head_kwargs: Mapping[str, Any] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        resume: bool = False,
        record: RunRecord | None = None,
        train_split: str = "train",
        val_split: str = "val",
    ) -> None:
        self.method_name = method_name
        self.staged = is_staged(method_name)
        self.network, self.datalists, self.preprocessing = network, datalists, preprocessing
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.head_kwargs = default_head_kwargs(method_name, None, head_kwargs)
        self.head_kwargs.setdefault("seed", self.seed)
        self.batch_size, self.num_workers, self.device, self.resume = batch_size, num_workers, device, bool(resume)
        self.record, self.splits = record, (train_split, val_split)

    def run(self) -> Path | None:
        """Run the stages (staged method) and return the written ``model.pt``; ``None`` for the other methods."""
        if not self.staged:
            return None
        from monai.data import Dataset

        stages = HEAD_STAGES[head_name(self.method_name)]
        loaders = {
            name: DataLoader(
                Dataset(data=list(self.datalists[split]), transform=self.preprocessing),
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
            )
            for name, split in zip(("train", "val"), self.splits)
        }
        logger.info("%s: fitting the %r head in stages", self.method_name, head_name(self.method_name))
        stages.run(
            self.network,
            loaders,
            self.ckpt_dir,
            self.output_dir,
            self.num_classes,
            self.head_kwargs,
            self.ckpt_dir / stages.encoder_checkpoint,
            self.device,
            self.resume,
        )
        path = self.ckpt_dir / "model.pt"
        if self.record is not None and not (dist.is_available() and dist.is_initialized() and dist.get_rank() > 0):
            stamp_record(path, self.record)
        return path
