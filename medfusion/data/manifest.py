"""Generic CSV manifest -> MONAI datalist (any task, any modalities).

One row per sample: an id column, one or more label columns, and per modality either

- one column holding a path (image, volume, DICOM file or folder, text file; relative paths are
  resolved against the CSV's folder) or inline text, or
- for a tabular modality, a group of named numeric feature columns.

An empty cell (all cells of a tabular group) means that modality is missing for that row.

A cell is read as a path when the resolved path exists, or when it is a single token (no
whitespace) that ends in a file suffix (``.nii.gz``, ``.png``, ``.txt``, ...) or contains a ``/``;
such a path must exist. Any other cell is inline text (e.g. a report).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medfusion.modality import validate_modalities

__all__ = ["discover_manifest"]

logger = logging.getLogger(__name__)

_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,5}(\.gz)?$")


def _as_path_candidate(cell: str, base: Path) -> Path | None:
    """Return the resolved path when ``cell`` should be read as a path, else ``None`` (inline text)."""
    if "\n" in cell or len(cell) > 4096:
        return None
    p = Path(cell).expanduser()
    if not p.is_absolute():
        p = base / p
    try:
        if p.exists():
            return p
    except OSError:
        return None
    single_token = not any(ch.isspace() for ch in cell)
    if single_token and (_SUFFIX.search(cell) or "/" in cell or "\\" in cell):
        return p
    return None


def discover_manifest(
    csv_path: str | os.PathLike,
    modalities: Mapping[str, str | Sequence[str]] | None = None,
    id_column: str = "case_id",
    label_columns: Sequence[str] = ("label",),
    label_values: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Read a CSV manifest into a datalist.

    Args:
        csv_path: the manifest.
        modalities: ordered ``{modality name: column}`` for path/text modalities and
            ``{modality name: [column, ...]}`` for tabular ones, e.g.
            ``{"pet": "pet", "ct": "ct", "report": "report", "labs": ["lab_0", "lab_1"]}``.
            ``None``: every column except the id and label columns is a single-column modality
            named after the column.
        id_column: column holding a unique sample id.
        label_columns: one column (label = float) or several (label = list of floats); empty = no
            ``label`` key (unlabelled data).
        label_values: allowed label values (e.g. ``[0, 1]``); ``None`` accepts any finite number.

    Returns:
        One dict per row: ``case_id``, ``sample_index``, ``label`` (when label columns are given), one
        key per modality (absolute path string, inline text, list of floats, or ``None`` when missing)
        and ``modality_mask`` (list of bools in modality order).

    Raises:
        FileNotFoundError: the manifest, or a path a row refers to (names row id, column and path).
        ValueError: unknown columns, duplicate/empty ids, rows with every modality empty, partially
            empty or non-numeric tabular groups, non-numeric labels or labels outside ``label_values``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {path} does not exist.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"Manifest {path}: cannot be read as CSV ({err}).") from err
    df.columns = [str(c).strip() for c in df.columns]
    base = path.parent
    label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    if modalities is None:
        modalities = {c: c for c in df.columns if c != id_column and c not in label_columns}
    mods = validate_modalities(list(modalities), field=f"manifest {path} modalities")
    spec: dict[str, str | list[str]] = {
        m: (modalities[m] if isinstance(modalities[m], str) else list(modalities[m]))  # type: ignore[arg-type]
        for m in mods
    }
    needed = [id_column, *label_columns]
    for cols in spec.values():
        needed.extend([cols] if isinstance(cols, str) else cols)
    unknown = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if unknown:
        raise ValueError(f"Manifest {path}: unknown column(s) {unknown}; the CSV has columns {list(df.columns)}.")
    for m, cols in spec.items():
        if not isinstance(cols, str) and not cols:
            raise ValueError(f"Manifest {path}: tabular modality {m!r} lists no columns.")

    ids = [str(v).strip() for v in df[id_column].tolist()]
    empty_ids = [i + 2 for i, v in enumerate(ids) if not v]
    if empty_ids:
        raise ValueError(f"Manifest {path}: empty {id_column!r} on line(s) {empty_ids[:10]}; every row needs an id.")
    dup = sorted({v for v in ids if ids.count(v) > 1})
    if dup:
        raise ValueError(f"Manifest {path}: duplicate {id_column!r} value(s) {dup[:10]}; ids must be unique.")
    allowed = None if label_values is None else {float(v) for v in label_values}

    items: list[dict[str, Any]] = []
    for i, (_, row) in enumerate(df.iterrows()):
        rid = ids[i]
        where = f"Manifest {path}, row {rid!r} (line {i + 2})"
        item: dict[str, Any] = {"case_id": rid, "sample_index": i}
        if label_columns:
            labels = []
            for c in label_columns:
                cell = str(row[c]).strip()
                try:
                    v = float(cell)
                except ValueError:
                    raise ValueError(f"{where}: label column {c!r} holds {cell!r}; expected a number.") from None
                if not math.isfinite(v):
                    raise ValueError(f"{where}: label column {c!r} holds {cell!r}; expected a finite number.")
                if allowed is not None and v not in allowed:
                    raise ValueError(
                        f"{where}: label value {cell!r} in column {c!r} is not one of {sorted(allowed)} (label_values)."
                    )
                labels.append(v)
            item["label"] = labels[0] if len(labels) == 1 else labels
        for m, cols in spec.items():
            if isinstance(cols, str):
                cell = str(row[cols]).strip()
                if not cell:
                    item[m] = None
                    continue
                p = _as_path_candidate(cell, base)
                if p is None:
                    item[m] = cell
                elif not p.exists():
                    raise FileNotFoundError(
                        f"{where}: column {cols!r} refers to {p}, which does not exist "
                        "(relative paths are resolved against the manifest's folder)."
                    )
                else:
                    item[m] = str(p.resolve())
            else:
                cells = [str(row[c]).strip() for c in cols]
                empty = [c for c, v in zip(cols, cells) if not v]
                if len(empty) == len(cols):
                    item[m] = None
                    continue
                if empty:
                    raise ValueError(
                        f"{where}: tabular modality {m!r} is partially empty (columns {empty}); "
                        "fill every column or leave all of them empty (missing modality)."
                    )
                values = []
                for c, v in zip(cols, cells):
                    try:
                        x = float(v)
                    except ValueError:
                        raise ValueError(f"{where}: column {c!r} holds {v!r}; expected a number.") from None
                    if not math.isfinite(x):
                        raise ValueError(f"{where}: column {c!r} holds {v!r}; expected a finite number.")
                    values.append(x)
                item[m] = values
        mask = [item[m] is not None for m in mods]
        if not any(mask):
            raise ValueError(f"{where}: every modality {list(mods)} is empty; at least one must be present.")
        item["modality_mask"] = mask
        items.append(item)
    logger.info("discover_manifest: %d items from %s.", len(items), path)
    return items
