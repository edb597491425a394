"""MIMIC-style EHR time series -> fixed-size discretised tensor ``[T, 76]`` (mimic3-benchmarks / MedFuse).

The input is one ``<SUBJECT>_episode<N>_timeseries.csv`` file: an ``Hours`` column (hours since ICU
admission) and the 17 clinical variables of mimic3-benchmarks (``"Glascow"`` is the real column
spelling). Discretisation follows ``mimic3models.preprocessing.Discretizer`` with
``impute_strategy="previous"``, ``start_time="zero"`` and ``store_masks=True``:

- time bins of width ``timestep`` hours cover ``[0, max_hours]``; a row at hour ``t`` goes to bin
  ``int(t / timestep - 1e-6)`` (so ``t = 0`` and ``t = timestep`` both land in bin 0); rows with
  ``t > max_hours`` (or ``t < 0``) are dropped; when several rows of one bin hold a variable, the
  last one wins;
- the number of bins is fixed, ``T = ceil(max_hours / timestep)`` (48 at 1 h for MedFuse, 24 at
  2 h for OmniFuse), so tensors of all stays stack into a batch; bins after the last measurement
  are filled by imputation exactly as mimic3-benchmarks does with ``end=max_hours``;
- the 5 categorical variables are one-hot encoded with the mimic3-benchmarks category lists
  (2 + 8 + 12 + 13 + 12 = 47 columns), the 12 continuous ones take one column each, and 17 mask
  columns (1 = observed in that bin, 0 = imputed) follow: 47 + 12 + 17 = 76 features;
- a variable not observed in a bin takes its previous observed value, or its mimic3-benchmarks
  "normal value" when it has not been observed yet;
- optionally the 12 continuous columns are standardised with means/stds fitted on training
  files (:func:`fit_ehr_normalizer`); one-hot and mask columns are never normalised (as MedFuse).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = [
    "EHR_CHANNELS",
    "EHR_CATEGORICAL_VALUES",
    "EHR_NORMAL_VALUES",
    "EHR_FEATURE_NAMES",
    "EHR_NUM_FEATURES",
    "EHR_CONTINUOUS_COLUMNS",
    "ehr_num_steps",
    "read_ehr_csv",
    "discretize_ehr",
    "fit_ehr_normalizer",
    "load_ehr_normalizer",
    "DiscretizeEHR",
    "DiscretizeEHRd",
]

logger = logging.getLogger(__name__)

_EPS = 1e-6

EHR_CHANNELS: tuple[str, ...] = (
    "Capillary refill rate",
    "Diastolic blood pressure",
    "Fraction inspired oxygen",
    "Glascow coma scale eye opening",
    "Glascow coma scale motor response",
    "Glascow coma scale total",
    "Glascow coma scale verbal response",
    "Glucose",
    "Heart Rate",
    "Height",
    "Mean blood pressure",
    "Oxygen saturation",
    "Respiratory rate",
    "Systolic blood pressure",
    "Temperature",
    "Weight",
    "pH",
)
"""The 17 variables in mimic3-benchmarks order (``id_to_channel``)."""

EHR_CATEGORICAL_VALUES: dict[str, tuple[str, ...]] = {
    "Capillary refill rate": ("0.0", "1.0"),
    "Glascow coma scale eye opening": (
        "To Pain",
        "3 To speech",
        "1 No Response",
        "4 Spontaneously",
        "None",
        "To Speech",
        "Spontaneously",
        "2 To pain",
    ),
    "Glascow coma scale motor response": (
        "1 No Response",
        "3 Abnorm flexion",
        "Abnormal extension",
        "No response",
        "4 Flex-withdraws",
        "Localizes Pain",
        "Flex-withdraws",
        "Obeys Commands",
        "Abnormal Flexion",
        "6 Obeys Commands",
        "5 Localizes Pain",
        "2 Abnorm extensn",
    ),
    "Glascow coma scale total": ("11", "10", "13", "12", "15", "14", "3", "5", "4", "7", "6", "9", "8"),
    "Glascow coma scale verbal response": (
        "1 No Response",
        "No Response",
        "Confused",
        "Inappropriate Words",
        "Oriented",
        "No Response-ETT",
        "5 Oriented",
        "Incomprehensible sounds",
        "1.0 ET/Trach",
        "4 Confused",
        "2 Incomp sounds",
        "3 Inapprop words",
    ),
}
"""Category lists of the categorical variables (mimic3-benchmarks ``possible_values``; order = one-hot order)."""

EHR_NORMAL_VALUES: dict[str, str] = {
    "Capillary refill rate": "0.0",
    "Diastolic blood pressure": "59.0",
    "Fraction inspired oxygen": "0.21",
    "Glascow coma scale eye opening": "4 Spontaneously",
    "Glascow coma scale motor response": "6 Obeys Commands",
    "Glascow coma scale total": "15",
    "Glascow coma scale verbal response": "5 Oriented",
    "Glucose": "128.0",
    "Heart Rate": "86",
    "Height": "170.0",
    "Mean blood pressure": "77.0",
    "Oxygen saturation": "98.0",
    "Respiratory rate": "19",
    "Systolic blood pressure": "118.0",
    "Temperature": "36.6",
    "Weight": "81.0",
    "pH": "7.4",
}
"""Values imputed before a variable's first observation (mimic3-benchmarks ``normal_values``)."""


