"""Tutorial: train MetaKD on a BraTS-layout folder and read Dice for all 15 modality combinations.

Run it as a script (``python tutorials/brats_missing_modalities.py --workdir /tmp/mf_tutorial``) or
cell by cell in an editor that understands ``# %%`` cells. With ``--dataset`` it uses your own BraTS
folder (any release layout: 2018-2021, 2023, MSD Task01); without it, it generates a phantom cohort.
The test suite runs ``main(tmp_path, tiny=True)``.

What it shows:
1. the bundle's training config, run from Python exactly as ``python -m monai.bundle run`` would;
2. evaluation over every modality combination, the summary table and the heatmap;
3. swapping the shared 3D encoder for one encoder per modality with ONE override, and comparing.
"""

from __future__ import annotations

# %% [markdown]
# ## 0. Setup
# The bundle lives in ``bundles/brats_metakd``. Everything it writes goes under ``workdir``.
import argparse
from pathlib import Path

import pandas as pd

from medfusion.apps.bundle import evaluate_bundle, read_summary, train_bundle
from medfusion.data.synth_brats import write_brats_cohort

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brats_metakd"


def settings(tiny: bool) -> dict:
    """Small settings for CI (``tiny``) or a few-minute run on a laptop CPU."""
    if tiny:
        return {"cases": 6, "size": 32, "epochs": 1, "roi": [32, 32, 32], "channels": [8, 16, 32, 64]}
    return {"cases": 24, "size": 48, "epochs": 10, "roi": [48, 48, 48], "channels": [16, 32, 64, 128]}


def train_and_evaluate(dataset: Path, work: Path, cfg: dict, shared_encoder: bool) -> pd.DataFrame:
    """Train the bundle briefly, evaluate every combination of the test split, return the summary."""
    tag = "shared" if shared_encoder else "per_modality"
    overrides = {
        "dataset_dir": str(dataset),
        "ckpt_dir": str(work / tag / "models"),
        "output_dir": str(work / tag / "runs"),
        "max_epochs": cfg["epochs"],
        "roi_size": cfg["roi"],
        "num_workers": 0,
        "cache_rate": 1.0,
        "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.2},
        # MetaKD: every 10 iterations, 5 Adam steps on the importance weights (bundle default: 100 and 20)
        "method#meta_interval": 10,
        "method#meta_steps": 5,
        "network_def#channels": cfg["channels"],
        # %% the ONE switch between a weight-shared encoder and one encoder per modality:
        "network_def#shared_encoder": shared_encoder,
    }
    train_bundle(BUNDLE, overrides)
    evaluate_bundle(
        BUNDLE,
        dataset,
        work / tag / "eval",
        checkpoint=work / tag / "models" / "model.pt",
        roi_size=cfg["roi"],
        hd95=False,
        split="test",
        extra_overrides={k: v for k, v in overrides.items() if k.startswith(("network_def", "split_counts"))},
    )
    return read_summary(work / tag / "eval")


def main(workdir: Path | None = None, dataset: Path | None = None, tiny: bool = False) -> dict[str, pd.DataFrame]:
    """Run the tutorial; returns the two summaries (shared and per-modality encoders)."""
    work = Path(workdir or "tutorial_output")
    cfg = settings(tiny)

    # %% [markdown]
    # ## 1. Data
    # Any BraTS-layout folder works. The phantoms carry their tumour with different contrast per
    # modality (t1ce shows the enhancing tumour, flair the whole tumour; docs/synthetic_brats.md).
    if dataset is None:
        dataset = work / "phantoms"
        if not dataset.exists():
            write_brats_cohort(dataset, cases=cfg["cases"], size=cfg["size"], seed=0)

    # %% [markdown]
    # ## 2. Train and evaluate all 15 combinations (shared encoder)
    shared = train_and_evaluate(dataset, work, cfg, shared_encoder=True)
    print((work / "shared" / "eval" / "summary.md").read_text())
    # Rows are combinations named by modality, the last row is the mean over the 15.
    dice = shared[["dice_tc", "dice_wt", "dice_et"]].drop(index="mean")
    print("best combination by mean Dice:", dice.mean(axis=1).idxmax())
    print("worst combination by mean Dice:", dice.mean(axis=1).idxmin())
    print("heatmap:", work / "shared" / "eval" / "heatmap.png")

    # %% [markdown]
    # ## 3. One encoder per modality instead of a shared one
    per_mod = train_and_evaluate(dataset, work, cfg, shared_encoder=False)
    compare = pd.DataFrame(
        {
            "shared": shared.loc["mean", ["dice_tc", "dice_wt", "dice_et"]],
            "per_modality": per_mod.loc["mean", ["dice_tc", "dice_wt", "dice_et"]],
        }
    )
    print("mean Dice over the 15 combinations:\n", compare.round(3))
    return {"shared": shared, "per_modality": per_mod}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("tutorial_output"))
    parser.add_argument("--dataset", type=Path, default=None, help="a BraTS-layout folder (default: phantoms)")
    parser.add_argument("--tiny", action="store_true", help="CI-sized run")
    a = parser.parse_args()
    main(a.workdir, a.dataset, a.tiny)
