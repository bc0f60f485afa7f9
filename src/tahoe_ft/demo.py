"""Deterministic synthetic perturbation screens on one latent biology (SPEC §5.4).

(A little over 500 lines: the biology, the two designs and the writers share the one seeded generator and are
kept together so a reader can follow every random draw from the seed to the files.)

One seed fixes a "biology": gene baseline expression, sparse gene programs, cell-type offsets in program
space, per-gene dispersions, and a fixed lossy linear map from log1p expression to a low-dimensional
``X_state`` (the SE600M stand-in). Two data sets are drawn from it:

- ``screen.h5ad``: the fine-tuning CRISPR screen. Each perturbation knocks down its target gene, moves a
  few shared gene programs (low rank) and a sparse set of DE genes, partly depending on the cell type.
- ``pretrain.h5ad``: a drug screen on other cell lines, same genes, programs and ``X_state`` map; drug
  effects are program-level with dose-response magnitudes. ``reproduce`` trains the base model (the
  ST-Tahoe stand-in) on it.

Counts are negative-binomial (gamma-Poisson) around per-cell library sizes; ``X`` is
``log1p(normalize_total(counts, 1e4))``. Generation is vectorised over blocks of cells, so 18,080 genes
fit in a few GB. ``X_state`` is a random projection of the centred log1p expression to ``state_dim``
dimensions plus noise: programs and cell types survive it, single-gene effects (knock-downs, sparse DE
genes) are mostly lost — the representation mismatch of the case study, observable on toy data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tahoe_ft.errors import UserError
from tahoe_ft.fileio import atomic_path
from tahoe_ft.fileio import atomic_write_text as _atomic_write_text

log = logging.getLogger(__name__)

# Bump when the generated biology or file layout changes: cached demo dirs are keyed by this too.
GENERATOR_VERSION = 1

CONTROL_PERT = "non-targeting"
CONTROL_DRUG = "DMSO_TF"
PERT_COL = "target_gene"
DRUG_COL = "drug"
CELL_TYPE_COL = "cell_type"
BATCH_COL = "batch"
TARGET_SUM = 1e4  # normalize_total target, as VCC / cell-eval
SCREEN_DATASET = "screen"  # dataset names in the split TOMLs
PRETRAIN_DATASET = "pretrain"

FILES = {
    "screen": "screen.h5ad",
    "pretrain": "pretrain.h5ad",
    "pert_features": "pert_features.pt",
    "gene_names": "gene_names.csv",
    "split": "split.toml",
    "pretrain_split": "pretrain_split.toml",
    "truth": "truth.npz",
    "readme": "README.md",
    "spec": "spec.json",
}

# --- the biology's knobs (named so the README and tests can refer to them) -------------------------
BASE_LOG_SD = 1.5  # sd of gene baseline log-expression (lognormal mean expression across genes)
PROGRAM_DENSITY = 0.08  # fraction of genes loaded on one program
PROGRAM_LOADING_SD = 0.7  # loading size (natural-log fold change per unit program activity)
CELL_TYPE_PROGRAM_SD = 1.5  # cell-type offsets in program space
CELL_TYPE_GENE_SD = 0.5  # small gene-level cell-type differences on top
BATCH_GENE_SD = 0.1  # per-gene batch shifts
CELL_PROGRAM_SD = 0.25  # per-cell program activity noise (correlated cell-to-cell variation)
LIBRARY_LOG_SD = 0.3  # per-cell library size: lognormal(0, 0.3) around the spec's mean
DISPERSION_RANGE = (0.2, 0.5)  # NB dispersion phi (var = mu + phi mu^2), per gene
PENETRANCE_SD = 0.25  # per-cell scaling of the perturbation effect, clipped to [0, 1.5]
KNOCKDOWN_LOG2FC = (-3.0, -2.0)
DE_GENES_RANGE = (10, 40)
DE_EFFECT_SD = 0.7
WEAK_PERT_FRACTION = 0.25
STATE_NOISE_SD = 0.05  # X_state noise, relative to the unit-variance projection
DOSES_UM = (0.1, 1.0, 10.0)  # drug doses (uM); effect magnitude follows a Hill curve dose / (dose + EC50)


@dataclass(frozen=True)
class DemoSpec:
    """Size and seed of the demo data. Defaults are the default demo; tests use tiny sizes."""

    n_genes: int = 2000
    n_cell_types: int = 3
    n_batches: int = 2
    n_perts: int = 40  # genetic perturbations in the screen (targets are genes of the panel)
    cells_per_pert: int = 60  # per cell type; varies +-50% per (cell type, perturbation)
    n_ctrl: int = 300  # control cells per cell type
    n_programs: int = 12  # latent gene programs
    state_dim: int = 64  # X_state width (SE600M stand-in), lower than n_genes
    pert_feature_dim: int = 32  # ESM2 stand-in width
    n_drugs: int = 30  # drug x dose conditions in the pre-training set
    pretrain_cells_per_drug: int = 60  # per cell line; varies +-50%
    pretrain_ctrl: int = 400  # DMSO_TF cells per cell line
    n_pretrain_cell_types: int = 3  # cell lines of the drug set (CL0..)
    n_val_perts: int = 6
    n_test_perts: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DemoSpec:
        """Build a spec from a (possibly partial) dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown demo spec keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def asdict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def tiny_spec(**overrides: int) -> DemoSpec:
    """A demo small enough for unit tests (generates in well under a second)."""
    d: dict[str, int] = dict(
        n_genes=60, n_cell_types=2, n_batches=2, n_perts=8, cells_per_pert=20, n_ctrl=60, n_programs=4,
        state_dim=16, pert_feature_dim=8, n_drugs=6, pretrain_cells_per_drug=20, pretrain_ctrl=60,
        n_pretrain_cell_types=2, n_val_perts=2, n_test_perts=2, seed=0,
    )  # fmt: skip
    d.update(overrides)
    return DemoSpec(**d)


