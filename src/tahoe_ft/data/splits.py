"""Which split each cell is in: TRAIN, VAL or TEST (one bit each; a manifest's groups are read as saved).

Three sources, one per function: the config lists (`val_perts`/`test_perts` few-shot in every cell type,
`val_cell_types`/`test_cell_types` zero-shot), a cell-load style split TOML (per dataset and cell type), and
the held-out groups recorded in a checkpoint's manifest. Every function leaves the control cells' bits to
the caller (`CellCatalog`): controls are shared by all splits.

Within a cell type the splits never share a perturbation: the config lists and split TOMLs that would put one
in validation and test, or hold it out in one dataset while it trains in another file of the same cell type,
are refused in one line (`_refuse_shared_groups`). A manifest's held-out groups are read as they were saved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tahoe_ft.data.checks import fmt_list
from tahoe_ft.data.split_file import SplitToml
from tahoe_ft.errors import UserError

if TYPE_CHECKING:
    from tahoe_ft.data.catalog import CellCatalog

TRAIN, VAL, TEST = 1, 2, 4
SPLIT_BITS = {"train": TRAIN, "val": VAL, "test": TEST}


def split_bit(split: str) -> int:
    """The bit of a split name ("train", "val", "test")."""
    if split not in SPLIT_BITS:
        raise ValueError(f"split must be one of {list(SPLIT_BITS)}")
    return SPLIT_BITS[split]


def _add_perts(
    cat: CellCatalog, split: str, names: Sequence[str], lut: np.ndarray, where: str, known: set[int]
) -> None:
    """Set `split`'s bit in `lut` (per pert code) for the listed perturbations, which must have cells; `where`
    names the list (`data.val_perts`, `split TOML [fewshot."ds.ct"] test`)."""
    p_index = {p: i for i, p in enumerate(cat.pert_names)}
    for p in names:
        if p == cat.control_pert:
            raise UserError(f"{where} lists the control '{p}'; controls are shared, remove it")
        code = p_index.get(p, -1)
        if code not in known:
            raise UserError(
                f"{where} lists '{p}', which has no cells in obs['{cat.pert_col}'] "
                f"({fmt_list(cat.data_paths, 3)}); fix the name or remove it"
            )
        lut[code] |= SPLIT_BITS[split]


def config_split_bits(
    cat: CellCatalog,
    *,
    val_perts: Sequence[str] = (),
    test_perts: Sequence[str] = (),
    val_cell_types: Sequence[str] = (),
    test_cell_types: Sequence[str] = (),
) -> np.ndarray:
    """Listed perturbations leave training in every cell type; listed cell types leave it whole. A name in both
    the val and the test list is refused."""
    for keys, where, val, test in (
        (("data.val_perts", "data.test_perts"), "in every cell type", val_perts, test_perts),
        (("data.val_cell_types", "data.test_cell_types"), "whole", val_cell_types, test_cell_types),
    ):
        both = [x for x in val if x in set(test)]
        if both:
            raise UserError(
                f"'{both[0]}' is in both {keys[0]} and {keys[1]} (held out {where}): validation would choose "
                "the checkpoint on a test group; remove it from one of the two lists"
            )
    n_ct, n_p = len(cat.cell_types), len(cat.pert_names)
    ct_index = {t: i for i, t in enumerate(cat.cell_types)}
    bits = np.full(cat.n_cells, TRAIN, dtype=np.int8)
    lut = np.zeros(n_p, dtype=np.int8)
    for split, names in (("val", val_perts), ("test", test_perts)):
        _add_perts(cat, split, list(names), lut, f"data.{split}_perts", set(range(n_p)))
    fb = lut[cat.pert_of]
    bits = np.where(fb > 0, fb, bits)
    zero = np.zeros(n_ct, dtype=np.int8)
    for split, cell_types in (("val", val_cell_types), ("test", test_cell_types)):
        for ct in cell_types:
            if ct not in ct_index:
                raise UserError(
                    f"data.{split}_cell_types lists '{ct}', which has no cells in "
                    f"obs['{cat.cell_type_col}'] (cell types: {fmt_list(cat.cell_types)}); fix the name"
                )
            zero[ct_index[ct]] |= SPLIT_BITS[split]
    zb = zero[cat.cell_type_of]
    return np.where(zb > 0, zb, bits)


def toml_split_bits(cat: CellCatalog, toml: SplitToml) -> np.ndarray:
    """`[fewshot."ds.CT"]` holds perturbations out in that dataset's cell type only; `[zeroshot]` a whole one."""
    n_ct, n_p = len(cat.cell_types), len(cat.pert_names)
    ct_index = {t: i for i, t in enumerate(cat.cell_types)}
    pert_of = cat.pert_of
    pair = cat.file_of.astype(np.int64) * n_ct + cat.cell_type_of  # (file, cell type) of each cell
    present = set(np.unique(pair).tolist())
    bits = np.full(cat.n_cells, TRAIN, dtype=np.int8)
    files_of_ds: dict[str, list[int]] = {}
    for f, ds in enumerate(cat.datasets):
        files_of_ds.setdefault(ds, []).append(f)

    def pairs_of(section: str, ds: str, ct: str) -> list[int]:
        if ds not in files_of_ds:  # e.g. data.path's file, named by its stem, against the TOML's own name
            names = ", ".join(f"'{d}'" for d in files_of_ds)
            raise UserError(
                f"split TOML {section} '{ds}.{ct}': no data file is named '{ds}' (the files read are named "
                f"{names}: by the TOML's [datasets] entry that lists the file, else by the file's stem); use "
                "that name in the TOML, or leave data.path unset (data.path=null) to read the TOML's [datasets]"
            )
        t = ct_index.get(ct, -1)
        out = [f * n_ct + t for f in files_of_ds.get(ds, []) if t >= 0 and f * n_ct + t in present]
        if not out:
            raise UserError(
                f"split TOML {section} '{ds}.{ct}': no cells of cell type '{ct}' in dataset '{ds}' "
                f"(files: {fmt_list(cat.data_paths, 3)}); fix the cell type or dataset name"
            )
        return out

    for (ds, ct), table in toml.fewshot.items():
        in_pairs = np.flatnonzero(np.isin(pair, pairs_of("[fewshot]", ds, ct)))
        known = set(np.unique(pert_of[in_pairs]).tolist())
        lut = np.zeros(n_p, dtype=np.int8)
        for split in ("val", "test"):
            _add_perts(cat, split, table[split], lut, f'split TOML [fewshot."{ds}.{ct}"] {split}', known)
        fb = lut[pert_of[in_pairs]]
        bits[in_pairs] = np.where(fb > 0, fb, bits[in_pairs])
    for (ds, ct), split in toml.zeroshot.items():
        for q in pairs_of("[zeroshot]", ds, ct):
            bits[pair == q] = SPLIT_BITS[split]

    def place(ds: str, ct: str, split: str) -> str:
        if split == "train":
            return f"trains in dataset '{ds}' (its [training] files, no [fewshot] or [zeroshot] entry holds it out)"
        if toml.zeroshot.get((ds, ct)) == split:
            return f'is {split} in [zeroshot] "{ds}.{ct}"'
        return f'is {split} in [fewshot."{ds}.{ct}"]'

    _refuse_shared_groups(cat, bits, place, f"split TOML {toml.path}" if toml.path else "split TOML")
    return bits


