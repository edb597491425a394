"""``medfusion dicom-classify``: a chest X-ray study (+ report text / EHR from a CSV) -> JSON result (+ DICOM SR).

The classification counterpart of :mod:`medfusion.apps.dicom.segment`, for a clinical fusion bundle
(``bundles/clinical_fusion``: modalities such as ``ehr`` (kind ehr), ``cxr`` (kind image), ``report`` (kind text)):

1. the study comes from a DICOMweb server or a folder (:class:`~medfusion.apps.dicom.source.DicomStore`); its chest
   X-ray is the CR/DX series chosen by :func:`select_chest_xray` (chest before other body parts, frontal PA/AP views
   before laterals, then the latest series); the other series are reported as unused;
2. the non-image modalities come from a CSV keyed by accession number (:func:`read_clinical_row`): one column per
   modality name (``report``: inline text or a report file; ``ehr``: a mimic3-benchmarks timeseries CSV), relative
   paths resolved against the CSV's folder; an empty cell, a missing column or a missing row = a missing modality;
3. the bundle's own ``preprocessing`` (``configs/inference.json``) loads the item exactly as the bundle's inference
   does, and the network runs with the modalities present (``modality_mask``);
4. ``<output_dir>/<StudyInstanceUID>/<SR SeriesInstanceUID>/result.json`` holds the class probabilities, the
   modalities used and missing, the image series, the CSV row and the model; ``sr=True`` adds ``sr.dcm``, a highdicom
   Comprehensive SR with the probability (DCM 122157 "Probability", UCUM "1") and the modalities used, referencing
   the X-ray; ``send`` stores the SR back (STOW-RS). Identity, re-runs and versions as for ``dicom-segment``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import medfusion
from medfusion.apps.dicom.models import LoadedModel, load_bundle_network
from medfusion.apps.dicom.results import SIDECAR, open_target, result_uids, send_result
from medfusion.apps.dicom.rules import SeriesInfo
from medfusion.apps.dicom.source import DicomStore
from medfusion.io import atomic_output_dir
from medfusion.modality import Keys, combination_name

__all__ = [
    "ClassificationModel",
    "ClassifyResult",
    "load_classification_model",
    "select_chest_xray",
    "read_clinical_row",
    "dicom_classify",
]

logger = logging.getLogger(__name__)

SR_FILE = "sr.dcm"
XRAY_MODALITIES = ("CR", "DX")
_KEY_COLUMNS = ("accession_number", "AccessionNumber", "accession")
_FRONTAL = {"PA": 0, "AP": 1}


@dataclass
class ClassificationModel:
    """A clinical fusion classifier ready for DICOM input.

    Attributes:
        loaded: network and provenance.
        modalities: the network's modality order.
        kinds: modality -> kind (``ehr``, ``image``, ``text``, ``volume``, ``tabular``).
        preprocessing: the bundle's ``preprocessing`` (MONAI ``Compose``) for one datalist item.
        task: name of what is predicted (the bundle's ``mimic_task``, or ``"class 1"``).
        class_names: names of the classes (``["0", "1"]`` unless the config gives ``class_names``).
    """

    loaded: LoadedModel
    modalities: tuple[str, ...]
    kinds: dict[str, str]
    preprocessing: Any
    task: str
    class_names: list[str]

    @property
    def image_modality(self) -> str | None:
        """The modality the DICOM image fills (the first of kind ``image``)."""
        return next((m for m in self.modalities if self.kinds[m] == "image"), None)


def load_classification_model(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> ClassificationModel:
    """Load a clinical fusion bundle (``bundles/clinical_fusion``) through the pipeline's one model loader.

    Raises:
        ValueError: the network has no named modalities or none of kind ``image``.
    """
    loaded = load_bundle_network(bundle_dir, checkpoint, overrides, device)
    parser = loaded.parser
    modalities = tuple(getattr(loaded.network, "modalities", ()) or parser.get_parsed_content("modalities"))
    all_kinds = parser.get_parsed_content("modality_kinds")
    kinds = {m: str(all_kinds[m]) for m in modalities}
    if "image" not in kinds.values():
        raise ValueError(f"bundle {bundle_dir}: none of the modalities {kinds} is of kind 'image' (a chest X-ray).")
    preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    task = str(parser["mimic_task"]) if "mimic_task" in parser else "class 1"
    num_classes = int(parser.get_parsed_content("num_classes"))
    names = [str(c) for c in parser["class_names"]] if "class_names" in parser else [str(i) for i in range(num_classes)]
    return ClassificationModel(loaded, modalities, kinds, preprocessing, task, names)


def select_chest_xray(series: Sequence[SeriesInfo]) -> tuple[SeriesInfo | None, list[tuple[SeriesInfo, str]]]:
    """The chest X-ray series to use and the unused series with reasons.

    Preference: CR/DX; chest (BodyPartExamined CHEST, or "chest"/"thorax"/"cxr" in the description) before other
    body parts; frontal (ViewPosition PA, then AP) before other views; then the latest series number.
    """
    unused: list[tuple[SeriesInfo, str]] = []
    candidates = []
    for s in series:
        if s.modality.upper() not in XRAY_MODALITIES:
            unused.append((s, f"not a radiograph (Modality {s.modality or '?'}, expected one of {XRAY_MODALITIES})"))
            continue
        text = f"{s.attributes.get('BodyPartExamined') or ''} {s.description} {s.protocol}".lower()
        chest = re.search(r"chest|thorax|cxr|lung", text) is not None
        view = str(s.attributes.get("ViewPosition") or "").upper()
        candidates.append(((not chest, _FRONTAL.get(view, 2), -(s.number or 0)), s))
    if not candidates:
        return None, unused
    candidates.sort(key=lambda c: c[0])
    chosen = candidates[0][1]
    for _, s in candidates[1:]:
        unused.append((s, f"another radiograph; {chosen.label()} was preferred (chest, frontal view, latest)"))
    return chosen, unused


def read_clinical_row(
    csv_path: str | os.PathLike, accession_number: str, modalities: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Values of the non-image modalities for one accession number.

    Args:
        csv_path: CSV with a key column (``accession_number``, ``AccessionNumber`` or ``accession``) and one column
            per modality name.
        accession_number: the study's AccessionNumber.
        modalities: modality -> kind of the modalities to read (image modalities excluded by the caller).

    Returns:
        ``(values, info)``: modality -> value (a path for file kinds, text for ``text``, ``None`` = missing); info
        says which row matched and why a modality is missing.

    Raises:
        FileNotFoundError: the CSV, or a file a cell names (the message names the row and column).
        ValueError: no key column, or several rows for the accession number (names the rows).
    """
    import pandas as pd

    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical CSV {path} does not exist.")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((c for c in _KEY_COLUMNS if c in table.columns), None)
    if key is None:
        raise ValueError(f"clinical CSV {path}: no accession number column; expected one of {list(_KEY_COLUMNS)}.")
    rows = table.index[table[key].str.strip() == str(accession_number).strip()].tolist()
    values: dict[str, Any] = {m: None for m in modalities}
    info: dict[str, Any] = {"csv": str(path), "key_column": key, "row": None, "missing_reason": {}}
    if not rows:
        info["missing_reason"] = {m: f"no row for accession number {accession_number!r}" for m in modalities}
        return values, info
    if len(rows) > 1:
        raise ValueError(
            f"clinical CSV {path}: {len(rows)} rows (data rows {[r + 1 for r in rows]}) have accession number "
            f"{accession_number!r}; expected one."
        )
    row = table.loc[rows[0]]
    info["row"] = int(rows[0]) + 1
    for m, kind in modalities.items():
        if m not in table.columns:
            info["missing_reason"][m] = f"no column {m!r}"
            continue
        cell = str(row[m]).strip()
        if not cell:
            info["missing_reason"][m] = "empty cell"
            continue
        if kind == "text":
            candidate = path.parent / cell
            values[m] = str(candidate) if len(cell) < 256 and "\n" not in cell and candidate.is_file() else cell
            continue
        if kind == "tabular":
            values[m] = json.loads(cell) if cell.startswith("[") else [float(v) for v in cell.split(";")]
            continue
        file = Path(cell) if Path(cell).is_absolute() else path.parent / cell
        if not file.is_file():
            raise FileNotFoundError(
                f"clinical CSV {path}, data row {info['row']}, column {m!r}: {file} does not exist."
            )
        values[m] = str(file)
    return values, info


@dataclass
class ClassifyResult:
    """What :func:`dicom_classify` produced (``folder``, ``sidecar``, whether an identical result was reused)."""

    folder: Path
    sidecar: dict[str, Any]
    reused: bool


def predict_probabilities(model: ClassificationModel, item: Mapping[str, Any]) -> tuple[list[float], list[bool]]:
    """Class probabilities for one datalist item (the bundle's preprocessing, the network on the present mask)."""
    from monai.data import list_data_collate

    from medfusion.apps.clinical_bundle import ModalityBatch

    sample = model.preprocessing(dict(item))
    batch = list_data_collate([sample])
    inputs, _, (mask,), _ = ModalityBatch(model.modalities)(batch, model.loaded.device)
    with torch.no_grad():
        logits = model.loaded.network(inputs, mask)
    probs = torch.softmax(logits.float(), dim=1)[0].cpu().tolist()
    return [float(p) for p in probs], [bool(v) for v in mask[0].cpu().tolist()]


def _build_sr(
    evidence: Any, probability: float, model: ClassificationModel, used: Sequence[str], missing: Sequence[str],
    series_uid: str, sop_uid: str, description: str,
) -> Any:  # fmt: skip
    import highdicom as hd
    from pydicom.sr.codedict import codes

    local = "99MEDFUSION"  # a local coding scheme ("99" prefix, DICOM PS3.16 8.2) for what has no standard code
    items = [
        hd.sr.TextContentItem(codes.DCM.AlgorithmName, f"medfusion {model.loaded.bundle.name}", "CONTAINS"),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion, medfusion.__version__, "CONTAINS"),
        hd.sr.TextContentItem(codes.DCM.Finding, f"{model.task} (class {model.class_names[-1]})", "CONTAINS"),
        hd.sr.NumContentItem(codes.DCM.Probability, probability, codes.UCUM.NoUnits, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(hd.sr.CodedConcept("MF001", local, "Modalities used"), "+".join(used), "CONTAINS"),
        hd.sr.TextContentItem(
            hd.sr.CodedConcept("MF002", local, "Modalities missing"), "+".join(missing) or "none", "CONTAINS"
        ),
    ]
    root = hd.sr.ContainerContentItem(codes.DCM.Findings)
    # highdicom's __setattr__ wraps the list in a ContentSequence; pydicom's attribute type does not say so
    root.ContentSequence = items  # type: ignore[assignment]
    return hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=root,
        series_instance_uid=series_uid,
        series_number=9100,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="medfusion",
        series_description=description,
        is_complete=True,
    )


