"""`data=devel`: PerturBench's four-cell-line screen ships xz'd and unpacks byte for byte into the data cache."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np

from conftest_train import cli
from tahoe_ft.datasets import embedded

# the packaged copy, unpacked (what `data=devel` reads): sha256 of its bytes (DEVEL.md)
DEVEL_UNPACKED_SHA256 = "6ef14808c1c4194487e9ce4c596048153d32f108d2585e241db14677c7b8cec9"


def test_the_packaged_devel_copy_unpacks_once_to_the_same_screen(tmp_path):
    packed = embedded.PACKAGE_DATA / embedded.DEVEL_PACKED
    assert packed.stat().st_size < 600_000
    assert (embedded.PACKAGE_DATA / "DEVEL.md").read_text().count("BSD 3-Clause License") == 1
    path = embedded.devel_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / "devel" / embedded.DEVEL_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEVEL_UNPACKED_SHA256
    a = ad.read_h5ad(path)
    assert a.shape == (5961, 500) and a.X.dtype == np.float64
    assert sorted(a.obs["cell_type"].unique()) == ["A172", "T98G", "U87MG", "k562"]
    assert (a.obs["condition"] == "control").sum() == 400
    assert a.obs.loc[a.obs["cell_type"] == "k562", "condition"].str.contains(r"\+").any()
    mtime = path.stat().st_mtime_ns
    assert embedded.devel_path(tmp_path / "cache") == path and path.stat().st_mtime_ns == mtime  # not again


def test_check_reads_the_devel_screen(tmp_path):
    out = cli("check", "data=devel", f"paths.data_cache={tmp_path / 'cache'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["files"] == [str((tmp_path / "cache" / "devel" / embedded.DEVEL_FILE).resolve())]
    assert (
        summary["genes"] == 500 and summary["input_transform"] == "log1p" and summary["control"] == "control"
    )
    assert sorted(summary["cell_types"]) == ["A172", "T98G", "U87MG", "k562"]
    # 33 perturbations besides the control (18 K562 singles, 15 doubles; the 9 kinase genes in every line)
    assert len(summary["splits"]["train"]["perturbations"]) == 33
    assert summary["splits"]["train"]["cells"] + 400 == 5961  # every perturbed cell trains; 400 controls
