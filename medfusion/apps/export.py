"""Reuse a trained modality encoder outside medfusion: load it from a bundle, or export it.

Three entry points:

- :func:`load_encoder` rebuilds a bundle's ``network_def``, loads the checkpoint's ``"model"``
  weights and returns ONE modality's encoder (eval mode) with the preprocessing that turns one
  file (or value) of that modality into the encoder's input.
- :func:`export_encoder` / :func:`export_encoder_from_model` write the encoder as a TorchScript
  file (``torch.jit.trace`` of a wrapper returning ``(pooled, *maps)``; scripting does not work:
  the encoders return a NamedTuple holding a variable-length tuple) with a JSON description
  (modality, ``feature_info``, preprocessing) stored as an extra file, or, for the BERT text
  encoder, a ``transformers`` model directory (model + tokenizer + ``medfusion_encoder.json``).
- ``medfusion export-encoder`` (:func:`add_export_parser`, :func:`cmd_export_encoder`).

Reading an exported file back needs only PyTorch::

    extra = {"medfusion_encoder.json": ""}
    encoder = torch.jit.load("t1ce_encoder.ts", _extra_files=extra)
    info = json.loads(extra["medfusion_encoder.json"])
    pooled, *maps = encoder(x)  # x: [B, 1, D, H, W]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from medfusion.encoders.base import Encoder
from medfusion.encoders.text import BertEncoder
from medfusion.engines.record import RECORD_KEY, load_model, read_checkpoint
from medfusion.fusion.base import FusionModel
from medfusion.io import atomic_file
from medfusion.models.segmenter import Segmenter

__all__ = [
    "INFO_FILE",
    "load_bundle_model",
    "get_encoder",
    "encoder_preprocessing",
    "load_encoder",
    "export_encoder_from_model",
    "export_encoder",
    "load_exported_encoder",
    "parse_overrides",
    "cmd_export_encoder",
]

logger = logging.getLogger(__name__)

#: Name of the JSON description stored with an export (TorchScript extra file, or a file in the BERT directory).
INFO_FILE = "medfusion_encoder.json"
#: Encoder ``input_kind`` -> clinical modality kind of :mod:`medfusion.data.clinical`.
_CLINICAL_KIND = {"sequence": "ehr", "image": "image", "volume": "volume", "text": "text", "tabular": "tabular"}
#: Top-level bundle config ids passed on to :class:`~medfusion.data.clinical.LoadModalitiesByKindd` when present.
_CLINICAL_SETTINGS = (
    "image_size",
    "volume_size",
    "ehr_timestep",
    "ehr_max_hours",
    "ehr_normalizer",
    "tokenizer_dir",
    "max_length",
    "modality_kinds",
    "tabular_features",
)


# --------------------------------------------------------------------------------------------- bundle -> model
def _config_path(bundle_dir: Path, config: str | None) -> Path:
    cdir = bundle_dir / "configs"
    names = [config] if config is not None else ["inference.json", "train.json"]
    for name in names:
        path = cdir / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"bundle {bundle_dir}: no config {' or '.join(str(cdir / n) for n in names)}.")


def load_bundle_model(
    bundle_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    config: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    unchecked: Sequence[str] = (),
) -> tuple[nn.Module, Any]:
    """Build a bundle's ``network_def`` and load trained weights into it.

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/``).
        checkpoint: weights file; default ``<bundle_dir>/models/model.pt``. Either a MONAI
            ``CheckpointSaver`` file (weights under key ``"model"``) or a bare state dict.
        config: config file name in ``configs/``; default ``inference.json`` if present, else ``train.json``.
        overrides: ``{config id: value}`` applied before building, e.g. ``{"network_def#channels": [8, 16, 32, 64]}``
            (they must match what the checkpoint was trained with).
        unchecked: ``model_record`` keys not compared with the checkpoint's record (the router leaves out
            ``inputs``: its own data pipeline prepares the inputs of every routed model).

    Returns:
        ``(model in eval mode on CPU, monai.bundle.ConfigParser)``.

    Raises:
        FileNotFoundError: no bundle config or no checkpoint (the message says how to get one).
        ValueError: the checkpoint cannot be read, records another model than the config's ``model_record``
            asks for (modalities, order, method, head, input sizes: one line saying what differs) or does not
            fit ``network_def`` (see :func:`medfusion.engines.record.load_model`).
    """
    from monai.bundle import ConfigParser

    root = Path(bundle_dir)
    cfg = _config_path(root, config)
    ckpt = root / "models" / "model.pt" if checkpoint is None else Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt} does not exist; train the bundle first (python -m monai.bundle run "
            f"--config_file {root / 'configs' / 'train.json'} --bundle_root {root}; the best model is written to "
            f"<ckpt_dir>/model.pt) or pass --checkpoint / checkpoint= the path of a trained model.pt."
        )
    parser = ConfigParser()
    parser.read_config(str(cfg))
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))  # the model record names the bundle version
    parser["bundle_root"] = str(root)
    if "ckpt_path" in parser:
        parser["ckpt_path"] = str(ckpt)  # configs that read the checkpoint while building network_def
    for key, value in (overrides or {}).items():
        parser[key] = value
    if "network_def" not in parser:
        raise ValueError(f"bundle config {cfg} has no 'network_def'.")
    model = parser.get_parsed_content("network_def", instantiate=True)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"bundle config {cfg}: network_def built a {type(model).__name__}, expected a torch.nn.Module."
        )
    expected = parser.get_parsed_content("model_record") if "model_record" in parser else None
    if expected is not None:
        expected = {k: v for k, v in expected.items() if k not in set(unchecked)}
    try:
        load_model(ckpt, model, expected)
    except ValueError as err:
        raise ValueError(
            f"{err} (config {cfg}; pass the overrides the model was trained with, --override KEY=VALUE)"
        ) from None
    return model.eval(), parser


# --------------------------------------------------------------------------------------------- model -> encoder
def _model_modalities(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, (Segmenter, FusionModel)):
        return tuple(model.modalities)
    raise TypeError(
        f"cannot extract an encoder from a {type(model).__name__}; expected a medfusion Segmenter or "
        "FusionModel/Classifier."
    )


def get_encoder(model: nn.Module, modality: str) -> nn.Module:
    """The (trained) encoder a model applies to ``modality`` (the model's own module, not a copy).

    Args:
        model: a :class:`~medfusion.models.segmenter.Segmenter` (shared encoder, or one per modality with
            ``shared_encoder=False``) or a :class:`~medfusion.fusion.base.FusionModel` (``encoders[modality]``).
        modality: modality name.

    Raises:
        ValueError: ``modality`` is not one of the model's modalities (the message lists them).
        TypeError: unsupported model type.
    """
    modalities = _model_modalities(model)
    if modality not in modalities:
        raise ValueError(f"unknown modality {modality!r}; this model's modalities are {list(modalities)}.")
    if isinstance(model, Segmenter):
        return model.encoder if model.shared_encoder else cast(nn.ModuleDict, model.encoder)[modality]
    return cast(FusionModel, model).encoders[modality]  # _model_modalities accepted it: a FusionModel


class _Preprocess:
    """Callable returning one modality's encoder input from one file/value, with a JSON description."""

    def __init__(self, fn: Callable[[Any], Any], description: dict[str, Any]) -> None:
        self.fn = fn
        self.description = description

    def __call__(self, value: Any) -> Any:
        """Preprocess ``value`` (a file path, report text or list of numbers)."""
        return self.fn(value)

    def __repr__(self) -> str:
        return f"Preprocess({json.dumps(self.description)})"


def _volume_preprocessing(divisor: int) -> _Preprocess:
    from monai.transforms import Compose, DivisiblePad, EnsureType, LoadImage, NormalizeIntensity, Orientation

    chain = Compose(
        [
            LoadImage(image_only=True, ensure_channel_first=True),
            Orientation(axcodes="RAS"),
            NormalizeIntensity(nonzero=True, channel_wise=True),
            DivisiblePad(k=divisor),
            EnsureType(dtype=torch.float32, track_meta=False),
        ]
    )
    desc = {
        "input": "path of one 3D NIfTI volume of this modality",
        "steps": [
            "LoadImage(image_only=True, ensure_channel_first=True)",
            "Orientation(axcodes='RAS')",
            "NormalizeIntensity(nonzero=True, channel_wise=True)",
            f"DivisiblePad(k={divisor})",
            "EnsureType(float32)",
        ],
        "output": "[1, D, H, W] float32; add a batch dimension: [B, 1, D, H, W]",
        "matches": "medfusion.data.volume.brats_transforms (mode 'eval'/'infer') for one channel",
    }
    return _Preprocess(chain, desc)


def _clinical_preprocessing(modality: str, kind: str, settings: Mapping[str, Any]) -> _Preprocess:
    from medfusion.data.clinical import LoadModalitiesByKindd

    tabular = {}
    if kind == "tabular" and "in_features" in settings:
        tabular = {modality: int(settings["in_features"])}
    kw = {k: settings[k] for k in _CLINICAL_SETTINGS if k in settings}
    loader = LoadModalitiesByKindd({modality: kind}, mode="eval", tabular_features=tabular, **kw)

    def run(value: Any) -> torch.Tensor:
        return loader({modality: value})[modality]

    desc = {
        "input": f"one {kind!r} value (as in a medfusion clinical datalist)",
        "steps": [f"medfusion.data.clinical.LoadModalitiesByKindd({{{modality!r}: {kind!r}}}, mode='eval', **{kw})"],
        "output": "one sample's tensor; add a batch dimension",
        "matches": "medfusion.data.clinical.clinical_transforms (mode 'eval') for one modality",
    }
    return _Preprocess(run, desc)


def encoder_preprocessing(
    model: nn.Module, modality: str, settings: Mapping[str, Any] | None = None
) -> Callable[[Any], Any]:
    """Preprocessing that turns ONE file/value of ``modality`` into the encoder's input (no batch dim).

    Volume models (:class:`~medfusion.models.segmenter.Segmenter`): a MONAI ``Compose`` over a NIfTI path
    (``LoadImage`` -> ``Orientation`` RAS -> ``NormalizeIntensity`` on non-zero voxels, as
    :func:`~medfusion.data.volume.brats_transforms`, then ``DivisiblePad`` to the encoder's divisor) giving
    ``[1, D, H, W]``. Clinical models: the modality's sub-pipeline of
    :func:`~medfusion.data.clinical.clinical_transforms` in ``eval`` mode (kind from the encoder's ``input_kind``).

    Args:
        model: Segmenter or FusionModel.
        modality: modality name.
        settings: clinical loader settings (``image_size``, ``max_length``, ``tokenizer_dir``, ...; the bundle's
            ``modality_kinds`` ``{name: kind}`` and ``tabular_features`` when given).

    Returns:
        A callable with a ``description`` dict attribute (stored with exports).
    """
    encoder = get_encoder(model, modality)
    if isinstance(model, Segmenter):
        return _volume_preprocessing(model.divisor)
    s = dict(settings or {})
    kinds = s.pop("modality_kinds", None) or {}
    kind = kinds.get(modality) or _CLINICAL_KIND.get(getattr(encoder, "input_kind", ""), "tabular")
    tabular = s.pop("tabular_features", None) or {}
    if modality in tabular:
        s["in_features"] = int(tabular[modality])
    if kind == "tabular" and "in_features" not in s and isinstance(getattr(encoder, "in_features", None), int):
        s["in_features"] = encoder.in_features
    return _clinical_preprocessing(modality, kind, s)


def load_encoder(
    bundle_dir: str | os.PathLike,
    modality: str,
    checkpoint: str | os.PathLike | None = None,
    config: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Callable[[Any], Any]]:
    """A trained bundle's encoder for one modality, in eval mode, with its preprocessing.

    Args:
        bundle_dir: bundle folder.
        modality: modality name (e.g. ``"t1ce"``).
        checkpoint: default ``<bundle_dir>/models/model.pt``.
        config: ``"inference.json"`` (default when present) or ``"train.json"``.
        overrides: config overrides the model was trained with.

    Returns:
        ``(encoder, preprocess)``: ``encoder(x)`` returns ``EncoderOutput(pooled, maps)``;
        ``preprocess(path_or_value)`` returns one sample's input (see :func:`encoder_preprocessing`).

    Raises:
        FileNotFoundError: missing config/checkpoint. ValueError: unknown modality or incompatible checkpoint.
    """
    model, parser = load_bundle_model(bundle_dir, checkpoint, config, overrides)
    encoder = get_encoder(model, modality).eval()
    return encoder, encoder_preprocessing(model, modality, _settings(parser))


def _settings(parser: Any) -> dict[str, Any]:
    out = {}
    for key in _CLINICAL_SETTINGS:
        if key in parser:
            with contextlib.suppress(Exception):  # an unresolvable expression is simply not used
                out[key] = parser.get_parsed_content(key)
    return out


# --------------------------------------------------------------------------------------------- export
class _TupleOutput(nn.Module):
    """Wrap an encoder so it returns a flat tuple ``(pooled, *maps)`` (traceable)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(pooled [B, out_dim], *maps)``."""
        out = self.encoder(x)
        return (out.pooled, *out.maps)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"export output {out} already exists; pass --overwrite (overwrite=True) to replace it.")


