"""Tutorial: which method for which missing modalities? Compare three heads, then deploy a per-combination router.

Run it as a script (``python tutorials/compare_and_route.py --workdir /tmp/mf_route``) or cell by cell
(``# %%``). It generates a MIMIC-style cohort (EHR + chest X-ray + report), trains the ``clinical_fusion``
bundle with three heads, evaluates each on the VALIDATION and the TEST split over all 7 modality
combinations, and then:

1. ``medfusion compare`` on the validation evaluations: leaderboard with paired tests + ``routing.json``
   (per combination the head that is best or tied-best on validation);
2. evaluates the router (``configs/router_evaluate.json``) on the test split like any other model;
3. ``medfusion compare`` on the test evaluations, router included: is the router at least as good as the
   best single head on each combination, and which differences are more than noise?
4. fits one temperature per combination on validation (``medfusion calibrate``) and re-evaluates a head on
   test with it (ECE before/after);
5. deploys the router (``configs/router_inference.json``): predictions + ``routes.csv`` naming the model
   used per sample.

The test suite runs ``main(tmp_path, tiny=True)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medfusion.apps.bundle import bundle_workflow
from medfusion.cli import main as medfusion
from medfusion.data.synth_clinical import write_clinical_cohort

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "clinical_fusion"
METHODS = ("concat", "late", "qmf")


def settings(tiny: bool) -> dict:
    """Model/data overrides: CI-sized (``tiny``) or a few minutes per head on a laptop CPU."""
    common = {"num_workers": 0, "device": "$torch.device('cpu')"}
    if tiny:
        return {
            **common,
            "samples": 80,
            "max_epochs": 1,
            "image_size": 32,
            "max_length": 32,
            "batch_size": 16,
            "encoders#report": {"name": "bert_tiny"},
            "encoders#ehr#hidden": 16,
            "eval_n_bootstrap": 0,
            "split_fractions": {"meta_val": 0.1, "val": 0.3, "test": 0.3},
        }
    return {
        **common,
        "samples": 600,
        "max_epochs": 6,
        "image_size": 64,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "split_fractions": {"meta_val": 0.1, "val": 0.2, "test": 0.3},
    }


def run(configs: Sequence[str], overrides: dict) -> None:
    """Run bundle configs exactly as ``python -m monai.bundle run`` would."""
    wf = bundle_workflow(BUNDLE, list(configs), "train", overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def main(
    workdir: Path | None = None, tiny: bool = False, n_boot: int = 1000, overrides: dict | None = None
) -> dict[str, pd.DataFrame]:
    """Train, compare, route; returns the validation and test leaderboards (``"val"``, ``"test"``).

    ``overrides`` replace entries of :func:`settings` (``"samples"`` = cohort size, or any bundle key).
    """
    work = Path(workdir or "tutorial_output")
    cfg = {**settings(tiny), **(overrides or {})}
    samples = cfg.pop("samples")

    # %% [markdown]
    # ## 1. Data and three heads, each evaluated on the validation and the test split
    dataset = work / "clinical"
    if not dataset.exists():
        write_clinical_cohort(dataset, samples=samples, seed=0, manifest_cohort=False)
    common = {**cfg, "dataset_dir": str(dataset)}
    for method in METHODS:
        ov = {
            **common,
            "method_name": method,
            "ckpt_dir": str(work / method / "models"),
            "output_dir": str(work / method / "runs"),
        }
        run(["train.json"], ov)
        for split in ("val", "test"):
            evaluation = {"eval_split": split, "eval_output_dir": str(work / method / split)}
            run(["train.json", "evaluate.json"], {**ov, **evaluation})

    # %% [markdown]
    # ## 2. Compare on VALIDATION and export the routing table (combination -> best or tied-best head)
    boot = ["--n-boot", str(n_boot)]
    medfusion(["compare", *(str(work / m / "val") for m in METHODS), "--names", *METHODS, "--out",
               str(work / "compare_val"), "--routing", "auroc", *boot, "--overwrite"])  # fmt: skip

    # %% [markdown]
    # ## 3. The router is a model like any other: evaluate it on the TEST split
    routing = str(work / "compare_val" / "routing.json")
    run(
        ["train.json", "evaluate.json", "router_evaluate.json"],
        {**common, "routing_file": routing, "eval_split": "test", "eval_output_dir": str(work / "router" / "test")},
    )

    # %% [markdown]
    # ## 4. Compare on TEST, router included (reference: the plain concatenation baseline)
    names = [*METHODS, "router"]
    medfusion(["compare", *(str(work / m / "test") for m in names), "--names", *names, "--reference", "concat",
               "--out", str(work / "compare_test"), *boot, "--overwrite"])  # fmt: skip
    print((work / "compare_test" / "report.md").read_text())

    # %% [markdown]
    # ## 5. Calibration: one temperature per combination fitted on validation, applied on test
    cal = work / "qmf" / "models" / "calibration.json"
    medfusion(["calibrate", str(work / "qmf" / "val"), "--out", str(cal), "--overwrite"])
    run(
        ["train.json", "evaluate.json"],
        {
            **common,
            "method_name": "qmf",
            "ckpt_dir": str(work / "qmf" / "models"),
            "eval_split": "test",
            "eval_calibration_file": str(cal),
            "eval_output_dir": str(work / "qmf" / "test_calibrated"),
        },
    )
    before = pd.read_csv(work / "qmf" / "test" / "summary.csv", index_col=0)["ece"]
    after = pd.read_csv(work / "qmf" / "test_calibrated" / "summary.csv", index_col=0)["ece"]
    print("qmf ECE on test per combination, before/after temperature scaling:")
    print(pd.DataFrame({"before": before, "after": after}).round(3).to_string())

    # %% [markdown]
    # ## 6. Deploy the router: each sample is predicted by the head chosen for the modalities it has
    run(
        ["inference.json", "router_inference.json"],
        {
            **{k: v for k, v in common.items() if not k.startswith(("eval_", "split_", "max_epochs"))},
            "routing_file": routing,
            "infer_split": "test",
            "output_dir": str(work / "router" / "predictions"),
        },
    )
    routes = pd.read_csv(work / "router" / "predictions" / "routes.csv")
    print("model used per sample (first rows):\n", routes.head().to_string())
    return {
        "val": pd.read_csv(work / "compare_val" / "leaderboard.csv"),
        "test": pd.read_csv(work / "compare_test" / "leaderboard.csv"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("tutorial_output"))
    parser.add_argument("--tiny", action="store_true", help="CI-sized run")
    parser.add_argument("--n-boot", type=int, default=1000)
    a = parser.parse_args()
    main(a.workdir, a.tiny, a.n_boot)
