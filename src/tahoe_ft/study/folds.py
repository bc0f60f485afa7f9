"""Cross-validation folds over perturbations, written as cell-load split TOMLs.

One split cannot tell a recipe from luck: with 6 held-out knock-outs, PDS moves in steps of 1/36. `make_folds`
deals the screen's perturbations (a seeded permutation of their sorted names, cut into K nearly equal parts)
in one of two ways:

- rotation (`n_test=0`, `reproduce folds=K`): fold k tests its own part, validates on `n_val` perturbations of
  the next fold's part and trains on the rest, so every perturbation is tested exactly once;
- nested (`n_test>0`, the sweep): `n_test` perturbations are drawn first, with the seed, as the final test set;
  they are test in every fold and never validation. The others are dealt into K parts; fold k validates on
  its part and trains on the rest, so the search never sees the final test set.

Each fold is a split TOML with one `[fewshot."<dataset>.<cell type>"]` table per (dataset, cell type), listing
only the perturbations that have cells there (a cell type of a multi-line screen lacks most of the others);
the whole assignment goes to `folds.json`, so a fold can be re-run by hand:
`tahoe-ft train +experiment=0905 data.split_toml=<runs>/folds/fold-0.toml`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tahoe_ft.config import DataConfig
from tahoe_ft.data.split_file import write_split_toml
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text


@dataclass(frozen=True)
class Fold:
    index: int
    test: list[str]
    val: list[str]
    toml: str


def make_folds(
    data: DataConfig,
    k: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int = 0,
) -> list[Fold]:
    """Deal the screen's perturbations into `k` folds; write `out_dir/fold-<i>.toml` and `out_dir/folds.json`.

    `n_test=0`: each fold tests its own part and validates on `n_val` (default: half a fold, at least 1)
    perturbations of the next fold's part. `n_test>0`: the final test set (`n_test` perturbations, drawn
    first) is every fold's test; fold i validates on all of part i of the others (`n_val` must be None).
    `Fold.test`/`.val` name the perturbations over all cell types; each TOML section lists its own.
    """
    from tahoe_ft.data import CellCatalog
    from tahoe_ft.datasets import ensure_files

    ensure_files(data)  # the embedded data sets are made where they are opened
    catalog = CellCatalog.open(data, embed_key=None)
    keys = [key for split in ("train", "val", "test") for key in catalog.groups(split)]
    perts = sorted({key.pert for key in keys})
    present: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        present.setdefault((key.dataset, key.cell_type), set()).add(key.pert)
    rng = np.random.default_rng(seed)
    if n_test:
        final, deal = _nested(perts, k, n_val, int(n_test), rng)
    else:
        final = []
        n_val, deal = _rotation(perts, k, n_val, rng)
    files: dict[str, list[str]] = {}
    for path, ds in zip(catalog.data_paths, catalog.datasets, strict=True):
        files.setdefault(ds, []).append(str(Path(path).resolve()))
    out_dir = Path(out_dir)
    folds = []
    for i, (test, val) in enumerate(deal):
        toml = out_dir / f"fold-{i}.toml"
        fewshot = {
            section: {"val": [p for p in val if p in have], "test": [p for p in test if p in have]}
            for section, have in sorted(present.items())
        }
        header = (
            f"tahoe-ft fold {i} of {k} (tahoe_ft.study.folds.make_folds); controls are shared by all splits\n"
            "each [fewshot] table lists the held-out perturbations that have cells in its dataset's cell type"
        )
        write_split_toml(toml, files, fewshot=fewshot, header=header)
        folds.append(Fold(i, test, val, str(toml)))
    assignment = {
        "k": k,
        "seed": seed,
        "n_val": n_val,
        "n_test": int(n_test),
        "final_test": final,
        "perturbations": perts,
        "folds": [asdict(f) for f in folds],
    }
    atomic_write_text(out_dir / "folds.json", json.dumps(assignment, indent=2) + "\n")
    return folds


def _parts(names: list[str], k: int, rng: np.random.Generator) -> list[list[str]]:
    """`names` in a seeded order, cut into `k` nearly equal parts (each sorted)."""
    order = rng.permutation(len(names))
    return [sorted(names[i] for i in chunk) for chunk in np.array_split(order, k)]


def _rotation(
    perts: list[str], k: int, n_val: int | None, rng: np.random.Generator
) -> tuple[int, list[tuple[list[str], list[str]]]]:
    """(n_val, (test, val) per fold): fold i tests part i and validates on `n_val` of part i+1."""
    if k < 2 or k > len(perts):
        raise UserError(f"folds={k}: need 2 <= folds <= the {len(perts)} perturbations of the screen")
    parts = _parts(perts, k, rng)
    n = max(1, min(len(parts[-1]), len(perts) // k // 2)) if n_val is None else int(n_val)
    deal = [(test, parts[(i + 1) % k][:n]) for i, test in enumerate(parts)]
    for i, (test, val) in enumerate(deal):
        if not val:
            raise UserError(
                f"n_val={n}: every fold needs a validation perturbation; use n_val >= 1 (or null)"
            )
        if len(perts) - len(test) - len(val) < 1:
            raise UserError(
                f"folds={k} with n_val={n} leaves fold {i} no training perturbation ({len(perts)} in the "
                f"screen, {len(test)} tested and {len(val)} validated there); use a smaller n_val or fewer folds"
            )
    return n, deal


def _nested(
    perts: list[str], k: int, n_val: int | None, n_test: int, rng: np.random.Generator
) -> tuple[list[str], list[tuple[list[str], list[str]]]]:
    """(final test, (test, val) per fold): the final test drawn first, the rest dealt into `k` parts."""
    if n_val is not None:
        raise UserError(
            f"n_val={n_val}: with a final test set every fold validates on a whole part; leave n_val unset (null)"
        )
    if n_test < 0 or n_test >= len(perts):
        raise UserError(f"n_test={n_test}: give 0 <= n_test < the {len(perts)} perturbations of the screen")
    final = sorted(perts[i] for i in rng.choice(len(perts), size=n_test, replace=False))
    rest = [p for p in perts if p not in set(final)]
    if k < 2 or k > len(rest):
        raise UserError(
            f"folds={k} with n_test={n_test}: need 2 <= folds <= the {len(rest)} perturbations left after the "
            f"final test set (of {len(perts)}), so that every fold validates and trains on some; use fewer folds "
            "or a smaller n_test"
        )
    return final, [(list(final), part) for part in _parts(rest, k, rng)]
