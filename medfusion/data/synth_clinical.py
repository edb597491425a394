"""Synthetic MIMIC-style clinical cohort (EHR time series + chest X-ray + radiology report) with a known signal.

The generator writes the MedFuse layout described in ``DATA.md`` ("Clinical multimodal") and, optionally,
a PET + CT + report + labs cohort described by a generic CSV manifest ("Generic manifest"). Every sample
carries a latent risk ``z`` that is the sum of independent per-modality components, so each modality holds
a documented share of the label signal: every modality alone predicts the label better than chance, all
together predict it best. ``signal.json`` documents the model and its parameters, ``labels.csv`` holds the
ground truth (latent values, presence flags, pairing facts) for tests and benchmarks.

Signal model (both cohorts)::

    u_m ~ N(0, 1) independent per sample and modality m
    z   = sum_m sqrt(share_m) * u_m             (so z ~ N(0, 1); share_m = fraction of Var(z) carried by m)
    y   = 1[z + e > threshold],  e ~ N(0, label_noise_std^2)

Modality ``m`` expresses only ``u_m`` (plus nuisance variation), so the best single-modality predictor
reaches ``corr(u_m, z) = sqrt(share_m)`` and fusion can recover all of ``z``.

Use :func:`write_clinical_cohort`; the command line is ``medfusion synth clinical OUT --samples N``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from medfusion.data.ehr import EHR_CHANNELS
from medfusion.io import atomic_output_dir

__all__ = [
    "EHR_VARIABLES",
    "CATEGORICAL_VARIABLES",
    "CLINICAL_SHARES",
    "MANIFEST_SHARES",
    "MANIFEST_MODALITIES",
    "LABEL_THRESHOLD",
    "LABEL_NOISE_STD",
    "NOISE_SCALES",
    "SUPPORTED_TASKS",
    "write_clinical_cohort",
]

logger = logging.getLogger(__name__)

EHR_VARIABLES: tuple[str, ...] = EHR_CHANNELS
"""The 17 mimic3-benchmarks variables in header order (one list, shared with the discretiser)."""

CATEGORICAL_VARIABLES: tuple[str, ...] = (
    "Capillary refill rate",
    "Glascow coma scale eye opening",
    "Glascow coma scale motor response",
    "Glascow coma scale total",
    "Glascow coma scale verbal response",
)

# GCS component score -> (MetaVision text, CareVue text), the strings of the mimic3-benchmarks discretizer.
# Eye score 1 only uses "1 No Response": CareVue's "None" would be read as NaN by pandas.
_GCS_EYE = {1: ("1 No Response", "1 No Response"), 2: ("2 To pain", "To Pain"), 3: ("3 To speech", "To Speech"),
            4: ("4 Spontaneously", "Spontaneously")}  # fmt: skip
_GCS_MOTOR = {1: ("1 No Response", "No response"), 2: ("2 Abnorm extensn", "Abnormal extension"),
              3: ("3 Abnorm flexion", "Abnormal Flexion"), 4: ("4 Flex-withdraws", "Flex-withdraws"),
              5: ("5 Localizes Pain", "Localizes Pain"), 6: ("6 Obeys Commands", "Obeys Commands")}  # fmt: skip
_GCS_VERBAL = {0: ("1.0 ET/Trach", "No Response-ETT"), 1: ("1 No Response", "No Response"),
               2: ("2 Incomp sounds", "Incomprehensible sounds"), 3: ("3 Inapprop words", "Inappropriate Words"),
               4: ("4 Confused", "Confused"), 5: ("5 Oriented", "Oriented")}  # fmt: skip

CLINICAL_MODALITIES_SYNTH: tuple[str, ...] = ("ehr", "cxr", "report")
MANIFEST_MODALITIES: tuple[str, ...] = ("pet", "ct", "report", "labs")
CLINICAL_SHARES: dict[str, float] = {"ehr": 0.40, "cxr": 0.35, "report": 0.25}
"""Fraction of Var(z) carried by each modality of the MIMIC-style cohort."""
MANIFEST_SHARES: dict[str, float] = {"pet": 0.35, "ct": 0.20, "report": 0.20, "labs": 0.25}
"""Fraction of Var(z) carried by each modality of the manifest (PET/CT) cohort."""
LABEL_THRESHOLD = 0.55
"""``y = 1[z + e > 0.55]`` with ``e ~ N(0, 0.35^2)`` gives a prevalence of about 30 %."""
LABEL_NOISE_STD = 0.35
SUPPORTED_TASKS: tuple[str, ...] = ("in-hospital-mortality",)

NOISE_SCALES: dict[str, str] = {
    "ehr": "std in units of each continuous variable's population std (standardised values); categorical untouched",
    "cxr": "std in units of the full intensity range (1.0 = 255 grey levels / 4095 DICOM levels)",
    "report": "probability that each word of FINDINGS/IMPRESSION is swapped for a random vocabulary word (<= 1)",
    "pet": "std in units of 10 SUV",
    "ct": "std in units of 1000 HU",
    "labs": "std in units of each lab's population std",
}
"""What a value in the ``noise`` argument means for each modality."""

_ALL_MODALITIES: tuple[str, ...] = ("ehr", "cxr", "report", "pet", "ct", "labs")

# Continuous EHR variables: (population std used for noise, valid range used for clipping, decimals).
_EHR_CONT = {
    "Diastolic blood pressure": (14.0, (20.0, 160.0), 0),
    "Fraction inspired oxygen": (0.2, (0.21, 1.0), 2),
    "Glucose": (45.0, (30.0, 600.0), 0),
    "Heart Rate": (17.0, (25.0, 220.0), 0),
    "Height": (10.0, (140.0, 205.0), 0),
    "Mean blood pressure": (15.0, (30.0, 180.0), 0),
    "Oxygen saturation": (3.0, (60.0, 100.0), 0),
    "Respiratory rate": (6.0, (4.0, 60.0), 0),
    "Systolic blood pressure": (22.0, (50.0, 250.0), 0),
    "Temperature": (0.8, (33.0, 42.0), 1),
    "Weight": (20.0, (35.0, 200.0), 1),
    "pH": (0.08, (6.8, 7.8), 2),
}

# Report findings: keyword -> (slope on u_report, intercept, positive phrases, negative phrases).
_FINDINGS: dict[str, tuple[float, float, tuple[str, ...], tuple[str, ...]]] = {
    "consolidation": (
        1.8,
        -1.1,
        (
            "Focal consolidation in the {side} lower lobe.",
            "Patchy consolidation at the {side} base, concerning for pneumonia.",
            "Airspace consolidation in the {side} mid and lower lung zones.",
        ),
        ("The lungs are clear.", "No focal airspace disease."),
    ),
    "effusion": (
        1.6,
        -0.9,
        (
            "Small {side} pleural effusion.",
            "Layering {side} pleural effusion.",
            "Moderate bilateral pleural effusions.",
        ),
        ("The costophrenic angles are sharp.", "No pleural abnormality."),
    ),
    "edema": (
        1.6,
        -1.3,
        (
            "Mild pulmonary edema.",
            "Moderate interstitial edema with vascular congestion.",
            "Perihilar haziness consistent with pulmonary edema.",
        ),
        ("Pulmonary vascularity is within normal limits.",),
    ),
    "atelectasis": (
        0.9,
        -0.4,
        (
            "Bibasilar atelectasis.",
            "Linear atelectasis at the {side} base.",
            "Subsegmental atelectasis in the {side} lower lobe.",
        ),
        (),
    ),
    "cardiomegaly": (
        1.2,
        -1.2,
        ("Mild cardiomegaly.", "Moderate cardiomegaly, unchanged."),
        ("Heart size is normal.", "The cardiomediastinal silhouette is within normal limits."),
    ),
}
_REPORT_EXTRAS = (
    "No pneumothorax.",
    "Osseous structures are unremarkable.",
    "Endotracheal tube terminates 4 cm above the carina.",
    "Right internal jugular central venous catheter tip in the SVC.",
    "Nasogastric tube courses below the diaphragm.",
)
_INDICATIONS = ("shortness of breath", "hypoxia", "fever", "sepsis", "chest pain", "altered mental status")
_CHEXPERT = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
    "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)  # fmt: skip

# Manifest (PET/CT) report findings: keyword -> (slope, intercept, phrase).
_PETCT_FINDINGS = {
    "hypermetabolic": (1.7, -0.8, "Hypermetabolic pulmonary nodule with SUVmax {suv:.1f}."),
    "lymphadenopathy": (1.4, -1.0, "FDG-avid mediastinal lymphadenopathy."),
    "metastatic": (1.5, -1.6, "Multiple hepatic lesions suspicious for metastatic disease."),
    "effusion": (1.0, -1.2, "Small malignant-appearing pleural effusion."),
}
_LAB_LOADINGS = (0.85, 0.65, 0.45, 0.0, -0.55)
_LAB_MEANS = (5.0, 140.0, 1.0, 12.0, 3.5)
_LAB_SCALES = (2.0, 4.0, 0.3, 3.0, 0.5)

_CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's registered root


# ----------------------------------------------------------------------------------------------- validation
def _check_rates(values: Mapping[str, float] | None, argument: str, upper_open: bool) -> dict[str, float]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{argument}: expected a mapping modality -> value, got {type(values).__name__}")
    out: dict[str, float] = {}
    for name, value in values.items():
        if name not in _ALL_MODALITIES:
            raise ValueError(
                f"{argument}: unknown modality {name!r}; expected one of {', '.join(_ALL_MODALITIES)} "
                "(ehr/cxr/report for the MIMIC-style cohort, pet/ct/report/labs for the manifest cohort)"
            )
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{argument}[{name!r}]: expected a number, got {value!r}") from None
        if not math.isfinite(v) or v < 0 or (upper_open and v >= 1):
            rng = "[0, 1)" if upper_open else ">= 0"
            raise ValueError(f"{argument}[{name!r}]: expected a value in {rng}, got {value!r}")
        if not upper_open and name == "report" and v > 1:
            raise ValueError(f"{argument}['report']: the report noise is a word-swap probability in [0, 1], got {v}")
        out[name] = v
    return out


def _validate(
    samples: int, missing: Mapping[str, float] | None, noise: Mapping[str, float] | None, task: str,
    image_size: int, dicom_fraction: float,
) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 10:
        raise ValueError(f"samples: expected an integer >= 10 (splits need every class), got {samples!r}")
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"task: expected one of {', '.join(SUPPORTED_TASKS)}, got {task!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 16:
        raise ValueError(f"image_size: expected an integer >= 16 pixels, got {image_size!r}")
    if not (isinstance(dicom_fraction, int | float) and 0.0 <= float(dicom_fraction) <= 1.0):
        raise ValueError(f"dicom_fraction: expected a fraction in [0, 1], got {dicom_fraction!r}")
    return _check_rates(missing, "missing", upper_open=True), _check_rates(noise, "noise", upper_open=False)


# ----------------------------------------------------------------------------------------------- helpers
def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent stream per purpose and sample, so one option never changes another modality's content."""
    return np.random.default_rng([int(seed), *stream])


