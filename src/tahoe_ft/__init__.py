"""tahoe-ft: fine-tune the State Transition model (ST-Tahoe) on a perturbation screen and score it with cell-eval.

Python API (what the CLI calls): every command `tahoe-ft NAME` is the function `tahoe_ft.NAME` (`export-state`:
`tahoe_ft.export_state`; `eval`: `tahoe_ft.evaluate`, also `tahoe_ft.eval`), taking the command's config dataclass
from `tahoe_ft.config` (`tahoe_ft.commands` is the table; `tahoe_ft.api` the functions):

    import tahoe_ft
    from tahoe_ft.config import EvalConfig, PredictConfig
    run_dir = tahoe_ft.train(tahoe_ft.compose("train", ["+experiment=0906"]))
    tahoe_ft.predict(PredictConfig(run_dir=str(run_dir)))   # or tahoe_ft.compose("predict", [f"run_dir={run_dir}"])
    score = tahoe_ft.evaluate(EvalConfig(run_dir=str(run_dir)))   # a tahoe_ft.evaluation.Score
    ckpt = tahoe_ft.load_checkpoint(run_dir / "checkpoints" / "best-val.pt")   # a LoadedCheckpoint
    out = ckpt.model(batch, padded=True)   # eval mode; batch: upstream keys pert_emb, ctrl_cell_emb (, batch)
    ckpt.manifest, ckpt.step, ckpt.val_loss   # what the file records beside the weights

The API functions are imported on first use, so `import tahoe_ft` (and the CLI's start-up) stays light.
"""

from __future__ import annotations

import os
from typing import Any

# torch's CPU allocator backs tensors of >= 2 MiB with transparent huge pages when this is set (read when
# torch allocates; set here so that the CLI has it before torch is imported). At 18,080 genes every batch,
# activation and prediction block is tens of MiB: a bf16 predict on the 20,000-cell benchmark took 1.16-1.25 M
# minor page faults without it and 0.30 M with it (BENCHMARKS.md). A value the user set is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from tahoe_ft.commands import ALIASES, API
from tahoe_ft.errors import UserError

__version__ = "0.1.0"

__all__ = ["UserError", "__version__", *API]


def __getattr__(name: str) -> Any:
    # a command's function (`tahoe_ft.train`), also under the command's own name (`tahoe_ft.eval`), from api.py
    if name in API or name in ALIASES:
        from tahoe_ft import api

        return getattr(api, ALIASES.get(name, name))
    raise AttributeError(f"module 'tahoe_ft' has no attribute {name!r}")
