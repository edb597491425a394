"""Brain-like 3D phantoms with tumour sub-regions, written in the BraTS 2021 folder layout.

Each case is ``OUT/BraTS2021_%05d/BraTS2021_%05d_{flair,t1,t1ce,t2,seg}.nii.gz``: float32 images,
uint8 segmentation with the BraTS 2018-2021 labels (1 NCR necrotic core, 2 ED edema, 4 ET enhancing
ring), identity affine (1 mm isotropic), cubic shape ``size^3`` and exact-zero (skull-stripped)
background.

The image model of one modality ``m`` at voxel ``x`` inside the brain is::

    I_m(x) = s_m * ( b_m(x) * mu_m[class(x)] * (1 + TEXTURE_SD * T(x)) + noise_sd_m * eps(x) )

with ``mu_m`` the class means of :data:`CONTRAST` (normal brain = 1.0), ``T`` a zero-mean unit-sd
smooth tissue texture shared by all modalities (a soft two-tissue partition plus mottling),
``b_m = exp(BIAS_SD * B_m)`` a smooth multiplicative bias field per modality (``B_m`` unit sd),
``eps`` standard Gaussian noise and ``s_m ~ U(SCALE_RANGE)`` a per-case, per-modality intensity scale.
Outside the brain the image is exactly 0.

The contrast table is DATA: :data:`CONTRAST` is written to ``OUT/brats_contrast.json`` with every
cohort, :func:`load_contrast_table` reads it back and :func:`expected_region_ranking` turns it into
the modality ranking a learned modality-importance weight should recover. See
``docs/synthetic_brats.md``.

``style="brats2015"`` writes the same phantoms the way BRATS 2013-2015 copies redistributed by
segmentation toolkits look: one folder per case named ``brats2015_pat%04d`` with only FLAIR and T1c,
exporter file names (``Flair_subtrMeanDivStd.nii.gz``, ``T1c_subtrMeanDivStd.nii.gz``), volumes
z-scored over the brain so the background is NOT 0, a ``brainmask.nii.gz`` and ground truth
``OTMultiClass.nii.gz`` in the BRATS 2015 convention (1 necrosis, 2 edema, 3 non-enhancing,
4 enhancing), plus ``OUT/manifest.csv`` (a volume manifest, :mod:`medfusion.data.volume_manifest`).
:func:`write_brats2015_case` writes any case (e.g. a real one) that way.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfusion.io import atomic_output_dir
from medfusion.modality import BRATS_MODALITIES

__all__ = [
    "CONTRAST",
    "CONTRAST_UNEQUAL",
    "CONTRAST_EXCLUSIVE",
    "CONTRAST_PROFILES",
    "contrast_profile",
    "CLASSES",
    "LABELS",
    "REGIONS",
    "ADJACENT_CLASSES",
    "TEXTURE_SD",
    "BIAS_SD",
    "SCALE_RANGE",
    "CONTRAST_FILE",
    "case_name",
    "load_contrast_table",
    "region_contrast",
    "expected_region_ranking",
    "make_phantom",
    "write_brats_cohort",
    "STYLES",
    "BRATS2015_FILES",
    "zscore_in_mask",
    "split_nonenhancing",
    "write_brats2015_case",
]

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("brain", "NCR", "ED", "ET")
"""Tissue classes of the phantom: normal brain and the three tumour sub-regions."""

LABELS: dict[str, int] = {"brain": 0, "NCR": 1, "ED": 2, "ET": 4}
"""Segmentation value of each class (BraTS 2018-2021 convention; background outside the brain is 0 too)."""

REGIONS: dict[str, tuple[str, ...]] = {"TC": ("NCR", "ET"), "WT": ("NCR", "ED", "ET"), "ET": ("ET",)}
"""Evaluation regions (MONAI order TC, WT, ET) as sets of classes."""

ADJACENT_CLASSES: tuple[tuple[str, str], ...] = (("brain", "ED"), ("ED", "ET"), ("ET", "NCR"))
"""Class pairs that share a boundary in the phantom geometry (ED encloses a closed ET shell around NCR)."""

CONTRAST: dict[str, dict[str, float]] = {
    "flair": {"brain": 1.0, "NCR": 1.50, "ED": 1.80, "ET": 1.65, "noise_sd": 0.1},
    "t1": {"brain": 1.0, "NCR": 0.80, "ED": 0.94, "ET": 0.97, "noise_sd": 0.1},
    "t1ce": {"brain": 1.0, "NCR": 0.55, "ED": 0.88, "ET": 2.00, "noise_sd": 0.1},
    "t2": {"brain": 1.0, "NCR": 1.70, "ED": 1.50, "ET": 1.25, "noise_sd": 0.1},
}
"""Mean intensity of each class per modality relative to normal brain (= 1.0), and the Gaussian noise sd
(same units). t1ce: ET strongly bright, NCR dark; flair: the whole tumour bright, ED brightest; t2: the whole
tumour moderately bright, NCR (fluid) brightest; t1: weak differences everywhere."""

CONTRAST_UNEQUAL: dict[str, dict[str, float]] = {
    "flair": {"brain": 1.0, "NCR": 1.76, "ED": 1.80, "ET": 1.78, "noise_sd": 0.1},
    "t1": {"brain": 1.0, "NCR": 0.96, "ED": 0.98, "ET": 1.00, "noise_sd": 0.1},
    "t1ce": {"brain": 1.0, "NCR": 0.96, "ED": 1.02, "ET": 2.00, "noise_sd": 0.1},
    "t2": {"brain": 1.0, "NCR": 1.06, "ED": 1.02, "ET": 1.04, "noise_sd": 0.1},
}
"""The ``"unequal"`` profile: in each region ONE modality carries the signal and the others are nearly
uninformative. flair: the whole tumour uniformly bright (WT contrast 8.0, TC/ET 0.2); t1ce: only the ET ring
bright (TC/ET 9.8, WT 0.2); t1 and t2: 0.2 everywhere. The weak edges are 40-49 times below the dominant ones
(:func:`region_contrast`), so the modality importance a method should learn is unambiguous (flair for WT, t1ce
for TC/ET, t1 and t2 for nothing)."""

CONTRAST_EXCLUSIVE: dict[str, dict[str, float]] = {
    "flair": {"brain": 1.0, "NCR": 1.80, "ED": 1.80, "ET": 1.80, "noise_sd": 0.1},
    "t1": {"brain": 1.0, "NCR": 1.00, "ED": 1.00, "ET": 1.00, "noise_sd": 0.1},
    "t1ce": {"brain": 1.0, "NCR": 1.00, "ED": 1.00, "ET": 2.00, "noise_sd": 0.1},
    "t2": {"brain": 1.0, "NCR": 1.00, "ED": 1.00, "ET": 1.00, "noise_sd": 0.1},
}
"""The ``"exclusive"`` profile: each region is visible in ONE modality and the others carry NO contrast there.
flair: the whole tumour uniformly bright (WT contrast 8.0, TC/ET 0); t1ce: only the ET ring bright (TC/ET 10.0,
WT 0: NCR and ED equal normal brain); t1 and t2: every class equals normal brain (0 everywhere), so their tumour
and brain intensities have the same distribution and they hold no information about any region."""

CONTRAST_PROFILES: dict[str, dict[str, dict[str, float]]] = {
    "default": CONTRAST,
    "unequal": CONTRAST_UNEQUAL,
    "exclusive": CONTRAST_EXCLUSIVE,
}
"""Named contrast tables for :func:`write_brats_cohort` (``contrast=``) and ``medfusion synth brats --contrast``."""

TEXTURE_SD: float = 0.05
"""Standard deviation of the multiplicative tissue texture ``1 + TEXTURE_SD * T`` (all modalities)."""

BIAS_SD: float = 0.1
"""Standard deviation of the log bias field: ``b_m = exp(BIAS_SD * B_m)`` with ``B_m`` smooth, unit sd."""

SCALE_RANGE: tuple[float, float] = (0.5, 2.0)
"""Per-case, per-modality global intensity scale ``s_m ~ U(SCALE_RANGE)``."""

CONTRAST_FILE = "brats_contrast.json"
"""Name of the contrast table written at the root of every cohort."""

RANKING_RULE = (
    "contrast(region, m) = min over class pairs (a, b) in ADJACENT_CLASSES with exactly one of a, b in the "
    "region of |mu_m[a] - mu_m[b]| / noise_sd_m; modalities ranked by decreasing contrast (ties: modality order)"
)

_MIN_SIZE = 16
_MEAN_KEYS: tuple[str, ...] = CLASSES
_TABLE_KEYS: tuple[str, ...] = (*CLASSES, "noise_sd")


STYLES: tuple[str, ...] = ("brats2021", "brats2015")
"""Cohort styles of :func:`write_brats_cohort`."""

BRATS2015_FILES: dict[str, str] = {
    "flair": "Flair_subtrMeanDivStd.nii.gz",
    "t1": "T1_subtrMeanDivStd.nii.gz",
    "t1ce": "T1c_subtrMeanDivStd.nii.gz",
    "t2": "T2_subtrMeanDivStd.nii.gz",
    "label": "OTMultiClass.nii.gz",
    "brain_mask": "brainmask.nii.gz",
}
"""File names of a BRATS 2013-2015 toolkit export (z-scored sequences, multi-class ground truth, brain mask)."""

BRATS2015_MODALITIES: tuple[str, ...] = ("flair", "t1ce")
"""Sequences of a generated ``brats2015``-style case (such copies often ship only some of them)."""


def case_name(index: int, style: str = "brats2021") -> str:
    """Case name of case ``index``: ``BraTS2021_00000``, ... (``brats2015`` style: ``brats2015_pat0000``, ...)."""
    return f"brats2015_pat{index:04d}" if style == "brats2015" else f"BraTS2021_{index:05d}"


# --------------------------------------------------------------------------------------------- contrast table


def _validate_table(table: Any, source: str = "contrast table") -> dict[str, dict[str, float]]:
    """Check a contrast table's structure and return a deep, float-valued copy.

    Args:
        table: mapping modality -> {brain, NCR, ED, ET, noise_sd} -> number.
        source: name used in error messages (e.g. the JSON file).

    Returns:
        The validated table as plain dicts of floats, modalities in :data:`BRATS_MODALITIES` order.

    Raises:
        ValueError: a modality or key is missing, a value is not a finite number, or a noise sd is not positive.
    """
    if not isinstance(table, Mapping):
        raise ValueError(f"{source}: expected a mapping modality -> class means, got {type(table).__name__}.")
    missing = [m for m in BRATS_MODALITIES if m not in table]
    if missing:
        raise ValueError(f"{source}: missing modalities {missing}; expected {list(BRATS_MODALITIES)}.")
    out: dict[str, dict[str, float]] = {}
    for mod in BRATS_MODALITIES:
        row = table[mod]
        if not isinstance(row, Mapping):
            raise ValueError(f"{source}: entry '{mod}' must be a mapping with keys {list(_TABLE_KEYS)}.")
        absent = [k for k in _TABLE_KEYS if k not in row]
        if absent:
            raise ValueError(f"{source}: entry '{mod}' lacks keys {absent}; expected {list(_TABLE_KEYS)}.")
        clean: dict[str, float] = {}
        for key in _TABLE_KEYS:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{source}: '{mod}.{key}' must be a finite number, got {value!r}.")
            clean[key] = float(value)
        if clean["noise_sd"] <= 0:
            raise ValueError(f"{source}: '{mod}.noise_sd' must be > 0, got {clean['noise_sd']}.")
        out[mod] = clean
    return out


def contrast_profile(contrast: str | Mapping[str, Mapping[str, float]] = "default") -> dict[str, dict[str, float]]:
    """The contrast table of a named profile (:data:`CONTRAST_PROFILES`) or a validated copy of a given table.

    Args:
        contrast: ``"default"`` (:data:`CONTRAST`), ``"unequal"`` (:data:`CONTRAST_UNEQUAL`), ``"exclusive"``
            (:data:`CONTRAST_EXCLUSIVE`) or a table mapping.

    Returns:
        A validated deep copy ``{modality: {"brain", "NCR", "ED", "ET", "noise_sd": float}}``.

    Raises:
        ValueError: unknown profile name or invalid table.
    """
    if isinstance(contrast, str):
        if contrast not in CONTRAST_PROFILES:
            raise ValueError(f"Unknown contrast profile {contrast!r}; expected one of {list(CONTRAST_PROFILES)}.")
        return _validate_table(CONTRAST_PROFILES[contrast], source=f"contrast profile {contrast!r}")
    return _validate_table(contrast)


def load_contrast_table(path: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Return the contrast table of a cohort, or the module default :data:`CONTRAST`.

    Args:
        path: a cohort folder (reads its ``brats_contrast.json``) or the JSON file itself; None for the default.

    Returns:
        ``{modality: {"brain", "NCR", "ED", "ET", "noise_sd": float}}`` (a copy; editing it changes nothing).

    Raises:
        FileNotFoundError: ``path`` is given but the JSON file does not exist.
        ValueError: the file is not valid JSON or does not hold a valid table.
    """
    if path is None:
        return copy.deepcopy(CONTRAST)
    file = Path(path)
    if file.is_dir():
        file = file / CONTRAST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"Contrast table {file} not found (expected a cohort folder holding {CONTRAST_FILE}).")
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Contrast table {file} is not readable JSON: {err}") from err
    if isinstance(data, Mapping) and "table" in data:
        data = data["table"]
    return _validate_table(data, source=str(file))


