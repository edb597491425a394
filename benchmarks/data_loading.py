"""B4, data loading: BraTS cases/s through MONAI ``Dataset`` vs ``CacheDataset`` vs ``PersistentDataset``.

The same training transform chain as the bundle (``brats_transforms(mode="train")``: load 4 NIfTI
modalities + label, RAS orientation, label -> TC/WT/ET, per-channel brain normalisation, then the random
crop/flip/intensity part) is read over ``--epochs`` epochs. ``Dataset`` repeats everything each epoch;
``CacheDataset`` keeps the deterministic prefix in RAM (built before epoch 1, its time is reported
separately); ``PersistentDataset`` writes it to disk during epoch 1 and reads it back afterwards. Cases/s
= cases per epoch / epoch seconds (``DataLoader`` with ``--workers`` worker processes, batch 1).

Cohorts: the BraTS-like phantoms of ``medfusion synth brats`` at ``--size`` and, with ``--real``, the real
BraTS 2021 case (240x240x155) repeated ``--real_repeats`` times in the data list.

Usage (results land in benchmarks/results/data_loading.{json,md}):

    python benchmarks/data_loading.py --cases 16 --size 96 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset

from medfusion.data.brats import discover_brats
from medfusion.data.synth_brats import write_brats_cohort
from medfusion.data.volume import brats_transforms
from medfusion.modality import BRATS_MODALITIES

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("Dataset", "CacheDataset", "PersistentDataset")


def time_kind(kind: str, data: list[dict[str, Any]], args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """Epoch times of one dataset class on ``data`` (plus the CacheDataset build time)."""
    tf = brats_transforms(BRATS_MODALITIES, "train", roi_size=[args.roi] * 3)
    t0 = time.time()
    if kind == "Dataset":
        ds = Dataset(data, tf)
    elif kind == "CacheDataset":
        ds = CacheDataset(data, tf, cache_rate=1.0, num_workers=args.workers or None, progress=False)
    else:
        ds = PersistentDataset(data, tf, cache_dir=cache_dir)
    build = time.time() - t0
    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=args.workers)
    epochs = []
    for _ in range(args.epochs):
        t = time.time()
        n = sum(1 for _ in loader)
        epochs.append(time.time() - t)
    return {"kind": kind, "cases": n, "build_s": build, "epoch_s": epochs, "cases_per_s": [n / e for e in epochs]}


def run_cohort(name: str, data: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        cache_dir = Path(tempfile.mkdtemp(prefix="mf_persistent_"))
        try:
            r = time_kind(kind, data, args, cache_dir)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        r["cohort"] = name
        rows.append(r)
        rate = ", ".join(f"{v:.2f}" for v in r["cases_per_s"])
        print(f"{name} {kind}: build {r['build_s']:.1f}s, cases/s per epoch [{rate}]", flush=True)
    return rows


def write_md(out: dict[str, Any], path: Path) -> None:
    lines = [
        "# B4: data loading (BraTS training transforms)",
        "",
        f"Command: `{out['command']}`; {out['workers']} DataLoader workers, batch 1, {out['epochs']} epochs, "
        f"train crop {out['roi']}^3; machine {out['machine']}; 1-min load average at start {out['load_start']:.2f}.",
        "",
        "| cohort | dataset | cases | build (s) | "
        + " | ".join(f"epoch {i + 1} cases/s" for i in range(out["epochs"]))
        + " |",
        "|---|---|---|---|" + "---|" * out["epochs"],
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['cohort']} | {r['kind']} | {r['cases']} | {r['build_s']:.1f} | "
            + " | ".join(f"{v:.2f}" for v in r["cases_per_s"])
            + " |"
        )
    lines += [
        "",
        "Build = constructing the dataset object (CacheDataset runs the deterministic transforms of every case "
        "here; PersistentDataset does it lazily during epoch 1). The random crop/flip/intensity transforms run "
        "every epoch for every class. Peak RSS of the process: " + f"{out['peak_rss_gb']:.2f} GB.",
        "",
    ]
    for cohort in dict.fromkeys(r["cohort"] for r in out["rows"]):
        last = {r["kind"]: r["cases_per_s"][-1] for r in out["rows"] if r["cohort"] == cohort}
        base = last["Dataset"]
        ratios = ", ".join(f"{k} {v / base:.2f}x" for k, v in last.items() if k != "Dataset")
        lines.append(f"- {cohort}, last epoch, relative to Dataset: {ratios}.")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--size", type=int, default=96, help="phantom volume size S (S^3)")
    p.add_argument("--roi", type=int, default=64, help="training crop")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    p.add_argument("--real_repeats", type=int, default=4)
    p.add_argument("--data", type=Path, default=Path("/tmp/medfusion_bench_loading"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    load_start = os.getloadavg()[0]
    cohort = args.data / f"phantoms_{args.cases}_{args.size}"
    if not cohort.is_dir():
        write_brats_cohort(cohort, cases=args.cases, size=args.size, seed=0)
    rows = run_cohort(f"phantoms {args.size}^3", discover_brats(cohort, BRATS_MODALITIES, require_label=True), args)
    if args.real.is_dir() and args.real_repeats > 0:
        real = discover_brats(args.real, BRATS_MODALITIES, require_label=True)
        data = [dict(real[0], case_id=f"{real[0]['case_id']}_{i}") for i in range(args.real_repeats)]
        rows += run_cohort("real case 240x240x155", data, args)
    out = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "workers": args.workers,
        "epochs": args.epochs,
        "roi": args.roi,
        "machine": f"{platform.platform()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "load_start": load_start,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_loading.json").write_text(json.dumps(out, indent=2))
    write_md(out, args.out / "data_loading.md")
    print(f"wrote {args.out / 'data_loading.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
