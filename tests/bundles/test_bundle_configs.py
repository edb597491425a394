"""The two bundles' configs read alike (issue #13.5): the same handler order, evaluation and data settings as
``_target_`` components with named arguments, and a ``run`` that names what it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfusion.apps.bundle import bundle_workflow

ROOT = Path(__file__).resolve().parents[2]
BRATS = ROOT / "bundles" / "brats_metakd"
CLINICAL = ROOT / "bundles" / "clinical_fusion"


def _raw(bundle: Path, configs: list[str], key: str):
    return bundle_workflow(bundle, configs, "train" if configs[0] == "train.json" else "infer").parser[key]


def _targets(handlers: list) -> list[str]:
    return [h["_target_"] if isinstance(h, dict) else h for h in handlers]


@pytest.mark.parametrize(
    ("configs", "key", "clinical_only"),
    [
        (["train.json"], "train#handlers", []),
        (["train.json"], "validate#handlers", ["@validate#early_stop"]),
        (["inference.json"], "handlers", ["medfusion.apps.clinical_bundle.PredictionWriter"]),
        (
            ["inference.json", "router_inference.json"],
            "handlers",
            ["medfusion.apps.clinical_bundle.PredictionWriter"],
        ),
    ],
)
def test_handler_order_is_the_same_in_both_bundles(configs, key, clinical_only):
    brats = _targets(_raw(BRATS, configs, key))
    clinical = _targets(_raw(CLINICAL, configs, key))
    assert [t for t in clinical if t not in clinical_only] == brats
    assert len(clinical) == len(brats) + len(clinical_only)


@pytest.mark.parametrize(
    ("bundle", "configs", "target"),
    [
        (CLINICAL, ["train.json", "evaluate.json"], "ClassificationEvaluation"),
        (CLINICAL, ["train.json", "evaluate.json", "router_evaluate.json"], "ClassificationEvaluation"),
        (BRATS, ["train.json", "evaluate.json"], "SegmentationEvaluation"),
        (BRATS, ["train.json", "evaluate.json", "router_evaluate.json"], "SegmentationEvaluation"),
    ],
)
def test_evaluation_run_is_a_component_with_named_arguments(bundle, configs, target):
    wf = bundle_workflow(bundle, configs, "train")
    assert wf.parser["run"] == ["$@evaluation.run()"]
    evaluation = wf.parser["evaluation"]
    assert evaluation["_target_"] == f"medfusion.apps.bundle.{target}"
    assert evaluation["results"] == "@eval_results" and evaluation["network"] == "@network"
    assert wf.parser["eval_results"]["_target_"] == "medfusion.evaluation.report.ResultsFolder"
    assert wf.parser["eval_results"]["protect"] == ["@ckpt_path"]


@pytest.mark.parametrize("config", ["train.json", "inference.json", "evaluate.json"])
def test_clinical_data_settings_are_components(config):
    configs = ["train.json", config] if config == "evaluate.json" else [config]
    wf = bundle_workflow(CLINICAL, configs, "train" if config != "inference.json" else "infer")
    raw = wf.parser.get()
    for key in ("kinds", "tabular_sizes", "network_encoders"):
        assert isinstance(raw[key], dict) and "_target_" in raw[key], key
    assert raw["network_def"]["encoders"] == "@network_encoders"
    text = str(raw)
    for name in ("resolve_kinds(", "tabular_sizes(", "select_encoders(", "clinical_preprocessing("):
        assert name not in text, f"{config} still calls {name} in an expression"


@pytest.mark.parametrize("configs", [["train.json"], ["inference.json"], ["train.json", "evaluate.json"]])
def test_brats_preprocessing_is_a_component(configs):
    wf = bundle_workflow(BRATS, configs, "infer" if configs == ["inference.json"] else "train")
    text = str(wf.parser.get())
    assert "brats_transforms(" not in text and "ResultsFolder(" not in text
    assert "'_target_': 'medfusion.data.volume.brats_transforms'" in text
