"""What a demo split's perturbation features can carry to its test knock-outs: oracles beside feature_ridge.

The demo's features (the ESM2 stand-in, `tahoe_ft.datasets.demo._pert_features`) encode a knock-out's module
(the regulon it shares with ~3 other targets) and its downstream strength; the rest of its effect (private
regulon genes, cell-type-specific parts) is in no feature. So what any predictor from the features can know of
an unseen knock-out is its module's effect, scaled by its strength, and only where the training knock-outs
include one of the same module. This script scores, with the same cell-eval call and normalisation as the panel
(`score_predictions`, re-centred basal draws as `build_panel` makes them), on the split's **test** knock-outs:

- `feature_ridge`, penalty by leave-one-group-out (the panel's), fitted on the training groups;
- the same, penalty by leave-one-perturbation-out (all cell types of a knock-out left out together);
- the same ridge fitted on the training and validation groups (what the split's labelled knock-outs allow);
- `module oracle, training`: the generator's true module and strength: mean of the training knock-outs of the
  same module (delta / strength) x this knock-out's strength, per cell type; no effect where the module has no
  training knock-out;
- `module oracle, every other`: the same over every other knock-out of the screen, test ones included (a bound:
  it reads held-out cells);
- `feature ridge, in-sample`: the ridge fitted on every group, the test groups included (a bound on a linear
  map of the features);
- `feature kernel`: a candidate predictor from the features alone (`kernel_fit`: the training knock-outs'
  effects averaged with weights softmax(cosine / tau), scaled by the feature norm; tau by
  leave-one-perturbation-out).

`--split val` scores the split's validation knock-outs instead (choose a predictor there, never on test); the
train + val ridge is then left out.

    .venv/bin/python scripts/feature_bound.py runs/data-0/folds/fold-0.toml [--split val] [--out DIR]

The TOML is a fold file as `tahoe-ft reproduce folds=K` writes it, or the demo's own split.toml; the demo's
`truth.npz` and `pert_features.pt` are read from beside the screen's h5ad. Prints one JSON line per predictor.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from energy_floor import held_out  # scripts/energy_floor.py

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.evaluation.baselines import PRED_MAX, recentre
from tahoe_ft.evaluation.feature_ridge import fit_feature_ridge, fit_on_groups
from tahoe_ft.evaluation.score import score_predictions

PERT, CT, CONTROL = "target_gene", "cell_type", "non-targeting"


def group_deltas(adata: ad.AnnData) -> dict[tuple[str, str], np.ndarray]:
    """{(cell type, knock-out): group mean - cell type's control mean} over every group of `adata`."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    x = np.asarray(x, dtype=np.float64)
    keys = pd.MultiIndex.from_arrays([adata.obs[CT].astype(str), adata.obs[PERT].astype(str)])
    means = {
        k: x[np.asarray(v)].mean(axis=0) for k, v in pd.Series(np.arange(len(x))).groupby(keys).groups.items()
    }
    return {(c, p): m - means[(c, CONTROL)] for (c, p), m in means.items() if p != CONTROL}


def ridge_pert_loo(deltas: dict[tuple[str, str], np.ndarray], features: dict[str, np.ndarray]):
    """The feature ridge with its penalty by leave-one-perturbation-out (refits over the panel's grid)."""
    from tahoe_ft.evaluation.feature_ridge import PENALTY_GRID

    keys = sorted(deltas)
    perts = sorted({p for _, p in keys})
    best = None
    for lam in PENALTY_GRID:
        err = 0.0
        for p in perts:
            fit_keys = [k for k in keys if k[1] != p]
            fit = fit_feature_ridge(
                np.stack([deltas[k] for k in fit_keys]),
                np.stack([features[q] for _, q in fit_keys]),
                [c for c, _ in fit_keys],
                grid=np.array([lam * len(keys) / len(fit_keys)]),
            )
            err += sum(
                float(np.sum((fit.predict(features[p], c) - deltas[(c, q)]) ** 2)) for c, q in keys if q == p
            )
        if best is None or err < best[0]:
            best = (err, lam)
    return fit_feature_ridge(
        np.stack([deltas[k] for k in keys]),
        np.stack([features[p] for _, p in keys]),
        [c for c, _ in keys],
        grid=np.array([best[1]]),
    )


def module_oracle(deltas, pool: set[str], truth, groups):
    """Per held-out group: strength x mean over `pool` knock-outs of the same module (not itself) of delta /
    strength, in the same cell type; zeros where the module has none."""
    module = dict(zip(truth["screen_perts"].tolist(), truth["screen_modules"].tolist(), strict=True))
    strength = dict(zip(truth["screen_perts"].tolist(), truth["screen_strength"].tolist(), strict=True))
    out, covered = {}, set()
    for c, p in groups:
        mates = [q for q in pool if q != p and module[q] == module[p] and (c, q) in deltas]
        if mates:
            covered.add(p)
            out[(c, p)] = strength[p] * np.mean([deltas[(c, q)] / strength[q] for q in mates], axis=0)
        else:
            out[(c, p)] = np.zeros_like(next(iter(deltas.values())))
    return out, covered


TAU_GRID = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def kernel_fit(deltas: dict[tuple[str, str], np.ndarray], features: dict[str, np.ndarray]):
    """A kernel regression on the features: a held-out knock-out's effect in a cell type is the training
    knock-outs' effects (each divided by its feature norm) averaged with weights softmax(cosine / tau), times its
    own feature norm (the demo's feature length follows the strength). `tau` by leave-one-perturbation-out over
    the training knock-outs. Returns (predict(cell type, knock-out), tau)."""
    perts = sorted({p for _, p in deltas})
    norm = {p: float(np.linalg.norm(features[p])) for p in perts}

    def predict_from(pool: list[str], tau: float, c: str, p: str) -> np.ndarray:
        f = features[p]
        cos = np.array([f @ features[q] / (np.linalg.norm(f) * norm[q] + 1e-12) for q in pool])
        w = np.exp((cos - cos.max()) / tau)
        w /= w.sum()
        return float(np.linalg.norm(f)) * sum(
            wi * deltas[(c, q)] / norm[q] for wi, q in zip(w, pool, strict=True)
        )

    errs = []
    for tau in TAU_GRID:
        err = 0.0
        for p in perts:
            pool = [q for q in perts if q != p]
            err += sum(
                float(np.sum((predict_from(pool, tau, c, p) - d) ** 2))
                for (c, q), d in deltas.items()
                if q == p
            )
        errs.append(err)
    tau = TAU_GRID[int(np.argmin(errs))]
    return (lambda c, p: predict_from(perts, tau, c, p)), tau


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("toml", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--num-threads", type=int, default=1)
    ap.add_argument("--split", choices=("test", "val"), default="test", help="the knock-outs scored")
    args = ap.parse_args()
    path, val = held_out(args.toml, "val")
    _, test = held_out(args.toml, "test")
    if args.split == "val":  # score the validation knock-outs; the test ones stay out of all but the bounds
        val, test = test, val
    screen = ad.read_h5ad(path)
    truth = np.load(path.parent / "truth.npz")
    features = {
        k: v.numpy().astype(np.float64) for k, v in torch.load(path.parent / "pert_features.pt").items()
    }
    perts = screen.obs[PERT].astype(str).to_numpy()
    train_perts = sorted(set(perts) - set(val) - set(test) - {CONTROL})
    is_ctrl = perts == CONTROL
    train = screen[is_ctrl | np.isin(perts, train_perts)].copy()
    real = screen[is_ctrl | np.isin(perts, test)].copy()
    train.obs = train.obs[[PERT, CT]].copy()
    real.obs = real.obs[[PERT, CT]].copy()
    d_all = group_deltas(screen)
    d_train = {k: v for k, v in d_all.items() if k[1] in train_perts}
    d_trval = {k: v for k, v in d_all.items() if k[1] in train_perts or k[1] in val}
    groups = sorted(k for k in d_all if k[1] in test)

    effects: dict[str, dict] = {}
    notes: dict[str, str] = {}
    r = fit_on_groups(d_train, features)
    effects["feature_ridge (panel: group LOO)"] = {(c, p): r.predict(features[p], c) for c, p in groups}
    notes["feature_ridge (panel: group LOO)"] = f"penalty {r.penalty:.3g}"
    r = ridge_pert_loo(d_train, features)
    effects["feature_ridge, perturbation LOO"] = {(c, p): r.predict(features[p], c) for c, p in groups}
    notes["feature_ridge, perturbation LOO"] = f"penalty {r.penalty:.3g}"
    if args.split == "test":
        r = fit_on_groups(d_trval, features)
        effects["feature_ridge on train + val"] = {(c, p): r.predict(features[p], c) for c, p in groups}
    kern, tau = kernel_fit(d_train, features)
    effects["feature kernel (cosine softmax)"] = {(c, p): kern(c, p) for c, p in groups}
    notes["feature kernel (cosine softmax)"] = f"tau {tau:g}"
    eff, cov = module_oracle(d_all, set(train_perts), truth, groups)
    effects["module oracle, training"] = eff
    notes["module oracle, training"] = (
        f"{len(cov)} of {len(test)} test knock-outs have a training module-mate"
    )
    eff, cov = module_oracle(d_all, {q for _, q in d_all}, truth, groups)
    effects["module oracle, every other (bound)"] = eff
    notes["module oracle, every other (bound)"] = f"{len(cov)} of {len(test)} covered"
    r = fit_on_groups(d_all, features)
    effects["feature ridge in-sample (bound)"] = {(c, p): r.predict(features[p], c) for c, p in groups}

    # basal cells as build_panel draws them (seed 0, cell types sorted), re-centred on the real control mean
    x_real = real.X.toarray() if hasattr(real.X, "toarray") else np.asarray(real.X)
    x_train = train.X.toarray() if hasattr(train.X, "toarray") else np.asarray(train.X)
    r_cts = real.obs[CT].astype(str).to_numpy()
    r_perts = real.obs[PERT].astype(str).to_numpy()
    r_ctrl = r_perts == CONTROL
    t_cts = train.obs[CT].astype(str).to_numpy()
    t_ctrl = train.obs[PERT].astype(str).to_numpy() == CONTROL
    rng = np.random.default_rng(0)
    basal = np.zeros(x_real.shape)
    for c in sorted({c for c, _ in groups}):
        rows = np.flatnonzero((r_cts == c) & ~r_ctrl)
        pool = x_train[t_ctrl & (t_cts == c)]
        basal[rows] = pool[rng.integers(0, len(pool), size=rows.size)]
    for c, p in groups:
        rows = np.flatnonzero((r_cts == c) & (r_perts == p))
        basal[rows] = recentre(basal[rows], x_real[r_ctrl & (r_cts == c)].mean(axis=0))

    out = args.out or Path(tempfile.mkdtemp(prefix="feature_bound-"))
    for name, eff in effects.items():
        x = np.zeros(x_real.shape)
        x[r_ctrl] = x_real[r_ctrl]
        for c, p in groups:
            rows = np.flatnonzero((r_cts == c) & (r_perts == p))
            x[rows] = basal[rows] + eff[(c, p)]
        np.clip(x, 0.0, PRED_MAX, out=x)
        pred = ad.AnnData(X=x.astype(np.float32), obs=real.obs.copy(), var=pd.DataFrame(index=real.var_names))
        slug = "".join(ch if ch.isalnum() else "_" for ch in name)
        s = score_predictions(
            pred,
            real,
            train,
            out / slug,
            labels=ScreenLabels(PERT, CONTROL, CT),
            num_threads=args.num_threads,
            de_cache_dir=out / ".de",
        )
        mae = s.metrics.get("mae") if isinstance(s.metrics, dict) else None
        print(json.dumps({"split": str(args.toml), "predictor": name, "avg_score": round(s.avg_score, 4),
                          "mae": mae, "note": notes.get(name, "")}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
