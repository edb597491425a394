"""Contract every registered fusion head must pass (after timm's registry-driven tests; the heads' twin of
``tests/encoders/test_contract.py``).

Parametrised over ``list_fusions()`` and the method registry: a newly registered head without an entry in
``TINY`` fails here instead of being silently skipped. For every head and every one of the ``2^M - 1`` masks
(one batch row per combination): logits ``[B, K]`` and finite; changing the CONTENT of an absent modality
(pooled features and maps) leaves the logits bit-identical; the logits give an absent modality's features no
gradient (heads trained end to end; Meta Fusion's stages fit on frozen features and its logits carry none).
"""

from __future__ import annotations

import pytest
import torch

from medfusion.encoders.base import EncoderOutput
from medfusion.fusion import FusionHead, create_fusion, list_fusions
from medfusion.fusion.meta_fusion import MetaFusionData
from medfusion.fusion.recipes import RECIPES, default_head_kwargs, list_methods
from medfusion.modality import all_combination_masks

MODS = ("a", "b", "c")
DIMS = {"a": 3, "b": 4, "c": 5}
K = 3
MAP_SHAPE = (2, 4)  # one [B, 2, 4] feature map per modality: heads must ignore an absent modality's maps too

# Tiny constructor kwargs per registered head (``modalities``, ``in_dims``, ``num_classes`` are added).
TINY: dict[str, dict] = {
    "concat": {"hidden": 8},
    "late": {"hidden": 4},
    "mean_features": {"embed_dim": 6, "hidden": 8},
    "qmf": {"num_samples": 7, "hidden": 4},
    "omnifuse": {"embed_dim": 6, "code_dim": 4, "num_blocks": 2},
    "metakd": {"embed_dim": 6, "hidden": 8},
    "meta_fusion": {"grids": {m: ["null", "identity"] for m in MODS}},
}
META_FIT = {"epochs": 2, "rho_grid": (0.0,), "batch_size": 0, "hidden": [4]}
# heads fitted by their own stages on frozen features: their logits carry no gradient to the encoders
NO_GRADIENT = {"meta_fusion"}
_CACHE: dict[str, FusionHead] = {}


def _meta_data(n: int, seed: int) -> MetaFusionData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = {m: torch.randn(n, d, generator=g) + y[:, None].float() for m, d in DIMS.items()}
    return MetaFusionData(x, all_combination_masks(MODS)[torch.arange(n) % 7], y)


def _head(name: str) -> FusionHead:
    """Build (once per module) the tiny head ``name`` in eval mode; Meta Fusion is fitted on tiny features."""
    if name not in TINY:
        pytest.fail(f"registered fusion head {name!r} has no entry in TINY of tests/fusion/test_contract.py")
    if name not in _CACHE:
        torch.manual_seed(0)
        if name == "meta_fusion":
            from medfusion.fusion.meta_fusion_head import fit_meta_fusion

            head = fit_meta_fusion(_meta_data(42, 0), _meta_data(21, 1), TINY[name]["grids"], num_classes=K, **META_FIT)
        else:
            head = create_fusion(name, modalities=list(MODS), in_dims=DIMS, num_classes=K, **TINY[name])
        _CACHE[name] = head.eval()
    return _CACHE[name]


def _features(seed: int, requires_grad: bool = False) -> dict[str, EncoderOutput]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, d in DIMS.items():
        pooled = torch.randn(7, d, generator=g).requires_grad_(requires_grad)
        maps = (torch.randn(7, *MAP_SHAPE, generator=g).requires_grad_(requires_grad),)
        out[m] = EncoderOutput(pooled, maps)
    return out


def _replace_absent(features: dict[str, EncoderOutput], mask: torch.Tensor, seed: int) -> dict[str, EncoderOutput]:
    """Same features where present, other (large) content where the row lacks the modality."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, m in enumerate(MODS):
        absent = ~mask[:, j]
        pooled = features[m].pooled.detach().clone()
        pooled[absent] = 100 * torch.randn(int(absent.sum()), pooled.shape[1], generator=g)
        fmap = features[m].maps[0].detach().clone()
        fmap[absent] = 100 * torch.randn(int(absent.sum()), *MAP_SHAPE, generator=g)
        out[m] = EncoderOutput(pooled, (fmap,))
    return out


def test_every_registered_head_and_method_is_covered() -> None:
    heads = set(list_fusions())
    assert heads == set(TINY), f"TINY covers {sorted(TINY)}, registered heads are {sorted(heads)}"
    # every method of the registry names a registered head and builds its head kwargs from the data size
    for name in list_methods():
        assert RECIPES[name].head in heads
        assert isinstance(default_head_kwargs(name, 5), dict)


@pytest.mark.parametrize("name", list_fusions())
def test_all_masks_finite_logits_and_absent_content_ignored(name: str) -> None:
    head = _head(name)
    mask = all_combination_masks(MODS)  # [7, 3]: every non-empty combination, one row each
    with torch.no_grad():
        features = _features(1)
        out = head(features, mask)
        again = head(_replace_absent(features, mask, seed=2), mask)
    assert out.logits.shape == (7, K)
    assert torch.isfinite(out.logits).all()
    assert torch.equal(out.logits, again.logits), f"{name}: an absent modality's content changed the logits"


@pytest.mark.parametrize("name", list_fusions())
def test_absent_modalities_get_no_gradient(name: str) -> None:
    head = _head(name)
    mask = all_combination_masks(MODS)
    features = _features(3, requires_grad=True)
    logits = head(features, mask).logits
    if name in NO_GRADIENT:
        assert not logits.requires_grad, f"{name} is listed in NO_GRADIENT but its logits carry gradient"
        return
    logits.square().sum().backward()
    for j, m in enumerate(MODS):
        absent = ~mask[:, j]
        for t in (features[m].pooled, features[m].maps[0]):
            if t.grad is not None:
                assert (t.grad[absent] == 0).all(), f"{name}: absent {m!r} received gradient"
    present_grads = [features[m].pooled.grad for m in MODS if features[m].pooled.grad is not None]
    assert present_grads and any(g.abs().sum() > 0 for g in present_grads), f"{name}: no gradient at all"


@pytest.mark.parametrize("name", list_fusions())
def test_per_modality_aux_is_declared_and_exported_by_name(name: str) -> None:
    """Only the head's declared ``per_modality_aux`` keys become ``<key>_<modality>`` columns (here ``K == M``, so
    a ``[B, K]`` entry such as OmniFuse's ``joint_logits`` would pass a shape test and be misnamed)."""
    from medfusion.evaluation.classification import per_sample_aux

    head = _head(name)
    mask = all_combination_masks(MODS)
    with torch.no_grad():
        out = head(_features(0), mask)
    for key in head.per_modality_aux:
        assert tuple(out.aux[key].shape) == (7, len(MODS)), key
    cols = per_sample_aux(out.aux, 7, MODS, head.per_modality_aux)
    named = {c.rsplit("_", 1)[0] for c in cols if c.rsplit("_", 1)[-1] in MODS}
    assert named == set(head.per_modality_aux)
    if name == "omnifuse":
        assert tuple(out.aux["joint_logits"].shape) == (7, K) and not any(c.startswith("joint_") for c in cols)
