"""`tahoe-ft compare` (`tahoe_ft.compare`): every evaluated run in one table sorted by score, plus loss-curve and metric plots.

Reads the run directory contract: ``runs_dir/<experiment>/<run_id>/`` with ``run.json``,
``<experiment>_metrics.csv`` (wide, one row per logging event) and, once evaluated, ``eval/score.json``.
Writes ``compare.csv`` and ``compare.png`` in ``out_dir`` (default: ``runs_dir``).

Every row names the split it was scored on (`split`, e.g. ``test@3fa2c1``: the scored part, then a short hash of
the data and the held-out groups, read from the run's ``predict.json`` and its checkpoint's ``manifest.json``), and
the baseline panel is listed once per split: a baseline scored on one split is never pooled with, or shown as, a
baseline of another.

A round's row carries its paired verdict against each baseline (``vs_<baseline>``: better, indistinguishable or
worse, and ``vs_<baseline>_<field>``: the mean difference round - baseline, its 95 % interval, the same for MAE;
`evaluation.verdict`): from its ``score.json`` for one split, and over folds x seeds (`compare_splits`) from
every split's ``eval/per_group.csv`` by a hierarchical bootstrap (splits, then groups within each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tahoe_ft.errors import UserError
from tahoe_ft.evaluation.verdict import (
    MIN_GROUPS,
    PER_GROUP_CSV,
    ROUND,
    SAME,
    Verdict,
    read_per_group,
    split_verdict,
)
from tahoe_ft.fileio import atomic_path

log = logging.getLogger(__name__)

__all__ = ["collect", "compare", "METRICS"]

#: cell-eval's VCC metrics, in the order the table and the bars show them
METRICS = ["mae", "discrimination_score_l1", "overlap_at_N"]
_SHORT = {"mae": "MAE", "discrimination_score_l1": "PDS", "overlap_at_N": "DES", "avg_score": "avg score"}
_LOSSES = [("train/main_loss", "train main"), ("val_loss", "val"), ("train/decoder_loss", "train decoder")]


def _num(x: Any) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return math.nan
    return f


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("skipping unreadable %s (%s)", path, e)
        return None
    if not isinstance(data, dict):
        log.warning("skipping %s: not a JSON object", path)
        return None
    return data


def _metrics_csv(run_dir: Path, experiment: str) -> Path | None:
    path = run_dir / f"{experiment}_metrics.csv"
    if path.is_file():
        return path
    found = sorted(run_dir.glob("*_metrics.csv"))
    return found[0] if found else None


def _read_metrics(path: Path | None) -> pd.DataFrame | None:
    if path is None:
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as e:  # pandas' EmptyDataError / ParserError are ValueErrors
        log.warning("could not read %s (%s)", path, e)
        return None


def _last_value(df: pd.DataFrame | None, col: str) -> float:
    if df is None or col not in df.columns:
        return math.nan
    vals = pd.to_numeric(df[col], errors="coerce").dropna()
    return float(vals.iloc[-1]) if len(vals) else math.nan


def _validation_change(df: pd.DataFrame | None) -> dict[str, float]:
    """What fine-tuning did to the validation loss, from a run's metrics: for `val_loss` (``val_``), the
    unbiased energy ``val/unbiased_loss`` (``unbiased_``) and the unbiased set-mean error
    ``val/unbiased_mean_loss`` (``unbiased_mean_``), the value at the first validation (``_first``, step 0 with
    checkpoint.validate_at_start) and at the best `val_loss` (``_best``, the step of best-val.pt) and the change
    (``_change``): relative for `val_loss` (best / first - 1), absolute for the unbiased ones (best - first:
    they sit near 0, where a ratio means nothing). NaN where the metrics lack them."""
    out = dict.fromkeys(_VAL_COLUMNS, math.nan)
    if df is None or "val_loss" not in df.columns:
        return out
    rows = pd.to_numeric(df["val_loss"], errors="coerce").dropna()
    if rows.empty:
        return out
    first, best = rows.index[0], rows.idxmin()
    for column, name in _VAL_METRICS:
        if column not in df.columns:
            continue
        values = pd.to_numeric(df[column], errors="coerce")
        v_first, v_best = float(values[first]), float(values[best])
        out[f"{name}_first"], out[f"{name}_best"] = v_first, v_best
        if name == "val":
            out["val_change"] = v_best / v_first - 1.0 if v_first else math.nan
        else:
            out[f"{name}_change"] = v_best - v_first
    return out


#: the validation metrics `_validation_change` reports: (metrics column, prefix of its compare columns)
_VAL_METRICS = [
    ("val_loss", "val"),
    ("val/unbiased_loss", "unbiased"),
    ("val/unbiased_mean_loss", "unbiased_mean"),
]
_VAL_COLUMNS = [f"{name}_{what}" for _, name in _VAL_METRICS for what in ("first", "best", "change")]
#: how the tables print the changes: val_loss relative, the unbiased ones absolute
_CHANGE_FORMATS = {"val_change": "{:.2%}", "unbiased_change": "{:+.4f}", "unbiased_mean_change": "{:+.2e}"}


def _run_dirs(runs_dir: Path) -> list[Path]:
    """``<experiment>/<run>/`` directories; skips `latest` pointers and hidden folders (.de_cache, .multirun)."""
    out = []
    for exp in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for run in sorted(exp.iterdir()):
            if run.name == "latest" or run.is_symlink() or run.name.startswith(".") or not run.is_dir():
                continue
            if (
                (run / "run.json").is_file()
                or (run / "eval" / "score.json").is_file()
                or any(run.glob("*_metrics.csv"))
            ):
                out.append(run)
    return out


#: `split` of a run whose scored split is unknown (no predict.json, or no manifest beside its checkpoint)
UNKNOWN_SPLIT = "-"


@dataclasses.dataclass(frozen=True)
class ScoredSplit:
    """The split a run's prediction was scored on: which part (`scored`: test or val), the held-out groups of
    the whole split (`held_out`: (dataset, cell type, perturbation, part)) and the data read (`data`)."""

    scored: str
    held_out: tuple[tuple[str, str, str, str], ...]
    data: str  # the data's content fingerprint, or the paths of its files
    files: str = ""  # the file names, to show
    regime: str = ""  # what the split holds out (the manifest's `regime`, study.folds); "" when not said

    @property
    def label(self) -> str:
        """``<scored>@<6 hex>``: the hash covers the data and every held-out group (validation and test: the
        training cells of the baseline panel are what the split leaves), so two splits never share a label."""
        blob = json.dumps([self.data, [list(g) for g in self.held_out]])
        return f"{self.scored}@{hashlib.sha256(blob.encode()).hexdigest()[:6]}"

    def describe(self) -> str:
        """One short line: what was scored, of which data."""
        perts = sorted({p for _, _, p, part in self.held_out if part == self.scored})
        cts = sorted({ct for _, ct, _, part in self.held_out if part == self.scored} - {"*"})
        shown = ", ".join(perts[:4]) + (f" +{len(perts) - 4}" if len(perts) > 4 else "")
        where = f" in {len(cts)} cell type(s)" if cts else ""
        regime = f"{self.regime}: " if self.regime else ""
        return f"{regime}{self.scored} perts {shown}{where} of {self.files or 'unknown data'}"


def _manifest_of_prediction(run_dir: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    """The data manifest of the checkpoint the prediction was made with: its run folder's ``manifest.json``
    (`<run>/checkpoints/<file>` -> `<run>/manifest.json`), else this run's own."""
    candidates = []
    if record.get("checkpoint"):
        candidates.append(Path(str(record["checkpoint"])).parent.parent / "manifest.json")
    candidates.append(run_dir / "manifest.json")
    for path in candidates:
        if path.is_file():
            return _read_json(path)
    return None


