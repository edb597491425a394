"""Missing-aware MONAI transforms for datalists from :mod:`medfusion.data.mimic` / :mod:`medfusion.data.manifest`.

Each modality has a *kind* that fixes how its value is loaded and the tensor it becomes:

========  ==============================================  ==============================
kind      value                                           tensor
========  ==============================================  ==============================
ehr       mimic3-benchmarks timeseries CSV                float32 ``[T, 76]``
image     2D PNG/JPG (PIL) or DICOM file (pydicom)        float32 ``[1, S, S]`` in [0, 1]
volume    3D NIfTI (or DICOM series folder)               float32 ``[1, V, V, V]`` z-scored
text      report ``.txt`` path or inline text             int64 ``[2, L]`` (ids, attention)
tabular   list of floats (NaN = feature not measured)      float32 ``[F]`` (NaN kept)
========  ==============================================  ==============================

A modality whose value is ``None`` (a report that is empty, an EHR time series without any measurement in
the window, a tabular row whose every feature is NaN) is missing: its key is kept with a
zero tensor of the same shape (MONAI's collate needs identical keys) and ``modality_mask`` (bool
``[M]`` in the order of ``modalities``) says which are present. Presence is decided from the
values, never from the zeros. Single NaN features of a present tabular modality stay NaN: the ``tabular``
encoder (:class:`medfusion.encoders.tabular.TabularEncoder`) imputes them with statistics fitted on the
training split and adds missing-indicator features.

Usage (the datalist from the dataset's layout, :mod:`medfusion.data.layout`)::

    datalist = detect_layout(dataset_dir).discover(dataset_dir, split="train")  # a MIMIC-style folder
    ds = monai.data.Dataset(datalist, clinical_transforms({"ehr": "ehr", "cxr": "image", "report": "text"}))
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityd,
)
from monai.utils import MAX_SEED

from medfusion.data.ehr import EHR_CHANNELS, EHR_NUM_FEATURES, DiscretizeEHR, ehr_num_steps
from medfusion.data.manifest import MODALITY_KINDS
from medfusion.data.text import TokenizeReport, load_report
from medfusion.modality import Keys, validate_modalities

__all__ = ["MODALITY_KINDS", "LoadModalitiesByKindd", "clinical_transforms"]

_RGB_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")


class _SingleChanneld(MapTransform):
    """Make a channel-first image single-channel: RGB(A) -> luma; any other count > 1 is an error."""

    def __init__(self, keys: KeysCollection, kind: str, allow_rgb: bool) -> None:
        super().__init__(keys)
        self.kind = kind
        self.allow_rgb = allow_rgb

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c == 1:
                continue
            source = getattr(img, "meta", {}).get("filename_or_obj", "<array>")
            if self.allow_rgb and c in (3, 4):
                w = torch.as_tensor(_RGB_WEIGHTS, dtype=img.dtype, device=img.device).view(3, *([1] * (img.ndim - 1)))
                d[key] = (img[:3] * w).sum(dim=0, keepdim=True)
                continue
            raise ValueError(
                f"{self.kind} modality {key!r}: {source} has {c} channels (shape {list(img.shape)}); "
                f"expected a single-channel {'grey or RGB 2D image' if self.allow_rgb else '3D volume'}."
            )
        return d


class LoadModalitiesByKindd(Randomizable, MapTransform):
    """Load every present modality with its kind's sub-pipeline; zero-fill missing ones; write the mask.

    Args:
        modalities: ordered ``{key: kind}``, kind in :data:`MODALITY_KINDS`; the order is the order of
            ``modality_mask``.
        mode: ``"train"`` adds random augmentation (image: affine; volume: flip + intensity
            scale/shift); ``"eval"`` is deterministic.
        image_size: side ``S`` of 2D images.
        volume_size: side ``V`` of 3D volumes.
        ehr_timestep: EHR bin width in hours (1.0 MedFuse, 2.0 OmniFuse).
        ehr_max_hours: EHR window; ``T = ceil(ehr_max_hours / ehr_timestep)``.
        ehr_normalizer: ``None``, a dict from :func:`~medfusion.data.ehr.fit_ehr_normalizer` or its JSON path.
        tokenizer_dir: local tokenizer folder for text (``None``: bundled all-MiniLM-L6-v2).
        max_length: token length ``L``.
        max_words: report word limit before tokenisation.
        tabular_features: ``{key: F}`` for tabular modalities; needed to zero-fill a missing tabular
            modality, and checked against present values.
        mask_key: where the bool ``[M]`` presence mask is written (overwrites any existing value).

    Raises:
        ValueError: unknown kinds or mode (at construction); at call time a missing key, a wrong
            tabular length, or a missing tabular modality whose size is unknown.
    """

    def __init__(
        self,
        modalities: Mapping[str, str],
        mode: str = "eval",
        image_size: int = 64,
        volume_size: int = 32,
        ehr_timestep: float = 2.0,
        ehr_max_hours: float = 48.0,
        ehr_normalizer: Mapping[str, Any] | str | os.PathLike | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        max_length: int = 128,
        max_words: int | None = 150,
        tabular_features: Mapping[str, int] | None = None,
        mask_key: str = Keys.MASK,
    ) -> None:
        names = validate_modalities(list(modalities))
        MapTransform.__init__(self, names)
        bad = {k: v for k, v in modalities.items() if v not in MODALITY_KINDS}
        if bad:
            raise ValueError(
                f"LoadModalitiesByKindd: unknown modality kind(s) {bad}; expected one of {MODALITY_KINDS}."
            )
        if mode not in ("train", "eval"):
            raise ValueError(f"LoadModalitiesByKindd: mode must be 'train' or 'eval', got {mode!r}.")
        self.modalities = dict(modalities)
        self.mode = mode
        self.image_size = int(image_size)
        self.volume_size = int(volume_size)
        self.max_length = int(max_length)
        self.max_words = max_words
        self.mask_key = str(mask_key)
        self.tabular_features = dict(tabular_features or {})
        unknown_tab = [k for k in self.tabular_features if self.modalities.get(k) != "tabular"]
        if unknown_tab:
            raise ValueError(f"LoadModalitiesByKindd: tabular_features names non-tabular modalities {unknown_tab}.")
        self.ehr_steps = ehr_num_steps(ehr_timestep, ehr_max_hours)
        self._ehr = DiscretizeEHR(ehr_timestep, ehr_max_hours, ehr_normalizer)
        self._tokenizer = TokenizeReport(tokenizer_dir, self.max_length)
        self._pipelines: dict[str, Compose] = {}
        for key, kind in self.modalities.items():
            if kind == "image":
                self._pipelines[key] = self._image_pipeline(key)
            elif kind == "volume":
                self._pipelines[key] = self._volume_pipeline(key)

    def _image_pipeline(self, key: str) -> Compose:
        s = self.image_size
        ts: list[Any] = [
            LoadImaged(key, image_only=True),
            EnsureChannelFirstd(key),
            _SingleChanneld(key, "image", allow_rgb=True),
            Resized(key, spatial_size=(s, s)),
            ScaleIntensityd(key, minv=0.0, maxv=1.0),
        ]
        if self.mode == "train":
            ts.append(
                RandAffined(
                    key,
                    prob=0.5,
                    rotate_range=math.pi / 12,
                    scale_range=0.1,
                    translate_range=0.1 * s,
                    padding_mode="zeros",
                )
            )
        ts.append(EnsureTyped(key, dtype=torch.float32, track_meta=False))
        return Compose(ts)

    def _volume_pipeline(self, key: str) -> Compose:
        v = self.volume_size
        ts: list[Any] = [
            LoadImaged(key, image_only=True),
            EnsureChannelFirstd(key),
            _SingleChanneld(key, "volume", allow_rgb=False),
            Resized(key, spatial_size=(v, v, v)),
            NormalizeIntensityd(key, nonzero=True, channel_wise=True),
        ]
        if self.mode == "train":
            ts += [
                RandFlipd(key, prob=0.5, spatial_axis=0),
                RandScaleIntensityd(key, factors=0.1, prob=0.5),
                RandShiftIntensityd(key, offsets=0.1, prob=0.5),
            ]
        ts.append(EnsureTyped(key, dtype=torch.float32, track_meta=False))
        return Compose(ts)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> LoadModalitiesByKindd:
        """Seed this transform and, with derived seeds, every random sub-pipeline."""
        super().set_random_state(seed, state)
        for key in self.modalities:
            if key in self._pipelines:
                self._pipelines[key].set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self

    def randomize(self, data: Any = None) -> None:
        """No own random state to draw (the sub-pipelines draw theirs)."""

    def zeros(self, key: str) -> torch.Tensor:
        """Zero tensor standing in for a missing modality ``key``.

        Raises:
            ValueError: ``key`` is tabular and its size is not in ``tabular_features``.
        """
        kind = self.modalities[key]
        if kind == "ehr":
            return torch.zeros(self.ehr_steps, EHR_NUM_FEATURES)
        if kind == "image":
            return torch.zeros(1, self.image_size, self.image_size)
        if kind == "volume":
            return torch.zeros(1, self.volume_size, self.volume_size, self.volume_size)
        if kind == "text":
            return torch.zeros(2, self.max_length, dtype=torch.long)
        if key not in self.tabular_features:
            raise ValueError(
                f"LoadModalitiesByKindd: tabular modality {key!r} is missing and its feature count is unknown; "
                f"pass tabular_features={{{key!r}: F}}."
            )
        return torch.zeros(self.tabular_features[key])

    def _load(self, key: str, value: Any, data: Mapping[Hashable, Any]) -> torch.Tensor | None:
        kind = self.modalities[key]
        if kind == "ehr":
            steps = self._ehr(value)
            # the last 17 features are the measurement masks: no measurement in the window = absent EHR
            return steps if bool(steps[:, -len(EHR_CHANNELS) :].any()) else None
        if kind == "text":
            text = load_report(value, extract=True, max_words=self.max_words)
            return None if text is None else self._tokenizer(text)
        if kind == "tabular":
            try:
                t = torch.as_tensor(np.asarray(value, dtype=np.float32))
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"tabular modality {key!r} of case {data.get(Keys.CASE_ID, '?')!r}: expected a list of numbers, "
                    f"got {value!r}."
                ) from err
            expected = self.tabular_features.get(key)
            if t.ndim != 1 or (expected is not None and t.shape[0] != expected):
                raise ValueError(
                    f"tabular modality {key!r} of case {data.get(Keys.CASE_ID, '?')!r}: expected "
                    f"{expected if expected is not None else 'a flat list of'} features, got shape {list(t.shape)}."
                )
            if torch.isinf(t).any():
                raise ValueError(f"tabular modality {key!r} of case {data.get(Keys.CASE_ID, '?')!r}: infinite value.")
            if bool(torch.isnan(t).all()):
                return None  # every feature missing: the modality is absent
            return t  # single missing features stay NaN: the "tabular" encoder imputes them
        return self._pipelines[key]({key: value})[key]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load present modalities, zero-fill missing ones and write ``modality_mask`` (bool ``[M]``)."""
        d = dict(data)
        present = []
        for key in self.modalities:
            if key not in d:
                raise ValueError(
                    f"LoadModalitiesByKindd: item {d.get(Keys.CASE_ID, '?')!r} lacks key {key!r}; "
                    "a missing modality must be given as None."
                )
            value = d[key]
            out = None if value is None else self._load(key, value, d)
            present.append(out is not None)
            d[key] = out if out is not None else self.zeros(key)
        d[self.mask_key] = torch.tensor(present, dtype=torch.bool)
        return d


