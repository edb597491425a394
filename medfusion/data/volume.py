"""Volume loading and BraTS transform chains built from MONAI transforms.

:class:`LoadModalitiesd` is the one piece MONAI has no equivalent for: it reads the modalities of
one case BY NAME (separate files, or an MSD 4D file whose channel order comes from
``dataset.json``), zero-fills absent ones, checks that every volume of the case has the same shape,
and writes the stacked ``image`` ``[M, D, H, W]`` (channels in the model's modality order) plus the
``modality_mask``. Reading itself is MONAI's ``LoadImage`` (nibabel), so orientation and spacing
metadata travel with the tensor; everything after it is stock MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    LoadImage,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Transform,
)

from medfusion.data.labels import ConvertLabelToRegionsd
from medfusion.modality import BRATS_MODALITIES, Keys, validate_modalities

__all__ = ["LoadModalitiesd", "brats_transforms", "TRANSFORM_MODES"]

TRANSFORM_MODES = ("train", "eval", "infer")


class LoadModalitiesd(Transform):
    """Load one case's modalities (and label) into ``image`` ``[M, *S]``, ``label`` ``[1, *S]``, ``modality_mask``.

    Input entries come from :func:`medfusion.data.brats.discover_brats`: either one path (or ``None``)
    per modality name, or ``image_4d`` + ``image_4d_channels`` (MSD). The per-modality path keys are
    removed from the output (``None`` does not collate); the file names stay in
    ``image.meta["modality_files"]``, and ``image.meta["filename_or_obj"]`` becomes
    ``<case folder>/<case_id>.nii.gz`` so ``SaveImaged`` names predictions after the case.

    Args:
        modalities: model modality order.
        load_label: read ``label`` (a path) as ``[1, *S]``.
        require_label: a missing label path is an error (naming the case).
        dtype: image dtype.

    Raises:
        FileNotFoundError / ValueError: unreadable or missing file, shape mismatch inside a case, no
            modality present; every message names the case and the file.
    """

    def __init__(
        self,
        modalities: Sequence[str] = BRATS_MODALITIES,
        load_label: bool = True,
        require_label: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.modalities = validate_modalities(modalities)
        self.load_label = load_label
        self.require_label = require_label
        self.dtype = dtype
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)

    def _read(self, path: str, case: str, what: str) -> MetaTensor:
        if not Path(path).is_file():
            raise FileNotFoundError(f"case {case}: {what} file {path} does not exist.")
        try:
            return self.loader(path)
        except Exception as err:  # nibabel/gzip raise many types for corrupt files; report them as one
            raise ValueError(f"case {case}: cannot read {what} file {path} ({type(err).__name__}: {err}).") from None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load one case."""
        d = dict(data)
        case = str(d.get(Keys.CASE_ID, "?"))
        vols: dict[str, MetaTensor] = {}
        files: dict[str, str] = {}
        if "image_4d" in d:
            path = str(d.pop("image_4d"))
            channels = [str(c) for c in d.pop("image_4d_channels")]
            vol = self._read(path, case, "4D image")
            if vol.shape[0] != len(channels):
                raise ValueError(
                    f"case {case}: {path} has {vol.shape[0]} channels, dataset.json names {len(channels)} ({channels})."
                )
            for i, name in enumerate(channels):
                if name in self.modalities:
                    vols[name] = vol[i : i + 1]
                    files[name] = f"{path}#{i}"
        for m in BRATS_MODALITIES + tuple(x for x in self.modalities if x not in BRATS_MODALITIES):
            if m not in d:
                continue
            path = d.pop(m)
            if m in self.modalities and path is not None and not isinstance(path, torch.Tensor):
                vols[m] = self._read(str(path), case, m)
                files[m] = str(path)
        if not vols:
            raise ValueError(f"case {case}: none of the modalities {list(self.modalities)} is present.")
        shapes = {m: tuple(v.shape[1:]) for m, v in vols.items()}
        if len(set(shapes.values())) > 1:
            detail = ", ".join(f"{m} {files[m]} {s}" for m, s in shapes.items())
            raise ValueError(f"case {case}: volumes differ in shape ({detail}); all modalities must be co-registered.")
        ref = next(iter(vols.values()))
        spatial = ref.shape[1:]
        given = d.get(Keys.MASK)
        present = [m in vols and (given is None or bool(given[i])) for i, m in enumerate(self.modalities)]
        chans = [
            vols[m][0].as_tensor().to(self.dtype) if present[i] else torch.zeros(spatial, dtype=self.dtype)
            for i, m in enumerate(self.modalities)
        ]
        meta = dict(ref.meta)
        meta["modality_files"] = dict(files)
        first = Path(next(iter(files.values())).split("#")[0])
        meta["filename_or_obj"] = str(first.parent / f"{case}.nii.gz")
        d[Keys.IMAGE] = MetaTensor(torch.stack(chans), meta=meta)
        d[Keys.MASK] = torch.tensor(present, dtype=torch.bool)
        label = d.get(Keys.LABEL)
        if not self.load_label:
            d.pop(Keys.LABEL, None)
        elif label is None:
            if self.require_label:
                raise FileNotFoundError(f"case {case}: no label file, but this mode needs one.")
            d.pop(Keys.LABEL, None)
        elif not isinstance(label, torch.Tensor):
            lab = self._read(str(label), case, "label")
            if tuple(lab.shape[1:]) != tuple(spatial):
                raise ValueError(
                    f"case {case}: label {label} has shape {tuple(lab.shape[1:])}, images have {tuple(spatial)}."
                )
            d[Keys.LABEL] = lab
        return d


