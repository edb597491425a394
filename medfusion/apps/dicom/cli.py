"""``medfusion dicom-segment`` and ``medfusion dicom-classify``: argument parsers and handlers.

Credentials never go on the command line: a bearer token or a password is read from the environment variable
named by ``--token_env`` / ``--password_env`` (default ``MEDFUSION_DICOMWEB_TOKEN`` / ``MEDFUSION_DICOMWEB_PASSWORD``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_dicom_parsers", "store_options"]

logger = logging.getLogger(__name__)


def _add_connection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOMweb connection (for http(s) sources and --send targets)")
    g.add_argument("--token_env", default="MEDFUSION_DICOMWEB_TOKEN", help="env var holding a bearer token")
    g.add_argument("--user", default=None, help="HTTP basic auth user (password from --password_env)")
    g.add_argument("--password_env", default="MEDFUSION_DICOMWEB_PASSWORD", help="env var holding the password")
    g.add_argument("--qido_prefix", default=None, help="URL path prefix of QIDO-RS, if the server has one")
    g.add_argument("--wado_prefix", default=None, help="URL path prefix of WADO-RS")
    g.add_argument("--stow_prefix", default=None, help="URL path prefix of STOW-RS")
    g.add_argument("--ca_bundle", default=None, help="CA certificate file of the hospital's certificate authority")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")


def store_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :meth:`DicomStore.open` from the connection options (secrets from the environment)."""
    password = os.environ.get(args.password_env) if args.user else None
    if args.user and password is None:
        raise ValueError(f"--user {args.user}: set the password in the environment variable {args.password_env}.")
    return {
        "token": os.environ.get(args.token_env) or None,
        "username": args.user,
        "password": password,
        "qido_prefix": args.qido_prefix,
        "wado_prefix": args.wado_prefix,
        "stow_prefix": args.stow_prefix,
        "ca_bundle": args.ca_bundle,
        "timeout": args.timeout,
    }


