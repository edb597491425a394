"""Cooperative learning (Ding et al., PNAS 2022), the Meta Fusion paper's "Cooperative learning" baseline.

Regression with one additive component per modality, fitted jointly with an agreement penalty::

    L = 1/2 * mean_i (y_i - sum_m f_m(x_mi))^2 + rho/2 * mean_i sum_{m < m'} (f_m(x_mi) - f_m'(x_m'i))^2

rho = 0 is additive early fusion, rho = 1 gives late-fusion-like fits (each view fitted to y on its own,
then averaged), rho > 1 pushes the views to agree. Here each ``f_m`` is an MLP on the modality's raw
features (the neural variant of the paper's iterative algorithm) trained jointly by Adam; rho is chosen
from a grid by validation MSE and each rho keeps its best-validation epoch.

Missing modalities (beyond the paper): a sample's prediction sums the views it has; its agreement term
covers only the pairs it has (the same rule the training loss uses).

Regression only: the paper's simulation (BENCHMARKS.md B3) is regression, and the classification variant
(a GLM link on the summed views) is not used by any medfusion benchmark.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from medfusion.fusion.meta_fusion import MetaFusionData
from medfusion.modality import check_mask, validate_modalities

__all__ = ["DEFAULT_RHO_GRID", "cooperative_loss", "CooperativeRegressor", "fit_cooperative"]

logger = logging.getLogger(__name__)

DEFAULT_RHO_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 3.0, 5.0, 9.0)
"""The rho grid of Ding et al.'s simulations."""


