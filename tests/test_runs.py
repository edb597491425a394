"""Runs and results are never silently lost, mixed or wrong (issue #12 items 1-4).

The kill-and-resume comparison of whole bundle runs is in ``tests/engines/test_resume.py``; these tests
are the small, direct ones.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import EarlyStopHandler

from medfusion.apps.bundle import bundle_workflow, evaluate_bundle, train_bundle
from medfusion.engines.checkpoint import AtomicCheckpointSaver, ValidationState, prepare_run_dir
from medfusion.engines.record import RunRecord, load_model

ROOT = Path(__file__).resolve().parents[1]
BRATS = ROOT / "bundles" / "brats_metakd"
CLINICAL = ROOT / "bundles" / "clinical_fusion"


@pytest.fixture(scope="module")
def cohort(brats_cohort) -> Path:
    return brats_cohort(5, 16, 2)


def _train(cohort: Path, work: Path, **overrides) -> None:
    """One tiny BraTS bundle epoch on [flair, t1ce] (16^3 volumes, 8-channel UNet)."""
    train_bundle(
        BRATS,
        {
            "dataset_dir": str(cohort), "ckpt_dir": str(work / "models"), "output_dir": str(work / "runs"),
            "modalities": ["flair", "t1ce"], "max_epochs": 1, "roi_size": [16, 16, 16], "batch_size": 2,
            "num_workers": 0, "split_counts": {"meta_val": 0.2, "val": 0.2, "test": 0.2},
            "method#meta_interval": 1, "method#meta_steps": 1, "network_def#channels": [8, 16, 32, 64],
            **overrides,
        },
    )  # fmt: skip


def _cause(kind: type[BaseException], pattern: str, fn, *args, **kwargs) -> BaseException:
    """Run ``fn`` and return the error of type ``kind`` in its cause chain (MONAI wraps errors raised by a
    config expression in ``RuntimeError("Failed to evaluate ...")``; the CLI prints ours as the cause)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, kind):
        err = err.__cause__
    assert err is not None, f"no {kind.__name__} in the cause chain of {info.value!r}"
    assert re.search(pattern, str(err)), f"{pattern!r} not in {err}"
    assert "\n" not in str(err)
    return err


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("run")
    _train(cohort, work)
    return work


# ------------------------------------------------------------------------- 1. the best model after a resume
def _validation(tmp_path):
    evaluator = SimpleNamespace(state=SimpleNamespace(best_metric=-1, best_metric_epoch=-1))
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"x": torch.nn.Linear(1, 1)}, save_key_metric=True,
        key_metric_filename="model.pt",
    )  # fmt: skip
    stop = EarlyStopHandler(patience=3, score_function=lambda e: 0.0)
    stop.set_trainer(Engine(lambda e, b: None))
    return evaluator, saver, stop, ValidationState(evaluator, [saver, stop])


def test_validation_state_round_trip_keeps_best_score_and_early_stop_counter(tmp_path):
    evaluator, saver, stop, state = _validation(tmp_path / "a")
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.8, 3
    saver._key_metric_checkpoint.load_state_dict({"_saved": [(0.8, "checkpoint_key_metric=0.8000.pt")]})
    stop._handler.counter, stop._handler.best_score = 2, 0.8
    saved = state.state_dict()

    evaluator2, saver2, stop2, state2 = _validation(tmp_path / "b")
    state2.load_state_dict(saved)
    assert (evaluator2.state.best_metric, evaluator2.state.best_metric_epoch) == (0.8, 3)
    assert [tuple(i) for i in saver2._key_metric_checkpoint._saved] == [(0.8, "checkpoint_key_metric=0.8000.pt")]
    # a worse score after the resume is not a new best: model.pt is not rewritten
    assert not saver2._key_metric_checkpoint._compare_fn(0.5)
    assert (stop2._handler.counter, stop2._handler.best_score) == (2, 0.8)


def test_validation_state_refuses_handler_states_it_cannot_place(tmp_path):
    evaluator, saver, stop, state = _validation(tmp_path)
    saved = state.state_dict()
    with pytest.raises(ValueError, match="validation handler states"):
        ValidationState(evaluator, [stop]).load_state_dict(saved)


# ------------------------------------------------------------------------- 2. a run folder belongs to one run
def test_every_checkpoint_holds_the_run_record(trained):
    for name in ("model.pt", "last_checkpoint_epoch=1.pt"):
        record = torch.load(trained / "models" / name, weights_only=True)["record"]
        assert record["modalities"] == ["flair", "t1ce"] and record["method"] == "metakd" and record["seed"] == 0
        assert len(record["config_hash"]) == 16 and '"learning_rate": 0.0002' in record["config"]
        assert record["model"]["network"]["channels"] == [8, 16, 32, 64]
        assert record["model"]["bundle_version"] == "0.1.0"


