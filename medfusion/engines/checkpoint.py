"""Checkpoints: atomic saving, loading, and resuming training from the newest one."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler

from medfusion.engines.frozen import FROZEN_KEY, by_reference, complete_state
from medfusion.engines.record import RECORD_KEY, read_checkpoint, run_difference

__all__ = [
    "load_checkpoint",
    "AtomicCheckpointSaver",
    "ValidationState",
    "find_last_checkpoint",
    "prepare_run_dir",
    "resume_handlers",
    "attach_checkpointing",
    "as_bool",
]

logger = logging.getLogger(__name__)


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
        ValueError: the file is empty or unreadable (one line naming it).
        KeyError: none of ``objects`` is in the file.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    names = list(objects)
    if not any(n in ckpt for n in names):
        if all(isinstance(v, torch.Tensor) for k, v in ckpt.items() if k != FROZEN_KEY):
            ckpt = {names[0]: ckpt}
        else:
            raise KeyError(f"checkpoint {path}: none of {names} found; it holds {sorted(ckpt)}.")
    for name, obj in objects.items():
        if name not in ckpt:
            continue
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(complete_state(obj, ckpt[name], path), strict=strict)
        else:
            obj.load_state_dict(ckpt[name])
    return ckpt


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically (temp file + rename).

    MONAI 1.6 turns ignite's atomic saving off because old ignite versions left the file readable
    by its owner only; ignite >= 0.4.11 restores group/other read permission after the rename, so
    the atomic mode is safe again and a crash mid-save can no longer leave a truncated checkpoint.
    Networks in ``save_dict`` are saved without their frozen encoders' weights (by reference, see
    :mod:`medfusion.engines.frozen`). All arguments are those of :class:`monai.handlers.CheckpointSaver`.
    """

    def __init__(self, save_dir: str, save_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(save_dir, by_reference(save_dict, save_dir), *args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True  # the DiskSaver flag MONAI sets to False


class ValidationState:
    """What validation remembers between epochs, as one checkpointable object.

    The evaluator's best metric and its epoch, the best-model saver's list of saved scores (without
    it the first validation after a resume always counts as a new best and overwrites ``model.pt``)
    and the early-stopping counter and best score. Put it in the trainer's checkpoint
    (``checkpoint_objects["validation"]``) so a resumed run keeps the same best model as an
    uninterrupted one.

    Args:
        evaluator: the validation ``SupervisedEvaluator``.
        handlers: its handlers (the ``val_handlers`` list); ``CheckpointSaver`` and ``EarlyStopHandler``
            states are kept, other handlers are ignored. Handlers not attached (ranks > 0 of a
            multi-process run) are restored harmlessly.
    """

    def __init__(self, evaluator: Any, handlers: Any = ()) -> None:
        self.evaluator = evaluator
        self.handlers = list(handlers or [])

    def _tracked(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, handler in enumerate(self.handlers):
            if isinstance(handler, CheckpointSaver) and handler._key_metric_checkpoint is not None:
                out[f"{i}_key_metric_saver"] = handler._key_metric_checkpoint
            elif isinstance(handler, EarlyStopHandler):
                out[f"{i}_early_stop"] = handler
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"best_metric", "best_metric_epoch", "<i>_key_metric_saver": {...}, "<i>_early_stop": {...}}``."""
        state = self.evaluator.state
        out: dict[str, Any] = {
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
        }
        for name, obj in self._tracked().items():
            if isinstance(obj, EarlyStopHandler):
                stopper = obj._handler
                if stopper is not None:
                    best = stopper.best_score
                    out[name] = {"counter": int(stopper.counter), "best_score": None if best is None else float(best)}
            else:  # plain Python numbers: weights_only loading accepts no numpy scalars
                out[name] = {"_saved": [(float(p), str(f)) for p, f in obj._saved]}
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the checkpoint's handler states do not match the configured handlers.
        """
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        tracked = self._tracked()
        saved = {k for k in state if k not in ("best_metric", "best_metric_epoch")}
        if saved - set(tracked):
            raise ValueError(
                f"checkpoint holds validation handler states {sorted(saved)} but the configuration has "
                f"{sorted(tracked)}; resume with the validation handlers of the original run."
            )
        for name, value in state.items():
            if name not in tracked:
                continue
            obj = tracked[name]
            if isinstance(obj, EarlyStopHandler):
                if obj._handler is None:
                    raise RuntimeError("EarlyStopHandler.set_trainer must be called before the checkpoint is loaded.")
                obj._handler.counter = int(value["counter"])
                obj._handler.best_score = value["best_score"]
            else:
                obj.load_state_dict({"_saved": [tuple(item) for item in value["_saved"]]})


def as_bool(value: bool | str, name: str) -> bool:
    """``True``/``False`` or the strings the MONAI CLI passes (``"true"``, ``"False"``, ``"1"`` ...).

    Raises:
        ValueError: anything else (the message names ``name``).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} must be true or false, got {value!r}.")
        return text in ("true", "1", "yes")
    return bool(value)


def _checkpoints(ckpt_dir: Path, prefix: str = "last") -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``<prefix>_checkpoint_*=N.pt`` in ``ckpt_dir``, oldest first."""
    found = []
    for path in ckpt_dir.glob(f"{prefix}_checkpoint_*=*.pt"):
        match = re.search(r"=(\d+)\.pt$", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_last_checkpoint(ckpt_dir: str | Path, prefix: str = "last") -> Path | None:
    """The newest interval checkpoint ``<prefix>_checkpoint_epoch=N.pt`` (largest N) in ``ckpt_dir``."""
    found = _checkpoints(Path(ckpt_dir), prefix)
    return found[-1][1] if found else None


#: Suffixes of the files a run writes into its checkpoint folder (removed by ``overwrite``).
RUN_FILE_SUFFIXES = (".pt", ".pth", ".json", ".ts")


def _run_files(ckpt_dir: Path) -> list[Path]:
    """Files directly in ``ckpt_dir`` (subfolders, e.g. another config's own folder, are not this run's)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def prepare_run_dir(ckpt_dir: str | Path, resume: bool | str = False, overwrite: bool | str = False) -> Path:
    """Make sure ``ckpt_dir`` receives one run: refuse another run's files unless ``resume`` or ``overwrite``.

    Args:
        ckpt_dir: the run's checkpoint folder (created).
        resume: the run continues the one in the folder (its run record is checked when loading).
        overwrite: start over: the previous run's checkpoint files (``*.pt``, ``*.pth``, ``*.json``,
            ``*.ts`` directly in the folder) are removed first. Other files and subfolders are left.

    Returns:
        ``ckpt_dir`` as a Path.

    Raises:
        FileExistsError: the folder holds files and neither ``resume`` nor ``overwrite`` is set (one line
            naming the folder and a file).
        ValueError: both ``resume`` and ``overwrite``.
    """
    resume, overwrite = as_bool(resume, "resume"), as_bool(overwrite, "overwrite")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite replaces it.")
    out = Path(ckpt_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"checkpoint folder {out} is a file.")
    files = _run_files(out)
    if files and not resume:
        if not overwrite:
            raise FileExistsError(
                f"checkpoint folder {out} already holds a run ({files[0].name}"
                + (f" and {len(files) - 1} more" if len(files) > 1 else "")
                + "); pass --resume True to continue it or --overwrite True to replace it."
            )
        for path in files:
            if path.suffix in RUN_FILE_SUFFIXES:
                path.unlink()
        logger.info("overwrite: removed the previous run's checkpoint files from %s", out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_handlers(
    resume: bool | str, ckpt_dir: str | Path, load_dict: Mapping[str, Any], record: Any = None
) -> list[Any]:
    """Handlers that resume training from the newest checkpoint of ``ckpt_dir`` when ``resume`` is true.

    Args:
        resume: ``False`` returns ``[]`` (the strings ``"true"``/``"false"`` from the MONAI CLI are accepted).
        ckpt_dir: where the trainer's ``CheckpointSaver`` writes ``last_checkpoint_epoch=N.pt``.
        load_dict: what to restore, e.g. ``{"model": net, "optimizer": opt, "trainer": trainer, ...}``
            (the same dict the saver writes, so every piece of method state comes back).
        record: the run's :class:`~medfusion.engines.record.RunRecord`; the checkpoint must hold the same.

    Raises:
        FileNotFoundError: ``resume`` is set but no checkpoint exists (the message names the folder).
        ValueError: the newest checkpoint belongs to another run (one line saying what differs).
    """
    if not as_bool(resume, "resume"):
        return []
    path = find_last_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(
            f"resume requested but {ckpt_dir} holds no last_checkpoint_epoch=N.pt; train without --resume first."
        )
    if record is not None:
        diff = run_difference(read_checkpoint(path).get(RECORD_KEY), record.state_dict())
        if diff:
            raise ValueError(
                f"cannot resume from {path}: it is another run's checkpoint ({diff}); resume with the original "
                "configuration, or pass --overwrite True to start over."
            )
    logger.info("resuming from %s", path)
    return [CheckpointLoader(load_path=str(path), load_dict=by_reference(load_dict, path), strict=True)]


def attach_checkpointing(
    trainer: Any,
    ckpt_dir: str | Path,
    objects: Mapping[str, Any],
    resume: bool | str = False,
    save_interval: int = 1,
    n_saved: int = 1,
    overwrite: bool | str = False,
    record: Any = None,
) -> Any:
    """Attach the "last" checkpoint (atomic, every ``save_interval`` epochs) and, if ``resume``, the loader.

    The checkpoint holds ``objects`` (model, optimizer, scheduler, ``"method"``: the recipe's own
    state, ``"validation"``: the best-model tracking) plus the trainer's epoch/iteration and the run
    record, so a resumed run continues where the file left off. Done in Python rather than in the
    bundle's handler list because the trainer cannot reference itself in a MONAI config. Only rank 0
    writes (ignite's ``DiskSaver`` default); every rank loads.

    Args:
        trainer: the ``SupervisedTrainer``.
        ckpt_dir: checkpoint folder; it must be empty unless ``resume`` or ``overwrite`` (see
            :func:`prepare_run_dir`).
        objects: ``{name: object with state_dict}``.
        resume: load the newest ``last_checkpoint_epoch=N.pt`` of ``ckpt_dir`` (same run record) before
            training; older ``last_checkpoint_*`` files are removed and the resumed one is replaced by the
            next save, so the folder keeps the newest ``n_saved``.
        save_interval: epochs between checkpoints.
        n_saved: how many to keep.
        overwrite: replace the run in ``ckpt_dir``.
        record: the run's :class:`~medfusion.engines.record.RunRecord` (saved as ``"record"``).

    Returns:
        ``trainer`` (so a config can chain ``.run()``).
    """
    import torch.distributed as dist

    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if rank0:
        prepare_run_dir(ckpt_dir, resume, overwrite)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank starts before rank 0 has checked (and, with overwrite, cleared) the folder
    save = {**objects, "trainer": trainer}
    if record is not None:
        save[RECORD_KEY] = record
    handlers = resume_handlers(resume, ckpt_dir, save, record)
    for handler in handlers:
        handler.attach(trainer)
    saver = AtomicCheckpointSaver(
        save_dir=str(ckpt_dir),
        save_dict=save,
        save_interval=save_interval,
        n_saved=n_saved,
        file_prefix="last",
        save_final=False,
        epoch_level=True,
    )
    if handlers and rank0:
        found = _checkpoints(Path(ckpt_dir))
        keep, drop = found[-n_saved:], found[:-n_saved]
        for _, path in drop:  # older files of this run (e.g. a kill between a save and its clean-up)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # the saver forgets its files across processes: tell it which ones are on disk, so the next save
        # replaces them instead of leaving them beside the new one
        interval = saver._interval_checkpoint
        assert interval is not None
        interval.load_state_dict({"_saved": [Checkpoint.Item(n, p.name) for n, p in keep]})
    saver.attach(trainer)
    return trainer
