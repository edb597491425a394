"""A training method is a recipe, not a trainer fork.

A :class:`Method` provides

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from torch import nn

from medfusion.batch import OutputsWrapper, forward_outputs, model_inputs, to_device, unwrap

# the batch helpers live in medfusion.batch (evaluation imports them without the training engine); re-exported here
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


class Method:
    """Base class of training recipes.

    Subclasses implement :meth:`loss_step`; they may override :meth:`handlers` and
    :meth:`prepare`, and the class hooks :meth:`data_head_kwargs` and :meth:`evaluation_outputs`
    (what varies between methods beyond their kwargs; read by the method registry,
    :mod:`medfusion.fusion.recipes`).
    """

    name: str = "method"

    @classmethod
    def data_head_kwargs(cls, num_train_samples: int) -> dict[str, Any]:
        """Head kwargs sized by the training data (e.g. QMF's ``num_samples``); none by default.

        Args:
            num_train_samples: size of the training split (the ``sample_index`` range).
        """
        return {}

    @classmethod
    def evaluation_outputs(
        cls,
        model: nn.Module,
        loader: Iterable[Mapping[str, Any]],
        modalities: Sequence[str],
        output_dir: str | Path,
        device: str | torch.device | None = None,
    ) -> list[Path]:
        """Method-specific evaluation files written next to the all-combination results; none by default.

        Args:
            model: the trained network.
            loader: evaluation batches.
            modalities: the network's ordered modality names.
            output_dir: evaluation folder.
            device: default automatic.

        Returns:
            Files written.
        """
        return []

    def prepare(self, batch: dict[str, Any], engine: Any) -> dict[str, Any]:
        """Per-iteration batch transform on the device (e.g. batch-level modality dropout)."""
        return batch

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """Compute the losses of one training iteration.

        Args:
            model: the network being trained.
            batch: the collated batch on the device.
            engine: the ignite engine (``engine.state.epoch``/``iteration`` available).

        Returns:
            ``{"loss": scalar to optimise, **other scalars to log}``.
        """
        raise NotImplementedError  # abstract: implemented by each method

    def handlers(self) -> list[Any]:
        """Ignite handlers this method needs attached to the trainer (objects with ``attach``)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """State that lives in the recipe rather than the network (checkpointed as ``"method"``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def reseed(self, seed: int) -> None:
        """Reset every random generator the recipe owns (called at each epoch start for exact resume).

        The default has nothing to reset; recipes with modality dropout or their own data iterators
        override it.
        """


class DropoutMethod(Method):
    """Base of recipes whose only own state is an optional batch-level modality dropout ``self.dropout``.

    ``self.dropout`` is any callable on the batch dict; when it is a
    :class:`~medfusion.data.dropout.BatchModalityDropout` its generator is checkpointed and re-seeded.
    """

    dropout: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def prepare(self, batch: dict[str, Any], engine: Any) -> dict[str, Any]:
        """Apply the optional modality dropout."""
        return self.dropout(batch) if self.dropout is not None else batch

    def _generator(self) -> Any:
        from medfusion.data.dropout import BatchModalityDropout

        return self.dropout if isinstance(self.dropout, BatchModalityDropout) else None

    def state_dict(self) -> dict[str, Any]:
        """The modality-dropout generator state (checkpointed as ``"method"``)."""
        gen = self._generator()
        return {"dropout": gen.state_dict()} if gen is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        gen = self._generator()
        if gen is not None and "dropout" in state:
            gen.load_state_dict(state["dropout"])

    def reseed(self, seed: int) -> None:
        """Restart the modality-dropout generator."""
        gen = self._generator()
        if gen is not None:
            gen.reseed(seed)


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
