"""Splits of any datalist: seeded random, by group (patient-level, stratified by label), or from a split column.

:func:`random_split` is the generic form of :func:`medfusion.data.brats.brats_case_split`.

Every part is a list of shallow copies whose ``sample_index`` is renumbered ``0..n-1`` inside the part,
because per-sample method state (QMF's loss history, OmniFuse's TLA mining) is indexed by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfusion.modality import Keys

__all__ = [
    "SPLIT_ALIASES",
    "renumber",
    "random_split",
    "group_split",
    "split_by_column",
    "groups_in_several_parts",
]


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


SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
    "meta_val": "meta_val",
    "metaval": "meta_val",
}
"""Values of a split column and the part they name (compared lower-case)."""


def _group_of(entry: Mapping[str, Any]) -> str:
    return str(entry.get(Keys.GROUP, entry.get(Keys.CASE_ID, id(entry))))


def _stratum(labels: Sequence[Any]) -> Any:
    """Most frequent class of a group's labels (ties: the larger class), or ``None`` when not class indices."""
    vals = []
    for v in labels:
        if isinstance(v, (list, tuple)) or v is None:
            return None
        f = float(v)
        if not np.isfinite(f) or f != round(f):
            return None
        vals.append(int(f))
    counts = {v: vals.count(v) for v in set(vals)}
    return max(counts, key=lambda v: (counts[v], v))


def group_split(
    datalist: Sequence[Mapping[str, Any]],
    fractions: Mapping[str, float],
    seed: int = 0,
    stratify: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Split by group (``group`` key, e.g. patient; default each entry its own group), stratified by label.

    No group lands in two parts. Within each label stratum (a group's most frequent class) the groups are
    shuffled with ``seed`` and laid end to end by row count; a group goes to the part whose share of the
    stratum's rows covers the group's midpoint (named parts in the order given, then ``train``). So every part
    gets about ``fraction`` of the rows AND of each class, as far as the group sizes allow. When a class has more
    groups than there are parts, every part gets at least one group of it (so validation AUROC is defined), the
    smallest group of the part holding most of them moving. A named part with a positive fraction that ends up
    empty takes the smallest group from ``train`` (train keeps at least one).

    scikit-learn's ``StratifiedGroupKFold`` / ``GroupShuffleSplit`` give k equal folds or one unstratified
    split, not several named parts of given fractions, hence this function.

    Args:
        datalist: entries; ``group`` (optional) and ``label`` (optional) keys are read.
        fractions: ``{part name: fraction}``; the rest is ``"train"``.
        seed: shuffling seed.
        stratify: stratify by label (ignored when the labels are not class indices).

    Returns:
        ``{"train": [...], **{name: [...]}}`` with ``sample_index`` renumbered inside each part.

    Raises:
        ValueError: bad fractions (as :func:`random_split`) or fewer groups than non-empty parts.
    """
    if "train" in fractions:
        raise ValueError("group_split: 'train' is the remainder; do not give it a fraction.")
    if any(not 0 <= float(f) < 1 for f in fractions.values()) or sum(float(f) for f in fractions.values()) >= 1:
        raise ValueError(f"group_split: fractions must be in [0, 1) and sum below 1, got {dict(fractions)}.")
    groups: dict[str, list[int]] = {}
    for i, entry in enumerate(datalist):
        groups.setdefault(_group_of(entry), []).append(i)
    wanted = [k for k, f in fractions.items() if float(f) > 0]
    if len(groups) < len(wanted) + 1:
        raise ValueError(
            f"group_split: {len(groups)} group(s) cannot fill the parts {['train', *wanted]} (one group each)."
        )
    strata: dict[Any, list[str]] = {}
    for g, idx in groups.items():
        key = _stratum([datalist[i].get(Keys.LABEL) for i in idx]) if stratify else None
        strata.setdefault(key, []).append(g)
    rng = np.random.default_rng(seed)
    names = [*fractions, "train"]
    bounds = np.cumsum([float(fractions[k]) for k in fractions] + [1.0])
    assign: dict[str, str] = {}
    for key in sorted(strata, key=lambda k: (k is None, k)):
        members = sorted(strata[key])
        members = [members[j] for j in rng.permutation(len(members))]
        total = sum(len(groups[g]) for g in members)
        done = 0
        for g in members:
            mid = (done + len(groups[g]) / 2) / total
            assign[g] = names[int(np.searchsorted(bounds, mid, side="right"))] if mid < 1 else "train"
            done += len(groups[g])
        if key is not None and len(members) > len(wanted):  # every part gets this class when the class allows it
            for k in wanted:
                if any(assign[g] == k for g in members):
                    continue
                holders = [p for p in names if sum(assign[g] == p for g in members) > 1]
                donor = max(holders, key=lambda p: sum(assign[g] == p for g in members))
                assign[min((g for g in members if assign[g] == donor), key=lambda g: (len(groups[g]), g))] = k
    for k in wanted:  # every named part gets at least one group
        if not any(p == k for p in assign.values()):
            train_groups = sorted((g for g, p in assign.items() if p == "train"), key=lambda g: (len(groups[g]), g))
            if len(train_groups) > 1:
                assign[train_groups[0]] = k
    out: dict[str, list[dict[str, Any]]] = {}
    for k in names:
        out[k] = renumber([datalist[i] for g, p in assign.items() if p == k for i in groups[g]])
    return out


def split_by_column(
    datalist: Sequence[Mapping[str, Any]], required: Sequence[str] = ("train", "val", "test")
) -> dict[str, list[dict[str, Any]]]:
    """Parts given by each entry's ``split`` value (see :data:`SPLIT_ALIASES`).

    Returns:
        ``{"train", "val", "test", "meta_val"}`` lists (renumbered); ``meta_val`` may be empty.

    Raises:
        ValueError: an unknown split value (names the rows) or an empty required part.
    """
    parts: dict[str, list[Mapping[str, Any]]] = {"train": [], "meta_val": [], "val": [], "test": []}
    bad: list[str] = []
    for entry in datalist:
        value = str(entry.get(Keys.SPLIT, "")).strip()
        part = SPLIT_ALIASES.get(value.lower())
        if part is None:
            bad.append(f"{entry.get(Keys.CASE_ID, '?')!r} ({value!r})")
        else:
            parts[part].append(entry)
    if bad:
        raise ValueError(
            f"split column: unknown split value(s) in row(s) {', '.join(bad[:10])}"
            f"{' ...' if len(bad) > 10 else ''}; expected one of {sorted(SPLIT_ALIASES)}."
        )
    empty = [k for k in required if not parts[k]]
    if empty:
        raise ValueError(f"split column: no row is in split(s) {empty}; every one of {list(required)} needs rows.")
    return {k: renumber(v) for k, v in parts.items()}


def groups_in_several_parts(parts: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[str]]:
    """``{group: [parts]}`` for every group (``group`` key) found in more than one part."""
    seen: dict[str, list[str]] = {}
    for name, part in parts.items():
        for entry in part:
            if Keys.GROUP in entry:
                where = seen.setdefault(str(entry[Keys.GROUP]), [])
                if name not in where:
                    where.append(name)
    return {g: p for g, p in seen.items() if len(p) > 1}
