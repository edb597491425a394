"""Generic CSV manifest -> MONAI datalist (any task, any modalities).

One row per sample: an id column, one or more label columns, optionally a group column (patient id)
and a split column, and per modality either

- one column holding a path (image, volume, DICOM file or folder, EHR time series, report file;
  relative paths are resolved against the CSV's folder) or inline text, or
- for a tabular modality, a group of named feature columns (sparse: any cell may be empty).

How a cell is read is decided by the modality's **kind** (:data:`MODALITY_KINDS`), never by probing the file
system with the cell's text:

========  =====================================================================================
kind      cell
========  =====================================================================================
image     path of a 2D image (PNG/JPG/DICOM file)
volume    path of a 3D volume (NIfTI, ``.mha``/``.nrrd``, DICOM series folder)
ehr       path of a mimic3-benchmarks time-series CSV
text      inline text, or the path of a report file when the cell is one line ending in ``.txt``
tabular   a number, a yes/no-like or M/F-like category, or empty (one cell per feature column)
========  =====================================================================================

Missing values: an empty cell (or one of :data:`NA_TOKENS` such as ``NA``) means "not there". A path or text
modality with an empty cell is missing for that row; a tabular modality is missing only when EVERY one of its
features is empty (single empty features become NaN and are imputed by the ``tabular`` encoder, see
``medfusion.encoders.tabular``). A path whose file does not exist is, by default (``missing_files="missing"``),
a missing modality too (summarised per modality in :attr:`Manifest.absent`); ``missing_files="error"`` raises
one error listing every absent file. A dangling symbolic link is always an error. A row with no modality left
is dropped (listed in :attr:`Manifest.dropped`).

Categorical tabular columns: a column whose non-empty values are all in one of :data:`BINARY_CATEGORIES`
(``no``/``yes``, ``n``/``y``, ``false``/``true``, ``F``/``M``, ``female``/``male``, ``negative``/``positive``,
``absent``/``present``; any case) is encoded 0/1 (the first value of the pair is 0). Any other non-numeric
value is an error naming the column and rows.

The layout is :class:`ManifestLayout` (``manifest`` in :mod:`medfusion.data.layout`): a ``.csv`` file that is not
a volume manifest, or a folder holding ``manifest/manifest.csv``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medfusion.data.layout import DatasetLayout, LayoutScan, register_layout
from medfusion.modality import Keys, validate_modalities

__all__ = [
    "ManifestLayout",
    "MANIFEST",
    "MODALITY_KINDS",
    "PATH_KINDS",
    "NA_TOKENS",
    "BINARY_CATEGORIES",
    "MISSING_FILES",
    "Manifest",
    "read_manifest",
    "discover_manifest",
    "guess_kind",
    "looks_like_patient_id",
]

logger = logging.getLogger(__name__)

MODALITY_KINDS: tuple[str, ...] = ("ehr", "image", "volume", "text", "tabular")
"""How a modality's value is read (see the module docstring and :mod:`medfusion.data.clinical`)."""
PATH_KINDS: tuple[str, ...] = ("ehr", "image", "volume")
"""Kinds whose cell is always a path."""
MISSING_FILES: tuple[str, ...] = ("missing", "error")
NA_TOKENS: frozenset[str] = frozenset(
    {"", "na", "n/a", "nan", "-nan", "null", "none", "<na>", "#n/a", "#na", "missing", "?"}
)
"""Cell values (compared lower-case, stripped) that mean "no value" in path and tabular columns."""
BINARY_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("no", "yes"),
    ("n", "y"),
    ("false", "true"),
    ("f", "m"),
    ("female", "male"),
    ("negative", "positive"),
    ("neg", "pos"),
    ("absent", "present"),
)
"""Two-valued categories of tabular columns, encoded ``(0, 1)`` in this order (matched case-insensitively)."""
TEXT_FILE_SUFFIXES: tuple[str, ...] = (".txt",)
"""A ``text`` cell is a report file path when it is one line ending in one of these (case-insensitive)."""

