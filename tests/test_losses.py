"""The attention losses and the latent optimiser on hand-made inputs with known answers."""
import math

import pytest
import torch

from attnctrl.losses import (
    binarize, excite_loss, gaussian_kernel, nt_xent_loss, retention_loss, segregation_loss, smooth, token_maps,
)
from attnctrl.optimizer import LatentOptimizer


def _blob(h, w, y0, y1, x0, x1, value=1.0):
    m = torch.zeros(h, w)
    m[y0:y1, x0:x1] = value
    return m


def test_excite_loss_is_one_minus_the_weakest_peak():
    maps = torch.stack([_blob(4, 4, 0, 1, 0, 1, 0.8), _blob(4, 4, 2, 3, 2, 3, 0.3)])
    assert excite_loss(maps).item() == pytest.approx(0.7)
    assert excite_loss(maps * 2).item() == pytest.approx(0.4)
    assert excite_loss(maps * 10).item() == 0.0  # every peak above 1: nothing to excite


def test_segregation_zero_for_disjoint_and_half_for_identical_maps():
    a, b = _blob(8, 8, 0, 4, 0, 4), _blob(8, 8, 4, 8, 4, 8)
    assert segregation_loss(torch.stack([a, b])).item() == 0.0
    assert segregation_loss(torch.stack([a, a])).item() == pytest.approx(0.5)
    # half of b's support overlaps a: Σmin = 8, Σ(a+b) = 32
    c = _blob(8, 8, 2, 6, 0, 4)
    assert segregation_loss(torch.stack([a, c])).item() == pytest.approx(8 / 32)
    # mean over the pairs (a,b)=0, (a,a')=0.5, (b,a')=0
    assert segregation_loss(torch.stack([a, b, a.clone()])).item() == pytest.approx(0.5 / 3)
    assert segregation_loss(a[None]).item() == 0.0


def test_retention_zero_when_the_map_keeps_its_region_and_one_when_it_leaves_it():
    prev = torch.stack([_blob(8, 8, 0, 4, 0, 4, 0.2) + 0.01])
    mask = binarize(prev, 0.5)
    assert mask.sum().item() == 16  # the blob, not the 0.01 floor
    assert retention_loss(mask * 0.3, mask).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert retention_loss(_blob(8, 8, 4, 8, 4, 8)[None], mask).item() == pytest.approx(1.0)
    # half inside: IoU = 8 / (16 + 16 - 8)
    half = _blob(8, 8, 2, 6, 0, 4)[None]
    assert retention_loss(half, mask).item() == pytest.approx(1 - 8 / 24)


def test_nt_xent_prefers_the_correct_grouping():
    g1, g2 = torch.tensor([1.0, 0.1, 0.0]), torch.tensor([0.0, 0.1, 1.0])
    emb = torch.stack([g1, g1 + 0.05, g2, g2 + 0.05])
    right = nt_xent_loss(emb, torch.tensor([0, 0, 1, 1]))
    swapped = nt_xent_loss(emb, torch.tensor([0, 1, 0, 1]))
    assert right.item() < swapped.item()
    # value by hand for one anchor pair structure: 2 positives per group, 2 negatives each
    z = torch.nn.functional.normalize(emb, dim=1)
    s = z @ z.T / 0.5
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2)]
    negs = {0: [2, 3], 1: [2, 3], 2: [0, 1], 3: [0, 1]}
    want = sum(-(s[a, p] - torch.log(s[a, p].exp() + s[a, negs[a]].exp().sum())) for a, p in pairs) / 4
    assert right.item() == pytest.approx(want.item(), rel=1e-5)
    assert nt_xent_loss(emb[:2], torch.tensor([0, 1])).item() == 0.0  # no positive pair


def test_gaussian_kernel_and_smoothing():
    k = gaussian_kernel(3, 0.5)
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.equal(k, k.T) and k[1, 1] == k.max()
    # the reference's exponent −((x−μ)/(2σ))²: neighbour/centre ratio is exp(−1) for σ = 0.5
    assert (k[1, 0] / k[1, 1]).item() == pytest.approx(math.exp(-1.0))
    const = torch.full((2, 5, 5), 0.3)
    assert torch.allclose(smooth(const), const)
    spike = torch.zeros(5, 5)
    spike[2, 2] = 1
    assert smooth(spike).max().item() == pytest.approx(k[1, 1].item())


def test_token_maps_drop_first_and_last_and_renormalise():
    maps = torch.zeros(2, 2, 6)
    maps[..., 2] = 0.05  # token 2 slightly stronger everywhere
    out = token_maps(maps, [[2], [3, 4]], softmax_scale=100.0)
    expect_2 = math.exp(5) / (math.exp(5) + 3)  # softmax over tokens 1..4 (0 and 5 dropped)
    assert out[0, 0, 0].item() == pytest.approx(expect_2, rel=1e-6)
    assert out[1, 0, 0].item() == pytest.approx(2 / (math.exp(5) + 3), rel=1e-6)  # sub-words summed


def test_step_sizes_follow_the_attend_and_excite_schedule():
    opt = LatentOptimizer()
    T = 50
    want = [20 * math.sqrt(1.0 - 0.5 * i / (T - 1)) for i in range(T)]
    assert [opt.step_size(i, T) for i in range(T)] == pytest.approx(want)


def _quadratic(trace):
    """Per-image loss ‖z‖² that records each evaluation."""

    def fn(z):
        loss = (z.flatten(1) ** 2).sum(1)
        trace.append(loss.detach().clone())
        return loss

    return fn


def test_refinement_repeats_the_reference_order_of_updates():
    # z ← z − α·2z = (1 − 2α) z; with α = 0.25 each update halves z and quarters the loss
    opt = LatentOptimizer(scale_factor=0.25, scale_range=(1.0, 1.0), refinement={0: 0.1}, max_refinement=20)
    trace = []
    z = opt.run(torch.ones(1, 1), 0, 10, _quadratic(trace), update=False)
    # losses measured: 1 (start), 1/4 (> 0.1, go on), 1/16 (≤ 0.1, but this iteration already
    # updated: the reference stops after the iteration whose measured loss was on target), final
    assert [t.item() for t in trace] == pytest.approx([1, 1 / 4, 1 / 16, 1 / 64])
    assert z.item() == pytest.approx(1 / 8)


def test_refinement_is_per_image_and_bounded():
    opt = LatentOptimizer(scale_factor=0.25, scale_range=(1.0, 1.0), refinement={0: 0.1}, max_refinement=3)
    trace = []
    z = opt.run(torch.tensor([[1.0], [0.2]]), 0, 10, _quadratic(trace), update=False)
    # image 1 starts at 0.04 ≤ 0.1: never refined; image 0 stops at the bound of 3 updates
    assert z[1].item() == pytest.approx(0.2)
    assert z[0].item() == pytest.approx(1 / 8)
    fixed = LatentOptimizer(scale_factor=0.25, scale_range=(1.0, 1.0), refinement={0: None}, max_refinement=4)
    assert fixed.run(torch.tensor([[1.0]]), 0, 10, _quadratic([]), update=True).item() == pytest.approx(1 / 32)
