"""Distributional losses between sets of cells, one value per set.

`energy_distance` is an exact re-implementation of geomloss's `SamplesLoss("energy")` (tensorized
backend, uniform weights), the loss upstream ST trains with. For x [B,N,D] and y [B,M,D], with
d(a,b) = sqrt(max(|a|^2 - 2<a,b> + |b|^2, 1e-8)):

    loss[b] = - 0.5 * mean_{i,j} d(x_i, x_j) - 0.5 * mean_{i,j} d(y_i, y_j) + mean_{i,j} d(x_i, y_j)

which is half the classical energy distance (up to the 1e-8 clamp, which makes the self-distances
1e-4 instead of 0 and keeps the gradient finite when points coincide). As in geomloss, the
self-interaction terms are differentiated through their first argument only, with the gradient
doubled; for a symmetric kernel that is the exact gradient, and it avoids differentiating sqrt at
the clamped diagonal twice.

`sinkhorn` delegates to geomloss (imported lazily) and `mse` is a per-set mean squared error.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tahoe_ft.errors import UserError

LOSS_NAMES = ("energy", "sinkhorn", "mse")

_CLAMP = 1e-8  # geomloss: distances(x, y) = sqrt(clamp_min(squared_distances(x, y), 1e-8))


def _double_grad(x: torch.Tensor) -> torch.Tensor:
    """Same value as `x` (exactly: x + 0), gradient multiplied by 2 (geomloss's `double_grad`)."""
    return x + (x - x.detach())


def _distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise euclidean distances [B,N,D] x [B,M,D] -> [B,N,M], computed exactly as geomloss does."""
    xx = (x * x).sum(-1).unsqueeze(2)  # [B,N,1]
    xy = torch.matmul(x, y.permute(0, 2, 1))  # [B,N,M]
    yy = (y * y).sum(-1).unsqueeze(1)  # [B,1,M]
    return torch.sqrt(torch.clamp_min(xx - 2 * xy + yy, _CLAMP))


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """geomloss `SamplesLoss("energy")` with uniform weights: x [B,N,D], y [B,M,D] -> [B].

    Also accepts single sets x [N,D], y [M,D] and then returns a scalar (as geomloss does).
    """
    if x.dim() != y.dim() or x.dim() not in (2, 3) or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"energy_distance expects [B,N,D] and [B,M,D] (or [N,D], [M,D]); got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    single = x.dim() == 2
    if single:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"energy_distance: different numbers of sets, {x.shape[0]} and {y.shape[0]}")
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    a = torch.full((B, N), 1.0 / N, dtype=x.dtype, device=x.device)  # uniform weights [B,N]
    b = torch.full((B, M), 1.0 / M, dtype=y.dtype, device=y.device)  # [B,M]

    k_xx = -_distances(_double_grad(x), x.detach())  # [B,N,N]
    k_yy = -_distances(_double_grad(y), y.detach())  # [B,M,M]
    k_xy = -_distances(x, y)  # [B,N,M]
    a_x = (k_xx @ a.unsqueeze(-1)).squeeze(-1)  # [B,N]
    b_y = (k_yy @ b.unsqueeze(-1)).squeeze(-1)  # [B,M]
    b_x = (k_xy @ b.unsqueeze(-1)).squeeze(-1)  # [B,N]
    loss = 0.5 * (a * a_x).sum(1) + 0.5 * (b * b_y).sum(1) - (a * b_x).sum(1)  # [B]
    return loss[0] if single else loss


def mse_per_set(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per set: x, y [B,S,D] (same shape) -> [B]."""
    if x.shape != y.shape:
        raise ValueError(f"mse needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (x - y).pow(2).flatten(1).mean(1)


def _samples_loss(name: str, blur: float) -> nn.Module:
    try:
        from geomloss import SamplesLoss
    except ImportError as e:  # pragma: no cover - geomloss is a dependency
        raise UserError(
            f"loss '{name}' needs the geomloss package; install it with `pip install geomloss`"
        ) from e
    return SamplesLoss(loss=name, blur=blur)


class DistributionLoss(nn.Module):
    """Per-set distributional loss: `loss(pred [B,S,D], target [B,S',D]) -> [B]`.

    name: "energy" (exact geomloss energy, no geomloss needed), "sinkhorn" (geomloss, uses `blur`),
    or "mse" (needs S == S'). `blur` has no effect on energy or mse.
    """

    def __init__(self, name: str = "energy", blur: float = 0.05):
        super().__init__()
        if name not in LOSS_NAMES:
            raise UserError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
        self.name = name
        self.blur = float(blur)
        self._sinkhorn = _samples_loss("sinkhorn", self.blur) if name == "sinkhorn" else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.dim() != 3 or target.dim() != 3:
            raise ValueError(f"expected [B,S,D] sets, got {tuple(pred.shape)} and {tuple(target.shape)}")
        if self.name == "energy":
            return energy_distance(pred, target)
        if self.name == "mse":
            return mse_per_set(pred, target)
        assert self._sinkhorn is not None
        return self._sinkhorn(pred, target)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, blur={self.blur}"


__all__ = ["LOSS_NAMES", "DistributionLoss", "energy_distance", "mse_per_set"]
