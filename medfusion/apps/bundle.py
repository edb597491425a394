"""Run a medfusion MONAI bundle from Python (what ``python -m monai.bundle run`` does, via ``ConfigWorkflow``).

``medfusion evaluate`` and ``make demo`` use these so the CLI, the demo and the bundle commands
execute the very same configs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from monai.bundle import ConfigWorkflow

__all__ = ["bundle_workflow", "train_bundle", "evaluate_bundle", "read_summary", "torchrun_command"]

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


def train_bundle(bundle_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> ConfigWorkflow:
    """Train with ``configs/train.json`` (+ overrides); returns the finished workflow."""
    wf = bundle_workflow(bundle_dir, ["train.json"], "train", overrides)
    _run(wf)
    return wf


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
