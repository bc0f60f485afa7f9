"""Deterministic synthetic perturbation screens on one latent biology (SPEC §5.4).

(Over 500 lines: the biology, the network, the two designs, the X_state map and the writers share the one
seeded generator and are kept together so a reader can follow every random draw from the seed to the files.)

One seed fixes a "biology": gene baseline expression, sparse gene programs (the main axes of cell-to-cell
variation), cell-type offsets in program space, per-gene dispersions, and a sparse regulatory network of the
screened targets. Two data sets are drawn from it:

- ``screen.h5ad``: the fine-tuning CRISPR screen. Each perturbation knocks down its target gene (Papalexi's
  knock-down sizes), moves its regulon (a small gene set shared in part with the other targets of its
  module) and, less, its module's programs, partly depending on the cell type.
- ``pretrain.h5ad``: a drug screen on other cell lines, same genes, programs and ``X_state`` map; drug
  effects are program-level with dose-response magnitudes. ``reproduce`` trains the base model (the
  ST-Tahoe stand-in) on it.

Counts are negative-binomial (gamma-Poisson) around per-cell library sizes; ``X`` is
``log1p(normalize_total(counts, 1e4))``. Generation is vectorised over blocks of cells, so 18,080 genes
fit in a few GB. ``X_state`` is learned from the cells' own variation, as a foundation model's embedding is:
the top ``state_dim`` principal components of the control cells' log1p expression, every cell projected, plus
noise. It keeps programs and cell types and loses most of the regulons and knock-downs, which lie outside the
main axes of control variation (as Papalexi's knock-out effects mostly do): the representation mismatch of
the case study, measured by ``tahoe-ft demo-check`` (``tahoe_ft.datasets.demo_check``).
"""

from __future__ import annotations

import contextlib
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

from tahoe_ft.datasets.spec import PCA_MAX_CELLS, DemoSpec
from tahoe_ft.fileio import atomic_path
from tahoe_ft.fileio import atomic_write_text as _atomic_write_text

log = logging.getLogger(__name__)

# Bump when the generated biology or file layout changes: cached demo dirs are keyed by this too.
GENERATOR_VERSION = 2

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
CELL_PROGRAM_SD = 0.25  # per-cell program activity noise (the correlated cell-to-cell variation)
LIBRARY_LOG_SD = 0.3  # per-cell library size: lognormal(0, 0.3) around the spec's mean
DISPERSION_RANGE = (0.2, 0.5)  # NB dispersion phi (var = mu + phi mu^2), per gene
PENETRANCE_SD = 0.25  # per-cell scaling of the perturbation effect, clipped to [0, 1.5]
WEAK_PERT_FRACTION = 0.25  # perturbations with little downstream effect (their knock-down stays)
WEAK_SCALE = 0.15
STRENGTH_RANGE = (0.6, 1.4)  # per-perturbation scale of the downstream effect
DOSES_UM = (0.1, 1.0, 10.0)  # drug doses (uM); effect magnitude follows a Hill curve dose / (dose + EC50)

# The regulatory network: each screened target regulates a small regulon (DE genes); targets come in modules
# (pathways) whose regulons share genes and effect directions, so a held-out target's siblings predict part
# of its effect. Gene-specific and spread out: the default screen's 40 targets x 3 cell types need ~20
# directions for 90% of their squared effect, ~35 for 95% (of at most 120; the modules that make held-out
# targets predictable also tie them together), and those directions are not the control cells' main axes
# (programs, cell types), which are what `X_state` keeps.
DE_GENES_RANGE = (20, 60)  # regulon size (at most max(6, n_genes // 20): small panels keep small regulons)
DE_EFFECT_SD = 1.0  # regulon effect per gene (natural-log fold change)
MODULE_SIZE = 4  # screened targets per module (on average)
MODULE_SHARE = 0.8  # share of a regulon in its module's gene pool, common to the module's targets
REGULON_JITTER = 0.3  # a target's effect on a module gene: the module's effect x (1 + 0.3 N(0, 1))
CT_EFFECT_JITTER = 0.3  # cell-type-specific part of every effect, relative
CT_ONLY_FRACTION = 0.1  # extra cell-type-only DE genes, as a fraction of the regulon size
REGULON_EXPRESSED = 0.5  # regulon genes come from this most expressed share of the panel (visible DE genes)
PROGRAM_OWN_SD = 0.1  # a target's own program shift on top of its module's (module directions are N(0, 1))
# pert_features.pt: the mean embedding of a target's regulon genes, where a module's pool genes lie within
# NEIGHBOUR_SPREAD (relative) of their module's vector, times the downstream strength, plus FEATURE_NOISE
# (relative) noise
NEIGHBOUR_SPREAD = 0.5
FEATURE_NOISE = 0.2

