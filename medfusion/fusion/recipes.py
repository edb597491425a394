"""Method recipes by name, so a bundle switches the method with ONE override (``--method qmf``).

Each fusion head has a matching training recipe; this table is the one place that pairs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medfusion.engines.method import Method

__all__ = ["METHOD_HEADS", "create_method", "list_methods"]

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
