"""Where studies come from and where results go: a DICOMweb server or a DICOM folder, through dicomweb-client.

``dicomweb_client.DICOMwebClient`` speaks QIDO-RS (search), WADO-RS (retrieve) and STOW-RS (store) to a server;
``dicomweb_client.DICOMfileClient`` offers the same interface over a folder of DICOM files (it indexes the folder
in an in-memory database). :class:`DicomStore` wraps either, so the pipeline has one code path for both.

Pointing it at a hospital's endpoint::

    DicomStore.open("https://pacs.example.org/dicom-web", token=os.environ["PACS_TOKEN"])   # bearer token
    DicomStore.open("https://pacs.example.org/dicom-web", username="ai", password=os.environ["PACS_PASSWORD"])
    DicomStore.open("https://gw.example.org", qido_prefix="qido", wado_prefix="wado", stow_prefix="stow")

(Orthanc's DICOMweb root is ``http://host:8042/dicom-web``; dcm4chee's ``http://host:8080/dcm4chee-arc/aets/DCM4CHEE/rs``.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from medfusion.apps.dicom.rules import SeriesInfo

__all__ = ["DicomStore", "StoreResult", "series_info_from_dataset"]

logger = logging.getLogger(__name__)

#: Attributes the series rules may look at (besides the text fields).
_RULE_ATTRIBUTES = (
    "ScanningSequence",
    "SequenceVariant",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "ContrastBolusAgent",
    "ImageType",
    "MRAcquisitionType",
    "FrameOfReferenceUID",
    "AccessionNumber",
    "BodyPartExamined",
    "ViewPosition",
)


def _value(ds: Dataset, keyword: str) -> Any:
    value = ds.get(keyword)
    if value is None:
        return None
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return [str(v) for v in value]
    return value if isinstance(value, (int, float)) else str(value)


def series_info_from_dataset(ds: Dataset, instances: int) -> SeriesInfo:
    """:class:`SeriesInfo` of a series from one of its instances' header."""
    number = ds.get("SeriesNumber")
    return SeriesInfo(
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        protocol=str(ds.get("ProtocolName", "")),
        sequence=str(ds.get("SequenceName", "")),
        number=int(number) if number not in (None, "") else None,
        instances=instances,
        attributes={k: _value(ds, k) for k in _RULE_ATTRIBUTES if ds.get(k) is not None},
    )


@dataclass
class StoreResult:
    """What :meth:`DicomStore.store` did: ``stored`` new SOP Instance UIDs, ``present`` ones already there."""

    stored: list[str]
    present: list[str]


