"""Same seed -> identical weights and identical metrics on CPU (two full bundle runs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from medfusion.apps.bundle import run_bundle

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "clinical_fusion"
SETTINGS = {
    "modalities": ["ehr", "cxr"],
    "encoders#ehr": {"name": "mlp", "in_features": 1824, "hidden": [16], "out_dim": 16},
    "encoders#cxr": {"name": "resnet10", "spatial_dims": 2, "widen_factor": 0.25},
    "image_size": 32,
    "method_name": "qmf",  # modality dropout + per-sample history + random augmentation: all seeded
    "max_epochs": 2,
    "batch_size": 8,
    "meta_fraction": 0.15,  # 24 training stays: full batches (BatchNorm needs more than 1 sample)
    "num_workers": 0,
    "device": "$torch.device('cpu')",
    "seed": 5,
}


@pytest.fixture(scope="module")
def cohort(clinical_cohort) -> Path:
    return clinical_cohort(40, 4, manifest_cohort=False)


def _run(cohort: Path, work: Path) -> tuple[dict, pd.DataFrame]:
    ov = {**SETTINGS, "dataset_dir": str(cohort), "ckpt_dir": str(work / "m"), "output_dir": str(work / "r")}
    run_bundle(BUNDLE, ["train.json"], "train", ov)
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], "train", {**ov, "eval_output_dir": str(work / "e")})
    ckpt = torch.load(work / "m" / "last_checkpoint_epoch=2.pt", weights_only=False)
    return ckpt, pd.read_csv(work / "e" / "summary.csv", index_col=0)


def test_same_seed_gives_identical_weights_and_metrics(cohort, tmp_path):
    a, sa = _run(cohort, tmp_path / "a")
    b, sb = _run(cohort, tmp_path / "b")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    pd.testing.assert_frame_equal(sa, sb)
    assert a["method"]["dropout"] == b["method"]["dropout"]
