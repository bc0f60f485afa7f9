"""Facts of the real Papalexi screen that set the demo generator's knobs (`tahoe_ft.datasets.demo`).

Measured on the packaged Papalexi et al. 2021 THP-1 CRISPR-KO screen (16,192 cells x 299 genes, raw counts;
`tahoe_ft.datasets.embedded.papalexi_path()`), in log1p(normalize_total 1e4) space as the evaluator sees it:

1. knock-down: for every target that is a measured gene, log2 of mean(normalised target | KO cells) /
   mean(normalised target | non-targeting cells) (the ratio `target_knockdown` uses);
2. effect outside the control cells' main axes: the share of each knock-out's squared pseudobulk effect
   (mean KO minus mean control) that lies outside the top-k principal components of the control cells, with
   k = 299 x 64 / 2000 ~ 10 (the default demo's `state_dim` / `n_genes` ratio). Sampling noise is removed
   with split halves: the effect energy is <d_A, d_B> for the deltas of two disjoint halves of the cells
   (controls split too), its in-PC part <P d_A, P d_B>, averaged over `--splits` random splits;
3. the same share without the target gene (the downstream effect alone), and the target gene's share of the
   effect (measured targets).

    PYTHONPATH=src .venv/bin/python scripts/papalexi_demo_facts.py

The constants `PAPALEXI_*` in `src/tahoe_ft/datasets/demo.py` are this script's output (seed 0, 20 splits).
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import scipy.sparse as sp

from tahoe_ft.datasets.embedded import PAPALEXI_CONTROL, papalexi_path

TARGET_SUM = 1e4
# the default demo's X_state width over its gene count: k = round(299 * 64 / 2000) = 10
DEMO_WIDTH_RATIO = 64 / 2000
MIN_CELLS = 100  # perturbations with fewer cells are too noisy for the split-half estimate (SPI1, MYC)


def _log1p_norm(counts: sp.csr_matrix) -> np.ndarray:
    x = np.asarray(counts.toarray(), dtype=np.float64)
    tot = x.sum(axis=1, keepdims=True)
    return np.log1p(x * (TARGET_SUM / np.maximum(tot, 1.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, default=20, help="random half splits averaged")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    a = ad.read_h5ad(papalexi_path())
    x = _log1p_norm(sp.csr_matrix(a.X))
    genes = {g: i for i, g in enumerate(a.var_names)}
    pert = a.obs["target_gene"].astype(str).to_numpy()
    ctrl = np.flatnonzero(pert == PAPALEXI_CONTROL)
    k = int(round(a.n_vars * DEMO_WIDTH_RATIO))
    xc = x[ctrl]
    centre = xc.mean(axis=0)
    _, _, vt = np.linalg.svd(xc - centre, full_matrices=False)
    v = vt[:k]  # [k, G] top control principal axes
    print(f"Papalexi: {a.n_obs} cells x {a.n_vars} genes, {ctrl.size} controls; top k = {k} control PCs")

    # 1. knock-down of measured targets
    lin = np.expm1(x)
    kd = {}
    for p in sorted(set(pert) - {PAPALEXI_CONTROL}):
        if p in genes:
            g = genes[p]
            kd[p] = float(np.log2(lin[pert == p, g].mean() / lin[ctrl, g].mean()))
    vals = np.array(list(kd.values()))
    print("knock-down log2FC (mean normalised expression, KO / control) per measured target:")
    for p, v2 in sorted(kd.items(), key=lambda t: t[1]):
        print(f"  {p:10s} {v2:6.2f}")
    q25, q50, q75 = np.percentile(vals, [25, 50, 75])
    mag = np.log(-vals)
    print(
        f"knock-down log2FC: median {q50:.2f}, quartiles {q25:.2f} .. {q75:.2f}, "
        f"range {vals.min():.2f} .. {vals.max():.2f} (n = {vals.size}); |log2FC| lognormal fit: geometric mean "
        f"{np.exp(mag.mean()):.2f}, sd of ln|log2FC| {mag.std(ddof=1):.2f}"
    )

    # 2-3. effect outside the top control PCs (split-half, noise-free estimate)
    rng = np.random.default_rng(args.seed)
    perts = [p for p in sorted(set(pert) - {PAPALEXI_CONTROL}) if (pert == p).sum() >= MIN_CELLS]
    energy = {p: np.zeros(4) for p in perts}  # total, in-PC, total without the target gene, noise
    inside_wo = {p: 0.0 for p in perts}
    target_e = {p: 0.0 for p in perts}
    for _ in range(args.splits):
        c = rng.permutation(ctrl)
        ca, cb = x[c[: c.size // 2]].mean(0), x[c[c.size // 2 :]].mean(0)
        for p in perts:
            rows = rng.permutation(np.flatnonzero(pert == p))
            h = rows.size // 2
            da, db = x[rows[:h]].mean(0) - ca, x[rows[h:]].mean(0) - cb
            # the full-data delta's noise energy is |d_A - d_B|^2 / 4 (half-means have twice its variance)
            energy[p] += [da @ db, (v @ da) @ (v @ db), 0.0, (da - db) @ (da - db) / 4]
            mask = np.ones(a.n_vars, bool)
            if p in genes:
                mask[genes[p]] = False
                target_e[p] += da[genes[p]] * db[genes[p]]
            dam, dbm = da * mask, db * mask
            energy[p][2] += dam @ dbm
            inside_wo[p] += (v @ dam) @ (v @ dbm)
    # only knock-outs whose effect stands above the sampling noise (most of the 25 barely move the 299 genes)
    clear = [p for p in perts if energy[p][0] > energy[p][3]]
    out_share = {p: 1 - energy[p][1] / energy[p][0] for p in clear}
    out_wo = {p: 1 - inside_wo[p] / energy[p][2] for p in clear}
    pooled = 1 - sum(energy[p][1] for p in clear) / sum(energy[p][0] for p in clear)
    pooled_wo = 1 - sum(inside_wo[p] for p in clear) / sum(energy[p][2] for p in clear)
    print(
        f"share of the knock-out effect outside the top {k} control PCs ({len(clear)} of {len(perts)} KOs with "
        f">= {MIN_CELLS} cells have an effect energy above their noise energy):"
    )
    for p in perts:
        snr = energy[p][0] / energy[p][3]
        if p not in clear:
            print(f"  {p:10s} effect/noise energy {snr:6.2f}: below noise, left out")
            continue
        tag = " (measured target)" if p in genes else ""
        print(
            f"  {p:10s} effect/noise energy {snr:6.2f}: outside {out_share[p]:6.3f}, "
            f"without the target gene {out_wo[p]:6.3f}{tag}"
        )
    o = np.array(list(out_share.values()))
    print(
        f"outside-PC share: median {np.median(o):.3f}, quartiles {np.percentile(o, 25):.3f} .. "
        f"{np.percentile(o, 75):.3f}; pooled over these KOs {pooled:.3f}; pooled without the target gene "
        f"{pooled_wo:.3f} (a random direction: {1 - k / a.n_vars:.3f})"
    )
    measured = [p for p in clear if p in genes]
    ts = np.array([target_e[p] / energy[p][0] for p in measured])
    print(
        f"target gene's share of the squared effect (measured targets): median {np.median(ts):.3f}, "
        f"range {ts.min():.3f} .. {ts.max():.3f} (n = {ts.size})"
    )


if __name__ == "__main__":
    main()
