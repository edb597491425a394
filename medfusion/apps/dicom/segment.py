"""``medfusion dicom-segment``: a DICOM MR study in, a DICOM Segmentation (+ JSON, QA PNG, optional NIfTI) out.

One study, from a DICOMweb server (QIDO-RS search, WADO-RS retrieve) or a DICOM folder:

1. its series are mapped to the model's modalities by rules (:mod:`medfusion.apps.dicom.rules`); the mapping and
   the unused series are reported; an absent modality is a missing modality (error only when none is left);
2. the used series are read into volumes, checked to share one frame of reference and put on the grid of the
   reference series (FLAIR, or the first present modality in the model's order; :mod:`~medfusion.apps.dicom.volumes`
   states the co-registration assumptions);
3. the bundle's network runs with exactly the present combination (``modality_mask``), through the same MONAI steps
   as the bundle's ``configs/inference.json``: ``Orientationd`` (RAS) + ``NormalizeIntensityd`` from
   :func:`medfusion.data.volume.brats_transforms` (``"infer"``), the bundle's sliding-window inferer, sigmoid,
   threshold 0.5, regions -> labels in the model's convention, ``Invertd`` back to the series' grid;
4. the result is written as a DICOM Segmentation (highdicom; segments TC/WT/ET, or one per label value, with SNOMED
   CT codes; referencing the reference series frame by frame, the other used series, and the frame of reference), a
   JSON sidecar, a QA PNG and optionally a NIfTI label map, into
   ``<output_dir>/<StudyInstanceUID>/<SEG SeriesInstanceUID>/``;
5. optionally the SEG is sent (STOW-RS) back to the source server, to another server or to a folder.

Idempotency and versions: the SEG's Series and SOP Instance UIDs are derived from the study, the used series (and
which modality each one is), the checkpoint's SHA-256, the inference settings and the medfusion version. Re-running
the same model on the same study gives the same UIDs: the existing result folder is reused (nothing is recomputed
unless ``overwrite``) and STOW-RS skips instances the destination already holds, so nothing is duplicated. A new
model, new settings or a changed study (e.g. a T2 series arrived) gives new UIDs: a NEW SEG series (a new version)
beside the earlier ones, which are left untouched and listed in the sidecar under ``other_versions``. Removing old
versions is left to the PACS administrator (DICOMweb has no standard delete).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import medfusion
from medfusion.apps.dicom.models import SegmentationModel
from medfusion.apps.dicom.qa import save_qa_png
from medfusion.apps.dicom.results import SIDECAR, open_target, result_uids, send_result
from medfusion.apps.dicom.rules import RuleSet, SeriesMapping, map_series
from medfusion.apps.dicom.source import DicomStore
from medfusion.apps.dicom.volumes import (
    SeriesVolume,
    check_frame_of_reference,
    read_series_volume,
    stack_on_grid,
    volume_to_metatensor,
)
from medfusion.data.labels import LabelConvention, regions_to_labels
from medfusion.data.volume import LoadModalitiesd, brats_transforms
from medfusion.io import atomic_output_dir
from medfusion.modality import Keys, combination_name

__all__ = ["SEGMENT_MODES", "SegmentResult", "predict_labels", "segment_descriptions", "dicom_segment"]

logger = logging.getLogger(__name__)

SEGMENT_MODES = ("regions", "labels")
SEG_FILE = "seg.dcm"
QA_FILE = "qa.png"
NIFTI_FILE = "seg.nii.gz"
#: Co-registration assumptions, written into every sidecar.
ASSUMPTIONS = (
    "All used series share one FrameOfReferenceUID and are co-registered (BraTS-style); series on another grid of the "
    "same frame of reference are matched exactly (axis order/flips/padding) or resampled linearly onto the reference "
    "series' grid; no registration is performed."
)


@dataclass
class SegmentResult:
    """What :func:`dicom_segment` produced.

    Attributes:
        folder: the result folder.
        sidecar: the JSON sidecar's content.
        reused: True when an earlier identical result was found and reused (nothing recomputed).
    """

    folder: Path
    sidecar: dict[str, Any]
    reused: bool

    @property
    def seg_path(self) -> Path:
        """The DICOM Segmentation file."""
        return self.folder / SEG_FILE

    @property
    def qa_path(self) -> Path:
        """The QA PNG."""
        return self.folder / QA_FILE


def predict_labels(
    model: SegmentationModel, image: MetaTensor, mask: np.ndarray
) -> tuple[MetaTensor, MetaTensor, MetaTensor]:
    """Run the network on one stacked case the way the bundle's ``inference.json`` does.

    Args:
        model: loaded segmentation model.
        image: ``[M, *S]`` channels in the model's modality order (absent ones zero), RAS affine.
        mask: bool ``[M]`` present modalities.

    Returns:
        ``(labels [1, *S] uint8 on the input grid, image [M, X, Y, Z] after preprocessing (RAS),
        labels [1, X, Y, Z] in RAS)``.
    """
    # the bundle's preprocessing without its file loader (the volumes come from DICOM, already stacked)
    chain = brats_transforms(model.modalities, "infer")
    pre = Compose([t for t in chain.transforms if not isinstance(t, LoadModalitiesd)])
    data = pre({Keys.IMAGE: image, Keys.MASK: torch.as_tensor(mask, dtype=torch.bool)})
    x = data[Keys.IMAGE]
    device = model.loaded.device
    with torch.no_grad():
        logits = model.inferer(
            x.as_tensor()[None].to(device),
            model.network,
            modality_mask=data[Keys.MASK][None].to(device),
        )
    regions = (torch.sigmoid(logits[0].float()) >= 0.5).float().cpu()
    labels_ras = regions_to_labels(regions, model.label_convention)
    pred = MetaTensor(labels_ras.clone(), meta=dict(x.meta), applied_operations=list(x.applied_operations))
    data[Keys.PRED] = pred
    inverted = Invertd(keys=Keys.PRED, transform=pre, orig_keys=Keys.IMAGE, nearest_interp=True, to_tensor=True)(data)
    labels = inverted[Keys.PRED]
    labels_ras = MetaTensor(labels_ras, meta=dict(x.meta))
    return labels.to(torch.uint8), x, labels_ras


def _regions(labels: np.ndarray, conv: LabelConvention, mode: str) -> list[tuple[str, str, np.ndarray]]:
    """``[(short label, long name, bool mask)]`` of the segments (TC/WT/ET, or one per label value)."""
    if mode == "regions":
        names = {"TC": "tumor core", "WT": "whole tumor", "ET": "enhancing tumor"}
        return [(r, names[r], np.isin(labels, conv.regions[r])) for r in ("TC", "WT", "ET")]
    items = [("NCR", "necrotic/non-enhancing core", conv.necrosis), ("ED", "edema", conv.edema),
             ("ET", "enhancing tumor", conv.enhancing)]  # fmt: skip
    return [(short, f"{name} (label {value})", labels == value) for short, name, value in items]


def segment_descriptions(
    mode: str, conv: LabelConvention, algorithm: hd.AlgorithmIdentificationSequence
) -> list[hd.seg.SegmentDescription]:
    """Highdicom segment descriptions (coded concepts, SNOMED CT).

    Category: Morphologically Abnormal Structure (SCT 49755003). Property types: regions TC/WT/ET and ET label:
    Neoplasm (SCT 108369006) -- there is no dedicated SNOMED concept for the BraTS sub-regions, the segment label
    names them; NCR: Necrosis (SCT 6574001); ED: Edema (SCT 79654002). Anatomic region: Brain (SCT 12738006).
    """
    types = {"TC": codes.SCT.Neoplasm, "WT": codes.SCT.Neoplasm, "ET": codes.SCT.Neoplasm,
             "NCR": codes.SCT.Necrosis, "ED": codes.SCT.Edema}  # fmt: skip
    out = []
    for number, (short, name, _) in enumerate(_regions(np.zeros(1, np.uint8), conv, mode), start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{short} {name}"[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=types[short],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_id=short,
                tracking_uid=generate_uid(entropy_srcs=["medfusion-segment-tracking", mode, short]),
                anatomic_regions=[codes.SCT.Brain],
            )
        )
    return out


def _series_description(present: Sequence[str], missing: Sequence[str], segments: str) -> str:
    text = f"medfusion {'TC/WT/ET' if segments == 'regions' else 'labels'} {combination_name(present)}"
    if missing:
        text += f" (missing {','.join(missing)})"
    return text[:64]  # LO


def _build_seg(
    ref: SeriesVolume,
    labels: np.ndarray,
    used: Mapping[str, SeriesVolume],
    model: SegmentationModel,
    segments: str,
    series_uid: str,
    sop_uid: str,
    description: str,
    combination: str,
) -> hd.seg.Segmentation:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medfusion {model.loaded.bundle.name}"[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=medfusion.__version__,
        parameters={"combination": combination, "checkpoint_sha256": model.loaded.checkpoint_sha256[:16]},
    )
    masks = np.stack([m for _, _, m in _regions(labels, model.label_convention, segments)], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=ref.datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(segments, model.label_convention, algorithm),
        series_instance_uid=series_uid,
        series_number=int(9000 + int(series_uid[-3:]) % 1000),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="medfusion",
        manufacturer_model_name=f"dicom-segment {model.loaded.bundle.name}"[:64],
        software_versions=medfusion.__version__,
        device_serial_number=model.loaded.checkpoint_sha256[:16],
        series_description=description,
        content_description=f"combination {combination}"[:64],
        content_label="TUMOR",
        omit_empty_frames=False,
    )
    # every other used series is a source too: list it in the Common Instance Reference module
    for _, other in used.items():
        if other is ref:
            continue
        item = Dataset()
        item.SeriesInstanceUID = str(other.datasets[0].SeriesInstanceUID)
        refs = []
        for ds in other.datasets:
            r = Dataset()
            r.ReferencedSOPClassUID = ds.SOPClassUID
            r.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            refs.append(r)
        item.ReferencedInstanceSequence = refs
        seg.ReferencedSeriesSequence.append(item)
    return seg


def _write_nifti(labels: MetaTensor, path: Path) -> None:
    import nibabel as nib

    affine = np.asarray(labels.affine, dtype=np.float64)
    nib.save(nib.Nifti1Image(np.asarray(labels[0], dtype=np.uint8), affine), str(path))


def dicom_segment(
    source: str | os.PathLike | DicomStore,
    model: SegmentationModel,
    output_dir: str | os.PathLike,
    *,
    study_uid: str | None = None,
    accession_number: str | None = None,
    rules: RuleSet | None = None,
    segments: str = "regions",
    nifti: bool = False,
    send: str | os.PathLike | DicomStore | None = None,
    overwrite: bool = False,
) -> SegmentResult:
    """Segment one DICOM study and write (and optionally send) a DICOM Segmentation.

    Args:
        source: DICOMweb base URL, DICOM folder, or an open :class:`DicomStore`.
        model: from :func:`~medfusion.apps.dicom.models.load_segmentation_model`.
        output_dir: results go to ``<output_dir>/<StudyInstanceUID>/<SEG SeriesInstanceUID>/``.
        study_uid: the study (default: the only study of the source, or the one of ``accession_number``).
        accession_number: pick the study by AccessionNumber.
        rules: series -> modality rules (default :func:`~medfusion.apps.dicom.rules.default_rules`).
        segments: ``"regions"`` (TC, WT, ET; overlapping) or ``"labels"`` (one segment per label value).
        nifti: also write ``seg.nii.gz`` (label map in the model's convention, on the reference series' grid).
        send: ``"source"`` (back to where the study came from), a DICOMweb URL, a folder, or a store.
        overwrite: recompute and replace an existing identical result folder.

    Returns:
        The result (folder, sidecar, whether an earlier identical result was reused).

    Raises:
        ValueError: no series maps to any of the model's modalities (the message lists the study's series and why each
            was not used); series in different frames of reference (the message names them); unreadable series.
    """
    if segments not in SEGMENT_MODES:
        raise ValueError(f"segments must be one of {SEGMENT_MODES}, got {segments!r}.")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    store = source if isinstance(source, DicomStore) else DicomStore.open(source, readonly=True)
    study = store.resolve_study(study_uid, accession_number)
    mapping = map_series(store.series(study), model.modalities, rules)
    logger.info("study %s series mapping:\n%s", study, mapping.to_text())
    if not mapping.present:
        raise ValueError(
            f"study {study} in {store.location}: no series maps to any of the model's modalities "
            f"{list(model.modalities)}; series found:\n{mapping.to_text()}\n(adjust the rules with --rules FILE)"
        )
    series_uid, sop_uid = result_uids(
        "dicom-segment",
        {
            "study": study,
            "series": {m: mapping.used[m].series_uid for m in mapping.present},
            "checkpoint_sha256": model.loaded.checkpoint_sha256,
            "overrides": model.loaded.overrides,
            "settings": model.settings,
            "segments": segments,
        },
    )
    folder = Path(output_dir) / study / series_uid
    timings["query_s"] = time.perf_counter() - t0
    complete = (folder / SIDECAR).is_file() and (folder / SEG_FILE).is_file()
    reused = complete and not overwrite and (not nifti or (folder / NIFTI_FILE).is_file())
    if reused:
        logger.info("study %s: identical result already in %s (pass overwrite to recompute)", study, folder)
        sidecar = json.loads((folder / SIDECAR).read_text())
    else:
        # an earlier identical result without the NIfTI asked for now is recomputed (same UIDs, same SEG)
        replace = overwrite or complete
        sidecar = _compute(store, study, mapping, model, segments, nifti, folder, series_uid, sop_uid, timings, replace)
    if send is not None:
        sidecar = send_result(folder / SEG_FILE, open_target(send, store), study, series_uid, "SEG", sidecar)
    return SegmentResult(folder=folder, sidecar=sidecar, reused=reused)


def _compute(
    store: DicomStore,
    study: str,
    mapping: SeriesMapping,
    model: SegmentationModel,
    segments: str,
    nifti: bool,
    folder: Path,
    series_uid: str,
    sop_uid: str,
    timings: dict[str, float],
    overwrite: bool,
) -> dict[str, Any]:
    t = time.perf_counter()
    volumes: dict[str, SeriesVolume] = {}
    for m in mapping.present:
        info = mapping.used[m]
        volumes[m] = read_series_volume(store.retrieve(study, info.series_uid), f"{m}: {info.label()}")
    timings["retrieve_read_s"] = time.perf_counter() - t
    frame_uid = check_frame_of_reference(volumes)
    reference = mapping.present[0]
    ref = volumes[reference]
    stacked, mask, grid = stack_on_grid(volumes, model.modalities, reference)
    image = volume_to_metatensor(stacked, ref.volume)
    t = time.perf_counter()
    labels, image_ras, labels_ras = predict_labels(model, image, mask)
    timings["inference_s"] = time.perf_counter() - t
    combination = combination_name(mapping.present)
    description = _series_description(mapping.present, mapping.missing, segments)
    t = time.perf_counter()
    seg = _build_seg(
        ref, np.asarray(labels[0]), volumes, model, segments, series_uid, sop_uid, description, combination
    )
    regions_ras = {
        short: mask_ for short, _, mask_ in _regions(np.asarray(labels_ras[0]), model.label_convention, segments)
    }
    if segments == "regions":  # draw WT first (it picks the slices), then TC, ET
        regions_ras = {k: regions_ras[k] for k in ("WT", "TC", "ET")}
    counts = {short: int(m.sum()) for short, m in regions_ras.items()}
    spacing = [float(s) for s in np.sqrt((np.asarray(image_ras.affine)[:3, :3] ** 2).sum(axis=0))]
    sidecar: dict[str, Any] = {
        "study_instance_uid": study,
        "source": {"location": store.location, "kind": store.kind},
        "modalities": list(model.modalities),
        "used_modalities": list(mapping.present),
        "missing_modalities": list(mapping.missing),
        "combination": combination,
        "series_mapping": mapping.report(),
        "reference_series": {"modality": reference, "series_uid": mapping.used[reference].series_uid},
        "frame_of_reference_uid": frame_uid,
        "grid": {
            "shape": [int(s) for s in ref.volume.spatial_shape],
            "spacing_mm": [float(s) for s in ref.volume.spacing],
            "how_each_series_got_there": grid,
        },
        "assumptions": ASSUMPTIONS,
        "model": {
            "bundle": str(model.loaded.bundle),
            "checkpoint": str(model.loaded.checkpoint),
            "checkpoint_sha256": model.loaded.checkpoint_sha256,
            "overrides": model.loaded.overrides,
            "settings": model.settings,
            "device": str(model.loaded.device),
        },
        "label_convention": {"name": model.label_convention.name, "values": dict(model.label_convention._asdict())},
        "segments": {
            "mode": segments,
            "names": [d.SegmentLabel for d in seg.SegmentSequence],
            "voxels": counts,
        },
        "seg": {
            "series_instance_uid": series_uid,
            "sop_instance_uid": sop_uid,
            "series_description": description,
            "file": SEG_FILE,
        },
        "qa_png": QA_FILE,
        "nifti": NIFTI_FILE if nifti else None,
        "medfusion_version": medfusion.__version__,
        "idempotency": "same study series + model + settings -> same UIDs: reused, never stored twice; "
        "anything else -> a new SEG series (version) beside the earlier ones",
    }
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        seg.save_as(tmp / SEG_FILE, enforce_file_format=True)
        background = np.asarray(image_ras[model.modalities.index(reference)])
        title = f"{study[-24:]}  combination: {combination}" + (
            f"  (missing: {', '.join(mapping.missing)})" if mapping.missing else ""
        )
        save_qa_png(background, regions_ras, spacing, title, tmp / QA_FILE, background=reference)
        if nifti:
            _write_nifti(labels, tmp / NIFTI_FILE)
        timings["write_s"] = time.perf_counter() - t
        sidecar["timings"] = {k: round(v, 3) for k, v in timings.items()}
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    logger.info(
        "study %s: %s, missing %s -> %s (%s)", study, combination, list(mapping.missing) or "none", folder, counts
    )
    return sidecar
