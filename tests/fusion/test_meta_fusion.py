"""Meta Fusion on hand-computed values (docs/methods.md maps each test to its equation)."""

from __future__ import annotations

import math

import pytest
import torch

from medfusion.fusion.meta_fusion import (
    RULES,
    ExtractorSpec,
    MetaFusion,
    MetaFusionData,
    StudentSpec,
    build_cohort,
    early_fusion_spec,
    ensemble_selection,
    late_fusion_spec,
    mutual_learning_loss,
    select_teachers_kmeans,
)

MODS = ("a", "b")
DIMS = {"a": 4, "b": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- cohort
def test_extractor_spec_parse_and_errors() -> None:
    assert ExtractorSpec.parse("pca:8") == ExtractorSpec("pca", 8)
    assert str(ExtractorSpec.parse("identity")) == "identity"
    for bad in ("pca", "pca:0", "identity:3", "svd:2"):
        with pytest.raises(ValueError, match="extractor"):
            ExtractorSpec.parse(bad)


def test_build_cohort_enumeration() -> None:
    cohort = build_cohort({"a": ["null", "identity", "pca:2"], "b": ["null", "slice:1"]})
    # 3 x 2 = 6 combinations minus the all-null one; last modality varies fastest
    assert [c.name for c in cohort] == [
        "b=slice:1",
        "a=identity",
        "a=identity+b=slice:1",
        "a=pca:2",
        "a=pca:2+b=slice:1",
    ]
    assert cohort[0].modalities == ("b",)
    assert cohort[2].as_dict() == {"a": "identity", "b": "slice:1"}
    with pytest.raises(ValueError, match="all-null"):
        build_cohort({"a": ["null"], "b": ["null"]})


def test_b3_grid_gives_24_students() -> None:
    cohort = build_cohort(
        {"a": ["null", "pca:50", "pca:60", "pca:70", "pca:80"], "b": ["null", "pca:60", "pca:70", "pca:80", "pca:90"]}
    )
    assert len(cohort) == 24


def test_presets_are_configs_of_the_same_code() -> None:
    early = MetaFusion(MODS, DIMS, **early_fusion_spec(MODS))
    assert early.student_names == ["a=identity+b=identity"]
    late = MetaFusion(MODS, DIMS, **late_fusion_spec(MODS))
    assert late.student_names == ["a=identity", "b=identity"]
    assert late.rho_grid == (0.0,) and late.default_rule == "average"


def test_student_without_modality_is_an_error() -> None:
    with pytest.raises(ValueError, match="no modality"):
        StudentSpec.from_mapping({"a": "null"}, MODS)


# -------------------------------------------------------------------------------------- teachers
def test_kmeans_teachers_on_fixed_losses() -> None:
    teachers, weights, k = select_teachers_kmeans([0.10, 0.11, 0.12, 0.50, 0.52, 0.90])
    assert teachers == [0, 1, 2]
    assert k == 3  # silhouette prefers {.10,.11,.12}, {.50,.52}, {.90}
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 0.0]))


def test_kmeans_fallbacks() -> None:
    assert select_teachers_kmeans([0.3, 0.1])[0] == [1]  # n < 3: the best student
    t, w, k = select_teachers_kmeans([0.2, 0.2, 0.2])  # all equal: everyone
    assert t == [0, 1, 2] and k == 1 and torch.allclose(w, torch.full((3,), 1 / 3))
    t, w, _ = select_teachers_kmeans([0.3, math.inf, 0.1, 0.12])  # inf never a teacher; k=2 on 3 finite
    assert t == [2, 3] and w.tolist() == [0.0, 0.0, 0.5, 0.5]


