"""`tahoe-ft predict` (`tahoe_ft.predict`): predict the held-out perturbations with a checkpoint (SPEC §7).

For each held-out (dataset, cell type, perturbation) group: draw basal control cells of that cell type in that
dataset, predict a set the size of the observed one (sets of at most `cell_set_len` cells, unpadded, as
upstream), and write `pred.h5ad` / `real.h5ad` in cell-eval's format: the evaluator's genes as `var_names`
(same order in both), the perturbation and cell-type columns, and the same real control cells in both files.
Embedding-input rounds predict through their gene decoder, so every round is scored in gene space.

Everything comes from the checkpoint: the architecture from its hparams and the data settings (genes,
perturbation features, held-out groups, columns, transform) from its manifest; only the cells are read, through
`CellCatalog.from_manifest`, from the data file(s) recorded there (or `data_path=`). An upstream `state tx train`
run folder has no manifest: genes and perturbations come from its `var_dims.pkl` / `pert_onehot_map.pt`, columns
from its config.yaml, the held-out groups from its split TOML (or `split_toml=`), the cells from `data_path=`.

Modules, in the order a prediction runs through them:

- `command`: `predict(config: PredictConfig)`: arguments checked, checkpoint resolved and loaded, plan, stream,
  `predict.json` (`runs.PredictRecord`)
- `resolve`: `resolve_checkpoint`, `newest_training_run` (which file, which run directory)
- `plan`: `build_plan` -> `PredictionPlan`: manifest, catalog, held-out groups, every draw, obs/var, the
  shuffle's derangement, the sets in blocks (row numbers only; no cell read)
- `stream`: `write_predictions(plan, model, device)`: blocks read, predicted and written on I/O threads
- `forward`: `predict_batch` / `predict_sets` (the model's forward pass over sets), bf16 Linear layers
"""

from tahoe_ft.prediction.command import predict
from tahoe_ft.prediction.forward import PRECISIONS, decodes, predict_batch, predict_sets
from tahoe_ft.prediction.plan import BLOCK_CELLS, PredictionPlan, build_plan, draw_basal
from tahoe_ft.prediction.resolve import newest_training_run, resolve_checkpoint
from tahoe_ft.prediction.stream import PRED_MAX, write_predictions

__all__ = [
    "BLOCK_CELLS",
    "PRECISIONS",
    "PRED_MAX",
    "PredictionPlan",
    "build_plan",
    "decodes",
    "draw_basal",
    "newest_training_run",
    "predict",
    "predict_batch",
    "predict_sets",
    "resolve_checkpoint",
    "write_predictions",
]