def scored_split(run_dir: str | os.PathLike) -> ScoredSplit | None:
    """The split `run_dir`'s ``eval/score.json`` was scored on (None: unknown, e.g. files scored with
    ``eval pred= real=``, or a run from before manifests recorded their split)."""
    run_dir = Path(run_dir)
    record = _read_json(run_dir / "predict.json") if (run_dir / "predict.json").is_file() else None
    if not record:
        return None
    manifest = _manifest_of_prediction(run_dir, record)
    if not manifest:
        return None
    if manifest.get("held_out") is not None:
        groups = {
            (
                str(e.get("dataset", "")),
                str(e.get("cell_type", "")),
                str(e.get("pert", "")),
                str(e.get("split", "")),
            )
            for e in manifest["held_out"]
        }
    else:  # older manifests: the perturbations held out in every cell type
        groups = {
            ("", "*", str(p), str(part))
            for part, perts in (manifest.get("splits") or {}).items()
            for p in perts
        }
    predicted = [str(p) for p in record.get("data_paths") or []]
    trained = [str(p) for p in manifest.get("data_paths") or []]
    # the data the prediction read: the training data's content fingerprint when predict read those same
    # files, else the files it read
    if manifest.get("data_fingerprint") and (not predicted or predicted == trained):
        data = str(manifest["data_fingerprint"])
    else:
        data = ",".join(sorted(predicted or trained))
    files = ", ".join(sorted({Path(p).name for p in predicted or trained}))
    return ScoredSplit(
        scored=str(record.get("split") or "test"),
        held_out=tuple(sorted(groups)),
        data=data,
        files=files,
        regime=str(manifest.get("regime") or ""),
    )


