"""What every DICOM command shares about its results: identity (UIDs), the result folder, sending, the sidecar.

A result's Series and SOP Instance UIDs are derived from everything that determines its content (study, input
series, checkpoint fingerprint, settings, medfusion version), so the same run gives the same UIDs (idempotent: reused,
never stored twice) and anything else gives new ones (a new version beside the earlier ones). See
``docs/dicom_pipeline.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

import medfusion
from medfusion.apps.dicom.source import DicomStore
from medfusion.io import atomic_file

__all__ = ["SIDECAR", "result_uids", "open_target", "send_result", "write_sidecar"]

logger = logging.getLogger(__name__)

SIDECAR = "result.json"


def result_uids(command: str, identity: Mapping[str, Any]) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` derived from ``identity`` (+ the command and medfusion's version)."""
    text = json.dumps({**identity, "command": command, "medfusion": medfusion.__version__}, sort_keys=True, default=str)
    return (
        generate_uid(entropy_srcs=[f"medfusion {command} series", text]),
        generate_uid(entropy_srcs=[f"medfusion {command} instance", text]),
    )


def open_target(send: str | os.PathLike | DicomStore, source: DicomStore) -> DicomStore:
    """The STOW-RS destination: ``"source"`` = where the study came from, else a store, URL or folder."""
    if isinstance(send, DicomStore):
        return send
    if str(send) == "source":
        return source
    return DicomStore.open(send, create=True)


def write_sidecar(folder: Path, sidecar: Mapping[str, Any]) -> None:
    """Replace ``<folder>/result.json`` atomically."""
    with atomic_file(folder / SIDECAR) as tmp:
        Path(tmp).write_text(json.dumps(sidecar, indent=2))


def send_result(
    file: Path,
    target: DicomStore,
    study_uid: str,
    series_uid: str,
    dicom_modality: str,
    sidecar: dict[str, Any],
) -> dict[str, Any]:
    """STOW-RS one result file (skipped when already stored) and record it in the sidecar (rewritten).

    Args:
        file: the DICOM result (SEG, SR).
        target: destination.
        study_uid: its study.
        series_uid: its series (other series of the same DICOM Modality in the study are listed as other versions).
        dicom_modality: ``"SEG"``, ``"SR"``.
        sidecar: the result's sidecar; gains ``sent`` (appended), ``other_versions`` and ``timings.send_s``.

    Returns:
        The updated sidecar.
    """
    import pydicom

    t = time.perf_counter()
    stored = target.store([pydicom.dcmread(file)])
    sidecar.setdefault("sent", []).append(
        {"to": target.location, "kind": target.kind, "stored": stored.stored, "already_present": stored.present}
    )
    sidecar["other_versions"] = [
        s for s in target.series_with(study_uid, dicom_modality) if s["series_uid"] != series_uid
    ]
    sidecar.setdefault("timings", {})["send_s"] = round(time.perf_counter() - t, 3)
    write_sidecar(file.parent, sidecar)
    what = "stored" if stored.stored else "already present"
    logger.info("study %s: %s %s to %s (%s)", study_uid, dicom_modality, file.name, target.location, what)
    return sidecar
