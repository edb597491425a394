"""Volume loading and BraTS transform chains built from MONAI transforms.

:class:`LoadModalitiesd` is the one piece MONAI has no equivalent for: it reads the modalities of
one case BY NAME (separate files, or an MSD 4D file whose channel order comes from
``dataset.json``), zero-fills absent ones, checks that every volume of the case is 3D and has the
same shape, and writes the stacked ``image`` ``[M, D, H, W]`` (channels in the model's modality
order), the ``modality_mask`` and the foreground ``brain_mask`` ``[1, D, H, W]``. Reading itself is
MONAI's ``LoadImage`` (nibabel), so orientation and spacing metadata travel with the tensor.

Foreground: the brain mask file when the entry gives one (volume manifest column ``brain_mask``),
otherwise the non-zero region of the present volumes (skull-stripped releases have background 0).
Intensity normalisation (:class:`ForegroundNormalized`) and the negative training crops use it, so a
z-scored export whose background is not 0 trains like the original once its brain mask is given.
Without a mask such a volume is detected (:func:`nonzero_background`) and warned about, here and in
``medfusion check-data``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    DeleteItemsd,
    LoadImage,
    MapTransform,
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

__all__ = ["LoadModalitiesd", "ForegroundNormalized", "brats_transforms", "nonzero_background", "TRANSFORM_MODES"]

logger = logging.getLogger(__name__)

TRANSFORM_MODES = ("train", "eval", "infer")


def nonzero_background(volume: np.ndarray | torch.Tensor, min_zero_fraction: float = 0.5) -> float | None:
    """The background value of a volume whose background is NOT zero, else ``None``.

    The background is read on the six outer faces of the volume (the first three axes): a
    skull-stripped release has them all 0; a z-scored export has them at ``-mean / std`` of the brain
    (e.g. -0.53); a volume that was not skull-stripped has noise there.

    Args:
        volume: ``[X, Y, Z]`` or ``[X, Y, Z, C]`` (channels last, as nibabel reads them).
        min_zero_fraction: the background counts as zero when at least this fraction of the face
            voxels is exactly 0.

    Returns:
        The median face value when fewer than ``min_zero_fraction`` of the face voxels are 0, else ``None``.
    """
    a = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if a.ndim < 3 or a.size == 0:
        return None
    faces = np.concatenate(
        [a[0].ravel(), a[-1].ravel(), a[:, 0].ravel(), a[:, -1].ravel(), a[:, :, 0].ravel(), a[:, :, -1].ravel()]
    )
    if np.count_nonzero(faces == 0) >= min_zero_fraction * faces.size:
        return None
    return float(np.median(faces))


class ForegroundNormalized(MapTransform):
    """Z-score each channel over the foreground voxels only; voxels outside the foreground become 0.

    ``(x - mean_c) / std_c`` with the mean and (population) standard deviation of channel ``c`` over
    the voxels where ``d[mask_key] > 0`` (a std of 0 divides by 1, as MONAI does). MONAI's
    ``NormalizeIntensityd`` can only take the non-zero voxels of each channel, not a given mask, which
    is what a z-scored export (background not 0) needs. With the default mask (non-zero region of the
    volumes) this equals ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` up to voxels that are
    0 in one channel but not in another. An all-zero channel (a missing modality) stays 0.

    When the sample has no ``mask_key`` (a chain fed with an already stacked image instead of
    :class:`LoadModalitiesd`), the foreground is the non-zero region of the first image key, and it
    is stored under ``mask_key`` for the crops that follow.

    Args:
        keys: image keys ``[C, *S]``.
        mask_key: foreground mask key ``[1, *S]``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = Keys.BRAIN_MASK, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = str(mask_key)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Normalise the image keys of one sample."""
        d = dict(data)
        if self.mask_key not in d:
            first = next(iter(self.key_iterator(d)), None)
            if first is None:
                return d
            d[self.mask_key] = (torch.as_tensor(d[first]) != 0).any(dim=0, keepdim=True).to(torch.uint8)
        mask = torch.as_tensor(d[self.mask_key])[0] > 0
        for key in self.key_iterator(d):
            img = d[key]
            out = img.clone().float() if isinstance(img, torch.Tensor) else torch.as_tensor(img).float()
            raw = out.as_tensor() if isinstance(out, MetaTensor) else out  # shares storage with out
            for c in range(raw.shape[0]):
                vals = raw[c][mask]
                if vals.numel() == 0:
                    raw[c].zero_()
                    continue
                mean, std = vals.mean(), vals.std(unbiased=False)
                std = torch.where(std > 0, std, torch.ones_like(std))
                raw[c] = torch.where(mask, (raw[c] - mean) / std, torch.zeros((), dtype=raw.dtype))
            d[key] = out
        return d


class LoadModalitiesd(Transform):
    """Load one case's modalities (and label) into ``image`` ``[M, *S]``, ``label`` ``[1, *S]``, ``modality_mask``.

    Input entries come from :func:`medfusion.data.brats.discover_brats`: either one path (or ``None``)
    per modality name, or ``image_4d`` + ``image_4d_channels`` (MSD), and optionally ``brain_mask``
    (a path). The per-modality path keys are removed from the output (``None`` does not collate); the
    file names stay in ``image.meta["modality_files"]``, and ``image.meta["filename_or_obj"]`` becomes
    ``<case folder>/<case_id>.nii.gz`` so ``SaveImaged`` names predictions after the case.
    ``brain_mask`` becomes the foreground ``[1, *S]`` (uint8): the mask file's voxels > 0, or the
    voxels where any present modality is non-zero.

    Args:
        modalities: model modality order.
        load_label: read ``label`` (a path) as ``[1, *S]``.
        require_label: a missing label path is an error (naming the case).
        dtype: image dtype.

    Raises:
        FileNotFoundError / ValueError: unreadable or missing file, a volume that is not 3D, shape
            mismatch inside a case, no modality present, an empty brain mask; every message names the
            case and the file.
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
        self._warned: set[str] = set()

    def _read(self, path: str, case: str, what: str) -> MetaTensor:
        if not Path(path).is_file():
            raise FileNotFoundError(f"case {case}: {what} file {path} does not exist.")
        try:
            vol = self.loader(path)
        except Exception as err:  # nibabel/gzip raise many types for corrupt files; report them as one
            raise ValueError(f"case {case}: cannot read {what} file {path} ({type(err).__name__}: {err}).") from None
        if vol.ndim != 4:
            raise ValueError(
                f"case {case}: {what} file {path} has shape {tuple(vol.shape[1:])}; expected a 3D volume "
                "(a case stored as 2D slices cannot be segmented in 3D)."
            )
        return vol

    def _foreground(self, d: dict[Hashable, Any], case: str, image: MetaTensor, files: Mapping[str, str]) -> None:
        """Set ``d["brain_mask"]``: the given mask file (> 0), else the non-zero region of ``image``."""
        path = d.pop(Keys.BRAIN_MASK, None)
        spatial = tuple(image.shape[1:])
        if path is not None and not isinstance(path, torch.Tensor):
            mask = self._read(str(path), case, "brain mask")
            if tuple(mask.shape[1:]) != spatial:
                raise ValueError(f"case {case}: brain mask {path} has shape {tuple(mask.shape[1:])}, images {spatial}.")
            fg = mask[:1] > 0
            if not bool(fg.any()):
                raise ValueError(f"case {case}: brain mask {path} holds no voxel > 0.")
            meta = dict(mask.meta)
        else:
            fg = (image != 0).any(dim=0, keepdim=True)
            meta = dict(image.meta)
            if case not in self._warned:
                for m, f in files.items():
                    value = nonzero_background(image[self.modalities.index(m)]) if m in self.modalities else None
                    if value is not None:
                        self._warned.add(case)
                        logger.warning(
                            "case %s: the background of %s (%s) is not 0 (border value %.4g; z-scored?) and no brain "
                            "mask is given: normalisation and crops treat the whole volume as brain. Give the mask "
                            "in a volume manifest's brain_mask column (docs/data.md).",
                            case, m, f, value,
                        )  # fmt: skip
                        break
        d[Keys.BRAIN_MASK] = MetaTensor(fg.to(torch.uint8).as_subclass(torch.Tensor), meta=meta)

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
                    vols[name] = cast(MetaTensor, vol[i : i + 1])  # MetaTensor slices are MetaTensors
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
            cast(MetaTensor, vols[m][0]).as_tensor().to(self.dtype)  # MetaTensor indexing gives a MetaTensor
            if present[i]
            else torch.zeros(spatial, dtype=self.dtype)
            for i, m in enumerate(self.modalities)
        ]
        meta = dict(ref.meta)
        meta["modality_files"] = dict(files)
        first = Path(next(iter(files.values())).split("#")[0])
        meta["filename_or_obj"] = str(first.parent / f"{case}.nii.gz")
        d[Keys.IMAGE] = MetaTensor(torch.stack(chans), meta=meta)
        d[Keys.MASK] = torch.tensor(present, dtype=torch.bool)
        self._foreground(d, case, d[Keys.IMAGE], {m: files[m] for m in files if m in self.modalities})
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
    case's own convention -> :class:`ForegroundNormalized` (per channel, over the brain mask or the
    non-zero region). ``train`` adds ``SpatialPadd`` + ``RandCropByPosNegLabeld`` (``roi_size``,
    tumour/background 1:1, background crops centred inside the brain mask / non-zero region) + flips +
    intensity scale/shift. ``eval`` keeps the full volume (sliding-window inference). ``infer`` needs
    no label and keeps what ``Invertd`` needs to write predictions in the input space. The
    ``brain_mask`` key is dropped once used.

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
    spatial = [*keys, Keys.BRAIN_MASK]
    chain: list[Any] = [
        LoadModalitiesd(mods, load_label=with_label, require_label=with_label),
        Orientationd(keys=keys, axcodes="RAS"),
        # absent when the chain is fed an already stacked image (ForegroundNormalized then builds it)
        Orientationd(keys=Keys.BRAIN_MASK, axcodes="RAS", allow_missing_keys=True),
    ]
    if with_label:
        chain.append(ConvertLabelToRegionsd(keys=Keys.LABEL))
    chain.append(ForegroundNormalized(keys=Keys.IMAGE, mask_key=Keys.BRAIN_MASK))
    if mode == "train":
        roi = [int(r) for r in roi_size]
        chain += [
            SpatialPadd(keys=spatial, spatial_size=roi),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key=Keys.LABEL,
                spatial_size=roi,
                pos=1,
                neg=1,
                num_samples=num_samples,
                image_key=Keys.BRAIN_MASK,
                image_threshold=0,
            ),
        ]
    chain.append(DeleteItemsd(keys=Keys.BRAIN_MASK))
    if mode == "train":
        if flip_prob > 0:
            chain += [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in range(3)]
        if intensity_aug:
            chain += [
                RandScaleIntensityd(keys=Keys.IMAGE, factors=0.1, prob=1.0),
                RandShiftIntensityd(keys=Keys.IMAGE, offsets=0.1, prob=1.0),
            ]
    return Compose(chain)
