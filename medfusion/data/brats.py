"""BraTS dataset discovery for every public layout -> MONAI datalist keyed by modality NAME.

Supported (see docs/data.md; the layout is detected, never configured):

- BraTS 2018 / 2019: ``{HGG,LGG}/Brats18_<id>/Brats18_<id>_{flair,t1,t1ce,t2,seg}.nii.gz``
  (``BraTS19_`` in 2019);
- BraTS 2020: ``BraTS20_Training_001/BraTS20_Training_001_<mod>.nii.gz`` (also ``.nii``; case 355's
  label is ``W39_1998.09.19_Segm.nii``); validation cases without labels;
- BraTS 2021: ``BraTS2021_00000/BraTS2021_00000_<mod>.nii.gz``;
- BraTS 2023 (GLI, MEN, PED, ...): ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1c,t1n,t2f,t2w,seg}.nii.gz``
  (t2f = flair, t1n = t1, t1c = t1ce, t2w = t2; labels 1/2/3);
- MSD Task01_BrainTumour: ``dataset.json``, 4D ``imagesTr/BRATS_001.nii.gz`` whose channel order is
  read BY NAME from ``dataset.json["modality"]``; macOS ``._*`` files are skipped.

Exports named differently (e.g. BRATS 2013-2015 copies with ``Flair_subtrMeanDivStd.nii.gz`` /
``OTMultiClass.nii.gz``) are read from a volume manifest CSV (:mod:`medfusion.data.volume_manifest`):
pass the CSV instead of the folder.

The two folder layouts are :class:`BratsLayout` (``brats``) and :class:`MsdLayout` (``msd``), registered in
:mod:`medfusion.data.layout`; :func:`discover_brats` picks the one (or the volume manifest) that recognises the path.

Each datalist entry holds ``case_id``, one path (or ``None`` when the file is absent: the case is
kept with that modality marked missing) per requested modality, ``label`` (path or ``None``),
``label_convention`` (``brats``, ``brats2023``, ``msd``, or the one the caller gives), ``source``,
``modality_mask`` and ``sample_index`` (manifest entries also ``brain_mask``). MSD entries carry
``image_4d`` and ``image_4d_channels`` instead of per-modality paths.
:class:`medfusion.data.volume.LoadModalitiesd` reads both forms.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfusion.data.layout import DatasetLayout, LayoutScan, register_layout
from medfusion.modality import BRATS_MODALITIES, Keys, validate_modalities

__all__ = [
    "discover_brats",
    "brats_case_split",
    "detect_layout",
    "VolumeLayout",
    "BratsLayout",
    "MsdLayout",
    "BRATS",
    "MSD",
    "unmatched_nifti",
    "duplicate_case_dirs",
    "no_cases_message",
    "unmatched_hint",
    "MAX_DEPTH",
    "MSD_CHANNEL_NAMES",
]

logger = logging.getLogger(__name__)

_EXTS = (".nii.gz", ".nii")
# file-name suffix -> medfusion name, per naming scheme
_CLASSIC = {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"}
_BRATS2023 = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2"}
# MSD dataset.json channel names -> medfusion names
MSD_CHANNEL_NAMES: dict[str, str] = {"flair": "flair", "t1w": "t1", "t1gd": "t1ce", "t2w": "t2"}
_SOURCES = (
    (re.compile(r"^Brats18_"), "brats2018"),
    (re.compile(r"^BraTS19_"), "brats2019"),
    (re.compile(r"^BraTS20_"), "brats2020"),
    (re.compile(r"^BraTS2021_"), "brats2021"),
    (re.compile(r"^BraTS-[A-Z]+-"), "brats2023"),
)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")  # skips macOS "._*" resource forks and hidden files


def _find(case_dir: Path, stem: str, files: set[str]) -> Path | None:
    for ext in _EXTS:
        if stem + ext in files:
            return case_dir / (stem + ext)
    return None


def _refuse_dangling(path: Path | None, what: str) -> None:
    """Raise when ``path`` is a symbolic link to nothing (a broken copy is an error, not a missing modality)."""
    if path is not None and path.is_symlink() and not path.exists():
        raise FileNotFoundError(
            f"{what} file {path} is a dangling symbolic link (to {os.readlink(path)!r}, which does not exist)."
        )


def _scheme(case_dir: Path, files: set[str]) -> tuple[str, dict[str, str]] | None:
    """Naming scheme of a case folder: separator and suffix map, or None when it is not a case."""
    name = case_dir.name
    for sep, suffixes in (("-", _BRATS2023), ("_", _CLASSIC)):
        if any(_find(case_dir, f"{name}{sep}{s}", files) for s in (*suffixes, "seg")):
            return sep, suffixes
    return None


def detect_layout(root: str | os.PathLike) -> str:
    """``"msd"`` when ``root`` (or a child) holds an MSD ``dataset.json``, else ``"brats"``.

    See :func:`medfusion.data.layout.detect_layout` for the detection of every layout.
    """
    return "msd" if _msd_root(Path(root)) is not None else "brats"


def _msd_root(root: Path) -> Path | None:
    if (root / "dataset.json").is_file():
        return root
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and _visible(child) and (child / "dataset.json").is_file():
                return child
    return None


MAX_DEPTH = 3
"""How many folder levels below the dataset folder the discovery searches for case folders."""


def _scan(
    root: Path, max_depth: int = MAX_DEPTH
) -> tuple[list[tuple[Path, str, dict[str, str], set[str]]], list[tuple[Path, list[str]]]]:
    """Case folders under ``root`` (sorted by name), and folders holding NIfTI files not named like BraTS."""
    found = []
    unmatched = []
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = [e for e in d.iterdir() if _visible(e)]
        except PermissionError as err:
            raise PermissionError(f"BraTS discovery: cannot read folder {d}: {err}") from None
        # a dangling symbolic link counts as a file here, so discovery reports it as an error (not as missing)
        files = {e.name for e in entries if e.is_file() or (e.is_symlink() and not e.exists())}
        scheme = _scheme(d, files)
        if scheme is not None:
            found.append((d, scheme[0], scheme[1], files))
            continue
        nifti = sorted(f for f in files if f.endswith(_EXTS))
        if nifti:
            unmatched.append((d, nifti))
        if depth < max_depth:
            stack.extend((e, depth + 1) for e in entries if e.is_dir())
    return sorted(found, key=lambda t: (t[0].name, str(t[0]))), sorted(unmatched)


def unmatched_nifti(root: str | os.PathLike, max_depth: int = MAX_DEPTH) -> list[tuple[Path, list[str]]]:
    """Folders under ``root`` holding NIfTI files that are not in a BraTS case folder, with those files."""
    return _scan(Path(root).expanduser(), max_depth)[1]


def duplicate_case_dirs(case_dirs: Sequence[Path]) -> list[str]:
    """One message per case id found in two or more folders, naming every folder.

    Two folders with the same case name (``a/BraTS2021_00000`` and ``b/BraTS2021_00000``) would give
    two cases with one id: predictions overwrite each other and a case can land in two splits.
    """
    by_name: dict[str, list[Path]] = {}
    for d in case_dirs:
        by_name.setdefault(d.name, []).append(d)
    return [
        f"duplicate case id {name}: found in {' and '.join(str(p) for p in paths)}; case ids must be unique "
        "(remove one copy, or point the dataset folder at one of them)."
        for name, paths in sorted(by_name.items())
        if len(paths) > 1
    ]


def unmatched_hint(unmatched: Sequence[tuple[Path, Sequence[str]]]) -> str:
    """What was found instead of BraTS cases (NIfTI files in folders not named like BraTS) and what to do."""
    msg = ""
    if unmatched:
        d, files = unmatched[0]
        shown = ", ".join(list(files)[:4]) + (", ..." if len(files) > 4 else "")
        msg = (
            f"Found {sum(len(f) for _, f in unmatched)} NIfTI file(s) in {len(unmatched)} folder(s) not named like "
            f"BraTS (e.g. {d}: {shown}). "
        )
    return msg + (
        "For other file names list the files in a volume manifest CSV (columns case_id, flair, t1, t1ce, t2, "
        "label[, brain_mask]) and pass the CSV instead of the folder (docs/data.md)."
    )


def no_cases_message(base: Path, unmatched: Sequence[tuple[Path, Sequence[str]]] = ()) -> str:
    """The "no BraTS cases" error: what was searched, what was expected, and what was found instead."""
    return (
        f"No BraTS cases under {base} (searched it and {MAX_DEPTH} folder levels below it): expected case folders "
        "such as BraTS2021_00000/BraTS2021_00000_flair.nii.gz, BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz, "
        "{HGG,LGG}/Brats18_*/..., or an MSD dataset.json. " + unmatched_hint(unmatched)
    )


def _source(case_id: str) -> str:
    for pattern, source in _SOURCES:
        if pattern.match(case_id):
            return source
    return "brats"


def _seg_file(case_dir: Path, sep: str, files: set[str]) -> Path | None:
    seg = _find(case_dir, f"{case_dir.name}{sep}seg", files)
    if seg is not None:
        return seg
    # BraTS 2020 case 355 ships its label as "W39_1998.09.19_Segm.nii"
    quirks = sorted(f for f in files if f.endswith(("_Segm.nii", "_Segm.nii.gz")))
    return case_dir / quirks[0] if quirks else None


def _discover_msd(root: Path, modalities: tuple[str, ...], require_label: bool) -> list[dict[str, Any]]:
    meta_path = root / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"MSD dataset: cannot parse {meta_path}: {err}") from None
    channel_map = meta.get("modality")
    if not isinstance(channel_map, Mapping) or not channel_map:
        raise ValueError(f"MSD dataset: {meta_path} has no 'modality' mapping (expected e.g. {{'0': 'FLAIR', ...}}).")
    channels: list[str] = []
    for idx in sorted(channel_map, key=int):
        raw = str(channel_map[idx]).lower()
        if raw not in MSD_CHANNEL_NAMES:
            raise ValueError(
                f"MSD dataset: {meta_path} modality {idx}={channel_map[idx]!r} "
                f"is not one of {sorted(MSD_CHANNEL_NAMES)}."
            )
        channels.append(MSD_CHANNEL_NAMES[raw])
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise ValueError(f"MSD dataset: {meta_path} has no 'training' list of {{'image', 'label'}} entries.")
    items = []
    for entry in training:
        image = root / str(entry.get("image", "")).removeprefix("./")
        if image.name.startswith("._"):
            continue
        if not image.is_file():
            raise FileNotFoundError(f"MSD dataset: {meta_path} lists {entry.get('image')!r} but {image} is missing.")
        label = root / str(entry.get("label", "")).removeprefix("./") if entry.get("label") else None
        if label is not None and not label.is_file():
            label = None
        case_id = image.name.split(".")[0]
        if require_label and label is None:
            raise FileNotFoundError(f"MSD case {case_id}: no label file (looked for {entry.get('label')!r} in {root}).")
        present = [m in channels for m in modalities]
        items.append(
            {
                Keys.CASE_ID: case_id,
                "image_4d": str(image),
                "image_4d_channels": list(channels),
                Keys.LABEL: str(label) if label else None,
                Keys.LABEL_CONVENTION: "msd",
                "source": "msd_task01",
                Keys.MASK: present,
            }
        )
    return items


def _case_entry(
    case_dir: Path,
    sep: str,
    suffixes: Mapping[str, str],
    files: set[str],
    mods: Sequence[str],
    require_label: bool,
    allow_missing_modalities: bool,
    log_missing: bool = True,
) -> dict[str, Any]:
    """The datalist entry of one case folder (``modality_mask`` set, no ``sample_index`` yet).

    Raises:
        FileNotFoundError: a modality file absent while ``allow_missing_modalities`` is False, a required label
            absent, a modality or label file that is a dangling symbolic link.
    """
    case_id = case_dir.name
    source = _source(case_id)
    by_name = {v: k for k, v in suffixes.items()}
    entry: dict[str, Any] = {Keys.CASE_ID: case_id}
    present = []
    for m in mods:
        stem = f"{case_id}{sep}{by_name[m]}"
        path = _find(case_dir, stem, files)
        _refuse_dangling(path, f"{source} case {case_id}: {m}")
        if path is None:
            looked = ", ".join(stem + e for e in _EXTS)
            if not allow_missing_modalities:
                raise FileNotFoundError(f"{source} case {case_id}: no {m} file (looked for {looked}).")
            if log_missing:
                logger.warning("%s case %s: no %s file (looked for %s); missing.", source, case_id, m, looked)
        entry[m] = str(path) if path else None
        present.append(path is not None)
    seg = _seg_file(case_dir, sep, files)
    _refuse_dangling(seg, f"{source} case {case_id}: label")
    if require_label and seg is None:
        looked = ", ".join(f"{case_id}{sep}seg{e}" for e in _EXTS)
        raise FileNotFoundError(f"{source} case {case_id}: no label file (looked for {looked} in {case_dir}).")
    entry[Keys.LABEL] = str(seg) if seg else None
    entry[Keys.LABEL_CONVENTION] = "brats2023" if sep == "-" else "brats"
    entry["source"] = source
    entry[Keys.MASK] = present
    return entry


def _no_modality(entry: Mapping[str, Any], mods: Sequence[str]) -> str | None:
    if any(entry[Keys.MASK]):
        return None
    return f"case {entry[Keys.CASE_ID]}: none of the modalities {list(mods)} was found."


def _finish(items: list[dict[str, Any]], mods: Sequence[str], label_convention: Any) -> list[dict[str, Any]]:
    """Refuse a case without any modality, set a fixed convention, number the entries."""
    from medfusion.data.labels import convention_key

    fixed = convention_key(label_convention) if label_convention is not None else None
    for i, entry in enumerate(items):
        none = _no_modality(entry, mods)
        if none:
            raise ValueError(none)
        if fixed is not None:
            entry[Keys.LABEL_CONVENTION] = fixed
        entry[Keys.INDEX] = i
    return items


def _folder(path: str | os.PathLike) -> Path:
    base = Path(path).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"BraTS dataset folder {base} does not exist or is not a folder.")
    return base


class VolumeLayout(DatasetLayout):
    """A layout of the ``brats`` family: 3D volumes of flair/t1/t1ce/t2 with label maps and a label convention.

    :meth:`discover` and :meth:`scan` check the modalities and the convention (usage errors raise) and hand the
    rest to the subclass's :meth:`_discover` / :meth:`_scan`.
    """

    family = "brats"
    default_modalities = BRATS_MODALITIES

    def discover(
        self,
        path: str | os.PathLike,
        modalities: Sequence[str] | None = None,
        require_label: bool = False,
        allow_missing_modalities: bool = True,
        label_convention: Any = None,
    ) -> list[dict[str, Any]]:
        """The datalist (see :func:`discover_brats` for the arguments, the keys and the errors)."""
        mods = validate_modalities(modalities or self.default_modalities, self.default_modalities)
        return self._discover(Path(path).expanduser(), mods, require_label, allow_missing_modalities, label_convention)

    def scan(
        self,
        path: str | os.PathLike,
        modalities: Sequence[str] | None = None,
        *,
        require_label: bool = True,
        label_convention: Any = None,
    ) -> LayoutScan:
        """Every case with the problems found while discovering it; labels are checked later (``check-data``).

        Raises:
            ValueError: unknown modality names or label convention.
            FileNotFoundError: ``path`` does not exist.
        """
        from medfusion.data.labels import convention_key

        mods = validate_modalities(modalities or self.default_modalities, self.default_modalities)
        fixed = convention_key(label_convention) if label_convention is not None else None
        return self._scan(Path(path).expanduser(), mods, fixed)

    def _discover(
        self, path: Path, mods: tuple[str, ...], require_label: bool, allow_missing: bool, label_convention: Any
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _scan(self, path: Path, mods: tuple[str, ...], label_convention: str | None) -> LayoutScan:
        raise NotImplementedError


class BratsLayout(VolumeLayout):
    """BraTS 2018-2023 case folders, found in the dataset folder and up to :data:`MAX_DEPTH` levels below it."""

    name = "brats"
    expects = (
        f"BraTS 2018-2023 case folders (searched it and {MAX_DEPTH} folder levels below it) such as "
        "BraTS2021_00000/BraTS2021_00000_flair.nii.gz, BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz or "
        "{HGG,LGG}/Brats18_*/..."
    )

    def detect(self, path: str | os.PathLike) -> bool:
        """True for a folder holding at least one BraTS case folder (itself or up to 3 levels below)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            return False
        try:
            return bool(_scan(p)[0])
        except PermissionError:  # an unreadable folder: the scan reports it
            return True

    def _discover(
        self, path: Path, mods: tuple[str, ...], require_label: bool, allow_missing: bool, label_convention: Any
    ) -> list[dict[str, Any]]:
        base = _folder(path)
        case_dirs, unmatched = _scan(base)
        dups = duplicate_case_dirs([d for d, *_ in case_dirs])
        if dups:
            raise ValueError(" ".join(dups))
        if not case_dirs:
            raise FileNotFoundError(no_cases_message(base, unmatched))
        items = [
            _case_entry(d, sep, suffixes, files, mods, require_label, allow_missing)
            for d, sep, suffixes, files in case_dirs
        ]
        return _finish(items, mods, label_convention)

    def _scan(self, path: Path, mods: tuple[str, ...], label_convention: str | None) -> LayoutScan:
        """Every case folder on its own: a case that cannot be discovered is that case's error."""
        base = _folder(path)
        out = LayoutScan(self.name, str(base), mods, sort_cases=True)
        unmatched: list[tuple[Path, list[str]]] = []
        try:
            case_dirs, unmatched = _scan(base)
        except PermissionError as err:
            case_dirs = []
            out.dataset_errors.append(str(err))
        out.dataset_errors += duplicate_case_dirs([d for d, *_ in case_dirs])
        if not case_dirs and not out.dataset_errors:
            out.dataset_errors.append(no_cases_message(base, unmatched))
        for d, sep, sfx, files in case_dirs:
            try:  # missing modality files are not logged: the check reports them per case
                entry = _case_entry(d, sep, sfx, files, mods, False, True, log_missing=False)
            except (FileNotFoundError, PermissionError) as err:
                out.case_errors.setdefault(d.name, []).append(str(err))
                continue
            none = _no_modality(entry, mods)
            if none:
                out.case_errors.setdefault(d.name, []).append(none)
                continue
            if label_convention is not None:
                entry[Keys.LABEL_CONVENTION] = label_convention
            entry[Keys.INDEX] = len(out.entries)
            out.entries.append(entry)
        return out


