"""Row-read throughput of tahoe_ft's h5ad reader vs anndata backed mode and cell-load's per-row fetch.

Writes a synthetic CSR .h5ad (18,080 genes, ~5,000 cells, density ~0.1) in a temp dir, then reads the same
random rows (distinct, unsorted; a fresh draw per repeat) with each reader and prints the median of 3
repeats in rows/s and the ratios. The file sits in the OS page cache for every reader, so this measures
the readers, not the disk. Also times one training epoch through `PerturbationDataModule` (num_workers=0).

    PYTHONPATH=src .venv/bin/python scripts/bench_loader.py
    # with cell-load 0.10.4 (installed in another venv; never in .venv):
    PYTHONPATH=src /path/to/venv-with-cell-load/bin/python scripts/bench_loader.py

anndata and cell_load are optional: a reader that cannot be imported is skipped.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from tahoe_ft.config import DataConfig
from tahoe_ft.data import H5Screen, PerturbationDataModule

warnings.filterwarnings("ignore")


def write_file(path: Path, n_cells: int, n_genes: int, density: float, seed: int) -> None:
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float32, random_state=seed)
    X.data = np.log1p(X.data * 10).astype(np.float32)
    perts = np.array(["non-targeting"] + [f"P{i}" for i in range(49)])
    pert = perts[rng.integers(0, len(perts), n_cells)]
    pert[: n_cells // 10] = "non-targeting"
    obs = pd.DataFrame(
        {
            "target_gene": pert,
            "gene": pert,  # cell-load's default column name
            "cell_type": "K562",
            "gem_group": rng.choice(["g1", "g2"], n_cells),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)]))
    adata.strings_to_categoricals()
    adata.write_h5ad(path)


def bytes_read() -> int | None:
    """Bytes this process has read via read()/pread() (Linux), page-cache hits included."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def timed(fn, rows_per_call: int, draws: list[np.ndarray]) -> tuple[float, float | None]:
    """(median rows/s, median MiB read from the file per call) over the repeats (one call per draw)."""
    rates, mib = [], []
    for rows in draws:
        b0 = bytes_read()
        t0 = time.perf_counter()
        fn(rows)
        rates.append(rows_per_call / (time.perf_counter() - t0))
        b1 = bytes_read()
        if b0 is not None and b1 is not None:
            mib.append((b1 - b0) / 2**20)
    return statistics.median(rates), (statistics.median(mib) if mib else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=18080)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--rows", type=int, default=512, help="rows per read (one read = one call)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cell-load-rows", type=int, default=256, help="rows per cell-load repeat (it is slow)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5ad"
        t0 = time.perf_counter()
        write_file(path, args.cells, args.genes, args.density, seed=0)
        size_mb = path.stat().st_size / 2**20
        print(
            f"file: {args.cells} cells x {args.genes} genes, density {args.density}, CSR, {size_mb:.0f} MiB "
            f"(written in {time.perf_counter() - t0:.1f} s)"
        )
        rng = np.random.default_rng(1)
        draws = [rng.choice(args.cells, args.rows, replace=False) for _ in range(args.repeats)]
        results: dict[str, tuple[float, float | None]] = {}

        screen = H5Screen(path)
        need_mib = args.rows * args.genes * args.density * 8 / 2**20  # data + indices of the rows
        screen.read_rows(draws[0][:8])  # open the datasets once, as a worker would
        results["tahoe_ft H5Screen.read_rows"] = timed(screen.read_rows, args.rows, draws)
        block = [np.arange(s, s + args.rows) for s in rng.integers(0, args.cells - args.rows, args.repeats)]
        results["tahoe_ft read_rows, one contiguous block"] = timed(screen.read_rows, args.rows, block)

        try:
            import anndata as ad

            backed = ad.read_h5ad(path, backed="r")

            def anndata_read(rows: np.ndarray) -> np.ndarray:
                order = np.argsort(rows)
                sub = backed.X[rows[order]]
                dense = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
                out = np.empty_like(dense)
                out[order] = dense
                return out

            ref = anndata_read(draws[0])
            np.testing.assert_array_equal(screen.read_rows(draws[0]), ref)
            results["anndata backed X[rows].toarray()"] = timed(anndata_read, args.rows, draws)
        except ImportError:
            print("anndata not importable: skipped")

        try:
            import torch
            from cell_load.dataset import PerturbationDataset
            from cell_load.mapping_strategies import RandomMappingStrategy

            ds = PerturbationDataset(
                name="bench",
                h5_path=path,
                mapping_strategy=RandomMappingStrategy(),
                pert_col="gene",
                cell_type_key="cell_type",
                batch_col="gem_group",
                control_pert="non-targeting",
                output_space="all",
            )
            n_cl = min(args.cell_load_rows, args.rows)

            def cell_load_read(rows: np.ndarray) -> np.ndarray:
                ds._fetch_gene_expression_raw.cache_clear()  # distinct rows: no cache hits, as in a first epoch
                return torch.stack([ds.fetch_gene_expression(int(i)) for i in rows[:n_cl]]).numpy()

            np.testing.assert_array_equal(cell_load_read(draws[0]), screen.read_rows(draws[0][:n_cl]))
            rate, mib = timed(cell_load_read, n_cl, draws)
            results["cell-load fetch_gene_expression (per row)"] = (
                rate,
                mib * args.rows / n_cl if mib else mib,
            )
        except ImportError:
            print("cell_load not importable: skipped (install cell-load==0.10.4 in another venv to compare)")

        # one training epoch through the data module: 8 sets per batch, pert + ctrl rows
        set_len = max(1, min(64, args.cells // 100))  # ~100 cells per (cell type, pert) group in this file
        dm = PerturbationDataModule(
            DataConfig(path=str(path), batch_size=8),
            embed_key=None,
            need_counts=False,
            cell_set_len=set_len,
            seed=0,
        )
        dm.setup()
        loader = dm.train_dataloader()
        epoch_rates = []
        for epoch in range(args.repeats):
            dm.train_plan.set_epoch(epoch)
            t0 = time.perf_counter()
            n = sum(2 * b["pert_cell_emb"].shape[0] * b["pert_cell_emb"].shape[1] for b in loader)
            epoch_rates.append(n / (time.perf_counter() - t0))
        results[f"tahoe_ft train epoch (pert+ctrl rows, B=8, S={set_len})"] = (
            statistics.median(epoch_rates),
            None,
        )

    base = results["tahoe_ft H5Screen.read_rows"][0]
    print(
        f"{args.rows} random distinct rows per read call; the needed bytes are ~{need_mib:.1f} MiB per call"
    )
    print(
        f"{'reader':52s} {'rows/s (median of ' + str(args.repeats) + ')':>24s} {'MiB read/call':>14s} {'ours / it':>10s}"
    )
    for name, (rate, mib) in results.items():
        mib_s = f"{mib:14.1f}" if mib is not None else f"{'-':>14s}"
        print(f"{name:52s} {rate:24,.0f} {mib_s} {base / rate:9.1f}x")


if __name__ == "__main__":
    main()