def _validate(s: DemoSpec) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"invalid demo spec: {what} (spec {dataclasses.asdict(s)})")

    for f in dataclasses.fields(s):
        v = getattr(s, f.name)
        need(isinstance(v, int) and not isinstance(v, bool), f"{f.name} must be an int, got {v!r}")
    need(s.n_genes >= 20, "n_genes must be >= 20")
    need(min(s.n_cell_types, s.n_batches, s.n_programs, s.pert_feature_dim) >= 1, "sizes must be >= 1")
    need(min(s.cells_per_pert, s.n_ctrl, s.pretrain_cells_per_drug, s.pretrain_ctrl) >= 2, "cell counts >= 2")
    need(1 <= s.n_perts <= s.n_genes // 2, "n_perts must be in [1, n_genes // 2] (targets are panel genes)")
    need(min(s.n_val_perts, s.n_test_perts) >= 0, "n_val_perts and n_test_perts must be >= 0")
    need(s.n_val_perts + s.n_test_perts < s.n_perts, "n_val_perts + n_test_perts must be < n_perts")
    need(1 <= s.state_dim < s.n_genes, "state_dim must be in [1, n_genes)")
    need(s.n_drugs >= 2, "n_drugs must be >= 2 (one is held out for validation)")
    need(s.n_pretrain_cell_types >= 1, "n_pretrain_cell_types must be >= 1")
    need(s.seed >= 0, "seed must be >= 0")


def _canonical(spec: DemoSpec) -> dict[str, Any]:
    return {"generator_version": GENERATOR_VERSION, "spec": spec.asdict()}


def spec_hash(spec: DemoSpec) -> str:
    """Short sha256 of the spec's canonical JSON (with the generator version)."""
    blob = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --- the latent biology ---------------------------------------------------------------------------


@dataclass
class _Biology:
    gene_names: list[str]
    base_logit: np.ndarray  # [G] log relative expression
    programs: np.ndarray  # [K, G] sparse-ish loadings
    dispersion: np.ndarray  # [G] NB phi
    state_map: np.ndarray  # [G, D] fixed lossy map log1p -> X_state
    state_centre: np.ndarray  # [G] subtracted before the map
    library_mean: float  # mean counts per cell


def _make_biology(rng: np.random.Generator, s: DemoSpec) -> _Biology:
    g, k = s.n_genes, s.n_programs
    base = rng.normal(0.0, BASE_LOG_SD, g)
    density = max(PROGRAM_DENSITY, 4.0 / g)
    programs = (rng.random((k, g)) < density) * rng.normal(0.0, PROGRAM_LOADING_SD, (k, g))
    dispersion = rng.uniform(*DISPERSION_RANGE, g)
    state_map = rng.normal(0.0, 1.0 / math.sqrt(g), (g, s.state_dim))
    p = np.exp(base - base.max())
    centre = np.log1p(TARGET_SUM * p / p.sum())
    # ~3 counts per gene, within 2,000-10,000 per cell (VCC-like depth for 18,080 genes is far higher,
    # but 10,000 keeps the benchmark files small while sparse enough to be realistic).
    library_mean = float(np.clip(3.0 * g, 2000.0, 10000.0))
    names = [f"GENE{i + 1:05d}" for i in range(g)]
    return _Biology(names, base, programs, dispersion, state_map, centre, library_mean)


@dataclass
class _Design:
    """One data set's conditions: per (condition, cell type) log-space effects and the cells to draw."""

    cond_names: list[str]  # index 0 = control
    cell_type_names: list[str]
    batch_names: list[str]
    cell_type_logit: np.ndarray  # [C, G] cell-type baseline shift
    batch_logit: np.ndarray  # [B, G]
    effects: np.ndarray  # [n_cond, C, G] float32, row 0 = 0
    cond_idx: np.ndarray  # [N] per cell (shuffled order)
    ct_idx: np.ndarray  # [N]
    batch_idx: np.ndarray  # [N]


def _cell_type_logit(rng: np.random.Generator, bio: _Biology, n: int) -> np.ndarray:
    offsets = rng.normal(0.0, CELL_TYPE_PROGRAM_SD, (n, bio.programs.shape[0]))
    return offsets @ bio.programs + rng.normal(0.0, CELL_TYPE_GENE_SD, (n, len(bio.gene_names)))


def _draw_cells(
    rng: np.random.Generator, n_cond: int, n_ct: int, n_batches: int, per_cond: int, n_ctrl: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell counts per (cell type, condition): NB-ish around ``per_cond``, clipped to +-50%; shuffled rows."""
    lo, hi = max(1, math.ceil(0.5 * per_cond)), max(1, math.floor(1.5 * per_cond))
    n = rng.poisson(rng.gamma(4.0, per_cond / 4.0, (n_ct, n_cond))).clip(lo, hi)
    n[:, 0] = n_ctrl
    cond = np.tile(np.arange(n_cond), n_ct)
    ct = np.repeat(np.arange(n_ct), n_cond)
    counts = n.ravel()
    cond_idx, ct_idx = np.repeat(cond, counts), np.repeat(ct, counts)
    batch_idx = rng.integers(0, n_batches, cond_idx.size)
    perm = rng.permutation(cond_idx.size)
    return cond_idx[perm], ct_idx[perm], batch_idx[perm]


def _screen_design(rng: np.random.Generator, bio: _Biology, s: DemoSpec) -> tuple[_Design, dict[str, Any]]:
    g, k, p, c = s.n_genes, s.n_programs, s.n_perts, s.n_cell_types
    # targets: expressed genes, so the knock-down is measurable
    expressed = np.argsort(-bio.base_logit, kind="stable")[: max(p, g // 2)]
    targets = np.sort(rng.choice(expressed, size=p, replace=False))
    # low-rank part: perturbations come in groups (pathways) that share 1-3 programs
    n_groups = max(2, p // 5)
    group_of = rng.integers(0, n_groups, p)
    top = np.argsort(rng.random((n_groups, k)), axis=1)[:, : min(3, k)]
    n_used = rng.integers(1, min(3, k) + 1, n_groups)
    mask = np.zeros((n_groups, k), bool)
    mask[
        np.repeat(np.arange(n_groups), n_used),
        np.concatenate([t[:u] for t, u in zip(top, n_used, strict=True)]),
    ] = True
    group_dir = mask * rng.normal(0.0, 1.0, (n_groups, k))
    strength = rng.uniform(0.4, 1.2, p)
    weak = rng.random(p) < WEAK_PERT_FRACTION
    strength[weak] *= 0.15
    own = rng.normal(0.0, 0.3, (p, k))
    prog_shared = strength[:, None] * (group_dir[group_of] + own)  # [P, K]
    prog = prog_shared[:, None, :] + 0.3 * strength[:, None, None] * rng.normal(0.0, 1.0, (p, c, k))
    # sparse DE genes (never the target): a shared set, per-cell-type rescaled, plus cell-type-only genes
    lo, hi = DE_GENES_RANGE
    n_de = rng.integers(min(lo, g // 4), min(hi, g // 4) + 1, p)
    r = rng.random((p, g))
    r[np.arange(p), targets] = 2.0
    order = np.argsort(r, axis=1)[:, : n_de.max()]
    de_mask = np.zeros((p, g), bool)
    rows = np.repeat(np.arange(p), n_de)
    de_mask[rows, np.concatenate([o[:n] for o, n in zip(order, n_de, strict=True)])] = True
    de_scale = np.where(weak, 0.3, 1.0)[:, None]
    de_shared = de_mask * rng.normal(0.0, DE_EFFECT_SD, (p, g)) * de_scale
    de_ct = de_shared[:, None, :] * (1.0 + 0.3 * rng.normal(0.0, 1.0, (p, c, g)))
    ct_only = (rng.random((p, c, g)) < (0.3 * n_de / g)[:, None, None]) & ~de_mask[:, None, :]
    ct_only[np.arange(p), :, targets] = False
    de_ct += ct_only * rng.normal(0.0, DE_EFFECT_SD, (p, c, g)) * de_scale[:, :, None]
    kd = rng.uniform(*KNOCKDOWN_LOG2FC, p)[:, None] + 0.2 * rng.normal(0.0, 1.0, (p, c))
    effects = np.zeros((p + 1, c, g), np.float32)
    effects[1:] = np.einsum("pck,kg->pcg", prog, bio.programs) + de_ct
    effects[1 + np.arange(p)[:, None], np.arange(c)[None, :], targets[:, None]] += kd * math.log(2.0)

    ct_logit = _cell_type_logit(rng, bio, c)
    batch_logit = rng.normal(0.0, BATCH_GENE_SD, (s.n_batches, g))
    cond_idx, ct_idx, batch_idx = _draw_cells(rng, p + 1, c, s.n_batches, s.cells_per_pert, s.n_ctrl)
    names = [CONTROL_PERT] + [bio.gene_names[t] for t in targets]
    design = _Design(
        names, [f"CT{i}" for i in range(c)], [f"batch{i}" for i in range(s.n_batches)], ct_logit,
        batch_logit, effects, cond_idx, ct_idx, batch_idx,
    )  # fmt: skip
    truth = {
        "screen_perts": np.array(names[1:]), "screen_targets": targets, "screen_groups": group_of,
        "screen_weak": weak, "screen_program_weights": prog_shared, "screen_de_mask": de_mask,
        "screen_effects": effects, "screen_knockdown_log2fc": kd,
    }  # fmt: skip
    return design, truth


def _pretrain_design(rng: np.random.Generator, bio: _Biology, s: DemoSpec) -> tuple[_Design, dict[str, Any]]:
    g, k, c = s.n_genes, s.n_programs, s.n_pretrain_cell_types
    n_comp = math.ceil(s.n_drugs / len(DOSES_UM))
    comp_of = np.arange(s.n_drugs) // len(DOSES_UM)
    dose = np.array([DOSES_UM[i % len(DOSES_UM)] for i in range(s.n_drugs)])
    names = [CONTROL_DRUG] + [f"DRUG{cc:02d}_{d:g}uM" for cc, d in zip(comp_of, dose, strict=True)]
    # compounds act on 1-3 programs; magnitude = max effect x Hill(dose, EC50); cell lines differ in
    # sensitivity (a scalar) and a little in direction
    mask = rng.random((n_comp, k)) < min(1.0, 2.0 / k)
    mask[np.arange(n_comp), rng.integers(0, k, n_comp)] = True
    direction = mask * rng.normal(0.0, 1.5, (n_comp, k))
    ec50 = np.exp(rng.normal(0.0, 1.0, n_comp))
    hill = dose / (dose + ec50[comp_of])
    sens = np.exp(rng.normal(0.0, 0.3, (1, c, 1)))
    per_line = direction[comp_of][:, None, :] + 0.3 * rng.normal(0.0, 1.0, (s.n_drugs, c, k))
    prog = hill[:, None, None] * sens * per_line  # [D, C, K]
    effects = np.zeros((s.n_drugs + 1, c, g), np.float32)
    effects[1:] = np.einsum("dck,kg->dcg", prog, bio.programs)

    ct_logit = _cell_type_logit(rng, bio, c)
    batch_logit = rng.normal(0.0, BATCH_GENE_SD, (s.n_batches, g))
    cond_idx, ct_idx, batch_idx = _draw_cells(
        rng, s.n_drugs + 1, c, s.n_batches, s.pretrain_cells_per_drug, s.pretrain_ctrl
    )
    design = _Design(
        names, [f"CL{i}" for i in range(c)], [f"plate{i}" for i in range(s.n_batches)], ct_logit,
        batch_logit, effects, cond_idx, ct_idx, batch_idx,
    )  # fmt: skip
    return design, {"pretrain_drugs": np.array(names[1:]), "pretrain_program_weights": prog}


# --- counts, normalisation, X_state ---------------------------------------------------------------


def _block_rows(n_genes: int) -> int:
    # fixed by the spec (the random stream depends on it); ~8M entries per dense block
    return int(max(64, min(4096, 2**23 // n_genes)))


def _simulate(
    rng: np.random.Generator, bio: _Biology, d: _Design
) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """NB counts, log1p-normalised X and X_state for the design's cells, block by block."""
    n, g = d.cond_idx.size, len(bio.gene_names)
    shape = 1.0 / bio.dispersion
    counts_blocks, x_blocks, state_blocks = [], [], []
    for start in range(0, n, _block_rows(g)):
        sl = slice(start, min(n, start + _block_rows(g)))
        cond, ct, b = d.cond_idx[sl], d.ct_idx[sl], d.batch_idx[sl]
        m = cond.size
        penetrance = np.clip(rng.normal(1.0, PENETRANCE_SD, m), 0.0, 1.5)
        z = rng.normal(0.0, CELL_PROGRAM_SD, (m, bio.programs.shape[0]))
        logit = z @ bio.programs
        logit += bio.base_logit
        logit += d.cell_type_logit[ct]
        logit += d.batch_logit[b]
        logit += penetrance[:, None] * d.effects[cond, ct]
        logit -= logit.max(axis=1, keepdims=True)
        mu = np.exp(logit, out=logit)
        lib = bio.library_mean * np.exp(rng.normal(0.0, LIBRARY_LOG_SD, m))
        mu *= (lib / mu.sum(axis=1))[:, None]
        lam = rng.gamma(shape, mu * bio.dispersion)  # gamma-Poisson = NB(mean mu, dispersion phi)
        del mu, logit
        counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
        del lam
        x = counts.copy()
        totals = np.asarray(counts.sum(axis=1)).ravel()
        scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
        x.data = np.log1p(x.data * np.repeat(scale, np.diff(x.indptr))).astype(np.float32)
        state = np.asarray(x @ bio.state_map) - bio.state_centre @ bio.state_map
        state += rng.normal(0.0, STATE_NOISE_SD, state.shape)
        counts_blocks.append(counts)
        x_blocks.append(x)
        state_blocks.append(state.astype(np.float32))
    return (
        sp.vstack(counts_blocks, format="csr"),
        sp.vstack(x_blocks, format="csr"),
        np.concatenate(state_blocks),
    )


def _to_anndata(bio: _Biology, d: _Design, pert_col: str, rng: np.random.Generator, spec: DemoSpec):
    import anndata as ad

    counts, x, state = _simulate(rng, bio, d)
    n = d.cond_idx.size
    obs = pd.DataFrame(
        {
            pert_col: pd.Categorical.from_codes(d.cond_idx, categories=d.cond_names),
            CELL_TYPE_COL: pd.Categorical.from_codes(d.ct_idx, categories=d.cell_type_names),
            BATCH_COL: pd.Categorical.from_codes(d.batch_idx, categories=d.batch_names),
            "n_counts": np.asarray(counts.sum(axis=1)).ravel().astype(np.float32),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n)]),
    )
    # categories in sorted order, as anndata / cell-load users expect
    for col in (pert_col, CELL_TYPE_COL, BATCH_COL):
        obs[col] = obs[col].cat.reorder_categories(sorted(obs[col].cat.categories))
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(bio.gene_names)))
    adata.layers["counts"] = counts
    adata.obsm["X_state"] = state
    adata.uns["log1p"] = {"base": None}
    adata.uns["demo"] = {"synthetic": True, "spec": json.dumps(spec.asdict(), sort_keys=True)}
    return adata


