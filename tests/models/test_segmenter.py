from __future__ import annotations

import pytest
import torch

from medfusion.modality import all_combination_masks
from medfusion.models.segmenter import Segmenter

MODS = ("flair", "t1", "t1ce", "t2")


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 4, 16, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("impute_levels", ["all", "bottleneck"])
def test_all_masks_finite_and_absent_content_ignored(x, shared, impute_levels):
    net = Segmenter(MODS, channels=(4, 8, 16), shared_encoder=shared, impute_levels=impute_levels).eval()
    with torch.no_grad():
        for mask in all_combination_masks(MODS):
            m = mask.expand(2, -1)
            y = net(x, m)
            assert y.shape == (2, 3, 16, 16, 16) and torch.isfinite(y).all()
            x2 = x.clone()
            x2[:, ~mask] = torch.randn_like(x2[:, ~mask]) * 50
            assert torch.equal(net(x2, m), y)


def test_absent_modalities_get_no_gradient(x):
    net = Segmenter(MODS, channels=(4, 8, 16))
    xi = x.clone().requires_grad_(True)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    net(xi, mask).sum().backward()
    assert (xi.grad[~mask] == 0).all()
    assert xi.grad[mask].abs().sum() > 0


def test_dict_input_and_default_mask(x):
    net = Segmenter(MODS, channels=(4, 8, 16)).eval()
    d = {m: x[:, i : i + 1] for i, m in enumerate(MODS)}
    with torch.no_grad():
        assert torch.equal(net(d), net(x))
        assert torch.equal(net(x), net(x, torch.ones(2, 4, dtype=torch.bool)))


@pytest.mark.parametrize(
    ("impute", "levels", "shared", "first_stride"),
    [("mean", "all", True, 2), ("zero", "bottleneck", True, 1), ("mean", "bottleneck", False, 2)],
)
def test_predict_combinations_equals_per_combination(x, impute, levels, shared, first_stride):
    net = Segmenter(
        MODS, channels=(4, 8, 16), impute=impute, impute_levels=levels, shared_encoder=shared, first_stride=first_stride
    ).eval()
    masks = all_combination_masks(MODS)
    with torch.no_grad():
        naive = torch.cat([net(x, masks[i : i + 1]) for i in range(len(masks))], dim=1)
        loop = net.predict_combinations(x, masks, batch_combinations=False)
        torch.testing.assert_close(loop, naive, atol=1e-5, rtol=1e-5)
        # combinations decoded together: one chunk, and (tiny budget) one combination per chunk
        for budget in (1.0, 1e-9):
            batched = net.predict_combinations(x, masks, memory_budget_gb=budget)
            torch.testing.assert_close(batched, naive, atol=1e-5, rtol=1e-5)


def test_predict_combinations_with_missing_modalities(x):
    net = Segmenter(MODS, channels=(4, 8, 16)).eval()
    lacks_t1 = torch.tensor([[True, False, True, True]])
    masks = all_combination_masks(MODS)[[0, 2, 5, 14]]  # flair, t1ce, flair+t1ce, all: none needs t1 alone
    with torch.no_grad():
        # a case without t1: every combination is intersected with its availability
        naive = torch.cat([net(x, masks[i : i + 1] & lacks_t1) for i in range(len(masks))], dim=1)
        torch.testing.assert_close(net.predict_combinations(x, masks, lacks_t1), naive, atol=1e-5, rtol=1e-5)
        # rows with different availability are decoded one at a time
        rows = torch.cat([torch.ones(1, 4, dtype=torch.bool), lacks_t1])
        mixed = net.predict_combinations(x, masks, rows)
        per_row = torch.cat([net.predict_combinations(x[i : i + 1], masks, rows[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(mixed, per_row, atol=1e-5, rtol=1e-5)


def test_per_modality_encoders_are_distinct():
    net = Segmenter(MODS, channels=(4, 8, 16), shared_encoder=False)
    assert set(net.encoder.keys()) == set(MODS)
    shared = Segmenter(MODS, channels=(4, 8, 16))
    n = sum(p.numel() for p in net.encoder.parameters())
    assert n == 4 * sum(p.numel() for p in shared.encoder.parameters())


def test_bad_inputs():
    with pytest.raises(ValueError, match="impute"):
        Segmenter(MODS, impute="median")
    net = Segmenter(MODS, channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"\[B, 4, D, H, W\]"):
        net(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match="every modality missing"):
        net(torch.zeros(1, 4, 16, 16, 16), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(KeyError, match="lack modalities"):
        net.stack_inputs({"flair": torch.zeros(1, 1, 16, 16, 16)})
    with pytest.raises(ValueError, match="duplicate"):
        Segmenter(("flair", "flair"), channels=(4, 8))
