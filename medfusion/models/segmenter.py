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
from typing import cast

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn
from torch.nn import functional as F

from medfusion.encoders.base import fast_instance_norm
from medfusion.encoders.unet3d import UNet3DEncoder
from medfusion.fusion.base import FusionOutput, impute_features
from medfusion.modality import BRATS_MODALITIES, check_mask, validate_modalities

__all__ = ["DEFAULT_MEMORY_BUDGET_GB", "Segmenter", "build_decoder"]

DEFAULT_MEMORY_BUDGET_GB = 1.0
"""Activation memory the batched all-combination decoder uses at once (:meth:`Segmenter.decode_combinations`)."""


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


def _unit_layers(block: nn.Module) -> tuple[Convolution, nn.Conv3d]:
    """First convolution and residual projection of a decoder ``ResidualUnit`` (layout checked by ``_batchable``)."""
    unit = cast(ResidualUnit, block)
    return cast(Convolution, unit.conv[0]), cast(nn.Conv3d, unit.residual)


def _leading_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv`` restricted to its first ``x.shape[1]`` input channels (with its bias)."""
    weight = conv.weight[:, : x.shape[1]]
    return F.conv3d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)


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
            concatenated modalities; the segmentation heads in ``medfusion/models/seg_*.py`` use 1 or 2).

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

        def new_encoder() -> UNet3DEncoder:
            return UNet3DEncoder(
                in_channels=1,
                channels=self.channels,
                norm=norm,
                dropout=dropout,
                subunits=subunits,
                first_stride=first_stride,
            )

        self.first_stride = int(first_stride)
        self.encoder: UNet3DEncoder | nn.ModuleDict
        if self.shared_encoder:
            self.encoder = new_encoder()
        else:
            self.encoder = nn.ModuleDict({m: new_encoder() for m in self.modalities})
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
        encoders = cast(nn.ModuleDict, self.encoder)  # one encoder per modality
        per_mod = [encoders[m](image[:, i : i + 1]).maps for i, m in enumerate(self.modalities)]
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
        self,
        image: torch.Tensor,
        combination_masks: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        batch_combinations: bool = True,
        memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
    ) -> torch.Tensor:
        """Logits for several modality combinations, encoding each modality ONCE.

        Args:
            image: ``[B, M, D, H, W]``.
            combination_masks: bool ``[C, M]``, one row per combination.
            modality_mask: bool ``[B, M]`` availability of the case (default all); each combination
                is intersected with it.
            batch_combinations: decode the combinations together (:meth:`decode_combinations`: the
                linear layers that read the fused features run once per (modality, slot) pair and are
                mixed per combination, the rest of the decoder runs with the combinations folded into
                the batch) instead of one :meth:`decode` per combination. Same logits up to float
                rounding.
            memory_budget_gb: activation memory the batched decoder may use at once; the combinations
                are decoded in chunks that fit (at least one combination per chunk).

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
        combos = combination_masks.to(x.device).bool()
        if batch_combinations and self._batchable():
            if bool((avail == avail[:1]).all()):
                return self.decode_combinations(feats, combos & avail[:1], zero_feats, memory_budget_gb)
            # windows with different availability (never within one case): one row at a time
            rows = [
                self.decode_combinations(
                    [f[b : b + 1] for f in feats], combos & avail[b : b + 1], zero_feats, memory_budget_gb
                )
                for b in range(x.shape[0])
            ]
            return torch.cat(rows, dim=0)
        outs = []
        for combo in combos:
            mask = avail & combo.unsqueeze(0)
            outs.append(self.decode(self.fuse(feats, mask, zero_feats=zero_feats)))
        return torch.cat(outs, dim=1)

    # ------------------------------------------------------- batched decoding
    def _batchable(self) -> bool:
        """The decoder has the layout :meth:`decode_combinations` splits (one ``C_l``-channel slot per modality)."""
        if cast(nn.ConvTranspose3d, self.ups[0].conv).in_channels != len(self.modalities) * self.channels[-1]:
            return False
        for up, block in zip(self.ups, self.blocks):
            if not isinstance(up, Convolution) or not isinstance(up.conv, nn.ConvTranspose3d):
                return False
            if not isinstance(block, ResidualUnit) or not isinstance(block.residual, nn.Conv3d):
                return False
            first = block.conv[0]
            if not isinstance(first, Convolution) or not isinstance(first.conv, nn.Conv3d) or first.conv.groups != 1:
                return False
        return True

    def _level_coefficients(
        self, masks: torch.Tensor, level: int, dtype: torch.dtype, zero_feats: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """How each fused slot of ``level`` is made from the per-modality features, per combination.

        Args:
            masks: bool ``[C, M]`` effective combinations.
            level: encoder level.
            dtype: dtype of the coefficients.
            zero_feats: zero-image features are given (``impute_levels="bottleneck"``).

        Returns:
            ``(coef [C, M(slot), M(source)], zero_coef [C, M] or None)``: slot ``m`` of combination
            ``c`` is ``sum_s coef[c, m, s] * f_s + zero_coef[c, m] * z_m`` (what :meth:`fuse` builds).
        """
        n_mod = masks.shape[1]
        m = masks.to(dtype)
        eye = torch.eye(n_mod, dtype=dtype, device=masks.device)
        keep = m[:, :, None] * eye  # present slots keep their own features
        if self.impute_levels == "all" or level == len(self.channels) - 1:
            if self.impute == "zero":
                return keep, None
            mean = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # [C, M(source)]
            return keep + (1.0 - m)[:, :, None] * mean[:, None, :], None
        if zero_feats:
            return keep, 1.0 - m
        return eye.expand(masks.shape[0], -1, -1), None  # raw features, as fuse() without zero_feats

    @staticmethod
    def _mixed_linear(
        weight: torch.Tensor,
        transposed: bool,
        conv_kw: dict,
        feats: torch.Tensor,
        coef: torch.Tensor,
        zero: torch.Tensor | None = None,
        zero_coef: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A convolution over fused slots, for every combination, from per-(slot, source) convolutions.

        ``conv(concat_m slot_m) = sum_m W_m * slot_m`` and each slot is a linear mix of the sources,
        so the layer runs once per used (slot, source) pair and is mixed per combination with one
        matrix product.

        Args:
            weight: the slots' part of the layer weight, ``[Cout, M*Cl, k...]`` (``[M*Cl, Cout, k...]``
                when ``transposed``), no bias.
            transposed: transposed convolution.
            conv_kw: stride / padding (/ output_padding) / dilation of the layer.
            feats: ``[B, M, Cl, *spatial]`` sources.
            coef: ``[C, M(slot), M(source)]``.
            zero: optional ``[1, M, Cl, *spatial]`` zero-image features (slot ``m`` only).
            zero_coef: ``[C, M]`` their coefficients.

        Returns:
            ``[C, B, Cout, *spatial_out]``.
        """
        b, n_mod, c_in = feats.shape[:3]
        c_out = weight.shape[1] if transposed else weight.shape[0]
        if transposed:
            per_slot = weight.reshape(n_mod, c_in, *weight.shape[1:])  # [M, Cl, Cout, k...]
        else:
            per_slot = weight.reshape(c_out, n_mod, c_in, *weight.shape[2:]).transpose(0, 1)  # [M, Cout, Cl, k...]
        conv = F.conv_transpose3d if transposed else F.conv3d

        def grouped(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
            # slot m reads source m only: one grouped convolution -> [B', M(slot), N]
            if transposed:
                w = per_slot.reshape(n_mod * c_in, *per_slot.shape[2:])
            else:
                w = per_slot.reshape(n_mod * c_out, *per_slot.shape[2:])
            y = conv(x.flatten(1, 2), w, None, groups=n_mod, **conv_kw)
            return y.reshape(x.shape[0], n_mod, -1), y.shape[2:]

        off_diagonal = coef * (1.0 - torch.eye(n_mod, dtype=coef.dtype, device=coef.device))
        if bool((off_diagonal == 0).all()):
            diag = torch.diagonal(coef, dim1=1, dim2=2)  # [C, M]
            y, spatial = grouped(feats)
            out = torch.matmul(diag, y)  # [B, C, N]
        else:
            # every slot from every source: [B*M(source), Cl] -> [B*M(source), M(slot)*Cout]
            if transposed:
                w = per_slot.permute(1, 0, 2, *range(3, per_slot.ndim)).reshape(c_in, n_mod * c_out, *weight.shape[2:])
            else:
                w = per_slot.reshape(n_mod * c_out, c_in, *weight.shape[2:])
            y = conv(feats.flatten(0, 1), w, None, **conv_kw)
            spatial = y.shape[2:]
            y = y.reshape(b, n_mod * n_mod, -1)  # index source * M + slot
            out = torch.matmul(coef.transpose(1, 2).reshape(coef.shape[0], -1), y)
        if zero is not None and zero_coef is not None:
            yz, _ = grouped(zero)
            out = out + torch.matmul(zero_coef, yz)
        return out.transpose(0, 1).reshape(coef.shape[0], b, c_out, *spatial)

    def decode_combinations(
        self,
        feats: Sequence[torch.Tensor],
        masks: torch.Tensor,
        zero_feats: Sequence[torch.Tensor] | None = None,
        memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
    ) -> torch.Tensor:
        """Decode several combinations of the same windows together (cached evaluation's decoder).

        ``decode(fuse(feats, mask_c, zero_feats=zero_feats))`` for every combination ``c``, computed
        without building any fused tensor: the layers that read fused features (the bottleneck's
        up-convolution, each residual unit's first convolution and residual projection on the skip
        channels) are linear in them, and each fused slot is a linear mix of the per-modality
        features (kept, mean-imputed, zeroed or zero-image features), so these layers run once per
        (slot, modality) pair and are mixed per combination by a matrix product
        (:meth:`_mixed_linear`). The remaining layers run with the combinations folded into the batch
        dimension, in chunks of at most ``memory_budget_gb`` of activations.

        Args:
            feats: :meth:`encode` output, ``[B, M, C_l, ...]`` per level.
            masks: bool ``[C, M]`` effective combinations (already intersected with availability; the
                same for every row of ``feats``).
            zero_feats: zero-image features (``impute_levels="bottleneck"``).
            memory_budget_gb: activation budget per chunk.

        Returns:
            ``[B, C * out_channels, D, H, W]`` (layout of :meth:`predict_combinations`).
        """
        n_comb = masks.shape[0]
        b = feats[0].shape[0]
        dtype = feats[-1].dtype
        last = len(feats) - 1
        coefs = [self._level_coefficients(masks, lv, dtype, zero_feats is not None) for lv in range(len(feats))]

        def zero_of(level: int) -> torch.Tensor | None:
            return None if zero_feats is None else zero_feats[level]

        # up-convolution of the fused bottleneck, every combination
        up0 = cast(nn.ConvTranspose3d, self.ups[0].conv)
        up_kw = {
            "stride": up0.stride,
            "padding": up0.padding,
            "output_padding": up0.output_padding,
            "dilation": up0.dilation,
        }
        coef, zcoef = coefs[last]
        x0 = self._mixed_linear(up0.weight, True, up_kw, feats[last], coef, zero_of(last), zcoef)
        if up0.bias is not None:
            x0 = x0 + up0.bias.view(1, 1, -1, *([1] * (x0.ndim - 3)))
        # skip parts of each residual unit's first convolution and of its residual projection
        skip_parts = []
        for i, block in enumerate(self.blocks):
            level = last - 1 - i
            c_up = self.channels[level]
            parts = []
            first, residual = _unit_layers(block)
            for conv in (cast(nn.Conv3d, first.conv), residual):
                kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
                coef, zcoef = coefs[level]
                parts.append(
                    self._mixed_linear(conv.weight[:, c_up:], False, kw, feats[level], coef, zero_of(level), zcoef)
                )
            skip_parts.append(parts)

        # memory per combination of the chunked part: roughly 6 live maps per decoder level, plus the output
        vox = [f[0, 0, 0].numel() for f in feats]
        full = vox[0] * self.first_stride**3
        per_comb = 4 * b * (6 * sum(c * v for c, v in zip(self.channels, vox)) + self.out_channels * full)
        chunk = max(1, min(n_comb, int(memory_budget_gb * 1024**3 // max(per_comb, 1))))
        outs = []
        for start in range(0, n_comb, chunk):
            sl = slice(start, min(n_comb, start + chunk))
            k = sl.stop - sl.start
            x = cast(nn.Module, self.ups[0].adn)(x0[sl].flatten(0, 1))
            for i, block in enumerate(self.blocks):
                if i > 0:
                    x = self.ups[i](x)
                first, residual = _unit_layers(block)
                rest = cast(ResidualUnit, block).conv[1:]
                conv_part, res_part = skip_parts[i]
                h = cast(nn.Module, first.adn)(
                    _leading_conv(cast(nn.Conv3d, first.conv), x) + conv_part[sl].flatten(0, 1)
                )
                h = rest(h)
                x = h + (_leading_conv(residual, x) + res_part[sl].flatten(0, 1))
            y = self.head(x)  # [k*B, out, D, H, W], combination-major
            outs.append(y.reshape(k, b, *y.shape[1:]).transpose(0, 1).reshape(b, k * y.shape[1], *y.shape[2:]))
        return torch.cat(outs, dim=1)
