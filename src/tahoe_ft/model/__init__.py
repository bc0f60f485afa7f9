"""The model: the State Transition network, its options and its loss, nothing else.

Owns `st` (`StateTransitionModel`: perturbation and basal encoders, the bidirectional Llama backbone, the
output head, the optional gene decoder, with upstream's parameter names), `hparams` (`ModelConfig`: the
`model.*` options, each declared once with its hparam; the hparams dict the model is built from and its checks)
and `loss` (`DistributionLoss`: energy distance per set, sinkhorn, mse). It reads no files: `training/` builds
the model from hparams, `checkpoints/` loads weights into it. The two classes below are imported on first use,
so `tahoe_ft.config` imports `hparams` without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tahoe_ft.model.loss import DistributionLoss
    from tahoe_ft.model.st import StateTransitionModel

__all__ = ["DistributionLoss", "StateTransitionModel"]


def __getattr__(name: str) -> Any:
    if name == "DistributionLoss":
        from tahoe_ft.model.loss import DistributionLoss

        return DistributionLoss
    if name == "StateTransitionModel":
        from tahoe_ft.model.st import StateTransitionModel

        return StateTransitionModel
    raise AttributeError(f"module 'tahoe_ft.model' has no attribute {name!r}")
