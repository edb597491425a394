"""Build MONAI ``SupervisedTrainer``s for any :class:`~medfusion.engines.method.Method`.

There is one trainer for every method: MONAI's ``SupervisedTrainer`` with the generic
:class:`~medfusion.engines.method.TrainStep` as ``iteration_update`` and the method's handlers
attached. Bundles build the same objects from JSON; this module is the Python-API shortcut.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver, StatsHandler

from medfusion.engines.method import Method, TrainStep
from medfusion.engines.utils import resolve_device

__all__ = ["loss_output", "build_trainer", "method_save_dict"]

logger = logging.getLogger(__name__)


def loss_output(output: Mapping[str, Any]) -> Any:
    """``output_transform`` for StatsHandler/TensorBoard: the optimised loss of a TrainStep output."""
    return output["loss"]


def method_save_dict(network: torch.nn.Module, optimizer: torch.optim.Optimizer, method: Method) -> dict[str, Any]:
    """What a checkpoint holds: network, optimizer and every method state module (e.g. MetaKD's IWV)."""
    save: dict[str, Any] = {"network": network, "optimizer": optimizer}
    state = getattr(method, "state", None)
    if isinstance(state, torch.nn.Module):
        save[method.name] = state
    return save


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
    save_interval: int = 0,
    log_every: int = 10,
) -> SupervisedTrainer:
    """A ``SupervisedTrainer`` driving ``method`` on ``network``.

    Args:
        network: the model (moved to ``device``).
        method: the training recipe.
        train_loader: training batches (dicts following the batch convention).
        max_epochs: epochs.
        optimizer: default Adam(lr) over the network's parameters.
        lr: learning rate of the default optimizer.
        device: ``None``/``"auto"`` = CUDA when available.
        amp: mixed precision (CUDA).
        handlers: extra ignite handlers (objects with ``attach``).
        epoch_length: iterations per epoch (default: ``len(train_loader)``).
        output_dir: checkpoint folder (CheckpointSaver of network, optimizer and method state).
        save_interval: save every N epochs (0 = only the final checkpoint).
        log_every: StatsHandler print interval in iterations.
    """
    dev = resolve_device(device)
    network = network.to(dev)
    if optimizer is None:
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    all_handlers: list[Any] = [
        StatsHandler(
            name="medfusion.train", tag_name="train_loss", output_transform=loss_output, iteration_log=log_every
        )
    ]
    all_handlers += method.handlers()
    if output_dir is not None:
        all_handlers.append(
            CheckpointSaver(
                save_dir=str(output_dir),
                save_dict=method_save_dict(network, optimizer, method),
                save_final=True,
                save_interval=save_interval,
                epoch_level=True,
            )
        )
    all_handlers += list(handlers)
    return SupervisedTrainer(
        device=dev,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=getattr(method, "task_loss", torch.nn.MSELoss()),
        epoch_length=epoch_length,
        iteration_update=TrainStep(method),
        train_handlers=all_handlers,
        amp=amp,
        decollate=False,
    )
