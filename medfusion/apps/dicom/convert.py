"""Write NIfTI volumes as DICOM MR series (one study), e.g. to load a BraTS case into a test PACS.

Neither MONAI nor highdicom writes plain MR image instances from an array (highdicom creates derived objects: SEG,
SR, ...), so the instances are assembled here with pydicom; the geometry comes from
:meth:`highdicom.Volume.from_nibabel` (NIfTI RAS affine -> DICOM LPS, per-slice ImagePositionPatient), so
:func:`medfusion.apps.dicom.volumes.read_series_volume` reads back exactly the voxels and positions of the NIfTI file.
Integer volumes are stored as they are (lossless); float volumes (e.g. z-scored) are stored as int16 with
RescaleSlope/RescaleIntercept (quantised to 1/65535 of their range).

UIDs derive from ``study_key`` (and the series' name), so converting the same case twice gives the same UIDs and
uploading it twice does not duplicate it.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import highdicom as hd
import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = ["SeriesSpec", "DEFAULT_SERIES", "nifti_to_dicom_study", "image_to_dicom_dx", "write_datasets"]


@dataclass(frozen=True)
class SeriesSpec:
    """How one converted series presents itself to a scanner-name rule set.

    Attributes:
        description: SeriesDescription (and ProtocolName).
        attributes: further MR attributes (EchoTime, RepetitionTime, InversionTime, ScanningSequence,
            ContrastBolusAgent, ...).
        orientation: highdicom patient orientation of the array axes (slice stacking, rows, columns): ``"HPL"``
            = axial slices (default), ``"LFP"`` = sagittal, ``"PFL"`` = coronal.
    """

    description: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    orientation: str = "HPL"


#: Scanner-like names and acquisition parameters for the four BraTS modalities (none of them named "t1ce").
DEFAULT_SERIES: dict[str, SeriesSpec] = {
    "flair": SeriesSpec(
        "AX T2 FLAIR",
        {"ScanningSequence": ["SE", "IR"], "EchoTime": 120.0, "RepetitionTime": 9000.0, "InversionTime": 2500.0},
    ),
    "t1": SeriesSpec("AX T1 SE", {"ScanningSequence": "SE", "EchoTime": 10.0, "RepetitionTime": 500.0}),
    "t1ce": SeriesSpec(
        "AX T1 POST GD",
        {"ScanningSequence": "SE", "EchoTime": 10.0, "RepetitionTime": 500.0, "ContrastBolusAgent": "GADOLINIUM"},
    ),
    "t2": SeriesSpec("AX T2 FSE", {"ScanningSequence": "SE", "EchoTime": 100.0, "RepetitionTime": 4000.0}),
}


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["medfusion-convert", *parts])


def _pixels(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored int16 values + (slope, intercept) so that ``stored * slope + intercept`` = ``array``."""
    if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
        return array.astype(np.int16), 1.0, 0.0
    low, high = float(np.min(array)), float(np.max(array))
    slope = (high - low) / 65535.0 if high > low else 1.0
    stored = np.round((array.astype(np.float64) - low) / slope - 32768.0)
    return np.clip(stored, -32768, 32767).astype(np.int16), slope, low + 32768.0 * slope