def _check_runs_dir(runs_dir: Path) -> None:
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(
            f"runs_dir '{runs_dir}' is a file, not a folder; compare reads the folder that tahoe-ft train writes "
            "its runs into: pass runs_dir=<that folder> (default: runs)"
        )
    if not runs_dir.is_dir():
        raise UserError(
            f"runs directory {runs_dir} does not exist; train a round (tahoe-ft train +experiment=NAME), "
            "then run tahoe-ft eval first"
        )


def collect(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per evaluated run (runs without ``eval/score.json`` are logged, not listed), best first.

    Columns: experiment, run, kind ("round", or "baseline" for the baseline panel and the data ceiling that
    `eval` scored beside the rounds: one row per split and distinct baseline, `experiment` = its name), split
    (the split the row was scored on, `ScoredSplit.label`; "-" when unknown), avg_score,
    leaderboard_score, the metrics (mae, discrimination_score_l1, overlap_at_N, plus any other metric a run's
    profile gave), ``norm_<metric>``, ``base_<metric>``, best_val_loss, best_step, final_decoder_loss (last
    non-empty ``train/decoder_loss``), steps, wall_time_s and what training did to the validation loss
    (`_validation_change`), then a round's verdicts against its baselines (`verdict_columns`; blank for the
    baseline rows and for runs evaluated before verdicts). Sorted by avg_score descending. Empty (with these
    columns) when nothing is evaluated. ``attrs["splits"]``: each split label's description.
    """
    runs_dir = Path(runs_dir)
    _check_runs_dir(runs_dir)
    rows: list[dict[str, Any]] = []
    baselines: dict[tuple, dict[str, Any]] = {}
    splits: dict[str, ScoredSplit] = {}
    pending: list[str] = []
    extra: list[str] = []
    vs_columns: list[str] = []
    for run_dir in _run_dirs(runs_dir):
        info = _read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else None
        info = info or {}
        experiment = str(info.get("experiment") or run_dir.parent.name)
        run_id = str(info.get("run_id") or run_dir.name)
        score_path = run_dir / "eval" / "score.json"
        score = _read_json(score_path) if score_path.is_file() else None
        if score is None:
            pending.append(f"{experiment}/{run_id} ({info.get('status', 'unknown')})")
            continue
        metrics = score.get("metrics") or {}
        for m in metrics:
            if m not in METRICS and m not in extra:
                extra.append(m)
        split = scored_split(run_dir)
        label = split.label if split is not None else UNKNOWN_SPLIT
        if split is not None:
            splits.setdefault(label, split)
        row = _score_row(score, experiment=experiment, run=run_id, kind="round", split=label)
        verdicts = verdict_columns(_verdict_blocks(score))
        row.update(verdicts)
        vs_columns += [c for c in verdicts if c not in vs_columns]
        row["regime"] = split.regime if split is not None else ""
        for name, b in (score.get("baselines") or {}).items():
            brow = _score_row(
                {**b, "baseline": score.get("baseline")},
                experiment=name,
                run=run_id,
                kind="baseline",
                split=label,
            )
            brow["regime"] = row["regime"]
            # the same panel is scored beside every round of a split: one row per split and distinct panel
            # entry. A run whose split is unknown keeps its own rows: nothing says another run's are the same
            ident = (
                label if split is not None else str(run_dir),
                name,
                f"{brow['avg_score']:.9g}",
                *(f"{_num(v):.9g}" for _, v in sorted((b.get("metrics") or {}).items())),
            )
            baselines.setdefault(ident, {**brow, "_dir": str(run_dir)})
        metrics_df = _read_metrics(_metrics_csv(run_dir, experiment))
        row.update(
            best_val_loss=_num(info.get("best_val_loss")),
            best_step=_num(info.get("best_step")),
            final_decoder_loss=_last_value(metrics_df, "train/decoder_loss"),
            steps=_num(info.get("steps")),
            wall_time_s=_num(info.get("wall_time_s")),
            **_validation_change(metrics_df),
        )
        row["_dir"] = str(run_dir)
        rows.append(row)
    rows += list(baselines.values())
    if pending:
        log.info(
            "%d run(s) not evaluated yet (no eval/score.json), left out: %s", len(pending), ", ".join(pending)
        )

    names = METRICS + extra
    columns = (
        ["experiment", "run", "kind", "split", "regime", "avg_score", "leaderboard_score"]
        + names
        + [f"norm_{m}" for m in names]
        + [f"base_{m}" for m in names]
        + ["best_val_loss", "best_step", "final_decoder_loss", "steps", "wall_time_s"]
        + _VAL_COLUMNS
        + vs_columns
    )
    df = pd.DataFrame(rows, columns=columns + ["_dir"])
    df = df.sort_values(["avg_score", "experiment", "run"], ascending=[False, True, True], na_position="last")
    df = df.reset_index(drop=True)
    df.attrs["run_dirs"] = df.pop("_dir").tolist()
    df.attrs["splits"] = {label: splits[label].describe() for label in sorted(splits)}
    for c in ("best_step", "steps"):  # whole numbers, blank for baseline rows
        df[c] = df[c].astype("Int64")
    return df


#: a verdict's numbers, each a column ``vs_<baseline>_<field>`` beside ``vs_<baseline>`` (the verdict)
VERDICT_FIELDS = [
    "diff",
    "ci_low",
    "ci_high",
    "mae_diff",
    "mae_ci_low",
    "mae_ci_high",
    "mae_verdict",
    "n_groups",
    "round_mean",
    "base_mean",
]


def _verdict_blocks(score: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The round's verdict blocks in a score.json: each baseline's, each partial baseline's, the shuffle's."""
    diag = score.get("diagnostics") or {}
    entries = {**(score.get("baselines") or {}), **(diag.get("partial_baselines") or {})}
    if isinstance(diag.get("shuffle"), dict):
        entries["shuffle"] = diag["shuffle"]
    return {name: e["verdict"] for name, e in entries.items() if isinstance(e, dict) and e.get("verdict")}


