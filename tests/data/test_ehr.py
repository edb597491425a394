from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medfusion.data.ehr import (
    EHR_CHANNELS,
    EHR_CONTINUOUS_COLUMNS,
    EHR_FEATURE_NAMES,
    EHR_NUM_FEATURES,
    DiscretizeEHR,
    DiscretizeEHRd,
    ehr_num_steps,
    fit_ehr_normalizer,
)

# column positions, hand-derived from the mimic3-benchmarks layout
CRR = 0  # Capillary refill rate one-hot [0:2]
DBP = 2
EYE = 4  # [4:12]
MOTOR = 12  # [12:24]
TOTAL = 24  # [24:37]
VERBAL = 37  # [37:49]
HR = 50
PH = 58
TEMP = 56
MASK = 59  # 17 masks [59:76]


def _write_csv(path, rows):
    header = ["Hours", *EHR_CHANNELS]
    lines = [",".join(header)]
    for hours, vals in rows:
        lines.append(",".join([str(hours)] + [vals.get(c, "") for c in EHR_CHANNELS]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def three_rows(tmp_path):
    return _write_csv(
        tmp_path / "10000032_episode1_timeseries.csv",
        [
            (0.5, {"Heart Rate": "80", "Glascow coma scale total": "10", "Capillary refill rate": "1.0"}),
            (1.0, {"Heart Rate": "90", "pH": "7.3"}),
            (2.5, {"Glascow coma scale eye opening": "None"}),
        ],
    )


def test_layout_constants():
    assert EHR_NUM_FEATURES == 76
    assert len(EHR_CHANNELS) == 17 and "Glascow coma scale total" in EHR_CHANNELS
    assert EHR_FEATURE_NAMES[HR] == "Heart Rate"
    assert EHR_FEATURE_NAMES[PH] == "pH"
    assert EHR_FEATURE_NAMES[TOTAL] == "Glascow coma scale total->11"
    assert EHR_FEATURE_NAMES[MASK] == "mask->Capillary refill rate"
    assert len(EHR_CONTINUOUS_COLUMNS) == 12
    assert ehr_num_steps(1.0) == 48 and ehr_num_steps(2.0) == 24 and ehr_num_steps(0.8) == 60


def test_hand_computed_values(three_rows):
    x = DiscretizeEHR(timestep=1.0, max_hours=4.0)(three_rows)
    assert x.dtype == torch.float32 and x.shape == (4, 76)
    x = x.numpy()
    # bins: 0.5 -> 0, 1.0 -> 0 (int(1/1 - eps) = 0), 2.5 -> 2
    # heart rate: 90 overwrites 80 in bin 0, then previous-value imputation
    np.testing.assert_allclose(x[:, HR], [90, 90, 90, 90])
    np.testing.assert_allclose(x[:, MASK + 8], [1, 0, 0, 0])
    # GCS total "10" is category 1 of ["11","10",...]; imputed forward
    for t in range(4):
        expected = np.zeros(13)
        expected[1] = 1
        np.testing.assert_array_equal(x[t, TOTAL : TOTAL + 13], expected)
    # capillary refill "1.0" -> second slot
    np.testing.assert_array_equal(x[:, CRR : CRR + 2], [[0, 1]] * 4)
    # eye opening: normal "4 Spontaneously" (index 3) until bin 2 where "None" (index 4) is observed
    assert x[0, EYE + 3] == 1 and x[1, EYE + 3] == 1 and x[0, EYE : EYE + 8].sum() == 1
    assert x[2, EYE + 4] == 1 and x[3, EYE + 4] == 1 and x[2, EYE : EYE + 8].sum() == 1
    np.testing.assert_array_equal(x[:, MASK + 3], [0, 0, 1, 0])
    # pH observed in bin 0; temperature never -> normal value 36.6, mask 0
    np.testing.assert_allclose(x[:, PH], [7.3] * 4, rtol=1e-6)
    np.testing.assert_allclose(x[:, TEMP], [36.6] * 4, rtol=1e-6)
    np.testing.assert_allclose(x[:, DBP], [59.0] * 4)
    # verbal / motor normal values: "5 Oriented" index 6, "6 Obeys Commands" index 9
    assert x[0, VERBAL + 6] == 1 and x[0, MOTOR + 9] == 1
    # bin 0 mask: CRR(0), GCS total(5), HR(8), pH(16)
    np.testing.assert_array_equal(np.nonzero(x[0, MASK:])[0], [0, 5, 8, 16])
    assert x[1, MASK:].sum() == 0 and x[3, MASK:].sum() == 0


def test_timestep_two_and_truncation(tmp_path):
    p = _write_csv(
        tmp_path / "a.csv",
        [(0.5, {"Heart Rate": "80"}), (2.5, {"Heart Rate": "100"}), (4.5, {"Heart Rate": "120"})],
    )
    x = DiscretizeEHR(timestep=2.0, max_hours=4.0)(p).numpy()
    assert x.shape == (2, 76)
    np.testing.assert_allclose(x[:, HR], [80, 100])  # the 4.5 h row is outside the window
    # 48 h default: T fixed even for a short stay
    assert DiscretizeEHR(timestep=2.0)(p).shape == (24, 76)


def test_dict_transform_accepts_dataframe_and_path(three_rows):
    df = pd.read_csv(three_rows, dtype=str, keep_default_na=False)
    t = DiscretizeEHRd(keys="ehr", timestep=1.0, max_hours=4.0)
    a = t({"ehr": str(three_rows)})["ehr"]
    b = t({"ehr": df})["ehr"]
    torch.testing.assert_close(a, b)


def test_normalizer_fit_and_apply(tmp_path, three_rows):
    other = _write_csv(tmp_path / "b.csv", [(0.0, {"Heart Rate": "70"})])
    out = tmp_path / "norm.json"
    stats = fit_ehr_normalizer([three_rows, other], timestep=1.0, max_hours=4.0, output_path=out)
    assert json.loads(out.read_text())["means"] == stats["means"]
    hr_idx = list(EHR_CONTINUOUS_COLUMNS).index(HR)
    hr = np.array([90.0] * 4 + [70.0] * 4)
    assert stats["means"][hr_idx] == pytest.approx(hr.mean())
    assert stats["stds"][hr_idx] == pytest.approx(hr.std(ddof=1))
    x = DiscretizeEHR(timestep=1.0, max_hours=4.0, normalizer=out)(three_rows).numpy()
    np.testing.assert_allclose(x[:, HR], (90 - hr.mean()) / hr.std(ddof=1), rtol=1e-5)
    # one-hot and masks untouched
    assert x[0, TOTAL + 1] == 1 and x[0, MASK + 8] == 1
    # constant channel (temperature always imputed) -> std floored, value 0 after normalising
    assert x[0, TEMP] == pytest.approx(0.0, abs=1e-3)


def test_errors_name_file_and_column(tmp_path):
    bad = _write_csv(tmp_path / "bad.csv", [(0.0, {"Heart Rate": "fast"})])
    with pytest.raises(ValueError, match=r"bad\.csv.*'Heart Rate'.*'fast'"):
        DiscretizeEHR()(bad)
    inf = _write_csv(tmp_path / "inf.csv", [(0.0, {"Glucose": "inf"})])
    with pytest.raises(ValueError, match=r"inf\.csv.*'Glucose'.*not finite"):
        DiscretizeEHR()(inf)
    cat = _write_csv(tmp_path / "cat.csv", [(0.0, {"Glascow coma scale verbal response": "Singing"})])
    with pytest.raises(ValueError, match=r"cat\.csv.*'Glascow coma scale verbal response'.*'Singing'"):
        DiscretizeEHR()(cat)
    hours = _write_csv(tmp_path / "hours.csv", [("abc", {"Heart Rate": "80"})])
    with pytest.raises(ValueError, match=r"hours\.csv.*'Hours'"):
        DiscretizeEHR()(hours)
    cols = tmp_path / "cols.csv"
    cols.write_text("Hours,Heart Rate,pH\n0,80,7.4\n")
    with pytest.raises(ValueError, match=r"cols\.csv.*missing column\(s\).*'Glucose'"):
        DiscretizeEHR()(cols)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        DiscretizeEHR()(tmp_path / "nope.csv")
