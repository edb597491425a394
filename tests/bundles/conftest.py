"""Fixtures shared by the bundle tests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from medfusion.apps.bundle import torchrun_command


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
            "ckpt_dir": str(ddp_dir / "models"),
            "output_dir": str(ddp_dir / "runs"),
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