def _encoder_info(encoder: nn.Module, modality: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "format": "medfusion-encoder/1",
        "modality": modality,
        "encoder_class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "input_kind": getattr(encoder, "input_kind", None),
        "out_dim": int(getattr(encoder, "out_dim", -1)),
        "feature_info": [
            {"channels": int(f.channels), "reduction": int(f.reduction), "name": str(f.name)}
            for f in getattr(encoder, "feature_info", [])
        ],
    }
    divisor = getattr(encoder, "divisor", None)
    if isinstance(divisor, int):
        info["spatial_divisor"] = divisor
    info.update(dict(extra or {}))
    return info


def _assert_close(ref: Sequence[torch.Tensor], got: Sequence[torch.Tensor], what: str) -> None:
    if len(ref) != len(got):
        raise RuntimeError(f"{what}: {len(got)} outputs, eager encoder gives {len(ref)}.")
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
            raise RuntimeError(
                f"{what}: output {i} differs from the eager encoder (shapes {list(a.shape)} vs {list(b.shape)}, "
                f"max abs diff {diff})."
            )


def _default_size(encoder: nn.Module, example_size: int | None) -> int:
    """``example_size``, else 16, at least twice the spatial divisor (instance norm needs > 1 bottleneck voxel)."""
    if example_size is not None:
        return int(example_size)
    divisor = getattr(encoder, "divisor", None)
    return max(16, 2 * divisor) if isinstance(divisor, int) else 16


