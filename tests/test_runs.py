"""Runs and results are never silently lost, mixed or wrong (issue #12 items 1-4).

The kill-and-resume comparison of whole bundle runs is in ``tests/engines/test_resume.py``; these tests
are the small, direct ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import EarlyStopHandler

from medfusion.engines.checkpoint import AtomicCheckpointSaver, ValidationState


# ------------------------------------------------------------------------- 1. the best model after a resume
def _validation(tmp_path):
    evaluator = SimpleNamespace(state=SimpleNamespace(best_metric=-1, best_metric_epoch=-1))
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"x": torch.nn.Linear(1, 1)}, save_key_metric=True,
        key_metric_filename="model.pt",
    )  # fmt: skip
    stop = EarlyStopHandler(patience=3, score_function=lambda e: 0.0)
    stop.set_trainer(Engine(lambda e, b: None))
    return evaluator, saver, stop, ValidationState(evaluator, [saver, stop])


def test_validation_state_round_trip_keeps_best_score_and_early_stop_counter(tmp_path):
    evaluator, saver, stop, state = _validation(tmp_path / "a")
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.8, 3
    saver._key_metric_checkpoint.load_state_dict({"_saved": [(0.8, "checkpoint_key_metric=0.8000.pt")]})
    stop._handler.counter, stop._handler.best_score = 2, 0.8
    saved = state.state_dict()

    evaluator2, saver2, stop2, state2 = _validation(tmp_path / "b")
    state2.load_state_dict(saved)
    assert (evaluator2.state.best_metric, evaluator2.state.best_metric_epoch) == (0.8, 3)
    assert [tuple(i) for i in saver2._key_metric_checkpoint._saved] == [(0.8, "checkpoint_key_metric=0.8000.pt")]
    # a worse score after the resume is not a new best: model.pt is not rewritten
    assert not saver2._key_metric_checkpoint._compare_fn(0.5)
    assert (stop2._handler.counter, stop2._handler.best_score) == (2, 0.8)


def test_validation_state_refuses_handler_states_it_cannot_place(tmp_path):
    evaluator, saver, stop, state = _validation(tmp_path)
    saved = state.state_dict()
    with pytest.raises(ValueError, match="validation handler states"):
        ValidationState(evaluator, [stop]).load_state_dict(saved)
