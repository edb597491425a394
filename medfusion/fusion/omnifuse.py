"""OmniFuse: imputation + dynamic weighted fusion + laziness activation.

docs/method_spec.md section 3 ("OmniFuse: A general modality fusion framework for multi-modality learning
on low-quality medical data"). Pieces (each maps to a test, see docs/methods.md):

* embeddings ``v_m = proj_m(e_m(x_m))``; an absent modality gets ``proj_m(e_m(0))`` where ``e_m(0)`` is
  the encoder's pooled output on a zero input, held in the head buffer ``zero_pooled`` and refreshed by
  :func:`refresh_zero_pooled` (see "Decisions" below);
* Cascade Residual Autoencoder (:class:`CascadeResidualAutoencoder`): ``dz_1 = phi_1(v)``,
  ``dz_k = phi_k(v + sum_{j<k} dz_j)``, ``v' = v + sum_k dz_k``; a second CRA maps ``v' -> v''``;
  ``L_fw = mse(v', v_true)`` over the observed modalities, ``L_bw = mse(v'', v)``;
* DWFuse: ``omega_m = [prod_{n != m} (1 - p_n[y])]^(beta / (M - 1))`` (:func:`dwfuse_omega`),
  ``L_enc = sum_m mean_b(omega_m * CE(g_m(v'_m), y))`` with omega detached, ``L_ra = CE(g_ra(codes), y)``,
  ``L_DWFuse = L_enc + alpha * L_ra`` (:func:`dwfuse_loss`);
* TLA: after every epoch the combination with the largest per-sample cross-entropy over the training set
  is "lazy" (:func:`combination_losses`, :func:`lazy_from_losses`, :class:`OmniFuseEpochHandler`); in the
  next epoch samples whose simulated combination equals it get ``L_TLA = CE`` (:func:`tla_loss`);
* ``L = L_fw + lambda1 * L_bw + lambda2 * L_DWFuse + lambda3 * L_TLA`` (1, 10, 0.5; :class:`OmniFuseMethod`);
* inference: ``logits = log(0.5 * (softmax(o) + sum_m omega_m p_m / sum_m omega_m))`` over the present
  modalities, with ``p_n[y]`` replaced by ``p_n[argmax]`` in omega (:class:`OmniFuseHead`).

Decisions:

* Zero-input embedding. The head has no encoder access and must not read an absent modality's content
  (contract). ``e_m(0)`` is therefore computed by the encoder in EVAL mode without gradient on a zero
  tensor shaped like one sample (:func:`refresh_zero_pooled`: every training iteration by
  :class:`OmniFuseMethod` and at every epoch end) and stored in the head buffer ``zero_pooled``, so
  inference from a checkpoint is deterministic and independent of absent content. Deviation from a
  zero-filled forward pass: no gradient reaches the encoder through its zero-input output (the
  projection and the CRA still learn from it), and zero batches never enter BatchNorm running statistics.
  Before the first refresh the buffer is 0 (absent embedding = the projection bias).
* Missingness is simulated in :meth:`OmniFuseMethod.prepare`: per sample, a combination drawn uniformly
  from the non-empty subsets of its OBSERVED modalities; the observed mask is kept under
  :data:`OBSERVED_MASK_KEY`. ``v_true`` is the embedding under the observed mask (detached); ``L_fw`` is the
  mean squared error over the observed modalities' entries (= the paper's loss on complete samples,
  and defined for incompletely observed training samples too). ``L_bw`` targets the detached ``v``.
* ``L_enc`` and its omega use all M modalities (absent ones through their imputed ``v'_m``, so the
  imputation is trained to be discriminative); at inference the weighted average runs over the PRESENT
  modalities (``weighted_over="present"``, option ``"all"``), with ``p_n[argmax]`` for ``p_n[y]``.
* TLA distance: mean per-sample cross-entropy of the deployable logits over the samples that have all
  the combination's modalities (equals the paper's sum up to the constant N on complete data);
  ``L_TLA`` is the mean cross-entropy over the batch's lazy samples (0 when there are none).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch import nn

from medfusion.batch import forward_outputs, model_inputs, to_device, unwrap
from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionHead, FusionModel, FusionOutput, register_fusion
from medfusion.fusion.baselines import check_in_dims, mlp, per_modality_ce, safe_log, stack_modality_logits
from medfusion.fusion.method import Method
from medfusion.fusion.recipes import register_method
from medfusion.modality import Keys, all_combination_masks, combination_name, combinations, validate_modalities

__all__ = [
    "OBSERVED_MASK_KEY",
    "TLA_MINING",
    "ResidualAutoencoder",
    "CascadeResidualAutoencoder",
    "dwfuse_omega",
    "dwfuse_loss",
    "tla_loss",
    "simulate_missing",
    "refresh_zero_pooled",
    "combination_losses",
    "lazy_from_losses",
    "LazyCombinationMixin",
    "OmniFuseHead",
    "OmniFuseMethod",
    "OmniFuseEpochHandler",
]

logger = logging.getLogger(__name__)

TLA_MINING = ("epoch", "online")
"""``OmniFuseMethod(tla_mining=...)``: the paper's pass after every epoch, or sums over the epoch's own forwards."""

OBSERVED_MASK_KEY = "observed_modality_mask"
"""Batch key of the mask before simulated missingness (bool ``[B, M]``), set by :meth:`OmniFuseMethod.prepare`."""


class ResidualAutoencoder(nn.Module):
    """One CRA block: ``code = relu(W_e x + b_e)``, ``dz = W_d code + b_d``.

    Args:
        dim: input/output size (``M * embed_dim``).
        code_dim: bottleneck size.
    """

    def __init__(self, dim: int, code_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(dim, code_dim)
        self.decoder = nn.Linear(code_dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dz [B, dim], code [B, code_dim])``."""
        code = torch.relu(self.encoder(x))
        return self.decoder(code), code