class MsdLayout(VolumeLayout):
    """MSD Task01_BrainTumour: ``dataset.json`` (in the folder or a child) and 4D ``imagesTr`` volumes."""

    name = "msd"
    expects = "an MSD Task01 folder holding dataset.json (in it or in a child folder) and 4D imagesTr/*.nii.gz"

    def detect(self, path: str | os.PathLike) -> bool:
        """True when the folder or one of its children holds ``dataset.json``."""
        return _msd_root(Path(path).expanduser()) is not None

    def accepts(self, path: str | os.PathLike) -> bool:
        """Only an MSD folder (an empty folder is read as BraTS, whose error says what was searched)."""
        return self.detect(path)

    def roots(self, path: str | os.PathLike) -> dict[str, Path | None]:
        """``{"root": the folder holding dataset.json}``."""
        base = Path(path).expanduser()
        return {"root": _msd_root(base) or base}

    def _discover(
        self, path: Path, mods: tuple[str, ...], require_label: bool, allow_missing: bool, label_convention: Any
    ) -> list[dict[str, Any]]:
        """The ``training`` entries of ``dataset.json`` (``image_4d`` + ``image_4d_channels``)."""
        base = _folder(path)
        root = self.roots(base)["root"]
        assert root is not None
        items = _discover_msd(root, mods, require_label)
        if not items:
            raise FileNotFoundError(no_cases_message(base))
        return _finish(items, mods, label_convention)

    def _scan(self, path: Path, mods: tuple[str, ...], label_convention: str | None) -> LayoutScan:
        """The discovery of ``dataset.json`` (a problem there is a dataset error)."""
        out = LayoutScan(self.name, str(_folder(path)), mods, sort_cases=True)
        try:
            out.entries = self._discover(path, mods, False, True, label_convention)
        except (ValueError, FileNotFoundError, PermissionError) as err:
            out.dataset_errors.append(str(err))
        return out


