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


def test_unbiased_energy_matches_the_pairwise_definition():
    from tahoe_ft.model.loss import unbiased_energy_distance

    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(3, 7, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 11, 5, generator=g, dtype=torch.float64) + 0.3,
    )
    want = []
    for b in range(3):
        cross = torch.cdist(x[b], y[b]).mean()
        dxx = torch.cdist(x[b], x[b])
        dyy = torch.cdist(y[b], y[b])
        self_x = dxx.sum() / (7 * 6)  # the diagonal is 0 in cdist: the sum runs over i != j
        self_y = dyy.sum() / (11 * 10)
        want.append(cross - 0.5 * self_x - 0.5 * self_y)
    torch.testing.assert_close(unbiased_energy_distance(x, y), torch.stack(want), rtol=1e-9, atol=1e-9)
    # the training loss is above it by the self terms' diagonal share: V - U = 0.5 (U_xx - V_xx) + 0.5 (U_yy - V_yy)
    v = energy_distance(x, y)
    gap = 0.5 * (torch.cdist(x, x).sum((1, 2)) / 42 - torch.cdist(x, x).mean((1, 2))) + 0.5 * (
        torch.cdist(y, y).sum((1, 2)) / 110 - torch.cdist(y, y).mean((1, 2))
    )
    assert (gap > 0).all()
    # (up to the clamp: the loss counts each self-distance as 1e-4, i.e. 0.5 (1e-4/N + 1e-4/M) = 1.2e-5 here)
    torch.testing.assert_close(v - unbiased_energy_distance(x, y), gap, rtol=0, atol=2e-5)


def test_unbiased_energy_is_zero_on_average_for_a_perfect_sampler_where_the_loss_is_not():
    """Sets drawn from one distribution: the training loss (V-statistic) averages delta/S > 0 (delta: the
    mean distance between two cells), the unbiased form averages 0; a shifted prediction is above 0."""
    from tahoe_ft.model.loss import unbiased_energy_distance

    g = torch.Generator().manual_seed(0)
    sets, s, d = 400, 16, 50
    x, y = torch.randn(sets, s, d, generator=g), torch.randn(sets, s, d, generator=g)
    u = unbiased_energy_distance(x, y)
    se = u.std() / sets**0.5
    assert abs(u.mean().item()) < 3 * se.item()
    delta = torch.cdist(y[:50].reshape(-1, d), x[:50].reshape(-1, d)).mean().item()  # ~ sqrt(2 d)
    v = energy_distance(x, y)
    assert v.mean().item() == pytest.approx(delta / s, rel=0.05)
    shifted = unbiased_energy_distance(x + 0.5, y).mean().item()
    assert shifted > 10 * se.item()
    assert unbiased_energy_distance(x + 1.0, y).mean().item() > shifted


def test_unbiased_energy_refuses_sets_of_one_cell():
    from tahoe_ft.model.loss import unbiased_energy_distance

    with pytest.raises(ValueError, match=">= 2 cells"):
        unbiased_energy_distance(torch.zeros(1, 1, 3), torch.zeros(1, 4, 3))


def test_unbiased_energy_counts_a_cell_drawn_twice_once():
    """Sets drawn with replacement from small pools (the sampler's basal draws and top-ups): the copies are not
    pairs of distinct cells, so the estimate stays 0 on average for two draws of one distribution; over all
    slot pairs it would be biased upward."""
    from tahoe_ft.model.loss import unbiased_energy_distance

    g = torch.Generator().manual_seed(1)
    sets, s, d, pool = 300, 16, 30, 12
    x_pool, y_pool = torch.randn(sets, pool, d, generator=g), torch.randn(sets, pool, d, generator=g)
    pick = lambda p: torch.gather(p, 1, torch.randint(0, pool, (sets, s, 1), generator=g).expand(-1, -1, d))  # noqa: E731
    x, y = pick(x_pool), pick(y_pool)
    u = unbiased_energy_distance(x, y)
    assert abs(u.mean().item()) < 3 * (u.std() / sets**0.5).item()
    # the plain U-statistic over slots i != j (copies as zero distances) sits well above 0
    slots = torch.cdist(x, y).mean((1, 2)) - 0.5 * (
        torch.cdist(x, x).sum((1, 2)) + torch.cdist(y, y).sum((1, 2))
    ) / (s * (s - 1))
    assert (
        slots.mean().item() > 0.5
        and slots.mean().item() > u.mean().item() + 10 * (u.std() / sets**0.5).item()
    )
    # a set of one cell repeated: its self term is 0
    one = torch.randn(1, 1, d, generator=g).expand(1, 5, d)
    torch.testing.assert_close(
        unbiased_energy_distance(one, one),
        torch.zeros(1, dtype=torch.float64),
        atol=2e-4,
        rtol=0,  # the cross term keeps the clamp's 1e-4
    )


def test_unbiased_mean_error_removes_the_set_means_noise():
    """Two sets of one distribution: the set-mean MSE averages (var/N + var/M) per coordinate, the unbiased
    form 0; a mean shift of 0.3 in every coordinate gives 0.09; the formula on a hand case."""
    from tahoe_ft.model.loss import unbiased_mean_error

    g = torch.Generator().manual_seed(2)
    sets, n, m, d = 500, 8, 12, 40
    x, y = 2 * torch.randn(sets, n, d, generator=g), 2 * torch.randn(sets, m, d, generator=g)
    mse = mse_per_set(x.mean(1, keepdim=True), y.mean(1, keepdim=True))
    assert mse.mean().item() == pytest.approx(4 / n + 4 / m, rel=0.05)
    u = unbiased_mean_error(x, y)
    assert abs(u.mean().item()) < 3 * (u.std() / sets**0.5).item()
    assert unbiased_mean_error(x + 0.3, y).mean().item() == pytest.approx(0.09, abs=0.02)
    a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # mean (1, 2), var (2, 2)
    b = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])  # mean (1, 1), var 0
    # (|(0, 1)|^2 - (2 + 2) / 2 - 0) / 2 = (1 - 2) / 2
    torch.testing.assert_close(unbiased_mean_error(a, b), torch.tensor([-0.5], dtype=torch.float64))
