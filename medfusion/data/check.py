"""Check a dataset before training: every file readable, shapes/grids consistent, labels and values valid.

``medfusion check-data PATH`` and :func:`validate_before_training` (called in a bundle's ``initialize``
list) use the checkers here so bad data fails with one readable report BEFORE a long training run
starts, instead of in a DataLoader worker hours later.

Per case (BraTS / MSD, MIMIC-style, CSV manifest):

- every referenced file exists and is readable; NIfTI volumes are read completely (a truncated
  ``.nii.gz`` only fails when its data is decompressed) and must hold finite values;
- volumes are 3D (a case stored as 2D slices is an error naming the file); an all-zero volume is a
  warning; a volume whose background is not 0 (z-scored export) without a brain mask is a warning;
- volumes of one BraTS case share shape and grid (affine: spacing, orientation, origin); the message
  names the files and prints both grids; a given brain mask shares them too and is not empty;
- labels hold only the values of the case's convention (:data:`medfusion.data.labels.CONVENTIONS`);
  the message names the file and the bad values;
- EHR time series parse with :func:`medfusion.data.ehr.discretize_ehr` (numeric, finite, known
  categories, increasing hours);
- CXR images decode (JPG/PNG via PIL, DICOM via pydicom; a DICOM without pixel data is an error);
- reports decode as UTF-8; an empty report is a warning (it is treated as a missing modality);
- at least one modality is present per sample; an absent modality file is a warning (the case is
  used with that modality marked missing).

Errors make :attr:`CheckReport.ok` False; warnings do not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfusion.data.layout import LAYOUT_FAMILIES, LayoutScan, NoLayoutError, detect_layout, get_layout, resolve_layout
from medfusion.modality import BRATS_MODALITIES, CLINICAL_MODALITIES, Keys, validate_modalities

__all__ = [
    "CaseCheck",
    "CheckReport",
    "check_brats",
    "check_clinical",
    "check_manifest",
    "check_datalist",
    "check_path",
    "check_scan",
    "detect_check_layout",
    "validate_before_training",
    "CHECK_LAYOUTS",
]

logger = logging.getLogger(__name__)

CHECK_LAYOUTS: tuple[str, ...] = ("auto", *LAYOUT_FAMILIES)
"""``check-data --layout`` values: ``auto`` or a layout family (:data:`medfusion.data.layout.LAYOUT_FAMILIES`)."""
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_RESERVED = {
    str(Keys.CASE_ID),
    str(Keys.LABEL),
    str(Keys.LABEL_CONVENTION),
    str(Keys.MASK),
    str(Keys.INDEX),
    str(Keys.BRAIN_MASK),
    "source",
    "image_4d",
    "image_4d_channels",
    str(Keys.GROUP),
    str(Keys.SPLIT),
}


@dataclass
class CaseCheck:
    """Result for one case (sample).

    Attributes:
        case_id: the case id (MIMIC: ``<split>/<stay>``; manifest: the row id).
        errors: problems that make the case unusable.
        warnings: problems the pipeline tolerates (e.g. a missing modality, an empty report).
        groups: ``{warning: group}``: warnings with the same group are summarised in one line by
            :meth:`CheckReport.to_text` (``details=False``); a warning without a group is its own group.
    """

    case_id: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)

    def warn(self, message: str, group: str | None = None) -> None:
        """Add a warning; ``group`` is the case-independent text it is summarised under."""
        self.warnings.append(message)
        if group is not None:
            self.groups[message] = group

    @property
    def status(self) -> str:
        """``"error"``, ``"warning"`` or ``"ok"``."""
        return "error" if self.errors else ("warning" if self.warnings else "ok")

    @property
    def problems(self) -> list[str]:
        """Errors then warnings, each prefixed with its severity."""
        return [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]


def _id_list(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f", ... (+{len(ids) - n} more)" if len(ids) > n else "")


@dataclass
class CheckReport:
    """Per-case result of a dataset check.

    Attributes:
        layout: ``"brats"``, ``"msd"``, ``"mimic"``, ``"manifest"`` or ``"datalist"``.
        root: the checked path (or ``"<datalist>"``).
        cases: one :class:`CaseCheck` per case, in discovery order.
        dataset_errors: problems not tied to one case (discovery failed, no cases found, ...).
        dataset_warnings: dataset-level warnings (absent files per modality, repeated patient ids, ...).
        notes: information lines (modality kinds used, presence per modality).
    """

    layout: str
    root: str
    cases: list[CaseCheck] = field(default_factory=list)
    dataset_errors: list[str] = field(default_factory=list)
    dataset_warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings are allowed)."""
        return not self.dataset_errors and not any(c.errors for c in self.cases)

    @property
    def n_errors(self) -> int:
        """Number of error messages (dataset-level + per case)."""
        return len(self.dataset_errors) + sum(len(c.errors) for c in self.cases)

    @property
    def n_warnings(self) -> int:
        """Number of warning messages (dataset-level + per case)."""
        return len(self.dataset_warnings) + sum(len(c.warnings) for c in self.cases)

    def failing(self) -> list[CaseCheck]:
        """Cases with at least one error."""
        return [c for c in self.cases if c.errors]

    def summary(self) -> str:
        """One line: layout, root, counts of ok / warning / error cases."""
        counts = {s: sum(c.status == s for c in self.cases) for s in ("ok", "warning", "error")}
        extra = f", {len(self.dataset_errors)} dataset error(s)" if self.dataset_errors else ""
        extra += f", {len(self.dataset_warnings)} dataset warning(s)" if self.dataset_warnings else ""
        return (
            f"{self.layout} dataset {self.root}: {len(self.cases)} case(s): {counts['ok']} ok, "
            f"{counts['warning']} with warnings, {counts['error']} with errors{extra}"
        )

    def grouped_warnings(self, max_ids: int = 5) -> list[str]:
        """Per-case warnings summarised: one line per group with the number of cases and the first ids.

        A group with a single case is shown as that case's own message (``"<case>: <warning>"``).
        """
        groups: dict[str, list[tuple[str, str]]] = {}
        for c in self.cases:
            for w in c.warnings:
                members = groups.setdefault(c.groups.get(w, w), [])
                if not members or members[-1][0] != c.case_id:
                    members.append((c.case_id, w))
        out = []
        for g, members in groups.items():
            if len(members) == 1:
                out.append(f"{members[0][0]}: {members[0][1]}")
            else:
                out.append(f"{g} [{len(members)} case(s): {_id_list([i for i, _ in members], max_ids)}]")
        return out

    def to_text(self, show_ok: bool = True, details: bool = True) -> str:
        """Human-readable report, then the summary line.

        Args:
            show_ok: with ``details``, also list the clean cases.
            details: one line per problem and case; ``False``: errors per case, but warnings summarised
                per group (modality and kind of problem) with their case count and first ids.
        """
        lines = [f"NOTE     {n}" for n in self.notes]
        lines += [f"DATASET ERROR  {e}" for e in self.dataset_errors]
        lines += [f"WARNING  {w}" for w in self.dataset_warnings]
        if details:
            for c in self.cases:
                if not c.errors and not c.warnings:
                    if show_ok:
                        lines.append(f"ok       {c.case_id}")
                    continue
                lines += [f"ERROR    {c.case_id}: {e}" for e in c.errors]
                lines += [f"WARNING  {c.case_id}: {w}" for w in c.warnings]
        else:
            lines += [f"ERROR    {c.case_id}: {e}" for c in self.cases for e in c.errors]
            lines += [f"WARNING  {g}" for g in self.grouped_warnings()]
        lines.append(("OK: " if self.ok else "FAILED: ") + self.summary())
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: ``case_id``, ``status``, ``problems`` (``"; "``-joined), ``n_errors``, ``n_warnings``."""
        rows = [
            {"case_id": "<dataset>", "status": "error", "problems": e, "n_errors": 1, "n_warnings": 0}
            for e in self.dataset_errors
        ]
        rows += [
            {"case_id": "<dataset>", "status": "warning", "problems": w, "n_errors": 0, "n_warnings": 1}
            for w in self.dataset_warnings
        ]
        rows += [
            {
                "case_id": c.case_id,
                "status": c.status,
                "problems": "; ".join(c.problems),
                "n_errors": len(c.errors),
                "n_warnings": len(c.warnings),
            }
            for c in self.cases
        ]
        return pd.DataFrame(rows, columns=["case_id", "status", "problems", "n_errors", "n_warnings"])


# ------------------------------------------------------------------------------------------- readers
def _err(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


def _suffix(path: str) -> str:
    low = path.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


@dataclass
class _Volume:
    path: str
    shape: tuple[int, ...]
    affine: np.ndarray | None
    data: np.ndarray | None = None
    all_zero: bool = False
    background: float | None = None  # the border value when the background is not 0 (z-scored export)


def _read_nifti(path: str, what: str, keep: bool = False) -> _Volume:
    """Read a NIfTI header AND data (a truncated gzip only fails on decompression); raise ValueError naming it."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises ImageFileError, EOFError, OSError, ... for broken headers
        raise ValueError(f"{what} file {path} is not a readable NIfTI ({_err(err)}).") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):  # e.g. a CIFTI file: no voxel grid
        raise ValueError(f"{what} file {path} is a {type(img).__name__}, not a volume with a voxel grid.")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated .nii.gz: EOFError / zlib.error / OSError on decompression
        raise ValueError(
            f"{what} file {path}: header OK but the data cannot be read ({_err(err)}); truncated?"
        ) from None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise ValueError(f"{what} file {path} holds {n_bad} NaN/inf voxel(s); expected finite intensities.")
    from medfusion.data.volume import nonzero_background

    return _Volume(
        path,
        tuple(int(s) for s in data.shape),
        np.asarray(img.affine),
        data if keep else None,
        all_zero=not np.any(data),
        background=nonzero_background(data),
    )


