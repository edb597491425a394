"""The one trainer for every :class:`~medfusion.engines.method.Method`.

:class:`MethodTrainer` is MONAI's ``SupervisedTrainer`` with the generic
:class:`~medfusion.engines.method.TrainStep` as ``iteration_update`` and the method's handlers attached before
the others. Both bundles' ``train#trainer`` is a ``MethodTrainer`` component; :func:`build_trainer` builds the
same trainer from Python (the same handlers in the bundles' order and, given a folder, the bundles' atomic,
resumable ``last_checkpoint_epoch=N.pt`` checkpoints), for benchmarks, tests and notebooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler, StatsHandler, ValidationHandler

from medfusion.engines.checkpoint import ValidationState, attach_checkpointing
from medfusion.engines.determinism import EpochSeed
from medfusion.engines.method import Method, TrainStep
from medfusion.engines.utils import resolve_device

__all__ = ["MethodTrainer", "loss_output", "build_trainer", "every"]

#: ``SupervisedTrainer`` arguments a :class:`MethodTrainer` sets itself.
_SET_BY_METHOD = ("loss_function", "iteration_update", "decollate")


def loss_output(output: Mapping[str, Any]) -> Any:
    """``output_transform`` for StatsHandler/TensorBoard: the optimised loss of a TrainStep output."""
    return output["loss"]


def every(n: int) -> bool | Callable[[Any, int], bool]:
    """``StatsHandler(iteration_log=...)`` logging every ``n``-th iteration (``n <= 0``: never).

    StatsHandler takes a bool or an event filter; an int is only truthy (every iteration).
    """
    if n <= 1:
        return n == 1

    def every_n(_: Any, iteration: int) -> bool:
        return iteration % n == 0

    return every_n


class MethodTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` training ``network`` with a medfusion method.

    The iteration is :class:`~medfusion.engines.method.TrainStep` (``method.loss_step``: forward pass and every
    loss of the recipe; ``accumulation_steps`` and the iteration events as ``SupervisedTrainer``). The method's
    handlers are attached first, then ``train_handlers``, so an epoch-end method handler (OmniFuse's refresh and
    mining) runs before validation and checkpointing. ``loss_function`` is ``method.loss_step``, the one loss
    the iteration computes, so a configuration names no separate loss that training would ignore.

    Args:
        method: the training recipe.
        device: where the network runs.
        max_epochs: epochs to train.
        train_data_loader: training batches (dicts following the batch convention).
        network: the model.
        optimizer: its optimizer.
        train_handlers: other ignite handlers (objects with ``attach``), attached after the method's.
        epoch_length: iterations per epoch (default: ``len(train_data_loader)``).
        amp: mixed precision.
        accumulation_steps: mini-batches per optimizer step (gradient accumulation, as ``SupervisedTrainer``).
        **kwargs: other ``SupervisedTrainer`` arguments (``non_blocking``, ``optim_set_to_none``, ``amp_kwargs``,
            ``key_train_metric``, ...). An ``inferer`` is stored as ``SupervisedTrainer`` stores it (MONAI's bundle
            properties require ``train#inferer``); a method's ``loss_step`` calls the network itself.

    Raises:
        TypeError: ``kwargs`` holds ``loss_function``, ``iteration_update`` or ``decollate`` (set from the
            method: the loss is ``method.loss_step`` and the iteration output is a dict of scalar losses).
    """

    def __init__(
        self,
        method: Method,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable[Any],
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_handlers: Sequence[Any] | None = None,
        epoch_length: int | None = None,
        amp: bool = False,
        accumulation_steps: int = 1,
        **kwargs: Any,
    ) -> None:
        fixed = sorted(k for k in kwargs if k in _SET_BY_METHOD)
        if fixed:
            raise TypeError(
                f"MethodTrainer sets {fixed} from the method (the loss is method.loss_step, the iteration "
                "TrainStep(method)); remove them from the trainer's arguments."
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=method.loss_step,
            epoch_length=epoch_length,
            iteration_update=TrainStep(method),
            train_handlers=[*method.handlers(), *(train_handlers or [])],
            amp=amp,
            decollate=False,
            accumulation_steps=accumulation_steps,
            **kwargs,
        )
        self.method = method


