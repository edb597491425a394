"""multi_gpu_train.json under torchrun (2 processes, gloo on CPU) matches a single-process run; one rank
failing stops every rank with its error and leaves only whole checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medfusion.apps.bundle import torchrun_command, train_bundle

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"

# randomness that legitimately differs between 1 and 2 processes is switched off, so both runs see
# the same samples in the same pairs: rank r of 2 with batch 1 gets samples 2i + r, the single process
# with batch 2 gets (2i, 2i + 1); DDP averages the two gradients exactly as the batch mean does.
COMMON = {
    "max_epochs": 2,
    "roi_size": [32, 32, 32],
    "num_workers": 0,
    "cache_rate": 1.0,
    "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.1},
    "method#meta_interval": 1,
    "method#meta_steps": 2,
    "method#dropout_mode": "none",
    # batch Dice (the default task loss) is taken over each rank's local batch, so 2 processes x 1 crop and
    # 1 process x 2 crops optimise different losses; per-crop Dice is the same under both (default_task_loss)
    "method#task_loss": "$monai.losses.DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=False)",
    "network_def#channels": [8, 16, 32, 64],
    "train#preprocessing#flip_prob": 0.0,
    "train#preprocessing#intensity_aug": False,
    "meta#preprocessing#flip_prob": 0.0,
    "meta#preprocessing#intensity_aug": False,
    "train#dataloader#shuffle": False,
    "meta#dataloader#shuffle": False,
    "check_data": False,
}


@pytest.fixture(scope="module")
def cohort(brats_cohort) -> Path:
    return brats_cohort(9, 32, 11)  # 9 cases -> 4 training cases (even)


@pytest.fixture
def single_run(cohort, work_dirs) -> Callable[[dict, Path], Path]:
    """``single_run(common, work)``: the single-process run (batch 2) the 2-process run (batch 1 per rank) is
    compared with, written under ``work``."""

    def run(common: dict, work: Path) -> Path:
        train_bundle(BUNDLE, {**common, "dataset_dir": str(cohort), "batch_size": 2, **work_dirs(work)})
        return work

    return run


def test_torchrun_two_processes_matches_single_process(cohort, tmp_path, ddp_vs_single, single_run):
    single = single_run(COMMON, tmp_path / "single")
    ddp = tmp_path / "ddp"
    a, b = ddp_vs_single(BUNDLE, COMMON, cohort, single, ddp, epoch=2)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 4
    for k, v in a["model"].items():
        # float summation order differs between 1 and 2 processes; Adam amplifies it on the conv biases in
        # front of instance norms (their gradient is ~0), hence an absolute tolerance
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-3, msg=f"weight {k}")
    # Adam normalises the meta gradient, so rounding differences move w by up to ~lr per step; a wrong
    # meta batch (e.g. both ranks drawing the same sample) moved it by 9e-3 when this test was written
    torch.testing.assert_close(b["method"]["iwv"]["w"], a["method"]["iwv"]["w"], rtol=0, atol=2e-3)
    # rank-0-only outputs: one trajectory file, one set of checkpoints
    assert len(list((ddp / "models").glob("last_checkpoint_epoch=*.pt"))) == 1


def test_torchrun_qmf_matches_single_process(cohort, tmp_path, ddp_vs_single, single_run):
    """A method with its own distributed state: QMF's per-case loss history is gathered from both ranks."""
    # Eq. 16 pairs cases inside a batch (none in a batch of 1 per rank), so the regulariser is off here
    common = {**COMMON, "method_name": "qmf", "method_kwargs": {"lam": 0.0}, "network_def#channels": [4, 8, 16]}
    single = single_run(common, tmp_path / "single")
    a, b = ddp_vs_single(BUNDLE, common, cohort, single, tmp_path / "ddp", epoch=2)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 4
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-3, msg=f"weight {k}")
    # every training case visited once per epoch in both runs, its present modalities recorded once each
    assert a["method"]["history"]["history_count"].tolist() == b["method"]["history"]["history_count"].tolist()
    assert int(a["method"]["history"]["history_count"].min()) == 2
    torch.testing.assert_close(b["method"]["history"]["history"], a["method"]["history"]["history"], rtol=0, atol=1e-4)


FAULT = textwrap.dedent(
    """
    import torch.distributed as dist
    from ignite.engine import Events

    class FailOnRank:
        def __init__(self, rank, iteration):
            self.rank, self.iteration = rank, iteration

        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iteration), self)

        def __call__(self, engine):
            if dist.get_rank() == self.rank:
                raise RuntimeError(f"injected fault on rank {self.rank} at iteration {engine.state.iteration}")
    """
)


def test_one_rank_failing_stops_all_ranks_with_its_error_and_no_half_written_checkpoint(cohort, tmp_path, work_dirs):
    (tmp_path / "fault.py").write_text(FAULT)
    # a config fragment merged after multi_gpu_train.json: rank 1 raises at iteration 3. 4 training cases, 2 ranks,
    # batch 1: 2 iterations per epoch, so iteration 3 is in epoch 2 (after epoch 1's checkpoint and model.pt were
    # written); rank 0 is then waiting in the gradient all-reduce
    fragment = tmp_path / "fault.json"
    handlers = "$(@train#handlers[: -2] if dist.get_rank() > 0 else @train#handlers)"
    fragment.write_text(json.dumps({"train#trainer#train_handlers": handlers + " + [fault.FailOnRank(1, 3)]",
                                    "+imports": ["$import fault"]}))  # fmt: skip
    work = tmp_path / "ddp"
    overrides = {**COMMON, "dataset_dir": str(cohort), "batch_size": 1, **work_dirs(work)}
    configs = ["train.json", "multi_gpu_train.json", os.path.relpath(fragment, BUNDLE / "configs")]
    cmd = torchrun_command(BUNDLE, configs, overrides)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    proc = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode != 0, proc.stderr[-3000:]  # the whole job stops: no rank is left waiting
    assert "injected fault on rank 1 at iteration 3" in proc.stderr, proc.stderr[-3000:]
    files = sorted(p.name for p in (work / "models").iterdir())
    assert files == ["last_checkpoint_epoch=1.pt", "model.pt"], files  # no temporary or partial file
    for name in files:  # whole checkpoints of epoch 1, with their run record
        ckpt = torch.load(work / "models" / name, weights_only=True)
        assert ckpt["record"]["method"] == "metakd"
    assert torch.load(work / "models" / files[0], weights_only=True)["trainer"]["iteration"] == 2  # epoch 1