_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nrrd.gz")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
_PATIENT_ID = re.compile(r"(^|[^a-z])(patient|subject|person|mrn|pid|subj)([^a-z]|$)|^(patient|subject)", re.I)
_MAX_LISTED = 5


def looks_like_patient_id(column: str) -> bool:
    """True for column names such as ``patient_id``, ``subject_id``, ``PatientID``, ``mrn``."""
    return bool(_PATIENT_ID.search(column.replace("ID", "_id")))


def _is_na(cell: str) -> bool:
    return cell.strip().lower() in NA_TOKENS


def _listing(ids: Sequence[str], n: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in ids[:n])
    return shown + (f", ... (+{len(ids) - n} more)" if len(ids) > n else "")


def guess_kind(values: Sequence[str]) -> str:
    """Guess a single-column modality's kind from its non-empty values (used only when no kind is given).

    All numeric or one two-valued category (yes/no, M/F, ...) -> ``tabular``; most values ending in a volume
    suffix -> ``volume``, an image/DICOM suffix ->
    ``image``, ``.csv`` -> ``ehr``; anything else -> ``text``. Only the values' text is looked at.
    """
    vals = [v.strip() for v in values if not _is_na(v)]
    if not vals:
        return "text"
    try:
        [float(v) for v in vals]
        return "tabular"
    except ValueError:
        pass
    if any({v.lower() for v in vals} <= set(pair) for pair in BINARY_CATEGORIES):
        return "tabular"
    low = [v.lower() for v in vals if "\n" not in v]
    votes = {
        "volume": sum(v.endswith(_VOLUME_SUFFIXES) for v in low),
        "image": sum(v.endswith(_IMAGE_SUFFIXES) for v in low),
        "ehr": sum(v.endswith(".csv") for v in low),
    }
    best = max(votes, key=lambda k: votes[k])
    return best if votes[best] * 2 > len(vals) else "text"


@dataclass
class Manifest:
    """A parsed manifest.

    Attributes:
        path: the CSV.
        items: the datalist (one dict per kept row, see :func:`read_manifest`).
        columns: ``{modality: column or [columns]}``.
        kinds: ``{modality: kind}`` used to read the cells.
        guessed: modalities whose kind was guessed from the values (no kind given).
        absent: ``{modality: [(row id, path), ...]}`` files that do not exist (treated as missing).
        dropped: ids of rows left out because no modality was present.
        encodings: ``{column: {category: code}}`` of categorical tabular columns.
        notes: ``[(modality, message)]`` for things worth a warning (e.g. inline text that looks like a path).
        n_rows: data rows in the CSV.
        id_column: id column.
        label_columns: label columns.
        group_column: group (patient) column or ``None``.
        split_column: split column or ``None``.
    """

    path: Path
    items: list[dict[str, Any]]
    columns: dict[str, str | list[str]]
    kinds: dict[str, str]
    guessed: list[str] = field(default_factory=list)
    absent: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    encodings: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)
    n_rows: int = 0
    id_column: str = "case_id"
    label_columns: list[str] = field(default_factory=list)
    group_column: str | None = None
    split_column: str | None = None

    def summary_lines(self) -> list[str]:
        """One line per modality with absent files, one for dropped rows (what :func:`read_manifest` logs)."""
        lines = []
        for m, entries in self.absent.items():
            if entries:
                lines.append(
                    f"{m}: {len(entries)} of {self.n_rows} file(s) do not exist; treated as missing "
                    f"(rows {_listing([i for i, _ in entries])})."
                )
        if self.dropped:
            lines.append(
                f"{len(self.dropped)} row(s) have no modality present (empty cells or absent files) and are left "
                f"out: {_listing(self.dropped)}."
            )
        return lines


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"Manifest {path} does not exist.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"Manifest {path}: cannot be read as CSV ({err}).") from err
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise ValueError(
            f"Manifest {path} has a header ({list(df.columns)}) but no data rows; expected one row per sample."
        )
    return df


