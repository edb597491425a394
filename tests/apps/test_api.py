"""The in-memory API (medfusion.apps.api): fit -> predict -> evaluate on the synthetic clinical cohort.

Tiny shapes (60 stays, 32-pixel images, 32 tokens, one or two epochs); the bundle comparison trains nothing
extra: the model fitted here is loaded by the clinical bundle's inference.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.apps.api import TensorData, evaluate, fit, load_fitted, predict, stack_datalist

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "clinical_fusion"
MODS = ("ehr", "cxr", "report")
KINDS = {"ehr": "ehr", "cxr": "image", "report": "text"}
SIZES = {"image_size": 32, "max_length": 32}


def _encoders(t_steps: int) -> dict[str, dict]:
    return {
        "ehr": {"name": "mlp", "in_features": t_steps * 76, "hidden": [16], "out_dim": 8},
        "cxr": {"name": "resnet10", "spatial_dims": 2, "widen_factor": 0.25},
        "report": {"name": "bert_tiny"},
    }


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from medfusion.data.synth_clinical import write_clinical_cohort

    out = tmp_path_factory.mktemp("api") / "cohort"
    write_clinical_cohort(out, samples=60, seed=0)
    return out


@pytest.fixture(scope="module")
def splits(cohort) -> dict[str, TensorData]:
    from medfusion.data.clinical import clinical_transforms
    from medfusion.data.mimic import discover_mimic

    tf = clinical_transforms(KINDS, mode="eval", **SIZES)
    return {
        s: stack_datalist(discover_mimic(cohort / "ehr", cohort / "cxr", cohort / "reports", split=s), tf, MODS)
        for s in ("train", "val", "test")
    }


@pytest.fixture(scope="module")
def qmf(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("qmf_run") / "models"
    enc = _encoders(splits["train"].inputs["ehr"].shape[1])
    return fit("qmf", enc, splits["train"], splits["val"], epochs=2, batch_size=16, device="cpu", output_dir=out)


def test_fit_records_the_run_and_every_iteration(qmf, splits):
    assert qmf.modalities == MODS and qmf.method_name == "qmf" and qmf.record["seed"] == 0
    assert qmf.network.head_name == "qmf" and qmf.network.head.num_samples == len(splits["train"]) == 42
    assert [r["epoch"] for r in qmf.history] == [1, 1, 1, 2, 2, 2]  # 42 stays / batch 16 = 3 iterations
    assert {"loss", "fused_loss", "modality_loss", "rank_loss"} <= set(qmf.epoch_losses())
    assert qmf.epoch_losses(1)["loss"] == pytest.approx(np.mean([r["loss"] for r in qmf.history[:3]]))
    assert [v["epoch"] for v in qmf.validation] == [1, 2]
    files = sorted(p.name for p in qmf.output_dir.iterdir())
    assert files == ["last_checkpoint_epoch=2.pt", "model.pt"]  # the bundle's atomic saver layout
    ckpt = torch.load(qmf.output_dir / "last_checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert ckpt["record"] == qmf.record and {"model", "optimizer", "method", "trainer"} <= set(ckpt)
    assert int(ckpt["model"]["head.history_count"].sum()) > 0  # QMF's loss history was filled during training


def test_predict_rows_hold_probabilities_and_the_heads_outputs(qmf, splits):
    test = splits["test"]
    out = predict(qmf, test)
    assert out["case_id"].tolist() == list(test.case_id) and out["label"].tolist() == test.label.tolist()
    np.testing.assert_allclose(out["prob_0"] + out["prob_1"], 1.0, atol=1e-6)
    present = test.mask.numpy()
    assert out["modalities"].tolist() == ["+".join(m for m, f in zip(MODS, row) if f) for row in present]
    with torch.no_grad():
        ref = qmf.network.forward_outputs(test.inputs, test.mask)
    np.testing.assert_allclose(out["prob_1"], torch.softmax(ref.logits, 1)[:, 1].numpy(), atol=1e-6)
    for j, m in enumerate(MODS):  # per-sample method outputs: QMF's weights and per-modality logits
        np.testing.assert_allclose(out[f"weights_{m}"], ref.aux["weights"][:, j].numpy(), atol=1e-6)
        np.testing.assert_allclose(out[f"modality_logits_{m}_1"], ref.aux["modality_logits"][m][:, 1], atol=1e-6)
        assert (out.loc[~present[:, j], f"weights_{m}"] == 0).all()  # an absent modality gets no weight
    solo = predict(qmf, test, combination="cxr")
    has_cxr = present[:, 1]
    assert (solo.loc[has_cxr, "modalities"] == "cxr").all() and (solo.loc[has_cxr, "weights_cxr"] > 0).all()
    assert (solo.loc[has_cxr, ["weights_ehr", "weights_report"]] == 0).all().all()  # the others are masked
    assert solo.loc[~has_cxr, "prob_1"].isna().all() and solo.loc[~has_cxr, "pred"].isna().all()
    assert (solo.loc[~has_cxr, "missing_modalities"] == "cxr").all()
    assert solo.loc[~has_cxr, "note"].str.startswith("no prediction").all()


def test_evaluate_matches_predict_per_combination(qmf, splits, tmp_path):
    summary = evaluate(qmf, splits["test"], n_bootstrap=0, output_dir=tmp_path / "eval")
    assert len(summary) == 8 and summary.index[-1] == "mean" and summary.loc["ehr", "n"] == 12
    assert (tmp_path / "eval" / "qmf_weight_vs_loss.png").is_file()  # the method's own evaluation output
    per_combo = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    ref = per_combo[per_combo["combination"] == "ehr+report"].set_index("case_id")
    got = predict(qmf, splits["test"], combination="ehr+report").set_index("case_id").loc[ref.index]
    for col in ("prob_1", "weights_ehr", "weights_report", "modality_logits_report_0"):
        np.testing.assert_allclose(got[col], ref[col], atol=1e-5)
    with pytest.raises(FileExistsError):
        evaluate(qmf, splits["test"], n_bootstrap=0, output_dir=tmp_path / "eval")
    again = evaluate(qmf, splits["test"], n_bootstrap=0, output_dir=tmp_path / "eval", overwrite=True)
    pd.testing.assert_frame_equal(again, summary)
    thr = evaluate(qmf, splits["test"], n_bootstrap=0, threshold_data=splits["train"], combinations=["ehr", "cxr"])
    assert list(thr.index) == ["ehr", "cxr", "mean"] and np.isfinite(thr.loc["ehr", "threshold"])
    assert {"sensitivity_at_thr", "specificity_at_thr"} <= set(thr.columns)


def test_predictions_equal_the_bundle_inference_writer(qmf, cohort, tmp_path):
    """The model fitted in memory, loaded by the bundle's inference.json: the same rows for the same stays."""
    from medfusion.apps.bundle import bundle_workflow

    enc = qmf.record["model"]["encoders"]
    overrides = {
        **SIZES,
        "dataset_dir": str(cohort),
        "method_name": "qmf",
        "encoders": enc,
        "ckpt_path": str(qmf.output_dir / "model.pt"),
        "output_dir": str(tmp_path / "pred"),
        "combination": "ehr+report",
        "batch_size": 5,
        "num_workers": 0,
        "device": "$torch.device('cpu')",
    }
    wf = bundle_workflow(BUNDLE, ["inference.json"], "infer", overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    bundle = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False, na_values=[""])
    # the bundle loaded the best model.pt; predict with the same file
    best = load_fitted(qmf.output_dir / "model.pt", device="cpu")
    assert best.record == qmf.record
    ours = predict(best, stack_for(cohort), combination="ehr+report")
    assert list(bundle.columns) == list(ours.columns) and "weights_report" in bundle
    assert bundle["case_id"].tolist() == ours["case_id"].tolist()
    for col in ours.columns:
        if not pd.api.types.is_numeric_dtype(ours[col]):
            assert bundle[col].fillna("").astype(str).tolist() == ours[col].fillna("").astype(str).tolist(), col
        else:
            np.testing.assert_allclose(bundle[col].astype(float), ours[col].astype(float), atol=1e-5, err_msg=col)


