"""What a study is pinned to, so that continuing it means continuing the same search: the data (the bytes of
its files and the keys that define the task), the base model (the bytes of the first round's parent) and the
search space (rounds, fixed overrides, parameter ranges: `SweepPlan.recipe`). `run_sweep` records all three in
the study's user attrs when it creates the study and refuses, in one line naming which, to continue it with
any of them changed (before anything is written: the folds of the study stay as they were).

A file's digest is `fileio.file_fingerprint` (as run lineage records it): sha256 of its size and of 1 MiB at
its start, middle and end, the whole file when under 3 MiB (the demo files are hashed in full; a screen of many
GB costs milliseconds; an edit that keeps the size and misses the three probes goes unseen). A folder's digest
(an upstream run folder given as `pretrained=`) is the sha256 of its files' relative paths and digests. The
modification time is not used: a copy of the same bytes is the same data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tahoe_ft.config import DataConfig
from tahoe_ft.fileio import file_fingerprint

# data keys that define the task a trial is scored on (the rest: batch size, workers, memory, caches, and the
# file paths themselves, which enter through their digests)
_DATA_KEYS = (
    "pert_col", "control_pert", "cell_type_col", "batch_col", "input_transform", "pert_features",
    "pert_feature_dim", "allow_missing_pert_features", "val_perts", "test_perts", "val_cell_types",
    "test_cell_types", "basal_mapping", "yield_controls", "val_sets_per_group", "recentre_basal",
)  # fmt: skip
_FILE_KEYS = ("pert_features", "gene_list", "split_toml")


def file_digest(path: str | Path) -> str:
    """The digest of a file or folder (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\n".encode())
        return "dir-sha256:" + h.hexdigest()
    return file_fingerprint(p)


def _scalar(v: Any) -> Any:
    return v.value if hasattr(v, "value") else v


def data_pin(data: DataConfig, data_paths: list[str]) -> dict[str, Any]:
    """The data's pin: each screen file's digest (in order, by file name) and the task-defining keys (a key
    naming an existing file, e.g. `split_toml`, by that file's digest)."""
    files = [{"name": Path(p).name, "digest": file_digest(p)} for p in data_paths]
    keys: dict[str, Any] = {k: _scalar(getattr(data, k)) for k in _DATA_KEYS}
    for k in _FILE_KEYS:
        v = getattr(data, k)
        if isinstance(v, str) and v and Path(v).expanduser().is_file():
            keys[k] = "file " + file_digest(Path(v).expanduser())
        elif k not in keys:
            keys[k] = v
    return json.loads(json.dumps({"files": files, "keys": keys}, default=str, sort_keys=True))


def base_pin(parents: dict[str, str | None]) -> dict[str, Any]:
    """The base model's pin: per round that starts outside the chain, its parent's resolved path and digest
    (`{"pretrained": null}` when the chain starts from scratch)."""
    out: dict[str, Any] = {}
    for exp, path in parents.items():
        out[exp] = None if path is None else {"path": str(path), "digest": file_digest(path)}
    return out


def data_change(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """What differs between two data pins, in words (None: the same data)."""
    hf, wf = have.get("files", []), want.get("files", [])
    if [f["digest"] for f in hf] != [f["digest"] for f in wf]:
        names = ", ".join(f["name"] for f in wf) or "none"
        if len(hf) == len(wf):
            moved = [w["name"] for h, w in zip(hf, wf, strict=True) if h["digest"] != w["digest"]]
            names = ", ".join(moved)
        return f"the data file(s) {names} (their bytes differ from the study's)"
    hk, wk = have.get("keys", {}), want.get("keys", {})
    for k in sorted(set(hk) | set(wk)):
        if hk.get(k) != wk.get(k):
            return f"data.{k} (was {hk.get(k)!r}, now {wk.get(k)!r})"
    return None


def base_change(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """What differs between two base-model pins, in words (None: the same base)."""
    for exp in sorted(set(have) | set(want)):
        h, w = have.get(exp), want.get(exp)
        if (h or {}).get("digest") != (w or {}).get("digest"):
            was = "none (from scratch)" if h is None else h["path"]
            now = "none (from scratch)" if w is None else w["path"]
            return f"the base model of round {exp} (was {was}, now {now}; pretrained=...)"
    return None
