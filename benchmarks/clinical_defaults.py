"""Do the clinical bundle's DEFAULTS learn on a few hundred real-shaped rows? Each head vs a logistic regression.

Issue #11.7: on a real 600-image chest X-ray cohort every head except Meta Fusion stayed at chance with the
documented defaults (lr 1e-4, a few epochs) while a logistic regression on the EHR columns reached AUROC 0.74.

Data: ``medfusion.data.synth_manifest.write_manifest_cohort`` (``--rows`` rows, default 250; CXR + long inline notes
+ 9 sparse EHR columns in raw units, 1-6 images per patient, ~5 % absent image files, ~81/19 outcome), read by the
bundle with the documented manifest overrides (``cohort_bundle_overrides``: ``case_id_column``, ``label_column``,
``group_column``, ``modalities``, ``manifest_columns``), split by patient and stratified by label (bundle default
fractions: meta_val 0.1, val 0.1, test 0.2).

Arms (per cohort seed):
  * ``logreg``: scikit-learn ``LogisticRegression`` on the EHR columns (median imputation + missing indicators +
    standardisation, all fitted on the bundle's train split), test AUROC on the same test rows;
  * every head (``--heads``, default all six ``method_name`` values + ``meta_fusion``) trained with
    ``bundles/clinical_fusion/configs/train.json`` and ONLY the data overrides above, ``--image_size`` (default
    64 instead of 224) and the report encoder (``--report_encoder``, default ``bert_tiny`` instead of the frozen
    MiniLM: a frozen MiniLM forward of every note every epoch costs ~50 s per epoch on 2 CPU cores) - CPU time;
    everything else (learning rate, epochs, early stopping on validation AUROC, the other encoders, batch size)
    is the bundle default; then ``evaluate.json`` on the test split. ``--minilm_check`` also trains ``concat``
    with the default MiniLM report encoder on the first seed.
    Reported: test AUROC with all three modalities (``cxr+report+vitals``) and on the ``vitals`` combination (the
    same features as the logistic regression), 95 % bootstrap CIs (200 resamples), epochs run (early stopping), the
    best validation AUROC and its epoch, and how far the weights moved from initialisation (relative L2 change of
    the fusion head and of the vitals encoder: the head was trained, not left at init).
  * ``--old_defaults``: the same heads (or ``--old_heads``) with the previous defaults (learning rate 1e-4, 30 epochs,
    early-stopping patience 10) for the first seed, to show what the change does (one thing changes per arm: the
    defaults).

Results: ``benchmarks/results/clinical_defaults.{json,md}`` with the command, seeds, versions and load average.

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/clinical_defaults.py --seeds 0 1 2 --old_defaults
    python benchmarks/clinical_defaults.py --quick      # smoke run: 80 rows, 2 heads, 2 epochs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "clinical_fusion"
RESULTS = ROOT / "benchmarks" / "results"
OLD_DEFAULTS = {"learning_rate": 1e-4, "max_epochs": 30, "early_stop_patience": 10}
"""The bundle defaults before issue #11.7 (``train.json`` until this benchmark chose the new ones)."""
HEADS = ("concat", "late", "mean_features", "qmf", "omnifuse", "metakd", "meta_fusion")
ALL = "cxr+report+vitals"

logger = logging.getLogger("clinical_defaults")