def _resolve(cell: str, base: Path) -> Path:
    p = Path(cell).expanduser()
    return p if p.is_absolute() else base / p


def _file_state(p: Path) -> str:
    """``"ok"``, ``"absent"``, ``"dangling"`` (a symlink to nothing) or ``"invalid: <reason>"``."""
    try:
        if p.exists():
            return "ok"
        return "dangling" if p.is_symlink() else "absent"
    except OSError as err:  # e.g. "File name too long": the cell is not a path
        return f"invalid: {type(err).__name__}: {err.strerror or err}"


def _text_is_path(cell: str) -> bool:
    return "\n" not in cell and len(cell) < 4096 and cell.lower().endswith(TEXT_FILE_SUFFIXES)


def _tabular_column(
    df: pd.DataFrame, col: str, ids: Sequence[str], path: Path
) -> tuple[list[float], dict[str, float] | None]:
    """Parse one tabular feature column to floats (NaN = empty) and its categorical encoding (or None)."""
    cells = [str(v).strip() for v in df[col].tolist()]
    present = [(i, c) for i, c in enumerate(cells) if not _is_na(c)]
    numeric: list[float | None] = []
    for _, c in present:
        try:
            numeric.append(float(c))
        except ValueError:
            numeric.append(None)
    out = [math.nan] * len(cells)
    if all(v is not None for v in numeric):
        bad = [(ids[i], c) for (i, c), v in zip(present, numeric) if not math.isfinite(v)]  # type: ignore[arg-type]
        if bad:
            raise ValueError(
                f"Manifest {path}: column {col!r} holds non-finite value(s) in row(s) "
                f"{_listing([f'{r!r} ({c!r})' for r, c in bad])}; expected finite numbers or empty cells."
            )
        for (i, _), v in zip(present, numeric):
            out[i] = float(v)  # type: ignore[arg-type]
        return out, None
    values = {c.lower() for _, c in present}
    for pair in BINARY_CATEGORIES:
        if values <= set(pair):
            enc = {pair[0]: 0.0, pair[1]: 1.0}
            for i, c in present:
                out[i] = enc[c.lower()]
            return out, enc
    bad_rows = [f"{ids[i]!r} ({c!r})" for (i, c), v in zip(present, numeric) if v is None]
    raise ValueError(
        f"Manifest {path}: tabular column {col!r} holds non-numeric value(s) in row(s) {_listing(bad_rows)}; "
        f"expected numbers, empty cells, or one two-valued category such as {'/'.join(BINARY_CATEGORIES[0])} or "
        f"{'/'.join(BINARY_CATEGORIES[3])} (found {sorted(values)[:8]})."
    )


