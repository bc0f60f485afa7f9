"""Oracles on the demo data, before any training: is the case study's mechanism in it?

The study's finding is that a model working in the SE600M embedding and decoding to genes is capped by what
the embedding keeps, while one working in the evaluator's gene space is not. Three oracles measure that on the
generated demo (`tahoe_ft.datasets.demo`), each with a gene-space side and an embedding side, scored as the rounds are
(`tahoe_ft.evaluation.score_predictions`: cell-eval, normalised against its cell-mean baseline, per cell type):

- (a) representation: the best linear decode of the held-out cells' TRUE ``X_state`` (a ridge X_state -> genes
  fitted on the training cells) next to the data ceiling in gene space (`evaluation.ceiling`, split halves
  of the real cells). No prediction from the embedding can beat the decode of the true embedding.
- (b) prediction from the perturbation features: a ridge from `pert_features.pt` to the gene-space pseudobulk
  delta, next to a ridge from the features to the ``X_state`` delta decoded to genes by (a)'s decoder; both
  fitted on the training perturbations only (penalty by leave-one-out on them), both added to the same basal
  control cells, scored on the test perturbations.
- (c) what survives the embedding: the share of the held-out perturbations' squared effect on their target
  gene, and on their DE genes (the regulons in ``truth.npz``), kept when the effect is encoded by the demo's
  ``X_state`` map and decoded back. Sampling noise is removed with split halves: kept = <(P d_A)_S, d_B,S> /
  <d_A,S, d_B,S> summed over held-out groups.

The mechanism is present when (a) and (b) both separate, the embedding side below, by more than their spread
over the generator seeds: both sides are measured on the same demo, so per seed gap = gene side - embedding
side, and the oracle separates when mean(gap) > sd(gap) with the gap positive on every seed (the unpaired
spread, sd(gene side) + sd(embedding side), is reported beside it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.datasets.demo import CELL_TYPE_COL, CONTROL_PERT, PERT_COL, DemoSpec, load_state_map
from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)

# a ridge's penalty grid, relative to the largest squared singular value of the centred features
RIDGE_GRID = tuple(10.0**e for e in np.arange(-4.0, 2.01, 0.5))
# the decoder's penalty relative to the mean diagonal of X_state's Gram matrix: a numerical guard only
DECODER_RIDGE = 1e-6
SIDES = {
    "a": ("ceiling", "decode_true_state"),
    "b": ("gene_ridge", "state_ridge_decoded"),
}


@dataclass(frozen=True)
class _Screen:
    """The demo's screen split into what the oracles may learn from (train) and what they are scored on."""

    real: ad.AnnData  # test perturbations + controls
    train: ad.AnnData  # training perturbations + controls
    state_real: np.ndarray  # [n_real, D] true X_state of `real`'s rows
    state_train: np.ndarray
    train_perts: list[str]
    test_perts: list[str]
    cell_types: list[str]


def _split_lists(split_toml: Path) -> tuple[list[str], list[str]]:
    """(val, test) of the demo's split TOML, read by the one split reader (`data.split_file`)."""
    from tahoe_ft.data.split_file import parse_split_toml

    first = next(iter(parse_split_toml(split_toml).fewshot.values()))
    return list(first["val"]), list(first["test"])


def _load_screen(files: dict[str, Path]) -> _Screen:
    a = ad.read_h5ad(files["screen"])
    val, test = _split_lists(files["split"])
    if not test:
        raise UserError("demo-check needs test perturbations: set demo.n_test_perts >= 2")
    pert = a.obs[PERT_COL].astype(str).to_numpy()
    train_perts = sorted(set(pert) - set(val) - set(test) - {CONTROL_PERT})
    if len(train_perts) < 3:
        raise UserError("demo-check needs >= 3 training perturbations: raise demo.n_perts")
    ctrl = pert == CONTROL_PERT

    def subset(keep: np.ndarray) -> tuple[ad.AnnData, np.ndarray]:
        sub = a[keep].copy()
        sub.X = sp.csr_matrix(sub.X, dtype=np.float32)
        for col in (PERT_COL, CELL_TYPE_COL):
            sub.obs[col] = sub.obs[col].astype(str).astype("category")
        state = np.asarray(sub.obsm["X_state"], dtype=np.float64)
        del sub.obsm["X_state"]
        sub.layers.clear()
        return sub, state

    real, s_real = subset(ctrl | np.isin(pert, test))
    train, s_train = subset(ctrl | np.isin(pert, train_perts))
    cts = sorted(set(a.obs[CELL_TYPE_COL].astype(str)))
    return _Screen(real, train, s_real, s_train, train_perts, sorted(test), cts)


