from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medfusion.data.dropout import BatchModalityDropout, ModalityDropoutd, sample_modality_masks
from medfusion.modality import BRATS_MODALITIES, Keys

MODS = BRATS_MODALITIES
N = 30000


def _freq(masks: np.ndarray) -> dict[tuple[bool, ...], float]:
    keys, counts = np.unique(masks, axis=0, return_counts=True)
    return {tuple(bool(x) for x in k): c / len(masks) for k, c in zip(keys, counts)}


def test_uniform_covers_15_combinations_equally():
    rng = np.random.default_rng(0)
    masks = sample_modality_masks(np.ones((N, 4), bool), "uniform", rng)
    freq = _freq(masks)
    assert len(freq) == 15 and (False,) * 4 not in freq
    for f in freq.values():
        assert abs(f - 1 / 15) < 0.01


def test_uniform_respects_availability():
    rng = np.random.default_rng(1)
    avail = np.tile(np.array([[True, False, True, True]]), (N, 1))
    masks = sample_modality_masks(avail, "uniform", rng)
    assert not masks[:, 1].any()
    freq = _freq(masks)
    assert len(freq) == 7
    for f in freq.values():
        assert abs(f - 1 / 7) < 0.012


def test_k_subset_per_batch_distribution():
    # P(k) = 1/4 for k = 1..4, then uniform over the C(4, k) subsets: P(one given k-subset) = 1/(4*C(4,k))
    rng = np.random.default_rng(2)
    draws = np.concatenate(
        [sample_modality_masks(np.ones((3, 4), bool), "k_subset", rng, per_batch=True) for _ in range(N // 3)]
    )
    batches = draws.reshape(-1, 3, 4)
    assert (batches == batches[:, :1]).all()  # one subset per batch
    freq = _freq(batches[:, 0])
    for combo, f in freq.items():
        k = sum(combo)
        expected = 1 / (4 * len(list(itertools.combinations(range(4), k))))
        assert abs(f - expected) < 0.012, (combo, f, expected)
    assert abs(freq[(True,) * 4] - 0.25) < 0.015  # the full set is seen 1/M of the time


def test_bernoulli_keeps_at_least_one():
    rng = np.random.default_rng(3)
    masks = sample_modality_masks(np.ones((N, 4), bool), "bernoulli", rng, p=0.5)
    assert masks.any(axis=1).all()
    # P(modality kept) = 1/2 + P(all dropped) * 1/4 = 1/2 + 1/16 * 1/4
    assert np.allclose(masks.mean(axis=0), 0.5 + 1 / 64, atol=0.012)


def test_fixed_and_errors():
    rng = np.random.default_rng(4)
    avail = np.array([[True, True, True, True], [True, False, True, False]])
    out = sample_modality_masks(avail, "fixed", rng, combination_mask=np.array([True, True, False, False]))
    assert out.tolist() == [[True, True, False, False], [True, False, False, False]]
    with pytest.raises(ValueError, match="samples \\[1\\] have none"):
        sample_modality_masks(avail, "fixed", rng, combination_mask=np.array([False, True, False, False]))
    with pytest.raises(ValueError, match="no modality"):
        sample_modality_masks(np.zeros((1, 4), bool), "uniform", rng)
    with pytest.raises(ValueError, match="mode must be one of"):
        ModalityDropoutd(["image"], MODS, mode="sometimes")
    with pytest.raises(ValueError, match="unknown|not in"):
        ModalityDropoutd(["image"], MODS, mode="fixed", combination=["flair", "pet"])


def test_dict_transform_zeroes_image_channels_and_writes_mask():
    t = ModalityDropoutd(["image"], MODS, mode="fixed", combination=["t1", "t2"])
    d = t({"image": torch.ones(4, 2, 2, 2)})
    assert d[Keys.MASK].tolist() == [False, True, False, True]
    assert d["image"][:, 0, 0, 0].tolist() == [0, 1, 0, 1]
    # per-modality keys; an incoming mask restricts what can be switched on
    t2 = ModalityDropoutd(list(MODS), MODS, mode="uniform").set_random_state(0)
    sample = {m: torch.ones(1, 3) for m in MODS} | {Keys.MASK: torch.tensor([True, False, False, True])}
    for _ in range(20):
        out = t2(sample)
        mask = out[Keys.MASK]
        assert not mask[1] and not mask[2] and mask.any()
        for i, m in enumerate(MODS):
            assert out[m].sum().item() == (3.0 if mask[i] else 0.0)


def test_batch_dropout_state_roundtrip_and_zeroing():
    bd = BatchModalityDropout(MODS, mode="uniform", seed=5)
    batch = {"image": torch.ones(6, 4, 2, 2, 2), Keys.MASK: torch.ones(6, 4, dtype=torch.bool)}
    bd(batch)
    state = bd.state_dict()
    a = bd(batch)
    bd.load_state_dict(state)
    b = bd(batch)
    assert torch.equal(a[Keys.MASK], b[Keys.MASK])
    assert torch.equal(a["image"][:, :, 0, 0, 0], a[Keys.MASK].float())
    assert batch["image"].sum() == 6 * 4 * 8  # input batch untouched
