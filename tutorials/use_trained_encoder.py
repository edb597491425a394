"""Tutorial: reuse a trained MRI encoder in your own PyTorch/MONAI pipeline (a linear probe on pooled features).

Run it as a script (``python tutorials/use_trained_encoder.py --workdir /tmp/mf_encoder``) or cell by cell
(``# %%`` cells). Without arguments it generates a phantom cohort and trains the BraTS bundle for one tiny
epoch (well under a minute on a laptop CPU); with ``--checkpoint`` and ``--dataset`` it uses your own trained
bundle output and BraTS folder (pass ``--channels`` if you trained with non-default channels).
The test suite runs ``main(tmp_path)``.

What it shows:
1. ``medfusion export-encoder`` (here its Python twin :func:`medfusion.apps.export.export_encoder`) writing the
   t1ce encoder as ONE TorchScript file with its description (modality, feature maps, preprocessing);
2. loading that file with plain ``torch.jit.load`` -- no medfusion import needed downstream;
3. a MONAI ``LoadImage -> Orientation -> NormalizeIntensity`` pipeline feeding it, pooled features per case,
   and a scikit-learn logistic regression on them (leave-one-out).
"""

from __future__ import annotations

# %% [markdown]
# ## 0. Setup
import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, DivisiblePad, LoadImage, NormalizeIntensity, Orientation
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneOut, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medfusion.apps.bundle import train_bundle
from medfusion.apps.export import export_encoder
from medfusion.data.brats import discover_brats
from medfusion.data.synth_brats import write_brats_cohort

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brats_metakd"
TINY_CHANNELS = [8, 16, 32, 64]


# %% [markdown]
# ## 1. A trained bundle (tiny training on phantoms unless you bring a checkpoint)
def train_tiny(workdir: Path) -> tuple[Path, Path, list[int]]:
    """Write 6 phantom cases (32^3), train the BraTS bundle for 1 epoch; returns (cohort, checkpoint, channels)."""
    cohort = workdir / "cohort"
    if not cohort.is_dir():
        write_brats_cohort(cohort, cases=6, size=32, seed=7)
    train_bundle(
        BUNDLE,
        {
            "dataset_dir": str(cohort),
            "ckpt_dir": str(workdir / "models"),
            "output_dir": str(workdir / "runs"),
            "max_epochs": 1,
            "roi_size": [32, 32, 32],
            "batch_size": 2,
            "num_workers": 0,
            "cache_rate": 1.0,
            "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.2},
            "method#meta_interval": 1,
            "method#meta_steps": 1,
            "network_def#channels": TINY_CHANNELS,
        },
    )
    return cohort, workdir / "models" / "model.pt", TINY_CHANNELS


# %% [markdown]
# ## 2. Plain PyTorch + MONAI: load the TorchScript encoder and extract pooled features
def load_torchscript_encoder(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """``torch.jit.load`` plus the JSON description stored inside the file."""
    extra = {"medfusion_encoder.json": ""}
    encoder = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    return encoder, json.loads(extra["medfusion_encoder.json"])


def pooled_features(encoder: torch.jit.ScriptModule, info: dict, files: list[str]) -> np.ndarray:
    """One pooled feature vector per NIfTI file, ``[N, out_dim]``."""
    # The same steps the bundle uses for one channel (info["preprocessing"]["steps"] lists them).
    preprocess = Compose(
        [
            LoadImage(image_only=True, ensure_channel_first=True),
            Orientation(axcodes="RAS"),
            NormalizeIntensity(nonzero=True, channel_wise=True),
            DivisiblePad(k=info["spatial_divisor"]),
        ]
    )
    feats = []
    with torch.no_grad():
        for f in files:
            x = torch.as_tensor(preprocess(f), dtype=torch.float32).unsqueeze(0)  # [1, 1, D, H, W]
            pooled, *maps = encoder(x)
            feats.append(pooled[0].numpy())
    print(f"input {list(x.shape)} -> pooled {list(pooled.shape)}, maps {[list(m.shape) for m in maps]}")
    return np.stack(feats)


def whole_tumour_volume(seg_file: str) -> int:
    """Voxels with any tumour label (the probe's target: above/below the cohort median)."""
    return int((np.asarray(nib.load(seg_file).dataobj) > 0).sum())


# %% [markdown]
# ## 3. Everything together
def main(
    workdir: Path | None = None,
    checkpoint: Path | None = None,
    dataset: Path | None = None,
    channels: list[int] | None = None,
    modality: str = "t1ce",
) -> dict:
    """Train (or reuse), export the ``modality`` encoder, extract features, fit a linear probe; returns results."""
    start = time.perf_counter()
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mf_encoder_"))
    work.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        dataset, checkpoint, channels = train_tiny(work)
    if dataset is None:
        raise ValueError("pass --dataset (the BraTS folder to extract features from) together with --checkpoint.")
    overrides = {"network_def#channels": list(channels)} if channels else None
    ts_file = export_encoder(
        BUNDLE, modality, work / f"{modality}_encoder.ts", checkpoint=checkpoint, overrides=overrides, overwrite=True
    )
    print(f"exported {ts_file} ({ts_file.stat().st_size / 1e6:.1f} MB)")

    encoder, info = load_torchscript_encoder(ts_file)
    print(f"modality {info['modality']}, out_dim {info['out_dim']}, feature maps {info['feature_info']}")
    cases = [c for c in discover_brats(dataset, require_label=True) if c.get(modality)]
    features = pooled_features(encoder, info, [c[modality] for c in cases])
    volumes = np.array([whole_tumour_volume(c["label"]) for c in cases])
    target = (volumes > np.median(volumes)).astype(int)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    pred = cross_val_predict(probe, features, target, cv=LeaveOneOut())
    accuracy = float((pred == target).mean())
    print(f"features {list(features.shape)}, targets {target.tolist()}, leave-one-out accuracy {accuracy:.2f}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"export": ts_file, "info": info, "features": features, "target": target, "accuracy": accuracy}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--checkpoint", type=Path, default=None, help="trained model.pt (default: train a tiny one)")
    ap.add_argument("--dataset", type=Path, default=None, help="BraTS folder (needed with --checkpoint)")
    ap.add_argument("--channels", type=int, nargs="+", default=None, help="network_def#channels used in training")
    ap.add_argument("--modality", default="t1ce")
    a = ap.parse_args()
    main(a.workdir, a.checkpoint, a.dataset, a.channels, a.modality)