def test_training_into_another_runs_folder_is_refused_unless_resume_or_overwrite(cohort, trained, tmp_path):
    work = tmp_path / "w"
    (work / "models").mkdir(parents=True)
    for f in (trained / "models").iterdir():
        (work / "models" / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in (work / "models").iterdir()}
    refused = r"models already holds a run .*--resume True .*--overwrite True"
    _cause(FileExistsError, refused, _train, cohort, work, seed=1)
    assert {f.name: f.read_bytes() for f in (work / "models").iterdir()} == before  # nothing touched
    # resuming with a changed configuration names what changed
    seed = r"another run's checkpoint \(seed 0 in the checkpoint, 1 now; config seed: 0 -> 1"
    _cause(ValueError, seed, _train, cohort, work, seed=1, resume=True)
    lr = r"config learning_rate: 0.0002 -> 0.001\)"
    _cause(ValueError, lr, _train, cohort, work, learning_rate=0.001, resume=True)
    # overwrite replaces the run: the old run's files are gone, the new record is written
    (work / "models" / "last_checkpoint_epoch=7.pt").write_bytes(before["last_checkpoint_epoch=1.pt"])
    _train(cohort, work, seed=1, overwrite=True)
    assert sorted(f.name for f in (work / "models").iterdir()) == ["last_checkpoint_epoch=1.pt", "model.pt"]
    assert torch.load(work / "models" / "model.pt", weights_only=True)["record"]["seed"] == 1


