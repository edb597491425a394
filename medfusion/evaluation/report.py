"""Tables and figures shared by every all-combination evaluation.

Input is always a tidy per-(case, combination) DataFrame with a ``combination`` column holding
combination names (``"flair+t1ce"``) and one column per metric.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfusion.io import save_figure
from medfusion.modality import combination_name, combinations

__all__ = [
    "RECORD_FILE",
    "summarize",
    "to_markdown",
    "plot_heatmap",
    "write_reports",
    "write_record",
    "read_record",
    "ResultsFolder",
]

RECORD_FILE = "evaluation.json"
"""What an evaluation folder says about its run: task, modalities, split (name, rule, seed), method,
checkpoint and the bundle keys that rebuild the network. ``medfusion compare`` reads it."""


def summarize(per_case: pd.DataFrame, metrics: Sequence[str], modalities: Sequence[str]) -> pd.DataFrame:
    """Mean of each metric per combination, rows in canonical combination order, plus a ``mean`` row.

    The ``mean`` row is the unweighted mean over the combination rows (the papers' "average over
    the 15 combinations"), NaNs skipped.

    Args:
        per_case: tidy table with ``combination`` and the ``metrics`` columns.
        metrics: metric columns to summarise.
        modalities: the model's ordered modality names (fixes the row order).

    Returns:
        DataFrame indexed by combination name (+ ``"mean"``) with the metric columns and ``n``
        (number of cases per combination).
    """
    order = [combination_name(c) for c in combinations(modalities)]
    grouped = per_case.groupby("combination", sort=False)
    table = grouped[list(metrics)].mean()
    table["n"] = grouped.size()
    table = table.reindex([o for o in order if o in table.index])
    mean_row = table[list(metrics)].mean(axis=0, skipna=True)
    mean_row["n"] = int(table["n"].min()) if len(table) else 0
    table.loc["mean"] = mean_row
    table.index.name = "combination"
    return table


def to_markdown(
    summary: pd.DataFrame, metrics: Sequence[str], scale: float = 1.0, digits: int = 2, ci: bool = False
) -> str:
    """Markdown table (rows = combinations + mean); values multiplied by ``scale`` (100 for %).

    With ``ci``, a metric with ``<metric>_lo``/``<metric>_hi`` columns is shown as ``value [lo, hi]``.
    """
    cols = list(metrics)
    header = "| combination | " + " | ".join(cols) + " | n |"
    sep = "|---|" + "---|" * (len(cols) + 1)
    lines = [header, sep]

    def fmt(v: float) -> str:
        return "nan" if pd.isna(v) else f"{v * scale:.{digits}f}"

    for name, row in summary.iterrows():
        vals = []
        for c in cols:
            cell = fmt(row[c])
            if ci and f"{c}_lo" in row.index and f"{c}_hi" in row.index and not pd.isna(row[c]):
                cell += f" [{fmt(row[f'{c}_lo'])}, {fmt(row[f'{c}_hi'])}]"
            vals.append(cell)
        label = f"**{name}**" if name == "mean" else str(name)
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {int(row['n'])} |")
    return "\n".join(lines) + "\n"


def plot_heatmap(
    summary: pd.DataFrame,
    metrics: Sequence[str],
    path: str | Path,
    title: str = "",
    labels: Sequence[str] | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Heatmap of ``summary[metrics]`` (rows = combinations + mean) with the values written in.

    Args:
        summary: output of :func:`summarize`.
        metrics: columns to show.
        path: PNG path.
        title: figure title.
        labels: column labels (default: the metric names).
        vmin: colour scale minimum.
        vmax: colour scale maximum.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = summary[list(metrics)].to_numpy(dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * n_cols, 0.9 + 0.38 * n_rows))
    im = ax.imshow(data, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(n_cols), labels=list(labels) if labels else list(metrics))
    ax.set_yticks(range(n_rows), labels=[str(i) for i in summary.index])
    for i in range(n_rows):
        for j in range(n_cols):
            v = data[i, j]
            if np.isfinite(v):
                colour = "white" if v < vmin + 0.6 * (vmax - vmin) else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=colour, fontsize=8)
    if n_rows > 1:
        ax.axhline(n_rows - 1.5, color="white", linewidth=2)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    return save_figure(fig, path, dpi=120)


def write_reports(
    per_case: pd.DataFrame,
    metrics: Sequence[str],
    modalities: Sequence[str],
    output_dir: str | Path,
    heatmap_metrics: Sequence[str] | None = None,
    title: str = "",
    scale: float = 1.0,
) -> tuple[pd.DataFrame, str]:
    """Write ``per_case.csv``, ``summary.csv``, ``summary.md`` and ``heatmap.png`` into ``output_dir``.

    Returns:
        ``(summary DataFrame, markdown text)``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_case.to_csv(out / "per_case.csv", index=False)
    summary = summarize(per_case, metrics, modalities)
    summary.to_csv(out / "summary.csv")
    md = to_markdown(summary, metrics, scale=scale)
    (out / "summary.md").write_text((f"# {title}\n\n" if title else "") + md)
    plot_heatmap(summary, heatmap_metrics or metrics, out / "heatmap.png", title=title)
    return summary, md


def write_record(output_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Write :data:`RECORD_FILE` into ``output_dir`` (values JSON can not hold are written as strings)."""
    out = Path(output_dir) / RECORD_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(record), indent=2, default=str) + "\n")
    return out


def read_record(output_dir: str | Path) -> dict[str, Any]:
    """:data:`RECORD_FILE` of an evaluation folder (``{}`` for folders written before it existed).

    Raises:
        ValueError: the file exists but is not a JSON object (the message names it).
    """
    path = Path(output_dir) / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}).") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}.")
    return record


class ResultsFolder:
    """A result folder written all or nothing: files go to a hidden sibling, renamed into place at the end.

    Built in a bundle config (``"results": ResultsFolder(@output_dir, @overwrite)``): construction refuses a
    non-empty ``output_dir`` unless ``overwrite`` (before anything is computed); writers write into
    :attr:`path`; :meth:`run` runs the workflow, then replaces ``output_dir`` by the new folder (the old
    one, with every file of the previous results, is removed only then), or removes the partial folder
    when the run fails.

    Args:
        output_dir: the final folder.
        overwrite: replace a non-empty ``output_dir`` (``"true"``/``"false"`` strings from the MONAI CLI
            accepted).
        protect: paths that must not be inside ``output_dir`` (the checkpoint being evaluated, a checkpoint
            folder), since publishing replaces the whole folder.

    Raises:
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is false (the message names it).
        ValueError: ``output_dir`` is or contains a protected path.
    """

    def __init__(
        self, output_dir: str | os.PathLike, overwrite: bool | str = False, protect: Sequence[Any] = ()
    ) -> None:
        from medfusion.engines.checkpoint import as_bool
        from medfusion.io import check_output_dir

        self.overwrite = as_bool(overwrite, "overwrite")
        final = Path(output_dir).resolve()
        for kept in protect or ():
            if kept is not None and (Path(kept).resolve() == final or final in Path(kept).resolve().parents):
                raise ValueError(
                    f"output folder {output_dir} holds {kept}, which the results would replace; write them elsewhere."
                )
        self.final = check_output_dir(output_dir, self.overwrite)
        self.path = self.temporary_path(output_dir)

    @staticmethod
    def temporary_path(output_dir: str | os.PathLike) -> str:
        """The hidden sibling folder the results of ``output_dir`` are written to (:attr:`path`).

        For writers built before the :class:`ResultsFolder` (building them then checks nothing yet).
        """
        final = Path(output_dir)
        return str(final.with_name(f".{final.name}.tmp-{os.getpid()}"))

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` (which writes into :attr:`path`), then publish :attr:`path` as the output folder.

        Returns:
            What ``fn`` returned.
        """
        from medfusion.io import check_output_dir, publish_mode

        check_output_dir(self.final, self.overwrite)  # again: another command may have written meanwhile
        tmp = Path(self.path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            result = fn()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_mode(tmp, directory=True)
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            self.final.rename(old)
            tmp.rename(self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(self.final)
        return result
