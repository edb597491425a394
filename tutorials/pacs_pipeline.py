"""Tutorial: from a PACS study to a DICOM Segmentation and back, with whatever MR series the study has.

Run it as a script (``python tutorials/pacs_pipeline.py --workdir /tmp/mf_pacs``) or cell by cell (``# %%``).
It needs Orthanc with its DICOMweb plugin (``make orthanc`` installs the Debian packages) unless you point it at
your own DICOMweb server with ``--dicomweb URL``. The test suite runs ``main(tmp_path, tiny=True)``.

What it shows:
1. a BraTS case turned into a DICOM study with scanner-style series names (and a localizer), plus a second study
   that only has FLAIR and T1 post-contrast;
2. both studies stored in a PACS (STOW-RS);
3. ``dicom_segment`` (= ``medfusion dicom-segment``) reading each study from the PACS (QIDO-RS/WADO-RS), mapping
   series to modalities, running the model with the combination the study has, writing a DICOM SEG + JSON + QA PNG
   and storing the SEG back into the same study;
4. a re-run that changes nothing (idempotent), and the time one study takes on this CPU.

The model: pass ``--checkpoint`` (+ ``--override`` if trained with other channels) of a bundle you trained
(``bundles/brats_metakd``). Without one, the tutorial uses fixed-seed UNTRAINED weights so that it runs anywhere: the
pipeline, the timing and the DICOM objects are real, the contours are not a tumour segmentation.
"""

from __future__ import annotations

# %% [markdown]
# ## 0. Setup
import argparse
import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medfusion.apps.dicom.convert import SeriesSpec, nifti_to_dicom_study
from medfusion.apps.dicom.models import load_segmentation_model
from medfusion.apps.dicom.orthanc import LocalOrthanc
from medfusion.apps.dicom.segment import dicom_segment
from medfusion.apps.dicom.source import DicomStore
from medfusion.models.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brats_metakd"
REAL_CASE = ROOT.parent / "shared" / "data" / "real" / "BraTS2021_00006"
MODALITIES = ("flair", "t1", "t1ce", "t2")


def settings(tiny: bool) -> dict:
    """Tiny (CI): every 4th voxel, a small network, one 64x64x48 window. Full: the real 240x240x155 case, the
    bundle's default network (channels 16-128) and 96^3 windows (bundles/brats_metakd/configs/inference.json)."""
    if tiny:
        return {"stride": 4, "overrides": {"network_def#channels": [8, 16, 32, 64]}, "roi": [64, 64, 48]}
    return {"stride": 1, "overrides": {}, "roi": None}


def case_volumes(case: Path, stride: int) -> dict[str, nib.Nifti1Image]:
    """The case's four NIfTI volumes (every ``stride``-th voxel; ``stride=1`` = full size)."""
    out = {}
    for m in MODALITIES:
        img = nib.load(case / f"{case.name}_{m}.nii.gz")
        if stride == 1:
            out[m] = img
            continue
        affine = img.affine.copy()
        affine[:3, :3] *= stride
        out[m] = nib.Nifti1Image(np.asarray(img.dataobj)[::stride, ::stride, ::stride], affine)
    return out


def placeholder_checkpoint(path: Path, overrides: dict) -> Path:
    """Fixed-seed untrained weights of the bundle's network, saved like MONAI's CheckpointSaver does."""
    torch.manual_seed(0)
    channels = overrides.get("network_def#channels", [16, 32, 64, 128])
    net = Segmenter(MODALITIES, channels=channels, out_channels=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict()}, path)
    return path