def test_prepare_run_dir_rules(tmp_path):
    assert prepare_run_dir(tmp_path / "new").is_dir()
    (tmp_path / "new" / "sub").mkdir()  # another config's own folder (e.g. models/meta_fusion_regression)
    prepare_run_dir(tmp_path / "new")
    (tmp_path / "new" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        prepare_run_dir(tmp_path / "new", resume="false")
    (tmp_path / "new" / "model.pt").write_bytes(b"x")
    prepare_run_dir(tmp_path / "new", overwrite="True")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["notes.txt", "sub"]  # only run files removed
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        prepare_run_dir(tmp_path / "new", resume=True, overwrite=True)


@pytest.mark.parametrize(
    "bundle, configs",
    [
        (BRATS, ["train.json"]), (BRATS, ["train.json", "multi_gpu_train.json"]), (CLINICAL, ["train.json"]),
        (CLINICAL, ["train.json", "multi_gpu_train.json"]), (CLINICAL, ["train.json", "meta_fusion.json"]),
        (CLINICAL, ["train.json", "meta_fusion.json", "multi_gpu_train.json", "meta_fusion_multi_gpu.json"]),
    ],
)  # fmt: skip
def test_every_training_config_checks_its_folder_and_records_the_run(bundle, configs):
    wf = bundle_workflow(bundle, configs, "train")
    run = " ".join(wf.parser["run"])
    assert "overwrite=@overwrite" in run and "record=@run_record" in run
    assert wf.parser["overwrite"] is False and "validation" in wf.parser["checkpoint_objects"]
    savers = [h for h in wf.parser["validate#handlers"] if isinstance(h, dict) and "save_dict" in h]
    assert [h["save_dict"]["record"] for h in savers] == ["@run_record"]


# ------------------------------------------------------------------------- 3. a model knows what it was trained on
def test_evaluation_inference_and_encoders_refuse_other_modalities(cohort, trained, tmp_path):
    from medfusion.apps.export import load_encoder

    ckpt = trained / "models" / "model.pt"
    asked = r"trained on \[flair, t1ce\], asked for \[t1, t2\]"
    _cause(
        ValueError, asked, evaluate_bundle, BRATS, cohort, tmp_path / "eval", checkpoint=ckpt,
        modalities=["t1", "t2"], roi_size=[16, 16, 16], hd95=False,
        extra_overrides={"network_def#channels": [8, 16, 32, 64]},
    )  # fmt: skip
    assert not (tmp_path / "eval").exists()
    wf = bundle_workflow(
        BRATS, ["inference.json"], "infer",
        {"dataset_dir": str(cohort), "ckpt_path": str(ckpt), "output_dir": str(tmp_path / "pred"),
         "modalities": ["t1", "t2"], "roi_size": [16, 16, 16], "network_def#channels": [8, 16, 32, 64]},
    )  # fmt: skip
    wf.initialize()
    _cause(ValueError, asked, wf.run)
    assert not list((tmp_path / "pred").glob("**/*.nii.gz"))
    overrides = {"network_def#channels": [8, 16, 32, 64]}
    with pytest.raises(ValueError, match=asked):
        load_encoder(BRATS, "t1", checkpoint=ckpt, overrides={**overrides, "modalities": ["t1", "t2"]})
    with pytest.raises(ValueError, match=r"trained on \[flair, t1ce\], asked for \[t1ce, flair\]"):
        load_encoder(BRATS, "t1ce", checkpoint=ckpt, overrides={**overrides, "modalities": ["t1ce", "flair"]})
    encoder, _ = load_encoder(BRATS, "t1ce", checkpoint=ckpt, overrides={**overrides, "modalities": ["flair", "t1ce"]})
    assert encoder is not None


def test_export_records_what_the_encoder_was_trained_on(trained, tmp_path):
    from medfusion.apps.export import export_encoder, load_exported_encoder

    out = export_encoder(
        BRATS, "flair", tmp_path / "flair.ts", checkpoint=trained / "models" / "model.pt",
        overrides={"network_def#channels": [8, 16, 32, 64], "modalities": ["flair", "t1ce"]}, example_size=16,
    )  # fmt: skip
    info = load_exported_encoder(out)[1]
    assert info["source"]["trained_on"]["modalities"] == ["flair", "t1ce"]
    assert info["source"]["trained_on"]["network"]["channels"] == [8, 16, 32, 64]


def _classifier_checkpoint(path: Path, modalities: list[str], record: bool = True) -> torch.nn.Module:
    net = torch.nn.Linear(3, 2)
    ckpt = {"model": net.state_dict()}
    if record:
        model = {"modalities": modalities, "head": "qmf", "head_kwargs": {}, "inputs": {"image_size": 32}}
        ckpt["record"] = RunRecord(0, modalities, "qmf", model, config={"lr": 1}).state_dict()
    torch.save(ckpt, path)
    return net


def test_a_reversed_modality_order_or_another_input_size_is_refused(tmp_path):
    net = _classifier_checkpoint(tmp_path / "model.pt", ["ehr", "cxr", "report"])
    expected = {"modalities": ["ehr", "cxr", "report"], "head": "qmf", "inputs": {"image_size": 32}}
    load_model(tmp_path / "model.pt", net, expected)
    with pytest.raises(ValueError, match=r"trained on \[ehr, cxr, report\], asked for \[report, cxr, ehr\]"):
        load_model(tmp_path / "model.pt", net, {**expected, "modalities": ["report", "cxr", "ehr"]})
    with pytest.raises(ValueError, match=r"inputs#image_size: trained with 32, asked for 64"):
        load_model(tmp_path / "model.pt", net, {**expected, "inputs": {"image_size": 64}})
    with pytest.raises(ValueError, match=r"head: trained with qmf, asked for late"):
        load_model(tmp_path / "model.pt", net, {**expected, "head": "late"})


def test_old_checkpoints_load_with_a_warning_and_bad_files_fail_in_one_line(tmp_path, caplog):
    net = _classifier_checkpoint(tmp_path / "old.pt", ["ehr", "cxr"], record=False)
    with caplog.at_level(logging.WARNING):
        load_model(tmp_path / "old.pt", net, {"modalities": ["cxr", "ehr"]})
    assert "has no record of what it was trained on" in caplog.text
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is empty"):
        load_model(tmp_path / "empty.pt", net)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint .*bad.pt cannot be read \(") as err:
        load_model(tmp_path / "bad.pt", net)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"does not fit the configured network: 1 of other shape"):
        load_model(tmp_path / "old.pt", torch.nn.Linear(4, 2))


# ------------------------------------------------------------------------- 4. results never overwritten without asking
def _listing(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_medfusion_evaluate_refuses_a_results_folder_unless_overwrite(cohort, trained, tmp_path, capsys):
    from medfusion.cli import main

    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.md").write_text("an earlier evaluation")
    argv = [
        "evaluate", "--bundle", str(BRATS), "--dataset_dir", str(cohort), "--output_dir", str(out),
        "--checkpoint", str(trained / "models" / "model.pt"), "--roi_size", "16", "16", "16", "--no_hd95",
        "--combinations", "flair+t1ce", "--modalities", "flair", "t1ce",
        "--override", "network_def#channels=[8,16,32,64]",
    ]  # fmt: skip
    assert main(argv) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert _listing(out) == {"summary.md": b"an earlier evaluation"}
    # a failing evaluation with --overwrite leaves the old results as they were, and no partial folder
    assert main([*argv[:-1], "network_def#channels=[4,8,16,32]", "--overwrite"]) == 2
    assert "does not match the configuration: network#channels" in capsys.readouterr().err
    assert _listing(out) == {"summary.md": b"an earlier evaluation"}
    assert main([*argv, "--overwrite"]) == 0
    assert "an earlier evaluation" not in (out / "summary.md").read_text()
    assert {"per_case.csv", "summary.csv", "summary.md", "evaluation.json"} <= set(_listing(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporary folder left beside it


def test_bundle_inference_refuses_a_results_folder_unless_overwrite(cohort, trained, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    (out / "old_seg.nii.gz").write_bytes(b"old")
    overrides = {
        "dataset_dir": str(cohort), "ckpt_path": str(trained / "models" / "model.pt"), "output_dir": str(out),
        "modalities": ["flair", "t1ce"], "roi_size": [16, 16, 16], "network_def#channels": [8, 16, 32, 64],
    }  # fmt: skip

    def infer(**extra):
        wf = bundle_workflow(BRATS, ["inference.json"], "infer", {**overrides, **extra})
        wf.initialize()
        wf.run()

    _cause(FileExistsError, r"pred already holds files; pass --overwrite", infer)
    assert _listing(out) == {"old_seg.nii.gz": b"old"}
    infer(overwrite=True)
    written = sorted(_listing(out))
    assert "old_seg.nii.gz" not in written and len(written) == 5 and all(n.endswith("_seg.nii.gz") for n in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]


def test_results_folder_is_all_or_nothing(tmp_path):
    from medfusion.evaluation.report import ResultsFolder

    out = tmp_path / "results"
    folder = ResultsFolder(out)
    folder.run(lambda: (Path(folder.path) / "a.csv").write_text("1"))
    assert _listing(out) == {"a.csv": b"1"}
    with pytest.raises(FileExistsError, match="already holds files"):
        ResultsFolder(out)
    again = ResultsFolder(out, overwrite="true")

    def fail():
        (Path(again.path) / "half.csv").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        again.run(fail)
    assert _listing(out) == {"a.csv": b"1"} and sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    again.run(lambda: (Path(again.path) / "b.csv").write_text("2"))
    assert _listing(out) == {"b.csv": b"2"}  # the old run's files are gone with the old folder


def test_results_folder_never_replaces_the_checkpoint_it_evaluates(tmp_path):
    from medfusion.evaluation.report import ResultsFolder

    with pytest.raises(ValueError, match=r"output folder .*models holds .*model.pt"):
        ResultsFolder(tmp_path / "models", overwrite=True, protect=[tmp_path / "models" / "model.pt"])
    with pytest.raises(ValueError, match="which the results would replace"):
        ResultsFolder(tmp_path, overwrite=True, protect=[tmp_path / "models"])


# ------------------------------------------------------------------------- also: Meta Fusion configs
def test_meta_fusion_regression_config_writes_one_run_per_folder(latent_table, tmp_path):
    ov = {
        "table": str(latent_table), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "runs"),
        "meta_fusion_kwargs": {"epochs": 3, "hidden": [8], "batch_size": 0, "rho_grid": [0.0], "seed": 0},
        "meta_fusion_grids": {"m1": ["null", "identity"], "m2": ["null", "identity"]},
        "eval_combinations": ["m1+m2"],
    }  # fmt: skip

    def run(**extra):
        wf = bundle_workflow(CLINICAL, ["meta_fusion_regression.json"], "train", {**ov, **extra})
        wf.initialize()
        wf.run()

    run()
    first = _listing(tmp_path / "models")
    _cause(FileExistsError, r"runs already holds files; pass --overwrite", run)
    _cause(FileExistsError, r"models already holds a run .*--overwrite True", run, output_dir=str(tmp_path / "r2"))
    assert _listing(tmp_path / "models") == first and not (tmp_path / "r2").exists()
    (tmp_path / "runs" / "stale.csv").write_text("from another run")
    run(overwrite=True, meta_fusion_kwargs={**ov["meta_fusion_kwargs"], "seed": 1})
    assert "stale.csv" not in _listing(tmp_path / "runs") and "metrics.csv" in _listing(tmp_path / "runs")
    assert sorted(_listing(tmp_path / "models")) == sorted(first)
    # evaluate-only (--run_id evaluate) refuses the results folder too; output_dir may not hold the checkpoints
    _cause(FileExistsError, r"runs already holds files", run, run_id="evaluate")
    _cause(ValueError, r"which the results would replace", run, output_dir=str(tmp_path / "models"), overwrite=True)
    assert sorted(_listing(tmp_path / "models")) == sorted(first)
