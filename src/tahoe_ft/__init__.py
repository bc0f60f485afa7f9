"""tahoe-ft: fine-tune the State Transition model (ST-Tahoe) on a perturbation screen and score it with cell-eval.

Python API (what the CLI calls):

    import tahoe_ft
    model = tahoe_ft.load_checkpoint("runs/0906/latest/checkpoints/best-val.pt")   # eval mode
    out = model(batch, padded=True)   # batch: upstream keys pert_emb, ctrl_cell_emb (, batch)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["UserError", "load_checkpoint", "__version__"]

from tahoe_ft.errors import UserError


def load_checkpoint(path):
    """Load a tahoe-ft checkpoint (`best-val.pt`, `step-N.pt`) as a `StateTransitionModel` in eval mode."""
    from tahoe_ft.checkpoint import load_checkpoint as _load

    return _load(path)