def clinical_transforms(
    modalities: Mapping[str, str],
    mode: str = "train",
    image_size: int = 64,
    volume_size: int = 32,
    ehr_timestep: float = 2.0,
    ehr_normalizer: Mapping[str, Any] | str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    max_length: int = 128,
    seed: int = 0,
    ehr_max_hours: float = 48.0,
    tabular_features: Mapping[str, int] | None = None,
) -> Compose:
    """Transform chain for a clinical datalist: load by kind, zero-fill missing, mask, label -> float.

    Args:
        modalities: ordered ``{key: kind}`` (see :data:`MODALITY_KINDS`), e.g.
            ``{"ehr": "ehr", "cxr": "image", "report": "text"}``.
        mode: ``"train"`` (random augmentation) or ``"eval"``.
        image_size: side of 2D images.
        volume_size: side of 3D volumes.
        ehr_timestep: EHR bin width in hours.
        ehr_normalizer: EHR normaliser statistics (dict or JSON path) or ``None``.
        tokenizer_dir: tokenizer folder (``None``: bundled all-MiniLM-L6-v2).
        max_length: token length.
        seed: seed of the random augmentations.
        ehr_max_hours: EHR window in hours.
        tabular_features: ``{key: F}`` sizes of tabular modalities (for zero-filling).

    Returns:
        A seeded ``monai.transforms.Compose``; items come out with one tensor per modality,
        ``modality_mask`` bool ``[M]`` and ``label`` as a float tensor (``[]`` or ``[K]``).
    """
    chain = Compose(
        [
            LoadModalitiesByKindd(
                modalities,
                mode=mode,
                image_size=image_size,
                volume_size=volume_size,
                ehr_timestep=ehr_timestep,
                ehr_max_hours=ehr_max_hours,
                ehr_normalizer=ehr_normalizer,
                tokenizer_dir=tokenizer_dir,
                max_length=max_length,
                tabular_features=tabular_features,
            ),
            EnsureTyped(Keys.LABEL, dtype=torch.float32, track_meta=False, allow_missing_keys=True),
        ]
    )
    chain.set_random_state(seed=seed)
    return chain
