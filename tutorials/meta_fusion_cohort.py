"""Tutorial: a Meta Fusion cohort on tabular modalities with missing values.

Run it as a script (``python tutorials/meta_fusion_cohort.py --workdir /tmp/mf_meta``) or cell by cell in an
editor that understands ``# %%`` cells. The test suite runs ``main(tmp_path, tiny=True)``.

What it shows:
1. turning a table whose column groups are modalities into Meta Fusion data (a NaN = modality absent);
2. building the cohort from per-modality extractor grids and fitting every stage (screening, teachers,
   mutual learning, ensemble selection);
3. reading the teachers, rho and the committee (``summary()``);
4. predicting with a modality missing and listing the students that were used (``used_students``);
5. comparing aggregation rules (``ensemble``, ``best_single``, ``average``).

The same head plugs into a trained clinical classifier: ``bundles/clinical_fusion`` with
``configs/meta_fusion.json`` (see the bundle README, section "Meta Fusion").
"""

from __future__ import annotations

# %% [markdown]
# ## 0. Synthetic cohort: three tabular modalities, a binary outcome, missing blocks
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfusion.fusion.meta_fusion import MetaFusionData
from medfusion.fusion.meta_fusion_head import fit_meta_fusion, tabular_data
from medfusion.modality import mask_to_name

COLUMNS = {
    "labs": [f"lab_{i}" for i in range(6)],
    "vitals": [f"vital_{i}" for i in range(4)],
    "notes": [f"note_{i}" for i in range(8)],
}


def settings(tiny: bool) -> dict:
    """Small settings for CI (``tiny``) or a richer run (about a minute on a laptop CPU)."""
    if tiny:
        return {"samples": 240, "epochs": 15, "rho_grid": [0.0, 1.0], "pca": 2}
    return {"samples": 2000, "epochs": 60, "rho_grid": [0.0, 0.5, 1.0, 3.0], "pca": 3}


def make_table(samples: int, seed: int = 0) -> pd.DataFrame:
    """Labs carry a strong signal, vitals a weaker one, notes mostly noise; each modality is missing for ~25 %."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, samples)
    signal = {"labs": 1.2, "vitals": 0.6, "notes": 0.15}
    parts = {}
    for m, cols in COLUMNS.items():
        x = rng.normal(size=(samples, len(cols)))
        x[:, :2] += signal[m] * (2 * y[:, None] - 1)
        parts[m] = x
    missing = rng.random((samples, len(COLUMNS))) < 0.25
    missing[missing.all(axis=1), 0] = False  # every sample keeps at least one modality
    for i, m in enumerate(COLUMNS):
        parts[m][missing[:, i]] = np.nan
    frame = pd.DataFrame(np.concatenate(list(parts.values()), axis=1), columns=sum(COLUMNS.values(), []))
    frame["outcome"] = y
    return frame


def split(data: MetaFusionData, idx: np.ndarray) -> MetaFusionData:
    """Rows ``idx`` of every tensor."""
    i = torch.as_tensor(idx)
    return MetaFusionData({m: v[i] for m, v in data.x.items()}, data.mask[i], data.y[i])


def main(workdir: str | Path, tiny: bool = False) -> dict:
    """Fit a cohort, print what it decided, predict with a modality missing, compare rules.

    Args:
        workdir: output folder (``summary.json``, ``rules.csv``).
        tiny: CI settings.

    Returns:
        ``{"summary": dict, "rules": DataFrame (rule x accuracy/nll), "used": DataFrame}``.
    """
    cfg = settings(tiny)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    # %% [markdown]
    # ## 1. Table -> Meta Fusion data (a NaN anywhere in a modality's columns = that modality is absent)
    data = tabular_data(make_table(cfg["samples"]), COLUMNS, "outcome", task="classification")
    n = len(data.y)
    order = np.random.default_rng(1).permutation(n)
    train, val, test = (split(data, order[a:b]) for a, b in ((0, n // 2), (n // 2, 3 * n // 4), (3 * n // 4, n)))
    print(f"samples: train {len(train.y)}, val {len(val.y)}, test {len(test.y)}")

    # %% [markdown]
    # ## 2. The cohort: every combination of per-modality extractors minus the all-null student
    k = cfg["pca"]
    grids = {"labs": ["null", "identity", f"pca:{k}"], "vitals": ["null", "identity"], "notes": ["null", f"pca:{k}"]}
    head = fit_meta_fusion(
        train, val, grids, num_classes=2, epochs=cfg["epochs"], rho_grid=cfg["rho_grid"], hidden=[16], batch_size=32
    )
    meta = head.meta

    # %% [markdown]
    # ## 3. What Meta Fusion decided: teachers (K-means on screening losses), rho, committee
    summary = meta.summary()
    print(f"cohort: {len(summary['students'])} students")
    print(f"teachers (k={summary['n_clusters']}): {summary['teachers']}")
    print(f"rho = {summary['rho']} (grid {summary['rho_grid']}, scores {np.round(summary['rho_scores'], 4).tolist()})")
    print(f"committee: {summary['committee']}")
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    # %% [markdown]
    # ## 4. Predict with a modality missing: only students whose modalities are present can vote
    for absent in ("labs", "notes"):
        mask = test.mask.clone()
        mask[:, list(COLUMNS).index(absent)] = False
        keep = mask.any(dim=1)  # samples with something left
        used = meta.used_students(mask[keep], "ensemble")
        names = sorted({meta.student_names[s] for s in used.nonzero()[:, 1].tolist()})
        print(f"without {absent}: students used {names}")
        assert all(absent + "=" not in name for name in names)
    used_table = pd.DataFrame(
        {
            "modalities": [mask_to_name(m, list(COLUMNS)) for m in test.mask[:5]],
            "students": [
                [meta.student_names[s] for s in row.nonzero().flatten().tolist()]
                for row in meta.used_students(test.mask[:5], "ensemble")
            ],
        }
    )
    print(used_table.to_string(index=False))

    # %% [markdown]
    # ## 5. Compare aggregation rules on the test split (log-probabilities -> accuracy and NLL)
    rows = {}
    for rule in ("ensemble", "best_single", "average"):
        logp = meta.predict(test.x, test.mask, rule)
        rows[rule] = {
            "accuracy": float((logp.argmax(dim=1) == test.y).float().mean()),
            "nll": float(torch.nn.functional.nll_loss(logp, test.y)),
        }
    rules = pd.DataFrame.from_dict(rows, orient="index")
    rules.to_csv(work / "rules.csv")
    print(rules.round(3).to_string())
    return {"summary": summary, "rules": rules, "used": used_table}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/mf_meta_fusion")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    main(args.workdir, tiny=args.tiny)
