"""QA picture: slices through the tumour's centre, contours per region, combination in the title."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medfusion.apps.dicom.qa import save_qa_png, tumour_center


def test_slices_go_through_the_tumour_and_png_is_written(tmp_path):
    image = np.random.default_rng(0).normal(size=(24, 28, 20)).astype(np.float32)
    wt = np.zeros(image.shape, dtype=bool)
    wt[4:10, 16:24, 2:8] = True
    et = np.zeros_like(wt)
    et[6:8, 18:20, 4:6] = True
    path = tmp_path / "qa.png"
    center = save_qa_png(
        image, {"WT": wt, "TC": et, "ET": et}, (1.0, 1.0, 2.0), "combination: flair+t1ce", path, "flair"
    )
    assert center == (6, 20, 4) == tumour_center(wt)  # centre of mass, rounded half to even
    with Image.open(path) as png:
        assert png.size == (1200, 460)
        pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    # the contours are drawn: pure-ish red (ET) and green (WT) pixels exist
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 60) & (pixels[:, 2] < 60)).any()
    assert ((pixels[:, 1] > 200) & (pixels[:, 0] < 60) & (pixels[:, 2] < 60)).any()


def test_empty_prediction_uses_the_volume_centre(tmp_path):
    image = np.ones((10, 12, 8), dtype=np.float32)
    empty = np.zeros(image.shape, dtype=bool)
    assert tumour_center(empty) is None
    assert save_qa_png(image, {"WT": empty}, (1, 1, 1), "t", tmp_path / "qa.png") == (5, 6, 4)
    assert (tmp_path / "qa.png").stat().st_size > 0
