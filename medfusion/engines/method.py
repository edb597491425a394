"""A training method is a recipe, not a trainer fork.

A :class:`~medfusion.fusion.method.Method` (defined in the fusion layer, where every recipe lives) provides

* ``loss_step(model, batch, state)`` -> ``dict`` with ``"loss"`` (optimised) and any other
  scalars (logged);
* ``handlers(...)`` -> ignite handlers attached to MONAI's ``SupervisedTrainer`` (MetaKD's meta
  step, QMF's loss history, OmniFuse's lazy-combination mining, ...).

:class:`TrainStep` is the one generic ``iteration_update`` handed to
``monai.engines.SupervisedTrainer`` (through :class:`~medfusion.engines.trainer.MethodTrainer`): it moves
the batch to the device, calls the method's ``loss_step`` (under autocast when AMP is on), back-propagates and
steps the optimizer, firing the trainer's iteration events and accumulating gradients as ``SupervisedTrainer``
does. Method state lives in the model's parameters/buffers and in :meth:`Method.state_dict` so the checkpoints
save it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import IterationEvents

from medfusion.batch import OutputsWrapper, forward_outputs, model_inputs, to_device, unwrap
from medfusion.fusion.method import DropoutMethod, Method

# the batch helpers live in medfusion.batch (evaluation imports them without the training engine) and the recipe
# base classes in medfusion.fusion.method (the recipes are fusion modules); both re-exported here
__all__ = [
    "Method",
    "DropoutMethod",
    "TrainStep",
    "accumulation_phase",
    "to_device",
    "model_inputs",
    "forward_outputs",
    "OutputsWrapper",
    "unwrap",
]


def accumulation_phase(engine: Any) -> tuple[int, bool, bool]:
    """Where this iteration sits in a gradient-accumulation cycle, with MONAI ``SupervisedTrainer``'s rule.

    Gradients are zeroed at the first mini-batch of each cycle of ``engine.accumulation_steps`` and the optimizer
    steps at its last one, and at the last iteration of an epoch whose length is not a multiple (a flush, so no
    gradient is dropped). Cycles restart with every epoch when the epoch length is known.

    Args:
        engine: the trainer (``accumulation_steps`` absent = 1).

    Returns:
        ``(accumulation_steps, zero the gradients now, step the optimizer now)``.
    """
    acc = int(getattr(engine, "accumulation_steps", 1))
    if acc <= 1:
        return 1, True, True
    epoch_length = engine.state.epoch_length
    if epoch_length is not None:
        local = (engine.state.iteration - 1) % epoch_length
        return acc, local % acc == 0, (local + 1) % acc == 0 or local + 1 == epoch_length
    local = engine.state.iteration - 1
    return acc, local % acc == 0, (local + 1) % acc == 0


class TrainStep:
    """Generic ``iteration_update`` for ``monai.engines.SupervisedTrainer``.

    Follows ``SupervisedTrainer``'s own iteration: the same events in the same order (``FORWARD_COMPLETED``,
    ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``) and the same gradient accumulation over
    ``engine.accumulation_steps`` mini-batches (:func:`accumulation_phase`; the loss is divided by the number of
    steps for the backward pass, the logged losses are not). A method's ``loss_step`` runs the forward pass and the
    losses in one call, so ``FORWARD_COMPLETED`` fires when it returns, just before ``LOSS_COMPLETED``; at both,
    ``engine.state.output`` holds the method's losses (``"loss"`` is MONAI's ``Keys.LOSS``).

    Args:
        method: the training recipe.
    """

    def __init__(self, method: Method) -> None:
        self.method = method

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        """One optimisation step (or one accumulation step); returns the output stored in ``engine.state.output``.

        Raises:
            ValueError: ``batchdata`` is ``None``.
        """
        if batchdata is None:
            raise ValueError("TrainStep: the data loader yielded no batch (None).")
        batch = to_device(batchdata, engine.state.device, engine.non_blocking)
        batch = self.method.prepare(batch, engine)
        acc, zero_grad, step = accumulation_phase(engine)
        engine.network.train()
        if zero_grad:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        scaler = engine.scaler if engine.amp else None
        autocast = (
            torch.autocast(device_type=torch.device(engine.state.device).type, **engine.amp_kwargs)
            if scaler is not None
            else contextlib.nullcontext()
        )
        with autocast:
            losses = self.method.loss_step(engine.network, batch, engine)
        engine.state.output = losses
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = losses["loss"] / acc if acc > 1 else losses["loss"]
        (scaler.scale(loss) if scaler is not None else loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:
            if scaler is not None:
                scaler.step(engine.optimizer)
                scaler.update()
            else:
                engine.optimizer.step()
        out: dict[str, Any] = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()}
        engine.state.output = out
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out
