"""The model: the State Transition network and its loss, nothing else.

Owns `st` (`StateTransitionModel`: perturbation and basal encoders, the bidirectional Llama backbone, the
output head, the optional gene decoder, with upstream's parameter names) and `loss` (`DistributionLoss`:
energy distance per set, sinkhorn, mse). It reads no files and knows no config keys: `training/` builds it
from hparams, `checkpoints/` loads weights into it.
"""

from tahoe_ft.model.loss import DistributionLoss
from tahoe_ft.model.st import StateTransitionModel

__all__ = ["DistributionLoss", "StateTransitionModel"]