def build_trainer(
    network: torch.nn.Module,
    method: Method,
    train_loader: Iterable[Any],
    max_epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    amp: bool = False,
    handlers: Sequence[Any] = (),
    epoch_length: int | None = None,
    output_dir: str | Path | None = None,
    save_interval: int = 1,
    log_every: int = 10,
    seed: int | None = None,
    datasets: Sequence[Any] = (),
    lr_scheduler: Any = None,
    validator: Any = None,
    val_interval: int = 1,
    val_handlers: Sequence[Any] = (),
    resume: bool = False,
    overwrite: bool = False,
    record: Any = None,
    accumulation_steps: int = 1,
) -> MethodTrainer:
    """The bundles' trainer, built in Python.

    The handlers are the bundles' ``train#handlers`` in their order, each only when its input is given:
    ``LrScheduleHandler`` (``lr_scheduler``), ``ValidationHandler`` (``validator``), ``EpochSeed`` (``seed``),
    ``StatsHandler`` (the loss every ``log_every`` iterations), then ``handlers``; the method's own handlers come
    first (see :class:`MethodTrainer`). With ``output_dir`` the trainer saves what the bundles' ``run`` saves
    (:func:`~medfusion.engines.checkpoint.attach_checkpointing`): ``last_checkpoint_epoch=N.pt`` written
    atomically with ``model``, ``optimizer``, ``method``, ``trainer`` (and ``lr_scheduler``, ``validation``,
    ``record`` when given), resumable with ``resume=True``. TensorBoard logging and the best-model ``model.pt``
    are the validator's handlers, as in the bundles.

    Args:
        network: the model (moved to ``device``).
        method: the training recipe.
        train_loader: training batches (dicts following the batch convention).
        max_epochs: epochs.
        optimizer: default Adam(lr) over the network's parameters.
        lr: learning rate of the default optimizer.
        device: ``None``/``"auto"`` = CUDA when available.
        amp: mixed precision (CUDA).
        handlers: extra ignite handlers (objects with ``attach``), attached last.
        epoch_length: iterations per epoch (default: ``len(train_loader)``).
        output_dir: checkpoint folder; it must hold no other run unless ``resume`` or ``overwrite``.
        save_interval: epochs between checkpoints.
        log_every: StatsHandler print interval in iterations (0 = no iteration lines).
        seed: the run's base seed: every epoch starts re-seeded (``EpochSeed``, exact resume); ``None`` = not.
        datasets: datasets whose random transforms ``EpochSeed`` re-seeds.
        lr_scheduler: stepped every epoch.
        validator: a ``SupervisedEvaluator`` run every ``val_interval`` epochs.
        val_interval: epochs between validations.
        val_handlers: the validator's handlers; the checkpoint keeps its best-model saver's and early stop's
            state (:class:`~medfusion.engines.checkpoint.ValidationState`).
        resume: continue the run in ``output_dir`` from its newest checkpoint.
        overwrite: replace the run in ``output_dir``.
        record: the run's :class:`~medfusion.engines.record.RunRecord` (saved, and checked on resume).
        accumulation_steps: mini-batches per optimizer step.
    """
    dev = resolve_device(device)
    network = network.to(dev)
    if optimizer is None:
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    train_handlers: list[Any] = []
    if lr_scheduler is not None:
        train_handlers.append(LrScheduleHandler(lr_scheduler=lr_scheduler, print_lr=True))
    if validator is not None:
        train_handlers.append(ValidationHandler(validator=validator, epoch_level=True, interval=val_interval))
    if seed is not None:
        train_handlers.append(EpochSeed(seed, method, datasets))
    train_handlers.append(
        StatsHandler(
            name="medfusion.train", tag_name="train_loss", output_transform=loss_output, iteration_log=every(log_every)
        )
    )
    train_handlers += list(handlers)
    trainer = MethodTrainer(
        method=method,
        device=dev,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        train_handlers=train_handlers,
        epoch_length=epoch_length,
        amp=amp,
        accumulation_steps=accumulation_steps,
    )
    if output_dir is not None:
        objects: dict[str, Any] = {"model": network, "optimizer": optimizer, "method": method}
        if lr_scheduler is not None:
            objects["lr_scheduler"] = lr_scheduler
        if validator is not None:
            objects["validation"] = ValidationState(validator, val_handlers)
        attach_checkpointing(
            trainer,
            output_dir,
            objects,
            resume=resume,
            save_interval=save_interval,
            overwrite=overwrite,
            record=record,
        )
    return trainer
