"""Score the baseline panel and the data ceiling beside a round: what `score.json`'s `baselines` block holds.

Every baseline (`baselines.build_panel`) is written as `eval/baselines/<name>.h5ad` and scored by
`score_predictions` — the same cell-eval call, per cell type, against the same cell-mean normaliser as the
round. The ceiling (`ceiling.ceiling_agg`) is normalised against that normaliser with cell-eval's
`score_agg_metrics`. The panel depends only on the real file and the training cells, so it is cached per
(real, train, settings, profile, versions) in the DE cache: the rounds of one split compute it once.

A baseline that exists for some held-out groups only (`baselines.PARTIAL`: *pert_mean* when a perturbation
trains in no other cell type, *additive* for the combinations among the held-out groups) is scored on those
groups (`score_on_groups`) into the block `partial` of `panel.json`; `evaluation.run` scores the round on the
same groups beside it (score.json's `diagnostics.partial_baselines`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import polars as pl

from tahoe_ft.data.labels import ScreenLabels
from tahoe_ft.evaluation.baselines import PanelSettings, build_panel
from tahoe_ft.evaluation.ceiling import CEILING_PROFILE, ceiling_agg
from tahoe_ft.evaluation.de_cache import cache_key, content_sha256, link_or_copy
from tahoe_ft.evaluation.score import Score, score_predictions, versions
from tahoe_ft.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

_PANEL_FORMAT = 3  # 2: feature_ridge, re-centred basal cells; 3: additive, partial baselines


def _entry(score: Score) -> dict[str, Any]:
    d = score.to_dict()
    return {k: d[k] for k in ("avg_score", "leaderboard_score", "metrics", "normalized")}


def score_panel(
    train: ad.AnnData,
    real: ad.AnnData,
    outdir: str | Path,
    *,
    labels: ScreenLabels,
    profile: str = "vcc",
    num_threads: int = 2,
    de_cache_dir: str | Path,
    settings: PanelSettings | None = None,
    features: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """`{"baselines": {name: {avg_score, leaderboard_score, metrics, normalized}}, "notes": {...}, "partial":
    {name: {groups, n_groups, of, avg_score, ...}}}`, with the ceiling as the baseline named "ceiling"; the
    panel's files under `outdir/baselines/`. `labels`: the obs columns and control label of train and real
    (`cell_type_col`: each cell type scored on its own; None: all cells as one). `features`: the round's perturbation features by name (the feature
    ridge's inputs; part of the cache key)."""
    outdir = Path(outdir)
    settings = settings or PanelSettings()
    cols = [labels.pert_col] + ([labels.cell_type_col] if labels.cell_type_col else [])
    key = cache_key(
        format=_PANEL_FORMAT,
        real=content_sha256(real, cols),
        train=content_sha256(train, cols),
        settings=dataclasses.asdict(settings),
        features=_features_digest(features),
        profile=profile,
        versions=versions(),
    )
    cache = Path(de_cache_dir) / "panel" / key
    done = cache / "panel.json"
    if not done.is_file():
        _compute(
            train,
            real,
            cache,
            labels=labels,
            profile=profile,
            num_threads=num_threads,
            de_cache_dir=de_cache_dir,
            settings=settings,
            features=features,
        )
    else:
        log.info("reusing the cached baseline panel %s", cache)
    panel = json.loads(done.read_text())
    (outdir / "baselines").mkdir(parents=True, exist_ok=True)
    panel.setdefault("partial", {})
    for name in [*panel["baselines"], *panel["partial"]]:
        src = cache / f"{name}.h5ad"
        if src.is_file():
            link_or_copy(src, outdir / "baselines" / f"{name}.h5ad")
    atomic_write_text(outdir / "baselines" / "panel.json", json.dumps(panel, indent=2) + "\n")
    panel["dir"] = str(cache)  # each baseline's cell-eval tables, per perturbation too (`evaluation.verdict`)
    return panel


def _compute(
    train: ad.AnnData,
    real: ad.AnnData,
    cache: Path,
    *,
    labels: ScreenLabels,
    profile: str,
    num_threads: int,
    de_cache_dir: str | Path,
    settings: PanelSettings,
    features: Mapping[str, np.ndarray] | None,
) -> None:
    panel = build_panel(
        train,
        real,
        labels=labels,
        settings=settings,
        features=features,
    )
    entries: dict[str, Any] = {}
    common = dict(labels=labels, profile=profile, num_threads=num_threads, de_cache_dir=de_cache_dir)
    tables: dict[str | None, pl.DataFrame] = {}
    for name, pred in panel.predictions.items():
        log.info("scoring the %s baseline", name)
        with atomic_path(cache / f"{name}.h5ad", suffix=".h5ad") as tmp:
            pred.write_h5ad(tmp)
        score = score_predictions(pred, real, train, cache / name, **common)
        entries[name] = _entry(score)
        tables = tables or normaliser_tables(cache / name, score)
    partial: dict[str, Any] = {}
    for name, (pred, groups) in panel.partial.items():
        log.info("scoring the %s baseline on the %d held-out groups it has", name, len(groups))
        with atomic_path(cache / f"{name}.h5ad", suffix=".h5ad") as tmp:
            pred.write_h5ad(tmp)
        score = score_on_groups(pred, real, train, groups, cache / name, **common)
        partial[name] = {**group_block(groups, real, labels), **_entry(score)}
    entries["ceiling"] = score_ceiling(real, tables, cache / "ceiling", labels, num_threads)
    notes = dict(panel.notes)
    notes["ceiling"] = (
        "cell-eval's compute_ceiling (disjoint halves, Spearman-Brown) for PDS and DES; MAE: half-split MAE / 2"
    )
    atomic_write_text(
        cache / "panel.json",
        json.dumps({"baselines": entries, "notes": notes, "partial": partial}, indent=2) + "\n",
    )


