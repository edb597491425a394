"""Base classes of training recipes: :class:`Method` and :class:`DropoutMethod`.

A method is a recipe, not a trainer fork: ``loss_step(model, batch, engine)`` returns the losses of one
iteration, ``handlers()`` the ignite handlers it needs (MetaKD's meta step, OmniFuse's lazy-combination
mining, ...), and the class hooks :meth:`Method.data_head_kwargs` / :meth:`Method.evaluation_outputs` /
:attr:`Method.training_head` say what varies beyond its kwargs (read by the method registry,
:mod:`medfusion.fusion.recipes`). The one
generic train step that runs a recipe in MONAI's ``SupervisedTrainer`` is
:class:`medfusion.engines.method.TrainStep`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

__all__ = ["Method", "DropoutMethod"]


class Method:
    """Base class of training recipes.

    Subclasses implement :meth:`loss_step`; they may override :meth:`handlers` and
    :meth:`prepare`, and the class hooks :meth:`data_head_kwargs` and :meth:`evaluation_outputs`
    (what varies between methods beyond their kwargs; read by the method registry,
    :mod:`medfusion.fusion.recipes`).
    """

    name: str = "method"

    training_head: ClassVar[str | None] = None
    """A staged method's training head: the network trains with this registered fusion head (e.g. ``"concat"``)
    and :meth:`loss_step`, then the method's own head is fitted by its stages after training (Meta Fusion;
    the bundles run them with :mod:`medfusion.apps.staged`). ``None``: the recipe's head trains end to end."""

    if TYPE_CHECKING:
        # the registries build every recipe as ``method_class(modalities, **method_kwargs)``
        # (:func:`medfusion.fusion.recipes.create_method`); each subclass defines that constructor
        def __init__(self, modalities: Sequence[str], **kwargs: Any) -> None: ...

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