def _pert_features(rng: np.random.Generator, s: DemoSpec, truth: dict[str, Any]) -> dict[str, Any]:
    """ESM2 stand-in: a fixed random projection of each perturbation's program weights, plus noise."""
    import torch

    weights = truth["screen_program_weights"]  # [P, K]
    proj = rng.normal(0.0, 1.0 / math.sqrt(s.n_programs), (s.n_programs, s.pert_feature_dim))
    feats = weights @ proj
    feats += rng.normal(0.0, 0.3 * max(float(feats.std()), 1e-3), feats.shape)
    out = {CONTROL_PERT: torch.zeros(s.pert_feature_dim, dtype=torch.float32)}
    for name, vec in zip(truth["screen_perts"].tolist(), feats, strict=True):
        out[name] = torch.tensor(vec, dtype=torch.float32)
    return dict(sorted(out.items()))


# --- writing --------------------------------------------------------------------------------------


def _toml_list(names: list[str]) -> str:
    return "[" + ", ".join(json.dumps(n) for n in names) + "]"


def _split_toml(dataset: str, path: Path, cell_types: list[str], val: list[str], test: list[str]) -> str:
    lines = [
        "# cell-load style split (generated by tahoe_ft.demo); control cells are shared by all splits",
        "[datasets]",
        f"{dataset} = {json.dumps(str(path))}",
        "",
        "[training]",
        f'{dataset} = "train"',
        "",
    ]
    for ct in cell_types:
        lines += [f'[fewshot."{dataset}.{ct}"]', f"val = {_toml_list(val)}", f"test = {_toml_list(test)}", ""]
    return "\n".join(lines)


