"""Method recipes by name: every recipe (methods, baselines, ablations) builds and trains one step; the ablation
recipes switch exactly the documented ingredient."""

from __future__ import annotations

import pytest
import torch

from medfusion.apps.staged import method_network
from medfusion.fusion.recipes import (
    RECIPES,
    build_method,
    create_method,
    default_head_kwargs,
    head_name,
    list_methods,
    training_head,
)
from medfusion.modality import all_combination_masks
from medfusion.models.classifier import Classifier

MODS = ("a", "b", "c")


def tiny_batch(b: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(b, 3, generator=g) for m in MODS}
    batch.update(
        modality_mask=all_combination_masks(MODS)[torch.arange(b) % 7],
        label=torch.randint(0, 2, (b,), generator=g),
        sample_index=torch.arange(b),
    )
    return batch


def build(name: str, method_kwargs: dict | None = None) -> tuple[Classifier, object]:
    """The clinical bundle's wiring on tiny MLP encoders: head and recipe from ``name`` alone."""
    torch.manual_seed(0)
    encoders = {m: {"name": "mlp", "in_features": 3, "hidden": [], "out_dim": d} for m, d in zip(MODS, (5, 6, 7))}
    model = method_network(name, encoders, 2, num_train_samples=7)  # a staged method: its training head
    full = dict(tiny_batch())
    full["modality_mask"] = torch.ones(7, 3, dtype=torch.bool)
    context = {"meta_loader": [full], "seed": 0, "modality_dropout": "uniform", "output_dir": None}
    return model, build_method(name, MODS, method_kwargs, context)


def test_listing_separates_methods_from_ablations():
    assert list_methods(include_ablations=False) == [
        "concat", "late", "mean_features", "meta_fusion", "metakd", "omnifuse", "qmf"
    ]  # fmt: skip
    # a staged method trains another head, then fits its own (Meta Fusion: concat encoders, then the cohort)
    assert (training_head("meta_fusion"), head_name("meta_fusion")) == ("concat", "meta_fusion")
    assert all(training_head(n) == head_name(n) for n in list_methods() if n != "meta_fusion")
    ablations = set(list_methods()) - set(list_methods(include_ablations=False))
    assert ablations == {
        "late_modality_ce",
        "qmf_no_detach",
        "omnifuse_no_imputation",
        "omnifuse_no_cra",
        "metakd_no_kd",
        "metakd_uniform_kd",
        "metakd_fixed_kd",
    }
    for name in ablations:
        assert RECIPES[name].ablation_of in list_methods(include_ablations=False)
    with pytest.raises(KeyError, match="unknown method 'hemis'"):
        head_name("hemis")
    with pytest.raises(KeyError, match="known methods"):
        create_method("hemis", MODS)


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "metakd_fixed_kd"])
def test_every_recipe_trains_one_step(name):
    model, method = build(name)
    batch = method.prepare(tiny_batch(), None)
    losses = method.loss_step(model, batch, None)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_late_modality_ce_adds_qmfs_per_modality_loss_with_weight_one():
    plain_model, plain = build("late")
    model, method = build("late_modality_ce")
    assert plain.modality_loss_weight == 0.0 and method.modality_loss_weight == 1.0
    batch = tiny_batch()
    losses = method.loss_step(model, batch, None)
    assert losses["loss"].item() == pytest.approx((losses["task_loss"] + losses["modality_loss"]).item(), rel=1e-6)
    # same head and initial weights as "late": the fused term is the same number
    base = plain.loss_step(plain_model, batch, None)
    assert base["task_loss"].item() == pytest.approx(losses["task_loss"].item(), rel=1e-6)
    assert "modality_loss" not in base


def test_ablation_recipes_switch_their_ingredient():
    assert build("qmf")[0].head.detach_weights and not build("qmf_no_detach")[0].head.detach_weights
    assert build("omnifuse")[0].head.imputation == "cra"
    assert build("omnifuse_no_imputation")[0].head.imputation == "off"
    assert build("omnifuse_no_cra")[0].head.imputation == "none"
    meta = build("metakd")[1]
    assert meta.kd_weights == "meta" and meta.alpha == 0.1 and len(meta.handlers()) == 1
    no_kd = build("metakd_no_kd")[1]
    assert no_kd.alpha == 0.0 and no_kd.handlers() == []
    uniform = build("metakd_uniform_kd")[1]
    assert uniform.kd_weights == "uniform" and uniform.alpha == 0.1 and uniform.handlers() == []
    with pytest.raises(ValueError, match="needs method kwargs \\['kd_weights'\\]"):
        build("metakd_fixed_kd")
    fixed = build("metakd_fixed_kd", {"kd_weights": {"a": 2.0, "b": 1.0, "c": 1.0}})[1]
    assert fixed.state.as_dict() == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25}) and fixed.handlers() == []
    # caller kwargs win over the recipe's defaults
    assert build("metakd_no_kd", {"alpha": 0.2})[1].alpha == 0.2
    assert default_head_kwargs("omnifuse_no_imputation", 3, {"impute": "cra"})["impute"] == "cra"
    assert default_head_kwargs("qmf_no_detach", 11) == {"detach_weights": False, "num_samples": 11}
    # inference: no data-sized kwargs (loading the checkpoint sizes QMF's history)
    assert default_head_kwargs("qmf_no_detach") == {"detach_weights": False}


def test_register_method_refuses_a_taken_name_and_hooks_reach_the_registry():
    from medfusion.engines.method import Method
    from medfusion.fusion.qmf import QMFMethod
    from medfusion.fusion.recipes import method_class, register_method

    with pytest.raises(ValueError, match="already registered"):
        register_method("qmf", head="qmf")(QMFMethod)
    assert method_class("qmf_no_detach") is QMFMethod
    assert QMFMethod.data_head_kwargs(9) == {"num_samples": 9} and Method.data_head_kwargs(9) == {}
    assert method_class("late").evaluation_outputs(None, [], MODS, "unused") == []
