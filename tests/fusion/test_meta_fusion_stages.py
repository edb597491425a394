"""Meta Fusion head + stages: head contract, feature extraction, fit / swap / save / reload, regression path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.apps.meta_fusion_stages import (
    CONFIG_NAME,
    STAGE_CHECKPOINT_NAME,
    SUMMARY_NAME,
    MetaFusionStages,
    extract_features,
    meta_fusion_classifier,
)
from medfusion.encoders.base import EncoderOutput
from medfusion.engines.checkpoint import load_checkpoint
from medfusion.evaluation.classification import evaluate_classification
from medfusion.fusion.base import create_fusion
from medfusion.fusion.meta_fusion import MetaFusion, MetaFusionData
from medfusion.fusion.meta_fusion_head import MetaFusionHead, default_grids, fit_meta_fusion, tabular_data
from medfusion.models.classifier import Classifier

MODS = ("a", "b")
DIMS = {"a": 3, "b": 4}
FAST = {"epochs": 4, "rho_grid": (0.0, 1.0), "batch_size": 0, "hidden": [8]}
GRIDS = {"a": ["null", "identity"], "b": ["null", "identity"]}  # students: b, a, a+b
MASKS = torch.tensor([[True, False], [False, True], [True, True]])


def _features(n: int, seed: int) -> MetaFusionData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = {m: torch.randn(n, d, generator=g) + y[:, None].float() * 1.5 for m, d in DIMS.items()}
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[::4, 0] = False
    mask[1::4, 1] = False
    return MetaFusionData(x, mask, y)


@pytest.fixture(scope="module")
def head() -> MetaFusionHead:
    torch.manual_seed(0)
    return fit_meta_fusion(_features(40, 0), _features(20, 1), GRIDS, num_classes=2, **FAST)


def _enc(x: dict[str, torch.Tensor]) -> dict[str, EncoderOutput]:
    return {m: EncoderOutput(v, ()) for m, v in x.items()}


def test_registered_and_unfitted_head_raises():
    h = create_fusion("meta_fusion", modalities=list(MODS), in_dims=DIMS, num_classes=2, grids=GRIDS, **FAST)
    assert isinstance(h, MetaFusionHead) and not h.fitted
    assert len(h.meta.cohort) == 3
    with pytest.raises(RuntimeError, match="not fitted"):
        h(_enc({m: torch.zeros(2, d) for m, d in DIMS.items()}), torch.ones(2, 2, dtype=torch.bool))
    assert default_grids(MODS, {"a": 3, "b": 40}) == {
        "a": ["null", "identity", "pca:3"],
        "b": ["null", "identity", "pca:8"],
    }
    with pytest.raises(ValueError, match="rule"):
        MetaFusionHead(MODS, DIMS, grids=GRIDS, rule="nope")


def test_head_contract_all_masks_finite_and_absent_content_ignored(head):
    x = _features(6, 2).x
    for mask in MASKS:
        m = mask.expand(6, -1)
        out = head(_enc(x), m)
        assert out.logits.shape == (6, 2) and torch.isfinite(out.logits).all()
        torch.testing.assert_close(out.logits.exp().sum(dim=1), torch.ones(6))
        assert out.aux["student_logits"].shape == (3, 6, 2)
        noisy = {k: (v + 100 * torch.randn_like(v) if not bool(mask[i]) else v) for i, (k, v) in enumerate(x.items())}
        out2 = head(_enc(noisy), m)
        assert torch.equal(out.logits, out2.logits)  # bit-identical
        for i, k in enumerate(MODS):
            if not bool(mask[i]):
                assert (out.embeddings[k] == 0).all()


def test_students_used_counts_available_students_under_average(head):
    head_avg = MetaFusionHead(MODS, DIMS, **head.head_kwargs())
    head_avg.load_state_dict(head.state_dict())
    head_avg.rule = "average"
    x = _features(3, 3).x
    out = head_avg(_enc(x), MASKS)
    assert out.aux["students_used"].tolist() == [1, 1, 3]  # only a -> {a}; only b -> {b}; both -> all three
    committee = head.meta.committee
    used = head.meta.used_students(MASKS, "ensemble")
    assert (used.sum(dim=1) >= 1).all() and int(committee.sum()) >= 1


def test_head_rebuilds_from_config_and_state(head):
    cfg = json.loads(json.dumps(head.head_kwargs()))  # must be plain JSON
    again = MetaFusionHead(MODS, DIMS, num_classes=2, **cfg)
    again.load_state_dict(head.state_dict())
    x = _features(5, 4).x
    mask = torch.ones(5, 2, dtype=torch.bool)
    assert torch.equal(again(_enc(x), mask).logits, head(_enc(x), mask).logits)
    with pytest.raises(ValueError, match="in_dims"):
        MetaFusionHead(MODS, {"a": 3, "b": 5}, **cfg)
    with pytest.raises(ValueError, match="config"):
        MetaFusionHead(MODS, DIMS, grids=GRIDS, **cfg)


# ---------------------------------------------------------------- stages on a tiny fake Classifier
def _classifier() -> Classifier:
    torch.manual_seed(0)
    enc = {
        "a": {"name": "mlp", "in_features": 4, "hidden": [], "out_dim": 3},
        "b": {"name": "mlp", "in_features": 5, "hidden": [], "out_dim": 4},
    }
    return Classifier(enc, head="concat", num_classes=2)


def _batches(n: int, seed: int, bs: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = torch.randn(n, 4, generator=g) + y[:, None] * 2.0
    b = torch.randn(n, 5, generator=g) - y[:, None] * 2.0
    mask = torch.ones(n, 2, dtype=torch.bool)
    mask[::3, 1] = False
    mask[1::3, 0] = False
    a, b = a * mask[:, :1], b * mask[:, 1:]
    target = a.sum(dim=1) * mask[:, 0] + b[:, 0]
    return [
        {
            "a": a[i : i + bs],
            "b": b[i : i + bs],
            "modality_mask": mask[i : i + bs],
            "label": y[i : i + bs, None],
            "target": target[i : i + bs],
            "sample_index": torch.arange(i, min(i + bs, n)),
        }
        for i in range(0, n, bs)
    ]


def test_extract_features_matches_encoders_and_restores_mode():
    net = _classifier().train()
    loader = _batches(20, 0)
    data = extract_features(net, loader, device="cpu")
    assert net.training
    assert data.x["a"].shape == (20, 3) and data.x["b"].shape == (20, 4)
    assert data.mask.dtype == torch.bool and data.mask.shape == (20, 2) and int((~data.mask[:, 1]).sum()) == 7
    assert data.y.dtype == torch.long and data.y.tolist() == [i % 2 for i in range(20)]
    net.eval()
    with torch.no_grad():
        ref = net.encode({"a": loader[1]["a"], "b": loader[1]["b"]})["b"].pooled
    torch.testing.assert_close(data.x["b"][8:16], ref)
    reg = extract_features(net, loader, device="cpu", task="regression", target_key="target")
    assert reg.y.dtype == torch.float32
    with pytest.raises(KeyError, match="nope"):
        extract_features(net, loader, device="cpu", target_key="nope")


def test_stages_fit_swap_save_reload_and_evaluate(tmp_path):
    net = _classifier()
    loaders = {"train": _batches(40, 0), "val": _batches(16, 1)}
    stages = MetaFusionStages(
        net, loaders, tmp_path / "models", tmp_path / "runs", grids=GRIDS, meta_kwargs=FAST, device="cpu"
    )
    head = stages.run()
    assert net.head is head and net.head_name == "meta_fusion"
    summary = json.loads((tmp_path / "runs" / SUMMARY_NAME).read_text())
    assert summary["stage"] == "ensembled" and summary["students"] == [
        "b=identity",
        "a=identity",
        "a=identity+b=identity",
    ]
    assert summary["teachers"] and summary["committee"] and summary["rho"] in (0.0, 1.0)
    # reload exactly as evaluate.json does: network from the config, then the checkpoint
    enc = {
        "a": {"name": "mlp", "in_features": 4, "hidden": [], "out_dim": 3},
        "b": {"name": "mlp", "in_features": 5, "hidden": [], "out_dim": 4},
    }
    loaded = meta_fusion_classifier(enc, 2, tmp_path / "models" / CONFIG_NAME)
    load_checkpoint(tmp_path / "models" / "model.pt", {"model": loaded})
    test = _batches(12, 2)[0]
    net.eval()
    with torch.no_grad():
        ref = net({"a": test["a"], "b": test["b"]}, test["modality_mask"])
        got = loaded.eval()({"a": test["a"], "b": test["b"]}, test["modality_mask"])
    assert torch.equal(ref, got)
    table = evaluate_classification(loaded, _batches(12, 2), MODS, None, n_bootstrap=0, device="cpu", progress=False)
    assert list(table.index) == ["a", "b", "a+b", "mean"]
    assert np.isfinite(table["accuracy"].to_numpy()).all()
    with pytest.raises(FileNotFoundError, match="meta_fusion"):
        meta_fusion_classifier(enc, 2, tmp_path / "none.json")


def test_regression_from_python_through_stages(tmp_path):
    net = _classifier()
    loaders = {"train": _batches(48, 0), "val": _batches(24, 1)}
    kw = {**FAST, "task": "regression", "epochs": 30, "lr": 2e-2}
    stages = MetaFusionStages(
        net, loaders, tmp_path, tmp_path, grids=GRIDS, meta_kwargs=kw, target_key="target", device="cpu"
    )
    head = stages.run()
    val = stages.data["val"]
    pred = head.meta.predict(val.x, val.mask)
    mse = float(((pred - val.y) ** 2).mean())
    assert mse < 0.5 * float(val.y.var())  # clearly better than predicting the mean
    out = net({"a": loaders["val"][0]["a"], "b": loaders["val"][0]["b"]}, loaders["val"][0]["modality_mask"])
    assert out.shape == (8, 1)


def test_tabular_data_nan_marks_absent_and_regression_fit():
    rng = np.random.default_rng(0)
    n = 60
    labs = rng.normal(size=(n, 3))
    vitals = rng.normal(size=(n, 2))
    target = labs[:, 0] + 2 * vitals[:, 1]
    labs[::5, 1] = np.nan
    vitals[3::5, 0] = np.nan
    frame = pd.DataFrame(np.c_[labs, vitals, target], columns=["l0", "l1", "l2", "v0", "v1", "y"])
    cols = {"labs": ["l0", "l1", "l2"], "vitals": ["v0", "v1"]}
    data = tabular_data(frame, cols, "y")
    assert data.mask[:, 0].tolist() == [i % 5 != 0 for i in range(n)]
    assert data.mask[:, 1].tolist() == [i % 5 != 3 for i in range(n)]
    assert torch.isfinite(data.x["labs"]).all() and (data.x["labs"][0] == 0).all()
    train = MetaFusionData({k: v[:40] for k, v in data.x.items()}, data.mask[:40], data.y[:40])
    val = MetaFusionData({k: v[40:] for k, v in data.x.items()}, data.mask[40:], data.y[40:])
    grids = {"labs": ["null", "identity"], "vitals": ["null", "identity"]}
    kw = {"task": "regression", "epochs": 80, "lr": 1e-2, "batch_size": 0, "rho_grid": (0.0,), "hidden": [16]}
    head = fit_meta_fusion(train, val, grids, **kw)
    full = val.mask.all(dim=1)
    pred = head.meta.predict(val.x, val.mask)
    assert float(((pred - val.y)[full] ** 2).mean()) < 0.5 * float(val.y[full].var())
    with pytest.raises(KeyError, match="zz"):
        tabular_data(frame, {"labs": ["zz"]}, "y")


def test_stages_reject_an_unknown_rule_before_running(tmp_path):
    loaders = {"train": _batches(8, 0), "val": _batches(8, 1)}
    with pytest.raises(ValueError, match="MetaFusionStages rule: expected one of"):
        MetaFusionStages(_classifier(), loaders, tmp_path, rule="ensembel")
    with pytest.raises(ValueError, match="votes need"):
        MetaFusionStages(_classifier(), loaders, tmp_path, rule="majority_vote", meta_kwargs={"task": "regression"})
    assert not any(tmp_path.iterdir())


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", ["screened", "mutual_learned"])
def test_interrupted_fit_resumes_from_stage_checkpoint_and_matches(tmp_path, monkeypatch, stop_after):
    tr, va = _features(40, 0), _features(20, 1)
    kw = {**FAST, "seed": 3}
    ref = fit_meta_fusion(tr, va, GRIDS, num_classes=2, **kw)
    ckpt = tmp_path / STAGE_CHECKPOINT_NAME
    orig_fit = MetaFusion.fit

    def killed_fit(self, *a, after_stage=None, **k):  # stands in for SIGKILL right after a stage checkpoint
        def save_then_die(stage: str) -> None:
            after_stage(stage)
            if stage == stop_after:
                raise _Interrupt

        return orig_fit(self, *a, after_stage=save_then_die, **k)

    with monkeypatch.context() as mp:
        mp.setattr(MetaFusion, "fit", killed_fit)
        with pytest.raises(_Interrupt):
            fit_meta_fusion(tr, va, GRIDS, num_classes=2, stage_checkpoint=ckpt, **kw)
    assert torch.load(ckpt, weights_only=True)["stage"] == stop_after
    calls: list[str] = []
    with monkeypatch.context() as mp:
        for name in ("screen", "select_teachers", "mutual_learning", "select_ensemble"):
            orig = getattr(MetaFusion, name)
            mp.setattr(
                MetaFusion, name, lambda self, *a, _o=orig, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1]
            )
        resumed = fit_meta_fusion(tr, va, GRIDS, num_classes=2, stage_checkpoint=ckpt, resume=True, **kw)
    # only the stages after the checkpoint ran again
    expected = {
        "screened": ["select_teachers", "mutual_learning", "select_ensemble"],
        "mutual_learned": ["select_ensemble"],
    }
    assert calls == expected[stop_after]
    assert resumed.fitted
    for key, value in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    test = _features(12, 2)
    with torch.no_grad():
        assert torch.equal(resumed(_enc(test.x), test.mask).logits, ref(_enc(test.x), test.mask).logits)
    # a checkpoint of another configuration is refused, not silently loaded
    with pytest.raises(ValueError, match="different Meta Fusion configuration"):
        fit_meta_fusion(tr, va, GRIDS, num_classes=2, stage_checkpoint=ckpt, resume=True, **{**kw, "seed": 4})