def cooperative_loss(
    views: torch.Tensor, y: torch.Tensor, rho: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cooperative learning objective on one batch.

    Args:
        views: ``[M, N]`` per-modality fits ``f_m(x_m)``.
        y: ``[N]`` targets.
        rho: agreement weight (>= 0).
        mask: bool ``[N, M]`` presence (default all present); absent views are left out of the sum and of
            every agreement pair.

    Returns:
        Scalar ``1/2 mean_i (y_i - sum_m f_mi)^2 + rho/2 mean_i sum_{m<m'} (f_mi - f_m'i)^2``.
    """
    if mask is None:
        mask = torch.ones(views.shape[1], views.shape[0], dtype=torch.bool, device=views.device)
    present = mask.T.to(views.dtype)  # [M, N]
    fit = 0.5 * ((y - (views * present).sum(dim=0)) ** 2).mean()
    if rho == 0.0 or views.shape[0] < 2:
        return fit
    agree = views.new_zeros(views.shape[1])
    for a in range(views.shape[0]):
        for b in range(a + 1, views.shape[0]):
            agree = agree + present[a] * present[b] * (views[a] - views[b]) ** 2
    return fit + 0.5 * rho * agree.mean()


class CooperativeRegressor(nn.Module):
    """One MLP per modality; the prediction is the sum of the present modalities' outputs.

    Args:
        modalities: ordered modality names.
        in_dims: ``{modality: feature size}``.
        hidden: hidden sizes of every view's MLP (ReLU between layers).
        rho: the agreement weight the model was (or will be) trained with (stored for reference).
    """

    rho: torch.Tensor

    def __init__(
        self, modalities: Sequence[str], in_dims: Mapping[str, int], hidden: Sequence[int] = (128, 64), rho: float = 0.0
    ) -> None:
        super().__init__()
        self.modalities = validate_modalities(modalities)
        missing = [m for m in self.modalities if m not in in_dims]
        if missing:
            raise ValueError(f"CooperativeRegressor in_dims: no feature size for modalities {missing}.")
        self.views = nn.ModuleDict()
        for m in self.modalities:
            layers: list[nn.Module] = []
            width = int(in_dims[m])
            for h in hidden:
                layers += [nn.Linear(width, int(h)), nn.ReLU()]
                width = int(h)
            layers.append(nn.Linear(width, 1))
            self.views[m] = nn.Sequential(*layers)
        self.register_buffer("rho", torch.tensor(float(rho)))

    def view_outputs(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-modality fits.

        Args:
            x: ``{modality: [N, F_m]}``.

        Returns:
            ``[M, N]``.
        """
        return torch.stack([self.views[m](x[m]).squeeze(-1) for m in self.modalities])

    def forward(self, x: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction ``sum_m mask_m f_m(x_m)``.

        Args:
            x: ``{modality: [N, F_m]}``.
            mask: bool ``[N, M]`` (default all present).

        Returns:
            ``[N]``.
        """
        views = self.view_outputs(x)
        if mask is None:
            return views.sum(dim=0)
        return (views * mask.T.to(views.dtype)).sum(dim=0)


def _val_mse(model: CooperativeRegressor, data: MetaFusionData) -> float:
    with torch.no_grad():
        return float(((model(data.x, data.mask) - data.y.float()) ** 2).mean())


def _fit_one(
    model: CooperativeRegressor,
    train: MetaFusionData,
    val: MetaFusionData,
    rho: float,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train ``model`` in place with a fixed rho; restore its best-validation epoch; return that MSE."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = train.mask.shape[0]
    bs = n if batch_size <= 0 else batch_size
    y = train.y.float()
    best, best_state = math.inf, copy.deepcopy(model.state_dict())
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            views = model.view_outputs({m: v[idx] for m, v in train.x.items()})
            loss = cooperative_loss(views, y[idx], rho, train.mask[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        score = _val_mse(model, val)
        logger.debug("cooperative rho=%s epoch %d: val MSE %.6g", rho, epoch, score)
        if score < best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best


def fit_cooperative(
    train: MetaFusionData,
    val: MetaFusionData,
    modalities: Sequence[str],
    hidden: Sequence[int] = (128, 64),
    rho_grid: Sequence[float] = DEFAULT_RHO_GRID,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[CooperativeRegressor, dict[float, float]]:
    """Fit one cooperative model per rho (same initial weights and data order), keep the best on validation.

    Args:
        train: ``MetaFusionData`` (x ``{modality: [N, F_m]}``, mask bool ``[N, M]``, float y ``[N]``).
        val: the same for validation (best epoch per rho, then the rho).
        modalities: ordered modality names (the mask's column order).
        hidden: hidden sizes of each view's MLP.
        rho_grid: candidate agreement weights (>= 0); ties keep the earlier value.
        epochs: training epochs per rho.
        lr: Adam learning rate.
        batch_size: mini-batch size (<= 0: full batch).
        seed: initial weights and batch order.

    Returns:
        ``(model with the chosen rho, {rho: best validation MSE})``.

    Raises:
        ValueError: an empty or negative rho grid, a mask of the wrong shape, or a missing modality in ``x``.
    """
    mods = validate_modalities(modalities)
    grid = [float(r) for r in rho_grid]
    if not grid or any(r < 0 for r in grid):
        raise ValueError(f"fit_cooperative rho_grid: expected rho >= 0 values, got {grid}.")
    for name, data in (("train", train), ("val", val)):
        absent = [m for m in mods if m not in data.x]
        if absent:
            raise ValueError(f"fit_cooperative {name}.x: no features for modalities {absent}.")
        check_mask(data.mask, len(mods))
    in_dims = {m: int(train.x[m].shape[1]) for m in mods}
    torch.manual_seed(seed)
    init = CooperativeRegressor(mods, in_dims, hidden).state_dict()
    scores: dict[float, float] = {}
    best_model, best_score = None, math.inf
    for rho in grid:
        model = CooperativeRegressor(mods, in_dims, hidden, rho=rho)
        model.load_state_dict({**init, "rho": torch.tensor(rho)})
        scores[rho] = _fit_one(model, train, val, rho, epochs, lr, batch_size, seed)
        logger.info("cooperative learning: rho=%s val MSE %.6g", rho, scores[rho])
        if best_model is None or scores[rho] < best_score:
            best_model, best_score = model, scores[rho]
    assert best_model is not None
    best_model.eval()
    return best_model, scores
