"""The ``medfusion`` command: ``synth``, ``check-data``, ``evaluate``, ``compare``, ``export-encoder``, ...

``compare`` and ``calibrate`` read evaluation folders; ``synth`` has the kinds brats, clinical, manifest and
latent; ``dicom-classify`` is the chest X-ray counterpart of ``dicom-segment``.

Every sub-command imports its implementation lazily so ``medfusion --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _rates(text: str | None, option: str) -> dict[str, float] | None:
    """Parse ``"ehr=0.1,cxr=0.3"`` into ``{"ehr": 0.1, "cxr": 0.3}``."""
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise SystemExit(
                f"{option}: expected name=value pairs separated by commas (e.g. ehr=0.1,cxr=0.3), got {part!r}"
            ) from None
    return out


def _cmd_synth_brats(args: argparse.Namespace) -> int:
    from medfusion.data.synth_brats import write_brats_cohort

    paths = write_brats_cohort(
        args.out,
        cases=args.cases,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        style=args.style,
        contrast=args.contrast,
    )
    what = "BraTS 2021-layout" if args.style == "brats2021" else "BRATS 2015 toolkit-style (see manifest.csv)"
    print(f"wrote {len(paths)} {what} phantom cases ({args.size}^3) to {args.out}")
    return 0


def _cmd_synth_clinical(args: argparse.Namespace) -> int:
    from medfusion.data.synth_clinical import write_clinical_cohort

    info = write_clinical_cohort(
        args.out,
        samples=args.samples,
        seed=args.seed,
        missing=_rates(args.missing, "--missing"),
        noise=_rates(args.noise, "--noise"),
        overwrite=args.overwrite,
    )
    print(f"wrote a MIMIC-style cohort of {args.samples} stays to {args.out}")
    if info:
        print(info)
    return 0


def _cmd_synth_manifest(args: argparse.Namespace) -> int:
    from medfusion.data.synth_manifest import write_manifest_cohort

    info = write_manifest_cohort(
        args.out,
        rows=args.rows,
        seed=args.seed,
        positive_rate=args.positive_rate,
        image_size=args.image_size,
        absent_file_rate=args.absent_file_rate,
        overwrite=args.overwrite,
    )
    print(
        f"wrote a {info['rows']}-row manifest ({info['patients']} patients, {100 * info['positive_rate']:.0f}% "
        f"positive, {info['absent_files']} absent image files) to {Path(args.out) / 'manifest.csv'}"
    )
    return 0


def _cmd_synth_latent(args: argparse.Namespace) -> int:
    from medfusion.data.synth_latent import write_latent_table

    write_latent_table(
        args.out,
        latent=args.latent,
        p=args.p,
        r=args.r,
        g=args.g,
        w=args.w,
        seed=args.seed,
        n=args.n,
        missing_rate=args.missing_rate,
        overwrite=args.overwrite,
    )
    print(f"wrote a {args.n}-row two-modality regression table to {Path(args.out) / 'table.csv'}")
    return 0


def _pairs(values: Sequence[str] | None, option: str, multi: bool = False) -> dict[str, str | list[str]]:
    """Parse ``["a=x,b=y"]`` (or, with ``multi``, ``["a=x,y,z"]``: one name with a column list) into a dict."""
    out: dict[str, str | list[str]] = {}
    for text in values or []:
        parts = [text] if multi else text.split(",")
        for part in parts:
            name, sep, value = part.partition("=")
            if not sep or not name.strip() or not value.strip():
                example = "ehr=age,heart_rate,lactate" if multi else "cxr=image,note=text"
                raise SystemExit(f"{option}: expected name=value (e.g. {example}), got {part!r}")
            out[name.strip()] = [v.strip() for v in value.split(",")] if multi else value.strip()
    return out


def _cmd_check_data(args: argparse.Namespace) -> int:
    from medfusion.data.check import check_path

    settings: dict[str, Any] = {}
    if args.bundle is not None:
        from medfusion.apps.clinical_bundle import bundle_check_settings
        from medfusion.apps.export import parse_overrides

        settings = bundle_check_settings(args.bundle, parse_overrides(args.override))
    modalities: dict[str, Any] | None = settings.pop("modalities", None)
    columns = {**_pairs(args.columns, "--columns"), **_pairs(args.tabular, "--tabular", multi=True)}
    if args.modalities:
        modalities = {m: columns.get(m, m) for m in args.modalities}
    elif columns:
        modalities = {**(modalities or {}), **columns}
    kinds = {**dict(settings.pop("kinds", None) or {}), **_pairs(args.kinds, "--kinds")}
    manifest: dict[str, Any] = {
        "kinds": kinds or None,
        "id_column": args.id_column or settings.get("id_column") or "case_id",
        "label_columns": [args.label_column] if args.label_column else settings.get("label_columns", ["label"]),
        "group_column": args.group_column or settings.get("group_column"),
        "split_column": args.split_column or settings.get("split_column"),
        "missing_files": args.missing_files or settings.get("missing_files") or "missing",
        "num_classes": args.num_classes if args.num_classes is not None else settings.get("num_classes"),
    }
    report = check_path(
        args.path,
        layout=args.layout,
        modalities=modalities,
        require_label=not args.no_labels,
        check_labels=not args.no_labels,
        num_workers=args.workers,
        label_convention=args.label_convention,
        **manifest,
    )
    print(report.to_text(details=args.details))
    return 0 if report.ok else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from medfusion.apps.bundle import evaluate_bundle
    from medfusion.apps.export import parse_overrides

    table = evaluate_bundle(
        bundle_dir=args.bundle,
        dataset_dir=args.dataset_dir,
        output_dir=args.output_dir,
        checkpoint=args.checkpoint,
        combinations=args.combinations,
        roi_size=args.roi_size,
        cached=not args.naive,
        hd95=not args.no_hd95,
        device=args.device,
        modalities=args.modalities,
        extra_overrides=parse_overrides(args.override),
        overwrite=args.overwrite,
    )
    print(table)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from medfusion.evaluation.compare import compare_runs

    board = compare_runs(
        args.eval_dirs,
        args.out,
        names=args.names,
        reference=args.reference,
        metrics=args.metrics,
        alpha=args.alpha,
        n_boot=args.n_boot,
        seed=args.seed,
        correction=args.correction,
        routing_metric=args.routing,
        allow_test_split=args.allow_test_split,
        overwrite=args.overwrite,
    )
    print((Path(args.out) / "report.md").read_text())
    n_best = int(board["best"].sum())
    print(f"{n_best} significant winner(s) in {int((board['rank'] == 1).sum())} metric x combination cells")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import pandas as pd

    from medfusion.evaluation.calibration import fit_temperatures, save_temperatures
    from medfusion.evaluation.report import read_record

    src = Path(args.eval_dir)
    preds = src / "predictions.csv"
    if not preds.is_file():
        raise FileNotFoundError(f"{preds} does not exist (calibrate reads a classification evaluation folder).")
    record = read_record(src)
    if record.get("split") == "test":
        raise ValueError(f"{src} is an evaluation of the test split; fit on validation (eval_split=val).")
    if record.get("temperature_scaled"):
        raise ValueError(f"{src} holds temperature-scaled probabilities; fit on an uncalibrated evaluation.")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it.")
    modalities = args.modalities or record.get("modalities")
    if not modalities:
        raise ValueError(f"{src}/evaluation.json states no modalities; pass --modalities.")
    temps = fit_temperatures(pd.read_csv(preds))
    save_temperatures(temps, args.out, modalities, source=str(src))
    for name, t in temps.items():
        print(f"{name}: T = {t:.3f}")
    print(f"wrote {args.out}")
    return 0


def _cmd_export_encoder(args: argparse.Namespace) -> int:
    from medfusion.apps.export import cmd_export_encoder

    return cmd_export_encoder(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from medfusion.data.layout import LAYOUT_FAMILIES  # light: the layout modules are imported when used

    parser = argparse.ArgumentParser(
        prog="medfusion",
        description="Multimodal medical learning with missing, noisy or imbalanced modalities.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser(
        "synth",
        help="write synthetic cohorts (BraTS-like phantoms, MIMIC-style clinical, real-shaped manifest, latent tables)",
    )
    synth_sub = synth.add_subparsers(dest="kind", required=True, metavar="KIND")
    sb = synth_sub.add_parser("brats", help="BraTS 2021-layout NIfTI phantoms with tumour sub-regions")
    sb.add_argument("out", type=Path, help="output folder (must not exist or be empty)")
    sb.add_argument("--cases", type=int, default=8)
    sb.add_argument("--size", type=int, default=64, help="cubic volume size S (S^3 voxels)")
    sb.add_argument("--seed", type=int, default=0)
    sb.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sb.add_argument(
        "--style",
        choices=("brats2021", "brats2015"),
        default="brats2021",
        help="brats2021: BraTS 2021 folders; brats2015: a BRATS 2015 toolkit export (FLAIR + T1c z-scored, background "
        "not 0, brainmask.nii.gz, OTMultiClass.nii.gz with labels 1-4) with a volume manifest OUT/manifest.csv",
    )
    sb.add_argument(
        "--contrast",
        choices=("default", "unequal", "exclusive"),
        default="default",
        help="contrast table (docs/synthetic_brats.md): default, unequal (one modality carries each region) or "
        "exclusive (the other modalities carry no contrast there)",
    )
    sb.set_defaults(func=_cmd_synth_brats)
    sc = synth_sub.add_parser("clinical", help="MIMIC-style EHR + CXR + report cohort")
    sc.add_argument("out", type=Path)
    sc.add_argument("--samples", type=int, default=200)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--missing", default=None, help="missing rate per modality, e.g. cxr=0.3,report=0.2")
    sc.add_argument("--noise", default=None, help="noise level per modality, e.g. cxr=0.5")
    sc.add_argument("--overwrite", action="store_true")
    sc.set_defaults(func=_cmd_synth_clinical)
    sm = synth_sub.add_parser(
        "manifest",
        help="CSV manifest shaped like real data: CXR + long notes + sparse EHR columns, patients with several rows",
        description="Writes OUT/manifest.csv (image_id, patient_id, outcome, image_path, note, 9 EHR columns), "
        "OUT/images/, OUT/truth.csv and OUT/signal.json (docs/synthetic_clinical.md).",
    )
    sm.add_argument("out", type=Path)
    sm.add_argument("--rows", type=int, default=250)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--positive-rate", type=float, default=0.19, help="fraction of rows with outcome 1")
    sm.add_argument("--image-size", type=int, default=64)
    sm.add_argument("--absent-file-rate", type=float, default=0.05, help="rows whose image file is not written")
    sm.add_argument("--overwrite", action="store_true")
    sm.set_defaults(func=_cmd_synth_manifest)
    sl = synth_sub.add_parser(
        "latent",
        help="two-modality latent factor regression table (Meta Fusion simulation, BENCHMARKS.md B3)",
        description="Writes OUT/table.csv (case_id, m1_*, m2_*, y, split) and OUT/signal.json; defaults = a small "
        "setting 1.1 (linear, complementary modalities).",
    )
    sl.add_argument("out", type=Path)
    sl.add_argument("--latent", type=int, nargs=3, default=[20, 30, 0], metavar=("D1", "D2", "DS"))
    sl.add_argument("--p", type=int, nargs=2, default=[50, 40], metavar=("P1", "P2"), help="feature sizes")
    sl.add_argument("--r", type=float, nargs=2, default=[0.4, 0.4], metavar=("R1", "R2"), help="noise ratios")
    sl.add_argument("--g", nargs=3, default=["lin", "lin", "lin"], choices=["lin", "quad"], metavar=("G1", "G2", "GS"))
    sl.add_argument("--w", type=float, nargs=4, default=[1.0, 1.0, 0.0, 0.0], metavar=("W1", "W2", "WS", "WI"))
    sl.add_argument("--n", type=int, default=2000, help="rows (split 64/16/20 train/val/test)")
    sl.add_argument("--seed", type=int, default=1)
    sl.add_argument("--missing-rate", type=float, default=0.0, help="probability a modality block of a row is NaN")
    sl.add_argument("--overwrite", action="store_true")
    sl.set_defaults(func=_cmd_synth_latent)

    cd = sub.add_parser(
        "check-data",
        help="check a dataset (files readable, shapes, labels, EHR values, reports) before training",
        description="Check every case of a dataset and print a per-case report. Exit code 0: no errors "
        "(warnings allowed); 1: problems found; 2: usage error (bad option, path does not exist).",
    )
    cd.add_argument("path", type=Path, help="BraTS/MSD folder, MIMIC-style folder (holding ehr/) or CSV manifest")
    cd.add_argument(
        "--layout",
        choices=("auto", *LAYOUT_FAMILIES),
        default="auto",
        help="auto: detected (a volume-manifest .csv or a BraTS/MSD folder is brats, a folder with ehr/ is mimic, "
        "another .csv is a manifest); a folder of no known layout is an error naming the layouts tried",
    )
    cd.add_argument("--modalities", nargs="+", default=None, help="modality names (default: the layout's all)")
    cd.add_argument("--no-labels", action="store_true", help="do not require or check labels")
    cd.add_argument("--workers", type=int, default=None, help="reader threads (default: min(4, CPUs))")
    cd.add_argument(
        "--label-convention",
        default=None,
        help="BraTS/volume manifest: the labels' convention for every case (brats, brats2015, brats2023, msd, or "
        "'TC=1,3,4;WT=1,2,3,4;ET=4'); default: the layout's own (a manifest's label_convention column, else brats)",
    )
    cd.add_argument(
        "--details", action="store_true", help="one line per case and problem (default: warnings summarised)"
    )
    man = cd.add_argument_group("CSV manifests (the bundle's settings, or these options)")
    man.add_argument(
        "--bundle", type=Path, default=None, help="read the settings below from <bundle>/configs/train.json"
    )
    man.add_argument("--override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="bundle config overrides used for training, e.g. 'group_column=patient_id'")  # fmt: skip
    man.add_argument("--kinds", action="append", metavar="NAME=KIND,...",
                     help="modality kinds: image, volume, ehr, text, tabular (e.g. cxr=image,note=text)")  # fmt: skip
    man.add_argument("--tabular", action="append", metavar="NAME=COL1,COL2,...",
                     help="a tabular modality made of several columns (repeat for several)")  # fmt: skip
    man.add_argument("--columns", action="append", metavar="NAME=COLUMN,...",
                     help="single-column modalities whose name differs from the column")  # fmt: skip
    man.add_argument("--id-column", default=None, help="row id column (default case_id)")
    man.add_argument("--label-column", default=None, help="label column (default label)")
    man.add_argument("--group-column", default=None, help="patient (group) column used for splitting")
    man.add_argument("--split-column", default=None, help="column naming each row's split")
    man.add_argument("--num-classes", type=int, default=None, help="labels must be class indices 0..N-1")
    man.add_argument("--missing-files", choices=("missing", "error"), default=None,
                     help="an absent file is a missing modality (default) or an error")  # fmt: skip
    cd.set_defaults(func=_cmd_check_data)

    ev = sub.add_parser("evaluate", help="evaluate a trained bundle on every modality combination")
    ev.add_argument("--bundle", type=Path, required=True, help="bundle folder (configs/ holds the network)")
    ev.add_argument("--dataset_dir", type=Path, required=True, help="dataset folder (any supported layout)")
    ev.add_argument("--output_dir", type=Path, required=True, help="where tables and the heatmap go")
    ev.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir (otherwise refused)")
    ev.add_argument("--checkpoint", type=Path, default=None, help="default: <bundle>/models/model.pt")
    ev.add_argument("--combinations", nargs="*", default=None, help="e.g. flair+t1ce t1 (default: all)")
    ev.add_argument("--roi_size", nargs=3, type=int, default=None, help="sliding window (default: the bundle's)")
    ev.add_argument("--naive", action="store_true", help="one inference per combination (no shared encoding)")
    ev.add_argument("--no_hd95", action="store_true", help="skip HD95 (faster)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: automatic)")
    ev.add_argument(
        "--modalities", nargs="+", default=None, help="the model's modalities in training order (default: the bundle's)"
    )
    ev.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides the model was trained with, e.g. 'network_def#channels=[8,16,32,64]' "
        "'label_convention=brats2015' (values are JSON, else strings)",
    )
    ev.set_defaults(func=_cmd_evaluate)

    cp = sub.add_parser(
        "compare",
        help="compare evaluated runs on the same cases: leaderboard with paired tests, heatmaps, report, routing",
        description="Reads the evaluation folders the bundles write (per_case.csv / predictions.csv, evaluation.json) "
        "without re-running models; refuses runs whose cases or split differ. Writes report.md, leaderboard.md/.csv, "
        "heatmap_<metric>.png and difference_<metric>.csv, and routing.json with --routing (validation runs).",
    )
    cp.add_argument("eval_dirs", nargs="+", type=Path, metavar="EVAL_DIR", help="evaluation folders (two or more)")
    cp.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    cp.add_argument("--names", nargs="+", default=None, help="default: folder names (parents' if repeated)")
    cp.add_argument("--reference", default=None, help="run the heatmaps subtract (default: the first)")
    cp.add_argument("--metrics", nargs="+", default=None, help="default: dice/hd95 per region or auroc auprc bal. acc")
    cp.add_argument("--alpha", type=float, default=0.05, help="level of the two-sided paired tests")
    cp.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--correction", choices=("holm", "none"), default="holm", help="over combinations per metric")
    cp.add_argument("--routing", default=None, metavar="METRIC", help="write routing.json choosing by METRIC")
    cp.add_argument("--allow-test-split", action="store_true", help="allow routing from test-split evaluations")
    cp.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    cp.set_defaults(func=_cmd_compare)

    ca = sub.add_parser(
        "calibrate",
        help="fit one temperature per modality combination on a VALIDATION evaluation (predictions.csv)",
        description="Writes calibration.json ({combination: T}); give it to the clinical bundle's evaluation "
        "(--eval_calibration_file) or keep it beside the model: the router applies it per run.",
    )
    ca.add_argument("eval_dir", type=Path, help="classification evaluation folder of the validation split")
    ca.add_argument("--out", type=Path, required=True, help="calibration.json to write (e.g. beside model.pt)")
    ca.add_argument("--modalities", nargs="+", default=None, help="default: from evaluation.json")
    ca.add_argument("--overwrite", action="store_true")
    ca.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser(
        "export-encoder",
        help="export one modality's trained encoder (TorchScript file, or a transformers directory for BERT)",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (configs/ holds network_def)")
    p.add_argument("--modality", required=True, help="modality name, e.g. t1ce")
    p.add_argument("--out", type=Path, required=True, help="output .ts/.pt file (a directory for BERT encoders)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <bundle>/models/model.pt")
    p.add_argument("--config", default=None, help="config file in configs/ (default: inference.json)")
    p.add_argument(
        "--override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides the model was trained with, e.g. 'network_def#channels=[8,16,32,64]'",
    )
    p.add_argument("--example_size", type=int, default=None, help="tracing input size (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_export_encoder)

    from medfusion.apps.dicom.cli import add_dicom_parsers  # light: handlers import their libraries lazily

    add_dicom_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medfusion`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # a bundle config wraps its errors in RuntimeError("Failed to evaluate ...")
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, _USER_ERRORS):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"medfusion {args.command}: error: {cause}", file=sys.stderr)
        return 2


_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


if __name__ == "__main__":
    sys.exit(main())