def _bootstrap_auroc(y: np.ndarray, score: np.ndarray, n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            vals.append(roc_auc_score(y[idx], score[idx]))
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def logistic_regression(split: dict[str, list[dict[str, Any]]], key: str = "vitals") -> dict[str, Any]:
    """LR on the EHR columns: fitted on the train split (rows without any EHR value: all-NaN rows imputed)."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def xy(part: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        width = len(next(e[key] for e in part if e[key] is not None))
        x = np.asarray([e[key] if e[key] is not None else [np.nan] * width for e in part], dtype=float)
        return x, np.asarray([e["label"] for e in part], dtype=int)

    x_tr, y_tr = xy(split["train"])
    x_te, y_te = xy(split["test"])
    model = make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(max_iter=2000),
    ).fit(x_tr, y_tr)
    score = model.predict_proba(x_te)[:, 1]
    lo, hi = _bootstrap_auroc(y_te, score)
    return {"auroc": float(roc_auc_score(y_te, score)), "auroc_lo": lo, "auroc_hi": hi, "n_test": len(y_te)}


def _relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> float:
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point() and k in after]
    num = sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in keys)
    den = sum(float(before[k].float().pow(2).sum()) for k in keys)
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def run_head(head: str, overrides: dict[str, Any], work: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train + evaluate one head with the bundle; return test AUROCs, epochs, weight movement, time."""
    from medfusion.apps.bundle import bundle_workflow

    files = ["train.json", "meta_fusion.json"] if head == "meta_fusion" else ["train.json"]
    ov = {
        **overrides,
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "runs"),
        **({} if head == "meta_fusion" else {"method_name": head}),
        **(extra or {}),
    }
    t0 = time.time()
    wf = bundle_workflow(BUNDLE, files, "train", ov)
    wf.initialize()
    net_key = "encoder_network" if head == "meta_fusion" else "network"
    net = wf.parser.get_parsed_content(net_key)
    init = {k: v.detach().clone() for k, v in net.state_dict().items()}
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    trained = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out: dict[str, Any] = {
        "epochs_run": int(trainer.state.epoch),
        "max_epochs": int(wf.parser.get_parsed_content("max_epochs")),
        "best_val_auroc": float(evaluator.state.best_metric),
        "best_val_epoch": int(evaluator.state.best_metric_epoch),
        "head_change": _relative_change(init, trained, "head."),
        "vitals_encoder_change": _relative_change(init, trained, "encoders.vitals.mlp."),
        "learning_rate": float(wf.parser.get_parsed_content("learning_rate")),
    }
    wf.finalize()
    evw = bundle_workflow(BUNDLE, [*files, "evaluate.json"], "train", {**ov, "eval_output_dir": str(work / "eval")})
    evw.initialize()
    evw.run()
    evw.finalize()
    summary = pd.read_csv(work / "eval" / "summary.csv", index_col=0)
    for name, row in (("all", ALL), ("vitals", "vitals")):
        for col in ("auroc", "auroc_lo", "auroc_hi", "n", "threshold", "balanced_accuracy_at_thr", "balanced_accuracy"):
            if col in summary:
                out[f"{name}_{col}"] = float(summary.loc[row, col])
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=250)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    parser.add_argument("--report_encoder", default="bert_tiny", help="encoder of the notes (bundle default: bert)")
    parser.add_argument("--old_defaults", action="store_true", help="also the previous defaults on the first seed")
    parser.add_argument("--old_heads", nargs="+", default=None, choices=HEADS,
                        help="heads of the --old_defaults arm (default: every head of --heads)")  # fmt: skip
    parser.add_argument("--only_old", action="store_true", help="with --old_defaults: skip the new-defaults arms")
    parser.add_argument("--minilm_check", action="store_true", help="concat with the default MiniLM, first seed")
    parser.add_argument("--quick", action="store_true", help="smoke run: 80 rows, concat + qmf, 2 epochs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "clinical_defaults")
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="merge the arms of earlier result JSONs (runs side by side) into --out")  # fmt: skip
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from medfusion.apps.bundle import bundle_workflow
    from medfusion.data.synth_manifest import cohort_bundle_overrides, write_manifest_cohort

    rows, heads, seeds, extra = args.rows, list(args.heads), list(args.seeds), {}
    if args.quick:
        rows, heads, seeds, extra = 80, ["concat", "qmf"], seeds[:1], {"max_epochs": 2}
    work = args.work or Path(tempfile.mkdtemp(prefix="clinical_defaults_"))
    load_before = os.getloadavg()
    t_start = time.time()
    results: list[dict[str, Any]] = []
    cohorts: dict[int, Any] = {}
    for seed in seeds:
        cdir = work / f"cohort_{seed}"
        if cdir.exists():
            shutil.rmtree(cdir)
        info = write_manifest_cohort(cdir, rows=rows, seed=seed, image_size=args.image_size)
        overrides = {
            **cohort_bundle_overrides(info),
            "dataset_dir": str(cdir),
            "image_size": args.image_size,
            "device": "$torch.device('cpu')",
            "seed": seed,
            "encoders#report": {
                "name": args.report_encoder,
                **({"freeze": True} if args.report_encoder == "bert" else {}),
            },
        }
        wf = bundle_workflow(BUNDLE, ["train.json"], "train", {**overrides, "ckpt_dir": str(work / "x")})
        split = wf.parser.get_parsed_content("split")
        split_rule = wf.parser.get_parsed_content("split_rule")
        lr = logistic_regression(split)
        cohorts[seed] = {
            "positive_rate": info["positive_rate"],
            "patients": info["patients"],
            "oracle_auroc": info["oracle_auroc"],
            "split_rule": split_rule,
            "logreg": lr,
        }
        results.append({"seed": seed, "arm": "logreg", "defaults": "-", "vitals_auroc": lr["auroc"],
                        "vitals_auroc_lo": lr["auroc_lo"], "vitals_auroc_hi": lr["auroc_hi"]})  # fmt: skip
        logger.info("seed %d: logistic regression test AUROC %.3f (%s)", seed, lr["auroc"], split_rule)
        arms: list[tuple[str, str, dict[str, Any]]] = []
        if not args.only_old:
            arms = [("new", head, dict(extra)) for head in heads]
        if args.old_defaults and seed == seeds[0]:
            arms += [("old", head, {**OLD_DEFAULTS, **extra}) for head in (args.old_heads or heads)]
        if args.minilm_check and seed == seeds[0]:
            arms.append(("new, MiniLM", "concat", {**extra, "encoders#report": {"name": "bert", "freeze": True}}))
        for defaults, head, ov_extra in arms:
            hdir = work / f"s{seed}_{defaults.replace(', ', '_')}_{head}"
            if hdir.exists():
                shutil.rmtree(hdir)
            res = run_head(head, overrides, hdir, ov_extra)
            res.update({"seed": seed, "arm": head, "defaults": defaults})
            results.append(res)
            logger.info(
                "seed %d %s (%s defaults): test AUROC all %.3f, vitals %.3f; %d/%d epochs, %.0f s",
                seed, head, defaults, res.get("all_auroc", np.nan), res.get("vitals_auroc", np.nan),
                res["epochs_run"], res["max_epochs"], res["seconds"],
            )  # fmt: skip
            shutil.rmtree(hdir, ignore_errors=True)
            _write(args, argv, results, cohorts, dict(rows=rows, heads=heads, seeds=seeds), load_before, t_start, False)
    _write(args, argv, results, cohorts, dict(rows=rows, heads=heads, seeds=seeds), load_before, t_start, True)
    print(Path(f"{args.out}.md").read_text())
    return 0


