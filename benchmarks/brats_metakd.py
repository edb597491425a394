"""B1 (+ the B4 segmentation timings): MetaKD, its KD ablations, the other segmentation methods and dedicated
models on BraTS phantoms.

Measures, in one run, on a generated cohort (``--contrast default|unequal|exclusive``: the phantom's contrast profile,
docs/synthetic_brats.md):
  * Dice TC/WT/ET per combination and over the 15, per arm (``--arms``, by name: ``no_kd`` (= the bundle's
    ``mean``), ``uniform_kd``, ``oracle_kd``, ``metakd``, ``hemis``, ``late``, ``qmf``, ``omnifuse``; more can be
    added with :func:`register_arm`), mean and standard error over seeds; paired differences to the reference
    arm (``no_kd``) per combination, over the 15, and over the combinations without t1ce (TC/ET) or without
    flair (WT); which arm is best per combination;
  * training time per iteration and peak memory per arm: the peak resident set size of the process, sampled
    every 20 ms by a thread during the arm's training, minus the resident set size just before it (after
    ``gc.collect`` and glibc ``malloc_trim``, so memory freed by earlier arms is returned first): the memory the
    training loop itself needs (network, optimiser state, activations, method state), not the process total;
  * that each arm was exercised: the KD term's share of the loss, the KD ratios, how far the weights moved and
    d(meta loss)/dw per meta step (MetaKD); QMF's voxel weights across modalities and cases and its ranking
    regulariser's share; OmniFuse's imputation (reconstruction losses, imputed vs zero-image bottleneck error on
    test cases) and L_TLA (lazy combination, share of iterations where it is non-zero);
  * MetaKD's importance-weight trajectory (per meta step, figure) and final ranking next to the generator's
    contrast table, and the oracle arm's weights (single-modality validation Dice of the no-KD model);
  * dedicated per-combination models (reference upper line);
  * B4: cached vs naive 15-combination evaluation and the engine's train-step overhead (``--skip_speed``
    skips them); optional full-size inference of the real case (``--full_size``, or ``--only_full_size``).

Usage (results land in benchmarks/results/<name>.{json,md}, ``--name`` default ``brats_metakd``, and figures
beside them; they are rewritten after every seed, so a stopped run leaves the seeds it finished):

    nice -n 10 python benchmarks/brats_metakd.py --seeds 0 1 2 --iterations 600 --size 32 --overwrite
    nice -n 5 python benchmarks/brats_metakd.py --name brats_methods --arms no_kd metakd hemis late qmf omnifuse \
        --epoch_length 60 --cases 40 --size 32 --threads 1 --skip_speed --skip_dedicated --overwrite
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pandas as pd
import torch
from ignite.engine import Events
from monai.data import DataLoader  # list_data_collate flattens RandCropByPosNegLabeld sample lists
from torch import nn

from medfusion.data.brats import brats_case_split, discover_brats
from medfusion.data.synth_brats import (
    contrast_profile,
    expected_region_ranking,
    load_contrast_table,
    region_contrast,
    write_brats_cohort,
)
from medfusion.data.volume import brats_transforms
from medfusion.engines.method import to_device
from medfusion.engines.trainer import build_trainer
from medfusion.evaluation.report import plot_heatmap, summarize
from medfusion.evaluation.segmentation import evaluate_segmentation
from medfusion.fusion.metakd import MetaKDMethod, kd_weight_matrix
from medfusion.fusion.recipes import create_method
from medfusion.modality import BRATS_MODALITIES, Keys, combination_name, combinations
from medfusion.models.seg_recipes import build_seg_method, create_segmenter
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


def _rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager: peak resident set size while the block runs, sampled by a thread every ``interval`` s.

    ``before`` is the RSS on entry (after :func:`_release_memory`), ``peak`` the largest sample (entry and exit
    included), ``increase = peak - before``: the memory the block needed beyond what the process already held.
    Allocations shorter than the interval can be missed, so the number is a lower bound of the true peak.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakRSS:
        _release_memory()
        self.before = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    def as_dict(self) -> dict[str, float]:
        """``{"rss_before_mb", "rss_peak_mb", "rss_increase_mb"}`` (MiB)."""
        mb = 1024**2
        return {
            "rss_before_mb": self.before / mb,
            "rss_peak_mb": self.peak / mb,
            "rss_increase_mb": (self.peak - self.before) / mb,
        }


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
    t_engine: list[float] = []
    t_plain: list[float] = []
    for i, b in enumerate(batches):
        for kind in ("engine", "plain") if i % 2 == 0 else ("plain", "engine"):
            t0 = time.perf_counter()
            if kind == "engine":
                trainer.state.batch = b
                trainer._process_function(trainer, b)  # the exact callable the trainer runs per iteration (TrainStep)
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


# ------------------------------------------------------------------------------------------------ arms
@dataclass
class ArmContext:
    """What an arm's builder gets: the data split, the run's arguments, the seed and arm-specific inputs."""

    split: dict
    args: argparse.Namespace
    seed: int
    out_dir: Path | None = None
    oracle_weights: dict[str, float] | None = None


@dataclass(frozen=True)
class SegArm:
    """A named B1 arm: ``build(ctx) -> (network, training method)``; trained for every seed, same budget.

    Add a segmentation method as an arm with :func:`register_arm` (e.g. mean / HeMIS / late / QMF / OmniFuse for
    the segmentation bundle): it is then selectable with ``--arms <name>`` and reported like the others.
    """

    name: str
    label: str
    description: str
    build: Callable[[ArmContext], tuple[nn.Module, Any]]
    needs_oracle: bool = False


ARMS: dict[str, SegArm] = {}


def register_arm(arm: SegArm) -> SegArm:
    """Make ``arm`` selectable by name (``--arms``)."""
    ARMS[arm.name] = arm
    return arm


def _metakd_family(recipe: str, fixed_oracle: bool = False) -> Callable[[ArmContext], tuple[nn.Module, Any]]:
    """Builder of the MetaKD network trained by ``recipe`` (``medfusion.fusion.recipes``), segmentation task."""

    def build(ctx: ArmContext) -> tuple[nn.Module, Any]:
        a = ctx.args
        net = Segmenter(MODS, channels=a.channels)
        kw: dict[str, Any] = {
            "task": "segmentation",
            "dropout_mode": a.dropout,
            "meta_loader": make_loader(ctx.split["meta_val"], [a.size] * 3, a.batch_size, ctx.seed + 1),
            "meta_interval": a.meta_interval,
            "meta_steps": a.meta_steps,
            "output_dir": ctx.out_dir,
            "seed": ctx.seed,
        }
        if fixed_oracle:
            kw["kd_weights"] = ctx.oracle_weights
        return net, create_method(recipe, MODS, kw)

    return build


register_arm(
    SegArm(
        "no_kd",
        "no-KD",
        "MetaKD network, alpha = 0 (recipe `metakd_no_kd`; = the BraTS bundle's `--method_name mean`: mean "
        "imputation, no KD)",
        _metakd_family("metakd_no_kd"),
    )
)
register_arm(
    SegArm(
        "uniform_kd",
        "uniform KD",
        "KD with fixed uniform weights (every ratio 1), no meta step (recipe `metakd_uniform_kd`)",
        _metakd_family("metakd_uniform_kd"),
    )
)
register_arm(
    SegArm(
        "oracle_kd",
        "oracle KD",
        "KD with fixed weights proportional to (single-modality Dice on the meta-val split of the same seed's no-KD "
        "model)^power, no meta step (recipe `metakd_fixed_kd`)",
        _metakd_family("metakd_fixed_kd", fixed_oracle=True),
        needs_oracle=True,
    )
)
register_arm(
    SegArm(
        "metakd",
        "MetaKD",
        "KD weighted by the meta-learned importance weights (recipe `metakd`)",
        _metakd_family("metakd"),
    )
)


def _seg_method(name: str) -> Callable[[ArmContext], tuple[nn.Module, Any]]:
    """Builder of the BraTS bundle's ``--method_name`` ``name`` (``medfusion.models.seg_recipes``), same encoders."""

    def build(ctx: ArmContext) -> tuple[nn.Module, Any]:
        a = ctx.args
        net = create_segmenter(name, MODS, channels=a.channels)
        ctx_kw = {
            "task": "segmentation",
            "dropout_mode": a.dropout,
            "seed": ctx.seed,
            "num_samples": len(ctx.split["train"]),
        }
        return net, build_seg_method(name, MODS, None, **ctx_kw)

    return build


