"""Paired verdicts: is the round better than a baseline, beyond the noise of which perturbations were held out?

cell-eval scores every held-out group (a perturbation in a cell type) on its own (its ``results.csv``); the
score is the mean over groups. The round and a baseline are scored on the same groups, so they are compared
group by group:

- **per group**, each metric is normalised as cell-eval normalises its means, against the cell-mean baseline's
  mean of that cell type (`norm = 1 - x / b` for a metric best at 0 such as MAE, `(x - b) / (1 - b)` for one
  best at 1), and the group's `avg_score` is the mean of its normalised metrics. Unlike cell-eval's
  `avg_score` nothing is clipped at 0 (a clip is not a per-group quantity), so the mean over groups is the
  unclipped avg_score, with groups (not cell types) weighing equally. A metric whose normaliser is degenerate
  (b = 1 for a metric best at 1, b = 0 for one best at 0) counts 0 for every group, as cell-eval's NaN -> 0.
- the **paired difference** of a group: round minus baseline, of `avg_score` (the mean over the metrics that
  both sides have for that group; higher is better) and of raw `mae` (lower is better).
- a **95 % percentile bootstrap interval** of the mean difference: `RESAMPLES` resamples of the groups with
  replacement, seeded (`SEED`), so a verdict is reproducible to the digit.
- the **verdict**: "better" where the interval excludes 0 on the good side, "worse" where it excludes 0 on the
  bad side, else "indistinguishable". With fewer than `MIN_GROUPS` groups the verdict is "indistinguishable"
  whatever the interval: no paired test at the 5 % level can decide with 5 groups or fewer (an exact
  sign-flip test's smallest two-sided p-value is 2^(1-n) = 0.0625 at n = 5), while a percentile bootstrap of
  3 groups that all happen to favour one side excludes 0 (the block then says so in `note`).

Over several splits (`compare` over folds x seeds, `split_verdict`) the bootstrap is **hierarchical**: each
resample draws the splits with replacement, then, within each drawn split, its groups with replacement (a
split drawn twice gets two independent group draws); the statistic is the mean over the drawn splits of their
mean group difference, so splits weigh equally whatever their number of groups. A split is one (fold, seed)
chain: seeds of one fold share their held-out groups, and resampling them as separate splits counts the
seed-to-seed spread as between-split variation. `MIN_GROUPS` then applies to the distinct groups over all the
splits.

`eval` writes every entry's per-group values to ``eval/per_group.csv`` (`PER_GROUP_CSV`: entry, celltype,
perturbation, avg_score, the raw metrics and ``norm_<metric>``) and a `verdict` block (`Verdict.to_dict`) into
each baseline of ``score.json`` (and into the shuffle control's); `compare` reads the csv of every split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: bootstrap resamples, interval level, generator seed, and the fewest groups for a verdict other than
#: "indistinguishable" (module docstring)
RESAMPLES = 2000
LEVEL = 0.95
SEED = 0
MIN_GROUPS = 6
#: the three verdicts, from the round's side
BETTER, SAME, WORSE = "better", "indistinguishable", "worse"
#: the per-group table `eval` writes beside score.json, and the round's entry name in it
PER_GROUP_CSV = "per_group.csv"
ROUND = "round"
KEYS = ["celltype", "perturbation"]
MAE = "mae"


# --------------------------------------------------------------------------------------------------------
# intervals and verdicts


def bootstrap_ci(
    diffs: np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `diffs` (groups resampled with replacement)."""
    return hierarchical_ci([diffs], resamples=resamples, level=level, seed=seed)