# --- measured on the real Papalexi et al. 2021 THP-1 CRISPR-KO screen shipped in the package ----------------
# (`scripts/papalexi_demo_facts.py`, seed 0, 20 split-half draws; log1p(normalize_total 1e4) as cell-eval sees
# it). Knock-down of its 9 measured targets: log2FC of mean normalised expression, KO / control, median
# -0.49, quartiles -0.96 .. -0.46, range -2.32 .. -0.42; |log2FC| fits a lognormal with geometric mean 0.72
# and sd(ln) 0.70. Share of a knock-out's squared effect (noise removed by split halves) outside the top 10
# control principal components (10/299 genes = the default demo's 64/2000): pooled 0.626 over the 9 KOs
# whose effect stands above their noise (median 0.643, quartiles 0.598 .. 0.696; 0.967 for a random
# direction).
PAPALEXI_KNOCKDOWN_LOG2FC = (-2.32, -0.42)  # range over the measured targets
PAPALEXI_KNOCKDOWN_GEOMEAN = 0.72  # geometric mean of |log2FC|
PAPALEXI_KNOCKDOWN_LOG_SD = 0.70  # sd of ln |log2FC|
PAPALEXI_OUTSIDE_PC_SHARE = 0.63  # pooled share of a knock-out's effect outside the top control PCs
KNOCKDOWN_LOG2FC = PAPALEXI_KNOCKDOWN_LOG2FC  # the demo's knock-downs are drawn inside this range
KNOCKDOWN_CT_JITTER = 0.1  # per cell type: log2FC x exp(0.1 N(0, 1)), clipped to the range
# the downstream effect's program part (inside the control PCs) is sized so that this share of each
# perturbation's squared log-space effect (knock-down + regulon) lies outside the programs
OUTSIDE_PC_SHARE = PAPALEXI_OUTSIDE_PC_SHARE

# X_state: the top `state_dim` principal components of log1p expression of the control cells (the screen's
# and the drug set's, up to PCA_MAX_CELLS of them), every cell projected, plus isotropic noise of
# STATE_NOISE_SD x the median kept component's sd
PCA_POWER_ITERATIONS = 8
SIZING_BLOCK = 64  # perturbations per step of `_size_programs` (bounds its memory at 18,080 genes)
SIZING_STEPS = 30  # bisection steps on ln(scale) in [-8, ln PROGRAM_SCALE_MAX]: far below anything visible
# the program part is never scaled above its nominal size (module directions N(0, 1) x loadings), so that no
# perturbation reshapes the whole transcriptome; where even that leaves more than OUTSIDE_PC_SHARE outside
# the axes (small panels), the share stays higher
PROGRAM_SCALE_MAX = 1.0
STATE_NOISE_SD = 0.05


def tiny_spec(**overrides: int) -> DemoSpec:
    """A demo small enough for unit tests (generates in well under a second)."""
    d: dict[str, int] = dict(
        n_genes=60, n_cell_types=2, n_batches=2, n_perts=8, cells_per_pert=20, n_ctrl=60, n_programs=4,
        state_dim=16, pert_feature_dim=8, n_drugs=6, pretrain_cells_per_drug=20, pretrain_ctrl=60,
        n_pretrain_cell_types=2, n_val_perts=2, n_test_perts=2, seed=0,
    )  # fmt: skip
    d.update(overrides)
    return DemoSpec(**d)


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
    programs: np.ndarray  # [K, G] sparse-ish loadings: the main axes of cell-to-cell variation
    dispersion: np.ndarray  # [G] NB phi
    library_mean: float  # mean counts per cell


def _make_biology(rng: np.random.Generator, s: DemoSpec) -> _Biology:
    g, k = s.n_genes, s.n_programs
    base = rng.normal(0.0, BASE_LOG_SD, g)
    density = max(PROGRAM_DENSITY, 4.0 / g)
    programs = (rng.random((k, g)) < density) * rng.normal(0.0, PROGRAM_LOADING_SD, (k, g))
    dispersion = rng.uniform(*DISPERSION_RANGE, g)
    # ~3 counts per gene, within 2,000-10,000 per cell (VCC-like depth for 18,080 genes is far higher,
    # but 10,000 keeps the benchmark files small while sparse enough to be realistic).
    library_mean = float(np.clip(3.0 * g, 2000.0, 10000.0))
    names = [f"GENE{i + 1:05d}" for i in range(g)]
    return _Biology(names, base, programs, dispersion, library_mean)


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


