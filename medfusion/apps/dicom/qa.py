"""The QA picture of one case: axial, coronal and sagittal slices through the tumour with one contour per region."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["REGION_COLORS", "tumour_center", "save_qa_png"]

#: Contour colour per region (matplotlib names).
REGION_COLORS: dict[str, str] = {"WT": "lime", "TC": "gold", "ET": "red", "NCR": "gold", "ED": "lime"}


def tumour_center(mask: np.ndarray) -> tuple[int, ...] | None:
    """Voxel index of the centre of mass of ``mask`` (rounded), ``None`` when it is empty."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    return tuple(int(round(v)) for v in idx.mean(axis=0))


def save_qa_png(
    image: np.ndarray,
    regions: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    title: str,
    path: str | os.PathLike,
    background: str = "",
) -> tuple[int, int, int]:
    """Write a 1x3 PNG (axial, coronal, sagittal) through the tumour's centre with region contours.

    Args:
        image: background volume ``[X, Y, Z]`` in RAS orientation (e.g. FLAIR).
        regions: region name -> bool ``[X, Y, Z]`` (drawn in this order; the first one, WT, picks the slices).
        spacing: voxel size (mm) along X, Y, Z (keeps the aspect ratio).
        title: figure title (the modality combination used goes here).
        path: output ``.png``.
        background: name of the background modality (shown under the title).

    Returns:
        The ``(x, y, z)`` voxel the slices go through (the volume centre when nothing was segmented).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    union = np.zeros(image.shape, dtype=bool)
    for mask in regions.values():
        union |= mask.astype(bool)
    center = tumour_center(union)
    empty = center is None
    x, y, z = center if center is not None else tuple(s // 2 for s in image.shape)
    sx, sy, sz = (float(s) for s in spacing)
    # radiological display: the patient's right on the viewer's left (RAS x flipped), anterior/superior up
    views = [
        (f"axial z={z}", lambda a: a[::-1, :, z].T, (sx * image.shape[0], sy * image.shape[1])),
        (f"coronal y={y}", lambda a: a[::-1, y, :].T, (sx * image.shape[0], sz * image.shape[2])),
        (f"sagittal x={x}", lambda a: a[x, :, :].T, (sy * image.shape[1], sz * image.shape[2])),
    ]
    finite = image[np.isfinite(image)]
    nonzero = finite[finite != 0]
    vmin, vmax = np.percentile(nonzero if nonzero.size else finite, [1, 99]) if finite.size else (0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (name, cut, (w, h)) in zip(axes, views):
        ax.imshow(cut(image), cmap="gray", origin="lower", extent=(0, w, 0, h), vmin=vmin, vmax=vmax)
        for region, mask in regions.items():
            plane = cut(mask.astype(np.float32))
            if plane.any():
                ax.contour(plane, levels=[0.5], colors=REGION_COLORS.get(region, "cyan"), linewidths=1.0,
                           origin="lower", extent=(0, w, 0, h))  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Line2D([0], [0], color=REGION_COLORS.get(r, "cyan"), label=r) for r in regions]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    sub = f"background: {background}" if background else ""
    if empty:
        sub += ("; " if sub else "") + "no tumour predicted (slices through the centre)"
    fig.suptitle(title + (f"\n{sub}" if sub else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return int(x), int(y), int(z)