for _name, _label, _desc in (
    (
        "hemis",
        "HeMIS",
        "per level mean + variance of the present modalities' features, Dice + BCE (`--method_name hemis`)",
    ),
    ("late", "late", "each present modality decoded alone, probabilities averaged, Dice + BCE (`--method_name late`)"),
    ("qmf", "QMF", "voxel-wise energy-weighted late fusion + ranking regulariser on the case history (`qmf`)"),
    (
        "omnifuse",
        "OmniFuse",
        "bottleneck CRA imputation + voxel-wise DWFuse + L_TLA (`omnifuse`); the lazy combination is mined at "
        "every epoch end (`--epoch_length`), so L_TLA is active from the second epoch on (one epoch: never)",
    ),
):
    register_arm(SegArm(_name, _label, _desc, _seg_method(_name)))


class LossRecorder:
    """Ignite handler keeping every iteration's scalar losses (``engine.state.output``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        out = engine.state.output or {}
        self.rows.append({k: float(v) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1})


def run_training(net, method, split, args, seed, iterations, memory=None):
    """Train ``iterations`` iterations in epochs of ``args.epoch_length`` (default: one epoch).

    Returns:
        ``(seconds, per-iteration loss rows)``; with a :class:`PeakRSS` ``memory`` the training runs inside it.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    train_loader = make_loader(split["train"], [args.size] * 3, args.batch_size, seed)
    recorder = LossRecorder()
    epoch_length = getattr(args, "epoch_length", None) or iterations
    if iterations % epoch_length:
        raise ValueError(f"iterations {iterations} must be a multiple of --epoch_length {epoch_length}")
    trainer = build_trainer(
        net,
        method,
        train_loader,
        max_epochs=iterations // epoch_length,
        lr=args.lr,
        device="cpu",
        epoch_length=epoch_length,
        log_every=10**9,
        handlers=[recorder],
    )
    t0 = time.time()
    if memory is None:
        trainer.run()
    else:
        with memory:
            trainer.run()
    return time.time() - t0, recorder.rows


def train_dedicated(split, args, seed, combination):
    torch.manual_seed(seed)
    net = Segmenter(MODS, channels=args.channels)
    method = create_method(
        "metakd_no_kd",
        MODS,
        {"task": "segmentation", "dropout_mode": "fixed", "dropout_combination": combination, "seed": seed},
    )
    run_training(net, method, split, args, seed, args.dedicated_iterations)
    return net


def _eval_batches(cases, limit=4):
    """Up to ``limit`` full-volume cases (``eval`` transforms), one batch each."""
    from monai.data import Dataset

    ds = Dataset(cases[:limit], brats_transforms(MODS, "eval"))
    return list(DataLoader(ds, batch_size=1, shuffle=False, num_workers=0))


@torch.no_grad()
def qmf_weight_stats(net, cases):
    """QMF's voxel weights on test cases with every modality present.

    Returns:
        ``case_mean`` ``{modality: mean over cases of the voxel-mean weight}`` (brain voxels, the 3 regions),
        ``tumour_mean`` (the same over WT voxels), ``sd_across_modalities`` (sd of the case-mean weights over
        modalities, mean over cases), ``sd_across_cases`` (sd over cases of a modality's case-mean weight, mean
        over modalities), ``sd_within_case`` (sd over voxels of one modality's weight, mean over cases and
        modalities).
    """
    net.eval()
    per_case, per_case_tumour, within = [], [], []
    for b in _eval_batches(cases):
        x = b[Keys.IMAGE]  # [1, M, D, H, W]
        mask = torch.ones(1, len(MODS), dtype=torch.bool)
        out = net.forward_outputs(x, mask)
        w = out.aux["weights"][0]  # [M, R, D, H, W]
        brain = (x[0] != 0).any(0)  # [D, H, W]
        tumour = b[Keys.LABEL][0, 1].bool() & brain
        wb = w[:, :, brain]  # [M, R, V]
        per_case.append(wb.mean(dim=(1, 2)))
        per_case_tumour.append(w[:, :, tumour].mean(dim=(1, 2)) if bool(tumour.any()) else wb.mean(dim=(1, 2)))
        within.append(wb.flatten(1).std(dim=1).mean())
    cm = torch.stack(per_case)  # [C, M]
    tm = torch.stack(per_case_tumour)
    return {
        "case_mean": dict(zip(MODS, cm.mean(0).tolist())),
        "tumour_mean": dict(zip(MODS, tm.mean(0).tolist())),
        "sd_across_modalities": float(cm.std(dim=1).mean()),
        "sd_across_cases": float(cm.std(dim=0).mean()) if cm.shape[0] > 1 else float("nan"),
        "sd_within_case": float(torch.stack(within).mean()),
        "cases": int(cm.shape[0]),
    }


@torch.no_grad()
def omnifuse_imputation_stats(net, cases):
    """How close OmniFuse's imputed bottleneck of a removed modality gets to the one its image gives.

    For each test case and modality m: encode with every modality (target), then with m removed (its entry is
    the zero-image encoding v0_m, the CRA's input) and compare the imputed v'_m: ``ratio_m = mean over cases of
    ||v'_m - v_m||^2 / ||v0_m - v_m||^2`` (< 1: the imputation moves the absent modality's feature towards
    the real one; 1: no better than the zero image).
    """
    net.eval()
    ratios: dict[str, list[float]] = {m: [] for m in MODS}
    for b in _eval_batches(cases):
        x = b[Keys.IMAGE]  # [1, M, D, H, W]
        full = torch.ones(1, len(MODS), dtype=torch.bool)
        for i, m in enumerate(MODS):
            mask = full.clone()
            mask[0, i] = False
            out = net.forward_outputs(x, mask, target_mask=full)
            target = out.aux["target"][0, i]
            num = float(((out.aux["imputed"][0, i] - target) ** 2).sum())
            den = float(((out.aux["observed"][0, i] - target) ** 2).sum())
            ratios[m].append(num / max(den, 1e-12))
    return {m: float(np.mean(v)) for m, v in ratios.items()}


def oracle_from(net, split, args):
    """Fixed KD weights from single-modality Dice (mean over TC/WT/ET) on the meta-val split: ``dice^power``."""
    df, _ = evaluate(net, split["meta_val"], args, combos=list(MODS))
    dice = {m: float(df[df["combination"] == m][DICE].to_numpy().mean()) for m in MODS}
    raw = {m: max(dice[m], 1e-3) ** args.oracle_power for m in MODS}
    total = sum(raw.values())
    return {m: raw[m] / total for m in MODS}, dice