class CascadeResidualAutoencoder(nn.Module):
    """Cascade of K residual autoencoders.

    ``dz_1 = phi_1(v)``, ``dz_k = phi_k(v + sum_{j<k} dz_j)``, output ``v + sum_k dz_k``.

    Args:
        dim: size of the joint embedding ``v``.
        code_dim: bottleneck size of each block.
        num_blocks: K (5 in the paper).
    """

    def __init__(self, dim: int, code_dim: int, num_blocks: int = 5) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"CascadeResidualAutoencoder: num_blocks must be >= 1, got {num_blocks}.")
        self.blocks = nn.ModuleList([ResidualAutoencoder(dim, code_dim) for _ in range(num_blocks)])

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the cascade.

        Args:
            v: ``[B, dim]``.

        Returns:
            ``(v + sum_k dz_k [B, dim], [code_k [B, code_dim] for k in 1..K])``.
        """
        acc = v
        codes = []
        for block in self.blocks:
            dz, code = block(acc)
            acc = acc + dz
            codes.append(code)
        return acc, codes


def dwfuse_omega(confidence: torch.Tensor, use: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """DWFuse down-weighting factor ``omega_m = [prod_{n != m, n used} (1 - q_n)]^(beta / (M - 1))``.

    Args:
        confidence: ``q`` ``[B, M]``: ``p_n[y]`` in training, ``p_n[argmax]`` at inference.
        use: bool ``[B, M]``: modalities taking part (all in training, present ones at inference).
        beta: exponent numerator (0.5).

    Returns:
        ``[B, M]``, 0 where ``use`` is False; ``1 - q`` is clamped to 1e-6 so omega stays positive. ``M`` is
        the model's number of modalities (the exponent does not change with the number present); for
        ``M = 1`` omega is 1.
    """
    n_mod = confidence.shape[1]
    if n_mod == 1:
        return use.to(confidence.dtype)
    log1m = torch.log((1.0 - confidence).clamp_min(1e-6)) * use.to(confidence.dtype)  # [B, M]
    others = 1.0 - torch.eye(n_mod, dtype=confidence.dtype, device=confidence.device)  # [m, n], n != m
    log_prod = log1m @ others.T  # [B, m] = sum_{n != m} log(1 - q_n)
    omega = torch.exp(beta / (n_mod - 1) * log_prod)
    return torch.where(use, omega, torch.zeros((), dtype=omega.dtype, device=omega.device))


def dwfuse_loss(
    modality_logits: torch.Tensor,
    joint_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> dict[str, torch.Tensor]:
    """``L_DWFuse = sum_m mean_b(omega_m * CE(z_m, y)) + alpha * CE(o, y)`` with omega detached (all M modalities).

    Args:
        modality_logits: ``[B, M, K]`` per-modality logits on the imputed embeddings.
        joint_logits: ``o`` ``[B, K]``.
        labels: long ``[B]``.
        beta: omega exponent numerator.
        alpha: weight of the joint-head loss ``L_ra``.

    Returns:
        ``{"dwfuse": L_DWFuse, "enc": L_enc, "ra": L_ra, "omega": [B, M]}``.
    """
    probs = torch.softmax(modality_logits.detach(), dim=-1)
    p_true = probs.gather(-1, labels.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(-1)  # [B, M]
    omega = dwfuse_omega(p_true, torch.ones_like(p_true, dtype=torch.bool), beta)
    enc = (omega * per_modality_ce(modality_logits, labels)).mean(dim=0).sum()
    ra = F.cross_entropy(joint_logits, labels)
    return {"dwfuse": enc + alpha * ra, "enc": enc, "ra": ra, "omega": omega}


def tla_loss(
    logits: torch.Tensor, labels: torch.Tensor, modality_mask: torch.Tensor, lazy_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy over the samples whose combination equals the lazy one (0 if none or no lazy).

    Args:
        logits: ``[B, K]`` deployable logits.
        labels: long ``[B]``.
        modality_mask: bool ``[B, M]`` (the simulated combination).
        lazy_mask: bool ``[M]`` of the lazy combination, or ``None``.

    Returns:
        scalar.
    """
    if lazy_mask is None:
        return logits.new_zeros(())
    sel = (modality_mask == lazy_mask.view(1, -1)).all(dim=1)
    if not bool(sel.any()):
        return logits.new_zeros(())
    return F.cross_entropy(logits[sel], labels[sel])