def read_manifest(
    csv_path: str | os.PathLike,
    modalities: Mapping[str, str | Sequence[str]] | None = None,
    id_column: str = "case_id",
    label_columns: str | Sequence[str] = ("label",),
    label_values: Sequence[float] | None = None,
    kinds: Mapping[str, str] | None = None,
    missing_files: str = "missing",
    group_column: str | None = None,
    split_column: str | None = None,
    *,
    log: bool = True,
) -> Manifest:
    """Read a CSV manifest into a :class:`Manifest` (datalist + what was absent, dropped, guessed, encoded).

    Args:
        csv_path: the manifest.
        modalities: ordered ``{modality name: column}`` for path/text modalities and
            ``{modality name: [column, ...]}`` for tabular ones, e.g.
            ``{"cxr": "image_path", "note": "note", "vitals": ["heart_rate", "sex", "lactate"]}``.
            ``None``: every column except the id, label, group and split columns and columns that look like
            a patient id (:func:`looks_like_patient_id`) is a single-column modality named after the column.
        id_column: column holding a unique sample id.
        label_columns: one column (label = float) or several (label = list of floats); empty = no
            ``label`` key (unlabelled data).
        label_values: allowed label values (e.g. ``[0, 1]``); ``None`` accepts any finite number.
        kinds: ``{modality: kind}`` (:data:`MODALITY_KINDS`). A modality given as a list of columns is
            ``tabular``; a single-column modality without a kind gets :func:`guess_kind` (reported in
            :attr:`Manifest.guessed`). Pass the bundle's ``modality_kinds``.
        missing_files: ``"missing"`` (an absent file = missing modality) or ``"error"`` (raise, listing all).
        group_column: column of a group id (patient); copied into each item as ``group``.
        split_column: column naming each row's split (``train``/``val``/``test``/``meta_val``); copied as ``split``.
        log: log the guessed kinds, absent files and dropped rows (``False``: the caller reports them from the
            :class:`Manifest`, as ``check-data`` does).

    Returns:
        The :class:`Manifest`. Each item: ``case_id``, ``sample_index``, ``label`` (when label columns are
        given), ``group``/``split`` (when those columns are given), one key per modality (absolute path string,
        inline text, list of floats with NaN for empty features, or ``None`` when missing) and
        ``modality_mask`` (list of bools in modality order).

    Raises:
        FileNotFoundError: the manifest does not exist; with ``missing_files="error"``, absent files (all listed).
        ValueError: header-only manifest, unknown columns or kinds, duplicate/empty ids, empty group/split
            cells, non-numeric labels or labels outside ``label_values`` (all offending rows named),
            non-numeric tabular values that are not a two-valued category, dangling symbolic links, cells
            of a path kind that are not valid paths.
    """
    path = Path(csv_path)
    df = _read_csv(path)
    base = path.parent
    label_cols = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    if missing_files not in MISSING_FILES:
        raise ValueError(f"missing_files must be one of {list(MISSING_FILES)}, got {missing_files!r}.")
    special = [id_column, *label_cols, *(c for c in (group_column, split_column) if c)]
    if modalities is None:  # every other column, except columns that look like a patient id
        modalities = {c: c for c in df.columns if c not in special and not looks_like_patient_id(c)}
    mods = validate_modalities(list(modalities), field=f"manifest {path} modalities")
    spec: dict[str, str | list[str]] = {}
    for m in mods:
        given_cols = modalities[m]
        spec[m] = given_cols if isinstance(given_cols, str) else [str(c) for c in given_cols]
    needed = list(special)
    for cols in spec.values():
        needed.extend([cols] if isinstance(cols, str) else cols)
    unknown = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if unknown:
        raise ValueError(f"Manifest {path}: unknown column(s) {unknown}; the CSV has columns {list(df.columns)}.")
    given = dict(kinds or {})
    bad_kinds = {m: k for m, k in given.items() if m in spec and k not in MODALITY_KINDS}
    if bad_kinds:
        raise ValueError(f"Manifest {path}: unknown modality kind(s) {bad_kinds}; expected one of {MODALITY_KINDS}.")
    resolved: dict[str, str] = {}
    guessed: list[str] = []
    for m, cols in spec.items():
        if not isinstance(cols, str):
            if not cols:
                raise ValueError(f"Manifest {path}: tabular modality {m!r} lists no columns.")
            if given.get(m, "tabular") != "tabular":
                raise ValueError(
                    f"Manifest {path}: modality {m!r} is a group of columns {cols} but its kind is {given[m]!r}; "
                    "a group of columns is a 'tabular' modality."
                )
            resolved[m] = "tabular"
        elif m in given:
            resolved[m] = given[m]
        else:
            resolved[m] = guess_kind([str(v) for v in df[cols].tolist()])
            guessed.append(m)
    if guessed and log:
        logger.info(
            "Manifest %s: no kind given for %s; guessed %s from the values (pass kinds= / --kinds to set them).",
            path,
            guessed,
            {m: resolved[m] for m in guessed},
        )

    ids = [str(v).strip() for v in df[id_column].tolist()]
    empty_ids = [i + 2 for i, v in enumerate(ids) if not v]
    if empty_ids:
        raise ValueError(f"Manifest {path}: empty {id_column!r} on line(s) {empty_ids[:10]}; every row needs an id.")
    counts = pd.Series(ids).value_counts()
    dup = sorted(counts[counts > 1].index.tolist())
    if dup:
        where = [f"{d!r} on lines {[i + 2 for i, v in enumerate(ids) if v == d]}" for d in dup]
        raise ValueError(
            f"Manifest {path}: duplicate {id_column!r} value(s): {_listing(where, 10)}; ids must be unique (two rows "
            "with one id would share one prediction and could land in two splits)."
        )
    for col in (group_column, split_column):
        if col:
            blank = [ids[i] for i, v in enumerate(df[col].tolist()) if not str(v).strip()]
            if blank:
                raise ValueError(f"Manifest {path}: column {col!r} is empty in row(s) {_listing(blank)}.")

    labels = _labels(df, label_cols, ids, path, label_values)
    # tabular modalities: parse column by column (a categorical column is recognised from all its values)
    tab_values: dict[str, list[list[float]]] = {}
    encodings: dict[str, dict[str, float]] = {}
    for m, cols in spec.items():
        if resolved[m] != "tabular":
            continue
        col_list = [cols] if isinstance(cols, str) else cols
        parsed = []
        for c in col_list:
            vals, enc = _tabular_column(df, c, ids, path)
            parsed.append(vals)
            if enc is not None:
                encodings[c] = enc
        tab_values[m] = [list(row) for row in zip(*parsed)]

    absent: dict[str, list[tuple[str, str]]] = {m: [] for m in mods}
    broken: list[str] = []
    notes: list[tuple[str, str]] = []
    items: list[dict[str, Any]] = []
    dropped: list[str] = []
    for i in range(len(df)):
        rid = ids[i]
        item: dict[str, Any] = {Keys.CASE_ID.value: rid, Keys.INDEX.value: len(items)}
        if label_cols:
            item[Keys.LABEL.value] = labels[i]
        if group_column:
            item[Keys.GROUP.value] = str(df[group_column].iat[i]).strip()
        if split_column:
            item[Keys.SPLIT.value] = str(df[split_column].iat[i]).strip()
        for m, cols in spec.items():
            kind = resolved[m]
            if kind == "tabular" or not isinstance(cols, str):  # a column group is always tabular
                row = tab_values[m][i]
                item[m] = None if all(math.isnan(v) for v in row) else row
                continue
            cell = str(df[cols].iat[i]).strip()
            if kind == "text":
                if not cell:
                    item[m] = None
                elif _text_is_path(cell):
                    item[m] = _path_value(m, cols, cell, base, rid, i, absent, broken)
                else:
                    if not any(ch.isspace() for ch in cell) and ("/" in cell or "\\" in cell):
                        notes.append((m, f"row {rid!r}: {cell!r} looks like a file path but does not end in .txt; "
                                         "read as inline text"))  # fmt: skip
                    item[m] = cell
                continue
            item[m] = None if _is_na(cell) else _path_value(m, cols, cell, base, rid, i, absent, broken)
        mask = [item[m] is not None for m in mods]
        if not any(mask):
            dropped.append(rid)
            continue
        item[Keys.MASK.value] = mask
        items.append(item)
    if broken:
        raise ValueError(f"Manifest {path}: {len(broken)} path cell(s) cannot be used:\n  " + "\n  ".join(broken))
    n_absent = sum(len(v) for v in absent.values())
    if missing_files == "error" and n_absent:
        listed = [f"row {rid!r}, column {spec[m]!r}: {p}" for m, v in absent.items() for rid, p in v]
        raise FileNotFoundError(
            f"Manifest {path}: {n_absent} referenced file(s) do not exist (missing_files='error'; relative paths "
            f"are resolved against the manifest's folder; missing_files='missing' treats them as missing "
            "modalities):\n  " + "\n  ".join(listed)
        )
    manifest = Manifest(
        path=path,
        items=items,
        columns=spec,
        kinds=resolved,
        guessed=guessed,
        absent={m: v for m, v in absent.items() if v},
        dropped=dropped,
        encodings=encodings,
        notes=notes,
        n_rows=len(df),
        id_column=id_column,
        label_columns=label_cols,
        group_column=group_column,
        split_column=split_column,
    )
    for line in manifest.summary_lines() if log else ():
        logger.warning("Manifest %s: %s", path, line)
    if not items:
        absent_rows = [
            f"row {rid!r}, column {spec[m]!r}: {p} does not exist" for m, v in absent.items() for rid, p in v
        ]
        detail = (":\n  " + "\n  ".join(absent_rows[:20])) if absent_rows else "."
        raise ValueError(f"Manifest {path}: no row has any modality present ({len(df)} row(s) read){detail}")
    if log:
        logger.info("read_manifest: %d items from %s.", len(items), path)
    return manifest