def _second_input(encoder: nn.Module, example: torch.Tensor, example_size: int | None) -> torch.Tensor:
    """A different input for the trace check: other batch size and (where the encoder allows) other size."""
    if isinstance(encoder, Encoder):
        size = _default_size(encoder, example_size) + int(getattr(encoder, "divisor", 1) or 1)
        with contextlib.suppress(NotImplementedError):  # the base class example_input is abstract
            return encoder.example_input(batch_size=1 if example.shape[0] > 1 else 2, size=size)
    if example.is_floating_point():
        return torch.randn_like(example)
    return example.clone()


def _export_torchscript(
    encoder: nn.Module, out: Path, example: torch.Tensor, second: torch.Tensor, info: dict[str, Any]
) -> Path:
    wrapper = _TupleOutput(encoder).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # shape checks inside the encoders become constants in the trace; the outputs are checked below instead
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        for x, what in ((example, "traced encoder on the example input"), (second, "traced encoder on a 2nd input")):
            _assert_close(wrapper(x), traced(x), what)
    info["outputs"] = "tuple (pooled [B, out_dim], *maps shallow to deep)"
    info["example_input_shape"] = list(example.shape)
    info["example_input_dtype"] = str(example.dtype).replace("torch.", "")
    with atomic_file(out) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={INFO_FILE: json.dumps(info, indent=2)})
    return out


