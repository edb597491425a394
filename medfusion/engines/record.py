"""What a checkpoint says about its run and its model, and the one checked model loader.

Every checkpoint a bundle writes (``last_checkpoint_epoch=N.pt`` and the best ``model.pt``) holds a
run record under the key ``"record"``:

* the **run**: a hash of the training-relevant configuration (every config id except paths, device,
  worker counts and the resume/overwrite switches), the configuration itself, the seed, the modality
  names in order and the method name. A run resumes only from checkpoints with the same run record.
* the **model**: modality names and order, method/head and their kwargs, label convention, input sizes
  and the bundle version (the ``model_record`` item of the bundle config). Every loader
  (:func:`load_model`) compares it with what the loading configuration asks for and says in one line
  what differs.

Checkpoints written before records existed load with a warning.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from medfusion.engines.frozen import FROZEN_KEY, complete_state

__all__ = [
    "RECORD_KEY",
    "RunRecord",
    "training_config",
    "run_difference",
    "model_difference",
    "read_checkpoint",
    "load_model",
    "CheckedLoader",
    "stamp_record",
]

logger = logging.getLogger(__name__)

RECORD_KEY = "record"
"""Key of the run record in a checkpoint dict."""

FORMAT = "medfusion-run/1"

#: Top-level config ids that do not change what is trained (where files go, which device, how many workers,
#: how the run is started, when it stops: a resumed run may be given more epochs) and are left out of the
#: run's configuration hash. Ids starting with ``eval_`` or ``_`` (``_meta_``, ``_comment``) are left out too.
NOT_TRAINING = frozenset(
    {
        "bundle_root", "ckpt_dir", "output_dir", "ckpt_path", "resume", "overwrite", "device", "backend",
        "num_workers", "check_data", "data_check", "imports", "initialize", "run", "finalize", "model_record",
        "run_record", "max_epochs",
    }
)  # fmt: skip


def _plain(value: Any) -> Any:
    """JSON-safe copy (tuples -> lists, unknown objects -> their type name, never a memory address)."""
    return json.loads(json.dumps(value, sort_keys=True, default=lambda o: f"<{type(o).__qualname__}>"))


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping) and config:
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}#{key}" if prefix else str(key)))
        return out
    return {prefix: config}


def training_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training-relevant part of a raw bundle config, flattened to ``{"a#b": value}``.

    Args:
        config: the raw (unparsed) config dict, ``"@ref"`` and ``"$expr"`` strings as written.
    """
    kept = {k: v for k, v in config.items() if k not in NOT_TRAINING and not str(k).startswith(("eval_", "_"))}
    return _plain(_flatten(kept))


def _active_config() -> dict[str, Any] | None:
    """The raw config of the ``monai.bundle.ConfigParser`` evaluating the caller (``None`` outside one).

    MONAI gives a config expression no handle on its parser, so it is found on the call stack: the
    ``self`` of the parser's ``get_parsed_content`` frame.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, ConfigParser):
            return cast(dict[str, Any], obj.config)
        frame = frame.f_back
    return None


class RunRecord:
    """The run record written into every checkpoint (``checkpoint["record"]``).

    Built in a bundle config as ``"run_record"``; the training configuration is read from the config
    being parsed (or given as ``config``).

    Args:
        seed: the run's seed.
        modalities: modality names in the model's order.
        method: training method name.
        model: what the model was trained on (the config's ``model_record``: head, kwargs, label
            convention, input sizes, bundle version ...).
        config: the raw config dict (default: the one being parsed).
    """

    def __init__(
        self,
        seed: int,
        modalities: Sequence[str],
        method: str,
        model: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        if config is None:
            config = _active_config() or {}
        flat = training_config(config)
        text = json.dumps(flat, sort_keys=True)
        self.record: dict[str, Any] = {
            "format": FORMAT,
            "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16],
            "seed": int(seed),
            "modalities": [str(m) for m in modalities],
            "method": str(method),
            "model": _plain({"modalities": [str(m) for m in modalities], "method": str(method), **dict(model or {})}),
            "config": text,
        }

    def state_dict(self) -> dict[str, Any]:
        """The record (plain Python values: ``torch.load(weights_only=True)`` reads it)."""
        return json.loads(json.dumps(self.record))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Called when a run resumes: the checkpoint's record must be this run's.

        Raises:
            ValueError: the records differ (one line saying what differs).
        """
        diff = run_difference(state, self.record)
        if diff:
            raise ValueError(f"cannot resume: the checkpoint is from another run ({diff}).")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def run_difference(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """What differs between a checkpoint's run record and the current run's (``None``: the same run)."""
    if not saved:
        return "the checkpoint has no run record (written by an older medfusion)"
    parts = []
    if saved.get("modalities") != current.get("modalities"):
        parts.append(f"modalities {saved.get('modalities')} in the checkpoint, {current.get('modalities')} now")
    for key in ("method", "seed"):
        if saved.get(key) != current.get(key):
            parts.append(f"{key} {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now")
    if saved.get("config_hash") != current.get("config_hash"):
        old, new = json.loads(saved.get("config", "{}")), json.loads(current.get("config", "{}"))
        keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
        shown = [f"{k}: {_short(old.get(k, '<unset>'))} -> {_short(new.get(k, '<unset>'))}" for k in keys[:3]]
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        parts.append("config " + ("; ".join(shown) + more if shown else "hash differs"))
    return "; ".join(parts) or None


#: Model record keys written for the reader but never compared: the bundle and its version (a newer bundle
#: loads an older model), the training crop (evaluation may slide another window over the volume) and the
#: BraTS label convention (the model predicts TC/WT/ET regions whatever a dataset's label values; the
#: convention maps a dataset's labels to those regions, so a model may be evaluated on another convention).
RECORDED_ONLY = frozenset({"bundle", "bundle_version", "roi_size", "label_convention"})


def model_difference(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """What differs between the model a checkpoint records and the one a configuration asks for.

    Only keys present in both are compared (a configuration states what it depends on), except
    :data:`RECORDED_ONLY`.
    """
    old_flat, new_flat = _flatten(_plain(dict(saved))), _flatten(_plain(dict(expected)))
    parts = []
    for key in sorted(set(old_flat) & set(new_flat)):
        if key.split("#")[0] in RECORDED_ONLY:
            continue
        old, new = old_flat[key], new_flat[key]
        if old != new:
            if key == "modalities":
                parts.append(f"trained on [{', '.join(old)}], asked for [{', '.join(new)}]")
            else:
                parts.append(f"{key}: trained with {_short(old)}, asked for {_short(new)}")
    return "; ".join(parts) or None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    Raises:
        FileNotFoundError: no such file. ValueError: empty, corrupt or not a checkpoint dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist (train the bundle first, or pass the right path).")
    if p.stat().st_size == 0:
        raise ValueError(f"checkpoint {p} is empty (0 bytes).")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/non-checkpoint files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"checkpoint {p} cannot be read ({type(err).__name__}: {first[:200]}).") from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {p} holds a {type(ckpt).__name__}, expected a dict.")
    return dict(ckpt)


def _state_dict(ckpt: Mapping[str, Any], path: Path, key: str) -> Mapping[str, torch.Tensor]:
    if key in ckpt and isinstance(ckpt[key], Mapping):
        return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for k, v in ckpt.items() if k != FROZEN_KEY):
        return ckpt  # a bare state dict
    raise ValueError(f"checkpoint {path}: no {key!r} weights; it holds {sorted(ckpt)}.")


