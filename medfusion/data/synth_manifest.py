"""A generated CSV-manifest cohort shaped like real clinical data: CXR + long notes + sparse EHR columns.

What real cohorts break and phantoms usually don't, all on purpose here (``docs/synthetic_clinical.md``):

- several rows (images) per patient (``patient_id``), the outcome is per patient;
- an imbalanced outcome (default 81/19 rows);
- free-text notes inline in the CSV, with commas, quotes and newlines, most longer than 255 bytes and some longer
  than 4096 characters; some notes empty;
- sparse EHR columns in raw units (heart rate, lactate, ...), each missing at its own rate and written as an
  empty cell or ``NA``; a yes/no column (``ventilated``) and an M/F column (``sex``); some rows with no EHR value at
  all (EHR absent);
- image paths whose files do not exist (absent files) and empty image cells;
- ids that are not called ``case_id`` (``image_id``) and a label column called ``outcome``.

Signal model (per patient p)::

    u_m ~ N(0, 1) for m in (ehr, cxr, note);   z = sum_m sqrt(share_m) u_m;   y = 1[z + e > t],  e ~ N(0, 0.35^2)

with ``t`` chosen so that ``positive_rate`` of the ROWS are positive. EHR feature k of a row:
``mean_k + sd_k (a_k u_ehr + sqrt(1 - a_k^2) n)`` (``n`` ~ N(0, 1) per row), ``ventilated`` = yes with
probability ``sigmoid(1.5 u_ehr - 1.2)``; the image opacity grows with ``u_cxr`` (+ per-image noise); note
phrases appear with probabilities ``sigmoid(a u_note + b)``. So a logistic regression on the EHR columns finds
the EHR share of the signal, and every modality alone is better than chance.

Use :func:`write_manifest_cohort`; the command line is ``medfusion synth manifest OUT --rows 250``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, cast

import numpy as np

from medfusion.data.synth_clinical import LABEL_NOISE_STD, _auroc, _cxr_image, _rng, _sigmoid, _write_csv, _write_jpg
from medfusion.io import atomic_output_dir

__all__ = ["MANIFEST_COHORT_SHARES", "EHR_COLUMNS", "write_manifest_cohort", "cohort_bundle_overrides"]

logger = logging.getLogger(__name__)

MANIFEST_COHORT_SHARES: dict[str, float] = {"ehr": 0.5, "cxr": 0.3, "note": 0.2}
"""Fraction of Var(z) carried by each modality."""

# column: (mean, sd, loading a_k on u_ehr, missing rate, decimals, NA token used for empty cells)
_EHR: dict[str, tuple[float, float, float, float, int, str]] = {
    "age": (64.0, 14.0, 0.25, 0.02, 0, ""),
    "heart_rate": (88.0, 16.0, 0.5, 0.15, 0, ""),
    "resp_rate": (20.0, 5.0, 0.5, 0.25, 0, ""),
    "spo2": (95.0, 3.0, -0.45, 0.15, 0, ""),
    "temperature": (37.1, 0.7, 0.3, 0.35, 1, "NA"),
    "lactate": (1.8, 1.1, 0.65, 0.6, 1, "NA"),
    "wbc": (10.5, 4.0, 0.45, 0.5, 1, ""),
}
_CATEGORICAL_MISSING = {"sex": 0.02, "ventilated": 0.1}
EHR_COLUMNS: tuple[str, ...] = (*_EHR, *_CATEGORICAL_MISSING)
"""The EHR feature columns (a tabular modality) in CSV order."""

_NOTE_FINDINGS = (
    # (slope on u_note, intercept, phrase when present)
    (1.6, -0.6, "Worsening respiratory distress overnight, now on high-flow nasal cannula with increasing FiO2."),
    (1.4, -1.0, "New bilateral infiltrates; concern for evolving ARDS, discussed with the ICU team."),
    (1.2, -0.8, "Hypotensive episode requiring a fluid bolus; norepinephrine started at low dose."),
    (1.3, -1.2, "Acute kidney injury with rising creatinine, urine output < 0.5 ml/kg/h."),
    (-1.4, 0.2, "Clinically improving, tolerating room air, mobilising with physiotherapy."),
    (-1.2, 0.0, "Afebrile for 48 h; antibiotics narrowed according to sensitivities."),
)
_NOTE_FILLER = (
    "Patient seen and examined on the morning round, history reviewed with the family.",
    "Medications reconciled; home antihypertensives held, anticoagulation continued (prophylactic dose).",
    "Lines: right IJ CVC day 3, arterial line in situ, peripheral cannula x2; all sites clean.",
    'Nursing notes: slept intermittently, pain controlled (score 3/10), "feels a bit better" per patient.',
    "Nutrition: enteral feeding at goal rate, glucose 6-10 mmol/l on sliding scale insulin.",
    "Plan discussed with the attending, the patient and the next of kin; code status full.",
    "Labs pending: blood cultures x2, procalcitonin, repeat ABG in 4 h; chest film ordered.",
    "Skin intact, pressure areas checked, repositioned 2-hourly; no new wounds.",
)


def _note(u: float, age: int, sex: str, rng: np.random.Generator, long: bool) -> str:
    parts = [f"ICU PROGRESS NOTE\nHistory: {age}-year-old {'man' if sex == 'M' else 'woman'} admitted with dyspnoea."]
    findings = [p for a, b, p in _NOTE_FINDINGS if rng.random() < _sigmoid(a * u + b)]
    if not findings:
        findings = ["No acute events overnight."]
    parts.append("FINDINGS:\n" + " ".join(findings))
    n_fill = int(rng.integers(8, 16)) if long else int(rng.integers(2, 7))
    filler = [str(_NOTE_FILLER[i % len(_NOTE_FILLER)]) for i in rng.integers(0, len(_NOTE_FILLER), n_fill)]
    parts.append("Assessment and plan, by system:\n" + "\n".join(f"- {f}" for f in filler))
    if long:  # a pasted medication list / flowsheet makes some notes several kB long
        meds = rng.integers(1, 400, (200, 2))
        parts.append("Medication list: " + ", ".join(f"drug_{int(k)} {int(d)} mg" for k, d in meds))
    return "\n\n".join(parts)


def write_manifest_cohort(
    out: str | os.PathLike,
    rows: int = 250,
    seed: int = 0,
    positive_rate: float = 0.19,
    image_size: int = 64,
    absent_file_rate: float = 0.05,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``manifest.csv``, ``images/``, ``truth.csv`` and ``signal.json`` under ``out`` (atomically).

    Args:
        out: output folder (must not exist or be empty unless ``overwrite``).
        rows: manifest rows (images), >= 20.
        seed: seed of every random stream.
        positive_rate: fraction of rows with ``outcome`` 1, in (0, 0.5].
        image_size: CXR side in pixels (>= 16).
        absent_file_rate: fraction of rows whose image path points to a file that is not written.
        overwrite: replace a non-empty ``out``.

    Returns:
        Summary: ``manifest``, ``rows``, ``patients``, ``positive_rate`` (measured), ``columns`` (id, group,
        label, image, note, ehr list), ``present`` per modality, ``absent_files``, ``notes_over_255_bytes``,
        ``notes_over_4096_chars``, ``ehr_absent_rows``, ``oracle_auroc`` (latent components, per row).

    Raises:
        ValueError: invalid argument. FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
    """
    if isinstance(rows, bool) or not isinstance(rows, int | np.integer) or rows < 20:
        raise ValueError(f"rows: expected an integer >= 20, got {rows!r}")
    if not 0.0 < float(positive_rate) <= 0.5:
        raise ValueError(f"positive_rate: expected a fraction in (0, 0.5], got {positive_rate!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer) or image_size < 16:
        raise ValueError(f"image_size: expected an integer >= 16 pixels, got {image_size!r}")
    if not 0.0 <= float(absent_file_rate) < 0.5:
        raise ValueError(f"absent_file_rate: expected a fraction in [0, 0.5), got {absent_file_rate!r}")
    n = int(rows)
    prng = _rng(seed, 200)
    counts: list[int] = []
    while sum(counts) < n:  # 1-6 images per patient, mean ~2.5
        counts.append(int(min(6, 1 + prng.poisson(1.5))))
    counts[-1] -= sum(counts) - n
    n_pat = len(counts)
    patient_of_row = np.repeat(np.arange(n_pat), counts)
    u = {m: prng.standard_normal(n_pat) for m in MANIFEST_COHORT_SHARES}
    z = cast(np.ndarray, sum(math.sqrt(s) * u[m] for m, s in MANIFEST_COHORT_SHARES.items()))  # a sum of arrays
    score = z + LABEL_NOISE_STD * prng.standard_normal(n_pat)
    # threshold: the smallest patient score such that the rows above it are at most positive_rate of all rows
    order = np.argsort(-score)
    pos_rows = np.cumsum(np.asarray(counts)[order])
    k = int(np.searchsorted(pos_rows, positive_rate * n, side="right"))
    y_pat = np.zeros(n_pat, dtype=int)
    y_pat[order[: max(k, 1)]] = 1
    sex = np.where(prng.random(n_pat) < 0.55, "M", "F")
    age_noise = prng.standard_normal(n_pat)

    header = ["image_id", "patient_id", "outcome", "image_path", "note", *EHR_COLUMNS]
    csv_rows: list[list[Any]] = []
    truth: list[list[Any]] = []
    stats = {"absent_files": 0, "empty_images": 0, "empty_notes": 0, "ehr_absent": 0, "long": 0, "very_long": 0}
    present = {"cxr": 0, "note": 0, "ehr": 0}
    with atomic_output_dir(out, overwrite) as tmp:
        for i in range(n):
            p = int(patient_of_row[i])
            rng = _rng(seed, 210, i)
            image_id = f"img{i:05d}"
            patient = f"P{p:04d}"
            # image: present / path to an absent file / empty cell
            r = rng.random()
            if r < absent_file_rate:
                cell_img = f"images/{image_id}.jpg"  # written in the manifest, file never created
                stats["absent_files"] += 1
                state = "absent"
            elif r < absent_file_rate + 0.03:
                cell_img = ""
                stats["empty_images"] += 1
                state = "empty"
            else:
                img, _ = _cxr_image(float(u["cxr"][p] + 0.4 * rng.standard_normal()), int(image_size), "AP", rng)
                _write_jpg(tmp / "images" / f"{image_id}.jpg", img)
                cell_img = f"images/{image_id}.jpg"
                present["cxr"] += 1
                state = "present"
            # EHR columns (raw units, sparse)
            all_missing = rng.random() < 0.06
            cells = []
            for col, (mean, sd, a, miss, dec, na) in _EHR.items():
                if all_missing or rng.random() < miss:
                    cells.append(na)
                    continue
                noise = age_noise[p] if col == "age" else rng.standard_normal()
                v = mean + sd * (a * u["ehr"][p] + math.sqrt(1 - a * a) * noise)
                cells.append(str(int(round(v))) if dec == 0 else f"{v:.{dec}f}")
            cells.append("" if all_missing or rng.random() < _CATEGORICAL_MISSING["sex"] else str(sex[p]))
            vent = rng.random() < _sigmoid(1.5 * u["ehr"][p] - 1.2)
            vent_missing = all_missing or rng.random() < _CATEGORICAL_MISSING["ventilated"]
            cells.append("" if vent_missing else ("yes" if vent else "no"))
            if all(c in ("", "NA") for c in cells):
                stats["ehr_absent"] += 1
            else:
                present["ehr"] += 1
            # note
            if rng.random() < 0.08:
                note = ""
                stats["empty_notes"] += 1
            else:
                age = int(round(_EHR["age"][0] + _EHR["age"][1] * age_noise[p]))
                note = _note(float(u["note"][p]), age, str(sex[p]), rng, long=rng.random() < 0.05)
                present["note"] += 1
                stats["long"] += len(note.encode()) > 255
                stats["very_long"] += len(note) > 4096
            csv_rows.append([image_id, patient, int(y_pat[p]), cell_img, note, *cells])
            truth.append([image_id, patient, int(y_pat[p]), f"{z[p]:.6f}", *(f"{u[m][p]:.6f}" for m in u), state])
        _write_csv(tmp / "manifest.csv", header, csv_rows)
        _write_csv(tmp / "truth.csv", ["image_id", "patient_id", "y", "z", *(f"u_{m}" for m in u), "image"], truth)
        y_rows = y_pat[patient_of_row]
        info: dict[str, Any] = {
            "manifest": str(Path(out) / "manifest.csv"),
            "rows": n,
            "patients": n_pat,
            "positive_rate": float(y_rows.mean()),
            "columns": {
                "id": "image_id",
                "group": "patient_id",
                "label": "outcome",
                "image": "image_path",
                "note": "note",
                "ehr": list(EHR_COLUMNS),
            },
            "present": present,
            "absent_files": stats["absent_files"],
            "empty_image_cells": stats["empty_images"],
            "empty_notes": stats["empty_notes"],
            "ehr_absent_rows": stats["ehr_absent"],
            "notes_over_255_bytes": stats["long"],
            "notes_over_4096_chars": stats["very_long"],
            "signal_shares": dict(MANIFEST_COHORT_SHARES),
            "oracle_auroc": {
                **{m: _auroc(u[m][patient_of_row], y_rows) for m in u},
                "all": _auroc(z[patient_of_row], y_rows),
            },
            "seed": int(seed),
            "model": "u_m ~ N(0,1) per patient; z = sum_m sqrt(share_m) u_m; y = 1[z + e > t] per patient, "
            "t chosen for positive_rate of rows",
        }
        (tmp / "signal.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("wrote a %d-row manifest cohort (%d patients) to %s", n, n_pat, out)
    return info


def cohort_bundle_overrides(info_or_dir: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """``clinical_fusion`` bundle overrides that read a cohort of :func:`write_manifest_cohort`.

    The modalities are ``cxr`` (kind ``image``), ``report`` (kind ``text``: the notes) and ``vitals`` (the EHR
    column group, hence kind ``tabular``); the bundle's default kinds and encoders cover all three.

    Args:
        info_or_dir: the returned summary, or the cohort folder (its ``signal.json`` is read).

    Returns:
        ``{"data_layout": "manifest", "manifest_csv": ..., "case_id_column": "image_id", "label_column":
        "outcome", "group_column": "patient_id", "modalities": ["cxr", "report", "vitals"], "manifest_columns":
        {...}}``.
    """
    if isinstance(info_or_dir, dict):
        info = info_or_dir
    else:
        info = json.loads((Path(info_or_dir) / "signal.json").read_text())
        info["manifest"] = str(Path(info_or_dir) / "manifest.csv")
    cols = info["columns"]
    return {
        "data_layout": "manifest",
        "manifest_csv": info["manifest"],
        "case_id_column": cols["id"],
        "label_column": cols["label"],
        "group_column": cols["group"],
        "modalities": ["cxr", "report", "vitals"],
        "manifest_columns": {"cxr": cols["image"], "report": cols["note"], "vitals": list(cols["ehr"])},
    }