def _path_value(
    modality: str,
    column: str,
    cell: str,
    base: Path,
    rid: str,
    line: int,
    absent: dict[str, list[tuple[str, str]]],
    broken: list[str],
) -> str | None:
    p = _resolve(cell, base)
    state = _file_state(p)
    if state == "ok":
        return str(p.resolve())
    where = f"row {rid!r} (line {line + 2}), column {column!r}"
    if state == "absent":
        absent[modality].append((rid, str(p)))
    elif state == "dangling":
        broken.append(f"{where}: {p} is a dangling symbolic link (to {os.readlink(p)!r}, which does not exist).")
    else:
        shown = cell if len(cell) <= 80 else cell[:77] + "..."
        broken.append(f"{where}: {shown!r} is not a usable path ({state[9:]}); is this column really a file column?")
    return None


def _labels(
    df: pd.DataFrame, label_cols: Sequence[str], ids: Sequence[str], path: Path, label_values: Sequence[float] | None
) -> list[float | list[float]]:
    allowed = None if label_values is None else {float(v) for v in label_values}
    out: list[float | list[float]] = []
    bad: dict[str, list[str]] = {}
    for i in range(len(df)):
        vals = []
        for c in label_cols:
            cell = str(df[c].iat[i]).strip()
            try:
                v = float(cell)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                bad.setdefault(f"label column {c!r}: expected a finite number", []).append(f"{ids[i]!r} ({cell!r})")
            elif allowed is not None and v not in allowed:
                bad.setdefault(f"label column {c!r}: expected one of {sorted(allowed)} (label_values)", []).append(
                    f"{ids[i]!r} ({cell!r})"
                )
            vals.append(v)
        out.append(vals[0] if len(vals) == 1 else vals)
    if bad:
        lines = [f"{what}; found in {len(rows)} row(s): {_listing(rows, 20)}" for what, rows in bad.items()]
        raise ValueError(f"Manifest {path}: bad labels:\n  " + "\n  ".join(lines))
    return out


