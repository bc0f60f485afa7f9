"""Embedded data sets: the synthetic ``demo`` (generated on first use) and the real ``papalexi`` screen.

- ``ensure_demo(cache_dir, spec)`` generates the demo data once per spec into ``cache_dir/demo-<hash>``,
  under a lock, so concurrent processes (DataLoader workers, DDP ranks, parallel runs) never see a half
  written directory.
- ``ensure_files(data)`` is what opening a data set calls (training, ``check``, the study's folds): it generates
  the demo, or prepares Papalexi or devel, when a file the data config names lies in one of their folders.
  Composing a config only derives these paths (``tahoe_ft.resolvers``); it never writes data.
- ``papalexi_path()`` returns the Papalexi et al. 2021 THP-1 CRISPR-KO screen (16,192 cells x 299 genes,
  raw counts; provenance and licence in ``tahoe_ft/assets/PAPALEXI.md``). The package ships it xz-compressed
  (``PAPALEXI_PACKED``); it is unpacked into the cache on first use. Without it, ``prepare_papalexi`` converts
  the shared source file (``$TAHOE_FT_SHARED/data/`` or ``../shared/data/`` beside the repository) there.
- ``devel_path()`` returns PerturBench's four-cell-line development screen (`data=devel`: 5,961 cells x 500
  genes, log1p; K562, A172, T98G, U87MG; provenance and the BSD-3 notice in ``assets/DEVEL.md``), shipped and
  unpacked the same way (``DEVEL_PACKED``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tahoe_ft.datasets.demo import DemoSpec, generate_demo, spec_hash
from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_path, atomic_write_text
from tahoe_ft.fileio import sha256_file as _sha256

log = logging.getLogger(__name__)

CACHE_ENV = "TAHOE_FT_CACHE"
SHARED_ENV = "TAHOE_FT_SHARED"
PACKAGE_DATA = Path(__file__).resolve().parent / "assets"  # data files shipped in the wheel
# src/tahoe_ft/datasets/embedded.py -> repo root (source checkout)
REPO_ROOT = Path(__file__).resolve().parents[3]

PAPALEXI_FILE = "papalexi2021_thp1_crisprko.h5ad"
PAPALEXI_PACKED = PAPALEXI_FILE + ".xz"  # the packaged copy (`_unpack_papalexi`)
PAPALEXI_SHA256 = "0ab7fafcc794e1dba84289fe012c977270a6218846d1ca7eb83d5d9cd0b312c8"
PAPALEXI_DATASET = "papalexi"
PAPALEXI_CELL_TYPE = "THP-1"
PAPALEXI_CONTROL = "non-targeting"
PAPALEXI_OBS = ("target_gene", "guide_id", "gem_group", "cell_type", "n_counts")
PAPALEXI_CONVERTER_VERSION = 1
# Few-shot split of the 25 targets (fixed lists, so the split never depends on a seed or library):
# - SPI1 (33 cells) and MYC (73) stay in train: too few cells for stable val/test metrics.
# - Every held-out target has >= 370 cells.
# - Both val and test mix targets inside the 299-gene panel (knock-down visible, and excluded by
#   cell-eval's PDS) with targets outside it (only downstream effects).
# - Pathway siblings stay in train for each held-out target: IFNGR1 / IRF1 / STAT1 (IFN-gamma-JAK-STAT),
#   STAT3 / STAT5A, so held-out perturbations have related training perturbations, as in VCC.
# PerturBench's development screen (Norman 2019 K562 CRISPRa + McFaline-Figueroa 2024 glioblastoma CRISPRi;
# provenance and the BSD-3 notice in assets/DEVEL.md): shipped xz'd, the h5ad written without HDF5 compression
DEVEL_FILE = "perturbench_devel_norman19_mcfaline23.h5ad"
DEVEL_PACKED = DEVEL_FILE + ".xz"
DEVEL_SOURCE_SHA256 = "220998f5630c813228c8661c86dd52244b9ac87127511289af90e0d900d8429b"  # the shared source
PAPALEXI_VAL = ("CAV1", "ETV7", "JAK2", "POU2F2", "UBE2L6")
PAPALEXI_TEST = ("CD86", "IFNGR2", "IRF7", "SMAD4", "STAT2", "TNFRSF14")


def default_cache_dir() -> Path:
    """``$TAHOE_FT_CACHE`` or ``./data_cache`` (the ``paths.data_cache`` default)."""
    return Path(os.environ.get(CACHE_ENV, "data_cache"))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX flock) held for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --- demo -----------------------------------------------------------------------------------------


def demo_dir(cache_dir: Path, spec: DemoSpec) -> Path:
    """The demo directory of ``spec``: ``cache_dir / "demo-<spec_hash>"``."""
    return Path(cache_dir) / f"demo-{spec_hash(spec)}"


# the specs whose demo folders `${tahoe_demo:FILE}` derived in this process, by spec hash: a config built by hand
# from a composed one (`DataConfig(path=compose(...).data.path)`) names a folder of a spec it no longer carries
_DERIVED_SPECS: dict[str, DemoSpec] = {}


def derived_demo_dir(cache_dir: Path, spec: DemoSpec) -> Path:
    """``demo_dir(cache_dir, spec)``, remembered so that `ensure_files` can generate it later (no file I/O)."""
    _DERIVED_SPECS.setdefault(spec_hash(spec), spec)
    return demo_dir(cache_dir, spec)


def ensure_demo(cache_dir: Path, spec: DemoSpec | None = None) -> dict[str, Path]:
    """The demo files of ``spec`` (``tahoe_ft.datasets.demo.FILES`` keys), generated on first use."""
    spec = spec or DemoSpec()
    out = demo_dir(cache_dir, spec)
    with _locked(Path(cache_dir) / f".demo-{spec_hash(spec)}.lock"):
        if not (out / "spec.json").exists():
            log.info("generating demo data (spec %s) in %s", spec_hash(spec), out)
        return generate_demo(out, spec)


# --- papalexi -------------------------------------------------------------------------------------


def find_papalexi_source() -> Path:
    """The shared source file: ``$TAHOE_FT_SHARED/data/...``, else ``../shared/data/...`` beside the repo."""
    return find_shared_source(PAPALEXI_FILE)


def find_shared_source(name: str) -> Path:
    """The shared source file `name`: ``$TAHOE_FT_SHARED/data/``, else ``../shared/data/`` beside the repo."""
    candidates = []
    if os.environ.get(SHARED_ENV):
        candidates.append(Path(os.environ[SHARED_ENV]) / "data" / name)
    candidates += [
        REPO_ROOT.parent / "shared" / "data" / name,
        Path.cwd().parent / "shared" / "data" / name,
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(
        f"source file {name} not found (looked in {[str(c.parent) for c in candidates]}); "
        f"set {SHARED_ENV}=<dir containing data/{name}>"
    )


def papalexi_split(
    h5ad_path: Path,
    out_path: Path | None = None,
    val: Sequence[str] = PAPALEXI_VAL,
    test: Sequence[str] = PAPALEXI_TEST,
) -> Path:
    """Write the cell-load style few-shot split TOML for the Papalexi file (default: ``split.toml`` beside it)."""
    h5ad_path = Path(h5ad_path).resolve()
    out_path = Path(out_path) if out_path is not None else h5ad_path.parent / "split.toml"
    if set(val) & set(test):
        raise UserError(f"papalexi split: val and test overlap in {sorted(set(val) & set(test))}")
    lines = [
        "# Papalexi 2021 THP-1 few-shot split (tahoe_ft.datasets.embedded.papalexi_split); controls shared by all splits",
        "[datasets]",
        f"{PAPALEXI_DATASET} = {json.dumps(str(h5ad_path))}",
        "",
        "[training]",
        f'{PAPALEXI_DATASET} = "train"',
        "",
        f'[fewshot."{PAPALEXI_DATASET}.{PAPALEXI_CELL_TYPE}"]',
        "val = [" + ", ".join(json.dumps(v) for v in sorted(val)) + "]",
        "test = [" + ", ".join(json.dumps(t) for t in sorted(test)) + "]",
        "",
    ]
    atomic_write_text(out_path, "\n".join(lines))
    return out_path


def _write_gene_names(names: Sequence[str], path: Path) -> None:
    atomic_write_text(path, "".join(f"{g}\n" for g in names))


def _papalexi_outputs(out_dir: Path) -> dict[str, Path]:
    # keys are the names of the `${tahoe_data:NAME}` resolver
    return {
        "papalexi": out_dir / PAPALEXI_FILE,
        "papalexi_split": out_dir / "split.toml",
        "papalexi_gene_names": out_dir / "gene_names.csv",
    }


def prepare_papalexi(src: Path, out_dir: Path, compression_level: int = 9) -> dict[str, Path]:
    """Write a compact, deterministic copy of the Papalexi screen plus its split and gene list.

    The copy keeps raw counts in ``X`` (CSR float32; the source's duplicate ``layers["counts"]``, the gRNA
    matrix and redundant obs columns are dropped), obs ``target_gene, guide_id, gem_group, cell_type,
    n_counts``, var ``positive_control_target``, and is gzip-compressed (level 9: 2.3 MB; level 4, the
    h5py default: 2.6 MB). Byte-identical across runs. Idempotent: skipped when ``papalexi.json`` says
    the same source and converter version were used.
    """
    import anndata as ad
    import scipy.sparse as sp

    src, out_dir = Path(src), Path(out_dir)
    outs = _papalexi_outputs(out_dir)
    marker_path = out_dir / "papalexi.json"
    sha = _sha256(src)
    marker = {
        "source_sha256": sha,
        "converter_version": PAPALEXI_CONVERTER_VERSION,
        "gzip": compression_level,
    }
    try:
        done = json.loads(marker_path.read_text()) == marker
    except (OSError, ValueError):
        done = False
    if done and all(p.exists() for p in outs.values()):
        return outs
    if sha != PAPALEXI_SHA256:
        log.warning("Papalexi source %s has sha256 %s, expected %s", src, sha, PAPALEXI_SHA256)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker_path.unlink(missing_ok=True)

    a = ad.read_h5ad(src)
    missing = [c for c in PAPALEXI_OBS if c not in a.obs]
    if missing:
        raise UserError(f"{src} lacks obs columns {missing}; is it the Papalexi file ({PAPALEXI_FILE})?")
    x = sp.csr_matrix(a.X, dtype=np.float32)
    x.sort_indices()
    if x.data.size and not np.array_equal(x.data, np.round(x.data)):
        raise UserError(f"{src}: X must hold raw integer counts")
    obs = a.obs[list(PAPALEXI_OBS)].copy()
    for col in obs.columns:
        if hasattr(obs[col], "cat"):
            obs[col] = obs[col].cat.remove_unused_categories()
    uns = {k: a.uns[k] for k in ("X_kind", "guide_assignment", "provenance") if k in a.uns}
    uns.update(
        control_label=PAPALEXI_CONTROL,
        perturbation_key="target_gene",
        source_file=PAPALEXI_FILE,
        source_sha256=sha,
        converter=f"tahoe_ft.datasets.prepare_papalexi v{PAPALEXI_CONVERTER_VERSION}",
    )
    out = ad.AnnData(X=x, obs=obs, var=a.var.copy(), uns=uns)
    with atomic_path(outs["papalexi"], suffix=".h5ad") as tmp:
        out.write_h5ad(tmp, compression="gzip", compression_opts=compression_level)
    _write_gene_names(out.var_names, outs["papalexi_gene_names"])
    papalexi_split(outs["papalexi"], outs["papalexi_split"])
    marker_path.write_text(json.dumps(marker, sort_keys=True) + "\n")
    return outs


def papalexi_outputs(cache_dir: Path) -> dict[str, Path]:
    """Where `ensure_papalexi(cache_dir)` puts the Papalexi files; no side effects."""
    return _papalexi_outputs(Path(cache_dir) / "papalexi")


def _unpack_papalexi(packed: Path, out: Path) -> None:
    """The packaged copy (`PAPALEXI_PACKED`: the h5ad written without HDF5 compression, then xz'd: 0.97 MB in
    git, where the gzip'd h5ad was 2.27 MB) decompressed to `out`, byte for byte; skipped when `out`'s marker
    names the same packed file."""
    _unpack(packed, out, out.parent / "papalexi.json")


def _unpack(packed: Path, out: Path, marker_path: Path) -> None:
    """An xz'd packaged file decompressed to `out`, byte for byte, with a marker naming the packed file (its
    name and sha256) written last; skipped when the marker names the same packed file and `out` exists."""
    import lzma

    marker = {"packaged": packed.name, "packed_sha256": _sha256(packed)}
    try:
        if json.loads(marker_path.read_text()) == marker and out.is_file():
            return
    except (OSError, ValueError):
        pass
    marker_path.unlink(missing_ok=True)
    with atomic_path(out, suffix=".h5ad") as tmp, lzma.open(packed) as src, open(tmp, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    marker_path.write_text(json.dumps(marker, sort_keys=True) + "\n")


def ensure_papalexi(cache_dir: Path | None = None) -> dict[str, Path]:
    """The Papalexi data, split TOML and gene list in `cache_dir/papalexi/`: unpacked from the packaged copy if
    shipped, else prepared from the shared source file."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache / "papalexi"
    packed = PACKAGE_DATA / PAPALEXI_PACKED
    with _locked(cache / ".papalexi.lock"):
        if not packed.is_file():
            return prepare_papalexi(find_papalexi_source(), out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        outs = _papalexi_outputs(out_dir)
        _unpack_papalexi(packed, outs["papalexi"])
        papalexi_split(outs["papalexi"], outs["papalexi_split"])  # cheap; names the copy's path
        if not outs["papalexi_gene_names"].exists():
            import anndata as ad

            _write_gene_names(
                ad.read_h5ad(outs["papalexi"], backed="r").var_names, outs["papalexi_gene_names"]
            )
        return outs


# --- devel: PerturBench's four-cell-line development screen ------------------------------------------


def devel_outputs(cache_dir: Path) -> dict[str, Path]:
    """Where `ensure_devel(cache_dir)` puts the devel screen (`${tahoe_data:devel}`); no side effects."""
    return {"devel": Path(cache_dir) / "devel" / DEVEL_FILE}


def ensure_devel(cache_dir: Path | None = None) -> dict[str, Path]:
    """The devel screen in `cache_dir/devel/`, unpacked from the packaged copy (`DEVEL_PACKED`) on first use;
    without it (a copy of the package that dropped its assets), the shared source file rewritten the same way
    (same values and annotations, written without HDF5 compression)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    outs = devel_outputs(cache)
    out = outs["devel"]
    packed = PACKAGE_DATA / DEVEL_PACKED
    with _locked(cache / ".devel.lock"):
        out.parent.mkdir(parents=True, exist_ok=True)
        if packed.is_file():
            _unpack(packed, out, out.parent / "devel.json")
        elif not out.is_file():
            import anndata as ad

            src = find_shared_source(DEVEL_FILE)
            with atomic_path(out, suffix=".h5ad") as tmp:
                ad.read_h5ad(src).write_h5ad(tmp)
        return outs


def devel_path(cache_dir: Path | None = None) -> Path:
    """Path of the devel screen (5,961 cells x 500 genes, log1p; `assets/DEVEL.md`), unpacked on first use."""
    return ensure_devel(cache_dir)["devel"]


# --- the files a data config names -----------------------------------------------------------------


def _named_files(value: Any) -> list[Path]:
    """The paths in a path-valued data key: a str or a list of them (None, and non-str entries, name none)."""
    if isinstance(value, str) and value:
        return [Path(value).expanduser()]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _named_files(v)]
    return []


def ensure_files(data: Any) -> None:
    """Generate or prepare the embedded data a data config (`config.DataConfig`) names, where missing.

    Keyed on the paths, not on ``data.name`` (`pretrain` names demo files under any data set): a file of
    ``data.path`` (one or a list), ``pert_features``, ``gene_list`` or ``split_toml`` in a ``demo-<hash>`` folder
    of ``data.demo``'s spec (or of a spec this process derived a path for) generates that demo, once, into the
    folder's parent; a missing file of a ``papalexi`` folder (``_papalexi_outputs``) prepares Papalexi there, and
    the ``devel`` file (``devel_outputs``) unpacks the devel screen.
    Cheap when the data exists: a few ``stat`` calls, no hashing.
    """
    spec = data.demo if data.demo is not None else DemoSpec()
    if isinstance(spec, dict):
        spec = DemoSpec.from_dict(spec)
    specs = {**_DERIVED_SPECS, spec_hash(spec): spec}
    done: set[Path] = set()
    for key in ("path", "pert_features", "gene_list", "split_toml"):
        for path in _named_files(getattr(data, key)):
            folder = path.parent
            if folder in done:
                continue
            digest = folder.name.removeprefix("demo-")
            if folder.name.startswith("demo-") and digest in specs:
                if not ((folder / "spec.json").exists() and path.exists()):  # spec.json is written last
                    ensure_demo(folder.parent, specs[digest])
                done.add(folder)
            elif folder.name == "devel" and path in devel_outputs(folder.parent).values():
                ensure_devel(folder.parent)  # cheap when unpacked: a marker read and a sha256 of 0.55 MB
                done.add(folder)
            elif folder.name == "papalexi" and path in _papalexi_outputs(folder).values():
                # with the packaged copy, always (cheap): a cache from before it holds a stale split TOML
                if not path.exists() or (PACKAGE_DATA / PAPALEXI_PACKED).is_file():
                    ensure_papalexi(folder.parent)
                    done.add(folder)


def papalexi_path(cache_dir: Path | None = None) -> Path:
    """Path of the Papalexi screen (unpacked from the packaged copy, or prepared from the shared source, on
    first use)."""
    return ensure_papalexi(cache_dir)["papalexi"]
