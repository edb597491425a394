"""All-combination evaluation of a missing-modality segmenter (BraTS regions [TC, WT, ET]).

For every case and every modality combination available in it, the model predicts with only
that combination present; Dice (MONAI ``DiceMetric``) and HD95 (MONAI
``HausdorffDistanceMetric``) are computed per region, and ET a second time after the common
post-processing rule "fewer than ``et_min_voxels`` predicted ET voxels -> no ET".

Cached path (default): for each sliding window the model encodes every modality ONCE and decodes
all requested combinations from the shared features (:meth:`Segmenter.predict_combinations`), so
the windows are cut and encoded once instead of once per combination. By default the combinations
are also decoded together (``batch_combinations=True``, :meth:`Segmenter.decode_combinations`): the
layers that read the fused features run once per (modality, slot) pair and are mixed per
combination, the rest of the decoder runs with the combinations folded into the batch dimension in
chunks of at most ``memory_budget_gb``. The naive path (``cached=False``) runs one sliding-window
inference per combination; tests prove the three agree (``tests/evaluation/test_segmentation.py``).
Measured speed-ups: ``benchmarks/results/seg_eval_speed.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from tqdm.auto import tqdm

from medfusion.engines.utils import default_device
from medfusion.evaluation.report import write_record, write_reports
from medfusion.modality import Keys, combination_mask, combination_name, combinations, parse_combination
from medfusion.models.segmenter import DEFAULT_MEMORY_BUDGET_GB

__all__ = [
    "REGIONS",
    "SEG_METRICS",
    "predict_all_combinations",
    "segmentation_metrics",
    "evaluate_segmentation",
]

logger = logging.getLogger(__name__)

REGIONS: tuple[str, ...] = ("tc", "wt", "et")
SEG_METRICS: tuple[str, ...] = ("dice_tc", "dice_wt", "dice_et", "dice_et_pp", "hd95_tc", "hd95_wt", "hd95_et")
HD95_EMPTY = 373.13
"""HD95 when exactly one of prediction/ground truth is empty (the BraTS challenge's value: the
diagonal of the 240x240x155 volume); 0 when both are empty."""


def predict_all_combinations(
    model: torch.nn.Module,
    image: torch.Tensor,
    combination_masks: torch.Tensor,
    modality_mask: torch.Tensor | None = None,
    roi_size: Sequence[int] = (96, 96, 96),
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    cached: bool = True,
    amp: bool = False,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    batch_combinations: bool = True,
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
    progress: bool = False,
) -> torch.Tensor:
    """Sliding-window logits for several combinations of one case.

    Args:
        model: a :class:`~medfusion.models.segmenter.Segmenter` (or anything with
            ``predict_combinations`` for the cached path and ``forward(image, modality_mask)``).
        image: ``[1, M, D, H, W]``.
        combination_masks: bool ``[C, M]``.
        modality_mask: bool ``[1, M]`` availability (default all present).
        roi_size: sliding-window size (each dim a multiple of the model's divisor).
        sw_batch_size: windows per forward.
        overlap: window overlap.
        cached: encode once per window and decode all combinations (True) or one inference per
            combination (False).
        amp: autocast (CUDA only; ignored on CPU).
        sw_device: device of the windows / model.
        device: device where the stitched output is accumulated (``"cpu"`` saves GPU memory).
        batch_combinations: cached path only: decode the combinations of a window together (see the
            module doc) instead of one decoder call per combination.
        memory_budget_gb: cached batched path: decoder activations per chunk of combinations.
        progress: tqdm bars over the sliding windows (MONAI's ``progress``; all combinations of a window are
            computed together on the cached path) and, on the naive path, over the combinations.

    Returns:
        logits ``[C, out_channels, D, H, W]``.
    """
    n_comb = combination_masks.shape[0]
    if modality_mask is None:
        modality_mask = torch.ones(1, combination_masks.shape[1], dtype=torch.bool)
    modality_mask = modality_mask.to(image.device)
    use_amp = amp and torch.device(sw_device or image.device).type == "cuda"
    roi = tuple(int(r) for r in roi_size)  # windows larger than the image are padded by MONAI
    with torch.no_grad(), torch.autocast("cuda", enabled=use_amp):
        if cached:

            def predictor(x: torch.Tensor) -> torch.Tensor:
                return model.predict_combinations(
                    x,
                    combination_masks,
                    modality_mask,
                    batch_combinations=batch_combinations,
                    memory_budget_gb=memory_budget_gb,
                )

            out = sliding_window_inference(
                image,
                roi,
                sw_batch_size,
                predictor,
                overlap=overlap,
                mode="gaussian",
                sw_device=sw_device,
                device=device,
                progress=progress,
            )
            return out.reshape(n_comb, -1, *out.shape[2:]).float()
        outs = []
        for c in tqdm(range(n_comb), desc="combinations", unit="combination", leave=False, disable=not progress):
            mask = modality_mask & combination_masks[c : c + 1].to(modality_mask.device)
            outs.append(
                sliding_window_inference(
                    image,
                    roi,
                    sw_batch_size,
                    model,
                    overlap=overlap,
                    mode="gaussian",
                    sw_device=sw_device,
                    device=device,
                    modality_mask=mask,
                ).float()
            )
        return torch.cat(outs, dim=0)


def _hd95(pred: torch.Tensor, gt: torch.Tensor, metric: HausdorffDistanceMetric) -> list[float]:
    """HD95 per channel of ``[1, R, ...]`` boolean maps with the BraTS empty-mask convention."""
    vals = []
    for r in range(pred.shape[1]):
        p, g = pred[:, r : r + 1], gt[:, r : r + 1]
        p_empty, g_empty = not bool(p.any()), not bool(g.any())
        if p_empty and g_empty:
            vals.append(0.0)
        elif p_empty or g_empty:
            vals.append(HD95_EMPTY)
        else:
            vals.append(float(metric(p.float(), g.float()).reshape(-1)[0]))
    return vals


def segmentation_metrics(
    pred: torch.Tensor, label: torch.Tensor, et_min_voxels: int = 500, hd95: bool = True
) -> dict[str, float]:
    """Dice (and HD95) per region for one case and one combination.

    Args:
        pred: bool/0-1 ``[1, 3, D, H, W]`` in [TC, WT, ET] order.
        label: 0-1 ``[1, 3, D, H, W]``.
        et_min_voxels: ET post-processing threshold for ``dice_et_pp``.
        hd95: compute HD95 (slower at full size).

    Returns:
        ``{"dice_tc", "dice_wt", "dice_et", "dice_et_pp", "hd95_tc", "hd95_wt", "hd95_et"}``; Dice of
        an empty prediction against an empty label is 1 (BraTS convention, ``ignore_empty=False``).
    """
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    pred = pred.float()
    label = label.float()
    dice = dice_metric(pred, label).reshape(-1).tolist()
    et = pred[:, 2:3]
    et_pp = et if float(et.sum()) >= et_min_voxels else torch.zeros_like(et)
    dice_et_pp = float(dice_metric(et_pp, label[:, 2:3]).reshape(-1)[0])
    out = {"dice_tc": dice[0], "dice_wt": dice[1], "dice_et": dice[2], "dice_et_pp": dice_et_pp}
    if hd95:
        hd = _hd95(pred.bool(), label.bool(), HausdorffDistanceMetric(include_background=True, percentile=95))
        out.update({"hd95_tc": hd[0], "hd95_wt": hd[1], "hd95_et": hd[2]})
    else:
        out.update({"hd95_tc": math.nan, "hd95_wt": math.nan, "hd95_et": math.nan})
    return out


def evaluate_segmentation(
    model: torch.nn.Module,
    data: Sequence[Mapping[str, Any]],
    modalities: Sequence[str],
    output_dir: str | Path | None = None,
    combinations_to_run: Sequence[str] | None = None,
    transform: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    roi_size: Sequence[int] = (96, 96, 96),
    sw_batch_size: int = 1,
    overlap: float = 0.25,
    cached: bool = True,
    hd95: bool = True,
    et_min_voxels: int = 500,
    amp: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    title: str = "Dice per modality combination",
    record: Mapping[str, Any] | None = None,
    batch_combinations: bool = True,
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
) -> pd.DataFrame:
    """Evaluate a segmenter on every modality combination of every case.

    Args:
        model: the trained network (``Segmenter``).
        data: datalist entries (from :func:`medfusion.data.brats.discover_brats`) or already
            transformed samples with ``image`` [M, D, H, W], ``label`` [3, D, H, W] regions and
            ``modality_mask`` [M].
        modalities: the model's ordered modality names.
        output_dir: where ``per_case.csv``, ``summary.csv``, ``summary.md`` and ``heatmap.png`` go
            (nothing written when ``None``).
        combinations_to_run: combination names (default: all ``2^M - 1``).
        transform: applied to each entry (default: ``brats_transforms(modalities, "eval")``
            when entries hold file paths).
        roi_size: sliding-window size.
        sw_batch_size: windows per forward.
        overlap: window overlap.
        cached: shared per-modality encoding across combinations (see module doc).
        hd95: compute HD95.
        et_min_voxels: ET post-processing threshold.
        amp: autocast on CUDA.
        device: model device (default: CUDA when available).
        progress: tqdm bars: cases (with the case and its number of combinations) and, within a case, its
            sliding windows (so a full-size case of a minute is not silent).
        title: heading of the summary / heatmap.
        record: facts about the run written to ``evaluation.json`` (split, checkpoint, network keys;
            ``medfusion compare`` checks that compared runs share them).
        batch_combinations: cached path: decode the combinations of a window together (module doc).
        memory_budget_gb: cached batched path: decoder activation memory per chunk of combinations.

    Returns:
        The tidy per-(case, combination) table (``case_id``, ``combination``, ``n_modalities`` and
        :data:`SEG_METRICS`). Combinations needing a modality a case lacks are skipped for that case.

    Raises:
        ValueError: empty data, or a sample without a label.
    """
    if len(data) == 0:
        raise ValueError("evaluate_segmentation: no cases to evaluate.")
    dev = torch.device(device) if device is not None else default_device()
    combos = (
        [parse_combination(c, modalities) for c in combinations_to_run]
        if combinations_to_run
        else combinations(modalities)
    )
    masks = torch.stack([combination_mask(c, modalities) for c in combos])
    if transform is None and isinstance(data[0].get(Keys.IMAGE, None), torch.Tensor) is False:
        from medfusion.data.volume import brats_transforms

        transform = brats_transforms(modalities, mode="eval")
    model = model.to(dev).eval()
    rows: list[dict[str, Any]] = []
    bar = tqdm(data, desc="evaluate", unit="case", disable=not progress)
    for i, entry in enumerate(bar):
        sample = transform(entry) if transform is not None else entry
        case_id = str(sample.get(Keys.CASE_ID, entry.get(Keys.CASE_ID, i)))
        if Keys.LABEL not in sample:
            raise ValueError(f"evaluate_segmentation: case {case_id} has no label; evaluation needs the segmentation.")
        image = torch.as_tensor(sample[Keys.IMAGE]).float().unsqueeze(0).to(dev)
        label = torch.as_tensor(sample[Keys.LABEL]).unsqueeze(0).float()
        avail = torch.as_tensor(sample.get(Keys.MASK, torch.ones(len(modalities)))).bool().reshape(1, -1)
        keep = [j for j in range(len(combos)) if bool((masks[j] <= avail[0]).all())]
        if not keep:
            logger.warning("case %s: no requested combination is available; skipped", case_id)
            continue
        bar.set_postfix_str(f"{case_id}: {len(keep)} combinations")
        logits = predict_all_combinations(
            model,
            image,
            masks[keep],
            avail,
            roi_size,
            sw_batch_size,
            overlap,
            cached,
            amp,
            sw_device=dev,
            device=dev,
            batch_combinations=batch_combinations,
            memory_budget_gb=memory_budget_gb,
            progress=progress,
        ).cpu()
        for k, j in enumerate(keep):
            pred = logits[k : k + 1].sigmoid() > 0.5
            row: dict[str, Any] = {
                "case_id": case_id,
                "combination": combination_name(combos[j]),
                "n_modalities": len(combos[j]),
            }
            row.update(segmentation_metrics(pred, label, et_min_voxels=et_min_voxels, hd95=hd95))
            rows.append(row)
    per_case = pd.DataFrame(rows)
    if output_dir is not None and len(per_case):
        summary, md = write_reports(
            per_case,
            list(SEG_METRICS),
            modalities,
            output_dir,
            heatmap_metrics=["dice_tc", "dice_wt", "dice_et"],
            title=title,
        )
        write_record(output_dir, {**dict(record or {}), "task": "segmentation", "modalities": list(modalities)})
        logger.info("evaluation summary:\n%s", md)
    return per_case