def _require_3d(vol: _Volume, what: str) -> None:
    """A BraTS-style volume must be 3D: ``[X, Y, Z]`` (or ``[X, Y, Z, 1]``) with no single-slice axis."""
    shape = vol.shape[:3] if len(vol.shape) == 4 and vol.shape[3] == 1 else vol.shape
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(
            f"{what} file {vol.path} has shape {vol.shape}; expected a 3D volume (a case stored as 2D slices "
            "cannot be segmented in 3D)."
        )


def _volume_warnings(vol: _Volume, what: str, brain_mask: bool | None) -> list[str]:
    """Warnings about a volume's values: all zero; background not 0 while no brain mask is given.

    ``brain_mask``: whether the case gives a brain mask; ``None`` skips the background check (volumes of a
    generic manifest, e.g. CT whose background is -1000 HU).
    """
    if vol.all_zero:
        return [f"{what} file {vol.path} holds only zeros (an empty volume); check the export."]
    if vol.background is not None and brain_mask is False:
        return [
            f"{what} file {vol.path}: the background is not 0 (border value {vol.background:.4g}; z-scored?) and no "
            "brain mask is given, so normalisation and crops would treat the whole volume as brain; give the mask "
            "in a volume manifest's brain_mask column."
        ]
    return []


def _read_other_volume(path: str, what: str) -> _Volume:
    from monai.transforms import LoadImage

    try:
        arr = LoadImage(image_only=True)(path)
    except Exception as err:  # ITK/pydicom readers raise many types
        raise ValueError(f"{what} {path} cannot be read as a volume ({_err(err)}).") from None
    if not np.isfinite(np.asarray(arr, dtype=np.float64)).all():
        raise ValueError(f"{what} {path} holds NaN/inf values; expected finite intensities.")
    return _Volume(path, tuple(int(s) for s in arr.shape), None)


