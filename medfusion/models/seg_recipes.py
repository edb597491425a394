"""Segmentation method recipes by name: ``bundles/brats_metakd`` switches the method with ``--method_name``.

Same meaning as the clinical bundle's ``--method_name`` (:mod:`medfusion.fusion.recipes`): one name picks
the network (the fusion between the shared Segmenter encoders and the decoder) and the training recipe.
Recipes are registered with :func:`register_seg_method` on the training-recipe class, next to the network
(:mod:`medfusion.models.seg_baselines`, :mod:`medfusion.models.seg_qmf`, :mod:`medfusion.models.seg_omnifuse`);
the lookups below import those modules, so the registry is complete when it is read.

* ``metakd``: :class:`~medfusion.models.segmenter.Segmenter` + :class:`~medfusion.fusion.metakd.MetaKDMethod`;
* ``mean``: the Segmenter (mean imputation, paper Eq. 2) + MetaKDMethod with ``alpha = 0`` (no KD);
* ``hemis``: :class:`~medfusion.models.seg_baselines.HeMISSegmenter` + MetaKDMethod, ``alpha = 0``;
* ``late``: :class:`~medfusion.models.seg_baselines.LateSegmenter` + MetaKDMethod, ``alpha = 0``;
* ``qmf``: :class:`~medfusion.models.seg_qmf.QMFSegmenter` + :class:`~medfusion.models.seg_qmf.SegQMFMethod`;
* ``omnifuse``: :class:`~medfusion.models.seg_omnifuse.OmniFuseSegmenter` +
  :class:`~medfusion.models.seg_omnifuse.SegOmniFuseMethod` (its ``alpha``, the ``L_ra`` weight, is fixed to
  0.1 by the recipe so the bundle's MetaKD ``alpha`` does not reach it; ``method_kwargs`` can change it).

The baselines train with MetaKD's recipe at ``alpha = 0``: the Dice + BCE task loss and the same modality
dropout as MetaKD, with no KD term and no meta step, so the arms differ only in the fusion.

Keyword precedence in :func:`build_seg_method`: the recipe class's defaults < the bundle's shared settings
(``**context``, each given only to recipes whose constructor takes it) < the recipe's defining kwargs (e.g.
``alpha = 0`` of ``mean``: ``--method_name mean`` is no-KD whatever the bundle's ``alpha``) < the caller's
``method_kwargs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from medfusion.fusion.method import Method
from medfusion.modality import BRATS_MODALITIES, parse_combination

__all__ = [
    "SegRecipe",
    "SEG_RECIPES",
    "register_seg_method",
    "list_seg_methods",
    "segmenter_class",
    "create_segmenter",
    "build_seg_method",
]

M = TypeVar("M", bound=type[Method])


@dataclass(frozen=True)
class SegRecipe:
    """One named segmentation method: network class + training recipe + its default kwargs.

    Attributes:
        network: the network class (a :class:`~medfusion.models.segmenter.Segmenter` or subclass).
        method_class: the training recipe's :class:`~medfusion.fusion.method.Method` class.
        method_kwargs: the recipe's defining kwargs (win over the bundle's shared settings).
        description: one line for listings and errors.
    """

    network: type[nn.Module]
    method_class: type[Method]
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


SEG_RECIPES: dict[str, SegRecipe] = {}
"""Method name -> :class:`SegRecipe`, filled by :func:`register_seg_method`."""


def register_seg_method(
    name: str,
    network: type[nn.Module],
    *,
    method_kwargs: Mapping[str, Any] | None = None,
    description: str = "",
) -> Callable[[M], M]:
    """Class decorator registering the segmentation recipe ``name``: ``network`` trained by the decorated method.

    Args:
        name: the method name (the BraTS bundle's ``method_name``).
        network: the network class.
        method_kwargs: the recipe's defining kwargs (e.g. ``alpha=0`` of the no-KD baselines).
        description: one line for listings and errors.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(cls: M) -> M:
        if name in SEG_RECIPES:
            raise ValueError(f"segmentation method {name!r} is already registered.")
        SEG_RECIPES[name] = SegRecipe(network, cls, dict(method_kwargs or {}), description)
        return cls

    return deco


def _registry() -> dict[str, SegRecipe]:
    # the segmentation method modules (imported here, not by ``medfusion.fusion``: they build on
    # ``medfusion.models.segmenter``, which imports ``medfusion.fusion``)
    from medfusion.models import seg_baselines, seg_omnifuse, seg_qmf  # noqa: F401

    return SEG_RECIPES


def list_seg_methods() -> list[str]:
    """Names accepted by :func:`create_segmenter` and :func:`build_seg_method`."""
    return sorted(_registry())


def _recipe(name: str) -> SegRecipe:
    recipes = _registry()
    if name not in recipes:
        raise KeyError(f"unknown segmentation method {name!r}; known methods: {list_seg_methods()}.")
    return recipes[name]


def segmenter_class(name: str) -> type[nn.Module]:
    """Network class of method ``name``.

    Raises:
        KeyError: unknown method name.
    """
    return _recipe(name).network


def create_segmenter(
    method_name: str = "metakd", modalities: Sequence[str] = BRATS_MODALITIES, **kwargs: Any
) -> nn.Module:
    """The network of method ``method_name`` (``kwargs``: Segmenter and head arguments).

    Raises:
        KeyError: unknown method name.
    """
    return segmenter_class(method_name)(modalities, **kwargs)


def build_seg_method(
    method_name: str,
    modalities: Sequence[str],
    method_kwargs: Mapping[str, Any] | None = None,
    **context: Any,
) -> Method:
    """The training recipe of method ``method_name``.

    Args:
        method_name: one of :func:`list_seg_methods`.
        modalities: the network's ordered modality names.
        method_kwargs: the caller's recipe kwargs (win over everything).
        **context: the bundle's shared settings (``task``, ``alpha``, ``dropout_mode``, ``meta_loader``,
            ``output_dir``, ``seed``, ``num_samples``, ...); each is given only to recipes whose constructor
            takes it, ``None`` values are dropped. ``dropout_mode`` (with ``dropout_combination`` and
            ``dropout_p``) becomes a :class:`~medfusion.data.dropout.BatchModalityDropout` for recipes with a
            ``dropout`` callable (QMF); OmniFuse simulates its own missingness.

    Raises:
        KeyError: unknown method name.
    """
    recipe = _recipe(method_name)
    cls = recipe.method_class
    params = set(inspect.signature(cls.__init__).parameters)
    kw: dict[str, Any] = {k: v for k, v in context.items() if k in params and v is not None}
    mode = context.get("dropout_mode")
    if mode is not None and "dropout" in params and "dropout_mode" not in params and mode != "none":
        from medfusion.data.dropout import BatchModalityDropout

        combo = context.get("dropout_combination")
        kw["dropout"] = BatchModalityDropout(
            modalities,
            mode=mode,
            p=float(context.get("dropout_p") or 0.5),
            combination=None if combo is None else list(parse_combination(combo, modalities)),
            seed=int(context.get("seed") or 0),
        )
    kw.update(dict(recipe.method_kwargs))
    kw.update(dict(method_kwargs or {}))
    return cls(modalities, **kw)
