"""TabularMetaFusion: column groups from a table, fit + save + evaluate-from-files, one clear error per bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from medfusion.apps.meta_fusion_stages import CONFIG_NAME, SUMMARY_NAME
from medfusion.apps.meta_fusion_tabular import (
    TABLE_SPEC_NAME,
    TabularMetaFusion,
    load_tabular_meta_fusion,
    resolve_modality_columns,
)

FAST: dict[str, Any] = {"epochs": 60, "hidden": [32], "lr": 1e-2, "batch_size": 0, "rho_grid": [0.0, 1.0], "seed": 0}
M1 = [f"m1_{k}" for k in range(8)]
M2 = [f"m2_{k}" for k in range(6)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def table(latent_table: Path) -> Path:
    return latent_table


def _copy_without_signal(table: Path, dest: Path, edit=None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(table)
    if edit is not None:
        frame = edit(frame)
    frame.to_csv(dest / "table.csv", index=False)
    return dest / "table.csv"


def test_columns_from_mapping_prefixes_or_signal_json(table, tmp_path):
    cols = list(pd.read_csv(table).columns)
    expected = {"m1": M1, "m2": M2}
    assert resolve_modality_columns(table, cols) == expected  # signal.json beside the table
    assert resolve_modality_columns(table, cols, modality_prefixes={"m1": "m1_", "m2": "m2_"}) == expected
    assert resolve_modality_columns(table, cols, {"m2": M2[:2], "m1": M1[:1]}) == {"m2": M2[:2], "m1": M1[:1]}
    with pytest.raises(ValueError, match="not both"):
        resolve_modality_columns(table, cols, expected, {"m1": "m1_"})
    with pytest.raises(ValueError, match="'zz_'"):
        resolve_modality_columns(table, cols, modality_prefixes={"m1": "zz_"})
    with pytest.raises(KeyError, match=r"m1_99.*table\.csv"):
        resolve_modality_columns(table, cols, {"m1": ["m1_99"]})
    with pytest.raises(ValueError, match="m1_0"):  # a column in two modalities
        resolve_modality_columns(table, cols, {"m1": M1, "m2": ["m1_0"]})
    bare = _copy_without_signal(table, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="signal.json"):
        resolve_modality_columns(bare, cols)


def test_fit_save_evaluate_from_files(table, tmp_path):
    runner = TabularMetaFusion(table, tmp_path / "ck", output_dir=tmp_path / "out", meta_kwargs=FAST)
    assert runner.modalities == ("m1", "m2") and runner.target == "y"
    metrics = runner.run()
    assert list(metrics.index) == ["m1", "m2", "m1+m2", "mean"]
    test = pd.read_csv(table).query("split == 'test'")
    full = test[M1 + M2].notna().all(axis=1)
    assert metrics.loc["m1+m2", "n"] == int(full.sum())
    assert metrics.loc["m1", "n"] == int(test[M1].notna().all(axis=1).sum())
    assert metrics.loc["m1+m2", "mse"] < 0.6 * float(test["y"].var())  # clearly better than the mean
    for path in (tmp_path / "ck" / "model.pt", tmp_path / "ck" / CONFIG_NAME, tmp_path / "ck" / TABLE_SPEC_NAME):
        assert path.is_file()
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["stage"] == "ensembled" and summary["rho"] in (0.0, 1.0)
    assert json.loads((tmp_path / "ck" / TABLE_SPEC_NAME).read_text())["modality_columns"] == {"m1": M1, "m2": M2}
    # the rebuilt head predicts exactly what the fitted one does
    head = load_tabular_meta_fusion(tmp_path / "ck")
    data = runner.split_data("test")
    torch.testing.assert_close(head.meta.predict(data.x, data.mask), runner.head.meta.predict(data.x, data.mask))
    # evaluate-only from another runner over the same table (no fit) reproduces the metrics
    again = TabularMetaFusion(
        table, tmp_path / "ck", output_dir=tmp_path / "eval", modality_prefixes={"m1": "m1_", "m2": "m2_"}
    ).evaluate()
    pd.testing.assert_frame_equal(again, metrics)
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert set(preds["case_id"]) <= set(test["case_id"]) and len(preds) == int(metrics["n"].iloc[:3].sum())
    # model.pt carries the run record (modalities in order, their columns, the target) like the bundles' checkpoints
    record = torch.load(tmp_path / "ck" / "model.pt", weights_only=True)["record"]
    assert record["modalities"] == ["m1", "m2"] and record["method"] == "meta_fusion_regression"
    assert record["model"]["modality_columns"] == {"m1": M1, "m2": M2} and record["model"]["target"] == "y"
    # a table resolving to other columns is refused, in one line naming what differs
    with pytest.raises(ValueError, match="fitted on other data: modality_columns#m1"):
        TabularMetaFusion(table, tmp_path / "ck", modality_columns={"m1": M1[:3], "m2": M2}).evaluate()
    # modalities in another order are refused too
    with pytest.raises(ValueError, match=r"trained on \[m1, m2\], asked for \[m2, m1\]"):
        TabularMetaFusion(table, tmp_path / "ck", modality_columns={"m2": M2, "m1": M1}).evaluate()


def test_bad_input_errors_name_the_file_and_field(table, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        TabularMetaFusion(tmp_path / "nope.csv", tmp_path / "ck")
    with pytest.raises(KeyError, match=r"target.*'outcome'.*table\.csv"):
        TabularMetaFusion(table, tmp_path / "ck", target="outcome")
    with pytest.raises(KeyError, match=r"split_column.*'fold'.*table\.csv"):
        TabularMetaFusion(table, tmp_path / "ck", split_column="fold")
    with pytest.raises(ValueError, match=r"\['holdout'\].*'split'.*table\.csv"):
        TabularMetaFusion(table, tmp_path / "ck", splits=("train", "val", "holdout"))
    with pytest.raises(ValueError, match="task"):
        TabularMetaFusion(table, tmp_path / "ck", meta_kwargs={"task": "classification"})
    with pytest.raises(ValueError, match="grids"):
        TabularMetaFusion(table, tmp_path / "ck", grids={"m2": ["identity"], "m1": ["identity"]})
    with pytest.raises(FileNotFoundError, match="meta_fusion_config.json"):
        TabularMetaFusion(table, tmp_path / "empty").evaluate()

    def drop_both(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[frame.index[frame["split"] == "train"][0], M1 + M2] = float("nan")
        return frame

    bad = _copy_without_signal(table, tmp_path / "bad", drop_both)
    runner = TabularMetaFusion(bad, tmp_path / "ck", target="y", modality_prefixes={"m1": "m1_", "m2": "m2_"})
    with pytest.raises(ValueError, match=r"bad/table\.csv split 'train'.*every modality missing"):
        runner.split_data("train")
    missing_y = _copy_without_signal(table, tmp_path / "my", lambda f: f.assign(y=f["y"].where(f.index != 3)))
    with pytest.raises(ValueError, match=r"'y'.*my/table\.csv.*rows \[3\]"):
        TabularMetaFusion(missing_y, tmp_path / "ck", target="y", modality_prefixes={"m1": "m1_", "m2": "m2_"})
    shutil.rmtree(tmp_path / "bad")
