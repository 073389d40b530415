"""Our attention kernels (models/attention_kernels.py) are custom ops: a compiled transformer block containing them is
one graph (no graph break, no recompile per attention shape) and computes what the eager model computes; an eager call
whose kernel no longer imports is a clear OptionError.

On the CPU a stand-in `fa3_fwd_interface` module (torch SDPA behind FlashAttention-3's function name and return
shape) takes the wheel's place; the op around it, its fake and the compiled graph are the real ones."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from infinite_talk.errors import OptionError
from infinite_talk.models import attention_kernels
from infinite_talk.models.configs import GEOMETRY_TINY as G
from infinite_talk.models.transformer_loading import load_transformer_from_state_dict, state_dict_in_original_layout
from infinite_talk.presets.tiny_transformer import random_transformer_inputs, random_transformer_state


@pytest.fixture
def stand_in_fa3(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v):
        calls.append((tuple(q.shape), tuple(k.shape)))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), None  # (out, log-sum-exp) like the wheel

    module = types.ModuleType("fa3_fwd_interface")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", module)
    monkeypatch.setattr(attention_kernels, "_MODULES", {})
    return calls


def test_kernel_that_no_longer_imports_is_an_option_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(attention_kernels, "_MODULES", {})
    q = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(OptionError, match="attention kernel fa3-fwd passed the probe but no longer imports"):
        attention_kernels.fa3_fwd(q, q, q)


def test_op_output_is_contiguous_in_q_dtype_like_its_fake(stand_in_fa3):
    q = torch.randn(2, 2, 8, 16, dtype=torch.bfloat16).transpose(1, 2)  # [B, L, H, D], not contiguous
    k = torch.randn(2, 5, 2, 16, dtype=torch.bfloat16)
    out = attention_kernels.fa3_fwd(q, k, k)  # the stand-in returns a transposed (non-contiguous) tensor
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_compiled_block_with_the_kernel_is_one_graph_and_matches_eager(stand_in_fa3):
    torch._dynamo.reset()
    model = load_transformer_from_state_dict(state_dict_in_original_layout(random_transformer_state(G, seed=3)), G,
                                             torch.float32)
    model.set_attention_backend("fa3_fwd")
    inputs = random_transformer_inputs(G)
    with torch.inference_mode():
        expected = model(**inputs)
    eager_calls = len(stand_in_fa3)
    # per block: self, text cross, image cross and audio cross attention (audio: batch = latent frames)
    assert eager_calls == 4 * G.dit.num_layers
    assert len({shape for _, shape in stand_in_fa3}) >= 2  # the block's attentions differ in key shape

    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    with torch.inference_mode():
        out = model(**inputs)
        again = model(**inputs)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # one block graph, reused by every block and call
    assert len(stand_in_fa3) == 3 * eager_calls  # the compiled graph runs the real kernel through the op
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
