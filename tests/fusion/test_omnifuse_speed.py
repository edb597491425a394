"""OmniFuse work removed for speed gives the same values: folded TLA mining, cached zero input of frozen encoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medfusion.fusion.omnifuse import combination_losses, refresh_zero_pooled
from medfusion.modality import all_combination_masks
from tests.fusion.test_omnifuse import MODS, tiny_batch, tiny_model


def test_folded_mining_equals_one_head_call_per_combination():
    model = tiny_model().eval()
    batches = [tiny_batch(5, seed=3), tiny_batch(6, seed=4, full=False)]
    refresh_zero_pooled(model, batches[0])
    sums, counts = combination_losses(model, batches, MODS)
    combos = all_combination_masks(MODS)
    ref_sums, ref_counts = torch.zeros(len(combos), dtype=torch.float64), torch.zeros(len(combos), dtype=torch.long)
    with torch.no_grad():
        for b in batches:
            feats = model.encode({m: b[m] for m in MODS})
            for c, combo in enumerate(combos):
                valid = (b["modality_mask"] | ~combo).all(dim=1)
                logits = model.head(feats, combo.expand(len(valid), -1)).logits
                ref_sums[c] += float(F.cross_entropy(logits[valid], b["label"][valid], reduction="sum"))
                ref_counts[c] += int(valid.sum())
    assert counts.tolist() == ref_counts.tolist()
    assert ref_counts.min() < ref_counts.max()  # the incomplete batch makes the counts differ
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-6)


def test_frozen_encoder_zero_input_cached_until_it_changes():
    model = tiny_model()
    frozen = model.encoders["a"]
    frozen.requires_grad_(False)
    calls = {"a": 0, "b": 0}
    for m in calls:
        model.encoders[m].register_forward_hook(lambda *_, m=m: calls.__setitem__(m, calls[m] + 1))
    batch = tiny_batch()
    refresh_zero_pooled(model, batch)
    refresh_zero_pooled(model, batch)
    assert calls == {"a": 1, "b": 2}  # the trainable encoder runs every time
    with torch.no_grad():
        frozen.lin.bias.add_(1.0)  # an in-place change of a frozen weight is seen
    refresh_zero_pooled(model, batch)
    assert calls["a"] == 2
    torch.testing.assert_close(model.head._zero_slices()["a"], torch.tanh(frozen.lin.bias))
    frozen.load_state_dict({k: torch.zeros_like(v) for k, v in frozen.state_dict().items()})  # e.g. a checkpoint
    refresh_zero_pooled(model, batch)
    assert calls["a"] == 3
    assert torch.equal(model.head._zero_slices()["a"], torch.zeros(5))


def test_online_mining_sums_the_training_forwards_and_equals_the_pass_without_updates():
    from types import SimpleNamespace

    from medfusion.fusion.omnifuse import OmniFuseMethod

    model = tiny_model()  # deterministic encoders, no dropout: train-mode features = eval-mode features
    batches = [tiny_batch(5, seed=3), tiny_batch(6, seed=4, full=False)]
    online = OmniFuseMethod(MODS, tla_mining="online")
    for b in batches:
        online.loss_step(model, online.prepare(b, None), None)  # no optimiser step: weights stay put
    # the epoch pass over the same samples (observed masks) with the same weights gives the same sums
    sums, counts = combination_losses(model, batches, MODS)
    assert online.online_counts.tolist() == counts.tolist()
    torch.testing.assert_close(online.online_sums, sums, rtol=1e-6, atol=1e-6)
    assert model.head.training  # the eval-mode head call restored the mode
    engine = SimpleNamespace(network=model, state=SimpleNamespace(dataloader=None, device=None, metrics={}))
    (handler,) = online.handlers()
    handler(engine)  # no loader needed: online mining never iterates one
    assert int(model.head.lazy_combination) == int((sums / counts).argmax())
    assert engine.state.metrics["omnifuse_lazy_combination"] == int(model.head.lazy_combination)
    assert online.online_counts.sum() == 0  # restarted for the next epoch


def test_online_mining_only_where_it_is_implemented():
    import pytest

    from medfusion.fusion.omnifuse import OmniFuseMethod
    from medfusion.models.seg_omnifuse import SegOmniFuseMethod

    with pytest.raises(ValueError, match="tla_mining"):
        OmniFuseMethod(MODS, tla_mining="fast")
    with pytest.raises(ValueError, match="tla_every"):
        OmniFuseMethod(MODS, tla_every=0)
    with pytest.raises(ValueError, match="classification head only"):
        SegOmniFuseMethod(("flair", "t1"), tla_mining="online")


def test_tla_every_k_epochs_mines_after_every_kth_epoch_only():
    from types import SimpleNamespace

    from medfusion.fusion.omnifuse import OmniFuseMethod

    model = tiny_model()
    method = OmniFuseMethod(MODS, tla_every=2)
    loader = [tiny_batch(4, seed=1)]
    method.loss_step(model, method.prepare(loader[0], None), None)
    (handler,) = method.handlers()
    state = SimpleNamespace(dataloader=loader, device=None, metrics={}, epoch=1)
    handler(SimpleNamespace(network=model, state=state))
    assert int(model.head.lazy_combination) == -1  # epoch 1: no pass
    state.epoch = 2
    handler(SimpleNamespace(network=model, state=state))
    sums, counts = combination_losses(model, loader, MODS)
    assert int(model.head.lazy_combination) == int((sums / counts).argmax()) >= 0  # epoch 2: the pass
    with torch.no_grad():
        model.head.lazy_combination.fill_(3)
    state.epoch = 3
    handler(SimpleNamespace(network=model, state=state))
    assert int(model.head.lazy_combination) == 3 == state.metrics["omnifuse_lazy_combination"]  # kept
