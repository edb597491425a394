"""Run a medfusion MONAI bundle from Python, and the evaluation components of the bundles' ``evaluate.json``.

:func:`bundle_workflow` does what ``python -m monai.bundle run`` does, via ``ConfigWorkflow``.
``medfusion evaluate`` and ``make demo`` use these so the CLI, the demo and the bundle commands
execute the very same configs. :class:`ClassificationEvaluation` (``clinical_fusion``) and
:class:`SegmentationEvaluation` (``brats_metakd``) are the ``"evaluation"`` components whose ``run()`` is the
``run`` of ``evaluate.json`` / ``router_evaluate.json``: every setting is a named argument in the config.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from monai.bundle import ConfigWorkflow

if TYPE_CHECKING:
    import torch

    from medfusion.evaluation.report import ResultsFolder

__all__ = [
    "bundle_workflow",
    "run_bundle",
    "train_bundle",
    "evaluate_bundle",
    "read_summary",
    "torchrun_command",
    "ClassificationEvaluation",
    "SegmentationEvaluation",
]

logger = logging.getLogger(__name__)


def bundle_workflow(
    bundle_dir: str | Path,
    configs: Sequence[str],
    workflow_type: str = "train",
    overrides: Mapping[str, Any] | None = None,
) -> ConfigWorkflow:
    """Build (not yet run) a ``ConfigWorkflow`` from ``<bundle_dir>/configs/<name>`` files.

    Args:
        bundle_dir: the bundle folder.
        configs: config file names merged in order, e.g. ``["train.json", "evaluate.json"]``.
        workflow_type: ``"train"`` or ``"infer"`` (MONAI's property set to check).
        overrides: ``{id: value}`` overrides (``"train#trainer#max_epochs": 2``).

    Raises:
        FileNotFoundError: a config file does not exist (the message names it).
    """
    root = Path(bundle_dir)
    files = [root / "configs" / c for c in configs]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"bundle config {f} does not exist.")
    kwargs = {"bundle_root": str(root)}
    kwargs.update({k: v for k, v in (overrides or {}).items()})
    wf = ConfigWorkflow(
        config_file=[str(f) for f in files] if len(files) > 1 else str(files[0]),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **kwargs,
    )
    return wf


def _run(wf: ConfigWorkflow) -> None:
    wf.initialize()
    wf.run()
    wf.finalize()


def run_bundle(
    bundle_dir: str | Path,
    configs: Sequence[str],
    workflow_type: str = "train",
    overrides: Mapping[str, Any] | None = None,
) -> ConfigWorkflow:
    """Build (arguments as :func:`bundle_workflow`), initialise, run and finalise a bundle workflow.

    What ``python -m monai.bundle run`` does, from Python, e.g.
    ``run_bundle(bundle, ["inference.json", "router_inference.json"], "infer", {"routing_file": ...})``.

    Returns:
        The finished workflow (``wf.parser`` holds every resolved component).
    """
    wf = bundle_workflow(bundle_dir, configs, workflow_type, overrides)
    _run(wf)
    return wf


def train_bundle(bundle_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> ConfigWorkflow:
    """Train with ``configs/train.json`` (+ overrides); returns the finished workflow."""
    return run_bundle(bundle_dir, ["train.json"], "train", overrides)


def evaluate_bundle(
    bundle_dir: str | Path,
    dataset_dir: str | Path,
    output_dir: str | Path,
    checkpoint: str | Path | None = None,
    combinations: Sequence[str] | None = None,
    roi_size: Sequence[int] | None = None,
    cached: bool = True,
    hd95: bool = True,
    device: str | None = None,
    split: str = "all",
    extra_overrides: Mapping[str, Any] | None = None,
    modalities: Sequence[str] | None = None,
    overwrite: bool = False,
) -> str:
    """Evaluate a trained bundle on every modality combination of ``dataset_dir``.

    Runs ``configs/train.json`` + ``configs/evaluate.json`` with the given overrides.

    Args:
        bundle_dir: bundle folder.
        dataset_dir: dataset folder (any supported layout) or volume manifest CSV.
        output_dir: where ``per_case.csv``, ``summary.md``, ``summary.csv`` and ``heatmap.png`` go.
        checkpoint: checkpoint path (default ``<bundle>/models/model.pt``).
        combinations: names such as ``["flair+t1ce", "t1"]`` (default: all).
        roi_size: sliding-window size (default: the bundle's).
        cached: shared per-modality encoding across combinations.
        hd95: compute HD95.
        device: ``"cpu"``, ``"cuda"`` ... (default: automatic).
        split: ``"all"`` (every case of ``dataset_dir``) or a split name of the bundle (``"test"``).
        extra_overrides: any further config overrides (``{"label_convention": "brats2015"}``, network settings).
        modalities: the model's modality names in training order (default: the bundle's ``modalities``).
        overwrite: replace a non-empty ``output_dir`` (otherwise refused). Results are written to a hidden
            sibling folder and renamed into place when complete (all or nothing).

    Returns:
        The markdown summary table.

    Raises:
        FileExistsError: ``output_dir`` holds files and not ``overwrite``.
        ValueError: the checkpoint was trained on other modalities/settings than asked for (one line).
    """
    overrides: dict[str, Any] = {
        "dataset_dir": str(dataset_dir),
        "eval_output_dir": str(output_dir),
        "eval_split": split,
        "eval_cached": cached,
        "eval_hd95": hd95,
        "overwrite": bool(overwrite),
    }
    if checkpoint is not None:
        overrides["ckpt_path"] = str(checkpoint)
    if combinations:
        overrides["eval_combinations"] = list(combinations)
    if roi_size is not None:
        overrides["roi_size"] = [int(r) for r in roi_size]
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    if modalities:
        overrides["modalities"] = [str(m) for m in modalities]
    overrides.update(extra_overrides or {})
    wf = bundle_workflow(bundle_dir, ["train.json", "evaluate.json"], "train", overrides)
    _run(wf)
    summary = Path(output_dir) / "summary.md"
    if not summary.is_file():
        raise FileNotFoundError(f"evaluation wrote no summary at {summary} (no case was evaluated).")
    return summary.read_text()


def read_summary(output_dir: str | Path) -> pd.DataFrame:
    """``summary.csv`` of an evaluation folder as a DataFrame indexed by combination."""
    return pd.read_csv(Path(output_dir) / "summary.csv", index_col=0)


def torchrun_command(
    bundle_dir: str | Path,
    configs: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    nproc_per_node: int = 2,
) -> list[str]:
    """The ``torchrun ... -m monai.bundle run`` command line for one machine (run it with ``cwd=bundle_dir``).

    Args:
        bundle_dir: the bundle folder.
        configs: config files merged in order, e.g. ``["train.json", "multi_gpu_train.json"]``.
        overrides: ``{id: value}``; strings are passed as they are (``"$..."`` expressions included), other
            values as Python literals, which is what the MONAI CLI (python-fire) parses.
        nproc_per_node: processes (GPUs) on this machine.

    Returns:
        The argument list for ``subprocess.run``.
    """
    root = Path(bundle_dir)
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={int(nproc_per_node)}", "-m", "monai.bundle", "run",
        "--config_file", files,
        "--bundle_root", str(root),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--logging_file", str(root / "configs" / "logging.conf"),
    ]  # fmt: skip
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return cmd


@dataclass(kw_only=True)
class _BundleEvaluation:
    """An evaluation written all or nothing into ``results`` (a :class:`~medfusion.evaluation.report.ResultsFolder`).

    ``results`` refuses a non-empty output folder unless ``overwrite`` when it is built; :meth:`run` writes
    into its hidden folder and publishes it only when the evaluation is complete. ``results=None``: nothing is
    written, :meth:`run` only returns the summary.
    """

    results: ResultsFolder | None

    @property
    def output_dir(self) -> str | None:
        """Where the files are written while the evaluation runs (``None``: nowhere)."""
        return self.results.path if self.results is not None else None

    def run(self) -> pd.DataFrame:
        """Evaluate into ``results.path``, then publish the folder; returns the summary table."""
        if self.results is None:
            return self._evaluate()
        summary: pd.DataFrame = self.results.run(self._evaluate)
        return summary

    def _evaluate(self) -> pd.DataFrame:
        raise NotImplementedError


@dataclass(kw_only=True)
class ClassificationEvaluation(_BundleEvaluation):
    """The ``"evaluation"`` of ``clinical_fusion``'s ``evaluate.json``: a classifier on every modality combination.

    :meth:`run` calls :func:`~medfusion.evaluation.classification.evaluate_classification` and then the
    method's extra outputs (:func:`~medfusion.apps.clinical_bundle.method_figures`, e.g. QMF's weight-vs-loss
    figure) into the results folder. Keyword arguments only (the config's named arguments).

    Args:
        results: where the files go (all or nothing; ``None``: no files, e.g. from :func:`medfusion.apps.api.evaluate`).
        network: the trained classifier (checkpoint already loaded).
        dataloader: the evaluated split's batches.
        modalities: the model's ordered modality names.
        method_name: the bundle's ``method_name`` (title of the summary; which extra outputs are written).
        combinations: combination names to evaluate (default all ``2^M - 1``).
        n_bootstrap: bootstrap resamples for the 95% CIs (0 = none).
        cached: encode once per batch and re-run only the head per combination (``False`` for a router).
        device: default automatic.
        progress: progress bar over the batches.
        seed: bootstrap seed.
        calibration_file: ``calibration.json`` from ``medfusion calibrate`` (per-combination temperatures).
        record: facts about the run written to ``evaluation.json``.
        threshold_loader: validation batches for the per-combination decision threshold (binary tasks).
        notes: paragraphs under the summary table (the split rule).
        figures: write the method's extra outputs when there is a results folder (``False`` for a router: it has
            no single method).
    """

    network: torch.nn.Module
    dataloader: Iterable[Mapping[str, Any]]
    modalities: Sequence[str]
    method_name: str
    combinations: Sequence[str] | None = None
    n_bootstrap: int = 200
    cached: bool = True
    device: str | torch.device | None = None
    progress: bool = True
    seed: int = 0
    calibration_file: str | Path | None = None
    record: Mapping[str, Any] | None = None
    threshold_loader: Iterable[Mapping[str, Any]] | None = None
    notes: Sequence[str] | None = None
    figures: bool = True

    def _evaluate(self) -> pd.DataFrame:
        from medfusion.apps.clinical_bundle import method_figures
        from medfusion.evaluation.calibration import load_temperatures
        from medfusion.evaluation.classification import evaluate_classification

        temperatures = load_temperatures(self.calibration_file, self.modalities) if self.calibration_file else None
        summary = evaluate_classification(
            self.network,
            self.dataloader,
            self.modalities,
            self.output_dir,
            combinations_to_run=self.combinations,
            n_bootstrap=self.n_bootstrap,
            cached=self.cached,
            device=self.device,
            progress=self.progress,
            title=f"AUROC per modality combination ({self.method_name})",
            seed=self.seed,
            temperatures=temperatures,
            record=self.record,
            threshold_loader=self.threshold_loader,
            notes=self.notes,
        )
        if self.figures and self.output_dir is not None:
            method_figures(
                self.method_name, self.network, self.dataloader, self.modalities, self.output_dir, device=self.device
            )
        return summary


@dataclass(kw_only=True)
class SegmentationEvaluation(_BundleEvaluation):
    """The ``"evaluation"`` of ``brats_metakd``'s ``evaluate.json``: a segmenter on every modality combination.

    :meth:`run` calls :func:`~medfusion.evaluation.segmentation.evaluate_segmentation` into the results folder.
    Keyword arguments only (the config's named arguments).

    Args:
        results: where the files go (all or nothing).
        network: the trained segmenter (checkpoint already loaded) or a router.
        data: the evaluated cases (datalist entries).
        modalities: the model's ordered modality names.
        combinations: combination names to evaluate (default all ``2^M - 1``).
        roi_size: sliding-window size.
        sw_batch_size: windows per forward pass.
        cached: shared per-modality encoding across combinations.
        hd95: compute HD95.
        amp: mixed precision (CUDA).
        device: default automatic.
        record: facts about the run written to ``evaluation.json``.
        crop_foreground: run the windows over the brain's bounding box only.
    """

    network: torch.nn.Module
    data: Sequence[Mapping[str, Any]]
    modalities: Sequence[str]
    combinations: Sequence[str] | None = None
    roi_size: Sequence[int] = (96, 96, 96)
    sw_batch_size: int = 1
    cached: bool = True
    hd95: bool = True
    amp: bool = False
    device: str | torch.device | None = None
    record: Mapping[str, Any] | None = None
    crop_foreground: bool = True

    def _evaluate(self) -> pd.DataFrame:
        from medfusion.evaluation.segmentation import evaluate_segmentation

        return evaluate_segmentation(
            self.network,
            self.data,
            self.modalities,
            self.output_dir,
            combinations_to_run=self.combinations,
            roi_size=self.roi_size,
            sw_batch_size=self.sw_batch_size,
            cached=self.cached,
            hd95=self.hd95,
            amp=self.amp,
            device=self.device,
            record=self.record,
            crop_foreground=self.crop_foreground,
        )
