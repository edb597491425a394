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

Foreground crop (``crop_foreground=True``, the default here, in :class:`ForegroundCropInferer` and in the
BraTS bundle's ``eval_crop_foreground`` / ``crop_foreground`` keys): as nnU-Net does, the sliding windows
run only over the bounding box of the voxels where any modality is non-zero (:func:`foreground_box`) and
the prediction is pasted back into a full-size output whose voxels outside the box are background
(logit :data:`BACKGROUND_LOGIT`, sigmoid 0: no region). The transform chains set every voxel outside the
brain mask (given, or the non-zero region) to 0 (``ForegroundNormalized``), so the box is the brain's: a
240x240x155 BraTS volume needs 18 windows of 128^3 at overlap 0.25, its brain box typically 8. Inside the
box the network sees the same voxels, but the windows sit elsewhere (and instance normalisation sees less
background), so the logits there are close to, not identical with, the uncropped ones; the measured effect
on the real case is in ``benchmarks/results/seg_eval_speed_full_size.md``. A volume without zero
background (no brain mask given, not skull-stripped) has the whole volume as its box: nothing changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_dst_type
from tqdm.auto import tqdm

from medfusion.engines.utils import default_device
from medfusion.evaluation.report import write_record, write_reports
from medfusion.modality import Keys, combination_mask, combination_name, combinations, parse_combination
from medfusion.models.segmenter import DEFAULT_MEMORY_BUDGET_GB

__all__ = [
    "BACKGROUND_LOGIT",
    "ForegroundCropInferer",
    "REGIONS",
    "SEG_METRICS",
    "foreground_box",
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
BACKGROUND_LOGIT = -1.0e4
"""Logit written outside the foreground box (sigmoid 0 in float32 and float16: no region)."""


def foreground_box(image: torch.Tensor, margin: int = 0) -> tuple[slice, ...] | None:
    """Spatial bounding box of the voxels where any channel is non-zero (MONAI ``generate_spatial_bounding_box``).

    Args:
        image: ``[C, *S]`` (e.g. ``[M, D, H, W]``; a batch ``[B, C, *S]`` may be flattened to ``[B*C, *S]``).
        margin: voxels added on every side (clipped to the image).

    Returns:
        One ``slice`` per spatial dim, or ``None`` when there is nothing to crop: no non-zero voxel, or the box
        is the whole image.
    """
    start, end = generate_spatial_bounding_box(image, select_fn=lambda x: x != 0, margin=margin, allow_smaller=True)
    if all(e == 0 for e in end):
        return None
    if all(s == 0 and e == n for s, e, n in zip(start, end, image.shape[1:])):
        return None
    return tuple(slice(int(s), int(e)) for s, e in zip(start, end))


def _box_index(box: tuple[slice, ...]) -> tuple[slice, ...]:
    """Index of ``box`` in a ``[N, K, *spatial]`` tensor (all of the two leading dimensions)."""
    return (slice(None), slice(None), *box)


def _paste(inner: torch.Tensor, box: tuple[slice, ...], spatial: Sequence[int], fill: float | bool) -> torch.Tensor:
    """``[N, K, *spatial]`` filled with ``fill`` and ``inner`` ``[N, K, *box]`` written into ``box``."""
    out = torch.full((*inner.shape[:2], *spatial), fill, dtype=inner.dtype, device=inner.device)
    out[_box_index(box)] = inner
    return out


class ForegroundCropInferer(Inferer):
    """Any MONAI inferer run on the foreground box only; output pasted into the full volume (module doc).

    Args:
        inferer: the inner inferer (e.g. ``SlidingWindowInferer``).
        enabled: crop (``False``: the inner inferer on the whole input).
        margin: voxels added around the box.
        fill_value: output value outside the box (default :data:`BACKGROUND_LOGIT`).

    Call: ``inputs`` ``[B, C, *S]`` (the box is the union over the batch) and the network, extra arguments
    passed on (e.g. ``modality_mask``); returns ``[B, K, *S]``, a ``MetaTensor`` with the input's metadata
    (affine, applied operations, so ``Invertd`` works) when the input is one.
    """

    def __init__(
        self, inferer: Inferer, enabled: bool = True, margin: int = 0, fill_value: float = BACKGROUND_LOGIT
    ) -> None:
        super().__init__()
        self.inferer = inferer
        self.enabled = bool(enabled)
        self.margin = int(margin)
        self.fill_value = float(fill_value)

    def __getattr__(self, name: str) -> Any:
        """The inner inferer's attributes (``roi_size``, ``overlap``, ``mode``... as callers read them)."""
        inner = self.__dict__.get("inferer")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Inner inferer on ``inputs[..., box]``, pasted into ``[B, K, *S]`` (see the class doc)."""
        box = foreground_box(inputs.flatten(0, 1), self.margin) if self.enabled else None
        if box is None:
            return self.inferer(inputs, network, *args, **kwargs)
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        inner = self.inferer(plain[_box_index(box)], network, *args, **kwargs)
        inner = inner.as_tensor() if isinstance(inner, MetaTensor) else inner
        out = _paste(inner, box, inputs.shape[2:], self.fill_value)
        if isinstance(inputs, MetaTensor):
            out = convert_to_dst_type(out, inputs, device=out.device)[0]
        return out


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
    crop_foreground: bool = True,
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
        crop_foreground: windows only over :func:`foreground_box` of ``image``; :data:`BACKGROUND_LOGIT`
            outside it (module doc).

    Returns:
        logits ``[C, out_channels, D, H, W]`` (the input's full size also when cropped).
    """

    def windows(x: torch.Tensor) -> torch.Tensor:
        return _predict_windows(
            model,
            x,
            combination_masks,
            modality_mask,
            roi_size,
            sw_batch_size,
            overlap,
            cached,
            amp,
            sw_device=sw_device,
            device=device,
            batch_combinations=batch_combinations,
            memory_budget_gb=memory_budget_gb,
            progress=progress,
        )

    box = foreground_box(image[0]) if crop_foreground else None
    if box is None:
        return windows(image)
    return _paste(windows(image[_box_index(box)]), box, image.shape[2:], BACKGROUND_LOGIT)


def _predict_windows(
    model: torch.nn.Module,
    image: torch.Tensor,
    combination_masks: torch.Tensor,
    modality_mask: torch.Tensor | None,
    roi_size: Sequence[int],
    sw_batch_size: int,
    overlap: float,
    cached: bool,
    amp: bool,
    sw_device: torch.device | str | None,
    device: torch.device | str | None,
    batch_combinations: bool,
    memory_budget_gb: float,
    progress: bool,
) -> torch.Tensor:
    """:func:`predict_all_combinations` over the whole of ``image`` (same arguments, no crop)."""
    n_comb = combination_masks.shape[0]
    if modality_mask is None:
        modality_mask = torch.ones(1, combination_masks.shape[1], dtype=torch.bool)
    modality_mask = modality_mask.to(image.device)
    use_amp = amp and torch.device(sw_device or image.device).type == "cuda"
    roi = tuple(int(r) for r in roi_size)  # windows larger than the image are padded by MONAI
    with torch.no_grad(), torch.autocast("cuda", enabled=use_amp):
        if cached:

            def predictor(x: torch.Tensor) -> torch.Tensor:
                # ``model`` is duck-typed here: any module with a ``predict_combinations`` (docstring)
                return cast(Any, model).predict_combinations(
                    x,
                    combination_masks,
                    modality_mask,
                    batch_combinations=batch_combinations,
                    memory_budget_gb=memory_budget_gb,
                )

            out = cast(  # a tensor, as ``predictor`` returns one
                torch.Tensor,
                sliding_window_inference(
                    image,
                    roi,
                    sw_batch_size,
                    predictor,
                    overlap=overlap,
                    mode="gaussian",
                    sw_device=sw_device,
                    device=device,
                    progress=progress,
                ),
            )
            return out.reshape(n_comb, -1, *out.shape[2:]).float()
        outs = []
        for c in tqdm(range(n_comb), desc="combinations", unit="combination", leave=False, disable=not progress):
            mask = modality_mask & combination_masks[c : c + 1].to(modality_mask.device)
            logits = sliding_window_inference(
                image,
                roi,
                sw_batch_size,
                model,
                overlap=overlap,
                mode="gaussian",
                sw_device=sw_device,
                device=device,
                modality_mask=mask,
            )
            outs.append(cast(torch.Tensor, logits).float())  # the segmenter returns a tensor
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
            vals.append(float(cast(torch.Tensor, metric(p.float(), g.float())).reshape(-1)[0]))
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
    dice = cast(torch.Tensor, dice_metric(pred, label)).reshape(-1).tolist()
    et = pred[:, 2:3]
    et_pp = et if float(et.sum()) >= et_min_voxels else torch.zeros_like(et)
    dice_et_pp = float(cast(torch.Tensor, dice_metric(et_pp, label[:, 2:3])).reshape(-1)[0])
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
    crop_foreground: bool = True,
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
            ``medfusion compare`` checks that compared runs share them); ``crop_foreground`` is added.
        batch_combinations: cached path: decode the combinations of a window together (module doc).
        memory_budget_gb: cached batched path: decoder activation memory per chunk of combinations.
        crop_foreground: sliding windows only over the case's foreground box (:func:`foreground_box`; the
            prediction outside it is background, module doc). Default on: about half the windows of a
            full-size BraTS case, and the non-zero region of a normalised image is the brain. Only the box's
            logits are held (``[C, 3, *box]``); the metrics are computed on the box when the ground truth has
            no voxel outside it (same values: both maps are empty there), else on the full volume.

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
        box = foreground_box(image[0]) if crop_foreground else None
        logits = _predict_windows(
            model,
            image if box is None else image[_box_index(box)],
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
        if box is not None and int(label[_box_index(box)].count_nonzero()) == int(label.count_nonzero()):
            # prediction and ground truth both empty outside the box: metrics of the box = of the volume
            # (MONAI's HD95 crops to the union of both itself)
            label, box = label[_box_index(box)], None
        for k, j in enumerate(keep):
            pred = logits[k : k + 1].sigmoid() > 0.5
            if box is not None:  # ground truth outside the box: score the full volume
                pred = _paste(pred, box, image.shape[2:], False)
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
        write_record(
            output_dir,
            {
                **dict(record or {}),
                "task": "segmentation",
                "modalities": list(modalities),
                "crop_foreground": bool(crop_foreground),
            },
        )
        logger.info("evaluation summary:\n%s", md)
    return per_case
