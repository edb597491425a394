"""QMF for segmentation: voxel-wise energy weights, fused logits, case history and Eq. 16 (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medfusion.fusion.base import FusionOutput
from medfusion.fusion.qmf import qmf_fuse
from medfusion.models.seg_qmf import (
    QMFSegmenter,
    SegQMFMethod,
    binary_class_logits,
    case_voxel_bce,
    voxel_qmf_weights,
)

pytestmark = pytest.mark.usefixtures("one_thread")
CHANNELS = [4, 8, 16]
W0 = 0.1 * math.log(2.0)  # weight at z = 0: 0.1 * log(2 cosh 0) = 0.069315
W2 = 0.1 * math.log(2.0 * math.cosh(1.0))  # weight at z = 2: 0.1 * log(2 cosh 1) = 0.112693


def test_voxel_weights_hand_computed_and_symmetric():
    z = torch.tensor([0.0, 2.0, -2.0, 5.0]).view(1, 4, 1, 1)  # [B, M, R, voxel]
    mask = torch.tensor([[True, True, True, False]])
    w, energy = voxel_qmf_weights(z, mask)
    torch.testing.assert_close(w.flatten(), torch.tensor([W0, W2, W2, 0.0]))  # confident either way: same weight
    torch.testing.assert_close(energy.flatten(), torch.tensor([-math.log(2.0), -10 * W2, -10 * W2, 0.0]))


def test_fused_logits_hand_computed_equal_qmf_fuse_on_the_two_class_form(monkeypatch):
    net = QMFSegmenter(channels=CHANNELS)
    z = torch.tensor([2.0, 0.0, 7.0, -3.0]).view(1, 4, 1, 1, 1, 1).expand(1, 4, 3, 2, 2, 2)
    mask = torch.tensor([[True, True, False, False]])
    monkeypatch.setattr(net, "modality_logits", lambda feats, use: z * use.view(1, 4, 1, 1, 1, 1))
    out = net.head_outputs([torch.zeros(1)], mask)
    torch.testing.assert_close(out.logits, torch.full((1, 3, 2, 2, 2), W2 * 2.0 + W0 * 0.0))  # 0.225386
    two = qmf_fuse(binary_class_logits(z[0, :, 0, 0, 0, 0]).unsqueeze(0), out.aux["weights"][:, :, 0, 0, 0, 0])
    assert float(two[0, 1] - two[0, 0]) == pytest.approx(float(out.logits[0, 0, 0, 0, 0]), abs=1e-6)


@pytest.mark.parametrize(("detach", "grad"), [(True, W2), (False, W2 + 2.0 * 0.05 * math.tanh(1.0))])
def test_weights_detached_in_the_fusion(monkeypatch, detach, grad):
    # dZ/dz_a = w_a when w is detached; + z_a * dw_a/dz_a = 2 * 0.1 * tanh(z/2) / 2 = 0.076159 otherwise
    net = QMFSegmenter(channels=CHANNELS, detach_weights=detach)
    za = torch.tensor(2.0, requires_grad=True)
    z = torch.stack([za, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)]).view(1, 4, 1, 1, 1, 1)
    monkeypatch.setattr(net, "modality_logits", lambda feats, use: z * use.view(1, 4, 1, 1, 1, 1))
    out = net.head_outputs([torch.zeros(1)], torch.tensor([[True, True, False, False]]))
    out.logits.sum().backward()
    assert float(za.grad) == pytest.approx(grad, rel=1e-5)


def test_case_voxel_bce_hand_computed():
    z = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 1, 4)
    label = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    # z = 0: log 2 everywhere; z = log 3 (p = 0.75): (2 * -log 0.75 + 2 * -log 0.25) / 4
    expected = [math.log(2.0), (-math.log(0.75) - math.log(0.25)) / 2]
    torch.testing.assert_close(case_voxel_bce(z, label)[0], torch.tensor(expected))


class _Stub(nn.Module):
    """Constant per-modality logits 0 and given per-case voxel weights (2 cases, 2 modalities, 2 voxels)."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward_outputs(self, image, mask):
        z = torch.zeros(2, 2, 1, 2, requires_grad=True)
        w = self.weights.view(2, 2, 1, 1).expand(2, 2, 1, 2).clone().requires_grad_(True)
        return FusionOutput(z.sum(dim=1), {}, {"modality_logits": z, "weights": w})


def test_loss_step_eq16_on_case_history_hand_computed():
    method = SegQMFMethod(("a", "b"), num_samples=2, lam=0.1, task_loss=lambda logits, y: logits.mean() * 0)
    # history before the step: case 0 (1, 3), case 1 (2, 1), one visit each -> kappa a (0, 1), b (1, 0)
    method.history.history.copy_(torch.tensor([[1.0, 3.0], [2.0, 1.0]]))
    method.history.history_count.fill_(1)
    # case weights: a 0.1, 0.3 (case 1 has the larger loss AND the larger weight: ranked against its history);
    # b 0.2, 0.4 (agrees with the history)
    model = _Stub(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
    batch = {
        "image": torch.zeros(2, 2, 2),
        "label": torch.zeros(2, 1, 2),
        "modality_mask": torch.ones(2, 2, dtype=torch.bool),
        "sample_index": torch.tensor([0, 1]),
    }
    losses = method.loss_step(model, batch, None)
    # Eq. 16 per pair (0,1), (1,0): a: max(0, -1 * -1 + 0.2) = 1.2 twice; b: max(0, -1 * 1 + 0.2) = 0 twice
    assert losses["rank_loss"].item() == pytest.approx((1.2 + 1.2 + 0 + 0) / 4)
    assert losses["loss"].item() == pytest.approx(0.1 * 0.6)
    # history += voxel-mean BCE of z = 0 against label 0: log 2 for every present (case, modality)
    torch.testing.assert_close(method.history.history, torch.tensor([[1.0, 3.0], [2.0, 1.0]]) + math.log(2.0))
    assert method.history.history_count.tolist() == [[2, 2], [2, 2]]


def test_loss_step_trains_the_network_and_checkpoints_the_history():
    torch.manual_seed(0)
    net = QMFSegmenter(channels=CHANNELS)
    method = SegQMFMethod(net.modalities, num_samples=3)
    batch = {
        "image": torch.randn(2, 4, 16, 16, 16),
        "label": (torch.rand(2, 3, 16, 16, 16) > 0.7).float(),
        "modality_mask": torch.tensor([[True, False, True, True], [True, True, False, False]]),
        "sample_index": torch.tensor([2, 0]),
    }
    losses = method.loss_step(net, batch, None)
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert net.ups[0].conv.weight.grad is not None
    assert method.history.history_count.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]
    again = SegQMFMethod(net.modalities, num_samples=3)
    again.load_state_dict(method.state_dict())
    torch.testing.assert_close(again.history.history, method.history.history)
