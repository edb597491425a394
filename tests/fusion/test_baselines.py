"""Baseline heads (concat, mean_features, late) and SupervisedMethod on hand-computed values."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.fusion import create_fusion, list_fusions
from medfusion.fusion.base import FusionModel
from medfusion.fusion.baselines import (
    ConcatHead,
    LateFusionHead,
    MeanFeaturesHead,
    SupervisedMethod,
    modality_ce_loss,
)
from medfusion.modality import all_combination_masks

MODS = ("a", "b", "c")
DIMS = {"a": 5, "b": 6, "c": 7}


class TinyEncoder(nn.Module):
    """Linear + tanh on a [B, 3] input."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(torch.tanh(self.lin(x)))


def tiny_batch(b: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = all_combination_masks(MODS)
    mask = masks[torch.arange(b) % len(masks)]
    batch = {m: torch.randn(b, 3, generator=g) for m in MODS}
    batch.update(modality_mask=mask, label=torch.randint(0, 3, (b,), generator=g), sample_index=torch.arange(b))
    return batch


def check_contract(head: nn.Module) -> None:
    """All masks finite, absent content does not change outputs, absent pooled gets no gradient."""
    head.eval()
    g = torch.Generator().manual_seed(1)
    feats = {m: EncoderOutput(torch.randn(2, d, generator=g)) for m, d in DIMS.items()}
    for mask in all_combination_masks(MODS):
        m = mask.expand(2, -1)
        out = head(feats, m)
        assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all(), mask
        changed = dict(feats)
        for i, name in enumerate(MODS):
            if not mask[i]:
                junk = torch.randn(2, DIMS[name], generator=g) * 100
                junk[0, 0] = float("nan") if i % 2 else float("inf")
                changed[name] = EncoderOutput(junk)
        out2 = head(changed, m)
        assert torch.equal(out2.logits, out.logits), mask
        for name in MODS:
            assert torch.equal(out2.embeddings[name], out.embeddings[name]), (mask, name)
        leaves = {n: f.pooled.clone().requires_grad_(True) for n, f in feats.items()}
        head({n: EncoderOutput(p) for n, p in leaves.items()}, m).logits.sum().backward()
        for i, name in enumerate(MODS):
            grad = leaves[name].grad
            if not mask[i]:
                assert grad is None or torch.count_nonzero(grad) == 0, (mask, name)


@pytest.mark.parametrize(
    "name,kwargs",
    [("concat", {}), ("mean_features", {"embed_dim": 4}), ("mean_features", {"use_variance": True}), ("late", {})],
)
def test_contract(name, kwargs):
    head = create_fusion(name, modalities=MODS, in_dims=DIMS, num_classes=3, **kwargs)
    check_contract(head)


def test_registered():
    from medfusion.fusion.base import FUSIONS, FusionHead

    names = set(list_fusions())
    assert {"concat", "mean_features", "late", "qmf", "omnifuse", "metakd", "meta_fusion"} <= names
    # a fresh interpreter that imports only the package sees meta_fusion too (it used to need meta_fusion_stages)
    code = "from medfusion.fusion import list_fusions; print(' '.join(list_fusions()))"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "meta_fusion" in fresh and set(fresh) == names
    for name in names:  # every registry entry is a head class, not some other decorated callable
        entry = FUSIONS.factory(name)
        assert isinstance(entry, type) and issubclass(entry, FusionHead), name


def _ones_linear(lin: nn.Linear) -> None:
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.zero_()


def test_concat_zero_fills_absent():
    head = ConcatHead(("a", "b"), {"a": 2, "b": 1}, num_classes=2, hidden=0)
    _ones_linear(head.classifier)
    feats = {"a": EncoderOutput(torch.tensor([[1.0, 2.0]])), "b": EncoderOutput(torch.tensor([[10.0]]))}
    assert head(feats, torch.tensor([[True, False]])).logits.tolist() == [[3.0, 3.0]]
    assert head(feats, torch.tensor([[True, True]])).logits.tolist() == [[13.0, 13.0]]
    assert head(feats, torch.tensor([[False, True]])).aux["fused"].tolist() == [[0.0, 0.0, 10.0]]


def test_mean_features_masked_mean_and_variance():
    head = MeanFeaturesHead(MODS, {m: 2 for m in MODS}, num_classes=1, embed_dim=2, hidden=0, use_variance=True)
    for lin in head.proj.values():
        with torch.no_grad():
            lin.weight.copy_(torch.eye(2))
            lin.bias.fill_(0.5)  # the bias of an absent modality must not leak into the mean
    _ones_linear(head.classifier)
    feats = {
        "a": EncoderOutput(torch.tensor([[0.5, 2.5]])),
        "b": EncoderOutput(torch.tensor([[4.5, 6.5]])),
        "c": EncoderOutput(torch.tensor([[100.0, 100.0]])),
    }
    out = head(feats, torch.tensor([[True, True, False]]))
    # projections a=[1,3], b=[5,7]; mean [3,5]; variance [4,4]
    assert out.aux["fused"].tolist() == [[3.0, 5.0, 4.0, 4.0]]
    assert out.logits.item() == pytest.approx(16.0)
    single = head(feats, torch.tensor([[False, True, False]])).aux["fused"]
    assert single.tolist() == [[5.0, 7.0, 0.0, 0.0]]


def test_late_fusion_averages_present_probabilities():
    head = LateFusionHead(MODS, {m: 1 for m in MODS}, num_classes=2)
    biases = {"a": [0.0, math.log(3.0)], "b": [0.0, 0.0], "c": [5.0, -5.0]}
    for m, lin in head.classifiers.items():
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.copy_(torch.tensor(biases[m]))
    feats = {m: EncoderOutput(torch.ones(1, 1)) for m in MODS}
    out = head(feats, torch.tensor([[True, True, False]]))
    # p_a = [.25, .75], p_b = [.5, .5] -> mean [.375, .625]; c excluded
    assert out.logits.exp().tolist()[0] == pytest.approx([0.375, 0.625])
    assert out.logits.tolist()[0] == pytest.approx([math.log(0.375), math.log(0.625)])
    assert out.aux["modality_logits"]["c"].tolist() == [[0.0, 0.0]]


def test_modality_ce_loss_hand_computed():
    ln3 = math.log(3.0)
    logits = torch.tensor(
        [
            [[0.0, 0.0], [0.0, ln3]],  # sample 0: both present
            [[ln3, 0.0], [99.0, -99.0]],  # sample 1: modality 1 absent (garbage)
        ]
    )
    labels = torch.tensor([0, 0])
    mask = torch.tensor([[True, True], [True, False]])
    # modality 0: mean(ln2, -ln .75); modality 1: ln 4 (sample 0 only)
    expected = (math.log(2.0) - math.log(0.75)) / 2 + math.log(4.0)
    assert modality_ce_loss(logits, labels, mask).item() == pytest.approx(expected)


@pytest.mark.parametrize("name", ["concat", "mean_features", "late"])
def test_supervised_loss_step_backward(name):
    head = create_fusion(name, modalities=MODS, in_dims=DIMS, num_classes=3)
    model = FusionModel({m: TinyEncoder(DIMS[m]) for m in MODS}, head)
    method = SupervisedMethod(MODS, modality_loss_weight=0.5)
    batch = tiny_batch()
    losses = method.loss_step(model, method.prepare(batch, None), None)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())
    if name == "late":
        expected = losses["task_loss"] + 0.5 * losses["modality_loss"]
        assert losses["loss"].item() == pytest.approx(expected.item())
    else:
        assert "modality_loss" not in losses
        assert losses["loss"].item() == pytest.approx(losses["task_loss"].item())


def test_bad_in_dims_message():
    with pytest.raises(ValueError, match="in_dims has no entry for modalities \\['c'\\]"):
        ConcatHead(MODS, {"a": 1, "b": 1}, num_classes=2)
    with pytest.raises(ValueError, match="loss must be 'ce'"):
        SupervisedMethod(MODS, loss="mse")