def region_contrast(region: str, table: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float]:
    """Contrast-to-noise of each modality for one region, computed from the table.

    Rule: for every pair of classes that share a boundary in the phantom (:data:`ADJACENT_CLASSES`:
    brain|ED, ED|ET, ET|NCR) with exactly one class inside the region, take ``|mu_m[a] - mu_m[b]| / noise_sd_m``;
    the region's contrast is the minimum over those boundaries (the weakest edge limits the segmentation).
    So WT uses brain|ED, TC uses ED|ET, ET uses min(ED|ET, ET|NCR).

    Args:
        region: ``"TC"``, ``"WT"`` or ``"ET"``.
        table: contrast table (default :data:`CONTRAST`).

    Returns:
        ``{modality: contrast}`` in :data:`BRATS_MODALITIES` order.

    Raises:
        ValueError: unknown region or invalid table.
    """
    if region not in REGIONS:
        raise ValueError(f"Unknown region {region!r}; expected one of {list(REGIONS)}.")
    tab = _validate_table(CONTRAST if table is None else table)
    inside = set(REGIONS[region])
    edges = [(a, b) for a, b in ADJACENT_CLASSES if (a in inside) != (b in inside)]
    return {m: min(abs(tab[m][a] - tab[m][b]) for a, b in edges) / tab[m]["noise_sd"] for m in BRATS_MODALITIES}


