"""OmniFuse equations on hand-computed values (docs/methods.md maps each to the code)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionHead, FusionModel, FusionOutput
from medfusion.fusion.omnifuse import (
    OBSERVED_MASK_KEY,
    CascadeResidualAutoencoder,
    OmniFuseEpochHandler,
    OmniFuseHead,
    OmniFuseMethod,
    combination_losses,
    dwfuse_loss,
    dwfuse_omega,
    lazy_from_losses,
    refresh_zero_pooled,
    simulate_missing,
    tla_loss,
)
from medfusion.modality import all_combination_masks

MODS = ("a", "b", "c")
DIMS = {"a": 5, "b": 6, "c": 7}


class TinyEncoder(nn.Module):
    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, out_dim)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(torch.tanh(self.lin(x)))


def tiny_batch(b: int = 6, seed: int = 0, full: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = all_combination_masks(MODS)
    mask = torch.ones(b, 3, dtype=torch.bool) if full else masks[torch.arange(b) % len(masks)]
    batch = {m: torch.randn(b, 3, generator=g) for m in MODS}
    batch.update(modality_mask=mask, label=torch.randint(0, 3, (b,), generator=g), sample_index=torch.arange(b))
    return batch


def tiny_model(**kw) -> FusionModel:
    head = OmniFuseHead(MODS, DIMS, num_classes=3, embed_dim=4, code_dim=4, num_blocks=2, **kw)
    return FusionModel({m: TinyEncoder(DIMS[m]) for m in MODS}, head)


def test_omega_hand_computed_m3():
    q = torch.tensor([[0.5, 0.2, 0.9]])  # p_n[y]; 1 - q = [.5, .8, .1]; exponent 0.5 / 2
    omega = dwfuse_omega(q, torch.ones(1, 3, dtype=torch.bool), beta=0.5)
    assert omega.tolist()[0] == pytest.approx([0.08**0.25, 0.05**0.25, 0.4**0.25])
    # modality c unused: excluded from the others' products and weight 0; the exponent keeps M - 1 = 2
    omega = dwfuse_omega(q, torch.tensor([[True, True, False]]), beta=0.5)
    assert omega.tolist()[0] == pytest.approx([0.8**0.25, 0.5**0.25, 0.0])
    assert dwfuse_omega(torch.tensor([[0.7]]), torch.ones(1, 1, dtype=torch.bool)).item() == 1.0


def test_dwfuse_loss_hand_computed_and_omega_detached():
    # M = 2 (exponent 0.5): p_0[y] = .5, p_1[y] = .75 -> omega_0 = .25 ** .5 = .5, omega_1 = .5 ** .5
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], requires_grad=True)
    o = torch.zeros(1, 2)
    out = dwfuse_loss(z, o, torch.tensor([0]), beta=0.5, alpha=0.1)
    assert out["omega"].tolist()[0] == pytest.approx([0.5, math.sqrt(0.5)])
    enc = 0.5 * math.log(2.0) + math.sqrt(0.5) * -math.log(0.75)
    assert out["enc"].item() == pytest.approx(enc)
    assert out["ra"].item() == pytest.approx(math.log(2.0))
    assert out["dwfuse"].item() == pytest.approx(enc + 0.1 * math.log(2.0))
    out["enc"].backward()
    # omega is a constant weight: d/dz_0 = omega_0 * (softmax - onehot) = .5 * [-.5, .5]
    assert z.grad[0, 0].tolist() == pytest.approx([-0.25, 0.25])


def test_cra_recursion_fixed_linear_blocks():
    cra = CascadeResidualAutoencoder(dim=2, code_dim=2, num_blocks=2)
    with torch.no_grad():
        for block in cra.blocks:
            block.encoder.weight.copy_(torch.eye(2))
            block.encoder.bias.zero_()
            block.decoder.bias.zero_()
        cra.blocks[0].decoder.weight.copy_(0.5 * torch.eye(2))
        cra.blocks[1].decoder.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    v = torch.tensor([[1.0, 2.0]])
    out, codes = cra(v)
    # dz_1 = .5 v = [.5, 1]; dz_2 = swap(v + dz_1) = swap([1.5, 3]) = [3, 1.5]; v' = v + dz_1 + dz_2
    assert out.tolist() == [[4.5, 4.5]]
    assert codes[0].tolist() == [[1.0, 2.0]] and codes[1].tolist() == [[1.5, 3.0]]


def test_tla_loss_selects_lazy_samples():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    mask = torch.tensor([[True, False], [True, False], [True, True]])
    lazy = torch.tensor([True, False])
    assert tla_loss(logits, labels, mask, lazy).item() == pytest.approx((math.log(2.0) - math.log(0.75)) / 2)
    assert tla_loss(logits, labels, mask, None).item() == 0.0
    assert tla_loss(logits, labels, mask, torch.tensor([False, True])).item() == 0.0


def test_simulate_missing_subsets_of_observed():
    g = torch.Generator().manual_seed(0)
    observed = torch.tensor([[True, True, True], [True, False, True], [False, True, False]]).repeat(200, 1)
    sim = simulate_missing(observed, g)
    assert sim.any(dim=1).all()
    assert not (sim & ~observed).any()
    assert torch.equal(sim[2::3], observed[2::3])  # one observed modality: nothing to drop
    full_rows = {tuple(r) for r in sim[0::3].tolist()}
    assert len(full_rows) == 7  # every combination is drawn from a complete sample
    with pytest.raises(ValueError, match="no observed modality"):
        simulate_missing(torch.zeros(1, 3, dtype=torch.bool), g)


class MaskScoreHead(FusionHead):
    """Fake head: logits = [3 * a + b, 0] from the mask only."""

    def forward(self, features, modality_mask):
        m = modality_mask.float()
        logits = torch.stack([3 * m[:, 0] + m[:, 1], torch.zeros_like(m[:, 0])], dim=1)
        return FusionOutput(logits, {}, {})


def test_tla_mining_picks_largest_ce():
    model = FusionModel({m: TinyEncoder(2) for m in ("a", "b")}, MaskScoreHead(("a", "b")))
    loader = [
        {
            "a": torch.randn(3, 3),
            "b": torch.randn(3, 3),
            "modality_mask": torch.ones(3, 2, dtype=torch.bool),
            "label": torch.zeros(3, dtype=torch.long),
        },
        {
            "a": torch.randn(2, 3),
            "b": torch.zeros(2, 3),
            "modality_mask": torch.tensor([[True, True], [True, False]]),
            "label": torch.zeros(2, dtype=torch.long),
        },
    ]
    sums, counts = combination_losses(model, loader, ("a", "b"))
    assert counts.tolist() == [5, 4, 4]  # the sample without b counts only for "a"
    ce = [math.log1p(math.exp(-3.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(-4.0))]
    assert sums.tolist() == pytest.approx([5 * ce[0], 4 * ce[1], 4 * ce[2]], rel=1e-5)  # float32 logits
    dist, lazy = lazy_from_losses(sums, counts)
    assert lazy == 1  # "b" alone
    assert dist.tolist() == pytest.approx(ce, rel=1e-5)
    dist, lazy = lazy_from_losses(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 0, 0]))
    assert lazy == 0 and math.isnan(dist[1].item())
    assert lazy_from_losses(torch.zeros(3), torch.zeros(3, dtype=torch.long))[1] == -1


def test_zero_input_embedding_comes_from_encoder_of_zeros():
    model = tiny_model()
    head = model.head
    refresh_zero_pooled(model, tiny_batch())
    assert bool(head.zero_pooled_ready)
    enc_a = model.encoders["a"]
    assert torch.allclose(head._zero_slices()["a"], torch.tanh(enc_a.lin.bias))
    feats = model.encode(tiny_batch(2))
    v = head.embed(feats, torch.tensor([[False, True, True], [True, True, True]]))
    assert torch.allclose(v[0, 0], head.proj["a"](torch.tanh(enc_a.lin.bias)))
    assert torch.allclose(v[1, 0], head.proj["a"](feats["a"].pooled[1]))
    with pytest.raises(ValueError, match="must have 5 entries"):
        head.set_zero_pooled({"a": torch.zeros(4), "b": torch.zeros(6), "c": torch.zeros(7)})


def test_contract_all_masks_absent_content_and_gradient():
    model = tiny_model()
    refresh_zero_pooled(model, tiny_batch())
    head = model.head.eval()
    g = torch.Generator().manual_seed(1)
    feats = {m: EncoderOutput(torch.randn(2, d, generator=g)) for m, d in DIMS.items()}
    for mask in all_combination_masks(MODS):
        m = mask.expand(2, -1)
        out = head(feats, m)
        assert torch.isfinite(out.logits).all(), mask
        assert torch.allclose(out.logits.exp().sum(1), torch.ones(2))
        assert (out.aux["omega"][:, ~mask] == 0).all()
        changed = {
            n: (f if mask[i] else EncoderOutput(torch.full_like(f.pooled, float("nan"))))
            for i, (n, f) in enumerate(feats.items())
        }
        out2 = head(changed, m)
        assert torch.equal(out2.logits, out.logits), mask
        assert torch.equal(out2.aux["imputed"], out.aux["imputed"])
        leaves = {n: f.pooled.clone().requires_grad_(True) for n, f in feats.items()}
        head({n: EncoderOutput(p) for n, p in leaves.items()}, m).logits.sum().backward()
        for i, n in enumerate(MODS):
            if not mask[i]:
                assert leaves[n].grad is None or torch.count_nonzero(leaves[n].grad) == 0


def test_inference_combination_hand_check():
    model = tiny_model()
    head = model.head.eval()
    with torch.no_grad():
        out = head(model.encode(tiny_batch(2)), torch.tensor([[True, False, True], [True, True, True]]))
    aux = out.aux
    probs = aux["modality_probs"]
    # omega with p_n[argmax] over present modalities; weighted average; mean with the joint head
    q = probs.amax(-1)
    om0 = [(1 - q[0, 2]) ** 0.25, 0.0, (1 - q[0, 0]) ** 0.25]
    assert aux["omega"][0].tolist() == pytest.approx([float(x) for x in om0], rel=1e-5)
    w = aux["omega"][0]
    weighted = (w[:, None] * probs[0]).sum(0) / w.sum()
    assert torch.allclose(aux["weighted_probs"][0], weighted)
    assert torch.allclose(out.logits.exp(), 0.5 * (aux["joint_probs"] + aux["weighted_probs"]), atol=1e-6)


def test_loss_step_backward_and_total():
    model = tiny_model()
    method = OmniFuseMethod(MODS, seed=0)
    batch = method.prepare(tiny_batch(8), None)
    assert torch.equal(batch[OBSERVED_MASK_KEY], torch.ones(8, 3, dtype=torch.bool))
    model.head.lazy_combination.fill_(0)  # lazy = "a"; the simulated batch is checked for "a"-only rows below
    losses = method.loss_step(model, batch, None)
    assert all(torch.isfinite(v) for v in losses.values())
    expected = losses["fw_loss"] + losses["bw_loss"] + 10 * losses["dwfuse_loss"] + 0.5 * losses["tla_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    has_lazy = (batch["modality_mask"] == torch.tensor([True, False, False])).all(1).any()
    assert (losses["tla_loss"].item() > 0) == bool(has_lazy)
    assert losses["fw_loss"].item() > 0
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.head.forward_cra.parameters())
    assert all(p.grad is not None for p in model.head.backward_cra.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders.parameters())


def test_fw_target_is_full_observed_embedding():
    model = tiny_model()
    refresh_zero_pooled(model, tiny_batch())
    batch = tiny_batch(2)
    feats = model.encode(batch)
    out = model.head(
        feats, torch.tensor([[True, False, False], [False, True, True]]), target_mask=torch.ones(2, 3, dtype=torch.bool)
    )
    full = model.head(feats, torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(out.aux["target"], full.aux["observed"])
    assert not out.aux["target"].requires_grad


def test_epoch_handler_refreshes_and_mines():
    model = tiny_model()
    method = OmniFuseMethod(MODS)
    loader = [tiny_batch(4, seed=1), tiny_batch(4, seed=2, full=False)]
    method.loss_step(model, method.prepare(loader[0], None), None)
    with torch.no_grad():
        model.encoders["a"].lin.bias.add_(1.0)  # the refresh must pick up the new encoder
    engine = SimpleNamespace(network=model, state=SimpleNamespace(dataloader=loader, device=None, metrics={}))
    (handler,) = method.handlers()
    assert isinstance(handler, OmniFuseEpochHandler)
    handler(engine)
    assert torch.allclose(model.head._zero_slices()["a"], torch.tanh(model.encoders["a"].lin.bias))
    lazy = int(model.head.lazy_combination)
    assert 0 <= lazy < 7 and engine.state.metrics["omnifuse_lazy_combination"] == lazy
    dist = model.head.combination_distance
    assert torch.isfinite(dist).all() and int(dist.argmax()) == lazy
    assert model.training  # mining restored the mode


def test_trainer_two_epochs_sets_lazy_combination():
    from medfusion.engines.trainer import build_trainer

    model = tiny_model()
    method = OmniFuseMethod(MODS)
    loader = [tiny_batch(4, seed=s) for s in range(2)]
    trainer = build_trainer(model, method, loader, max_epochs=2, device="cpu", log_every=100)
    trainer.run()
    assert int(model.head.lazy_combination) >= 0
    keys = set(model.state_dict())
    assert {"head.lazy_combination", "head.combination_distance", "head.zero_pooled"} <= keys


@pytest.mark.parametrize("prediction", ["joint", "weighted"])
def test_prediction_choice(prediction):
    model = tiny_model(prediction=prediction).eval()
    with torch.no_grad():
        out = model.forward_outputs(tiny_batch(2), torch.tensor([[True, False, True], [False, True, False]]))
    assert torch.allclose(out.logits.exp(), out.aux[f"{prediction}_probs"], atol=1e-6)
    with pytest.raises(ValueError, match="prediction must be"):
        tiny_model(prediction="mean")


def test_without_imputation_ablation_skips_cra_and_its_losses():
    import torch

    from medfusion.encoders.base import EncoderOutput
    from medfusion.fusion.omnifuse import OmniFuseHead

    torch.manual_seed(0)
    mods = ["a", "b"]
    head = OmniFuseHead(mods, {"a": 4, "b": 3}, num_classes=2, embed_dim=5, impute=False)
    assert not hasattr(head, "forward_cra")
    feats = {"a": EncoderOutput(torch.randn(3, 4)), "b": EncoderOutput(torch.randn(3, 3))}
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    out = head(feats, mask)
    v = head.embed(feats, mask).flatten(1)
    torch.testing.assert_close(out.aux["imputed"], v)
    torch.testing.assert_close(out.aux["joint_logits"], head.joint_classifier(v))
    # an absent modality's embedding is the zero-input one, whatever its content
    feats2 = {"a": feats["a"], "b": EncoderOutput(feats["b"].pooled + 7.0)}
    torch.testing.assert_close(head(feats2, mask).logits[1], out.logits[1])


def test_architecture_preserving_no_imputation_ablation_changes_only_the_imputation():
    """``impute="off"``: same predictor (projections, forward CRA, classifiers, joint head on the CRA codes) and,
    for one seed, the same initial weights as OmniFuse; only the imputation is off (classifiers read v, no
    L_fw / L_bw, no backward CRA)."""
    torch.manual_seed(0)
    full = tiny_model()
    torch.manual_seed(0)
    off = tiny_model(impute="off")
    assert off.head.imputation == "off" and not off.head.impute
    full_sd, off_sd = full.head.state_dict(), off.head.state_dict()
    assert set(full_sd) - set(off_sd) == {k for k in full_sd if k.startswith("backward_cra.")}
    assert set(off_sd) <= set(full_sd)
    for k in off_sd:  # same initial head weights (and buffers; the combination distances start NaN)
        torch.testing.assert_close(off_sd[k], full_sd[k], rtol=0, atol=0, equal_nan=True)
    off.encoders.load_state_dict(full.encoders.state_dict())  # (the tiny encoders are built after the head)
    batch = tiny_batch(4)
    mask = torch.tensor([[True, False, True], [True, True, True], [False, True, False], [True, True, False]])
    refresh_zero_pooled(full, batch)
    refresh_zero_pooled(off, batch)
    a = full.forward_outputs(batch, mask).aux
    b = off.forward_outputs(batch, mask).aux
    # the joint head is the same function of v: identical output
    torch.testing.assert_close(b["joint_logits"], a["joint_logits"])
    v = off.head.embed(off.encode(batch), mask)  # [B, M, d]
    torch.testing.assert_close(b["imputed"], v.flatten(1))
    for i, m in enumerate(MODS):
        torch.testing.assert_close(b["modality_logits"][m], off.head.classifiers[m](v[:, i]))
    assert not torch.allclose(a["modality_logits"]["b"], b["modality_logits"]["b"])  # full reads the imputed v'
    method = OmniFuseMethod(MODS, seed=0)
    losses = method.loss_step(off, method.prepare(tiny_batch(8), None), None)
    assert losses["fw_loss"].item() == 0.0 and losses["bw_loss"].item() == 0.0
    expected = 10 * losses["dwfuse_loss"] + 0.5 * losses["tla_loss"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in off.head.forward_cra.parameters())
    with pytest.raises(ValueError, match="impute must be"):
        tiny_model(impute="partial")


def test_weighted_over_all_includes_imputed_modalities():
    """``weighted_over="all"``: omega and the weighted average run over all M modalities (absent ones through
    their imputed v'); mask [a, c] present, q = max prob: omega_b = [(1 - q_a)(1 - q_c)]^(0.5 / 2)."""
    torch.manual_seed(0)
    model = tiny_model(weighted_over="all").eval()
    mask = torch.tensor([[True, False, True]])
    with torch.no_grad():
        out = model.forward_outputs(tiny_batch(1), mask)
    probs, q = out.aux["modality_probs"][0], out.aux["modality_probs"][0].amax(-1)
    omega = [float(((1 - q[1]) * (1 - q[2])) ** 0.25), float(((1 - q[0]) * (1 - q[2])) ** 0.25)]
    omega.append(float(((1 - q[0]) * (1 - q[1])) ** 0.25))
    assert out.aux["omega"][0].tolist() == pytest.approx(omega, rel=1e-5)
    weighted = sum(o * probs[i] for i, o in enumerate(omega)) / sum(omega)
    torch.testing.assert_close(out.aux["weighted_probs"][0], weighted)
    present = tiny_model().eval()
    present.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert present.forward_outputs(tiny_batch(1), mask).aux["omega"][0, 1].item() == 0.0  # default: present only
