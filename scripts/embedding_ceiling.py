"""How much does the lossy embedding cost? Score an SE600M round's gene decoder on the TRUE embeddings.

For the held-out cells of an embedding-input round (0826, 0901), decode their observed `X_state` (not a
prediction) through the round's gene decoder and score that with cell-eval exactly as `tahoe-ft eval` does.
This is the best any prediction in embedding space could reach through that decoder: if it scores low, the
embedding route is capped by the representation (the case study's lesson 1); if high, it is not.

    PYTHONPATH=src .venv/bin/python scripts/embedding_ceiling.py runs/0826/latest [--out /tmp/ceiling]

Needs `tahoe-ft predict` to have run in that directory (it reuses real.h5ad and predict.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from tahoe_ft.checkpoints.io import load_checkpoint
from tahoe_ft.data import CellCatalog, ScreenLabels
from tahoe_ft.evaluation import score_predictions
from tahoe_ft.prediction import PRED_MAX


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    run_dir = a.run_dir.resolve()
    info = json.loads((run_dir / "predict.json").read_text())
    loaded = load_checkpoint(info["checkpoint"])
    model, manifest = loaded.model, loaded.manifest
    if getattr(model, "gene_decoder", None) is None or not manifest.get("embed_key"):
        raise SystemExit(f"{run_dir} is not an embedding-input round with a gene decoder")
    catalog = CellCatalog.from_manifest(manifest)
    # real.h5ad labels cells (perturbation, cell type); a label's rows are its groups' rows in dataset order
    cells: dict[tuple[str, str], list[np.ndarray]] = {}
    for key, group_rows in catalog.groups(info["split"]).items():
        cells.setdefault((key.cell_type, key.pert), []).append(group_rows)
    real = ad.read_h5ad(run_dir / "real.h5ad")
    pred = real.copy()
    pert_col, ct_col = manifest["pert_col"], manifest["cell_type_col"]
    x = np.asarray(pred.X, dtype=np.float32).copy()
    for key, chunks in cells.items():
        ct, pert = key
        rows = np.concatenate(chunks)
        emb = torch.from_numpy(catalog.read_input(rows))  # the observed cells' own X_state, in row order
        with torch.no_grad():
            genes = model.decode(emb[None])[0].numpy()
        sel = np.flatnonzero((real.obs[pert_col] == pert).values & (real.obs[ct_col] == ct).values)
        assert sel.size == rows.size, (key, sel.size, rows.size)
        x[sel] = np.clip(genes, 0.0, PRED_MAX)
    pred.X = x
    out = a.out or run_dir / "eval_embedding_ceiling"
    train = catalog.training_cells(max_per_group=500, seed=0)
    score = score_predictions(
        pred,
        real,
        train,
        out,
        labels=ScreenLabels(pert_col, manifest["control_pert"], ct_col),
        de_cache_dir=run_dir.parent.parent / ".de_cache",
    )
    model_score = (
        json.loads((run_dir / "eval" / "score.json").read_text()) if (run_dir / "eval").is_dir() else {}
    )
    print(
        f"{run_dir.parent.name}: decoder on the TRUE embeddings: avg_score {score.avg_score:.4f}, "
        f"metrics {json.dumps({k: round(v, 4) for k, v in score.metrics.items()})}"
    )
    if model_score:
        print(
            f"{run_dir.parent.name}: its prediction:              avg_score {model_score['avg_score']:.4f}, "
            f"metrics {json.dumps({k: round(v, 4) for k, v in model_score['metrics'].items()})}"
        )


if __name__ == "__main__":
    main()
