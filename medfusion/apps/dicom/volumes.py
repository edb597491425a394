"""DICOM series -> volumes on one grid -> the MONAI tensors a bundle model reads, and back.

Geometry is highdicom's: :func:`highdicom.get_volume_from_series` sorts a series' single-frame instances along
the slice normal, checks regular spacing and returns a :class:`highdicom.Volume` (array ``[slices, rows, cols]``,
affine in the DICOM patient coordinate system, LPS). The channel stack the model reads is built on the grid of ONE
reference series (the first present modality in the model's order, FLAIR when present); the SEG references that
series frame by frame.

Co-registration assumptions (what a BraTS-style model needs and what this module checks):

* All used series share one FrameOfReferenceUID: their patient coordinates are the same space, so a voxel position
  in one series is the same anatomy in another. A different frame of reference is an error naming the series
  (registering them is outside this pipeline: run your registration first and store the registered series).
* Within a frame of reference, the series are assumed to be BraTS-style co-registered (skull-stripped or not, same
  head position). A series on the reference grid is used as is; one that differs only by axis order/flips/padding
  is matched exactly (:meth:`highdicom.Volume.match_geometry`, no interpolation); any other grid (another spacing,
  field of view or slice orientation) is resampled onto the reference grid with SimpleITK (linear, identity
  transform, zero outside) and reported as resampled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset

__all__ = [
    "LPS_TO_RAS",
    "SeriesVolume",
    "read_series_volume",
    "check_frame_of_reference",
    "to_reference_grid",
    "stack_on_grid",
    "volume_to_metatensor",
]

logger = logging.getLogger(__name__)

#: DICOM patient coordinates (LPS) -> NIfTI/MONAI world coordinates (RAS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SeriesVolume:
    """One series as a volume.

    Attributes:
        name: how errors name the series (``t1ce: #3 "AX T1 +C" (1.2.3...)``).
        volume: the image, ``array`` ``[slices, rows, cols]`` float32.
        datasets: the instances sorted in the volume's slice order (``datasets[k]`` is ``volume.array[k]``).
        frame_of_reference_uid: FrameOfReferenceUID of the series.
    """

    name: str
    volume: hd.Volume
    datasets: list[Dataset]
    frame_of_reference_uid: str


def read_series_volume(datasets: Sequence[Dataset], name: str) -> SeriesVolume:
    """Build a volume from a series' single-frame instances.

    Args:
        datasets: the instances (any order), pixel data included.
        name: the series' name for error messages.

    Raises:
        ValueError: no instances, multi-frame instances, no common FrameOfReferenceUID, or slices that do not
            form a regular volume (the message names the series and says why).
    """
    if not datasets:
        raise ValueError(f"series {name}: no instances were retrieved.")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise ValueError(
            f"series {name}: multi-frame (enhanced) MR instances are not supported; expected single-frame."
        )
    frames = {str(getattr(ds, "FrameOfReferenceUID", "")) for ds in datasets}
    if len(frames) != 1 or "" in frames:
        raise ValueError(f"series {name}: instances must share one FrameOfReferenceUID, found {sorted(frames)}.")
    try:
        _, positions = hd.image.get_series_volume_positions(datasets)
        if positions is None:
            raise ValueError("slices are not regularly spaced along one normal")
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except (ValueError, RuntimeError, AttributeError) as err:
        raise ValueError(f"series {name}: cannot form a volume from its {len(datasets)} instances ({err}).") from None
    ordered = [ds for _, ds in sorted(zip(positions, datasets), key=lambda p: p[0])]
    return SeriesVolume(name=name, volume=volume, datasets=ordered, frame_of_reference_uid=frames.pop())


def check_frame_of_reference(series: Mapping[str, SeriesVolume]) -> str:
    """The common FrameOfReferenceUID of the used series.

    Raises:
        ValueError: the series disagree; the message names every series and its frame of reference.
    """
    frames = {s.frame_of_reference_uid for s in series.values()}
    if len(frames) > 1:
        detail = "; ".join(
            f"{m}: {s.name} has FrameOfReferenceUID {s.frame_of_reference_uid}" for m, s in series.items()
        )
        raise ValueError(
            f"the series are not in one frame of reference ({detail}). The model needs co-registered series: "
            "register them to one frame of reference first."
        )
    return frames.pop()


def to_reference_grid(volume: hd.Volume, reference: hd.Volume, name: str) -> tuple[hd.Volume, str]:
    """Bring ``volume`` onto the grid of ``reference``.

    Returns:
        ``(volume on the reference grid, how)`` with ``how`` = ``"same grid"``, ``"reoriented"`` (exact axis
        permutation/flip/pad/crop) or ``"resampled"`` (linear interpolation, SimpleITK).
    """
    if volume.geometry_equal(reference):
        return volume, "same grid"
    try:
        return volume.match_geometry(reference), "reoriented"
    except RuntimeError:
        pass
    import SimpleITK as sitk  # imported here: only needed when grids differ

    moving = volume.to_simpleitk()
    target = reference.to_simpleitk()
    resampled = sitk.Resample(moving, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out = hd.Volume.from_simpleitk(resampled, frame_of_reference_uid=reference.frame_of_reference_uid)
    out = out.match_geometry(reference)
    logger.info("series %s resampled onto the reference grid %s", name, reference.spatial_shape)
    return out, "resampled"


def stack_on_grid(
    series: Mapping[str, SeriesVolume], modalities: Sequence[str], reference: str
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Stack the present modalities on the reference grid, zero-filling absent ones.

    Args:
        series: present modality -> its volume.
        modalities: the model's modality order.
        reference: the modality whose grid is used.

    Returns:
        ``(image [M, slices, rows, cols] float32, modality_mask bool [M], modality -> how it got on the grid)``.
    """
    ref = series[reference].volume
    channels, present, how = [], [], {}
    for m in modalities:
        if m in series:
            vol, how[m] = to_reference_grid(series[m].volume, ref, series[m].name)
            channels.append(np.asarray(vol.array, dtype=np.float32))
            present.append(True)
        else:
            channels.append(np.zeros(ref.spatial_shape, dtype=np.float32))
            present.append(False)
    return np.stack(channels), np.asarray(present, dtype=bool), how


def volume_to_metatensor(array: np.ndarray, reference: hd.Volume) -> MetaTensor:
    """``[C, slices, rows, cols]`` on ``reference``'s grid -> MONAI ``MetaTensor`` with the RAS affine MONAI expects.

    MONAI's ``Orientationd``/``Invertd`` then treat it exactly like a NIfTI volume with the same geometry.
    """
    affine = torch.as_tensor(LPS_TO_RAS @ reference.affine, dtype=torch.float64)
    meta = {"original_affine": affine.clone(), "space": "RAS"}
    return MetaTensor(torch.as_tensor(array), affine=affine, meta=meta)
