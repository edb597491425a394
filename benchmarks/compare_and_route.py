"""Compare three clinical heads, route per combination, measure the router on test (the README figure).

Runs ``tutorials/compare_and_route.py`` at a small-but-real size (default 240 stays, 4 epochs, 32 px X-rays,
the 2-layer ``bert_tiny`` report encoder trained from scratch; ``--report_encoder bert`` = the frozen MiniLM
default, ``--image_size 64`` for larger X-rays) and copies what it measured into ``benchmarks/results/``:
``compare_and_route.md`` (command, settings, seeds, versions, machine load, duration, then the test report,
the validation routing table and the test leaderboard) and ``compare_and_route_auroc.png`` (runs x
combinations, AUROC difference to concat on the test split, ``*`` = significant after Holm).

    python benchmarks/compare_and_route.py --workdir /tmp/cr_bench
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _tutorial():
    spec = importlib.util.spec_from_file_location("compare_and_route", ROOT / "tutorials" / "compare_and_route.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load tutorials/compare_and_route.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--report_encoder", default="bert_tiny", choices=("bert_tiny", "bert"))
    parser.add_argument("--n_boot", type=int, default=1000)
    parser.add_argument("--report_only", action="store_true", help="rewrite the results file from --workdir")
    args = parser.parse_args()
    overrides = {
        "samples": args.samples,
        "max_epochs": args.epochs,
        "image_size": args.image_size,
        "encoders#report": {"name": args.report_encoder, **({"freeze": True} if args.report_encoder == "bert" else {})},
        "max_length": 64,
    }
    load_before = os.getloadavg()
    start = time.time()
    if not args.report_only:
        _tutorial().main(args.workdir, tiny=False, n_boot=args.n_boot, overrides=overrides)
    minutes = (time.time() - start) / 60
    load_after = os.getloadavg()
    timing = (
        f"load average before {load_before[0]:.1f} / after {load_after[0]:.1f} (other jobs shared the cores); "
        f"wall time {minutes:.1f} min"
    )
    previous = RESULTS / "compare_and_route.md"
    if args.report_only and previous.is_file():  # keep the measured run's timing line
        text = " ".join(previous.read_text().split())
        timing = text[text.index("load average before") : text.index(" min.", text.index("wall time")) + 4]

    work = args.workdir
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "compare_test" / "heatmap_auroc.png", RESULTS / "compare_and_route_auroc.png")
    routing = json.loads((work / "compare_val" / "routing.json").read_text())
    routes = "\n".join(
        f"| {c} | {v['run']} | {v['value']:.3f} | {'yes' if v['significant'] else 'no (tied-best)'} |"
        for c, v in routing["choice"].items()
    )
    report = (work / "compare_test" / "report.md").read_text()
    figure = "## Difference to `concat`\n\n![AUROC difference](compare_and_route_auroc.png)"
    report = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    report = report.replace("## Difference to `concat`", figure)
    board = pd.read_csv(work / "compare_test" / "leaderboard.csv")
    auroc = board[board["metric"] == "auroc"].pivot(index="combination", columns="run", values="value")
    auroc = auroc.reindex(list(dict.fromkeys(board["combination"])))
    auroc.loc["mean of 7"] = auroc.mean()
    ece = pd.DataFrame(
        {
            "qmf ECE before": pd.read_csv(work / "qmf" / "test" / "summary.csv", index_col=0)["ece"],
            "after temperature scaling": pd.read_csv(work / "qmf" / "test_calibrated" / "summary.csv", index_col=0)[
                "ece"
            ],
        }
    )
    text = f"""# Compare three clinical heads and route per combination (measured)

Command: `python benchmarks/compare_and_route.py --workdir {work} --samples {args.samples} --epochs {args.epochs} \
--image_size {args.image_size} --report_encoder {args.report_encoder} --n_boot {args.n_boot}` (normal priority: a
few CPU minutes; under `nice -n 10` it made no progress on the shared, fully loaded machine)

* data: `write_clinical_cohort(samples={args.samples}, seed=0)` (MIMIC-style; listfile splits), heads concat,
  late, qmf (`clinical_fusion` bundle, seed 0, {args.epochs} epochs, lr 1e-3, {args.image_size} px X-rays,
  report encoder `{args.report_encoder}`, 64 tokens);
* routes chosen on the validation split by AUROC; router and heads evaluated on the test split;
* paired tests: DeLong (AUROC), paired bootstrap {args.n_boot} resamples (AUPRC, balanced accuracy), Holm over
  the 7 combinations per metric, alpha 0.05;
* machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {sys.version.split()[0]};
  {timing}.

Figure (`compare_and_route_auroc.png`): test AUROC of each run minus concat's, per combination.

## Routing table (validation)

| combination | routed to | validation AUROC | beat the runner-up significantly |
|---|---|---|---|
{routes}

## Test AUROC per combination (router included)

```
{auroc.round(3).to_string()}
```

## Calibration: qmf, temperatures fitted per combination on validation, ECE on test

```
{ece.round(3).to_string()}
```

## Test report (`medfusion compare`, router included)

{report.split(chr(10), 1)[1]}

## Test leaderboard

{(work / "compare_test" / "leaderboard.md").read_text().split(chr(10), 2)[2]}
"""
    (RESULTS / "compare_and_route.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