@dataclass
class _Network:
    """The screened targets' regulons: modules of targets whose regulons share genes and directions."""

    module_of: np.ndarray  # [P] module of each target
    weights: np.ndarray  # [P, G] natural-log effect of knocking the target out, before its strength
    mask: np.ndarray  # [P, G] bool, the regulon (the DE genes)
    pools: np.ndarray  # [M, G] bool, each module's gene pool (its targets' shared regulon genes)


def _network(rng: np.random.Generator, s: DemoSpec, targets: np.ndarray, expressed: np.ndarray) -> _Network:
    g, p = s.n_genes, s.n_perts
    n_modules = max(1, round(p / MODULE_SIZE))
    module_of = rng.permutation(np.arange(p) % n_modules)
    lo, hi = (min(v, max(6, g // 20)) for v in DE_GENES_RANGE)
    # a module's pool: MODULE_SHARE of a regulon size, shared by all its targets; each target adds private genes
    pool_sizes = np.maximum(1, np.round(MODULE_SHARE * rng.integers(lo, hi + 1, n_modules))).astype(int)
    n_private = np.round((1.0 - MODULE_SHARE) * rng.integers(lo, hi + 1, p)).astype(int)
    # regulons: expressed genes (the DE genes a screen can see), never a target gene, so that every
    # knock-down is the target's own effect
    candidates = rng.permutation(np.setdiff1d(expressed, targets))
    if pool_sizes.sum() <= candidates.size:  # disjoint pools where the panel allows
        pools = np.split(candidates[: pool_sizes.sum()], np.cumsum(pool_sizes)[:-1])
    else:
        pools = [rng.choice(candidates, min(n, candidates.size), replace=False) for n in pool_sizes]
    module_effect = rng.normal(0.0, DE_EFFECT_SD, (n_modules, g))
    weights = np.zeros((p, g))
    mask = np.zeros((p, g), bool)
    for i in range(p):
        pool = pools[module_of[i]]
        others = np.setdiff1d(candidates, pool, assume_unique=True)
        private = rng.choice(others, min(others.size, n_private[i]), replace=False)
        jitter = 1.0 + REGULON_JITTER * rng.normal(0.0, 1.0, pool.size)
        weights[i, pool] = module_effect[module_of[i], pool] * jitter
        weights[i, private] = rng.normal(0.0, DE_EFFECT_SD, private.size)
        mask[i, pool] = mask[i, private] = True
    pool_mask = np.zeros((n_modules, g), bool)
    for m, pool in enumerate(pools):
        pool_mask[m, pool] = True
    return _Network(module_of, weights, mask, pool_mask)


def _knockdown_log2fc(rng: np.random.Generator, p: int, c: int) -> np.ndarray:
    """[P, C] knock-down log2FC: |log2FC| lognormal as measured on Papalexi, clipped to its range."""
    lo, hi = -KNOCKDOWN_LOG2FC[1], -KNOCKDOWN_LOG2FC[0]
    mag = np.exp(rng.normal(math.log(PAPALEXI_KNOCKDOWN_GEOMEAN), PAPALEXI_KNOCKDOWN_LOG_SD, p))
    mag = mag[:, None] * np.exp(KNOCKDOWN_CT_JITTER * rng.normal(0.0, 1.0, (p, c)))
    return -np.clip(mag, lo, hi)


def _screen_design(rng: np.random.Generator, bio: _Biology, s: DemoSpec) -> tuple[_Design, dict[str, Any]]:
    g, k, p, c = s.n_genes, s.n_programs, s.n_perts, s.n_cell_types
    # targets: expressed genes, so the knock-down is measurable
    expressed = np.argsort(-bio.base_logit, kind="stable")[: max(p, g // 2)]
    targets = np.sort(rng.choice(expressed, size=p, replace=False))
    by_expr = np.argsort(-bio.base_logit, kind="stable")
    net = _network(rng, s, targets, by_expr[: max(p + 1, round(REGULON_EXPRESSED * g))])
    kd = _knockdown_log2fc(rng, p, c)
    # program part: each module moves 1-3 programs, each target a little on its own
    n_modules = int(net.module_of.max()) + 1
    n_used = rng.integers(1, min(3, k) + 1, n_modules)
    order = np.argsort(rng.random((n_modules, k)), axis=1)
    mask = np.arange(k)[None, :] < n_used[:, None]
    module_dir = np.zeros((n_modules, k))
    np.put_along_axis(module_dir, order, mask * rng.normal(0.0, 1.0, (n_modules, k)), axis=1)
    prog = module_dir[net.module_of] + rng.normal(0.0, PROGRAM_OWN_SD, (p, k))
    # the cell-type-specific part: jittered programs and regulon, plus cell-type-only DE genes
    prog_ct = (
        prog[:, None, :]
        + CT_EFFECT_JITTER * rng.normal(0.0, 1.0, (p, c, k)) * np.sqrt((prog**2).mean(axis=1))[:, None, None]
    )
    reg_ct = net.weights[:, None, :] * (1.0 + CT_EFFECT_JITTER * rng.normal(0.0, 1.0, (p, c, g)))
    n_only = CT_ONLY_FRACTION * net.mask.sum(axis=1) / g
    ct_only = (rng.random((p, c, g)) < n_only[:, None, None]) & ~net.mask[:, None, :]
    ct_only[np.arange(p), :, targets] = False
    reg_ct += ct_only * rng.normal(0.0, DE_EFFECT_SD, (p, c, g))
    prog_gene = np.einsum("pck,kg->pcg", prog_ct, bio.programs)
    prog_gene[np.arange(p), :, targets] = 0.0  # the target's own change is its knock-down alone
    # downstream strength: some perturbations barely act beyond their target (as most of Papalexi's 25)
    strength = rng.uniform(*STRENGTH_RANGE, p)
    weak = rng.random(p) < WEAK_PERT_FRACTION
    strength[weak] *= WEAK_SCALE

    ct_logit = _cell_type_logit(rng, bio, c)
    batch_logit = rng.normal(0.0, BATCH_GENE_SD, (s.n_batches, g))
    cond_idx, ct_idx, batch_idx = _draw_cells(rng, p + 1, c, s.n_batches, s.cells_per_pert, s.n_ctrl)
    names = [CONTROL_PERT] + [bio.gene_names[t] for t in targets]
    # effects are set by `_size_programs` once X_state's axes are known; until then, no effect
    design = _Design(
        names, [f"CT{i}" for i in range(c)], [f"batch{i}" for i in range(s.n_batches)], ct_logit,
        batch_logit, np.zeros((p + 1, c, g), np.float32), cond_idx, ct_idx, batch_idx,
    )  # fmt: skip
    truth = {
        "screen_perts": np.array(names[1:]), "screen_targets": targets, "screen_modules": net.module_of,
        "screen_weak": weak, "screen_strength": strength, "screen_program_weights": prog,
        "screen_regulon_weights": net.weights.astype(np.float32), "screen_de_mask": net.mask,
        "screen_module_pools": net.pools, "screen_knockdown_log2fc": kd,
    }  # fmt: skip
    return design, truth, _Parts(prog_gene, reg_ct, kd * math.log(2.0), targets, strength)


@dataclass
class _Parts:
    """A screen's effects before the program part is sized: ``strength x (a x programs + regulon)``, plus the
    knock-down on the target."""

    programs: np.ndarray  # [P, C, G] program part at a = 1 (natural log)
    regulon: np.ndarray  # [P, C, G]
    knockdown: np.ndarray  # [P, C] natural log, on the target gene
    targets: np.ndarray  # [P] gene index
    strength: np.ndarray  # [P]

    def effects(self, a: np.ndarray, rows: slice = slice(None), strength: bool = True) -> np.ndarray:
        """[P, C, G] log-space effects of the perturbations `rows` with program scale `a`."""
        st = self.strength[rows, None, None] if strength else 1.0
        e = st * (a[:, None, None] * self.programs[rows] + self.regulon[rows])
        idx = np.arange(e.shape[0])[:, None]
        e[idx, np.arange(e.shape[1])[None, :], self.targets[rows, None]] += self.knockdown[rows]
        return e


def _size_programs(bio: _Biology, d: _Design, parts: _Parts, smap: StateMap) -> np.ndarray:
    """Scale ``a`` of each perturbation's program part so that OUTSIDE_PC_SHARE of its expected log1p effect
    lies outside X_state's axes (Papalexi's share), to first order; writes ``d.effects``, returns ``a`` [P].

    First order: normalised log expression moves by the effect minus the log of its mean over the cell type's
    composition (the shift of normalize_total, which the written effects have taken out), and log1p expression
    by m / (1 + m) of that for a gene of normalised mean m.
    Bisection on log a in [e^-8, PROGRAM_SCALE_MAX], per perturbation, at unit strength (weak perturbations keep
    a weak program part).
    """
    logit = bio.base_logit[None] + d.cell_type_logit  # [C, G]
    log_share = logit - np.logaddexp.reduce(logit, axis=1, keepdims=True)
    mean_norm = TARGET_SUM * np.exp(log_share)
    slope = mean_norm / (1.0 + mean_norm)  # [C, G]
    v = smap.components
    p = parts.programs.shape[0]
    scale = np.zeros(p)
    for start in range(0, p, SIZING_BLOCK):
        rows = slice(start, min(p, start + SIZING_BLOCK))
        lo = np.full(rows.stop - start, -8.0)  # bounds on ln a
        hi = np.full(rows.stop - start, math.log(PROGRAM_SCALE_MAX))
        for _ in range(SIZING_STEPS):
            mid = (lo + hi) / 2.0
            e = parts.effects(np.exp(mid), rows, strength=False)
            dx = slope * (e - np.logaddexp.reduce(log_share + e, axis=2, keepdims=True))
            inside = ((dx @ v) ** 2).sum(axis=(1, 2))
            outside = 1.0 - inside / np.maximum((dx**2).sum(axis=(1, 2)), 1e-12)
            above = outside > OUTSIDE_PC_SHARE  # more program part, less outside: raise a while above
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        scale[rows] = np.exp((lo + hi) / 2.0)
    # effects are normalised fold changes (as Papalexi's knock-downs are measured): the shift that
    # normalize_total would add to every gene is taken out, so the knock-down is seen at its designed size
    for start in range(0, p, SIZING_BLOCK):
        rows = slice(start, min(p, start + SIZING_BLOCK))
        e = parts.effects(scale[rows], rows)
        d.effects[1 + start : 1 + rows.stop] = e - np.logaddexp.reduce(log_share + e, axis=2, keepdims=True)
    return scale


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


def _rows(d: _Design, keep: np.ndarray) -> _Design:
    """The design's cells `keep` (same conditions)."""
    return dataclasses.replace(
        d, cond_idx=d.cond_idx[keep], ct_idx=d.ct_idx[keep], batch_idx=d.batch_idx[keep]
    )


def _block_rows(n_genes: int) -> int:
    # fixed by the spec (the random stream depends on it); ~8M entries per dense block
    return int(max(64, min(4096, 2**23 // n_genes)))


def _simulate(rng: np.random.Generator, bio: _Biology, d: _Design) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """NB counts and log1p-normalised X for the design's cells, block by block."""
    n, g = d.cond_idx.size, len(bio.gene_names)
    shape = 1.0 / bio.dispersion
    counts_blocks, x_blocks = [], []
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
        counts_blocks.append(counts)
        x_blocks.append(x)
    return sp.vstack(counts_blocks, format="csr"), sp.vstack(x_blocks, format="csr")


@dataclass
class StateMap:
    """The SE600M stand-in: ``X_state = (x - centre) @ components + noise`` for log1p expression ``x``."""

    centre: np.ndarray  # [G]
    components: np.ndarray  # [G, D] orthonormal columns: the top principal axes of the control cells
    noise_sd: np.ndarray  # [D]

    def encode(self, x) -> np.ndarray:
        """Noise-free ``X_state`` of the rows of ``x`` (dense or sparse log1p expression), float64."""
        return np.asarray(x @ self.components) - self.centre @ self.components


def load_state_map(truth_path: str | Path) -> StateMap:
    """The ``X_state`` map of a generated demo, from its ``truth.npz``."""
    with np.load(truth_path) as t:
        return StateMap(
            t["state_centre"].astype(np.float64),
            t["state_map"].astype(np.float64),
            t["state_noise_sd"].astype(np.float64),
        )


def _orthonormal(a: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns of ``a``, through the eigenvectors of its small Gram matrix."""
    ev, w = np.linalg.eigh(a.T @ a)
    keep = ev > ev.max() * 1e-12
    return a @ (w[:, keep] / np.sqrt(ev[keep]))


def _one_blas_thread():
    """BLAS/LAPACK on one thread for the PCA (threadpoolctl, installed with scikit-learn, when present): small
    eigensolves take 100x longer multi-threaded on busy shared cores, and one thread fixes the summation order."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scanpy brings scikit-learn, which brings threadpoolctl
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _top_eigh(rng: np.random.Generator, m: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``dim`` largest eigenpairs of the symmetric PSD ``m`` (descending), by randomized subspace iteration
    (``dim`` extra columns, PCA_POWER_ITERATIONS passes): exact where the spectrum has gaps (programs, cell
    types), within ~1% in its flat tail of count-noise axes, for a few matrix products instead of a full
    eigensolver's seconds at 2,000 genes."""
    q = _orthonormal(rng.normal(0.0, 1.0, (m.shape[0], min(m.shape[0], 2 * dim))))
    for _ in range(PCA_POWER_ITERATIONS):
        q = _orthonormal(m @ q)
    ev, w = np.linalg.eigh(q.T @ m @ q)
    top = np.argsort(-ev, kind="stable")[:dim]
    return ev[top], q @ w[:, top]


def _fit_state_map(rng: np.random.Generator, controls: sp.csr_matrix, dim: int) -> StateMap:
    """PCA of the control cells' log1p expression (up to PCA_MAX_CELLS rows): the top ``dim`` axes."""
    if controls.shape[0] > PCA_MAX_CELLS:
        controls = controls[np.sort(rng.choice(controls.shape[0], PCA_MAX_CELLS, replace=False))]
    xc = controls.toarray().astype(np.float64)
    centre = xc.mean(axis=0)
    xc -= centre
    n, g = xc.shape
    # the top eigenvectors of the smaller Gram / covariance matrix (cells x cells, or genes x genes)
    if n < g:
        ev, u = _top_eigh(rng, xc @ xc.T, dim)
        comps = xc.T @ u / np.sqrt(np.maximum(ev, 1e-12))
    else:
        ev, comps = _top_eigh(rng, xc.T @ xc, dim)
    ev = np.maximum(ev, 0.0)
    # a fixed sign per axis (its largest loading positive): the map does not depend on the eigensolver
    sign = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    comps *= np.where(sign == 0, 1.0, sign)
    noise = STATE_NOISE_SD * math.sqrt(float(np.median(ev)) / max(1, n - 1))
    return StateMap(centre, comps, np.full(comps.shape[1], noise))


def _x_state(rng: np.random.Generator, smap: StateMap, x: sp.csr_matrix) -> np.ndarray:
    state = smap.encode(x)
    state += rng.normal(0.0, 1.0, state.shape) * smap.noise_sd
    return state.astype(np.float32)


def _to_anndata(d: _Design, bio: _Biology, pert_col: str, counts, x, state: np.ndarray, spec: DemoSpec):
    import anndata as ad

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
    """ESM2 stand-in: a noisy embedding of each target's network neighbourhood (its regulon).

    Genes get random vectors, those of one module's pool close to a module vector (as a network embedding
    places a pathway's genes together); a target's feature is the mean vector of its regulon genes, times the
    strength of its edges (its downstream strength: a weighted network, as a perturbation atlas gives), plus
    noise. Targets with overlapping regulons (one module) thus get similar vectors, weak ones short vectors.
    """
    import torch

    f = s.pert_feature_dim
    emb = rng.normal(0.0, 1.0 / math.sqrt(f), (s.n_genes, f))
    pools = truth["screen_module_pools"]  # [M, G]
    module_vec = rng.normal(0.0, 1.0 / math.sqrt(f), (pools.shape[0], f))
    for m, pool in enumerate(pools):
        emb[pool] = module_vec[m] + NEIGHBOUR_SPREAD * emb[pool]
    mask = truth["screen_de_mask"].astype(np.float64)  # [P, G] regulon membership
    feats = (
        truth["screen_strength"][:, None] * (mask @ emb) / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    )
    feats += rng.normal(0.0, FEATURE_NOISE * max(float(feats.std()), 1e-3), feats.shape)
    out = {CONTROL_PERT: torch.zeros(f, dtype=torch.float32)}
    for name, vec in zip(truth["screen_perts"].tolist(), feats, strict=True):
        out[name] = torch.tensor(vec, dtype=torch.float32)
    return dict(sorted(out.items()))


# --- writing --------------------------------------------------------------------------------------


def _split_toml(dataset: str, path: Path, cell_types: list[str], val: list[str], test: list[str]) -> str:
    from tahoe_ft.data.split_file import format_split_toml  # here: tahoe_ft.data loads the catalog

    return format_split_toml(
        {dataset: str(path)},
        fewshot={(dataset, ct): {"val": val, "test": test} for ct in cell_types},
        header="cell-load style split (generated by tahoe_ft.datasets.demo); control cells are shared by all splits",
    )


def _readme(spec: DemoSpec, val: list[str], test: list[str], drug_val: list[str]) -> str:
    return f"""# tahoe-ft demo data (synthetic)

Generated by `tahoe_ft.datasets.demo.generate_demo` (generator version {GENERATOR_VERSION}, spec hash
`{spec_hash(spec)}`). Every number here is simulated: no real cells, genes or drugs.

| file | what it is |
|---|---|
| `screen.h5ad` | fine-tuning CRISPR screen: obs `target_gene` (control `{CONTROL_PERT}`), `cell_type` (CT0..), `batch`, `n_counts`; `X` = log1p(normalize_total 1e4) float32 CSR; `layers["counts"]` = NB counts; `obsm["X_state"]` = {spec.state_dim}-d SE600M stand-in (PCA of control cells) |
| `pretrain.h5ad` | drug "pre-training" set on the same genes, programs and X_state map (PCA): obs `drug` (control `{CONTROL_DRUG}`), `cell_type` (CL0..), `batch` |
| `pert_features.pt` | `torch.load`: dict name -> float32 [{spec.pert_feature_dim}] ESM2 stand-in (network-neighbourhood embedding) for every screen perturbation and the control (zeros) |
| `gene_names.csv` | the evaluator's gene list (header-less, var order) |
| `split.toml` | screen split: val {val}, test {test} (same for every cell type) |
| `pretrain_split.toml` | drug split: val {drug_val}, no test |
| `truth.npz` | the simulated ground truth (programs, regulons, modules, per-perturbation effects in log space, DE-gene masks, the X_state PCA map) |
| `spec.json` | the spec; written last, so its presence means the directory is complete |

Biology: gene baseline log-expression ~ N(0, {BASE_LOG_SD}); {spec.n_programs} sparse gene programs carry the
correlated cell-to-cell variation (per-cell activity sd {CELL_PROGRAM_SD}); cell types are offsets in program space
plus small gene-level differences; small per-gene batch shifts; per-cell library size lognormal(0, {LIBRARY_LOG_SD});
negative-binomial counts (dispersion {DISPERSION_RANGE[0]}-{DISPERSION_RANGE[1]}).

Perturbations: a sparse regulatory network. Each target gene (an expressed gene of the panel) regulates a
regulon of {DE_GENES_RANGE[0]}-{DE_GENES_RANGE[1]} expressed genes (the DE genes; fewer on small panels); targets come in modules of about
{MODULE_SIZE} whose regulons share a gene pool ({MODULE_SHARE:.0%} of a regulon) and its directions; every effect has a
cell-type-specific part. A perturbation also moves 1-3 programs of its module, sized (at most to their nominal
size) so that, to first order, {OUTSIDE_PC_SHARE:.0%} of its expected log1p effect lies outside the `X_state` axes.
Effects are normalised fold changes (normalize_total's shift is taken out), so a knock-down is seen at its
drawn size. A quarter of the perturbations act weakly beyond their target. Drugs move programs with a
dose-response (Hill) magnitude.

Set from the real Papalexi et al. 2021 THP-1 CRISPR-KO screen shipped with tahoe-ft (measured by
`scripts/papalexi_demo_facts.py`): the target's knock-down, log2FC of mean normalised expression drawn
lognormal (geometric mean {PAPALEXI_KNOCKDOWN_GEOMEAN}, sd(ln) {PAPALEXI_KNOCKDOWN_LOG_SD}) inside Papalexi's range
{KNOCKDOWN_LOG2FC[0]} to {KNOCKDOWN_LOG2FC[1]} (median -0.49 over its 9 measured targets); and the share of a
knock-out's effect outside the top control principal components, {PAPALEXI_OUTSIDE_PC_SHARE} (pooled over its 9 KOs
with an effect above noise, top 10 PCs of 299 genes: the default demo's 64 of 2,000).

`pert_features.pt` (ESM2 stand-in): a noisy embedding of each target's network neighbourhood (the mean
vector of its regulon genes, the genes of one module lying close together, times the target's downstream
strength), so targets with overlapping regulons (one module) get similar vectors: a held-out perturbation is
related to training ones through its network neighbourhood. `X_state` (SE600M stand-in): the top {spec.state_dim} principal components of the
log1p expression of the control cells of both data sets, every cell projected, plus isotropic noise ({STATE_NOISE_SD} of the
median component's sd); it keeps programs and cell types, the main axes of variation among cells, and loses most of
the knock-downs and regulons. `tahoe-ft demo-check` measures how much.

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
    see ``tahoe_ft.datasets.embedded.ensure_demo``).
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
    _write_demo(paths, spec)
    _atomic_write_text(paths["spec"], json.dumps(_canonical(spec), indent=2, sort_keys=True) + "\n")
    log.info("demo data (spec %s) written to %s", spec_hash(spec), out_dir)
    return paths


@dataclass
class _Rngs:
    """The generator's independent streams, one per use, spawned from the spec's seed in this order."""

    bio: np.random.Generator
    screen: np.random.Generator
    screen_cells: np.random.Generator
    pretrain: np.random.Generator
    pretrain_cells: np.random.Generator
    features: np.random.Generator
    split: np.random.Generator
    state: np.random.Generator

    @classmethod
    def of(cls, seed: int) -> _Rngs:
        return cls(*(np.random.default_rng(x) for x in np.random.SeedSequence(seed).spawn(8)))


def _held_out(rng: np.random.Generator, s: DemoSpec, truth: dict[str, Any]) -> tuple[list, list, list]:
    """(val, test) screen perturbations and the pre-training set's validation drugs."""
    perts = sorted(truth["screen_perts"].tolist())
    chosen = rng.permutation(len(perts))
    val = sorted(perts[i] for i in chosen[: s.n_val_perts])
    test = sorted(perts[i] for i in chosen[s.n_val_perts : s.n_val_perts + s.n_test_perts])
    drugs = sorted(truth["pretrain_drugs"].tolist())
    drug_val = sorted(drugs[i] for i in rng.permutation(len(drugs))[: max(1, s.n_drugs // 10)])
    return val, test, drug_val


def _write_demo(paths: dict[str, Path], spec: DemoSpec) -> None:
    """Every file of ``FILES`` but ``spec.json``: the biology, both designs, the cells, X_state, the features."""
    import torch

    rngs = _Rngs.of(spec.seed)
    bio = _make_biology(rngs.bio, spec)
    screen_design, truth, parts = _screen_design(rngs.screen, bio, spec)
    pre_design, pre_truth = _pretrain_design(rngs.pretrain, bio, spec)
    truth.update(pre_truth)
    val, test, drug_val = _held_out(rngs.split, spec, truth)

    # X_state is learned from the control cells of both data sets (the atlas), which are drawn first; the
    # screen's program parts are then sized against its axes, and the perturbed cells drawn
    pre_counts, pre_x = _simulate(rngs.pretrain_cells, bio, pre_design)
    is_ctrl = screen_design.cond_idx == 0
    ctrl_counts, ctrl_x = _simulate(rngs.screen_cells, bio, _rows(screen_design, is_ctrl))
    controls = sp.vstack([ctrl_x, pre_x[pre_design.cond_idx == 0]], format="csr")
    with _one_blas_thread():
        smap = _fit_state_map(rngs.state, controls, spec.state_dim)
        scale = _size_programs(bio, screen_design, parts, smap)
    del controls, parts
    truth["screen_program_weights"] = truth["screen_program_weights"] * scale[:, None]
    truth["screen_effects"] = screen_design.effects
    pert_counts, pert_x = _simulate(rngs.screen_cells, bio, _rows(screen_design, ~is_ctrl))
    order = np.argsort(np.concatenate([np.flatnonzero(is_ctrl), np.flatnonzero(~is_ctrl)]), kind="stable")
    scr_counts = sp.vstack([ctrl_counts, pert_counts], format="csr")[order]
    scr_x = sp.vstack([ctrl_x, pert_x], format="csr")[order]
    del ctrl_counts, pert_counts, ctrl_x, pert_x
    for key, design, col, counts, x in (
        ("screen", screen_design, PERT_COL, scr_counts, scr_x),
        ("pretrain", pre_design, DRUG_COL, pre_counts, pre_x),
    ):
        adata = _to_anndata(design, bio, col, counts, x, _x_state(rngs.state, smap, x), spec)
        with atomic_path(paths[key], suffix=".h5ad") as tmp:
            adata.write_h5ad(tmp)
        del adata
    del scr_counts, scr_x, pre_counts, pre_x
    with atomic_path(paths["pert_features"], suffix=".pt") as tmp:
        torch.save(_pert_features(rngs.features, spec, truth), tmp)
    with atomic_path(paths["truth"], suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh, gene_names=np.array(bio.gene_names), programs=bio.programs.astype(np.float32),
            base_logit=bio.base_logit, state_map=smap.components.astype(np.float32),
            state_centre=smap.centre, state_noise_sd=smap.noise_sd,
            screen_cell_type_logit=screen_design.cell_type_logit, **truth,
        )  # fmt: skip
    _write_texts(
        paths, bio, spec, screen_design.cell_type_names, pre_design.cell_type_names, (val, test, drug_val)
    )


def _write_texts(
    paths: dict[str, Path], bio: _Biology, spec: DemoSpec, cell_types: list, pre_cell_types: list, held: tuple
) -> None:
    """The gene list, both split TOMLs and the README."""
    val, test, drug_val = held
    _atomic_write_text(paths["gene_names"], "".join(f"{g}\n" for g in bio.gene_names))
    _atomic_write_text(paths["split"], _split_toml(SCREEN_DATASET, paths["screen"], cell_types, val, test))
    _atomic_write_text(
        paths["pretrain_split"],
        _split_toml(PRETRAIN_DATASET, paths["pretrain"], pre_cell_types, drug_val, []),
    )
    _atomic_write_text(paths["readme"], _readme(spec, val, test, drug_val))