def main(
    workdir: Path,
    tiny: bool = False,
    dicomweb: str | None = None,
    checkpoint: Path | None = None,
    overrides: dict | None = None,
    case: Path = REAL_CASE,
) -> dict:
    """Run the whole path; returns ``{"full": sidecar, "partial": sidecar, "rerun_reused": bool, "seconds": ...}``."""
    cfg = settings(tiny)
    workdir = Path(workdir)
    # %% [markdown]
    # ## 1. A DICOM study from the BraTS case (scanner-like names, no "t1ce" anywhere) and a FLAIR + T1c study
    vols = case_volumes(case, cfg["stride"])
    full = nifti_to_dicom_study(
        vols, f"{case.name}-full", accession_number="ACC1001", extra_series={"loc": SeriesSpec("3 PLANE LOC")}
    )
    partial = nifti_to_dicom_study(
        {m: vols[m] for m in ("flair", "t1ce")},
        f"{case.name}-partial",
        patient_id="ANON0002",
        accession_number="ACC1002",
    )
    for key, series in full.items():
        print(f"series {series[0].SeriesNumber}: {series[0].SeriesDescription!r:18} ({len(series)} slices) <- {key}")

    # %% [markdown]
    # ## 2. The model (your trained bundle, or untrained placeholder weights)
    model_overrides = dict(cfg["overrides"] if checkpoint is None else (overrides or {}))
    ckpt = checkpoint or placeholder_checkpoint(workdir / "models" / "placeholder.pt", model_overrides)
    model = load_segmentation_model(BUNDLE, ckpt, overrides=model_overrides, roi_size=cfg["roi"], device="cpu")

    # %% [markdown]
    # ## 3. A PACS: yours (--dicomweb URL), or a local Orthanc with the DICOMweb plugin on a free port
    server = None if dicomweb else LocalOrthanc().start()
    url = dicomweb or server.dicomweb_url
    try:
        pacs = DicomStore.open(url)
        pacs.store([ds for series in (*full.values(), *partial.values()) for ds in series])  # STOW-RS
        print(f"PACS {url}: studies {pacs.studies()}")

        # %% [markdown]
        # ## 4. dicom-segment: study in, SEG back into the study (same as the medfusion dicom-segment command)
        out = workdir / "results"
        t0 = time.perf_counter()
        res_full = dicom_segment(pacs, model, out, accession_number="ACC1001", nifti=True, send="source")
        seconds = time.perf_counter() - t0
        res_part = dicom_segment(pacs, model, out, accession_number="ACC1002", send="source")
        for name, res in (("full", res_full), ("partial", res_part)):
            side = res.sidecar
            print(f"\n{name}: combination {side['combination']}, missing {side['missing_modalities'] or 'none'}")
            print(f"  SEG series {side['seg']['series_description']!r}, voxels {side['segments']['voxels']}")
            print(f"  unused series: {[(u['description'], u['reason']) for u in side['series_mapping']['unmatched']]}")
            print(f"  timings (s): {side['timings']}")
            print(f"  files: {sorted(p.name for p in res.folder.iterdir())} in {res.folder}")
        print(f"\none study, query to SEG stored: {seconds:.1f} s on {torch.get_num_threads()} CPU threads")

        # %% [markdown]
        # ## 5. Idempotent: the same model on the same study reuses the result and stores nothing new
        again = dicom_segment(pacs, model, out, accession_number="ACC1001", send="source")
        study = res_full.sidecar["study_instance_uid"]
        print(f"re-run reused: {again.reused}; SEG series in the study: {len(pacs.series_with(study, 'SEG'))}")
    finally:
        if server is not None:
            server.stop()

    # %% [markdown]
    # ## 6. The same from the command line, against a hospital endpoint
    # Credentials come from the environment, never from the command line:
    #
    #     export MEDFUSION_DICOMWEB_TOKEN=...      # or --user NAME with MEDFUSION_DICOMWEB_PASSWORD
    #     medfusion dicom-segment https://pacs.example.org/dicom-web --accession ACC1001 \
    #         --bundle bundles/brats_metakd --checkpoint models/model.pt --output_dir results/ --send source
    print(json.dumps(res_full.sidecar["series_mapping"]["used"], indent=1)[:600])
    return {"full": res_full.sidecar, "partial": res_part.sidecar, "rerun_reused": again.reused, "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("pacs_tutorial"))
    parser.add_argument("--tiny", action="store_true", help="downsampled case and a tiny network (seconds)")
    parser.add_argument("--dicomweb", default=None, help="your DICOMweb server (default: start a local Orthanc)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a trained bundles/brats_metakd model.pt")
    parser.add_argument("--override", default="{}", help='JSON overrides it was trained with: {"roi_size": [96,96,96]}')
    parser.add_argument("--case", type=Path, default=REAL_CASE, help="a BraTS 2021-layout case folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    main(args.workdir, args.tiny, args.dicomweb, args.checkpoint, json.loads(args.override), args.case)
