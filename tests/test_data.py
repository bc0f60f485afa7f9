"""The h5ad reader, validation, splits, cell catalog, manifest, set sampler and data module (tahoe_ft.data)."""

from __future__ import annotations

import logging
import pickle
import tempfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from tahoe_ft import data as tdata
from tahoe_ft.config import DataConfig
from tahoe_ft.data import (
    CellCatalog,
    GroupKey,
    H5Screen,
    Manifest,
    PerturbationDataModule,
    SetPlan,
    parse_split_toml,
)
from tahoe_ft.data import checks as data_checks
from tahoe_ft.errors import UserError

CTRL = "non-targeting"
GENES = [f"g{i}" for i in range(30)]
PERTS = [f"P{i}" for i in range(6)]


def write_screen(
    path: Path,
    cell_types: tuple[str, ...],
    *,
    sparse: bool = True,
    counts: bool = False,
    n_per_pert: int = 12,
    n_ctrl: int = 40,
    genes: list[str] = GENES,
    seed: int = 0,
    obsm: bool = True,
) -> ad.AnnData:
    """A tiny screen: controls + PERTS per cell type, alternating batches, rows in shuffled order."""
    rng = np.random.default_rng(seed)
    labels = [
        (p, ct) for ct in cell_types for p in [CTRL] * n_ctrl + [p for p in PERTS for _ in range(n_per_pert)]
    ]
    obs = pd.DataFrame(labels, columns=["target_gene", "cell_type"])
    obs["batch"] = np.where(np.arange(len(obs)) % 2, "b1", "b2")
    obs = obs.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    obs.index = [f"cell{i}" for i in range(len(obs))]
    lam = rng.uniform(0.5, 30.0, len(genes))  # counts up to ~50: clearly not log1p values
    raw = rng.poisson(lam, (len(obs), len(genes))) * (rng.random((len(obs), len(genes))) < 0.5)
    X = (
        raw.astype(np.float32)
        if counts
        else np.log1p(raw * rng.uniform(0.5, 1.5, raw.shape)).astype(np.float32)
    )
    adata = ad.AnnData(sp.csr_matrix(X) if sparse else X, obs=obs, var=pd.DataFrame(index=genes))
    if obsm:
        adata.obsm["X_state"] = rng.normal(size=(len(obs), 8)).astype(np.float32)
    adata.strings_to_categoricals()
    adata.write_h5ad(path)
    return adata


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("screens")
    out = {"dir": d}
    out["a"] = write_screen(d / "a.h5ad", ("A",), sparse=True, seed=1)
    out["b"] = write_screen(d / "b.h5ad", ("B",), sparse=False, seed=2)
    out["c"] = write_screen(d / "c.h5ad", ("A", "C"), sparse=True, seed=3)
    out["counts"] = write_screen(d / "counts.h5ad", ("A",), counts=True, seed=4)
    return out


def dense_x(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)


def make_dm(
    paths, *, embed_key=None, need_counts=False, cell_set_len=5, seed=0, **cfg
) -> PerturbationDataModule:
    rank, world_size = cfg.pop("rank", None), cfg.pop("world_size", None)
    cfg.setdefault("batch_col", "batch")
    cfg.setdefault("batch_size", 3)
    dm = PerturbationDataModule(
        DataConfig(path=[str(p) for p in paths], **cfg),
        embed_key=embed_key,
        need_counts=need_counts,
        cell_set_len=cell_set_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
        debug_rows=True,
    )
    dm.setup()
    return dm


def ab(screens) -> list[Path]:
    return [screens["dir"] / "a.h5ad", screens["dir"] / "b.h5ad"]


def global_labels(screens, names=("a", "b")) -> pd.DataFrame:
    return pd.concat([screens[n].obs.assign(file=i) for i, n in enumerate(names)], ignore_index=True)


# ---------------------------------------------------------------------------------------------------------
# batch contract


def test_batch_contract_expression(screens):
    dm = make_dm(ab(screens), batch_size=4, val_perts=["P1"])
    assert dm.dims == {
        "input_dim": 30,
        "output_dim": 30,
        "pert_dim": 7,
        "gene_dim": 30,
        "batch_dim": 2,
        "aux_dim": None,
        "target_knockdown": None,  # no knock-down path unless asked
    }
    batch = next(iter(dm.train_dataloader()))
    B, S = 4, 5
    assert batch["pert_emb"].shape == (B, S, 7) and batch["pert_emb"].dtype == torch.float32
    assert batch["ctrl_cell_emb"].shape == (B, S, 30) and batch["ctrl_cell_emb"].dtype == torch.float32
    assert batch["pert_cell_emb"].shape == (B, S, 30) and batch["pert_cell_emb"].dtype == torch.float32
    assert batch["batch"].shape == (B, S) and batch["batch"].dtype == torch.int64
    assert "pert_cell_counts" not in batch
    assert isinstance(batch["pert_name"], list) and len(batch["pert_name"]) == B
    assert isinstance(batch["cell_type"], list) and len(batch["cell_type"]) == B
    # one-hot over sorted names, control included
    assert dm.pert_names == sorted([CTRL, *PERTS])
    for b in range(B):
        onehot = batch["pert_emb"][b]
        assert torch.equal(onehot, onehot[:1].expand(S, -1))
        assert dm.pert_names[int(onehot[0].argmax())] == batch["pert_name"][b]


def test_batch_contract_embedding_with_counts(screens):
    dm = make_dm(ab(screens), embed_key="X_state", need_counts=True, batch_size=2)
    assert dm.dims["input_dim"] == 8 and dm.dims["output_dim"] == 8 and dm.dims["gene_dim"] == 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["ctrl_cell_emb"].shape == (2, 5, 8) and batch["pert_cell_emb"].shape == (2, 5, 8)
    assert batch["pert_cell_counts"].shape == (2, 5, 30) and batch["pert_cell_counts"].dtype == torch.float32
    emb = np.concatenate([screens["a"].obsm["X_state"], screens["b"].obsm["X_state"]])
    X = np.concatenate([dense_x(screens["a"]), dense_x(screens["b"])])
    rows = batch["pert_rows"].numpy().reshape(-1)
    np.testing.assert_array_equal(batch["pert_cell_emb"].numpy().reshape(-1, 8), emb[rows])
    np.testing.assert_array_equal(batch["pert_cell_counts"].numpy().reshape(-1, 30), X[rows])
    np.testing.assert_array_equal(
        batch["ctrl_cell_emb"].numpy().reshape(-1, 8), emb[batch["ctrl_rows"].numpy().reshape(-1)]
    )
    np.testing.assert_array_equal(dm.catalog.read_input(rows[:7]), emb[rows[:7]])


