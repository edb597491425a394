"""apps/staged.py: one network builder for every method; a staged method (Meta Fusion) trains another head,
checks its head kwargs before training, and rebuilds its fitted head beside the checkpoint."""

from __future__ import annotations

import json

import pytest

from medfusion.apps.staged import is_staged, method_network, training_checkpoint_name
from medfusion.fusion.recipes import head_name

ENCODERS = {m: {"name": "mlp", "in_features": 3, "hidden": [], "out_dim": d} for m, d in (("a", 5), ("b", 6))}


def test_non_staged_methods_build_the_recipe_head_as_before():
    assert not is_staged("qmf") and training_checkpoint_name("qmf") == "model.pt"
    net = method_network("qmf", ENCODERS, 2, {"detach_weights": False}, num_train_samples=11)
    assert net.head_name == head_name("qmf") and not net.head.detach_weights and net.head.num_samples == 11


def test_meta_fusion_trains_concat_checks_kwargs_and_rebuilds_the_fitted_head(tmp_path):
    assert is_staged("meta_fusion") and training_checkpoint_name("meta_fusion") == "supervised_model.pt"
    net = method_network("meta_fusion", ENCODERS, 2, {"rule": "average", "epochs": 2}, num_train_samples=11)
    assert net.head_name == "concat"
    with pytest.raises(ValueError, match=r"unknown keys \['epoch'\]"):
        method_network("meta_fusion", ENCODERS, 2, {"epoch": 2})
    with pytest.raises(ValueError, match="meta_fusion head_kwargs rule: expected one of"):
        method_network("meta_fusion", ENCODERS, 2, {"rule": "ensembel"})
    with pytest.raises(FileNotFoundError, match="meta_fusion_config.json"):  # evaluation before the stages ran
        method_network("meta_fusion", ENCODERS, 2, ckpt_path=tmp_path / "model.pt")
    config = {
        "modalities": ["a", "b"],
        "in_dims": {"a": 5, "b": 6},
        "cohort": [{"a": "identity", "b": "null"}, {"a": "null", "b": "pca:2"}],
        "num_classes": 2,
    }
    (tmp_path / "meta_fusion_config.json").write_text(
        json.dumps({"head_kwargs": {"config": config, "rule": "average"}})
    )
    deployed = method_network("meta_fusion", ENCODERS, 2, ckpt_path=tmp_path / "model.pt")
    assert deployed.head_name == "meta_fusion" and deployed.head.rule == "average"
    assert [c.name for c in deployed.head.meta.cohort] == ["a=identity", "b=pca:2"]