def verdict_columns(verdicts: dict[str, Any]) -> dict[str, Any]:
    """``vs_<name>`` (the verdict of the round against <name>) and ``vs_<name>_<field>`` (`VERDICT_FIELDS`,
    plus n_splits over splits) of verdict blocks (score.json's) or `evaluation.verdict.Verdict`s."""
    out: dict[str, Any] = {}
    for name, v in verdicts.items():
        d = v if isinstance(v, dict) else v.to_dict()
        out[f"vs_{name}"] = d.get("verdict")
        for f in VERDICT_FIELDS + (["n_splits"] if not isinstance(v, dict) else []):
            out[f"vs_{name}_{f}"] = _num(d.get(f)) if f != "mae_verdict" else d.get(f)
    return out


def _score_row(score: dict[str, Any], *, experiment: str, run: str, kind: str, split: str) -> dict[str, Any]:
    avg = _num(score.get("avg_score"))
    row: dict[str, Any] = {
        "experiment": experiment,
        "run": run,
        "kind": kind,
        "split": split,
        "avg_score": avg,
        "leaderboard_score": _num(score.get("leaderboard_score", 100 * avg)),
    }
    for prefix, block in (("", "metrics"), ("norm_", "normalized"), ("base_", "baseline")):
        for m, v in (score.get(block) or {}).items():
            row[prefix + m] = _num(v)
    return row


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