def simulate_missing(observed: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample, a combination drawn uniformly from the non-empty subsets of its observed modalities.

    Args:
        observed: bool ``[B, M]`` (every row with at least one True).
        generator: CPU random generator.

    Returns:
        bool ``[B, M]`` on ``observed``'s device, a subset of ``observed`` row-wise.
    """
    n_mod = observed.shape[1]
    combos = all_combination_masks(tuple(f"m{i}" for i in range(n_mod)))  # [C, M] (names are placeholders)
    obs = observed.bool().cpu()
    allowed = ~(combos.unsqueeze(0) & ~obs.unsqueeze(1)).any(dim=-1)  # [B, C]: combo within observed
    if not bool(allowed.any(dim=1).all()):
        raise ValueError("simulate_missing: a sample has no observed modality (modality_mask row all False).")
    pick = torch.multinomial(allowed.float(), 1, generator=generator).squeeze(1)
    return combos[pick].to(observed.device)


_ZERO_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, torch.Tensor]] = weakref.WeakKeyDictionary()


def _frozen_state(encoder: nn.Module, x: torch.Tensor) -> Any:
    """Key of a frozen encoder's zero-input output, or ``None`` when it may have changed since it was computed.

    Frozen: no parameter requires a gradient and every submodule holding buffers is in eval mode (a module in
    train mode may update running statistics in place). The key holds the input's shape/dtype/device and every
    parameter's and buffer's storage and version counter (any in-place update, ``load_state_dict`` included,
    changes it).
    """
    if any(p.requires_grad for p in encoder.parameters()):
        return None
    if any(mod.training for mod in encoder.modules() if next(mod.buffers(recurse=False), None) is not None):
        return None
    tensors = [*encoder.parameters(), *encoder.buffers()]
    return (tuple(x.shape), x.dtype, str(x.device), tuple((t.data_ptr(), t._version) for t in tensors))


def refresh_zero_pooled(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
    """Store every encoder's pooled output on a zero input in the OmniFuse head (``e_m(0)``).

    Each encoder runs in eval mode without gradient on ``zeros_like(inputs[m][:1])`` (its train/eval mode
    is restored afterwards). A frozen encoder (no trainable parameter, buffers only in eval-mode modules, e.g.
    the frozen MiniLM report encoder) is run again only when one of its parameters or buffers, or the input
    shape, changed since its last run (:func:`_frozen_state`): the stored output is the same tensor it would
    compute.

    Args:
        model: a ``FusionModel`` (possibly wrapped) whose head is an :class:`OmniFuseHead`.
        inputs: ``{name: [B, ...]}`` example tensors (only their shape/dtype/device are used).
    """
    net = cast(FusionModel, unwrap(model))  # the docstring's contract
    head = _omnifuse_head(net)
    pooled = {}
    for m in head.modalities:
        enc = net.encoders[m]
        zero = torch.zeros_like(inputs[m][:1])
        key = _frozen_state(enc, zero)
        cached = _ZERO_CACHE.get(enc)
        if key is not None and cached is not None and cached[0] == key:
            pooled[m] = cached[1]
            continue
        was_training = enc.training
        enc.eval()
        with torch.no_grad():
            pooled[m] = enc(zero).pooled[0]
        enc.train(was_training)
        if key is not None:
            _ZERO_CACHE[enc] = (_frozen_state(enc, zero), pooled[m])
    head.set_zero_pooled(pooled)


class LazyCombinationMixin:
    """TLA state shared by :class:`OmniFuseHead` and the segmentation network (both register the buffers).

    Buffers: ``lazy_combination`` (long, index into ``combinations(modalities)``, -1 = none) and
    ``combination_distance`` ``[2^M - 1]`` (last TLA mining), written by :func:`store_lazy`.
    """

    modalities: tuple[str, ...]
    lazy_combination: torch.Tensor
    combination_distance: torch.Tensor

    def lazy_mask(self) -> torch.Tensor | None:
        """Mask ``[M]`` (bool) of the current lazy combination, or ``None``."""
        idx = int(self.lazy_combination)
        if idx < 0:
            return None
        return all_combination_masks(self.modalities, self.lazy_combination.device)[idx]


@register_fusion("omnifuse")
class OmniFuseHead(FusionHead, LazyCombinationMixin):
    """OmniFuse classification head: zero-input imputation path, CRA imputation, DWFuse.

    Args:
        modalities: ordered modality names.
        in_dims: ``{name: pooled dim}``.
        num_classes: number of classes ``K``.
        embed_dim: per-modality embedding size ``d`` (``v`` has ``M * d`` entries).
        code_dim: bottleneck size of each CRA block.
        num_blocks: CRA blocks K (5).
        beta: omega exponent numerator (0.5).
        hidden: hidden size of the per-modality classifiers ``g_m`` (0 = linear).
        dropout: dropout inside ``g_m``.
        weighted_over: ``"present"`` (default) or ``"all"``: modalities in the inference weighted average.
        prediction: which probability the deployable ``logits`` are the log of: ``"combined"`` (default, the
            average of the joint head and the weighted per-modality average), ``"joint"`` (``softmax(o)``)
            or ``"weighted"``; all three are always in ``aux`` so the choice can be evaluated.
        impute: ``"cra"`` (or ``True``, default): OmniFuse. ``"off"``: the architecture-preserving "without
            imputation" ablation: the same predictor (projections, forward CRA, per-modality classifiers and
            the joint head on the forward CRA's codes), but the imputation is switched off: the per-modality
            classifiers and the weighted average read the observed embeddings ``v`` (an absent modality keeps
            its zero-input embedding ``proj_m(e_m(0))``) instead of ``v'``, ``L_fw``/``L_bw`` are 0 and the
            backward CRA (used only by ``L_bw``) is not built. With the same seed every shared parameter
            starts identical to the ``"cra"`` head's, and the joint head's output is the same function of
            ``v``. ``"none"`` (or ``False``): the earlier ablation without any CRA (the joint classifier reads
            the concatenated ``v``), which also changes the joint head. In ``"off"``/``"none"``,
            ``aux["imputed"]`` and ``aux["cycle"]`` are ``v``.

    Buffers: ``zero_pooled`` ``[sum D_m]`` (``e_m(0)`` of every modality, concatenated),
    ``zero_pooled_ready`` (bool), ``lazy_combination`` (long, index into
    ``combinations(modalities)``, -1 = none) and ``combination_distance`` ``[2^M - 1]`` (last TLA mining,
    NaN for combinations without samples).

    Returns (forward):
        ``FusionOutput(logits [B, K] = log(combined) by default, embeddings {name: v'_m [B, d]}, aux)`` with ``aux``:
        ``"modality_logits"`` {name: [B, K]} (``g_m(v'_m)``), ``"joint_logits"`` ``o`` [B, K],
        ``"joint_probs"`` [B, K], ``"modality_probs"`` [B, M, K], ``"omega"`` [B, M] (inference form,
        0 for unused modalities), ``"weighted_probs"`` [B, K], ``"combined"`` [B, K], ``"observed"`` ``v``
        [B, M*d], ``"imputed"`` ``v'`` [B, M*d], ``"cycle"`` ``v''`` [B, M*d], ``"codes"`` [B, K_blocks *
        code_dim], ``"pooled"`` {name: the encoders' pooled outputs [B, D_m] as given}; plus ``"target"`` (``v``
        under ``target_mask``, detached) when ``target_mask`` is given.
    """

    per_modality_aux = ("omega",)

    zero_pooled: torch.Tensor
    zero_pooled_ready: torch.Tensor

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int,
        embed_dim: int = 32,
        code_dim: int = 32,
        num_blocks: int = 5,
        beta: float = 0.5,
        hidden: int = 0,
        dropout: float = 0.0,
        weighted_over: str = "present",
        prediction: str = "combined",
        impute: bool | str = "cra",
    ) -> None:
        super().__init__(modalities)
        dims = check_in_dims("omnifuse", self.modalities, in_dims)
        if weighted_over not in ("present", "all"):
            raise ValueError(f"omnifuse: weighted_over must be 'present' or 'all', got {weighted_over!r}.")
        if prediction not in ("combined", "joint", "weighted"):
            raise ValueError(f"omnifuse: prediction must be 'combined', 'joint' or 'weighted', got {prediction!r}.")
        mode = ("cra" if impute else "none") if isinstance(impute, bool) else impute
        if mode not in ("cra", "off", "none"):
            raise ValueError(f"omnifuse: impute must be 'cra' (True), 'off' or 'none' (False), got {impute!r}.")
        self.imputation = mode
        self.prediction = prediction
        self.in_dims = dims
        self.embed_dim = int(embed_dim)
        self.beta = float(beta)
        self.weighted_over = weighted_over
        n_mod = len(self.modalities)
        joint = n_mod * self.embed_dim
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], self.embed_dim) for m in self.modalities})
        if mode != "none":
            self.forward_cra = CascadeResidualAutoencoder(joint, code_dim, num_blocks)
        self.classifiers = nn.ModuleDict(
            {m: mlp(self.embed_dim, int(num_classes), hidden, dropout) for m in self.modalities}
        )
        self.joint_classifier = nn.Linear(num_blocks * code_dim if mode != "none" else joint, int(num_classes))
        if mode == "cra":  # built last, so "cra" and "off" heads of one seed share every other initial weight
            self.backward_cra = CascadeResidualAutoencoder(joint, code_dim, num_blocks)
        self.register_buffer("zero_pooled", torch.zeros(sum(dims.values())))
        self.register_buffer("zero_pooled_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("lazy_combination", torch.full((), -1, dtype=torch.long))
        self.register_buffer("combination_distance", torch.full((2**n_mod - 1,), float("nan")))

    @property
    def impute(self) -> bool:
        """True when the CRA imputes (``impute="cra"``): ``v'`` feeds the classifiers and ``L_fw``/``L_bw`` train it."""
        return self.imputation == "cra"

    # --------------------------------------------------------- zero input
    def _zero_slices(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.modalities, torch.split(self.zero_pooled, [self.in_dims[m] for m in self.modalities])))

    @torch.no_grad()
    def set_zero_pooled(self, pooled: Mapping[str, torch.Tensor]) -> None:
        """Store ``e_m(0)`` (``{name: [D_m]}``) in the buffer.

        Raises:
            ValueError: a modality is missing or has the wrong size.
        """
        parts = []
        for m in self.modalities:
            p = pooled[m].detach().reshape(-1) if m in pooled else None
            if p is None or p.numel() != self.in_dims[m]:
                got = None if p is None else p.numel()
                raise ValueError(
                    f"omnifuse: zero-input pooled of {m!r} must have {self.in_dims[m]} entries, got {got}."
                )
            parts.append(p.to(self.zero_pooled))
        self.zero_pooled.copy_(torch.cat(parts))
        self.zero_pooled_ready.fill_(True)

    # ------------------------------------------------------------ forward
    def embed(self, features: Mapping[str, EncoderOutput], modality_mask: torch.Tensor) -> torch.Tensor:
        """``v`` ``[B, M, d]``: ``proj_m(pooled_m)`` if present, else ``proj_m(zero_pooled_m)``."""
        zero = self._zero_slices()
        out = []
        for i, m in enumerate(self.modalities):
            p = features[m].pooled
            x = torch.where(modality_mask[:, i : i + 1], p, zero[m].to(p.dtype).unsqueeze(0))
            out.append(self.proj[m](x))
        return torch.stack(out, dim=1)

    def forward(
        self,
        features: Mapping[str, EncoderOutput],
        modality_mask: torch.Tensor,
        target_mask: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Impute with the CRA, classify per modality and jointly, and combine.

        Args:
            features: ``{name: EncoderOutput}``.
            modality_mask: bool ``[B, M]``.
            target_mask: optional bool ``[B, M]`` (training): ``aux["target"]`` is then ``v`` computed under
                this mask (the observed modalities), detached.
        """
        b, n_mod = modality_mask.shape
        v = self.embed(features, modality_mask)
        v_flat = v.flatten(1)
        if self.imputation == "none":
            imputed = cycle = codes_cat = v_flat
        else:
            cra_out, codes = self.forward_cra(v_flat)
            codes_cat = torch.cat(codes, dim=1)
            if self.imputation == "cra":
                imputed = cra_out
                cycle, _ = self.backward_cra(imputed)
            else:  # "off": same joint head on the codes, but nothing downstream reads the imputed embedding
                imputed = cycle = v_flat
        vi = imputed.view(b, n_mod, self.embed_dim)
        z = torch.stack([self.classifiers[m](vi[:, i]) for i, m in enumerate(self.modalities)], dim=1)  # [B, M, K]
        probs = torch.softmax(z, dim=-1)
        o = self.joint_classifier(codes_cat)
        joint = torch.softmax(o, dim=-1)
        use = modality_mask if self.weighted_over == "present" else torch.ones_like(modality_mask)
        omega = dwfuse_omega(probs.amax(dim=-1), use, self.beta)
        weighted = (omega.unsqueeze(-1) * probs).sum(dim=1) / omega.sum(dim=1, keepdim=True).clamp_min(1e-12)
        combined = 0.5 * (joint + weighted)
        aux: dict[str, Any] = {
            "modality_logits": {m: z[:, i] for i, m in enumerate(self.modalities)},
            "joint_logits": o,
            "joint_probs": joint,
            "modality_probs": probs,
            "omega": omega,
            "weighted_probs": weighted,
            "combined": combined,
            "observed": v_flat,
            "imputed": imputed,
            "cycle": cycle,
            "codes": codes_cat,
            "pooled": {m: features[m].pooled for m in self.modalities},
        }
        if target_mask is not None:
            aux["target"] = self.embed(features, target_mask.bool()).flatten(1).detach()
        emb = {m: vi[:, i] for i, m in enumerate(self.modalities)}
        chosen = {"combined": combined, "joint": joint, "weighted": weighted}[self.prediction]
        return FusionOutput(safe_log(chosen), emb, aux)


def _omnifuse_head(model: nn.Module) -> OmniFuseHead:
    head = getattr(unwrap(model), "head", None)
    if not isinstance(head, OmniFuseHead):
        raise TypeError(f"OmniFuse needs a FusionModel whose head is an OmniFuseHead, got head {type(head).__name__}.")
    return head


def _combination_ce(
    head: FusionHead, pooled: Mapping[str, torch.Tensor], observed: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample CE of the deployable prediction for every (combination, sample) pair, in ONE head call.

    Each row has only its combination present; a sample counts for combination ``c`` only when all of ``c``'s
    modalities are observed in it. Rows are independent in eval mode (the caller sets it), so the values are
    those of one head call per combination up to float rounding.

    Args:
        head: an :class:`OmniFuseHead` (or any head reading only ``pooled``).
        pooled: ``{name: [B, D_m]}`` encoder outputs.
        observed: bool ``[B, M]``.
        labels: long ``[B]``.

    Returns:
        ``(CE [R], combination index [R])`` on the CPU for the R valid rows (combination order of
        :func:`~medfusion.modality.all_combination_masks`).
    """
    rows = all_combination_masks(head.modalities, observed.device)
    valid = (observed.unsqueeze(0) | ~rows.unsqueeze(1)).all(dim=-1)  # [C, B]
    comb_idx, sample_idx = valid.nonzero(as_tuple=True)
    if comb_idx.numel() == 0:
        return torch.zeros(0), comb_idx.cpu()
    folded = {m: EncoderOutput(p[sample_idx]) for m, p in pooled.items()}
    logits = head(folded, rows[comb_idx]).logits
    ce = F.cross_entropy(logits.float(), labels[sample_idx], reduction="none")
    return ce.detach().cpu(), comb_idx.cpu()


@torch.inference_mode()
def combination_losses(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    modalities: Sequence[str],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the deployable prediction for every combination (TLA mining).

    Encoders run once per batch (in inference mode); the head runs once per batch on every (combination,
    sample) pair folded into its batch dimension (:func:`_combination_ce`; same values as one head call per
    combination up to float rounding of the sums). A sample counts for combination ``c`` only when all of
    ``c``'s modalities are observed in it. The network is put in eval mode (and restored).

    Args:
        model: a ``FusionModel`` (possibly wrapped).
        loader: batches with the modalities, ``modality_mask`` (observed) and ``label``.
        modalities: the model's modality order.
        device: move batches there (``None`` = leave).

    Returns:
        ``(sum of CE [C], number of samples [C])`` in ``combinations(modalities)`` order.
    """
    net = cast(FusionModel, unwrap(model))  # the docstring's contract
    combos = all_combination_masks(modalities)
    sums = torch.zeros(len(combos), dtype=torch.float64)
    counts = torch.zeros(len(combos), dtype=torch.long)
    was_training = net.training
    net.eval()
    try:
        for raw in loader:
            batch = to_device(raw, device) if device is not None else dict(raw)
            observed = batch[Keys.MASK].bool()
            labels = batch[Keys.LABEL].long()
            feats = net.encode(model_inputs(batch, tuple(modalities)))
            ce, comb_idx = _combination_ce(net.head, {m: f.pooled for m, f in feats.items()}, observed, labels)
            sums.index_add_(0, comb_idx, ce.to(sums.dtype))
            counts.index_add_(0, comb_idx, torch.ones_like(comb_idx))
    finally:
        net.train(was_training)
    return sums, counts


def lazy_from_losses(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-combination distance (mean CE; NaN without samples) and the lazy combination (largest; -1 if none)."""
    dist = torch.where(counts > 0, sums / counts.clamp_min(1).to(sums.dtype), torch.full_like(sums, float("nan")))
    if not bool((counts > 0).any()):
        return dist, -1
    return dist, int(torch.where(counts > 0, dist, torch.full_like(dist, -float("inf"))).argmax())


@register_method("omnifuse", head="omnifuse", description="OmniFuse: CRA imputation + DWFuse + TLA")
@register_method(
    "omnifuse_no_imputation",
    head="omnifuse",
    head_kwargs={"impute": "off"},
    ablation_of="omnifuse",
    description="OmniFuse, same predictor, imputation off (classifiers on v, no L_fw/L_bw)",
)
@register_method(
    "omnifuse_no_cra",
    head="omnifuse",
    head_kwargs={"impute": "none"},
    ablation_of="omnifuse",
    description="OmniFuse without any CRA (joint head on v)",
)
class OmniFuseMethod(Method):
    """OmniFuse training recipe: ``L = L_fw + lambda_bw * L_bw + lambda_dw * L_DWFuse + lambda_tla * L_TLA``.

    Args:
        modalities: ordered modality names of the network.
        lambda_bw: weight of the backward-CRA cycle loss (1).
        lambda_dw: weight of ``L_DWFuse`` (10).
        lambda_tla: weight of ``L_TLA`` (0.5; 0 disables the mining handler).
        alpha: weight of ``L_ra`` inside ``L_DWFuse`` (0.1).
        simulate: simulate missingness in :meth:`prepare` (uniform over the non-empty subsets of each
            sample's observed modalities).
        tla_loader: loader used for TLA mining at the end of every epoch (default: the trainer's loader).
        zero_refresh_every: refresh ``e_m(0)`` every this many iterations (and at every epoch end).
        seed: seed of the missingness generator.
        tla_mining: ``"epoch"`` (default, the paper's): after every epoch an extra evaluation pass over the
            training set (:func:`combination_losses`). ``"online"``: no extra pass; during the epoch every
            training batch's own encoder outputs (detached, from the training forward: encoders in train mode,
            at that iteration's weights) go through the head in eval mode for every combination (one folded,
            gradient-free head call per batch, :func:`_combination_ce`), the per-combination CE is summed over
            the epoch and the lazy combination is picked from it at the epoch end. Cheaper (no second encoder
            pass) but not the same quantity: measured against ``"epoch"`` in
            ``benchmarks/results/omnifuse_profile.md``.
        tla_every: ``"epoch"`` mining: run the pass after every ``tla_every``-th epoch only (the lazy combination
            is kept in between); 1 (default) = every epoch, the paper's schedule. The same quantity, ``tla_every``
            times less often.
    """

    name = "omnifuse"

    def __init__(
        self,
        modalities: Sequence[str],
        lambda_bw: float = 1.0,
        lambda_dw: float = 10.0,
        lambda_tla: float = 0.5,
        alpha: float = 0.1,
        simulate: bool = True,
        tla_loader: Iterable[Mapping[str, Any]] | None = None,
        zero_refresh_every: int = 1,
        seed: int = 0,
        tla_mining: str = "epoch",
        tla_every: int = 1,
    ) -> None:
        if tla_mining not in TLA_MINING:
            raise ValueError(f"omnifuse: tla_mining must be one of {TLA_MINING}, got {tla_mining!r}.")
        if tla_mining == "online" and type(self).loss_step is not OmniFuseMethod.loss_step:
            raise ValueError(f"{type(self).__name__}: tla_mining='online' exists for the classification head only.")
        if int(tla_every) < 1:
            raise ValueError(f"omnifuse: tla_every must be >= 1, got {tla_every!r}.")
        self.tla_mining = tla_mining
        self.tla_every = int(tla_every)
        self.modalities = validate_modalities(modalities)
        self.lambda_bw = float(lambda_bw)
        self.lambda_dw = float(lambda_dw)
        self.lambda_tla = float(lambda_tla)
        self.alpha = float(alpha)
        self.simulate = bool(simulate)
        self.tla_loader = tla_loader
        self.zero_refresh_every = max(1, int(zero_refresh_every))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.example_inputs: dict[str, torch.Tensor] | None = None
        n_comb = 2 ** len(self.modalities) - 1
        self.online_sums = torch.zeros(n_comb, dtype=torch.float64)
        self.online_counts = torch.zeros(n_comb, dtype=torch.long)

    def prepare(self, batch: dict[str, Any], engine: Any) -> dict[str, Any]:
        """Keep the observed mask under :data:`OBSERVED_MASK_KEY` and simulate missingness on ``modality_mask``."""
        if not self.simulate:
            return batch
        out = dict(batch)
        observed = batch[Keys.MASK].bool()
        out[OBSERVED_MASK_KEY] = observed
        out[Keys.MASK] = simulate_missing(observed, self.generator)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The missingness generator state and the online mining sums (the lazy combination etc. are head buffers)."""
        return {
            "generator": self.generator.get_state(),
            "online_sums": self.online_sums.clone(),
            "online_counts": self.online_counts.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (checkpoints without the online sums start them at 0)."""
        self.generator.set_state(state["generator"])
        self.online_sums.copy_(state.get("online_sums", torch.zeros_like(self.online_sums)))
        self.online_counts.copy_(state.get("online_counts", torch.zeros_like(self.online_counts)))

    def reseed(self, seed: int) -> None:
        """Restart the missingness generator from ``seed``."""
        self.generator.manual_seed(int(seed))

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """All OmniFuse losses on the (simulated-missing) batch."""
        head = _omnifuse_head(model)
        mask = batch[Keys.MASK].bool()
        observed = batch.get(OBSERVED_MASK_KEY, mask).bool()
        labels = batch[Keys.LABEL].long()
        inputs = model_inputs(batch, self.modalities)
        self.example_inputs = {m: inputs[m][:1].detach() for m in self.modalities}
        iteration = getattr(getattr(engine, "state", None), "iteration", 0) or 0
        if not bool(head.zero_pooled_ready) or iteration % self.zero_refresh_every == 0:
            refresh_zero_pooled(model, inputs)
        out = forward_outputs(model, inputs, mask, target_mask=observed)
        aux = out.aux
        b, n_mod = mask.shape
        if head.impute:
            sq = ((aux["imputed"] - aux["target"]) ** 2).view(b, n_mod, -1).mean(dim=-1)  # [B, M]
            obs = observed.to(sq.dtype)
            l_fw = (sq * obs).sum() / obs.sum().clamp_min(1.0)
            l_bw = F.mse_loss(aux["cycle"], aux["observed"].detach())
        else:  # the "without imputation" ablation has no autoencoders to train
            l_fw = l_bw = out.logits.new_zeros(())
        z = stack_modality_logits(aux["modality_logits"], self.modalities)
        dw = dwfuse_loss(z, aux["joint_logits"], labels, head.beta, self.alpha)
        l_tla = (
            tla_loss(out.logits, labels, mask, head.lazy_mask()) if self.lambda_tla > 0 else out.logits.new_zeros(())
        )
        if self.lambda_tla > 0 and self.tla_mining == "online":
            self.accumulate_online(head, aux["pooled"], observed, labels)
        loss = l_fw + self.lambda_bw * l_bw + self.lambda_dw * dw["dwfuse"] + self.lambda_tla * l_tla
        return {
            "loss": loss,
            "fw_loss": l_fw,
            "bw_loss": l_bw,
            "dwfuse_loss": dw["dwfuse"],
            "enc_loss": dw["enc"],
            "ra_loss": dw["ra"],
            "tla_loss": l_tla,
        }

    @torch.no_grad()
    def accumulate_online(
        self, head: OmniFuseHead, pooled: Mapping[str, torch.Tensor], observed: torch.Tensor, labels: torch.Tensor
    ) -> None:
        """``tla_mining="online"``: add this batch's per-combination CE (head in eval mode, detached inputs).

        Args:
            head: the OmniFuse head.
            pooled: ``{name: [B, D_m]}`` encoder outputs of the training forward.
            observed: bool ``[B, M]`` observed modalities (before simulated missingness).
            labels: long ``[B]``.
        """
        was_training = head.training
        head.eval()
        try:
            ce, comb_idx = _combination_ce(head, {m: p.detach() for m, p in pooled.items()}, observed, labels)
        finally:
            head.train(was_training)
        self.online_sums.index_add_(0, comb_idx, ce.to(self.online_sums.dtype))
        self.online_counts.index_add_(0, comb_idx, torch.ones_like(comb_idx))

    def mine_online(self, model: nn.Module) -> tuple[torch.Tensor, int]:
        """Store the lazy combination from the sums of :meth:`accumulate_online` and restart them.

        Returns:
            ``(distance per combination [C], lazy index or -1)``.
        """
        out = store_lazy(_omnifuse_head(model), self.online_sums, self.online_counts, self.modalities)
        self.online_sums.zero_()
        self.online_counts.zero_()
        return out

    def handlers(self) -> list[Any]:
        """The epoch-end handler (``e_m(0)`` refresh + TLA mining)."""
        return [OmniFuseEpochHandler(self, self.tla_loader)]

    def mine(
        self, model: nn.Module, loader: Iterable[Mapping[str, Any]], device: Any = None
    ) -> tuple[torch.Tensor, int]:
        """Run TLA mining and store the result in the head's buffers.

        Returns:
            ``(distance per combination [C], lazy index or -1)``.
        """
        sums, counts = combination_losses(model, loader, self.modalities, device)
        return store_lazy(_omnifuse_head(model), sums, counts, self.modalities)


def store_lazy(
    owner: LazyCombinationMixin, sums: torch.Tensor, counts: torch.Tensor, modalities: Sequence[str]
) -> tuple[torch.Tensor, int]:
    """Pick the lazy combination from mined losses (:func:`lazy_from_losses`) and store it in ``owner``'s buffers.

    Shared by the classification head and the segmentation network (both hold ``combination_distance [C]``
    and ``lazy_combination``).

    Args:
        owner: the module holding the buffers.
        sums: summed loss per combination ``[C]``.
        counts: samples per combination ``[C]``.
        modalities: modality names (for the log line).

    Returns:
        ``(distance per combination [C], lazy index or -1)``.
    """
    dist, lazy = lazy_from_losses(sums, counts)
    owner.combination_distance.copy_(dist.to(owner.combination_distance))
    owner.lazy_combination.fill_(lazy)
    if lazy >= 0:
        logger.info("OmniFuse TLA: lazy combination %s", combination_name(combinations(modalities)[lazy]))
    return dist, lazy


class OmniFuseEpochHandler:
    """Ignite handler at ``EPOCH_COMPLETED``: refresh ``e_m(0)`` in eval mode, then mine the lazy combination.

    Args:
        method: the :class:`OmniFuseMethod`.
        loader: mining loader (default ``engine.state.dataloader``, the training loader).
    """

    def __init__(self, method: OmniFuseMethod, loader: Iterable[Mapping[str, Any]] | None = None) -> None:
        self.method = method
        self.loader = loader

    def attach(self, engine: Any) -> None:
        """Register on ``EPOCH_COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        """Refresh the zero-input embedding and (if ``lambda_tla > 0``) mine the lazy combination."""
        net = engine.network
        if self.method.example_inputs is not None:
            refresh_zero_pooled(net, self.method.example_inputs)
        if self.method.lambda_tla <= 0:
            return
        if getattr(self.method, "tla_mining", "epoch") == "online":
            _, lazy = self.method.mine_online(net)
        elif (getattr(engine.state, "epoch", 0) or 0) % getattr(self.method, "tla_every", 1) == 0:
            loader = self.loader if self.loader is not None else engine.state.dataloader
            _, lazy = self.method.mine(net, loader, engine.state.device)
        else:  # tla_every > 1: no pass after this epoch, the lazy combination stays
            lazy = int(_omnifuse_head(net).lazy_combination)
        engine.state.metrics["omnifuse_lazy_combination"] = lazy
