"""A `Score` as a short table for a person: the round beside every baseline of its panel and the ceiling.

    round / baseline      avg_score  mae      discrimination_score_l1  overlap_at_N
    round (0906)          0.4123     0.0812   0.7310                   0.2101
    pert_mean             ...
    ...
    ceiling               ...
    score.json: runs/0906/<ts>/eval/score.json

Rows: the round first, then the baselines by avg_score (best first), the ceiling last. Columns: avg_score
and the raw metrics of the round's profile (the vcc profile's three; `full` would be wide, so at most
`MAX_METRICS`). The JSON stays in score.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tahoe_ft.evaluation.score import Score

MAX_METRICS = 3
_VCC = ("mae", "discrimination_score_l1", "overlap_at_N")


def _cell(x: Any) -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "-"
    return f"{f:.4f}" if math.isfinite(f) else "-"


def _metric_names(score: Score) -> list[str]:
    names = [m for m in _VCC if m in score.metrics]
    names += [m for m in score.metrics if m not in names]
    return names[:MAX_METRICS]


def score_table(score: Score, score_json: str | Path | None = None, *, label: str = "round") -> str:
    """The table's text (no trailing newline); `score_json`: the path printed under it."""
    metrics = _metric_names(score)
    rows: list[list[str]] = [[label, _cell(score.avg_score), *(_cell(score.metrics.get(m)) for m in metrics)]]
    panel = dict(score.baselines or {})
    ceiling = panel.pop("ceiling", None)
    for name, entry in sorted(panel.items(), key=lambda kv: -_sort_key(kv[1])):
        rows.append(_row(name, entry, metrics))
    if ceiling is not None:
        rows.append(_row("ceiling", ceiling, metrics))
    header = ["", "avg_score", *metrics]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    if score.baselines is None:
        lines.append(
            "(no baseline panel: no training cells for this prediction (train=<h5ad>), or baselines=false)"
        )
    if score_json is not None:
        lines.append(f"score.json: {score_json}")
    return "\n".join(lines)


def _sort_key(entry: dict[str, Any]) -> float:
    v = entry.get("avg_score")
    try:
        f = float(v)
    except (TypeError, ValueError):
        return -math.inf
    return f if math.isfinite(f) else -math.inf


def _row(name: str, entry: dict[str, Any], metrics: list[str]) -> list[str]:
    block = entry.get("metrics") or {}
    return [name, _cell(entry.get("avg_score")), *(_cell(block.get(m)) for m in metrics)]
