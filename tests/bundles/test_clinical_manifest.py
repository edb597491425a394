"""bundles/clinical_fusion on a manifest shaped like real data (long notes, repeated patients, sparse EHR columns,
absent image files, an 81/19 outcome): patient-level splits, split columns, the tabular preprocessing fitted on the
training split and reused everywhere, thresholds chosen on validation, inference that never aborts, and the data
check before training.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.apps import clinical_bundle as cb
from medfusion.apps.bundle import bundle_workflow, run_bundle
from medfusion.data.splits import groups_in_several_parts
from medfusion.data.synth_manifest import cohort_bundle_overrides

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"


@pytest.fixture(scope="module")
def overrides(clinical_tiny, work_dirs) -> Callable[..., dict[str, Any]]:
    """``overrides(cohort, work, **extra)``: tiny settings, the cohort's manifest overrides, run folders in ``work``."""

    def make(cohort: dict | Path, work: Path, **extra: Any) -> dict[str, Any]:
        data = {**cohort_bundle_overrides(cohort), "dataset_dir": str(work)}
        return {**clinical_tiny, **data, **work_dirs(work), **extra}

    return make


@pytest.fixture(scope="module")
def trained(sparse_cohort, tmp_path_factory, overrides) -> tuple[Path, dict[str, Any], Any]:
    """concat trained for 2 epochs on the generated cohort, then evaluated (every combination, 50 bootstraps)."""
    work = tmp_path_factory.mktemp("sparse_bundle")
    ov = overrides(sparse_cohort, work, method_name="concat", max_epochs=2)
    wf = run_bundle(BUNDLE, ["train.json"], "train", ov)
    evaluation = {"eval_output_dir": str(work / "eval"), "eval_n_bootstrap": 50}
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], "train", {**ov, **evaluation})
    return work, ov, wf.parser.get_parsed_content("split")


def test_patient_level_split_stratified(trained, sparse_cohort):
    _, _, split = trained
    assert groups_in_several_parts(split) == {}  # no patient in two parts
    assert sum(len(v) for v in split.values()) == sparse_cohort["rows"]  # no row is dropped in this cohort
    for name in ("train", "val", "test"):
        labels = [e["label"] for e in split[name]]
        assert 0 < sum(labels) < len(labels), name  # both classes in every part


