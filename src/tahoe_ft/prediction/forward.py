"""The model's side of a prediction: sets of basal cells -> predicted genes, in float32 or bfloat16.

`predict_batch` runs B sets of one length in one forward pass (`predict_sets`: one group set by set, the
reference path); `prepare_model` moves the model and, for bf16, converts every `nn.Linear` to bfloat16 once (prepacked into oneDNN's blocked
layout on CPUs with bf16 kernels, `_PackedLinear`); `decodes` says whether predictions go through the gene
decoder.
"""

from __future__ import annotations

import numpy as np
import torch

# "32": float32 (the reference numbers); "bf16": bfloat16 Linear weights under autocast, faster on CPUs with AMX and
# on GPUs; at 18,080 genes max 6.7e-3, mean 5.2e-4 from float32 in log1p expression (BENCHMARKS.md)
PRECISIONS = ("32", "bf16")


def device_of(name: str) -> torch.device:
    """`auto`: cuda when available, else cpu; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def decodes(model) -> bool:
    """Whether predictions go through the gene decoder: with embedding input, as `state tx infer` decides.
    An HVG-mode upstream checkpoint (embed_key None, or X_hvg with output_space gene) carries a decoder that
    was never trained (its batches have no counts), which must not be used."""
    hp = model.hparams
    key, space = hp.get("embed_key"), hp.get("output_space")
    trained = key is not None and not (key == "X_hvg" and space == "gene")
    return getattr(model, "gene_decoder", None) is not None and trained


@torch.no_grad()
def predict_sets(
    model,
    pert_vec: torch.Tensor,
    basal: np.ndarray,
    device: torch.device,
    target: int | None = None,
    cell_type: int | None = None,
) -> np.ndarray:
    """Predict one group: basal `[n, D_in]` in sets of <= cell_set_len cells -> genes `[n, G]` (`target`: the
    perturbation's target-gene column, -1 for none, for a model with the knock-down path; `cell_type`: the
    group's cell type index, for a model with a feature prior)."""
    s = int(model.hparams["cell_set_len"])
    out = []
    for start in range(0, basal.shape[0], s):
        b = torch.from_numpy(basal[start : start + s]).to(device)[None]  # [1, s, D_in]
        p = pert_vec.to(device).expand(1, b.shape[1], -1)  # [1, s, P]
        t = torch.full(b.shape[:2], target, dtype=torch.long, device=device) if target is not None else None
        c = torch.tensor([cell_type], device=device) if cell_type is not None else None
        y = model.forward_sets(p, b, target=t, cell_type=c)  # [1, s, D_out]
        if decodes(model):
            y = model.decode(y)  # [1, s, G]: embedding rounds are scored in gene space
        out.append(y[0].float().cpu().numpy())
    return np.concatenate(out, axis=0)


@torch.no_grad()
def predict_batch(
    model,
    pert: torch.Tensor,
    basal: np.ndarray,
    device: torch.device,
    precision: str = "32",
    target: torch.Tensor | None = None,
    batch_idx: torch.Tensor | None = None,
    cell_type: torch.Tensor | None = None,
) -> np.ndarray:
    """Predict B sets of one length in one forward pass: pert `[B, P]` (one vector per set), basal
    `[B, s, D_in]` -> genes `[B, s, G]` float32. Attention stays within a set, so this is `predict_sets` of
    each set up to float32 rounding: BLAS sums in an order that depends on the matrix height (B*s rows), so
    B > 1 differs from B = 1 in the last bits (~4e-7 at 18,080 genes, MKL); B = 1 gives the same numbers.
    `precision="bf16"`: under bfloat16 autocast (PRECISIONS; `predict` converts the Linear weights once,
    `prepare_model`). `target` `[B]`: each set's
    target-gene column (-1: none), for a model with the knock-down path; `batch_idx` `[B, s]`: each basal
    cell's batch, for a model with a batch encoder; `cell_type` `[B]`: each set's cell type index, for a model
    with a feature prior."""
    b = torch.from_numpy(basal).to(device)  # [B, s, D_in]
    p = pert.to(device)[:, None, :].expand(-1, b.shape[1], -1)  # [B, s, P]
    t = target.to(device)[:, None].expand(-1, b.shape[1]) if target is not None else None  # [B, s]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=str(precision) == "bf16"):
        bi = batch_idx.to(device) if batch_idx is not None else None
        c = cell_type.to(device) if cell_type is not None else None
        y = model.forward_sets(p, b, bi, target=t, cell_type=c)  # [B, s, D_out]
        if decodes(model):
            y = model.decode(y)  # [B, s, G]
    return y.float().cpu().numpy()


class _PackedLinear(torch.nn.Module):
    """A bf16 `nn.Linear` for CPU inference whose weight is reordered into oneDNN's blocked layout once
    (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU freezing pass does); a bf16
    `nn.Linear` re-lays its weight out inside every call. The same bits as the bf16 `nn.Linear`
    (tests/test_prediction.py); measured 1.3-1.4x faster on one 18,080-wide layer alone, 8 % on a whole forward
    pass of 16 x 64 cells of the issue's model and 20 % on short tail sets (BENCHMARKS.md)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        weight = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)  # rows: the expected batch height
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16).contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packs_bf16(device: torch.device) -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels (AVX512-BF16 / AMX), where prepacked weights pay."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def _bf16_linears(model: torch.nn.Module, device: torch.device, rows: int) -> None:
    """bf16 predict: every `nn.Linear` in bfloat16, converted once, so autocast does not cast each 18,080-wide
    weight again on every forward pass (measured: ~0.13 s per such cast on one core); on a CPU with oneDNN's
    bf16 kernels also prepacked once (`_PackedLinear`, `rows` per pass). Norms, embeddings and the knock-down
    ratio stay float32, and autocast still picks the precision of every other op."""
    pack = _packs_bf16(device)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _PackedLinear(child, rows) if pack else child.to(torch.bfloat16))


def prepare_model(model: torch.nn.Module, device: torch.device, precision: str, rows: int) -> None:
    """The model on `device`, in place; for precision bf16 its Linear layers converted once (`_bf16_linears`,
    `rows`: the cells of one forward pass)."""
    model.to(device)
    if str(precision) == "bf16":
        _bf16_linears(model, device, rows=rows)
