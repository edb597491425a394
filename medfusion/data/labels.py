"""BraTS label conventions <-> the network's region channels ``[TC, WT, ET]`` (MONAI order).

A convention is data: three label sets (TC, WT, ET) plus the three values a prediction is
written back with. The named ones:

| convention | labels | TC | WT | ET |
|---|---|---|---|---|
| ``brats`` (2018-2021) | 1 NCR/NET, 2 ED, 4 ET | {1, 4} | {1, 2, 4} | {4} |
| ``brats2015`` (BRATS 2013-2015) | 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing | {1, 3, 4} | {1, 2, 3, 4} | {4} |
| ``brats2023`` (GLI/MEN/PED) | 1 NCR, 2 SNFH, 3 ET | {1, 3} | {1, 2, 3} | {3} |
| ``msd`` (Task01) | 1 edema, 2 non-enhancing, 3 enhancing | {2, 3} | {1, 2, 3} | {3} |

Any other convention is given by its values, as a mapping ``{"TC": [1, 3, 4], "WT": [1, 2, 3, 4],
"ET": [4]}`` (optionally ``"name"`` and ``"write": {"ET": 4, "TC": 1, "WT": 2}``) or as the string
``"TC=1,3,4;WT=1,2,3,4;ET=4"``. The string form (:attr:`LabelConvention.key`) is what datalist
entries carry in ``label_convention``, so a custom convention travels through DataLoader workers
and collation like a built-in name.

Writing back (:func:`regions_to_labels`, precedence ET > TC > WT): ET voxels get ``write[0]``
(default: the smallest ET value), TC-but-not-ET voxels ``write[1]`` (default: the smallest value of
TC minus ET; for ``brats2015`` that is 1, as necrosis and non-enhancing tumour cannot be told
apart from the three regions), WT-but-not-TC voxels ``write[2]`` (default: the smallest of WT
minus TC).

MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` hard-codes the first row (label 4 = ET,
and in 1.6.1 no way to change the TC set), so medfusion keeps conventions as data and writes
predictions back in the dataset's own labels.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from medfusion.modality import Keys

__all__ = [
    "LabelConvention",
    "CONVENTIONS",
    "REGION_NAMES",
    "get_convention",
    "convention_key",
    "datalist_conventions",
    "labels_to_regions",
    "regions_to_labels",
    "ConvertLabelToRegions",
    "ConvertLabelToRegionsd",
    "ConvertRegionsToLabel",
    "ConvertRegionsToLabeld",
]

REGION_NAMES: tuple[str, str, str] = ("TC", "WT", "ET")
_SPEC_HELP = (
    "a name, a mapping {'TC': [...], 'WT': [...], 'ET': [...]} (optional 'name', 'write'), "
    "or a string 'TC=1,3,4;WT=1,2,3,4;ET=4'"
)


class LabelConvention(NamedTuple):
    """One dataset's label values.

    Attributes:
        name: convention name (a built-in name, or the user's; defaults to :attr:`key`).
        tc: label values of the tumour core.
        wt: label values of the whole tumour.
        et: label values of the enhancing tumour.
        write: values a prediction is written back with: ``(ET, TC minus ET, WT minus TC)``.
    """

    name: str
    tc: tuple[int, ...]
    wt: tuple[int, ...]
    et: tuple[int, ...]
    write: tuple[int, int, int]

    @classmethod
    def from_regions(
        cls,
        tc: Sequence[int | str],
        wt: Sequence[int | str],
        et: Sequence[int | str],
        name: str | None = None,
        write: Sequence[int | str] | Mapping[str, int | str] | None = None,
    ) -> LabelConvention:
        """Build and validate a convention from its region label sets.

        Args:
            tc: TC values (positive integers, or their strings as in a spec; 0 is background).
            wt: WT values.
            et: ET values.
            name: a name for reports (default: the string form, :attr:`key`).
            write: ``(ET, TC-only, WT-only)`` values or ``{"ET": .., "TC": .., "WT": ..}``
                (default: the smallest value of ET, of TC minus ET and of WT minus TC).

        Raises:
            ValueError: non-integer or non-positive values, empty sets, ET not inside TC or TC not
                inside WT, nothing left to write TC-only or WT-only voxels with, or ``write`` values
                outside their region.
        """
        sets: dict[str, tuple[int, ...]] = {}
        for region, values in zip(REGION_NAMES, (tc, wt, et), strict=True):
            try:
                clean = tuple(sorted({_as_label(v) for v in values}))
            except (TypeError, ValueError):
                raise ValueError(f"label convention: {region} values {values!r} must be positive integers.") from None
            if not clean:
                raise ValueError(f"label convention: {region} has no values; expected e.g. {region}=[1, 4].")
            sets[region] = clean
        t, w, e = sets["TC"], sets["WT"], sets["ET"]
        if not set(e) <= set(t) or not set(t) <= set(w):
            raise ValueError(
                f"label convention: regions must nest ET <= TC <= WT, got TC={list(t)} WT={list(w)} ET={list(e)}."
            )
        core, edema = sorted(set(t) - set(e)), sorted(set(w) - set(t))
        if write is None:
            if not core or not edema:
                raise ValueError(
                    f"label convention TC={list(t)} WT={list(w)} ET={list(e)}: TC minus ET and WT minus TC must each "
                    "hold a value to write predictions back with (or give 'write')."
                )
            out: tuple[int, int, int] = (e[0], core[0], edema[0])
        else:
            raw = [write.get(r) for r in ("ET", "TC", "WT")] if isinstance(write, Mapping) else list(write)
            if len(raw) != 3 or any(v is None for v in raw):
                raise ValueError(f"label convention: write must give 3 values (ET, TC, WT), got {write!r}.")
            try:
                out = (_as_label(raw[0]), _as_label(raw[1]), _as_label(raw[2]))
            except (TypeError, ValueError):
                raise ValueError(f"label convention: write values {write!r} must be positive integers.") from None
            for value, allowed in zip(out, (e, t, w), strict=True):
                if value not in allowed:
                    raise ValueError(f"label convention: write value {value} is not in its region {list(allowed)}.")
        conv = cls("", t, w, e, out)
        return conv._replace(name=str(name) if name else conv.key)

    @property
    def enhancing(self) -> int:
        """The value predicted ET voxels are written with."""
        return self.write[0]

    @property
    def necrosis(self) -> int:
        """The value predicted core voxels outside ET (TC minus ET) are written with."""
        return self.write[1]

    @property
    def edema(self) -> int:
        """The value predicted WT voxels outside TC are written with."""
        return self.write[2]

    @property
    def values(self) -> tuple[int, ...]:
        """All valid label values, background (0) included."""
        return (0, *self.wt)

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """Label sets of TC, WT and ET."""
        return {"TC": self.tc, "WT": self.wt, "ET": self.et}

    @property
    def key(self) -> str:
        """The form a datalist entry carries: the name of a built-in convention, else the string spec."""
        builtin = CONVENTIONS.get(self.name)
        if builtin is not None and builtin[1:] == self[1:]:
            return self.name
        spec = ";".join(f"{r}={','.join(map(str, v))}" for r, v in self.regions.items())
        return spec + f";write={','.join(map(str, self.write))}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for model metadata and result files)."""
        return {
            "name": self.name,
            "key": self.key,
            **{r: list(v) for r, v in self.regions.items()},
            "write": dict(zip(("ET", "TC", "WT"), self.write, strict=True)),
        }


ConventionSpec = str | Mapping[str, Any] | LabelConvention
"""What a config may give as ``label_convention``: a name, a mapping of region values, a string spec or a convention."""


def _as_label(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)) or int(float(value)) <= 0:
        raise ValueError(value)
    return int(float(value))


