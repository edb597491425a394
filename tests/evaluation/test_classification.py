from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.evaluation.classification import classification_metrics, evaluate_classification
from medfusion.fusion.base import FusionModel
from medfusion.fusion.metakd import MetaKDHead

MODS = ("ehr", "cxr", "report")


class _Lin(nn.Module):
    def __init__(self, d_in, d_out=5):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.out_dim = d_out

    def forward(self, x):
        return EncoderOutput(self.lin(x))


def test_metrics_hand_computed():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(probs, labels)
    # scores 0.1, 0.6 (neg) vs 0.65, 0.8 (pos): every positive outranks every negative
    assert m["auroc"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(0.75)  # sample 1 predicted 1
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.8)  # precision 2/3, recall 1
    assert m["auprc"] == pytest.approx(1.0)
    assert np.isnan(classification_metrics(probs[:2], labels[:2])["auroc"])


def test_cached_equals_naive_and_outputs(tmp_path):
    torch.manual_seed(0)
    enc = {"ehr": _Lin(4), "cxr": _Lin(6), "report": _Lin(3)}
    head = MetaKDHead(MODS, {m: 5 for m in MODS}, num_classes=2, embed_dim=4)
    model = FusionModel(enc, head).eval()
    n = 40
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(n, 3, generator=g) > 0.3
    mask[:, 0] = True
    batches = []
    for s in range(0, n, 16):
        e = slice(s, min(n, s + 16))
        b = e.stop - e.start
        batches.append(
            {
                "ehr": torch.randn(b, 4, generator=g),
                "cxr": torch.randn(b, 6, generator=g) * mask[e, 1:2],
                "report": torch.randn(b, 3, generator=g) * mask[e, 2:3],
                "modality_mask": mask[e],
                "label": torch.randint(0, 2, (b,), generator=g),
                "sample_index": torch.arange(e.start, e.stop),
            }
        )
    cached = evaluate_classification(model, batches, MODS, tmp_path, n_bootstrap=20, progress=False)
    naive = evaluate_classification(model, batches, MODS, None, n_bootstrap=20, cached=False, progress=False)
    pd.testing.assert_frame_equal(cached, naive)
    assert list(cached.index)[:3] == ["ehr", "cxr", "report"] and cached.index[-1] == "mean"
    assert cached.loc["ehr", "n"] == n
    assert cached.loc["ehr+cxr+report", "n"] == int(mask.all(dim=1).sum())
    assert (cached["auroc_lo"] <= cached["auroc_hi"]).all()
    preds = pd.read_csv(tmp_path / "predictions.csv")
    assert {"sample_index", "combination", "label", "prob_0", "prob_1"} <= set(preds.columns)
    assert (tmp_path / "heatmap.png").exists() and "| **mean** |" in (tmp_path / "summary.md").read_text()