def seed_table(dfs):
    """``[S, 16, 3]`` per-seed Dice (15 combinations + mean) from per-seed per-case frames."""
    order = [combination_name(c) for c in combinations(MODS)]
    return np.stack([summarize(d, DICE, MODS).loc[order + ["mean"], DICE].to_numpy() for d in dfs])


def subset_means(per_seed):
    """Per seed: mean TC/ET over the combinations without t1ce and mean WT over those without flair ``[S, 3]``."""
    order = [combination_name(c) for c in combinations(MODS)]
    no_t1ce = [i for i, c in enumerate(order) if "t1ce" not in c.split("+")]
    no_flair = [i for i, c in enumerate(order) if "flair" not in c.split("+")]
    return np.stack(
        [per_seed[:, no_t1ce, 0].mean(1), per_seed[:, no_t1ce, 2].mean(1), per_seed[:, no_flair, 1].mean(1)], axis=1
    )


def exercised(rows, alpha, tail=50):
    """Mean task and KD loss over the last ``tail`` iterations and the share of the KD term in the loss."""
    last = rows[-tail:]
    task = float(np.mean([r.get("task_loss", r["loss"]) for r in last]))  # methods without a KD term: their loss
    kd = float(np.mean([r.get("kd_loss", 0.0) for r in last]))
    first_kd = float(np.mean([r.get("kd_loss", 0.0) for r in rows[:tail]]))
    return {"task_loss": task, "kd_loss": kd, "kd_loss_first": first_kd, "alpha_kd_over_task": alpha * kd / task}


