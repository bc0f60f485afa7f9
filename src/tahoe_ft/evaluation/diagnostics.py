"""Diagnostics beside a score: does the model use the perturbation at all, and has it collapsed?

- `collapse`: the mean Pearson correlation between the predicted mean effects (pseudobulk minus the control
  mean) of different held-out perturbations of a cell type, next to the same for the real cells. Near 1 on the
  predicted side while the real side is lower: the model predicts one effect for every perturbation (the
  mode collapse PerturBench reports), whatever its score.
- the shuffle test (`prediction.predict(shuffle=True)` writes `pred_shuffled.h5ad`: every held-out group
  predicted with the features of another held-out perturbation, a fixed derangement): `eval` scores it with the
  same call, and the drop from the real score is how much the score owes to the perturbation's identity. A
  model that ignores its perturbation input drops by ~0.
- `design`: what the design can measure, from the score alone: cell-eval's discrimination score ranks each
  predicted effect among the n real effects of its cell type (1 - rank/n), so with one held-out perturbation
  per cell type it is 1.0 for every prediction by construction (degenerate), and with few it moves in steps of
  1/n per perturbation, 1/n^2 for the mean (coarse: n < `COARSE_N`); and every baseline of the panel that is
  not in it, with its reason. `design_lines` renders all of it (and the shuffle and collapse lines) under eval's
  table.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from tahoe_ft.data.labels import ScreenLabels

# discrimination over fewer held-out perturbations per cell type than this is flagged coarse
COARSE_N = 10
# the collapse diagnostic fires when the predicted effects correlate at least this much, and by at least
# COLLAPSE_GAP more than the real ones (one effect predicted for every perturbation)
COLLAPSE_CORR = 0.5
COLLAPSE_GAP = 0.3
DISCRIMINATION = "discrimination_score_l1"


def _pseudobulks(a: ad.AnnData, labels: ScreenLabels):
    pert_col, control_pert, celltype_col = labels.pert_col, labels.control_pert, labels.cell_type_col
    cts = a.obs[celltype_col].astype(str).to_numpy() if celltype_col else np.full(a.n_obs, "")
    perts = a.obs[pert_col].astype(str).to_numpy()
    x = a.X
    out: dict[str, dict[str, np.ndarray]] = {}
    for ct in np.unique(cts):
        sel = cts == ct
        ctrl = np.asarray(x[sel & (perts == control_pert)].mean(axis=0)).ravel()
        out[ct] = {
            p: np.asarray(x[sel & (perts == p)].mean(axis=0)).ravel() - ctrl
            for p in sorted(set(perts[sel]) - {control_pert})
        }
    return out


def mean_pairwise_correlation(deltas: dict[str, np.ndarray]) -> float | None:
    """Mean Pearson correlation over pairs of different perturbations' effect vectors (None with < 2)."""
    if len(deltas) < 2:
        return None
    m = np.corrcoef(np.stack(list(deltas.values())))
    iu = np.triu_indices(m.shape[0], k=1)
    return float(np.nanmean(m[iu]))


def collapse(pred: ad.AnnData, real: ad.AnnData, *, labels: ScreenLabels) -> dict[str, float | None]:
    """`{"pred_effect_corr", "real_effect_corr", "fires"}`: mean over cell types (`labels.cell_type_col`; None:
    all cells as one) of the mean pairwise correlation; `fires` (`collapse_fires`)."""
    out: dict[str, Any] = {}
    for name, a in (("pred_effect_corr", pred), ("real_effect_corr", real)):
        per_ct = [mean_pairwise_correlation(d) for d in _pseudobulks(a, labels).values()]
        vals = [v for v in per_ct if v is not None]
        out[name] = float(np.mean(vals)) if vals else None
    out["fires"] = collapse_fires(out)
    return out


def collapse_fires(c: dict[str, Any] | None) -> bool:
    """Whether a `collapse` block says one effect was predicted for every perturbation."""
    pred, real = (c or {}).get("pred_effect_corr"), (c or {}).get("real_effect_corr")
    if pred is None or real is None:
        return False
    return pred >= COLLAPSE_CORR and pred - real >= COLLAPSE_GAP


