from __future__ import annotations

import pytest
import torch

from tahoe_ft.errors import UserError
from tahoe_ft.model.loss import DistributionLoss, energy_distance, mse_per_set

geomloss = pytest.importorskip("geomloss")


def _naive_energy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Half the classical energy distance with the geomloss 1e-8 clamp, from torch.cdist ([B,N,D] -> [B])."""

    def d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a, b).pow(2).clamp_min(1e-8).sqrt()

    return d(x, y).mean((1, 2)) - 0.5 * d(x, x).mean((1, 2)) - 0.5 * d(y, y).mean((1, 2))


@pytest.mark.parametrize(
    "shape_x,shape_y",
    [
        ((4, 8, 3), (4, 8, 3)),
        ((3, 16, 5), (3, 9, 5)),  # N != M
        ((1, 7, 32), (1, 12, 32)),
        ((2, 64, 20), (2, 64, 20)),
        ((10, 4), (6, 4)),  # a single set
    ],
)
def test_energy_matches_geomloss(shape_x, shape_y):
    g = torch.Generator().manual_seed(sum(shape_x) * 7 + sum(shape_y))
    x = torch.randn(shape_x, generator=g, dtype=torch.float64)
    y = torch.randn(shape_y, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ref = geomloss.SamplesLoss("energy", blur=0.05)
    ours = energy_distance(x, y)
    theirs = ref(x, y)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # float32 as used in training (same float32 arithmetic as geomloss)
    xf, yf = x.float(), y.float()
    torch.testing.assert_close(energy_distance(xf, yf), ref(xf, yf), rtol=1e-5, atol=1e-5)
    if x.dim() == 3:
        torch.testing.assert_close(ours, _naive_energy(x, y), rtol=1e-6, atol=1e-8)


def test_energy_gradients_match_geomloss():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    y0 = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
    xa, ya = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    xb, yb = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    energy_distance(xa, ya).sum().backward()
    geomloss.SamplesLoss("energy")(xb, yb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ya.grad, yb.grad, rtol=1e-6, atol=1e-9)
    assert xa.grad.abs().sum() > 0


def test_energy_zero_for_identical_sets_and_finite_gradient():
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    x.requires_grad_()
    loss = energy_distance(x, y)
    assert loss.shape == (2,)
    assert loss.abs().max().item() < 1e-5
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    # identical *tensors* too (the diagonal of K_xy is clamped, not NaN)
    z = torch.randn(1, 5, 3, requires_grad=True)
    energy_distance(z, z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_energy_positive_and_growing_with_shift():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 8, generator=g)
    y = torch.randn(3, 50, 8, generator=g)
    small = energy_distance(x, y + 0.5)
    big = energy_distance(x, y + 3.0)
    assert (small > 0).all()
    assert (big > small).all()
    # one-dimensional shift of two point masses: d(x,y) - 0 - 0 (clamped self-distances ~1e-4)
    a = torch.zeros(1, 1, 1)
    b = torch.full((1, 1, 1), 2.0)
    assert energy_distance(a, b).item() == pytest.approx(2.0 - 1e-4, abs=1e-6)


def test_energy_rejects_bad_shapes():
    with pytest.raises(ValueError):
        energy_distance(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError):
        energy_distance(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))


def test_distribution_loss_options():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 12, 4, generator=g)
    target = torch.randn(2, 12, 4, generator=g) + 1.0
    torch.testing.assert_close(DistributionLoss("energy")(pred, target), energy_distance(pred, target))
    mse = DistributionLoss("mse")(pred, target)
    assert mse.shape == (2,)
    torch.testing.assert_close(mse, ((pred - target) ** 2).mean((1, 2)))
    torch.testing.assert_close(mse_per_set(pred, pred), torch.zeros(2))
    sk = DistributionLoss("sinkhorn", blur=0.05)(pred, target)
    torch.testing.assert_close(sk, geomloss.SamplesLoss("sinkhorn", blur=0.05)(pred, target))
    assert sk.shape == (2,) and (sk > 0).all()
    with pytest.raises(UserError, match="unknown loss"):
        DistributionLoss("wasserstein")