def _check_dicom(path: str, what: str) -> None:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # InvalidDicomError, EOFError, ...
        raise ValueError(f"{what} file {path} is not a readable DICOM ({_err(err)}).") from None
    if "PixelData" not in ds:
        kind = getattr(ds, "Modality", None) or getattr(ds, "SOPClassUID", "?")
        raise ValueError(f"{what} file {path} is a DICOM without pixel data (Modality/SOP class {kind}); not an image.")
    try:
        arr = ds.pixel_array
    except Exception as err:  # missing decoder, inconsistent Rows/Columns/BitsAllocated, ...
        raise ValueError(f"{what} file {path}: DICOM pixel data cannot be decoded ({_err(err)}).") from None
    if arr.ndim < 2 or min(arr.shape[:2]) < 1:
        raise ValueError(f"{what} file {path}: DICOM pixel data has shape {arr.shape}; expected a 2D image.")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1 or arr.ndim > (3 if samples > 1 else 2):
        raise ValueError(
            f"{what} file {path} is a 3D DICOM ({frames} frame(s), pixel data shape {list(arr.shape)}); modality "
            f"{what!r} is a 2D image (kind 'image'): give one 2D frame, or declare the modality as kind 'volume'."
        )


def _check_image(path: str, what: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as err:  # UnidentifiedImageError, OSError (truncated), ...
        raise ValueError(f"{what} file {path} cannot be decoded as an image ({_err(err)}).") from None
    if min(size) < 1:
        raise ValueError(f"{what} file {path} has size {size}; expected a non-empty image.")


def _check_ehr(path: str, what: str) -> str | None:
    """Parse an EHR time series; return a warning when it holds no measurement in the first 48 h."""
    from medfusion.data.ehr import EHR_CHANNELS, discretize_ehr, read_ehr_csv

    steps = discretize_ehr(read_ehr_csv(path), source=path)
    if not steps[:, -len(EHR_CHANNELS) :].any():
        return f"{what} time series {path} has no measurement in the first 48 h; treated as missing."
    return None


def _check_report(value: str, what: str) -> str | None:
    """Return a warning when the report is empty; raise on absent or undecodable files."""
    from medfusion.data.text import _looks_like_path, load_report

    if load_report(value, extract=False) is None:
        if _looks_like_path(value):
            return f"{what} file {value} is empty; treated as missing."
        return f"{what}: empty report (inline text); treated as missing."
    return None


def _check_image_file(path: str, what: str) -> None:
    """A 2D image as the ``image`` kind loads it: PIL for PNG/JPG, pydicom for DICOM, else MONAI ``LoadImage``."""
    suffix = _suffix(path)
    if suffix in _IMAGE_SUFFIXES:
        _check_image(path, what)
        return
    if suffix in _DICOM_SUFFIXES:
        _check_dicom(path, what)
        return
    from monai.transforms import LoadImage

    try:
        arr = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as err:  # readers raise many types for unreadable/unsupported files
        raise ValueError(f"{what} file {path} cannot be read as an image ({_err(err)}).") from None
    if arr.ndim - 1 != 2:
        raise ValueError(
            f"{what} file {path} holds a {arr.ndim - 1}D array (shape {list(arr.shape[1:])}); modality {what!r} "
            "is a 2D image (kind 'image'): give a 2D PNG/JPG/DICOM file, or declare the modality as kind 'volume'."
        )


def _guess_kind(modality: str, value: Any) -> str:
    """Kind of a value when no kind is given (BraTS/MIMIC datalists): by type and file suffix."""
    if isinstance(value, (list, tuple)):
        return "tabular"
    s = str(value)
    if modality == "ehr" or s.lower().endswith(".csv"):
        return "ehr"
    suffix = _suffix(s)
    if suffix in _VOLUME_SUFFIXES:
        return "volume"
    if suffix in _DICOM_SUFFIXES or suffix in _IMAGE_SUFFIXES:
        return "image"
    try:  # a DICOM series folder; only single-line values of path length reach the file system
        if "\n" not in s and len(s) < 4096 and Path(s).is_dir():
            return "volume"
    except OSError:
        pass
    return "text"


def _missing_warning(m: str, kind: str) -> tuple[str, str]:
    """Message (and group) for a modality whose value is absent, worded by kind."""
    if kind == "text":
        msg = f"{m}: empty report; treated as missing."
    elif kind == "tabular":
        msg = f"{m}: every feature is empty; treated as missing."
    else:
        msg = f"no {m} file; treated as missing."
    return msg, msg


def _check_label_value(label: Any, num_classes: int | None) -> str | None:
    """Error text when ``label`` is not a class index in ``[0, num_classes)`` (any count when None)."""
    values = list(label) if isinstance(label, (list, tuple)) else [label]
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        upper = f" < {num_classes}" if num_classes is not None else ""
        if not np.isfinite(f) or f != round(f) or f < 0 or (num_classes is not None and f >= num_classes):
            where = f"[0, {num_classes}) (num_classes {num_classes})" if num_classes is not None else ">= 0"
            return f"label {v!r} is not a class index {where}; expected an integer 0 <= label{upper}."
    return None


# ------------------------------------------------------------------------------------------ per case
def _check_path_exists(path: str, what: str) -> None:
    p = Path(path)
    if p.exists():
        return
    if p.is_symlink():
        raise FileNotFoundError(f"{what} file {path} is a dangling symbolic link (to {os.readlink(p)!r}).")
    raise FileNotFoundError(f"{what} file {path} does not exist.")


def _check_value(m: str, kind: str, value: Any) -> _Volume | str | None:
    """Read one present value as its kind is loaded; return a volume (grid checks), a warning, or None.

    Raises:
        ValueError / FileNotFoundError / OSError: the value cannot be used (the message names the file).
    """
    if kind == "tabular":
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim != 1 or np.isinf(arr).any():
            raise ValueError(f"{m} values {list(value)} must be a flat list of numbers (NaN = not measured).")
        if np.isnan(arr).all():
            return f"{m}: every feature is empty; treated as missing."
        return None
    if kind == "text":
        return _check_report(str(value), m)
    path = str(value)
    _check_path_exists(path, m)
    if kind == "ehr":
        return _check_ehr(path, m)
    if kind == "image":
        if Path(path).is_dir():
            raise ValueError(f"{m} path {path} is a folder; modality {m!r} is a 2D image (kind 'image'): give a file.")
        _check_image_file(path, m)
        return None
    if Path(path).is_dir():
        vol = _read_other_volume(path, f"{m} DICOM series")
    elif _suffix(path) in (".nii", ".nii.gz"):
        vol = _read_nifti(path, m)
    else:
        vol = _read_other_volume(path, m)
    _require_3d(vol, m)  # before it becomes a case's reference grid: one error, not a cascade
    return vol


def _warning_group(m: str, kind: str, warning: str) -> str:
    if "empty" in warning and kind == "text":
        return f"{m}: empty report; treated as missing."
    if kind == "ehr" and "no measurement" in warning:
        return f"{m}: time series without any measurement in the first 48 h; treated as missing."
    return warning


def _check_entry(
    entry: Mapping[str, Any],
    modalities: Sequence[str],
    require_label: bool,
    check_labels: bool,
    same_grid: bool,
    kinds: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    class_labels: bool = False,
) -> CaseCheck:
    case = str(entry.get(Keys.CASE_ID, entry.get(Keys.INDEX, "?")))
    res = CaseCheck(case)
    vols: dict[str, _Volume] = {}
    present: list[str] = []
    given_mask = entry.get(Keys.MASK)
    brain_mask = entry.get(Keys.BRAIN_MASK)
    if "image_4d" in entry:  # MSD 4D file, channels named by dataset.json
        path = str(entry["image_4d"])
        channels = [str(c) for c in entry.get("image_4d_channels", [])]
        try:
            vol = _read_nifti(path, "4D image")
            res.warnings += _volume_warnings(vol, "4D image", brain_mask is not None if same_grid else None)
            n = vol.shape[3] if len(vol.shape) == 4 else 1
            if n != len(channels):
                res.errors.append(f"4D image {path} has {n} channel(s); dataset.json names {len(channels)} {channels}.")
            vols["image"] = _Volume(path, vol.shape[:3], vol.affine)
            present += [m for m in modalities if m in channels]
        except ValueError as err:
            res.errors.append(str(err))
        for m in modalities:
            if m not in channels:
                res.warnings.append(f"no {m} channel in {path}; treated as missing.")
    for i, m in enumerate(modalities):
        if "image_4d" in entry:
            break
        if m not in entry:
            res.errors.append(f"datalist entry has no key {m!r} (a missing modality must be given as None).")
            continue
        value = entry[m]
        kind = (kinds or {}).get(m) or (_guess_kind(m, value) if value is not None else "volume")
        if value is None or (isinstance(value, str) and not value.strip()):
            res.warn(*_missing_warning(m, kind))
            continue
        if given_mask is not None and i < len(given_mask) and not bool(given_mask[i]):
            continue
        try:
            result = _check_value(m, kind, value)
        except (ValueError, FileNotFoundError, OSError, TypeError) as err:
            res.errors.append(str(err))
            continue
        if isinstance(result, _Volume):
            vols[m] = result
            res.warnings += _volume_warnings(result, m, brain_mask is not None if same_grid else None)
        elif result:
            res.warn(result, _warning_group(m, kind, result))
            continue
        present.append(m)
    if not present and not res.errors:
        res.errors.append(f"none of the modalities {list(modalities)} is present; at least one is needed.")
    if same_grid and len(vols) > 1:
        _compare_grids(vols, res)
    if brain_mask is not None:
        _check_brain_mask(str(brain_mask), vols, res)
    label = entry.get(Keys.LABEL)
    conv_name = entry.get(Keys.LABEL_CONVENTION)
    if conv_name is None and label is not None and not isinstance(label, str) and (class_labels or num_classes):
        bad = _check_label_value(label, num_classes)
        if bad:
            res.errors.append(bad)
    if conv_name is not None and (label is None or isinstance(label, str)):
        if label is None:
            if require_label:
                res.errors.append("no label file, but training/evaluation needs one.")
        elif not Path(label).is_file():
            res.errors.append(f"label file {label} does not exist.")
        else:
            _check_label(str(label), str(conv_name), vols, res, check_labels)
    return res


def _reference(vols: Mapping[str, _Volume]) -> str:
    """Name of a volume with the most common shape (so the odd one out is the one named)."""
    shapes = [v.shape for v in vols.values()]
    common = max(shapes, key=shapes.count)
    return next(m for m, v in vols.items() if v.shape == common)


def _grid(affine: np.ndarray) -> str:
    import nibabel as nib

    spacing = tuple(round(float(x), 4) for x in np.linalg.norm(affine[:3, :3], axis=0))
    axcodes = "".join(nib.aff2axcodes(affine))
    return f"spacing {spacing}, origin {affine[:3, 3].round(3).tolist()}, orientation {axcodes}"


def _grid_difference(a: np.ndarray, b: np.ndarray) -> str:
    """What differs between two affines: spacing, orientation, origin, or (only) the direction cosines."""
    import nibabel as nib

    parts = []
    if not np.allclose(np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(b[:3, :3], axis=0), atol=1e-3):
        parts.append("spacing")
    if nib.aff2axcodes(a) != nib.aff2axcodes(b):
        parts.append("orientation")
    if not np.allclose(a[:3, 3], b[:3, 3], atol=1e-3):
        parts.append("origin")
    return ", ".join(parts) or "direction cosines"


def _grid_mismatch(what_a: str, a: _Volume, what_b: str, b: _Volume) -> str | None:
    """A message naming both files and printing both grids when their affines differ, else ``None``."""
    if a.affine is None or b.affine is None or np.allclose(a.affine, b.affine, atol=1e-3):
        return None
    return (
        f"grid mismatch (different {_grid_difference(a.affine, b.affine)}): {what_a} {a.path} ({_grid(a.affine)}) "
        f"vs {what_b} {b.path} ({_grid(b.affine)}); affines must match (resample to one grid)."
    )


def _compare_grids(vols: Mapping[str, _Volume], res: CaseCheck) -> None:
    if len({v.shape for v in vols.values()}) > 1:
        detail = "; ".join(f"{m} {v.path} {v.shape}" for m, v in vols.items())
        res.errors.append(f"volumes differ in shape ({detail}); all modalities of a case must be co-registered.")
        return
    names = list(vols)
    for m in names[1:]:
        msg = _grid_mismatch(names[0], vols[names[0]], m, vols[m])
        if msg:
            res.errors.append(msg)


def _check_brain_mask(path: str, vols: Mapping[str, _Volume], res: CaseCheck) -> None:
    if not Path(path).is_file():
        res.errors.append(f"brain mask file {path} does not exist.")
        return
    try:
        mask = _read_nifti(path, "brain mask")
        _require_3d(mask, "brain mask")
    except ValueError as err:
        res.errors.append(str(err))
        return
    if mask.all_zero:
        res.errors.append(f"brain mask {path} holds no voxel > 0; expected the brain (foreground) voxels.")
    ref_name = _reference(vols) if vols else None
    if ref_name is None:
        return
    ref = vols[ref_name]
    if mask.shape[:3] != ref.shape[:3]:
        res.errors.append(f"brain mask {path} has shape {mask.shape}, {ref_name} {ref.path} has {ref.shape}.")
        return
    msg = _grid_mismatch("brain mask", mask, ref_name, ref)
    if msg:
        res.errors.append(msg)


def _check_label(path: str, conv_name: str, vols: Mapping[str, _Volume], res: CaseCheck, check_values: bool) -> None:
    from medfusion.data.labels import CONVENTIONS, get_convention  # lazy: imports MONAI

    try:
        conv = get_convention(conv_name)
    except ValueError as err:
        res.errors.append(f"label {path}: {err}")
        return
    try:
        lab = _read_nifti(path, "label", keep=True)
        _require_3d(lab, "label")
    except ValueError as err:
        res.errors.append(str(err))
        return
    ref_name = _reference(vols) if vols else None
    ref = vols[ref_name] if ref_name is not None else None
    if ref is not None and lab.shape[:3] != ref.shape[:3]:
        res.errors.append(f"label {path} has shape {lab.shape}, image {ref.path} has {ref.shape}.")
    elif ref is not None:
        msg = _grid_mismatch("label", lab, str(ref_name), ref)
        if msg:
            res.errors.append(msg)
    if not check_values:
        return
    data = lab.data
    assert data is not None
    allowed = conv.values
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        res.errors.append(f"label {path} holds non-integer values; convention {conv.name!r} expects {list(allowed)}.")
        return
    found = np.unique(data).astype(np.int64).tolist()
    bad = sorted(set(found) - set(allowed))
    if bad:
        fits = [n for n, c in CONVENTIONS.items() if set(found) <= set(c.values) and n != conv.name]
        hint = f"; the values fit {fits}" if fits else ""
        res.errors.append(
            f"label {path} holds value(s) {bad} (found {found}); convention {conv.name!r} expects {list(allowed)}"
            f"{hint} (set label_convention to the dataset's convention: a name or 'TC=..;WT=..;ET=..')."
        )


def check_datalist(
    datalist: Sequence[Mapping[str, Any]],
    modalities: Sequence[str] | None = None,
    require_label: bool = True,
    check_labels: bool = True,
    same_grid: bool = True,
    layout: str = "datalist",
    root: str = "<datalist>",
    num_workers: int | None = None,
    progress: bool = True,
    kinds: Mapping[str, str] | None = None,
    num_classes: int | None = None,
    class_labels: bool = False,
) -> CheckReport:
    """Check every entry of a MONAI datalist (from any medfusion discovery function).

    Args:
        datalist: entries with ``case_id``, one key per modality (path, inline text, list of floats or
            ``None``), optionally ``label`` + ``label_convention`` (BraTS) and ``modality_mask``.
        modalities: modality keys to check; ``None`` = every non-reserved key of the first entry.
        require_label: an entry with a ``label_convention`` but no label file is an error.
        check_labels: read label maps and check their values against the convention.
        same_grid: volumes of one entry must share shape and affine (BraTS); False for manifests
            whose volumes are resampled independently.
        layout: layout name shown in the report.
        root: path shown in the report.
        num_workers: threads (``None``: ``min(4, cpu_count)``; 0 or 1: plain loop).
        progress: show a tqdm progress bar (only on a terminal).
        kinds: ``{modality: kind}`` (:data:`medfusion.data.manifest.MODALITY_KINDS`): each value is read as
            that kind is loaded (a 3D file in an ``image`` modality is an error). A modality without a kind is
            read by its value's type and file suffix.
        num_classes: labels (numbers, not label files) must be integer class indices in ``[0, num_classes)``.
        class_labels: labels must be integer class indices ``>= 0`` (implied by ``num_classes``).

    Returns:
        The :class:`CheckReport`.
    """
    from tqdm.auto import tqdm

    if modalities is None:
        first = datalist[0] if datalist else {}
        modalities = [str(k) for k in first if str(k) not in _RESERVED]
    mods = validate_modalities(modalities) if modalities else ()
    report = CheckReport(layout, root)

    def one(entry: Mapping[str, Any]) -> CaseCheck:
        return _check_entry(entry, mods, require_label, check_labels, same_grid, kinds, num_classes, class_labels)

    workers = min(4, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    bar = tqdm(total=len(datalist), desc=f"check {layout}", unit="case", disable=not progress or None, leave=False)
    try:
        if workers > 1 and len(datalist) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for res in pool.map(one, datalist):
                    report.cases.append(res)
                    bar.update()
        else:
            for entry in datalist:
                report.cases.append(one(entry))
                bar.update()
    finally:
        bar.close()
    return report


# --------------------------------------------------------------------------------------------- layouts
def check_scan(
    scan: LayoutScan,
    require_label: bool = True,
    check_labels: bool = True,
    num_workers: int | None = None,
    progress: bool = True,
) -> CheckReport:
    """Check the entries a layout found (:meth:`medfusion.data.layout.DatasetLayout.scan`) and add its problems.

    The problems found while discovering a case come first in that case's lists; a case that could not be
    discovered is reported with those problems only.

    Args:
        scan: what the layout found.
        require_label: a segmentation case (label maps) without a label file is an error.
        check_labels: read label maps and check their values against the case's convention.
        num_workers: threads (see :func:`check_datalist`).
        progress: show a progress bar on a terminal.

    Returns:
        The :class:`CheckReport` (``layout``: the layout's name).
    """
    report = check_datalist(
        scan.entries,
        scan.modalities,
        require_label and scan.label_maps,
        check_labels and scan.label_maps,
        scan.same_grid,
        scan.layout,
        scan.root,
        num_workers,
        progress,
        kinds=scan.kinds,
        num_classes=scan.num_classes,
        class_labels=scan.class_labels,
    )
    report.notes = list(scan.notes)
    report.dataset_errors = list(scan.dataset_errors)
    report.dataset_warnings = list(scan.dataset_warnings)
    by_case: dict[str, CaseCheck] = {}
    for c in report.cases:
        by_case.setdefault(c.case_id, c)
    for case in dict.fromkeys([*scan.case_errors, *scan.case_warnings]):
        res = by_case.get(case)
        if res is None:
            res = by_case[case] = CaseCheck(case)
            report.cases.append(res)
        res.errors[:0] = scan.case_errors.get(case, [])
        res.warnings[:0] = scan.case_warnings.get(case, [])
    if scan.sort_cases:
        report.cases.sort(key=lambda c: c.case_id)
    return report


def check_brats(
    dataset_dir: str | os.PathLike,
    modalities: Sequence[str] = BRATS_MODALITIES,
    require_label: bool = True,
    check_labels: bool = True,
    num_workers: int | None = None,
    progress: bool = True,
    label_convention: Any = None,
) -> CheckReport:
    """Check a BraTS (2018-2023) or MSD Task01 dataset folder, or a volume manifest CSV.

    The layout is the member of the ``brats`` family that recognises the path
    (:func:`medfusion.data.layout.resolve_layout`). Each case folder (manifest row) is discovered separately,
    so a case with no modality file is reported as that case's error instead of aborting the whole check. Two
    case folders with the same name are a dataset error naming both.

    Args:
        dataset_dir: folder as accepted by :func:`medfusion.data.brats.discover_brats`, or a volume
            manifest (:mod:`medfusion.data.volume_manifest`).
        modalities: names to check (subset of flair, t1, t1ce, t2).
        require_label: a case without a label file is an error.
        check_labels: read each label map and check its values against the case's convention.
        num_workers: threads (see :func:`check_datalist`).
        progress: show a progress bar on a terminal.
        label_convention: the dataset's convention for every case (name, mapping or spec; see
            :mod:`medfusion.data.labels`); ``None``: the layout's own (manifest: its column, else ``brats``).

    Returns:
        The :class:`CheckReport` (``layout`` ``"brats"``, ``"msd"`` or ``"volume_manifest"``).

    Raises:
        ValueError: unknown modality names or label convention (a usage error, not a data problem).
        FileNotFoundError: ``dataset_dir`` does not exist.
    """
    path = Path(dataset_dir).expanduser()
    scan = resolve_layout(path, "brats").scan(path, modalities, label_convention=label_convention)
    return check_scan(scan, require_label, check_labels, num_workers, progress)


def check_clinical(
    ehr_root: str | os.PathLike,
    cxr_root: str | os.PathLike | None = None,
    reports_root: str | os.PathLike | None = None,
    modalities: Sequence[str] = CLINICAL_MODALITIES,
    task: str = "in-hospital-mortality",
    splits: Sequence[str] = ("train", "val", "test"),
    num_workers: int | None = None,
    progress: bool = True,
    **discover_kwargs: Any,
) -> CheckReport:
    """Check a MIMIC-style tree (EHR time series, CXR images, reports) split by split.

    Args:
        ehr_root: mimic3-benchmarks root, or a dataset folder holding ``ehr/``, ``cxr/``, ``reports/``
            (as ``medfusion synth clinical`` writes); see :meth:`medfusion.data.mimic.MimicLayout.roots`.
        cxr_root: MIMIC-CXR root (default: ``<dataset>/cxr`` when it exists).
        reports_root: reports root (default: ``<dataset>/reports``, else ``cxr_root``).
        modalities: subset of ``("ehr", "cxr", "report")``; cxr/report are skipped when there is no CXR root.
        task: mimic3-benchmarks task folder.
        splits: splits to check (a split whose listfile is absent is a dataset error).
        num_workers: threads (see :func:`check_datalist`).
        progress: show a progress bar on a terminal.
        **discover_kwargs: passed to :func:`medfusion.data.mimic.discover_mimic` (``window_hours``, ``views``).

    Returns:
        The :class:`CheckReport` (``layout`` ``"mimic"``; case ids ``<split>/<stay>``).

    Raises:
        ValueError: unknown modality names.
        FileNotFoundError: ``ehr_root`` does not exist.
    """
    scan = get_layout("mimic").scan(
        ehr_root,
        modalities,
        cxr_root=cxr_root,
        reports_root=reports_root,
        task=task,
        splits=splits,
        **discover_kwargs,
    )
    return check_scan(scan, False, False, num_workers, progress)


def check_manifest(
    csv: str | os.PathLike,
    modalities: Mapping[str, str | Sequence[str]] | Sequence[str] | None = None,
    id_column: str = "case_id",
    label_columns: str | Sequence[str] = ("label",),
    label_values: Sequence[float] | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    kinds: Mapping[str, str] | None = None,
    missing_files: str = "missing",
    group_column: str | None = None,
    split_column: str | None = None,
    num_classes: int | None = None,
    class_labels: bool = False,
) -> CheckReport:
    """Check a CSV manifest and every file it refers to, reading each value as its modality kind.

    Args:
        csv: the manifest.
        modalities: as :func:`medfusion.data.manifest.read_manifest` (``{name: column or [columns]}``), or a
            list of column names (each a modality named after its column), or ``None`` (every column except
            id, labels, group and split).
        id_column: id column.
        label_columns: label columns (values must be finite numbers).
        label_values: allowed label values.
        num_workers: threads (see :func:`check_datalist`).
        progress: show a progress bar on a terminal.
        kinds: ``{modality: kind}`` (the bundle's ``modality_kinds``); modalities without one get a kind guessed
            from their values, reported as a warning.
        missing_files: ``"missing"`` (absent files are summarised per modality as a warning) or ``"error"``.
        group_column: patient (group) column of the split; without it, a column that looks like a patient id
            and repeats is a warning.
        split_column: split column (a group in two splits is a warning).
        num_classes: labels must be integer class indices in ``[0, num_classes)``.
        class_labels: labels must be integer class indices ``>= 0``.

    Returns:
        The :class:`CheckReport` (``layout`` ``"manifest"``): notes (kinds, presence per modality), dataset
        warnings (absent files per modality, dropped rows, repeated patient ids), per-row results. A manifest that
        cannot be parsed gives one dataset error naming the rows.

    Raises:
        FileNotFoundError: the manifest does not exist.
    """
    scan = get_layout("manifest").scan(
        csv,
        modalities,
        id_column=id_column,
        label_columns=label_columns,
        label_values=label_values,
        kinds=kinds,
        missing_files=missing_files,
        group_column=group_column,
        split_column=split_column,
        num_classes=num_classes,
        class_labels=class_labels,
    )
    return check_scan(scan, False, False, num_workers, progress)


def detect_check_layout(path: str | os.PathLike) -> str:
    """The ``check-data --layout`` name (layout family) of a dataset path for :func:`check_path`.

    Returns:
        ``"brats"`` for a BraTS or MSD folder or a volume manifest, ``"mimic"`` for a folder holding ``ehr/``
        (or a mimic3-benchmarks root holding ``root/all_stays.csv``), ``"manifest"`` for any other ``.csv``
        file (or a folder holding ``manifest/manifest.csv``); see :func:`medfusion.data.layout.detect_layout`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        medfusion.data.layout.NoLayoutError: no layout recognises ``path`` (the message names the layouts tried).
    """
    return detect_layout(path).family


def check_path(
    path: str | os.PathLike,
    layout: str = "auto",
    modalities: Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    require_label: bool = True,
    check_labels: bool = True,
    num_workers: int | None = None,
    progress: bool = True,
    label_convention: Any = None,
    **manifest_kwargs: Any,
) -> CheckReport:
    """Check a dataset given by path with the layout that reads it (:func:`medfusion.data.layout.resolve_layout`).

    Args:
        path: BraTS/MSD folder, volume manifest, MIMIC-style dataset folder or CSV manifest.
        layout: one of :data:`CHECK_LAYOUTS` (``"auto"``: the layout that recognises ``path``; when none does,
            the report holds one dataset error naming the layouts tried).
        modalities: modality names (default per layout: BraTS four, MIMIC ``ehr, cxr, report``, manifest:
            every non-id, non-label column); for a manifest also ``{name: column or [columns]}``.
        require_label: BraTS: every case needs a label; manifest: read ``label_columns`` (default ``label``)
            and check they hold integer class indices.
        check_labels: BraTS: check label values (``False``: skip reading labels' values).
        num_workers: threads.
        progress: progress bar on a terminal.
        label_convention: BraTS / volume manifest: the dataset's label convention (see :func:`check_brats`).
        **manifest_kwargs: for a CSV manifest, :func:`check_manifest` arguments (``kinds``, ``id_column``,
            ``label_columns``, ``group_column``, ``split_column``, ``missing_files``, ``num_classes``); ignored
            for other layouts.

    Raises:
        ValueError: unknown layout or modality names.
        FileNotFoundError: ``path`` does not exist.
    """
    if layout not in CHECK_LAYOUTS:
        raise ValueError(f"layout must be one of {list(CHECK_LAYOUTS)}, got {layout!r}.")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist.")
    try:
        lay = resolve_layout(p, layout)
    except NoLayoutError as err:
        return CheckReport("unknown", str(path), dataset_errors=[str(err)])
    manifest = lay.family == "manifest"
    mods = modalities if manifest or modalities is None else list(modalities)
    options = manifest_kwargs if manifest else {}
    scan = lay.scan(p, mods, require_label=require_label, label_convention=label_convention, **options)
    return check_scan(scan, require_label and check_labels, check_labels, num_workers, progress)


def validate_before_training(
    datalist_or_dir: str | os.PathLike | Sequence[Mapping[str, Any]],
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    require_label: bool = True,
    check_labels: bool = True,
    max_problems: int = 10,
    num_workers: int | None = None,
    label_convention: Any = None,
    kinds: Mapping[str, str] | None = None,
    num_classes: int | None = None,
) -> CheckReport:
    """Check a dataset and raise ONE error summarising the failing cases (for a bundle's ``initialize``).

    Args:
        datalist_or_dir: a dataset path (see :func:`check_path`) or a datalist (see :func:`check_datalist`).
        layout: layout of a path (ignored for a datalist).
        modalities: modality names.
        require_label: every (BraTS) case needs a label.
        check_labels: check label values.
        max_problems: how many problems the error message quotes.
        num_workers: threads.
        label_convention: BraTS / volume manifest path: the dataset's label convention (see :func:`check_brats`).
        kinds: ``{modality: kind}``: read each value as the bundle will (see :func:`check_datalist`).
        num_classes: labels must be integer class indices in ``[0, num_classes)`` (classification bundles).

    Returns:
        The report when there are no errors (warnings are logged, one line per kind of warning).

    Raises:
        ValueError: the data has errors; the message gives the counts and the first ``max_problems``
            problems, each naming the case and the file/field.
    """
    if isinstance(datalist_or_dir, (str, os.PathLike)):
        extra: dict[str, Any] = {"kinds": kinds, "num_classes": num_classes} if kinds or num_classes else {}
        report = check_path(
            datalist_or_dir,
            layout,
            modalities,
            require_label,
            check_labels,
            num_workers,
            False,
            label_convention,
            **extra,
        )
    else:
        report = check_datalist(
            list(datalist_or_dir),
            modalities,
            require_label,
            check_labels,
            num_workers=num_workers,
            progress=False,
            kinds=kinds,
            num_classes=num_classes,
        )
    for w in report.dataset_warnings + report.grouped_warnings():
        logger.warning("check-data: %s", w)
    if report.ok:
        logger.info("check-data: %s", report.summary())
        return report
    problems = [f"dataset: {e}" for e in report.dataset_errors]
    problems += [f"case {c.case_id}: {e}" for c in report.failing() for e in c.errors]
    shown = problems[: max(1, int(max_problems))]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise ValueError(
        f"data check failed: {len(problems)} problem(s) in {len(report.failing())} case(s) "
        f"({report.summary()}):\n  "
        + "\n  ".join(shown)
        + more
        + "\nRun `medfusion check-data PATH` for the full report."
    )
