"""Volume manifest: a CSV listing each case's volume files, for exports not named like any BraTS release.

One row per case, columns (``case_id`` and at least one modality column required)::

    case_id,flair,t1,t1ce,t2,label,brain_mask,label_convention
    pat0001,pat0001/Flair_subtrMeanDivStd.nii.gz,,pat0001/T1c_subtrMeanDivStd.nii.gz,,pat0001/OTMultiClass.nii.gz,pat0001/brainmask.nii.gz,brats2015

- ``flair``, ``t1``, ``t1ce``, ``t2``: one volume file each (``.nii.gz``/``.nii``); an empty cell or
  an absent column = that modality is missing for the case (marked in ``modality_mask``).
- ``label``: the ground truth (optional; empty = unlabelled case).
- ``brain_mask``: optional foreground mask (voxels > 0 are brain). Give it when the background of the
  volumes is not 0 (z-scored exports): intensity normalisation and the negative training crops then
  use it instead of the non-zero region (:mod:`medfusion.data.volume`).
- ``label_convention``: optional per-row convention (a name of :data:`medfusion.data.labels.CONVENTIONS`
  or a ``"TC=..;WT=..;ET=.."`` spec); a ``label_convention`` given to the reader (the bundle config)
  applies to every row instead; default ``brats``.

Relative paths are resolved against the CSV's folder. Every cell is a path (never inline text).
The entries have the keys of :func:`medfusion.data.brats.discover_brats` entries plus ``brain_mask``,
so the same transforms, checks and bundle configs read both.

The layout is :class:`VolumeManifestLayout` (``volume_manifest``, registered in :mod:`medfusion.data.layout`).

Why not :func:`medfusion.data.manifest.discover_manifest`: there a cell may be inline text and the
label is a number; here every cell is a file, the label is a label map with a convention, and rows
are checked the way a BraTS case folder is (so ``check-data`` can report each row on its own).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medfusion.data.brats import VolumeLayout
from medfusion.data.layout import LayoutScan, register_layout
from medfusion.data.manifest import _read_csv
from medfusion.modality import BRATS_MODALITIES, Keys, validate_modalities

__all__ = [
    "VOLUME_MANIFEST_COLUMNS",
    "MISSING_FILES",
    "BRAIN_MASK",
    "is_volume_manifest",
    "read_volume_manifest",
    "read_volume_rows",
    "VolumeManifestLayout",
    "VOLUME_MANIFEST",
]

logger = logging.getLogger(__name__)

BRAIN_MASK = str(Keys.BRAIN_MASK)
"""Datalist key (and manifest column) of the optional brain/foreground mask."""
VOLUME_MANIFEST_COLUMNS: tuple[str, ...] = (
    str(Keys.CASE_ID),
    *BRATS_MODALITIES,
    str(Keys.LABEL),
    BRAIN_MASK,
    str(Keys.LABEL_CONVENTION),
)
MISSING_FILES = ("missing", "error")


def _head(path: Path, rows: int = 20) -> pd.DataFrame | None:
    try:
        df = pd.read_csv(path, nrows=rows, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        return None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def is_volume_manifest(path: str | os.PathLike) -> bool:
    """True for a ``.csv`` laid out as a volume manifest.

    Its columns are ``case_id``, at least one BraTS modality and only volume-manifest columns, and the
    ``label`` cells of its first rows are empty or NIfTI paths. Anything else (another column, a numeric
    ``label`` as in a classification manifest) is a generic manifest (:mod:`medfusion.data.manifest`).
    """
    p = Path(path)
    if p.suffix.lower() != ".csv" or not p.is_file():
        return False
    df = _head(p)
    if df is None:
        return False
    cols = list(df.columns)
    if not (str(Keys.CASE_ID) in cols and any(m in cols for m in BRATS_MODALITIES)):
        return False
    if not set(cols) <= set(VOLUME_MANIFEST_COLUMNS):
        return False
    labels = [str(v).strip().lower() for v in df.get(str(Keys.LABEL), [])]
    return all(not v or v.endswith((".nii", ".nii.gz")) for v in labels)


def read_volume_rows(
    csv_path: str | os.PathLike,
    modalities: Sequence[str] = BRATS_MODALITIES,
    label_convention: Any = None,
    missing_files: str = "missing",
) -> tuple[list[dict[str, Any]], dict[str, list[str]], dict[str, list[str]]]:
    """Parse a volume manifest row by row, collecting every problem instead of stopping at the first.

    Args:
        csv_path: the manifest.
        modalities: modality columns to read, in the model's order (subset of flair, t1, t1ce, t2).
        label_convention: convention for every row (name, mapping or spec; see
            :func:`medfusion.data.labels.get_convention`); ``None``: the ``label_convention`` column, else ``brats``.
        missing_files: a modality file that does not exist is a missing modality (``"missing"``, a warning)
            or an error (``"error"``). A missing label or brain-mask file, and a dangling symbolic link in any
            column, are always errors.

    Returns:
        ``(entries, errors, warnings)``: the entries of rows without errors (in file order,
        ``sample_index`` = position among them), and ``{case_id: [message, ...]}`` for errors and warnings.

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: unreadable or header-only CSV, no ``case_id`` column, no modality column, unknown columns,
            an invalid ``label_convention`` argument or ``missing_files`` value (problems of the file as a whole).
    """
    from medfusion.data.labels import convention_key

    mods = validate_modalities(modalities, BRATS_MODALITIES)
    if missing_files not in MISSING_FILES:
        raise ValueError(f"missing_files must be one of {list(MISSING_FILES)}, got {missing_files!r}.")
    path = Path(csv_path).expanduser()
    df = _read_csv(path)  # the generic manifest's reader: all cells as strings, header-only is an error
    unknown = [c for c in df.columns if c not in VOLUME_MANIFEST_COLUMNS]
    if unknown or str(Keys.CASE_ID) not in df.columns or not any(m in df.columns for m in BRATS_MODALITIES):
        raise ValueError(
            f"Volume manifest {path}: columns {list(df.columns)}; expected case_id, at least one of "
            f"{list(BRATS_MODALITIES)}, and optionally label, brain_mask, label_convention"
            + (f" (unknown: {unknown})" if unknown else "")
            + "."
        )
    fixed = convention_key(label_convention) if label_convention is not None else None
    absent = [m for m in mods if m not in df.columns]
    if absent:
        logger.info("volume manifest %s has no column for %s: missing in every case.", path, absent)
    base = path.parent
    errors: dict[str, list[str]] = {}
    warnings: dict[str, list[str]] = {}
    entries: list[dict[str, Any]] = []
    first_line: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(df.to_dict("records")):
        line = i + 2
        case = str(row[str(Keys.CASE_ID)]).strip()
        if not case:
            errors.setdefault(f"<line {line}>", []).append(f"{path} line {line}: empty case_id.")
            continue
        errs, warns = errors.setdefault(case, []), warnings.setdefault(case, [])

        def resolve(column: str, row: dict[str, Any] = row) -> Path | None:
            cell = str(row.get(column, "")).strip()
            if not cell:
                return None
            p = Path(cell).expanduser()
            return p if p.is_absolute() else base / p

        where = f"line {line}"
        entry: dict[str, Any] = {Keys.CASE_ID: case}
        present = []
        for m in mods:
            p = resolve(m)
            if p is not None and p.is_symlink() and not p.exists():
                errs.append(f"{m} file {p} ({where}) is a dangling symbolic link (to {os.readlink(p)!r}).")
                p = None
            elif p is not None and not p.is_file():
                msg = f"{m} file {p} ({where}) does not exist"
                if missing_files == "error":
                    errs.append(msg + ".")
                else:
                    warns.append(msg + "; treated as missing.")
                p = None
            entry[m] = str(p) if p is not None else None
            present.append(p is not None)
        for column, key in ((str(Keys.LABEL), Keys.LABEL), (BRAIN_MASK, BRAIN_MASK)):
            p = resolve(column)
            if p is not None and p.is_symlink() and not p.exists():
                errs.append(f"{column} file {p} ({where}) is a dangling symbolic link (to {os.readlink(p)!r}).")
            elif p is not None and not p.is_file():
                errs.append(f"{column} file {p} ({where}) does not exist.")
            entry[key] = str(p) if p is not None else None
        conv = fixed or str(row.get(str(Keys.LABEL_CONVENTION), "")).strip() or "brats"
        try:
            entry[Keys.LABEL_CONVENTION] = convention_key(conv)
        except ValueError as err:
            errs.append(f"{where}: {err}")
        if not any(present) and not errs:
            errs.append(f"{where}: none of the modalities {list(mods)} is given (or its file exists).")
        files = [entry[k] for k in (*mods, Keys.LABEL) if entry.get(k)]
        if case in first_line:
            prev_line, prev_file = first_line[case]
            errs.append(
                f"duplicate case_id {case!r}: line {prev_line} ({prev_file}) and line {line} "
                f"({files[0] if files else 'no file'}); case ids must be unique."
            )
        else:
            first_line[case] = (line, files[0] if files else "no file")
        entry["source"] = "volume_manifest"
        entry[Keys.MASK] = present
        if not errs:
            entries.append(entry)
    for i, entry in enumerate(entries):
        entry[Keys.INDEX] = i
    return entries, {k: v for k, v in errors.items() if v}, {k: v for k, v in warnings.items() if v}


def read_volume_manifest(
    csv_path: str | os.PathLike,
    modalities: Sequence[str] = BRATS_MODALITIES,
    require_label: bool = False,
    label_convention: Any = None,
    missing_files: str = "missing",
) -> list[dict[str, Any]]:
    """Read a volume manifest into a datalist (the entries of :func:`medfusion.data.brats.discover_brats`).

    Args:
        csv_path: the manifest.
        modalities: modality columns to read, in the model's order.
        require_label: every row needs a label file.
        label_convention: convention for every row (see :func:`read_volume_rows`).
        missing_files: ``"missing"`` (default) or ``"error"`` for modality files that do not exist.

    Returns:
        Entries with ``case_id``, one path or ``None`` per modality, ``label``, ``brain_mask``,
        ``label_convention`` (a key of :func:`medfusion.data.labels.get_convention`), ``source``
        (``"volume_manifest"``), ``modality_mask``, ``sample_index``.

    Raises:
        ValueError: any row problem (all of them are listed, each naming the case, the line and the file).
        FileNotFoundError: the manifest does not exist.
    """
    entries, errors, warnings = read_volume_rows(csv_path, modalities, label_convention, missing_files)
    if require_label:
        for e in entries:
            if e[Keys.LABEL] is None:
                errors.setdefault(str(e[Keys.CASE_ID]), []).append("no label file, but this run needs one.")
    if errors:
        lines = [f"case {c}: {m}" for c, msgs in errors.items() for m in msgs]
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        raise ValueError(f"Volume manifest {csv_path}: {len(lines)} problem(s):\n  " + "\n  ".join(lines[:20]) + more)
    for m in modalities:
        cases = [c for c, msgs in warnings.items() for w in msgs if w.startswith(f"{m} file ")]
        if cases:
            logger.warning(
                "volume manifest %s: %d %s file(s) do not exist (cases %s%s); treated as missing.",
                csv_path, len(cases), m, ", ".join(cases[:5]), ", ..." if len(cases) > 5 else "",
            )  # fmt: skip
    logger.info("read_volume_manifest: %d cases from %s.", len(entries), csv_path)
    return entries


class VolumeManifestLayout(VolumeLayout):
    """A volume manifest CSV (:func:`is_volume_manifest`); read like a BraTS folder (``brats`` family)."""

    name = "volume_manifest"
    expects = (
        "a .csv with columns case_id, at least one of flair/t1/t1ce/t2 and optionally label (NIfTI paths), "
        "brain_mask, label_convention"
    )
    is_file = True

    def detect(self, path: str | os.PathLike) -> bool:
        """True for a ``.csv`` laid out as a volume manifest (:func:`is_volume_manifest`)."""
        return is_volume_manifest(Path(path).expanduser())

    def _discover(
        self, path: Path, mods: tuple[str, ...], require_label: bool, allow_missing: bool, label_convention: Any
    ) -> list[dict[str, Any]]:
        """The datalist of :func:`read_volume_manifest` (an absent modality file is an error unless allowed)."""
        return read_volume_manifest(
            path, mods, require_label, label_convention, "missing" if allow_missing else "error"
        )

    def _scan(self, path: Path, mods: tuple[str, ...], label_convention: str | None) -> LayoutScan:
        """Every row on its own (:func:`read_volume_rows`): row problems are that case's errors and warnings."""
        out = LayoutScan(self.name, str(path), mods)
        try:
            out.entries, out.case_errors, out.case_warnings = read_volume_rows(path, mods, label_convention)
        except ValueError as err:
            out.dataset_errors.append(str(err))
        return out


VOLUME_MANIFEST = register_layout(VolumeManifestLayout())