#: the console table's columns (title), the key ones: everything else is in compare.csv. They fit
#: `CONSOLE_WIDTH` with baseline names, run ids and split labels as tahoe-ft writes them
_CONSOLE_COLUMNS = {
    "experiment": "exp",
    "run": "run",
    "split": "split",
    "avg_score": "avg",
    "mae": "MAE",
    "discrimination_score_l1": "PDS",
    "overlap_at_N": "DES",
    "val_change": "val Δ",
}
CONSOLE_WIDTH = 100


def _print_table(df: pd.DataFrame, runs_dir: Path, csv_path: Path | None = None) -> None:
    """The key columns of `df` in `CONSOLE_WIDTH` columns, the splits the rows were scored on, and where the
    rest is (compare.csv)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tahoe-ft runs in {runs_dir} (best first)")
    for c, title in _CONSOLE_COLUMNS.items():
        left = c in ("experiment", "run", "split")
        table.add_column(title, justify="left" if left else "right", no_wrap=True, overflow="ellipsis")
    for _, r in df.iterrows():
        cells = []
        for c in _CONSOLE_COLUMNS:
            v = r[c]
            if c == "run" and r["kind"] != "round":
                cells.append("(baseline)")
            elif c in _CHANGE_FORMATS:
                cells.append("-" if pd.isna(v) else _CHANGE_FORMATS[c].format(float(v)))
            else:
                cells.append(_fmt(v, 3))
        table.add_row(*cells, style=None if r["kind"] == "round" else "italic")
    # a fixed width, also when stdout is a pipe (rich would take 80) or a wide terminal
    console = Console(width=CONSOLE_WIDTH)
    console.print(table)
    splits = df.attrs.get("splits") or {}
    for label, text in splits.items():
        console.print(f"{label}: {text}", overflow="ellipsis", no_wrap=True, crop=True, highlight=False)
    if len(splits) > 1:
        console.print(
            f"{len(splits)} splits: compare a round with rounds and baselines of its own split only",
            highlight=False,
        )
    if (df["split"] == UNKNOWN_SPLIT).any():
        console.print(
            "split -: no predict.json and checkpoint manifest to say which split (such baselines are not pooled)",
            highlight=False,
        )
    # the path on a line of its own: it is as long as it is
    console.print(
        "every other column (x100, norm_*, base_*, best val loss, steps, wall time, ...) is in",
        highlight=False,
    )
    print(f"  {csv_path if csv_path is not None else 'compare.csv'}")


def _label(df: pd.DataFrame, i: int) -> str:
    exp = df.loc[i, "experiment"]
    if (df["experiment"] == exp).sum() == 1:
        return exp
    # a baseline of several splits is told apart by its split, a round by its run
    return f"{exp}/{df.loc[i, 'split' if df.loc[i, 'kind'] != 'round' else 'run']}"


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [i for i in range(len(df)) if df.loc[i, "kind"] == "round"]
    n = len(rounds) + 1
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()
    for j, i in enumerate(rounds):
        run_dir = df.attrs["run_dirs"][i]
        ax = flat[j]
        m = _read_metrics(_metrics_csv(Path(run_dir), df.loc[i, "experiment"]))
        ax.set_title(f"{_label(df, i)}  (avg {df.loc[i, 'avg_score']:.3f})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if m is None or "step" not in m.columns:
            ax.text(0.5, 0.5, "no metrics CSV", ha="center", va="center", transform=ax.transAxes)
            continue
        step = pd.to_numeric(m["step"], errors="coerce")
        handles = []
        top = ax
        losses = list(_LOSSES)
        if "train/main_loss" not in m.columns:
            losses[0] = ("train/loss", "train")
        for col, name in losses:
            if col in m.columns:
                y = pd.to_numeric(m[col], errors="coerce")
                ok = y.notna() & step.notna()
                if ok.any():
                    (h,) = ax.plot(
                        step[ok], y[ok], marker="o" if ok.sum() < 20 else None, ms=3, lw=1.2, label=name
                    )
                    handles.append(h)
        if "lr" in m.columns:
            lr = pd.to_numeric(m["lr"], errors="coerce")
            ok = lr.notna() & step.notna()
            if ok.any():
                ax2 = ax.twinx()
                (h,) = ax2.plot(step[ok], lr[ok], color="0.55", ls="--", lw=1, label="lr")
                ax2.set_ylabel("lr", color="0.4")
                ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
                handles.append(h)
                top = ax2
        if handles:  # on the topmost axis, so the LR line does not hide it
            top.legend(handles=handles, fontsize=7, loc="upper right")
    ax = flat[len(rounds)]
    bars = METRICS + ["avg_score"]
    x = np.arange(len(bars))
    width = 0.8 / max(1, len(df))
    for i in range(len(df)):
        vals = [df.loc[i, b] for b in bars]
        baseline = df.loc[i, "kind"] != "round"
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            vals,
            width,
            label=_label(df, i) + (" (baseline)" if baseline else ""),
            hatch="//" if baseline else None,
            alpha=0.6 if baseline else 1.0,
        )
    ax.set_xticks(x, [_SHORT[b] for b in bars])
    ax.set_title("metrics per round and baseline (MAE: lower is better)", fontsize=9)
    ax.legend(fontsize=6)
    for ax in flat[len(rounds) + 1 :]:
        ax.axis("off")
    _save_png(fig, path)


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def compare(runs_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Print all evaluated runs as a rich table (best first); write ``compare.csv`` and ``compare.png``."""
    runs_dir = Path(runs_dir)
    _check_runs_dir(runs_dir)
    df = collect(runs_dir)
    if df.empty:
        raise UserError(
            f"no evaluated runs under {runs_dir} (no <experiment>/<run>/eval/score.json); run tahoe-ft eval first"
        )
    out_dir = Path(out_dir) if out_dir is not None else runs_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _print_table(df, runs_dir, out_dir / "compare.csv")
    with atomic_path(out_dir / "compare.csv", suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    _plot(df, out_dir / "compare.png")
    log.info("wrote %s and %s", out_dir / "compare.csv", out_dir / "compare.png")
    return df


# -- over folds and seeds ------------------------------------------------------------------------------------

#: the numbers summarised over folds and seeds (mean and sd of each)
SUMMARY = [
    "avg_score",
    *METRICS,
    *(f"norm_{m}" for m in METRICS),
    *(f"{name}_change" for _, name in _VAL_METRICS),
]


def summarize(per_split: pd.DataFrame) -> pd.DataFrame:
    """Rounds and baselines over folds and seeds: one row per (kind, experiment), `n`, `<x>_mean`, `<x>_sd`.

    `per_split` is `collect`'s table of every split with `seed` and `fold` columns added. sd is the sample
    standard deviation over the n (fold, seed) splits (0 with one split). Sorted by mean avg_score.
    """
    cols = [c for c in SUMMARY if c in per_split.columns]
    rows = []
    for (kind, exp), g in per_split.groupby(["kind", "experiment"], sort=False):
        row: dict[str, Any] = {"experiment": exp, "kind": kind, "n": len(g)}
        if "regime" in g:  # the regime(s) of the splits pooled
            row["regime"] = ",".join(sorted({str(r) for r in g["regime"].fillna("") if str(r)}))
        for c in cols:
            v = pd.to_numeric(g[c], errors="coerce")
            row[f"{c}_mean"] = float(v.mean())
            row[f"{c}_sd"] = float(v.std(ddof=1)) if v.notna().sum() > 1 else 0.0
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["avg_score_mean", "experiment"], ascending=[False, True]).reset_index(drop=True)


