"""Compare several evaluated runs on the same cases: leaderboards with paired tests, heatmaps, report, routing table.

``medfusion compare EVAL_DIR... --out DIR`` reads the folders the bundles' evaluations write (segmentation:
``per_case.csv``; classification: ``predictions.csv``; both: ``evaluation.json``), never re-runs a model, and:

1. refuses runs that are not comparable (other task, modalities, combinations, split or cases; the error names
   the difference);
2. writes ``leaderboard.csv`` / ``leaderboard.md``: per metric and combination every run's value, ranked; the
   best run is marked only where a paired test over the same cases says it beats the runner-up (DeLong for a
   binary AUROC, a paired bootstrap of the metric difference otherwise), two-sided, at level ``alpha`` after
   Holm's adjustment over the combinations of that metric;
3. writes ``heatmap_<metric>.png``: runs x combinations, the difference to a reference run (a ``*`` where the
   paired test against the reference is significant at the same level);
4. writes ``report.md``: what was compared, the verdict per metric, where to look;
5. optionally (``--routing``, from VALIDATION evaluations) writes ``routing.json``: per combination the run whose
   model is best or tied-best, with what the router needs to load each run's model
   (:mod:`medfusion.apps.router`).

Statistics: :mod:`medfusion.evaluation.stats`; equations and tests: docs/compare.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from medfusion.evaluation.calibration import expected_calibration_error
from medfusion.evaluation.report import RECORD_FILE, read_record
from medfusion.evaluation.stats import PairedResult, delong_test, holm, paired_bootstrap
from medfusion.io import atomic_output_dir, check_output_dir, save_figure
from medfusion.modality import combination_name, combinations

__all__ = [
    "SEG_COMPARE_METRICS",
    "CLS_COMPARE_METRICS",
    "EvalRun",
    "load_run",
    "check_comparable",
    "leaderboard",
    "reference_differences",
    "routing_table",
    "write_routing",
    "read_routing",
    "compare_runs",
]

logger = logging.getLogger(__name__)

SEG_COMPARE_METRICS: dict[str, int] = {
    "dice_tc": 1,
    "dice_wt": 1,
    "dice_et": 1,
    "hd95_tc": -1,
    "hd95_wt": -1,
    "hd95_et": -1,
}
"""Segmentation metrics of the leaderboard and their direction (+1 higher is better, -1 lower is better)."""
CLS_COMPARE_METRICS: dict[str, int] = {"auroc": 1, "auprc": 1, "balanced_accuracy": 1}
"""Classification metrics of the leaderboard (ECE is shown beside AUROC, not ranked)."""
ROUTING_FILE = "routing.json"


@dataclass
class EvalRun:
    """One evaluated run.

    Attributes:
        name: display name (default: the folder name).
        path: the evaluation folder.
        task: ``"segmentation"`` or ``"classification"``.
        table: per-(case, combination) rows (``per_case.csv``) or per-(sample, combination) rows
            (``predictions.csv``), with a string ``case`` column identifying the case.
        record: ``evaluation.json`` (``{}`` when absent).
    """

    name: str
    path: Path
    task: str
    table: pd.DataFrame
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def combos(self) -> list[str]:
        """Combination names in the order they appear."""
        return list(dict.fromkeys(self.table["combination"].astype(str)))

    @property
    def prob_cols(self) -> list[str]:
        """``prob_<k>`` columns in class order (classification)."""
        cols = [c for c in self.table.columns if c.startswith("prob_")]
        return sorted(cols, key=lambda c: int(c[5:]))


def load_run(path: str | Path, name: str | None = None) -> EvalRun:
    """Read one evaluation folder.

    Args:
        path: folder holding ``per_case.csv`` (segmentation) or ``predictions.csv`` (classification).
        name: display name (default: the folder's name).

    Raises:
        FileNotFoundError: neither table exists (the message names the folder and both files).
        ValueError: the table lacks a needed column (named), or a case appears twice in one combination.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation folder {root} does not exist.")
    if (root / "per_case.csv").is_file():
        task, file, need = "segmentation", root / "per_case.csv", ["case_id", "combination"]
    elif (root / "predictions.csv").is_file():
        task, file, need = "classification", root / "predictions.csv", ["combination", "label", "prob_0"]
    else:
        raise FileNotFoundError(
            f"{root}: no per_case.csv (segmentation) or predictions.csv (classification); "
            "is this a folder written by a bundle's evaluate.json / medfusion evaluate?"
        )
    table = pd.read_csv(file, dtype={"case_id": str})
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing} (has {list(table.columns)}).")
    if task == "segmentation":
        table["case"] = table["case_id"].astype(str)
    else:
        if "case_id" in table.columns and not table.duplicated(["combination", "case_id"]).any():
            table["case"] = table["case_id"].astype(str)
        elif "sample_index" in table.columns:
            table["case"] = table["sample_index"].astype(str)
        else:
            raise ValueError(f"{file}: needs a unique case_id or a sample_index column to pair samples across runs.")
    dup = table[table.duplicated(["combination", "case"], keep=False)]
    if len(dup):
        first = dup.iloc[0]
        raise ValueError(
            f"{file}: case {first['case']!r} appears more than once in combination {first['combination']!r}."
        )
    table["combination"] = table["combination"].astype(str)
    return EvalRun(name or root.name, root, task, table, read_record(root))


