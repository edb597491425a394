"""BraTS label conventions <-> the network's region channels ``[TC, WT, ET]`` (MONAI order).

| convention | labels | TC | WT | ET |
|---|---|---|---|---|
| ``brats`` (2018-2021) | 1 NCR/NET, 2 ED, 4 ET | {1, 4} | {1, 2, 4} | {4} |
| ``brats2023`` (GLI/MEN/PED) | 1 NCR, 2 SNFH, 3 ET | {1, 3} | {1, 2, 3} | {3} |
| ``msd`` (Task01) | 1 edema, 2 non-enhancing, 3 enhancing | {2, 3} | {1, 2, 3} | {3} |

MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` hard-codes the first row (label 4 = ET,
and in 1.6.1 no way to change the TC set for MSD), so medfusion keeps the three conventions as data
and writes predictions back in the dataset's own labels.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
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
    "labels_to_regions",
    "regions_to_labels",
    "ConvertLabelToRegions",
    "ConvertLabelToRegionsd",
    "ConvertRegionsToLabel",
    "ConvertRegionsToLabeld",
]

REGION_NAMES: tuple[str, str, str] = ("TC", "WT", "ET")


class LabelConvention(NamedTuple):
    """One dataset's label values.

    Attributes:
        name: convention name.
        necrosis: label of the non-enhancing / necrotic core (TC minus ET).
        edema: label of the edema (WT minus TC).
        enhancing: label of the enhancing tumour (ET).
    """

    name: str
    necrosis: int
    edema: int
    enhancing: int

    @property
    def values(self) -> tuple[int, ...]:
        """All valid label values, background included."""
        return (0, *sorted((self.necrosis, self.edema, self.enhancing)))

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """Label sets of TC, WT and ET."""
        return {
            "TC": tuple(sorted((self.necrosis, self.enhancing))),
            "WT": tuple(sorted((self.necrosis, self.edema, self.enhancing))),
            "ET": (self.enhancing,),
        }


CONVENTIONS: dict[str, LabelConvention] = {
    "brats": LabelConvention("brats", necrosis=1, edema=2, enhancing=4),
    "brats2023": LabelConvention("brats2023", necrosis=1, edema=2, enhancing=3),
    "msd": LabelConvention("msd", necrosis=2, edema=1, enhancing=3),
}


def get_convention(name: str | LabelConvention) -> LabelConvention:
    """Look a convention up by name.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if isinstance(name, LabelConvention):
        return name
    try:
        return CONVENTIONS[str(name)]
    except KeyError:
        raise ValueError(f"unknown label convention {name!r}; expected one of {sorted(CONVENTIONS)}.") from None


def _source(meta_holder: Any) -> str:
    meta = getattr(meta_holder, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return f" in {name}" if name else ""


def labels_to_regions(label: torch.Tensor | np.ndarray, convention: str | LabelConvention = "brats") -> torch.Tensor:
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


def regions_to_labels(regions: torch.Tensor, convention: str | LabelConvention = "brats") -> torch.Tensor:
    """Binary regions ``[3, *S]`` (TC, WT, ET) -> label map ``[1, *S]`` in the dataset's own values.

    Precedence ET > TC > WT, so an ET voxel outside the predicted TC is still ET (as BraTS challenge
    post-processing does). Inputs are thresholded at 0.5.
    """
    conv = get_convention(convention)
    if regions.shape[0] != 3:
        raise ValueError(f"regions_to_labels: expected 3 channels [TC, WT, ET], got shape {tuple(regions.shape)}.")
    r = (regions.as_tensor() if isinstance(regions, MetaTensor) else torch.as_tensor(regions)) > 0.5
    tc, wt, et = r[0], r[1], r[2]
    out = torch.zeros_like(tc, dtype=torch.uint8)
    out[wt] = conv.edema
    out[tc] = conv.necrosis
    out[et] = conv.enhancing
    out = out[None]
    if isinstance(regions, MetaTensor):
        out = MetaTensor(out, meta=dict(regions.meta), applied_operations=list(regions.applied_operations))
    return out


class ConvertLabelToRegions(Transform):
    """Array transform: label map -> ``[3, *S]`` regions. See :func:`labels_to_regions`."""

    def __init__(self, convention: str = "brats") -> None:
        self.convention = get_convention(convention)

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        """Convert one label map."""
        return labels_to_regions(label, self.convention)


class ConvertRegionsToLabel(Transform):
    """Array transform: ``[3, *S]`` regions -> label map ``[1, *S]``. See :func:`regions_to_labels`."""

    def __init__(self, convention: str = "brats") -> None:
        self.convention = get_convention(convention)

    def __call__(self, regions: torch.Tensor) -> torch.Tensor:
        """Convert one region stack."""
        return regions_to_labels(regions, self.convention)


class _ConventionMapTransform(MapTransform):
    """Shared: the convention is fixed or read per sample from ``convention_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        convention: str | None = None,
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