def _build_layout() -> tuple[dict[str, int], list[str], list[int]]:
    begin: dict[str, int] = {}
    names: list[str] = []
    continuous: list[int] = []
    for ch in EHR_CHANNELS:
        begin[ch] = len(names)
        if ch in EHR_CATEGORICAL_VALUES:
            names.extend(f"{ch}->{v}" for v in EHR_CATEGORICAL_VALUES[ch])
        else:
            continuous.append(len(names))
            names.append(ch)
    names.extend(f"mask->{ch}" for ch in EHR_CHANNELS)
    return begin, names, continuous


_BEGIN, _NAMES, _CONT = _build_layout()
EHR_FEATURE_NAMES: tuple[str, ...] = tuple(_NAMES)
"""Name of each of the 76 feature columns (mimic3-benchmarks header: ``"<var>-><value>"``, ``"mask-><var>"``)."""
EHR_NUM_FEATURES: int = len(EHR_FEATURE_NAMES)
EHR_CONTINUOUS_COLUMNS: tuple[int, ...] = tuple(_CONT)
"""Positions of the 12 continuous variables in the 76 features (the columns a normaliser touches)."""
_CHANNEL_INDEX = {ch: i for i, ch in enumerate(EHR_CHANNELS)}
_N_VALUE_COLS = EHR_NUM_FEATURES - len(EHR_CHANNELS)


def ehr_num_steps(timestep: float = 1.0, max_hours: float = 48.0) -> int:
    """Number of time bins ``T = ceil(max_hours / timestep)``.

    Raises:
        ValueError: non-positive ``timestep`` or ``max_hours``.
    """
    if not (timestep > 0 and math.isfinite(timestep)):
        raise ValueError(f"EHR timestep: expected a positive number of hours, got {timestep!r}.")
    if not (max_hours > 0 and math.isfinite(max_hours)):
        raise ValueError(f"EHR max_hours: expected a positive number of hours, got {max_hours!r}.")
    return int(math.ceil(max_hours / timestep - _EPS))


def read_ehr_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a timeseries CSV with every cell as a string (empty cell = ``""``).

    Cells are kept verbatim so that categorical values such as ``"None"`` (a Glasgow eye-opening
    category) are not turned into NaN by pandas' default NA parsing.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be parsed as CSV or decoded as UTF-8 (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"EHR timeseries file {p} does not exist.")
    try:
        return pd.read_csv(p, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"EHR timeseries file {p}: cannot be read as a CSV table ({err}).") from err


