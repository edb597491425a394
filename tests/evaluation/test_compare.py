"""medfusion compare on generated evaluation folders where the winner per combination is known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfusion.evaluation.compare import (
    check_comparable,
    compare_runs,
    leaderboard,
    load_run,
    read_routing,
    routing_table,
)
from medfusion.evaluation.report import write_record
from medfusion.modality import combination_name, combinations

MODS = ("ehr", "cxr", "report")
COMBOS = [combination_name(c) for c in combinations(MODS)]


def write_cls_run(
    folder: Path, strength: dict[str, float], n: int = 240, seed: int = 0, split: str = "val", label_seed: int = 0
) -> Path:
    """predictions.csv of a binary classifier whose signal-to-noise on each combination is ``strength[combo]``."""
    labels = np.random.default_rng(label_seed).integers(0, 2, n)
    rng = np.random.default_rng(seed)
    rows = []
    for combo in COMBOS:
        logit = strength[combo] * (2 * labels - 1) + rng.normal(size=n)
        p1 = 1 / (1 + np.exp(-logit))
        rows.append(
            pd.DataFrame(
                {
                    "sample_index": np.arange(n),
                    "case_id": [f"stay{i:04d}" for i in range(n)],
                    "combination": combo,
                    "label": labels,
                    "prob_0": 1 - p1,
                    "prob_1": p1,
                }
            )
        )
    folder.mkdir(parents=True)
    pd.concat(rows).to_csv(folder / "predictions.csv", index=False)
    write_record(
        folder,
        {
            "task": "classification",
            "modalities": list(MODS),
            "split": split,
            "split_rule": {"seed": 0},
            "ckpt_path": str(folder / "model.pt"),
            "network": {"method_name": folder.name},
        },
    )
    return folder


def write_seg_run(folder: Path, dice: dict[str, float], n: int = 30, seed: int = 0) -> Path:
    """per_case.csv whose mean Dice on each combination is ``dice[combo]`` plus case effects and noise."""
    case_effect = np.random.default_rng(99).normal(scale=0.1, size=n)  # shared by every run: cases differ
    rng = np.random.default_rng(seed)
    rows = []
    for combo in COMBOS:
        for i in range(n):
            row = {"case_id": f"BraTS2021_{i:05d}", "combination": combo, "n_modalities": combo.count("+") + 1}
            for r in ("tc", "wt", "et"):
                row[f"dice_{r}"] = float(np.clip(dice[combo] + case_effect[i] + rng.normal(scale=0.02), 0, 1))
                row[f"hd95_{r}"] = float(20 * (1 - row[f"dice_{r}"]) + abs(rng.normal()))
            row["dice_et_pp"] = row["dice_et"]
            rows.append(row)
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "per_case.csv", index=False)
    write_record(folder, {"task": "segmentation", "modalities": list(MODS), "split": "test"})
    return folder


# "imaging" wins wherever cxr is present, "tabular" wherever it is not; "average" is never best
CXR = {c: ("cxr" in c) for c in COMBOS}
WINNER = {c: "imaging" if CXR[c] else "tabular" for c in COMBOS}


@pytest.fixture
def constructed(tmp_path) -> list[Path]:
    return [
        write_cls_run(tmp_path / "imaging", {c: 2.0 if CXR[c] else 0.3 for c in COMBOS}, seed=1),
        write_cls_run(tmp_path / "tabular", {c: 0.3 if CXR[c] else 2.0 for c in COMBOS}, seed=2),
        write_cls_run(tmp_path / "average", {c: 0.9 for c in COMBOS}, seed=3),
    ]


def test_leaderboard_finds_constructed_winners(constructed):
    runs = [load_run(p) for p in constructed]
    check_comparable(runs)
    board = leaderboard(runs, n_boot=200)
    assert set(board["metric"]) == {"auroc", "auprc", "balanced_accuracy"}
    best = board[(board["rank"] == 1) & (board["metric"] == "auroc")].set_index("combination")
    assert best["run"].to_dict() == WINNER
    assert best["best"].all()  # every winner is significant against the runner-up ("average")
    assert (best["test"] == "delong").all() and (best["runner_up"] == "average").all()
    assert set(board.loc[(board["metric"] == "auprc") & (board["rank"] == 1), "test"]) == {"bootstrap"}
    assert board["ece"].between(0, 1).all()
    assert {c: v["run"] for c, v in routing_table(board, "auroc").items()} == WINNER


def test_noise_differences_mark_nothing(tmp_path):
    same = {c: 1.0 for c in COMBOS}
    runs = [load_run(write_cls_run(tmp_path / f"m{s}", same, seed=s)) for s in range(3)]
    board = leaderboard(runs, n_boot=200)
    assert not board["best"].any()
    # the routing table still names a tied-best run everywhere, flagged as not significant
    assert not any(v["significant"] for v in routing_table(board, "auroc").values())


def test_without_correction_a_small_real_gap_is_marked_only_when_large_enough(tmp_path):
    base = {c: 1.0 for c in COMBOS}
    runs = [
        load_run(write_cls_run(tmp_path / "a", {**base, "ehr": 1.6}, seed=1, n=400)),
        load_run(write_cls_run(tmp_path / "b", base, seed=2, n=400)),
    ]
    board = leaderboard(runs, metrics=["auroc"], n_boot=100, correction="none")
    marked = board[board["best"]]
    assert marked["combination"].tolist() == ["ehr"] and marked["run"].tolist() == ["a"]


def test_segmentation_leaderboard_and_directions(tmp_path):
    a = write_seg_run(tmp_path / "metakd", {c: 0.8 if "cxr" in c else 0.6 for c in COMBOS}, seed=1)
    b = write_seg_run(tmp_path / "baseline", {c: 0.7 for c in COMBOS}, seed=2)
    board = leaderboard([load_run(a), load_run(b)], n_boot=200)
    top = board[board["rank"] == 1]
    for metric in ("dice_tc", "hd95_wt"):
        t = top[top["metric"] == metric].set_index("combination")
        expected = {c: "metakd" if "cxr" in c else "baseline" for c in COMBOS}
        assert t["run"].to_dict() == expected  # HD95: lower is better, same winner
        assert t["best"].all()  # a 0.1 Dice gap with paired noise 0.02 is significant despite case spread 0.1


def test_refuses_different_cases_split_labels_and_task(tmp_path):
    good = write_cls_run(tmp_path / "a", {c: 1.0 for c in COMBOS})
    fewer = write_cls_run(tmp_path / "b", {c: 1.0 for c in COMBOS}, n=238)
    with pytest.raises(ValueError, match=r"different cases in combination 'ehr'.*stay0238, stay0239"):
        check_comparable([load_run(good), load_run(fewer)])
    other_split = write_cls_run(tmp_path / "c", {c: 1.0 for c in COMBOS}, split="test")
    with pytest.raises(ValueError, match=r"different split in evaluation.json \('test' vs 'val'\)"):
        check_comparable([load_run(good), load_run(other_split)])
    relabelled = write_cls_run(tmp_path / "d", {c: 1.0 for c in COMBOS}, label_seed=5)
    with pytest.raises(ValueError, match="different labels"):
        check_comparable([load_run(good), load_run(relabelled)])
    seg = write_seg_run(tmp_path / "seg", {c: 0.5 for c in COMBOS})
    with pytest.raises(ValueError, match="different tasks"):
        check_comparable([load_run(good), load_run(seg)])
    with pytest.raises(ValueError, match="at least two"):
        check_comparable([load_run(good)])
    with pytest.raises(FileNotFoundError, match="no per_case.csv"):
        load_run(tmp_path)


def test_compare_runs_writes_report_heatmaps_and_routing(constructed, tmp_path):
    out = tmp_path / "cmp"
    board = compare_runs(constructed, out, reference="average", n_boot=100, routing_metric="auroc")
    for f in ("leaderboard.csv", "leaderboard.md", "report.md", "routing.json", "heatmap_auroc.png"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "Verdict" in report and "imaging on 4" in report and "tabular on 3" in report
    md = (out / "leaderboard.md").read_text()
    assert "(ECE " in md and "Holm" in md
    diff = pd.read_csv(out / "difference_auroc.csv", index_col=0)
    assert list(diff.index) == ["imaging", "tabular"] and (diff.loc["imaging", ["cxr", "ehr+cxr"]] > 0).all()
    routing = read_routing(out / "routing.json")
    assert routing["routes"] == WINNER and routing["split"] == "val"
    assert routing["runs"]["imaging"]["overrides"] == {"method_name": "imaging"}
    assert set(routing["runs"]) == {"imaging", "tabular"}  # only routed runs are loaded by the router
    assert len(board) == 3 * 7 * 3
    with pytest.raises(FileExistsError, match="--overwrite"):
        compare_runs(constructed, out)
    with pytest.raises(ValueError, match="'test' split"):
        test_runs = [write_cls_run(tmp_path / f"t{i}", {c: 1.0 for c in COMBOS}, split="test") for i in range(2)]
        compare_runs(test_runs, tmp_path / "cmp2", n_boot=20, routing_metric="auroc")


def test_default_names_fall_back_to_parent_folders():
    from medfusion.evaluation.compare import _default_names

    assert _default_names(["a/x", "b/y"]) == ["x", "y"]
    assert _default_names(["runs/qmf/val", "runs/late/val"]) == ["qmf", "late"]
    assert _default_names(["a/val", "a/val"]) == ["a/val", "a/val"]  # then check_comparable asks for --names


def test_read_routing_errors(tmp_path):
    p = tmp_path / "routing.json"
    p.write_text(json.dumps({"routes": {"ehr": "x"}, "runs": {"y": {}}}))
    with pytest.raises(ValueError, match=r"run\(s\) \['x'\]"):
        read_routing(p)
    with pytest.raises(FileNotFoundError):
        read_routing(tmp_path / "none.json")


def test_fast_metrics_equal_sklearn():
    from sklearn.metrics import average_precision_score, balanced_accuracy_score

    from medfusion.evaluation.compare import _average_precision, _balanced_accuracy

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 50)
        s = np.round(rng.random(50), 1)  # ties
        assert _average_precision(y, s) == pytest.approx(average_precision_score(y, s))
        y3, p3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
        assert _balanced_accuracy(y3, p3, 3) == pytest.approx(balanced_accuracy_score(y3, p3))


def test_cli_compare_and_calibrate(constructed, tmp_path, capsys):
    from medfusion.cli import main

    out = tmp_path / "cli_cmp"
    args = ["compare", *map(str, constructed), "--out", str(out), "--n-boot", "50", "--routing", "auroc"]
    assert main([*args, "--names", "img", "tab", "avg"]) == 0
    text = capsys.readouterr().out
    assert "significant winner(s)" in text and "img" in text
    assert json.loads((out / "routing.json").read_text())["routes"]["cxr"] == "img"
    assert main(args) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--names", "a"]) == 2
    assert "3 evaluation folders" in capsys.readouterr().err

    cal = tmp_path / "models" / "calibration.json"
    assert main(["calibrate", str(constructed[0]), "--out", str(cal)]) == 0
    temps = json.loads(cal.read_text())["temperatures"]
    assert set(temps) == set(COMBOS) and all(t > 0 for t in temps.values())
    assert main(["calibrate", str(constructed[0]), "--out", str(cal)]) == 2  # exists
