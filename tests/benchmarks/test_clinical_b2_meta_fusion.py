"""Fast tests of the meta_fusion arm of benchmarks/clinical_b2.py on tiny tensors (no cohort, no training loop)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.apps.api import TensorData
from medfusion.fusion.meta_fusion_head import MetaFusionHead
from medfusion.models.classifier import Classifier

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "clinical_b2.py"
_spec = importlib.util.spec_from_file_location("clinical_b2", PATH)
b2 = importlib.util.module_from_spec(_spec)
sys.modules["clinical_b2"] = b2
_spec.loader.exec_module(b2)

DIMS = {"ehr": 4, "cxr": 5, "report": 3}


def _split(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).float()
    return TensorData({m: torch.randn(n, d, generator=g) + 1.5 * y[:, None] for m, d in DIMS.items()}, label=y)


def _args(**kw) -> argparse.Namespace:
    base = dict(
        mf_epochs=2, mf_hidden=[8], mf_rho_grid=[0.0, 0.99], mf_lr=1e-2, mf_batch_size=0, mf_val="full",
        skip_meta_fusion=False,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    enc = {m: {"name": "mlp", "in_features": d, "hidden": [], "out_dim": 3} for m, d in DIMS.items()}
    net = Classifier(enc, head="concat", num_classes=2).eval()
    data = {"train": _split(40, 0), "val": _split(20, 1), "test": _split(24, 2)}
    return net, data


def test_arm_fits_on_a_copy_and_reports_choices(setup):
    net, data = setup
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tr_mask = b2.drop_mask(40, 0.3, np.random.default_rng(0))
    mf, choices, sec = b2.fit_meta_fusion_arm(net, data, _args(), seed=3, tr_mask=tr_mask)
    # the concat network is untouched, the copy carries the fitted head and the same encoders
    assert net.head_name == "concat" and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(mf.head, MetaFusionHead) and mf.head.fitted and mf.head.meta.seed == 3
    enc_before = net.encoders.state_dict()
    assert all(torch.equal(v, enc_before[k]) for k, v in mf.encoders.state_dict().items())
    # 3 modalities x (null, identity, pca:3) minus all-null = 26 students
    assert choices["n_students"] == 3**3 - 1 and choices["in_dims"] == {"ehr": 3, "cxr": 3, "report": 3}
    assert choices["rho"] in (0.0, 0.99) and 1 <= choices["n_teachers"] <= 26
    assert choices["committee_size"] == sum(choices["committee"].values()) >= choices["committee_distinct"] >= 1
    assert sec >= 0
    # evaluated like every other arm: masked test, 7 combinations, one modality at a time
    te_mask = b2.drop_mask(24, 0.5, np.random.default_rng(1))
    res = b2.missing_eval(mf, data, 0.5, 3, b2.META, te_mask, sec)
    assert len(res["combo_rows"]) == 7 and len(res["single_rows"]) == 3
    assert 0.0 <= res["row"]["auroc"] <= 1.0
    pr = b2.per_sample(mf, b2.masked(data["test"], te_mask))
    assert pr["prob"].shape == (24,) and np.isfinite(pr["prob"]).all()
    assert np.array_equal(pr["label"], data["test"].label.numpy())


def test_meta_val_mask_and_arms():
    args = _args(mf_val="masked")
    assert b2.meta_val_mask(args, 0, 0.0, 10) is None
    assert b2.meta_val_mask(_args(), 0, 0.5, 10) is None  # default: complete val
    m = b2.meta_val_mask(args, 1, 0.5, 200)
    assert m.shape == (200, 3) and m.any(1).all() and 0.3 < 1 - m.mean() < 0.5
    assert np.array_equal(m, b2.meta_val_mask(args, 1, 0.5, 200))
    assert b2.missing_arms(args)[-1] == b2.META and b2.META not in b2.missing_arms(_args(skip_meta_fusion=True))
    assert b2.meta_tag(args) != b2.meta_tag(_args(mf_val="masked", mf_epochs=3)) and b2.meta_tag(args).startswith("mf")
    assert b2.meta_tag(args) != b2.meta_tag(_args()) and b2.meta_tag(args, False) == b2.meta_tag(_args(), False)
    assert b2.meta_kwargs(args, 7) == {
        "epochs": 2, "hidden": [8], "rho_grid": (0.0, 0.99), "lr": 1e-2, "batch_size": 0, "seed": 7,
    }  # fmt: skip


def test_paired_stats_by_hand():
    idx = pd.MultiIndex.from_tuples(
        [(a, 0.5, s) for a in ("meta_fusion", "concat") for s in (0, 1, 2)], names=["arm", "rate", "seed"]
    )
    series = pd.Series([0.80, 0.70, 0.75, 0.70, 0.72, 0.70], index=idx)
    st = b2.paired_stats(series, "meta_fusion", "concat", 0.5)
    # differences 0.10, -0.02, 0.05 -> mean 0.0433.., sd 0.0603.., SE sd/sqrt(3)
    assert st["seeds"] == 3 and st["positive_seeds"] == 2
    assert st["mean"] == pytest.approx(0.13 / 3)
    assert st["se"] == pytest.approx(np.std([0.10, -0.02, 0.05], ddof=1) / np.sqrt(3))


def test_per_sample_reads_the_heads_outputs_from_api_predict():
    """B2's per-sample arrays (QMF weights, each modality's own CE) from api.predict == the head's forward."""
    import torch.nn.functional as F

    torch.manual_seed(1)
    enc = {m: {"name": "mlp", "in_features": d, "hidden": [], "out_dim": 3} for m, d in DIMS.items()}
    net = Classifier(enc, head="qmf", num_classes=2, head_kwargs={"num_samples": 24}).eval()
    test = _split(24, 2).with_mask(b2.drop_mask(24, 0.3, np.random.default_rng(2)))
    pr = b2.per_sample(net, test)
    with torch.no_grad():
        out = net.forward_outputs(test.inputs, test.mask)
    y = test.label.long()
    ce = torch.stack([F.cross_entropy(out.aux["modality_logits"][m], y, reduction="none") for m in b2.MODS], 1)
    np.testing.assert_allclose(pr["ce"], ce.numpy(), atol=1e-5)
    np.testing.assert_allclose(pr["weights"], out.aux["weights"].numpy(), atol=1e-6)
    np.testing.assert_allclose(pr["prob"], torch.softmax(out.logits, 1)[:, 1].numpy(), atol=1e-6)
    levels = b2.qmf_levels(net, test)
    z = torch.stack([out.aux["modality_logits"][m] for m in b2.MODS], 1)
    assert levels["logit_level"]["cxr"] == pytest.approx(float(torch.logsumexp(z, -1)[:, 1].mean()), abs=1e-5)
    eq = torch.softmax(z.sum(1), -1)[:, 1].numpy()
    assert levels["auroc_equal_weights"] == pytest.approx(b2.metrics(eq, y.numpy())["auroc"])
