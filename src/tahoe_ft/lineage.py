"""A run's ancestry, and the rule that no ancestor trained on what the run holds out.

Every checkpoint's data manifest records what its run trained on (`trained`: cell type -> perturbations with
training cells), the data it read (`data_fingerprint`, `fileio.data_fingerprint` of its files), its split
(`split_id`, a short hash of its held-out groups) and its `lineage`: one entry per ancestor, parent first, each
with the same four facts. A child inherits its parent's lineage with the parent prepended, so the whole chain
is in every checkpoint and a copied checkpoint keeps it.

Two rules follow (issue #31):
- `run:EXP/FILE` resolves to the newest run of EXP that read the same data with the same split, or read other
  data (a base model); a run of EXP on the same data with another split is never a silent parent.
- A run refuses any parent whose own training, or any ancestor's, saw one of the run's validation or test
  perturbations in the same cell type (`check_no_leak`). A checkpoint that does not record what it trained on
  (an upstream file, a tahoe-ft checkpoint older than this rule) cannot be checked; the run records that.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tahoe_ft.errors import UserError

log = logging.getLogger(__name__)


def split_id(held_out: Iterable[Mapping[str, str]] | None) -> str | None:
    """A short, stable id of a split: the hash of its sorted held-out (dataset, cell type, pert, split) groups."""
    if held_out is None:
        return None
    rows = sorted((e["dataset"], e["cell_type"], e["pert"], e["split"]) for e in held_out)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:10]


def trained_groups(groups: Iterable[Any]) -> dict[str, list[str]]:
    """`{cell type: sorted perturbations}` of training `GroupKey`s (dataset folded: the rule is per cell type)."""
    out: dict[str, set[str]] = {}
    for key in groups:
        out.setdefault(key.cell_type, set()).add(key.pert)
    return {ct: sorted(p) for ct, p in sorted(out.items())}


def entry_of(manifest: Mapping[str, Any] | None, *, checkpoint: str, run_info: Mapping[str, Any]) -> dict:
    """The lineage entry that describes a parent checkpoint (None-valued facts where it does not record them)."""
    m = manifest or {}
    return {
        "experiment": run_info.get("experiment") or m.get("experiment"),
        "run_id": run_info.get("run_id"),
        "checkpoint": checkpoint,
        "data_fingerprint": m.get("data_fingerprint"),
        "split_id": m.get("split_id") or split_id(m.get("held_out")),
        "trained": m.get("trained"),
    }


def lineage_of(manifest: Mapping[str, Any] | None, *, checkpoint: str, run_info: Mapping[str, Any]) -> list:
    """The child's lineage: the parent's entry, then the parent's own ancestors."""
    m = manifest or {}
    return [entry_of(m, checkpoint=checkpoint, run_info=run_info), *(m.get("lineage") or [])]


def _name(entry: Mapping[str, Any]) -> str:
    if entry.get("experiment") and entry.get("run_id"):
        return f"{entry['experiment']}/{entry['run_id']}"
    return str(entry.get("checkpoint"))


def check_no_leak(lineage: list[Mapping[str, Any]], held_out: Iterable[Mapping[str, str]]) -> list[str]:
    """Refuse (UserError) when an ancestor trained on one of `held_out`'s perturbations in the same cell type.

    Returns the names of ancestors that could not be checked (they record no training groups)."""
    held = [(e["cell_type"], e["pert"], e["split"]) for e in held_out]
    unchecked = []
    for depth, entry in enumerate(lineage):
        trained = entry.get("trained")
        if trained is None:
            unchecked.append(_name(entry))
            continue
        leaks = [(ct, p, s) for ct, p, s in held if p in set(trained.get(ct, ()))]
        leaks.sort(key=lambda leak: leak[2] != "test")  # name a test leak first: it inflates the score
        if leaks:
            ct, p, s = leaks[0]
            who = (
                "the parent"
                if depth == 0
                else f"ancestor {depth} (the parent's parent)"
                if depth == 1
                else (f"ancestor {depth}")
            )
            more = f" (+{len(leaks) - 1} more)" if len(leaks) > 1 else ""
            raise UserError(
                f"init_from leaks: {who} {_name(entry)} trained on '{p}' in cell type '{ct}', which this run "
                f"holds out as {s}{more}; start from a parent trained on the same split "
                f"(train its round with this split first) or from the base model (init_from=<checkpoint>)"
            )
    return unchecked


def pick_parent(
    candidates: list[Path], file: str, *, data_fingerprint: str, split: str | None, exp: str, runs_dir: Path
) -> Path:
    """The newest of `candidates` (run folders, oldest first) whose `file` read the same data with the same
    split, or read other data; a UserError naming what was passed over when none qualifies."""
    skipped: list[str] = []
    for run in reversed(candidates):
        m = read_manifest_json(run)
        fp = m.get("data_fingerprint")
        same_data = fp == data_fingerprint
        if fp is None:  # a run from before lineage: its data is unknown, so it is never a silent parent
            skipped.append(f"{run.name} (records no data fingerprint)")
            continue
        if same_data and (m.get("split_id") or split_id(m.get("held_out"))) != split:
            skipped.append(f"{run.name} (same data, another split)")
            continue
        if skipped:
            log.warning("run:%s resolves to %s, not the newer %s", exp, run, "; ".join(skipped))
        return run / file
    raise UserError(
        f"run:{exp}/{Path(file).name}: no run of '{exp}' under {runs_dir} trained on this data with this split "
        f"(passed over: {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}); train {exp} with this "
        f"split first, or give init_from=<checkpoint path> (checked for leaks either way)"
    )


def read_manifest_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}
