"""B1 + B4 (segmentation part): MetaKD vs no-KD (and dedicated models) on BraTS phantoms.

Measures, in one run, on a generated cohort:
  * Dice TC/WT/ET per combination and over the 15, per arm, mean and standard error over seeds;
    paired differences MetaKD - no-KD per combination;
  * the learned IWV trajectory/final ranking next to the generator's contrast table;
  * time of the cached vs naive 15-combination evaluation on the same cases (and that Dice agrees);
  * train-step time: medfusion's MONAI-engine step vs a plain PyTorch loop, same network/data/batch;
  * optional: full-size (240x240x155) sliding-window inference on the real case, s/case and peak RSS.

Usage (results land in benchmarks/results/brats_metakd.{json,md} and figures beside them):

    python benchmarks/brats_metakd.py --seeds 0 1 2 --iterations 300 --size 48
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader  # list_data_collate flattens RandCropByPosNegLabeld sample lists

from medfusion.data.brats import brats_case_split, discover_brats
from medfusion.data.synth_brats import expected_region_ranking, load_contrast_table, write_brats_cohort
from medfusion.data.volume import brats_transforms
from medfusion.engines.method import to_device
from medfusion.engines.trainer import build_trainer
from medfusion.evaluation.report import plot_heatmap, summarize
from medfusion.evaluation.segmentation import evaluate_segmentation
from medfusion.fusion.metakd import MetaKDMethod
from medfusion.modality import BRATS_MODALITIES, combination_name, combinations
from medfusion.models.segmenter import Segmenter

RESULTS = Path(__file__).resolve().parent / "results"
MODS = BRATS_MODALITIES
DICE = ["dice_tc", "dice_wt", "dice_et"]


def make_loader(data, roi, batch_size, seed, shuffle=True):
    from monai.data import CacheDataset

    ds = CacheDataset(
        data, brats_transforms(MODS, "train", roi_size=roi), cache_rate=1.0, num_workers=0, progress=False
    )
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0, drop_last=True)


def cycle(loader, n):
    it = iter(loader)
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            it = iter(loader)
            yield next(it)


def train_arm(split, args, seed, alpha, combination=None, iterations=None, out_dir=None):
    torch.manual_seed(seed)
    np.random.seed(seed)
    net = Segmenter(MODS, channels=args.channels)
    roi = [args.size] * 3
    train_loader = make_loader(split["train"], roi, args.batch_size, seed)
    meta_loader = make_loader(split["meta_val"], roi, args.batch_size, seed + 1)
    method = MetaKDMethod(
        MODS,
        alpha=alpha,
        dropout_mode="fixed" if combination else args.dropout,
        dropout_combination=combination,
        meta_loader=meta_loader if alpha > 0 else None,
        meta_interval=args.meta_interval,
        output_dir=out_dir,
        seed=seed,
    )
    iters = iterations or args.iterations
    trainer = build_trainer(
        net, method, train_loader, max_epochs=1, lr=args.lr, device="cpu", epoch_length=iters, log_every=10**9
    )
    t0 = time.time()
    trainer.run()
    return net, method, time.time() - t0


def evaluate(net, test, args, combos=None, cached=True):
    t0 = time.time()
    df = evaluate_segmentation(
        net,
        test,
        MODS,
        None,
        combinations_to_run=combos,
        roi_size=[args.size] * 3,
        cached=cached,
        hd95=False,
        device="cpu",
        progress=False,
    )
    return df, time.time() - t0


def bench_step_overhead(split, args, steps=20):
    """medfusion engine step vs plain loop, same network/data/batch, alternating to share noise."""
    roi = [args.size] * 3
    loader = make_loader(split["train"], roi, args.batch_size, 0)
    batches = list(cycle(loader, steps))
    torch.manual_seed(0)
    net = Segmenter(MODS, channels=args.channels)
    method = MetaKDMethod(MODS, alpha=0.1, dropout_mode="none")
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    trainer = build_trainer(net, method, batches, max_epochs=1, optimizer=opt, device="cpu", log_every=10**9)

    def plain(batch):
        b = to_device(batch, "cpu")
        net.train()
        opt.zero_grad(set_to_none=True)
        losses = method.loss_step(net, b, None)
        losses["loss"].backward()
        opt.step()

    trainer.state.iteration = 0
    trainer.state.epoch = 1
    t_engine, t_plain = [], []
    for i, b in enumerate(batches):
        for kind in ("engine", "plain") if i % 2 == 0 else ("plain", "engine"):
            t0 = time.perf_counter()
            if kind == "engine":
                trainer.state.batch = b
                trainer._iteration(trainer, b)  # the exact callable SupervisedTrainer runs per iteration
            else:
                plain(b)
            (t_engine if kind == "engine" else t_plain).append(time.perf_counter() - t0)
    # full engine run (data loading, events, handlers) over the same batches
    t0 = time.perf_counter()
    trainer.run()
    t_run = (time.perf_counter() - t0) / len(batches)
    return {
        "engine_step_s_median": float(np.median(t_engine[2:])),
        "plain_step_s_median": float(np.median(t_plain[2:])),
        "ratio_engine_over_plain": float(np.median(t_engine[2:]) / np.median(t_plain[2:])),
        "engine_run_s_per_iteration": t_run,
        "steps": steps,
    }


def bench_full_size(real_dir, args):
    from medfusion.data.brats import discover_brats as disc

    data = disc(real_dir, MODS, require_label=True)
    net = Segmenter(MODS, channels=args.channels).eval()
    t0 = time.time()
    df = evaluate_segmentation(
        net,
        data,
        MODS,
        None,
        combinations_to_run=None,
        roi_size=[args.full_roi] * 3,
        cached=True,
        hd95=False,
        device="cpu",
        progress=False,
    )
    sec = time.time() - t0
    return {
        "case": data[0]["case_id"],
        "combinations": int(df["combination"].nunique()),
        "seconds_all_15_combinations": sec,
        "roi": args.full_roi,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "note": "untrained network: timing and memory only",
    }


def full_size_only(args, argv) -> int:
    """B4 full-size inference alone (one fresh process per call keeps the peak-RSS reading per run honest)."""
    rows = []
    for roi in args.only_full_size or [args.full_roi]:
        args.full_roi = roi
        load = os.getloadavg()[0]
        res = bench_full_size(args.real, args)
        res["load_1min_before"] = load
        rows.append(res)
        sec, gb = res["seconds_all_15_combinations"], res["peak_rss_gb"]
        print(f"roi {roi}: {sec:.1f} s, peak RSS {gb:.2f} GB", flush=True)
    out = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "runs": rows,
    }
    (args.out / "brats_metakd_full_size.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# B4: full-size inference of the real BraTS case (all 15 combinations)",
        "",
        f"Command: `{out['command']}` ({out['threads']} torch threads, CPU; untrained network: timing and memory "
        "only). Cached evaluation: encoders once per window, the decoder per combination; sliding windows of "
        "roi^3 (MONAI `sliding_window_inference`, overlap 0.25).",
        "",
        "| roi | seconds (15 combinations) | peak RSS (GB, process) | 1-min load before |",
        "|---|---|---|---|",
    ]
    for r in rows:
        sec, gb, load = r["seconds_all_15_combinations"], r["peak_rss_gb"], r["load_1min_before"]
        lines.append(f"| {r['roi']} | {sec:.1f} | {gb:.2f} | {load:.2f} |")
    lines += ["", "Peak RSS is the process maximum so far: rows after the first include the earlier runs' peak.", ""]
    (args.out / "brats_metakd_full_size.md").write_text("\n".join(lines))
    return 0


def mean_se(values):
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", type=int, default=50, help="phantom cases (train/meta-val/test split 30/6/14)")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--dedicated_iterations", type=int, default=150)
    p.add_argument("--dedicated_seeds", type=int, nargs="*", default=[0])
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--meta_interval", type=int, default=20)
    p.add_argument("--dropout", default="uniform")
    p.add_argument("--data", type=Path, default=Path("/tmp/medfusion_bench_brats"))
    p.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    p.add_argument("--full_roi", type=int, default=128)
    p.add_argument("--skip_dedicated", action="store_true")
    p.add_argument("--skip_full_size", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--only_full_size",
        type=int,
        nargs="*",
        default=None,
        metavar="ROI",
        help="only time full-size inference of the real case at these roi sizes (default: --full_roi) and write "
        "brats_metakd_full_size.{json,md}; nothing is trained",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.only_full_size is not None:
        return full_size_only(args, argv)

    if not (args.data / "done").exists():
        write_brats_cohort(args.data / "cohort", cases=args.cases, size=args.size, seed=1234, overwrite=True)
        (args.data / "done").write_text("ok")
    data = discover_brats(args.data / "cohort", MODS, require_label=True)
    n = len(data)
    split = brats_case_split(data, {"meta_val": 6 / 50, "val": 0.0, "test": 14 / 50}, seed=0)
    print({k: len(v) for k, v in split.items()}, flush=True)

    results: dict = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "cases": n,
        "split": {k: len(v) for k, v in split.items()},
    }
    order = [combination_name(c) for c in combinations(MODS)]

    # ---- arms over seeds
    per_arm: dict[str, list[pd.DataFrame]] = {"no_kd": [], "metakd": []}
    iwv = []
    train_time = {"no_kd": [], "metakd": []}
    for seed in args.seeds:
        for arm, alpha in (("no_kd", 0.0), ("metakd", 0.1)):
            out_dir = args.out / "brats_metakd_iwv" / f"seed{seed}" if alpha > 0 else None
            if out_dir is not None and (out_dir / "iwv_trajectory.csv").exists():
                (out_dir / "iwv_trajectory.csv").unlink()
            net, method, sec = train_arm(split, args, seed, alpha, out_dir=out_dir)
            train_time[arm].append(sec)
            df, _ = evaluate(net, split["test"], args)
            df["seed"] = seed
            per_arm[arm].append(df)
            if alpha > 0:
                iwv.append({"seed": seed, **method.state.as_dict(), "ranking": method.state.ranking()})
            print(
                f"seed {seed} {arm}: train {sec:.0f}s, mean dice " + str(df[DICE].mean().round(3).to_dict()), flush=True
            )

    table = {}
    for arm, dfs in per_arm.items():
        seed_means = [summarize(d, DICE, MODS) for d in dfs]
        stacked = np.stack([s.loc[order + ["mean"], DICE].to_numpy() for s in seed_means])  # [S, 16, 3]
        table[arm] = {
            "mean": pd.DataFrame(stacked.mean(0), index=order + ["mean"], columns=DICE),
            "se": pd.DataFrame(
                stacked.std(0, ddof=1) / np.sqrt(len(dfs)) if len(dfs) > 1 else np.full(stacked.shape[1:], np.nan),
                index=order + ["mean"],
                columns=DICE,
            ),
            "per_seed": stacked,
        }
    diff = table["metakd"]["per_seed"] - table["no_kd"]["per_seed"]
    diff_mean = pd.DataFrame(diff.mean(0), index=order + ["mean"], columns=DICE)
    diff_se = pd.DataFrame(
        diff.std(0, ddof=1) / np.sqrt(diff.shape[0]) if diff.shape[0] > 1 else np.full(diff.shape[1:], np.nan),
        index=order + ["mean"],
        columns=DICE,
    )

    # ---- dedicated (reference upper line)
    dedicated = None
    if not args.skip_dedicated:
        rows = []
        for seed in args.dedicated_seeds:
            for combo in order:
                net, _, _ = train_arm(split, args, seed, 0.0, combination=combo, iterations=args.dedicated_iterations)
                df, _ = evaluate(net, split["test"], args, combos=[combo])
                df["seed"] = seed
                rows.append(df)
                print(f"dedicated {combo}: " + str(df[DICE].mean().round(3).to_dict()), flush=True)
        dedicated = summarize(pd.concat(rows), DICE, MODS).loc[:, DICE]

    # ---- cached vs naive evaluation timing (B4) on the last MetaKD network
    net_eval = net if dedicated is None else train_arm(split, args, 0, 0.1, iterations=5)[0]
    df_c, t_cached = evaluate(net_eval, split["test"], args, cached=True)
    df_n, t_naive = evaluate(net_eval, split["test"], args, cached=False)
    agree = float((df_c[DICE].to_numpy() - df_n[DICE].to_numpy()).__abs__().max())
    results["eval_timing"] = {
        "cases": len(split["test"]),
        "cached_s": t_cached,
        "naive_s": t_naive,
        "speedup": t_naive / t_cached,
        "max_abs_dice_difference": agree,
    }
    results["eval_timing"]["load_average_1m"] = os.getloadavg()[0]
    results["step_overhead"] = bench_step_overhead(split, args)
    results["step_overhead"]["load_average_1m"] = os.getloadavg()[0]
    if not args.skip_full_size and args.real.is_dir():
        results["full_size"] = bench_full_size(args.real, args)

    # ---- IWV vs contrast table
    contrast = load_contrast_table()
    results["iwv"] = iwv
    results["expected_ranking"] = {r: expected_region_ranking(r) for r in ("TC", "WT", "ET")}
    results["contrast_table"] = contrast
    results["train_seconds"] = {k: mean_se(v) for k, v in train_time.items()}
    results["total_seconds"] = time.time() - t_start

    def fmt(m, s):
        return f"{100 * m:.1f}" + ("" if np.isnan(s) else f" ± {100 * s:.1f}")

    lines = [
        "# B1: MetaKD vs no-KD on BraTS phantoms (15 combinations)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Cohort: {n} phantom cases at {args.size}^3 (generator seed 1234), split {results['split']}; "
        f"{len(args.seeds)} training seeds {args.seeds}; {args.iterations} iterations, batch {args.batch_size}, "
        f"modality dropout `{args.dropout}`, meta step every {args.meta_interval} iterations. "
        "Dice in %, mean ± standard error over seeds; test cases evaluated on every combination.",
        "",
        "| combination | no-KD TC | no-KD WT | no-KD ET | MetaKD TC | MetaKD WT | MetaKD ET | Δ TC | Δ WT | Δ ET |"
        + (" dedicated TC | dedicated WT | dedicated ET |" if dedicated is not None else ""),
        "|---|" + "---|" * (9 + (3 if dedicated is not None else 0)),
    ]
    for c in order + ["mean"]:
        cells = [fmt(table["no_kd"]["mean"].loc[c, d], table["no_kd"]["se"].loc[c, d]) for d in DICE]
        cells += [fmt(table["metakd"]["mean"].loc[c, d], table["metakd"]["se"].loc[c, d]) for d in DICE]
        cells += [fmt(diff_mean.loc[c, d], diff_se.loc[c, d]) for d in DICE]
        if dedicated is not None:
            cells += [f"{100 * dedicated.loc[c, d]:.1f}" if c in dedicated.index else "-" for d in DICE]
        lines.append(f"| {'**mean**' if c == 'mean' else c} | " + " | ".join(cells) + " |")
    wins = int((diff_mean.loc[order, DICE].to_numpy() > 0).sum())
    lines += [
        "",
        f"MetaKD beats no-KD in {wins} of {len(order) * 3} (combination, region) cells on the seed mean.",
        "",
        "## Learned importance weights (softmax(w)) vs the generator's contrast table",
        "",
        "| seed | " + " | ".join(MODS) + " | ranking |",
        "|---|" + "---|" * (len(MODS) + 1),
    ]
    for r in iwv:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r[m]:.3f}" for m in MODS) + f" | {' > '.join(r['ranking'])} |")
    lines += [
        "",
        "Expected from the contrast table: "
        + "; ".join(f"{k}: {' > '.join(v)}" for k, v in results["expected_ranking"].items()),
        "",
        "## Speed (B4)",
        "",
        f"- 15-combination evaluation of {len(split['test'])} test cases: cached {t_cached:.1f} s vs naive "
        f"{t_naive:.1f} s -> {t_naive / t_cached:.2f}x; max |Dice difference| {agree:.2e} "
        f"(1-min load average {results['eval_timing']['load_average_1m']:.1f} on {os.cpu_count()} cores).",
        f"- Train step, medfusion SupervisedTrainer iteration vs plain PyTorch loop (same network, batch): "
        f"{results['step_overhead']['engine_step_s_median']:.3f} s vs "
        f"{results['step_overhead']['plain_step_s_median']:.3f} s -> "
        f"{results['step_overhead']['ratio_engine_over_plain']:.3f}x; full engine run incl. events: "
        f"{results['step_overhead']['engine_run_s_per_iteration']:.3f} s/iteration.",
    ]
    if "full_size" in results:
        fs = results["full_size"]
        lines.append(
            f"- Full-size {fs['case']} (240x240x155), all 15 combinations, roi {fs['roi']}^3: "
            f"{fs['seconds_all_15_combinations']:.1f} s, peak RSS {fs['peak_rss_gb']:.2f} GB (process peak)."
        )
    lines.append(f"\nTotal benchmark time {results['total_seconds'] / 60:.1f} min.")
    md = "\n".join(lines) + "\n"
    (args.out / "brats_metakd.md").write_text(md)
    serial = dict(results)
    serial["table"] = {arm: {"mean": t["mean"].to_dict(), "se": t["se"].to_dict()} for arm, t in table.items()}
    serial["diff"] = {"mean": diff_mean.to_dict(), "se": diff_se.to_dict()}
    if dedicated is not None:
        serial["dedicated"] = dedicated.to_dict()
    (args.out / "brats_metakd.json").write_text(json.dumps(serial, indent=1, default=str))
    plot_heatmap(
        pd.concat(
            [table["no_kd"]["mean"].add_prefix("noKD_"), table["metakd"]["mean"].add_prefix("MetaKD_")], axis=1
        ).assign(n=0),
        [f"noKD_{d}" for d in DICE] + [f"MetaKD_{d}" for d in DICE],
        args.out / "brats_metakd_heatmap.png",
        title="Dice per combination: no-KD vs MetaKD",
        labels=["noKD TC", "noKD WT", "noKD ET", "MetaKD TC", "MetaKD WT", "MetaKD ET"],
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