def design(score: Any) -> dict[str, Any]:
    """What the design can measure (`score`: a `Score`): `{"discrimination": {n_per_cell_type, flag, step,
    note}, "left_out": {name: reason}}`: flag "degenerate", "coarse" or None; `left_out`: each baseline of the
    panel that is not among its rows, with its reason (absent, or scored on some held-out groups only)."""
    from tahoe_ft.evaluation.baselines import PANEL

    parts = score.per_celltype or {"": score}
    n = {ct: int(part.n_perts) for ct, part in parts.items()}
    disc: dict[str, Any] = {"n_per_cell_type": n, "flag": None, "step": None, "note": None}
    if DISCRIMINATION in (score.metrics or {}) and n:
        lo = min(n.values())
        ones = sorted(ct or "all cells" for ct, k in n.items() if k <= 1)
        if ones:
            disc["flag"] = "degenerate"
            which = "every cell type" if len(ones) == len(n) else f"cell type(s) {', '.join(ones)}"
            disc["note"] = (
                f"degenerate: one held-out perturbation in {which}, where it is 1.0 for any prediction by "
                "construction and measures nothing"
            )
        elif lo < COARSE_N:
            disc["flag"] = "coarse"
            disc["step"] = 1.0 / lo**2
            disc["note"] = (
                f"coarse: {lo} held-out perturbations in the smallest cell type, so it moves in steps of "
                f"1/{lo} = {1 / lo:.3f} per perturbation and 1/{lo}^2 = {1 / lo**2:.3f} for their mean"
            )
    absent: dict[str, str] = {}
    if score.baselines is not None:
        notes = score.baseline_notes or {}
        for name in PANEL:
            if name not in score.baselines:
                absent[name] = notes.get(name) or "not computed (a panel from before this baseline existed)"
    return {"discrimination": disc, "left_out": absent}


def _num(x: Any) -> str:
    try:
        return f"{float(x):.4f}"
    except (TypeError, ValueError):
        return "-"


def design_lines(score: Any) -> list[str]:
    """The lines under eval's table: the shuffle control, the collapse diagnostic, the discrimination flag,
    the baselines scored on some held-out groups only (beside the round on the same groups), and the absent
    baselines with their reasons."""
    diag = score.diagnostics or {}
    lines = []
    shuffle = diag.get("shuffle")
    if shuffle:
        lines.append(
            f"shuffle control (features of another held-out perturbation): avg_score {_num(shuffle.get('avg_score'))}"
            f", the round's drop from it {_num(shuffle.get('drop'))}"
        )
    c = diag.get("collapse")
    if c and c.get("pred_effect_corr") is not None:
        fires = c.get("fires", collapse_fires(c))
        lines.append(
            f"collapse: predicted effects correlate {_num(c['pred_effect_corr'])} between perturbations, real "
            f"{_num(c.get('real_effect_corr'))}"
            + (" -- COLLAPSED: one effect predicted for every perturbation" if fires else "")
        )
    d = design(score)
    if d["discrimination"]["note"]:
        lines.append(f"flag: {DISCRIMINATION} {d['discrimination']['note']}")
    for name, entry in (diag.get("partial_baselines") or {}).items():
        rnd = entry.get("round") or {}
        lines.append(
            f"{name} on {entry.get('n_groups')} of {entry.get('of')} held-out groups: avg_score "
            f"{_num(entry.get('avg_score'))}, mae {_num((entry.get('metrics') or {}).get('mae'))}; the round on the "
            f"same groups: avg_score {_num(rnd.get('avg_score'))}, mae {_num((rnd.get('metrics') or {}).get('mae'))}"
        )
    for name, reason in d["left_out"].items():
        if name not in (diag.get("partial_baselines") or {}):
            lines.append(f"{name} absent: {reason.removeprefix('absent: ')}")
    return lines


def derangement(names: list[str], seed: int = 0) -> dict[str, str]:
    """A fixed permutation of `names` with no fixed point: whose features each perturbation is predicted with."""
    if len(names) < 2:
        return {}
    rng = np.random.default_rng(seed)
    order = sorted(names)
    while True:
        perm = rng.permutation(len(order))
        if not np.any(perm == np.arange(len(order))):
            return {order[i]: order[j] for i, j in enumerate(perm)}