def plot_trajectories(trajectories, path):
    """softmax(w) after every meta step, one panel per seed, one line per modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(trajectories)
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.4), squeeze=False, sharey=True)
    for ax, seed in zip(axes[0], seeds):
        traj = trajectories[seed]
        for m in MODS:
            ax.plot(traj["meta_step"], traj[f"softmax_{m}"], label=m)
        ax.axhline(1 / len(MODS), color="grey", lw=0.8, ls=":")
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("meta step")
    axes[0][0].set_ylabel("softmax(w)")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.suptitle("MetaKD importance weights (B1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["no_kd", "uniform_kd", "oracle_kd", "metakd"], help=f"{list(ARMS)}")
    p.add_argument("--reference", default="no_kd", help="arm the paired differences are taken against")
    p.add_argument("--cases", type=int, default=50, help="phantom cases (train/meta-val/test split 30/6/14)")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--dedicated_iterations", type=int, default=150)
    p.add_argument("--dedicated_seeds", type=int, nargs="*", default=[0])
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--meta_interval", type=int, default=20)
    p.add_argument("--meta_steps", type=int, default=20)
    p.add_argument("--oracle_power", type=float, default=1.0, help="oracle KD weights ~ single-modality Dice^power")
    p.add_argument("--dropout", default="uniform")
    p.add_argument(
        "--contrast",
        choices=("default", "unequal", "exclusive"),
        default="default",
        help="phantom contrast profile (docs/synthetic_brats.md); unequal: one modality carries each region; "
        "exclusive: the other modalities carry no contrast there",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="cohort folder (default /tmp/medfusion_bench_brats, /tmp/medfusion_bench_brats_<profile> for --contrast "
        "unequal/exclusive); generated once, refused if its contrast table is not the requested profile's",
    )
    p.add_argument("--name", default="brats_metakd", help="results file stem: <out>/<name>.{md,json}, figures")
    p.add_argument(
        "--epoch_length",
        type=int,
        default=None,
        help="iterations per epoch (default: --iterations, one epoch); OmniFuse mines its lazy combination at "
        "every epoch end",
    )
    p.add_argument(
        "--compare_to",
        type=Path,
        default=None,
        help="an earlier results JSON of this script (e.g. the default-profile run) summarised in a section",
    )
    p.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    p.add_argument("--full_roi", type=int, default=128)
    p.add_argument("--skip_dedicated", action="store_true")
    p.add_argument("--skip_speed", action="store_true", help="skip the B4 timings (cached vs naive, step overhead)")
    p.add_argument("--full_size", action="store_true", help="also time full-size inference of the real case (B4)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with other jobs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing <name>.{md,json} results")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine results JSONs of runs of the same arms and settings on different seeds (or re-render one) "
        "into <out>/<name>.{md,json}; nothing is trained",
    )
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
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if args.only_full_size is not None:
        return full_size_only(args, argv)
    if args.merge is not None:
        previous = json.loads(args.compare_to.read_text()) if args.compare_to is not None else None
        print(merge_runs(args.merge, args, previous))
        return 0
    unknown = [a for a in args.arms + [args.reference] if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    if args.reference not in args.arms:
        p.error(f"--reference {args.reference} must be one of --arms {args.arms}")
    if any(ARMS[a].needs_oracle for a in args.arms) and "no_kd" not in args.arms:
        p.error("the oracle arm derives its weights from the no_kd arm of the same seed: add no_kd to --arms")
    if (args.out / f"{args.name}.md").exists() and not args.overwrite:
        p.error(f"{args.out / (args.name + '.md')} exists; pass --overwrite to replace it")
    if args.epoch_length is not None and (args.epoch_length < 1 or args.iterations % args.epoch_length):
        p.error(f"--epoch_length {args.epoch_length} must divide --iterations {args.iterations}")
    arms = sorted(args.arms, key=lambda a: (a != "no_kd", args.arms.index(a)))  # no_kd first (oracle source)
    if args.data is None:
        suffix = "" if args.contrast == "default" else f"_{args.contrast}"
        args.data = Path(f"/tmp/medfusion_bench_brats{suffix}")
    previous = json.loads(args.compare_to.read_text()) if args.compare_to is not None else None

    if not (args.data / "done").exists():
        write_brats_cohort(
            args.data / "cohort", cases=args.cases, size=args.size, seed=1234, overwrite=True, contrast=args.contrast
        )
        (args.data / "done").write_text("ok")
    if load_contrast_table(args.data / "cohort") != contrast_profile(args.contrast):
        p.error(
            f"{args.data / 'cohort'} holds another contrast table than profile {args.contrast!r}: use another --data"
        )
    data = discover_brats(args.data / "cohort", MODS, require_label=True)
    n = len(data)
    split = brats_case_split(data, {"meta_val": 6 / 50, "val": 0.0, "test": 14 / 50}, seed=0)
    print({k: len(v) for k, v in split.items()}, flush=True)
    loads = {"start": os.getloadavg()[0]}

    results: dict = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "monai": monai.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "cases": n,
        "split": {k: len(v) for k, v in split.items()},
        "arms": {a: ARMS[a].description for a in arms},
        "contrast_profile": args.contrast,
    }
    iwv_dir = args.out / f"{args.name}_iwv"
    order = [combination_name(c) for c in combinations(MODS)]

    # ---- arms over seeds (paired: same seed -> same initial network, data order and dropout draws)
    per_arm: dict[str, list[pd.DataFrame]] = {a: [] for a in arms}
    train_time: dict[str, list[float]] = {a: [] for a in arms}
    evidence: dict[str, list[dict]] = {a: [] for a in arms}
    iwv, trajectories, oracles = [], {}, []
    memory: dict[str, list[dict]] = {a: [] for a in arms}
    seeds_done: list[int] = []
    for seed in args.seeds:
        oracle = None
        for arm in arms:
            out_dir = iwv_dir / f"seed{seed}" if arm == "metakd" else None
            if out_dir is not None and (out_dir / "iwv_trajectory.csv").exists():
                (out_dir / "iwv_trajectory.csv").unlink()
            torch.manual_seed(seed)
            net, method = ARMS[arm].build(ArmContext(split, args, seed, out_dir, oracle))
            mem = PeakRSS()
            load_before = os.getloadavg()[0]
            sec, rows = run_training(net, method, split, args, seed, args.iterations, memory=mem)
            train_time[arm].append(sec)
            memory[arm].append(
                mem.as_dict()
                | {
                    "s_per_iteration": sec / args.iterations,
                    "load_before": load_before,
                    "load_after": os.getloadavg()[0],
                }
            )
            df, _ = evaluate(net, split["test"], args)
            df["seed"] = seed
            per_arm[arm].append(df)
            ev = exercised(rows, getattr(method, "alpha", 0.0))
            ev.update(method_evidence(arm, net, method, rows, split))
            if isinstance(method, MetaKDMethod):  # its final state: softmax(w), ranking, weight source, steps
                kd_source = method.kd_weights if isinstance(method.kd_weights, str) else "fixed"
                ev.update(iwv=method.state.as_dict(), ranking=method.state.ranking(), kd_weights=kd_source)
                ev["meta_steps"] = int(method.state.meta_steps)
                ratio = kd_weight_matrix(method.state.w)
                ev["kd_ratio_max"] = float(ratio.max())
                sm = method.state.weights().detach()
                ev["weights_max_abs_from_uniform"] = float((sm - 1 / len(MODS)).abs().max())
            ev["seed"] = seed
            evidence[arm].append(ev)
            if arm == "no_kd" and any(ARMS[a].needs_oracle for a in arms):
                oracle, single_dice = oracle_from(net, split, args)
                oracles.append({"seed": seed, "weights": oracle, "meta_val_single_modality_dice": single_dice})
            if out_dir is not None:  # the metakd arm
                iwv.append({"seed": seed, **method.state.as_dict(), "ranking": method.state.ranking()})
                trajectories[seed] = pd.read_csv(out_dir / "iwv_trajectory.csv")
                ev.update(meta_gradient_stats(trajectories[seed]))
            print(
                f"seed {seed} {arm}: train {sec:.0f}s, +{memory[arm][-1]['rss_increase_mb']:.0f} MiB, mean dice "
                f"{df[DICE].mean().round(3).to_dict()}, kd/task {ev['alpha_kd_over_task']:.3f}",
                flush=True,
            )
        loads[f"seed {seed} done"] = os.getloadavg()[0]
        seeds_done.append(seed)
        results["seeds_done"] = list(seeds_done)
        if seed != args.seeds[-1]:  # partial results after every seed: a stopped run keeps what it finished
            write_results(
                results,
                args,
                arms,
                per_arm,
                train_time,
                memory,
                evidence,
                iwv,
                oracles,
                trajectories,
                dict(loads),
                None,
                order,
                split,
                n,
                t_start,
                previous,
            )

    # ---- dedicated (reference upper line)
    dedicated = None
    if not args.skip_dedicated:
        rows = []
        for seed in args.dedicated_seeds:
            for combo in order:
                net = train_dedicated(split, args, seed, combo)
                df, _ = evaluate(net, split["test"], args, combos=[combo])
                df["seed"] = seed
                rows.append(df)
                print(f"dedicated {combo}: " + str(df[DICE].mean().round(3).to_dict()), flush=True)
        dedicated = summarize(pd.concat(rows), DICE, MODS).loc[:, DICE]
        loads["dedicated done"] = os.getloadavg()[0]

    # ---- B4 speed: cached vs naive evaluation and engine step overhead
    if not args.skip_speed:
        df_c, t_cached = evaluate(net, split["test"], args, cached=True)
        df_n, t_naive = evaluate(net, split["test"], args, cached=False)
        agree = float(np.abs(df_c[DICE].to_numpy() - df_n[DICE].to_numpy()).max())
        results["eval_timing"] = {
            "cases": len(split["test"]),
            "cached_s": t_cached,
            "naive_s": t_naive,
            "speedup": t_naive / t_cached,
            "max_abs_dice_difference": agree,
            "load_average_1m": os.getloadavg()[0],
        }
        results["step_overhead"] = bench_step_overhead(split, args)
        results["step_overhead"]["load_average_1m"] = os.getloadavg()[0]
    if args.full_size and args.real.is_dir():
        results["full_size"] = bench_full_size(args.real, args)
    loads["end"] = os.getloadavg()[0]
    md = write_results(
        results,
        args,
        arms,
        per_arm,
        train_time,
        memory,
        evidence,
        iwv,
        oracles,
        trajectories,
        loads,
        dedicated,
        order,
        split,
        n,
        t_start,
        previous,
    )
    print(md)
    return 0


def write_results(
    results,
    args,
    arms,
    per_arm,
    train_time,
    memory,
    evidence,
    iwv,
    oracles,
    trajectories,
    loads,
    dedicated,
    order,
    split,
    n,
    t_start,
    previous=None,
):
    """Tables, paired differences, markdown, JSON and figures of the seeds run so far; returns the markdown."""
    table = {}
    for arm, dfs in per_arm.items():
        stacked = dfs if isinstance(dfs, np.ndarray) else seed_table(dfs)  # [S, 16, 3]
        k = stacked.shape[0]
        se = stacked.std(0, ddof=1) / np.sqrt(k) if k > 1 else np.full(stacked.shape[1:], np.nan)
        table[arm] = {"per_seed": stacked, "mean": stacked.mean(0), "se": se, "subsets": subset_means(stacked)}
    ref = table[args.reference]
    diffs = {}
    for arm in arms:
        if arm == args.reference:
            continue
        d = table[arm]["per_seed"] - ref["per_seed"]
        ds = table[arm]["subsets"] - ref["subsets"]
        k = d.shape[0]
        diffs[arm] = {
            "mean": d.mean(0),
            "se": d.std(0, ddof=1) / np.sqrt(k) if k > 1 else np.full(d.shape[1:], np.nan),
            "positive": (d > 0).sum(0),
            "negative": (d < 0).sum(0),
            "subsets_mean": ds.mean(0),
            "subsets_se": ds.std(0, ddof=1) / np.sqrt(k) if k > 1 else np.full(3, np.nan),
            "subsets_positive": (ds > 0).sum(0),
        }
    contrast = load_contrast_table(args.data / "cohort")
    results.update(
        iwv=iwv,
        oracle=oracles,
        evidence=evidence,
        memory=memory,
        expected_ranking={r: expected_region_ranking(r, contrast) for r in ("TC", "WT", "ET")},
        region_contrast={r: region_contrast(r, contrast) for r in ("TC", "WT", "ET")},
        contrast_table=contrast,
        train_seconds={k: mean_se(v) for k, v in train_time.items() if v},
        load_average_1m=loads,
        total_seconds=time.time() - t_start,
    )
    md = report(results, args, arms, table, diffs, dedicated, order, split, n, previous)
    (args.out / f"{args.name}.md").write_text(md)
    serial = dict(results)
    serial["table"] = {
        a: {k: np.asarray(v).tolist() for k, v in t.items()} | {"rows": order + ["mean"], "columns": DICE}
        for a, t in table.items()
    }
    serial["diffs"] = {a: {k: np.asarray(v).tolist() for k, v in d.items()} for a, d in diffs.items()}
    if dedicated is not None:
        serial["dedicated"] = dedicated.to_dict()
    (args.out / f"{args.name}.json").write_text(json.dumps(serial, indent=1, default=str))
    heat = pd.concat(
        [pd.DataFrame(table[a]["mean"], index=order + ["mean"], columns=DICE).add_prefix(f"{a}:") for a in arms], axis=1
    ).assign(n=0)
    plot_heatmap(
        heat,
        [f"{a}:{d}" for a in arms for d in DICE],
        args.out / f"{args.name}_heatmap.png",
        title=f"Dice per combination and arm (mean of seeds {results.get('seeds_done', args.seeds)})",
        labels=[f"{ARMS[a].label} {d[5:].upper()}" for a in arms for d in DICE],
    )
    if trajectories:
        plot_trajectories(trajectories, args.out / f"{args.name}_iwv.png")
    return md


def meta_gradient_stats(traj):
    """d(meta loss)/dw over the meta steps of one run (``grad_<m>`` columns of ``iwv_trajectory.csv``).

    Returns ``meta_grad_abs_median`` (median over steps of max_m |g_m|), ``meta_grad_consistency``
    ``{m: |mean_t g_m| / mean_t |g_m|}`` (1: every step pushes w_m the same way; near 0: the sign flips, Adam's
    steps cancel), ``w_span`` (max_m (max_t w_m - min_t w_m)), the meta loss of the first and last 20 steps and
    ``meta_loss_change_in_interval_median``: median over meta updates of the relative change of the meta loss
    from the update's first step to its second-to-last (with 2 meta-val batches, cycled, the same batch).
    """
    cols = [f"grad_{m}" for m in MODS]
    out: dict[str, Any] = {
        "meta_loss_first20": float(traj["meta_loss"].head(20).mean()),
        "meta_loss_last20": float(traj["meta_loss"].tail(20).mean()),
        "w_span": float(max(traj[f"w_{m}"].max() - traj[f"w_{m}"].min() for m in MODS)),
    }
    if "step_in_interval" in traj:  # same batch at steps 0 and k * (meta-val batches): the meta steps' own effect
        rel = []
        for _, d in traj.groupby("iteration"):
            first = d[d["step_in_interval"] == 0]["meta_loss"]
            last = d[d["step_in_interval"] == d["step_in_interval"].max() - 1]["meta_loss"]
            if len(first) and len(last) and float(first.iloc[0]) > 0:
                rel.append((float(last.iloc[0]) - float(first.iloc[0])) / float(first.iloc[0]))
        if rel:
            out["meta_loss_change_in_interval_median"] = float(np.median(rel))
    if all(c in traj for c in cols):
        g = traj[cols].to_numpy()
        out["meta_grad_abs_median"] = float(np.median(np.abs(g).max(axis=1)))
        out["meta_grad_consistency"] = {
            m: float(abs(g[:, i].mean()) / max(np.abs(g[:, i]).mean(), 1e-30)) for i, m in enumerate(MODS)
        }
    return out


def merge_runs(paths, args, previous=None):
    """Combine results JSONs of runs that trained different seeds of the same arms and settings (``--merge``).

    Per-seed Dice tables, evidence, memory and times are concatenated and the report is rendered again (nothing
    is re-trained); MetaKD's trajectories are read from ``<out>/<name>_iwv/seed*/iwv_trajectory.csv`` and its
    meta-gradient statistics recomputed from them. With one JSON this re-renders a finished run.
    """
    docs = [json.loads(Path(q).read_text()) for q in paths]
    first = docs[0]
    same = ("arms", "cases", "size", "iterations", "epoch_length", "meta_interval", "meta_steps", "contrast", "lr")
    for d in docs[1:]:
        bad = [k for k in same if d["args"].get(k) != first["args"].get(k)]
        if bad or list(d["table"]) != list(first["table"]):
            raise SystemExit(f"--merge: the runs differ in {bad or 'arms'}; only seeds may differ")
    arms = list(first["table"])
    ns = argparse.Namespace(**first["args"])
    ns.data, ns.out, ns.name = Path(ns.data), args.out, args.name
    ns.seeds = [s for d in docs for s in d.get("seeds_done", d["args"]["seeds"])]
    per_arm = {a: np.concatenate([np.asarray(d["table"][a]["per_seed"]) for d in docs]) for a in arms}
    memory = {a: [m for d in docs for m in d["memory"][a]] for a in arms}
    train_time = {a: [m["s_per_iteration"] * ns.iterations for m in memory[a]] for a in arms}
    evidence = {a: [e for d in docs for e in d["evidence"][a]] for a in arms}
    trajectories = {}
    for seed in ns.seeds:
        csv = ns.out / f"{ns.name}_iwv" / f"seed{seed}" / "iwv_trajectory.csv"
        if "metakd" in arms and csv.exists():
            trajectories[seed] = pd.read_csv(csv)
    for e in evidence.get("metakd", []):
        if e["seed"] in trajectories:
            e.update(meta_gradient_stats(trajectories[e["seed"]]))
    loads = {f"run {i + 1} {k}": v for i, d in enumerate(docs) for k, v in d["load_average_1m"].items()}
    results = {k: v for k, v in first.items() if k not in ("table", "diffs", "dedicated")}
    results["command"] = " ; ".join(f"run {i + 1}: {d['command']}" for i, d in enumerate(docs)) + (
        " ; rendered with: python " + " ".join(sys.argv)
    )
    results["seeds_done"] = list(ns.seeds)
    order = first["table"][arms[0]]["rows"][:-1]
    t_start = time.time() - sum(d["total_seconds"] for d in docs)
    return write_results(
        results,
        ns,
        arms,
        per_arm,
        train_time,
        memory,
        evidence,
        [r for d in docs for r in d["iwv"]],
        [o for d in docs for o in d["oracle"]],
        trajectories,
        loads,
        None,
        order,
        None,
        first["cases"],
        t_start,
        previous,
    )


def method_evidence(arm, net, method, rows, split):
    """What shows that a method's own mechanism was active (beyond its task loss); see the module docstring."""
    ev: dict[str, Any] = {}
    keys = set().union(*(r.keys() for r in rows)) if rows else set()

    def avg(key, part):
        vals = [r[key] for r in part if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    if "rank_loss" in keys:  # QMF
        lam = float(getattr(method, "lam", 0.0))
        ev["rank_loss_first"] = avg("rank_loss", rows[:50])
        ev["rank_loss_last"] = avg("rank_loss", rows[-50:])
        ev["rank_loss_share"] = float(np.mean([lam * r["rank_loss"] / r["loss"] for r in rows[-50:]]))
        ev["rank_loss_nonzero"] = float(np.mean([r["rank_loss"] != 0 for r in rows]))
        ev["modality_loss_last"] = avg("modality_loss", rows[-50:])
        ev["qmf_weights"] = qmf_weight_stats(net, split["test"])
    if "fw_loss" in keys:  # OmniFuse
        for k in ("fw_loss", "bw_loss", "dwfuse_loss", "tla_loss"):
            ev[f"{k}_first"] = avg(k, rows[:50])
            ev[f"{k}_last"] = avg(k, rows[-50:])
        ev["tla_nonzero"] = float(np.mean([r.get("tla_loss", 0.0) != 0 for r in rows]))
        ev["tla_share"] = float(np.mean([method.lambda_tla * r.get("tla_loss", 0.0) / r["loss"] for r in rows[-50:]]))
        lazy = int(net.lazy_combination)
        ev["lazy_combination"] = combination_name(combinations(MODS)[lazy]) if lazy >= 0 else None
        ev["imputation_error_ratio"] = omnifuse_imputation_stats(net, split["test"])
    return ev


def method_evidence_lines(results, arms, label):
    """Markdown: MetaKD's meta gradients, QMF's weights and regulariser, OmniFuse's imputation and L_TLA."""
    ev = results["evidence"]
    lines: list[str] = []
    if "metakd" in arms and "meta_grad_abs_median" in ev["metakd"][0]:
        lines += [
            "",
            "MetaKD meta steps (`iwv_trajectory.csv` per seed: w, softmax(w), meta loss and d(meta loss)/dw per "
            "step). 'consistency' = |mean over steps of g_m| / mean |g_m| (1: every step pushes w_m the same way; "
            "near 0: the sign flips and Adam's steps cancel); 'w span' = the largest range of a w_m over training; "
            "'within an update' = median relative change of the meta loss from an update's first step to its "
            "second-to-last (the same batch with 2 meta-val batches): what the meta steps themselves achieve; the "
            "first/last 20 steps mostly show the network training:",
            "",
            "| seed | median max abs(dL/dw) | consistency " + " / ".join(MODS) + " | w span | meta loss within an "
            "update | meta loss first 20 -> last 20 steps |",
            "|---|---|---|---|---|---|",
        ]
        for e in ev["metakd"]:
            cons = " / ".join(f"{e['meta_grad_consistency'][m]:.2f}" for m in MODS)
            within = e.get("meta_loss_change_in_interval_median")
            lines.append(
                f"| {e['seed']} | {e['meta_grad_abs_median']:.2e} | {cons} | {e['w_span']:.3f} | "
                + ("-" if within is None else f"{100 * within:+.2f}%")
                + f" | {e['meta_loss_first20']:.3f} -> {e['meta_loss_last20']:.3f} |"
            )
    if "qmf" in arms:
        lines += [
            "",
            "QMF exercised? Ranking regulariser (lam = 0.1) over the first / last 50 iterations, its share "
            "lam·L_reg / L of the loss (last 50) and the fraction of iterations where it is non-zero; the voxel "
            "weights on up to 4 test cases with every modality present: case-mean weight per modality over the "
            "brain (and over WT voxels), their sd across modalities, across cases and over voxels within a case:",
            "",
            "| seed | L_reg first -> last | lam·L_reg / L | L_reg != 0 | mean weight " + " / ".join(MODS) + " (brain) "
            "| (WT voxels) | sd modalities | sd cases | sd voxels |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for e in ev["qmf"]:
            q = e["qmf_weights"]
            lines.append(
                f"| {e['seed']} | {e['rank_loss_first']:.4f} -> {e['rank_loss_last']:.4f} | {e['rank_loss_share']:.4f} "
                f"| {e['rank_loss_nonzero']:.2f} | "
                + " / ".join(f"{q['case_mean'][m]:.3f}" for m in MODS)
                + " | "
                + " / ".join(f"{q['tumour_mean'][m]:.3f}" for m in MODS)
                + f" | {q['sd_across_modalities']:.3f} | {q['sd_across_cases']:.3f} | {q['sd_within_case']:.3f} |"
            )
    if "omnifuse" in arms:
        lines += [
            "",
            "OmniFuse exercised? Imputation losses L_fw and L_bw and L_TLA over the first -> last 50 iterations, "
            "the share of iterations with L_TLA != 0 and lambda_tla·L_TLA / L (last 50), the lazy combination "
            "mined last, and on up to 4 test cases the imputed bottleneck's error relative to the zero-image "
            "encoding for each removed modality (||v'_m - v_m||² / ||v0_m - v_m||²; < 1: imputation helps):",
            "",
            "| seed | L_fw | L_bw | L_TLA | L_TLA != 0 | TLA share | lazy | imputation error ratio "
            + " / ".join(MODS)
            + " |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in ev["omnifuse"]:
            r = e["imputation_error_ratio"]
            lines.append(
                f"| {e['seed']} | {e['fw_loss_first']:.4f} -> {e['fw_loss_last']:.4f} | {e['bw_loss_first']:.4f} -> "
                f"{e['bw_loss_last']:.4f} | {e['tla_loss_first']:.4f} -> {e['tla_loss_last']:.4f} | "
                f"{e['tla_nonzero']:.2f} | {e['tla_share']:.4f} | {e['lazy_combination']} | "
                + " / ".join(f"{r[m]:.3f}" for m in MODS)
                + " |"
            )
    return lines


def wins_losses_lines(arms, label, table, diffs, order, ref):
    """Markdown: the best arm per combination and region, and where each arm wins and loses against ``ref``."""
    rows = order + ["mean"]
    lines = [
        "",
        "## Where each method wins and loses",
        "",
        "Best arm per combination (seed mean; the margin to the runner-up in points):",
        "",
        "| combination | TC | WT | ET |",
        "|---|---|---|---|",
    ]
    for i, c in enumerate(rows):
        cells = []
        for j in range(3):
            vals = sorted(((table[a]["mean"][i, j], a) for a in arms), reverse=True)
            margin = f" (+{100 * (vals[0][0] - vals[1][0]):.1f})" if len(vals) > 1 else ""
            cells.append(f"{label[vals[0][1]]} {100 * vals[0][0]:.1f}{margin}")
        lines.append(f"| {'**mean**' if c == 'mean' else c} | " + " | ".join(cells) + " |")
    wins = {a: 0 for a in arms}
    for i in range(len(order)):
        for j in range(3):
            wins[max(arms, key=lambda a: table[a]["mean"][i, j])] += 1
    k = next(iter(table.values()))["per_seed"].shape[0]
    lines += [
        "",
        f"Against {label[ref]}, over the 45 cells (15 combinations x TC/WT/ET): cells where the arm is best of all "
        f"arms; cells above / below {label[ref]} in every one of the {k} seeds; the largest mean gain and loss:",
        "",
        f"| arm | best in cells | above {label[ref]} in every seed | below in every seed | largest gain | "
        "largest loss |",
        "|---|---|---|---|---|---|",
    ]
    names = [(c, r) for c in order for r in ("TC", "WT", "ET")]
    for a in arms:
        if a == ref:
            lines.append(f"| {label[a]} | {wins[a]} | - | - | - | - |")
            continue
        d = diffs[a]
        flat = d["mean"][:-1].reshape(-1)
        up = int((d["positive"][:-1] == k).sum())
        down = int((d["negative"][:-1] == k).sum())
        gi, li = int(flat.argmax()), int(flat.argmin())
        gain = f"{names[gi][0]} {names[gi][1]} {100 * flat[gi]:+.1f}"
        loss = f"{names[li][0]} {names[li][1]} {100 * flat[li]:+.1f}"
        lines.append(f"| {label[a]} | {wins[a]} | {up} | {down} | {gain} | {loss} |")
    return lines


def previous_run_lines(previous, args):
    """Markdown: a short summary of an earlier results JSON (``--compare_to``), its numbers as recorded."""
    prof = previous.get("contrast_profile", "default")
    prev_args = previous.get("args", {})
    tab = previous["table"]
    lines = [
        "",
        f"## Earlier run for comparison: contrast profile `{prof}`",
        "",
        f"Numbers as recorded by `{previous['command']}` (seeds {prev_args.get('seeds')}, "
        f"{prev_args.get('iterations')} iterations, 1-min load average "
        + ", ".join(f"{k} {v:.1f}" for k, v in previous.get("load_average_1m", {}).items())
        + "). 15-combination mean Dice and paired difference to no-KD (points, mean ± SE over seeds), and how far "
        "the weighted arms' softmax(w) moved from 1/4:",
        "",
        "| arm | TC | WT | ET | Δ TC | Δ WT | Δ ET | max abs(w - 1/4) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, t in tab.items():
        m, se = np.asarray(t["mean"])[-1], np.asarray(t["se"])[-1]
        cells = [f"{100 * m[j]:.1f} ± {100 * se[j]:.1f}" for j in range(3)]
        if a in previous.get("diffs", {}):
            d = previous["diffs"][a]
            dm, ds = np.asarray(d["mean"])[-1], np.asarray(d["se"])[-1]
            cells += [f"{100 * dm[j]:+.1f} ± {100 * ds[j]:.1f}" for j in range(3)]
        else:
            cells += ["-"] * 3
        ev = previous.get("evidence", {}).get(a, [])
        dist = [e["weights_max_abs_from_uniform"] for e in ev if "weights_max_abs_from_uniform" in e]
        cells.append(f"{np.mean(dist):.3f}" if dist else "-")
        lines.append(f"| {ARMS[a].label if a in ARMS else a} | " + " | ".join(cells) + " |")
    rc = previous.get("region_contrast", {})
    if rc:
        lines += [
            "",
            "Its contrast-to-noise per region: "
            + "; ".join(f"{r} " + ", ".join(f"{m} {rc[r][m]:.1f}" for m in MODS) for r in ("TC", "WT", "ET"))
            + ".",
        ]
    return lines


def report(results, args, arms, table, diffs, dedicated, order, split, n, previous=None):
    """The markdown results file."""

    def fmt(m, s=float("nan")):
        return f"{100 * m:.1f}" + ("" if np.isnan(s) else f" ± {100 * s:.1f}")

    def sfmt(m, s):
        return f"{100 * m:+.1f}" + ("" if np.isnan(s) else f" ± {100 * s:.1f}")

    label = {a: ARMS[a].label for a in arms}
    ref = args.reference
    kd_only = all(a in ("no_kd", "uniform_kd", "oracle_kd", "metakd") for a in arms)
    title = "MetaKD and its KD ablations" if kd_only else "segmentation fusion methods"
    done = results.get("seeds_done", args.seeds)
    partial = f" **Partial: seeds {done} of {args.seeds} finished.**" if list(done) != list(args.seeds) else ""
    epochs = f" in epochs of {args.epoch_length}" if args.epoch_length else " (one epoch)"
    lines = [
        f"# B1: {title} on BraTS phantoms, contrast profile `{args.contrast}` (15 combinations)",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Cohort: {n} phantom cases at {args.size}^3 (generator seed 1234, contrast profile `{args.contrast}`, "
        f"docs/synthetic_brats.md), split {results['split']}; "
        f"training seeds {list(done)} (paired: every arm of a seed starts from the same network, data order and "
        f"modality-dropout draws);{partial} {args.iterations} iterations{epochs}, batch {args.batch_size}, Adam lr "
        f"{args.lr}, modality dropout `{args.dropout}` (OmniFuse simulates its own missingness), alpha 0.1; "
        f"MetaKD: every {args.meta_interval} iterations "
        f"{args.meta_steps} meta steps (Adam lr 1e-2 on w) over the meta-val split. Versions {results['versions']}; "
        f"{results['machine']['cpus']} CPUs, {results['machine']['threads']} torch threads. 1-min load average: "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["load_average_1m"].items())
        + f". Total time {results['total_seconds'] / 60:.1f} min. Dice in %, mean ± standard error over seeds; "
        "every test case evaluated on every combination.",
        "",
        "Arms:",
        "",
    ]
    lines += [f"- **{label[a]}** (`{a}`): {ARMS[a].description}." for a in arms]
    if dedicated is not None:
        lines.append(
            f"- **dedicated**: one no-KD model per combination trained only on it ({args.dedicated_iterations} "
            f"iterations, seeds {args.dedicated_seeds}), the reference upper line."
        )
    lines += [
        "",
        "## Headline: 15-combination mean and the combinations the question is about",
        "",
        "'no t1ce' = mean over the 7 combinations without t1ce (TC and ET need it most); 'no flair' = the 7 "
        "without flair (WT).",
        "",
        f"| arm | TC | WT | ET | no t1ce: TC | no t1ce: ET | no flair: WT | train s/seed | s/iteration "
        f"| time / {label[args.reference]} (same seed) | peak RSS increase (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref_time = [m["s_per_iteration"] for m in results["memory"][args.reference]]
    for a in arms:
        t = table[a]
        sub = t["subsets"]
        k = sub.shape[0]
        sub_se = sub.std(0, ddof=1) / np.sqrt(k) if k > 1 else np.full(3, np.nan)
        cells = [fmt(t["mean"][-1, j], t["se"][-1, j]) for j in range(3)]
        cells += [fmt(sub.mean(0)[j], sub_se[j]) for j in range(3)]
        cells.append(f"{results['train_seconds'][a][0]:.0f}")
        mem = results["memory"][a]
        cells.append(f"{np.mean([m['s_per_iteration'] for m in mem]):.2f}")
        rel = [m["s_per_iteration"] / r for m, r in zip(mem, ref_time)]
        cells.append(f"{np.median(rel):.2f} ({np.min(rel):.2f}-{np.max(rel):.2f})")
        inc = [m["rss_increase_mb"] for m in mem]
        cells.append(f"{np.mean(inc):.0f} (max {np.max(inc):.0f})")
        lines.append(f"| {label[a]} | " + " | ".join(cells) + " |")
    if dedicated is not None:
        dd = dedicated.loc[order, DICE]
        no_t1ce = [c for c in order if "t1ce" not in c.split("+")]
        no_flair = [c for c in order if "flair" not in c.split("+")]
        cells = [fmt(dedicated.loc["mean", d]) for d in DICE]
        cells += [fmt(dd.loc[no_t1ce, "dice_tc"].mean()), fmt(dd.loc[no_t1ce, "dice_et"].mean())]
        cells += [fmt(dd.loc[no_flair, "dice_wt"].mean()), "-", "-", "-", "-"]
        lines.append("| dedicated | " + " | ".join(cells) + " |")
    loads_train = [m["load_before"] for a in arms for m in results["memory"][a]]
    lines += [
        "",
        "Time: wall-clock training seconds per seed and per iteration (meta steps, TLA mining included) on "
        f"{results['machine']['threads']} torch thread(s) with 1-min load average {min(loads_train):.1f}-"
        f"{max(loads_train):.1f} at the arms' starts (the machine was shared and its load changed during the run: "
        "compare arms within a seed, the 'time / reference' column: median (range) over seeds of the ratio to the "
        "reference arm's s/iteration in the same seed). Memory: peak resident set size sampled every 20 ms during "
        "the arm's training minus the resident set size just before it (after garbage collection and "
        "`malloc_trim`), mean over seeds (max): "
        "what the training loop needs beyond the process (data cache, Python, libraries; "
        f"{np.mean([m['rss_before_mb'] for a in arms for m in results['memory'][a]]):.0f} MiB on average).",
    ]
    lines += [
        "",
        f"Paired differences to {label[ref]} (points; mean ± SE over seeds; [seeds > 0 of {len(done)}]):",
        "",
        "| arm | Δ TC | Δ WT | Δ ET | Δ no t1ce: TC | Δ no t1ce: ET | Δ no flair: WT | cells > 0 (of 45) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, d in diffs.items():
        cells = [f"{sfmt(d['mean'][-1, j], d['se'][-1, j])} [{d['positive'][-1, j]}]" for j in range(3)]
        cells += [f"{sfmt(d['subsets_mean'][j], d['subsets_se'][j])} [{d['subsets_positive'][j]}]" for j in range(3)]
        cells.append(str(int((d["mean"][:-1] > 0).sum())))
        lines.append(f"| {label[a]} | " + " | ".join(cells) + " |")

    # ---- was KD exercised?
    lines += [
        "",
        "## Was each arm exercised?",
        "",
        "Mean over the last 50 training iterations (and the first 50 for the KD term), mean over seeds; "
        "'alpha·KD / task' is the share the distillation term adds to the task loss. For the weighted arms: the "
        "largest KD ratio softmax(w)_i / softmax(w)_j and the largest |softmax(w)_m - 1/4| at the end.",
        "",
        "| arm | task loss (QMF, OmniFuse: total) | KD loss (first 50 -> last 50) | alpha·KD / task | max KD ratio "
        "| max abs(w - 1/4) "
        "| meta steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in arms:
        ev = results["evidence"][a]
        avg = {k: float(np.mean([e[k] for e in ev])) for k in ("task_loss", "kd_loss", "kd_loss_first")}
        share = float(np.mean([e["alpha_kd_over_task"] for e in ev]))
        ratio = "-" if "kd_ratio_max" not in ev[0] else f"{np.mean([e['kd_ratio_max'] for e in ev]):.2f}"
        dist = (
            "-"
            if "weights_max_abs_from_uniform" not in ev[0]
            else f"{np.mean([e['weights_max_abs_from_uniform'] for e in ev]):.3f}"
        )
        steps = "-" if "meta_steps" not in ev[0] else str(int(np.mean([e["meta_steps"] for e in ev])))
        lines.append(
            f"| {label[a]} | {avg['task_loss']:.3f} | {avg['kd_loss_first']:.3f} -> {avg['kd_loss']:.3f} | "
            f"{share:.3f} | {ratio} | {dist} | {steps} |"
        )

    lines += method_evidence_lines(results, arms, label)

    # ---- importance weights vs contrast table
    lines += ["", "## Importance weights vs the generator's contrast table", ""]
    rc = results["region_contrast"]
    lines += [
        "Generator contrast-to-noise per region (`region_contrast`, docs/synthetic_brats.md) and the expected ranking:",
        "",
        "| region | " + " | ".join(MODS) + " | expected ranking |",
        "|---|" + "---|" * (len(MODS) + 1),
    ]
    for r in ("TC", "WT", "ET"):
        lines.append(
            f"| {r} | "
            + " | ".join(f"{rc[r][m]:.1f}" for m in MODS)
            + f" | {' > '.join(results['expected_ranking'][r])} |"
        )
    if results["oracle"]:
        lines += [
            "",
            f"Oracle KD weights (single-modality Dice on the meta-val split from the seed's no-KD model, mean of "
            f"TC/WT/ET, ^{args.oracle_power:g}, normalised):",
            "",
            "| seed | " + " | ".join(f"{m} (Dice)" for m in MODS) + " |",
            "|---|" + "---|" * len(MODS),
        ]
        for o in results["oracle"]:
            lines.append(
                f"| {o['seed']} | "
                + " | ".join(f"{o['weights'][m]:.3f} ({100 * o['meta_val_single_modality_dice'][m]:.1f})" for m in MODS)
                + " |"
            )
    if results["iwv"]:
        lines += [
            "",
            f"MetaKD's learned softmax(w) at the end of training (trajectory per meta step: `{args.name}_iwv.png`, "
            f"`{args.name}_iwv/seed*/iwv_trajectory.csv`):",
            "",
            "| seed | " + " | ".join(MODS) + " | ranking |",
            "|---|" + "---|" * (len(MODS) + 1),
        ]
        for r in results["iwv"]:
            lines.append(
                f"| {r['seed']} | " + " | ".join(f"{r[m]:.3f}" for m in MODS) + f" | {' > '.join(r['ranking'])} |"
            )

    lines += wins_losses_lines(arms, label, table, diffs, order, ref)
    if previous is not None:
        lines += previous_run_lines(previous, args)

    # ---- per combination
    lines += ["", "## Dice per combination", ""]
    for j, d in enumerate(DICE):
        region = d[5:].upper()
        cols = [label[a] for a in arms] + (["dedicated"] if dedicated is not None else [])
        lines += [f"### {region}", "", "| combination | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for i, c in enumerate(order + ["mean"]):
            cells = [fmt(table[a]["mean"][i, j], table[a]["se"][i, j]) for a in arms]
            if dedicated is not None:
                cells.append(fmt(dedicated.loc[c, d]) if c in dedicated.index else "-")
            lines.append(f"| {'**mean**' if c == 'mean' else c} | " + " | ".join(cells) + " |")
        lines.append("")
    for a, dd in diffs.items():
        lines += [
            f"### Paired difference {label[a]} − {label[ref]} per combination (points, mean ± SE [seeds > 0])",
            "",
            "| combination | Δ TC | Δ WT | Δ ET |",
            "|---|---|---|---|",
        ]
        for i, c in enumerate(order + ["mean"]):
            cells = [f"{sfmt(dd['mean'][i, j], dd['se'][i, j])} [{dd['positive'][i, j]}]" for j in range(3)]
            lines.append(f"| {'**mean**' if c == 'mean' else c} | " + " | ".join(cells) + " |")
        lines.append("")

    if "eval_timing" in results:
        et, so = results["eval_timing"], results["step_overhead"]
        lines += [
            "## Speed (B4)",
            "",
            f"- 15-combination evaluation of {et['cases']} test cases: cached {et['cached_s']:.1f} s vs naive "
            f"{et['naive_s']:.1f} s -> {et['speedup']:.2f}x; max |Dice difference| {et['max_abs_dice_difference']:.2e} "
            f"(1-min load average {et['load_average_1m']:.1f}).",
            f"- Train step, medfusion SupervisedTrainer iteration vs plain PyTorch loop (same network, batch): "
            f"{so['engine_step_s_median']:.3f} s vs {so['plain_step_s_median']:.3f} s -> "
            f"{so['ratio_engine_over_plain']:.3f}x; full engine run incl. events: "
            f"{so['engine_run_s_per_iteration']:.3f} s/iteration (1-min load average {so['load_average_1m']:.1f}).",
        ]
    if "full_size" in results:
        fs = results["full_size"]
        lines.append(
            f"- Full-size {fs['case']} (240x240x155), all 15 combinations, roi {fs['roi']}^3: "
            f"{fs['seconds_all_15_combinations']:.1f} s, peak RSS {fs['peak_rss_gb']:.2f} GB (process peak)."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
