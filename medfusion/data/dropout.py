"""Modality dropout: simulate missing modalities by rewriting ``modality_mask`` and zeroing inputs.

Modes (one sampler serves the per-sample dictionary transform and the per-batch callable used by
methods inside the train step):

- ``"uniform"``: per sample, uniform over the non-empty subsets of the modalities that sample has
  (RFNet/mmFormer; with all modalities available, each of the 2^M-1 combinations has probability
  1/(2^M-1)).
- ``"k_subset"``: MetaKD's reference code: draw ``k ~ U{1..M}``, then a uniformly random k-subset.
  :class:`BatchModalityDropout` draws it once per batch (as the reference code), the dictionary
  transform once per sample. A sample that has none of the drawn modalities keeps one random
  available modality (documented fallback, never an empty sample).
- ``"bernoulli"``: each available modality is dropped independently with probability ``p``; when
  everything would be dropped, one available modality (uniformly chosen) is kept.
- ``"fixed"``: a given combination (evaluation, "dedicated" training). A sample lacking every
  modality of the combination is an error, not a silent empty input.
- ``"none"``: the mask is left as it is.

A modality that a sample does not have (mask False on input) is never switched on.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from medfusion.modality import Keys, parse_combination, validate_modalities

__all__ = ["DROPOUT_MODES", "sample_modality_masks", "ModalityDropout", "ModalityDropoutd", "BatchModalityDropout"]

DROPOUT_MODES = ("uniform", "k_subset", "bernoulli", "fixed", "none")


def _check_mode(mode: str, p: float, combination: Sequence[str] | None, modalities: Sequence[str]) -> None:
    if mode not in DROPOUT_MODES:
        raise ValueError(f"modality dropout: mode must be one of {DROPOUT_MODES}, got {mode!r}.")
    if mode == "bernoulli" and not 0.0 <= p < 1.0:
        raise ValueError(f"modality dropout: p must be in [0, 1) for mode 'bernoulli', got {p}.")
    if mode == "fixed":
        if not combination:
            raise ValueError("modality dropout: mode 'fixed' needs a combination, e.g. ['flair', 't1ce'].")
        parse_combination(list(combination), modalities)


def sample_modality_masks(
    available: np.ndarray,
    mode: str,
    rng: np.random.Generator | np.random.RandomState,
    p: float = 0.5,
    combination_mask: np.ndarray | None = None,
    per_batch: bool = False,
) -> np.ndarray:
    """Draw one presence mask per sample.

    Args:
        available: bool ``[B, M]``; which modalities each sample has. Rows must not be empty.
        mode: one of :data:`DROPOUT_MODES`.
        rng: numpy generator (``np.random.Generator`` or MONAI's ``RandomState``).
        p: drop probability for ``"bernoulli"``.
        combination_mask: bool ``[M]`` for ``"fixed"``.
        per_batch: ``"k_subset"`` draws one subset for the whole batch (MetaKD reference code).

    Returns:
        bool ``[B, M]``, a subset of ``available`` with at least one True per row.

    Raises:
        ValueError: an empty row in ``available``; ``"fixed"`` leaving a sample with nothing.
    """
    avail = np.asarray(available, dtype=bool)
    if avail.ndim != 2:
        raise ValueError(f"modality dropout: available mask must be [B, M], got shape {avail.shape}.")
    empty = ~avail.any(axis=1)
    if empty.any():
        raise ValueError(f"modality dropout: samples {np.flatnonzero(empty).tolist()} have no modality at all.")
    b, m = avail.shape
    if mode == "none":
        return avail.copy()
    if mode == "fixed":
        if combination_mask is None:
            raise ValueError("modality dropout: mode 'fixed' needs a combination.")
        out = avail & np.asarray(combination_mask, dtype=bool)[None]
        bad = ~out.any(axis=1)
        if bad.any():
            raise ValueError(
                f"modality dropout: samples {np.flatnonzero(bad).tolist()} have none of the requested modalities "
                f"(combination mask {np.asarray(combination_mask, dtype=bool).tolist()})."
            )
        return out
    if mode == "uniform":
        # uniform over the 2^k - 1 non-empty subsets of each row's k available modalities:
        # an independent fair coin per available modality, redrawn while empty (rejection sampling)
        out = avail & (rng.random((b, m)) < 0.5)
        redo = ~out.any(axis=1)
        while redo.any():
            out[redo] = avail[redo] & (rng.random((int(redo.sum()), m)) < 0.5)
            redo = ~out.any(axis=1)
        return out
    if mode == "k_subset":
        n_draws = 1 if per_batch else b
        draws = np.zeros((n_draws, m), dtype=bool)
        for i in range(n_draws):
            k = int(np.floor(rng.random() * m)) + 1
            draws[i, rng.permutation(m)[:k]] = True
        out = avail & (draws if not per_batch else np.repeat(draws, b, axis=0))
    elif mode == "bernoulli":
        out = avail & (rng.random((b, m)) >= p)
    else:
        raise ValueError(f"modality dropout: mode must be one of {DROPOUT_MODES}, got {mode!r}.")
    for row in np.flatnonzero(~out.any(axis=1)):  # keep one random available modality
        choices = np.flatnonzero(avail[row])
        out[row, choices[int(np.floor(rng.random() * len(choices)))]] = True
    return out


class ModalityDropout(Randomizable):
    """Array transform: a presence mask ``[M]`` -> a randomly reduced mask ``[M]``.

    Args:
        modalities: modality names (order of the mask).
        mode: see the module docstring.
        p: drop probability for ``"bernoulli"``.
        combination: modality names for ``"fixed"``.
    """

    def __init__(
        self, modalities: Sequence[str], mode: str = "uniform", p: float = 0.5, combination: Sequence[str] | None = None
    ) -> None:
        self.modalities = validate_modalities(modalities)
        _check_mode(mode, p, combination, self.modalities)
        self.mode, self.p = mode, float(p)
        self.combination_mask = (
            np.array([mod in set(combination) for mod in self.modalities]) if combination is not None else None
        )

    def randomize(self, data: Any = None) -> None:
        """No separate randomisation step: :meth:`__call__` draws from ``self.R``."""

    def __call__(self, mask: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """Return a bool ``[M]`` mask (input ``None`` = all present)."""
        avail = np.ones(len(self.modalities), dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        if avail.shape[0] != len(self.modalities):
            raise ValueError(f"ModalityDropout: mask has {avail.shape[0]} entries, expected {len(self.modalities)}.")
        out = sample_modality_masks(avail[None], self.mode, self.R, self.p, self.combination_mask)[0]
        return torch.as_tensor(out, dtype=torch.bool)


_KeyT = TypeVar("_KeyT", bound=Hashable)


def _zero_absent(data: dict[_KeyT, Any], keys: Sequence[_KeyT], modalities: Sequence[str], mask: Any) -> None:
    """Zero the inputs of absent modalities.

    ``mask`` is bool ``[M]`` (one sample) or ``[B, M]`` (batch). A key equal to a modality name holds that
    modality's tensor; any other key (``image``) holds the modalities stacked along the channel dim
    (dim 0 for a sample, dim 1 for a batch).
    """
    mask_t = torch.as_tensor(mask, dtype=torch.bool)
    batched = mask_t.ndim == 2
    for key in keys:
        if key not in data:
            raise KeyError(f"modality dropout: key {key!r} not in the data (keys: {sorted(map(str, data))}).")
        value = data[key]
        if key in modalities:
            keep = mask_t[:, modalities.index(str(key))] if batched else mask_t[modalities.index(str(key))]
            if batched:
                data[key] = value * keep.to(value.device, value.dtype).reshape(-1, *([1] * (value.ndim - 1)))
            elif not bool(keep):
                data[key] = value * 0
        else:
            ch = 1 if batched else 0
            if value.shape[ch] != len(modalities):
                raise ValueError(
                    f"modality dropout: {key!r} has {value.shape[ch]} channels in dim {ch}, "
                    f"expected one per modality {tuple(modalities)}."
                )
            factor = mask_t.to(value.dtype)
            shape = [*factor.shape] + [1] * (value.ndim - factor.ndim)
            data[key] = value * factor.reshape(shape).to(value.device)


class ModalityDropoutd(Randomizable, MapTransform):
    """Dictionary transform: draw a presence mask per sample, write ``modality_mask``, zero absent inputs.

    The incoming ``modality_mask`` (if any) says what the sample has; the new mask is a subset.

    Args:
        keys: keys to zero: modality names (one tensor each) and/or ``"image"`` (stacked ``[M, ...]``).
        modalities: ordered modality names.
        mode: see the module docstring.
        p: drop probability for ``"bernoulli"``.
        combination: modality names for ``"fixed"`` (e.g. ``parse_combination("flair+t1ce", mods)``).
        mask_key: where the mask lives.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modalities: Sequence[str],
        mode: str = "uniform",
        p: float = 0.5,
        combination: Sequence[str] | None = None,
        mask_key: str = Keys.MASK,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.dropper = ModalityDropout(modalities, mode, p, combination)
        self.modalities = self.dropper.modalities
        self.mask_key = mask_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ModalityDropoutd:
        """Seed this transform and its array transform."""
        super().set_random_state(seed, state)
        self.dropper.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """No separate randomisation step: the array transform draws when called."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Apply to one sample dict."""
        d = dict(data)
        mask = self.dropper(d.get(self.mask_key))
        d[self.mask_key] = mask
        _zero_absent(d, [k for k in self.key_iterator(d)], self.modalities, mask)
        return d


class BatchModalityDropout:
    """Modality dropout on a collated batch (used by methods inside the train step).

    Args:
        modalities: ordered modality names.
        mode: see the module docstring (``"k_subset"`` draws one subset per batch here).
        p: drop probability for ``"bernoulli"``.
        combination: modality names for ``"fixed"``.
        seed: seed of the numpy generator; its state is in :meth:`state_dict` for exact resume.
        keys: keys to zero; default ``"image"`` when present, else every modality key.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        mode: str = "uniform",
        p: float = 0.5,
        combination: Sequence[str] | None = None,
        seed: int = 0,
        keys: Sequence[str] | None = None,
    ) -> None:
        self.modalities = validate_modalities(modalities)
        _check_mode(mode, p, combination, self.modalities)
        self.mode, self.p = mode, float(p)
        self.combination_mask = (
            np.array([m in set(combination) for m in self.modalities]) if combination is not None else None
        )
        self.keys = list(keys) if keys is not None else None
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Return a shallow copy of ``batch`` with a new ``modality_mask`` and absent inputs zeroed."""
        out = dict(batch)
        if self.mode == "none":
            return out
        mask = out[Keys.MASK]
        new = sample_modality_masks(
            mask.detach().cpu().numpy().astype(bool), self.mode, self.rng, self.p, self.combination_mask, per_batch=True
        )
        new_t = torch.as_tensor(new, dtype=torch.bool, device=mask.device)
        out[Keys.MASK] = new_t
        keys = self.keys or ([Keys.IMAGE] if Keys.IMAGE in out else [m for m in self.modalities if m in out])
        _zero_absent(out, keys, self.modalities, new_t)
        return out

    def reseed(self, seed: int) -> None:
        """Restart the generator from ``seed``."""
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        """Generator state (for checkpoints and exact resume)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator state written by :meth:`state_dict`."""
        self.rng.bit_generator.state = state["rng"]