def hierarchical_ci(
    diffs_by_split: Sequence[np.ndarray],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean over splits of each split's mean difference: splits
    drawn with replacement, then the groups of each drawn split (module docstring). One split: the plain
    bootstrap over its groups."""
    parts = [np.asarray(d, dtype=np.float64) for d in diffs_by_split if len(d)]
    if not parts:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    n_splits = len(parts)
    # how often each split is drawn in each resample (always once each with one split)
    counts = rng.multinomial(n_splits, [1.0 / n_splits] * n_splits, size=resamples)
    total = np.zeros(resamples)
    for s, d in enumerate(parts):
        c = counts[:, s]
        n = len(d)
        # the sum, per resample, of the means of c[b] independent group draws of this split
        means = d[rng.integers(0, n, size=(int(c.sum()), n))].mean(axis=1)
        total += np.bincount(np.repeat(np.arange(resamples), c), weights=means, minlength=resamples)
    stat = total / n_splits
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stat, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def verdict_of(lo: float, hi: float, n_groups: int, *, lower_is_better: bool = False) -> str:
    """ "better" / "worse" where the interval [lo, hi] of (round - baseline) excludes 0 on that side (and there
    are at least `MIN_GROUPS` groups), else "indistinguishable"."""
    if n_groups < MIN_GROUPS or not (math.isfinite(lo) and math.isfinite(hi)):
        return SAME
    if lo > 0:
        return WORSE if lower_is_better else BETTER
    if hi < 0:
        return BETTER if lower_is_better else WORSE
    return SAME


@dataclass(frozen=True)
class Verdict:
    """The round against one baseline: the mean paired difference (round - baseline) of avg_score and of
    MAE over `n_groups` groups (of `n_splits` splits), their intervals and verdicts."""

    n_groups: int
    diff: float  # avg_score: higher is better
    ci_low: float
    ci_high: float
    verdict: str
    mae_diff: float  # lower is better
    mae_ci_low: float
    mae_ci_high: float
    mae_verdict: str
    n_splits: int = 1
    note: str | None = None
    # each side's own mean per-group avg_score on the same groups (mean over splits of the split means), so
    # diff = round_mean - base_mean. Unclipped, unlike cell-eval's avg_score, which clips each cell type's
    # normalised score at 0: a round can be "better" while its clipped avg_score is the lower one.
    round_mean: float = math.nan
    base_mean: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """The `verdict` block of score.json (NaN as None)."""
        out: dict[str, Any] = {
            "what": "round minus this baseline, per held-out group (cell type, perturbation); avg_score: "
            f"higher is better, mae: lower; {LEVEL:.0%} percentile bootstrap over groups "
            f"({RESAMPLES} resamples, seed {SEED})",
        }
        for k, v in asdict(self).items():
            if isinstance(v, float):
                v = v if math.isfinite(v) else None
            out[k] = v
        if out["note"] is None:
            del out["note"]
        return out

    def short(self, *, flip: bool = False) -> str:
        """ "better [+0.012,+0.081]": the avg_score verdict and interval (`short_text`)."""
        return short_text(self.to_dict(), flip=flip)


def short_text(block: Mapping[str, Any] | None, *, flip: bool = False) -> str:
    """A verdict block (`Verdict.to_dict`, as in score.json) in a few characters: "better [+0.012,+0.081]",
    the avg_score verdict and interval ("indist." for indistinguishable; "-" without one); `flip`: from the
    baseline's side (baseline - round), as eval's table shows it in the baseline's row."""
    if not block:
        return "-"
    lo, hi, v = block.get("ci_low"), block.get("ci_high"), block.get("verdict")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "-"
    if flip:
        lo, hi, v = -hi, -lo, {BETTER: WORSE, WORSE: BETTER}.get(v, v)
    word = "indist." if v == SAME else v
    return f"{word} [{lo + 0.0:+.3f},{hi + 0.0:+.3f}]"  # + 0.0: no "-0.000"


def _verdict(
    avg: Sequence[np.ndarray],
    mae: Sequence[np.ndarray],
    n_distinct: int,
    seed: int,
    sides: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> Verdict:
    """The verdict of per-split arrays of paired differences (one array per split); `sides`: per split, the
    round's and the baseline's own per-group avg_score on those groups (for `round_mean`/`base_mean`)."""
    sides = [s for s in sides if len(s[0])]
    round_mean = float(np.mean([r.mean() for r, _ in sides])) if sides else math.nan
    base_mean = float(np.mean([b.mean() for _, b in sides])) if sides else math.nan
    avg = [a for a in avg if len(a)]
    mae = [m for m in mae if len(m)]
    lo, hi = hierarchical_ci(avg, seed=seed)
    mlo, mhi = hierarchical_ci(mae, seed=seed)
    diff = float(np.mean([a.mean() for a in avg])) if avg else math.nan
    mdiff = float(np.mean([m.mean() for m in mae])) if mae else math.nan
    note = None
    if n_distinct < MIN_GROUPS:
        note = (
            f"{n_distinct} held-out group(s): fewer than {MIN_GROUPS}, no paired test at 5 % can decide; "
            "indistinguishable whatever the interval"
        )
    return Verdict(
        n_groups=int(sum(len(a) for a in avg)),
        diff=diff,
        ci_low=lo,
        ci_high=hi,
        verdict=verdict_of(lo, hi, n_distinct),
        mae_diff=mdiff,
        mae_ci_low=mlo,
        mae_ci_high=mhi,
        mae_verdict=verdict_of(mlo, mhi, n_distinct, lower_is_better=True),
        n_splits=len(avg),
        note=note,
        round_mean=round_mean,
        base_mean=base_mean,
    )


# --------------------------------------------------------------------------------------------------------
# per-group tables and paired differences


def _norm_cols(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("norm_")]


def paired_differences(round_groups: pd.DataFrame, base_groups: pd.DataFrame) -> pd.DataFrame:
    """Per group that both sides have (joined on celltype and perturbation): `avg_score` (round - baseline,
    the mean over the normalised metrics both sides have), `round_avg` and `base_avg` (each side's own mean
    over those metrics; their difference is `avg_score`) and `mae` (round - baseline, raw). Groups without
    a finite avg_score difference are dropped."""
    a = round_groups.set_index(KEYS)
    b = base_groups.set_index(KEYS)
    common = a.index.intersection(b.index)
    a, b = a.loc[common], b.loc[common]
    norms = [c for c in _norm_cols(a) if c in b.columns]
    d = (a[norms] - b[norms]).to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(d)
        count = np.maximum(finite.sum(axis=1), 1)
        avg = np.where(finite.any(axis=1), np.nansum(d, axis=1) / count, np.nan)
        own = {
            side: np.where(finite, x[norms].to_numpy(dtype=np.float64), 0.0).sum(axis=1) / count
            for side, x in (("round_avg", a), ("base_avg", b))
        }
    mae = (a[MAE] - b[MAE]).to_numpy(dtype=np.float64) if MAE in a and MAE in b else np.full(len(a), np.nan)
    out = pd.DataFrame({"avg_score": avg, **own, "mae": mae}, index=common).reset_index()
    return out[np.isfinite(out["avg_score"])].reset_index(drop=True)


def paired_verdict(round_groups: pd.DataFrame, base_groups: pd.DataFrame, *, seed: int = SEED) -> Verdict:
    """The round against a baseline on one split: per-group tables (`per_group_table`'s rows of each)."""
    return split_verdict([(round_groups, base_groups)], seed=seed)


def split_verdict(pairs: Sequence[tuple[pd.DataFrame, pd.DataFrame]], *, seed: int = SEED) -> Verdict:
    """The round against a baseline over several splits: one (round, baseline) pair of per-group tables per
    split; the hierarchical bootstrap of the module docstring. Splits without a common group are left out."""
    diffs = [paired_differences(r, b) for r, b in pairs]
    diffs = [d for d in diffs if len(d)]
    distinct = {tuple(k) for d in diffs for k in d[KEYS].itertuples(index=False)}
    mae = [d["mae"].to_numpy()[np.isfinite(d["mae"].to_numpy())] for d in diffs]
    sides = [(d["round_avg"].to_numpy(), d["base_avg"].to_numpy()) for d in diffs]
    return _verdict([d["avg_score"].to_numpy() for d in diffs], mae, len(distinct), seed, sides)


def per_group_table(
    results: pd.DataFrame, normaliser: Mapping[str, Mapping[str, float]], best: Mapping[str, float]
) -> pd.DataFrame:
    """`results` (celltype, perturbation and raw metrics per group) with ``norm_<metric>`` and the group's
    `avg_score` added. `normaliser`: per cell type ("" without a cell-type column), the cell-mean baseline's
    mean of each metric; `best`: each normalised metric's best value (0 or 1; other metrics are kept raw)."""
    out = results.copy()
    metrics = [m for m in results.columns if m not in KEYS and m in best]
    for m in metrics:
        base = out["celltype"].map(lambda ct, m=m: normaliser.get(ct, {}).get(m, math.nan)).astype(float)
        x = out[m].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = 1.0 - x / base if best[m] == 0 else (x - base) / (1.0 - base)
        degenerate = ~np.isfinite(base) | (base == (0.0 if best[m] == 0 else 1.0))
        out[f"norm_{m}"] = np.where(degenerate, 0.0, norm)
    out["avg_score"] = out[[f"norm_{m}" for m in metrics]].mean(axis=1, skipna=True) if metrics else math.nan
    return out


def best_values(metrics: Sequence[str]) -> dict[str, float]:
    """cell-eval's best value (0 or 1) of each metric it normalises (what `score_agg_metrics` reads)."""
    from cell_eval._types import MetricBestValue
    from cell_eval.metrics import metrics_registry

    out = {}
    for m in metrics:
        try:
            best = metrics_registry.get_metric(m).best_value
        except KeyError:
            continue
        if best == MetricBestValue.ZERO:
            out[m] = 0.0
        elif best == MetricBestValue.ONE:
            out[m] = 1.0
    return out


# --------------------------------------------------------------------------------------------------------
# reading cell-eval's tables


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Every column but the labels as numbers (an empty cell: NaN); labels stay text ("NA" is a gene)."""
    for c in df.columns:
        if c not in ("entry", *KEYS):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _fname(celltype: str, base: str) -> str:
    """cell-eval's file name of `base` for a cell type ("" : none), as `score._Part.fname` gives it."""
    return f"{celltype.replace('/', '-')}_{base}" if celltype else base


def read_results(folder: Path, celltypes: Sequence[str]) -> pd.DataFrame | None:
    """cell-eval's per-perturbation tables (``[<ct>_]results.csv``) in `folder`, one frame with celltype and
    perturbation; a cell type without its table is left out (a partial baseline scored on some cell types'
    groups only); None when there is none (an entry scored before these tables were kept)."""
    frames = []
    for ct in celltypes:
        path = Path(folder) / _fname(ct, "results.csv")
        if not path.is_file():
            continue
        df = _numeric(pd.read_csv(path, dtype={"perturbation": str}, keep_default_na=False))
        df.insert(0, "celltype", ct)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def read_normaliser(folder: Path, celltypes: Sequence[str]) -> dict[str, dict[str, float]] | None:
    """The cell-mean baseline's mean of each metric per cell type (``baseline/[<ct>_]agg_results.csv``)."""
    out = {}
    for ct in celltypes:
        path = Path(folder) / _fname(ct, "agg_results.csv")
        if not path.is_file():
            return None
        agg = pd.read_csv(path)
        row = agg[agg["statistic"] == "mean"].drop(columns="statistic").iloc[0]
        out[ct] = {k: float(v) for k, v in row.items()}
    return out


def eval_verdicts(
    outdir: Path,
    celltypes: Sequence[str | None],
    entries: Mapping[str, Path],
    *,
    seed: int = SEED,
) -> dict[str, Verdict]:
    """Write ``outdir/per_group.csv`` (the round's groups from `outdir`, each entry's from its folder of
    cell-eval tables, all normalised against the round's cell-mean baseline in ``outdir/baseline``) and return
    the round's verdict against each entry (an entry without per-group tables is left out, and logged)."""
    if not entries:
        return {}
    cts = ["" if ct is None else ct for ct in celltypes]
    round_results = read_results(outdir, cts)
    normaliser = read_normaliser(outdir / "baseline", cts)
    if round_results is None or normaliser is None:
        log.info("no per-perturbation tables of the round in %s: no paired verdicts", outdir)
        return {}
    best = best_values([c for c in round_results.columns if c not in KEYS])
    tables = {ROUND: per_group_table(round_results, normaliser, best)}
    for name, folder in entries.items():
        res = read_results(folder, cts)
        if res is None:
            log.info("no per-perturbation tables of %s in %s: no paired verdict", name, folder)
            continue
        tables[name] = per_group_table(res, normaliser, best)
    long = pd.concat([t.assign(entry=name) for name, t in tables.items()], ignore_index=True)
    cols = ["entry", *KEYS, "avg_score"]
    long = long[cols + [c for c in long.columns if c not in cols]]
    long.to_csv(outdir / PER_GROUP_CSV, index=False)
    return {name: paired_verdict(tables[ROUND], t, seed=seed) for name, t in tables.items() if name != ROUND}


def read_per_group(path: Path) -> dict[str, pd.DataFrame] | None:
    """An ``eval/per_group.csv`` as {entry: its groups} (None when absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    df = _numeric(pd.read_csv(path, dtype=dict.fromkeys(["entry", *KEYS], str), keep_default_na=False))
    return {
        str(name): g.drop(columns="entry").reset_index(drop=True)
        for name, g in df.groupby("entry", sort=False)
    }


def attach_verdicts(score: Any, outdir: Path, panel_dir: str | Path | None) -> Any:
    """`score` (a `Score`) with the round's verdict against each baseline of its panel (`panel_dir`: the
    panel's cached folder, `panel.score_panel`'s "dir"; the ceiling has no per-group table), against the
    partial baselines on the groups they have, and against the shuffle control (scored into
    `outdir/shuffled`); writes ``outdir/per_group.csv``. Each verdict goes into its entry as `verdict`."""
    import dataclasses

    cts = list(score.per_celltype) if score.per_celltype else [None]
    entries: dict[str, Path] = {}
    diag = dict(score.diagnostics or {})
    partial = dict(diag.get("partial_baselines") or {})
    if panel_dir is not None:
        for name in [*(score.baselines or {}), *partial]:
            if name != "ceiling":
                entries[name] = Path(panel_dir) / name
    if isinstance(diag.get("shuffle"), dict):
        entries["shuffle"] = Path(outdir) / "shuffled"
    verdicts = eval_verdicts(Path(outdir), cts, entries)
    if not verdicts:
        return score
    baselines = {
        name: {**b, "verdict": verdicts[name].to_dict()} if name in verdicts and name not in partial else b
        for name, b in (score.baselines or {}).items()
    }
    for name in partial:
        if name in verdicts:
            partial[name] = {**partial[name], "verdict": verdicts[name].to_dict()}
    if partial:
        diag["partial_baselines"] = partial
    if "shuffle" in verdicts:
        diag["shuffle"] = {**diag["shuffle"], "verdict": verdicts["shuffle"].to_dict()}
    return dataclasses.replace(
        score, baselines=baselines if score.baselines is not None else None, diagnostics=diag or None
    )
