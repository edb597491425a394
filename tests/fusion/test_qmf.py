"""QMF equations on hand-computed values (docs/methods.md maps each to the code)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionModel
from medfusion.fusion.qmf import (
    QMFHead,
    QMFMethod,
    energy_score,
    eq16_pair_loss,
    minmax_normalise,
    qmf_fuse,
    qmf_rank_regulariser,
    qmf_weights,
)
from medfusion.modality import all_combination_masks

MODS = ("a", "b", "c")
DIMS = {"a": 5, "b": 6, "c": 7}
LN3 = math.log(3.0)


class TinyEncoder(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, out_dim)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(torch.tanh(self.lin(x)))


def tiny_batch(b: int = 6, seed: int = 0, full: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = all_combination_masks(MODS)
    mask = torch.ones(b, 3, dtype=torch.bool) if full else masks[torch.arange(b) % len(masks)]
    batch = {m: torch.randn(b, 3, generator=g) for m in MODS}
    batch.update(modality_mask=mask, label=torch.randint(0, 3, (b,), generator=g), sample_index=torch.arange(b))
    return batch


def fixed_head(biases: dict[str, list[float]], **kw) -> QMFHead:
    """QMF head whose per-modality logits are the given constants (zero weights)."""
    mods = tuple(biases)
    head = QMFHead(mods, {m: 1 for m in mods}, num_classes=len(next(iter(biases.values()))), **kw)
    for m, lin in head.classifiers.items():
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.copy_(torch.tensor(biases[m]))
    return head


def test_energy_score():
    z = torch.tensor([[0.0, LN3]])
    assert energy_score(z).item() == pytest.approx(-math.log(4.0))
    assert energy_score(z, temperature=2.0).item() == pytest.approx(-2.0 * math.log(1.0 + math.sqrt(3.0)))


def test_weights_and_fused_logits():
    z = torch.tensor([[[0.0, LN3], [1.0, 0.0]]])  # [B=1, M=2, K=2]
    w, e = qmf_weights(z, torch.tensor([[True, True]]))
    assert e.tolist()[0] == pytest.approx([-math.log(4.0), -math.log(1.0 + math.e)])
    assert w.tolist()[0] == pytest.approx([0.1 * math.log(4.0), 0.1 * math.log(1.0 + math.e)])
    fused = qmf_fuse(z, w)[0]
    wa, wb = 0.1 * math.log(4.0), 0.1 * math.log(1.0 + math.e)
    assert fused.tolist() == pytest.approx([wb * 1.0, wa * LN3])
    # weight_scale is -alpha of the paper's alpha * E
    w2, _ = qmf_weights(z, torch.tensor([[True, False]]), weight_scale=0.5)
    assert w2.tolist()[0] == pytest.approx([0.5 * math.log(4.0), 0.0])


def test_masked_modality_drops_out_exactly():
    head = fixed_head({"a": [0.0, LN3], "b": [1.0, 0.0]}).eval()
    feats = {m: EncoderOutput(torch.ones(1, 1)) for m in ("a", "b")}
    out = head(feats, torch.tensor([[True, False]]))
    wa = 0.1 * math.log(4.0)
    assert out.logits.tolist()[0] == pytest.approx([0.0, wa * LN3])
    assert out.aux["weights"].tolist()[0] == pytest.approx([wa, 0.0])
    assert out.aux["energy"][0, 1].item() == 0.0
    # the fused logits equal the single-modality term bit for bit
    assert torch.equal(out.logits, out.aux["weights"][:, :1] * out.aux["modality_logits"]["a"])


def test_detach_weights_option():
    feats = {m: EncoderOutput(torch.ones(1, 1)) for m in ("a", "b")}
    for detach, expect_grad in ((False, True), (True, False)):
        head = fixed_head({"a": [0.0, LN3], "b": [1.0, 0.0]}, detach_weights=detach)
        out = head(feats, torch.ones(1, 2, dtype=torch.bool))
        # fused[:, 1] = w_a * z_a[1] + w_b * 0: d / d bias_a[0] is non-zero only through the weight w_a
        (g,) = torch.autograd.grad(out.logits[0, 1], head.classifiers["a"].bias)
        assert bool(g[0].abs() > 0) == expect_grad


def test_fused_loss_ignores_a_constant_logit_shift_by_default():
    """Eq. 11 uses w as a quality estimate: detached in the fusion by default, so inflating one modality's logit
    level (CE is invariant to a constant added to all logits, ``w = logsumexp(z)/10`` is not) cannot lower the
    fused loss.

    z_a = [2, 0], z_b = [0, 1], y = 0: w_a = 0.1 ln(e^2 + 1) = 0.212693, w_b = 0.1 ln(1 + e) = 0.131326,
    fused = w_a z_a + w_b z_b = [0.425386, 0.131326], p_1 = 1 / (1 + e^0.294059) = 0.427010. A shift c of z_a
    (its classifier bias + c) moves the fused loss by dL/dc = sum_j (p_j - y_j) (w_a + 0.1 z_a[j]) =
    0.1 sum_j (p_j - y_j) z_a[j] when w carries gradient (= 0.2 (p_0 - 1) = -0.085402), and by 0 when detached.
    """
    feats = {m: EncoderOutput(torch.ones(1, 1)) for m in ("a", "b")}
    mask, y = torch.ones(1, 2, dtype=torch.bool), torch.tensor([0])
    head = fixed_head({"a": [2.0, 0.0], "b": [0.0, 1.0]})  # library default
    out = head(feats, mask)
    assert out.logits.tolist()[0] == pytest.approx([0.425386, 0.131326], abs=1e-6)
    (g,) = torch.autograd.grad(F.cross_entropy(out.logits, y), head.classifiers["a"].bias)
    assert float(g.sum()) == pytest.approx(0.0, abs=1e-7)  # directional derivative along the shift
    assert out.aux["weights"].requires_grad  # the ranking regulariser (Eq. 16-18) still trains w
    legacy = fixed_head({"a": [2.0, 0.0], "b": [0.0, 1.0]}, detach_weights=False)
    (g,) = torch.autograd.grad(F.cross_entropy(legacy(feats, mask).logits, y), legacy.classifiers["a"].bias)
    assert float(g.sum()) == pytest.approx(-0.085402, abs=1e-6)


def test_eq16_hand_pairs():
    # w_i > w_j with lower history: -0.8 + 0.3 < 0 -> 0
    assert eq16_pair_loss(torch.tensor(0.5), torch.tensor(0.2), torch.tensor(0.1), torch.tensor(0.9)).item() == 0.0
    # w_i > w_j with HIGHER history: 0.8 + 0.3 = 1.1
    assert eq16_pair_loss(torch.tensor(0.5), torch.tensor(0.2), torch.tensor(0.9), torch.tensor(0.1)).item() == (
        pytest.approx(1.1)
    )
    # reversed pair: sign(-0.3) * (0.1 - 0.9) + 0.3 = 1.1
    assert eq16_pair_loss(torch.tensor(0.2), torch.tensor(0.5), torch.tensor(0.1), torch.tensor(0.9)).item() == (
        pytest.approx(1.1)
    )
    # equal weights: sign 0 -> margin 0 -> 0
    assert eq16_pair_loss(torch.tensor(0.3), torch.tensor(0.3), torch.tensor(0.0), torch.tensor(1.0)).item() == 0.0


def test_rank_regulariser_roll_pairs_and_validity():
    w = torch.tensor([[0.5, 1.0], [0.2, 0.0], [0.4, 0.5]], requires_grad=True)
    kappa = torch.tensor([[0.1, 0.5], [0.9, 0.5], [0.0, 0.2]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    # modality 0 pairs (0,1): 0 ; (1,2): max(0, -0.9 + 0.2) = 0 ; (2,0): -1 * (0 - 0.1) + 0.1 = 0.2
    # modality 1 pairs (0,1): 0 + 1.0 = 1.0 ; (1,2), (2,0) invalid (sample 2 lacks modality 1)
    reg = qmf_rank_regulariser(w, kappa, valid, torch.tensor([7, 8, 9]))
    assert reg.item() == pytest.approx((0.2 + 1.0) / 4)
    reg.backward()
    # gradient only via |w_i - w_j| of the active pairs, each / 4: (2,0) mod 0: d/dw_2 = sign(0.4 - 0.5) = -1;
    # (0,1) mod 1: d/dw_0 = sign(1.0 - 0.0) = +1
    assert w.grad.flatten().tolist() == pytest.approx([0.25, 0.25, 0.0, -0.25, -0.25, 0.0])
    # a sample paired with itself is skipped
    assert qmf_rank_regulariser(w[:1], kappa[:1], valid[:1]).item() == 0.0


def test_minmax_normalise():
    values = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 9.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False]])
    out = minmax_normalise(values, valid)
    # column 0: (v - 1) / 2 ; column 1: only the constant 5 is valid -> 0 ; invalid entry -> 0
    assert out.tolist() == [[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]]
    assert minmax_normalise(values, torch.zeros_like(valid)).abs().sum().item() == 0.0


def test_history_update_at_indices_and_kappa():
    head = QMFHead(("a", "b"), {"a": 1, "b": 1}, num_classes=2, num_samples=5)
    idx = torch.tensor([3, 1, 3])
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    head.update_history(idx, losses, mask)
    assert head.history.tolist() == [[0, 0], [3, 0], [0, 0], [1, 8], [0, 0]]
    assert head.history_count.tolist() == [[0, 0], [1, 0], [0, 0], [1, 2], [0, 0]]
    kappa, seen = head.kappa(torch.tensor([3, 1, 0]))
    # mean history: sample 3 -> [1, 4], sample 1 -> [3, -]; column 0 min 1 max 3; column 1 constant
    assert kappa.tolist() == [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    assert seen.tolist() == [[True, True], [True, False], [False, False]]
    with pytest.raises(ValueError, match="sample_index must lie in \\[0, 5\\)"):
        head.update_history(torch.tensor([5]), losses[:1], mask[:1])


def test_history_sum_reduction():
    head = QMFHead(("a",), {"a": 1}, num_classes=2, num_samples=3, history_reduction="sum")
    head.update_history(
        torch.tensor([0, 1, 1, 2]), torch.tensor([[2.0], [1.0], [3.0], [0.0]]), torch.ones(4, 1, dtype=torch.bool)
    )
    kappa, _ = head.kappa(torch.tensor([0, 1, 2]))
    assert kappa.flatten().tolist() == pytest.approx([0.5, 1.0, 0.0])  # sums 2, 4, 0


def test_contract_all_masks_absent_content_and_gradient():
    head = QMFHead(MODS, DIMS, num_classes=3, num_samples=4, hidden=8).eval()
    g = torch.Generator().manual_seed(1)
    feats = {m: EncoderOutput(torch.randn(2, d, generator=g)) for m, d in DIMS.items()}
    for mask in all_combination_masks(MODS):
        m = mask.expand(2, -1)
        out = head(feats, m)
        assert torch.isfinite(out.logits).all()
        changed = {
            n: (f if mask[i] else EncoderOutput(torch.full_like(f.pooled, float("inf"))))
            for i, (n, f) in enumerate(feats.items())
        }
        out2 = head(changed, m)
        assert torch.equal(out2.logits, out.logits) and torch.equal(out2.aux["weights"], out.aux["weights"])
        leaves = {n: f.pooled.clone().requires_grad_(True) for n, f in feats.items()}
        head({n: EncoderOutput(p) for n, p in leaves.items()}, m).logits.sum().backward()
        for i, n in enumerate(MODS):
            if not mask[i]:
                assert leaves[n].grad is None or torch.count_nonzero(leaves[n].grad) == 0


def test_loss_step_backward_and_history():
    head = QMFHead(MODS, DIMS, num_classes=3, num_samples=6)
    model = FusionModel({m: TinyEncoder(DIMS[m]) for m in MODS}, head)
    method = QMFMethod(MODS, lam=0.1)
    batch = tiny_batch()
    first = method.loss_step(model, batch, None)
    assert first["rank_loss"].item() == 0.0  # no history yet
    first["loss"].backward()
    # every present (sample, modality) was recorded once
    assert torch.equal(head.history_count.bool(), batch["modality_mask"])
    second = method.loss_step(model, batch, None)
    expected = second["fused_loss"] + second["modality_loss"] + 0.1 * second["rank_loss"]
    assert second["loss"].item() == pytest.approx(expected.item())
    assert torch.isfinite(second["loss"])
    second["loss"].backward()
    assert int(head.history_count.sum()) == 2 * int(batch["modality_mask"].sum())


def test_history_in_state_dict():
    head = QMFHead(MODS, DIMS, num_classes=3, num_samples=4)
    assert {"history", "history_count"} <= set(head.state_dict())


def test_loading_a_checkpoint_sizes_the_history():
    trained = QMFHead(MODS, DIMS, num_classes=3, num_samples=4)
    trained.update_history(torch.tensor([0, 3]), torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool))
    fresh = QMFHead(MODS, DIMS, num_classes=3)  # inference: built without num_samples
    assert fresh.num_samples == 0
    fresh.load_state_dict(trained.state_dict())  # strict
    assert fresh.num_samples == 4 and fresh.history_count.dtype == torch.long
    assert torch.equal(fresh.history, trained.history) and torch.equal(fresh.history_count, trained.history_count)
    other = QMFHead(("a", "b"), {"a": 5, "b": 6}, num_classes=3)
    with pytest.raises(RuntimeError, match="size mismatch"):  # another modality count still fails
        other.load_state_dict({k: v for k, v in trained.state_dict().items() if k.startswith("history")}, strict=False)


def test_method_requires_qmf_head():
    from medfusion.fusion.baselines import LateFusionHead

    model = FusionModel({m: TinyEncoder(DIMS[m]) for m in MODS}, LateFusionHead(MODS, DIMS, 3))
    with pytest.raises(TypeError, match="QMFHead"):
        QMFMethod(MODS).loss_step(model, tiny_batch(), None)