def test_no_batch_col_gives_no_batch_key(screens):
    dm = make_dm(ab(screens), batch_col=None)
    assert dm.dims["batch_dim"] is None and dm.batches is None
    assert "batch" not in next(iter(dm.train_dataloader()))


# ---------------------------------------------------------------------------------------------------------
# set contents and basal controls


@pytest.mark.parametrize("mapping", ["random", "batch"])
def test_sets_are_pure_and_basal_controls_match(screens, mapping):
    names = ("a", "b", "c")
    dm = make_dm([screens["dir"] / f"{n}.h5ad" for n in names], basal_mapping=mapping, batch_size=4)
    labels = global_labels(screens, names)
    pert, ct = labels["target_gene"].to_numpy(), labels["cell_type"].astype(str).to_numpy()
    batch_lab, file_of = labels["batch"].astype(str).to_numpy(), labels["file"].to_numpy()
    n_sets = 0
    for batch in dm.train_dataloader():
        for b in range(len(batch["pert_name"])):
            p_rows, c_rows = batch["pert_rows"][b].numpy(), batch["ctrl_rows"][b].numpy()
            assert set(pert[p_rows]) == {batch["pert_name"][b]}
            assert set(ct[p_rows]) == {batch["cell_type"][b]}
            assert (pert[c_rows] == CTRL).all()
            assert set(ct[c_rows]) == {batch["cell_type"][b]}
            assert len(set(file_of[p_rows]) | set(file_of[c_rows])) == 1  # never across files
            assert [dm.batches[i] for i in batch["batch"][b].tolist()] == list(batch_lab[p_rows])
            if mapping == "batch":
                assert len(set(batch_lab[p_rows])) == 1
                assert set(batch_lab[c_rows]) == set(batch_lab[p_rows])
            n_sets += 1
    assert n_sets == dm.train_plan.n_sets
    # controls are targets too (yield_controls), labelled with the control name
    assert CTRL in {n for batch in dm.train_dataloader() for n in batch["pert_name"]}


@pytest.mark.parametrize("mapping", ["random", "batch"])
def test_recentred_basal_sets_keep_each_cells_deviation_on_their_pools_mean(screens, mapping):
    """data.recentre_basal: every training and validation set's basal cells have the mean of all the control
    cells of their pool (file, cell type[, batch]) and keep their deviations from their own set's mean; the
    same sets, rows and targets as without it."""
    names = ("a", "b", "c")
    paths = [screens["dir"] / f"{n}.h5ad" for n in names]
    on = make_dm(paths, basal_mapping=mapping, batch_size=4, val_perts=["P1"], recentre_basal=True)
    off = make_dm(paths, basal_mapping=mapping, batch_size=4, val_perts=["P1"])
    labels = global_labels(screens, names)
    X = np.concatenate([dense_x(screens[n]) for n in names])
    pert, ct = labels["target_gene"].to_numpy(), labels["cell_type"].astype(str).to_numpy()
    batch_lab, file_of = labels["batch"].astype(str).to_numpy(), labels["file"].to_numpy()
    n_sets = 0
    for loader in ("train_dataloader", "val_dataloader"):
        for b_on, b_off in zip(getattr(on, loader)(), getattr(off, loader)(), strict=True):
            assert torch.equal(b_on["ctrl_rows"], b_off["ctrl_rows"])
            assert torch.equal(b_on["pert_cell_emb"], b_off["pert_cell_emb"])
            raw = b_off["ctrl_cell_emb"].double()
            got = b_on["ctrl_cell_emb"].double()
            torch.testing.assert_close(
                got - got.mean(1, keepdim=True), raw - raw.mean(1, keepdim=True), rtol=0, atol=1e-6
            )  # float32 arithmetic
            for b in range(raw.shape[0]):
                c_rows = b_on["ctrl_rows"][b].numpy()
                pool = (file_of == file_of[c_rows[0]]) & (ct == ct[c_rows[0]]) & (pert == CTRL)
                if mapping == "batch":
                    pool &= batch_lab == batch_lab[c_rows[0]]
                np.testing.assert_allclose(got[b].mean(0).numpy(), X[pool].mean(0), rtol=1e-5, atol=1e-5)
                n_sets += 1
    assert n_sets == on.train_plan.n_sets + on.val_plan.n_sets


def test_every_training_cell_appears_each_epoch(screens):
    dm = make_dm(ab(screens), cell_set_len=5)
    seen = set()
    for batch in dm.train_dataloader():
        seen.update(batch["pert_rows"].numpy().reshape(-1).tolist())
    assert seen == set(range(len(global_labels(screens))))  # no val/test: all cells are train targets


# ---------------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("name", ["a", "b"])  # a: CSR X, b: dense X
def test_reader_values_match_anndata(screens, name):
    X = dense_x(screens[name])
    screen = H5Screen(screens["dir"] / f"{name}.h5ad")
    rows = np.array([7, 3, 3, 110, 0, 111, 100, 7])  # unsorted, repeats, neighbours
    np.testing.assert_array_equal(screen.read_rows(rows), X[rows])
    cols = np.array([29, 0, 5, 4])
    np.testing.assert_array_equal(screen.read_rows(rows, cols), X[rows][:, cols])
    np.testing.assert_array_equal(
        screen.read_rows(np.array([], dtype=np.int64)), np.zeros((0, 30), np.float32)
    )
    np.testing.assert_array_equal(screen.read_obsm_rows("X_state", rows), screens[name].obsm["X_state"][rows])
    # pickles without its handle and reopens on use
    clone = pickle.loads(pickle.dumps(screen))
    np.testing.assert_array_equal(clone.read_rows(rows[:3]), X[rows[:3]])