def _cell_str(value: Any) -> str:
    """A cell as a stripped string; NaN/None -> ``""`` (missing)."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if value is pd.NA or value is pd.NaT:
        return ""
    return str(value).strip()


def _category_index(channel: str, value: str, source: str, hours: str) -> int:
    cats = EHR_CATEGORICAL_VALUES[channel]
    if value in cats:
        return cats.index(value)
    # numeric categories ("0.0"/"1.0", "3".."15"): accept "1", "1.0", "15.0", ...
    try:
        num = float(value)
    except ValueError:
        num = None
    if num is not None:
        for i, c in enumerate(cats):
            try:
                if float(c) == num:
                    return i
            except ValueError:
                continue
    raise ValueError(
        f"EHR timeseries {source}: column {channel!r} at Hours={hours} has unknown category {value!r}; "
        f"expected one of {list(cats)}."
    )


def _float_value(channel: str, value: str, source: str, hours: str) -> float:
    try:
        num = float(value)
    except ValueError:
        raise ValueError(
            f"EHR timeseries {source}: column {channel!r} at Hours={hours} holds non-numeric value {value!r}; "
            "expected a number or an empty cell."
        ) from None
    if not math.isfinite(num):
        raise ValueError(
            f"EHR timeseries {source}: column {channel!r} at Hours={hours} holds {value!r} (not finite); "
            "expected a finite number or an empty cell."
        )
    return num


def discretize_ehr(
    frame: pd.DataFrame,
    timestep: float = 1.0,
    max_hours: float = 48.0,
    source: str = "<DataFrame>",
) -> np.ndarray:
    """Discretise one stay's time series (no normalisation).

    Args:
        frame: table with an ``Hours`` column and the 17 variables of :data:`EHR_CHANNELS`
            (extra columns are ignored). Cells may be strings or numbers; empty strings, NaN and
            None mean "not measured".
        timestep: bin width in hours.
        max_hours: covered window ``[0, max_hours]``.
        source: file name used in error messages.

    Returns:
        float32 array ``[T, 76]`` with ``T = ehr_num_steps(timestep, max_hours)``.

    Raises:
        ValueError: missing columns (all listed), non-numeric or non-finite ``Hours`` or continuous
            values, decreasing ``Hours``, unknown categorical values. Each message names the source,
            the column and the offending value.
    """
    n_bins = ehr_num_steps(timestep, max_hours)
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"EHR timeseries {source}: expected a pandas DataFrame, got {type(frame).__name__}.")
    missing = [c for c in ("Hours", *EHR_CHANNELS) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"EHR timeseries {source}: missing column(s) {missing}; expected 'Hours' + {list(EHR_CHANNELS)}."
        )

    values = np.zeros((n_bins, _N_VALUE_COLS), dtype=np.float64)
    mask = np.zeros((n_bins, len(EHR_CHANNELS)), dtype=np.float64)
    observed: list[dict[int, str]] = [{} for _ in range(n_bins)]  # bin -> {channel_id: raw value}

    def write(bin_id: int, channel: str, value: str, hours: str) -> None:
        start = _BEGIN[channel]
        if channel in EHR_CATEGORICAL_VALUES:
            n = len(EHR_CATEGORICAL_VALUES[channel])
            values[bin_id, start : start + n] = 0.0
            values[bin_id, start + _category_index(channel, value, source, hours)] = 1.0
        else:
            values[bin_id, start] = _float_value(channel, value, source, hours)

    hours_col = [_cell_str(v) for v in frame["Hours"].tolist()]
    columns = {ch: frame[ch].tolist() for ch in EHR_CHANNELS}
    prev_t = -math.inf
    for row, h in enumerate(hours_col):
        if h == "":
            raise ValueError(
                f"EHR timeseries {source}: column 'Hours' is empty in data row {row + 1}; expected a number."
            )
        t = _float_value("Hours", h, source, h)
        if t < prev_t - _EPS:
            raise ValueError(
                f"EHR timeseries {source}: column 'Hours' decreases at data row {row + 1} ({prev_t} -> {t}); "
                "expected rows sorted by time."
            )
        prev_t = t
        for ch in EHR_CHANNELS:  # validate every cell, also those outside the window
            cell = _cell_str(columns[ch][row])
            if cell == "":
                continue
            if ch in EHR_CATEGORICAL_VALUES:
                _category_index(ch, cell, source, h)
            else:
                _float_value(ch, cell, source, h)
        if t > max_hours + _EPS or t < -_EPS:
            continue
        bin_id = min(max(int(t / timestep - _EPS), 0), n_bins - 1)
        for ch in EHR_CHANNELS:
            cell = _cell_str(columns[ch][row])
            if cell == "":
                continue
            cid = _CHANNEL_INDEX[ch]
            mask[bin_id, cid] = 1.0
            write(bin_id, ch, cell, h)
            observed[bin_id][cid] = cell

    last: dict[int, str] = {}
    for bin_id in range(n_bins):
        for cid, ch in enumerate(EHR_CHANNELS):
            if mask[bin_id, cid]:
                last[cid] = observed[bin_id][cid]
                continue
            write(bin_id, ch, last.get(cid, EHR_NORMAL_VALUES[ch]), "<imputed>")
    return np.concatenate([values, mask], axis=1).astype(np.float32)


def fit_ehr_normalizer(
    paths: Iterable[str | os.PathLike],
    timestep: float = 1.0,
    max_hours: float = 48.0,
    output_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fit means/stds of the 12 continuous features on training files (mimic3-benchmarks ``Normalizer``).

    Statistics run over every time bin of every discretised file (imputed bins included, as in
    mimic3-benchmarks); std uses ``N - 1`` and is floored at ``1e-7``.

    Args:
        paths: training timeseries CSV files.
        timestep: bin width in hours (must match the transform that will use the statistics).
        max_hours: covered window.
        output_path: when given, the result is written there as JSON.

    Returns:
        ``{"columns": [12 feature names], "means": [12], "stds": [12], "timestep", "max_hours", "n_files"}``.

    Raises:
        ValueError: no files, or a file fails discretisation (see :func:`discretize_ehr`).
    """
    total = np.zeros(len(EHR_CONTINUOUS_COLUMNS))
    total_sq = np.zeros(len(EHR_CONTINUOUS_COLUMNS))
    count = 0
    n_files = 0
    cols = list(EHR_CONTINUOUS_COLUMNS)
    for p in paths:
        x = discretize_ehr(read_ehr_csv(p), timestep, max_hours, source=str(p))[:, cols].astype(np.float64)
        total += x.sum(axis=0)
        total_sq += (x**2).sum(axis=0)
        count += x.shape[0]
        n_files += 1
    if n_files == 0:
        raise ValueError("fit_ehr_normalizer: expected at least one training timeseries file, got none.")
    means = total / count
    var = (total_sq - 2.0 * total * means + count * means**2) / max(count - 1, 1)
    stds = np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-7)
    stats: dict[str, Any] = {
        "columns": [EHR_FEATURE_NAMES[c] for c in cols],
        "means": means.tolist(),
        "stds": stds.tolist(),
        "timestep": float(timestep),
        "max_hours": float(max_hours),
        "n_files": n_files,
    }
    if output_path is not None:
        Path(output_path).write_text(json.dumps(stats, indent=2))
    return stats


