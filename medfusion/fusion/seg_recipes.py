"""Segmentation method recipes by name: ``bundles/brats_metakd`` switches the method with ``--method_name``.

Same meaning as the clinical bundle's ``--method_name`` (:mod:`medfusion.fusion.recipes`): one name picks
the network (the fusion between the shared Segmenter encoders and the decoder) and the training recipe.

* ``metakd``: :class:`~medfusion.models.segmenter.Segmenter` + :class:`~medfusion.fusion.metakd.MetaKDMethod`;
* ``mean``: the Segmenter (mean imputation, paper Eq. 2) + MetaKDMethod with ``alpha = 0`` (no KD);
* ``hemis``: :class:`~medfusion.fusion.seg_baselines.HeMISSegmenter` + MetaKDMethod, ``alpha = 0``;
* ``late``: :class:`~medfusion.fusion.seg_baselines.LateSegmenter` + MetaKDMethod, ``alpha = 0``;
* ``qmf``: :class:`~medfusion.fusion.seg_qmf.QMFSegmenter` + :class:`~medfusion.fusion.seg_qmf.SegQMFMethod`;
* ``omnifuse``: :class:`~medfusion.fusion.seg_omnifuse.OmniFuseSegmenter` +
  :class:`~medfusion.fusion.seg_omnifuse.SegOmniFuseMethod` (its ``alpha``, the ``L_ra`` weight, is fixed to
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
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from medfusion.engines.method import Method
from medfusion.fusion.recipes import Recipe
from medfusion.modality import BRATS_MODALITIES, parse_combination

__all__ = ["SEG_RECIPES", "list_seg_methods", "segmenter_class", "create_segmenter", "build_seg_method"]

SEG_RECIPES: dict[str, Recipe] = {
    "metakd": Recipe("segmenter", "metakd", description="MetaKD: KD weighted by meta-learned importance weights"),
    "mean": Recipe("segmenter", "metakd", method_kwargs={"alpha": 0.0}, description="mean imputation, no KD"),
    "hemis": Recipe("hemis", "metakd", method_kwargs={"alpha": 0.0}, description="HeMIS: mean + variance per level"),
    "late": Recipe(
        "late", "metakd", method_kwargs={"alpha": 0.0}, description="late fusion: average of per-modality probabilities"
    ),
    "qmf": Recipe("qmf", "qmf", description="QMF: voxel-wise energy-weighted late fusion, weights detached"),
    # alpha is OmniFuse's L_ra weight (0.1), not MetaKD's KD weight of the bundle's shared settings
    "omnifuse": Recipe(
        "omnifuse",
        "omnifuse",
        method_kwargs={"alpha": 0.1},
        description="OmniFuse: bottleneck CRA imputation + DWFuse + TLA",
    ),
}
"""Method name -> :class:`~medfusion.fusion.recipes.Recipe` (``head`` names the network class)."""


def list_seg_methods() -> list[str]:
    """Names accepted by :func:`create_segmenter` and :func:`build_seg_method`."""
    return sorted(SEG_RECIPES)


def _recipe(name: str) -> Recipe:
    if name not in SEG_RECIPES:
        raise KeyError(f"unknown segmentation method {name!r}; known methods: {list_seg_methods()}.")
    return SEG_RECIPES[name]


def segmenter_class(name: str) -> type[nn.Module]:
    """Network class of method ``name``.

    Raises:
        KeyError: unknown method name.
    """
    head = _recipe(name).head
    if head == "hemis":
        from medfusion.fusion.seg_baselines import HeMISSegmenter

        return HeMISSegmenter
    if head == "late":
        from medfusion.fusion.seg_baselines import LateSegmenter

        return LateSegmenter
    if head == "qmf":
        from medfusion.fusion.seg_qmf import QMFSegmenter

        return QMFSegmenter
    if head == "omnifuse":
        from medfusion.fusion.seg_omnifuse import OmniFuseSegmenter

        return OmniFuseSegmenter
    from medfusion.models.segmenter import Segmenter

    return Segmenter


def create_segmenter(
    method_name: str = "metakd", modalities: Sequence[str] = BRATS_MODALITIES, **kwargs: Any
) -> nn.Module:
    """The network of method ``method_name`` (``kwargs``: Segmenter and head arguments).

    Raises:
        KeyError: unknown method name.
    """
    return segmenter_class(method_name)(modalities, **kwargs)


def _method_class(kind: str) -> type[Method]:
    if kind == "qmf":
        from medfusion.fusion.seg_qmf import SegQMFMethod

        return SegQMFMethod
    if kind == "omnifuse":
        from medfusion.fusion.seg_omnifuse import SegOmniFuseMethod

        return SegOmniFuseMethod
    from medfusion.fusion.metakd import MetaKDMethod

    return MetaKDMethod


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
    cls = _method_class(recipe.method)
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
