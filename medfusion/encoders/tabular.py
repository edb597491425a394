"""Encoders for structured EHR data: tabular features (sparse, raw units), feature vectors and time series.

Registered as ``"tabular"`` (input ``[B, F]`` in raw units with NaN for features not measured: imputation,
missing indicators and standardisation fitted on the training split, then an MLP), ``"mlp"`` (input ``[B, F]``
or ``[B, T, F]``, flattened; no NaN) and ``"gru"`` (input ``[B, T, F]``). A missing modality is zero-filled;
presence is read from the modality mask.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medfusion.encoders.base import Encoder, EncoderOutput, FeatureInfo, register_encoder

__all__ = ["TabularPreprocessing", "TabularEncoder", "MLPEncoder", "GRUEncoder", "fit_tabular_preprocessing"]

logger = logging.getLogger(__name__)
IMPUTE_STRATEGIES = ("median", "mean")


class TabularPreprocessing(nn.Module):
    """Per-feature imputation, missing-indicator features and standardisation, fitted on training rows.

    ``forward(x)``: ``x`` ``[B, F]`` in raw units with NaN where a feature was not measured ->
    ``[B, 2F]`` = ``(where(isnan(x), fill, x) - center) / scale`` followed by the 0/1 indicators ``isnan(x)``
    (``[B, F]`` without indicators). The statistics are buffers, so they are saved in the model's state dict
    (``model.pt``) and reused by evaluation, inference, ``medfusion.load_encoder`` and exported encoders.
    Before :meth:`fit` the transform is the identity on the values (fill 0).

    Args:
        num_features: ``F``.
        strategy: imputation value per feature, ``"median"`` or ``"mean"`` of the training rows.
        indicators: append the missing indicators.
    """

    fill: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, num_features: int, strategy: str = "median", indicators: bool = True) -> None:
        super().__init__()
        if int(num_features) <= 0:
            raise ValueError(f"TabularPreprocessing: num_features must be positive, got {num_features}.")
        if strategy not in IMPUTE_STRATEGIES:
            raise ValueError(f"TabularPreprocessing: strategy must be one of {IMPUTE_STRATEGIES}, got {strategy!r}.")
        self.num_features = int(num_features)
        self.strategy = strategy
        self.indicators = bool(indicators)
        self.register_buffer("fill", torch.zeros(self.num_features))
        self.register_buffer("center", torch.zeros(self.num_features))
        self.register_buffer("scale", torch.ones(self.num_features))
        self.register_buffer("fitted", torch.tensor(False))
        self._warned = False

    @property
    def out_features(self) -> int:
        """Output width: ``2F`` with indicators, else ``F``."""
        return self.num_features * (2 if self.indicators else 1)

    def fit(self, values: np.ndarray | Sequence[Sequence[float]]) -> TabularPreprocessing:
        """Fit fill values, centre and scale on training rows ``[N, F]`` (NaN = not measured).

        Uses scikit-learn's ``SimpleImputer`` and ``StandardScaler`` (on the imputed values, as a
        ``Pipeline([imputer, scaler])`` would); the statistics are copied into buffers so they travel with the
        model (a pickled scikit-learn object would not load with ``torch.load(weights_only=True)`` nor trace).
        A feature never measured in training gets fill 0, centre 0, scale 1; a constant one scale 1.

        Raises:
            ValueError: ``values`` is not ``[N, F]`` with ``N >= 1``, or holds an infinite value.
        """
        from sklearn.impute import SimpleImputer
        from sklearn.preprocessing import StandardScaler

        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.num_features or x.shape[0] < 1:
            raise ValueError(
                f"TabularPreprocessing.fit: expected rows [N >= 1, {self.num_features}], got shape {list(x.shape)}."
            )
        if np.isinf(x).any():
            raise ValueError("TabularPreprocessing.fit: the training rows hold an infinite value.")
        imputer = SimpleImputer(strategy=self.strategy, keep_empty_features=True)
        filled = imputer.fit_transform(x)
        never = np.isnan(x).all(axis=0)
        fill = np.where(never, 0.0, imputer.statistics_)
        filled[:, never] = 0.0
        scaler = StandardScaler().fit(filled)
        scale = np.where((scaler.scale_ > 0) & ~never, scaler.scale_, 1.0)
        center = np.where(never, 0.0, scaler.mean_)
        self.fill.copy_(torch.as_tensor(fill, dtype=self.fill.dtype))
        self.center.copy_(torch.as_tensor(center, dtype=self.center.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.fitted.fill_(True)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F]`` (NaN = missing) -> ``[B, 2F]`` (standardised values, indicators) or ``[B, F]``."""
        if not torch.jit.is_tracing():
            if x.dim() != 2 or x.shape[1] != self.num_features:
                raise ValueError(f"TabularPreprocessing: expected [B, {self.num_features}], got {list(x.shape)}.")
            if self.training and not self._warned and not bool(self.fitted):
                logger.warning(
                    "TabularPreprocessing used in training before fit(): raw values are not imputed from training "
                    "statistics nor standardised (call medfusion.encoders.tabular.fit_tabular_preprocessing)."
                )
                self._warned = True
        miss = torch.isnan(x)
        z = (torch.where(miss, self.fill.to(x.dtype).expand_as(x), x) - self.center) / self.scale
        return torch.cat([z, miss.to(z.dtype)], dim=1) if self.indicators else z


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
            ValueError: the flattened size is not ``in_features``, or the input holds NaN.
        """
        x = x.flatten(1)
        if not torch.jit.is_tracing():
            if x.shape[1] != self.in_features:
                raise ValueError(f"MLPEncoder: flattened input has {x.shape[1]} features, expected {self.in_features}.")
            if bool(torch.isnan(x).any()):
                raise ValueError(
                    "MLPEncoder: the input holds NaN (features not measured); use the 'tabular' encoder, which "
                    "imputes them from training statistics and adds missing indicators."
                )
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


class TabularEncoder(Encoder):
    """Sparse tabular features in raw units -> :class:`TabularPreprocessing` -> :class:`MLPEncoder`.

    Args:
        in_features: number of feature columns ``F``.
        hidden: hidden layer sizes of the MLP.
        out_dim: size of ``pooled``.
        dropout: dropout after every hidden layer.
        impute: ``"median"`` or ``"mean"`` imputation.
        missing_indicators: feed the 0/1 missing indicators to the MLP too (input width ``2F``).

    Returns (forward):
        ``EncoderOutput(pooled [B, out_dim], ())`` for ``x`` ``[B, F]`` with NaN for missing features.
    """

    input_kind = "tabular"

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64,),
        out_dim: int = 64,
        dropout: float = 0.0,
        impute: str = "median",
        missing_indicators: bool = True,
    ) -> None:
        super().__init__()
        self.preprocess = TabularPreprocessing(in_features, impute, missing_indicators)
        self.mlp = MLPEncoder(self.preprocess.out_features, hidden, out_dim, dropout)
        self.in_features = int(in_features)
        self.out_dim = self.mlp.out_dim
        self.feature_info = []

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode ``x`` ``[B, F]`` (NaN = not measured)."""
        return self.mlp(self.preprocess(x))

    def example_input(self, batch_size: int = 2, size: int = 16) -> torch.Tensor:
        """Random ``[B, in_features]`` with one missing feature (``size`` is unused)."""
        x = torch.randn(batch_size, self.in_features)
        x[0, 0] = float("nan")
        return x