def brats_transforms(
    modalities: Sequence[str] = BRATS_MODALITIES,
    mode: str = "train",
    roi_size: Sequence[int] = (96, 96, 96),
    num_samples: int = 1,
    flip_prob: float = 0.5,
    intensity_aug: bool = True,
) -> Compose:
    """MONAI transform chain for BraTS-style volumes.

    All modes: :class:`LoadModalitiesd` -> ``Orientationd`` (RAS) -> label to ``[TC, WT, ET]`` in the
    case's own convention -> ``NormalizeIntensityd`` (brain voxels, per channel).
    ``train`` adds ``SpatialPadd`` + ``RandCropByPosNegLabeld`` (``roi_size``, tumour/background 1:1)
    + flips + intensity scale/shift. ``eval`` keeps the full volume (sliding-window inference).
    ``infer`` needs no label and keeps what ``Invertd`` needs to write predictions in the input space.

    Args:
        modalities: model modality order.
        mode: ``"train"``, ``"eval"`` or ``"infer"``.
        roi_size: training crop (must be divisible by the network's :attr:`divisor`).
        num_samples: crops per volume (train).
        flip_prob: probability per axis of a flip (train).
        intensity_aug: random intensity scale/shift (train).

    Returns:
        A ``Compose`` for one datalist entry.
    """
    mods = validate_modalities(modalities)
    if mode not in TRANSFORM_MODES:
        raise ValueError(f"brats_transforms: mode must be one of {TRANSFORM_MODES}, got {mode!r}.")
    with_label = mode != "infer"
    keys = [Keys.IMAGE, Keys.LABEL] if with_label else [Keys.IMAGE]
    chain: list[Any] = [
        LoadModalitiesd(mods, load_label=with_label, require_label=with_label),
        Orientationd(keys=keys, axcodes="RAS"),
    ]
    if with_label:
        chain.append(ConvertLabelToRegionsd(keys=Keys.LABEL))
    chain.append(NormalizeIntensityd(keys=Keys.IMAGE, nonzero=True, channel_wise=True))
    if mode == "train":
        roi = [int(r) for r in roi_size]
        chain += [
            SpatialPadd(keys=keys, spatial_size=roi),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key=Keys.LABEL,
                spatial_size=roi,
                pos=1,
                neg=1,
                num_samples=num_samples,
                image_key=Keys.IMAGE,
                image_threshold=0,
            ),
        ]
        if flip_prob > 0:
            chain += [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
        if intensity_aug:
            chain += [
                RandScaleIntensityd(keys=Keys.IMAGE, factors=0.1, prob=1.0),
                RandShiftIntensityd(keys=Keys.IMAGE, offsets=0.1, prob=1.0),
            ]
    return Compose(chain)
