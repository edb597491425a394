"""Meta Fusion regression on a CSV table whose modalities are column groups (the bundle's regression path).

:class:`TabularMetaFusion` is what ``bundles/clinical_fusion/configs/meta_fusion_regression.json``
instantiates. From one table (``case_id``, feature columns, target, ``split`` in train/val/test; a NaN in a
modality's columns = that modality is absent for the row, e.g. :func:`medfusion.data.synth_latent.write_latent_table`):

1. :meth:`TabularMetaFusion.split_data` builds :class:`~medfusion.fusion.meta_fusion.MetaFusionData` per split
   with :func:`~medfusion.fusion.meta_fusion_head.tabular_data`;
2. :meth:`TabularMetaFusion.fit` fits a :class:`~medfusion.fusion.meta_fusion_head.MetaFusionHead`
   (task ``regression``, MSE) on train/val;
3. :meth:`TabularMetaFusion.save` writes ``model.pt`` + ``meta_fusion_config.json`` (via
   :func:`~medfusion.apps.meta_fusion_stages.save_meta_fusion`), ``tabular_meta_fusion.json`` (modality
   columns and target) into ``ckpt_dir`` and ``meta_fusion_summary.json`` into ``output_dir``;
4. :meth:`TabularMetaFusion.evaluate` rebuilds the head from those files (:func:`load_tabular_meta_fusion`)
   and runs :func:`~medfusion.evaluation.regression.evaluate_regression` on the test split over every
   modality combination (``metrics.csv``, ``predictions.csv``, ``mse.png`` in ``output_dir``).

Modality columns come from (exactly one of) an explicit ``{modality: [column, ...]}``, column prefixes
``{modality: "m1_"}``, or, when neither is given, the ``"modalities"`` entry of ``signal.json`` beside the table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from medfusion.apps.meta_fusion_stages import CONFIG_NAME, load_head_kwargs, save_meta_fusion
from medfusion.engines.record import RECORD_KEY, RunRecord, model_difference, read_checkpoint, stamp_record
from medfusion.engines.utils import resolve_device
from medfusion.evaluation.regression import evaluate_regression
from medfusion.fusion.meta_fusion import MetaFusionData, get_rule
from medfusion.fusion.meta_fusion_head import MetaFusionHead, default_grids, tabular_data
from medfusion.io import atomic_file
from medfusion.modality import validate_modalities

__all__ = [
    "TABLE_SPEC_NAME",
    "SIGNAL_NAME",
    "resolve_modality_columns",
    "load_tabular_meta_fusion",
    "TabularMetaFusion",
]

logger = logging.getLogger(__name__)

TABLE_SPEC_NAME = "tabular_meta_fusion.json"
"""File (in the checkpoint folder) holding the modality columns and target the model was fitted on."""
SIGNAL_NAME = "signal.json"
"""Description file beside a synthetic table (``"modalities"``, ``"target"``), read when columns are not given."""


class _Holder(nn.Module):
    """Minimal network owning the fitted head, so :func:`save_meta_fusion` writes ``{"model": {"head.*": ...}}``."""

    def __init__(self, head: MetaFusionHead) -> None:
        super().__init__()
        self.head = head


def _read_signal(table: Path) -> dict[str, Any]:
    path = table.parent / SIGNAL_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"TabularMetaFusion: no modality columns given and no {SIGNAL_NAME} beside {table}; set modality_columns "
            "({modality: [column, ...]}) or modality_prefixes ({modality: 'prefix_'})."
        )
    return json.loads(path.read_text())


def resolve_modality_columns(
    table: str | Path,
    columns: Sequence[str],
    modality_columns: Mapping[str, Sequence[str]] | None = None,
    modality_prefixes: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """The ``{modality: [column, ...]}`` groups of a table.

    Args:
        table: the table's path (for messages and for ``signal.json`` beside it).
        columns: the table's column names (prefix matches keep this order).
        modality_columns: explicit groups.
        modality_prefixes: ``{modality: prefix}``; a modality takes every column starting with its prefix.

    Returns:
        ``{modality: [column, ...]}`` in modality order.

    Raises:
        ValueError: both options given, an empty group, a column in two groups or bad modality names.
        KeyError: a named column is not in the table (the message names the column and the file).
        FileNotFoundError: neither option and no ``signal.json`` beside the table.
    """
    path = Path(table)
    if modality_columns is not None and modality_prefixes is not None:
        raise ValueError("TabularMetaFusion: give modality_columns or modality_prefixes, not both.")
    if modality_prefixes is not None:
        groups = {str(m): [c for c in columns if c.startswith(str(p))] for m, p in modality_prefixes.items()}
        empty = [f"{m} ({modality_prefixes[m]!r})" for m, cols in groups.items() if not cols]
        if empty:
            raise ValueError(f"TabularMetaFusion modality_prefixes: no column of {path} starts with {empty}.")
    else:
        spec = modality_columns if modality_columns is not None else _read_signal(path).get("modalities")
        if not isinstance(spec, Mapping):
            raise ValueError(f"TabularMetaFusion: {path.parent / SIGNAL_NAME} has no 'modalities' mapping.")
        groups = {str(m): [str(c) for c in cols] for m, cols in spec.items()}
        empty = [m for m, cols in groups.items() if not cols]
        if empty:
            raise ValueError(f"TabularMetaFusion modality_columns: modalities {empty} have no column.")
    validate_modalities(list(groups), field="modality_columns")
    have = set(columns)
    absent = [c for cols in groups.values() for c in cols if c not in have]
    if absent:
        raise KeyError(f"TabularMetaFusion: column(s) {absent[:10]} not in {path} (columns: {list(columns)[:12]}...).")
    seen: dict[str, str] = {}
    for m, cols in groups.items():
        for c in cols:
            if c in seen:
                raise ValueError(f"TabularMetaFusion: column {c!r} of {path} is in modalities {seen[c]!r} and {m!r}.")
            seen[c] = m
    return groups


def load_tabular_meta_fusion(
    ckpt_dir: str | Path, filename: str = "model.pt", device: str | torch.device | None = "cpu"
) -> MetaFusionHead:
    """Rebuild a fitted head from ``<ckpt_dir>/meta_fusion_config.json`` + ``<ckpt_dir>/<filename>``.

    Args:
        ckpt_dir: the folder :meth:`TabularMetaFusion.save` wrote.
        filename: checkpoint name.
        device: where the head goes.

    Returns:
        The :class:`MetaFusionHead` in eval mode.

    Raises:
        FileNotFoundError: the config or checkpoint is missing (fit first).
    """
    ckpt = Path(ckpt_dir)
    kwargs = load_head_kwargs(ckpt / CONFIG_NAME)
    cfg = kwargs["config"]
    head = MetaFusionHead(cfg["modalities"], cfg["in_dims"], **kwargs)
    path = ckpt / filename
    if not path.is_file():
        raise FileNotFoundError(f"Meta Fusion checkpoint {path} does not exist; run the fit ('run') first.")
    holder = _Holder(head)
    holder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return head.to(resolve_device(device)).eval()


class TabularMetaFusion:
    """Fit, save and evaluate Meta Fusion regression on a CSV table (see the module docstring).

    Args:
        table: CSV path.
        target: target column (default: ``"target"`` of ``signal.json`` beside the table).
        ckpt_dir: checkpoint folder.
        output_dir: where the summary and the evaluation go (default ``ckpt_dir``).
        modality_columns: ``{modality: [column, ...]}``.
        modality_prefixes: ``{modality: "prefix"}`` (instead of ``modality_columns``).
        split_column: column with the split of each row.
        splits: names of the ``(train, validation, test)`` splits in ``split_column``.
        case_id_column: identifiers for ``predictions.csv`` (``None`` or an absent column: the row number).
        grids: ``{modality: [extractor, ...]}`` (default
            :func:`~medfusion.fusion.meta_fusion_head.default_grids`).
        meta_kwargs: :class:`~medfusion.fusion.meta_fusion.MetaFusion` arguments (``epochs``, ``hidden``,
            ``rho_grid``, ``seed``, ...); ``task`` must be ``"regression"`` when given.
        rule: aggregation rule of the head (a key of
            :data:`~medfusion.fusion.meta_fusion.aggregation.AGGREGATION_RULES` except the votes; default
            ``"ensemble"``).
        combinations_to_run: combination names to evaluate (default all).
        device: where Meta Fusion runs (``"cpu"`` is what the tests use).
        filename: checkpoint name.

    Raises:
        FileNotFoundError: the table does not exist.
        KeyError: a column (modality, target, split) is missing; the message names the column and the file.
        ValueError: a split is empty, bad modality groups, a target with missing values, a row without any
            modality, a non-regression ``task`` or an unknown (or vote) ``rule``.
    """

    def __init__(
        self,
        table: str | Path,
        ckpt_dir: str | Path,
        target: str | None = None,
        output_dir: str | Path | None = None,
        modality_columns: Mapping[str, Sequence[str]] | None = None,
        modality_prefixes: Mapping[str, str] | None = None,
        split_column: str = "split",
        splits: Sequence[str] = ("train", "val", "test"),
        case_id_column: str | None = "case_id",
        grids: Mapping[str, Sequence[str]] | None = None,
        meta_kwargs: Mapping[str, Any] | None = None,
        rule: str | None = None,
        combinations_to_run: Sequence[str] | None = None,
        device: str | torch.device | None = "cpu",
        filename: str = "model.pt",
    ) -> None:
        self.table = Path(table)
        if not self.table.is_file():
            raise FileNotFoundError(f"TabularMetaFusion table: {self.table} does not exist (expected a CSV file).")
        self.ckpt_dir = Path(ckpt_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else self.ckpt_dir
        self.frame = pd.read_csv(self.table)
        cols = [str(c) for c in self.frame.columns]
        self.columns = resolve_modality_columns(self.table, cols, modality_columns, modality_prefixes)
        self.modalities = tuple(self.columns)
        if target is None:
            target = _read_signal(self.table).get("target")
            if not target:
                raise ValueError(
                    f"TabularMetaFusion: no target given and {self.table.parent / SIGNAL_NAME} names none."
                )
        self.target = str(target)
        for field, col in (("target", self.target), ("split_column", split_column)):
            if col not in self.frame.columns:
                raise KeyError(
                    f"TabularMetaFusion {field}: column {col!r} not in {self.table} (columns: {cols[:12]}...)."
                )
        if self.frame[self.target].isna().any():
            rows = self.frame.index[self.frame[self.target].isna()].tolist()[:5]
            raise ValueError(
                f"TabularMetaFusion: target {self.target!r} of {self.table} has missing values (rows {rows})."
            )
        if len(splits) != 3:
            raise ValueError(f"TabularMetaFusion splits: expected (train, val, test) names, got {list(splits)}.")
        self.split_column, self.splits = split_column, tuple(str(s) for s in splits)
        values = self.frame[split_column].astype(str)
        counts = values.value_counts().to_dict()
        empty = [s for s in self.splits if counts.get(s, 0) == 0]
        if empty:
            raise ValueError(
                f"TabularMetaFusion: split(s) {empty} of column {split_column!r} in {self.table} have no row "
                f"(rows per value: {counts})."
            )
        self.case_id_column = case_id_column if case_id_column in self.frame.columns else None
        kwargs = dict(meta_kwargs or {})
        if kwargs.setdefault("task", "regression") != "regression":
            raise ValueError(f"TabularMetaFusion meta_kwargs task: expected 'regression', got {kwargs['task']!r}.")
        self.meta_kwargs = kwargs
        if grids is not None and list(grids) != list(self.modalities):
            raise ValueError(
                f"TabularMetaFusion grids: keys {list(grids)} must be the modalities {list(self.modalities)}."
            )
        self.grids = {m: list(v) for m, v in grids.items()} if grids is not None else None
        if rule is not None:
            get_rule(rule, "regression", "TabularMetaFusion rule")
        self.rule, self.device, self.filename = rule, device, filename
        self.combinations_to_run = list(combinations_to_run) if combinations_to_run else None
        self.head: MetaFusionHead | None = None

    # ------------------------------------------------------------------------------------------ data
    def _rows(self, split: str) -> pd.DataFrame:
        return self.frame[self.frame[self.split_column].astype(str) == split]

    def split_data(self, split: str) -> MetaFusionData:
        """``MetaFusionData`` of one split (NaN blocks = absent modality, zero-filled).

        Raises:
            ValueError: a row of ``split`` has every modality missing (the message names the file).
        """
        try:
            return tabular_data(self._rows(split), self.columns, self.target, task="regression")
        except ValueError as err:
            raise ValueError(f"TabularMetaFusion {self.table} split {split!r}: {err}") from err

    def case_ids(self, split: str) -> list[Any]:
        """Identifiers of the rows of ``split`` (``case_id_column`` or the row number in the table)."""
        rows = self._rows(split)
        return rows[self.case_id_column].tolist() if self.case_id_column else rows.index.tolist()

    # ------------------------------------------------------------------------------------------- fit
    def fit(self) -> MetaFusionHead:
        """Fit every Meta Fusion stage on the train split, selecting on the validation split.

        Returns:
            The fitted :class:`MetaFusionHead` (also ``self.head``).
        """
        train_name, val_name, _ = self.splits
        dev = resolve_device(self.device)
        train, val = (_to(self.split_data(s), dev) for s in (train_name, val_name))
        dims = {m: int(train.x[m].shape[1]) for m in self.modalities}
        grids = self.grids if self.grids is not None else default_grids(self.modalities, dims)
        logger.info(
            "tabular meta fusion: %s train / %s val rows, modalities %s, grids %s",
            len(train.y),
            len(val.y),
            {m: len(c) for m, c in self.columns.items()},
            grids,
        )
        head = MetaFusionHead(self.modalities, dims, grids=grids, rule=self.rule, **self.meta_kwargs)
        self.head = head.to(dev).fit(train, val)
        return self.head

    def save(self) -> dict[str, Path]:
        """Write checkpoint, head config and table spec (``ckpt_dir``) and the summary (``output_dir``).

        Returns:
            ``{"checkpoint", "config", "summary", "table_spec": path}``.

        Raises:
            RuntimeError: nothing fitted yet.
        """
        if self.head is None:
            raise RuntimeError("TabularMetaFusion.save: fit first.")
        paths = save_meta_fusion(_Holder(self.head), self.ckpt_dir, self.output_dir, self.filename)
        stamp_record(paths["checkpoint"], self.run_record())
        spec = {
            "table": str(self.table),
            "modality_columns": self.columns,
            "target": self.target,
            "split_column": self.split_column,
            "splits": list(self.splits),
        }
        paths["table_spec"] = self.ckpt_dir / TABLE_SPEC_NAME
        with atomic_file(paths["table_spec"]) as tmp:
            tmp.write_text(json.dumps(spec, indent=2))
        return paths

    def model_record(self) -> dict[str, Any]:
        """What the model depends on: modality names (in order), their columns and the target."""
        return {"modalities": list(self.modalities), "modality_columns": self.columns, "target": self.target}

    def run_record(self) -> RunRecord:
        """The run record stamped into ``model.pt`` (the same format as the bundles' checkpoints)."""
        config = {
            "table": str(self.table),
            "target": self.target,
            "modality_columns": self.columns,
            "split_column": self.split_column,
            "splits": list(self.splits),
            "grids": self.grids,
            "rule": self.rule,
            "meta_fusion_kwargs": self.meta_kwargs,
        }
        seed = int(self.meta_kwargs.get("seed", 0) or 0)
        return RunRecord(seed, self.modalities, "meta_fusion_regression", self.model_record(), config=config)

    # -------------------------------------------------------------------------------------- evaluate
    def evaluate(self, split: str | None = None) -> pd.DataFrame:
        """Rebuild the head from ``ckpt_dir`` and evaluate ``split`` (default test) over every combination.

        Args:
            split: split name (default the test split).

        Returns:
            The :func:`~medfusion.evaluation.regression.evaluate_regression` table (``metrics.csv``).

        Raises:
            FileNotFoundError: nothing saved in ``ckpt_dir``.
            ValueError: the saved modality columns or target differ from this table's.
        """
        split = self.splits[2] if split is None else split
        ckpt_path = self.ckpt_dir / self.filename
        saved = read_checkpoint(ckpt_path).get(RECORD_KEY) if ckpt_path.is_file() else None
        if saved:
            diff = model_difference(saved.get("model", {}), self.model_record())
            if diff:
                raise ValueError(f"TabularMetaFusion: the model {ckpt_path} was fitted on other data: {diff}.")
        spec_path = self.ckpt_dir / TABLE_SPEC_NAME
        if spec_path.is_file():
            spec = json.loads(spec_path.read_text())
            saved = {m: list(c) for m, c in spec.get("modality_columns", {}).items()}
            if saved != self.columns or spec.get("target") != self.target:
                raise ValueError(
                    f"TabularMetaFusion: the model in {self.ckpt_dir} was fitted on columns {_short(saved)} / target "
                    f"{spec.get('target')!r}, but {self.table} resolves to {_short(self.columns)} / {self.target!r}."
                )
        head = load_tabular_meta_fusion(self.ckpt_dir, self.filename, self.device)
        data = _to(self.split_data(split), resolve_device(self.device))
        metrics = evaluate_regression(
            head,
            data,
            self.modalities,
            self.output_dir,
            combinations_to_run=self.combinations_to_run,
            case_ids=self.case_ids(split),
            title=f"Meta Fusion MSE per modality combination ({split})",
        )
        logger.info("tabular meta fusion %s metrics:\n%s", split, metrics.to_string())
        return metrics

    def run(self) -> pd.DataFrame:
        """Fit, save, then evaluate the test split from the saved files.

        Returns:
            The test metrics table.
        """
        self.fit()
        self.save()
        return self.evaluate()


def _to(data: MetaFusionData, device: torch.device) -> MetaFusionData:
    return MetaFusionData({m: v.to(device) for m, v in data.x.items()}, data.mask.to(device), data.y.to(device))


def _short(columns: Mapping[str, Sequence[str]]) -> dict[str, str]:
    return {m: f"{c[0]}..{c[-1]} ({len(c)})" if c else "[]" for m, c in columns.items()}