def discover_manifest(
    csv_path: str | os.PathLike,
    modalities: Mapping[str, str | Sequence[str]] | None = None,
    id_column: str = "case_id",
    label_columns: str | Sequence[str] = ("label",),
    label_values: Sequence[float] | None = None,
    kinds: Mapping[str, str] | None = None,
    missing_files: str = "missing",
    group_column: str | None = None,
    split_column: str | None = None,
) -> list[dict[str, Any]]:
    """The datalist of :func:`read_manifest` (same arguments): ``read_manifest(...).items``."""
    return read_manifest(
        csv_path, modalities, id_column, label_columns, label_values, kinds, missing_files, group_column, split_column
    ).items


def _group_warnings(man: Manifest) -> list[str]:
    """Repeated ids in patient-id-like columns (without a group column) and groups split across a split column."""
    table = pd.read_csv(man.path, dtype=str, keep_default_na=False, na_filter=False)
    table.columns = [str(c).strip() for c in table.columns]
    used = {man.id_column, *man.label_columns, man.split_column}
    for cols in man.columns.values():
        used.update([cols] if isinstance(cols, str) else cols)
    out = []
    for col in table.columns:
        if col in used or not looks_like_patient_id(col):
            continue
        values = [v.strip() for v in table[col].tolist() if v.strip()]
        counts = pd.Series(values).value_counts()
        repeated = counts[counts > 1]
        if col == man.group_column or repeated.empty:
            continue
        out.append(
            f"column {col!r} looks like a patient id and {len(repeated)} of its {len(counts)} ids repeat (up to "
            f"{int(counts.max())} rows each, e.g. {_listing(list(map(str, repeated.index)), 3)}): a random row split "
            f"puts rows of one patient in train and test; split by patient with group_column {col!r} "
            f"(bundle: --group_column {col})."
        )
    if man.group_column and man.split_column:
        splits: dict[str, set[str]] = {}
        for it in man.items:
            splits.setdefault(str(it[Keys.GROUP]), set()).add(str(it[Keys.SPLIT]))
        leaked = sorted(g for g, sp in splits.items() if len(sp) > 1)
        if leaked:
            out.append(
                f"{len(leaked)} group(s) of column {man.group_column!r} have rows in more than one split of column "
                f"{man.split_column!r} ({_listing(leaked)}); test results on them are optimistic."
            )
    return out