def compare_splits(splits: list[tuple[dict[str, Any], Path]], out_dir: str | os.PathLike) -> pd.DataFrame:
    """`splits`: (the split's labels, e.g. {"seed": 0, "fold": 1}, runs_dir of its chain). Writes
    `compare_splits.csv` (every round and baseline of every split, with the labels as leading columns),
    `compare.csv` (mean and sd over splits; each round's verdict against each baseline over the splits,
    `evaluation.verdict.split_verdict`, in its ``vs_<baseline>`` columns) and `compare.png`; prints both."""
    out_dir = Path(out_dir)
    frames = []
    pairs: dict[tuple[str, str], list[tuple[pd.DataFrame, pd.DataFrame]]] = {}
    for labels, runs_dir in splits:
        df = collect(runs_dir)
        _paired_groups(df, pairs)
        for i, (key, value) in enumerate(labels.items()):
            df.insert(i, key, value)
        frames.append(df)
    per_split = pd.concat(frames, ignore_index=True)
    summary = summarize(per_split)
    verdicts = {key: split_verdict(p) for key, p in pairs.items()}
    summary = _with_verdicts(summary, verdicts)
    with atomic_path(out_dir / "compare_splits.csv", suffix=".csv") as tmp:
        per_split.to_csv(tmp, index=False)
    with atomic_path(out_dir / "compare.csv", suffix=".csv") as tmp:
        summary.to_csv(tmp, index=False)
    axes = " x ".join(reversed(list(splits[0][0]))) if splits else "fold x seed"
    regimes = sorted({str(r) for r in per_split.get("regime", pd.Series(dtype=str)).fillna("") if str(r)})
    axes += f", regime {', '.join(regimes)}" if regimes else ""
    _print_summary(summary, title=f"tahoe-ft over {len(splits)} split(s) ({axes}) in {out_dir}")
    _print_verdicts(verdicts)
    _plot_summary(summary, out_dir / "compare.png")
    return summary