def _default_names(paths: Sequence[str | Path]) -> list[str]:
    """Folder names; when they repeat (``runs/qmf/val``, ``runs/late/val``) the parent folders' names."""
    for candidate in ([Path(p).name for p in paths], [Path(p).parent.name for p in paths]):
        if len(set(candidate)) == len(candidate) and all(candidate):
            return candidate
    return [str(p) for p in paths]


def _first(items: Iterable[Any], k: int = 5) -> str:
    items = sorted(items, key=str)
    return ", ".join(map(str, items[:k])) + (f" ... ({len(items)} in all)" if len(items) > k else "")


def check_comparable(runs: Sequence[EvalRun]) -> None:
    """Refuse runs that were not evaluated on the same task, modalities, split and cases.

    Checked, in this order: at least two runs with distinct names; one task; the modalities of
    ``evaluation.json``; the split (name and rule) of ``evaluation.json`` where runs state it (a different
    ``dataset_dir`` is only a warning: the data may have moved); the
    combinations; per combination the cases; for classification the label of every sample.

    Raises:
        ValueError: the first difference found, naming both runs and what differs.
    """
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two evaluation folders, got {len(runs)}.")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {names}; pass --names.")
    ref = runs[0]
    for run in runs[1:]:
        pair = f"{run.name} ({run.path}) vs {ref.name} ({ref.path})"
        if run.task != ref.task:
            raise ValueError(f"{pair}: different tasks ({run.task} vs {ref.task}).")
        for key in ("modalities", "split", "split_rule"):
            a, b = run.record.get(key), ref.record.get(key)
            if a is not None and b is not None and a != b:
                raise ValueError(f"{pair}: different {key} in {RECORD_FILE} ({a!r} vs {b!r}).")
        a, b = run.record.get("dataset_dir"), ref.record.get("dataset_dir")
        if a is not None and b is not None and a != b:  # a moved copy is fine: cases and labels are checked below
            logger.warning("%s: different dataset_dir (%s vs %s)", pair, a, b)
        if set(run.combos) != set(ref.combos):
            only_a, only_b = set(run.combos) - set(ref.combos), set(ref.combos) - set(run.combos)
            raise ValueError(
                f"{pair}: different combinations (only in {run.name}: {_first(only_a) or '-'}; "
                f"only in {ref.name}: {_first(only_b) or '-'})."
            )
        for combo in ref.combos:
            a = run.table[run.table["combination"] == combo].set_index("case")
            b = ref.table[ref.table["combination"] == combo].set_index("case")
            if set(a.index) != set(b.index):
                only_a, only_b = set(a.index) - set(b.index), set(b.index) - set(a.index)
                raise ValueError(
                    f"{pair}: different cases in combination {combo!r} (only in {run.name}: {_first(only_a) or '-'}; "
                    f"only in {ref.name}: {_first(only_b) or '-'})."
                )
            if ref.task == "classification":
                diff = a["label"].reindex(b.index) != b["label"]
                if diff.any():
                    raise ValueError(
                        f"{pair}: different labels for case(s) {_first(list(b.index[diff.to_numpy()]))} "
                        f"in combination {combo!r}; not the same data."
                    )
                if len(run.prob_cols) != len(ref.prob_cols):
                    raise ValueError(f"{pair}: {len(run.prob_cols)} vs {len(ref.prob_cols)} classes.")
    missing_split = [r.name for r in runs if "split" not in r.record]
    if missing_split:
        logger.warning("runs %s state no split in %s: only their case lists were checked", missing_split, RECORD_FILE)


