"""B4, segmentation evaluation speed: naive vs cached vs cached + batched all-combination evaluation; full size.

Three ways to score every modality combination of a case (``evaluate_segmentation``), timed side by side
in one process (the modes alternate within every repeat, the median is reported, so machine load hits all
of them alike):

* ``naive``: one sliding-window inference per combination (``cached=False``);
* ``cached``: each window encoded once, one decoder call per combination (``batch_combinations=False``);
* ``batched``: each window encoded once, the combinations decoded together (``Segmenter.decode_combinations``:
  the layers reading fused features run once per (slot, modality) pair, the rest with the combinations folded
  into the batch, chunks of ``--memory_budget_gb``), the default.

Cohorts: BraTS-like phantoms (``--size``^3, one window each) and the real BraTS 2021 case cropped to
``--crop``^3 around its tumour (``--crop_roi``^3 windows). The network is the bundle's default Segmenter,
trained for ``--train_steps`` steps on the phantoms so the Dice values are not degenerate; the Dice
tables of the three modes are compared (largest absolute difference and whether the thresholded
predictions are identical).

Full size (``--full_size``, each configuration in a fresh process so the peak RSS is its own): the real
case (240x240x155), all 15 combinations with the batched and with the cached path at ``--full_rois``, and
single-combination inference (all four modalities; what a clinical pipeline runs) at the same window
sizes; ``--threads`` torch threads; each with the foreground crop on and off (``--full_crops``, rows side by
side: sliding windows over the brain's bounding box only, background outside, see
``medfusion.evaluation.segmentation``). The network is the phantom-trained one (weights handed to the
workers), so its predictions on the real case are confident enough to compare: for every (kind, roi) run
both ways the Dice tables (all 15) or the thresholded maps (single) of crop on/off are compared. Seconds
include loading + preprocessing (reported separately) and the Dice computation, as
``benchmarks/results/brats_metakd_full_size.md`` did.

Usage (results land in benchmarks/results/seg_eval_speed.{json,md}):

    python benchmarks/seg_eval_speed.py --full_size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medfusion.data.brats import discover_brats
from medfusion.data.synth_brats import write_brats_cohort
from medfusion.data.volume import brats_transforms
from medfusion.evaluation.segmentation import evaluate_segmentation, foreground_box, predict_all_combinations
from medfusion.modality import BRATS_MODALITIES, all_combination_masks
from medfusion.models.segmenter import DEFAULT_MEMORY_BUDGET_GB, Segmenter

RESULTS = Path(__file__).resolve().parent / "results"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
MODS = BRATS_MODALITIES
DICE = ["dice_tc", "dice_wt", "dice_et", "dice_et_pp"]
MODES: dict[str, dict[str, Any]] = {
    "naive": {"cached": False},
    "cached": {"cached": True, "batch_combinations": False},
    "batched": {"cached": True, "batch_combinations": True},
}


def uptime() -> str:
    """``uptime`` output (load averages at the time)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def train_network(samples: list[dict[str, Any]], steps: int, size: int, seed: int = 0) -> Segmenter:
    """The default Segmenter, a few Dice+BCE steps on whole phantoms with random modality subsets."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    net = Segmenter(MODS)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    masks = all_combination_masks(MODS)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(samples), (2,), generator=g).tolist()
        x = torch.stack([samples[i]["image"] for i in idx])
        y = torch.stack([samples[i]["label"] for i in idx])
        m = masks[torch.randint(len(masks), (2,), generator=g)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x, m), y)
        loss.backward()
        opt.step()
    return net.eval()


def prepared(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tf = brats_transforms(MODS, "eval")
    out = []
    for e in entries:
        s = tf(e)
        out.append(
            {
                "image": torch.as_tensor(s["image"]).float(),
                "label": torch.as_tensor(s["label"]).float(),
                "modality_mask": torch.ones(len(MODS), dtype=torch.bool),
                "case_id": e["case_id"],
            }
        )
    return out


def crop_around_tumour(sample: dict[str, Any], size: int) -> dict[str, Any]:
    """``size``^3 crop of a prepared case centred on the whole tumour's bounding box."""
    wt = sample["label"][1] > 0
    idx = wt.nonzero()
    centre = ((idx.min(0).values + idx.max(0).values) // 2).tolist()
    shape = sample["image"].shape[1:]
    sl = []
    for c, n in zip(centre, shape):
        start = int(min(max(c - size // 2, 0), n - size))
        sl.append(slice(start, start + size))
    image, label = sample["image"][:, sl[0], sl[1], sl[2]], sample["label"][:, sl[0], sl[1], sl[2]]
    return {**sample, "image": image, "label": label}


def compare_modes(
    net: Segmenter, samples: list[dict[str, Any]], roi: int, repeats: int, budget: float
) -> dict[str, Any]:
    """Median seconds per mode (alternating order), ratios and Dice agreement."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    tables: dict[str, pd.DataFrame] = {}
    names = list(MODES)
    load_before = uptime()
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for mode in order:
            t0 = time.perf_counter()
            df = evaluate_segmentation(
                net,
                samples,
                MODS,
                None,
                roi_size=[roi] * 3,
                hd95=False,
                device="cpu",
                progress=False,
                memory_budget_gb=budget,
                **MODES[mode],
            )
            times[mode].append(time.perf_counter() - t0)
            tables[mode] = df
    med = {m: float(np.median(v)) for m, v in times.items()}
    ref = tables["naive"][DICE].to_numpy()
    agree = {
        m: {
            "max_abs_dice_diff_vs_naive": float(np.abs(tables[m][DICE].to_numpy() - ref).max()),
            "dice_identical_to_naive": bool((tables[m][DICE].to_numpy() == ref).all()),
        }
        for m in MODES
    }
    return {
        "cases": len(samples),
        "shape": list(samples[0]["image"].shape[1:]),
        "roi": roi,
        "repeats": repeats,
        "seconds": times,
        "median_s": med,
        "naive_over_batched": med["naive"] / med["batched"],
        "naive_over_cached": med["naive"] / med["cached"],
        "cached_over_batched": med["cached"] / med["batched"],
        "agreement": agree,
        "mean_dice_batched": {k: float(tables["batched"][k].mean()) for k in DICE},
        "uptime_before": load_before,
        "uptime_after": uptime(),
    }


# ----------------------------------------------------------------------------- full-size workers


def worker(args: argparse.Namespace) -> int:
    """One full-size configuration in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = Segmenter(MODS)
    if args.weights:
        net.load_state_dict(torch.load(args.weights, weights_only=True))
    net.eval()
    crop = bool(args.fg_crop)
    entries = discover_brats(args.real, MODS, require_label=True)
    t0 = time.perf_counter()
    sample = prepared(entries[:1])[0]
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.worker == "single":
        with torch.no_grad():
            logits = predict_all_combinations(
                net,
                sample["image"][None],
                torch.ones(1, len(MODS), dtype=torch.bool),
                roi_size=[args.roi] * 3,
                overlap=0.25,
                cached=False,
                crop_foreground=crop,
            )
        pred = logits.sigmoid() > 0.5
        extra: dict[str, Any] = {"combinations": 1, "foreground_voxels": int(pred.sum())}
    else:
        df = evaluate_segmentation(
            net,
            [sample],
            MODS,
            None,
            roi_size=[args.roi] * 3,
            hd95=False,
            device="cpu",
            progress=False,
            memory_budget_gb=args.memory_budget_gb,
            crop_foreground=crop,
            **MODES[args.worker],
        )
        extra = {
            "combinations": int(df["combination"].nunique()),
            "mean_dice_wt": float(df["dice_wt"].mean()),
            "dice": df[["combination", *DICE]].to_dict("records"),
        }
    sec = time.perf_counter() - t0
    if args.worker == "single" and args.save_pred:
        np.save(args.save_pred, np.packbits(pred.numpy().reshape(-1)))
    fg = foreground_box(sample["image"])
    box = fg if crop else None
    extra["box"] = [b.stop - b.start for b in box] if box else list(sample["image"].shape[1:])
    extra["foreground_box"] = [[b.start, b.stop] for b in fg] if fg else None
    extra["spatial"] = list(sample["image"].shape[1:])
    print(
        json.dumps(
            {
                "kind": args.worker,
                "roi": args.roi,
                "crop": crop,
                "threads": torch.get_num_threads(),
                "load_preprocess_s": t_load,
                "inference_s": sec,
                "total_s": t_load + sec,
                "peak_rss_gb": peak_rss_gb(),
                "shape": list(sample["image"].shape[1:]),
                **extra,
            }
        ),
        flush=True,
    )
    return 0


def full_size(args: argparse.Namespace, res: dict[str, Any], name: str, net: Segmenter) -> list[dict[str, Any]]:
    """Every (roi, kind, crop) in a fresh process; the results files are rewritten after every row."""
    rows = res.setdefault("full_size", [])
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "net.pt"
        torch.save(net.state_dict(), weights)
        for roi in args.full_rois:
            for kind in args.full_kinds:
                for crop in args.full_crops:
                    before = uptime()
                    pred = Path(tmp) / f"{kind}_{roi}_{crop}.npy"
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        kind,
                        "--roi",
                        str(roi),
                        "--threads",
                        str(args.threads),
                    ]
                    cmd += ["--real", str(args.real), "--memory_budget_gb", str(args.memory_budget_gb)]
                    cmd += ["--fg_crop", str(crop), "--weights", str(weights), "--save_pred", str(pred)]
                    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    row["uptime_before"], row["uptime_after"] = before, uptime()
                    rows.append(row)
                    print(
                        f"full size {kind} roi {roi} crop {crop}: {row['total_s']:.1f} s, {row['peak_rss_gb']:.2f} GB",
                        flush=True,
                    )
                    res["crop_agreement"] = crop_agreement(rows, Path(tmp))
                    write_results(res, args.out, name)
    return rows


def crop_agreement(rows: list[dict[str, Any]], tmp: Path) -> list[dict[str, Any]]:
    """Crop on vs off for every (kind, roi) run both ways: Dice tables (all 15) or thresholded maps (single)."""
    out = []
    for kind, roi in dict.fromkeys((r["kind"], r["roi"]) for r in rows):
        pair = {r["crop"]: r for r in rows if r["kind"] == kind and r["roi"] == roi}
        if set(pair) != {True, False}:
            continue
        if kind == "single":
            on: np.ndarray
            off: np.ndarray
            on, off = (np.unpackbits(np.load(tmp / f"{kind}_{roi}_{c}.npy")).astype(bool) for c in (1, 0))
            on, off = (m[: 3 * (len(m) // 3)].reshape(3, -1) for m in (on, off))  # [TC, WT, ET] rows
            dice = [2 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum())) for a, b in zip(on, off)]
            inside = np.zeros(pair[True]["spatial"], dtype=bool)
            inside[tuple(slice(a, b) for a, b in pair[True]["foreground_box"])] = True
            inside = inside.reshape(-1)
            out.append(
                {
                    "kind": kind,
                    "roi": roi,
                    "voxels_differing": int((on != off).sum()),
                    "voxels_differing_inside_box": int((on != off)[:, inside].sum()),
                    "off_predicted_outside_box": int(off[:, ~inside].sum()),
                    "voxels": int(on.shape[1]),
                    "dice_on_vs_off": dict(zip(["tc", "wt", "et"], dice)),
                    "predicted_voxels": {"on": int(on.sum()), "off": int(off.sum())},
                }
            )
        else:
            a, b = (pd.DataFrame(pair[c]["dice"]).set_index("combination")[DICE] for c in (True, False))
            diff = (a - b.loc[a.index]).abs()
            out.append(
                {
                    "kind": kind,
                    "roi": roi,
                    "max_abs_dice_diff": float(diff.to_numpy().max()),
                    "mean_abs_dice_diff": float(diff.to_numpy().mean()),
                    "mean_dice": {"on": a.mean().to_dict(), "off": b.mean().to_dict()},
                }
            )
    return out


# ----------------------------------------------------------------------------- report


def _load(r: dict[str, Any]) -> str:
    """``"a, b, c -> d, e, f"``: the load averages before and after a block."""
    return " -> ".join(r[k].split("load average:")[-1].strip() for k in ("uptime_before", "uptime_after"))


def write_md(res: dict[str, Any], path: Path) -> None:
    table = [
        "| cohort | cases x shape | roi | naive s | cached s | batched s | naive / batched | naive / cached | "
        "cached / batched | Dice identical (cached, batched) | max abs Dice diff | load (uptime before -> after) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = [
        "# B4: 15-combination segmentation evaluation speed (naive / cached / cached + batched)",
        "",
        f"Command: `{res['command']}`; {res['threads']} torch threads, CPU, torch {res['versions']['torch']}, "
        f"memory budget {res['memory_budget_gb']} GB. Network: the bundle's default Segmenter (16, 32, 64, 128), "
        f"trained {res['train_steps']} steps on the phantoms. The machine (2 cores) was shared with other "
        "benchmark runs: the `uptime` load averages are given per block; ratios are medians of "
        "side-by-side runs in one process (modes alternate within each repeat).",
        "",
        *(table if res["compare"] else []),
    ]
    for name, r in res["compare"].items():
        med, agree = r["median_s"], r["agreement"]
        ident = f"{agree['cached']['dice_identical_to_naive']}, {agree['batched']['dice_identical_to_naive']}"
        diff = max(agree["cached"]["max_abs_dice_diff_vs_naive"], agree["batched"]["max_abs_dice_diff_vs_naive"])
        lines.append(
            f"| {name} | {r['cases']} x {'x'.join(map(str, r['shape']))} | {r['roi']} | {med['naive']:.2f} | "
            f"{med['cached']:.2f} | {med['batched']:.2f} | {r['naive_over_batched']:.2f}x | "
            f"{r['naive_over_cached']:.2f}x | {r['cached_over_batched']:.2f}x | {ident} | {diff:.2g} | {_load(r)} |"
        )
    if res.get("full_size"):
        lines += [
            "",
            "## Full-size real case (240x240x155, 4 modalities), fresh process per row",
            "",
            "all 15 = `evaluate_segmentation` over every combination (Dice, no HD95); single = one sliding-window "
            "inference with all four modalities. The phantom-trained network (out of its domain on the real case: "
            "its Dice says nothing about the method, it is there to compare crop on/off). Seconds: load + "
            "preprocess, then inference (+ Dice), total. Peak RSS of the process (includes `import monai`).",
            "",
            "| what | roi | foreground crop (box) | load+preprocess s | inference s | total s | peak RSS GB | "
            "load (uptime before -> after) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        label = {"batched": "all 15, batched", "cached": "all 15, cached (per-combination decoder)", "single": "single"}
        for r in res["full_size"]:
            crop = f"on ({'x'.join(map(str, r['box']))})" if r.get("crop") else "off"
            lines.append(
                f"| {label[r['kind']]} | {r['roi']} | {crop} | {r['load_preprocess_s']:.1f} | {r['inference_s']:.1f} | "
                f"{r['total_s']:.1f} | {r['peak_rss_gb']:.2f} | {_load(r)} |"
            )
        if res.get("crop_agreement"):
            lines += [
                "",
                "Crop on vs off, same network (phantom-trained), same case: all 15 = largest and mean absolute "
                "difference of the 15 x 4 Dice values (TC, WT, ET, ET post-processed); single = Dice between the "
                "two thresholded maps per region and the voxels that differ.",
                "",
                "| what | roi | agreement |",
                "|---|---|---|",
            ]
            for a in res["crop_agreement"]:
                if a["kind"] == "single":
                    d = a["dice_on_vs_off"]
                    txt = (
                        f"Dice(on, off) TC {d['tc']:.4f}, WT {d['wt']:.4f}, ET {d['et']:.4f}; "
                        f"{a['voxels_differing']} of 3 x {a['voxels']} voxels differ "
                        f"({a['voxels_differing_inside_box']} inside the box; crop off predicted "
                        f"{a['off_predicted_outside_box']} outside it); predicted voxels on "
                        f"{a['predicted_voxels']['on']}, off {a['predicted_voxels']['off']}"
                    )
                else:
                    m = a["mean_dice"]
                    txt = (
                        f"max abs Dice diff {a['max_abs_dice_diff']:.4f}, mean {a['mean_abs_dice_diff']:.4f}; "
                        f"mean Dice WT on {m['on']['dice_wt']:.4f} / off {m['off']['dice_wt']:.4f}, TC on "
                        f"{m['on']['dice_tc']:.4f} / off {m['off']['dice_tc']:.4f}"
                    )
                lines.append(f"| {label[a['kind']]} | {a['roi']} | {txt} |")
    lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=4, help="phantom cases")
    p.add_argument("--size", type=int, default=32, help="phantom size (one window of this size)")
    p.add_argument("--train_steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--crop", type=int, default=96, help="real-case crop around the tumour (0 skips)")
    p.add_argument("--crop_roi", type=int, default=64)
    p.add_argument("--memory_budget_gb", type=float, default=DEFAULT_MEMORY_BUDGET_GB)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full_size", action="store_true", help="also the full-size real case (fresh processes)")
    p.add_argument("--only_full_size", action="store_true", help="only the full-size block")
    p.add_argument("--full_rois", type=int, nargs="+", default=[128, 160])
    p.add_argument("--full_kinds", nargs="+", default=["batched", "cached", "single"])
    p.add_argument("--full_crops", type=int, nargs="+", default=[1, 0], help="foreground crop on (1) / off (0)")
    p.add_argument("--real", type=Path, default=REAL)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", choices=["batched", "cached", "naive", "single"], help=argparse.SUPPRESS)
    p.add_argument("--roi", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--fg_crop", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save_pred", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {
        "command": " ".join(["python benchmarks/seg_eval_speed.py", *(argv if argv is not None else sys.argv[1:])]),
        "threads": args.threads,
        "memory_budget_gb": args.memory_budget_gb,
        "train_steps": args.train_steps,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.platform()}, {os.cpu_count()} cpus",
        "uptime_start": uptime(),
        "compare": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_brats_cohort(Path(tmp) / "c", args.cases, size=args.size, seed=0)
        phantoms = prepared(discover_brats(Path(tmp) / "c", MODS, require_label=True))
    net = train_network(phantoms, args.train_steps, args.size)
    if not args.only_full_size:
        res["compare"][f"phantoms {args.size}^3"] = compare_modes(
            net, phantoms, args.size, args.repeats, args.memory_budget_gb
        )
        print(json.dumps(res["compare"], indent=1), flush=True)
        if args.crop and args.real.is_dir():
            real = prepared(discover_brats(args.real, MODS, require_label=True))
            crop = [crop_around_tumour(s, args.crop) for s in real]
            res["compare"][f"real case, {args.crop}^3 tumour crop"] = compare_modes(
                net, crop, args.crop_roi, args.repeats, args.memory_budget_gb
            )
            print(json.dumps(res["compare"], indent=1), flush=True)
    name = "seg_eval_speed_full_size" if args.only_full_size else "seg_eval_speed"
    if res["compare"]:
        write_results(res, args.out, name)
    if (args.full_size or args.only_full_size) and args.real.is_dir():
        full_size(args, res, name, net)
    res["uptime_end"] = uptime()
    write_results(res, args.out, name)
    print((args.out / f"{name}.md").read_text())
    return 0


def write_results(res: dict[str, Any], out: Path, name: str) -> None:
    """``<name>.json`` and ``<name>.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    write_md(res, out / f"{name}.md")


if __name__ == "__main__":
    sys.exit(main())
