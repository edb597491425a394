"""MetaKD: meta-learned modality-weighted knowledge distillation (docs/method_spec.md section 1).

Pieces (each maps to a test with hand-computed values, see docs/methods.md):

* importance weight vector (IWV) ``w`` in R^M, normalised by softmax (:class:`ImportanceWeights`);
* KD weights ``softmax(w)_i / softmax(w)_j = exp(w_i - w_j)``, detached (:func:`kd_weight_matrix`);
* ordered pairs (teacher i, student j), i != j, both present (:func:`kd_pair_mask`);
* ``kd_ij = ratio_ij * mean |stopgrad(f_i) - f_j|`` summed over pairs, mean over the batch
  (:func:`metakd_kd_loss`);
* total ``L = L_task + alpha * sum kd_ij`` (:class:`MetaKDMethod`);
* outer problem ``argmin_w L_task(meta-val; w)``, approximated first-order as in the reference code: every
  ``meta_interval`` iterations, ``meta_steps`` (default 20) Adam steps on ``w`` ONLY, each on the next batch of
  the held-out all-modality meta-validation loader (cycling), with each modality's bottleneck feature scaled by
  ``M * softmax(w)_m`` (= 1 at uniform weights, so the meta loss is taken at the model's operating point)
  (:meth:`MetaKDMethod.meta_step`, :class:`MetaStepHandler`). ONE step per interval (the earlier behaviour)
  bounds how far ``w`` can move (lr 1e-2: at most about 0.01 per interval), so the weights could not rank the
  modalities in a normal budget.

``alpha = 0`` is the "no KD" baseline; ``kd_weights="uniform"`` (all ratios 1, no meta step) and
``kd_weights={modality: weight}`` (fixed, e.g. an oracle from single-modality validation Dice) are the
ablations that tell whether KD or its weighting helps; ``dropout_mode="fixed"`` with one combination trains a
"dedicated" per-combination model. The same method drives the :class:`~medfusion.models.segmenter.Segmenter`
(KD at the bottleneck) and the classification head :class:`MetaKDHead` (KD on pooled features).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from torch import nn

from medfusion.batch import forward_outputs, model_inputs, to_device, unwrap
from medfusion.encoders.base import EncoderOutput
from medfusion.fusion.base import FusionHead, FusionOutput, impute_features, register_fusion
from medfusion.fusion.method import Method
from medfusion.fusion.recipes import register_method
from medfusion.modality import Keys, parse_combination, validate_modalities

__all__ = [
    "ImportanceWeights",
    "kd_pair_mask",
    "kd_weight_matrix",
    "metakd_kd_loss",
    "MetaKDHead",
    "MetaKDMethod",
    "MetaStepHandler",
]

logger = logging.getLogger(__name__)


class ImportanceWeights(nn.Module):
    """MetaKD's importance weight vector ``w`` [M] (initialised to 0 = uniform softmax).

    Lives in the method, not the network; put it in the checkpoint's ``save_dict``
    (``{"metakd": method.state}``) so it is saved and restored with the model.

    Args:
        modalities: ordered modality names.
    """

    meta_steps: torch.Tensor

    def __init__(self, modalities: Sequence[str]) -> None:
        super().__init__()
        self.modalities = validate_modalities(modalities)
        self.w = nn.Parameter(torch.zeros(len(self.modalities)))
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long))

    def weights(self) -> torch.Tensor:
        """``softmax(w)`` [M] (differentiable in ``w``)."""
        return torch.softmax(self.w, dim=0)

    def as_dict(self) -> dict[str, float]:
        """``{modality: softmax(w)_m}``."""
        return dict(zip(self.modalities, self.weights().detach().cpu().tolist()))

    def ranking(self) -> list[str]:
        """Modalities sorted by learned importance, highest first."""
        d = self.as_dict()
        return sorted(d, key=d.__getitem__, reverse=True)


def kd_pair_mask(modality_mask: torch.Tensor) -> torch.Tensor:
    """Ordered (teacher i, student j) pairs, i != j, both present.

    Args:
        modality_mask: bool ``[B, M]``.

    Returns:
        bool ``[B, M, M]``, entry ``[b, i, j]`` True when i is a teacher of j for sample b.
    """
    m = modality_mask.bool()
    eye = torch.eye(m.shape[1], dtype=torch.bool, device=m.device)
    return m[:, :, None] & m[:, None, :] & ~eye


def kd_weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """``softmax(w)_i / softmax(w)_j`` [M, M] (= ``exp(w_i - w_j)``), detached."""
    p = torch.softmax(w.detach(), dim=0)
    return p[:, None] / p[None, :]


def metakd_kd_loss(features: torch.Tensor, modality_mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Modality-weighted pairwise L1 distillation.

    ``sum_{i != j, both present} (softmax(w)_i / softmax(w)_j) * mean_{C,spatial} |stopgrad(f_i) - f_j|``,
    averaged over the batch.

    Args:
        features: per-modality features before imputation, ``[B, M, C, *spatial]`` (or ``[B, M, C]``).
        modality_mask: bool ``[B, M]``.
        w: IWV ``[M]`` (only its detached softmax is used).

    Returns:
        scalar loss (0 when no sample has two present modalities).
    """
    b, n_mod = features.shape[:2]
    flat = features.reshape(b, n_mod, -1)
    teacher = flat.detach()
    # |f_i - f_j| averaged over C and space: [B, M(teacher), M(student)]
    dist = (teacher[:, :, None, :] - flat[:, None, :, :]).abs().mean(dim=-1)
    pairs = kd_pair_mask(modality_mask).to(dist.dtype)
    ratio = kd_weight_matrix(w).to(dist.dtype)
    return (dist * pairs * ratio).sum(dim=(1, 2)).mean()