# --- the linear maps ---------------------------------------------------------------------------------


def fit_decoder(state: np.ndarray, x) -> tuple[np.ndarray, np.ndarray]:
    """The best linear decode X_state -> genes on these cells: ``x ~ b + state @ B`` (ridge, tiny penalty)."""
    mu_s = state.mean(axis=0)
    sc = state - mu_s
    mu_x = np.asarray(x.mean(axis=0)).ravel()
    gram = sc.T @ sc
    lam = DECODER_RIDGE * max(float(np.trace(gram)) / gram.shape[0], 1e-12)
    xs = np.asarray((x.T @ sc).T) if sp.issparse(x) else sc.T @ np.asarray(x)  # [D, G]; x's mean cancels
    coef = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xs)
    return mu_x - mu_s @ coef, coef


def ridge_loo(f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Ridge ``y ~ b + f @ W`` with its penalty chosen on RIDGE_GRID by exact leave-one-out error.

    Returns ``(b, W, alpha)``; every column of ``y`` shares the penalty.
    """
    mu_f, mu_y = f.mean(axis=0), y.mean(axis=0)
    fc, yc = f - mu_f, y - mu_y
    u, sv, vt = np.linalg.svd(fc, full_matrices=False)
    uty = u.T @ yc
    best = (math.inf, 0.0)
    for rel in RIDGE_GRID:
        alpha = rel * float(sv[0] ** 2) if sv.size else rel
        shrink = sv**2 / (sv**2 + alpha)
        fitted = u @ (shrink[:, None] * uty)
        # the centring is part of the fit: leave-one-out leverage includes the 1/n of the intercept
        h = (u**2) @ shrink + 1.0 / f.shape[0]
        err = float((((yc - fitted) / (1.0 - h)[:, None]) ** 2).sum())
        if err < best[0]:
            best = (err, alpha)
    alpha = best[1]
    coef = vt.T @ ((sv / (sv**2 + alpha))[:, None] * uty)
    return mu_y - mu_f @ coef, coef, alpha


def _group_means(values, obs: pd.DataFrame, keys: list[tuple[str, str]]) -> np.ndarray:
    """[len(keys), width] mean of `values`' rows per (cell type, perturbation) key."""
    ct = obs[CELL_TYPE_COL].astype(str).to_numpy()
    pert = obs[PERT_COL].astype(str).to_numpy()
    out = []
    for c, p in keys:
        rows = np.flatnonzero((ct == c) & (pert == p))
        out.append(np.asarray(values[rows].mean(axis=0)).ravel())
    return np.stack(out)


def _deltas(values, obs: pd.DataFrame, perts: list[str], cts: list[str]) -> np.ndarray:
    """[P, C, width] pseudobulk deltas (perturbation minus control of its cell type)."""
    means = _group_means(values, obs, [(c, p) for p in perts for c in cts]).reshape(len(perts), len(cts), -1)
    ctrl = _group_means(values, obs, [(c, CONTROL_PERT) for c in cts])
    return means - ctrl[None]


# --- the oracles -------------------------------------------------------------------------------------


def _prediction(real: ad.AnnData, rows_x: dict[tuple[str, str], np.ndarray]) -> ad.AnnData:
    """`real` with each held-out group's rows replaced (controls copied), clipped as predictions are."""
    from tahoe_ft.evaluation.baselines import PRED_MAX

    x = real.X.toarray()
    ct = real.obs[CELL_TYPE_COL].astype(str).to_numpy()
    pert = real.obs[PERT_COL].astype(str).to_numpy()
    for (c, p), vals in rows_x.items():
        x[(ct == c) & (pert == p)] = vals
    np.clip(x, 0.0, PRED_MAX, out=x)
    return ad.AnnData(X=x.astype(np.float32), obs=real.obs.copy(), var=real.var.copy())


def _groups(real: ad.AnnData) -> dict[tuple[str, str], np.ndarray]:
    ct = real.obs[CELL_TYPE_COL].astype(str).to_numpy()
    pert = real.obs[PERT_COL].astype(str).to_numpy()
    keys = sorted({(c, p) for c, p in zip(ct, pert, strict=True) if p != CONTROL_PERT})
    return {k: np.flatnonzero((ct == k[0]) & (pert == k[1])) for k in keys}


def _basal(
    scr: _Screen, groups: dict[tuple[str, str], np.ndarray], seed: int
) -> dict[tuple[str, str], np.ndarray]:
    """Per held-out group, random draws of its cell type's control cells (one per held-out cell)."""
    rng = np.random.default_rng(seed)
    ct = scr.train.obs[CELL_TYPE_COL].astype(str).to_numpy()
    ctrl = scr.train.obs[PERT_COL].astype(str).to_numpy() == CONTROL_PERT
    out = {}
    for (c, p), rows in groups.items():
        pool = np.flatnonzero(ctrl & (ct == c))
        out[(c, p)] = scr.train.X[rng.choice(pool, rows.size)].toarray()
    return out


def _kept_share(
    scr: _Screen,
    components: np.ndarray,
    coef: np.ndarray,
    de_mask: dict[str, np.ndarray],
    genes: dict[str, int],
    seed: int,
) -> dict[str, float]:
    """(c): the share of the held-out squared effect on the targets / DE genes that encode + decode keeps.

    A delta is encoded by the linear part of the demo's X_state map (`components`) and decoded by `coef`."""
    rng = np.random.default_rng(seed)
    x = scr.real.X
    ct = scr.real.obs[CELL_TYPE_COL].astype(str).to_numpy()
    pert = scr.real.obs[PERT_COL].astype(str).to_numpy()
    sums = {"target": np.zeros(2), "de_genes": np.zeros(2), "all_genes": np.zeros(2)}
    for c in scr.cell_types:
        ctrl = rng.permutation(np.flatnonzero((ct == c) & (pert == CONTROL_PERT)))
        ca, cb = (np.asarray(x[np.sort(h)].mean(axis=0)).ravel() for h in np.array_split(ctrl, 2))
        for p in scr.test_perts:
            rows = rng.permutation(np.flatnonzero((ct == c) & (pert == p)))
            if rows.size < 2:
                continue
            ha, hb = np.array_split(rows, 2)
            da = np.asarray(x[np.sort(ha)].mean(axis=0)).ravel() - ca
            db = np.asarray(x[np.sort(hb)].mean(axis=0)).ravel() - cb
            kept = (da @ components) @ coef
            sel = {
                "target": [genes[p]] if p in genes else [],
                "de_genes": de_mask[p],
                "all_genes": slice(None),
            }
            for name, s in sel.items():
                sums[name] += [float(kept[s] @ db[s]), float(da[s] @ db[s])]
    return {k: (v[0] / v[1] if v[1] > 0 else float("nan")) for k, v in sums.items()}


def check_seed(
    files: dict[str, Path], work: Path, *, seed: int, num_threads: int, per_cell_type: bool
) -> dict:
    """The three oracles on one generated demo; cell-eval's files under `work`."""
    import torch

    from tahoe_ft.evaluation import score_predictions

    # the panel's own ceiling scoring (against the normaliser tables a score leaves behind), reused so that the
    # ceiling here is the one `eval` reports; private there, as nothing else needed it
    from tahoe_ft.evaluation.panel import normaliser_tables, score_ceiling

    scr = _load_screen(files)
    genes = {g: i for i, g in enumerate(scr.real.var_names)}
    celltype_col = CELL_TYPE_COL if per_cell_type else None
    labels = ScreenLabels(PERT_COL, CONTROL_PERT, celltype_col)
    common = dict(
        labels=labels,
        profile="vcc",
        num_threads=num_threads,
        de_cache_dir=work.parent / ".de_cache",
    )

    def score(pred: ad.AnnData, name: str) -> dict[str, Any]:
        s = score_predictions(pred, scr.real, scr.train, work / name, **common)
        return {"avg_score": s.avg_score, "metrics": s.to_dict()["metrics"], "_score": s}

    # (a) the best linear decode of the true X_state, and the data ceiling
    intercept, coef = fit_decoder(scr.state_train, scr.train.X)
    groups = _groups(scr.real)
    decoded = {k: intercept + scr.state_real[rows] @ coef for k, rows in groups.items()}
    out: dict[str, Any] = {"decode_true_state": score(_prediction(scr.real, decoded), "decode_true_state")}
    tables = normaliser_tables(work / "decode_true_state", out["decode_true_state"]["_score"])
    ceil = score_ceiling(scr.real, tables, work / "ceiling", labels, num_threads)
    out["ceiling"] = {"avg_score": ceil["avg_score"], "metrics": ceil["metrics"]}

    # (b) ridges from the perturbation features, gene space vs X_state decoded
    feats = torch.load(files["pert_features"], weights_only=True)
    missing = sorted(set(scr.train_perts + scr.test_perts) - set(feats))
    if missing:
        raise UserError(f"{files['pert_features']} lacks features for {missing[:5]}")
    f_train = np.stack([feats[p].double().numpy() for p in scr.train_perts])
    f_test = np.stack([feats[p].double().numpy() for p in scr.test_perts])
    n_ct = len(scr.cell_types)
    y_gene = _deltas(scr.train.X, scr.train.obs, scr.train_perts, scr.cell_types)
    y_state = _deltas(scr.state_train, scr.train.obs, scr.train_perts, scr.cell_types)
    preds, alphas = {}, {}
    for name, y in (("gene_ridge", y_gene), ("state_ridge_decoded", y_state)):
        b, w, alphas[name] = ridge_loo(f_train, y.reshape(len(scr.train_perts), -1))
        preds[name] = (b + f_test @ w).reshape(len(scr.test_perts), n_ct, -1)
    preds["state_ridge_decoded"] = preds["state_ridge_decoded"] @ coef  # [P, C, D] -> [P, C, G]
    basal = _basal(scr, groups, seed)
    for name, delta in preds.items():
        rows_x = {
            (c, p): basal[(c, p)] + delta[scr.test_perts.index(p), scr.cell_types.index(c)] for c, p in groups
        }
        out[name] = score(_prediction(scr.real, rows_x), name)
        out[name]["ridge_alpha"] = alphas[name]

    # (c) the share of the target and DE-gene effect that survives the embedding
    with np.load(files["truth"]) as t:
        de = {str(p): m for p, m in zip(t["screen_perts"], t["screen_de_mask"], strict=True)}
    smap = load_state_map(files["truth"])
    kept = _kept_share(scr, smap.components, coef, de, genes, seed)
    for v in out.values():
        v.pop("_score", None)
    return {
        "scores": out,
        "kept_share": kept,
        "n_test_perts": len(scr.test_perts),
        "cell_types": scr.cell_types,
    }


# --- over seeds --------------------------------------------------------------------------------------


def _mean_sd(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def summarize(per_seed: dict[int, dict]) -> dict[str, Any]:
    """Mean and sd over seeds of every figure, and whether (a) and (b) separate by more than their spread.

    Both sides of an oracle are measured on the same demo, so the separation is taken per seed (gene side minus
    embedding side) and compared with its own spread over the seeds: separated when its mean exceeds its sd and
    the embedding side is below on every seed. The unpaired spread (the sides' sds added) is reported beside it.
    """
    seeds = list(per_seed)
    names = list(per_seed[seeds[0]]["scores"])
    avg = {n: [per_seed[s]["scores"][n]["avg_score"] for s in seeds] for n in names}
    scores = {n: _mean_sd(v) for n, v in avg.items()}
    kept = {
        k: _mean_sd([per_seed[s]["kept_share"][k] for s in seeds]) for k in per_seed[seeds[0]]["kept_share"]
    }
    verdict = {}
    for oracle, (gene, emb) in SIDES.items():
        gaps = [g - e for g, e in zip(avg[gene], avg[emb], strict=True)]
        sep = _mean_sd(gaps)
        verdict[oracle] = {
            "gene_side": gene,
            "embedding_side": emb,
            "separation": sep["mean"],
            "spread": sep["sd"],
            "per_seed": gaps,
            "unpaired_spread": scores[gene]["sd"] + scores[emb]["sd"],
            "separated": bool(sep["mean"] > sep["sd"] and min(gaps) > 0),
        }
    return {
        "avg_score": scores,
        "kept_share": kept,
        "oracles": verdict,
        "mechanism_present": all(v["separated"] for v in verdict.values()),
    }


def demo_check(
    seeds: list[int],
    spec: dict[str, Any],
    cache_dir: Path,
    work_dir: Path,
    *,
    num_threads: int = 2,
    per_cell_type: bool = True,
) -> dict[str, Any]:
    """The oracles on the demo of `spec` for every generator seed (generated, or reused from `cache_dir`)."""
    from tahoe_ft.datasets.embedded import ensure_demo

    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise UserError(f"demo-check needs >= 2 distinct generator seeds for a spread, got {seeds}")
    if any(not isinstance(s, int) or s < 0 for s in seeds):
        raise UserError(f"demo-check seeds must be whole numbers >= 0, got {seeds}")
    if "seed" in spec and spec["seed"] not in (None, 0):
        raise UserError("demo-check takes its generator seeds from seeds=[...]; leave demo.seed unset")
    per_seed = {}
    for s in seeds:
        demo = DemoSpec.from_dict({**{k: v for k, v in spec.items() if k != "seed"}, "seed": s})
        files = ensure_demo(cache_dir, demo)
        log.info("demo-check: generator seed %d (%s)", s, files["screen"].parent)
        per_seed[s] = check_seed(
            files, work_dir / f"seed-{s}", seed=s, num_threads=num_threads, per_cell_type=per_cell_type
        )
    spec_out = DemoSpec.from_dict({k: v for k, v in spec.items() if k != "seed"}).asdict()
    spec_out.pop("seed")
    return {"spec": spec_out, "seeds": seeds, "per_seed": {str(s): v for s, v in per_seed.items()},
            "summary": summarize(per_seed)}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    """The figures as a few lines of text (what `tahoe-ft demo-check` prints)."""
    names = list(SIDES["a"] + SIDES["b"])
    lines = [
        f"demo-check over generator seeds {result['seeds']} (cell-eval avg_score, 0 = cell-mean baseline)"
    ]
    head = f"{'seed':>6} " + " ".join(f"{n:>20}" for n in names) + f" {'kept:target':>12} {'kept:DE':>8}"
    lines.append(head)
    for s, r in result["per_seed"].items():
        k = r["kept_share"]
        row = " ".join(f"{r['scores'][n]['avg_score']:>20.3f}" for n in names)
        lines.append(f"{s:>6} {row} {k['target']:>12.3f} {k['de_genes']:>8.3f}")
    summ = result["summary"]
    ms = lambda d: f"{d['mean']:.3f} ± {d['sd']:.3f}"  # noqa: E731
    lines.append(f"{'mean':>6} " + " ".join(f"{ms(summ['avg_score'][n]):>20}" for n in names))
    labels = {
        "a": "(a) ceiling vs decode of the true X_state",
        "b": "(b) features -> genes vs -> X_state -> genes",
    }
    for key, v in summ["oracles"].items():
        lines.append(
            f"{labels[key]}: separation {v['separation']:.3f} (per seed "
            f"{', '.join(f'{g:.3f}' for g in v['per_seed'])}), spread {v['spread']:.3f} "
            f"(unpaired {v['unpaired_spread']:.3f}) -> {'separated' if v['separated'] else 'NOT separated'}"
        )
    k = summ["kept_share"]
    lines.append(
        f"(c) effect kept by encode + decode: target gene {ms(k['target'])}, DE genes {ms(k['de_genes'])}, "
        f"all genes {ms(k['all_genes'])}"
    )
    lines.append(f"the mechanism is {'present' if summ['mechanism_present'] else 'NOT present'}")
    return "\n".join(lines)