def load_ehr_normalizer(normalizer: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """Validate normaliser statistics (a dict from :func:`fit_ehr_normalizer` or its JSON file).

    Returns:
        ``{"means": float32 [12], "stds": float32 [12]}``.

    Raises:
        FileNotFoundError: the JSON file does not exist.
        ValueError: missing keys, wrong lengths, non-finite or non-positive stds.
    """
    source = "<dict>"
    if isinstance(normalizer, (str, os.PathLike)):
        source = str(normalizer)
        p = Path(normalizer)
        if not p.is_file():
            raise FileNotFoundError(f"EHR normaliser file {p} does not exist.")
        try:
            normalizer = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"EHR normaliser file {p}: not valid JSON ({err}).") from err
    if not isinstance(normalizer, Mapping):
        raise ValueError(f"EHR normaliser {source}: expected a mapping with 'means' and 'stds'.")
    n = len(EHR_CONTINUOUS_COLUMNS)
    out = {}
    for key in ("means", "stds"):
        if key not in normalizer:
            raise ValueError(
                f"EHR normaliser {source}: missing key {key!r}; expected 'means' and 'stds' of length {n}."
            )
        arr = np.asarray(normalizer[key], dtype=np.float64)
        if arr.shape != (n,) or not np.all(np.isfinite(arr)):
            raise ValueError(f"EHR normaliser {source}: {key!r} must be {n} finite numbers, got shape {arr.shape}.")
        out[key] = arr.astype(np.float32)
    if np.any(out["stds"] <= 0):
        raise ValueError(f"EHR normaliser {source}: 'stds' must be positive.")
    return out


