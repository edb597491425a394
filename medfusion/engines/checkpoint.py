"""Loading checkpoints written by MONAI's ``CheckpointSaver``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_checkpoint"]


def load_checkpoint(path: str | Path, objects: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """Restore ``objects`` (``{"model": network, "metakd": state, ...}``) from ``path``.

    ``CheckpointSaver`` writes ``{name: state_dict}`` when given several objects and a bare
    state dict when given one; both are accepted (a bare state dict goes to the first object).
    Objects absent from the file are left as they are (e.g. an optimizer in an inference run).

    Args:
        path: checkpoint file.
        objects: name -> object with ``load_state_dict``.
        strict: passed to ``nn.Module.load_state_dict``.

    Returns:
        The raw checkpoint dict.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        KeyError: none of ``objects`` is in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train the bundle first, or pass the right path).")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    names = list(objects)
    if not any(n in ckpt for n in names):
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {names[0]: ckpt}
        else:
            raise KeyError(f"checkpoint {path}: none of {names} found; it holds {sorted(ckpt)}.")
    for name, obj in objects.items():
        if name not in ckpt:
            continue
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(ckpt[name], strict=strict)
        else:
            obj.load_state_dict(ckpt[name])
    return ckpt