def _figure(results: list[dict[str, Any]], path: Path) -> None:
    """Test AUROC (all modalities) of each head with its 95 % CI, per seed, against the logistic regression's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(results)
    heads = table[(table["arm"] != "logreg") & (table["defaults"] == "new")]
    lrs = table[table["arm"] == "logreg"]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(heads) + 1.9))
    for i, (_, r) in enumerate(heads.iterrows()):
        err = [[r["all_auroc"] - r["all_auroc_lo"]], [r["all_auroc_hi"] - r["all_auroc"]]]
        ax.errorbar(r["all_auroc"], i, xerr=err, fmt="o", color="tab:blue", capsize=3)
    for _, r in lrs.iterrows():
        ax.axvspan(r["vitals_auroc_lo"], r["vitals_auroc_hi"], color="tab:orange", alpha=0.15)
        ax.axvline(
            r["vitals_auroc"], color="tab:orange", label=f"logistic regression on the EHR columns (seed {r['seed']})"
        )
    ax.axvline(0.5, color="grey", ls="--", label="chance")
    ax.set_yticks(range(len(heads)), [f"{r['arm']} (seed {r['seed']})" for _, r in heads.iterrows()])
    ax.set_xlabel("test AUROC, cxr+report+vitals (95% bootstrap CI)")
    ax.set_xlim(0.3, 1.0)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(sources: list[Path], out: Path, argv: list[str] | None) -> int:
    """Merge result JSONs of runs with the same settings and cohorts (e.g. heads run side by side to save time)."""
    parts = [json.loads(p.read_text()) for p in sources]
    meta = dict(parts[0]["meta"])
    same = ("rows", "image_size", "report_encoder", "old_defaults")
    for p, part in zip(sources[1:], parts[1:]):
        bad = [k for k in same if part["meta"].get(k) != meta.get(k)]
        if bad:
            raise SystemExit(f"{p}: settings {bad} differ from {sources[0]}")
        for seed, c in part["meta"]["cohorts"].items():
            if seed in meta["cohorts"] and c["logreg"] != meta["cohorts"][seed]["logreg"]:
                raise SystemExit(f"{p}: seed {seed} cohort/split differs (logistic regression result differs)")
    results: list[dict[str, Any]] = []
    seen: set[tuple[Any, str, str]] = set()
    for part in parts:
        for r in part["results"]:
            key = (r["seed"], r["arm"], r["defaults"])
            if key not in seen:
                seen.add(key)
                results.append(r)
    meta["cohorts"] = {k: v for part in parts for k, v in part["meta"]["cohorts"].items()}
    meta["seeds"] = sorted({int(s) for part in parts for s in part["meta"]["seeds"]})
    meta["heads"] = list(dict.fromkeys(h for part in parts for h in part["meta"]["heads"]))
    meta["complete"] = all(part["meta"].get("complete", True) for part in parts)
    meta["runs"] = [
        {k: part["meta"][k] for k in ("command", "minutes", "load_average_before", "load_average_after",
                                      "torch_threads", "complete") if k in part["meta"]}
        for part in parts
    ]  # fmt: skip
    meta["command"] = "python clinical_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=float) + "\n")
    _figure(results, Path(f"{out}.png"))
    Path(f"{out}.md").write_text(_markdown(pd.DataFrame(results), meta) + f"\n![each head vs the logistic regression]"
                                 f"({Path(out).name}.png)\n")  # fmt: skip
    print(Path(f"{out}.md").read_text())
    return 0


def _write(
    args: argparse.Namespace,
    argv: list[str] | None,
    results: list[dict[str, Any]],
    cohorts: dict[int, Any],
    run: dict[str, Any],
    load_before: tuple[float, ...],
    t_start: float,
    complete: bool,
) -> None:
    """Write the results so far (after every arm, so a run cut short still leaves its measured arms)."""
    table = pd.DataFrame(results)
    meta = {
        "command": "python "
        + " ".join([Path(sys.argv[0]).name if argv is None else "clinical_defaults.py", *(argv or sys.argv[1:])]),
        "complete": complete,
        "rows": run["rows"],
        "image_size": args.image_size,
        "report_encoder": args.report_encoder,
        "seeds": run["seeds"],
        "heads": run["heads"],
        "old_defaults": OLD_DEFAULTS,
        "cohorts": cohorts,
        "minutes": round((time.time() - t_start) / 60, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "monai": __import__("monai").__version__,
            "sklearn": __import__("sklearn").__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=float) + "\n")
    Path(f"{args.out}.md").write_text(_markdown(table, meta))


def _fmt(row: pd.Series, key: str) -> str:
    v = row.get(f"{key}_auroc", np.nan)
    if pd.isna(v):
        return "n/a"
    return f"{v:.3f} [{row.get(f'{key}_auroc_lo', np.nan):.2f}, {row.get(f'{key}_auroc_hi', np.nan):.2f}]"


def _markdown(table: pd.DataFrame, meta: dict[str, Any]) -> str:
    lines = [
        "# Clinical bundle defaults on a 250-row real-shaped cohort: each head vs a logistic regression",
        "",
        f"Command: `{meta['command']}` ({meta['minutes']} min; load average before {meta['load_average_before']}, "
        f"after {meta['load_average_after']}; {meta['machine']}, {meta['torch_threads']} torch threads; "
        f"versions {meta['versions']})."
        if "runs" not in meta
        else f"Merged with `{meta['command']}` from runs side by side on {meta['machine']} (versions "
        f"{meta['versions']}); wall-clock times are under the load of all of them and of other jobs:",
        "",
        *(
            f"- `{r['command']}`: {r['minutes']} min, load average before {r['load_average_before']}, after "
            f"{r['load_average_after']}, {r['torch_threads']} torch thread(s)"
            + ("" if r.get("complete", True) else " (cut short)")
            for r in meta.get("runs", [])
        ),
        *([""] if meta.get("runs") else []),
        *(
            []
            if meta.get("complete", True)
            else ["**Partial: planned arms of a run marked 'cut short' did not run; only the arms below ran.**", ""]
        ),
        f"Cohort: `write_manifest_cohort(rows={meta['rows']}, seed=s, image_size={meta['image_size']})` per seed "
        "(signal shares ehr 0.5 / cxr 0.3 / note 0.2). Bundle: `train.json` defaults + the data overrides of "
        f"`cohort_bundle_overrides` + `image_size` {meta['image_size']} + `encoders#report` "
        f"`{meta['report_encoder']}` (CPU time; the 'MiniLM' row uses the default frozen MiniLM); `evaluate.json` "
        "on the test split. AUROC [95% bootstrap CI]. Defaults 'new': `train.json` as committed with this result "
        "(learning rate and epochs in the table); 'old': the previous defaults "
        f"{meta.get('old_defaults', OLD_DEFAULTS)}.",
        "",
    ]
    for seed, c in meta["cohorts"].items():
        lines.append(
            f"- seed {seed}: {c['patients']} patients, {100 * c['positive_rate']:.0f}% positive rows; {c['split_rule']}"
        )
    lines += [
        "",
        "## Per seed",
        "",
        "| seed | arm | defaults | AUROC cxr+report+vitals | AUROC vitals only | LR on vitals | epochs run / max "
        "| best val AUROC (epoch) | head change | vitals encoder change | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lr = {int(r["seed"]): r for _, r in table[table["arm"] == "logreg"].iterrows()}
    for _, r in table[table["arm"] != "logreg"].iterrows():
        lrr = lr.get(int(r["seed"]))
        lines.append(
            f"| {int(r['seed'])} | {r['arm']} | {r['defaults']} | {_fmt(r, 'all')} | {_fmt(r, 'vitals')} | "
            f"{_fmt(lrr, 'vitals') if lrr is not None else 'n/a'} | {int(r['epochs_run'])} / {int(r['max_epochs'])} | "
            f"{r['best_val_auroc']:.3f} ({int(r['best_val_epoch'])}) | {r['head_change']:.3f} | "
            f"{r['vitals_encoder_change']:.3f} | {r['seconds']:.0f} |"
        )
    heads = table[table["arm"] != "logreg"]
    lines += ["", "## Mean over seeds (new defaults)", "", "| arm | AUROC cxr+report+vitals | AUROC vitals only | "
              "seeds with CI lower bound > 0.5 (all modalities) |", "|---|---|---|---|"]  # fmt: skip
    new = heads[heads["defaults"] == "new"]
    for arm, part in new.groupby("arm", sort=False):
        above = int((part["all_auroc_lo"] > 0.5).sum())
        lines.append(
            f"| {arm} | {part['all_auroc'].mean():.3f} ± {part['all_auroc'].std(ddof=0):.3f} | "
            f"{part['vitals_auroc'].mean():.3f} ± {part['vitals_auroc'].std(ddof=0):.3f} | {above}/{len(part)} |"
        )
    lrs = table[table["arm"] == "logreg"]["vitals_auroc"]
    lines.append(f"| logistic regression (vitals) | n/a | {lrs.mean():.3f} ± {lrs.std(ddof=0):.3f} | |")
    lines += ["", "Mean ± standard deviation over seeds. 'head change' / 'vitals encoder change': relative L2 distance "
              "of the trained weights from their initial values.", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