def _paired_groups(
    df: pd.DataFrame, pairs: dict[tuple[str, str], list[tuple[pd.DataFrame, pd.DataFrame]]]
) -> None:
    """Add to `pairs` (round experiment, baseline) -> [(the round's groups, the baseline's groups), ...] the
    per-group tables (``eval/per_group.csv``) of the rounds of one split's `collect` table `df`."""
    for i, run_dir in enumerate(df.attrs.get("run_dirs") or []):
        if df.loc[i, "kind"] != "round":
            continue
        groups = read_per_group(Path(run_dir) / "eval" / PER_GROUP_CSV)
        if not groups or ROUND not in groups:
            continue
        for name, table in groups.items():
            if name != ROUND:
                pairs.setdefault((str(df.loc[i, "experiment"]), name), []).append((groups[ROUND], table))


def _with_verdicts(summary: pd.DataFrame, verdicts: dict[tuple[str, str], Verdict]) -> pd.DataFrame:
    """`summary` with each round's ``vs_<baseline>`` columns (`verdict_columns`) over the splits."""
    if not verdicts:
        return summary
    rows = []
    for _, r in summary.iterrows():
        mine = {
            b: v for (exp, b), v in verdicts.items() if r["kind"] == "round" and str(r["experiment"]) == exp
        }
        rows.append(verdict_columns(mine))
    extra = pd.DataFrame(rows, index=summary.index)
    return pd.concat([summary, extra[list(dict.fromkeys(c for row in rows for c in row))]], axis=1)


