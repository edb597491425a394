"""Meta Fusion's cohort: student specs, the students and the latent maps they read.

* latent extractors per modality, written as strings: ``null`` (modality dropped), ``identity``,
  ``pca:<k>`` (fitted on the training split, stored as buffers), ``slice:<k>`` (first ``k`` columns of a
  given feature matrix, e.g. a supervised encoder's output) and ``mlp:<k>`` (a trainable
  ``F -> extractor_hidden -> k`` projection owned by the student) (:class:`ExtractorSpec`);
* the cohort = cartesian product of the per-modality extractor lists minus the all-null student
  (:func:`build_cohort`); early / late fusion are presets of the same code
  (:func:`early_fusion_spec`, :func:`late_fusion_spec`);
* :class:`Student`: optional ``mlp`` extractors + an MLP head on the concatenated latents;
* :class:`StudentCohort`: the module owning the students (mutual-learning and screened copies), the shared
  fixed latent maps (PCA buffers) and which student can see which sample (a student needs all its non-null
  modalities). :class:`~medfusion.fusion.meta_fusion.model.MetaFusion` extends it with the training stages
  and the aggregation rules.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from medfusion.encoders.base import EncoderOutput
from medfusion.modality import check_mask, validate_modalities

__all__ = [
    "EXTRACTOR_KINDS",
    "ExtractorSpec",
    "StudentSpec",
    "MetaFusionData",
    "build_cohort",
    "early_fusion_spec",
    "late_fusion_spec",
    "pooled_features",
    "Student",
    "StudentCohort",
]

EXTRACTOR_KINDS: tuple[str, ...] = ("null", "identity", "pca", "slice", "mlp")
"""Latent extractor kinds; ``pca``, ``slice`` and ``mlp`` take an output size (``"pca:20"``)."""


# ----------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ExtractorSpec:
    """One latent extractor of one modality.

    Attributes:
        kind: one of :data:`EXTRACTOR_KINDS`.
        dim: output size for ``pca``/``slice``/``mlp``; ``None`` for ``null``/``identity``.
    """

    kind: str
    dim: int | None = None

    @classmethod
    def parse(cls, text: str | ExtractorSpec, *, field: str = "extractor") -> ExtractorSpec:
        """Parse ``"null"``, ``"identity"``, ``"pca:20"``, ``"slice:8"`` or ``"mlp:16"``.

        Args:
            text: the spec string (or an :class:`ExtractorSpec`, returned unchanged).
            field: config field named in error messages.

        Raises:
            ValueError: unknown kind, missing/extra size, or a size < 1.
        """
        if isinstance(text, ExtractorSpec):
            return text
        kind, _, size = str(text).strip().partition(":")
        if kind not in EXTRACTOR_KINDS:
            raise ValueError(f"{field}: unknown extractor {text!r}; expected one of {list(EXTRACTOR_KINDS)}.")
        if kind in ("null", "identity"):
            if size:
                raise ValueError(f"{field}: extractor {kind!r} takes no size, got {text!r}.")
            return cls(kind)
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"{field}: extractor {kind!r} needs a positive size like '{kind}:16', got {text!r}.")
        return cls(kind, int(size))

    def __str__(self) -> str:
        return self.kind if self.dim is None else f"{self.kind}:{self.dim}"


@dataclass(frozen=True)
class StudentSpec:
    """Which extractor each modality uses in one student.

    Attributes:
        extractors: ``((modality, ExtractorSpec), ...)`` in modality order.
    """

    extractors: tuple[tuple[str, ExtractorSpec], ...]

    @classmethod
    def from_mapping(cls, spec: Mapping[str, str | ExtractorSpec], modalities: Sequence[str]) -> StudentSpec:
        """Build from ``{modality: "pca:8", ...}``; modalities not named are ``null``.

        Raises:
            ValueError: a key is not a modality, a spec string is invalid, or every modality is null.
        """
        mods = validate_modalities(modalities)
        bad = [k for k in spec if k not in mods]
        if bad:
            raise ValueError(f"cohort: student spec names unknown modalities {bad}; expected some of {list(mods)}.")
        out = cls(tuple((m, ExtractorSpec.parse(spec.get(m, "null"), field=f"cohort[{m}]")) for m in mods))
        if not out.modalities:
            raise ValueError(f"cohort: student {dict(spec)} uses no modality; at least one must be non-null.")
        return out

    @property
    def modalities(self) -> tuple[str, ...]:
        """Names of the non-null modalities (the student needs all of them present)."""
        return tuple(m for m, e in self.extractors if e.kind != "null")

    @property
    def name(self) -> str:
        """Readable name, e.g. ``"a=pca:8+b=identity"`` (null modalities omitted)."""
        return "+".join(f"{m}={e}" for m, e in self.extractors if e.kind != "null")

    def as_dict(self) -> dict[str, str]:
        """JSON form ``{modality: spec string}`` (all modalities, null included)."""
        return {m: str(e) for m, e in self.extractors}


class MetaFusionData(NamedTuple):
    """One split for :class:`MetaFusion`.

    Attributes:
        x: ``{modality: [N, F_m]}`` float features (absent rows may hold anything; zero by convention).
        mask: bool ``[N, M]`` in the model's modality order, True = present.
        y: ``[N]`` long class indices (classification) or float targets (regression).
    """

    x: Mapping[str, torch.Tensor]
    mask: torch.Tensor
    y: torch.Tensor


def build_cohort(grids: Mapping[str, Sequence[str]]) -> list[StudentSpec]:
    """Cartesian product of the per-modality extractor lists minus the all-null student.

    Args:
        grids: ``{modality: [extractor spec, ...]}``; the dict order is the modality order, and the
            product is enumerated with the LAST modality varying fastest (``itertools.product``).

    Returns:
        The students, in product order.

    Raises:
        ValueError: an empty grid, a duplicate or invalid spec, or no student left.
    """
    mods = validate_modalities(list(grids), field="cohort grids")
    parsed: list[list[ExtractorSpec]] = []
    for m in mods:
        specs = [ExtractorSpec.parse(s, field=f"cohort grids[{m}]") for s in grids[m]]
        if not specs:
            raise ValueError(f"cohort grids[{m}]: expected at least one extractor, got none.")
        if len(set(specs)) != len(specs):
            raise ValueError(f"cohort grids[{m}]: duplicate extractors in {[str(s) for s in specs]}.")
        parsed.append(specs)
    cohort = [
        StudentSpec(tuple(zip(mods, combo)))
        for combo in itertools.product(*parsed)
        if any(e.kind != "null" for e in combo)
    ]
    if not cohort:
        raise ValueError(f"cohort grids: every combination is all-null ({dict(grids)}); add a non-null extractor.")
    return cohort


def early_fusion_spec(modalities: Sequence[str]) -> dict[str, Any]:
    """Early fusion as a Meta Fusion config: one student on all modalities' raw features.

    Returns:
        Keyword arguments for :class:`MetaFusion` (``cohort``, ``rho_grid=(0.0,)``,
        ``default_rule="best_single"``), e.g. ``MetaFusion(mods, dims, **early_fusion_spec(mods))``.
    """
    mods = validate_modalities(modalities)
    return {"cohort": [{m: "identity" for m in mods}], "rho_grid": (0.0,), "default_rule": "best_single"}


def late_fusion_spec(modalities: Sequence[str]) -> dict[str, Any]:
    """Late fusion as a Meta Fusion config: one identity student per modality, simple average, no mutual learning.

    Returns:
        Keyword arguments for :class:`MetaFusion` (``cohort``, ``rho_grid=(0.0,)``, ``default_rule="average"``).
    """
    mods = validate_modalities(modalities)
    return {"cohort": [{m: "identity"} for m in mods], "rho_grid": (0.0,), "default_rule": "average"}


# ------------------------------------------------------------------------------------------- modules
class Student(nn.Module):
    """One cohort member: optional trainable ``mlp`` extractors + an MLP head on the concatenated latents.

    Args:
        spec: which extractor each modality uses.
        latent_dims: ``{modality: latent size}`` for the non-null modalities.
        in_dims: ``{modality: raw feature size}`` (inputs of ``mlp`` extractors).
        out_dim: ``num_classes`` (classification) or 1 (regression).
        hidden: hidden sizes of the head (ReLU between layers).
        extractor_hidden: hidden size of ``mlp:<k>`` extractors.
    """

    def __init__(
        self,
        spec: StudentSpec,
        latent_dims: Mapping[str, int],
        in_dims: Mapping[str, int],
        out_dim: int,
        hidden: Sequence[int],
        extractor_hidden: int,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.keys: tuple[tuple[str, str], ...] = tuple(
            (m, _extractor_key(m, e)) for m, e in spec.extractors if e.kind != "null"
        )
        self.trainable_extractors = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.Linear(in_dims[m], extractor_hidden), nn.ReLU(), nn.Linear(extractor_hidden, e.dim or 1)
                )
                for m, e in spec.extractors
                if e.kind == "mlp"
            }
        )
        layers: list[nn.Module] = []
        width = sum(latent_dims[m] for m in spec.modalities)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, out_dim))
        self.head = nn.Sequential(*layers)

    def forward(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Student output from precomputed latents.

        Args:
            latents: ``{extractor key: [N, d]}`` as built by :meth:`MetaFusion.latents`.

        Returns:
            ``[N, out_dim]``.
        """
        parts = []
        for m, key in self.keys:
            if m in self.trainable_extractors:
                parts.append(self.trainable_extractors[m](latents[_extractor_key(m, ExtractorSpec("identity"))]))
            else:
                parts.append(latents[key])
        return self.head(torch.cat(parts, dim=-1))