def _manifest_notes(man: Manifest) -> tuple[list[str], list[str]]:
    """Notes (kinds, presence per modality, encodings) and dataset warnings of a read manifest."""
    kinds_text = ", ".join(
        f"{m}={k}" + (f" ({len(c)} columns)" if isinstance(c, list) else f" (column {c!r})")
        for (m, k), c in zip(man.kinds.items(), man.columns.values())
    )
    notes = [f"modality kinds: {kinds_text}"]
    warnings = []
    if man.guessed:
        warnings.append(
            f"no kind given for {man.guessed}; guessed {[man.kinds[m] for m in man.guessed]} from the values (pass "
            "the bundle's modality kinds: --bundle, or --kinds name=kind / --tabular name=col1,col2)."
        )
    present = {m: sum(bool(it[Keys.MASK][j]) for it in man.items) for j, m in enumerate(man.columns)}
    notes.append(
        "present per modality (before reading the files): "
        + ", ".join(f"{m} {n}/{man.n_rows}" for m, n in present.items())
    )
    if man.encodings:
        notes.append(
            "categorical columns encoded: "
            + "; ".join(f"{c}: " + ", ".join(f"{k}={int(v)}" for k, v in e.items()) for c, e in man.encodings.items())
        )
    warnings += man.summary_lines()
    by_mod: dict[str, list[str]] = {}
    for m, msg in man.notes:
        by_mod.setdefault(m, []).append(msg.split(":")[0].replace("row ", ""))
    for m, rows in by_mod.items():
        warnings.append(
            f"{m}: {len(rows)} cell(s) look like file paths but do not end in .txt, so they are read as inline text "
            f"(rows {_listing(rows)})."
        )
    return notes, warnings + _group_warnings(man)


