"""A training method is a recipe, not a trainer fork.

A :class:`Method` provides

* ``loss_step(model, batch, state)`` -> ``dict`` with ``"loss"`` (optimised) and any other
  scalars (logged);
* ``handlers(...)`` -> ignite handlers attached to MONAI's ``SupervisedTrainer`` (MetaKD's meta
  step, QMF's loss history, OmniFuse's lazy-combination mining, ...).

:class:`TrainStep` is the one generic ``iteration_update`` handed to
``monai.engines.SupervisedTrainer``: it moves the batch to the device, calls the method's
``loss_step`` (under autocast when AMP is on), back-propagates and steps the optimizer. All
method state lives in the model's parameters/buffers so ``CheckpointSaver`` saves it.
"""

from __future__ import annotations

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


class TrainStep:
    """Generic ``iteration_update`` for ``monai.engines.SupervisedTrainer``.

    Args:
        method: the training recipe.
    """

    def __init__(self, method: Method) -> None:
        self.method = method

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        """One optimisation step; returns the output stored in ``engine.state.output``."""
        batch = to_device(batchdata, engine.state.device, engine.non_blocking)
        batch = self.method.prepare(batch, engine)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast(device_type=torch.device(engine.state.device).type, **engine.amp_kwargs):
                losses = self.method.loss_step(engine.network, batch, engine)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            engine.scaler.scale(losses["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            losses = self.method.loss_step(engine.network, batch, engine)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            losses["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        out: dict[str, Any] = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in losses.items()}
        engine.state.output = out
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return out