def stack_for(cohort: Path) -> TensorData:
    from medfusion.data.clinical import clinical_transforms
    from medfusion.data.mimic import discover_mimic

    items = discover_mimic(cohort / "ehr", cohort / "cxr", cohort / "reports", split="test")
    return stack_datalist(items, clinical_transforms(KINDS, mode="eval", **SIZES), MODS)


def test_a_fitted_model_refuses_data_without_its_modalities(qmf, splits):
    test = splits["test"]
    with pytest.raises(ValueError, match=r"trained on \[ehr, cxr, report\], asked for \[ehr, report\]"):
        predict(qmf, test.select(["ehr", "report"]))
    with pytest.raises(ValueError, match="trained on"):
        evaluate(qmf, test.select(["cxr"]), n_bootstrap=0)
    with pytest.raises(TypeError, match="pass a TensorData"):  # a whole split as one dict: wrap it first
        predict(qmf, test.as_batch())
    pd.testing.assert_frame_equal(predict(qmf, TensorData.from_batch(test.as_batch(), MODS)), predict(qmf, test))
    # the same modalities in another order are selected by name: the same predictions
    shuffled = predict(qmf, test.select(["report", "ehr", "cxr"]))
    pd.testing.assert_frame_equal(shuffled, predict(qmf, test))