BRATS = register_layout(BratsLayout())
MSD = register_layout(MsdLayout())


def discover_brats(
    root: str | os.PathLike,
    modalities: Sequence[str] = BRATS_MODALITIES,
    require_label: bool = False,
    allow_missing_modalities: bool = True,
    label_convention: Any = None,
) -> list[dict[str, Any]]:
    """Find every BraTS case under ``root`` whatever the release's layout, or read a volume manifest.

    The layout is the first of the ``brats`` family (:data:`medfusion.data.layout.LAYOUT_FAMILIES`: volume
    manifest, MSD, BraTS folders) that recognises ``root``; a ``.csv`` is read as a volume manifest, any other
    path as BraTS folders.

    Args:
        root: dataset folder (the release folder or any parent up to :data:`MAX_DEPTH` levels above the
            case folders), or a volume manifest ``.csv`` (:mod:`medfusion.data.volume_manifest`) for files
            not named like any release.
        modalities: names to collect, in the model's order (subset of flair, t1, t1ce, t2).
        require_label: every case must have a label file (training and evaluation).
        allow_missing_modalities: keep cases that lack some modality files (marked missing in
            ``modality_mask``); ``False`` makes a missing file an error.
        label_convention: the dataset's label convention for every case (a name such as ``"brats2015"``,
            a mapping ``{"TC": [...], "WT": [...], "ET": [...]}`` or a ``"TC=..;WT=..;ET=.."`` string; see
            :mod:`medfusion.data.labels`); ``None``: detected from the layout (manifest: its
            ``label_convention`` column, else ``brats``).

    Returns:
        Datalist sorted by case id (see the module docstring for the entry keys).

    Raises:
        FileNotFoundError: ``root`` missing, no cases found (the message says how deep it searched and
            what it found), a required label or modality file absent (the message names the case and the
            file patterns looked for), a modality or label file that is a dangling symbolic link.
        ValueError: unknown modality names or convention; a case with none of the requested modalities;
            two case folders with the same name (the message names both paths).
    """
    from medfusion.data.layout import resolve_layout

    mods = validate_modalities(modalities, BRATS_MODALITIES)
    return resolve_layout(Path(root).expanduser(), "brats").discover(
        root,
        mods,
        require_label=require_label,
        allow_missing_modalities=allow_missing_modalities,
        label_convention=label_convention,
    )


def brats_case_split(
    datalist: Sequence[Mapping[str, Any]], fractions: Mapping[str, float], seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Split cases at random into named parts; the rest is ``"train"``.

    Each named part gets ``round(fraction * n)`` cases but at least one when the cohort allows it
    (at least one case always stays in ``train``). Deterministic for a seed; ``sample_index`` is
    renumbered inside each part (QMF/OmniFuse keep per-sample state by it).

    Args:
        datalist: entries from :func:`discover_brats`.
        fractions: e.g. ``{"meta_val": 0.1, "val": 0.1, "test": 0.2}``.
        seed: permutation seed.

    Returns:
        ``{"train": [...], "meta_val": [...], ...}``.

    Raises:
        ValueError: fractions outside [0, 1), summing to >= 1, a part named ``train``, or too few cases.
    """
    from medfusion.data.splits import random_split

    return random_split(datalist, fractions, seed)
