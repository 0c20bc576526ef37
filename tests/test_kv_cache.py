"""The text's keys and values computed once per sampling run (models/blocks.text_kv_cache): same images, fewer GEMMs."""
import contextlib

import pytest
import torch

import carrara.pipeline
from carrara.models.blocks import Attention, text_kv_cache
from carrara.pipeline import Pipeline


def test_a_cached_attention_equals_the_plain_one_and_recomputes_for_a_new_context():
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4, cross_attention_dim=6)
    x, a, b = torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    plain_a, plain_b = attn(x, a), attn(x, b)
    calls = []
    attn.to_k.register_forward_hook(lambda *_: calls.append(1))
    with text_kv_cache(attn):
        assert torch.equal(attn(x, a), plain_a) and torch.equal(attn(x + 1, a), attn.__class__.forward(attn, x + 1, a))
        assert len(calls) == 1  # three calls with context a: one key projection
        assert torch.equal(attn(x, b), plain_b) and len(calls) == 2  # a new context is projected, not the old reused
    assert attn.kv_cache is None  # nothing held after the block
    own = Attention(8, heads=2, dim_head=4)  # self-attention handed its input as the context: new each call
    y = x + 1
    plain_x, plain_y = own(x, x), own(y, y)
    with text_kv_cache(own):
        assert torch.equal(own(x, x), plain_x) and torch.equal(own(y, y), plain_y)


@pytest.fixture(scope="module")
def pipe(tiny_diffusion_run):
    return Pipeline.load(tiny_diffusion_run, precision="fp32")


def _count_key_projections(unet):
    calls = []
    handles = [m.to_k.register_forward_hook(lambda *_: calls.append(1)) for m in unet.modules()
               if isinstance(m, Attention) and m.to_k.in_features != m.to_q.in_features]  # cross-attentions
    return calls, handles, len(handles)


@pytest.mark.parametrize("sampler", ["dpmpp", "euler_a"])
def test_the_pipeline_makes_the_same_images_with_one_key_projection_per_run(pipe, monkeypatch, sampler):
    kw = {"steps": 5, "sampler": sampler, "guidance": 3.0, "seed": 2, "output": "tensor"}
    calls, handles, layers = _count_key_projections(pipe.unet)
    assert layers > 0
    try:
        cached = pipe(["a red circle", "a blue square"], **kw)
        assert len(calls) == layers  # once per cross-attention layer, not once per step
        calls.clear()
        monkeypatch.setattr(carrara.pipeline, "text_kv_cache", lambda *nets: contextlib.nullcontext())
        plain = pipe(["a red circle", "a blue square"], **kw)
        assert len(calls) == 5 * layers
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(cached, plain)
