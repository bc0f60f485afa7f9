"""Cross-validation folds over perturbations: each perturbation is held out (as test) exactly once.

One split cannot tell a recipe from luck: with 6 held-out knock-outs, PDS moves in steps of 1/36. `make_folds`
deals the screen's perturbations into K folds (a seeded permutation of their sorted names, cut into K nearly
equal parts); fold k tests its own part and validates on `n_val` perturbations of the next fold's part, and
trains on the rest. Every fold is written as a cell-load split TOML (held out in every cell type of every
dataset, `[fewshot."<dataset>.<cell type>"]`) and the whole assignment as `folds.json`, so a fold can be re-run
by hand: `tahoe-ft train +experiment=0905 data.split_toml=<runs>/folds/fold-0.toml`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tahoe_ft.config import DataConfig
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text


@dataclass(frozen=True)
class Fold:
    index: int
    test: list[str]
    val: list[str]
    toml: str


def make_folds(
    data: DataConfig, k: int, out_dir: str | Path, *, seed: int = 0, n_val: int | None = None
) -> list[Fold]:
    """Deal the screen's perturbations into `k` folds; write `out_dir/fold-<i>.toml` and `out_dir/folds.json`.

    `n_val` (default: half a fold, at least 1) validation perturbations per fold come from the next fold's
    test part, so they are never the fold's own test perturbations and training keeps the rest.
    """
    from tahoe_ft.data import CellCatalog
    from tahoe_ft.datasets import ensure_files

    ensure_files(data)  # the embedded data sets are made where they are opened
    catalog = CellCatalog.open(data, embed_key=None)
    keys = [key for split in ("train", "val", "test") for key in catalog.groups(split)]
    perts = sorted({key.pert for key in keys})
    if k < 2 or k > len(perts):
        raise UserError(f"folds={k}: need 2 <= folds <= the {len(perts)} perturbations of the screen")
    order = np.random.default_rng(seed).permutation(len(perts))
    parts = [sorted(perts[i] for i in chunk) for chunk in np.array_split(order, k)]
    n_val = max(1, min(len(parts[-1]), len(perts) // k // 2)) if n_val is None else int(n_val)
    sections = sorted({(key.dataset, key.cell_type) for key in keys})
    files = {
        ds: [p for p, d in zip(catalog.data_paths, catalog.datasets, strict=True) if d == ds]
        for ds, _ in sections
    }
    out_dir = Path(out_dir)
    folds = []
    for i, test in enumerate(parts):
        val = parts[(i + 1) % k][:n_val]
        toml = out_dir / f"fold-{i}.toml"
        atomic_write_text(toml, _toml(i, k, files, sections, val, test))
        folds.append(Fold(i, test, val, str(toml)))
    assignment = {
        "k": k,
        "seed": seed,
        "n_val": n_val,
        "perturbations": perts,
        "folds": [asdict(f) for f in folds],
    }
    atomic_write_text(out_dir / "folds.json", json.dumps(assignment, indent=2) + "\n")
    return folds


def _toml(i: int, k: int, files: dict, sections: list, val: list[str], test: list[str]) -> str:
    q = json.dumps
    lines = [
        f"# tahoe-ft fold {i} of {k} (tahoe_ft.study.folds.make_folds); controls are shared by all splits",
        "[datasets]",
    ]
    lines += [f"{ds} = [{', '.join(q(str(Path(f).resolve())) for f in fs)}]" for ds, fs in files.items()]
    lines += ["", "[training]", *[f'{ds} = "train"' for ds in files], ""]
    for ds, ct in sections:
        lines += [
            f"[fewshot.{q(f'{ds}.{ct}')}]",
            f"val = [{', '.join(map(q, val))}]",
            f"test = [{', '.join(map(q, test))}]",
            "",
        ]
    return "\n".join(lines)
