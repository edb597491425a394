"""MIMIC-style folders (mimic3-benchmarks EHR + MIMIC-CXR images + reports) -> MONAI datalist.

Layout (see ``DATA.md``, "Clinical multimodal"):

- ``<ehr_root>/<task>/{train,val,test}_listfile.csv``; the time series of train and val stays live in
  ``<ehr_root>/<task>/train/``, those of test stays in ``<ehr_root>/<task>/test/``;
- ``<ehr_root>/root/all_stays.csv`` with ``subject_id, stay_id, intime, outtime``;
- ``<cxr_root>/mimic-cxr-2.0.0-metadata.csv`` (or ``.csv.gz``) with ``dicom_id, subject_id, study_id,
  ViewPosition, StudyDate (YYYYMMDD), StudyTime (HHMMSS.f)``;
- images ``<cxr_root>/files/p<first 2 digits>/p<subject_id>/s<study_id>/<dicom_id>.jpg`` (or ``.dcm``,
  ``.png``);
- reports ``<reports_root>/files/p<first 2 digits>/p<subject_id>/s<study_id>.txt`` (MIMIC-CXR ships
  them next to the study folders, so ``reports_root`` defaults to ``cxr_root``).

Pairing follows MedFuse: images of the stay's subject with a view in ``views``, taken between
``intime`` and ``intime + window_hours`` (in-hospital mortality) or between ``intime`` and
``outtime`` (phenotyping); the latest such image whose file exists is used, and the report of the
same study. A stay without a paired image (or report), or whose time series file is absent, keeps
its item with that modality ``None`` (absent time series are logged; if none of a listfile's time
series exist the layout is wrong and an error is raised).

A dataset folder (:class:`MimicLayout`, ``mimic`` in :mod:`medfusion.data.layout`) is either a mimic3-benchmarks
root (holding ``root/all_stays.csv``) or a folder holding ``ehr/``, ``cxr/`` and ``reports/`` (what ``medfusion
synth clinical`` writes); :meth:`MimicLayout.roots` finds the three roots in it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medfusion.data.layout import DatasetLayout, LayoutScan, register_layout
from medfusion.modality import CLINICAL_MODALITIES, Keys, validate_modalities

__all__ = [
    "MIMIC_TASKS",
    "MIMIC_SPLITS",
    "PHENOTYPE_COUNT",
    "discover_mimic",
    "cxr_study_dir",
    "read_cxr_metadata",
    "MimicLayout",
    "MIMIC",
]

logger = logging.getLogger(__name__)

MIMIC_TASKS = ("in-hospital-mortality", "phenotyping")
MIMIC_SPLITS = ("train", "val", "test")
PHENOTYPE_COUNT = 25
_IMAGE_SUFFIXES = (".jpg", ".dcm", ".png")
_METADATA_NAMES = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
_META_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime")
_STAY_COLUMNS = ("subject_id", "stay_id", "intime", "outtime")


def _read_csv(path: Path, what: str, required: Sequence[str], **kw: Any) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        df = pd.read_csv(path, **kw)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"{what} {path}: cannot be read as CSV ({err}).") from err
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        cols = ", ".join(missing)
        raise ValueError(
            f"{what} {path} lacks column{'s' if len(missing) > 1 else ''} {cols}; found {list(df.columns)}."
        )
    return df


def _int_column(df: pd.DataFrame, col: str, path: Path, what: str) -> pd.Series:
    num = pd.to_numeric(df[col], errors="coerce")
    bad = df.index[num.isna() | (num != num.round())]
    if len(bad):
        row = bad[0]
        raise ValueError(
            f"{what} {path}: column {col} holds {df[col].iloc[row]!r} in data row {row + 1}; expected an integer id."
        )
    return num.astype("int64")


def cxr_study_dir(root: str | os.PathLike, subject_id: int, study_id: int) -> Path:
    """``<root>/files/p<first two digits>/p<subject_id>/s<study_id>`` (MIMIC-CXR folder scheme)."""
    sid = str(int(subject_id))
    return Path(root) / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{int(study_id)}"


def read_cxr_metadata(cxr_root: str | os.PathLike, metadata: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read the MIMIC-CXR metadata table and add a ``StudyDateTime`` column.

    Args:
        cxr_root: MIMIC-CXR(-JPG) root.
        metadata: explicit metadata file; default ``<cxr_root>/mimic-cxr-2.0.0-metadata.csv[.gz]``.

    Returns:
        DataFrame with at least ``dicom_id, subject_id, study_id, ViewPosition, StudyDateTime``.

    Raises:
        FileNotFoundError: no metadata file.
        ValueError: missing columns or unparsable ``StudyDate``/``StudyTime`` (names file, row, value).
    """
    if metadata is None:
        candidates = [Path(cxr_root) / n for n in _METADATA_NAMES]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"CXR metadata not found: expected {candidates[0]} or {candidates[1]} (or pass cxr_metadata=...)."
            )
        path = found[0]
    else:
        path = Path(metadata)
    df = _read_csv(path, "CXR metadata", _META_COLUMNS, dtype={"dicom_id": str, "ViewPosition": str})
    what = "CXR metadata"
    df["subject_id"] = _int_column(df, "subject_id", path, what)
    df["study_id"] = _int_column(df, "study_id", path, what)
    dates = pd.to_numeric(df["StudyDate"], errors="coerce")
    times = pd.to_numeric(df["StudyTime"], errors="coerce")
    bad = df.index[dates.isna() | times.isna()]
    if len(bad):
        r = bad[0]
        raise ValueError(
            f"CXR metadata {path}: data row {r + 1} has StudyDate={df['StudyDate'].iloc[r]!r}, "
            f"StudyTime={df['StudyTime'].iloc[r]!r}; expected YYYYMMDD and HHMMSS(.f) numbers."
        )
    text = dates.astype("int64").astype(str) + " " + times.map(lambda x: f"{int(float(x)):06d}")
    stamp = pd.to_datetime(text, format="%Y%m%d %H%M%S", errors="coerce")
    if stamp.isna().any():
        r = int(stamp.index[stamp.isna()][0])
        raise ValueError(
            f"CXR metadata {path}: data row {r + 1} has an invalid date/time {text.iloc[r]!r}; "
            "expected StudyDate YYYYMMDD and StudyTime HHMMSS(.f)."
        )
    df["StudyDateTime"] = stamp
    df["ViewPosition"] = df["ViewPosition"].fillna("").astype(str).str.strip()
    df["dicom_id"] = df["dicom_id"].astype(str).str.strip()
    return df