def test_fit_never_replaces_a_run_without_overwrite(splits, tmp_path):
    enc = _encoders(splits["train"].inputs["ehr"].shape[1])
    small = splits["train"].select(["ehr"])
    first = fit("concat", {"ehr": enc["ehr"]}, small, epochs=1, batch_size=16, output_dir=tmp_path, seed=3)
    assert first.record["modalities"] == ["ehr"] and (tmp_path / "last_checkpoint_epoch=1.pt").is_file()
    with pytest.raises(ValueError, match="early_stop_patience needs val"):
        fit("concat", {"ehr": enc["ehr"]}, small, epochs=1, early_stop_patience=2)
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit("concat", {"ehr": enc["ehr"]}, small, epochs=1, batch_size=16, output_dir=tmp_path, seed=3)
    again = fit("concat", {"ehr": enc["ehr"]}, small, epochs=1, batch_size=16, output_dir=tmp_path, seed=3,
                overwrite=True)  # fmt: skip
    # same seed, same data: the same network (per-epoch re-seeding makes the shuffling reproducible)
    for a, b in zip(first.network.state_dict().values(), again.network.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in again.history]
    # resume: epoch 2 continued from the epoch-1 checkpoint == two epochs in one go (per-epoch re-seeding)
    resumed = fit("concat", {"ehr": enc["ehr"]}, small, epochs=2, batch_size=16, output_dir=tmp_path, seed=3,
                  resume=True)  # fmt: skip
    straight = fit("concat", {"ehr": enc["ehr"]}, small, epochs=2, batch_size=16, seed=3)
    assert [r["epoch"] for r in resumed.history] == [2, 2, 2]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[3:]]
    for a, b in zip(resumed.network.state_dict().values(), straight.network.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_tensor_data_checks_shapes_and_masks_by_name():
    x = {"a": torch.ones(4, 3), "b": torch.full((4, 2), 2.0)}
    with pytest.raises(ValueError, match=r"modality_mask has shape \(4, 3\)"):
        TensorData(x, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 case ids for 4 samples"):
        TensorData(x, case_id=["1", "2", "3"])
    data = TensorData(x, label=torch.tensor([0, 1, 0, 1]))
    dropped = data.with_mask(torch.tensor([[True, False], [True, True], [False, True], [True, True]]))
    assert dropped.inputs["b"][0].abs().sum() == 0 and dropped.inputs["a"][2].abs().sum() == 0
    assert dropped.select(["b"]).mask[:, 0].tolist() == [False, True, True, True]
    batches = list(dropped.batches(3))
    assert [len(b["case_id"]) for b in batches] == [3, 1] and batches[1]["sample_index"].tolist() == [3]


def test_load_fitted_rebuilds_network_and_recipe_from_the_record(splits, tmp_path):
    enc = _encoders(splits["train"].inputs["ehr"].shape[1])
    fitted = fit("metakd", enc, splits["train"], meta=splits["val"], epochs=1, batch_size=16, output_dir=tmp_path,
                 method_kwargs={"meta_interval": 1, "meta_steps": 1})  # fmt: skip
    assert fitted.method.state.meta_steps == 3  # one meta step after each of the 3 iterations
    loaded = load_fitted(tmp_path / "last_checkpoint_epoch=1.pt")
    assert loaded.record == fitted.record and loaded.modalities == MODS
    assert loaded.method.state.as_dict() == pytest.approx(fitted.method.state.as_dict())  # the learned KD weights
    assert loaded.method.state.meta_steps == 3
    pd.testing.assert_frame_equal(predict(loaded, splits["test"]), predict(fitted, splits["test"]))
    torch.save({"model": {}, "record": {"model": {"modalities": list(MODS)}}}, tmp_path / "bundle.pt")
    with pytest.raises(ValueError, match="a bundle checkpoint is loaded with its bundle"):
        load_fitted(tmp_path / "bundle.pt")


def test_fit_and_predict_read_a_dataloader_over_the_bundle_transforms(cohort, splits):
    """A DataLoader over the datalist (as the bundle reads it) instead of TensorData: the same predictions."""
    from monai.data import DataLoader, Dataset

    from medfusion.data.clinical import clinical_transforms
    from medfusion.data.mimic import discover_mimic

    two = ("ehr", "cxr")  # the bundle builds its transforms for the model's modalities (mask columns = model's)
    tf = clinical_transforms({m: KINDS[m] for m in two}, mode="eval", **SIZES)
    lists = {
        s: discover_mimic(cohort / "ehr", cohort / "cxr", cohort / "reports", split=s, modalities=two)
        for s in ("train", "test")
    }
    for i, item in enumerate(lists["train"]):
        item["sample_index"] = i  # the bundle's splits number the rows
    train = DataLoader(Dataset(lists["train"], tf), batch_size=16, shuffle=True)
    enc = {m: spec for m, spec in _encoders(splits["train"].inputs["ehr"].shape[1]).items() if m in two}
    fitted = fit("qmf", enc, train, epochs=1, device="cpu")  # num_train_samples from train.dataset
    assert fitted.network.head.num_samples == 42 and len(fitted.history) == 3
    via_loader = predict(fitted, DataLoader(Dataset(lists["test"], tf), batch_size=5))
    via_tensors = predict(fitted, splits["test"])  # the 3-modality split: ehr and cxr selected by name
    assert via_loader["case_id"].tolist() == via_tensors["case_id"].tolist()
    for col in ("prob_1", "weights_ehr", "weights_cxr"):
        np.testing.assert_allclose(via_loader[col], via_tensors[col], atol=1e-5)


def test_a_loader_built_for_other_modalities_is_refused_by_name(qmf, splits):
    """Plain batch loaders are checked per batch (ModalityBatch): a missing modality key, or a mask whose width
    is not the network's M (its columns would be read as the network's modalities), is one clear error."""
    batch = splits["test"].as_batch()
    no_cxr = {k: v for k, v in batch.items() if k != "cxr"}
    with pytest.raises(KeyError, match=r"no key for modalities \['cxr'\]"):
        predict(qmf, [no_cxr])
    wide = dict(batch, modality_mask=torch.ones(len(splits["test"]), 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \[B, 3\] for the network's modalities \[ehr, cxr, report\]"):
        predict(qmf, [wide])
    pd.testing.assert_frame_equal(predict(qmf, [batch]), predict(qmf, splits["test"], batch_size=len(batch["ehr"])))
