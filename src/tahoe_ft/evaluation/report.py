"""A `Score` as a short table for a person: the round beside every baseline of its panel and the ceiling.

                   avg_score  mae     discrimination_score_l1  overlap_at_N  vs round
    round (0906)       0.4123     0.0812  0.7310                   0.2101
    linear             0.3710     0.0850  0.7012                   0.1900        indist. [-0.093,+0.012]
    control            0.0000     0.1301  0.5000                   0.0520        worse [-0.480,-0.301]
    ...
    ceiling            ...                                                       -
    score.json: runs/0906/<ts>/eval/score.json

Rows: the round first, then the baselines by avg_score (best first), the ceiling last. Columns: avg_score
and the raw metrics of the round's profile (the vcc profile's three; `full` would be wide, so at most
`MAX_METRICS`), and `vs round`: the baseline against the round, held-out group by group (the verdict and
the 95 % interval of the avg_score difference, baseline minus round; `evaluation.verdict`). The JSON stays in
score.json.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from tahoe_ft.evaluation.diagnostics import design_lines
from tahoe_ft.evaluation.score import Score
from tahoe_ft.evaluation.verdict import MIN_GROUPS, short_text

MAX_METRICS = 3
WIDTH = 100  # the notes under the table
#: what the `vs round` column says (score.json: each baseline's `verdict`, from the round's side)
VS_ROUND_NOTE = [
    "vs round: the row's avg_score minus the round's, held-out group by group, 95% bootstrap interval:",
    f"  better/worse where it excludes 0; indist. where it includes 0 or there are < {MIN_GROUPS} groups",
]
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
    v26 = score.vcc2026
    rows: list[list[str]] = [
        [label, _cell(score.avg_score), *(_cell(score.metrics.get(m)) for m in metrics), ""]
    ]
    if v26 is not None:
        rows[0].insert(2, _cell((v26.get("round") or {}).get("avg_score")))
    panel = dict(score.baselines or {})
    ceiling = panel.pop("ceiling", None)
    for name, entry in sorted(panel.items(), key=lambda kv: -_sort_key(kv[1])):
        rows.append(_row(name, entry, metrics, v26 is not None))
    if ceiling is not None:
        rows.append(_row("ceiling", ceiling, metrics, v26 is not None))
    header = ["", "avg_score", *(["vcc2026"] if v26 is not None else []), *metrics, "vs round"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    if score.baselines is None:
        lines.append(
            "(no baseline panel: no training cells for this prediction (train=<h5ad>), or baselines=false)"
        )
    # what the design can measure (shuffle, collapse, flags, absent baselines) and the vcc2026 notes, wrapped to
    # WIDTH columns (the table itself is as wide as its columns)
    for note in [*design_lines(score), *vcc2026_lines(score)]:
        lines += textwrap.wrap(note, WIDTH, subsequent_indent="  ", break_on_hyphens=False) or [""]
    if any((b or {}).get("verdict") for b in panel.values()):
        lines += VS_ROUND_NOTE
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


def _row(name: str, entry: dict[str, Any], metrics: list[str], v26: bool = False) -> list[str]:
    block = entry.get("metrics") or {}
    vs = short_text(entry.get("verdict"), flip=True) if entry.get("verdict") else "-"
    extra = [_cell((entry.get("vcc2026") or {}).get("avg_score"))] if v26 else []
    return [name, _cell(entry.get("avg_score")), *extra, *(_cell(block.get(m)) for m in metrics), vs]


def vcc2026_lines(score: Score) -> list[str]:
    """Under the table: what the VCC 2026 scorer's column is, the generator null and the amplitude audit."""
    v26 = score.vcc2026
    if v26 is None:
        return []
    diag = score.diagnostics or {}
    lines = [
        f"vcc2026: cell-eval2 {v26.get('version')} preset vcc2026 on integer counts (0 = mean-response baseline, "
        f"1 = replicate of the measurement); real counts: {v26.get('real_counts')}; files: eval/{v26.get('dir')}/"
    ]
    null = diag.get("vcc2026_null")
    if null:
        calls = (null.get("de_calls") or {}).get("pred") or {}
        real = (null.get("de_calls") or {}).get("real") or {}
        lines.append(
            f"generator null (real controls emitted as every perturbation): vcc2026 {_cell(null.get('avg_score'))}, "
            f"{_cell(calls.get('per_pert'))} DE calls per perturbation (real: {_cell(real.get('per_pert'))})"
        )
    audit = diag.get("amplitude_audit")
    if audit:
        scales = audit.get("scales") or {}
        text = ", ".join(
            f"x{k} {_cell((v or {}).get('avg_score'))}"
            + (
                f" (reached x{float(v['achieved']):.2f})"
                if k != "1" and (v or {}).get("achieved") is not None
                else ""
            )
            for k, v in scales.items()
        )
        lines.append(
            f"amplitude audit (effect scaled, vcc2026): {text}"
            + (" -- FLAG: doubling the effect raises the score" if audit.get("flag") else "")
        )
    return lines