# ------------------------------------------------------------------------------------------- metrics
def _average_precision(labels: np.ndarray, score: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` (binary) in plain numpy.

    Re-implemented because the paired bootstrap calls it thousands of times and scikit-learn's input
    validation costs ~20x the computation at these sizes; a test checks equality with scikit-learn.
    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds in decreasing order.
    """
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean per-class recall over the classes present (scikit-learn's ``balanced_accuracy_score``; see above)."""
    counts = np.bincount(labels, minlength=n_classes)
    hits = np.bincount(labels[pred == labels], minlength=n_classes)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def _cls_metric(name: str, probs: np.ndarray, labels: np.ndarray) -> float:
    labels = labels.astype(int)
    n_classes = probs.shape[1]
    if name == "ece":
        return expected_calibration_error(probs, labels)
    if len(np.unique(labels)) < 2:
        return np.nan
    if name == "balanced_accuracy":
        return _balanced_accuracy(labels, probs.argmax(axis=1), n_classes)
    if n_classes == 2:
        score = probs[:, 1]
        return float(roc_auc_score(labels, score)) if name == "auroc" else _average_precision(labels, score)
    onehot = np.eye(n_classes)[labels]
    if name == "auroc":
        return float(roc_auc_score(onehot, probs, average="macro"))
    return float(np.mean([_average_precision(onehot[:, k], probs[:, k]) for k in range(n_classes)]))


class _Combo:
    """Aligned data of every run on one combination (rows in the same case order)."""

    def __init__(self, runs: Sequence[EvalRun], combo: str) -> None:
        ref = runs[0].table
        self.cases = ref.loc[ref["combination"] == combo, "case"].to_numpy()
        self.parts = {r.name: r.table[r.table["combination"] == combo].set_index("case").loc[self.cases] for r in runs}
        self.task = runs[0].task
        self.labels = self.parts[runs[0].name]["label"].to_numpy() if self.task == "classification" else None
        self.prob_cols = runs[0].prob_cols

    def _labels(self) -> np.ndarray:
        if self.labels is None:
            raise ValueError("compare: labels exist for classification runs only.")
        return self.labels

    def values(self, run: str, metric: str) -> np.ndarray:
        return self.parts[run][metric].to_numpy(dtype=float)

    def probs(self, run: str) -> np.ndarray:
        return self.parts[run][self.prob_cols].to_numpy(dtype=float)

    def metric(self, run: str, metric: str) -> float:
        if self.task == "segmentation":
            v = self.values(run, metric)
            return float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
        return _cls_metric(metric, self.probs(run), self._labels())

    def paired(self, a: str, b: str, metric: str, n_boot: int, seed: int, alpha: float) -> PairedResult:
        """Paired test of run ``a`` against run ``b`` (difference ``a - b``)."""
        if self.task == "segmentation":
            va, vb = self.values(a, metric), self.values(b, metric)
            ok = np.isfinite(va) & np.isfinite(vb)
            va, vb = va[ok], vb[ok]
            if len(va) == 0:
                return PairedResult(np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, "bootstrap")
            return paired_bootstrap(lambda i: (va[i].mean(), vb[i].mean()), len(va), n_boot, seed, alpha)
        pa, pb, y = self.probs(a), self.probs(b), self._labels().astype(int)
        if metric == "auroc" and pa.shape[1] == 2 and len(np.unique(y)) == 2:
            return delong_test(pa[:, 1], pb[:, 1], y, alpha)

        def fn(i: np.ndarray) -> tuple[float, float]:
            return _cls_metric(metric, pa[i], y[i]), _cls_metric(metric, pb[i], y[i])

        return paired_bootstrap(fn, len(y), n_boot, seed, alpha)


def _metrics_of(runs: Sequence[EvalRun], metrics: Sequence[str] | None) -> dict[str, int]:
    table = SEG_COMPARE_METRICS if runs[0].task == "segmentation" else CLS_COMPARE_METRICS
    if metrics is None:
        # a metric the evaluation did not compute (HD95 switched off: all NaN) is not ranked
        return {m: d for m, d in table.items() if m in runs[0].table.columns and runs[0].table[m].notna().any()} or {
            m: d for m, d in table.items() if runs[0].task == "classification"
        }
    unknown = [m for m in metrics if m not in table]
    if unknown:
        raise ValueError(f"unknown {runs[0].task} metric(s) {unknown}; choose from {list(table)}.")
    return {m: table[m] for m in metrics}


def _combo_order(runs: Sequence[EvalRun]) -> list[str]:
    present = runs[0].combos
    mods = runs[0].record.get("modalities")
    if mods:
        order = [combination_name(c) for c in combinations(mods)]
        return [c for c in order if c in present] + [c for c in present if c not in order]
    return sorted(present, key=lambda c: (c.count("+"), present.index(c)))


def leaderboard(
    runs: Sequence[EvalRun],
    metrics: Sequence[str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    correction: str = "holm",
) -> pd.DataFrame:
    """Rank runs per metric and combination; mark the best only where a paired test beats the runner-up.

    Args:
        runs: comparable runs (:func:`check_comparable`).
        metrics: leaderboard metrics (default: :data:`SEG_COMPARE_METRICS` / :data:`CLS_COMPARE_METRICS`).
        alpha: level of the two-sided paired tests.
        n_boot: paired bootstrap resamples.
        seed: bootstrap seed.
        correction: ``"holm"`` (adjust the best-vs-runner-up p-values over the combinations of each metric)
            or ``"none"``.

    Returns:
        One row per (metric, combination, run): ``metric``, ``combination``, ``run``, ``value``, ``rank``
        (1 = best point estimate), ``n``; on rank-1 rows ``runner_up``, ``diff`` (best - runner-up, in the
        metric's units), ``ci_low``/``ci_high``, ``p_value``, ``p_adjusted``, ``test`` and ``best``
        (True = significantly better than the runner-up). Classification rows also carry ``ece``.
    """
    if correction not in ("holm", "none"):
        raise ValueError(f"correction must be 'holm' or 'none', got {correction!r}.")
    chosen = _metrics_of(runs, metrics)
    rows: list[dict[str, Any]] = []
    combos = {c: _Combo(runs, c) for c in _combo_order(runs)}
    for metric, direction in chosen.items():
        block: list[dict[str, Any]] = []
        tests: list[float] = []
        for combo, data in combos.items():
            vals = {r.name: data.metric(r.name, metric) for r in runs}
            order = sorted(vals, key=lambda k: -direction * vals[k] if np.isfinite(vals[k]) else np.inf)
            for rank, name in enumerate(order, start=1):
                row: dict[str, Any] = {
                    "metric": metric,
                    "combination": combo,
                    "run": name,
                    "value": vals[name],
                    "rank": rank,
                    "n": len(data.cases),
                }
                if data.task == "classification":
                    row["ece"] = data.metric(name, "ece")
                if rank == 1:
                    res = data.paired(order[0], order[1], metric, n_boot, seed, alpha)
                    row.update(
                        runner_up=order[1],
                        diff=res.diff,
                        ci_low=res.ci_low,
                        ci_high=res.ci_high,
                        p_value=res.p_value,
                        test=res.test,
                    )
                    tests.append(res.p_value)
                block.append(row)
        adjusted = holm(tests) if correction == "holm" else np.asarray(tests, dtype=float)
        best_rows = [r for r in block if r["rank"] == 1]
        for r, p_adj in zip(best_rows, adjusted):
            r["p_adjusted"] = float(p_adj)
            r["best"] = bool(np.isfinite(p_adj) and p_adj < alpha and direction * r["diff"] > 0)
        rows.extend(block)
    table = pd.DataFrame(rows)
    table["best"] = table.get("best", pd.Series(False, index=table.index)).fillna(False).astype(bool)
    return table


def reference_differences(
    runs: Sequence[EvalRun],
    reference: str,
    metric: str,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    correction: str = "holm",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Differences ``run - reference`` of one metric per combination, and whether each is significant.

    Returns:
        ``(diff, significant)``: DataFrames indexed by run (the reference excluded), columns = combinations;
        ``significant`` applies the same paired test and Holm adjustment (over all cells) as the leaderboard.

    Raises:
        ValueError: ``reference`` is not a run name.
    """
    names = [r.name for r in runs]
    if reference not in names:
        raise ValueError(f"reference run {reference!r} is not among the runs {names}.")
    combos = {c: _Combo(runs, c) for c in _combo_order(runs)}
    others = [n for n in names if n != reference]
    diff = pd.DataFrame(index=others, columns=list(combos), dtype=float)
    pvals = pd.DataFrame(index=others, columns=list(combos), dtype=float)
    for combo, data in combos.items():
        for name in others:
            res = data.paired(name, reference, metric, n_boot, seed, alpha)
            diff.loc[name, combo] = res.diff
            pvals.loc[name, combo] = res.p_value
    flat = pvals.to_numpy().ravel()
    adj = holm(flat) if correction == "holm" else flat
    significant = pd.DataFrame(adj.reshape(pvals.shape) < alpha, index=others, columns=list(combos))
    return diff, significant


def plot_difference_heatmap(
    diff: pd.DataFrame, significant: pd.DataFrame, path: str | Path, title: str, direction: int = 1
) -> Path:
    """Runs x combinations heatmap of the difference to the reference (``*`` = significant).

    Colours: better than the reference = blue, worse = red (for lower-is-better metrics the colour scale is
    flipped so blue still means better).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = diff.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    lim = lim or 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 0.85 * data.shape[1], 1.3 + 0.45 * data.shape[0]))
    im = ax.imshow(direction * data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(data.shape[1]), labels=list(diff.columns), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(data.shape[0]), labels=list(diff.index), fontsize=8)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            v = data[i, j]
            if np.isfinite(v):
                star = "*" if bool(significant.iloc[i, j]) else ""
                colour = "white" if abs(v) > 0.6 * lim else "black"  # readable on the dark ends of the scale
                ax.text(j, i, f"{v:+.3f}{star}", ha="center", va="center", fontsize=7, color=colour)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("better than reference" if direction > 0 else "better than reference (sign flipped)", fontsize=7)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------------------- routing
def routing_table(board: pd.DataFrame, metric: str) -> dict[str, dict[str, Any]]:
    """Per combination, the run with the best point estimate of ``metric`` (best or tied-best).

    Returns:
        ``{combination: {"run", "value", "significant", "runner_up"}}``; ``significant`` says whether it beat
        the runner-up in the paired test (otherwise it is tied-best).

    Raises:
        ValueError: ``metric`` is not in the leaderboard.
    """
    rows = board[(board["metric"] == metric) & (board["rank"] == 1)]
    if rows.empty:
        known = sorted(set(board["metric"]))
        raise ValueError(f"routing metric {metric!r} is not in the leaderboard (metrics {known}).")
    return {
        str(r["combination"]): {
            "run": str(r["run"]),
            "value": float(r["value"]),
            "significant": bool(r["best"]),
            "runner_up": str(r["runner_up"]),
        }
        for _, r in rows.iterrows()
    }


def write_routing(
    runs: Sequence[EvalRun], board: pd.DataFrame, metric: str, path: str | Path, allow_test_split: bool = False
) -> Path:
    """Write ``routing.json`` for :mod:`medfusion.apps.router` from VALIDATION evaluations.

    The file holds ``routes`` (combination -> run), ``choice`` (value and whether the choice was significant),
    and per run ``ckpt_path``, ``calibration_file`` and ``overrides`` (the bundle keys of ``evaluation.json``
    ``network`` that rebuild its network with the bundle's ``inference.json``).

    Raises:
        ValueError: the runs were evaluated on the test split (choosing on test and then measuring on test
            would report an optimistic router), unless ``allow_test_split``.
    """
    split = runs[0].record.get("split")
    if split == "test" and not allow_test_split:
        raise ValueError(
            "routing: these evaluations are on the 'test' split; choose routes on validation evaluations "
            "(eval_split='val') and measure the router on test."
        )
    if split is None:
        logger.warning("routing: the runs state no split; make sure they are validation evaluations")
    choice = routing_table(board, metric)
    record = {
        "task": runs[0].task,
        "modalities": runs[0].record.get("modalities"),
        "metric": metric,
        "split": split,
        "routes": {c: v["run"] for c, v in choice.items()},
        "choice": choice,
        "runs": {
            r.name: {
                "eval_dir": str(r.path),
                "ckpt_path": r.record.get("ckpt_path"),
                "calibration_file": r.record.get("calibration_file"),
                "overrides": r.record.get("network", {}),
            }
            for r in runs
            if r.name in {v["run"] for v in choice.values()}
        },
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


def read_routing(path: str | Path) -> dict[str, Any]:
    """Read and check a ``routing.json``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing ``routes``/``runs``, or a route naming a run without an entry.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"routing table {p} does not exist (write one with medfusion compare --routing).")
    table = json.loads(p.read_text())
    for key in ("routes", "runs"):
        if not isinstance(table.get(key), dict) or not table[key]:
            raise ValueError(f"{p}: needs a non-empty {key!r} object.")
    unknown = sorted({r for r in table["routes"].values() if r not in table["runs"]})
    if unknown:
        raise ValueError(f"{p}: routes name run(s) {unknown} that have no entry under 'runs'.")
    return table


# ------------------------------------------------------------------------------------------- report
def _fmt(v: float, metric: str) -> str:
    if not np.isfinite(v):
        return "nan"
    return f"{v:.1f}" if metric.startswith("hd95") else f"{v:.3f}"


def _board_markdown(board: pd.DataFrame, names: Sequence[str], alpha: float, correction: str) -> str:
    lines: list[str] = []
    for metric, part in board.groupby("metric", sort=False):
        lines.append(f"### {metric}\n")
        ece = "ece" in part.columns
        head = "| combination | n | " + " | ".join(names) + " | best |"
        lines += [head, "|---|---|" + "---|" * (len(names) + 1)]
        for combo, rows in part.groupby("combination", sort=False):
            by_run = rows.set_index("run")
            top = rows[rows["rank"] == 1].iloc[0]
            cells = []
            for n in names:
                v = _fmt(by_run.loc[n, "value"], str(metric))
                if ece and metric == "auroc":
                    v += f" (ECE {_fmt(by_run.loc[n, 'ece'], 'ece')})"
                cells.append(f"**{v}**" if n == top["run"] and top["best"] else v)
            verdict = (
                f"**{top['run']}** (vs {top['runner_up']}: {top['diff']:+.3g}, p={top['p_adjusted']:.2g})"
                if top["best"]
                else f"tie ({top['run']} ~ {top['runner_up']}, p={top['p_adjusted']:.2g})"
            )
            lines.append(f"| {combo} | {int(top['n'])} | " + " | ".join(cells) + f" | {verdict} |")
        lines.append("")
    level = f"alpha = {alpha}"
    if correction == "holm":
        level += ", Holm-adjusted over the combinations of each metric"
    lines.append(
        f"Best = best point estimate AND a two-sided paired test against the runner-up over the same cases ({level}); "
        "`tie` otherwise. Tests: DeLong for binary AUROC, paired bootstrap of the metric difference for the rest."
    )
    return "\n".join(lines) + "\n"


def _verdicts(board: pd.DataFrame) -> list[str]:
    out = []
    for metric, part in board[board["rank"] == 1].groupby("metric", sort=False):
        wins = part[part["best"]]
        counts = wins["run"].value_counts()
        text = ", ".join(
            f"{run} on {k} ({', '.join(wins[wins['run'] == run]['combination'])})" for run, k in counts.items()
        )
        out.append(
            f"- **{metric}**: "
            + (f"significantly best: {text}; " if len(wins) else "no run is significantly best on any combination; ")
            + f"ties on {len(part) - len(wins)} of {len(part)} combinations."
        )
    return out


def compare_runs(
    eval_dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    reference: str | None = None,
    metrics: Sequence[str] | None = None,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
    correction: str = "holm",
    routing_metric: str | None = None,
    allow_test_split: bool = False,
    overwrite: bool = False,
) -> pd.DataFrame:
    """``medfusion compare``: load, check, rank, plot, report (and optionally export the routing table).

    Args:
        eval_dirs: evaluation folders (two or more).
        out_dir: output folder (must be absent or empty unless ``overwrite``).
        names: display names (default: folder names, or their parents' names when folder names repeat).
        reference: run the heatmaps subtract (default: the first).
        metrics: leaderboard metrics (default: all of the task).
        alpha: test level.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        correction: ``"holm"`` or ``"none"``.
        routing_metric: write ``routing.json`` choosing per combination by this metric (validation runs).
        allow_test_split: allow routing from test-split evaluations.
        overwrite: replace the content of a non-empty ``out_dir``.

    Returns:
        The leaderboard (:func:`leaderboard`).

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
        ValueError: runs not comparable (see :func:`check_comparable`), bad names or metric.
    """
    check_output_dir(out_dir, overwrite)
    if names is not None and len(names) != len(eval_dirs):
        raise ValueError(f"--names gives {len(names)} names for {len(eval_dirs)} evaluation folders.")
    runs = [load_run(d, n) for d, n in zip(eval_dirs, names or _default_names(eval_dirs))]
    check_comparable(runs)
    board = leaderboard(runs, metrics, alpha, n_boot, seed, correction)
    ref = reference or runs[0].name
    if routing_metric is not None:
        routing_table(board, routing_metric)  # fail on a bad metric before anything is written
    directions = {**SEG_COMPARE_METRICS, **CLS_COMPARE_METRICS}
    with atomic_output_dir(out_dir, overwrite) as out:  # all files or none; a replaced folder keeps no stale file
        board.to_csv(out / "leaderboard.csv", index=False)
        md = _board_markdown(board, [r.name for r in runs], alpha, correction)
        (out / "leaderboard.md").write_text("# Leaderboard\n\n" + md)
        figures = []
        for metric in dict.fromkeys(board["metric"]):
            diff, sig = reference_differences(runs, ref, metric, alpha, n_boot, seed, correction)
            diff.to_csv(out / f"difference_{metric}.csv")
            title = f"{metric}: run - {ref} (* = significant)"
            figures.append(plot_difference_heatmap(diff, sig, out / f"heatmap_{metric}.png", title, directions[metric]))
        routing_note = []
        if routing_metric is not None:
            write_routing(runs, board, routing_metric, out / ROUTING_FILE, allow_test_split)
            routing_note = [f"## Routing table (`routing.json`, by {routing_metric})", "", "| combination | run | |"]
            routing_note.append("|---|---|---|")
            for combo, v in routing_table(board, routing_metric).items():
                routing_note.append(f"| {combo} | {v['run']} | {'significant' if v['significant'] else 'tied-best'} |")
        report = _report(runs, board, ref, figures, alpha, n_boot, seed, correction, routing_note)
        (out / "report.md").write_text(report)
    logger.info("compare: wrote %s", Path(out_dir) / "report.md")
    return board


def _report(
    runs: Sequence[EvalRun],
    board: pd.DataFrame,
    ref: str,
    figures: Sequence[Path],
    alpha: float,
    n_boot: int,
    seed: int,
    correction: str,
    routing_note: Sequence[str],
) -> str:
    """The one-minute ``report.md``."""
    first = runs[0]
    rule = first.record.get("split_rule")
    split = f"split `{first.record.get('split', 'not stated')}`" + (f" (rule {json.dumps(rule)})" if rule else "")
    level = f"two-sided paired tests at alpha = {alpha}"
    if correction == "holm":
        level += " (Holm-adjusted over combinations per metric)"
    lines = [
        f"# Comparison of {len(runs)} {first.task} runs",
        "",
        "| run | evaluation folder | method |",
        "|---|---|---|",
        *[f"| {r.name} | `{r.path}` | {r.record.get('method', '-')} |" for r in runs],
        "",
        f"Same cases checked: {first.table['case'].nunique()} cases, {len(first.combos)} modality combinations; "
        f"{split}.",
        "",
        "## Verdict",
        "",
        *_verdicts(board),
        "",
        f"Level: {level}; bootstrap resamples {n_boot}, seed {seed}.",
        "",
        f"## Difference to `{ref}`",
        "",
        *[f"![{f.name}]({f.name})" for f in figures],
        "",
        "Full tables: `leaderboard.md` (every value, ECE beside AUROC), `leaderboard.csv`, `difference_<metric>.csv`.",
        "",
        *routing_note,
    ]
    return "\n".join(lines) + "\n"
