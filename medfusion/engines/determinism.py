"""Per-epoch seeding: a run resumed from an epoch checkpoint replays what an uninterrupted run did.

At ``EPOCH_STARTED`` of epoch ``e`` every random generator that training touches is re-seeded
from ``(seed, e)``: Python/NumPy/torch global generators (data-loader shuffling, dropout layers),
the random state of every MONAI ``Randomizable`` transform in the given datasets, and the method's
own generators (modality dropout, meta-loader iterators; :meth:`Method.reseed`). Resuming at epoch
``e`` therefore sees the same shuffling, crops and modality masks as the original run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.utils import set_determinism

from medfusion.engines.method import Method

__all__ = ["EpochSeed", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch`` (1-based) of a run with base ``seed`` (fits in 32 bits)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919) % (2**31 - 1)


class EpochSeed:
    """Ignite handler: re-seed everything random at the start of each epoch.

    Args:
        seed: the run's base seed.
        method: the training recipe (its :meth:`~medfusion.engines.method.Method.reseed` is called).
        datasets: datasets whose ``Randomizable`` transforms are re-seeded (train, meta-validation).
    """

    def __init__(self, seed: int, method: Method | None = None, datasets: Sequence[Any] = ()) -> None:
        self.seed = int(seed)
        self.method = method
        self.datasets = list(datasets)

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_STARTED``."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Re-seed for ``engine.state.epoch``."""
        s = epoch_seed(self.seed, engine.state.epoch)
        set_determinism(seed=s)
        for i, ds in enumerate(self.datasets):
            set_rnd(ds, seed=s + 1 + i)
        if self.method is not None:
            self.method.reseed(s)
