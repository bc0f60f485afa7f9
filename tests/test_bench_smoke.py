"""The benchmark scripts' pieces: argument sizes, the block-written screen, and the memory floor they report."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_memory  # noqa: E402 - scripts/ is not a package
import bench_predict  # noqa: E402


def test_quick_and_default_sizes():
    quick, full = bench_predict.parse_args(["--quick"]), bench_predict.parse_args([])
    assert (quick.cells, quick.repeats, full.cells, full.genes) == (4000, 2, 20000, 18080)
    assert bench_predict.parse_args(["--quick", "--cells", "10"]).cells == 10
    quick, full = bench_memory.parse_args(["--quick"]), bench_memory.parse_args([])
    assert (quick.cells, quick.steps, full.cells, full.steps, full.workers) == (2000, 6, 20000, 40, 0)


def test_screen_written_in_blocks_reads_as_one_csr_matrix(tmp_path):
    from tahoe_ft.data import H5Screen

    path = tmp_path / "s.h5ad"
    bench_predict.write_screen(path, 50, 30, n_perts=3, block_rows=7)
    a = ad.read_h5ad(path)
    assert sp.issparse(a.X) and a.shape == (50, 30) and a.X.has_sorted_indices
    assert 0 < a.X.data.min() and a.X.data.max() < 14 and 0.02 < a.X.nnz / (50 * 30) < 0.2
    assert set(a.obs[bench_predict.PERT_COL]) <= {"non-targeting", "P000", "P001", "P002"}
    np.testing.assert_array_equal(H5Screen(path).read_rows(np.arange(50)), a.X.toarray())
    bench_predict.write_screen(tmp_path / "t.h5ad", 80, 30, n_perts=3)
    assert list(ad.read_h5ad(tmp_path / "t.h5ad").var_names) == list(a.var_names)  # same genes at any size


def test_memory_floor_counts_weights_gradients_adamw_and_batches():
    import torch

    from tahoe_ft.config import TrainConfig
    from tahoe_ft.training.memory import training_floor

    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5))  # 220 + 105 parameters
    cfg = TrainConfig()
    cfg.data.batch_size, cfg.model.cell_set_len, cfg.data.num_workers, cfg.data.prefetch_factor = 4, 8, 2, 3
    dims = {"input_dim": 10, "output_dim": 10, "pert_dim": 3, "gene_dim": 7, "aux_dim": None}
    f = training_floor(model, cfg, dims)
    assert (f.weights, f.gradients, f.optimizer) == (325 * 4, 325 * 4, 2 * 325 * 4)
    assert (f.batch, f.batches_in_flight) == (4 * 8 * 23 * 4, 2 * 3 + 2)
    assert f.total == 4 * 325 * 4 + 8 * f.batch
    cfg.freeze.modules = ["0"]  # frozen for the whole run: no gradient, no optimizer state
    assert training_floor(model, cfg, dims).gradients == 105 * 4
    assert "memory floor" in f.describe() and "AdamW state" in f.describe()


def test_train_prints_the_floor_at_start_up(tmp_path, caplog):
    import logging

    from conftest_train import train

    with caplog.at_level(logging.INFO, logger="tahoe_ft"):
        train(tmp_path, "0905", "init_from=null", steps=1, val_every=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory floor")]
    assert len(lines) == 1 and bench_memory.FLOOR_LINE.search(lines[0])
