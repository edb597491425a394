"""Encoders for structured EHR data: an MLP for feature vectors and a GRU for time series.

Registered as ``"mlp"`` (input ``[B, F]`` or ``[B, T, F]``, flattened) and ``"gru"`` (input
``[B, T, F]``). A missing EHR sample is zero-filled; presence is read from the modality mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medfusion.encoders.base import Encoder, EncoderOutput, FeatureInfo, register_encoder

__all__ = ["MLPEncoder", "GRUEncoder"]


class MLPEncoder(Encoder):
    """Multi-layer perceptron: ``[Linear, ReLU, Dropout] x len(hidden)`` then ``Linear(-> out_dim)``.

    Args:
        in_features: flattened input size (``F`` for ``[B, F]``, ``T * F`` for ``[B, T, F]``).
        hidden: hidden layer sizes (may be empty: a single linear layer).
        out_dim: size of ``pooled``.
        dropout: dropout after every hidden layer.

    Returns (forward):
        ``EncoderOutput(pooled [B, out_dim], ())``.

    Raises:
        ValueError: non-positive sizes or dropout outside ``[0, 1)``.
    """

    input_kind = "tabular"

    def __init__(
        self, in_features: int, hidden: Sequence[int] = (64,), out_dim: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        sizes = [int(in_features), *(int(h) for h in hidden), int(out_dim)]
        if min(sizes) <= 0:
            raise ValueError(f"MLPEncoder: in_features, hidden and out_dim must be positive, got {sizes}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLPEncoder: dropout must be in [0, 1), got {dropout}.")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        self.mlp = nn.Sequential(*layers)
        self.in_features = sizes[0]
        self.out_dim = sizes[-1]
        self.feature_info = []

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` ``[B, F]`` or ``[B, T, F]`` (flattened to ``[B, T * F]``).

        Raises:
            ValueError: the flattened size is not ``in_features``.
        """
        x = x.flatten(1)
        if not torch.jit.is_tracing() and x.shape[1] != self.in_features:
            raise ValueError(f"MLPEncoder: flattened input has {x.shape[1]} features, expected {self.in_features}.")
        return EncoderOutput(self.mlp(x), ())

    def example_input(self, batch_size: int = 2, size: int = 16) -> torch.Tensor:
        """Random ``[B, in_features]`` (``size`` is unused)."""
        return torch.randn(batch_size, self.in_features)


class GRUEncoder(Encoder):
    """GRU over a time series; ``pooled`` is the last layer's final hidden state (directions concatenated).

    Sequences are taken as given (no packing): pad at the end, and the final state is the state
    after the last time step.

    Args:
        in_features: features per time step ``F``.
        hidden: GRU hidden size per direction.
        num_layers: stacked GRU layers.
        bidirectional: run a backward GRU too (``H = 2 * hidden``).
        dropout: dropout between GRU layers (only with ``num_layers > 1``).
        out_dim: size of a linear projection of the final state; ``None``: no projection.

    Returns (forward):
        ``EncoderOutput(pooled [B, out_dim or H], (states [B, T, H],))``.

    Raises:
        ValueError: non-positive sizes.
    """

    input_kind = "sequence"

    def __init__(
        self,
        in_features: int,
        hidden: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if min(int(in_features), int(hidden), int(num_layers)) <= 0 or (out_dim is not None and int(out_dim) <= 0):
            raise ValueError(
                f"GRUEncoder: in_features, hidden, num_layers, out_dim must be positive, got "
                f"{in_features}, {hidden}, {num_layers}, {out_dim}."
            )
        self.gru = nn.GRU(
            int(in_features),
            int(hidden),
            num_layers=int(num_layers),
            batch_first=True,
            bidirectional=bool(bidirectional),
            dropout=float(dropout) if num_layers > 1 else 0.0,
        )
        self.in_features = int(in_features)
        self.num_directions = 2 if bidirectional else 1
        width = int(hidden) * self.num_directions
        self.proj: nn.Module = nn.Linear(width, int(out_dim)) if out_dim is not None else nn.Identity()
        self.out_dim = int(out_dim) if out_dim is not None else width
        self.feature_info = [FeatureInfo(width, 1, "sequence")]

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` ``[B, T, F]``.

        Raises:
            ValueError: ``x`` is not ``[B, T, in_features]``.
        """
        if not torch.jit.is_tracing() and (x.dim() != 3 or x.shape[2] != self.in_features):
            raise ValueError(f"GRUEncoder: expected [B, T, {self.in_features}], got {tuple(x.shape)}.")
        states, h_n = self.gru(x)  # states [B, T, H]; h_n [layers * dirs, B, hidden]
        last = h_n[-self.num_directions :].transpose(0, 1).flatten(1)  # [B, dirs * hidden]
        return EncoderOutput(self.proj(last), (states,))

    def example_input(self, batch_size: int = 2, size: int = 16) -> torch.Tensor:
        """Random ``[B, size, in_features]`` (``size`` time steps)."""
        return torch.randn(batch_size, size, self.in_features)


@register_encoder("mlp")
def mlp(**kwargs: object) -> MLPEncoder:
    """Factory: ``create_encoder("mlp", in_features=76, hidden=[64], out_dim=64)``."""
    return MLPEncoder(**kwargs)  # type: ignore[arg-type]


@register_encoder("gru")
def gru(**kwargs: object) -> GRUEncoder:
    """Factory: ``create_encoder("gru", in_features=76, hidden=64)``."""
    return GRUEncoder(**kwargs)  # type: ignore[arg-type]