def expected_region_ranking(region: str, table: Mapping[str, Mapping[str, float]] | None = None) -> list[str]:
    """Modalities ordered from most to least informative for a region, by :func:`region_contrast`.

    With the default table: ET and TC ``t1ce > t2 > flair > t1``; WT ``flair > t2 > t1ce > t1``.

    Args:
        region: ``"TC"``, ``"WT"`` or ``"ET"``.
        table: contrast table (default :data:`CONTRAST`).

    Returns:
        Modality names, highest contrast first (ties keep :data:`BRATS_MODALITIES` order).

    Raises:
        ValueError: unknown region or invalid table.
    """
    contrast = region_contrast(region, table)
    return sorted(contrast, key=lambda m: -contrast[m])


# --------------------------------------------------------------------------------------------- phantom


def _interp_matrix(size: int, grid: int) -> np.ndarray:
    """Row-normalised Gaussian interpolation weights from ``grid`` nodes onto ``size`` voxels: ``[size, grid]``."""
    spacing = size / (grid - 1)
    nodes = np.linspace(-0.5 * spacing, size - 1 + 0.5 * spacing, grid)
    pos = np.arange(size, dtype=np.float64)[:, None]
    w = np.exp(-0.5 * ((pos - nodes[None, :]) / (0.6 * spacing)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Smooth random field ``[size, size, size]`` float32 with zero mean and unit sd (over the cube).

    A ``grid^3`` lattice of Gaussian values is interpolated separably (three small matrix products), so the
    feature scale is ``size / grid`` voxels and the cost is linear in the number of voxels.
    """
    coarse = rng.standard_normal((grid, grid, grid))
    a = _interp_matrix(size, grid).astype(np.float64)
    # Exact voxel mean and variance of the interpolated field from the coarse lattice (rows of `a` sum to 1, so
    # (a x a x a) maps a constant to itself and normalising the lattice normalises the field).
    w = a.mean(axis=0)
    k = a.T @ a / size
    mean = float(np.einsum("a,b,c,abc->", w, w, w, coarse))
    second = float(np.einsum("ad,be,cf,abc,def->", k, k, k, coarse, coarse, optimize=True))
    sd = math.sqrt(max(second - mean**2, 0.0))
    coarse = ((coarse - mean) / (sd if sd > 0 else 1.0)).astype(np.float32)
    a32 = a.astype(np.float32)
    field = np.einsum("ia,abc->ibc", a32, coarse)  # [S, g, g]
    field = np.einsum("jb,ibc->ijc", a32, field)  # [S, S, g]
    return field @ a32.T  # [S, S, S]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _check_size(size: Any, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"{name} must be an integer >= {_MIN_SIZE}, got {size!r}.")
    if size < _MIN_SIZE:
        raise ValueError(f"{name} must be >= {_MIN_SIZE} (cubic volume size in voxels), got {size}.")
    return int(size)


def make_phantom(
    size: int, rng: np.random.Generator, table: Mapping[str, Mapping[str, float]] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Generate one brain phantom with a tumour.

    Geometry (voxel units, scaled with ``size`` with minimums so small volumes keep every label): an ellipsoidal
    brain (semi-axes ~0.42, 0.36, 0.40 of ``size`` with a smoothly perturbed surface); a tumour centre inside it;
    a rotated, perturbed ellipsoidal core of radius ``r_tc = max(4, U(0.07, 0.10) * size)`` whose outer shell of
    thickness ``max(1.5, 0.3 * r_tc)`` is ET and whose inside is NCR; an irregular edema blob (thresholded smooth
    noise around radius ``max(r_tc + 3, U(0.13, 0.18) * size)``) that always encloses the core by
    ``max(2, 0.03 * size)`` voxels. Tumour voxels outside the brain are dropped.

    Args:
        size: cubic volume size S (>= 16).
        rng: random generator; the phantom is a deterministic function of its state.
        table: contrast table (default :data:`CONTRAST`).

    Returns:
        ``(images, seg)``: ``images[m]`` float32 ``[S, S, S]`` for ``m`` in ``flair, t1, t1ce, t2`` (0 outside the
        brain, >= 0 inside) and ``seg`` uint8 ``[S, S, S]`` with values in {0, 1, 2, 4}.

    Raises:
        ValueError: ``size`` < 16 or invalid table.
        TypeError: ``rng`` is not a :class:`numpy.random.Generator`.
    """
    size = _check_size(size)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(...)), got {type(rng).__name__}.")
    tab = _validate_table(CONTRAST if table is None else table)
    s = float(size)
    idx = np.arange(size, dtype=np.float32)
    grid = (idx[:, None, None], idx[None, :, None], idx[None, None, :])

    # ---- brain: perturbed ellipsoid
    centre = np.full(3, (s - 1) / 2)
    axes = np.array([0.42, 0.36, 0.40]) * (1 + rng.uniform(-0.05, 0.05, 3)) * s
    r_brain = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes, strict=True))
    r_brain = np.sqrt(r_brain) + 0.04 * _smooth_field(rng, size, 6)
    brain = r_brain < 1.0

    # ---- tumour centre: inside the brain, nearer the middle for small volumes
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    rho_max = 0.4 * min(1.0, (s - _MIN_SIZE) / _MIN_SIZE)
    t_centre = centre + rng.uniform(0.0, rho_max) * direction * axes

    # ---- core (NCR inside, ET shell): rotated ellipsoid with a smooth boundary perturbation
    r_tc = max(4.0, rng.uniform(0.07, 0.10) * s)
    shell = max(1.5, 0.3 * r_tc)
    core_axes = r_tc * (1 + rng.uniform(-0.15, 0.15, 3))
    rot = _random_rotation(rng)
    offs = [g - c for g, c in zip(grid, t_centre, strict=True)]
    d_core = sum(
        ((offs[0] * rot[0, k] + offs[1] * rot[1, k] + offs[2] * rot[2, k]) / core_axes[k]) ** 2 for k in range(3)
    )
    d_core = np.sqrt(d_core) + 0.1 * np.clip(_smooth_field(rng, size, 8), -2.0, 2.0)
    inner = 1.0 - shell / r_tc
    ncr = d_core < inner
    tc = d_core < 1.0

    # ---- edema: irregular blob (thresholded smooth noise) that always encloses the core
    r_wt = max(r_tc + 3.0, rng.uniform(0.13, 0.18) * s)
    margin = max(2.0, 0.03 * s)
    d_ed = np.sqrt(sum(o**2 for o in offs)) / r_wt + 0.35 * _smooth_field(rng, size, 8)
    wt = (d_ed < 1.0) | (d_core < 1.0 + margin / r_tc)

    seg = np.zeros((size, size, size), dtype=np.uint8)
    seg[wt] = LABELS["ED"]
    seg[tc] = LABELS["ET"]
    seg[ncr] = LABELS["NCR"]
    seg[~brain] = 0

    # ---- shared tissue texture: soft two-tissue partition + mottling, zero mean, unit sd in the brain
    texture = 0.8 * np.tanh(3.0 * _smooth_field(rng, size, 8)) + 0.5 * _smooth_field(rng, size, 14)
    sub = texture[::2, ::2, ::2][brain[::2, ::2, ::2]]  # statistics on every 8th voxel: fast, plenty accurate
    texture -= sub.mean()
    texture /= max(float(sub.std()), 1e-6)
    tissue = 1.0 + TEXTURE_SD * texture

    # ---- per-modality class means, bias, scale, noise
    images: dict[str, np.ndarray] = {}
    for mod in BRATS_MODALITIES:
        lut = np.zeros(256, dtype=np.float32)
        for cls in CLASSES:
            lut[LABELS[cls]] = tab[mod][cls]
        scale = rng.uniform(*SCALE_RANGE)
        bias = np.exp(BIAS_SD * _smooth_field(rng, size, 3))
        noise = rng.standard_normal((size, size, size), dtype=np.float32)
        img = lut[seg] * tissue * bias + tab[mod]["noise_sd"] * noise
        img *= scale
        np.maximum(img, 0.0, out=img)
        img *= brain
        images[mod] = img.astype(np.float32, copy=False)
    return images, seg


