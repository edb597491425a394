"""Tests of the B2 test-time noise (medfusion.data.noise)."""

from __future__ import annotations

import pytest
import torch

from medfusion.data.ehr import EHR_CONTINUOUS_COLUMNS
from medfusion.data.noise import MASK_TOKEN_ID, add_modality_noise
from medfusion.modality import Keys

KINDS = {"ehr": "ehr", "cxr": "image", "report": "text"}


def _batch(b: int = 64) -> dict:
    ids = torch.full((b, 10), 2000, dtype=torch.long)
    ids[:, 0], ids[:, 7] = 101, 102  # [CLS] ... [SEP], then padding
    ids[:, 8:] = 0
    att = (ids != 0).long()
    return {
        "ehr": torch.zeros(b, 4, 76),
        "cxr": torch.full((b, 1, 8, 8), 0.5),
        "report": torch.stack([ids, att], dim=1),
        Keys.MASK: torch.ones(b, 3, dtype=torch.bool),
        Keys.LABEL: torch.zeros(b),
    }


def test_epsilon_zero_is_identity() -> None:
    batch = _batch()
    out, noisy = add_modality_noise(batch, KINDS, 0.0, generator=torch.Generator().manual_seed(0))
    assert not noisy.any()
    for m in KINDS:
        assert torch.equal(out[m], batch[m])


def test_only_noisy_rows_change_and_input_untouched() -> None:
    batch = _batch(200)
    before = {m: batch[m].clone() for m in KINDS}
    out, noisy = add_modality_noise(batch, KINDS, 10.0, generator=torch.Generator().manual_seed(1))
    for m in KINDS:
        assert torch.equal(batch[m], before[m])  # not modified in place
    # about half of the pairs are noisy (binomial(200, 0.5): 4 sd = 28)
    frac = noisy.float().mean(0)
    assert ((frac > 0.36) & (frac < 0.64)).all()
    for j, m in enumerate(KINDS):
        changed = (out[m] != batch[m]).flatten(1).any(dim=1)
        assert torch.equal(changed, noisy[:, j]), m


def test_ehr_noise_only_on_continuous_columns_with_expected_std() -> None:
    batch = _batch(400)
    batch[Keys.MASK] = batch[Keys.MASK][:, :1]
    out, _ = add_modality_noise(
        batch,
        {"ehr": "ehr"},
        10.0,
        p=1.0,
        generator=torch.Generator().manual_seed(2),
        modalities=["ehr"],
        ehr_std_per_eps=0.2,
    )
    diff = out["ehr"] - batch["ehr"]
    other = [c for c in range(76) if c not in EHR_CONTINUOUS_COLUMNS]
    assert diff[..., other].abs().max() == 0
    assert diff[..., list(EHR_CONTINUOUS_COLUMNS)].std().item() == pytest.approx(2.0, rel=0.03)  # 0.2 * 10


def test_image_std_in_255_units_and_clipping() -> None:
    batch = _batch(300)
    batch[Keys.MASK] = batch[Keys.MASK][:, 1:2]
    gen = torch.Generator().manual_seed(3)
    out, _ = add_modality_noise(batch, {"cxr": "image"}, 5.0, p=1.0, generator=gen, modalities=["cxr"])
    d = (out["cxr"] - 0.5) * 255.0
    assert d.std().item() == pytest.approx(50.0, rel=0.03)  # std = 10 * eps grey levels; 0.5 +- 0.2 never clips
    out10, _ = add_modality_noise(batch, {"cxr": "image"}, 10.0, p=1.0, generator=gen, modalities=["cxr"])
    assert out10["cxr"].min() >= 0 and out10["cxr"].max() <= 1


def test_text_replacement_probability_and_specials_kept() -> None:
    batch = _batch(500)
    out, noisy = add_modality_noise(batch, KINDS, 5.0, p=1.0, generator=torch.Generator().manual_seed(4))
    ids = out["report"][:, 0]
    assert torch.equal(out["report"][:, 1], batch["report"][:, 1])  # attention unchanged
    assert (ids[:, 0] == 101).all() and (ids[:, 7] == 102).all() and (ids[:, 8:] == 0).all()
    replaced = (ids[:, 1:7] == MASK_TOKEN_ID).float().mean().item()
    assert replaced == pytest.approx(0.5, abs=0.03)  # 0.1 * 5
    out10, _ = add_modality_noise(batch, KINDS, 10.0, p=1.0, generator=torch.Generator().manual_seed(5))
    assert (out10["report"][:, 0, 1:7] == MASK_TOKEN_ID).all()  # probability capped at 1


def test_absent_modalities_never_noisy_and_deterministic() -> None:
    batch = _batch(50)
    batch[Keys.MASK][:, 1] = False
    batch["cxr"] = torch.zeros_like(batch["cxr"])
    a, na = add_modality_noise(batch, KINDS, 10.0, generator=torch.Generator().manual_seed(6))
    b, nb = add_modality_noise(batch, KINDS, 10.0, generator=torch.Generator().manual_seed(6))
    assert not na[:, 1].any() and (a["cxr"] == 0).all()
    assert torch.equal(na, nb) and all(torch.equal(a[m], b[m]) for m in KINDS)


def test_errors() -> None:
    batch = _batch(4)
    with pytest.raises(ValueError, match="unknown modality kind"):
        add_modality_noise(batch, {"ehr": "audio"}, 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        add_modality_noise(batch, KINDS, -1.0)
    with pytest.raises(ValueError, match="modality_mask has shape"):
        add_modality_noise(batch, {"ehr": "ehr"}, 1.0, modalities=["ehr"])
    bad = dict(batch, ehr=torch.zeros(4, 3, 10))
    with pytest.raises(ValueError, match="last dim 10"):
        add_modality_noise(bad, KINDS, 1.0, p=1.0)
