"""Method recipes by name, so a bundle switches the method with ONE override (``--method_name qmf``).

A recipe pairs a fusion head (with default head kwargs) and a training method (with default method
kwargs). The four published methods and the baselines have one recipe each; the ablations that isolate one
ingredient are recipes too, so a benchmark or a bundle selects them by name instead of forking the trainer:

* ``late_modality_ce``: late fusion trained with the same per-modality cross-entropy QMF adds (Eq. 18), the
  fair baseline for QMF;
* ``qmf_no_detach``: QMF with gradient through its fusion weights in the fused prediction (the earlier default);
* ``omnifuse_no_imputation``: OmniFuse with the same predictor and the imputation switched off
  (``impute="off"``); ``omnifuse_no_cra``: the earlier ablation without any CRA (``impute="none"``);
* ``metakd_no_kd`` (``alpha=0``), ``metakd_uniform_kd`` (KD with fixed uniform weights, no meta step),
  ``metakd_fixed_kd`` (KD with fixed weights given as ``method_kwargs={"kd_weights": {modality: weight}}``,
  e.g. an oracle from single-modality validation scores).

Recipe defaults are overridden by the caller's kwargs (bundle ``head_kwargs`` / ``method_kwargs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medfusion.engines.method import Method

__all__ = [
    "Recipe",
    "RECIPES",
    "METHOD_HEADS",
    "create_method",
    "list_methods",
    "head_name",
    "default_head_kwargs",
    "build_method",
]


@dataclass(frozen=True)
class Recipe:
    """One named method: fusion head + training recipe + their default kwargs.

    Attributes:
        head: registered fusion-head name.
        method: training recipe kind: ``"supervised"``, ``"qmf"``, ``"omnifuse"`` or ``"metakd"``.
        head_kwargs: default head kwargs (the caller's win).
        method_kwargs: default method kwargs (the caller's win).
        ablation_of: the published method / baseline this recipe isolates an ingredient of (``None`` for the
            methods and baselines themselves).
        required_method_kwargs: method kwargs the caller must give (no sensible default).
        description: one line for listings and errors.
    """

    head: str
    method: str
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ablation_of: str | None = None
    required_method_kwargs: tuple[str, ...] = ()
    description: str = ""


RECIPES: dict[str, Recipe] = {
    "concat": Recipe("concat", "supervised", description="early fusion: zero-filled features concatenated, MLP"),
    "late": Recipe("late", "supervised", description="late fusion: average of per-modality probabilities"),
    "late_modality_ce": Recipe(
        "late",
        "supervised",
        method_kwargs={"modality_loss_weight": 1.0},
        ablation_of="qmf",
        description="late fusion + the per-modality cross-entropy QMF adds (QMF's fair baseline)",
    ),
    "mean_features": Recipe("mean_features", "supervised", description="HeMIS-style masked mean of features"),
    "qmf": Recipe("qmf", "qmf", description="QMF: energy-weighted late fusion, weights detached in the fusion"),
    "qmf_no_detach": Recipe(
        "qmf",
        "qmf",
        head_kwargs={"detach_weights": False},
        ablation_of="qmf",
        description="QMF with gradient through the fusion weights in the fused prediction",
    ),
    "omnifuse": Recipe("omnifuse", "omnifuse", description="OmniFuse: CRA imputation + DWFuse + TLA"),
    "omnifuse_no_imputation": Recipe(
        "omnifuse",
        "omnifuse",
        head_kwargs={"impute": "off"},
        ablation_of="omnifuse",
        description="OmniFuse, same predictor, imputation off (classifiers on v, no L_fw/L_bw)",
    ),
    "omnifuse_no_cra": Recipe(
        "omnifuse",
        "omnifuse",
        head_kwargs={"impute": "none"},
        ablation_of="omnifuse",
        description="OmniFuse without any CRA (joint head on v)",
    ),
    "metakd": Recipe("metakd", "metakd", description="MetaKD: KD weighted by meta-learned importance weights"),
    "metakd_no_kd": Recipe(
        "metakd", "metakd", method_kwargs={"alpha": 0.0}, ablation_of="metakd", description="MetaKD network, no KD"
    ),
    "metakd_uniform_kd": Recipe(
        "metakd",
        "metakd",
        method_kwargs={"kd_weights": "uniform"},
        ablation_of="metakd",
        description="KD with fixed uniform weights (no meta step)",
    ),
    "metakd_fixed_kd": Recipe(
        "metakd",
        "metakd",
        ablation_of="metakd",
        required_method_kwargs=("kd_weights",),
        description="KD with fixed weights kd_weights={modality: weight} (e.g. an oracle; no meta step)",
    ),
}
"""Method name -> :class:`Recipe`."""

METHOD_HEADS: dict[str, str] = {name: r.head for name, r in RECIPES.items()}
"""Method name -> fusion head name."""


def list_methods(include_ablations: bool = True) -> list[str]:
    """Names accepted by :func:`create_method` (``include_ablations=False``: the methods and baselines only)."""
    return sorted(n for n, r in RECIPES.items() if include_ablations or r.ablation_of is None)


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown method {name!r}; known methods: {list_methods()}.")
    return RECIPES[name]


def _method_class(kind: str) -> type[Method]:
    if kind == "supervised":
        from medfusion.fusion.baselines import SupervisedMethod

        return SupervisedMethod
    if kind == "qmf":
        from medfusion.fusion.qmf import QMFMethod

        return QMFMethod
    if kind == "omnifuse":
        from medfusion.fusion.omnifuse import OmniFuseMethod

        return OmniFuseMethod
    from medfusion.fusion.metakd import MetaKDMethod

    return MetaKDMethod


def create_method(name: str, modalities: Sequence[str], kwargs: Mapping[str, Any] | None = None) -> Method:
    """Build the training recipe of method ``name``.

    Args:
        name: one of :func:`list_methods`.
        modalities: the network's ordered modality names.
        kwargs: recipe hyper-parameters (win over the recipe's defaults; passed to the method's constructor).
            MetaKD recipes default to ``task="classification"`` (the segmentation benchmark passes
            ``task="segmentation"``).

    Raises:
        KeyError: unknown method name (the message lists the known ones).
        ValueError: a kwarg the recipe requires is missing (e.g. ``kd_weights`` of ``metakd_fixed_kd``).
    """
    recipe = _recipe(name)
    kw = {**dict(recipe.method_kwargs), **dict(kwargs or {})}
    missing = [k for k in recipe.required_method_kwargs if k not in kw]
    if missing:
        raise ValueError(
            f"method {name!r} ({recipe.description}) needs method kwargs {missing}, e.g. "
            "--method_kwargs \"{'kd_weights': {'ehr': 0.5, 'cxr': 0.3, 'report': 0.2}}\"."
        )
    if recipe.method == "metakd":
        kw.setdefault("task", "classification")
    return _method_class(recipe.method)(modalities, **kw)


def head_name(name: str) -> str:
    """Fusion-head name of method ``name`` (for ``Classifier(head=...)``).

    Raises:
        KeyError: unknown method name.
    """
    return _recipe(name).head


def default_head_kwargs(
    name: str, num_train_samples: int, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Head kwargs the method needs (recipe defaults and data-dependent ones), updated with ``overrides``.

    QMF keeps a per-sample loss history in its head, so it needs ``num_samples`` = training-set size;
    the ablation recipes set their head switches (e.g. ``impute="off"``).

    Args:
        name: method name.
        num_train_samples: size of the training split (``sample_index`` range).
        overrides: further head kwargs (win over the defaults).

    Raises:
        KeyError: unknown method name.
    """
    recipe = _recipe(name)
    kw: dict[str, Any] = dict(recipe.head_kwargs)
    if recipe.head == "qmf":
        kw["num_samples"] = int(num_train_samples)
    kw.update(dict(overrides or {}))
    return kw


def build_method(
    name: str,
    modalities: Sequence[str],
    kwargs: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> Method:
    """:func:`create_method` with bundle context passed to the recipes that accept it.

    ``context`` holds what a bundle knows for every method (e.g. ``meta_loader``, ``tla_loader``,
    ``output_dir``, ``seed``, ``modality_dropout``); each entry is given only to recipes whose
    constructor has that parameter, so one config serves every method. ``modality_dropout`` (a
    dropout mode name) becomes a :class:`~medfusion.data.dropout.BatchModalityDropout` for recipes with
    a ``dropout`` callable (supervised baselines, QMF) and ``dropout_mode`` for MetaKD; OmniFuse
    simulates its own missingness. Entries of ``kwargs`` win over the context.

    Args:
        name: one of :func:`list_methods`.
        modalities: the network's ordered modality names.
        kwargs: recipe hyper-parameters.
        context: bundle-wide values (unused entries are ignored).

    Raises:
        KeyError: unknown method name.
    """
    params = set(inspect.signature(_method_class(_recipe(name).method).__init__).parameters)
    ctx = dict(context or {})
    mode = ctx.pop("modality_dropout", None)
    kw: dict[str, Any] = {k: v for k, v in ctx.items() if k in params and v is not None}
    if mode is not None:
        if "dropout_mode" in params:
            kw["dropout_mode"] = mode
        elif "dropout" in params and mode != "none":
            from medfusion.data.dropout import BatchModalityDropout

            kw["dropout"] = BatchModalityDropout(modalities, mode=mode, seed=int(ctx.get("seed", 0) or 0))
    kw.update(dict(kwargs or {}))
    return create_method(name, modalities, kw)