# ------------------------------------------------------------------------------- mutual learning
def test_mutual_learning_loss_by_hand() -> None:
    # student 0: logits [0, 0] -> p = [.5, .5]; student 1: [ln 3, 0] -> [.75, .25]; student 2: [0, ln 3]
    out = torch.tensor([[[0.0, 0.0]], [[math.log(3), 0.0]], [[0.0, math.log(3)]]], requires_grad=True)
    y = torch.tensor([0])
    w = torch.tensor([0.5, 0.5, 0.0])  # teachers {0, 1}
    total, per = mutual_learning_loss(out, y, w, rho=2.0, task="classification")
    ce = [math.log(2), -math.log(0.75), -math.log(0.25)]
    kl_0_1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p0 || p1) = .5 ln(4/3)
    kl_1_0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p1 || p0)
    kl_0_2 = kl_0_1  # by symmetry
    kl_1_2 = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # = .5 ln 3
    expected = [
        ce[0] + 2.0 * 0.5 * kl_1_0,  # student 0 learns only from teacher 1
        ce[1] + 2.0 * 0.5 * kl_0_1,  # student 1 learns only from teacher 0
        ce[2] + 2.0 * 0.5 * (kl_0_2 + kl_1_2),  # non-teacher learns from both
    ]
    torch.testing.assert_close(per, torch.tensor(expected))
    torch.testing.assert_close(total, torch.tensor(sum(expected)))
    # stop-gradient: student 2's loss sends no gradient into the teachers' logits
    (g,) = torch.autograd.grad(per[2], out)
    assert torch.all(g[:2] == 0) and torch.any(g[2] != 0)


def test_mutual_learning_loss_regression_and_missing_rows() -> None:
    out = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # [S=2, B=2]
    y = torch.tensor([0.0, 1.0])
    avail = torch.tensor([[True, True], [True, False]])  # student 1 cannot see sample 1
    _, per = mutual_learning_loss(out, y, torch.tensor([0.5, 0.5]), 1.0, "regression", avail)
    # s0: mean((1,1)^2)=1 + .5 * (1-3)^2 on the shared row = 3; s1: 3^2=9 + .5 * (3-1)^2 = 11
    torch.testing.assert_close(per, torch.tensor([3.0, 11.0]))
    _, per0 = mutual_learning_loss(out, y, torch.tensor([0.5, 0.5]), 0.0, "regression", avail)
    torch.testing.assert_close(per0, torch.tensor([1.0, 9.0]))


# ---------------------------------------------------------------------------- ensemble selection
def test_greedy_ensemble_selection_by_hand() -> None:
    # regression, one validation sample with y = 0; predictions and their losses (squared errors)
    preds = torch.tensor([[1.0], [-2.0], [2.5], [-3.0], [10.0]])
    losses = torch.tensor([1.0, 4.0, 6.25, 9.0, 100.0])
    y = torch.tensor([0.0])
    # prune floor(.2*5)=1 (student 4); start {0,1,2}: mean .5 -> .25
    # +1: means 0.625, -0.125, 1.0, -0.375 -> pick 1 (loss .015625)
    # +0: means .1, -.5, .4, -.7 -> pick 0 (loss .01)
    # next: .25, -.25, .5, -.4167 -> nothing < .01 -> stop
    counts = ensemble_selection(preds, y, losses, "regression")
    assert counts.tolist() == [2, 2, 1, 0, 0]
    assert ensemble_selection(preds, y, losses, "regression", max_size=4).tolist() == [1, 2, 1, 0, 0]
    # no pruning, init_size=1: {0} (loss 1); +1 -> mean -.5 (.25) beats +0 (1), +2 (3.06), +3 (1), +4;
    # then +0 -> (1-2+1)/3 = 0 (loss 0); nothing is < 0 -> stop
    counts = ensemble_selection(preds, y, losses, "regression", prune_fraction=0.0, init_size=1)
    assert counts.tolist() == [2, 1, 0, 0, 0]