class DicomStore:
    """A DICOMweb server (``http(s)://...``) or a DICOM folder, with the operations the pipeline needs.

    Use :meth:`open`. ``location`` is kept for reports (never with credentials).
    """

    def __init__(self, client: Any, location: str, kind: str) -> None:
        self.client = client
        self.location = location
        self.kind = kind

    @classmethod
    def open(
        cls,
        location: str | os.PathLike,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        qido_prefix: str | None = None,
        wado_prefix: str | None = None,
        stow_prefix: str | None = None,
        ca_bundle: str | None = None,
        timeout: float = 60.0,
        create: bool = False,
        readonly: bool = False,
    ) -> DicomStore:
        """Open a DICOMweb endpoint or a folder.

        Args:
            location: DICOMweb base URL (``http://localhost:8042/dicom-web``) or a folder.
            token: bearer token (``Authorization: Bearer ...``).
            username: HTTP basic auth user (with ``password``).
            password: HTTP basic auth password.
            qido_prefix: URL path prefix of QIDO-RS when the server uses one (``dicomweb_client`` semantics).
            wado_prefix: same for WADO-RS.
            stow_prefix: same for STOW-RS.
            ca_bundle: CA certificate file for a server with a hospital-internal certificate authority.
            timeout: seconds per HTTP request.
            create: a folder that does not exist is created (a STOW target).
            readonly: a folder opened for reading only (nothing is written into it, not even an index).

        Raises:
            FileNotFoundError: the folder does not exist and ``create`` is False.
            ValueError: ``username`` without ``password`` or both token and basic auth.
        """
        text = str(location)
        if text.startswith(("http://", "https://")):
            import requests
            from dicomweb_client import DICOMwebClient

            if (username is None) != (password is None):
                raise ValueError("DICOMweb basic authentication needs both a username and a password.")
            if token and username:
                raise ValueError("give either a bearer token or a username/password, not both.")
            session = requests.Session()
            if username is not None:
                session.auth = (username, password or "")
            if ca_bundle:
                session.verify = ca_bundle
            headers = {"Authorization": f"Bearer {token}"} if token else None
            client = DICOMwebClient(
                url=text.rstrip("/"),
                session=session,
                headers=headers,
                qido_url_prefix=qido_prefix,
                wado_url_prefix=wado_prefix,
                stow_url_prefix=stow_prefix,
                timeout=timeout,
            )
            return cls(client, text.rstrip("/"), "dicomweb")
        from dicomweb_client import DICOMfileClient

        folder = Path(text).expanduser().resolve()
        if not folder.is_dir():
            if not create:
                raise FileNotFoundError(f"DICOM folder {folder} does not exist.")
            folder.mkdir(parents=True)
        folder_client = DICOMfileClient(url=folder.as_uri(), in_memory=True, update_db=True, readonly=readonly)
        return cls(folder_client, str(folder), "folder")

    # ------------------------------------------------------------------------------------------- search, retrieve
    def studies(self, accession_number: str | None = None) -> list[str]:
        """StudyInstanceUIDs (of one accession number when given), via QIDO-RS."""
        filters = {"AccessionNumber": accession_number} if accession_number else None
        found = self.client.search_for_studies(search_filters=filters, get_remaining=True)
        return sorted({_json_value(s, "0020000D") for s in found} - {None})

    def resolve_study(self, study_uid: str | None = None, accession_number: str | None = None) -> str:
        """The one study to process.

        Raises:
            ValueError: the study is not there, or the choice is ambiguous (the message lists the candidates).
        """
        if study_uid:
            if study_uid not in self.studies():
                raise ValueError(f"study {study_uid} not found in {self.location}.")
            return study_uid
        found = self.studies(accession_number)
        what = f"accession number {accession_number}" if accession_number else "the source"
        if len(found) != 1:
            listing = ", ".join(found[:10]) or "none"
            raise ValueError(
                f"{what} holds {len(found)} studies in {self.location} ({listing}); pass --study UID"
                + (" or --accession NUMBER." if not accession_number else ".")
            )
        return found[0]

    def series(self, study_uid: str) -> list[SeriesInfo]:
        """Every series of a study, described from one instance's metadata (WADO-RS metadata, no pixel data)."""
        out = []
        for item in self.client.search_for_series(study_instance_uid=study_uid, get_remaining=True):
            series_uid = _json_value(item, "0020000E")
            metadata = self.client.retrieve_series_metadata(study_uid, series_uid)
            if not metadata:
                continue
            header = {tag: v for tag, v in metadata[0].items() if tag != "7FE00010"}  # pixel data: a bulk data URI
            out.append(series_info_from_dataset(Dataset.from_json(header), instances=len(metadata)))
        return sorted(out, key=lambda s: (s.number if s.number is not None else 1 << 30, s.series_uid))

    def retrieve(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """All instances of a series with pixel data (WADO-RS)."""
        return list(self.client.retrieve_series(study_uid, series_uid))

    def instance_exists(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Whether an instance is already stored (QIDO-RS)."""
        found = self.client.search_for_instances(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            search_filters={"SOPInstanceUID": sop_uid},
        )
        return any(_json_value(i, "00080018") == sop_uid for i in found)

    def series_with(self, study_uid: str, modality: str) -> list[dict[str, Any]]:
        """``[{series_uid, description, number}]`` of a study's series of one Modality (e.g. earlier SEGs)."""
        found = self.client.search_for_series(study_instance_uid=study_uid, search_filters={"Modality": modality})
        return [
            {
                "series_uid": _json_value(s, "0020000E"),
                "description": _json_value(s, "0008103E"),
                "series_number": _json_value(s, "00200011"),
            }
            for s in found
        ]

    # -------------------------------------------------------------------------------------------------- store
    def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """STOW-RS the instances that are not stored yet (re-storing the same SOP Instance UID is a no-op).

        Raises:
            RuntimeError: the server/folder reports failed instances (the message names them).
        """
        new: list[Dataset] = []
        present: list[Dataset] = []
        for ds in datasets:
            exists = self.instance_exists(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            (present if exists else new).append(ds)
        if new:
            for ds in new:
                if not getattr(ds, "preamble", None):
                    # pydicom writes a Part 10 file without preamble/"DICM" when the dataset has none; servers store
                    # such bytes as they are and WADO-RS clients then cannot parse them
                    ds.preamble = b"\x00" * 128
            response = self.client.store_instances(new)
            failed = [str(item.ReferencedSOPInstanceUID) for item in response.get("FailedSOPSequence", [])]
            if failed:
                raise RuntimeError(f"STOW-RS to {self.location} failed for SOP instances {failed}.")
        return StoreResult(
            stored=[str(d.SOPInstanceUID) for d in new], present=[str(d.SOPInstanceUID) for d in present]
        )


def _json_value(item: dict[str, Any], tag: str) -> Any:
    """First value of a DICOM JSON attribute (``None`` when absent)."""
    values = item.get(tag, {}).get("Value") or [None]
    value = values[0]
    if isinstance(value, dict):  # PersonName
        return value.get("Alphabetic")
    return value