def test_compressed_file_reads_the_same(screens, tmp_path):
    screens["a"].write_h5ad(tmp_path / "gz.h5ad", compression="gzip")
    screen = H5Screen(tmp_path / "gz.h5ad")
    rows = np.array([9, 2, 2, 80, 111])
    np.testing.assert_array_equal(screen.read_rows(rows), dense_x(screens["a"])[rows])


def test_plain_string_and_numeric_obs_columns(screens, tmp_path):
    path = tmp_path / "plain.h5ad"
    screens["a"].write_h5ad(path)
    with h5py.File(path, "a") as f:  # rewrite two categoricals as a plain string array and an int array
        pert = screens["a"].obs["target_gene"].astype(str).to_numpy()
        del f["obs/target_gene"]
        f.create_dataset("obs/target_gene", data=pert.astype(object), dtype=h5py.string_dtype())
        del f["obs/batch"]
        f["obs/batch"] = (screens["a"].obs["batch"] == "b1").to_numpy().astype(np.int64) + 1
    dm = make_dm([path], basal_mapping="batch")
    assert dm.pert_names == sorted([CTRL, *PERTS]) and dm.batches == ["1", "2"]
    batch = next(iter(dm.train_dataloader()))
    labels = screens["a"].obs["target_gene"].astype(str).to_numpy()
    for b, name in enumerate(batch["pert_name"]):
        assert set(labels[batch["pert_rows"][b].numpy()]) == {name}


def test_batch_values_match_anndata(screens):
    dm = make_dm(ab(screens), batch_size=8)
    X = np.concatenate([dense_x(screens["a"]), dense_x(screens["b"])])
    files = set()
    for batch in dm.train_dataloader():
        for key, rows in (("pert_cell_emb", "pert_rows"), ("ctrl_cell_emb", "ctrl_rows")):
            r = batch[rows].numpy().reshape(-1)
            np.testing.assert_array_equal(batch[key].numpy().reshape(-1, 30), X[r])
        files.update((batch["pert_rows"].numpy() >= len(screens["a"])).reshape(-1).tolist())
    assert files == {False, True}  # both the CSR and the dense file were read


def test_gene_list_reorders_columns(screens, tmp_path):
    genes = ["g7", "g3", "g29", "g0"]
    (tmp_path / "genes.csv").write_text("\n".join(genes) + "\n")
    dm = make_dm(ab(screens), gene_list=str(tmp_path / "genes.csv"))
    assert dm.gene_names == genes and dm.dims["gene_dim"] == 4 and dm.dims["input_dim"] == 4
    X = np.concatenate([dense_x(screens["a"]), dense_x(screens["b"])])[:, [7, 3, 29, 0]]
    rows = np.array([5, 200, 1, 190])
    np.testing.assert_array_equal(dm.catalog.read_expression(rows), X[rows])
    batch = next(iter(dm.train_dataloader()))
    np.testing.assert_array_equal(
        batch["pert_cell_emb"].numpy().reshape(-1, 4), X[batch["pert_rows"].numpy().reshape(-1)]
    )


