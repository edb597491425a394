"""Test-time modality noise of the QMF protocol (benchmark B2), applied to COLLATED batches.

With probability ``p`` (0.5) per sample and per present modality, the modality is corrupted with strength
``epsilon`` (``{0, 5, 10}`` in the protocol); which (sample, modality) pairs were corrupted is returned as a
bool ``[B, M]`` mask so that evaluations can split results by noise. By modality kind
(see :data:`medfusion.data.clinical.MODALITY_KINDS`):

========  ===================================================================================================
kind      corruption of strength ``epsilon``
========  ===================================================================================================
image     additive Gaussian, std ``image_std_per_eps * epsilon`` in the image's units; the default
          ``10 / 255`` is "std = 10 * epsilon in 0-255 units" for images scaled to [0, 1] (as
          :func:`~medfusion.data.clinical.clinical_transforms` does); clipped to [0, 1] by default
volume    as image, without clipping (z-scored volumes)
text      each real token (attention 1, not a special token) of ``[2, L]`` (ids, attention) is replaced
          by ``mask_token_id`` (``[MASK]`` of the MiniLM/BERT vocabulary, 103) with probability
          ``min(1, text_prob_per_eps * epsilon)`` (default 0.1: ``epsilon = 10`` blanks every token)
ehr       additive Gaussian, std ``ehr_std_per_eps * epsilon`` on the continuous value columns of the
          ``[T, 76]`` tensor (standardised when the data layer used an EHR normaliser); categorical
          one-hot and observation-mask columns are left untouched
tabular   additive Gaussian, std ``ehr_std_per_eps * epsilon`` on every feature
========  ===================================================================================================

This is a batch-level function (not a MapTransform): the benchmark holds the whole cached test set as
stacked tensors and draws the noise per evaluation from a seeded ``torch.Generator``, so one draw is
reproducible from ``(seed, epsilon)`` alone and independent of batch order. Absent modalities
(``modality_mask`` False) are never corrupted and stay exactly zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from medfusion.data.ehr import EHR_CONTINUOUS_COLUMNS, EHR_NUM_FEATURES
from medfusion.modality import Keys, validate_modalities

__all__ = ["NOISE_KINDS", "DEFAULT_SPECIAL_TOKEN_IDS", "MASK_TOKEN_ID", "add_modality_noise"]

NOISE_KINDS = ("image", "volume", "text", "ehr", "tabular")
MASK_TOKEN_ID = 103
"""``[MASK]`` in the (uncased BERT) vocabulary of the bundled all-MiniLM-L6-v2 tokenizer."""
DEFAULT_SPECIAL_TOKEN_IDS: tuple[int, ...] = (0, 100, 101, 102, 103)
"""``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]`` of that vocabulary: never replaced."""


def _check(kinds: Mapping[str, str], epsilon: float, p: float) -> None:
    bad = {k: v for k, v in kinds.items() if v not in NOISE_KINDS}
    if bad:
        raise ValueError(f"add_modality_noise: unknown modality kind(s) {bad}; expected one of {NOISE_KINDS}.")
    if not epsilon >= 0:
        raise ValueError(f"add_modality_noise: epsilon must be >= 0, got {epsilon!r}.")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"add_modality_noise: p must be in [0, 1], got {p!r}.")


def add_modality_noise(
    batch: Mapping[str, Any],
    kinds: Mapping[str, str],
    epsilon: float,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    modalities: Sequence[str] | None = None,
    image_std_per_eps: float = 10.0 / 255.0,
    ehr_std_per_eps: float = 0.1,
    text_prob_per_eps: float = 0.1,
    mask_token_id: int = MASK_TOKEN_ID,
    special_token_ids: Sequence[int] = DEFAULT_SPECIAL_TOKEN_IDS,
    clip_image: bool = True,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Corrupt a random half (``p``) of the (sample, modality) pairs of a collated batch.

    Args:
        batch: collated batch with one tensor per modality (``[B, ...]``) and ``modality_mask`` bool ``[B, M]``
            in ``modalities`` order (without a mask every modality counts as present).
        kinds: ``{modality: kind}`` for the modalities to corrupt, kind in :data:`NOISE_KINDS`.
        epsilon: noise strength (0 = the batch is returned unchanged, and no pair is reported noisy).
        p: probability that a present (sample, modality) pair is corrupted.
        generator: CPU ``torch.Generator`` for every draw (reproducible noise); ``None`` = global RNG.
        modalities: order of the mask columns (default: the keys of ``kinds``).
        image_std_per_eps: image/volume Gaussian std per unit of epsilon (10/255: images in [0, 1]).
        ehr_std_per_eps: EHR/tabular Gaussian std per unit of epsilon (standardised units).
        text_prob_per_eps: token replacement probability per unit of epsilon (capped at 1).
        mask_token_id: id written in place of a replaced token.
        special_token_ids: ids never replaced (padding, CLS/SEP, ...).
        clip_image: clip corrupted ``image`` kinds to [0, 1].

    Returns:
        ``(new batch, noisy)``: a shallow copy of ``batch`` whose corrupted modality tensors are new
        tensors (the input is not modified), and bool ``[B, M]`` (``modalities`` order, True = corrupted).

    Raises:
        ValueError: unknown kinds, negative epsilon, ``p`` outside [0, 1], a modality of ``kinds`` not in
            ``modalities``/the batch, a mask of the wrong shape, an EHR tensor whose last dim is not 76, a text
            tensor that is not ``[B, 2, L]``.
    """
    _check(kinds, epsilon, p)
    mods = validate_modalities(modalities if modalities is not None else list(kinds), field="modalities")
    unknown = [m for m in kinds if m not in mods]
    if unknown:
        raise ValueError(f"add_modality_noise: kinds name modalities {unknown} that are not in {list(mods)}.")
    absent = [m for m in kinds if m not in batch]
    if absent:
        raise ValueError(f"add_modality_noise: batch has no key for modalities {absent}; keys: {sorted(batch)}.")
    b = int(batch[next(iter(kinds))].shape[0]) if kinds else 0
    present = batch.get(Keys.MASK)
    present = torch.ones(b, len(mods), dtype=torch.bool) if present is None else torch.as_tensor(present).bool()
    if present.shape != (b, len(mods)):
        raise ValueError(
            f"add_modality_noise: modality_mask has shape {list(present.shape)}, expected [{b}, {len(mods)}]."
        )
    out = dict(batch)
    noisy = torch.zeros(b, len(mods), dtype=torch.bool)
    if epsilon == 0 or p == 0 or b == 0:
        return out, noisy
    for j, m in enumerate(mods):
        if m not in kinds:
            continue
        draw = torch.rand(b, generator=generator) < p
        rows = draw & present[:, j].cpu()
        noisy[:, j] = rows
        if not bool(rows.any()):
            continue
        x = batch[m]
        kind = kinds[m]
        sel = rows.to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        if kind in ("image", "volume"):
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * (image_std_per_eps * epsilon)
            y = x + noise
            if kind == "image" and clip_image:
                y = y.clamp(0.0, 1.0)
            out[m] = torch.where(sel, y, x)
        elif kind in ("ehr", "tabular"):
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype) * (ehr_std_per_eps * epsilon)
            if kind == "ehr":
                if x.shape[-1] != EHR_NUM_FEATURES:
                    raise ValueError(
                        f"add_modality_noise: EHR modality {m!r} has last dim {x.shape[-1]}, expected "
                        f"{EHR_NUM_FEATURES} ([B, T, {EHR_NUM_FEATURES}])."
                    )
                cols = torch.zeros(EHR_NUM_FEATURES, dtype=x.dtype, device=x.device)
                cols[list(EHR_CONTINUOUS_COLUMNS)] = 1.0
                noise = noise * cols
            out[m] = torch.where(sel, x + noise, x)
        else:  # text
            if x.ndim != 3 or x.shape[1] != 2:
                raise ValueError(
                    f"add_modality_noise: text modality {m!r} must be [B, 2, L] (ids, attention), got {list(x.shape)}."
                )
            ids, att = x[:, 0], x[:, 1]
            prob = min(1.0, text_prob_per_eps * epsilon)
            replace = (torch.rand(ids.shape, generator=generator) < prob).to(ids.device)
            special = torch.isin(ids, torch.as_tensor(list(special_token_ids), dtype=ids.dtype, device=ids.device))
            replace = replace & (att > 0) & ~special & rows.to(ids.device).unsqueeze(1)
            new_ids = torch.where(replace, torch.full_like(ids, int(mask_token_id)), ids)
            out[m] = torch.stack([new_ids, att], dim=1)
    return out, noisy
