"""The label columns of a screen, and their defaults, declared once: `ScreenLabels`.

Every stage reads a screen's cells through the same four labels: the obs column naming each cell's
perturbation (`pert_col`), the value of that column on control cells (`control_pert`), the obs column of
the cell type or context (`cell_type_col`; None: the file has none, or it is not scored by), and the batch
column (`batch_col`; None: no batch). The defaults are cell-eval's and the Virtual Cell Challenge's:
`target_gene` / `non-targeting`; a training screen's cell-type column defaults to `cell_type`
(`DEFAULT_CELL_TYPE_COL`, `config.DataConfig`), files from elsewhere have none unless one is named.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PERT_COL = "target_gene"
DEFAULT_CONTROL_PERT = "non-targeting"
DEFAULT_CELL_TYPE_COL = "cell_type"  # a training screen's (`config.DataConfig.cell_type_col`)


@dataclass(frozen=True)
class ScreenLabels:
    """The obs columns and control label of a screen's cells (`cell_type_col`/`batch_col` None: no such
    column, or not used)."""

    pert_col: str = DEFAULT_PERT_COL
    control_pert: str = DEFAULT_CONTROL_PERT
    cell_type_col: str | None = None
    batch_col: str | None = None

    @classmethod
    def of(cls, source: object) -> ScreenLabels:
        """The labels of anything that names them alike: a data config (`config.DataConfig`), a checkpoint's
        `Manifest`, or an object with the four attributes."""
        return cls(
            pert_col=source.pert_col,  # type: ignore[attr-defined]
            control_pert=source.control_pert,  # type: ignore[attr-defined]
            cell_type_col=getattr(source, "cell_type_col", None),
            batch_col=getattr(source, "batch_col", None),
        )


# the labels of files that nothing else describes (cell-eval's and the VCC's): no cell-type column
VCC_LABELS = ScreenLabels()