def _extractor_key(modality: str, spec: ExtractorSpec) -> str:
    kind = "identity" if spec.kind == "mlp" else spec.kind  # mlp extractors read the raw features
    return f"{modality}__{kind}" if kind == "identity" or spec.dim is None else f"{modality}__{kind}{spec.dim}"


def pooled_features(value: torch.Tensor | EncoderOutput) -> torch.Tensor:
    """The feature matrix of one modality: the tensor itself or an encoder output's ``pooled``."""
    return value.pooled if isinstance(value, EncoderOutput) else value


class StudentCohort(nn.Module):
    """The students of a Meta Fusion cohort and the latent maps they read (no training, no aggregation).

    Holds ``students`` (the cohort trained with mutual learning), ``screen_students`` (the same architecture,
    trained independently in screening), ``initial_state`` (the shared initial weights every training run
    starts from) and one ``pca_mean__<key>`` ``[F_m]`` / ``pca_components__<key>`` ``[F_m, k]`` buffer pair per
    ``pca:<k>`` extractor (``<key>`` from :func:`_extractor_key`).

    Args:
        modalities: ordered modality names (the mask's column order).
        in_dims: ``{modality: F_m}`` raw feature sizes.
        cohort: students as :class:`StudentSpec` or JSON mappings ``{modality: "pca:8"}`` (missing = null).
        task: ``"classification"`` (``num_classes`` logits) or ``"regression"`` (one output).
        num_classes: number of classes (classification only).
        hidden: student head hidden sizes.
        extractor_hidden: hidden size of ``mlp:<k>`` extractors.
        seed: seeds the student initialisation.

    Raises:
        ValueError: any invalid setting (the message names the field).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        cohort: Sequence[StudentSpec | Mapping[str, str]],
        task: str = "classification",
        num_classes: int = 2,
        hidden: Sequence[int] = (64, 32),
        extractor_hidden: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.modalities = validate_modalities(modalities)
        missing = [m for m in self.modalities if m not in in_dims]
        if missing:
            raise ValueError(f"MetaFusion in_dims: no feature size for modalities {missing}.")
        self.in_dims = {m: int(in_dims[m]) for m in self.modalities}
        if task not in ("classification", "regression"):
            raise ValueError(f"MetaFusion task: expected 'classification' or 'regression', got {task!r}.")
        if task == "classification" and num_classes < 2:
            raise ValueError(f"MetaFusion num_classes: expected >= 2 for classification, got {num_classes}.")
        self.task = task
        self.num_classes = int(num_classes) if task == "classification" else 1
        self.hidden = tuple(int(h) for h in hidden)
        self.extractor_hidden = int(extractor_hidden)
        self.seed = int(seed)
        self.cohort: list[StudentSpec] = [
            c if isinstance(c, StudentSpec) else StudentSpec.from_mapping(c, self.modalities) for c in cohort
        ]
        if not self.cohort:
            raise ValueError("MetaFusion cohort: expected at least one student, got none.")
        for c in self.cohort:
            if tuple(m for m, _ in c.extractors) != self.modalities:
                raise ValueError(
                    f"MetaFusion cohort: student {c.name!r} is not built for modalities {self.modalities}."
                )
            if not c.modalities:
                raise ValueError("MetaFusion cohort: a student has only null extractors; it needs >= 1 modality.")

        # fixed (non-trainable) extractors shared by students: PCA buffers, slice/identity are stateless
        self._fixed: dict[str, tuple[str, ExtractorSpec]] = {}
        for c in self.cohort:
            for m, e in c.extractors:
                if e.kind == "null":
                    continue
                if e.kind in ("pca", "slice") and (e.dim or 0) > self.in_dims[m]:
                    raise ValueError(
                        f"MetaFusion cohort: extractor '{e}' of modality {m!r} exceeds its {self.in_dims[m]} features."
                    )
                self._fixed.setdefault(_extractor_key(m, e), (m, e if e.kind != "mlp" else ExtractorSpec("identity")))
        for key, (m, e) in self._fixed.items():
            if e.kind == "pca":
                self.register_buffer(f"pca_mean__{key}", torch.zeros(self.in_dims[m]))
                self.register_buffer(f"pca_components__{key}", torch.zeros(self.in_dims[m], e.dim or 1))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.students = nn.ModuleList([self._make_student(c) for c in self.cohort])
        self.screen_students = copy.deepcopy(self.students)
        self.initial_state = copy.deepcopy(self.students.state_dict())

    def _make_student(self, spec: StudentSpec) -> Student:
        dims = {m: (self.in_dims[m] if e.kind == "identity" else int(e.dim or 0)) for m, e in spec.extractors}
        return Student(spec, dims, self.in_dims, self.num_classes, self.hidden, self.extractor_hidden)

    @property
    def student_names(self) -> list[str]:
        """Readable student names in cohort order."""
        return [c.name for c in self.cohort]

    # ------------------------------------------------------------------------------- data checks
    def check_data(self, data: MetaFusionData | Sequence[Any], field: str) -> MetaFusionData:
        """Validate one split against the cohort (modalities, feature sizes, mask, targets).

        Args:
            data: ``MetaFusionData(x, mask, y)`` or a 3-tuple.
            field: split name used in error messages.

        Returns:
            The split as ``MetaFusionData`` with a checked bool mask ``[N, M]``.

        Raises:
            ValueError: wrong shapes, not three items, or (classification) targets that are not class indices.
            KeyError: a modality without features.
        """
        if not isinstance(data, MetaFusionData):
            if len(data) != 3:
                raise ValueError(f"MetaFusion {field}: expected (x, mask, y), got {len(data)} items.")
            data = MetaFusionData(*data)
        mask = self.check_inputs(data.x, data.mask, field)
        n = mask.shape[0]
        if data.y.ndim != 1 or data.y.shape[0] != n:
            raise ValueError(f"MetaFusion {field}.y: expected shape [{n}], got {list(data.y.shape)}.")
        if self.task == "classification" and (data.y.dtype.is_floating_point or int(data.y.max()) >= self.num_classes):
            raise ValueError(f"MetaFusion {field}.y: expected long class indices < {self.num_classes}.")
        return MetaFusionData(data.x, mask, data.y)

    def check_inputs(self, x: Mapping[str, Any], mask: torch.Tensor, field: str = "x") -> torch.Tensor:
        """Validate features ``{modality: [N, F_m]}`` and the mask; returns the checked bool mask ``[N, M]``.

        Raises:
            KeyError: a modality without features.
            ValueError: a feature matrix of the wrong shape, or an invalid mask.
        """
        absent = [m for m in self.modalities if m not in x]
        if absent:
            raise KeyError(
                f"MetaFusion {field}: no features for modalities {absent} (expected {list(self.modalities)})."
            )
        mask = check_mask(mask, len(self.modalities))
        for m in self.modalities:
            t = pooled_features(x[m])
            if t.ndim != 2 or t.shape[1] != self.in_dims[m] or t.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"MetaFusion {field}[{m!r}]: expected shape [{mask.shape[0]}, {self.in_dims[m]}], "
                    f"got {list(t.shape)}."
                )
        return mask

    # ------------------------------------------------------------------------------- latent maps
    def availability(self, mask: torch.Tensor) -> torch.Tensor:
        """Which students can predict which samples.

        Args:
            mask: bool ``[N, M]``.

        Returns:
            bool ``[S, N]``: True where every non-null modality of the student is present.
        """
        cols = torch.tensor(
            [[e.kind != "null" for _, e in c.extractors] for c in self.cohort], dtype=torch.bool, device=mask.device
        )  # [S, M]
        return ~((cols[:, None, :] & ~mask.bool()[None, :, :]).any(dim=-1))

    def latents(self, x: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outputs of the shared fixed extractors (absent modalities zero-filled first).

        Args:
            x: ``{modality: [N, F_m]}`` (or :class:`EncoderOutput`, whose ``pooled`` is used).
            mask: bool ``[N, M]``.

        Returns:
            ``{extractor key: [N, d]}``.
        """
        raw = {
            m: torch.where(mask[:, i, None], pooled_features(x[m]).float(), torch.zeros((), device=mask.device))
            for i, m in enumerate(self.modalities)
        }
        out = {}
        for key, (m, e) in self._fixed.items():
            if e.kind == "identity":
                out[key] = raw[m]
            elif e.kind == "slice":
                out[key] = raw[m][:, : e.dim]
            else:  # pca
                out[key] = (raw[m] - getattr(self, f"pca_mean__{key}")) @ getattr(self, f"pca_components__{key}")
        return out

    def fit_latent_maps(self, data: MetaFusionData) -> None:
        """Fit the PCA extractors on the rows where their modality is present (one SVD per modality).

        Args:
            data: a checked split (:meth:`check_data`).

        Raises:
            ValueError: fewer present rows than the PCA size.
        """
        axes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one SVD per modality; pca:k takes the first k axes
        for key, (m, e) in self._fixed.items():
            if e.kind != "pca":
                continue
            i = self.modalities.index(m)
            k = int(e.dim or 1)
            n_rows = int(data.mask[:, i].sum())
            if n_rows < k:
                raise ValueError(f"MetaFusion pca:{k} of {m!r}: needs >= {k} samples with {m!r} present, got {n_rows}.")
            if m not in axes:
                xm = pooled_features(data.x[m])[data.mask[:, i]].double()
                mean = xm.mean(dim=0)
                _, _, vh = torch.linalg.svd(xm - mean, full_matrices=False)
                comps = vh.T  # [F, r]
                signs = torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))  # sklearn's svd_flip
                axes[m] = (mean, comps * torch.where(signs == 0, torch.ones_like(signs), signs))
            mean, comps = axes[m]
            getattr(self, f"pca_mean__{key}").copy_(mean.float())
            getattr(self, f"pca_components__{key}").copy_(comps[:, :k].float())

    # ----------------------------------------------------------------------------------- outputs
    def student_outputs(
        self, x: Mapping[str, torch.Tensor], mask: torch.Tensor, students: nn.ModuleList | None = None
    ) -> torch.Tensor:
        """Raw outputs of every student on every sample (unavailable rows are meaningless; see ``availability``).

        Args:
            x: ``{modality: [N, F_m]}``.
            mask: bool ``[N, M]``.
            students: cohort to run (default the mutual-learning cohort ``self.students``).

        Returns:
            ``[S, N, K]`` logits (classification) or ``[S, N]`` predictions (regression).
        """
        lat = self.latents(x, mask)
        return self.run_students(students if students is not None else self.students, lat)

    def run_students(self, students: nn.ModuleList, lat: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Outputs of ``students`` on precomputed latents ``{key: [N, d]}``: ``[S, N, K]`` or ``[S, N]``."""
        out = torch.stack([st(lat) for st in students])
        return out if self.task == "classification" else out.squeeze(-1)

    def as_predictions(self, out: torch.Tensor) -> torch.Tensor:
        """Student outputs in aggregation space: probabilities ``[S, N, K]`` or regression ``[S, N]``."""
        return out.softmax(dim=-1) if self.task == "classification" else out