# --------------------------------------------------------------------------------------------- cohort


def _save_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(array, aff)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, str(path))


def zscore_in_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(image - mean) / std`` over the WHOLE volume with the mean/std of the brain voxels (float32).

    This is what "subtrMeanDivStd" exporters do: the brain gets mean 0 and sd 1, the former zero
    background becomes ``-mean / std`` (not 0).

    Args:
        image: ``[X, Y, Z]`` intensities.
        mask: bool ``[X, Y, Z]`` brain voxels (at least one).

    Raises:
        ValueError: empty mask or shape mismatch.
    """
    if image.shape != mask.shape:
        raise ValueError(f"zscore_in_mask: image {image.shape} and mask {mask.shape} differ in shape.")
    vals = image[mask].astype(np.float64)
    if vals.size == 0:
        raise ValueError("zscore_in_mask: the mask holds no voxel.")
    std = float(vals.std()) or 1.0
    return ((image.astype(np.float64) - float(vals.mean())) / std).astype(np.float32)


def split_nonenhancing(seg: np.ndarray, rng: np.random.Generator, fraction: float = 0.5) -> np.ndarray:
    """BraTS 2018-2021 labels (1, 2, 4) -> BRATS 2015 labels: part of the core 1 becomes 3 (non-enhancing).

    The voxels of label 1 where a smooth random field is above its ``1 - fraction`` quantile (over
    label 1) become 3, so the non-enhancing part is a connected-looking blob, not salt and pepper.
    Regions are unchanged under the ``brats2015`` convention (TC = {1, 3, 4}).

    Args:
        seg: uint8 ``[S, S, S]`` with values in {0, 1, 2, 4}.
        rng: random generator for the field.
        fraction: share of label-1 voxels relabelled 3.

    Returns:
        A new uint8 array with values in {0, 1, 2, 3, 4}.
    """
    out = seg.copy()
    core = seg == LABELS["NCR"]
    if core.any() and fraction > 0:
        x, y, z = seg.shape
        field = _smooth_field(rng, max(seg.shape), 6)[:x, :y, :z]
        cut = np.quantile(field[core], 1.0 - fraction)
        out[core & (field >= cut)] = 3
    return out


def write_brats2015_case(
    case_dir: str | os.PathLike,
    images: Mapping[str, np.ndarray],
    seg: np.ndarray | None,
    affine: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
) -> dict[str, str]:
    """Write one case the way BRATS 2013-2015 toolkit copies look (z-scored, brain mask, exporter names).

    Args:
        case_dir: folder to create (its parents must exist; it must not exist yet).
        images: ``{modality: [X, Y, Z]}`` with background 0 (e.g. a phantom, or a real case read with nibabel);
            any subset of flair, t1, t1ce, t2.
        seg: label map to write as ``OTMultiClass.nii.gz`` (``None``: no ground truth).
        affine: the volumes' affine (default identity).
        brain_mask: bool ``[X, Y, Z]``; default: voxels where any given image is non-zero.

    Returns:
        ``{column: file name}`` for a volume manifest row (modalities, ``label``, ``brain_mask``), relative
        to ``case_dir``.
    """
    out = Path(case_dir)
    out.mkdir()
    arrays = {m: np.asarray(v) for m, v in images.items()}
    mask = np.any([a != 0 for a in arrays.values()], axis=0) if brain_mask is None else np.asarray(brain_mask, bool)
    row: dict[str, str] = {}
    for mod, arr in arrays.items():
        _save_nifti(zscore_in_mask(arr, mask), out / BRATS2015_FILES[mod], affine)
        row[mod] = BRATS2015_FILES[mod]
    if seg is not None:
        _save_nifti(np.asarray(seg).astype(np.uint8), out / BRATS2015_FILES["label"], affine)
        row["label"] = BRATS2015_FILES["label"]
    _save_nifti(mask.astype(np.uint8), out / BRATS2015_FILES["brain_mask"], affine)
    row["brain_mask"] = BRATS2015_FILES["brain_mask"]
    return row


def _readme(cases: int, size: int, seed: int, style: str = "brats2021", profile: str = "default") -> str:
    flag = "" if profile == "default" else f" --contrast {profile}"
    if style == "brats2015":
        first, last = case_name(0, style), case_name(cases - 1, style)
        lines = [
            "medfusion synthetic BraTS phantoms written like a BRATS 2013-2015 toolkit export",
            "",
            f"cases: {cases} ({first} .. {last}), {size}^3 voxels at 1 mm, seed {seed}",
            "files: <case>/{Flair,T1c}_subtrMeanDivStd.nii.gz (float32, z-scored in the brain: background not 0)",
            "       <case>/brainmask.nii.gz (uint8), <case>/OTMultiClass.nii.gz (uint8 ground truth)",
            "labels: 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing; TC={1,3,4}, WT={1,2,3,4}, ET={4}",
            "manifest.csv: volume manifest (case_id, flair, t1ce, label, brain_mask, label_convention)",
            "the phantoms are those of the brats2021 style with the same seed (docs/synthetic_brats.md);",
            f"  medfusion synth brats OUT --cases {cases} --size {size} --seed {seed} --style brats2015{flag}",
            "Synthetic data: not derived from any patient.",
        ]
        return "\n".join(lines) + "\n"
    lines = [
        "medfusion synthetic BraTS phantoms (BraTS 2021 folder layout)",
        "",
        f"cases: {cases} (BraTS2021_00000 .. {case_name(cases - 1)}), volume {size}^3 voxels at 1 mm, seed {seed}",
        "files: BraTS2021_NNNNN/BraTS2021_NNNNN_{flair,t1,t1ce,t2,seg}.nii.gz (float32 images, uint8 seg)",
        "labels: 1 NCR (necrotic core), 2 ED (edema), 4 ET (enhancing ring); TC={1,4}, WT={1,2,4}, ET={4}",
        f"contrast table: {CONTRAST_FILE} (profile {profile!r}; class means relative to normal brain = 1.0, noise sd)",
        f"image model: scale U{SCALE_RANGE} x exp({BIAS_SD} x smooth bias) x mean x (1 + {TEXTURE_SD} x texture)"
        " + Gaussian noise (sd noise_sd x scale); background exactly 0",
        f"case i is generated with numpy.random.default_rng([{seed}, i]); regenerate with:",
        f"  medfusion synth brats OUT --cases {cases} --size {size} --seed {seed}{flag}",
        "Synthetic data: not derived from any patient. See docs/synthetic_brats.md.",
    ]
    return "\n".join(lines) + "\n"


def _contrast_document(
    cases: int, size: int, seed: int, table: Mapping[str, Mapping[str, float]] | None = None, profile: str = "default"
) -> dict[str, Any]:
    table = contrast_profile("default" if table is None else table)
    return {
        "profile": profile,
        "table": table,
        "classes": dict(LABELS),
        "regions": {r: list(c) for r, c in REGIONS.items()},
        "adjacent_classes": [list(p) for p in ADJACENT_CLASSES],
        "ranking_rule": RANKING_RULE,
        "region_contrast": {r: region_contrast(r, table) for r in REGIONS},
        "expected_ranking": {r: expected_region_ranking(r, table) for r in REGIONS},
        "generator": {
            "texture_sd": TEXTURE_SD,
            "bias_sd": BIAS_SD,
            "scale_range": list(SCALE_RANGE),
            "cases": cases,
            "size": size,
            "seed": seed,
            "rng": "numpy.random.default_rng([seed, case_index])",
        },
    }


def write_brats_cohort(
    out: str | os.PathLike,
    cases: int,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    style: str = "brats2021",
    contrast: str | Mapping[str, Mapping[str, float]] = "default",
) -> list[Path]:
    """Write a cohort of phantoms in the BraTS 2021 layout (or a BRATS 2015 toolkit export), all or nothing.

    ``style="brats2021"`` writes ``out/BraTS2021_%05d/BraTS2021_%05d_{flair,t1,t1ce,t2,seg}.nii.gz`` for every
    case, ``out/brats_contrast.json`` (the contrast table, ranking rule and generator settings) and
    ``out/README.txt``. Case ``i`` is :func:`make_phantom` with ``np.random.default_rng([seed, i])``, so a cohort
    is a deterministic function of ``(seed, size)`` and case ``i`` does not depend on ``cases``.

    ``style="brats2015"`` writes the same phantoms with :func:`write_brats2015_case` (FLAIR and T1c only,
    z-scored, brain mask, labels 1/2/3/4 via :func:`split_nonenhancing` with ``default_rng([seed, i, 2015])``)
    into ``out/brats2015_pat%04d/``, plus ``out/manifest.csv`` (relative paths, ``label_convention``
    ``brats2015``), ``brats_contrast.json`` and ``README.txt``.

    Args:
        out: output folder; must not exist or be empty unless ``overwrite``.
        cases: number of cases (>= 1).
        size: cubic volume size S (>= 16).
        seed: non-negative generator seed.
        overwrite: replace an existing non-empty ``out`` (only once the new cohort is complete).
        style: ``"brats2021"`` or ``"brats2015"`` (:data:`STYLES`).
        contrast: contrast profile name (``"default"``, ``"unequal"``, ``"exclusive"``; :data:`CONTRAST_PROFILES`)
            or a table;
            written to ``brats_contrast.json`` (``profile`` holds the name, ``"custom"`` for a table).

    Returns:
        The case directories (final paths under ``out``), in case order.

    Raises:
        ValueError: ``cases`` < 1, ``size`` < 16, a negative/non-integer ``seed``, an unknown ``style`` or an
            unknown/invalid ``contrast`` (checked before writing).
        FileExistsError: ``out`` is non-empty (or a file) and ``overwrite`` is False.
    """
    if isinstance(cases, bool) or not isinstance(cases, int | np.integer) or cases < 1:
        raise ValueError(f"cases must be an integer >= 1, got {cases!r}.")
    size = _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}.")
    table = contrast_profile(contrast)
    profile = contrast if isinstance(contrast, str) else "custom"
    cases, seed = int(cases), int(seed)
    out = Path(out)
    names = [case_name(i, style) for i in range(cases)]
    with atomic_output_dir(out, overwrite) as tmp:
        rows = []
        for i, name in enumerate(names):
            images, seg = make_phantom(size, np.random.default_rng([seed, i]), table)
            case_dir = tmp / name
            if style == "brats2015":
                seg15 = split_nonenhancing(seg, np.random.default_rng([seed, i, 2015]))
                files = write_brats2015_case(case_dir, {m: images[m] for m in BRATS2015_MODALITIES}, seg15)
                rows.append({"case_id": name, **{k: f"{name}/{f}" for k, f in files.items()}})
                continue
            case_dir.mkdir()
            for mod in BRATS_MODALITIES:
                _save_nifti(images[mod], case_dir / f"{name}_{mod}.nii.gz")
            _save_nifti(seg, case_dir / f"{name}_seg.nii.gz")
        if rows:
            import pandas as pd

            frame = pd.DataFrame(rows, columns=["case_id", *BRATS2015_MODALITIES, "label", "brain_mask"])
            frame["label_convention"] = "brats2015"
            frame.to_csv(tmp / "manifest.csv", index=False)
        (tmp / CONTRAST_FILE).write_text(
            json.dumps(_contrast_document(cases, size, seed, table, profile), indent=2) + "\n"
        )
        (tmp / "README.txt").write_text(_readme(cases, size, seed, style, profile))
    logger.info("wrote %d BraTS phantom cases (%s style, %d^3, seed %d) to %s", cases, style, size, seed, out)
    return [out / name for name in names]