def _encoders(model: nn.Module) -> Mapping[str, nn.Module] | nn.ModuleDict:
    inner = getattr(model, "module", model)  # DDP / OutputsWrapper
    inner = getattr(inner, "module", inner)
    encoders = getattr(inner, "encoders", None)
    if not isinstance(encoders, Mapping | nn.ModuleDict):
        raise TypeError(f"fit_tabular_preprocessing: {type(model).__name__} has no 'encoders' mapping.")
    return encoders


def fit_tabular_preprocessing(model: nn.Module, datalist: Iterable[Mapping[str, Any]]) -> nn.Module:
    """Fit every ``tabular`` encoder's :class:`TabularPreprocessing` on a (training) datalist; return ``model``.

    The rows of modality ``m`` are the entries whose ``m`` value is a list of numbers (NaN = not measured);
    entries where ``m`` is missing (``None``) are skipped.

    Args:
        model: a model with ``encoders`` (``Classifier``; DDP-wrapped is fine).
        datalist: training entries (e.g. ``split["train"]`` of the clinical bundle).

    Raises:
        ValueError: a value of a tabular modality does not have the encoder's ``in_features`` numbers.
    """
    entries = list(datalist)
    for m, enc in _encoders(model).items():
        if not isinstance(enc, TabularEncoder):
            continue
        rows = [e[m] for e in entries if e.get(m) is not None]
        if not rows:
            logger.warning("fit_tabular_preprocessing: no training row has modality %r; left unfitted.", m)
            continue
        bad = [str(e.get("case_id", "?")) for e in entries if e.get(m) is not None and len(e[m]) != enc.in_features]
        if bad:
            raise ValueError(
                f"fit_tabular_preprocessing: modality {m!r} has {enc.in_features} features in the model but a "
                f"different number in row(s) {bad[:5]}."
            )
        enc.preprocess.fit(np.asarray(rows, dtype=np.float64))
        logger.info("fit_tabular_preprocessing: %r fitted on %d training rows.", m, len(rows))
    return model


@register_encoder("tabular")
def tabular(**kwargs: object) -> TabularEncoder:
    """Factory: ``create_encoder("tabular", in_features=8, hidden=[64], out_dim=64)``."""
    return TabularEncoder(**kwargs)  # type: ignore[arg-type]


@register_encoder("mlp")
def mlp(**kwargs: object) -> MLPEncoder:
    """Factory: ``create_encoder("mlp", in_features=76, hidden=[64], out_dim=64)``."""
    return MLPEncoder(**kwargs)  # type: ignore[arg-type]


@register_encoder("gru")
def gru(**kwargs: object) -> GRUEncoder:
    """Factory: ``create_encoder("gru", in_features=76, hidden=64)``."""
    return GRUEncoder(**kwargs)  # type: ignore[arg-type]