CONVENTIONS: dict[str, LabelConvention] = {}
for _name, (_tc, _wt, _et) in {
    "brats": ((1, 4), (1, 2, 4), (4,)),
    "brats2015": ((1, 3, 4), (1, 2, 3, 4), (4,)),
    "brats2023": ((1, 3), (1, 2, 3), (3,)),
    "msd": ((2, 3), (1, 2, 3), (3,)),
}.items():
    CONVENTIONS[_name] = LabelConvention.from_regions(_tc, _wt, _et, name=_name)


def _parse_spec(text: str) -> LabelConvention:
    parts: dict[str, list[str]] = {}
    for part in text.split(";"):
        key, sep, values = part.partition("=")
        if not sep or not values.strip():
            raise ValueError(part)
        parts[key.strip().upper()] = [v for v in re.split(r"[,\s]+", values.strip()) if v]
    if set(parts) - {"TC", "WT", "ET", "WRITE"} or not {"TC", "WT", "ET"} <= set(parts):
        raise ValueError(text)
    return LabelConvention.from_regions(parts["TC"], parts["WT"], parts["ET"], write=parts.get("WRITE"))


def get_convention(spec: ConventionSpec) -> LabelConvention:
    """A convention from a built-in name, a mapping of region values or a string spec.

    Args:
        spec: ``"brats2015"``; ``{"TC": [1, 3, 4], "WT": [1, 2, 3, 4], "ET": [4]}`` (optional ``name``
            and ``write``); ``"TC=1,3,4;WT=1,2,3,4;ET=4"``; or a :class:`LabelConvention`.

    Raises:
        ValueError: unknown name or malformed spec (the message lists the known names and the forms).
    """
    if isinstance(spec, LabelConvention):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"TC", "WT", "ET", "name", "write"})
        missing = [r for r in REGION_NAMES if r not in spec]
        if unknown or missing:
            raise ValueError(
                f"label convention {dict(spec)!r}: "
                + (f"unknown key(s) {unknown}; " if unknown else "")
                + (f"missing {missing}; " if missing else "")
                + f"expected {_SPEC_HELP}."
            )
        return LabelConvention.from_regions(spec["TC"], spec["WT"], spec["ET"], spec.get("name"), spec.get("write"))
    text = str(spec).strip()
    if text in CONVENTIONS:
        return CONVENTIONS[text]
    if "=" in text:
        try:
            return _parse_spec(text)
        except ValueError as err:
            msg = str(err)
            if msg.startswith("label convention"):  # values parsed but invalid: say why
                raise ValueError(f"label convention {text!r}: {msg.split(':', 1)[-1].strip()}") from None
            raise ValueError(f"label convention {text!r} cannot be parsed; expected {_SPEC_HELP}.") from None
    raise ValueError(f"unknown label convention {text!r}; expected one of {sorted(CONVENTIONS)} or {_SPEC_HELP}.")


