"""Method recipes by name, so a bundle switches the method with ONE override (``--method_name qmf``).

A recipe pairs a fusion head (with default head kwargs) and a training method (with default method
kwargs). Recipes are registered where the method is defined, with :func:`register_method` on the
:class:`~medfusion.fusion.method.Method` class (after timm's ``@register_model``)::

    @register_method("qmf", head="qmf", description="QMF: energy-weighted late fusion")
    @register_method("qmf_no_detach", head="qmf", head_kwargs={"detach_weights": False}, ablation_of="qmf")
    class QMFMethod(DropoutMethod): ...

Importing :mod:`medfusion.fusion` imports every method module, so the registry is complete whenever
this module is usable. What varies between methods beyond the recipe's kwargs is a class hook of the
method: :meth:`~medfusion.fusion.method.Method.data_head_kwargs` (head kwargs sized by the training
data, e.g. QMF's ``num_samples``), :meth:`~medfusion.fusion.method.Method.evaluation_outputs`
(method-specific evaluation files, e.g. QMF's weight-vs-loss figure) and
:attr:`~medfusion.fusion.method.Method.training_head` (a staged method such as Meta Fusion trains its encoders
with another head, then fits its own head in stages: :func:`training_head`). Adding a method is its file plus
one import line in ``medfusion/fusion/__init__.py``.

The four published methods and the baselines have one recipe each; the ablations that isolate one
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from medfusion.fusion.method import Method

__all__ = [
    "Recipe",
    "RECIPES",
    "register_method",
    "method_class",
    "create_method",
    "list_methods",
    "head_name",
    "training_head",
    "default_head_kwargs",
    "build_method",
]

M = TypeVar("M", bound=type[Method])


@dataclass(frozen=True)
class Recipe:
    """One named method: fusion head + training recipe + their default kwargs.

    Attributes:
        head: registered fusion-head name.
        method_class: the training recipe's :class:`~medfusion.fusion.method.Method` class.
        head_kwargs: default head kwargs (the caller's win).
        method_kwargs: default method kwargs (the caller's win).
        ablation_of: the published method / baseline this recipe isolates an ingredient of (``None`` for the
            methods and baselines themselves).
        required_method_kwargs: method kwargs the caller must give (no sensible default).
        description: one line for listings and errors.
    """

    head: str
    method_class: type[Method]
    head_kwargs: Mapping[str, Any] = field(default_factory=dict)
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ablation_of: str | None = None
    required_method_kwargs: tuple[str, ...] = ()
    description: str = ""


RECIPES: dict[str, Recipe] = {}
"""Method name -> :class:`Recipe`, filled by :func:`register_method` (complete once :mod:`medfusion.fusion` is
imported)."""


def register_method(
    name: str,
    head: str,
    *,
    head_kwargs: Mapping[str, Any] | None = None,
    method_kwargs: Mapping[str, Any] | None = None,
    ablation_of: str | None = None,
    required_method_kwargs: Sequence[str] = (),
    description: str = "",
) -> Callable[[M], M]:
    """Class decorator registering the recipe ``name``: fusion head ``head`` trained by the decorated method.

    Stack it to register ablations of the same method class with other default kwargs.

    Args:
        name: the method name (a bundle's ``method_name``).
        head: registered fusion-head name (:func:`~medfusion.fusion.base.list_fusions`).
        head_kwargs: default head kwargs.
        method_kwargs: default method kwargs.
        ablation_of: the method / baseline this recipe isolates an ingredient of.
        required_method_kwargs: method kwargs the caller must give.
        description: one line for listings and errors.

    Returns:
        The decorator (returns the class unchanged).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(cls: M) -> M:
        if name in RECIPES:
            raise ValueError(f"method {name!r} is already registered.")
        RECIPES[name] = Recipe(
            head,
            cls,
            dict(head_kwargs or {}),
            dict(method_kwargs or {}),
            ablation_of,
            tuple(required_method_kwargs),
            description,
        )
        return cls

    return deco


def _registry() -> dict[str, Recipe]:
    import medfusion.fusion  # noqa: F401  (imports every method module: registration is complete)

    return RECIPES


def list_methods(include_ablations: bool = True) -> list[str]:
    """Names accepted by :func:`create_method` (``include_ablations=False``: the methods and baselines only)."""
    return sorted(n for n, r in _registry().items() if include_ablations or r.ablation_of is None)


def _recipe(name: str) -> Recipe:
    recipes = _registry()
    if name not in recipes:
        raise KeyError(f"unknown method {name!r}; known methods: {list_methods()}.")
    return recipes[name]


def method_class(name: str) -> type[Method]:
    """Training-recipe class of method ``name`` (its class hooks: ``data_head_kwargs``, ``evaluation_outputs``).

    Raises:
        KeyError: unknown method name.
    """
    return _recipe(name).method_class


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
    return recipe.method_class(modalities, **kw)


def head_name(name: str) -> str:
    """Fusion-head name of method ``name`` (for ``Classifier(head=...)``).

    Raises:
        KeyError: unknown method name.
    """
    return _recipe(name).head


def training_head(name: str) -> str:
    """Fusion-head name the network of method ``name`` trains with.

    The method's own head (:func:`head_name`), except for a staged method
    (:attr:`~medfusion.fusion.method.Method.training_head` set, e.g. Meta Fusion trains ``"concat"`` and fits its
    ``"meta_fusion"`` head afterwards).

    Raises:
        KeyError: unknown method name.
    """
    return _recipe(name).method_class.training_head or head_name(name)


def default_head_kwargs(
    name: str, num_train_samples: int | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Head kwargs the method needs (recipe defaults and data-sized ones), updated with ``overrides``.

    The data-sized kwargs come from the method class's
    :meth:`~medfusion.fusion.method.Method.data_head_kwargs` hook (QMF: ``num_samples`` = training-set size,
    the rows of its loss history); the ablation recipes set their head switches (e.g. ``impute="off"``).

    Args:
        name: method name.
        num_train_samples: size of the training split (``sample_index`` range); ``None`` (inference) leaves the
            data-sized kwargs out: loading the checkpoint sizes those buffers.
        overrides: further head kwargs (win over the defaults).

    Raises:
        KeyError: unknown method name.
    """
    recipe = _recipe(name)
    kw: dict[str, Any] = dict(recipe.head_kwargs)
    if num_train_samples is not None:
        kw.update(recipe.method_class.data_head_kwargs(int(num_train_samples)))
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
    params = set(inspect.signature(method_class(name).__init__).parameters)
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
