"""MetaKD equations on hand-computed values (docs/methods.md maps each to the code)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.fusion.base import impute_features
from medfusion.fusion.metakd import (
    ImportanceWeights,
    MetaKDHead,
    MetaKDMethod,
    default_task_loss,
    kd_pair_mask,
    kd_weight_matrix,
    metakd_kd_loss,
)
from medfusion.modality import all_combination_masks
from medfusion.models.segmenter import Segmenter

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


# ------------------------------------------------------------------ meta step (outer problem)
class _Identity(torch.nn.Module):
    """Encoder whose pooled feature is its input ``[B, 1]``."""

    def forward(self, x):
        from medfusion.encoders.base import EncoderOutput

        return EncoderOutput(x)


def _sum_network(mods=("a", "b", "c")):
    """Frozen classifier whose logit difference is ``2 * sum_m s_m x_m`` (``s_m`` = the meta step's scale).

    proj_m: x -> [x, -x]; after the head's ReLU, Linear(6, 2) recovers ``h = [S, -S]`` with ``S = sum_m s_m x_m``;
    ReLU; Linear(2, 2) with rows [-1, 1], [1, -1] gives logits ``[-S, S]``. It uses every modality equally.
    """
    from medfusion.fusion.base import FusionModel

    head = MetaKDHead(mods, {m: 1 for m in mods}, num_classes=2, embed_dim=2, hidden=2)
    with torch.no_grad():
        for m in mods:
            head.proj[m].weight.copy_(torch.tensor([[1.0], [-1.0]]))
            head.proj[m].bias.zero_()
        first, last = head.classifier[2], head.classifier[4]
        first.weight.copy_(torch.tensor([[1.0, -1.0] * len(mods), [-1.0, 1.0] * len(mods)]))
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
        last.bias.zero_()
    net = FusionModel({m: _Identity() for m in mods}, head)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _signal_batch(n=64, seed=0, mods=("a", "b", "c")):
    """Modality ``a`` carries the label (``2y - 1`` + noise 0.3); ``b`` and ``c`` are N(0, 1) noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    batch = {m: torch.randn(n, 1, generator=g) for m in mods}
    batch["a"] = (2.0 * y - 1.0).unsqueeze(1).float() + 0.3 * torch.randn(n, 1, generator=g)
    batch.update(label=y, modality_mask=torch.ones(n, len(mods), dtype=torch.bool))
    return batch


def test_meta_loss_at_uniform_weights_is_the_task_loss():
    """The meta step scales features by ``M * softmax(w)`` = 1 at w = 0: its loss is the model's own task loss.

    Hand check on the sum network: x = (a, b, c) = (1, 0.5, -0.5), y = 1 -> S = 1, logits [-1, 1],
    CE = log(1 + e^-2) = 0.126928. With ``softmax(w)`` = 1/3 alone (the earlier scaling) S = 1/3 and
    CE = log(1 + e^(-2/3)) = 0.418946.
    """
    mods = ("a", "b", "c")
    net = _sum_network(mods)
    batch = {"a": torch.tensor([[1.0]]), "b": torch.tensor([[0.5]]), "c": torch.tensor([[-0.5]])}
    batch.update(label=torch.tensor([1]), modality_mask=torch.ones(1, 3, dtype=torch.bool))
    method = MetaKDMethod(mods, task="classification", meta_lr=0.0)
    assert method.meta_scale().tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert method.meta_step(net, batch) == pytest.approx(math.log(1.0 + math.exp(-2.0)), abs=1e-6)
    # segmentation: the meta loss at w = 0 equals the plain forward's Dice+BCE
    seg = Segmenter(MODS, channels=(4, 8, 16))
    seg_method = MetaKDMethod(MODS, meta_lr=0.0)
    b = _seg_batch()
    plain = float(seg_method.task_loss(seg(b["image"], b["modality_mask"]), b["label"]))
    assert seg_method.meta_step(seg, b) == pytest.approx(plain, rel=1e-6)


def test_meta_update_favours_the_informative_modality_on_a_frozen_network(tmp_path):
    """After the ``meta_steps`` (default 20) of ONE meta update, softmax(w) of the informative modality is clearly
    the largest (one Adam step of lr 1e-2, the earlier behaviour, moves each w by at most 0.01)."""
    from types import SimpleNamespace

    from medfusion.fusion.metakd import MetaStepHandler

    mods = ("a", "b", "c")
    net = _sum_network(mods)
    loader = [_signal_batch(seed=s) for s in range(3)]  # 3 batches, cycled over 20 steps
    method = MetaKDMethod(mods, task="classification", meta_loader=loader, meta_interval=10, output_dir=tmp_path)
    assert method.meta_steps == 20
    (handler,) = method.handlers()
    assert isinstance(handler, MetaStepHandler)
    engine = SimpleNamespace(network=net, state=SimpleNamespace(iteration=10, device="cpu", metrics={}))
    handler(engine)
    sm = method.state.as_dict()
    trajectory = pd.read_csv(tmp_path / "iwv_trajectory.csv").to_dict("records")  # one row per meta step
    assert int(method.state.meta_steps) == 20 and len(trajectory) == 20
    assert [r["step_in_interval"] for r in trajectory] == list(range(20))
    assert sm["a"] > 0.4 and sm["a"] - max(sm["b"], sm["c"]) > 0.1, sm
    assert method.state.ranking()[0] == "a"
    # steps 0 and 18 see the same batch (3 batches cycled): the meta loss fell
    assert trajectory[18]["meta_loss"] < trajectory[0]["meta_loss"]
    assert engine.state.metrics["iwv_a"] == pytest.approx(sm["a"])
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_meta_steps_cycle_the_loader_and_log_every_step(tmp_path):
    net = _sum_network()
    loader = [_signal_batch(n=8, seed=s) for s in range(2)]
    method = MetaKDMethod(("a", "b", "c"), task="classification", meta_loader=loader, meta_steps=5, output_dir=tmp_path)
    (handler,) = method.handlers()
    seen = []
    orig = method.meta_step
    method.meta_step = lambda model, batch: seen.append(batch["label"]) or orig(model, batch)
    from types import SimpleNamespace

    handler(SimpleNamespace(network=net, state=SimpleNamespace(iteration=7, device="cpu", metrics={})))
    # batches 0, 1, 0, 1, 0: the loader restarts when it runs out
    assert [int((s == loader[i % 2]["label"]).all()) for i, s in enumerate(seen)] == [1] * 5
    traj = pd.read_csv(tmp_path / "iwv_trajectory.csv")
    assert traj["meta_step"].tolist() == [1, 2, 3, 4, 5] and traj["step_in_interval"].tolist() == [0, 1, 2, 3, 4]
    assert (traj["iteration"] == 7).all() and traj["meta_loss"].notna().all()
    # d(meta loss)/dw of every step is logged; the last one is the gradient the method kept
    grads = traj[["grad_a", "grad_b", "grad_c"]].to_numpy()
    assert np.isfinite(grads).all() and np.abs(grads).max() > 0
    assert grads[-1] == pytest.approx(method.last_meta_grad.numpy().tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="meta_steps"):
        MetaKDMethod(("a", "b"), meta_steps=0)
    empty = MetaKDMethod(("a", "b", "c"), task="classification", meta_loader=[])
    with pytest.raises(ValueError, match="meta-validation loader yields no batch"):
        empty.handlers()[0](SimpleNamespace(network=net, state=SimpleNamespace(iteration=1, device="cpu", metrics={})))


def test_uniform_and_fixed_kd_weights_are_constant_and_skip_the_meta_step():
    loader = [_signal_batch(n=4)]
    uniform = MetaKDMethod(("a", "b", "c"), task="classification", meta_loader=loader, kd_weights="uniform")
    assert uniform.handlers() == [] and uniform.state.as_dict() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    # oracle-style fixed weights 0.5 / 0.3 / 0.2: KD ratio a -> c = 0.5 / 0.2 = 2.5, c -> a = 0.4
    fixed = MetaKDMethod(
        ("a", "b", "c"), task="classification", meta_loader=loader, kd_weights={"a": 5.0, "b": 3.0, "c": 2.0}
    )
    assert fixed.handlers() == []
    assert fixed.state.as_dict() == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2})
    ratio = kd_weight_matrix(fixed.state.w)
    assert float(ratio[0, 2]) == pytest.approx(2.5) and float(ratio[2, 0]) == pytest.approx(0.4)
    assert uniform.kd_weights == "uniform" and uniform.state.meta_steps == fixed.state.meta_steps == 0
    for bad, msg in (
        ("oracle", "kd_weights must be"),
        ({"a": 1.0, "b": 1.0}, "one weight per modality"),
        ({"a": 1.0, "b": 0.0, "c": 1.0}, "positive and finite"),
    ):
        with pytest.raises(ValueError, match=msg):
            MetaKDMethod(("a", "b", "c"), kd_weights=bad)


def test_segmentation_loss_penalises_false_positives_in_a_crop_without_tumour():
    # batch of a tumour crop (left half tumour, predicted right) and a crop without tumour; in the second
    # crop a false-positive blob of 8 of 64 voxels. Per-crop Dice scores the empty crop 1 whatever it
    # predicts (only BCE would see the blob); batch Dice: 2*32 / (32 + 8 + 32) -> loss 1 - 0.889 on every region
    label = torch.zeros(2, 3, 4, 4, 4)
    label[0, :, :2] = 1.0
    clean = torch.where(label > 0, 20.0, -20.0)
    blob = clean.clone()
    blob[1, :, :2, :2, :2] = 20.0
    dice = default_task_loss("segmentation").dice
    assert float(dice(clean, label)) == pytest.approx(0.0, abs=1e-4)
    assert float(dice(blob, label)) == pytest.approx(1 - 64 / 72, abs=1e-4)