def _print_verdicts(verdicts: dict[tuple[str, str], Verdict]) -> None:
    """Each round against each baseline over the splits: the mean paired difference (round - baseline) of
    avg_score with its interval and verdict, and of MAE with its verdict, in `CONSOLE_WIDTH` columns."""
    from rich.console import Console
    from rich.table import Table

    if not verdicts:
        return
    short = {SAME: "indist."}
    table = Table(title="each round against each baseline over the splits (round - baseline)")
    for name in ("round", "baseline", "splits/groups", "avg Δ [95% CI]", "verdict", "MAE Δ", "MAE"):
        left = name in ("round", "baseline", "verdict", "MAE")
        table.add_column(name, justify="left" if left else "right", no_wrap=True, overflow="ellipsis")
    for (exp, base), v in sorted(verdicts.items()):
        ci = f"{v.diff:+.3f} [{v.ci_low:+.3f},{v.ci_high:+.3f}]" if math.isfinite(v.ci_low) else "-"
        mae = f"{v.mae_diff:+.4f}" if math.isfinite(v.mae_diff) else "-"
        verdict, mae_verdict = short.get(v.verdict, v.verdict), short.get(v.mae_verdict, v.mae_verdict)
        table.add_row(exp, base, f"{v.n_splits}/{v.n_groups}", ci, verdict, mae, mae_verdict)
    console = Console(width=CONSOLE_WIDTH)
    console.print(table)
    console.print(
        "per held-out group, splits resampled and then groups within each (hierarchical bootstrap); better/"
        f"worse: the interval excludes 0; indist.: it includes 0, or < {MIN_GROUPS} distinct groups. Δ is of "
        "the per-group avg_score, unclipped; the avg above clips each cell type's at 0, so the two can rank "
        "differently (each side's unclipped mean: vs_<baseline>_round_mean / _base_mean in compare.csv)",
        highlight=False,
    )


def _print_summary(summary: pd.DataFrame, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title + " - mean ± sd")
    for name in ("entry", "n", "avg", "MAE", "PDS", "DES", "val Δ", "unbiased Δ", "unb. mean Δ"):
        table.add_column(name, justify="left" if name == "entry" else "right", no_wrap=True)
    for _, r in summary.iterrows():
        label = r["experiment"] + (" (baseline)" if r["kind"] != "round" else "")
        cells = [f"{r[f'{c}_mean']:.3f} ± {r[f'{c}_sd']:.3f}" for c in ("avg_score", *METRICS)]
        for c, fmt in _CHANGE_FORMATS.items():  # rounds only; older summaries lack them
            m, sd = r.get(f"{c}_mean", math.nan), r.get(f"{c}_sd", math.nan)
            cells.append("-" if pd.isna(m) else f"{fmt.format(m)} ± {fmt.format(sd).lstrip('+')}")
        table.add_row(label, str(r["n"]), *cells, style=None if r["kind"] == "round" else "italic")
    Console(width=max(Console().width, 150)).print(table)


def _plot_summary(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["avg_score", *METRICS]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    labels = [r["experiment"] + ("*" if r["kind"] != "round" else "") for _, r in summary.iterrows()]
    x = np.arange(len(summary))
    for ax, name in zip(axes[0], names, strict=True):
        hatch = ["//" if k != "round" else "" for k in summary["kind"]]
        bars = ax.bar(x, summary[f"{name}_mean"], yerr=summary[f"{name}_sd"], capsize=3, color="0.6")
        for b, h, k in zip(bars, hatch, summary["kind"], strict=True):
            b.set_hatch(h)
            b.set_color("tab:blue" if k == "round" else "0.75")
            b.set_edgecolor("0.3")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{_SHORT[name]} (mean ± sd; * = baseline)", fontsize=9)
    _save_png(fig, path)
