"""Meta Fusion as a registered method (``method_name="meta_fusion"``), trained in stages.

Meta Fusion's head is a student cohort fitted on features of trained encoders, not a head trained end to end.
The recipe therefore declares itself staged (:attr:`~medfusion.fusion.method.Method.training_head`): the
network first trains with the ``"concat"`` head and this class's loss (the supervised cross-entropy of
:class:`~medfusion.fusion.baselines.SupervisedMethod`: stage (a)); the stages after training (feature
extraction, the cohort fit, the head swap: :mod:`medfusion.apps.meta_fusion_stages`, run by the bundles through
:mod:`medfusion.apps.staged`) fit the ``"meta_fusion"`` head. The bundle's ``head_kwargs`` are the Meta Fusion
head's (``grids``, ``rule`` and :class:`~medfusion.fusion.meta_fusion.model.MetaFusion` arguments such as
``epochs``, ``hidden``, ``rho_grid``); ``method_kwargs`` configure the encoder training.
"""

from __future__ import annotations

from typing import ClassVar

from medfusion.fusion.baselines import SupervisedMethod
from medfusion.fusion.recipes import register_method

__all__ = ["MetaFusionMethod"]


@register_method(
    "meta_fusion",
    head="meta_fusion",
    head_kwargs={"epochs": 30},
    description="Meta Fusion: encoders trained with the concat head, then a student cohort fitted in stages",
)
class MetaFusionMethod(SupervisedMethod):
    """Stage (a) of Meta Fusion: the encoders train with the ``concat`` head and cross-entropy.

    Args: those of :class:`~medfusion.fusion.baselines.SupervisedMethod` (``loss``, ``modality_loss_weight``,
    ``dropout``).
    """

    name = "meta_fusion"
    training_head: ClassVar[str | None] = "concat"
