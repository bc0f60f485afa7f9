"""Predicted sets: random draws of basal control cells, as training sets are."""

from __future__ import annotations

import numpy as np

from tahoe_ft.prediction import draw_basal


def test_basal_sets_mix_replicates_of_a_file_stored_by_replicate():
    # a control pool stored sorted by replicate: rows 0-299 replicate 0, 300-599 replicate 1
    pool = np.arange(600)
    replicate = pool // 300
    rows = draw_basal(np.random.default_rng(0), pool, 256)
    sets = rows.reshape(-1, 32)  # cell_set_len 32, in the order predict reads and cuts them
    mixed = [len(set(replicate[s])) == 2 for s in sets]
    assert all(mixed)  # a sorted draw would give sets of one replicate each
    assert np.unique(rows).size == rows.size  # without replacement while the pool is large enough
    assert not np.array_equal(rows, np.sort(rows))


def test_basal_draws_repeat_cells_only_when_the_pool_is_smaller():
    rows = draw_basal(np.random.default_rng(0), np.arange(10), 25)
    assert rows.size == 25 and set(rows) <= set(range(10))