def _read_stays(path: Path) -> pd.DataFrame:
    df = _read_csv(path, "stays table", _STAY_COLUMNS)
    df["subject_id"] = _int_column(df, "subject_id", path, "stays table")
    df["stay_id"] = _int_column(df, "stay_id", path, "stays table")
    for col in ("intime", "outtime"):
        parsed = pd.to_datetime(df[col], errors="coerce")
        bad = df.index[parsed.isna()]
        if len(bad):
            r = bad[0]
            raise ValueError(
                f"stays table {path}: column {col} holds {df[col].iloc[r]!r} in data row {r + 1}; "
                "expected a date-time such as 2180-05-06 22:23:00."
            )
        df[col] = parsed
    dup = df["stay_id"][df["stay_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"stays table {path}: duplicate stay_id {dup[:5]}; expected one row per stay.")
    return df.set_index("stay_id")


def _find_image(study_dir: Path, dicom_id: str) -> Path | None:
    for suffix in _IMAGE_SUFFIXES:
        p = study_dir / f"{dicom_id}{suffix}"
        if p.is_file():
            return p
    return None


def _labels(row: pd.Series, columns: Sequence[str], listfile: Path, line: int) -> list[float]:
    out = []
    for c in columns:
        v = pd.to_numeric(pd.Series([row[c]]), errors="coerce").iloc[0]
        if pd.isna(v):
            raise ValueError(f"listfile {listfile}: column {c} holds {row[c]!r} in data row {line}; expected a number.")
        out.append(float(v))
    return out


def discover_mimic(
    ehr_root: str | os.PathLike,
    cxr_root: str | os.PathLike | None = None,
    reports_root: str | os.PathLike | None = None,
    task: str = "in-hospital-mortality",
    split: str = "train",
    modalities: Sequence[str] = ("ehr", "cxr", "report"),
    window_hours: float = 48.0,
    views: Sequence[str] = ("AP",),
    cxr_metadata: str | os.PathLike | None = None,
    require: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Build a MONAI datalist for one task and split of a MIMIC-style tree.

    Args:
        ehr_root: mimic3-benchmarks output root (holds ``<task>/`` and ``root/all_stays.csv``).
        cxr_root: MIMIC-CXR(-JPG) root (holds ``files/`` and the metadata CSV); needed when ``"cxr"`` or
            ``"report"`` is among ``modalities``.
        reports_root: MIMIC-CXR reports root (holds ``files/``); ``None`` = ``cxr_root``.
        task: ``"in-hospital-mortality"`` (label: float ``y_true``) or ``"phenotyping"`` (label: 25
            floats, the listfile's label columns in order).
        split: ``"train"``, ``"val"`` or ``"test"``.
        modalities: ordered subset of ``("ehr", "cxr", "report")``; order of ``modality_mask``.
        window_hours: mortality pairing window after ``intime`` (phenotyping uses the whole stay).
        views: accepted ``ViewPosition`` values.
        cxr_metadata: explicit metadata file (default: looked up in ``cxr_root``).
        require: modalities a stay must have to be kept (MedFuse's "paired" setting, e.g.
            ``("ehr", "cxr")``); stays without them are dropped and counted in the log.

    Returns:
        One dict per stay in listfile order: ``case_id`` (the listfile's ``stay``), ``sample_index``,
        ``label``, one key per modality (path string or ``None`` when missing) and
        ``modality_mask`` (list of bools in ``modalities`` order). Stays with no modality present are
        dropped (logged).

    Raises:
        ValueError: unknown task/split/modality, missing roots, columns, malformed values, a
            listfile stay_id absent from ``all_stays.csv``.
        FileNotFoundError: missing listfile, stays table or metadata; none of the listfile's EHR time
            series files exist.
    """
    mods = validate_modalities(modalities, ("ehr", "cxr", "report"))
    req = validate_modalities(require, mods, field="require") if require else ()
    if task not in MIMIC_TASKS:
        raise ValueError(f"discover_mimic: task must be one of {MIMIC_TASKS}, got {task!r}.")
    if split not in MIMIC_SPLITS:
        raise ValueError(f"discover_mimic: split must be one of {MIMIC_SPLITS}, got {split!r}.")
    if not (window_hours > 0):
        raise ValueError(f"discover_mimic: window_hours must be positive, got {window_hours!r}.")
    need_cxr = "cxr" in mods or "report" in mods
    if need_cxr and cxr_root is None:
        raise ValueError(
            f"discover_mimic: modalities {list(mods)} include cxr/report but cxr_root is None; "
            "pass cxr_root (the MIMIC-CXR root holding files/ and the metadata CSV)."
        )
    ehr_root = Path(ehr_root)
    task_dir = ehr_root / task
    listfile = task_dir / f"{split}_listfile.csv"
    base_cols = ["stay", "period_length", "stay_id"]
    lf = _read_csv(
        listfile, "listfile", base_cols + (["y_true"] if task == "in-hospital-mortality" else []), dtype={"stay": str}
    )
    if task == "in-hospital-mortality":
        label_cols = ["y_true"]
    else:
        label_cols = [c for c in lf.columns if c not in base_cols]
        if len(label_cols) != PHENOTYPE_COUNT:
            raise ValueError(
                f"listfile {listfile}: expected {PHENOTYPE_COUNT} phenotype label columns after "
                f"{base_cols}, found {len(label_cols)}."
            )
    lf["stay_id"] = _int_column(lf, "stay_id", listfile, "listfile")
    ts_dir = task_dir / ("test" if split == "test" else "train")

    stays = meta = None
    if need_cxr:
        stays = _read_stays(ehr_root / "root" / "all_stays.csv")
        meta = read_cxr_metadata(cxr_root, cxr_metadata)  # type: ignore[arg-type]
        meta = meta[meta["ViewPosition"].isin([str(v) for v in views])]
        meta = meta.sort_values(["StudyDateTime", "dicom_id"], kind="stable")
        by_subject = {k: g for k, g in meta.groupby("subject_id", sort=False)}
    rep_root = Path(reports_root) if reports_root is not None else (Path(cxr_root) if cxr_root is not None else None)

    items: list[dict[str, Any]] = []
    dropped_empty = dropped_required = absent_files = 0
    absent_ehr: list[str] = []
    for i, (_, rowd) in enumerate(lf.iterrows()):
        line = i + 1
        stay = str(rowd["stay"]).strip()
        labels = _labels(rowd, label_cols, listfile, line)
        item: dict[str, Any] = {"case_id": stay}
        item["label"] = labels[0] if task == "in-hospital-mortality" else labels
        if "ehr" in mods:
            ts = ts_dir / stay
            if ts.is_file():
                item["ehr"] = str(ts)
            else:
                item["ehr"] = None
                absent_ehr.append(str(ts))
        cxr_path: Path | None = None
        report_path: Path | None = None
        if need_cxr:
            stay_id = int(rowd["stay_id"])
            if stay_id not in stays.index:  # type: ignore[union-attr]
                raise ValueError(
                    f"listfile {listfile}: stay_id {stay_id} (data row {line}) not found in stays table "
                    f"{ehr_root / 'root' / 'all_stays.csv'}."
                )
            st = stays.loc[stay_id]  # type: ignore[union-attr]
            subject = int(st["subject_id"])
            end = st["intime"] + pd.Timedelta(hours=window_hours) if task == "in-hospital-mortality" else st["outtime"]
            cand = by_subject.get(subject)
            if cand is not None:
                cand = cand[(cand["StudyDateTime"] >= st["intime"]) & (cand["StudyDateTime"] <= end)]
                # latest first
                for m in cand.iloc[::-1].itertuples(index=False):
                    img = _find_image(cxr_study_dir(cxr_root, subject, m.study_id), m.dicom_id)  # type: ignore[arg-type]
                    if img is None:
                        absent_files += 1
                        continue
                    cxr_path = img
                    break
                if rep_root is not None:
                    if cxr_path is not None:
                        study = int(cxr_path.parent.name[1:])
                        rp = cxr_study_dir(rep_root, subject, study).with_suffix(".txt")
                        report_path = rp if rp.is_file() else None
                    else:
                        for study in dict.fromkeys(cand["study_id"].iloc[::-1].tolist()):
                            rp = cxr_study_dir(rep_root, subject, int(study)).with_suffix(".txt")
                            if rp.is_file():
                                report_path = rp
                                break
        if "cxr" in mods:
            item["cxr"] = str(cxr_path) if cxr_path is not None else None
        if "report" in mods:
            item["report"] = str(report_path) if report_path is not None else None
        mask = [item[m] is not None for m in mods]
        if not any(mask):
            dropped_empty += 1
            continue
        if any(item[m] is None for m in req):
            dropped_required += 1
            continue
        item["modality_mask"] = mask
        item["sample_index"] = len(items)
        items.append(item)
    if absent_ehr and len(absent_ehr) == len(lf):
        raise FileNotFoundError(
            f"discover_mimic: none of the {len(lf)} EHR time series of {listfile} exist in {ts_dir} "
            f"(e.g. {absent_ehr[0]}); expected <ehr_root>/<task>/{ts_dir.name}/<stay>."
        )
    if absent_ehr:
        logger.warning(
            "discover_mimic: %d EHR time series of %s are absent (e.g. %s); EHR marked missing for them.",
            len(absent_ehr),
            listfile,
            absent_ehr[0],
        )
    if absent_files:
        logger.warning(
            "discover_mimic: %d paired CXR metadata rows have no image file (.jpg/.dcm/.png) under %s; skipped.",
            absent_files,
            cxr_root,
        )
    if dropped_empty:
        logger.warning("discover_mimic: %d stays of %s have no modality present; dropped.", dropped_empty, listfile)
    if dropped_required:
        logger.info("discover_mimic: %d stays lack a required modality %s; dropped.", dropped_required, list(req))
    logger.info("discover_mimic: %d items from %s.", len(items), listfile)
    return items


class MimicLayout(DatasetLayout):
    """MIMIC-style data: a folder holding ``ehr/`` (``cxr/``, ``reports/``) or a mimic3-benchmarks root."""

    name = "mimic"
    family = "mimic"
    expects = (
        "a MIMIC-style folder holding ehr/ (and cxr/, reports/, as `medfusion synth clinical` writes) or a "
        "mimic3-benchmarks root holding root/all_stays.csv"
    )
    default_modalities = CLINICAL_MODALITIES

    def detect(self, path: str | os.PathLike) -> bool:
        """True for a folder holding ``ehr/`` or ``root/all_stays.csv``."""
        p = Path(path).expanduser()
        return p.is_dir() and ((p / "ehr").is_dir() or (p / "root" / "all_stays.csv").is_file())

    def roots(
        self,
        path: str | os.PathLike,
        ehr_root: str | os.PathLike | None = None,
        cxr_root: str | os.PathLike | None = None,
        reports_root: str | os.PathLike | None = None,
    ) -> dict[str, Path | None]:
        """``{"ehr", "cxr", "reports"}`` roots: the given ones, else the dataset folder's.

        ``ehr``: ``<path>/ehr`` when it exists, else ``path`` (a mimic3-benchmarks root). ``cxr``: ``<path>/cxr``
        when it exists, else ``None``. ``reports``: ``<path>/reports`` when it exists, else the CXR root
        (MIMIC-CXR ships the reports next to the study folders).
        """
        p = Path(path).expanduser()
        ehr = Path(ehr_root) if ehr_root is not None else (p / "ehr" if (p / "ehr").is_dir() else p)
        cxr = Path(cxr_root) if cxr_root is not None else (p / "cxr" if (p / "cxr").is_dir() else None)
        reports = p / "reports" if (p / "reports").is_dir() else cxr
        reports = Path(reports_root) if reports_root is not None else reports
        return {"ehr": ehr, "cxr": cxr, "reports": reports}

    def discover(
        self,
        path: str | os.PathLike,
        modalities: Sequence[str] | None = None,
        split: str = "train",
        task: str = "in-hospital-mortality",
        ehr_root: str | os.PathLike | None = None,
        cxr_root: str | os.PathLike | None = None,
        reports_root: str | os.PathLike | None = None,
        **options: Any,
    ) -> list[dict[str, Any]]:
        """The datalist of one listfile split (:func:`discover_mimic` on the dataset's :meth:`roots`).

        Raises:
            ValueError: cxr/report requested but the dataset has no CXR root (and none is given); see
                :func:`discover_mimic` for the rest.
        """
        mods = validate_modalities(modalities or self.default_modalities, self.default_modalities)
        r = self.roots(path, ehr_root, cxr_root, reports_root)
        if r["cxr"] is None and ("cxr" in mods or "report" in mods):
            raise ValueError(
                f"MIMIC-style dataset {path}: modalities {list(mods)} include cxr/report but there is no CXR root "
                f"(expected {Path(path) / 'cxr'}, or pass cxr_root: the MIMIC-CXR root holding files/ and the "
                "metadata CSV)."
            )
        assert r["ehr"] is not None
        return discover_mimic(r["ehr"], r["cxr"], r["reports"], task=task, split=split, modalities=mods, **options)

    def scan(
        self,
        path: str | os.PathLike,
        modalities: Sequence[str] | None = None,
        *,
        require_label: bool = True,
        label_convention: Any = None,
        splits: Sequence[str] = MIMIC_SPLITS,
        **options: Any,
    ) -> LayoutScan:
        """Every listfile split (case ids ``<split>/<stay>``); a split that cannot be discovered is a dataset error.

        ``cxr``/``report`` are left out when the dataset has no CXR root. ``options``: the roots, ``task`` and
        :func:`discover_mimic` options (``window_hours``, ``views``).
        """
        mods = validate_modalities(modalities or self.default_modalities, self.default_modalities)
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"MIMIC-style folder {p} does not exist or is not a folder.")
        given = {k: options.pop(k) for k in ("ehr_root", "cxr_root", "reports_root") if k in options}
        if self.roots(p, **given)["cxr"] is None:
            mods = tuple(m for m in mods if m == "ehr") or mods
        out = LayoutScan(self.name, str(p), mods, same_grid=False, label_maps=False)
        for split in splits:
            try:
                items = self.discover(p, mods, split=split, **given, **options)
            except (ValueError, FileNotFoundError) as err:
                out.dataset_errors.append(f"split {split}: {err}")
                continue
            for it in items:
                it[Keys.CASE_ID] = f"{split}/{it[Keys.CASE_ID]}"
            out.entries += items
        return out


MIMIC = register_layout(MimicLayout())
