"""Observed probability blocks (`attnctrl.attention_block`): the block a reader declares, computed
in query chunks, equals slicing the layer's full probability matrix; maps read that way equal the
maps read from the full matrix; the layer output stays SDPA's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnctrl as ac
from attnctrl.attention import attention_probs
from attnctrl.attention_block import ProbsBlock, block_probs, query_chunk, sdpa_with_lse
from attnctrl.pipelines import ControlledPipeline
from tests.conftest import call_kwargs

B, H, LQ, LK, D = 4, 3, 40, 29, 8
#: float32, exp(l − lse) vs softmax: a logit l of magnitude ≤ 16 carries 16·2⁻²⁴ ≈ 1e-6 relative error
TOL = 2e-6


def _qkb(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, LQ, D, generator=g).to(dtype)
    k = torch.randn(B, H, LK, D, generator=g).to(dtype)
    bias = torch.randn(B, H, LQ, LK, generator=g)
    return q, k, bias


def _full(q, k, bias, scale):
    return attention_probs(q.float(), k.float(), scale, bias)  # float32: (B, H, LQ, LK)


@pytest.mark.parametrize("budget", [1, 8 * 2 * 3 * LK * 7, None])  # 1 query, 7 queries, one chunk
@pytest.mark.parametrize("mean_heads", [True, False])
@pytest.mark.parametrize("heads", [None, (0, 2)])
def test_a_block_equals_the_slice_of_the_full_probabilities(budget, mean_heads, heads):
    q, k, bias = _qkb()
    block = ProbsBlock(slice(2, 4), slice(5, 33), slice(3, 20), heads, mean_heads)
    got = block_probs(q, k, 0.37, bias, block, budget=budget)
    want = _full(q, k, bias, 0.37)[2:4][:, list(heads) if heads else slice(None)][:, :, 5:33, 3:20]
    if mean_heads:
        want = want.mean(dim=1)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=TOL, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_fused_kernel_gives_sdpas_output_and_the_normaliser_of_the_block(dtype, with_bias):
    q, k, bias = _qkb(dtype)
    v = torch.randn(B, H, LK, D).to(dtype)
    mask = bias.to(dtype) if with_bias else None
    fused = sdpa_with_lse(q, k, v, mask, None)
    assert fused is not None
    out, lse = fused
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # the layer output, bit for bit
    block = ProbsBlock(slice(1, 3), slice(4, 30), slice(2, 11), (1, 2))
    got = block_probs(q, k, D**-0.5, mask, block, budget=1, lse=lse)
    want = _full(q, k, mask, D**-0.5)[1:3, 1:3, 4:30, 2:11].mean(dim=1)
    # bf16: the kernel's log-sum-exp comes from bf16 products accumulated in float32 (≈ 4e-5 measured)
    assert torch.allclose(got, want, rtol=TOL if dtype == torch.float32 else 2e-4, atol=1e-9)


def test_a_block_over_all_keys_sums_to_one_and_broadcast_biases_apply():
    q, k, _ = _qkb()
    mask = torch.zeros(1, 1, 1, LK)
    mask[..., :4] = float("-inf")  # e.g. padding keys: one row of bias broadcast over batch, heads, queries
    got = block_probs(q, k, 0.5, mask, ProbsBlock(slice(0, B), slice(0, LQ), slice(0, LK), mean_heads=False), budget=1)
    assert torch.allclose(got.sum(-1), torch.ones(B, H, LQ), atol=1e-6)
    assert torch.equal(got[..., :4], torch.zeros(B, H, LQ, 4))
    assert torch.allclose(got, _full(q, k, mask, 0.5), rtol=TOL, atol=1e-9)


def test_the_chunk_follows_the_budget():
    assert query_chunk(rows=1, heads=24, keys=4608, budget=256 * 2**20) == 303
    for budget in (1, 10**6, 10**9):
        c = query_chunk(2, 24, 4608, budget)
        assert c == 1 or 8 * 2 * 24 * 4608 * c <= budget  # at least one query, else within the budget
    assert query_chunk(2, 24, 4608, 10**9) > query_chunk(2, 24, 4608, 10**6)


def test_bf16_inputs_give_float32_probabilities():
    q, k, bias = _qkb(torch.bfloat16)
    got = block_probs(q, k, 0.3, bias.bfloat16(), ProbsBlock(slice(0, B), slice(0, LQ), slice(0, LK)), budget=1)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    want = _full(q, k, bias.bfloat16(), 0.3).mean(dim=1)  # the same bf16 numbers, upcast
    assert torch.allclose(got, want, rtol=TOL, atol=1e-9)


class FullMatrixMaps(ac.AttentionMaps):
    """AttentionMaps read the way it was before blocks: from the full explicit probability matrix."""

    name = "maps-full-matrix"
    observes_only = True

    def reads(self, call):
        return None

    def needs_probs(self, call):
        return super().reads(call) is not None  # the same calls and rows

    def probs(self, call, p):
        block = super().reads(call)
        self.observe(call, p[block.rows][:, :, block.queries, block.keys].float().mean(dim=1))
        return p


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])  # cross-attention; joint attention (renormalised)
def test_maps_from_blocks_equal_maps_from_the_full_matrix_and_keep_the_output(tiny, name):
    pipe = ControlledPipeline(tiny(name))
    kw = call_kwargs(name)
    stock = pipe("a red car", seed=0, **kw).latents
    blocks = pipe("a red car", seed=0, controls=[ac.AttentionMaps()], **kw)
    full = pipe("a red car", seed=0, controls=[FullMatrixMaps()], **kw)
    assert torch.equal(blocks.latents, stock) and torch.equal(full.latents, stock)  # observers leave the output
    got, want = blocks.maps.combined(), full.results["maps"].combined()
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
