"""Atomic output: a whole output directory or file is written completely or not at all.

:func:`atomic_output_dir` builds a directory in a temporary sibling and renames it when complete;
:func:`atomic_file` does the same for one file. Used by the synthetic generators, every command that
writes a result folder, checkpoints and exports, so a failure (bad argument, disk full, Ctrl-C) never
leaves a half-written result behind. :func:`save_figure` writes a matplotlib figure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_output_dir", "atomic_file", "check_output_dir", "publish_mode", "save_figure"]


def publish_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file/folder made by ``mkstemp``/``mkdtemp`` (mode 600/700) the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to reuse a non-empty output directory unless ``overwrite``.

    Args:
        path: the directory that will receive results.
        overwrite: allow replacing an existing non-empty directory.

    Returns:
        The path as :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists, is not empty and ``overwrite`` is False; or it is a file.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Output path {out} exists and is a file; expected a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {out} already holds files; pass --overwrite (medfusion CLI) or --overwrite True "
            "(bundle run) to replace it."
        )
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary directory that becomes ``path`` on success.

    Args:
        path: final directory.
        overwrite: replace an existing non-empty ``path`` (only after the new one is complete).

    Yields:
        The temporary directory to write into (same parent as ``path`` so the rename is atomic).

    Raises:
        FileExistsError: see :func:`check_output_dir`.
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_mode(tmp, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a temporary file path in ``path``'s folder that replaces ``path`` on success.

    Readers never see a partial file; on an error the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write (parent folders created) and close a matplotlib figure.

    Args:
        fig: a matplotlib figure.
        path: image file to write (format from the suffix).
        dpi: resolution.

    Returns:
        ``path`` as :class:`~pathlib.Path`.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
