"""Missing-modality 3D segmenter: per-modality UNet encoder, imputed + concatenated skips, UNet decoder.

The network follows MetaKD (docs/method_spec.md section 1): one encoder (shared weights by
default) applied to each 1-channel modality, features of missing modalities imputed at every
level from the present ones (mean, paper Eq. 2; ``impute="zero"`` option;
``impute_levels="bottleneck"`` reproduces the reference code, where skip features of a missing
modality are the encoder's output on a zero image), the M modalities' features concatenated in
modality order and decoded by a UNet decoder to 3 logits [TC, WT, ET] (sigmoid outputs, MONAI's
BraTS order).

The network holds no training logic: MetaKD's importance weights live in the method
(:mod:`medfusion.fusion.metakd`); the network only accepts ``modality_weights`` to scale the
bottleneck features (the meta step uses it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from medfusion.encoders.base import fast_instance_norm
from medfusion.encoders.unet3d import UNet3DEncoder
from medfusion.fusion.base import FusionOutput
from medfusion.modality import BRATS_MODALITIES, check_mask, validate_modalities

__all__ = ["Segmenter", "build_decoder", "impute_features"]


def impute_features(feats: torch.Tensor, mask: torch.Tensor, impute: str) -> torch.Tensor:
    """Replace missing modalities' features by the mean of the present ones (or zeros).

    Implements MetaKD Eq. 2: ``f_m = (1/|P|) * sum_{p in P} f_p`` for ``m`` not in the present set
    ``P``.

    Args:
        feats: ``[B, M, C, *spatial]`` per-modality features.
        mask: bool ``[B, M]``.
        impute: ``"mean"`` or ``"zero"``.

    Returns:
        ``[B, M, C, *spatial]`` with missing entries replaced.
    """
    m = mask.to(feats.dtype).view(*mask.shape, *([1] * (feats.ndim - 2)))
    if impute == "zero":
        return feats * m
    count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (feats * m).sum(dim=1, keepdim=True) / count
    return torch.where(m.bool(), feats, mean.expand_as(feats))


def build_decoder(
    channels: Sequence[int], width: int, out_channels: int, norm: str, subunits: int, first_stride: int
) -> tuple[nn.ModuleList, nn.ModuleList, nn.Module]:
    """UNet decoder layers of :class:`Segmenter` for ``width`` feature maps of ``C_l`` channels per level.

    Per level a transposed-conv up-sampling and a residual unit over the concat with the skip
    (``width * C_l`` channels); a head back to full resolution.

    Returns:
        ``(ups, blocks, head)`` as used by :meth:`Segmenter.decode`.
    """
    ups, blocks = [], []
    prev = width * channels[-1]
    for c in reversed(channels[:-1]):
        ups.append(Convolution(3, prev, c, strides=2, kernel_size=3, norm=norm, is_transposed=True))
        blocks.append(ResidualUnit(3, c + width * c, c, strides=1, subunits=subunits, norm=norm))
        prev = c
    if first_stride == 2:
        # back to full resolution straight into the output channels, as MONAI's UNet does
        head = Convolution(3, prev, out_channels, strides=2, kernel_size=3, is_transposed=True, conv_only=True)
    else:
        head = Convolution(3, prev, out_channels, kernel_size=1, conv_only=True)
    return fast_instance_norm(nn.ModuleList(ups)), fast_instance_norm(nn.ModuleList(blocks)), head


class Segmenter(nn.Module):
    """Missing-modality segmentation network.

    Args:
        modalities: ordered modality names; channel ``i`` of ``image`` is ``modalities[i]``.
        channels: encoder channels per level (shallow to deep, last = bottleneck).
        out_channels: output channels (3: [TC, WT, ET]).
        shared_encoder: one encoder for all modalities (folded into the batch) or one per modality.
        impute: ``"mean"`` (paper Eq. 2) or ``"zero"``.
        impute_levels: ``"all"`` (medfusion default) or ``"bottleneck"`` (reference code).
        norm: MONAI norm name for encoder and decoder.
        dropout: dropout probability in the residual units.
        subunits: convolutions per residual unit.
        first_stride: stride of the encoder's first level (2 = MONAI ``UNet`` style, no full-resolution
            convolution except the final transposed one; 1 = full-resolution first level).
        decoder_width: feature maps of ``C_l`` channels the decoder reads per level (default ``M``: the
            concatenated modalities; the segmentation heads in ``medfusion/fusion/seg_*.py`` use 1 or 2).

    Inputs (forward):
        image: ``[B, M, D, H, W]`` (channels in ``modalities`` order) or ``{name: [B, 1, D, H, W]}``;
            spatial sizes divisible by :attr:`divisor`.
        modality_mask: bool ``[B, M]`` (default: all present). The content of absent channels is
            ignored (they are zeroed before encoding).

    Returns (forward):
        logits ``[B, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        modalities: Sequence[str] = BRATS_MODALITIES,
        channels: Sequence[int] = (16, 32, 64, 128),
        out_channels: int = 3,
        shared_encoder: bool = True,
        impute: str = "mean",
        impute_levels: str = "all",
        norm: str = "instance",
        dropout: float = 0.0,
        subunits: int = 2,
        first_stride: int = 2,
        decoder_width: int | None = None,
    ) -> None:
        super().__init__()
        self.modalities = validate_modalities(modalities)
        if impute not in ("mean", "zero"):
            raise ValueError(f"Segmenter: impute must be 'mean' or 'zero', got {impute!r}.")
        if impute_levels not in ("all", "bottleneck"):
            raise ValueError(f"Segmenter: impute_levels must be 'all' or 'bottleneck', got {impute_levels!r}.")
        self.impute = impute
        self.impute_levels = impute_levels
        self.shared_encoder = bool(shared_encoder)
        self.channels = tuple(int(c) for c in channels)
        self.out_channels = out_channels
        n_mod = len(self.modalities)
        enc_kw = {
            "in_channels": 1,
            "channels": self.channels,
            "norm": norm,
            "dropout": dropout,
            "subunits": subunits,
            "first_stride": first_stride,
        }
        self.first_stride = int(first_stride)
        if self.shared_encoder:
            self.encoder: nn.Module = UNet3DEncoder(**enc_kw)
        else:
            self.encoder = nn.ModuleDict({m: UNet3DEncoder(**enc_kw) for m in self.modalities})
        width = n_mod if decoder_width is None else int(decoder_width)
        self.ups, self.blocks, self.head = build_decoder(
            self.channels, width, out_channels, norm, subunits, first_stride
        )

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return self.first_stride * 2 ** (len(self.channels) - 1)

    # ------------------------------------------------------------------ inputs
    def stack_inputs(self, image: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-modality dict ``{name: [B, 1, ...]}`` -> ``[B, M, ...]``; tensors pass through (shape-checked)."""
        if isinstance(image, Mapping):
            absent = [m for m in self.modalities if m not in image]
            if absent:
                raise KeyError(f"Segmenter: inputs lack modalities {absent}; expected keys {list(self.modalities)}.")
            return torch.cat([image[m] for m in self.modalities], dim=1)
        if image.ndim != 5 or image.shape[1] != len(self.modalities):
            raise ValueError(
                f"Segmenter: image must be [B, {len(self.modalities)}, D, H, W] with channels {list(self.modalities)}, "
                f"got {list(image.shape)}."
            )
        return image

    def _mask(self, image: torch.Tensor, modality_mask: torch.Tensor | None) -> torch.Tensor:
        if modality_mask is None:
            return torch.ones(image.shape[0], len(self.modalities), dtype=torch.bool, device=image.device)
        mask = modality_mask.to(image.device)
        if mask.ndim == 1:
            mask = mask.unsqueeze(0)
        if mask.shape[0] != image.shape[0] and mask.shape[0] == 1:
            # sliding-window inference batches several windows of one case: one mask for all.
            mask = mask.expand(image.shape[0], -1)
        return check_mask(mask, len(self.modalities))

    # ------------------------------------------------------------------ stages
    def encode(self, image: torch.Tensor, modality_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Encode every modality once.

        Args:
            image: ``[B, M, D, H, W]``.
            modality_mask: bool ``[B, M]``; absent channels are zeroed first, so their features are
                the encoder's output on a zero image whatever the input held. ``None`` encodes all.

        Returns:
            One tensor per level, ``[B, M, C_l, D_l, H_l, W_l]``.
        """
        if modality_mask is not None:
            image = image * modality_mask.to(image.dtype)[:, :, None, None, None]
        b, n_mod = image.shape[:2]
        if self.shared_encoder:
            out = self.encoder(image.reshape(b * n_mod, 1, *image.shape[2:]))
            return [f.reshape(b, n_mod, *f.shape[1:]) for f in out.maps]
        per_mod = [self.encoder[m](image[:, i : i + 1]).maps for i, m in enumerate(self.modalities)]
        return [torch.stack([p[level] for p in per_mod], dim=1) for level in range(len(self.channels))]

    def fuse(
        self,
        feats: Sequence[torch.Tensor],
        modality_mask: torch.Tensor,
        modality_weights: torch.Tensor | None = None,
        zero_feats: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Impute missing modalities and concatenate along channels, per level.

        Args:
            feats: output of :meth:`encode`.
            modality_mask: bool ``[B, M]``.
            modality_weights: optional ``[M]`` or ``[B, M]`` factors for the bottleneck features
                (MetaKD's meta step scales them by ``M * softmax(w)``).
            zero_feats: encoder outputs on a zero image (``[1 or B, M, C_l, ...]`` per level), used for
                the non-imputed levels when ``impute_levels="bottleneck"`` and ``feats`` were
                computed with the modality present (cached all-combination evaluation).

        Returns:
            One tensor per level, ``[B, M*C_l, D_l, H_l, W_l]``.
        """
        fused = []
        last = len(feats) - 1
        for level, f in enumerate(feats):
            if self.impute_levels == "all" or level == last:
                f = impute_features(f, modality_mask, self.impute)
            elif zero_feats is not None:
                m = modality_mask.view(*modality_mask.shape, *([1] * (f.ndim - 2)))
                f = torch.where(m, f, zero_feats[level].expand_as(f))
            if level == last and modality_weights is not None:
                w = modality_weights if modality_weights.ndim == 2 else modality_weights.unsqueeze(0)
                f = f * w.to(f.dtype).view(*w.shape, *([1] * (f.ndim - 2)))
            fused.append(f.flatten(1, 2))
        return fused

    def decode(self, fused: Sequence[torch.Tensor]) -> torch.Tensor:
        """UNet decoder over fused levels -> logits ``[B, out_channels, D, H, W]``."""
        x = fused[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(fused[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    # ------------------------------------------------------------------ public
    def forward_outputs(
        self,
        image: torch.Tensor | Mapping[str, torch.Tensor],
        modality_mask: torch.Tensor | None = None,
        modality_weights: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Full output for training.

        Returns:
            ``FusionOutput`` with ``logits`` ``[B, out, D, H, W]``, ``embeddings`` ``{name: bottleneck
            after imputation [B, C, d, h, w]}`` and ``aux["modality_features"]``: the raw
            (pre-imputation) bottleneck features ``[B, M, C, d, h, w]`` used by MetaKD's KD loss.
        """
        x = self.stack_inputs(image)
        mask = self._mask(x, modality_mask)
        feats = self.encode(x, mask)
        fused = self.fuse(feats, mask, modality_weights)
        logits = self.decode(fused)
        bottleneck = fused[-1].view_as(feats[-1])
        emb = {m: bottleneck[:, i] for i, m in enumerate(self.modalities)}
        return FusionOutput(logits, emb, {"modality_features": feats[-1]})

    def forward(
        self, image: torch.Tensor | Mapping[str, torch.Tensor], modality_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[B, out_channels, D, H, W]`` (mask defaults to all present)."""
        x = self.stack_inputs(image)
        mask = self._mask(x, modality_mask)
        return self.decode(self.fuse(self.encode(x, mask), mask))

    def predict_combinations(
        self, image: torch.Tensor, combination_masks: torch.Tensor, modality_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits for several modality combinations, encoding each modality ONCE.

        Args:
            image: ``[B, M, D, H, W]``.
            combination_masks: bool ``[C, M]``, one row per combination.
            modality_mask: bool ``[B, M]`` availability of the case (default all); each combination
                is intersected with it.

        Returns:
            ``[B, C * out_channels, D, H, W]``: channels ``[c*out:(c+1)*out]`` are combination ``c``
            (a layout ``sliding_window_inference`` can stitch).
        """
        x = self.stack_inputs(image)
        avail = self._mask(x, modality_mask)
        feats = self.encode(x, avail)
        zero_feats = None
        if self.impute_levels == "bottleneck":
            zero_feats = self.encode(torch.zeros_like(x[:1]))
        outs = []
        for combo in combination_masks.to(x.device).bool():
            mask = avail & combo.unsqueeze(0)
            outs.append(self.decode(self.fuse(feats, mask, zero_feats=zero_feats)))
        return torch.cat(outs, dim=1)
