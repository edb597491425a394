"""Method recipes by name, so a bundle switches the method with ONE override (``--method qmf``).

Each fusion head has a matching training recipe; this table is the one place that pairs them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from medfusion.engines.method import Method

__all__ = [
    "METHOD_HEADS",
    "create_method",
    "list_methods",
    "head_name",
    "default_head_kwargs",
    "build_method",
]

METHOD_HEADS: dict[str, str] = {
    "concat": "concat",
    "late": "late",
    "mean_features": "mean_features",
    "qmf": "qmf",
    "omnifuse": "omnifuse",
    "metakd": "metakd",
}
"""Method name -> fusion head name."""


def list_methods() -> list[str]:
    """Names accepted by :func:`create_method`."""
    return sorted(METHOD_HEADS)


def create_method(name: str, modalities: Sequence[str], kwargs: Mapping[str, Any] | None = None) -> Method:
    """Build the training recipe of method ``name``.

    Args:
        name: one of :func:`list_methods`.
        modalities: the network's ordered modality names.
        kwargs: recipe hyper-parameters (passed to the recipe's constructor).

    Raises:
        KeyError: unknown method name (the message lists the known ones).
    """
    kw = dict(kwargs or {})
    if name in ("concat", "late", "mean_features"):
        from medfusion.fusion.baselines import SupervisedMethod

        return SupervisedMethod(modalities, **kw)
    if name == "qmf":
        from medfusion.fusion.qmf import QMFMethod

        return QMFMethod(modalities, **kw)
    if name == "omnifuse":
        from medfusion.fusion.omnifuse import OmniFuseMethod

        return OmniFuseMethod(modalities, **kw)
    if name == "metakd":
        from medfusion.fusion.metakd import MetaKDMethod

        kw.setdefault("task", "classification")
        return MetaKDMethod(modalities, **kw)
    raise KeyError(f"unknown method {name!r}; known methods: {list_methods()}.")


def _check_name(name: str) -> str:
    if name not in METHOD_HEADS:
        raise KeyError(f"unknown method {name!r}; known methods: {list_methods()}.")
    return name


def head_name(name: str) -> str:
    """Fusion-head name of method ``name`` (for ``Classifier(head=...)``).

    Raises:
        KeyError: unknown method name.
    """
    return METHOD_HEADS[_check_name(name)]


def default_head_kwargs(
    name: str, num_train_samples: int, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Head kwargs the method needs from its data, updated with ``overrides``.

    QMF keeps a per-sample loss history in its head, so it needs ``num_samples`` = training-set size;
    the other heads need nothing from the data.

    Args:
        name: method name.
        num_train_samples: size of the training split (``sample_index`` range).
        overrides: further head kwargs (win over the defaults).

    Raises:
        KeyError: unknown method name.
    """
    kw: dict[str, Any] = {}
    if _check_name(name) == "qmf":
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
    _check_name(name)
    probe = create_method(name, modalities, {k: v for k, v in (kwargs or {}).items() if k == "task"})
    params = set(inspect.signature(type(probe).__init__).parameters)
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