def nifti_to_dicom_study(
    volumes: Mapping[str, str | os.PathLike | nib.spatialimages.SpatialImage],
    study_key: str,
    series: Mapping[str, SeriesSpec] | None = None,
    patient_id: str = "ANON0001",
    patient_name: str = "Anonymous^Patient",
    accession_number: str = "",
    extra_series: Mapping[str, SeriesSpec] | None = None,
) -> dict[str, list[Dataset]]:
    """Convert co-registered NIfTI volumes to DICOM MR series of one study.

    Args:
        volumes: series key (a modality name such as ``"flair"``) -> NIfTI file or nibabel image; 3D.
        study_key: seeds the Study/Series/SOP Instance UIDs (same key = same UIDs).
        series: key -> :class:`SeriesSpec` (default :data:`DEFAULT_SERIES`).
        patient_id: PatientID.
        patient_name: PatientName.
        accession_number: AccessionNumber.
        extra_series: further series written from the first volume under another name (e.g. a localizer that a
            rule set must leave unused): key -> spec.

    Returns:
        Series key -> its instances (in slice order). All series share one StudyInstanceUID and one
        FrameOfReferenceUID (the volumes are co-registered).

    Raises:
        ValueError: a volume is not 3D, or no spec exists for a key.
    """
    specs = dict(DEFAULT_SERIES if series is None else series)
    study_uid = _uid(study_key, "study")
    frame_uid = _uid(study_key, "frame")
    now = datetime.datetime(2021, 1, 1, 9, 0, 0)
    images = {k: v if isinstance(v, SpatialImage) else _load_nifti(v) for k, v in volumes.items()}
    jobs = [(k, images[k], specs.get(k)) for k in images]
    if extra_series:
        first = next(iter(images.values()))
        jobs += [(k, first, spec) for k, spec in extra_series.items()]
    out: dict[str, list[Dataset]] = {}
    for number, (key, image, spec) in enumerate(jobs, start=1):
        if spec is None:
            raise ValueError(f"no SeriesSpec for {key!r}; known: {sorted(specs)}.")
        if len(image.shape) != 3:
            raise ValueError(f"volume {key!r} has shape {image.shape}; expected a 3D volume.")
        # highdicom: NIfTI RAS affine -> patient LPS; axes permuted to the spec's orientation ("HPL": axial slices
        # stacked head-ward, rows posterior, columns towards the patient's left: the usual axial MR layout)
        vol = hd.Volume.from_nibabel(image, frame_of_reference_uid=frame_uid).to_patient_orientation(spec.orientation)
        stored, slope, intercept = _pixels(np.asarray(vol.array))
        orientation = vol.get_plane_orientation()[0].ImageOrientationPatient
        measures = vol.get_pixel_measures()[0]
        positions = vol.get_plane_positions()
        series_uid = _uid(study_key, key, "series")
        datasets = []
        for k in range(stored.shape[0]):
            ds = Dataset()
            _common(ds, MRImageStorage, _uid(study_key, key, str(k)), study_uid, patient_id, patient_name,
                    accession_number)  # fmt: skip
            ds.StudyDate = now.strftime("%Y%m%d")
            ds.StudyTime = now.strftime("%H%M%S")
            ds.Modality = "MR"
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = number
            ds.SeriesDescription = spec.description
            ds.ProtocolName = spec.description
            ds.Manufacturer = "medfusion-convert"
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = positions[k][0].ImagePositionPatient
            ds.ImageOrientationPatient = orientation
            ds.PixelSpacing = measures.PixelSpacing
            ds.SliceThickness = measures.SliceThickness
            ds.SpacingBetweenSlices = measures.SpacingBetweenSlices
            ds.MRAcquisitionType = "2D"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MagneticFieldStrength = 3.0
            for attr, value in spec.attributes.items():
                setattr(ds, attr, value)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept
            ds.RescaleType = "US"
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            datasets.append(ds)
        out[key] = datasets
    return out


def _load_nifti(path: str | os.PathLike) -> SpatialImage:
    return cast(SpatialImage, nib.load(str(path)))  # NIfTI files load as spatial images


def _common(ds: Dataset, sop_class: str, sop_uid: str, study_uid: str, patient_id: str, patient_name: str,
            accession_number: str) -> None:  # fmt: skip
    """File meta, SOP, patient and study attributes shared by the converters."""
    ds.preamble = b"\x00" * 128
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20210101"
    ds.StudyTime = "090000"
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""


def image_to_dicom_dx(
    image: np.ndarray | str | os.PathLike,
    study_key: str,
    accession_number: str = "",
    patient_id: str = "ANON0001",
    patient_name: str = "Anonymous^Patient",
    view_position: str = "PA",
    pixel_spacing: float = 0.2,
) -> Dataset:
    """A 2D image (array, or a PNG/JPEG file) as a chest X-ray DICOM (Digital X-Ray, For Presentation; Modality DX).

    Args:
        image: ``[rows, cols]`` grey values (RGB files are converted to grey), scaled to 12 bits.
        study_key: seeds the UIDs.
        accession_number: AccessionNumber (the key of the clinical CSV).
        patient_id: PatientID.
        patient_name: PatientName.
        view_position: ViewPosition (PA, AP, LL, ...).
        pixel_spacing: ImagerPixelSpacing/PixelSpacing in mm.

    Returns:
        One instance (its own study and series).
    """
    if not isinstance(image, np.ndarray):
        from PIL import Image

        with Image.open(image) as im:
            image = np.asarray(im.convert("L"))
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"image_to_dicom_dx: expected a 2D grey image, got shape {arr.shape}.")
    low, high = float(arr.min()), float(arr.max())
    stored = np.round((arr - low) / (high - low) * 4095.0 if high > low else np.zeros_like(arr)).astype(np.uint16)
    ds = Dataset()
    _common(ds, DigitalXRayImageStorageForPresentation, _uid(study_key, "dx", "instance"), _uid(study_key, "study"),
            patient_id, patient_name, accession_number)  # fmt: skip
    ds.Modality = "DX"
    ds.SeriesInstanceUID = _uid(study_key, "dx", "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"CHEST {view_position}"
    ds.Manufacturer = "medfusion-convert"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"] if view_position == "AP" else ["R", "F"]
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def write_datasets(datasets: Mapping[str, list[Dataset]] | list[Dataset], folder: str | os.PathLike) -> list[Path]:
    """Write instances as ``<folder>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (a DICOM folder a study is read from).

    Returns:
        The written paths.
    """
    items = [ds for group in datasets.values() for ds in group] if isinstance(datasets, Mapping) else list(datasets)
    paths = []
    for ds in items:
        path = Path(folder) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