def _held_out_groups(
    real: ad.AnnData, labels: ScreenLabels
) -> tuple[np.ndarray, np.ndarray, set[tuple[str, str]]]:
    ct_col = labels.cell_type_col
    cts = real.obs[ct_col].astype(str).to_numpy() if ct_col else np.full(real.n_obs, "")
    perts = real.obs[labels.pert_col].astype(str).to_numpy()
    return cts, perts, {(c, p) for c, p in zip(cts, perts, strict=True) if p != labels.control_pert}


def group_block(groups: list[tuple[str, str]], real: ad.AnnData, labels: ScreenLabels) -> dict[str, Any]:
    """`{"groups": [[cell type, perturbation], ...], "n_groups", "of"}`: which held-out groups a partial score
    covers, out of how many."""
    return {
        "groups": [list(g) for g in sorted(groups)],
        "n_groups": len(groups),
        "of": len(_held_out_groups(real, labels)[2]),
    }


def score_on_groups(
    pred: ad.AnnData | str | Path,
    real: ad.AnnData | str | Path,
    train: ad.AnnData | None,
    groups: list[tuple[str, str]] | list[list[str]],
    outdir: str | Path,
    *,
    labels: ScreenLabels,
    **common: Any,
) -> Score:
    """`pred` scored against `real` on the held-out `groups` only ((cell type, perturbation); with their cell
    types' control cells): the same cell-eval call and cell-mean normaliser, restricted to those groups."""
    pred = pred if isinstance(pred, ad.AnnData) else ad.read_h5ad(pred)
    real = real if isinstance(real, ad.AnnData) else ad.read_h5ad(real)
    want = {(str(c), str(p)) for c, p in groups}

    def subset(a: ad.AnnData) -> ad.AnnData:
        cts, perts, _ = _held_out_groups(a, labels)
        keep = np.isin(cts, sorted({c for c, _ in want})) & (perts == labels.control_pert)
        keep |= np.array([(c, p) in want for c, p in zip(cts, perts, strict=True)], dtype=bool)
        out = a[keep].copy()
        for col in {labels.pert_col, labels.cell_type_col} - {None}:
            out.obs[col] = out.obs[col].astype(str).astype("category")
        return out

    return score_predictions(
        subset(pred),
        subset(real),
        train,
        outdir,
        labels=labels,
        write_score=False,
        **common,
    )


def _features_digest(features: Mapping[str, np.ndarray] | None) -> str | None:
    if features is None:
        return None
    h = hashlib.sha256()
    for name in sorted(features):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(features[name], dtype=np.float64).tobytes())
    return h.hexdigest()


def normaliser_tables(outdir: Path, score: Score) -> dict[str | None, pl.DataFrame]:
    """The cell-mean baseline's aggregate table per cell type (None: all cells), as scoring left it."""
    cts = list(score.per_celltype) if score.per_celltype else [None]
    return {
        ct: pl.read_csv(
            outdir / "baseline" / (f"{ct.replace('/', '-')}_agg_results.csv" if ct else "agg_results.csv")
        )
        for ct in cts
    }


def score_ceiling(
    real: ad.AnnData,
    tables: dict[str | None, pl.DataFrame],
    outdir: Path,
    labels: ScreenLabels,
    num_threads: int,
) -> dict[str, Any]:
    from cell_eval import score_agg_metrics

    pert_col, celltype_col = labels.pert_col, labels.cell_type_col
    parts = []
    for ct, base in tables.items():
        sub = real if ct is None else real[(real.obs[celltype_col].astype(str) == ct).to_numpy()].copy()
        sub.obs[pert_col] = sub.obs[pert_col].astype(str).astype("category")
        ceil = ceiling_agg(
            sub,
            labels=labels,
            num_threads=num_threads,
            outdir=str(outdir),
            prefix=ct,
        )
        cols = ["statistic"] + [c for c in base.columns[1:] if c in ceil.columns]
        base_vcc = base.filter(pl.col("statistic") == "mean").select(cols)
        scored = score_agg_metrics(ceil.select(cols), base_vcc)
        norm = dict(zip(scored["metric"].to_list(), scored["from_baseline"].to_list(), strict=True))
        avg = float(norm.pop("avg_score"))
        metrics = {c: ceil[c][0] for c in cols[1:]}
        parts.append((avg, metrics, norm))
    avg = float(np.mean([p[0] for p in parts]))
    keys = list(parts[0][1])
    mean = lambda i, k: float(np.nanmean([np.nan if p[i].get(k) is None else p[i][k] for p in parts]))  # noqa: E731
    return {
        "avg_score": avg,
        "leaderboard_score": 100.0 * avg,
        "metrics": {k: mean(1, k) for k in keys},
        "normalized": {k: mean(2, k) for k in keys},
        "profile": CEILING_PROFILE,
    }