class ManifestLayout(DatasetLayout):
    """A generic CSV manifest (:func:`read_manifest`): a ``.csv``, or a folder holding ``manifest/manifest.csv``."""

    name = "manifest"
    family = "manifest"
    expects = "a .csv manifest (one row per sample), or a folder holding manifest/manifest.csv"
    is_file = True

    def roots(self, path: str | os.PathLike, manifest_csv: str | os.PathLike | None = None) -> dict[str, Path | None]:
        """``{"csv": manifest_csv}``, else ``path`` when it is a ``.csv``, else ``<path>/manifest/manifest.csv``."""
        p = Path(path).expanduser()
        if manifest_csv is not None:
            return {"csv": Path(manifest_csv).expanduser()}
        return {"csv": p if p.suffix.lower() == ".csv" else p / "manifest" / "manifest.csv"}

    def detect(self, path: str | os.PathLike) -> bool:
        """True when :meth:`roots` names an existing CSV that is not a volume manifest."""
        from medfusion.data.volume_manifest import is_volume_manifest  # it imports this module

        csv = self.roots(path)["csv"]
        return csv is not None and csv.is_file() and not is_volume_manifest(csv)

    def discover(
        self,
        path: str | os.PathLike,
        modalities: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None,
        *,
        label_columns: str | Sequence[str] = ("label",),
        manifest_csv: str | os.PathLike | None = None,
        labels_optional: bool = False,
        **read_options: Any,
    ) -> list[dict[str, Any]]:
        """The datalist of :func:`read_manifest` on the dataset's CSV (:meth:`roots`).

        Args:
            path: the CSV, or a folder holding ``manifest/manifest.csv``.
            modalities: ``{name: column or [columns]}``, or names (each its own column), or ``None`` (every column).
            label_columns: label column(s).
            manifest_csv: the CSV, when it is not the default of :meth:`roots`.
            labels_optional: a CSV without the label column(s) is read unlabelled (inference) instead of failing.
            **read_options: the other :func:`read_manifest` arguments (``id_column``, ``kinds``, ``missing_files``,
                ``group_column``, ``split_column``, ``label_values``).
        """
        csv = self.roots(path, manifest_csv)["csv"]
        assert csv is not None
        labels = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        if labels_optional and labels and csv.is_file():
            header = pd.read_csv(csv, nrows=0).columns.str.strip().tolist()
            if any(c not in header for c in labels):
                logger.info("Manifest %s has no label column %s; predicting without labels.", csv, labels)
                labels = []
        return read_manifest(csv, _spec(modalities), label_columns=labels, **read_options).items

    def scan(
        self,
        path: str | os.PathLike,
        modalities: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None,
        *,
        require_label: bool = True,
        label_convention: Any = None,
        label_columns: str | Sequence[str] = ("label",),
        num_classes: int | None = None,
        class_labels: bool | None = None,
        manifest_csv: str | os.PathLike | None = None,
        **read_options: Any,
    ) -> LayoutScan:
        """Read the manifest without logging; a manifest that cannot be parsed is one dataset error.

        ``require_label=False`` reads no label column; ``class_labels`` (default ``require_label``) and
        ``num_classes`` say how the labels are checked (integer class indices); ``read_options`` as in
        :meth:`discover`. Notes: the kinds used, the presence per modality, the categorical encodings; dataset
        warnings: guessed kinds, absent files, dropped rows, text cells that look like paths, repeated patient
        ids, groups in several splits.
        """
        csv = self.roots(path, manifest_csv)["csv"]
        assert csv is not None
        if not csv.is_file():
            raise FileNotFoundError(f"Manifest {csv} does not exist.")
        out = LayoutScan(
            self.name,
            str(csv),
            (),
            same_grid=False,
            label_maps=False,
            class_labels=require_label if class_labels is None else class_labels,
            num_classes=num_classes,
        )
        labels = label_columns if require_label else ()
        try:
            man = read_manifest(csv, _spec(modalities), label_columns=labels, log=False, **read_options)
        except (ValueError, FileNotFoundError) as err:
            out.dataset_errors.append(str(err))
            return out
        out.entries, out.modalities, out.kinds = man.items, tuple(man.columns), dict(man.kinds)
        out.notes, out.dataset_warnings = _manifest_notes(man)
        return out


def _spec(
    modalities: Mapping[str, str | Sequence[str]] | Sequence[str] | None,
) -> Mapping[str, str | Sequence[str]] | None:
    """Modality names (each its own column) as ``{name: name}``; a mapping or ``None`` unchanged."""
    if modalities is None or isinstance(modalities, Mapping):
        return modalities
    return {str(m): str(m) for m in modalities}


MANIFEST = register_layout(ManifestLayout())