def _readme(spec: DemoSpec, val: list[str], test: list[str], drug_val: list[str]) -> str:
    return f"""# tahoe-ft demo data (synthetic)

Generated by `tahoe_ft.demo.generate_demo` (generator version {GENERATOR_VERSION}, spec hash
`{spec_hash(spec)}`). Every number here is simulated: no real cells, genes or drugs.

| file | what it is |
|---|---|
| `screen.h5ad` | fine-tuning CRISPR screen: obs `target_gene` (control `{CONTROL_PERT}`), `cell_type` (CT0..), `batch`, `n_counts`; `X` = log1p(normalize_total 1e4) float32 CSR; `layers["counts"]` = NB counts; `obsm["X_state"]` = lossy {spec.state_dim}-d SE600M stand-in |
| `pretrain.h5ad` | drug "pre-training" set on the same genes, programs and X_state map: obs `drug` (control `{CONTROL_DRUG}`), `cell_type` (CL0..), `batch` |
| `pert_features.pt` | `torch.load`: dict name -> float32 [{spec.pert_feature_dim}] ESM2 stand-in for every screen perturbation and the control (zeros) |
| `gene_names.csv` | the evaluator's gene list (header-less, var order) |
| `split.toml` | screen split: val {val}, test {test} (same for every cell type) |
| `pretrain_split.toml` | drug split: val {drug_val}, no test |
| `truth.npz` | the simulated ground truth (programs, per-perturbation effects in log space, DE-gene masks, X_state map) |
| `spec.json` | the spec; written last, so its presence means the directory is complete |

Biology: gene baseline log-expression ~ N(0, {BASE_LOG_SD}); {spec.n_programs} sparse gene programs; cell types
are offsets in program space; small per-gene batch shifts; per-cell library size lognormal(0, {LIBRARY_LOG_SD});
negative-binomial counts (dispersion {DISPERSION_RANGE[0]}-{DISPERSION_RANGE[1]}). Each perturbation knocks its
target gene down (log2FC {KNOCKDOWN_LOG2FC[0]} to {KNOCKDOWN_LOG2FC[1]}), moves 1-3 programs shared with other
perturbations of its group (some perturbations are weak), and changes {DE_GENES_RANGE[0]}-{DE_GENES_RANGE[1]}
sparse DE genes; effects have a shared and a cell-type-specific part. Drugs move programs with a dose-response
(Hill) magnitude. `X_state` is a fixed random linear map of centred log1p expression to {spec.state_dim}
dimensions plus noise: it keeps programs and cell types but loses most single-gene effects.

Spec:

```json
{json.dumps(spec.asdict(), indent=2, sort_keys=True)}
```
"""


