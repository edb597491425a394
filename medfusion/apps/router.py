"""Per-combination routing: several trained models, and per case the one chosen for the modalities it has.

``medfusion compare --routing METRIC`` writes ``routing.json`` from VALIDATION evaluations: per combination
the run whose model is best or tied-best, and per run its checkpoint, calibration file and the bundle keys
that rebuild its network. :class:`RoutedModel` holds those models; for each sample it reads the
``modality_mask``, names the combination, and runs the model routed to it. It is a drop-in network for both
bundles (``configs/router_evaluate.json`` measures it on the test split with the same all-combination
evaluator as any model; ``configs/router_inference.json`` deploys it) and :class:`RouteRecorder` writes
which model served each case (``routes.csv``).

Models are rebuilt from the bundle's own ``inference.json`` with each run's overrides by the project's bundle
model loader (:func:`medfusion.apps.export.load_bundle_model`, strict), so a checkpoint that does not fit its
configuration fails with the run named.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import torch
from ignite.engine import Events
from torch import nn

from medfusion.evaluation.calibration import TemperatureScaledClassifier, load_temperatures
from medfusion.evaluation.compare import read_routing
from medfusion.fusion.base import FusionOutput
from medfusion.modality import Keys, combination_name, combinations, mask_to_name, validate_modalities

__all__ = ["RoutedModel", "RouteRecorder", "load_routed_models", "build_router"]

logger = logging.getLogger(__name__)


def _take(x: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a tensor, or of every tensor inside dicts/lists (text inputs are dicts)."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)]
    if isinstance(x, Mapping):
        return {k: _take(v, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, idx) for v in x)
    return x


class RoutedModel(nn.Module):
    """Runs, per sample, the model routed to the modality combination the sample has.

    Args:
        models: ``{run name: network}``; every network takes the same inputs (``forward(inputs, mask)``).
        routes: ``{combination name: run name}`` (``routing.json``'s ``routes``).
        modalities: ordered modality names shared by every network.

    Raises:
        ValueError: a route names a run without a model, a combination is not a combination of
            ``modalities``, or a combination has no route (the message lists them).
    """

    def __init__(self, models: Mapping[str, nn.Module], routes: Mapping[str, str], modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = validate_modalities(modalities)
        names = [combination_name(c) for c in combinations(self.modalities)]
        unknown = sorted(set(routes) - set(names))
        if unknown:
            raise ValueError(f"router: routes for unknown combinations {unknown} (modalities {list(self.modalities)}).")
        missing = [n for n in names if n not in routes]
        if missing:
            raise ValueError(f"router: no route for combination(s) {missing}; the routing table must cover all.")
        absent = sorted({r for r in routes.values() if r not in models})
        if absent:
            raise ValueError(f"router: routes name run(s) {absent} without a model (models: {sorted(models)}).")
        self.models = nn.ModuleDict({k: models[k] for k in sorted(set(routes.values()))})
        self.routes = {n: str(routes[n]) for n in names}
        self.run_names = list(self.models)

    def route(self, modality_mask: torch.Tensor) -> list[str]:
        """Run name per row of a bool ``[B, M]`` mask.

        Raises:
            ValueError: a row without any modality.
        """
        out = []
        for row in modality_mask.bool().cpu():
            if not bool(row.any()):
                raise ValueError("router: a sample has no modality present; nothing to route.")
            out.append(self.routes[mask_to_name(row, self.modalities)])
        return out

    def _groups(self, modality_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        names = self.route(modality_mask)
        return {
            r: torch.tensor([i for i, n in enumerate(names) if n == r], dtype=torch.long) for r in dict.fromkeys(names)
        }

    def _full_mask(self, inputs: Any, modality_mask: torch.Tensor | None) -> torch.Tensor:
        if modality_mask is not None:
            return modality_mask.bool()
        first = inputs if isinstance(inputs, torch.Tensor) else next(iter(inputs.values()))
        while isinstance(first, Mapping):
            first = next(iter(first.values()))
        return torch.ones(first.shape[0], len(self.modalities), dtype=torch.bool, device=first.device)

    def forward(self, inputs: Any, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, K, ...]``: each sample's rows come from the model routed to its combination.

        Args:
            inputs: ``{modality: tensor}`` (classification) or ``image`` ``[B, M, D, H, W]`` (segmentation).
            modality_mask: bool ``[B, M]`` (default all present).
        """
        mask = self._full_mask(inputs, modality_mask)
        out: torch.Tensor | None = None
        for run, idx in self._groups(mask).items():
            part = self.models[run](_take(inputs, idx), mask[idx.to(mask.device)])
            if out is None:
                out = part.new_zeros((mask.shape[0], *part.shape[1:]))
            out[idx.to(out.device)] = part
        assert out is not None
        return out

    def forward_outputs(self, inputs: Any, modality_mask: torch.Tensor) -> FusionOutput:
        """``FusionOutput(logits, {}, {"route": [B] index into run_names})`` (the evaluator exports ``route``)."""
        logits = self.forward(inputs, modality_mask)
        route = torch.tensor([self.run_names.index(n) for n in self.route(modality_mask)], device=logits.device)
        return FusionOutput(logits=logits, embeddings={}, aux={"route": route.float()})

    def predict_combinations(
        self,
        image: torch.Tensor,
        combination_masks: torch.Tensor,
        modality_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Segmentation: logits of several combinations, each from its routed model's ``predict_combinations``.

        Args:
            image: ``[B, M, D, H, W]`` (windows of one case).
            combination_masks: bool ``[C, M]``.
            modality_mask: bool ``[1, M]`` or ``[B, M]`` availability, the same for every row.
            kwargs: passed to each routed model's ``predict_combinations`` (``batch_combinations``, ...).

        Returns:
            ``[B, C * out_channels, D, H, W]`` as :meth:`Segmenter.predict_combinations`.
        """
        avail = self._full_mask(image, modality_mask)
        if not bool((avail == avail[:1]).all()):
            raise ValueError("router.predict_combinations: rows with different available modalities; one case only.")
        combos = combination_masks.to(avail.device).bool()
        effective = combos & avail[:1]
        names = self.route(effective)
        pieces: dict[int, torch.Tensor] = {}
        for run in dict.fromkeys(names):
            sel = [c for c, n in enumerate(names) if n == run]
            out = cast(Any, self.models[run]).predict_combinations(image, combos[sel], modality_mask, **kwargs)
            per = out.shape[1] // len(sel)
            for k, c in enumerate(sel):
                pieces[c] = out[:, k * per : (k + 1) * per]
        return torch.cat([pieces[c] for c in range(len(names))], dim=1)


def _flatten(parser: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides as ``{id: value}``; a dict given for a component sets its arguments.

    A component is a config dict with ``_target_``: ``{"network_def": {"impute": "zero"}}`` therefore becomes
    ``{"network_def#impute": "zero"}`` (the component keeps its ``_target_``), while a plain dict such as
    ``encoders`` replaces the config's dict as a whole.
    """
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        current = parser.get(key) if key in parser else None
        if isinstance(value, Mapping) and isinstance(current, Mapping) and "_target_" in current:
            flat.update(_flatten(parser, {f"{key}#{sub}": v for sub, v in value.items()}))
        else:
            flat[key] = value
    return flat


def load_routed_models(
    routing_file: str | Path,
    bundle_root: str | Path,
    config_file: str = "inference.json",
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, nn.Module]:
    """Rebuild and load every routed run's network with the project's bundle model loader.

    For each run of ``routing.json``: :func:`medfusion.apps.export.load_bundle_model` builds ``network_def`` of
    ``<bundle_root>/configs/<config_file>`` with ``overrides`` (shared keys such as ``modalities``) then the run's
    own ``overrides`` (see :func:`_flatten`) and loads the run's checkpoint strictly; a run with a
    ``calibration_file`` is wrapped in :class:`TemperatureScaledClassifier`.

    Args:
        routing_file: ``routing.json`` from ``medfusion compare --routing``.
        bundle_root: the bundle folder.
        config_file: the bundle config that defines ``network_def``.
        overrides: keys applied to every run before its own.
        device: where the networks go (default CPU).

    Returns:
        ``{run name: network in eval mode}``.

    Raises:
        FileNotFoundError: routing file, config or a checkpoint missing (named).
        ValueError: a run without ``ckpt_path``, or a checkpoint that does not fit its run's network (the
            message names the run).
    """
    from monai.bundle import ConfigParser

    from medfusion.apps.export import load_bundle_model

    table = read_routing(routing_file)
    cfg = Path(bundle_root) / "configs" / config_file
    if not cfg.is_file():
        raise FileNotFoundError(f"router: bundle config {cfg} does not exist.")
    raw = ConfigParser()
    raw.read_config(str(cfg))
    models: dict[str, nn.Module] = {}
    for run in sorted(set(table["routes"].values())):
        spec = table["runs"][run]
        if not spec.get("ckpt_path"):
            raise ValueError(f"router: run {run!r} in {routing_file} has no ckpt_path.")
        flat = _flatten(raw, {**dict(overrides or {}), **dict(spec.get("overrides") or {})})
        try:
            net, parser = load_bundle_model(bundle_root, spec["ckpt_path"], config_file, flat, unchecked=("inputs",))
        except ValueError as err:
            raise ValueError(f"router: run {run!r}: {err}") from None
        if spec.get("calibration_file"):
            mods = parser.get_parsed_content("modalities")
            net = TemperatureScaledClassifier(net, mods, load_temperatures(spec["calibration_file"], mods))
        models[run] = net.to(device or "cpu").eval()
        logger.info("router: loaded run %s from %s", run, spec["ckpt_path"])
    return models


def build_router(
    routing_file: str | Path,
    bundle_root: str | Path,
    modalities: Sequence[str],
    config_file: str = "inference.json",
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> RoutedModel:
    """:class:`RoutedModel` of a ``routing.json`` (what the bundles' router configs call).

    Raises:
        ValueError: the table was made for other modalities than ``modalities``.
    """
    table = read_routing(routing_file)
    mods = list(validate_modalities(modalities))
    if table.get("modalities") not in (None, mods):
        raise ValueError(f"router: {routing_file} routes modalities {table['modalities']}, the config has {mods}.")
    models = load_routed_models(
        routing_file, bundle_root, config_file, {"modalities": mods, **dict(overrides or {})}, device
    )
    return RoutedModel(models, table["routes"], mods).to(device or "cpu").eval()


class RouteRecorder:
    """Inference handler writing which routed model served each case: ``case_id``, ``modalities``, ``model``.

    Args:
        output_csv: CSV path (``routes.csv`` beside the predictions).
        router: the :class:`RoutedModel` of the evaluator.
    """

    def __init__(self, output_csv: str | Path, router: RoutedModel) -> None:
        self.output_csv = Path(output_csv)
        self.router = router
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        """Register on ``STARTED`` (reset), ``ITERATION_COMPLETED`` (collect), ``COMPLETED`` (write)."""
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        items = list(batch) if isinstance(batch, (list, tuple)) else [batch]  # decollated or collated
        for item in items:
            mask = torch.as_tensor(item[Keys.MASK]).bool().reshape(-1, len(self.router.modalities))
            ids = item.get(Keys.CASE_ID, [str(len(self.rows) + i) for i in range(mask.shape[0])])
            ids = [ids] if isinstance(ids, str) else list(ids)
            for i, run in enumerate(self.router.route(mask)):
                name = mask_to_name(mask[i], self.router.modalities)
                self.rows.append({"case_id": str(ids[i]), "modalities": name, "model": run})

    def _write(self, engine: Any) -> None:
        self.output_csv.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.rows, columns=["case_id", "modalities", "model"]).to_csv(self.output_csv, index=False)
        logger.info("router: %d routed cases written to %s", len(self.rows), self.output_csv)