def convention_key(spec: ConventionSpec) -> str:
    """The string a datalist entry carries for ``spec`` (validates it): see :attr:`LabelConvention.key`."""
    return get_convention(spec).key


def datalist_conventions(datalist: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The label conventions a datalist uses, ``{key: LabelConvention.to_dict()}`` in first-seen order.

    What a model trained on the datalist should record (its labels were read this way, and inference
    writes them back this way); entries without ``label_convention`` are skipped.
    """
    out: dict[str, dict[str, Any]] = {}
    for entry in datalist:
        spec = entry.get(Keys.LABEL_CONVENTION)
        if spec is not None:
            conv = get_convention(spec)
            out.setdefault(conv.key, conv.to_dict())
    return out


def _source(meta_holder: Any) -> str:
    meta = getattr(meta_holder, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return f" in {name}" if name else ""


def labels_to_regions(label: torch.Tensor | np.ndarray, convention: ConventionSpec = "brats") -> torch.Tensor:
    """Label map ``[1, *S]`` or ``[*S]`` -> float regions ``[3, *S]`` (TC, WT, ET).

    Raises:
        ValueError: a value outside the convention (names the values and the file when known).
    """
    conv = get_convention(convention)
    lab = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
    if lab.ndim >= 1 and lab.shape[0] == 1:
        lab = lab[0]
    lab_r = torch.round(lab.float())
    found = torch.unique(lab_r)
    bad = sorted({int(v) for v in found.tolist()} - set(conv.values))
    if bad or not torch.equal(lab_r, lab.float()):
        raise ValueError(
            f"label map{_source(label)} holds values {bad or 'that are not integers'}; "
            f"convention {conv.name!r} expects {list(conv.values)}."
        )
    regions = [torch.isin(lab_r, torch.tensor(conv.regions[r], dtype=lab_r.dtype)) for r in REGION_NAMES]
    out = torch.stack(regions).float()
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=dict(label.meta), applied_operations=list(label.applied_operations))
    return out


def regions_to_labels(regions: torch.Tensor, convention: ConventionSpec = "brats") -> torch.Tensor:
    """Binary regions ``[3, *S]`` (TC, WT, ET) -> label map ``[1, *S]`` in the dataset's own values.

    Precedence ET > TC > WT, so an ET voxel outside the predicted TC is still ET (as BraTS challenge
    post-processing does). Inputs are thresholded at 0.5. Values written: :attr:`LabelConvention.write`.
    """
    conv = get_convention(convention)
    if regions.shape[0] != 3:
        raise ValueError(f"regions_to_labels: expected 3 channels [TC, WT, ET], got shape {tuple(regions.shape)}.")
    r = (regions.as_tensor() if isinstance(regions, MetaTensor) else torch.as_tensor(regions)) > 0.5
    tc, wt, et = r[0], r[1], r[2]
    out = torch.zeros_like(tc, dtype=torch.uint8)
    et_value, core_value, edema_value = conv.write
    out[wt] = edema_value
    out[tc] = core_value
    out[et] = et_value
    out = out[None]
    if isinstance(regions, MetaTensor):
        out = MetaTensor(out, meta=dict(regions.meta), applied_operations=list(regions.applied_operations))
    return out


class ConvertLabelToRegions(Transform):
    """Array transform: label map -> ``[3, *S]`` regions. See :func:`labels_to_regions`."""

    def __init__(self, convention: ConventionSpec = "brats") -> None:
        self.convention = get_convention(convention)

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        """Convert one label map."""
        return labels_to_regions(label, self.convention)


class ConvertRegionsToLabel(Transform):
    """Array transform: ``[3, *S]`` regions -> label map ``[1, *S]``. See :func:`regions_to_labels`."""

    def __init__(self, convention: ConventionSpec = "brats") -> None:
        self.convention = get_convention(convention)

    def __call__(self, regions: torch.Tensor) -> torch.Tensor:
        """Convert one region stack."""
        return regions_to_labels(regions, self.convention)


class _ConventionMapTransform(MapTransform):
    """Shared: the convention is fixed or read per sample from ``convention_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        convention: ConventionSpec | None = None,
        convention_key: str = Keys.LABEL_CONVENTION,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convention = get_convention(convention) if convention is not None else None
        self.convention_key = convention_key

    def _convention(self, d: Mapping[Hashable, Any]) -> LabelConvention:
        if self.convention is not None:
            return self.convention
        if self.convention_key not in d:
            raise KeyError(
                f"{type(self).__name__}: no convention given and the sample has no {self.convention_key!r} key "
                f"(case {d.get(Keys.CASE_ID, '?')})."
            )
        value = d[self.convention_key]
        if isinstance(value, (list, tuple)):  # a collated batch of one
            value = value[0]
        return get_convention(value)


class ConvertLabelToRegionsd(_ConventionMapTransform):
    """Dictionary transform: label maps -> ``[3, *S]`` regions.

    Args:
        keys: label keys.
        convention: fixed convention; ``None`` reads ``d[convention_key]`` (set by the BraTS discovery).
        convention_key: per-sample convention key.
        allow_missing_keys: skip absent keys.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert the label keys of one sample."""
        d = dict(data)
        conv = self._convention(d)
        for key in self.key_iterator(d):
            try:
                d[key] = labels_to_regions(d[key], conv)
            except ValueError as err:
                raise ValueError(f"case {d.get(Keys.CASE_ID, '?')}: {err}") from None
        return d


class ConvertRegionsToLabeld(_ConventionMapTransform):
    """Dictionary transform: ``[3, *S]`` regions -> label maps in the sample's own convention.

    Args:
        keys: prediction keys.
        convention: fixed convention; ``None`` reads ``d[convention_key]``.
        convention_key: per-sample convention key.
        allow_missing_keys: skip absent keys.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert the prediction keys of one sample."""
        d = dict(data)
        conv = self._convention(d)
        for key in self.key_iterator(d):
            d[key] = regions_to_labels(d[key], conv)
        return d