@register_fusion("metakd")
class MetaKDHead(FusionHead):
    """MetaKD classification head: mean-imputed pooled features, concatenated, MLP classifier.

    Args:
        modalities: ordered modality names.
        in_dims: ``{name: pooled dim}``; every modality is projected to ``embed_dim``.
        num_classes: number of classes ``K``.
        embed_dim: common per-modality dimension (needed so features can be averaged and compared).
        hidden: hidden size of the classifier MLP.
        dropout: dropout before the classifier.
        impute: ``"mean"`` (Eq. 2) or ``"zero"``.

    Returns (forward):
        ``FusionOutput(logits [B, K], embeddings {name: [B, E]} after imputation,
        aux={"modality_features": [B, M, E] before imputation})``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        in_dims: Mapping[str, int],
        num_classes: int,
        embed_dim: int = 64,
        hidden: int = 64,
        dropout: float = 0.0,
        impute: str = "mean",
    ) -> None:
        super().__init__(modalities)
        self._impute_fn = impute_features
        self.impute = impute
        self.proj = nn.ModuleDict({m: nn.Linear(int(in_dims[m]), embed_dim) for m in self.modalities})
        self.classifier = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(len(self.modalities) * embed_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(
        self,
        features: Mapping[str, EncoderOutput],
        modality_mask: torch.Tensor,
        modality_weights: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Fuse pooled features; ``modality_weights`` [M] scales them (the meta step passes ``M * softmax(w)``)."""
        f = torch.stack([self.proj[m](features[m].pooled) for m in self.modalities], dim=1)  # [B, M, E]
        f = f * modality_mask.to(f.dtype).unsqueeze(-1)  # absent content never leaks
        imputed = self._impute_fn(f, modality_mask, self.impute)
        if modality_weights is not None:
            imputed = imputed * modality_weights.to(f.dtype).view(1, -1, 1)
        logits = self.classifier(imputed.flatten(1))
        emb = {m: imputed[:, i] for i, m in enumerate(self.modalities)}
        return FusionOutput(logits, emb, {"modality_features": f})


class ClassLabelCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy that accepts the data layer's float class labels ``[B]`` or ``[B, 1]``."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[B, K]``, ``labels`` class indices ``[B]`` / ``[B, 1]`` (any numeric dtype)."""
        return super().forward(logits, labels.reshape(-1).long())