def dicom_classify(
    source: str | os.PathLike | DicomStore,
    model: ClassificationModel,
    output_dir: str | os.PathLike,
    *,
    study_uid: str | None = None,
    accession_number: str | None = None,
    clinical_csv: str | os.PathLike | None = None,
    sr: bool = False,
    send: str | os.PathLike | DicomStore | None = None,
    overwrite: bool = False,
) -> ClassifyResult:
    """Classify one chest X-ray study with whatever of image / report / EHR is available.

    Args:
        source: DICOMweb URL, DICOM folder, or an open store.
        model: from :func:`load_classification_model`.
        output_dir: results go to ``<output_dir>/<StudyInstanceUID>/<SR SeriesInstanceUID>/``.
        study_uid: the study (default: the only one, or the one of ``accession_number``).
        accession_number: pick the study by AccessionNumber (also the CSV key; default: the study's own).
        clinical_csv: CSV keyed by accession number with report / EHR columns (``None``: image only).
        sr: also write a DICOM Comprehensive SR (``sr.dcm``).
        send: where to STOW-RS the SR (``"source"``, URL, folder); needs ``sr``.
        overwrite: recompute an identical earlier result.

    Raises:
        ValueError: no modality at all is available (no radiograph and nothing in the CSV); ``send`` without ``sr``.
    """
    if send is not None and not sr:
        raise ValueError("send needs sr=True (--sr): the SR is what is stored back.")
    t0 = time.perf_counter()
    store = source if isinstance(source, DicomStore) else DicomStore.open(source, readonly=True)
    study = store.resolve_study(study_uid, accession_number)
    series = store.series(study)
    image_mod = model.image_modality
    chosen, unused = select_chest_xray(series)
    accession = accession_number or next((str(s.attributes.get("AccessionNumber")) for s in series
                                          if s.attributes.get("AccessionNumber")), "")  # fmt: skip
    others = {m: k for m, k in model.kinds.items() if m != image_mod}
    values: dict[str, Any] = {m: None for m in others}
    csv_info: dict[str, Any] = {"csv": None}
    if clinical_csv is not None:
        values, csv_info = read_clinical_row(clinical_csv, accession, others)
    present = ([image_mod] if chosen is not None else []) + [m for m in others if values[m] is not None]
    used = tuple(m for m in model.modalities if m in present)
    missing = tuple(m for m in model.modalities if m not in present)
    if not used:
        listing = "; ".join(f"{s.label()}: {r}" for s, r in unused) or "no series"
        raise ValueError(
            f"study {study}: none of the modalities {list(model.modalities)} is available (radiograph: {listing}; "
            f"clinical CSV: {csv_info.get('missing_reason') or 'not given'})."
        )
    identity = {
        "study": study,
        "image_series": chosen.series_uid if chosen else None,
        "values": {m: values[m] for m in others},
        "checkpoint_sha256": model.loaded.checkpoint_sha256,
        "overrides": model.loaded.overrides,
    }
    series_uid, sop_uid = result_uids("dicom-classify", identity)
    folder = Path(output_dir) / study / series_uid
    reused = (folder / SIDECAR).is_file() and not overwrite and (not sr or (folder / SR_FILE).is_file())
    if reused:
        sidecar = json.loads((folder / SIDECAR).read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="medfusion-cxr-") as tmp:
            evidence = None
            item: dict[str, Any] = {Keys.CASE_ID: accession or study, **{m: values.get(m) for m in others}}
            if chosen is not None:
                instances = store.retrieve(study, chosen.series_uid)
                evidence = sorted(instances, key=lambda d: int(d.get("InstanceNumber", 0) or 0))[0]
                path = Path(tmp) / "cxr.dcm"
                evidence.save_as(path, enforce_file_format=True)
                if image_mod is not None:  # a model without an image modality reads no radiograph
                    item[image_mod] = str(path)  # the bundle's loader reads DICOM files (MONAI PydicomReader)
            else:
                if image_mod is not None:
                    item[image_mod] = None
                first = series[0]
                evidence = store.retrieve(study, first.series_uid)[0]
            probs, mask = predict_probabilities(model, item)
        if [m for m, p in zip(model.modalities, mask) if p] != list(used):
            raise RuntimeError(f"study {study}: the model saw {mask}, expected {used} present.")  # internal check
        combination = combination_name(used)
        description = f"medfusion p({model.task}) {combination}"[:64]
        sidecar = {
            "study_instance_uid": study,
            "accession_number": accession,
            "source": {"location": store.location, "kind": store.kind},
            "task": model.task,
            "class_names": model.class_names,
            "probabilities": probs,
            "probability": probs[-1],
            "modalities": list(model.modalities),
            "used_modalities": list(used),
            "missing_modalities": list(missing),
            "combination": combination,
            "image": {
                "modality": image_mod,
                "series_uid": chosen.series_uid if chosen else None,
                "description": chosen.description if chosen else None,
                "view_position": chosen.attributes.get("ViewPosition") if chosen else None,
                "sop_instance_uid": str(evidence.SOPInstanceUID) if chosen is not None else None,
            },
            "unused_series": [
                {"series_uid": s.series_uid, "description": s.description, "reason": r} for s, r in unused
            ],
            "clinical": {**csv_info, "values": {m: values[m] for m in others}},
            "model": {
                "bundle": str(model.loaded.bundle),
                "checkpoint": str(model.loaded.checkpoint),
                "checkpoint_sha256": model.loaded.checkpoint_sha256,
                "overrides": model.loaded.overrides,
                "device": str(model.loaded.device),
            },
            "sr": {
                "series_instance_uid": series_uid,
                "sop_instance_uid": sop_uid,
                "file": SR_FILE if sr else None,
                "series_description": description,
            },  # fmt: skip
            "medfusion_version": medfusion.__version__,
            "timings": {"total_s": round(time.perf_counter() - t0, 3)},
        }
        with atomic_output_dir(folder, overwrite=overwrite) as tmp_dir:
            if sr:
                report = _build_sr(evidence, probs[-1], model, used, missing, series_uid, sop_uid, description)
                report.save_as(tmp_dir / SR_FILE, enforce_file_format=True)
            (tmp_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2))
        logger.info("study %s: p(%s) = %.4f with %s", study, model.task, probs[-1], combination)
    if send is not None:
        sidecar = send_result(folder / SR_FILE, open_target(send, store), study, series_uid, "SR", sidecar)
    return ClassifyResult(folder=folder, sidecar=sidecar, reused=reused)