def _open_stores(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(source store, send target or None)`` from the positional source and ``--send``."""
    from medfusion.apps.dicom.source import DicomStore

    options = store_options(args)
    source = DicomStore.open(args.source, readonly=True, **options)
    if not args.send:
        return source, None
    return source, "source" if args.send == "source" else DicomStore.open(args.send, create=True, **options)


def _quiet_clients() -> None:
    # dicomweb-client logs every instance it touches at INFO
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def _run_guarded(fn: Any, args: argparse.Namespace) -> int:
    import requests

    try:
        return int(fn(args))
    except requests.RequestException as err:
        print(f"medfusion {args.command}: DICOMweb request failed: {err}", file=sys.stderr)
        return 3


def _cmd_dicom_segment(args: argparse.Namespace) -> int:
    from medfusion.apps.dicom.rules import default_rules, load_rules

    if args.print_rules:
        print(json.dumps(default_rules().to_dict(), indent=2))
        return 0
    if not args.source or not args.bundle or not args.output_dir:
        raise ValueError("SOURCE, --bundle and --output_dir are required (or --print_rules).")
    _quiet_clients()

    def run(a: argparse.Namespace) -> int:
        from medfusion.apps.dicom.models import load_segmentation_model
        from medfusion.apps.dicom.segment import dicom_segment
        from medfusion.apps.export import parse_overrides

        source, send = _open_stores(a)  # first: a wrong source fails before the model is loaded
        model = load_segmentation_model(
            a.bundle, a.checkpoint, parse_overrides(a.override), a.roi_size, a.label_convention, a.device
        )
        result = dicom_segment(
            source,
            model,
            a.output_dir,
            study_uid=a.study,
            accession_number=a.accession,
            rules=load_rules(a.rules),
            segments=a.segments,
            nifti=a.nifti,
            send=send,
            overwrite=a.overwrite,
        )
        side = result.sidecar
        print(f"study {side['study_instance_uid']}: combination {side['combination']}", end="")
        print(f" (missing: {', '.join(side['missing_modalities'])})" if side["missing_modalities"] else "")
        print(f"series: {side['seg']['series_description']}; voxels {side['segments']['voxels']}")
        print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
        for sent in side.get("sent", [])[-1:]:
            print(f"sent to {sent['to']}: {'stored' if sent['stored'] else 'already present'}")
        return 0

    return _run_guarded(run, args)


def _cmd_dicom_classify(args: argparse.Namespace) -> int:
    _quiet_clients()

    def run(a: argparse.Namespace) -> int:
        from medfusion.apps.dicom.classify import dicom_classify, load_classification_model
        from medfusion.apps.export import parse_overrides

        source, send = _open_stores(a)
        model = load_classification_model(a.bundle, a.checkpoint, parse_overrides(a.override), a.device)
        result = dicom_classify(
            source,
            model,
            a.output_dir,
            study_uid=a.study,
            accession_number=a.accession,
            clinical_csv=a.clinical_csv,
            sr=a.sr,
            send=send,
            overwrite=a.overwrite,
        )
        side = result.sidecar
        print(
            f"study {side['study_instance_uid']}: p({side['task']}) = {side['probability']:.4f} with "
            f"{side['combination']}"
            + (f" (missing: {', '.join(side['missing_modalities'])})" if side["missing_modalities"] else "")
        )
        print(f"{'reused' if result.reused else 'wrote'} {result.folder}")
        return 0

    return _run_guarded(run, args)


def add_dicom_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``dicom-segment`` and ``dicom-classify`` to the ``medfusion`` sub-command parser."""
    p = sub.add_parser(
        "dicom-segment",
        help="segment a DICOM MR study (folder or DICOMweb) with whatever series it has; write/send a DICOM SEG",
        description="Map the study's series to the model's modalities (rules on SeriesDescription/ProtocolName/"
        "sequence attributes), run the bundle with the present combination, write a DICOM Segmentation, a JSON "
        "sidecar, a QA PNG (and a NIfTI) into OUTPUT_DIR/<StudyUID>/<SEG SeriesUID>/, optionally STOW-RS it. "
        "Re-running the same model on the same study reuses the result and stores nothing twice.",
    )
    p.add_argument("source", nargs="?", help="DICOMweb base URL (http://host:8042/dicom-web) or a DICOM folder")
    p.add_argument("--study", default=None, help="StudyInstanceUID (default: the source's only study)")
    p.add_argument("--accession", default=None, help="pick the study by AccessionNumber")
    p.add_argument("--bundle", type=Path, default=None, help="segmentation bundle folder (bundles/brats_metakd)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <bundle>/models/model.pt")
    p.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides the model was trained with: 'network_def#channels=[8,16,32,64]'")  # fmt: skip
    p.add_argument("--roi_size", nargs=3, type=int, default=None, help="sliding window (default: the bundle's)")
    p.add_argument("--label_convention", default=None, help="brats (1/2/4), brats2023 (1/2/3) or msd")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: automatic)")
    p.add_argument("--output_dir", type=Path, default=None, help="results root")
    p.add_argument("--rules", type=Path, default=None, help="series -> modality rules JSON (see --print_rules)")
    p.add_argument("--print_rules", action="store_true", help="print the default rules as JSON and exit")
    p.add_argument("--segments", choices=("regions", "labels"), default="regions",
                   help="regions: TC/WT/ET segments (overlapping); labels: one segment per label value")  # fmt: skip
    p.add_argument("--nifti", action="store_true", help="also write seg.nii.gz (label map)")
    p.add_argument("--send", default=None, help="STOW-RS the SEG to: 'source', a DICOMweb URL, or a folder")
    p.add_argument("--overwrite", action="store_true", help="recompute and replace an identical earlier result")
    _add_connection(p)
    p.set_defaults(func=_cmd_dicom_segment)

    c = sub.add_parser(
        "dicom-classify",
        help="classify a chest X-ray DICOM study (+ report / EHR from a CSV keyed by accession number)",
        description="Run a clinical fusion bundle (ehr, cxr, report) on a chest X-ray study with whatever of the "
        "three is available; write result.json (and a DICOM SR with --sr) into OUTPUT_DIR/<StudyUID>/<SR SeriesUID>/.",
    )
    c.add_argument("source", help="DICOMweb base URL or a DICOM folder")
    c.add_argument("--study", default=None, help="StudyInstanceUID (default: the source's only study)")
    c.add_argument("--accession", default=None, help="pick the study by AccessionNumber")
    c.add_argument("--bundle", type=Path, required=True, help="clinical bundle folder (bundles/clinical_fusion)")
    c.add_argument("--checkpoint", type=Path, default=None, help="default: <bundle>/models/model.pt")
    c.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides the model was trained with")  # fmt: skip
    c.add_argument("--clinical_csv", type=Path, default=None,
                   help="CSV with accession_number and report text / EHR columns")  # fmt: skip
    c.add_argument("--device", default=None)
    c.add_argument("--output_dir", type=Path, required=True)
    c.add_argument("--sr", action="store_true", help="also write a DICOM Structured Report (highdicom)")
    c.add_argument("--send", default=None, help="STOW-RS the SR to: 'source', a DICOMweb URL, or a folder")
    c.add_argument("--overwrite", action="store_true")
    _add_connection(c)
    c.set_defaults(func=_cmd_dicom_classify)
