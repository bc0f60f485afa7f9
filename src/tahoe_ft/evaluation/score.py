"""Scoring with cell-eval (0.8.2): the `Score` of a prediction and `score_predictions`, which computes it.

A prediction is scored as cell-eval scores it: its `MetricsEvaluator` on the prediction, the same on
cell-eval's cell-mean baseline (`build_base_mean_adata` on the training cells with the eval set's cells per
perturbation), and cell-eval's normalisation against that baseline (`score_agg_metrics`): the 0-1
`avg_score`, and the leaderboard's x100 scale. With a cell-type column each cell type is scored on its own
(cell-eval's ``<celltype>_`` file prefix) and the cell types weigh equally.

The real side's DE table and the baseline's aggregate table come from the cache (`DECache`) when they are
there. Files written in ``outdir``: cell-eval's ``results.csv``, ``agg_results.csv``, ``pred_de.csv`` and
``real_de.csv`` (a hard link to / copy of the cached table when it was reused), ``baseline/`` (the same for
the baseline, or only ``agg_results.csv`` when the baseline came from the cache) and ``score.json`` (unless
``write_score=False``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import polars as pl

from tahoe_ft.data.labels import VCC_LABELS, ScreenLabels
from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.de_cache import DECache, content_sha256, link_or_copy
from tahoe_ft.evaluation.inputs import EvalInput, celltype_parts, check_pair, one_line, read_inputs, sanitize
from tahoe_ft.fileio import atomic_copy, atomic_write_text

log = logging.getLogger(__name__)

# fewest perturbations (per evaluated cell type) for cell-eval's clustering_agreement in profile=full
MIN_PERTS_CLUSTERING = 5


def versions() -> dict[str, str]:
    """Versions that scores depend on: cell-eval, pdex (its DE) and tahoe-ft."""

    def _v(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    out = {"cell-eval": _v("cell-eval"), "pdex": _v("pdex"), "tahoe-ft": _v("tahoe-ft")}
    if out["tahoe-ft"] == "unknown":
        import tahoe_ft

        out["tahoe-ft"] = str(getattr(tahoe_ft, "__version__", "unknown"))
    return out


# --------------------------------------------------------------------------------------------------------
# the result


def _json_float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _finite(block: dict[str, Any]) -> dict[str, float | None]:
    return {k: _json_float(v) for k, v in block.items()}


@dataclass(frozen=True)
class Score:
    """A prediction's score: what ``score.json`` holds (`to_json` / `from_json` write and read that file).

    The metric blocks map cell-eval's metric names to the mean over perturbations (`metrics` for the
    prediction, `baseline` for the cell-mean baseline) and to the normalised score (`normalized`: 0 = the
    baseline, 1 = perfect); `avg_score` is the mean of `normalized` (0-1). A metric that is not finite is
    None in ``score.json``.

    The whole evaluation also carries how it was run (`profile`, `versions`, labels, inputs, cache); with a
    cell-type column, `per_celltype` holds each cell type's part (a `Score` whose `profile` is None) and the
    top-level numbers are the means over cell types (`skipped_metrics` and `baseline_source` are then per
    cell type only).
    """

    avg_score: float
    metrics: dict[str, float | None]
    baseline: dict[str, float | None]
    normalized: dict[str, float | None]
    n_perts: int
    skipped_metrics: list[str] = field(default_factory=list)
    baseline_source: str | None = None  # "computed", or "cache:<path of the cached table>"
    # the whole evaluation (None for a cell type's part)
    profile: str | None = None
    versions: dict[str, str] | None = None
    pert_col: str | None = None
    control_pert: str | None = None
    celltype_col: str | None = None
    real: str | None = None  # the real input: its path, or "in-memory real AnnData"
    pred: str | None = None
    de_cache_dir: str | None = None
    per_celltype: dict[str, Score] | None = None
    # the baseline panel and the data ceiling, scored the same way (`evaluation.panel`): name -> {avg_score,
    # leaderboard_score, metrics, normalized}; and why a baseline is absent (or how it was built)
    baselines: dict[str, dict[str, Any]] | None = None
    baseline_notes: dict[str, str] | None = None
    # does the score owe anything to the perturbation (the shuffle test), and has the model collapsed
    # (`evaluation.diagnostics`)
    diagnostics: dict[str, Any] | None = None
    # the VCC 2026 scorer (cell-eval2's vcc2026 preset) in count space, beside cell-eval's score
    # (`evaluation.vcc2026`): {avg_score, scores, metrics, de_calls, scorer, version, ...}; None: not run
    vcc2026: dict[str, Any] | None = None

    @property
    def leaderboard_score(self) -> float:
        """`avg_score` on the Virtual Cell Challenge leaderboard's scale (x100)."""
        return 100.0 * self.avg_score

    def to_dict(self) -> dict[str, Any]:
        """The ``score.json`` layout (a cell type's part: the layout of a ``per_celltype`` entry)."""
        blocks = {"metrics": self.metrics, "baseline": self.baseline, "normalized": self.normalized}
        if self.profile is None:
            return {
                "avg_score": self.avg_score,
                **{name: _finite(block) for name, block in blocks.items()},
                "n_perts": self.n_perts,
                "skipped_metrics": self.skipped_metrics,
                "baseline_source": self.baseline_source,
            }
        out = {
            "avg_score": float(self.avg_score),
            "leaderboard_score": self.leaderboard_score,
            **{name: _finite(block) for name, block in blocks.items()},
            "profile": self.profile,
            "n_perts": int(self.n_perts),
            "versions": self.versions,
            "pert_col": self.pert_col,
            "control_pert": self.control_pert,
            "celltype_col": self.celltype_col,
            "real": self.real,
            "pred": self.pred,
            "de_cache_dir": self.de_cache_dir,
        }
        if self.per_celltype is None:
            out["baseline_source"] = self.baseline_source
            out["skipped_metrics"] = self.skipped_metrics
        else:
            out["per_celltype"] = {ct: part.to_dict() for ct, part in self.per_celltype.items()}
        if self.baselines is not None:
            out["baselines"] = {
                name: {**b, **{k: _finite(b[k]) for k in ("metrics", "normalized")}}
                for name, b in self.baselines.items()
            }
            out["baseline_notes"] = dict(self.baseline_notes or {})
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        if self.vcc2026 is not None:
            out["vcc2026"] = self.vcc2026
        return out

    def to_json(self) -> str:
        """The text of ``score.json``."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Score:
        """The `Score` of a ``score.json`` layout (or of a ``per_celltype`` entry)."""
        per_ct = d.get("per_celltype")
        return cls(
            avg_score=d["avg_score"],
            metrics=dict(d["metrics"]),
            baseline=dict(d["baseline"]),
            normalized=dict(d["normalized"]),
            n_perts=d["n_perts"],
            skipped_metrics=list(d.get("skipped_metrics") or []),
            baseline_source=d.get("baseline_source"),
            profile=d.get("profile"),
            versions=d.get("versions"),
            pert_col=d.get("pert_col"),
            control_pert=d.get("control_pert"),
            celltype_col=d.get("celltype_col"),
            real=d.get("real"),
            pred=d.get("pred"),
            de_cache_dir=d.get("de_cache_dir"),
            per_celltype=None if per_ct is None else {ct: cls.from_dict(v) for ct, v in per_ct.items()},
            baselines=d.get("baselines"),
            baseline_notes=d.get("baseline_notes"),
            diagnostics=d.get("diagnostics"),
            vcc2026=d.get("vcc2026"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Score:
        """Read a ``score.json`` file."""
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------------------
# scoring one part: all cells, or one cell type


@dataclass(frozen=True)
class _Settings:
    """How every part of one evaluation is scored, and where its files go."""

    outdir: Path
    cache: DECache
    pert_col: str
    control_pert: str
    profile: str
    num_threads: int
    versions: dict[str, str]

    @property
    def skip_de(self) -> bool:
        return self.profile == "pds"  # as cell-eval's CLI does: that profile needs no DE


@dataclass(frozen=True)
class _Part:
    """One scored part: its real cells, their cache key, and the cell type (cell-eval's file prefix)."""

    settings: _Settings
    real: ad.AnnData
    real_sha: str
    real_key: str
    celltype: str | None
    n_perts: int
    skip_metrics: list[str] | None

    def fname(self, base: str) -> str:
        """The name cell-eval gives its file `base` in this part (its prefix, with "/" replaced by "-")."""
        return f"{self.celltype.replace('/', '-')}_{base}" if self.celltype else base

    def cell_eval(self, pred: ad.AnnData, out: Path, de_real: str | None, what: str) -> pl.DataFrame:
        """cell-eval's `MetricsEvaluator` on `pred` against this part's real cells: its aggregate table."""
        from cell_eval import MetricsEvaluator

        s = self.settings
        try:
            ev = MetricsEvaluator(
                pred,
                self.real,
                de_real=de_real,
                control_pert=s.control_pert,
                pert_col=s.pert_col,
                num_threads=s.num_threads,
                outdir=str(out),
                allow_discrete=False,
                prefix=self.celltype,
                skip_de=s.skip_de,
            )
        except ValueError as e:  # what our checks did not anticipate
            raise UserError(f"cell-eval rejected the {what} input: {one_line(e)}") from e
        _, agg = ev.compute(profile=s.profile, break_on_error=True, skip_metrics=self.skip_metrics)
        return agg


def _part(s: _Settings, real: ad.AnnData, real_sha: str, celltype: str | None) -> _Part:
    n_perts = len(set(real.obs[s.pert_col].astype(str)) - {s.control_pert})
    # cell-eval's clustering_agreement (Leiden on perturbation centroids) fails on a handful of
    # perturbations ("Maximum allowed size exceeded" with 2): skip it there, on both sides, and say so
    skip_metrics = (
        ["clustering_agreement"] if s.profile == "full" and n_perts < MIN_PERTS_CLUSTERING else None
    )
    if skip_metrics:
        log.warning(
            "only %d perturbations: clustering_agreement skipped (needs >= %d)", n_perts, MIN_PERTS_CLUSTERING
        )
    key = s.cache.real_key(
        real_sha, versions=s.versions, pert_col=s.pert_col, control_pert=s.control_pert, celltype=celltype
    )
    return _Part(s, real, real_sha, key, celltype, n_perts, skip_metrics)


def _score_part(part: _Part, pred: ad.AnnData, train: ad.AnnData | None, train_sha: str | None) -> Score:
    """Score `pred` against the part's real cells, normalised against the cell-mean baseline."""
    agg_pred = _score_pred(part, pred)
    agg_base, base_source = _baseline(part, train, train_sha)
    return _normalise(part, agg_pred, agg_base, base_source)


def _score_pred(part: _Part, pred: ad.AnnData) -> pl.DataFrame:
    """cell-eval on the prediction, with the real side's DE from the cache, or computed and then cached."""
    s = part.settings
    de_cached = s.cache.real_de(part.real_key)
    de_real = None if s.skip_de or not de_cached.is_file() else str(de_cached)
    if de_real:
        log.info("reusing cached real DE %s", de_cached)
    out_de = s.outdir / part.fname("real_de.csv")
    # an earlier evaluation into this outdir may have left a hard link to a cache entry here: cell-eval
    # would write its new table *through* it (open + truncate), corrupting the cache. Unlink it first.
    out_de.unlink(missing_ok=True)
    agg = part.cell_eval(pred, s.outdir, de_real, "pred")
    if s.skip_de:
        return agg
    if de_real is None:  # computed just now: keep it for the baseline and for later evaluations
        meta = {
            "real": part.real_sha,
            "celltype": part.celltype,
            "pert_col": s.pert_col,
            "control_pert": s.control_pert,
            "versions": s.versions,
        }
        s.cache.store_real_de(out_de, part.real_key, meta=meta)
    else:
        link_or_copy(de_cached, out_de)
    return agg


def _baseline(part: _Part, train: ad.AnnData | None, train_sha: str | None) -> tuple[pl.DataFrame, str]:
    """The cell-mean baseline's aggregate table and where it came from ("computed" or "cache:<path>").

    Built from `train` and cached per (real, train, profile) when it is not in the cache; without `train`,
    the newest cached baseline of this real side.
    """
    s = part.settings
    base_out = s.outdir / "baseline" / part.fname("agg_results.csv")
    if train is not None:
        cached = s.cache.baseline(part.real_key, s.profile, train_sha=train_sha, celltype=part.celltype)
        if not cached.is_file():
            agg = _build_baseline(part, train)
            atomic_copy(base_out, cached)
            return agg, "computed"
        log.info("reusing cached baseline aggregate %s", cached)
    else:
        cached = s.cache.newest_baseline(part.real_key, s.profile)
        if cached is None:
            raise UserError(
                f"no training data given and no cached baseline for this real file in {s.cache.root}"
                f"{' (cell type ' + repr(part.celltype) + ')' if part.celltype else ''}; "
                "pass train= (the training cells incl. controls) once to build the cell-mean baseline"
            )
    agg = pl.read_csv(cached)
    atomic_copy(cached, base_out)  # keep the table next to the score for the record
    return agg, f"cache:{cached}"


def _build_baseline(part: _Part, train: ad.AnnData) -> pl.DataFrame:
    """cell-eval's cell-mean baseline built from `train`, scored like the prediction (into outdir/baseline)."""
    from cell_eval import build_base_mean_adata

    s = part.settings
    counts = (
        part.real.obs[s.pert_col]
        .astype(str)
        .value_counts()
        .rename_axis(s.pert_col)
        .reset_index(name="n_cells")
    )
    counts = counts[counts[s.pert_col] != s.control_pert]
    log.info("building the cell-mean baseline from %d training cells", train.n_obs)
    base = build_base_mean_adata(
        train, counts_df=pl.from_pandas(counts), pert_col=s.pert_col, control_pert=s.control_pert
    )
    base = sanitize(
        base,
        "baseline",
        "built from train",
        owned=True,
        labels=ScreenLabels(s.pert_col, s.control_pert),
        clip_negative=False,
    )
    check_pair(base, part.real, "baseline", "real", labels=ScreenLabels(s.pert_col, s.control_pert))
    de_real = None if s.skip_de else str(s.cache.real_de(part.real_key))
    return part.cell_eval(base, s.outdir / "baseline", de_real, "baseline")


def _agg_means(agg: pl.DataFrame) -> dict[str, float]:
    row = agg.filter(pl.col("statistic") == "mean").drop("statistic")
    return {c: float("nan") if row[c][0] is None else float(row[c][0]) for c in row.columns}


def _normalise(part: _Part, agg_pred: pl.DataFrame, agg_base: pl.DataFrame, base_source: str) -> Score:
    """cell-eval's normalisation of the prediction's aggregate table against the baseline's."""
    from cell_eval import score_agg_metrics

    if agg_base.columns != agg_pred.columns:
        base_dir = part.settings.cache.baseline_dir(part.real_key, part.settings.profile)
        raise UserError(
            f"baseline metrics {agg_base.columns[1:]} do not match this profile's {agg_pred.columns[1:]}; "
            f"delete the baseline cache {base_dir} or pass train= to rebuild it"
        )
    scored = score_agg_metrics(agg_pred, agg_base)
    norm = dict(zip(scored["metric"].to_list(), scored["from_baseline"].to_list(), strict=True))
    avg = float(norm.pop("avg_score"))
    return Score(
        avg_score=avg,
        metrics=_agg_means(agg_pred),
        baseline=_agg_means(agg_base),
        normalized={k: float(v) for k, v in norm.items()},
        n_perts=part.n_perts,
        skipped_metrics=part.skip_metrics or [],
        baseline_source=base_source,
    )


def _combine(per_ct: dict[str, Score], n_perts: int) -> Score:
    """Cell types weigh equally: each number is the mean over cell types of the per-cell-type number."""

    def mean_of(name: str) -> dict[str, float]:
        blocks = [getattr(part, name) for part in per_ct.values()]
        keys = list(dict.fromkeys(k for block in blocks for k in block))  # a metric one cell type skipped
        return {k: float(np.nanmean([block.get(k, np.nan) for block in blocks])) for k in keys}

    return Score(
        avg_score=float(np.mean([part.avg_score for part in per_ct.values()])),
        metrics=mean_of("metrics"),
        baseline=mean_of("baseline"),
        normalized=mean_of("normalized"),
        n_perts=n_perts,
    )


# --------------------------------------------------------------------------------------------------------
# the evaluation


def score_predictions(
    pred: ad.AnnData | str | os.PathLike,
    real: ad.AnnData | str | os.PathLike,
    train: ad.AnnData | str | os.PathLike | None,
    outdir: str | os.PathLike,
    *,
    labels: ScreenLabels = VCC_LABELS,
    profile: str = "vcc",
    num_threads: int = 2,
    de_cache_dir: str | os.PathLike | None = None,
    write_score: bool = True,
) -> Score:
    """Score predictions against the observed cells with cell-eval; write ``outdir/score.json`` (unless
    `write_score` is false: `evaluation.run` writes it once, with the panel and the diagnostics).

    pred: predicted cells (log1p, the real control cells copied in); real: observed cells (log1p);
    train: training cells incl. controls (log1p, same genes) for the cell-mean baseline, or None to use
    the baseline cached for this real file. Inputs are never modified. `labels`: the obs columns and the
    control label (default target_gene / non-targeting); its `cell_type_col`: score each cell type on its own
    (every file then carries cell-eval's ``<celltype>_`` prefix; None: all cells as one). `de_cache_dir`: the cache of
    the real DE and the baselines (default ``outdir/../.de_cache``).
    """
    from cell_eval import KNOWN_PROFILES

    if profile not in KNOWN_PROFILES:
        raise UserError(
            f"unknown cell-eval profile {profile!r}; use one of {KNOWN_PROFILES} (vcc gives the score)"
        )
    pert_col, control_pert, celltype_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    outdir = Path(outdir)
    cache = DECache(Path(de_cache_dir) if de_cache_dir is not None else outdir.parent / ".de_cache")
    s = _Settings(outdir, cache, pert_col, control_pert, profile, num_threads, versions())
    pred_in, real_in, train_in = read_inputs(pred, real, train, labels=labels)
    real_sha = _sha(real_in, [pert_col] + ([celltype_col] if celltype_col else []))
    train_sha = None if train_in is None else _sha(train_in, [pert_col])
    if celltype_col is None:
        train_a = None if train_in is None else train_in.adata
        top = _score_part(_part(s, real_in.adata, real_sha, None), pred_in.adata, train_a, train_sha)
        per_ct = None
    else:
        per_ct = {}
        for ct, p_ct, r_ct, t_ct in celltype_parts(
            pred_in,
            real_in,
            train_in,
            labels=labels,
        ):
            per_ct[ct] = _score_part(_part(s, r_ct, real_sha, ct), p_ct, t_ct, train_sha)
            del p_ct, r_ct, t_ct
        top = _combine(per_ct, n_perts=len(set(real_in.adata.obs[pert_col]) - {control_pert}))
    score = dataclasses.replace(
        top,
        profile=profile,
        versions=s.versions,
        pert_col=pert_col,
        control_pert=control_pert,
        celltype_col=celltype_col,
        real=real_in.where,
        pred=pred_in.where,
        de_cache_dir=str(cache.root),
        per_celltype=per_ct,
    )
    if write_score:
        atomic_write_text(outdir / "score.json", score.to_json())
    log.info(
        "avg_score %.4f (leaderboard %.2f) over %d perturbations%s",
        score.avg_score,
        score.leaderboard_score,
        score.n_perts,
        f" -> {outdir / 'score.json'}" if write_score else "",
    )
    return score


def _sha(inp: EvalInput, cols: list[str]) -> str:
    """The cache key of an input's data: its file's sha256, or the hash of its content."""
    return inp.sha if inp.sha is not None else content_sha256(inp.adata, cols)