def _read_spec_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def generate_demo(out_dir: Path, spec: DemoSpec | None = None) -> dict[str, Path]:
    """Write the demo data into ``out_dir``; returns ``{key: path}`` for the keys of ``FILES``.

    Deterministic in ``spec``. Each file is written under a temporary name and renamed; ``spec.json`` is
    written last. If ``out_dir/spec.json`` already holds this spec (and every file exists), nothing is
    rewritten. A different spec in ``out_dir`` is replaced (callers normally use one dir per spec hash,
    see ``tahoe_ft.datasets.ensure_demo``).
    """
    spec = spec or DemoSpec()
    out_dir = Path(out_dir).resolve()
    paths = {key: out_dir / name for key, name in FILES.items()}
    if _read_spec_file(paths["spec"]) == _canonical(spec) and all(p.exists() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["spec"].unlink(missing_ok=True)  # the directory is incomplete until spec.json is back
    for stale in out_dir.glob(".*.tmp"):  # left by a killed generator
        stale.unlink()

    import torch

    seeds = np.random.SeedSequence(spec.seed).spawn(7)
    rng_bio, rng_scr, rng_scr_cells, rng_pre, rng_pre_cells, rng_feat, rng_split = (
        np.random.default_rng(x) for x in seeds
    )
    bio = _make_biology(rng_bio, spec)
    screen_design, truth = _screen_design(rng_scr, bio, spec)
    pre_design, pre_truth = _pretrain_design(rng_pre, bio, spec)
    truth.update(pre_truth)

    perts = sorted(truth["screen_perts"].tolist())
    chosen = rng_split.permutation(len(perts))
    val = sorted(perts[i] for i in chosen[: spec.n_val_perts])
    test = sorted(perts[i] for i in chosen[spec.n_val_perts : spec.n_val_perts + spec.n_test_perts])
    drugs = sorted(truth["pretrain_drugs"].tolist())
    drug_val = sorted(drugs[i] for i in rng_split.permutation(len(drugs))[: max(1, spec.n_drugs // 10)])

    for key, design, col, rng in (
        ("screen", screen_design, PERT_COL, rng_scr_cells),
        ("pretrain", pre_design, DRUG_COL, rng_pre_cells),
    ):
        with atomic_path(paths[key], suffix=".h5ad") as tmp:
            _to_anndata(bio, design, col, rng, spec).write_h5ad(tmp)
    with atomic_path(paths["pert_features"], suffix=".pt") as tmp:
        torch.save(_pert_features(rng_feat, spec, truth), tmp)
    with atomic_path(paths["truth"], suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh, gene_names=np.array(bio.gene_names), programs=bio.programs.astype(np.float32),
            base_logit=bio.base_logit, state_map=bio.state_map.astype(np.float32),
            state_centre=bio.state_centre, screen_cell_type_logit=screen_design.cell_type_logit,
            **truth,
        )  # fmt: skip
    _atomic_write_text(paths["gene_names"], "".join(f"{g}\n" for g in bio.gene_names))
    _atomic_write_text(
        paths["split"],
        _split_toml(SCREEN_DATASET, paths["screen"], screen_design.cell_type_names, val, test),
    )
    _atomic_write_text(
        paths["pretrain_split"],
        _split_toml(PRETRAIN_DATASET, paths["pretrain"], pre_design.cell_type_names, drug_val, []),
    )
    _atomic_write_text(paths["readme"], _readme(spec, val, test, drug_val))
    _atomic_write_text(paths["spec"], json.dumps(_canonical(spec), indent=2, sort_keys=True) + "\n")
    log.info("demo data (spec %s) written to %s", spec_hash(spec), out_dir)
    return paths
