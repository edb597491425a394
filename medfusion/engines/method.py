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

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from torch import nn

__all__ = ["Method", "TrainStep", "to_device", "model_inputs", "forward_outputs", "OutputsWrapper", "unwrap"]


def to_device(batch: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False) -> dict[str, Any]:
    """Move every tensor of a collated batch dict to ``device`` (other values pass through)."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            # MetaTensor -> plain tensor: keeps the hot path free of MONAI meta bookkeeping.
            out[k] = (
                v.as_tensor().to(device, non_blocking=non_blocking)
                if hasattr(v, "as_tensor")
                else v.to(device, non_blocking=non_blocking)
            )
        else:
            out[k] = v
    return out


def model_inputs(batch: Mapping[str, Any], modalities: tuple[str, ...]) -> Any:
    """What a medfusion network takes from a batch.

    The stacked ``image`` [B, M, ...] when the batch has one (volume models), else ``{name: tensor}``
    for every modality.
    """
    if "image" in batch:
        return batch["image"]
    absent = [m for m in modalities if m not in batch]
    if absent:
        raise KeyError(f"batch has no key for modalities {absent}; keys present: {sorted(batch)}.")
    return {m: batch[m] for m in modalities}


class OutputsWrapper(nn.Module):
    """Makes ``forward`` return ``forward_outputs`` so a model can be wrapped in DistributedDataParallel.

    DDP synchronises gradients only through its own ``forward``; methods need the full
    ``FusionOutput`` (aux features) for their losses, so multi-process training wraps
    ``DDP(OutputsWrapper(network))`` and :func:`forward_outputs` calls it.

    Args:
        module: a network with ``forward_outputs``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module.forward_outputs(*args, **kwargs)``."""
        return self.module.forward_outputs(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / :class:`OutputsWrapper` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, OutputsWrapper)):
        model = model.module
    return model


def forward_outputs(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Full ``FusionOutput`` of ``model``, through DDP when the model is wrapped (see :class:`OutputsWrapper`)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model(*args, **kwargs)
    return unwrap(model).forward_outputs(*args, **kwargs)


class Method:
    """Base class of training recipes.

    Subclasses implement :meth:`loss_step`; they may override :meth:`handlers` and
    :meth:`prepare`.
    """

    name: str = "method"

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
