"""Segmentation heads: the contract for every method (all 15 masks) and the baselines (mean, HeMIS, late)."""

from __future__ import annotations

import math

import pytest
import torch

from medfusion.data.dropout import BatchModalityDropout
from medfusion.fusion.metakd import MetaKDMethod
from medfusion.modality import BRATS_MODALITIES, all_combination_masks
from medfusion.models.seg_baselines import HeMISSegmenter, LateSegmenter, masked_moments, prob_logit
from medfusion.models.seg_recipes import build_seg_method, create_segmenter, list_seg_methods, segmenter_class
from medfusion.models.segmenter import Segmenter

CHANNELS = [4, 8, 16]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: 2 threads on the busy 2-core machine are slower


def _image(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method_name", list_seg_methods())
def test_contract_all_15_masks_absent_content_cannot_change_the_output(method_name):
    torch.manual_seed(0)
    net = create_segmenter(method_name, channels=CHANNELS).eval()
    x = _image()
    noise = 10 * torch.randn_like(x)
    combos = all_combination_masks(BRATS_MODALITIES)
    with torch.no_grad():
        cached = net.predict_combinations(x, combos)
        for c, combo in enumerate(combos):
            mask = combo.unsqueeze(0).expand(2, -1)
            y = net(x, mask)
            other = torch.where(mask[:, :, None, None, None], x, noise)  # absent channels: other content
            assert torch.isfinite(y).all()
            assert torch.equal(y, net(other, mask)), (method_name, c)
            # the evaluator's cached path (one encoding, every combination decoded) gives the same logits
            torch.testing.assert_close(cached[:, 3 * c : 3 * c + 3], y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method_name", ["hemis", "late", "qmf", "omnifuse"])
def test_contract_no_gradient_reaches_absent_channels(method_name):
    torch.manual_seed(0)
    net = create_segmenter(method_name, channels=CHANNELS)
    x = _image().requires_grad_(True)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    net(x, mask).sum().backward()
    absent = ~mask
    assert float(x.grad[absent].abs().sum()) == 0.0
    assert float(x.grad[mask].abs().sum()) > 0.0


def test_masked_moments_hand_computed():
    # one channel, one voxel: modality values 1, 2, 4, 8; present {1, 4} -> mean 2.5, var 2.25
    feats = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1, 1)
    mean, var = masked_moments(feats, torch.tensor([[True, False, True, False]]))
    assert mean.item() == pytest.approx(2.5) and var.item() == pytest.approx(2.25)
    mean, var = masked_moments(feats, torch.tensor([[False, True, False, False]]))  # one present: var 0
    assert mean.item() == pytest.approx(2.0) and var.item() == 0.0


def test_hemis_decodes_mean_and_variance_of_present_modalities():
    torch.manual_seed(0)
    net = HeMISSegmenter(channels=CHANNELS).eval()
    x = _image(1)
    mask = torch.tensor([[True, True, False, True]])
    with torch.no_grad():
        out = net.forward_outputs(x, mask)
        bottleneck = net.encode(x, mask)[-1]
    c = CHANNELS[-1]
    present = bottleneck[:, [0, 1, 3]]
    torch.testing.assert_close(out.aux["moments"][:, :c], present.mean(dim=1))
    torch.testing.assert_close(out.aux["moments"][:, c:], present.var(dim=1, unbiased=False))
    assert net.ups[0].conv.in_channels == 2 * c  # decoder reads [mean, var]


def test_prob_logit_hand_computed():
    assert prob_logit(torch.tensor(0.8)).item() == pytest.approx(math.log(4.0), rel=1e-6)
    # p = 1 is clamped to 1 - 1e-6 (float32: 1 - 1.0133e-6): logit log((1 - 1e-6) / 1e-6) = 13.8155 up to 0.013
    assert prob_logit(torch.tensor(1.0)).item() == pytest.approx(math.log((1 - 1e-6) / 1e-6), abs=0.02)


def test_late_fusion_averages_present_probabilities_hand_computed(monkeypatch):
    net = LateSegmenter(channels=CHANNELS)
    # per-modality logits 0 (p = 0.5), 2 (p = 0.880797), absent, -1 (p = 0.268941) at every voxel
    z = torch.tensor([0.0, 2.0, 0.0, -1.0]).view(1, 4, 1, 1, 1, 1).expand(1, 4, 3, 2, 2, 2)
    mask = torch.tensor([[True, True, False, True]])
    monkeypatch.setattr(net, "modality_logits", lambda feats, use: z * use.view(1, 4, 1, 1, 1, 1))
    out = net.head_outputs([torch.zeros(1)], mask)
    p = (0.5 + 0.880797 + 0.268941) / 3  # = 0.549913
    assert out.logits.shape == (1, 3, 2, 2, 2)
    torch.testing.assert_close(out.logits, torch.full_like(out.logits, math.log(p / (1 - p))), rtol=1e-5, atol=1e-5)


def test_late_decodes_only_present_modalities():
    torch.manual_seed(0)
    net = LateSegmenter(channels=CHANNELS).eval()
    x = _image(2)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    with torch.no_grad():
        out = net.forward_outputs(x, mask)
        feats = net.encode(x, mask)
        alone = net.decode([f[1:2, 1] for f in feats])  # case 1 decoded from modality t1 alone
    z = out.aux["modality_logits"]
    assert float(z[~mask].abs().sum()) == 0.0
    torch.testing.assert_close(z[1, 1], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1], z[1, 1], rtol=1e-4, atol=1e-4)  # one present: fused = its logits


