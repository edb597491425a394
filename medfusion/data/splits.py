"""Seeded random splits of any datalist (the generic form of :func:`medfusion.data.brats.brats_case_split`).

Every part is a list of shallow copies whose ``sample_index`` is renumbered ``0..n-1`` inside the part,
because per-sample method state (QMF's loss history, OmniFuse's TLA mining) is indexed by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfusion.modality import Keys

__all__ = ["renumber", "random_split"]


def renumber(datalist: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Shallow copies of ``datalist`` with ``sample_index`` set to ``0..n-1`` in list order."""
    out = [dict(entry) for entry in datalist]
    for j, entry in enumerate(out):
        entry[Keys.INDEX] = j
    return out


def random_split(
    datalist: Sequence[Mapping[str, Any]], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Split a datalist at random into named parts; the rest is ``"train"``.

    Each named part with a positive fraction gets ``round(fraction * n)`` entries but at least one
    (at least one entry always stays in ``train``). Deterministic for a seed; ``sample_index`` is
    renumbered inside each part.

    Args:
        datalist: entries (dicts) of any data layer.
        fractions: ``{part name: fraction}``, e.g. ``{"meta_val": 0.1, "val": 0.1, "test": 0.2}``.
        seed: permutation seed.

    Returns:
        ``{"train": [...], **{name: [...]}}`` (a part with fraction 0 is an empty list).

    Raises:
        ValueError: fractions outside [0, 1) or summing to >= 1, a part named ``train``, or too few entries
            to give every positive part one entry and keep one for training.
    """
    if "train" in fractions:
        raise ValueError("random_split: 'train' is the remainder; do not give it a fraction.")
    if any(not 0 <= float(f) < 1 for f in fractions.values()) or sum(float(f) for f in fractions.values()) >= 1:
        raise ValueError(f"random_split: fractions must be in [0, 1) and sum below 1, got {dict(fractions)}.")
    n = len(datalist)
    wanted = {k: float(f) for k, f in fractions.items() if float(f) > 0}
    if n < len(wanted) + 1:
        raise ValueError(f"random_split: {n} entries cannot fill the parts {['train', *wanted]} (one entry each).")
    order = np.random.default_rng(seed).permutation(n)
    sizes = {k: max(1, round(f * n)) for k, f in wanted.items()}
    while sum(sizes.values()) > n - 1:  # keep one training entry
        biggest = max(sizes, key=lambda k: sizes[k])
        sizes[biggest] -= 1
    out: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for k in fractions:
        size = sizes.get(k, 0)
        out[k] = renumber([datalist[i] for i in order[start : start + size]])
        start += size
    out["train"] = renumber([datalist[i] for i in order[start:]])
    return out