def test_tabular_preprocessing_fitted_on_train_saved_and_reused(trained):
    from medfusion.apps.export import load_encoder
    from medfusion.encoders.tabular import TabularPreprocessing

    work, ov, split = trained
    ckpt = torch.load(work / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    rows = np.asarray([e["vitals"] for e in split["train"] if e["vitals"] is not None], dtype=float)
    ref = TabularPreprocessing(rows.shape[1]).fit(rows)
    for name in ("fill", "center", "scale"):
        torch.testing.assert_close(ckpt[f"encoders.vitals.preprocess.{name}"], getattr(ref, name))
    everything = np.asarray([e["vitals"] for p in split.values() for e in p if e["vitals"] is not None], dtype=float)
    assert not torch.allclose(ckpt["encoders.vitals.preprocess.center"], TabularPreprocessing(9).fit(everything).center)
    assert bool(ckpt["encoders.vitals.preprocess.fitted"])
    # medfusion.load_encoder rebuilds the network (manifest overrides) and returns the fitted preprocessing with it
    keys = ("data_layout", "modalities", "manifest_columns", "encoders#report", "method_name", "max_length")
    keys += ("image_size", "volume_size")  # the model record is checked: the input sizes it was trained with
    ckpt_path = work / "models" / "model.pt"
    encoder, preprocess = load_encoder(BUNDLE, "vitals", ckpt_path, "inference.json", {k: ov[k] for k in keys})
    torch.testing.assert_close(encoder.preprocess.center, ref.center)
    x = preprocess([80.0, float("nan"), 20.0, 95.0, float("nan"), float("nan"), 12.0, 1.0, float("nan")])
    assert x.shape == (9,) and bool(torch.isnan(x).any())  # raw values; the encoder imputes
    out = encoder(x[None])
    assert torch.isfinite(out.pooled).all()


def test_summary_has_cis_thresholds_split_rule_and_explains_mean(trained):
    work, _, _ = trained
    summary = pd.read_csv(work / "eval" / "summary.csv", index_col=0)
    assert len(summary) == 8 and {"threshold", "balanced_accuracy_at_thr", "sensitivity_at_thr"} <= set(summary)
    assert summary.loc["vitals", "threshold"] == pytest.approx(summary.loc["vitals", "threshold"])  # finite
    assert 0 < summary.loc["vitals", "threshold"] < 1
    md = (work / "eval" / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| vitals |"))
    assert row.count("[") >= 5  # value [lo, hi] per metric
    assert "Split: manifest split by patient (group_column 'patient_id')" in md
    assert "mean: unweighted mean of the 7 combination rows" in md and "smallest n" in md
    assert "largest Youden's J" in md and "on the validation split" in md


def test_inference_with_a_combination_never_aborts(trained, sparse_cohort, tmp_path):
    work, ov, _ = trained
    inf = {k: v for k, v in ov.items() if k not in ("ckpt_dir", "output_dir", "group_column")}
    run_bundle(
        BUNDLE,
        ["inference.json"],
        "infer",
        {**inf, "method_name": "concat", "ckpt_path": str(work / "models" / "model.pt"), "output_dir": str(tmp_path),
         "combination": "cxr"},
    )  # fmt: skip
    out = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert len(out) == sparse_cohort["rows"]  # every row gets a line
    no_cxr = out[out["modalities"] == ""]
    n_no_cxr = sparse_cohort["absent_files"] + sparse_cohort["empty_image_cells"]
    assert len(no_cxr) == n_no_cxr > 0
    assert (no_cxr["missing_modalities"] == "cxr").all() and (no_cxr["prob_1"] == "").all()
    assert no_cxr["note"].str.contains("none of the requested modalities").all()
    used = out[out["modalities"] != ""]
    assert (used["modalities"] == "cxr").all() and (used["missing_modalities"] == "").all()
    np.testing.assert_allclose(used["prob_0"].astype(float) + used["prob_1"].astype(float), 1.0, atol=1e-5)


def test_split_column_and_leak_warning(sparse_cohort, tmp_path, caplog):
    src = Path(sparse_cohort["manifest"]).parent
    work = Path(shutil.copytree(src, tmp_path / "c"))
    table = pd.read_csv(work / "manifest.csv", dtype=str, keep_default_na=False)
    patients = sorted(table["patient_id"].unique())
    fold = {p: ("test" if i % 5 == 0 else "val" if i % 5 == 1 else "train") for i, p in enumerate(patients)}
    table["fold"] = table["patient_id"].map(fold)
    table.loc[0, "fold"] = "test" if table.loc[0, "fold"] != "test" else "train"  # one patient now in two splits
    table.to_csv(work / "manifest.csv", index=False)
    ov = cohort_bundle_overrides(work)
    kinds = cb.resolve_kinds(ov["modalities"], {"cxr": "image", "report": "text"}, ov["manifest_columns"])
    kw = {k: ov[k] for k in ("manifest_csv", "manifest_columns", "case_id_column", "group_column")}
    with caplog.at_level("WARNING"):
        parts = cb.clinical_splits("manifest", work, ov["modalities"], kinds=kinds, label_columns=["outcome"],
                                   split_column="fold", **kw)  # fmt: skip
    assert parts["meta_val"] == [] and len(parts["test"]) + len(parts["val"]) + len(parts["train"]) == len(table)
    assert all(
        fold[e["group"]] == e["split"] or e["case_id"] == table.loc[0, "image_id"] for p in parts.values() for e in p
    )
    assert any("in more than one split of 'fold'" in r.getMessage() for r in caplog.records)
    rule = cb.split_rule("manifest", parts, split_column="fold")
    assert (
        rule.startswith("Split: given by the manifest column 'fold'.")
        and "1 group(s) are in more than one part" in rule
    )


def test_pretraining_check_names_rows_with_bad_labels(sparse_cohort, tmp_path, overrides):
    src = Path(sparse_cohort["manifest"]).parent
    work = Path(shutil.copytree(src, tmp_path / "c"))
    table = pd.read_csv(work / "manifest.csv", dtype=str, keep_default_na=False)
    table.loc[3, "outcome"] = "2"
    table.loc[7, "outcome"] = "0.5"
    table.to_csv(work / "manifest.csv", index=False)
    ov = overrides(work, work, max_epochs=1)
    wf = bundle_workflow(BUNDLE, ["train.json"], "train", ov)
    with pytest.raises(RuntimeError) as exc:
        wf.initialize()
    msg = str(exc.value.__cause__ or exc.value)
    assert f"case {table.loc[3, 'image_id']}: label 2.0 is not a class index [0, 2)" in msg
    assert f"case {table.loc[7, 'image_id']}: label 0.5" in msg


def test_kinds_sizes_and_encoders_from_the_manifest_columns():
    cols = {"cxr": "image_path", "report": "note", "vitals": ["a", "b", "c"]}
    kinds = cb.resolve_kinds(["cxr", "report", "vitals"], {"cxr": "image", "report": "text"}, cols)
    assert kinds == {"cxr": "image", "report": "text", "vitals": "tabular"}
    sizes = cb.tabular_sizes(kinds, {}, cols)
    assert sizes == {"vitals": 3}
    defaults = {"tabular": {"name": "tabular", "hidden": [64]}, "image": {"name": "resnet10", "spatial_dims": 2}}
    enc = cb.select_encoders(["cxr", "vitals"], {"report": {"name": "bert"}}, kinds, sizes, defaults)
    assert enc == {
        "cxr": {"name": "resnet10", "spatial_dims": 2},
        "vitals": {"name": "tabular", "hidden": [64], "in_features": 3},
    }
    with pytest.raises(ValueError, match=r"modality 'vitals' is of kind 'tabular' but encoders#vitals is 'gru'"):
        cb.select_encoders(["vitals"], {"vitals": {"name": "gru"}}, kinds, sizes, defaults)
    with pytest.raises(ValueError, match=r"encoders#vitals#in_features is 5 but modality 'vitals' has 3"):
        cb.select_encoders(["vitals"], {"vitals": {"name": "tabular", "in_features": 5}}, kinds, sizes, defaults)
    with pytest.raises(ValueError, match="feature count of tabular modality 'labs' is unknown"):
        cb.tabular_sizes({"labs": "tabular"}, {}, None)
    with pytest.raises(ValueError, match=r"modality_kinds has no entry for modalities \['x'\]"):
        cb.resolve_kinds(["x"], {}, None)


def test_class_weights_auto_samples_classes_evenly():
    data = [{"case_id": str(i), "label": float(i < 20)} for i in range(100)]  # 20 % positive
    sampler = cb.class_sampler(data, "auto", 2)
    w = sampler.weights.numpy()
    assert w[0] == pytest.approx(100 / (2 * 20)) and w[50] == pytest.approx(100 / (2 * 80))
    torch.manual_seed(0)
    drawn = [data[i]["label"] for _ in range(20) for i in sampler]
    assert abs(np.mean(drawn) - 0.5) < 0.03 and len(list(sampler)) == 100
    assert cb.class_sampler(data, None, 2) is None
    assert cb.class_sampler(data, [1.0, 3.0], 2).weights[0] == 3.0
    with pytest.raises(ValueError, match=r"row '0' has label 1.0; expected a class index in \[0, 1\)"):
        cb.class_sampler(data, "auto", 1)
    with pytest.raises(ValueError, match="null, 'auto' or a list"):
        cb.class_sampler(data, "balanced", 2)
    with pytest.raises(ValueError, match="not supported with multi_gpu"):
        cb.no_class_weights_in_ddp("auto")


def test_restrict_to_combination():
    t = cb.RestrictToCombinationd(["a", "b", "c"], "a+b")
    out = t(
        {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2), "modality_mask": torch.tensor([1, 0, 1]).bool()}
    )
    assert out["modality_mask"].tolist() == [True, False, False] and out["missing_modalities"] == "b"
    assert out["predictable"] and float(out["c"].sum()) == 0.0
    none = t(
        {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2), "modality_mask": torch.tensor([0, 0, 1]).bool()}
    )
    assert not none["predictable"] and none["missing_modalities"] == "a+b"
    assert none["modality_mask"].tolist() == [False, False, True]  # unchanged: the batch can still run
    assert math.isclose(float(none["c"].sum()), 2.0)