def test_ensemble_selection_classification_uses_nll_of_average() -> None:
    preds = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]]])  # [S=3, N=1, K=2]
    y = torch.tensor([0])
    losses = -torch.log(preds[:, 0, 0])
    counts = ensemble_selection(preds, y, losses, "classification", init_size=1)
    # start {0}: p=.9; adding anything lowers p(y=0) -> stop
    assert counts.tolist() == [1, 0, 0]


# -------------------------------------------------------------------------------- missing-aware
def _fixed_model(task: str = "regression") -> MetaFusion:
    cohort = [{"a": "identity", "b": "identity"}, {"a": "identity"}, {"b": "identity"}]
    model = MetaFusion(MODS, {"a": 1, "b": 1}, cohort, task=task, hidden=())
    with torch.no_grad():  # student s outputs (s + 1) * 10 (+ input-independent)
        for s, st in enumerate(model.students):
            lin = st.head[-1]
            lin.weight.zero_()
            if task == "regression":
                lin.bias.fill_(10.0 * (s + 1))
            else:
                lin.bias.copy_(torch.tensor([0.0, s + 1.0]))
    model.val_loss.copy_(torch.tensor([0.1, 0.2, 0.3]))
    model.committee.copy_(torch.tensor([1, 2, 0]))  # committee: "a+b" once, "a" twice
    model.stage.fill_(5)
    return model


def test_missing_aware_inference_restricts_and_falls_back() -> None:
    model = _fixed_model()
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    used = model.used_students(mask)
    assert used.tolist() == [[True, True, False], [False, True, False], [False, False, True]]
    x = {"a": torch.randn(3, 1), "b": torch.randn(3, 1)}
    pred = model.predict(x, mask, rule="ensemble")
    # row 0: (1*10 + 2*20)/3; row 1: only "a" -> 20; row 2: no member -> best available "b" -> 30
    torch.testing.assert_close(pred, torch.tensor([50 / 3, 20.0, 30.0]))
    torch.testing.assert_close(model.predict(x, mask, rule="best_single"), torch.tensor([10.0, 20.0, 30.0]))
    torch.testing.assert_close(model.predict(x, mask, rule="average"), torch.tensor([20.0, 20.0, 30.0]))
    wa = (10 / 0.1 + 20 / 0.2 + 30 / 0.3) / (1 / 0.1 + 1 / 0.2 + 1 / 0.3)
    torch.testing.assert_close(model.predict(x, mask, rule="weighted_average"), torch.tensor([wa, 20.0, 30.0]))
    # absent content is ignored bit-for-bit
    x2 = {"a": x["a"].clone(), "b": x["b"].clone()}
    x2["b"][1] = float("nan")
    x2["a"][2] = 1e6
    assert torch.equal(model.predict(x2, mask), pred)
    with pytest.raises(ValueError, match="every modality missing"):
        model.predict(x, torch.tensor([[False, False]]).expand(3, 2))


