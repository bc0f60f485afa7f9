"""Mean ± sd over folds of the validation sweep (scripts/validation_sweep.sh): each configuration's val
cell-eval scores and best val/mean_loss, and the baseline panel on the same val perturbations."""

from __future__ import annotations

import glob
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd


def _ms(x: list[float]) -> str:
    return f"{np.mean(x):.3f} ± {np.std(x, ddof=1):.3f}" if len(x) > 1 else f"{x[0]:.3f}"


def main(out: Path) -> None:
    rows: dict[str, list[dict]] = defaultdict(list)
    for p in sorted(glob.glob(str(out / "f*" / "*" / "default" / "2*" / "eval" / "score.json"))):
        run = Path(p).parent.parent
        name = run.parent.parent.name
        s = json.loads(Path(p).read_text())
        csv = pd.read_csv(next(run.glob("*_metrics.csv"))).dropna(subset=["val/mean_loss"])
        rows[name].append({"score": s, "val_mean_loss": float(csv["val/mean_loss"].min())})
    print("| entry | folds | val avg_score | val MAE | val PDS | val DES | best val/mean_loss |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        m = [r["score"]["metrics"] for r in rs]
        print(
            f"| {name} | {len(rs)} | {_ms([r['score']['avg_score'] for r in rs])} | {_ms([x['mae'] for x in m])} "
            f"| {_ms([x['discrimination_score_l1'] for x in m])} | {_ms([x['overlap_at_N'] for x in m])} "
            f"| {np.mean([r['val_mean_loss'] for r in rs]):.4f} |"
        )
    first = max(rows.values(), key=len)  # the baselines of the folds the most configurations reached
    for b in first[0]["score"].get("baselines", {}):
        bs = [r["score"]["baselines"][b] for r in first]
        m = [x["metrics"] for x in bs]
        print(
            f"| *{b}* (baseline) | {len(bs)} | {_ms([x['avg_score'] for x in bs])} | {_ms([x['mae'] for x in m])} "
            f"| {_ms([x['discrimination_score_l1'] for x in m])} | {_ms([x['overlap_at_N'] for x in m])} | |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/validation-sweep"))