def _export_bert(
    encoder: BertEncoder, out: Path, example: torch.Tensor, info: dict[str, Any], overwrite: bool, tokenizer_dir: Any
) -> Path:
    from transformers import AutoModel

    from medfusion.data.text import get_tokenizer
    from medfusion.io import atomic_output_dir

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        encoder.bert.save_pretrained(str(tmp))
        get_tokenizer(tokenizer_dir).save_pretrained(str(tmp))
        has_proj = isinstance(encoder.proj, nn.Linear)
        if has_proj:
            torch.save(encoder.proj.state_dict(), tmp / "projection.pt")
        info.update(
            {
                "format": "medfusion-encoder-transformers/1",
                "pooling": encoder.pooling,
                "pooling_doc": (
                    "mean: sum(last_hidden_state * attention_mask) / sum(attention_mask) over tokens; "
                    "cls: last_hidden_state[:, 0]"
                ),
                "projection": (
                    {"file": "projection.pt", "type": "torch.nn.Linear state dict", "in": encoder.hidden_size}
                    if has_proj
                    else None
                ),
                "input": "tokenizer(texts, padding='max_length', truncation=True) -> input_ids, attention_mask",
                "load": "transformers.AutoModel.from_pretrained(dir); transformers.AutoTokenizer.from_pretrained(dir)",
            }
        )
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
        # verify the saved model reproduces the eager token states
        reloaded = AutoModel.from_pretrained(str(tmp), add_pooling_layer=False).eval()
        with torch.no_grad():
            ref = encoder.bert(input_ids=example[:, 0].long(), attention_mask=example[:, 1].long()).last_hidden_state
            got = reloaded(input_ids=example[:, 0].long(), attention_mask=example[:, 1].long()).last_hidden_state
        _assert_close([ref], [got], "saved transformers model")
    return out