def test_counts_are_normalised_like_scanpy(screens):
    sc = pytest.importorskip("scanpy")
    ref = screens["counts"].copy()
    ref.X = ref.X.astype(np.float32)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    dm = make_dm([screens["dir"] / "counts.h5ad"], input_transform="counts")
    rows = np.array([3, 0, 99, 100, 3])
    np.testing.assert_allclose(dm.catalog.read_expression(rows), dense_x(ref)[rows], rtol=1e-5, atol=1e-5)
    batch = next(iter(dm.train_dataloader()))
    r = batch["pert_rows"].numpy().reshape(-1)
    np.testing.assert_allclose(
        batch["pert_cell_emb"].numpy().reshape(-1, 30), dense_x(ref)[r], rtol=1e-5, atol=1e-5
    )
    # library sizes are over all genes even when a gene list selects a few
    lib = dm.catalog.screens[0].library_sizes()
    np.testing.assert_allclose(lib, dense_x(screens["counts"]).sum(1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# sampler: epochs, seeds, workers, DDP


def set_keys(loader) -> list[tuple[int, ...]]:
    return [tuple(r) for batch in loader for r in batch["pert_rows"].numpy().tolist()]


def test_epochs_differ_and_seed_reproduces(screens):
    dm = make_dm(ab(screens))
    plan = dm.train_plan
    plan.set_epoch(0)
    e0 = set_keys(dm.train_dataloader())
    plan.set_epoch(1)
    e1 = set_keys(dm.train_dataloader())
    assert e0 != e1 and sorted(e0) != sorted(e1)  # different contents, not just a different order
    again = make_dm(ab(screens))
    again.train_plan.set_epoch(1)
    assert set_keys(again.train_dataloader()) == e1
    other_seed = make_dm(ab(screens), seed=1)
    assert set_keys(other_seed.train_dataloader()) != e0
    # without set_epoch, a second pass is still a new epoch (cell-load repeats the same epoch)
    plan.set_epoch(0)
    first, second = set_keys(dm.train_dataloader()), set_keys(dm.train_dataloader())
    assert first == e0 and second == e1


def test_lightning_set_epoch_reaches_the_plan(screens):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    dm = make_dm(ab(screens))
    loader = dm.train_dataloader()
    _set_sampler_epoch(loader, 3)
    assert dm.train_plan.epoch == 3


def test_num_workers_do_not_change_batches(screens):
    plain = make_dm(ab(screens), num_workers=0)
    workers = make_dm(ab(screens), num_workers=2)
    loader = workers.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 2
    b0, b2 = list(plain.train_dataloader()), list(loader)
    assert len(b0) == len(b2) == len(loader)
    for x, y in zip(b0, b2, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k]


def test_ddp_ranks_get_disjoint_equal_shards(screens):
    full = make_dm(ab(screens))
    ranks = [make_dm(ab(screens), rank=r, world_size=2) for r in range(2)]
    sets = [set_keys(dm.train_dataloader()) for dm in ranks]
    assert (
        len(ranks[0].train_dataloader())
        == len(ranks[1].train_dataloader())
        == len(full.train_dataloader()) // 2
    )
    assert len(sets[0]) > 0 and not set(sets[0]) & set(sets[1])
    assert set(sets[0]) | set(sets[1]) <= set(set_keys(full.train_dataloader()))


def test_validation_plan_is_fixed(screens):
    dm = make_dm(ab(screens), val_perts=["P1", "P2"], val_sets_per_group=2)
    first = set_keys(dm.val_dataloader())
    dm.val_plan.set_epoch(5)
    assert set_keys(dm.val_dataloader()) == first
    assert len(first) == 2 * 2 * 2  # 2 perts x 2 cell types x 2 sets


def test_small_groups_are_topped_up_with_replacement():
    groups = tdata.Groups(
        rows=np.arange(7, dtype=np.int64),
        start=np.array([0, 3]),
        size=np.array([3, 4]),
        file=np.zeros(2, np.int64),
        cell_type=np.zeros(2, np.int64),
        pert=np.array([1, 2]),
        pool=np.zeros(2, np.int64),
    )
    pools = tdata.Pools(rows=np.array([100, 101]), start=np.array([0]), size=np.array([2]))
    plan = SetPlan(groups, pools, cell_set_len=5, batch_size=1, seed=0, train=True)
    set_group, pert_rows, ctrl_rows = plan.plan(0)
    assert pert_rows.shape == (2, 5)
    for g, rows in zip(set_group, pert_rows, strict=True):
        members = set(range(groups.start[g], groups.start[g] + groups.size[g]))
        assert set(rows) == members  # every member once, the rest repeats from the group
    assert set(ctrl_rows.reshape(-1)) <= {100, 101}


# ---------------------------------------------------------------------------------------------------------
# splits


def test_fewshot_and_zeroshot_from_config(screens):
    names = ("a", "b", "c")
    dm = make_dm(
        [screens["dir"] / f"{n}.h5ad" for n in names],
        val_perts=["P1"],
        test_perts=["P2", "P3"],
        test_cell_types=["C"],
    )
    assert dm.splits["val"] == ["P1"]
    assert set(dm.splits["test"]) == set(PERTS)  # zero-shot C contributes all perts
    assert not {"P1", "P2", "P3"} & set(dm.splits["train"]) and CTRL not in dm.splits["train"]
    labels = global_labels(screens, names)
    pert, ct = labels["target_gene"].to_numpy(), labels["cell_type"].astype(str).to_numpy()
    train_rows = {
        r for batch in dm.train_dataloader() for r in batch["pert_rows"].numpy().reshape(-1).tolist()
    }
    assert not {"P1", "P2", "P3"} & set(pert[list(train_rows)])
    assert set(ct[[r for r in train_rows if pert[r] != CTRL]]) == {"A", "B"}
    # controls are shared: every split draws basal controls from the same control cells
    val_ctrl = {r for b in dm.val_dataloader() for r in b["ctrl_rows"].numpy().reshape(-1).tolist()}
    test_ctrl = {r for b in dm.test_dataloader() for r in b["ctrl_rows"].numpy().reshape(-1).tolist()}
    assert val_ctrl & train_rows and (pert[list(val_ctrl | test_ctrl)] == CTRL).all()
    val_names = {n for b in dm.val_dataloader() for n in b["pert_name"]}
    assert val_names == {"P1"}  # no controls as validation targets
    groups = dm.catalog.groups("test")  # A is in files a and c (datasets "a" and "c")
    pairs = {(k.cell_type, k.pert) for k in groups}
    assert ("C", "P0") in pairs and ("A", "P2") in pairs and ("A", "P0") not in pairs
    np.testing.assert_array_equal(dm.catalog.controls("c", "C"), np.flatnonzero((pert == CTRL) & (ct == "C")))
    np.testing.assert_array_equal(
        np.concatenate([groups[GroupKey("a", "A", "P2")], groups[GroupKey("c", "A", "P2")]]),
        np.flatnonzero((pert == "P2") & (ct == "A")),
    )
    m = dm.manifest()
    assert m.splits == {"val": ["P1"], "test": dm.splits["test"]}


def test_split_toml_fewshot_and_zeroshot(screens, tmp_path):
    d = screens["dir"]
    toml = tmp_path / "split.toml"
    toml.write_text(
        f"""
[datasets]
first = "{d}/{{a,b}}.h5ad"
mixed = "{d}/c.h5ad"

[training]
first = "train"
mixed = "train"

[zeroshot]
"mixed.C" = "val"

[fewshot."first.A"]
val = ["P1"]
test = ["P2", "P3"]

[fewshot."mixed.A"]
val = ["P1"]
test = ["P2", "P3"]
"""
    )
    parsed = parse_split_toml(toml)
    assert [p.name for p in parsed.datasets["first"]] == ["a.h5ad", "b.h5ad"]
    assert parsed.zeroshot == {("mixed", "C"): "val"}
    assert parsed.fewshot[("first", "A")] == {"val": ["P1"], "test": ["P2", "P3"]}

    dm = make_dm([], split_toml=str(toml))  # data.path empty: files come from the TOML
    assert [Path(p).name for p in dm.data_paths] == ["a.h5ad", "b.h5ad", "c.h5ad"]
    cells_val, cells_test = dm.catalog.groups("val"), dm.catalog.groups("test")
    held_a = {GroupKey(ds, "A", "P1") for ds in ("first", "mixed")}
    assert set(cells_val) == held_a | {GroupKey("mixed", "C", p) for p in PERTS}
    assert set(cells_test) == {GroupKey(ds, "A", p) for ds in ("first", "mixed") for p in ("P2", "P3")}
    # few-shot is per cell type: P1 of cell type B stays in training (A holds it out in both its datasets)
    labels = global_labels(screens, ("a", "b", "c"))
    offsets = dm.catalog.offsets
    a_rows = set(range(offsets[0], offsets[1]))
    b_rows = set(range(offsets[1], offsets[2]))
    train_rows = {r for b in dm.train_dataloader() for r in b["pert_rows"].numpy().reshape(-1).tolist()}
    p1 = set(np.flatnonzero(labels["target_gene"].to_numpy() == "P1").tolist())
    assert train_rows & p1 and train_rows & p1 <= b_rows
    assert cells_val[GroupKey("first", "A", "P1")].tolist() == sorted(p1 & a_rows)


def test_split_toml_errors(screens, tmp_path):
    d = screens["dir"]
    toml = tmp_path / "bad.toml"
    toml.write_text(f'[datasets]\nfirst = "{d}/a.h5ad"\n[fewshot."first.A"]\nval = ["NOPE"]\n')
    with pytest.raises(UserError, match="'NOPE', which has no cells"):
        make_dm([], split_toml=str(toml))
    toml.write_text(f'[datasets]\nfirst = "{d}/a.h5ad"\n[zeroshot]\n"other.A" = "val"\n')
    with pytest.raises(UserError, match="not '<dataset>.<cell type>'"):
        make_dm([], split_toml=str(toml))
    toml.write_text(f'[datasets]\nfirst = "{d}/nothing_*.h5ad"\n')
    with pytest.raises(UserError, match="matches no file"):
        make_dm([], split_toml=str(toml))


# ---------------------------------------------------------------------------------------------------------
# bad input: one clear line each


def _rewrite(src: ad.AnnData, path: Path, **changes) -> Path:
    adata = src.copy()
    if "X" in changes:
        adata.X = changes["X"]
    if "obs" in changes:
        adata.obs = changes["obs"]
    if "var_names" in changes:
        adata.var_names = changes["var_names"]
    if changes.get("drop_obsm"):
        del adata.obsm["X_state"]
    adata.write_h5ad(path)
    return path


def _with_value(screens, value, row=17, sparse=True) -> np.ndarray:
    X = dense_x(screens["a"]).copy()
    X[row, 3] = value
    return sp.csr_matrix(X) if sparse else X


BAD_CASES = {
    "missing_file": (lambda s, t: [t / "nope.h5ad"], {}, "data file not found"),
    "not_hdf5": (lambda s, t: [_text(t / "x.h5ad")], {}, "not an HDF5"),
    "not_anndata": (lambda s, t: [_plain_h5(t / "x.h5")], {}, "not an AnnData"),
    "pert_col": (lambda s, t: [s["dir"] / "a.h5ad"], {"pert_col": "gene"}, "obs column 'gene' not found"),
    "cell_type_col": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"cell_type_col": "ct"},
        "obs column 'ct' not found",
    ),
    "batch_col": (lambda s, t: [s["dir"] / "a.h5ad"], {"batch_col": "gem"}, "obs column 'gem' not found"),
    "control": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"control_pert": "DMSO"},
        "control label 'DMSO' not found",
    ),
    "nan": (
        lambda s, t: [_rewrite(s["a"], t / "x.h5ad", X=_with_value(s, np.nan))],
        {},
        "NaN or Inf.*row 17",
    ),
    "inf_dense": (
        lambda s, t: [_rewrite(s["a"], t / "x.h5ad", X=_with_value(s, np.inf, sparse=False))],
        {},
        "NaN or Inf",
    ),
    "negative": (
        lambda s, t: [_rewrite(s["a"], t / "x.h5ad", X=_with_value(s, -0.5))],
        {},
        "negative values",
    ),
    "counts_as_log1p": (lambda s, t: [s["dir"] / "counts.h5ad"], {}, "looks like raw integer counts"),
    "log1p_as_counts": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"input_transform": "counts"},
        "non-integer values",
    ),
    "gene_list": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"gene_list": "GENES"},
        "2 genes of the gene list .* not in var .*'MISSING1', 'MISSING2'",
    ),
    "pert_features": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"pert_features": "FEATS"},
        "6 perturbations have no vector",
    ),
    "val_pert_absent": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"val_perts": ["P9"]},
        "'P9', which has no cells",
    ),
    "val_cell_type_absent": (
        lambda s, t: [s["dir"] / "a.h5ad"],
        {"val_cell_types": ["Z"]},
        "'Z', which has no cells",
    ),
    "different_genes": (
        lambda s, t: [s["dir"] / "a.h5ad", _rewrite(s["b"], t / "x.h5ad", var_names=GENES[::-1])],
        {},
        "files have different genes.*set data.gene_list",
    ),
    "unknown_option": (lambda s, t: [s["dir"] / "a.h5ad"], {"basal_mapping": "nearest"}, "basal_mapping"),
}


