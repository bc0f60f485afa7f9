"""Distributional losses between sets of cells, one value per set.

`energy_distance` is geomloss's `SamplesLoss("energy")` (tensorized backend, uniform weights), the loss
upstream ST trains with, computed with geomloss's float32 arithmetic. For x [B,N,D] and y [B,M,D], with
d(a,b) = sqrt(max(|a|^2 - 2<a,b> + |b|^2, 1e-8)):

    loss[b] = - 0.5 * mean_{i,j} d(x_i, x_j) - 0.5 * mean_{i,j} d(y_i, y_j) + mean_{i,j} d(x_i, y_j)

which is half the classical energy distance (up to the 1e-8 clamp, which makes the self-distances
1e-4 instead of 0 and keeps the gradient finite when points coincide). As in geomloss, the
self-interaction terms are differentiated through their first argument only, with the gradient
doubled; for a symmetric kernel that is the exact gradient, and it avoids differentiating sqrt at
the clamped diagonal twice.

Without geomloss's repeated work: each squared norm |x_i|^2, |y_j|^2 is summed once (geomloss sums each
three times, once per term it appears in), and the gradient is doubled on the [B] set means rather than on
the [B,S,D] inputs (geomloss's `x + (x - x.detach())` makes two input-sized copies per self term, ~18 MB
each for 4 sets x 64 cells x 18,080 genes). The distance matrices are geomloss's own values; only the final
means are summed in another order. scripts/bench_vcc_train.py times this against geomloss's formula and
tests/test_model.py pins the two together.

`sinkhorn` delegates to geomloss (imported lazily) and `mse` is a per-set mean squared error.

`unbiased_energy_distance` is the same quantity with the self terms averaged over distinct pairs only (the
U-statistic). The loss above (a V-statistic) counts each cell's zero distance to itself, so a predictor whose
cells are drawn from the true distribution scores delta/(2N) + delta/(2M) on average (delta: the mean distance
between two cells), which on the demo's sets of 32 cells is 68-82 % of the loss; the unbiased form is 0
on average for such a predictor and can go below 0. Validation logs it to show how much of the part a
prediction can remove a round removes (`val/unbiased_loss`).
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


def _distances(sq_a: torch.Tensor, gram: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B,N,M] from squared norms [B,N], [B,M] and the Gram matrix <a_i, b_j> [B,N,M],
    in geomloss's order: sqrt(clamp_min(|a|^2 - 2<a,b> + |b|^2, 1e-8))."""
    return torch.sqrt(torch.clamp_min(sq_a.unsqueeze(2) - 2 * gram + sq_b.unsqueeze(1), _CLAMP))


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
    sq_x = (x * x).sum(-1)  # |x_i|^2 [B,N], once for both terms it appears in
    sq_y = (y * y).sum(-1)  # |y_j|^2 [B,M]
    x_, y_ = x.detach(), y.detach()
    # self terms: differentiated through the first argument only (the second is detached) ...
    d_xx = _distances(sq_x, x @ x_.transpose(1, 2), sq_x.detach()).mean((1, 2))  # [B]
    d_yy = _distances(sq_y, y @ y_.transpose(1, 2), sq_y.detach()).mean((1, 2))  # [B]
    d_xy = _distances(sq_x, x @ y.transpose(1, 2), sq_y).mean((1, 2))  # [B]
    # ... with that gradient doubled, on the [B] means (the same chain rule as doubling it on x and y)
    loss = d_xy - 0.5 * _double_grad(d_xx) - 0.5 * _double_grad(d_yy)  # [B]
    return loss[0] if single else loss


def _check_sets(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """x [B,N,D] and y [B,M,D] with N, M >= 2, or a ValueError naming `what`."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"expected [B,N,D] and [B,M,D] sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] < 2 or y.shape[1] < 2:
        raise ValueError(f"{what} needs >= 2 cells per set, got {x.shape[1]} and {y.shape[1]}")


def _mean_distinct_pairs(a: torch.Tensor) -> torch.Tensor:
    """Mean distance between the distinct cells of each set a [B,N,D] -> [B]: over pairs i != j that are not
    the same cell drawn twice (a set drawn with replacement; a copy is found as a squared distance below 1e-9
    of the two squared norms). 0 for a set of one distinct cell."""
    sq = (a * a).sum(-1)
    sq_d = sq.unsqueeze(2) - 2 * (a @ a.transpose(1, 2)) + sq.unsqueeze(1)  # [B,N,N]
    distinct = sq_d > 1e-9 * (sq.unsqueeze(2) + sq.unsqueeze(1))  # False on the diagonal and for copies
    d = torch.sqrt(torch.clamp_min(sq_d, _CLAMP))
    pairs = distinct.sum((1, 2))
    return torch.where(pairs > 0, (d * distinct).sum((1, 2)) / pairs.clamp_min(1), torch.zeros_like(sq[:, 0]))


@torch.no_grad()
def unbiased_energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Half the energy distance between the distributions of x [B,N,D] and y [B,M,D] (N, M >= 2), estimated
    without bias: mean_{i,j} d(x_i, y_j) - 0.5 mean d(x_i, x_j) - 0.5 mean d(y_i, y_j) -> [B], the self terms
    over pairs of distinct cells (a U-statistic; a cell drawn twice, as the sampler draws basal controls and
    tops up a small group, would otherwise count as a zero distance and bias it upward).

    The same distances as `energy_distance` (geomloss's clamp included); no gradient (a validation metric).
    """
    _check_sets(x, y, "the unbiased energy distance")
    x, y = x.double(), y.double()  # the three terms are large and nearly equal
    sq_x, sq_y = (x * x).sum(-1), (y * y).sum(-1)
    d_xy = _distances(sq_x, x @ y.transpose(1, 2), sq_y).mean((1, 2))
    return d_xy - 0.5 * _mean_distinct_pairs(x) - 0.5 * _mean_distinct_pairs(y)


@torch.no_grad()
def unbiased_mean_error(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error between the means of the distributions of x [B,N,D] and y [B,M,D] (N, M >= 2), per
    coordinate, estimated without bias -> [B]:

        (|mean(x) - mean(y)|^2 - sum_d var_d(x) / N - sum_d var_d(y) / M) / D     (var with ddof=1)

    `val/mean_loss` (the set-mean term's MSE) is this plus the sampling noise of the two set means, which no
    prediction removes; this is 0 on average when the predicted and observed cells share their mean, and can
    go below 0. Treats each set's cells as independent draws (the sampler's draws with replacement are)."""
    _check_sets(x, y, "the unbiased mean error")
    x, y = x.double(), y.double()
    gap = (x.mean(1) - y.mean(1)).pow(2).sum(-1)
    noise = x.var(1, unbiased=True).sum(-1) / x.shape[1] + y.var(1, unbiased=True).sum(-1) / y.shape[1]
    return (gap - noise) / x.shape[-1]


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


__all__ = [
    "LOSS_NAMES",
    "DistributionLoss",
    "energy_distance",
    "mse_per_set",
    "unbiased_energy_distance",
    "unbiased_mean_error",
]
