"""Named modalities, modality combinations and presence masks.

The two conventions everything in medfusion depends on live here:

1. Modalities are named. A model is built for an ordered tuple of names such as
   ``("flair", "t1", "t1ce", "t2")``; no code outside this module addresses a modality by a bare
   channel index.
2. Presence travels with the batch as ``modality_mask``: bool ``[B, M]`` in the model's modality
   order, ``True`` = present. A missing modality keeps its key with a zero tensor (so MONAI's
   collate sees identical keys); presence is only ever read from the mask.

Combinations are the ``2^M - 1`` non-empty subsets of the modalities, ordered by size and then by
modality order (``flair``, ``t1``, ..., ``flair+t1``, ..., ``flair+t1+t1ce+t2``), and named by
joining the member names with ``+``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Sequence
from enum import Enum

import torch

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:

    class StrEnum(str, Enum):
        """Python 3.10 stand-in for ``enum.StrEnum`` (3.11+): ``str()`` and ``format()`` give the value."""

        def __str__(self) -> str:
            return str.__str__(self)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(self, format_spec)


__all__ = [
    "Keys",
    "BRATS_MODALITIES",
    "CLINICAL_MODALITIES",
    "validate_modalities",
    "combinations",
    "combination_name",
    "parse_combination",
    "combination_mask",
    "all_combination_masks",
    "mask_to_combination",
    "mask_to_name",
    "full_mask",
    "check_mask",
]


class Keys(StrEnum):
    """Batch keys shared by data, models, engines and evaluation (after MONAI's ``CommonKeys``).

    Each modality additionally lives under its own name (``"flair"``, ``"ehr"``, ...).
    """

    IMAGE = "image"
    """Stacked volume ``[B, M, D, H, W]``, channels in the model's modality order."""
    LABEL = "label"
    MASK = "modality_mask"
    """bool ``[B, M]``, True = present."""
    INDEX = "sample_index"
    """int ``[B]``: stable position of the sample in its dataset (QMF history, OmniFuse TLA)."""
    CASE_ID = "case_id"
    PRED = "pred"
    LOSS = "loss"
    LABEL_CONVENTION = "label_convention"
    BRAIN_MASK = "brain_mask"
    """Foreground (brain) mask ``[B, 1, D, H, W]``: a given mask file, else the non-zero region of the volumes."""
    COMBINATION = "combination"
    GROUP = "group"
    """Group id of a sample (patient): splits keep a group in one part."""
    SPLIT = "split"
    """Split a sample belongs to when the data prescribes it (``train``/``val``/``test``/``meta_val``)."""


BRATS_MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Canonical BraTS modality order used by medfusion models (named, so any source order maps)."""

CLINICAL_MODALITIES: tuple[str, ...] = ("ehr", "cxr", "report")
"""Canonical MIMIC-style modality order."""


def validate_modalities(
    names: Iterable[str], known: Sequence[str] | None = None, *, field: str = "modalities"
) -> tuple[str, ...]:
    """Check a modality tuple: non-empty, unique names, optionally all among ``known``.

    Args:
        names: modality names in the desired order.
        known: allowed names; ``None`` accepts any non-empty string.
        field: name of the config field, used in error messages.

    Returns:
        The names as a tuple.

    Raises:
        ValueError: empty tuple, duplicate or unknown names (the message names the field and the
            allowed values).
    """
    if isinstance(names, str):
        names = [names]
    out = tuple(str(n) for n in names)
    if not out:
        raise ValueError(f"{field}: expected at least one modality name, got none.")
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise ValueError(f"{field}: duplicate modality names {dup} in {list(out)}.")
    bad = [n for n in out if not n or (known is not None and n not in known)]
    if bad:
        allowed = f" expected one of {list(known)}" if known is not None else " expected non-empty names"
        raise ValueError(f"{field}: unknown modality name(s) {bad};{allowed}.")
    return out


def combinations(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All ``2^M - 1`` non-empty subsets, ordered by size then by modality order.

    Args:
        modalities: the model's ordered modality names.

    Returns:
        List of name tuples, e.g. for ``("a", "b")``: ``[("a",), ("b",), ("a", "b")]``.
    """
    mods = validate_modalities(modalities)
    return [c for k in range(1, len(mods) + 1) for c in itertools.combinations(mods, k)]


def combination_name(combo: Iterable[str]) -> str:
    """Readable name of a combination: member names joined by ``+`` (``"flair+t1ce"``)."""
    return "+".join(combo)


def parse_combination(name: str | Sequence[str], modalities: Sequence[str]) -> tuple[str, ...]:
    """Parse ``"t1ce+flair"`` (or a list of names) into a combination in model order.

    Args:
        name: ``+``-joined names, ``"all"``, or a sequence of names.
        modalities: the model's ordered modality names.

    Returns:
        The combination as a tuple ordered like ``modalities``.

    Raises:
        ValueError: empty or unknown names.
    """
    mods = tuple(modalities)
    if isinstance(name, str):
        parts = list(mods) if name.strip() == "all" else [p.strip() for p in name.split("+") if p.strip()]
    else:
        parts = [str(p) for p in name]
    validate_modalities(parts, mods, field=f"combination {name!r}")
    return tuple(m for m in mods if m in parts)


def combination_mask(
    combo: Iterable[str], modalities: Sequence[str], device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool ``[M]`` mask of one combination in model order.

    Raises:
        ValueError: a name of ``combo`` is not in ``modalities``.
    """
    combo = tuple(combo)
    validate_modalities(combo, tuple(modalities), field="combination")
    return torch.tensor([m in combo for m in modalities], dtype=torch.bool, device=device)


def all_combination_masks(modalities: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[2^M - 1, M]``: row ``i`` is the mask of ``combinations(modalities)[i]``."""
    return torch.stack([combination_mask(c, modalities, device) for c in combinations(modalities)])


def mask_to_combination(mask: torch.Tensor | Sequence[bool], modalities: Sequence[str]) -> tuple[str, ...]:
    """Names present in a single ``[M]`` mask, in model order."""
    flags = [bool(v) for v in (mask.tolist() if isinstance(mask, torch.Tensor) else mask)]
    if len(flags) != len(modalities):
        raise ValueError(f"modality_mask: expected {len(modalities)} entries for {list(modalities)}, got {len(flags)}.")
    return tuple(m for m, f in zip(modalities, flags) if f)


def mask_to_name(mask: torch.Tensor | Sequence[bool], modalities: Sequence[str]) -> str:
    """Combination name of a single ``[M]`` mask (``""`` when nothing is present)."""
    return combination_name(mask_to_combination(mask, modalities))


def full_mask(batch_size: int, n_modalities: int, device: torch.device | str | None = None) -> torch.Tensor:
    """All-present bool mask ``[B, M]``."""
    return torch.ones(batch_size, n_modalities, dtype=torch.bool, device=device)


def check_mask(mask: torch.Tensor, n_modalities: int, *, allow_empty_rows: bool = False) -> torch.Tensor:
    """Validate a ``modality_mask`` and return it as bool.

    Args:
        mask: ``[B, M]`` (any dtype convertible to bool).
        n_modalities: expected ``M``.
        allow_empty_rows: accept samples with no modality present.

    Raises:
        ValueError: wrong shape, or a sample with every modality missing.
    """
    if mask.ndim != 2 or mask.shape[1] != n_modalities:
        raise ValueError(f"modality_mask: expected shape [B, {n_modalities}], got {list(mask.shape)}.")
    mask = mask.bool()
    if not allow_empty_rows and not bool(mask.any(dim=1).all()):
        rows = (~mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"modality_mask: samples {rows} have every modality missing; at least one must be present.")
    return mask
