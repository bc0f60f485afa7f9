"""`DemoSpec`: the size and seed of the demo data, declared once.

It is both the generator's argument (`tahoe_ft.datasets.demo.generate_demo`) and the config schema of
`data.demo` / `demo-check`'s `demo` (`tahoe_ft.config.DemoConfig` is this class). Kept apart from the generator
so that `tahoe_ft.config` imports it without numpy, pandas or scipy, and the generator without OmegaConf.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tahoe_ft.errors import UserError

# X_state is the PCA of at most this many control cells (`tahoe_ft.datasets.demo`); a spec's state_dim must
# stay below the control cells it has
PCA_MAX_CELLS = 4000


@dataclass
class DemoSpec:
    """Size and seed of the demo data. Defaults are the default demo; tests use tiny sizes."""

    n_genes: int = 2000
    n_cell_types: int = 3
    n_batches: int = 2
    n_perts: int = 40  # genetic perturbations in the screen (targets are genes of the panel)
    cells_per_pert: int = 60  # per cell type; varies +-50% per (cell type, perturbation)
    n_ctrl: int = 300  # control cells per cell type
    n_programs: int = 12  # latent gene programs
    state_dim: int = 64  # X_state width (SE600M stand-in), lower than n_genes
    pert_feature_dim: int = 32  # ESM2 stand-in width
    n_drugs: int = 30  # drug x dose conditions in the pre-training set
    pretrain_cells_per_drug: int = 60  # per cell line; varies +-50%
    pretrain_ctrl: int = 400  # DMSO_TF cells per cell line
    n_pretrain_cell_types: int = 3  # cell lines of the drug set (CL0..)
    n_val_perts: int = 6
    n_test_perts: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoSpec:
        """Build a spec from a (possibly partial) dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown demo spec keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def asdict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _validate(s: DemoSpec) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"invalid demo spec: {what} (spec {dataclasses.asdict(s)})")

    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be an int, got {v!r}")
    need(s.n_genes >= 20, "n_genes must be >= 20")
    need(min(s.n_cell_types, s.n_batches, s.n_programs, s.pert_feature_dim) >= 1, "sizes must be >= 1")
    need(min(s.cells_per_pert, s.n_ctrl, s.pretrain_cells_per_drug, s.pretrain_ctrl) >= 2, "cell counts >= 2")
    need(1 <= s.n_perts <= s.n_genes // 2, "n_perts must be in [1, n_genes // 2] (targets are panel genes)")
    need(min(s.n_val_perts, s.n_test_perts) >= 0, "n_val_perts and n_test_perts must be >= 0")
    need(s.n_val_perts + s.n_test_perts < s.n_perts, "n_val_perts + n_test_perts must be < n_perts")
    need(1 <= s.state_dim < s.n_genes, "state_dim must be in [1, n_genes)")
    n_controls = min(PCA_MAX_CELLS, s.n_ctrl * s.n_cell_types + s.pretrain_ctrl * s.n_pretrain_cell_types)
    need(
        s.state_dim < n_controls, "state_dim must be below the number of control cells (X_state is their PCA)"
    )
    need(s.n_drugs >= 2, "n_drugs must be >= 2 (one is held out for validation)")
    need(s.n_pretrain_cell_types >= 1, "n_pretrain_cell_types must be >= 1")
    need(s.seed >= 0, "seed must be >= 0")