def _fit_error(network: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    sizes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (first {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected weights (first {extra[0]})")
    if sizes:
        k = sizes[0]
        parts.append(
            f"{len(sizes)} of other shape (first {k}: {list(state[k].shape)} in the file, {list(own[k].shape)} here)"
        )
    return "; ".join(parts) or None


def load_model(
    path: str | Path,
    network: torch.nn.Module,
    expected: Mapping[str, Any] | None = None,
    key: str = "model",
    strict: bool = True,
) -> dict[str, Any]:
    """The one checked loader: read ``path``, check its record against ``expected``, load the weights.

    Used by bundle evaluation and inference, ``medfusion evaluate``, :func:`medfusion.apps.export.load_bundle_model`
    (``load_encoder``, ``export-encoder``, the router, the DICOM app) and Meta Fusion.

    Args:
        path: checkpoint file (``{"model": state_dict, "record": ...}``, or a bare state dict).
        network: the model to fill (unwrapped).
        expected: what the loading configuration asks for (its ``model_record``; keys compared where
            both sides have them). ``None`` skips the check.
        key: the weights' key in the file.
        strict: every weight must fit (``nn.Module.load_state_dict(strict=...)``).

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, another model than asked for, or
        weights that do not fit ``network`` (one line each, naming the file).
    """
    p = Path(path)
    ckpt = read_checkpoint(p)
    record = ckpt.get(RECORD_KEY)
    if expected is not None:
        if not isinstance(record, Mapping) or not isinstance(record.get("model"), Mapping):
            logger.warning("checkpoint %s has no record of what it was trained on; loading it unchecked.", p)
        else:
            diff = model_difference(record["model"], expected)
            if diff:
                raise ValueError(f"checkpoint {p} does not match the configuration: {diff}.")
    state = complete_state(network, _state_dict(ckpt, p, key), p)  # frozen encoders saved by reference
    try:  # modules may size buffers from the checkpoint while loading (QMF's history), so load first
        network.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {p} does not fit the configured network: {_fit_error(network, state) or e}."
        ) from e
    return ckpt


def stamp_record(path: str | Path, record: RunRecord) -> Path:
    """Add ``record`` to a checkpoint written without one (e.g. Meta Fusion's ``model.pt``), atomically.

    Returns:
        ``path``.
    """
    from medfusion.io import atomic_file

    p = Path(path)
    ckpt = read_checkpoint(p)
    ckpt[RECORD_KEY] = record.state_dict()
    with atomic_file(p) as tmp:
        torch.save(ckpt, tmp)
    return p


class CheckedLoader:
    """Ignite handler: :func:`load_model` when the engine starts.

    Replaces MONAI's ``CheckpointLoader`` in inference configs, so inference checks the checkpoint's
    record like every other loader.

    Args:
        load_path: checkpoint file.
        network: the model to fill.
        expected: the configuration's ``model_record``.
    """

    def __init__(self, load_path: str | Path, network: torch.nn.Module, expected: Mapping[str, Any] | None = None):
        self.load_path = load_path
        self.network = network
        self.expected = expected

    def attach(self, engine: Any) -> None:
        """Load on ``Events.STARTED``."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _: load_model(self.load_path, self.network, self.expected))