@overload
def _sigmoid(x: float) -> float: ...
@overload
def _sigmoid(x: np.ndarray) -> np.ndarray: ...
def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def _auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Rank-based AUROC (Mann-Whitney U with mid-ranks); NaN when one class is absent."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=float)
    sorted_scores = np.asarray(score)[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _latent(seed: int, stream: int, n: int, shares: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per-modality components ``u_m``, latent ``z``, label noise and labels ``y``."""
    rng = _rng(seed, stream)
    u = {m: rng.standard_normal(n) for m in shares}
    z = sum(math.sqrt(shares[m]) * u[m] for m in shares)
    e = LABEL_NOISE_STD * rng.standard_normal(n)
    y = (z + e > LABEL_THRESHOLD).astype(int)
    return {"z": np.asarray(z), "y": y, **{f"u_{m}": u[m] for m in shares}}


def _missing_pattern(
    seed: int, stream: int, n: int, modalities: Sequence[str], rates: Mapping[str, float]
) -> np.ndarray:
    """Boolean ``[n, M]`` present flags: exactly ``round(rate * n)`` absent per modality, >= 1 present per row.

    Absent samples are drawn uniformly per modality; a sample that would lose every modality gets one back
    and the loss moves to another sample that keeps at least one modality, so the counts stay exact.

    Raises:
        ValueError: the requested rates cannot be met while keeping one modality per sample.
    """
    rng = _rng(seed, stream)
    m_count = len(modalities)
    drop = np.zeros((n, m_count), dtype=bool)
    for j, m in enumerate(modalities):
        k = int(round(rates.get(m, 0.0) * n))
        if k:
            drop[rng.choice(n, size=k, replace=False), j] = True
    if drop.sum() > (m_count - 1) * n:
        raise ValueError(
            f"missing: rates {dict(rates)} remove {int(drop.sum())} of {m_count * n} modality files, but every "
            f"sample must keep at least one modality (at most {(m_count - 1) * n}); lower the rates"
        )
    for i in np.flatnonzero(drop.all(axis=1)):
        for j in rng.permutation(m_count):
            candidates = np.flatnonzero(~drop[:, j] & (drop.sum(axis=1) <= m_count - 2))
            if len(candidates):
                drop[rng.choice(candidates), j] = True
                drop[i, j] = False
                break
        else:  # pragma: no cover - excluded by the count check above
            raise ValueError(f"missing: rates {dict(rates)} cannot keep one modality per sample")
    return ~drop


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _fmt(value: float, decimals: int) -> str:
    return str(int(round(value))) if decimals == 0 else f"{value:.{decimals}f}"


# ----------------------------------------------------------------------------------------------- EHR
def _gcs_components(total: int, intubated: bool, rng: np.random.Generator) -> tuple[int, int, int]:
    """Split a GCS total (3-15) into eye (1-4), motor (1-6) and verbal (0 = ET/Trach counts as 1, 1-5)."""
    eye, motor, verbal = 4, 6, 5
    if intubated:
        verbal = 0
    deficit = 15 - total - (4 if intubated else 0)
    deficit = max(deficit, 0)
    while deficit > 0:
        options = [c for c, v, lo in (("e", eye, 1), ("m", motor, 1), ("v", verbal, 1)) if v > lo]
        if not options:
            break
        pick = options[int(rng.integers(len(options)))]
        if pick == "e":
            eye -= 1
        elif pick == "m":
            motor -= 1
        else:
            verbal -= 1
        deficit -= 1
    return eye, motor, verbal


def _ehr_table(u: float, rng: np.random.Generator) -> list[dict[str, str]]:
    """One stay's irregular 48 h time series as rows ``{variable: text}`` (``Hours`` included), sorted by time.

    ``u`` (the EHR signal component) raises heart rate, respiratory rate, temperature and glucose, lowers
    oxygen saturation, blood pressure, pH and the GCS, and makes intubation and oxygen therapy likelier.
    """
    rows: dict[float, dict[str, str]] = {}

    def put(t: float, var: str, text: str) -> None:
        t = min(max(t, 0.0), 47.99)
        key = round(t * 3600.0) / 3600.0
        rows.setdefault(key, {})[var] = text

    def val(var: str, x: float) -> str:
        _, (lo, hi), dec = _EHR_CONT[var]
        return _fmt(float(np.clip(x, lo, hi)), dec)

    hr0 = 82 + 11 * u + rng.normal(0, 8)
    hr_trend = 4 * u
    sbp0 = 121 - 6 * u + rng.normal(0, 12)
    rr0 = 18 + 2.5 * u + rng.normal(0, 3)
    spo0 = 97.3 - 1.5 * u + rng.normal(0, 1)
    temp0 = 37.0 + 0.35 * u + rng.normal(0, 0.3)
    glu0 = 135 + 15 * u + rng.normal(0, 25)
    ph0 = 7.39 - 0.03 * u + rng.normal(0, 0.03)
    gcs_deficit0 = max(0.0, 2.2 * (u + 0.3) + rng.normal(0, 1.5))
    intubated = bool(rng.random() < _sigmoid(2.0 * (u - 1.0)))
    on_oxygen = bool(intubated or rng.random() < _sigmoid(u))
    style = 0 if rng.random() < 0.8 else 1  # 0 = MetaVision numbered strings, 1 = CareVue strings

    # vitals: about hourly with jitter, single dropped hours and one optional multi-hour gap
    gap = (rng.uniform(4, 40), 0.0)
    gap = (gap[0], gap[0] + rng.uniform(3, 8)) if rng.random() < 0.5 else (-1.0, -1.0)
    for k in range(48):
        t = k + rng.uniform(-0.25, 0.25)
        if rng.random() < 0.1 or gap[0] <= t < gap[1]:
            continue
        frac = max(t, 0.0) / 48.0
        if rng.random() > 0.03:
            put(t, "Heart Rate", val("Heart Rate", hr0 + hr_trend * frac + rng.normal(0, 4)))
        if rng.random() > 0.1:
            sbp = sbp0 - 3 * u * frac + rng.normal(0, 6)
            dbp = 0.55 * sbp + rng.normal(0, 5)
            put(t, "Systolic blood pressure", val("Systolic blood pressure", sbp))
            put(t, "Diastolic blood pressure", val("Diastolic blood pressure", dbp))
            put(t, "Mean blood pressure", val("Mean blood pressure", (sbp + 2 * dbp) / 3 + rng.normal(0, 2)))
        if rng.random() > 0.05:
            put(t, "Respiratory rate", val("Respiratory rate", rr0 + rng.normal(0, 2)))
        if rng.random() > 0.05:
            put(t, "Oxygen saturation", val("Oxygen saturation", spo0 - 0.8 * u * frac + rng.normal(0, 1)))
    for t in np.arange(0.5, 48, 4.0) + rng.uniform(-0.5, 0.5, 12):
        if rng.random() > 0.1:
            put(t, "Temperature", val("Temperature", temp0 + rng.normal(0, 0.25)))
    for t in np.arange(1.0, 48, 4.0) + rng.uniform(-0.5, 0.5, 12):
        if rng.random() < 0.15:
            continue
        total = int(np.clip(round(15 - gcs_deficit0 + rng.normal(0, 0.7)), 3, 15))
        if intubated:
            total = max(min(total, 11), 3)
        eye, motor, verbal = _gcs_components(total, intubated, rng)
        put(t, "Glascow coma scale eye opening", _GCS_EYE[eye][style])
        put(t, "Glascow coma scale motor response", _GCS_MOTOR[motor][style])
        put(t, "Glascow coma scale verbal response", _GCS_VERBAL[verbal][style])
        put(t, "Glascow coma scale total", str(eye + motor + max(verbal, 1)))
    for t in np.arange(2.0, 48, 6.0) + rng.uniform(-1, 1, 8):
        if rng.random() > 0.2:
            put(t, "Glucose", val("Glucose", glu0 + rng.normal(0, 20)))
    if intubated or rng.random() < 0.5:
        for t in np.arange(3.0, 48, 8.0) + rng.uniform(-2, 2, 6):
            put(t, "pH", val("pH", ph0 + rng.normal(0, 0.02)))
    if on_oxygen:
        fio0 = 0.35 + 0.12 * u + (0.15 if intubated else 0.0)
        for t in np.arange(0.0, 48, 6.0) + rng.uniform(0, 1.5, 8):
            put(t, "Fraction inspired oxygen", val("Fraction inspired oxygen", fio0 + rng.normal(0, 0.05)))
    if rng.random() < 0.3:
        for t in rng.uniform(0, 48, int(rng.integers(2, 5))):
            put(t, "Capillary refill rate", "1.0" if rng.random() < _sigmoid(u - 1.5) else "0.0")
    if rng.random() < 0.6:
        put(rng.uniform(0, 2), "Height", val("Height", rng.normal(170, 10)))
    if rng.random() < 0.85:
        weight = rng.normal(81, 18)
        put(rng.uniform(0, 3), "Weight", val("Weight", weight))
        if rng.random() < 0.3:
            put(rng.uniform(20, 30), "Weight", val("Weight", weight + rng.normal(0, 1.5)))
    out = []
    for t in sorted(rows):
        row = {"Hours": repr(float(t))}
        row.update(rows[t])
        out.append(row)
    return out


def _ehr_noise(table: list[dict[str, str]], sigma: float, rng: np.random.Generator) -> None:
    """Add Gaussian noise (``sigma`` x population std) to every recorded continuous value, in place."""
    for row in table:
        for var, (std, (lo, hi), dec) in _EHR_CONT.items():
            if row.get(var):
                row[var] = _fmt(float(np.clip(float(row[var]) + sigma * std * rng.standard_normal(), lo, hi)), dec)


# ----------------------------------------------------------------------------------------------- CXR
def _cxr_image(u: float, size: int, view: str, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A frontal chest-radiograph-like image in [0, 1] (float32 ``[size, size]``) and its opacity amplitude.

    Anatomy: soft-tissue thorax, two dark lung fields, bright mediastinum/spine and heart shadow (larger on
    AP, as in portable films), faint ribs. Signal: lung opacities (a diffuse haze and 1-3 basal blobs masked
    to the lungs) with amplitude ``0.3 * sigmoid(1.8 u)``. Nuisance: lung size/position and exposure.
    """
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    def ellipse(cx: float, cy: float, rx: float, ry: float, edge: float = 0.08) -> np.ndarray:
        d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        return _sigmoid((1.0 - d) / edge).astype(np.float32)

    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-0.04, 0.04, 2)
    body = ellipse(0.0 + shift[0], 0.12 + shift[1], 0.95 * scale, 1.05 * scale)
    lung_r = ellipse(-0.40 * scale + shift[0], -0.05 + shift[1], 0.30 * scale, 0.62 * scale)  # image left
    lung_l = ellipse(0.40 * scale + shift[0], -0.03 + shift[1], 0.28 * scale, 0.58 * scale)
    lungs = np.clip(lung_r + lung_l, 0.0, 1.0)
    heart_scale = 1.15 if view == "AP" else 1.0
    heart = ellipse(0.14 + shift[0], 0.33 + shift[1], 0.30 * heart_scale * scale, 0.24 * heart_scale * scale)
    spine = _sigmoid((0.11 - np.abs(xx - shift[0])) / 0.03).astype(np.float32) * body
    ribs = (np.cos(2 * np.pi * (yy * 4.5 + 0.35 * xx**2 + rng.uniform(0, 1))) ** 8).astype(np.float32)

    img = 0.05 + 0.42 * body
    img = img - 0.30 * lungs + 0.05 * ribs * lungs
    img = np.maximum(img, 0.62 * heart + (1 - heart) * img)
    img = np.maximum(img, 0.60 * spine + (1 - spine) * img)

    amp = float(0.3 * _sigmoid(1.8 * u))
    opacity = 0.35 * np.ones_like(img)
    for _ in range(int(rng.integers(1, 4))):
        cx = rng.choice([-0.4, 0.4]) * scale + rng.normal(0, 0.08)
        cy = rng.uniform(0.0, 0.35)
        s = rng.uniform(0.15, 0.28)
        opacity += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2)).astype(np.float32)
    img = img + amp * np.clip(opacity, 0, 1.2) * lungs * (1.0 - heart)
    gain, offset = rng.uniform(0.88, 1.12), rng.uniform(-0.03, 0.03)
    img = np.clip(img * gain + offset + rng.normal(0, 0.01, img.shape), 0.0, 1.0)
    return img.astype(np.float32), amp