def test_rule_table_drives_predict_stages_and_validation() -> None:
    """One table (AGGREGATION_RULES) defines the rule names and what predict/used_students/the head check."""
    from medfusion.fusion.meta_fusion import AGGREGATION_RULES, STAGES, MetaFusionHead, get_rule

    assert RULES == tuple(AGGREGATION_RULES) and len(RULES) == 9
    assert all(name == rule.name and rule.stage in STAGES for name, rule in AGGREGATION_RULES.items())
    assert [r for r in RULES if AGGREGATION_RULES[r].classification_only] == ["majority_vote", "weighted_vote"]
    with pytest.raises(ValueError, match=r"my field: expected one of \['ensemble'"):
        get_rule("ensembel", field="my field")
    with pytest.raises(ValueError, match="votes need"):
        get_rule("weighted_vote", "regression")
    with pytest.raises(ValueError, match="default_rule"):
        MetaFusion(MODS, DIMS, [{"a": "identity"}], task="regression", default_rule="majority_vote")
    model = _fixed_model()
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    x = {"a": torch.randn(3, 1), "b": torch.randn(3, 1)}
    # the screened cohort has other weights (default init): *_screen rules read it, the others do not
    assert not torch.equal(model.predict(x, mask, "ensemble_screen"), model.predict(x, mask, "ensemble"))
    model.screen_students.load_state_dict(model.students.state_dict())
    model.screen_committee.copy_(model.committee)
    model.screen_val_loss.copy_(model.val_loss)
    for screened, mutual in (("ensemble_screen", "ensemble"), ("best_single_screen", "best_single")):
        assert torch.equal(model.predict(x, mask, screened), model.predict(x, mask, mutual))
        assert torch.equal(model.used_students(mask, screened), model.used_students(mask, mutual))
    with pytest.raises(ValueError, match="not a weighted-mean rule"):
        model.used_students(mask, "stacking")
    # the stage a rule needs comes from the table: ensembles and stacking need "ensembled", the rest "screened"
    model.stage.fill_(STAGES.index("mutual_learned"))
    for rule in RULES[:7]:
        needs_ensemble = AGGREGATION_RULES[rule].stage == "ensembled"
        assert needs_ensemble == (rule in ("ensemble", "ensemble_screen", "stacking"))
        if needs_ensemble:
            with pytest.raises(RuntimeError, match="needs stage 'ensembled'"):
                model.predict(x, mask, rule)
        else:
            model.predict(x, mask, rule)
    head = MetaFusionHead(MODS, {"a": 1, "b": 1}, rule="ensemble_screen", config=model.get_config())
    head.meta.load_state_dict(model.state_dict())
    assert not head.fitted  # ensemble_screen needs the ensembled stage, like predict
    head.meta.stage.fill_(STAGES.index("ensembled"))
    assert head.fitted


def test_votes_on_fixed_students() -> None:
    model = _fixed_model("classification")  # each student prefers class 1 with margin s + 1
    with torch.no_grad():
        model.students[1].head[-1].bias.copy_(torch.tensor([5.0, 0.0]))  # student "a" votes class 0
    mask = torch.tensor([[True, True]])
    x = {"a": torch.zeros(1, 1), "b": torch.zeros(1, 1)}
    maj = model.predict(x, mask, rule="majority_vote").exp()
    torch.testing.assert_close(maj, torch.tensor([[1 / 3, 2 / 3]]))
    # weighted: class 0 gets 1/.2 = 5, class 1 gets 1/.1 + 1/.3 = 13.33
    wv = model.predict(x, mask, rule="weighted_vote").exp()
    torch.testing.assert_close(wv, torch.tensor([[5 / (5 + 10 + 10 / 3), (10 + 10 / 3) / (5 + 10 + 10 / 3)]]))
    with pytest.raises(ValueError, match="votes need"):
        _fixed_model("regression").predict(x, mask, rule="majority_vote")


# --------------------------------------------------------------------------------- end to end
def _toy(n: int, seed: int, task: str = "classification", p_missing: float = 0.0) -> MetaFusionData:
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
    score = 2 * xa[:, 0] + 2 * xb[:, 0]
    y = (score > 0).long() if task == "classification" else score + 0.5 * xa[:, 1]
    mask = torch.ones(n, 2, dtype=torch.bool)
    if p_missing:
        drop = torch.rand(n, generator=g) < p_missing
        which = torch.randint(0, 2, (n,), generator=g)
        mask[drop, which[drop]] = False
    xa[~mask[:, 0]] = 0
    xb[~mask[:, 1]] = 0
    return MetaFusionData({"a": xa, "b": xb}, mask, y)


GRIDS = {"a": ["null", "identity", "pca:2"], "b": ["null", "identity", "slice:2"]}


