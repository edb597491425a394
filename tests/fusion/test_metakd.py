"""MetaKD equations on hand-computed values (docs/methods.md maps each to the code)."""

from __future__ import annotations

import math

import pytest
import torch

from medfusion.fusion.metakd import (
    ImportanceWeights,
    MetaKDHead,
    MetaKDMethod,
    kd_pair_mask,
    kd_weight_matrix,
    metakd_kd_loss,
)
from medfusion.modality import all_combination_masks
from medfusion.models.segmenter import Segmenter, impute_features

MODS = ("flair", "t1", "t1ce", "t2")


def test_pair_set_for_mask():
    mask = torch.tensor([[True, False, True, True]])
    pairs = kd_pair_mask(mask)[0]
    got = {(i, j) for i in range(4) for j in range(4) if pairs[i, j]}
    assert got == {(0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2)}
    # a single present modality has no pair; full set has M*(M-1) ordered pairs
    assert not kd_pair_mask(torch.tensor([[False, True, False, False]])).any()
    assert int(kd_pair_mask(torch.ones(1, 4, dtype=torch.bool)).sum()) == 12


def test_kd_weights_are_softmax_ratio():
    w = torch.tensor([0.0, math.log(2.0), 0.0], requires_grad=True)  # softmax = [.25, .5, .25]
    r = kd_weight_matrix(w)
    assert r[0, 1] == pytest.approx(0.5)
    assert r[1, 0] == pytest.approx(2.0)
    assert r[0, 2] == pytest.approx(1.0)
    assert not r.requires_grad


def test_kd_loss_hand_computed():
    f = torch.tensor([[[1.0], [3.0], [6.0]]])  # [B=1, M=3, C=1]
    mask = torch.tensor([[True, True, False]])
    w = torch.tensor([0.0, math.log(2.0), 0.0])
    # pairs (0->1): 0.5 * |1-3| = 1 ; (1->0): 2 * |3-1| = 4 ; modality 2 absent
    assert float(metakd_kd_loss(f, mask, w)) == pytest.approx(5.0)
    # batch mean: a second sample with only one modality contributes 0
    f2 = torch.cat([f, f])
    mask2 = torch.tensor([[True, True, False], [False, False, True]])
    assert float(metakd_kd_loss(f2, mask2, w)) == pytest.approx(2.5)


def test_kd_teacher_detached_and_w_gets_no_gradient():
    f = torch.tensor([[[1.0], [3.0]]], requires_grad=True)
    w = torch.zeros(2, requires_grad=True)
    metakd_kd_loss(f, torch.ones(1, 2, dtype=torch.bool), w).backward()
    # only the student side carries gradient: d|f1 - 1|/df1 = 1, d|f0 - 3|/df0 = -1 (not -2/2)
    assert f.grad.flatten().tolist() == [-1.0, 1.0]
    assert w.grad is None


def test_mean_imputation_eq2():
    feats = torch.tensor([[[2.0], [4.0], [100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert impute_features(feats, mask, "mean").flatten().tolist() == [2.0, 4.0, 3.0]
    assert impute_features(feats, mask, "zero").flatten().tolist() == [2.0, 4.0, 0.0]


def _seg_batch(b=2, s=16):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(b, 4, s, s, s, generator=g),
        "label": (torch.rand(b, 3, s, s, s, generator=g) > 0.7).float(),
        "modality_mask": torch.ones(b, 4, dtype=torch.bool),
    }


def test_meta_step_touches_only_w():
    net = Segmenter(MODS, channels=(4, 8, 16))
    method = MetaKDMethod(MODS, alpha=0.1, meta_lr=0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    w_before = method.state.w.detach().clone()
    method.meta_step(net, _seg_batch())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(method.state.w.detach(), w_before)
    assert int(method.state.meta_steps) == 1


def test_loss_step_combines_task_and_kd():
    net = Segmenter(MODS, channels=(4, 8, 16))
    batch = _seg_batch()
    with_kd = MetaKDMethod(MODS, alpha=0.1, dropout_mode="none").loss_step(net, batch, None)
    no_kd = MetaKDMethod(MODS, alpha=0.0, dropout_mode="none").loss_step(net, batch, None)
    assert float(with_kd["kd_loss"]) > 0
    assert float(with_kd["loss"]) == pytest.approx(float(with_kd["task_loss"] + 0.1 * with_kd["kd_loss"]), rel=1e-6)
    assert float(no_kd["kd_loss"]) == 0.0
    assert float(no_kd["loss"]) == pytest.approx(float(with_kd["task_loss"]), rel=1e-6)


def test_importance_weights_ranking():
    s = ImportanceWeights(MODS)
    with torch.no_grad():
        s.w.copy_(torch.tensor([1.0, -1.0, 2.0, 0.0]))
    assert s.ranking() == ["t1ce", "flair", "t2", "t1"]
    assert sum(s.as_dict().values()) == pytest.approx(1.0)


def test_classification_head_all_masks_and_absent_content():
    head = MetaKDHead(("a", "b", "c"), {"a": 5, "b": 6, "c": 7}, num_classes=3, embed_dim=4).eval()
    from medfusion.encoders.base import EncoderOutput

    feats = {m: EncoderOutput(torch.randn(2, d)) for m, d in zip("abc", (5, 6, 7))}
    for mask in all_combination_masks(("a", "b", "c")):
        m = mask.expand(2, -1)
        out = head(feats, m)
        assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
        changed = dict(feats)
        for i, name in enumerate("abc"):
            if not mask[i]:
                changed[name] = EncoderOutput(torch.randn(2, feats[name].pooled.shape[1]) * 100)
        assert torch.equal(head(changed, m).logits, out.logits)
