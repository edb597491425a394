"""clinical_fusion's multi_gpu_train.json under torchrun (2 processes, gloo) matches a single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfusion.apps.bundle import train_bundle

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"

# Everything random that legitimately differs between 1 and 2 processes is off (augmentation, modality
# dropout, shuffling), and the encoders have no BatchNorm (per-rank batch statistics would differ by
# design): rank r with batch 1 sees sample 2i + r, the single process sees (2i, 2i + 1) with batch 2.
COMMON = {
    "modalities": ["ehr", "cxr"],
    "encoders#ehr": {"name": "mlp", "in_features": 1824, "hidden": [16], "out_dim": 16},
    "encoders#cxr": {"name": "mlp", "in_features": 1024, "hidden": [16], "out_dim": 16},
    "image_size": 32,
    "method_name": "concat",
    "meta_fraction": 0.15,  # 40 stays -> 24 training stays (even)
    "modality_dropout": "none",
    "max_epochs": 2,
    "num_workers": 0,
    "train#preprocessing#mode": "eval",
    "train#dataloader#shuffle": False,
    "check_data": False,
    "device": "$torch.device('cpu')",
}


@pytest.fixture(scope="module")
def cohort(clinical_cohort) -> Path:
    return clinical_cohort(40, 2, manifest_cohort=False)


def test_torchrun_two_processes_matches_single_process(cohort, tmp_path, ddp_vs_single, work_dirs):
    single = tmp_path / "single"
    wf = train_bundle(BUNDLE, {**COMMON, "dataset_dir": str(cohort), "batch_size": 2, **work_dirs(single)})
    n_train = len(wf.parser.get_parsed_content("split")["train"])
    assert n_train == 24  # even, so no DistributedSampler padding
    ddp = tmp_path / "ddp"
    a, b = ddp_vs_single(BUNDLE, COMMON, cohort, single, ddp, epoch=2)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == n_train  # 2 epochs x n/2 steps
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=f"weight {k}")
    assert len(list((ddp / "models").glob("last_checkpoint_epoch=*.pt"))) == 1  # rank 0 writes
