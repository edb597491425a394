from __future__ import annotations

import pandas as pd
import pytest

from medfusion.evaluation.report import summarize, to_markdown


def test_summary_order_and_mean_row():
    df = pd.DataFrame(
        {
            "case_id": ["a", "a", "a", "b", "b", "b"],
            "combination": ["x+y", "x", "y", "x+y", "x", "y"],
            "dice": [0.9, 0.5, 0.2, 0.7, 0.3, 0.4],
        }
    )
    s = summarize(df, ["dice"], ("x", "y"))
    assert list(s.index) == ["x", "y", "x+y", "mean"]
    assert s.loc["x", "dice"] == pytest.approx(0.4)
    assert s.loc["x+y", "dice"] == pytest.approx(0.8)
    assert s.loc["mean", "dice"] == pytest.approx((0.4 + 0.3 + 0.8) / 3)
    md = to_markdown(s, ["dice"], scale=100)
    assert "| x+y | 80.00 | 2 |" in md and "| **mean** | 50.00 | 2 |" in md