def _write_jpg(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(path, format="JPEG", quality=95)


def _write_dicom(path: Path, img: np.ndarray, info: Mapping[str, Any]) -> None:
    """A valid CR image DICOM: 16-bit MONOCHROME2 (12 bits stored), explicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    key = [str(info["dicom_id"])]
    sop_uid = generate_uid(prefix=_UID_ROOT, entropy_srcs=[*key, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_CR_SOP_CLASS)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _CR_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(prefix=_UID_ROOT, entropy_srcs=[str(info["study_id"]), "study"])
    ds.SeriesInstanceUID = generate_uid(prefix=_UID_ROOT, entropy_srcs=[*key, "series"])
    ds.Modality = "CR"
    ds.PatientID = str(info["subject_id"])
    ds.PatientName = "Synthetic^Phantom"
    ds.StudyID = str(info["study_id"])
    ds.AccessionNumber = str(info["study_id"])
    ds.StudyDate = str(info["StudyDate"])
    ds.StudyTime = str(info["StudyTime"])
    ds.ViewPosition = str(info["ViewPosition"])
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.PixelSpacing = [round(430.0 / img.shape[0], 4), round(430.0 / img.shape[1], 4)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.round(img * 4095).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------------------------------- reports
def _report_text(u: float, view: str, rng: np.random.Generator) -> tuple[str, str, str, dict[str, bool]]:
    """Header, FINDINGS body and IMPRESSION body of one radiology report; findings drawn with p = sigmoid(a u + b)."""
    sides = ("right", "left")
    present: dict[str, bool] = {}
    sentences: list[str] = []
    impressions: list[str] = []
    for name, (slope, bias, positives, negatives) in _FINDINGS.items():
        has = bool(rng.random() < _sigmoid(slope * u + bias))
        present[name] = has
        side = sides[int(rng.integers(2))]
        if has:
            sentences.append(positives[int(rng.integers(len(positives)))].format(side=side))
            if name == "consolidation":
                impressions.append(f"{side.capitalize()} basilar consolidation, concerning for pneumonia.")
            elif name == "effusion":
                impressions.append("Pleural effusion.")
            elif name == "edema":
                impressions.append("Pulmonary edema.")
        elif negatives and rng.random() < 0.8:
            sentences.append(negatives[int(rng.integers(len(negatives)))])
    if rng.random() < 0.25:  # support devices: nuisance, independent of every signal component
        sentences.insert(0, _REPORT_EXTRAS[2])
    for extra in (_REPORT_EXTRAS[0], _REPORT_EXTRAS[1], _REPORT_EXTRAS[3], _REPORT_EXTRAS[4]):
        if rng.random() < (0.6 if extra == _REPORT_EXTRAS[0] else 0.2):
            sentences.append(extra)
    if not impressions:
        impressions.append("No acute cardiopulmonary process.")
    if len(impressions) > 1:
        impressions = [f"{k + 1}. {s}" for k, s in enumerate(impressions)]
    exam = "CHEST (PORTABLE AP)" if view == "AP" else "CHEST (PA AND LAT)"
    sex = ("man", "woman")[int(rng.integers(2))]
    indication = _INDICATIONS[int(rng.integers(len(_INDICATIONS)))]
    comparison = ("None.", "Chest radiograph ___.")[int(rng.integers(2))]
    reason = ("eval for pneumonia", "eval for acute process", "eval for interval change")[int(rng.integers(3))]
    header = (
        f"                                 FINAL REPORT\n EXAMINATION:  {exam}\n\n"
        f" INDICATION:  ___ year old {sex} with {indication} // {reason}\n\n"
        f" COMPARISON:  {comparison}\n"
    )
    return header, " ".join(sentences), "\n ".join(impressions), present


def _vocabulary() -> list[str]:
    words: set[str] = set()
    for _, _, positives, negatives in _FINDINGS.values():
        for phrase in (*positives, *negatives):
            words.update(phrase.replace("{side}", "right left").replace(".", "").replace(",", "").split())
    for phrase in _REPORT_EXTRAS:
        words.update(phrase.replace(".", "").split())
    return sorted(words)


def _swap_words(text: str, p: float, vocab: Sequence[str], rng: np.random.Generator) -> str:
    """Replace each whitespace-separated word by a random vocabulary word with probability ``p``."""
    if p <= 0:
        return text
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        for k, w in enumerate(words):
            if w and rng.random() < p:
                words[k] = vocab[int(rng.integers(len(vocab)))]
        lines.append(" ".join(words))
    return "\n".join(lines)


def _wrap(text: str, width: int = 78) -> str:
    import textwrap

    return "\n".join(" " + line for line in textwrap.wrap(text, width=width))


# ----------------------------------------------------------------------------------------------- manifest cohort
def _petct_volumes(u_pet: float, u_ct: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """16^3 PET (SUV) and CT (HU) volumes; PET lesion SUVmax and CT lesion radius grow with the signal."""
    size = 16
    c = np.arange(size, dtype=np.float32) - (size - 1) / 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    body = ((xx / 7.0) ** 2 + (yy / 5.5) ** 2 + (zz / 7.5) ** 2) <= 1.0
    lung_r = (((xx + 3.2) / 2.6) ** 2 + ((yy + 0.5) / 3.2) ** 2 + (zz / 5.5) ** 2) <= 1.0
    lung_l = (((xx - 3.2) / 2.6) ** 2 + ((yy + 0.5) / 3.2) ** 2 + (zz / 5.5) ** 2) <= 1.0
    lungs = lung_r | lung_l
    side = 1.0 if rng.random() < 0.5 else -1.0
    centre = np.array([rng.uniform(-2.5, 2.5), rng.uniform(-1.5, 0.5), side * 3.2 + rng.uniform(-0.6, 0.6)])
    dist2 = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2

    suv_max = float(2.0 + 8.0 * _sigmoid(1.5 * u_pet))
    pet = np.where(body, 1.0, 0.0).astype(np.float32)
    pet[lungs] = 0.5
    pet += (zz > 3) * body * 1.0  # liver-like uptake in the lower slices
    pet += suv_max * np.exp(-dist2 / (2 * 1.3**2))
    pet = np.clip(pet + rng.normal(0, 0.1, pet.shape) * body, 0, None).astype(np.float32)

    radius = float(1.0 + 2.5 * _sigmoid(1.5 * u_ct))
    ct = np.full((size,) * 3, -1000.0, dtype=np.float32)
    ct[body] = 40.0
    ct[lungs] = -820.0
    ct[(np.abs(xx) < 1.2) & (yy > 3.0) & body] = 700.0  # spine
    ct[(dist2 <= radius**2) & body] = 35.0
    ct = (ct + rng.normal(0, 12, ct.shape)).astype(np.float32)
    return pet, ct, suv_max


def _petct_report(u: float, suv: float, rng: np.random.Generator) -> tuple[str, dict[str, bool]]:
    parts = ["FDG PET/CT from skull base to mid thigh."]
    present: dict[str, bool] = {}
    for name, (slope, bias, phrase) in _PETCT_FINDINGS.items():
        present[name] = bool(rng.random() < _sigmoid(slope * u + bias))
        if present[name]:
            parts.append(phrase.format(suv=suv))
    if not any(present.values()):
        parts.append("No abnormal FDG uptake.")
    suspicious = any(present.values())
    parts.append(
        "IMPRESSION: " + ("Findings suspicious for malignancy." if suspicious else "No evidence of FDG-avid disease.")
    )
    return " ".join(parts), present


def _write_manifest_cohort(
    root: Path, n: int, seed: int, missing: Mapping[str, float], noise: Mapping[str, float]
) -> dict[str, Any]:
    import nibabel as nib

    lat = _latent(seed, 100, n, MANIFEST_SHARES)
    present = _missing_pattern(seed, 101, n, MANIFEST_MODALITIES, missing)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    lab_cols = [f"lab_{k}" for k in range(len(_LAB_LOADINGS))]
    rows: list[list[Any]] = []
    truth: list[list[Any]] = []
    n_inline = 0
    for i in range(n):
        case = f"case_{i:04d}"
        rng = _rng(seed, 110, i)
        nrng = _rng(seed, 111, i)
        pet, ct, suv = _petct_volumes(float(lat["u_pet"][i]), float(lat["u_ct"][i]), rng)
        text, _ = _petct_report(float(lat["u_report"][i]), suv, rng)
        labs = [
            _LAB_MEANS[k] + _LAB_SCALES[k] * (a * lat["u_labs"][i] + math.sqrt(1 - a * a) * rng.standard_normal())
            for k, a in enumerate(_LAB_LOADINGS)
        ]
        if noise.get("pet"):
            pet = np.clip(pet + 10.0 * noise["pet"] * nrng.standard_normal(pet.shape), 0, None).astype(np.float32)
        if noise.get("ct"):
            ct = (ct + 1000.0 * noise["ct"] * nrng.standard_normal(ct.shape)).astype(np.float32)
        if noise.get("labs"):
            labs = [v + noise["labs"] * _LAB_SCALES[k] * nrng.standard_normal() for k, v in enumerate(labs)]
        if noise.get("report"):
            text = _swap_words(text, noise["report"], sorted(set(text.split())), nrng)
        cells: dict[str, str] = {"pet": "", "ct": "", "report": ""}
        if present[i, 0]:
            cells["pet"] = f"pet/{case}_pet.nii.gz"
            (root / "pet").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(pet, affine), str(root / cells["pet"]))
        if present[i, 1]:
            cells["ct"] = f"ct/{case}_ct.nii.gz"
            (root / "ct").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(ct, affine), str(root / cells["ct"]))
        if present[i, 2]:
            if rng.random() < 0.5:
                cells["report"] = text
                n_inline += 1
            else:
                cells["report"] = f"reports/{case}.txt"
                (root / "reports").mkdir(parents=True, exist_ok=True)
                (root / cells["report"]).write_text(text + "\n")
        lab_cells = [f"{v:.3f}" for v in labs] if present[i, 3] else [""] * len(labs)
        rows.append([case, int(lat["y"][i]), cells["pet"], cells["ct"], cells["report"], *lab_cells])
        truth.append(
            [case, int(lat["y"][i]), f"{lat['z'][i]:.6f}", *[f"{lat[f'u_{m}'][i]:.6f}" for m in MANIFEST_SHARES],
             *[int(p) for p in present[i]]]
        )  # fmt: skip
    _write_csv(root / "manifest.csv", ["case_id", "label", "pet", "ct", "report", *lab_cols], rows)
    _write_csv(
        root / "truth.csv",
        ["case_id", "label", "z", *[f"u_{m}" for m in MANIFEST_SHARES], *[f"present_{m}" for m in MANIFEST_MODALITIES]],
        truth,
    )
    return {
        "samples": n,
        "modalities": list(MANIFEST_MODALITIES),
        "labs_columns": lab_cols,
        "present": {m: int(present[:, j].sum()) for j, m in enumerate(MANIFEST_MODALITIES)},
        "inline_reports": n_inline,
        "prevalence": float(lat["y"].mean()),
        "signal_shares": dict(MANIFEST_SHARES),
        "oracle_auroc": {
            **{m: _auroc(lat[f"u_{m}"], lat["y"]) for m in MANIFEST_SHARES},
            "all": _auroc(lat["z"], lat["y"]),
        },
    }


# ----------------------------------------------------------------------------------------------- main entry
def write_clinical_cohort(
    out: str | os.PathLike,
    samples: int = 200,
    seed: int = 0,
    missing: dict[str, float] | None = None,
    noise: dict[str, float] | None = None,
    overwrite: bool = False,
    task: str = "in-hospital-mortality",
    image_size: int = 64,
    dicom_fraction: float = 0.2,
    manifest_cohort: bool = True,
) -> dict:
    """Write a MIMIC-style EHR + CXR + report cohort (and a PET/CT manifest cohort) with a documented signal.

    Layout under ``out`` (see ``docs/synthetic_clinical.md``)::

        ehr/in-hospital-mortality/{train,test}/<SUBJECT>_episode1_timeseries.csv
        ehr/in-hospital-mortality/{train,val,test}_listfile.csv     stay,period_length,stay_id,y_true
        ehr/root/all_stays.csv
        cxr/files/p10/p<subject>/s<study>/<dicom_id>.jpg (or .dcm for a ``dicom_fraction``)
        cxr/mimic-cxr-2.0.0-{metadata,split,chexpert}.csv
        reports/files/p10/p<subject>/s<study>.txt
        labels.csv  signal.json  [manifest/manifest.csv, manifest/{pet,ct,reports}/, manifest/truth.csv]

    Args:
        out: output folder (created atomically: complete on success, absent on failure).
        samples: number of ICU stays (one per subject), >= 10; also the manifest cohort size.
        seed: seed of every random stream (same seed -> identical files).
        missing: modality -> rate in [0, 1): exactly ``round(rate * samples)`` samples lose that modality's
            file; every sample keeps at least one modality. Names: ehr, cxr, report (MIMIC-style cohort;
            ``report`` also applies to the manifest), pet, ct, labs (manifest cohort).
        noise: modality -> noise level >= 0 applied to every sample (see :data:`NOISE_SCALES`).
        overwrite: replace a non-empty ``out``.
        task: only ``"in-hospital-mortality"``.
        image_size: CXR side in pixels (>= 16).
        dicom_fraction: fraction of CXR images written as DICOM instead of JPG.
        manifest_cohort: also write ``manifest/``.

    Returns:
        Summary dict: ``out``, ``paths``, ``samples``, ``splits``, ``present`` (files per modality),
        ``cxr_pairable`` (AP and inside the first 48 h), ``dicom``, ``prevalence``, ``signal_shares``,
        ``oracle_auroc`` (of the latent components), ``missing``, ``noise`` and ``manifest`` (or None).

    Raises:
        ValueError: invalid argument (names the argument and modality).
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
    """
    missing_r, noise_r = _validate(samples, missing, noise, task, image_size, dicom_fraction)
    n = int(samples)
    seed = int(seed)
    lat = _latent(seed, 0, n, CLINICAL_SHARES)
    present = _missing_pattern(seed, 1, n, CLINICAL_MODALITIES_SYNTH, missing_r)

    # subjects, stays, splits (one stay per subject -> split by subject)
    srng = _rng(seed, 2)
    subject_ids = 10000000 + 1 + np.arange(n) * 7 + srng.integers(0, 7, n)
    stay_ids = 30000000 + np.arange(n) * 1000 + srng.integers(0, 1000, n)
    study_ids = 50000000 + np.arange(n) * 1000 + srng.integers(0, 1000, n)
    n_test, n_val = int(round(0.2 * n)), max(1, int(round(0.1 * n)))
    split = np.array(["train"] * n, dtype=object)
    perm = srng.permutation(n)
    split[perm[:n_test]] = "test"
    split[perm[n_test : n_test + n_val]] = "val"
    base = dt.datetime(2150, 1, 1)
    intime = [base + dt.timedelta(minutes=int(m)) for m in srng.integers(0, 60 * 24 * 365 * 30, n)]
    los_days = 2.0 + srng.gamma(2.0, 2.0, n)
    # study time relative to intime: 85 % inside the first 48 h, the rest before admission or after 48 h
    in_window = srng.random(n) < 0.85
    offsets = np.where(
        in_window,
        srng.uniform(0.5, 47.5, n),
        np.where(srng.random(n) < 0.5, srng.uniform(-96, -3, n), srng.uniform(50, 120, n)),
    )
    views = np.where(srng.random(n) < 0.85, "AP", "PA")
    is_dicom = srng.random(n) < float(dicom_fraction)
    dicom_ids = ["-".join(f"{int(v):08x}" for v in srng.integers(0, 2**32, 5)) for _ in range(n)]

    vocab = _vocabulary()
    with atomic_output_dir(out, overwrite) as tmp:
        ehr_task = tmp / "ehr" / task
        listfiles: dict[str, list[list[Any]]] = {"train": [], "val": [], "test": []}
        stays_rows, meta_rows, split_rows, chexpert_rows, label_rows = [], [], [], [], []
        amps = np.zeros(n)
        for i in range(n):
            sid, stay_id, study_id = int(subject_ids[i]), int(stay_ids[i]), int(study_ids[i])
            stay = f"{sid}_episode1_timeseries.csv"
            folder = "test" if split[i] == "test" else "train"
            u_e, u_c, u_r = (float(lat[f"u_{m}"][i]) for m in CLINICAL_MODALITIES_SYNTH)
            # EHR
            table = _ehr_table(u_e, _rng(seed, 10, i))
            if noise_r.get("ehr"):
                _ehr_noise(table, noise_r["ehr"], _rng(seed, 11, i))
            if present[i, 0]:
                _write_csv(
                    ehr_task / folder / stay,
                    ["Hours", *EHR_VARIABLES],
                    [[row.get("Hours", ""), *(row.get(v, "") for v in EHR_VARIABLES)] for row in table],
                )
            listfiles[str(split[i])].append([stay, "48.0", stay_id, int(lat["y"][i])])
            t_in = intime[i]
            t_out = t_in + dt.timedelta(days=float(los_days[i]))
            died = int(lat["y"][i])
            stays_rows.append([
                sid, 20000000 + i, stay_id, "Medical Intensive Care Unit (MICU)", "Medical Intensive Care Unit (MICU)",
                t_in.strftime("%Y-%m-%d %H:%M:%S"), t_out.strftime("%Y-%m-%d %H:%M:%S"), f"{los_days[i]:.4f}",
                (t_in - dt.timedelta(hours=6)).strftime("%Y-%m-%d %H:%M:%S"),
                (t_out + dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S"),
                t_out.strftime("%Y-%m-%d %H:%M:%S") if died else "", ("M", "F")[i % 2],
                int(40 + (sid * 7919) % 50), died, died,
            ])  # fmt: skip
            # CXR
            study_time = t_in + dt.timedelta(hours=float(offsets[i]))
            study_date = study_time.strftime("%Y%m%d")
            study_clock = study_time.strftime("%H%M%S") + f".{(i * 37) % 1000:03d}"
            img, amps[i] = _cxr_image(u_c, int(image_size), str(views[i]), _rng(seed, 20, i))
            if noise_r.get("cxr"):
                img = np.clip(img + noise_r["cxr"] * _rng(seed, 21, i).standard_normal(img.shape), 0, 1)
            pfolder = f"p{str(sid)[:2]}/p{sid}/s{study_id}"
            ext = "dcm" if is_dicom[i] else "jpg"
            if present[i, 1]:
                img_path = tmp / "cxr" / "files" / pfolder / f"{dicom_ids[i]}.{ext}"
                info = {"dicom_id": dicom_ids[i], "study_id": study_id, "subject_id": sid, "StudyDate": study_date,
                        "StudyTime": study_clock, "ViewPosition": str(views[i])}  # fmt: skip
                if is_dicom[i]:
                    _write_dicom(img_path, img, info)
                else:
                    _write_jpg(img_path, img)
            view_text = "antero-posterior" if views[i] == "AP" else "postero-anterior"
            procedure = "CHEST (PORTABLE AP)" if views[i] == "AP" else "CHEST (PA AND LAT)"
            meta_rows.append([
                dicom_ids[i], sid, study_id, procedure, str(views[i]), image_size, image_size, study_date, study_clock,
                procedure, view_text, "Erect",
            ])  # fmt: skip
            cxr_split = {"train": "train", "val": "validate", "test": "test"}[str(split[i])]
            split_rows.append([dicom_ids[i], study_id, sid, cxr_split])
            # report
            rrng = _rng(seed, 30, i)
            header, findings, impression, found = _report_text(u_r, str(views[i]), rrng)
            if noise_r.get("report"):
                nrng = _rng(seed, 31, i)
                findings = _swap_words(findings, noise_r["report"], vocab, nrng)
                impression = _swap_words(impression, noise_r["report"], vocab, nrng)
            if present[i, 2]:
                rpath = tmp / "reports" / "files" / f"p{str(sid)[:2]}/p{sid}" / f"s{study_id}.txt"
                rpath.parent.mkdir(parents=True, exist_ok=True)
                rpath.write_text(f"{header}\n FINDINGS:\n\n{_wrap(findings)}\n\n IMPRESSION:\n\n {impression}\n")
            chex = {
                "Atelectasis": found["atelectasis"], "Cardiomegaly": found["cardiomegaly"],
                "Consolidation": found["consolidation"], "Edema": found["edema"],
                "Pleural Effusion": found["effusion"], "Pneumonia": found["consolidation"],
                "Lung Opacity": found["consolidation"] or found["edema"],
            }  # fmt: skip
            chex["No Finding"] = not any(chex.values())
            chexpert_rows.append([sid, study_id, *("1.0" if chex.get(c) else "" for c in _CHEXPERT)])
            label_rows.append([
                sid, stay_id, stay, int(lat["y"][i]), str(split[i]), f"{lat['z'][i]:.6f}",
                *(f"{lat[f'u_{m}'][i]:.6f}" for m in CLINICAL_MODALITIES_SYNTH), *(int(p) for p in present[i]),
                study_id, dicom_ids[i], ext, str(views[i]), f"{offsets[i]:.3f}", int(in_window[i]),
                int(in_window[i] and views[i] == "AP"), f"{amps[i]:.5f}",
            ])  # fmt: skip

        for name, rows in listfiles.items():
            _write_csv(ehr_task / f"{name}_listfile.csv", ["stay", "period_length", "stay_id", "y_true"], rows)
        _write_csv(
            tmp / "ehr" / "root" / "all_stays.csv",
            ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los",
             "admittime", "dischtime", "deathtime", "gender", "age", "mortality_inhospital", "mortality"],
            stays_rows,
        )  # fmt: skip
        _write_csv(
            tmp / "cxr" / "mimic-cxr-2.0.0-metadata.csv",
            ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"],
            meta_rows,
        )  # fmt: skip
        split_header = ["dicom_id", "study_id", "subject_id", "split"]
        _write_csv(tmp / "cxr" / "mimic-cxr-2.0.0-split.csv", split_header, split_rows)
        _write_csv(tmp / "cxr" / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *_CHEXPERT], chexpert_rows)
        _write_csv(
            tmp / "labels.csv",
            ["subject_id", "stay_id", "stay", "y_true", "split", "z", "u_ehr", "u_cxr", "u_report", "present_ehr",
             "present_cxr", "present_report", "study_id", "dicom_id", "cxr_format", "view_position",
             "study_offset_hours", "cxr_in_window", "cxr_pairable", "cxr_opacity"],
            label_rows,
        )  # fmt: skip

        manifest_info = None
        if manifest_cohort:
            manifest_info = _write_manifest_cohort(tmp / "manifest", n, seed, missing_r, noise_r)

        oracle = {m: _auroc(lat[f"u_{m}"], lat["y"]) for m in CLINICAL_SHARES}
        oracle["all"] = _auroc(lat["z"], lat["y"])
        signal = {
            "model": "u_m ~ N(0,1) iid; z = sum_m sqrt(share_m) u_m; y = 1[z + e > threshold], e ~ N(0, sd^2)",
            "seed": seed,
            "samples": n,
            "task": task,
            "threshold": LABEL_THRESHOLD,
            "label_noise_std": LABEL_NOISE_STD,
            "signal_shares": dict(CLINICAL_SHARES),
            "prevalence": float(lat["y"].mean()),
            "oracle_auroc": oracle,
            "expression": {
                "ehr": "heart rate 82 + 11 u (+4 u trend over 48 h), SpO2 97.3 - 1.5 u, respiratory rate 18 + 2.5 u, "
                "temperature 37 + 0.35 u, glucose 135 + 15 u, pH 7.39 - 0.03 u, systolic BP 121 - 6 u, "
                "GCS deficit max(0, 2.2 (u + 0.3) + N(0, 1.5)), intubation p = sigmoid(2 (u - 1)), "
                "oxygen therapy p = sigmoid(u); plus per-patient and per-measurement nuisance noise",
                "cxr": "lung-field opacity amplitude 0.3 sigmoid(1.8 u) (intensity range [0, 1]): diffuse haze 0.35 "
                "+ 1-3 basal Gaussian blobs masked to the lungs; nuisance: lung size/position, exposure",
                "report": {k: {"p": f"sigmoid({a} u + {b})"} for k, (a, b, _, _) in _FINDINGS.items()},
            },
            "pairing": {
                "window_hours": [0, 48],
                "in_window_fraction": 0.85,
                "ap_fraction": 0.85,
                "note": "images outside the first 48 h or in PA view must be rejected by MedFuse pairing; "
                "metadata rows are kept for images whose file is missing (missing modality)",
            },
            "missing": missing_r,
            "noise": noise_r,
            "noise_scales": NOISE_SCALES,
            "manifest": None
            if manifest_info is None
            else {
                "signal_shares": dict(MANIFEST_SHARES),
                "expression": {
                    "pet": "lesion SUVmax 2 + 8 sigmoid(1.5 u) on ~1 SUV background",
                    "ct": "lung lesion radius 1 + 2.5 sigmoid(1.5 u) voxels (35 HU in -820 HU lung)",
                    "report": {k: f"p = sigmoid({a} u + {b})" for k, (a, b, _) in _PETCT_FINDINGS.items()},
                    "labs": f"lab_k = mean_k + scale_k (a_k u + sqrt(1 - a_k^2) N(0,1)), a = {list(_LAB_LOADINGS)}",
                },
                "prevalence": manifest_info["prevalence"],
                "oracle_auroc": manifest_info["oracle_auroc"],
            },
        }
        (tmp / "signal.json").write_text(json.dumps(signal, indent=2) + "\n")

    out_path = Path(out)
    summary = {
        "out": str(out_path),
        "paths": {
            "ehr_root": str(out_path / "ehr"),
            "cxr_root": str(out_path / "cxr"),
            "reports_root": str(out_path / "reports"),
            "labels": str(out_path / "labels.csv"),
            "signal": str(out_path / "signal.json"),
            "manifest": str(out_path / "manifest" / "manifest.csv") if manifest_cohort else None,
        },
        "samples": n,
        "splits": {s: int((split == s).sum()) for s in ("train", "val", "test")},
        "present": {m: int(present[:, j].sum()) for j, m in enumerate(CLINICAL_MODALITIES_SYNTH)},
        "cxr_pairable": int((present[:, 1] & in_window & (views == "AP")).sum()),
        "dicom": int((present[:, 1] & is_dicom).sum()),
        "prevalence": float(lat["y"].mean()),
        "signal_shares": dict(CLINICAL_SHARES),
        "oracle_auroc": oracle,
        "missing": missing_r,
        "noise": noise_r,
        "manifest": manifest_info,
    }
    logger.info("wrote synthetic clinical cohort (%d stays) to %s", n, out_path)
    return summary
