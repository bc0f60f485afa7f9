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

`regime` (`config.Regime`) says what is dealt; a context is a cell type (of every dataset that has it):

- `unseen_perturbation` (the default, as above): the screen's perturbations, held out in every cell type.
- `few_shot_context`: the target context's perturbations that some other cell type also has, dealt as above
  and held out in the target only (`[fewshot]` of the target); they train in every other cell type, and the
  target's other perturbations train there. The fraction that trains in the target is what the deal leaves.
- `zero_shot_context`: the target is held out whole (`[zeroshot] = "test"` in every fold; its controls are
  still seen, as basal cells: controls are shared by all splits). Validation is a whole other context: the
  other cell types are dealt into K parts, fold i validates on part i (`[zeroshot] = "val"`) and trains on the
  rest, so K <= cell types - 1. With two cell types there is no context to spare: the other cell type's
  perturbations are dealt into K parts instead, fold i validates on part i (`[fewshot]` val there). `n_test`
  and `n_val` do not apply (the test is the target).
- `unseen_combination`: combinations (`A+B`: two or more non-control parts joined by `+`) whose every part has
  cells wherever the combination has, dealt as above and held out wherever they have cells; the singles always
  train. Other combinations (a part never measured beside it) train. `target_context` deals only the
  combinations that have cells there.

The target context (`target_context=null`): the cell type with the most perturbations that another cell type
also has; ties go to the one with more perturbations, then to the first name. A design that cannot hold (one
cell type for a context regime, no dealable combination) is refused in one line. `folds.json` records the
regime, the target and, for the context regimes, `measured_elsewhere`: the dealt names another cell type has.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tahoe_ft.config import DataConfig
from tahoe_ft.data.split_file import write_split_toml
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_write_text

SCREEN = "perturbations of the screen"  # what `_rotation` and `_nested` deal, in their messages


@dataclass(frozen=True)
class Fold:
    index: int
    test: list[str]
    val: list[str]
    toml: str
    regime: str = "unseen_perturbation"