def default_task_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice + BCE on sigmoid outputs (segmentation) or cross-entropy (classification).

    Segmentation: MONAI ``DiceCELoss(sigmoid=True, batch=True)`` on logits ``[B, 3, D, H, W]`` and
    regions ``[B, 3, D, H, W]``: the Dice of each region is computed over the whole batch ("batch
    Dice", as nnU-Net), not per crop. Per crop, a crop without the region (half the crops of the 1:1
    tumour/brain sampler; TC and ET are absent from many tumour crops too) has Dice loss 1 whatever it
    predicts, so its false positives get no Dice gradient and only the voxel-mean BCE pushes them
    down. On the real BraTS case, 150 iterations of 2 crops of 64^3 reached WT Dice 0.785 with per-crop Dice
    and 0.936 with batch Dice (same crops and seed; ``benchmarks/results/real_case_overfit_diagnosis.md``).
    With one crop per batch both are the same. Under torchrun the batch is each rank's local batch (the
    Dice statistics are not gathered across ranks, unlike nnU-Net), so N processes with b crops each do
    not optimise exactly the loss of one process with N*b crops; pass a per-crop ``DiceCELoss`` as
    ``task_loss`` where that equivalence matters (tests/bundles/test_brats_multi_gpu.py does).
    """
    if task == "segmentation":
        from monai.losses import DiceCELoss

        return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
    if task == "classification":
        return ClassLabelCrossEntropy()
    raise ValueError(f"task must be 'segmentation' or 'classification', got {task!r}.")


# the classification registry: MetaKD recipes default to task="classification" (the caller's kwargs win)
@register_method(
    "metakd",
    head="metakd",
    method_kwargs={"task": "classification"},
    description="MetaKD: KD weighted by meta-learned importance weights",
)
@register_method(
    "metakd_no_kd",
    head="metakd",
    method_kwargs={"task": "classification", "alpha": 0.0},
    ablation_of="metakd",
    description="MetaKD network, no KD",
)
@register_method(
    "metakd_uniform_kd",
    head="metakd",
    method_kwargs={"task": "classification", "kd_weights": "uniform"},
    ablation_of="metakd",
    description="KD with fixed uniform weights (no meta step)",
)
@register_method(
    "metakd_fixed_kd",
    head="metakd",
    method_kwargs={"task": "classification"},
    ablation_of="metakd",
    required_method_kwargs=("kd_weights",),
    description="KD with fixed weights kd_weights={modality: weight} (e.g. an oracle; no meta step)",
)
class MetaKDMethod(Method):
    """MetaKD training recipe (also the "no KD" and "dedicated" baselines).

    Args:
        modalities: ordered modality names of the network.
        task: ``"segmentation"`` (Dice+BCE, labels ``[B, 3, ...]``) or ``"classification"`` (CE).
        alpha: KD weight (0.1 in the paper; 0 = "no KD" baseline, no meta step).
        dropout_mode: modality dropout during training (``"uniform"`` over the 2^M-1 combinations per
            sample, ``"k_subset"`` per batch as in the reference code, ``"bernoulli"``, ``"fixed"``,
            ``"none"``).
        dropout_combination: the combination for ``"fixed"`` (``"flair+t1ce"``) = dedicated model.
        dropout_p: drop probability for ``"bernoulli"``.
        warmup_epochs: epochs trained with all (available) modalities before dropout starts.
        meta_loader: loader of the held-out meta-validation split (all modalities); ``None``
            disables the meta step.
        meta_interval: iterations between meta updates (reference code: 100).
        meta_steps: Adam steps on ``w`` per meta update, each on the next meta-validation batch (cycling; the
            reference code runs one per meta-validation batch, about 20).
        meta_lr: Adam learning rate of ``w``.
        meta_weight_decay: Adam weight decay of ``w`` (paper 5e-5, code 5e-4).
        output_dir: where ``iwv_trajectory.csv`` is appended after every meta step (optional).
        task_loss: override of the task loss.
        seed: seed of the modality-dropout generator.
        kd_weights: where the KD ratios ``softmax(w)_i / softmax(w)_j`` come from: ``"meta"`` (learned by the
            meta step, MetaKD), ``"uniform"`` (``w = 0`` fixed: every ratio 1, no meta step; the "uniform KD"
            ablation) or ``{modality: weight > 0}`` (fixed ``softmax(w) = weight / sum(weight)``, no meta step;
            e.g. an oracle from single-modality validation Dice).

    Raises:
        ValueError: ``kd_weights`` is not ``"meta"``/``"uniform"`` or a mapping with one positive finite weight
            per modality, or ``meta_steps < 1``.
    """

    name = "metakd"

    def __init__(
        self,
        modalities: Sequence[str],
        task: str = "segmentation",
        alpha: float = 0.1,
        dropout_mode: str = "uniform",
        dropout_combination: str | Sequence[str] | None = None,
        dropout_p: float = 0.5,
        warmup_epochs: int = 0,
        meta_loader: Iterable[Mapping[str, Any]] | None = None,
        meta_interval: int = 100,
        meta_lr: float = 1e-2,
        meta_weight_decay: float = 5e-4,
        output_dir: str | Path | None = None,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        meta_steps: int = 20,
        kd_weights: str | Mapping[str, float] = "meta",
    ) -> None:
        from medfusion.data.dropout import BatchModalityDropout

        self.modalities = validate_modalities(modalities)
        self.task = task
        self.alpha = float(alpha)
        self.task_loss = task_loss if task_loss is not None else default_task_loss(task)
        self.warmup_epochs = int(warmup_epochs)
        combo = None
        if dropout_combination is not None:
            combo = list(parse_combination(dropout_combination, self.modalities))
        self.dropout = BatchModalityDropout(
            self.modalities, mode=dropout_mode, p=dropout_p, combination=combo, seed=seed
        )
        self.state = ImportanceWeights(self.modalities)
        self.kd_weights = self._set_kd_weights(kd_weights)
        self.meta_loader = meta_loader
        self.meta_interval = int(meta_interval)
        if int(meta_steps) < 1:
            raise ValueError(f"MetaKDMethod: meta_steps must be >= 1, got {meta_steps}.")
        self.meta_steps = int(meta_steps)
        self.meta_lr = meta_lr
        self.meta_weight_decay = meta_weight_decay
        self.meta_optimizer = torch.optim.Adam([self.state.w], lr=meta_lr, weight_decay=meta_weight_decay)
        self._meta_handler: MetaStepHandler | None = None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._trajectory_checked = False
        self.last_meta_grad: torch.Tensor | None = None  # d(meta loss)/dw of the last meta step [M] (logging)

    def _set_kd_weights(self, kd_weights: str | Mapping[str, float]) -> str | dict[str, float]:
        """Validate ``kd_weights``; a fixed mapping sets ``w = log(weight / sum(weight))``."""
        if isinstance(kd_weights, str):
            if kd_weights not in ("meta", "uniform"):
                raise ValueError(
                    f"MetaKDMethod: kd_weights must be 'meta', 'uniform' or {{modality: weight}}, got {kd_weights!r}."
                )
            return kd_weights
        if not isinstance(kd_weights, Mapping):
            raise ValueError(
                f"MetaKDMethod: kd_weights must be 'meta', 'uniform' or {{modality: weight}}, got {kd_weights!r}."
            )
        if set(kd_weights) != set(self.modalities):
            raise ValueError(
                f"MetaKDMethod: kd_weights needs one weight per modality {list(self.modalities)}, got keys "
                f"{sorted(kd_weights)}."
            )
        values = torch.tensor([float(kd_weights[m]) for m in self.modalities], dtype=torch.float64)
        if not bool(torch.isfinite(values).all()) or bool((values <= 0).any()):
            raise ValueError(f"MetaKDMethod: kd_weights must be positive and finite, got {dict(kd_weights)}.")
        with torch.no_grad():
            self.state.w.copy_(torch.log(values / values.sum()).to(self.state.w.dtype))
        return {m: float(kd_weights[m]) for m in self.modalities}

    @property
    def learns_weights(self) -> bool:
        """True when the meta step trains ``w`` (KD on, ``kd_weights="meta"``, a meta-validation loader given)."""
        return self.alpha > 0 and self.kd_weights == "meta" and self.meta_loader is not None

    # -------------------------------------------------------------- training
    def prepare(self, batch: dict[str, Any], engine: Any) -> dict[str, Any]:
        """Batch-level modality dropout after the warm-up epochs."""
        self.state.to(batch[Keys.MASK].device)
        if engine is not None and engine.state.epoch <= self.warmup_epochs:
            return batch
        return self.dropout(batch)

    def loss_step(self, model: nn.Module, batch: Mapping[str, Any], engine: Any) -> dict[str, torch.Tensor]:
        """``L = L_task + alpha * KD`` on the (dropped-out) batch."""
        mask = batch[Keys.MASK].bool()
        out = forward_outputs(model, model_inputs(batch, self.modalities), mask)
        task = self.task_loss(out.logits, batch[Keys.LABEL])
        if self.alpha > 0:
            kd = metakd_kd_loss(out.aux["modality_features"], mask, self.state.w)
        else:
            kd = torch.zeros((), device=task.device)
        return {"loss": task + self.alpha * kd, "task_loss": task, "kd_loss": kd}

    def handlers(self) -> list[Any]:
        """The meta step (only when KD is on with learned weights and a meta-validation loader is given)."""
        if self.learns_weights:
            self._meta_handler = MetaStepHandler(self)
            return [self._meta_handler]
        return []

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """IWV, its meta optimizer and the dropout generator (checkpointed as ``"method"``)."""
        return {
            "iwv": self.state.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "dropout": self.dropout.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a bare ImportanceWeights state dict is accepted too)."""
        if "iwv" not in state:  # checkpoints that saved ``method.state`` directly
            self.state.load_state_dict(state)
            return
        self.state.load_state_dict(state["iwv"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.dropout.load_state_dict(state["dropout"])

    def reseed(self, seed: int) -> None:
        """New dropout generator and a fresh meta-validation iterator for this epoch."""
        self.dropout.reseed(seed)
        if self._meta_handler is not None:
            self._meta_handler.reset()

    # ----------------------------------------------------------- meta step
    def meta_scale(self) -> torch.Tensor:
        """``M * softmax(w)`` [M] (differentiable in ``w``): the factors of the bottleneck features in the meta loss.

        Equal to 1 for every modality at uniform weights, so the meta loss is the model's own task loss there
        (``softmax(w)`` alone would shrink every feature to ``1/M`` with nothing downstream to undo it).
        """
        return len(self.modalities) * self.state.weights()

    def meta_step(self, model: nn.Module, batch: Mapping[str, Any]) -> float:
        """One first-order step on ``w`` only.

        Each modality's bottleneck feature is scaled by ``M * softmax(w)_m`` (:meth:`meta_scale`); the task loss
        on the meta-validation batch (all available modalities) is differentiated w.r.t. ``w`` alone
        (``torch.autograd.grad``), so the network's parameters and their ``.grad`` are untouched.

        Returns:
            the meta-validation task loss (before the step).
        """
        w = self.state.w
        mask = batch[Keys.MASK].bool()
        out = forward_outputs(
            unwrap(model), model_inputs(batch, self.modalities), mask, modality_weights=self.meta_scale()
        )
        loss = self.task_loss(out.logits, batch[Keys.LABEL])
        (grad,) = torch.autograd.grad(loss, [w])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank steps w identically (w is outside DistributedDataParallel)
            torch.distributed.all_reduce(grad)
            grad = grad / torch.distributed.get_world_size()
        self.last_meta_grad = grad.detach().cpu()
        self.meta_optimizer.zero_grad(set_to_none=True)
        w.grad = grad
        self.meta_optimizer.step()
        w.grad = None
        self.state.meta_steps += 1
        return float(loss.detach())

    def record(self, iteration: int, meta_loss: float, step_in_interval: int = 0) -> dict[str, float]:
        """Log the IWV after a meta step and append it to ``iwv_trajectory.csv`` when ``output_dir`` is set.

        Args:
            iteration: training iteration of the meta update.
            meta_loss: meta-validation loss of the step (before it).
            step_in_interval: index of the step within its meta update (0 .. ``meta_steps - 1``).
        """
        weights = self.state.as_dict()
        row: dict[str, Any] = {
            "meta_step": int(self.state.meta_steps),
            "iteration": iteration,
            "step_in_interval": int(step_in_interval),
            "meta_loss": meta_loss,
        }
        row.update({f"w_{m}": float(v) for m, v in zip(self.modalities, self.state.w.detach().cpu().tolist())})
        row.update({f"softmax_{m}": v for m, v in weights.items()})
        if self.last_meta_grad is not None:  # the gradient the step used (before Adam's normalisation)
            row.update({f"grad_{m}": float(g) for m, g in zip(self.modalities, self.last_meta_grad.tolist())})
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "iwv_trajectory.csv"
            if path.exists() and not self._trajectory_checked:  # once per process: the file may predate a resume
                with path.open(newline="") as fh:
                    old = list(csv.DictReader(fh))
                if old and int(old[-1]["meta_step"]) >= row["meta_step"]:
                    # a resumed run replays steps after its checkpoint: drop the stale rows first
                    keep = [r for r in old if int(r["meta_step"]) < row["meta_step"]]
                    with path.open("w", newline="") as fh:
                        writer = csv.DictWriter(fh, fieldnames=list(row))
                        writer.writeheader()
                        writer.writerows(keep)
            self._trajectory_checked = True
            new = not path.exists()
            with path.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
        logger.debug(
            "MetaKD meta step %d (iteration %d): meta loss %.4f, softmax(w) %s",
            row["meta_step"],
            iteration,
            meta_loss,
            {m: round(v, 4) for m, v in weights.items()},
        )
        return row


class MetaStepHandler:
    """Ignite handler: every ``method.meta_interval`` iterations, ``method.meta_steps`` MetaKD meta steps.

    Each step takes the next batch of ``method.meta_loader`` (cycling when it runs out); the IWV after every
    step goes to the debug log and ``iwv_trajectory.csv`` (:meth:`MetaKDMethod.record`); after the update the log (info)
    and ``engine.state.metrics`` (``iwv_<modality>``, so StatsHandler/TensorBoard show it) get the new IWV.

    Args:
        method: the :class:`MetaKDMethod`.
    """

    def __init__(self, method: MetaKDMethod) -> None:
        self.method = method
        self._iter: Any = None

    def attach(self, engine: Any) -> None:
        """Register on ``ITERATION_COMPLETED(every=meta_interval)``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.method.meta_interval), self)

    def reset(self) -> None:
        """Start the meta-validation loader afresh (each epoch, so resumed runs replay exactly)."""
        self._iter = None

    def _next_batch(self) -> Mapping[str, Any]:
        if self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                pass
        self._iter = iter(self.method.meta_loader)  # type: ignore[arg-type]
        try:
            return next(self._iter)
        except StopIteration:
            raise ValueError(
                "MetaKD: the meta-validation loader yields no batch (empty meta_val split, or fewer cases than "
                "the batch size with drop_last=True); give it at least one batch or train without the meta step."
            ) from None

    def __call__(self, engine: Any) -> None:
        """Run ``meta_steps`` meta steps with the engine's network."""
        net = engine.network
        losses = []
        for step in range(self.method.meta_steps):
            batch = to_device(self._next_batch(), engine.state.device)
            losses.append(self.method.meta_step(net, batch))
            self.method.record(engine.state.iteration, losses[-1], step)
        weights = self.method.state.as_dict()
        logger.info(
            "MetaKD meta update at iteration %d (%d steps): meta loss %.4f -> %.4f, softmax(w) %s",
            engine.state.iteration,
            len(losses),
            losses[0],
            losses[-1],
            {m: round(v, 4) for m, v in weights.items()},
        )
        for m, v in weights.items():
            engine.state.metrics[f"iwv_{m}"] = v
