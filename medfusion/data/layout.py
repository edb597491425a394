"""Dataset layouts: one object per folder/CSV layout medfusion reads (detection, default roots, discovery, cases).

Each supported layout is one :class:`DatasetLayout` defined next to the reader that parses it and registered here:

================  =========================================  ============================================
name              what it is                                 defined in
================  =========================================  ============================================
volume_manifest   a ``.csv`` listing each case's volumes     :mod:`medfusion.data.volume_manifest`
mimic             MIMIC-style EHR + CXR + reports folder     :mod:`medfusion.data.mimic`
manifest          a generic CSV manifest (any modalities)    :mod:`medfusion.data.manifest`
msd               MSD Task01 (``dataset.json`` + 4D images)  :mod:`medfusion.data.brats`
brats             BraTS 2018-2023 case folders               :mod:`medfusion.data.brats`
================  =========================================  ============================================

The loaders (``discover_brats``, the clinical bundle's datalists) and ``medfusion check-data`` go through these
objects, so a layout's detection rule, default roots and discovery are written once:

- :meth:`DatasetLayout.detect` says whether a path has the layout;
- :meth:`DatasetLayout.roots` gives the folders/files the layout reads, with their defaults;
- :meth:`DatasetLayout.discover` returns the datalist (one dict per case: ``case_id``, one key per modality
  name, ``modality_mask``, ``sample_index``, ...) and raises on the first problem (training, inference);
- :meth:`DatasetLayout.scan` walks the same cases but collects problems per case instead of raising, without
  logging what it returns (``check-data`` reports them).

:func:`detect_layout` tries the layouts in registry order and raises :class:`NoLayoutError` (naming the path and
every layout tried) when none matches; :func:`resolve_layout` also accepts a layout or family name
(``check-data --layout brats`` means "a BraTS folder, an MSD folder or a volume manifest").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "DatasetLayout",
    "LayoutScan",
    "NoLayoutError",
    "LAYOUT_FAMILIES",
    "register_layout",
    "layouts",
    "get_layout",
    "detect_layout",
    "resolve_layout",
]

LAYOUT_FAMILIES: dict[str, tuple[str, ...]] = {
    "brats": ("volume_manifest", "msd", "brats"),
    "mimic": ("mimic",),
    "manifest": ("manifest",),
}
"""Names ``check-data --layout`` and the bundles use, and the layouts each stands for (in detection order)."""


class NoLayoutError(FileNotFoundError):
    """No registered layout recognises a path (the message names the path and every layout tried)."""


@dataclass
class LayoutScan:
    """The cases of a dataset with their problems, as :meth:`DatasetLayout.scan` finds them.

    Attributes:
        layout: layout name (shown in reports).
        root: the path that was read (a manifest's CSV, the dataset folder).
        modalities: the modalities the entries hold, in order.
        entries: datalist entries of the cases that could be discovered, as the layout's discovery gives them.
        case_errors: ``{case_id: [message, ...]}`` problems found while discovering a case (a case without an
            entry has its problems here only).
        case_warnings: ``{case_id: [message, ...]}`` tolerated problems found while discovering a case.
        dataset_errors: problems not tied to one case (no cases, duplicate case folders, unreadable CSV, ...).
        dataset_warnings: dataset-level warnings (absent files per modality, repeated patient ids, ...).
        notes: information lines (modality kinds used, presence per modality).
        kinds: ``{modality: kind}`` the values are read as (``None``: by their type and file suffix).
        same_grid: the volumes of one case must share shape and affine (BraTS-like data).
        label_maps: labels are label-map files with a ``label_convention`` (segmentation); otherwise labels
            are numbers.
        class_labels: numeric labels must be integer class indices ``>= 0``.
        num_classes: numeric labels must be class indices ``< num_classes``.
        sort_cases: report the cases sorted by id (folder layouts) instead of in file order.
    """

    layout: str
    root: str
    modalities: tuple[str, ...]
    entries: list[dict[str, Any]] = field(default_factory=list)
    case_errors: dict[str, list[str]] = field(default_factory=dict)
    case_warnings: dict[str, list[str]] = field(default_factory=dict)
    dataset_errors: list[str] = field(default_factory=list)
    dataset_warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, str] | None = None
    same_grid: bool = True
    label_maps: bool = True
    class_labels: bool = False
    num_classes: int | None = None
    sort_cases: bool = False


class DatasetLayout:
    """One dataset layout: how it is recognised, where its files are, how its cases are discovered.

    Subclasses set the class attributes and implement :meth:`detect`, :meth:`discover` and :meth:`scan`;
    :meth:`roots` defaults to the path itself.

    Attributes:
        name: registry key (also the layout shown in ``check-data`` reports).
        family: the ``check-data --layout`` / bundle name the layout belongs to (``brats``, ``mimic``, ``manifest``).
        expects: what the layout looks like, for the "no layout recognised" error.
        is_file: the layout is a file (a CSV) rather than a folder.
        default_modalities: the modalities read when none are given, and the names allowed (empty: the data
            decide, e.g. a manifest).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    expects: ClassVar[str] = ""
    is_file: ClassVar[bool] = False
    default_modalities: ClassVar[tuple[str, ...]] = ()

    def detect(self, path: str | os.PathLike) -> bool:
        """True when ``path`` has this layout."""
        raise NotImplementedError

    def accepts(self, path: str | os.PathLike) -> bool:
        """True when ``path`` is the kind of path this layout reads (a ``.csv`` file or a folder).

        Used to pick the layout of a family when none detects the path, so that its discovery says what is
        wrong (e.g. "No BraTS cases under ...") instead of a generic message.
        """
        return (Path(path).suffix.lower() == ".csv") == self.is_file

    def roots(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> dict[str, Path | None]:
        """The files/folders the layout reads under ``path``: roots given as arguments win over the defaults."""
        return {"root": Path(path).expanduser()}

    def discover(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """The datalist of ``path`` (raises on the first problem; see the layout's module for the keys).

        Every layout takes ``modalities`` second; the other options are the layout's own.
        """
        raise NotImplementedError

    def scan(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> LayoutScan:
        """Every case of ``path`` with the problems found while discovering it (nothing raised for data problems).

        Every layout takes ``(path, modalities=None, *, require_label=True, label_convention=None, ...)``:

        - ``modalities``: modality names (default :attr:`default_modalities`);
        - ``require_label``: labels are needed (manifest: read the label columns as class indices);
        - ``label_convention``: segmentation layouts: the convention of every case (see
          :mod:`medfusion.data.labels`); ignored by the others;
        - the layout's own discovery options.

        Raises:
            FileNotFoundError: ``path`` does not exist (a usage error, not a data problem).
            ValueError: unknown modality names or options.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<DatasetLayout {self.name}>"


_REGISTRY: dict[str, DatasetLayout] = {}
_MODULES = (
    "medfusion.data.volume_manifest",
    "medfusion.data.mimic",
    "medfusion.data.manifest",
    "medfusion.data.brats",
)
"""Modules defining layouts; importing them registers their layouts (timm-style: registration is complete)."""
_ORDER = ("volume_manifest", "mimic", "manifest", "msd", "brats")
"""Detection order: cheap, specific checks first; BraTS (which searches folders) last."""


def register_layout(layout: DatasetLayout) -> DatasetLayout:
    """Add ``layout`` to the registry under ``layout.name`` (a layout module calls this at import).

    Raises:
        ValueError: the name is empty or already registered by another object.
    """
    if not layout.name:
        raise ValueError(f"register_layout: {layout!r} has no name.")
    known = _REGISTRY.get(layout.name)
    if known is not None and type(known) is not type(layout):
        raise ValueError(f"register_layout: a layout named {layout.name!r} is already registered ({known!r}).")
    _REGISTRY[layout.name] = layout
    return layout


def layouts() -> dict[str, DatasetLayout]:
    """Every registered layout, in detection order (imports the layout modules so the registry is complete)."""
    import importlib

    for module in _MODULES:
        importlib.import_module(module)
    ordered = {n: _REGISTRY[n] for n in _ORDER if n in _REGISTRY}
    ordered.update({n: lay for n, lay in _REGISTRY.items() if n not in ordered})
    return ordered


def get_layout(name: str) -> DatasetLayout:
    """The registered layout ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    known = layouts()
    if name not in known:
        raise ValueError(f"unknown dataset layout {name!r}; registered: {list(known)}.")
    return known[name]


def detect_layout(path: str | os.PathLike, candidates: Sequence[str] | None = None) -> DatasetLayout:
    """The first layout (in detection order) that recognises ``path``.

    Args:
        path: a dataset folder or CSV file.
        candidates: layout names to try, in order (default: every registered layout).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NoLayoutError: no layout recognises ``path``; the message names the path, every layout tried and
            what it looks for, and what was found instead (CSV files, NIfTI files not named like BraTS).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path {p} does not exist.")
    tried = [get_layout(n) for n in candidates] if candidates else list(layouts().values())
    for lay in tried:
        if lay.detect(p):
            return lay
    lines = [f"No known dataset layout at {p}; tried {', '.join(lay.name for lay in tried)}:"]
    lines += [f"  {lay.name}: {lay.expects}." for lay in tried]
    hint = _no_match_hint(p)
    raise NoLayoutError("\n".join(lines + ([hint] if hint else [])))


def _no_match_hint(path: Path) -> str:
    """What a folder holds instead: CSV files (pass one of them), NIfTI files not named like BraTS."""
    if not path.is_dir():
        return ""
    from medfusion.data.brats import unmatched_hint, unmatched_nifti

    csvs = sorted(e.name for e in path.iterdir() if e.is_file() and e.suffix.lower() == ".csv")
    found = f"The folder holds {', '.join(csvs[:3])}: pass the CSV file itself. " if csvs else ""
    unmatched = unmatched_nifti(path)
    return found + (unmatched_hint(unmatched) if unmatched else "")


def resolve_layout(path: str | os.PathLike, layout: str = "auto") -> DatasetLayout:
    """The layout to read ``path`` with: detected (``"auto"``), or within a family or a named layout.

    Within a family (:data:`LAYOUT_FAMILIES`, e.g. ``"brats"``), the first member that detects ``path``; when
    none does, the member that reads this kind of path (a ``.csv`` file or a folder), whose discovery then
    reports what is wrong.

    Raises:
        FileNotFoundError: ``layout="auto"`` and ``path`` does not exist.
        NoLayoutError: ``layout="auto"`` and no layout recognises ``path``.
        ValueError: unknown layout name.
    """
    if layout == "auto":
        return detect_layout(path)
    members = [get_layout(n) for n in LAYOUT_FAMILIES.get(layout, (layout,))]
    for lay in members:
        if lay.detect(path):
            return lay
    return next((lay for lay in members if lay.accepts(path)), members[-1])