def test_end_to_end_classification_beats_chance_and_roundtrips() -> None:
    train, val, test = _toy(240, 0, p_missing=0.3), _toy(120, 1, p_missing=0.3), _toy(200, 2, p_missing=0.3)
    model = MetaFusion(MODS, DIMS, build_cohort(GRIDS), epochs=10, batch_size=60, lr=2e-2, rho_grid=(0.0, 1.0))
    model.fit(train, val)
    s = model.summary()
    assert s["stage"] == "ensembled" and len(s["students"]) == 8
    assert s["teachers"] and s["committee"] and s["rho"] in (0.0, 1.0)
    assert sum(model.committee.tolist()) >= 3 and int(model.committee.sum()) <= 30
    preds = {}
    for rule in RULES:
        logp = model.predict(test.x, test.mask, rule=rule)
        assert logp.shape == (200, 2) and torch.isfinite(logp).all()
        preds[rule] = logp
        acc = float((logp.argmax(-1) == test.y).float().mean())
        assert acc > 0.7, (rule, acc)
    # checkpoint round trip: a fresh model with the same config reproduces every rule
    fresh = MetaFusion(**model.get_config())
    fresh.load_state_dict(model.state_dict())
    for rule in RULES:
        assert torch.equal(fresh.predict(test.x, test.mask, rule=rule), preds[rule]), rule
    assert fresh.summary() == s
    assert torch.equal(fresh(test.x, test.mask), preds["ensemble"])


def test_regression_path_and_late_fusion_preset() -> None:
    train, val, test = _toy(200, 3, "regression"), _toy(100, 4, "regression"), _toy(100, 5, "regression")
    var = float(test.y.var())
    model = MetaFusion(MODS, DIMS, build_cohort(GRIDS), task="regression", epochs=20, lr=1e-2, rho_grid=(0.0, 0.99))
    model.fit(train, val)
    out = model.predict(test.x, test.mask)
    assert out.shape == (100,)
    mse = float(((out - test.y) ** 2).mean())
    assert mse < 0.3 * var, (mse, var)
    assert model(test.x, test.mask).shape == (100, 1)
    late = MetaFusion(MODS, DIMS, task="regression", epochs=5, lr=1e-2, **late_fusion_spec(MODS)).fit(train, val)
    assert late.rho.item() == 0.0
    p = late.predict(test.x, test.mask)  # late fusion = mean of the two unimodal students
    s = late.student_outputs(test.x, test.mask)
    torch.testing.assert_close(p, s.mean(dim=0))


