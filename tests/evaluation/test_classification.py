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


def test_threshold_chosen_by_youden_and_metrics_at_it_by_hand():
    from medfusion.evaluation.classification import choose_threshold, threshold_metrics

    # P(class 1): negatives 0.05, 0.10, 0.20, 0.30; positives 0.15, 0.25, 0.35 (all below 0.5: argmax predicts 0)
    p1 = np.array([0.05, 0.10, 0.20, 0.30, 0.15, 0.25, 0.35])
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    probs = np.stack([1 - p1, p1], axis=1)
    # thresholds 0.35: J = 1/3 - 0; 0.25: 2/3 - 1/4 = 5/12; 0.15: 1 - 2/4 = 1/2 (the best); 0.05: 0
    assert choose_threshold(probs, y) == pytest.approx(0.15)
    m = threshold_metrics(probs, y, 0.15)
    # predicted positive: 0.20, 0.30, 0.15, 0.25, 0.35 -> TP 3, FP 2, TN 2, FN 0
    assert m["sensitivity_at_thr"] == pytest.approx(1.0) and m["specificity_at_thr"] == pytest.approx(0.5)
    assert m["accuracy_at_thr"] == pytest.approx(5 / 7) and m["balanced_accuracy_at_thr"] == pytest.approx(0.75)
    assert m["f1_at_thr"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 0))
    assert classification_metrics(probs, y)["balanced_accuracy"] == pytest.approx(0.5)  # 0.5: one class only
    assert np.isnan(choose_threshold(probs[:4], y[:4]))
    assert all(np.isnan(v) for v in threshold_metrics(probs, y, float("nan")).values())


def test_threshold_from_validation_loader_and_summary_notes(tmp_path):
    torch.manual_seed(0)
    enc = {"ehr": _Lin(4), "cxr": _Lin(6), "report": _Lin(3)}
    head = MetaKDHead(MODS, {m: 5 for m in MODS}, num_classes=2, embed_dim=4)
    model = FusionModel(enc, head).eval()
    g = torch.Generator().manual_seed(2)

    def batch(n: int) -> dict:
        return {
            "ehr": torch.randn(n, 4, generator=g),
            "cxr": torch.randn(n, 6, generator=g),
            "report": torch.randn(n, 3, generator=g),
            "modality_mask": torch.ones(n, 3, dtype=torch.bool),
            "label": torch.tensor([0, 1] * (n // 2)),
            "sample_index": torch.arange(n),
        }

    val, test = [batch(20)], [batch(24)]
    summary = evaluate_classification(
        model, test, MODS, tmp_path, n_bootstrap=10, progress=False, threshold_loader=val, notes=["Split: rule."]
    )
    val_preds = evaluate_classification(model, val, MODS, None, n_bootstrap=0, progress=False)
    assert set(val_preds.index) == set(summary.index)
    from medfusion.evaluation.classification import choose_threshold, predict_combinations

    masks = torch.ones(1, 3, dtype=torch.bool)
    vp = predict_combinations(model, val, MODS, masks, torch.device("cpu"), progress=False)
    expected = choose_threshold(vp[["prob_0", "prob_1"]].to_numpy(), vp["label"].to_numpy())
    assert summary.loc["ehr+cxr+report", "threshold"] == pytest.approx(expected)
    assert {"accuracy_at_thr_lo", "f1_at_thr_hi"} <= set(summary.columns)
    md = (tmp_path / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ehr+cxr+report |"))
    assert f"{summary.loc['ehr+cxr+report', 'auroc']:.3f} [" in row
    assert "Split: rule." in md and "mean: unweighted mean of the 7 combination rows" in md
    assert "largest Youden's J" in md


def test_per_sample_aux_names_only_declared_keys_by_modality():
    from medfusion.evaluation.classification import per_sample_aux

    aux = {
        "weights": torch.tensor([[0.25, 0.75], [1.0, 0.0]]),
        "joint_logits": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),  # [B, K] with K == M == 2
        "count": torch.tensor([2.0, 1.0]),
        "modality_logits": {"ehr": torch.tensor([[0.5, -0.5], [1.0, 2.0]])},
    }
    cols = per_sample_aux(aux, 2, ("ehr", "cxr"), per_modality=("weights",))
    assert sorted(cols) == ["count", "modality_logits_ehr_0", "modality_logits_ehr_1", "weights_cxr", "weights_ehr"]
    np.testing.assert_allclose(cols["weights_cxr"], [0.75, 0.0])
    np.testing.assert_allclose(cols["modality_logits_ehr_1"], [-0.5, 2.0])
    with pytest.raises(ValueError, match=r"aux\['joint_logits'\] is declared per-modality"):
        per_sample_aux({"joint_logits": torch.zeros(2, 3)}, 2, ("ehr", "cxr"), per_modality=("joint_logits",))