def _refuse_shared_groups(
    cat: CellCatalog, bits: np.ndarray, place: Callable[[str, str, str], str], source: str
) -> None:
    """One line for the first (cell type, perturbation) whose perturbed cells are in two splits: validation and
    test (best-val.pt would be chosen on a test group), or held out and training (a held-out group that trains
    through another file of its cell type is no held-out group). `place(dataset, cell type, split)` says where
    the source puts it."""
    n_p = len(cat.pert_names)
    perturbed = np.flatnonzero(cat.pert_of != cat.control_idx)
    group = cat.cell_type_of[perturbed].astype(np.int64) * n_p + cat.pert_of[perturbed]
    b = bits[perturbed]
    has = {s: np.zeros(len(cat.cell_types) * n_p, dtype=bool) for s in SPLIT_BITS}
    for s, bit in SPLIT_BITS.items():
        has[s][group[(b & bit) > 0]] = True
    shared = (has["val"] & has["test"]) | (has["train"] & (has["val"] | has["test"]))
    if not shared.any():
        return
    g = int(np.flatnonzero(shared)[0])
    t, p = divmod(g, n_p)
    splits = (
        ("val", "test")
        if has["val"][g] and has["test"][g]
        else ("test" if has["test"][g] else "val", "train")
    )
    ds_codes = cat.dataset_codes()[perturbed]
    where = []
    for s in splits:
        cell = np.flatnonzero((group == g) & ((b & SPLIT_BITS[s]) > 0))[0]
        where.append(place(cat.dataset_names[int(ds_codes[cell])], cat.cell_types[t], s))
    fix = (
        "list it in val or in test, not both"
        if splits == ("val", "test")
        else f"hold it out in every dataset of cell type '{cat.cell_types[t]}' or in none"
    )
    raise UserError(
        f"{source}: perturbation '{cat.pert_names[p]}' of cell type '{cat.cell_types[t]}' {where[0]} and "
        f"{where[1].removeprefix('is ')}; {fix}"
    )


def held_out_split_bits(cat: CellCatalog, held_out: Sequence[Mapping[str, str]]) -> np.ndarray:
    """Exactly the manifest's held-out (dataset, cell type, perturbation, split) groups; the rest trains."""
    n_ct, n_p = len(cat.cell_types), len(cat.pert_names)
    ds_index = {d: i for i, d in enumerate(cat.dataset_names)}
    ct_index = {t: i for i, t in enumerate(cat.cell_types)}
    p_index = {p: i for i, p in enumerate(cat.pert_names)}
    # one int64 code per (dataset, cell type, pert) group
    group_of = (cat.dataset_codes().astype(np.int64) * n_ct + cat.cell_type_of) * n_p + cat.pert_of
    codes, inverse = np.unique(group_of, return_inverse=True)
    present = set(codes.tolist())
    want: dict[int, int] = {}
    for e in held_out:
        ds, ct, pert, split = e["dataset"], e["cell_type"], e["pert"], e["split"]
        if split not in ("val", "test"):
            raise UserError(
                f"the checkpoint's manifest holds out {ds}.{ct} '{pert}' in split '{split}'; "
                "only val and test are held out, rewrite the manifest"
            )
        d, t, p = ds_index.get(ds, -1), ct_index.get(ct, -1), p_index.get(pert, -1)
        code = (d * n_ct + t) * n_p + p if min(d, t, p) >= 0 else -1
        if code not in present:
            raise UserError(
                f"the checkpoint's held-out group {ds}.{ct} '{pert}' has no cells in "
                f"{fmt_list(cat.data_paths, 3)}; pass data_path= the files the checkpoint was trained on"
            )
        want[code] = want.get(code, 0) | SPLIT_BITS[split]
    lut = np.array([want.get(c, 0) for c in codes.tolist()], dtype=np.int8)
    held = lut[inverse.reshape(-1)]
    return np.where(held > 0, held, TRAIN).astype(np.int8)
