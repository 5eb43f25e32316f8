"""The attention losses and the latent optimiser on hand-made inputs with known answers."""

import math

import pytest
import torch

from attnctrl.losses import (
    binarize,
    excite_loss,
    gaussian_kernel,
    nt_xent_loss,
    retention_loss,
    segregation_loss,
    smooth,
    token_maps,
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


def test_segregation_is_eq2_summed_over_pairs():
    """A-STAR Eq. 2: L_seg = Σ_{m>n} Σ min(A_m, A_n) / Σ (A_m + A_n)."""
    a, b = _blob(8, 8, 0, 4, 0, 4), _blob(8, 8, 4, 8, 4, 8)  # 16 pixels each, disjoint
    assert segregation_loss(torch.stack([a, b])).item() == 0.0
    assert segregation_loss(torch.stack([a, a])).item() == pytest.approx(0.5)  # Σmin = 16, Σsum = 32
    # half of c's support overlaps a: Σmin = 8, Σ(a + c) = 32
    c = _blob(8, 8, 2, 6, 0, 4)
    assert segregation_loss(torch.stack([a, c])).item() == pytest.approx(8 / 32)
    # three subjects: pairs (a,b) = 0, (a,a') = 0.5, (b,a') = 0 → Σ = 0.5 (mean: 0.5 / 3)
    three = torch.stack([a, b, a.clone()])
    assert segregation_loss(three).item() == pytest.approx(0.5)
    assert segregation_loss(three, "mean").item() == pytest.approx(0.5 / 3)
    assert segregation_loss(a[None]).item() == 0.0
    # graded maps (2×2): m = [.6 .2; 0 .2], n = [.1 .3; .4 .2], k = [0 0; 0 1]
    m = torch.tensor([[0.6, 0.2], [0.0, 0.2]])
    n = torch.tensor([[0.1, 0.3], [0.4, 0.2]])
    k = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    # (m,n): Σmin = .1+.2+0+.2 = .5, Σ(m+n) = 1 + 1 = 2 → .25
    assert segregation_loss(torch.stack([m, n])).item() == pytest.approx(0.25)
    # (m,k): Σmin = .2, Σ = 2 → .1;  (n,k): Σmin = .2, Σ = 2 → .1;  total .45, mean .15
    assert segregation_loss(torch.stack([m, n, k])).item() == pytest.approx(0.45)
    assert segregation_loss(torch.stack([m, n, k]), "mean").item() == pytest.approx(0.15)
    # the order of the subjects does not matter (Σ over unordered pairs)
    assert segregation_loss(torch.stack([k, m, n])).item() == pytest.approx(0.45)
    with pytest.raises(ValueError, match="reduction"):
        segregation_loss(torch.stack([m, n]), "max")


def test_retention_is_eq3_summed_over_subjects():
    """A-STAR Eq. 3: L_ret = Σ_m [1 − Σ min(A_m, B_m) / Σ (A_m + B_m)], B the previous step's mask."""
    prev = torch.stack([_blob(8, 8, 0, 4, 0, 4, 0.2) + 0.01])
    mask = binarize(prev, 0.5)
    assert mask.sum().item() == 16  # the blob, not the 0.01 floor
    # the map equals its mask: Σmin = 16, Σ(A+B) = 32 → 1 − 1/2 (the best Eq. 3 can do)
    assert retention_loss(mask, mask).item() == pytest.approx(0.5)
    # 0.3 on the mask: Σmin = 16·0.3 = 4.8, Σ(A+B) = 4.8 + 16 = 20.8 → 1 − 4.8/20.8 = 0.769231
    assert retention_loss(mask * 0.3, mask).item() == pytest.approx(1 - 4.8 / 20.8)
    assert retention_loss(mask * 0.3, mask).item() == pytest.approx(0.7692308, abs=1e-6)
    # the map left its region: Σmin = 0 → 1
    outside = _blob(8, 8, 4, 8, 4, 8)[None]
    assert retention_loss(outside, mask).item() == pytest.approx(1.0)
    # half inside: Σmin = 8, Σ(A+B) = 16 + 16 → 1 − 8/32
    half = _blob(8, 8, 2, 6, 0, 4)[None]
    assert retention_loss(half, mask).item() == pytest.approx(0.75)
    # graded 2×2: A = [.6 .2; 0 .2], B = [1 0; 0 1]: Σmin = .6 + .2, Σ(A+B) = 1 + 2 → 1 − .8/3
    a2 = torch.tensor([[[0.6, 0.2], [0.0, 0.2]]])
    b2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert retention_loss(a2, b2).item() == pytest.approx(1 - 0.8 / 3)
    # two subjects: 0.5 + 1 summed (mean: 0.75)
    two, masks = torch.cat([mask, outside]), torch.cat([mask, mask])
    assert retention_loss(two, masks).item() == pytest.approx(1.5)
    assert retention_loss(two, masks, reduction="mean").item() == pytest.approx(0.75)
    # min caps a map above 1 at the mask: min(2B, B) = B, Σmin = 16, Σ(A+B) = 32 + 16 → 1 − 1/3
    big = mask * 2.0
    assert retention_loss(big, mask).item() == pytest.approx(1 - 16 / 48)


def test_retention_soft_iou_form_is_kept_as_an_option():
    prev = torch.stack([_blob(8, 8, 0, 4, 0, 4, 0.2) + 0.01])
    mask = binarize(prev, 0.5)
    soft = lambda a: retention_loss(a, mask, form="soft-iou").item()
    assert soft(mask * 0.3) == pytest.approx(0.0, abs=1e-6)  # scale-free: rescaled to peak 1
    assert soft(_blob(8, 8, 4, 8, 4, 8)[None]) == pytest.approx(1.0)
    assert soft(_blob(8, 8, 2, 6, 0, 4)[None]) == pytest.approx(1 - 8 / 24)  # IoU = 8 / (16 + 16 − 8)
    with pytest.raises(ValueError, match="retention form"):
        retention_loss(mask, mask, form="iou")


def test_binarize_thresholds_at_a_fraction_of_each_maps_peak():
    maps = torch.tensor([[[0.2, 0.1], [0.09, 0.0]], [[1.0, 0.5], [0.49, 0.0]]])
    assert binarize(maps, 0.5).tolist() == [[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]
    assert binarize(maps, 0.4).tolist() == [[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]


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


def test_token_maps_normalize_eot_renormalises_over_the_prompt_tokens_only():
    """A&E's ``normalize_eot`` (SD 2.1): softmax over positions 1..EOT−1 instead of 1..T−2."""
    maps = torch.zeros(2, 2, 8)  # BOS, 3 word tokens (1..3), EOT at 4, padding 5..7
    maps[..., 2] = 0.05  # word token 2 slightly stronger everywhere
    maps[..., 5:] = 0.05  # and the padding as strong (SD 2.x pads with "!", which draws attention)
    eot = token_maps(maps, [[2], [3]], softmax_scale=100.0, last=4)
    assert eot[0, 0, 0].item() == pytest.approx(math.exp(5) / (math.exp(5) + 2), rel=1e-6)  # over 1, 2, 3
    assert eot[1, 1, 1].item() == pytest.approx(1 / (math.exp(5) + 2), rel=1e-6)
    # without it the padding dilutes the word maps: positions 1..6 (2, 5, 6 strong; 1, 3, 4 not)
    full = token_maps(maps, [[2]], softmax_scale=100.0)
    assert full[0, 0, 0].item() == pytest.approx(math.exp(5) / (3 * math.exp(5) + 3), rel=1e-6)
    assert torch.equal(token_maps(maps, [[2]], last=7), full)  # last=T−1 is the default slice 1:-1
    with pytest.raises(ValueError, match="outside the renormalised positions"):
        token_maps(maps, [[4]], last=4)  # the EOT itself is not a word token
    with pytest.raises(ValueError, match="last="):
        token_maps(maps, [[1]], last=8)


@pytest.mark.parametrize("temperature", [0.07, 0.5, 1.0])
def test_nt_xent_equals_pytorch_metric_learning(temperature):
    """CONFORM's reference calls ``pytorch_metric_learning.losses.NTXentLoss(temperature=τ)``."""
    from pytorch_metric_learning.losses import NTXentLoss

    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # several groups, one singleton (no positive)
    for emb in (torch.randn(10, 16, generator=gen), torch.rand(10, 64, generator=gen)):  # signed; map-like ≥ 0
        ours = nt_xent_loss(emb, labels, temperature)
        ref = NTXentLoss(temperature=temperature)(emb, labels)
        # both float32: cosines differ in the last bits (normalise-then-matmul vs its own order); the
        # log-sum-exp of ≤ 10 terms at 1/τ ≤ 14.3 keeps that well inside 1e-6 relative
        assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
        perm = torch.randperm(10, generator=gen)  # the order of the embeddings does not matter
        assert nt_xent_loss(emb[perm], labels[perm], temperature).item() == pytest.approx(ours.item(), rel=1e-6)
    # one class (no negative) and no positive pair: PML and ours both 0
    emb = torch.rand(4, 8, generator=gen)
    assert nt_xent_loss(emb, torch.zeros(4, dtype=torch.long)).item() == 0.0
    assert NTXentLoss(temperature=0.5)(emb, torch.zeros(4, dtype=torch.long)).item() == 0.0


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
