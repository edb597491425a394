"""Kill a bundle training run mid-epoch (hard SIGKILL in a subprocess), resume it, and compare with an
uninterrupted run: same final weights, IWV and meta-optimizer state within float tolerance, and the same
best model (``model.pt``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "brats_metakd"

# The validation score falls every epoch, so epoch 1 is the best: an uninterrupted run keeps epoch 1's weights in
# model.pt, and a resumed run that forgot the best score would overwrite them at its first validation.
METRIC = textwrap.dedent(
    """
    from ignite.metrics import Metric

    class FallingScore(Metric):
        def attach(self, engine, name, usage=None):
            self._engine = engine
            super().attach(engine, name)

        def reset(self):
            pass

        def update(self, output):
            pass

        def compute(self):
            return 1.0 / self._engine.state.epoch
    """
)

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from ignite.engine import Events
    from medfusion.apps.bundle import bundle_workflow

    dataset, work, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    overrides = {
        "dataset_dir": dataset, "ckpt_dir": work + "/models", "output_dir": work + "/runs",
        "max_epochs": 3, "roi_size": [32, 32, 32], "batch_size": 2, "num_workers": 0, "cache_rate": 1.0,
        "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.1}, "method#meta_interval": 1, "method#meta_steps": 2,
        "network_def#channels": [8, 16, 32, 64], "resume": resume, "val_interval": 1,
        "validate#key_metric": {"val_score": {"_target_": "falling_score.FallingScore"}},
    }
    wf = bundle_workflow(%r, ["train.json"], "train", overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    if kill_at > 0:
        @trainer.on(Events.ITERATION_COMPLETED(once=kill_at))
        def _die(engine):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a crash or an OOM kill would be
    wf.run()
    wf.finalize()
    """
) % str(BUNDLE)


def _run(script: Path, dataset: Path, work: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run(
        [sys.executable, str(script), str(dataset), str(work), str(kill_at), "1" if resume else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from medfusion.data.synth_brats import write_brats_cohort

    out = tmp_path_factory.mktemp("resume") / "cohort"
    write_brats_cohort(out, cases=8, size=32, seed=3)
    return out


def test_kill_mid_epoch_and_resume_matches_uninterrupted(cohort, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    (tmp_path / "falling_score.py").write_text(METRIC)
    full = _run(script, cohort, tmp_path / "full", kill_at=0, resume=False)
    assert full.returncode == 0, full.stderr[-3000:]
    # 8 cases -> 3 training cases, batch 2 -> 2 iterations per epoch: iteration 3 is inside epoch 2
    killed = _run(script, cohort, tmp_path / "cut", kill_at=3, resume=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = sorted((tmp_path / "cut" / "models").glob("last_checkpoint_epoch=*.pt"))
    assert [p.name for p in ckpts] == ["last_checkpoint_epoch=1.pt"]
    assert not list((tmp_path / "cut" / "models").glob("tmp*")), "no partial checkpoint file is left"
    resumed = _run(script, cohort, tmp_path / "cut", kill_at=0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed run replaced the checkpoint it resumed from: one last_checkpoint_* is kept across resumes too
    assert sorted(p.name for p in (tmp_path / "cut" / "models").glob("last_*")) == ["last_checkpoint_epoch=3.pt"]

    a = torch.load(tmp_path / "full" / "models" / "last_checkpoint_epoch=3.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "models" / "last_checkpoint_epoch=3.pt", weights_only=False)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=f"model weight {k}")
    torch.testing.assert_close(b["method"]["iwv"]["w"], a["method"]["iwv"]["w"], rtol=1e-5, atol=1e-7)
    assert int(b["method"]["iwv"]["meta_steps"]) == 12  # 6 iterations x 2 meta steps
    # the best model is epoch 1's in both runs (a resumed run used to overwrite it at its first validation)
    best_a = torch.load(tmp_path / "full" / "models" / "model.pt", weights_only=True)
    best_b = torch.load(tmp_path / "cut" / "models" / "model.pt", weights_only=True)
    for k, v in best_a["model"].items():
        torch.testing.assert_close(best_b["model"][k], v, rtol=1e-5, atol=1e-6, msg=f"model.pt weight {k}")
    assert any(not torch.equal(v, a["model"][k]) for k, v in best_a["model"].items()), "model.pt is epoch 1's"
    assert a["validation"]["best_metric_epoch"] == b["validation"]["best_metric_epoch"] == 1
    # the trajectory file of the resumed run has no duplicated meta steps
    traj = pd.read_csv(tmp_path / "cut" / "runs" / "iwv_trajectory.csv")
    assert traj["meta_step"].tolist() == list(range(1, 13))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from medfusion.engines.checkpoint import resume_handlers

    with pytest.raises(FileNotFoundError, match="holds no last_checkpoint_epoch"):
        resume_handlers(True, tmp_path, {})
    assert resume_handlers(False, tmp_path, {}) == []
    assert resume_handlers("false", tmp_path, {}) == []  # as the MONAI CLI passes "--resume false"
    with pytest.raises(ValueError, match="resume must be true or false"):
        resume_handlers("maybe", tmp_path, {})