def test_defaults_stop_early_on_validation_auroc_and_keep_the_best_epoch(sparse_cohort, tmp_path, overrides):
    """Issue #11.7: the defaults are lr 1e-3 and early stopping on validation AUROC (benchmarks/clinical_defaults.py).

    Run with a patience of 1 on the small cohort: training stops one epoch after the best validation AUROC (or at
    max_epochs), and ``model.pt`` holds the weights of that best epoch.
    """
    defaults = bundle_workflow(BUNDLE, ["train.json"], "train", {})
    assert defaults.parser.get_parsed_content("learning_rate") == 1e-3
    assert defaults.parser.get_parsed_content("early_stop_patience") == 5
    assert list(defaults.parser.get_parsed_content("validate#key_metric", instantiate=False)) == ["val_auroc"]
    seen: list[tuple[int, float]] = []
    ov = overrides(sparse_cohort, tmp_path, method_name="concat", max_epochs=4, early_stop_patience=1)
    wf = bundle_workflow(BUNDLE, ["train.json"], "train", ov)
    wf.initialize()
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    net = wf.parser.get_parsed_content("network")
    best: dict[str, Any] = {}

    def record(engine: Any) -> None:  # after the checkpoint saver (registered later than the config's handlers)
        auroc = float(engine.state.metrics["val_auroc"])
        if not seen or auroc > max(a for _, a in seen):
            best["state"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        seen.append((len(seen) + 1, auroc))

    from ignite.engine import Events

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, record)
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    best_epoch = max(seen, key=lambda t: (t[1], -t[0]))[0]  # the first epoch reaching the best AUROC
    assert evaluator.state.best_metric_epoch == best_epoch
    assert trainer.state.epoch == min(4, best_epoch + 1) == len(seen)
    saved = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    for k, v in best["state"].items():
        torch.testing.assert_close(saved[k], v)
    wf.finalize()