def test_recipes_network_classes_and_method_precedence():
    assert segmenter_class("metakd") is Segmenter and segmenter_class("mean") is Segmenter
    assert segmenter_class("hemis") is HeMISSegmenter and segmenter_class("late") is LateSegmenter
    ctx = {"task": "segmentation", "alpha": 0.1, "dropout_mode": "k_subset", "seed": 3, "meta_loader": None}
    metakd = build_seg_method("metakd", BRATS_MODALITIES, {}, **ctx)
    assert isinstance(metakd, MetaKDMethod) and metakd.alpha == 0.1 and metakd.dropout.mode == "k_subset"
    for name in ("mean", "hemis", "late"):  # the baselines: no KD whatever the bundle's alpha
        method = build_seg_method(name, BRATS_MODALITIES, None, **ctx)
        assert isinstance(method, MetaKDMethod) and method.alpha == 0.0 and not method.learns_weights
        assert method.task == "segmentation" and method.dropout.mode == "k_subset"
    assert build_seg_method("mean", BRATS_MODALITIES, {"alpha": 0.2}, **ctx).alpha == 0.2  # caller's kwargs win
    with pytest.raises(KeyError, match="known methods"):
        create_segmenter("concat")


def test_qmf_recipe_gets_the_bundle_dropout_as_a_callable():
    method = build_seg_method("qmf", BRATS_MODALITIES, None, alpha=0.1, dropout_mode="uniform", seed=4, num_samples=7)
    assert isinstance(method.dropout, BatchModalityDropout) and method.dropout.mode == "uniform"
    assert method.history.num_samples == 7
    assert build_seg_method("qmf", BRATS_MODALITIES, None, dropout_mode="none").dropout is None


def test_omnifuse_recipe_simulates_its_own_missingness():
    method = build_seg_method("omnifuse", BRATS_MODALITIES, None, alpha=0.5, dropout_mode="k_subset", seed=2)
    assert method.simulate and not hasattr(method, "dropout")
    assert method.alpha == 0.1  # OmniFuse's L_ra weight, not the bundle's MetaKD alpha
    assert build_seg_method("omnifuse", BRATS_MODALITIES, {"alpha": 0.3}).alpha == 0.3


@pytest.mark.parametrize("method_name", ["late", "qmf"])
def test_late_fusion_heads_decode_each_modality_once_for_all_combinations(method_name, monkeypatch):
    torch.manual_seed(0)
    net = create_segmenter(method_name, channels=CHANNELS).eval()
    rows = []
    decode = net.decode
    monkeypatch.setattr(net, "decode", lambda levels: rows.append(levels[0].shape[0]) or decode(levels))
    with torch.no_grad():
        net.predict_combinations(_image(2), all_combination_masks(BRATS_MODALITIES), torch.tensor([[1, 1, 0, 1]] * 2))
    assert rows == [2 * 3]  # one decoding of the 3 available modalities of both cases, shared by 15 combinations
