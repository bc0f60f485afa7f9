"""What the validation energy distance can see: its parts on the held-out knock-outs of a split.

For every (cell type, knock-out) group of a split's validation (or test) perturbations, one half of the group's
cells is the observed set and the other half gives an oracle's mean effect; a predicted set is
`cell_set_len` basal controls of the cell type, drawn with replacement as the training sampler draws them.
The script prints the unbiased energy distance (`tahoe_ft.model.loss.unbiased_energy_distance`, the part of
`val_loss` that a prediction can remove; `val/unbiased_loss` in training) and the unbiased set-mean error
(`unbiased_mean_error`, `val/unbiased_mean_loss`) of five predictors, mean and standard error over groups and
`--draws` draws:

- no change, raw draws: the basal draws as they are (the start of a round without the feature prior);
- no change, re-centred draws: the draws moved onto the control cells' mean, each keeping its deviation;
- the oracle's mean effect on raw / on re-centred draws: the other half's mean minus the control mean, added;
- the other half's cells: a perfect sampler of the group (0 on average for both numbers).

The gap between the first two rows is the sampling noise of the draw's mean; the gap between "no change" and
"oracle" is all that knowing each knock-out's mean effect is worth. On the demo the first is about 40 times the
second (docs/results.md, "What the validation loss can see").

    .venv/bin/python scripts/energy_floor.py runs/data-0/folds/fold-0.toml [--split val] [--draws 20]

The TOML is a split file as `tahoe-ft reproduce folds=K` writes it (runs/.../folds/fold-K.toml) or any
cell-load TOML with one data set; the data set's `target_gene`, `cell_type` and control `non-targeting` are the
demo's (`--pert-col`, `--cell-type-col`, `--control` for others). The expression is `X` as stored (log1p).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from tahoe_ft.model.loss import unbiased_energy_distance, unbiased_mean_error

PREDICTORS = [
    "no change, raw draws",
    "no change, re-centred draws",
    "oracle mean effect, raw draws",
    "oracle mean effect, re-centred draws",
    "the other half's cells",
]


def held_out(toml_path: Path, split: str) -> tuple[Path, list[str]]:
    """(the data set's h5ad, the held-out perturbations of `split`) from a cell-load split TOML."""
    spec = tomllib.loads(toml_path.read_text())
    (paths,) = spec["datasets"].values()
    path = Path(paths[0] if isinstance(paths, list) else paths)
    perts = sorted({p for entry in spec.get("fewshot", {}).values() for p in entry.get(split, [])})
    return path, perts


def measure(
    adata: ad.AnnData, perts: list[str], args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    pert_of = adata.obs[args.pert_col].astype(str).to_numpy()
    ct_of = adata.obs[args.cell_type_col].astype(str).to_numpy()
    rng = np.random.default_rng(args.seed)
    out: dict[str, dict[str, list[float]]] = {"energy": {}, "mean": {}}

    def add(name: str, x: np.ndarray, y: np.ndarray) -> None:
        tx, ty = torch.as_tensor(x, dtype=torch.float64)[None], torch.as_tensor(y, dtype=torch.float64)[None]
        out["energy"].setdefault(name, []).append(float(unbiased_energy_distance(tx, ty)))
        out["mean"].setdefault(name, []).append(float(unbiased_mean_error(tx, ty)))

    for ct in sorted(set(ct_of)):
        ctrl = X[(ct_of == ct) & (pert_of == args.control)]
        mu = ctrl.mean(0)
        for p in perts:
            cells = X[(ct_of == ct) & (pert_of == p)]
            if len(cells) < 4:
                continue
            for _ in range(args.draws):
                order = rng.permutation(len(cells))
                half = len(cells) // 2
                y, other = cells[order[:half]], cells[order[half:]]
                effect = other.mean(0) - mu
                basal = ctrl[rng.integers(0, len(ctrl), args.cell_set_len)]
                centred = basal - basal.mean(0) + mu
                for name, x in zip(
                    PREDICTORS, (basal, centred, basal + effect, centred + effect, other), strict=True
                ):
                    add(name, x, y)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("toml", type=Path)
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--cell-set-len", type=int, default=32)
    ap.add_argument("--pert-col", default="target_gene")
    ap.add_argument("--cell-type-col", default="cell_type")
    ap.add_argument("--control", default="non-targeting")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path, perts = held_out(args.toml, args.split)
    out = measure(ad.read_h5ad(path), perts, args)
    print(
        f"{path.name}: {len(perts)} {args.split} perturbations, sets of {args.cell_set_len}, {args.draws} draws"
    )
    print(f"{'predictor':40s} {'unbiased energy':>22s} {'unbiased mean error':>24s}")
    for name in PREDICTORS:
        e, m = np.array(out["energy"][name]), np.array(out["mean"][name])
        print(
            f"{name:40s} {e.mean():11.4f} ± {e.std() / np.sqrt(e.size):.4f}"
            f" {m.mean():14.3e} ± {m.std() / np.sqrt(m.size):.1e}"
        )


if __name__ == "__main__":
    main()