def _text(path: Path) -> Path:
    path.write_text("cell,gene\n")
    return path


def _plain_h5(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["matrix"] = np.zeros((3, 3))
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_clear_user_error(screens, tmp_path, case):
    paths_fn, cfg, pattern = BAD_CASES[case]
    if cfg.get("gene_list") == "GENES":
        (tmp_path / "genes.csv").write_text("g1\nMISSING1\ng2\nMISSING2\n")
        cfg = {**cfg, "gene_list": str(tmp_path / "genes.csv")}
    if cfg.get("pert_features") == "FEATS":
        torch.save({CTRL: torch.zeros(4)}, tmp_path / "feats.pt")
        cfg = {**cfg, "pert_features": str(tmp_path / "feats.pt")}
    with pytest.raises(UserError, match=pattern) as err:
        make_dm(paths_fn(screens, tmp_path), **cfg)
    assert "\n" not in str(err.value) and ";" in str(err.value)  # one line: what/where; how to fix


def test_bad_values_found_by_row_sample_in_big_files(screens, tmp_path, monkeypatch):
    monkeypatch.setattr(data_checks, "FULL_CHECK_ELEMENTS", 0)  # treat the file as too big for a full scan
    monkeypatch.setattr(data_checks, "VALIDATE_ROWS", 1000)  # every row of this small file is in the sample
    with pytest.raises(UserError, match="NaN or Inf.*row 17"):
        make_dm([_rewrite(screens["a"], tmp_path / "x.h5ad", X=_with_value(screens, np.nan))])


def test_missing_embedding_is_an_error(screens, tmp_path):
    path = _rewrite(screens["a"], tmp_path / "x.h5ad", drop_obsm=True)
    with pytest.raises(UserError, match=r"obsm\['X_state'\] not found"):
        make_dm([path], embed_key="X_state")


def test_different_genes_are_reindexed_with_a_gene_list(screens, tmp_path):
    X_b = dense_x(screens["b"])[:, ::-1]
    path = _rewrite(screens["b"], tmp_path / "x.h5ad", var_names=GENES[::-1], X=X_b.copy())
    (tmp_path / "genes.csv").write_text("\n".join(GENES))
    dm = make_dm([screens["dir"] / "a.h5ad", path], gene_list=str(tmp_path / "genes.csv"))
    n_a = len(screens["a"])
    np.testing.assert_array_equal(
        dm.catalog.read_expression(np.array([n_a + 4, 2])),
        np.stack([dense_x(screens["b"])[4], dense_x(screens["a"])[2]]),
    )


def test_missing_pert_features_allowed_get_zeros(screens, tmp_path, caplog):
    feats = {p: torch.full((4,), float(i + 1)) for i, p in enumerate(PERTS[:4])}
    torch.save(feats, tmp_path / "feats.pt")
    with caplog.at_level(logging.WARNING, logger="tahoe_ft.data"):
        dm = make_dm(
            [screens["dir"] / "a.h5ad"],
            pert_features=str(tmp_path / "feats.pt"),
            allow_missing_pert_features=True,
        )
    assert any(
        "2 perturbations are missing" in r.message for r in caplog.records if r.levelno == logging.WARNING
    )
    mat = dm.pert_matrix
    assert mat.shape == (7, 4) and dm.dims["pert_dim"] == 4
    assert torch.equal(mat[dm.pert_names.index("P1")], torch.full((4,), 2.0))
    assert not mat[dm.pert_names.index("P5")].any() and not mat[dm.pert_names.index(CTRL)].any()
    m = dm.manifest()
    assert m.pert_features["source"].endswith("feats.pt") and len(m.pert_features["sha256"]) == 64


def test_cell_set_len_larger_than_every_group(screens):
    with pytest.raises(UserError, match="cell_set_len=13 is larger than every training group.*12 cells"):
        make_dm([screens["dir"] / "a.h5ad"], cell_set_len=13)
    make_dm([screens["dir"] / "a.h5ad"], cell_set_len=12)  # equal to the largest group is fine


def test_memory_budget_refusal(screens):
    # 3 sets x 5 cells x (30 + 30 + 7) floats x 4 B = 4020 B per batch; 2 workers x 2 prefetch + 2 = 6 in flight
    with pytest.raises(UserError, match=r"memory_budget_gb.*lower data.batch_size, model.cell_set_len"):
        make_dm([screens["dir"] / "a.h5ad"], num_workers=2, memory_budget_gb=6 * 4020 / 2**30 * 0.99)
    make_dm([screens["dir"] / "a.h5ad"], num_workers=2, memory_budget_gb=6 * 4020 / 2**30 * 1.01)


# ---------------------------------------------------------------------------------------------------------
# the reader touches only the rows it is asked for


def bytes_read() -> int:
    """Bytes this process has read through read()/pread() (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("sparse", [True, False])
def test_reading_rows_does_not_load_the_matrix(tmp_path, sparse):
    n, g = 4000, 1000
    X = sp.random(n, g, density=0.05, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(X if sparse else X.toarray(), var=pd.DataFrame(index=[f"g{i}" for i in range(g)])).write_h5ad(
        tmp_path / "big.h5ad"
    )
    payload = X.nnz * 8 if sparse else n * g * 4  # data + indices, or the dense values
    screen = H5Screen(tmp_path / "big.h5ad")
    screen.read_rows(np.array([0]))  # HDF5 metadata (B-trees, headers) is read once on first use
    rows = np.random.default_rng(0).choice(n, 10, replace=False)
    before = bytes_read()
    got = screen.read_rows(rows)
    used = bytes_read() - before
    np.testing.assert_array_equal(got, X[rows].toarray())
    wanted = 10 * (X.nnz / n * 8 if sparse else g * 4)
    assert used < 4 * wanted + 64 * 1024, (used, wanted)  # ~the rows' bytes, plus gap reads and metadata
    assert used < payload / 10


def test_consecutive_rows_are_read_as_one_block(tmp_path, monkeypatch):
    X = sp.random(500, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(X).write_h5ad(tmp_path / "x.h5ad")
    screen = H5Screen(tmp_path / "x.h5ad")
    calls = []
    real = H5Screen._read_runs
    monkeypatch.setattr(
        H5Screen,
        "_read_runs",
        staticmethod(lambda ds, a, b, out: (calls.append(len(a)), real(ds, a, b, out))),
    )
    np.testing.assert_array_equal(screen.read_rows(np.arange(100, 300)[::-1]), X[100:300][::-1].toarray())
    assert calls == [1, 1]  # data and indices: one run each


def test_manifest_is_plain_python(screens):
    dm = make_dm(ab(screens), test_perts=["P2"])
    m = dm.manifest().to_dict()
    expected = {
        "gene_names", "encoder", "embed_key", "input_dim", "pert_col", "control_pert", "cell_type_col",
        "batch_col", "pert_names", "pert_features", "pert_matrix", "cell_types", "batches", "input_transform",
        "cell_set_len", "splits", "data_paths", "datasets", "held_out",
        # run lineage (issue #31): what this run trained on, and its ancestors (filled in by train)
        "data_fingerprint", "split_id", "trained", "lineage",
    }  # fmt: skip
    assert set(m) == expected
    assert m["encoder"] == "raw_expression" and m["pert_features"] == {"source": "onehot", "sha256": None}
    assert torch.equal(m["pert_matrix"], torch.eye(7)) and m["pert_names"] == dm.pert_names
    assert m["cell_types"] == ["A", "B"] and m["batches"] == ["b1", "b2"] and m["cell_set_len"] == 5

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or type(x) in (str, int, float, bool)

    assert plain({k: v for k, v in m.items() if k != "pert_matrix"})
    assert torch.load  # the manifest goes into .pt files loaded with weights_only=True
    buf = Path(dm.data_paths[0]).parent / "manifest_roundtrip.pt"
    torch.save(m, buf)
    assert torch.load(buf, weights_only=True)["gene_names"] == GENES


# ---------------------------------------------------------------------------------------------------------
# the cell catalog and the manifest: predict and eval read cells without the data module


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_catalog_from_manifest_reads_what_the_data_module_trained_on(screens, tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / f"{name}.h5ad").write_bytes((screens["dir"] / f"{name}.h5ad").read_bytes())
    (tmp_path / "genes.csv").write_text("g7\ng3\ng29\ng0\n")
    dm = make_dm(
        [tmp_path / "a.h5ad", tmp_path / "b.h5ad"],
        embed_key="X_state",
        gene_list=str(tmp_path / "genes.csv"),
        val_perts=["P1"],
        test_perts=["P2"],
    )
    manifest = dm.manifest().to_dict()
    before = _listing(tmp_path)

    def no_temp_files(*args, **kwargs):
        raise AssertionError("the catalog wrote a temporary file")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp_files)
    monkeypatch.setattr(tempfile, "mkdtemp", no_temp_files)
    cat = CellCatalog.from_manifest(manifest)
    rows = np.array([5, 200, 1, 190, 5])
    for split in ("train", "val", "test"):
        ours, theirs = cat.groups(split), dm.catalog.groups(split)
        assert list(ours) == list(theirs) and ours  # same groups, same (sorted) order
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key])
            np.testing.assert_array_equal(
                cat.controls(key.dataset, key.cell_type), dm.catalog.controls(key.dataset, key.cell_type)
            )
    assert cat.gene_names == dm.gene_names == ["g7", "g3", "g29", "g0"]
    np.testing.assert_array_equal(cat.read_expression(rows), dm.catalog.read_expression(rows))
    np.testing.assert_array_equal(cat.read_input(rows), dm.catalog.read_input(rows))
    assert _listing(tmp_path) == before  # nothing written next to the data


def _fewshot_toml(screens, tmp_path) -> Path:
    """Dataset "ds" = a.h5ad (cell type A) + b.h5ad (cell type B); P1 is held out in A only."""
    d = screens["dir"]
    toml = tmp_path / "split.toml"
    toml.write_text(f'[datasets]\nds = "{d}/{{a,b}}.h5ad"\n\n[fewshot."ds.A"]\ntest = ["P1"]\n')
    return toml


def test_held_out_groups_are_exactly_the_tomls(screens, tmp_path):
    dm = make_dm([], split_toml=str(_fewshot_toml(screens, tmp_path)))
    m = dm.manifest()
    assert m.held_out == [{"dataset": "ds", "cell_type": "A", "pert": "P1", "split": "test"}]
    assert m.datasets == ["ds", "ds"] and m.splits == {"val": [], "test": ["P1"]}
    cat = CellCatalog.from_manifest(m)
    labels = global_labels(screens)
    p1_of_b = np.flatnonzero(
        (labels["target_gene"] == "P1").to_numpy() & (labels["cell_type"] == "B").to_numpy()
    )
    assert list(cat.groups("test")) == [GroupKey("ds", "A", "P1")]
    np.testing.assert_array_equal(cat.groups("train")[GroupKey("ds", "B", "P1")], p1_of_b)
    # an older manifest (no held_out) holds its `splits` perturbations out in every cell type
    old = {k: v for k, v in m.to_dict().items() if k not in ("held_out", "datasets")}
    old_cat = CellCatalog.from_manifest(old)
    assert set(old_cat.groups("test")) == {GroupKey("a", "A", "P1"), GroupKey("b", "B", "P1")}


def test_manifest_round_trip_and_older_dicts(screens, tmp_path):
    m = make_dm(ab(screens), val_perts=["P1"], test_perts=["P2"]).manifest()
    d = m.to_dict()
    assert Manifest.from_dict(d) == m
    torch.save(d, tmp_path / "m.pt")
    assert Manifest.from_dict(torch.load(tmp_path / "m.pt", weights_only=True)) == m
    assert "pert_matrix" not in m.to_dict(include_pert_matrix=False)
    changed = Manifest.from_dict({**d, "pert_matrix": d["pert_matrix"] * 2})
    assert changed != m
    # a manifest from a checkpoint written before `datasets` and `held_out` existed
    old = {k: v for k, v in d.items() if k not in ("datasets", "held_out")}
    om = Manifest.from_dict(old)
    assert om.held_out is None and om.datasets is None and om.gene_names == GENES
    assert om.to_dict(include_pert_matrix=False) == {
        **{k: v for k, v in old.items() if k != "pert_matrix"},
        "datasets": None,
        "held_out": None,
    }
    with pytest.raises(UserError, match="lacks \\['gene_names'\\]"):
        Manifest.from_dict({k: v for k, v in d.items() if k != "gene_names"})


def test_training_cells_are_train_groups_and_every_cell_types_controls(screens, tmp_path):
    cat = CellCatalog.from_manifest(make_dm([], split_toml=str(_fewshot_toml(screens, tmp_path))).manifest())
    tc = cat.training_cells(max_per_group=1000, seed=0)
    pairs = set(zip(tc.obs["target_gene"], tc.obs["cell_type"], strict=True))
    assert {(CTRL, "A"), (CTRL, "B")} <= pairs  # controls of every cell type
    assert ("P1", "A") not in pairs and ("P1", "B") in pairs  # no held-out cell; P1 trains in B
    assert list(tc.var_names) == GENES and tc.n_obs == len(global_labels(screens)) - 12  # all but A's P1
    labels = global_labels(screens)
    X = np.concatenate([dense_x(screens["a"]), dense_x(screens["b"])])
    rows = np.flatnonzero(
        (labels["target_gene"] == "P3").to_numpy() & (labels["cell_type"] == "B").to_numpy()
    )
    sel = ((tc.obs["target_gene"] == "P3") & (tc.obs["cell_type"] == "B")).to_numpy()
    np.testing.assert_array_equal(np.asarray(tc.X)[sel], X[rows])  # drawn rows, in row order
    small = cat.training_cells(max_per_group=3, seed=0)
    assert small.obs.groupby(["target_gene", "cell_type"], observed=True).size().max() == 3
    again = cat.training_cells(max_per_group=3, seed=0)
    np.testing.assert_array_equal(np.asarray(small.X), np.asarray(again.X))


# ---------------------------------------------------------------------------------------------------------
# nothing lost (issue #31): corrupted blocks, repeated gene names, anndata's legacy sparse layout


def _legacy_h5sparse(src: ad.AnnData, path: Path) -> Path:
    """`src` written as anndata < 0.7 wrote a sparse X: a group with `h5sparse_format` = "csr" and
    `h5sparse_shape` (no `encoding-type`, no `shape`), its data/indices/indptr written by hand from a CSR."""
    src.write_h5ad(path)
    x = sp.csr_matrix(dense_x(src))
    with h5py.File(path, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs["h5sparse_format"] = "csr"
        g.attrs["h5sparse_shape"] = np.array(x.shape)
        g["data"], g["indices"], g["indptr"] = x.data, x.indices, x.indptr
    return path


def test_a_legacy_h5sparse_csr_x_is_read_as_anndata_reads_it(screens, tmp_path):
    path = _legacy_h5sparse(screens["a"], tmp_path / "legacy.h5ad")
    with h5py.File(path) as f:  # the layout the reader met: no encoding-type, no shape
        assert "encoding-type" not in f["X"].attrs and "shape" not in f["X"].attrs
    want = dense_x(ad.read_h5ad(path))  # anndata reads the legacy group
    np.testing.assert_array_equal(want, dense_x(screens["a"]))
    screen = H5Screen(path)
    rows = np.array([5, 0, 111, 5, 42])
    np.testing.assert_array_equal(screen.read_rows(rows), want[rows])
    np.testing.assert_array_equal(screen.read_rows(np.arange(screen.n_obs)), want)
    assert screen.verify().n == sp.csr_matrix(want).nnz
    dm = make_dm([path])  # and a training opens it
    np.testing.assert_array_equal(dm.catalog.read_expression(rows), want[rows])


def test_repeated_var_names_are_refused_where_the_files_names_are_the_gene_list(screens, tmp_path):
    genes = GENES[:-1] + [GENES[0]]  # g0 twice
    path = _rewrite(screens["a"], tmp_path / "dup.h5ad", var_names=genes)
    with pytest.raises(UserError, match=r"var_names of .*dup.h5ad repeat 1 gene names \('g0'\); make them"):
        make_dm([path])
    # a gene list that leaves the repeated name out reads the file: its genes are each one column
    (tmp_path / "genes.csv").write_text("\n".join(GENES[1:-1]))
    assert make_dm([path], gene_list=str(tmp_path / "genes.csv")).catalog.gene_names == GENES[1:-1]


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_check_reads_every_block_where_train_reads_a_sample(screens, tmp_path, monkeypatch):
    path = _rewrite(screens["a"], tmp_path / "x.h5ad", X=_with_value(screens, np.nan, row=17))
    monkeypatch.setattr(data_checks, "FULL_CHECK_ELEMENTS", 0)  # a file too big for train's full scan
    monkeypatch.setattr(data_checks, "VALIDATE_ROWS", 2)  # whose sample (rows 0 and 119) misses row 17
    data_checks.check_values(H5Screen(path), "log1p")
    with pytest.raises(UserError, match="NaN or Inf.*row 17"):
        data_checks.check_values(H5Screen(path), "log1p", every_block=True)


def test_corrupted_csr_indices_are_one_line_naming_the_file(screens, tmp_path):
    path = _rewrite(screens["a"], tmp_path / "x.h5ad")
    with h5py.File(path) as f:
        ds = f["X/indices"]
        row = 60
        at = int(f["X/indptr"][row])
        offset = ds.id.get_offset() if ds.chunks is None else None
        if offset is None:  # chunked: the chunk holding element `at`
            info = next(
                c
                for c in (ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks()))
                if c.chunk_offset[0] <= at < c.chunk_offset[0] + ds.chunks[0]
            )
            offset = info.byte_offset + (at - info.chunk_offset[0]) * ds.dtype.itemsize
        else:
            offset += at * ds.dtype.itemsize
    _overwrite(path, offset, b"\xff\x7f\x00\x00" * 4)  # column 32767 in a 30-gene file
    screen = H5Screen(path)  # opens: the structure around X is intact
    with pytest.raises(UserError, match=r"x.h5ad: X/indices holds column index 32767 \(row 60\), outside"):
        screen.verify()
    with pytest.raises(UserError, match=r"x.h5ad: 'X/indices' holds column indices outside \[0, 30\)"):
        screen.read_rows(np.array([row]))  # what a training meets: one line, not scipy's ValueError
    screen.read_rows(np.array([0, 1]))  # rows that are intact still read


def test_an_unreadable_block_is_one_line_naming_the_file(screens, tmp_path):
    path = tmp_path / "gz.h5ad"
    screens["a"].write_h5ad(path, compression="gzip")
    with h5py.File(path) as f:
        info = f["X/data"].id.get_chunk_info(0)
    _overwrite(path, info.byte_offset + 8, b"\x00" * min(64, info.size - 8))  # break the deflate stream
    screen = H5Screen(path)
    for read in (lambda: screen.read_rows(np.array([0])), screen.verify, lambda: make_dm([path])):
        with pytest.raises(UserError, match=r"gz.h5ad is corrupted or unreadable \(OSError: .*copy it again"):
            read()
