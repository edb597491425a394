"""Time one full-size study through dicom-segment on CPU: the real BraTS case (240x240x155, 4 MR series) in a local
Orthanc, the bundle's default network (channels 16-128) and sliding window (96^3, overlap 0.5), SEG stored back.

Runs ``tutorials/pacs_pipeline.py`` full size (untrained placeholder weights: the cost does not depend on the values)
and writes ``benchmarks/results/dicom_segment.md``. Usage: ``nice -n 10 python benchmarks/dicom_segment_timing.py``.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    spec = importlib.util.spec_from_file_location("pacs_tutorial", ROOT / "tutorials" / "pacs_pipeline.py")
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = tutorial.main(Path(tmp), tiny=False)
    total = time.perf_counter() - t0
    load_after = os.getloadavg()
    full, part = out["full"], out["partial"]
    lines = [
        "# dicom-segment: one full-size study on CPU",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (runs `tutorials/pacs_pipeline.py`, full size)",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads); load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (other jobs share the cores)",
        "Model: bundles/brats_metakd default network (channels 16-128, shared encoder), untrained fixed-seed weights; "
        "sliding window 96^3, overlap 0.5, gaussian; study: BraTS2021_00006 as 4 DICOM MR series of 155 slices "
        "(240x240) + a localizer, in a local Orthanc 1.10 + DICOMweb plugin 1.7.",
        "",
        "| study | combination | query (s) | retrieve + read (s) | inference (s) | SEG + QA + write (s) | STOW (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, side in (("4 series", full), ("FLAIR + T1c", part)):
        t = side["timings"]
        lines.append(
            f"| {name} | {side['combination']} | {t['query_s']} | {t['retrieve_read_s']} | {t['inference_s']} | "
            f"{t['write_s']} | {t.get('send_s', '-')} |"
        )
    lines += [
        "",
        f"Wall time of the 4-series study from QIDO query to SEG stored: **{out['seconds']:.1f} s**. "
        f"Whole script (conversion, upload, both studies, re-run): {total:.0f} s.",
    ]
    path = ROOT / "benchmarks" / "results" / "dicom_segment.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