def test_pca_extractor_matches_numpy_projection() -> None:
    data = _toy(50, 6)
    model = MetaFusion(MODS, DIMS, [{"a": "pca:2"}])
    model.fit_extractors(data)
    xa = data.x["a"].double()
    xc = xa - xa.mean(0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    z = model.latents(data.x, data.mask)["a__pca2"].double()
    # same subspace up to sign: |z| equals |xc @ v_k|
    torch.testing.assert_close(z.abs(), (xc @ vh[:2].T).abs(), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="needs stage"):
        model.predict(data.x, data.mask, rule="ensemble")


def test_mlp_extractor_is_trainable_and_part_of_the_checkpoint() -> None:
    train, val = _toy(80, 7, "regression"), _toy(40, 8, "regression")
    model = MetaFusion(MODS, DIMS, [{"a": "mlp:2", "b": "identity"}], task="regression", extractor_hidden=8, epochs=3)
    ext = model.students[0].trainable_extractors["a"]
    assert ext[0].weight.shape == (8, 4) and ext[2].weight.shape == (2, 8)
    before = ext[2].weight.clone()
    model.fit(train, val, rho_grid=(0.0,))
    assert not torch.equal(model.students[0].trainable_extractors["a"][2].weight, before)
    assert "students.0.trainable_extractors.a.0.weight" in model.state_dict()
    assert model.committee.tolist() == [1]  # a single student: start with it, re-adding it never improves


def test_choose_rho_and_ties() -> None:
    from medfusion.fusion.meta_fusion import choose_rho
    from medfusion.fusion.meta_fusion.training import _tied

    assert _tied([0.0, 0.99, 3.0], [0.5, 0.5, 0.7]) == [0.0, 0.99]
    assert _tied([0.0, 0.99, 3.0], [0.5, 0.5 * (1 + 1e-12), 0.4]) == [3.0]
    assert _tied([0.0, 1.0], [math.inf, math.nan]) == []
    report = [
        {"rho": 0.0, "teachers": 0.30, "cohort": 0.50, "ensemble": 0.42},
        {"rho": 0.99, "teachers": 0.30, "cohort": 0.45, "ensemble": 0.40},
        {"rho": 3.0, "teachers": 0.30 * (1 + 1e-12), "cohort": 0.47, "ensemble": 0.41},
    ]
    assert choose_rho(report, "ensemble") == (0.99, [0.99])
    assert choose_rho(report, "cohort") == (0.99, [0.99])
    assert choose_rho(report, "teachers") == (0.0, [0.0, 0.99, 3.0])  # one teacher: an exact tie, rho = 0 kept
    with pytest.raises(ValueError, match="criterion"):
        choose_rho(report, "best")


def test_rho_is_chosen_on_the_selected_ensemble_even_with_one_teacher() -> None:
    """With ONE teacher every rho trains that teacher identically: the teachers' score ties exactly and rho = 0
    would always be kept. The default criterion scores each rho by the validation loss (NLL of the averaged
    probabilities) of the ensemble selected from that rho's cohort, which the students mutual learning trains
    do change."""
    train, val = _toy(240, 0, p_missing=0.3), _toy(120, 1, p_missing=0.3)
    model = MetaFusion(MODS, DIMS, build_cohort(GRIDS), epochs=8, batch_size=60, lr=2e-2, rho_grid=(0.0, 1.0, 3.0))
    assert model.rho_criterion == "ensemble"
    model.screen(train, val)
    model.select_teachers()
    best = int(torch.argmin(model.screen_val_loss))
    model.teacher_weights.copy_(torch.nn.functional.one_hot(torch.tensor(best), len(model.cohort)).float())
    rho = model.mutual_learning(train, val)
    report = model.rho_report
    assert [r["rho"] for r in report] == [0.0, 1.0, 3.0]
    teacher_scores = [r["teachers"] for r in report]
    assert teacher_scores[0] == teacher_scores[1] == teacher_scores[2]  # the old criterion cannot choose
    ens = [r["ensemble"] for r in report]
    assert model.rho_scores.tolist() == pytest.approx(ens) and len(set(ens)) == 3
    assert rho == report[int(torch.tensor(ens).argmin())]["rho"]
    summary = model.summary()
    assert summary["rho_ties"] == [rho] and summary["rho_criterion"] == "ensemble"
    # the chosen score IS the validation loss of the committee the model then deploys
    model.select_ensemble(val)
    nll = float(torch.nn.functional.nll_loss(model.predict(val.x, val.mask, rule="ensemble"), val.y))
    assert nll == pytest.approx(min(ens), rel=1e-5)
    # "ensemble_screen" = the same selection on the screened cohort (no mutual learning): the rho = 0 score
    nll0 = float(torch.nn.functional.nll_loss(model.predict(val.x, val.mask, rule="ensemble_screen"), val.y))
    assert nll0 == pytest.approx(ens[0], rel=1e-5) and int(model.screen_committee.sum()) >= 3
    # the public package's rule on the same run: all three rho tie, rho = 0 kept, the tie is reported
    legacy = MetaFusion(**{**model.get_config(), "rho_criterion": "teachers"})
    legacy.load_state_dict(model.state_dict())
    legacy.rho_scores.copy_(torch.tensor(teacher_scores))
    assert legacy.summary()["rho_ties"] == [0.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="rho_criterion"):
        MetaFusion(MODS, DIMS, build_cohort(GRIDS), rho_criterion="best")