class DiscretizeEHR(Transform):
    """Discretise a timeseries table to a float32 tensor ``[T, 76]`` (see the module docstring).

    Args:
        timestep: bin width in hours (1.0 MedFuse, 2.0 OmniFuse).
        max_hours: covered window; ``T = ceil(max_hours / timestep)``.
        normalizer: ``None`` (no normalisation), a dict from :func:`fit_ehr_normalizer` or the path of
            its JSON file; standardises the 12 continuous columns.
    """

    def __init__(
        self,
        timestep: float = 1.0,
        max_hours: float = 48.0,
        normalizer: Mapping[str, Any] | str | os.PathLike | None = None,
    ) -> None:
        self.timestep = float(timestep)
        self.max_hours = float(max_hours)
        self.num_steps = ehr_num_steps(self.timestep, self.max_hours)
        self.stats = None if normalizer is None else load_ehr_normalizer(normalizer)

    def __call__(self, data: pd.DataFrame | str | os.PathLike, source: str | None = None) -> torch.Tensor:
        """Discretise one stay.

        Args:
            data: a DataFrame (read with ``dtype=str, keep_default_na=False`` to keep category
                strings such as ``"None"``) or the path of the CSV file.
            source: name used in error messages (defaults to the path or ``"<DataFrame>"``).

        Returns:
            float32 tensor ``[T, 76]``.
        """
        if isinstance(data, (str, os.PathLike)):
            source = source or str(data)
            data = read_ehr_csv(data)
        arr = discretize_ehr(data, self.timestep, self.max_hours, source=source or "<DataFrame>")
        if self.stats is not None:
            cols = list(EHR_CONTINUOUS_COLUMNS)
            arr[:, cols] = (arr[:, cols] - self.stats["means"]) / self.stats["stds"]
        return torch.from_numpy(arr)


class DiscretizeEHRd(MapTransform):
    """Dictionary version of :class:`DiscretizeEHR`: each key holds a CSV path or a DataFrame.

    Args:
        keys: keys to transform.
        timestep: bin width in hours.
        max_hours: covered window.
        normalizer: see :class:`DiscretizeEHR`.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection,
        timestep: float = 1.0,
        max_hours: float = 48.0,
        normalizer: Mapping[str, Any] | str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = DiscretizeEHR(timestep, max_hours, normalizer)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each key's path/DataFrame by its ``[T, 76]`` tensor."""
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if value is None:
                raise ValueError(
                    f"DiscretizeEHRd: key {key!r} is None (missing modality); use the missing-aware "
                    "LoadModalitiesByKindd to zero-fill missing EHR."
                )
            d[key] = self.transform(value, source=None if isinstance(value, pd.DataFrame) else str(value))
        return d
