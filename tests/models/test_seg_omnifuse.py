"""OmniFuse for segmentation: voxel DWFuse weights, 2-class losses, CRA target, TLA mining (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medfusion.fusion.omnifuse import OBSERVED_MASK_KEY, dwfuse_loss, tla_loss
from medfusion.modality import combination_mask, combinations
from medfusion.models.seg_baselines import prob_logit
from medfusion.models.seg_omnifuse import OmniFuseSegmenter, SegOmniFuseMethod, seg_combination_losses, voxel_omega
from medfusion.models.seg_qmf import binary_class_logits

pytestmark = pytest.mark.usefixtures("one_thread")
CHANNELS = [4, 8, 16]


def test_voxel_omega_hand_computed_uses_the_predicted_class_confidence():
    # two modalities, one region, two voxels: p = (0.9, 0.6) and (0.9, 0.2); q = max(p, 1 - p)
    probs = torch.tensor([[0.9, 0.9], [0.6, 0.2]]).view(1, 2, 1, 2)
    omega = voxel_omega(probs, torch.tensor([[True, True]]), beta=0.5)
    # omega_a = (1 - q_b)^(0.5 / 1): sqrt(0.4), sqrt(0.2); omega_b = sqrt(1 - 0.9) in both voxels
    expected = torch.tensor([[math.sqrt(0.4), math.sqrt(0.2)], [math.sqrt(0.1), math.sqrt(0.1)]]).view(1, 2, 1, 2)
    torch.testing.assert_close(omega, expected)
    alone = voxel_omega(probs, torch.tensor([[True, False]]))  # b absent: omega_a = 1, omega_b = 0
    torch.testing.assert_close(alone[0, :, 0, 0], torch.tensor([1.0, 0.0]))


def test_dwfuse_on_two_class_voxels_is_bce_hand_computed():
    # z_a = 0 (p = 0.5), z_b = log 3 (p = 0.75), y = 1, joint o = 0
    z = torch.tensor([[0.0, math.log(3.0)]])
    out = dwfuse_loss(binary_class_logits(z), binary_class_logits(torch.tensor([0.0])), torch.tensor([1]), 0.5, 0.1)
    # omega_a = (1 - 0.75)^0.5 = 0.5, omega_b = (1 - 0.5)^0.5; BCE_a = log 2, BCE_b = -log 0.75
    enc = 0.5 * math.log(2.0) + math.sqrt(0.5) * -math.log(0.75)  # 0.549995
    assert float(out["enc"]) == pytest.approx(enc, rel=1e-5)
    assert float(out["dwfuse"]) == pytest.approx(enc + 0.1 * math.log(2.0), rel=1e-5)


def test_tla_on_two_class_voxels_selects_the_lazy_cases():
    logits = torch.tensor([0.0, 3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    label = torch.ones(2, 1, 2, 2, dtype=torch.long)
    mask = torch.tensor([[True, False], [False, True]])
    loss = tla_loss(binary_class_logits(logits).movedim(-1, 1), label, mask, torch.tensor([True, False]))
    assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)  # only case 0 (z = 0) is lazy


def test_deployable_logits_combine_joint_and_omega_weighted_present_modalities():
    torch.manual_seed(0)
    net = OmniFuseSegmenter(channels=CHANNELS).eval()
    x = torch.randn(1, 4, 16, 16, 16)
    mask = torch.tensor([[True, False, True, True]])
    with torch.no_grad():
        out = net.forward_outputs(x, mask)
    p = torch.sigmoid(out.aux["modality_logits"])
    omega = out.aux["omega"]
    assert float(omega[:, 1].abs().sum()) == 0.0 and float(out.aux["modality_logits"][:, 1].abs().sum()) == 0.0
    weighted = (omega * p).sum(dim=1) / omega.sum(dim=1)
    expected = prob_logit(0.5 * (torch.sigmoid(out.aux["joint_logits"]) + weighted))
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)


def test_cra_target_is_the_observed_bottleneck_and_dropped_modalities_get_zero_image_features():
    torch.manual_seed(0)
    net = OmniFuseSegmenter(channels=CHANNELS).eval()
    x = torch.randn(2, 4, 16, 16, 16)
    observed = torch.tensor([[True, True, True, False], [True, True, True, True]])
    mask = torch.tensor([[True, False, False, False], [False, True, True, False]])
    with torch.no_grad():
        out = net.forward_outputs(x, mask, target_mask=observed)
        noisy = net.forward_outputs(torch.where(observed[:, :, None, None, None], x, 9.0), mask, target_mask=observed)
        torch.testing.assert_close(out.aux["target"], net.encode(x, observed)[-1])
        torch.testing.assert_close(out.aux["observed"], net.encode(x, mask)[-1], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.logits, noisy.logits)  # unobserved content is never read
    assert float(out.aux["modality_logits"].abs().flatten(2).sum(2).min()) > 0  # training decodes every modality


def test_tla_mining_counts_only_cases_with_every_modality_of_the_combination():
    torch.manual_seed(0)
    net = OmniFuseSegmenter(channels=CHANNELS)
    batch = {
        "image": torch.randn(2, 4, 16, 16, 16),
        "label": (torch.rand(2, 3, 16, 16, 16) > 0.5).float(),
        "modality_mask": torch.tensor([[True, True, True, True], [True, True, False, True]]),
    }
    sums, counts = seg_combination_losses(net, [batch], net.modalities)
    has_t1ce = torch.tensor(["t1ce" in c for c in combinations(net.modalities)])
    assert counts[has_t1ce].tolist() == [1] * 8 and counts[~has_t1ce].tolist() == [2] * 7
    assert net.training  # mode restored
    c = combinations(net.modalities).index(("flair", "t2"))
    net.eval()
    with torch.no_grad():
        logits = net(batch["image"], combination_mask(("flair", "t2"), net.modalities).expand(2, -1))
    bce = F.binary_cross_entropy_with_logits(logits, batch["label"], reduction="none").flatten(1).mean(1).sum()
    assert float(sums[c]) == pytest.approx(float(bce), rel=1e-4)


def test_loss_step_terms_and_backward():
    torch.manual_seed(0)
    net = OmniFuseSegmenter(channels=CHANNELS)
    method = SegOmniFuseMethod(net.modalities, seed=1)
    batch = {
        "image": torch.randn(2, 4, 16, 16, 16),
        "label": (torch.rand(2, 3, 16, 16, 16) > 0.7).float(),
        "modality_mask": torch.tensor([[True, True, True, True], [True, False, True, False]]),
    }
    batch = method.prepare(batch, None)
    assert OBSERVED_MASK_KEY in batch and not (batch["modality_mask"] & ~batch[OBSERVED_MASK_KEY]).any()
    net.lazy_combination.fill_(
        combinations(net.modalities).index(
            tuple(m for m, on in zip(net.modalities, batch["modality_mask"][0].tolist()) if on)
        )
    )
    losses = method.loss_step(net, batch, None)
    losses["loss"].backward()
    total = losses["fw_loss"] + losses["bw_loss"] + 10 * losses["dwfuse_loss"] + 0.5 * losses["tla_loss"]
    assert float(losses["loss"]) == pytest.approx(float(total), rel=1e-5)
    assert float(losses["tla_loss"]) > 0  # case 0's simulated combination is the lazy one
    for name in ("forward_cra", "backward_cra", "joint_decoder", "ups", "encoder"):
        grads = [p.grad for p in getattr(net, name).parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads), name