def make_folds(
    data: DataConfig,
    k: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_val: int | None = None,
    n_test: int | None = 0,
    regime: str = "unseen_perturbation",
    target_context: str | None = None,
) -> list[Fold]:
    """Deal the screen's perturbations into `k` folds; write `out_dir/fold-<i>.toml` and `out_dir/folds.json`.

    `n_test=0`: each fold tests its own part and validates on `n_val` (default: half a fold, at least 1)
    perturbations of the next fold's part. `n_test>0`: the final test set (`n_test` perturbations, drawn
    first) is every fold's test; fold i validates on all of part i of the others (`n_val` must be None).
    `Fold.test`/`.val` name the perturbations over all cell types; each TOML section lists its own.
    `regime`/`target_context`: what is dealt (module docstring); `n_test=None`: one fold's share of the dealt
    names (names // (k + 1), at least 1).
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
    regime = str(getattr(regime, "value", regime))
    if regime != "unseen_perturbation" or target_context is not None:
        return _regime_folds(
            catalog, present, k, Path(out_dir), seed=seed, n_val=n_val, n_test=n_test, regime=regime,
            target=target_context,
        )  # fmt: skip
    if n_test is None:
        n_test = max(1, len(perts) // (k + 1))
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
        "regime": "unseen_perturbation",
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


REGIMES = ("unseen_perturbation", "few_shot_context", "zero_shot_context", "unseen_combination")


def combination_parts(name: str, control: str) -> list[str] | None:
    """The singles of a combination `A+B` (its non-control parts, two or more), None for anything else."""
    parts = [q.strip() for q in str(name).split("+")]
    parts = [q for q in parts if q and q != control]
    return parts if len(parts) >= 2 else None


def default_target(by_context: dict[str, set[str]]) -> str:
    """The cell type with the most perturbations that another cell type also has; ties: the most
    perturbations, then the first name."""

    def shared(ct: str) -> int:
        others = set().union(*(v for c, v in by_context.items() if c != ct))
        return len(by_context[ct] & others)

    return min(by_context, key=lambda ct: (-shared(ct), -len(by_context[ct]), ct))


def _deal(
    names: list[str],
    k: int,
    n_val: int | None,
    n_test: int | None,
    rng: np.random.Generator,
    what: str,
    spare: int,
) -> tuple[list[str], int | None, list[tuple[list[str], list[str]]]]:
    """(final test, n_val, (test, val) per fold) of `names`, as `make_folds` deals the screen's perturbations;
    `spare`: how many of them must train in each fold (0 where others train anyway)."""
    if n_test is None:
        n_test = max(1, len(names) // (k + 1))
    if n_test:
        final, deal = _nested(names, k, n_val, int(n_test), rng, what)
        return final, n_val, deal
    n, deal = _rotation(names, k, n_val, rng, what, spare)
    return [], n, deal


def _regime_folds(
    catalog: Any,
    present: dict[tuple[str, str], set[str]],
    k: int,
    out_dir: Path,
    *,
    seed: int,
    n_val: int | None,
    n_test: int | None,
    regime: str,
    target: str | None,
) -> list[Fold]:
    """`make_folds` for the regimes other than unseen_perturbation (module docstring)."""
    from tahoe_ft.data.checks import fmt_list

    if regime not in REGIMES:
        raise UserError(f"regime={regime}: choose one of {', '.join(REGIMES)}")
    if regime == "unseen_perturbation":
        raise UserError(
            f"target_context={target} goes with regime=few_shot_context, zero_shot_context or unseen_combination; "
            "unseen_perturbation holds perturbations out in every cell type: drop target_context"
        )
    by_ct: dict[str, set[str]] = {}
    for (_, ct), have in present.items():
        by_ct.setdefault(ct, set()).update(have)
    col = f"obs['{catalog.cell_type_col}'] of {fmt_list([Path(p).name for p in catalog.data_paths], 3)}"
    if regime != "unseen_combination" and len(by_ct) < 2:
        raise UserError(
            f"regime={regime} holds a context out against others, but {col} has one cell type "
            f"({fmt_list(sorted(by_ct))}); use regime=unseen_perturbation or data with two or more cell types"
        )
    if target is not None and target not in by_ct:
        raise UserError(
            f"target_context={target} has no perturbed cells in {col} (cell types: {fmt_list(sorted(by_ct))}); "
            "fix the name"
        )
    rng = np.random.default_rng(seed)
    context = target if target is not None or regime == "unseen_combination" else default_target(by_ct)
    final: list[str] = []
    sections = sorted(present)
    splits: list[tuple[list[str], list[str], dict, dict, dict]] = []  # test, val, zeroshot, fewshot, extra
    if regime == "few_shot_context":
        others = set().union(*(v for ct, v in by_ct.items() if ct != context))
        names = sorted(by_ct[context] & others)
        if not names:
            raise UserError(
                f"regime=few_shot_context: no perturbation of {context} has cells in another cell type of {col}, "
                "so none can train elsewhere while held out there; choose another target_context"
            )
        what = f"perturbations of {context} that another cell type has"
        # a fraction of the target's perturbations trains there: its own ones, or one of these
        spare = 0 if len(names) < len(by_ct[context]) else 1
        final, n_val, deal = _deal(names, k, n_val, n_test, rng, what, spare)
        for test, val in deal:
            fewshot = _tables(test, val, [key for key in sections if key[1] == context], present)
            splits.append((test, val, {}, fewshot, {}))
    elif regime == "zero_shot_context":
        if n_val is not None:
            raise UserError(
                f"n_val={n_val}: regime=zero_shot_context validates on a whole part (other cell types, or with "
                "two cell types the other's perturbations); leave n_val unset (null)"
            )
        names = sorted(by_ct[context])
        n_test = 0
        test_zs = {key: "test" for key in sections if key[1] == context}
        others = sorted(ct for ct in by_ct if ct != context)
        if len(others) >= 2:
            if k < 2 or k > len(others):
                raise UserError(
                    f"folds={k}: regime=zero_shot_context validates on whole cell types, so it needs 2 <= folds <= "
                    f"the {len(others)} cell types other than {context} ({fmt_list(others)}); use fewer folds"
                )
            for part in _parts(others, k, rng):
                zeroshot = {**test_zs, **{key: "val" for key in sections if key[1] in part}}
                val = sorted(set().union(*(by_ct[ct] for ct in part)))
                splits.append((names, val, zeroshot, {}, {"val_contexts": part}))
        else:
            other = others[0]
            pool = sorted(by_ct[other])
            if k < 2 or k > len(pool):
                raise UserError(
                    f"folds={k}: with two cell types, regime=zero_shot_context validates on parts of {other}'s "
                    f"{len(pool)} perturbations; use 2 <= folds <= {len(pool)}"
                )
            for part in _parts(pool, k, rng):
                fewshot = {key: {"val": [p for p in part if p in present[key]], "test": []} for key in sections
                           if key[1] == other}  # fmt: skip
                splits.append((names, part, test_zs, fewshot, {"val_contexts": []}))
    else:  # unseen_combination
        combos = {
            p: parts
            for p in sorted(set().union(*by_ct.values()))
            if (parts := combination_parts(p, catalog.control_pert))
        }
        if context is not None:
            combos = {p: parts for p, parts in combos.items() if p in by_ct[context]}
        where = f"{col}" if context is None else f"cell type {context} of {col}"
        if not combos:
            raise UserError(
                f"regime=unseen_combination: no combination ('A+B', parts joined by '+') among the perturbations "
                f"of {where}; use another regime or target_context"
            )
        names, lacking = [], []
        for p, parts in combos.items():
            miss = [
                (ct, q) for ct, have in sorted(by_ct.items()) if p in have for q in parts if q not in have
            ]
            (lacking if miss else names).append((p, miss))
        names = [p for p, _ in names]
        if not names:
            p, miss = lacking[0]
            raise UserError(
                f"regime=unseen_combination: none of the {len(combos)} combinations of {where} has all its singles "
                f"measured beside it ('{p}' in {miss[0][0]} lacks '{miss[0][1]}'), so none can be held out while "
                "its singles train; use another regime"
            )
        final, n_val, deal = _deal(names, k, n_val, n_test, rng, "combinations whose singles are measured", 0)
        for test, val in deal:
            splits.append((test, val, {}, _tables(test, val, sections, present), {}))
    files: dict[str, list[str]] = {}
    for path, ds in zip(catalog.data_paths, catalog.datasets, strict=True):
        files.setdefault(ds, []).append(str(Path(path).resolve()))
    folds, extras = [], []
    for i, (test, val, zeroshot, fewshot, extra) in enumerate(splits):
        toml = out_dir / f"fold-{i}.toml"
        header = (
            f"tahoe-ft fold {i} of {k}, regime {regime}"
            + (f", target context {context}" if context else "")
            + " (tahoe_ft.study.folds.make_folds); controls are shared by all splits"
        )
        write_split_toml(toml, files, zeroshot=zeroshot, fewshot=fewshot, header=header)
        folds.append(Fold(i, list(test), list(val), str(toml), regime))
        extras.append(extra)
    assignment = {
        "regime": regime,
        "target_context": context,
        "k": k,
        "seed": seed,
        "n_val": n_val,
        "n_test": int(n_test or 0),
        "final_test": final,
        "perturbations": names,
        "folds": [{**asdict(f), **extra} for f, extra in zip(folds, extras, strict=True)],
    }
    if regime != "unseen_combination":
        # the held-out names that a context outside the target also measures (context transfer can predict
        # these; zero_shot_context tests the others too, as the target holds them)
        assignment["measured_elsewhere"] = sorted(
            p for p in names if any(p in have for ct, have in by_ct.items() if ct != context)
        )
    atomic_write_text(out_dir / "folds.json", json.dumps(assignment, indent=2) + "\n")
    return folds


def _parts(names: list[str], k: int, rng: np.random.Generator) -> list[list[str]]:
    """`names` in a seeded order, cut into `k` nearly equal parts (each sorted)."""
    order = rng.permutation(len(names))
    return [sorted(names[i] for i in chunk) for chunk in np.array_split(order, k)]


def _rotation(
    perts: list[str], k: int, n_val: int | None, rng: np.random.Generator, what: str = SCREEN, spare: int = 1
) -> tuple[int, list[tuple[list[str], list[str]]]]:
    """(n_val, (test, val) per fold): fold i tests part i and validates on `n_val` of part i+1; at least `spare`
    of `perts` train in each fold."""
    if k < 2 or k > len(perts):
        raise UserError(f"folds={k}: need 2 <= folds <= the {len(perts)} {what}")
    parts = _parts(perts, k, rng)
    n = max(1, min(len(parts[-1]), len(perts) // k // 2)) if n_val is None else int(n_val)
    deal = [(test, parts[(i + 1) % k][:n]) for i, test in enumerate(parts)]
    for i, (test, val) in enumerate(deal):
        if not val:
            raise UserError(
                f"n_val={n}: every fold needs a validation perturbation; use n_val >= 1 (or null)"
            )
        if len(perts) - len(test) - len(val) < spare:
            raise UserError(
                f"folds={k} with n_val={n} leaves fold {i} no training perturbation ({len(perts)} "
                f"{'in the screen' if what == SCREEN else what}, "
                f"{len(test)} tested and {len(val)} validated there); use a smaller n_val or fewer folds"
            )
    return n, deal


def _nested(
    perts: list[str],
    k: int,
    n_val: int | None,
    n_test: int,
    rng: np.random.Generator,
    what: str = SCREEN,
) -> tuple[list[str], list[tuple[list[str], list[str]]]]:
    """(final test, (test, val) per fold): the final test drawn first, the rest dealt into `k` parts."""
    if n_val is not None:
        raise UserError(
            f"n_val={n_val}: with a final test set every fold validates on a whole part; leave n_val unset (null)"
        )
    if n_test < 0 or n_test >= len(perts):
        raise UserError(f"n_test={n_test}: give 0 <= n_test < the {len(perts)} {what}")
    final = sorted(perts[i] for i in rng.choice(len(perts), size=n_test, replace=False))
    rest = [p for p in perts if p not in set(final)]
    if k < 2 or k > len(rest):
        raise UserError(
            f"folds={k} with n_test={n_test}: need 2 <= folds <= the {len(rest)} "
            f"{'perturbations' if what == SCREEN else what} left after the "
            f"final test set (of {len(perts)}), so that every fold validates and trains on some; use fewer folds "
            "or a smaller n_test"
        )
    return final, [(list(final), part) for part in _parts(rest, k, rng)]


def _tables(test: list[str], val: list[str], sections, present) -> dict:
    """The [fewshot] tables of `sections` ((dataset, cell type) keys): each lists the held-out perturbations its
    dataset's cell type has (`present[key]`)."""
    return {
        key: {"val": [p for p in val if p in present[key]], "test": [p for p in test if p in present[key]]}
        for key in sections
    }
