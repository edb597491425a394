"""Fixtures shared by the bundle tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import torch

from medfusion.apps.bundle import torchrun_command

#: clinical_fusion settings small enough for CI: 32-pixel images, 16-voxel volumes, 32 tokens, the small random
#: text encoder, a 16-unit EHR GRU, batches of 8, no loader workers, CPU.
CLINICAL_TINY: Mapping[str, Any] = MappingProxyType(
    {
        "image_size": 32,
        "volume_size": 16,
        "max_length": 32,
        "batch_size": 8,
        "num_workers": 0,
        "encoders#report": {"name": "bert_tiny"},
        "encoders#ehr#hidden": 16,
        "device": "$torch.device('cpu')",
    }
)


@pytest.fixture(scope="session")
def clinical_tiny() -> Mapping[str, Any]:
    """:data:`CLINICAL_TINY` (read-only; merge it into an overrides dict)."""
    return CLINICAL_TINY


def run_dirs(work: Path) -> dict[str, str]:
    """``ckpt_dir`` / ``output_dir`` overrides of a run written under ``work`` (``models/``, ``runs/``)."""
    return {"ckpt_dir": str(work / "models"), "output_dir": str(work / "runs")}


@pytest.fixture(scope="session")
def work_dirs() -> Callable[[Path], dict[str, str]]:
    """:func:`run_dirs`: ``work_dirs(work)`` -> ``{"ckpt_dir": work/models, "output_dir": work/runs}``."""
    return run_dirs


@pytest.fixture
def ddp_vs_single() -> Callable[..., tuple[dict[str, Any], dict[str, Any]]]:
    """Run ``train.json + multi_gpu_train.json`` under torchrun and load both runs' last checkpoints.

    The returned function takes ``(bundle, common, dataset_dir, single_dir, ddp_dir, epoch)``: it trains
    with 2 gloo processes, batch 1 per rank and the distributed sampler's shuffling off (so rank r sees
    samples 2i + r, like the single process's batch of 2 already written under ``single_dir``), then
    returns ``(single checkpoint, ddp checkpoint)`` of ``last_checkpoint_epoch=<epoch>.pt``.
    """

    def run(
        bundle: Path, common: Mapping[str, Any], dataset_dir: Path, single_dir: Path, ddp_dir: Path, epoch: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        overrides = {
            **common,
            "dataset_dir": str(dataset_dir),
            "batch_size": 1,
            **run_dirs(ddp_dir),
            "train#sampler#shuffle": False,
        }
        cmd = torchrun_command(bundle, ["train.json", "multi_gpu_train.json"], overrides)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        name = f"last_checkpoint_epoch={epoch}.pt"
        return (
            torch.load(single_dir / "models" / name, weights_only=False),
            torch.load(ddp_dir / "models" / name, weights_only=False),
        )

    return run