def export_encoder_from_model(
    model: nn.Module,
    modality: str,
    out: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    overwrite: bool = False,
    example_size: int | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    extra_info: Mapping[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Export ``model``'s encoder for ``modality`` (core of :func:`export_encoder`).

    TorchScript (``.ts``/``.pt`` file) for every encoder except BERT: the traced module maps ``x`` to
    ``(pooled [B, out_dim], *maps)``, and is checked against the eager encoder on the example input and a
    second input of another batch (and, for volumes, spatial) size before anything is written. The file
    holds ``medfusion_encoder.json`` (modality, ``feature_info``, ``out_dim``, preprocessing) as an extra
    file. The write is atomic (temporary file + rename).

    BERT (:class:`~medfusion.encoders.text.BertEncoder`): ``out`` is a directory with the ``transformers``
    model (``save_pretrained``), the tokenizer, ``medfusion_encoder.json`` (pooling, projection) and, if
    the encoder projects its pooled vector, ``projection.pt``.

    Args:
        model: Segmenter or FusionModel (not modified: the encoder is copied).
        modality: modality name.
        out: output file (TorchScript) or directory (BERT).
        example_input: batched tracing input (default: ``encoder.example_input(2, example_size)``).
        overwrite: replace an existing ``out``.
        example_size: size passed to ``encoder.example_input`` (spatial side or sequence length; default 16,
            and at least twice the spatial divisor of volume encoders).
        preprocessing: JSON description of the preprocessing (default: :func:`encoder_preprocessing`'s).
        extra_info: more JSON fields for the description (e.g. the source bundle and checkpoint).
        tokenizer_dir: tokenizer saved with a BERT export (default: the bundled MiniLM tokenizer).

    Returns:
        ``out`` as a Path.

    Raises:
        FileExistsError: ``out`` exists and not ``overwrite``.
        ValueError: unknown modality. RuntimeError: the export does not reproduce the eager outputs.
    """
    target = Path(out)
    _check_out(target, overwrite)
    encoder = copy.deepcopy(get_encoder(model, modality)).eval()
    if preprocessing is None:
        try:
            preprocessing = getattr(encoder_preprocessing(model, modality), "description", None)
        except Exception as err:  # e.g. no tokenizer installed: describe instead of failing the export
            preprocessing = {"unavailable": f"{type(err).__name__}: {err}"}
    info = _encoder_info(encoder, modality, {"preprocessing": preprocessing, **dict(extra_info or {})})
    if example_input is None:
        if not isinstance(encoder, Encoder):
            raise ValueError(f"encoder of {modality!r} is not a medfusion Encoder; pass example_input.")
        torch.manual_seed(0)
        example_input = encoder.example_input(batch_size=2, size=_default_size(encoder, example_size))
    if isinstance(encoder, BertEncoder):
        return _export_bert(encoder, target, example_input, info, overwrite, tokenizer_dir)
    second = _second_input(encoder, example_input, example_size)
    return _export_torchscript(encoder, target, example_input, second, info)


def export_encoder(
    bundle_dir: str | os.PathLike,
    modality: str,
    out: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    example_size: int | None = None,
    config: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a trained bundle's encoder for ``modality`` (see :func:`export_encoder_from_model`).

    Args:
        bundle_dir: bundle folder.
        modality: modality name.
        out: ``.ts``/``.pt`` file (TorchScript) or, for a BERT encoder, a directory.
        checkpoint: default ``<bundle_dir>/models/model.pt``.
        overrides: config overrides the model was trained with.
        example_size: tracing input size (spatial side for volumes).
        config: bundle config file name (default ``inference.json``, else ``train.json``).
        overwrite: replace an existing ``out``.

    Returns:
        ``out`` as a Path.
    """
    target = Path(out)
    _check_out(target, overwrite)  # fail before building/loading anything
    model, parser = load_bundle_model(bundle_dir, checkpoint, config, overrides)
    settings = _settings(parser)
    pre = encoder_preprocessing(model, modality, settings)
    ckpt = Path(bundle_dir) / "models" / "model.pt" if checkpoint is None else Path(checkpoint)
    source: dict[str, Any] = {"bundle": str(Path(bundle_dir).resolve()), "checkpoint": str(ckpt.resolve())}
    record = read_checkpoint(ckpt).get(RECORD_KEY)
    if isinstance(record, Mapping) and isinstance(record.get("model"), Mapping):
        source["trained_on"] = dict(record["model"])  # modalities and order, method/head, inputs, bundle version
    if overrides:
        source["overrides"] = json.loads(json.dumps(dict(overrides), default=str))
    return export_encoder_from_model(
        model,
        modality,
        target,
        overwrite=overwrite,
        example_size=example_size,
        preprocessing=getattr(pre, "description", None),
        extra_info={"source": source},
        tokenizer_dir=settings.get("tokenizer_dir"),
    )


def load_exported_encoder(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript export and its JSON description.

    Args:
        path: file written by :func:`export_encoder`.

    Returns:
        ``(module, info)``: ``module(x)`` returns ``(pooled, *maps)``.

    Raises:
        FileNotFoundError: no such file. ValueError: not a medfusion encoder export.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"exported encoder {p} does not exist (a BERT export is a directory: use transformers)."
        )
    extra = {INFO_FILE: ""}
    module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    if not extra[INFO_FILE]:
        raise ValueError(f"{p} is a TorchScript file without {INFO_FILE}; not written by medfusion export-encoder.")
    return module.eval(), json.loads(extra[INFO_FILE])


# --------------------------------------------------------------------------------------------- CLI
def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["network_def#channels=[8,16,32,64]", "combination=all"]`` -> dict (values parsed as JSON, else strings).

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override {item!r}: expected key=value (e.g. 'network_def#channels=[8,16,32,64]').")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def cmd_export_encoder(args: argparse.Namespace) -> int:
    """Handler of ``medfusion export-encoder``; returns the exit code (0)."""
    out = export_encoder(
        args.bundle,
        args.modality,
        args.out,
        checkpoint=args.checkpoint,
        overrides=parse_overrides(args.override),
        example_size=args.example_size,
        config=args.config,
        overwrite=args.overwrite,
    )
    logger.info("exported the %s encoder to %s", args.modality, out)
    return 0
