"""The `14b` geometry built on the meta device has exactly the released key set and shapes (docs/REFERENCE.md §1.9)."""

from __future__ import annotations

import pytest
from accelerate import init_empty_weights

from infinite_talk.models.configs import GEOMETRY_14B
from infinite_talk.models.transformer import InfiniteTalkTransformer
from infinite_talk.models.transformer_loading import (
    model_to_original_key,
    original_to_model_key,
    plan_file,
)


def reference_table() -> dict[str, tuple[int, ...]]:
    """docs/REFERENCE.md §1.9, written out from that table (not from our model)."""
    d, f = 5120, 13824
    table = {
        "patch_embedding.weight": (5120, 36, 1, 2, 2), "patch_embedding.bias": (5120,),
        "text_embedding.0.weight": (5120, 4096), "text_embedding.0.bias": (5120,),
        "text_embedding.2.weight": (5120, 5120), "text_embedding.2.bias": (5120,),
        "time_embedding.0.weight": (5120, 256), "time_embedding.0.bias": (5120,),
        "time_embedding.2.weight": (5120, 5120), "time_embedding.2.bias": (5120,),
        "time_projection.1.weight": (30720, 5120), "time_projection.1.bias": (30720,),
        "head.modulation": (1, 2, 5120), "head.head.weight": (64, 5120), "head.head.bias": (64,),
        "img_emb.proj.0.weight": (1280,), "img_emb.proj.0.bias": (1280,),
        "img_emb.proj.1.weight": (1280, 1280), "img_emb.proj.1.bias": (1280,),
        "img_emb.proj.3.weight": (5120, 1280), "img_emb.proj.3.bias": (5120,),
        "img_emb.proj.4.weight": (5120,), "img_emb.proj.4.bias": (5120,),
        "audio_proj.proj1.weight": (512, 46080), "audio_proj.proj1.bias": (512,),
        "audio_proj.proj1_vf.weight": (512, 73728), "audio_proj.proj1_vf.bias": (512,),
        "audio_proj.proj2.weight": (512, 512), "audio_proj.proj2.bias": (512,),
        "audio_proj.proj3.weight": (24576, 512), "audio_proj.proj3.bias": (24576,),
        "audio_proj.norm.weight": (768,), "audio_proj.norm.bias": (768,),
    }
    for i in range(40):
        b = f"blocks.{i}."
        table[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            names = ("q", "k", "v", "o") + (("k_img", "v_img") if attn == "cross_attn" else ())
            for n in names:
                table[f"{b}{attn}.{n}.weight"] = (d, d)
                table[f"{b}{attn}.{n}.bias"] = (d,)
            for n in ("norm_q", "norm_k") + (("norm_k_img",) if attn == "cross_attn" else ()):
                table[f"{b}{attn}.{n}.weight"] = (d,)
        table[b + "norm3.weight"] = (d,)
        table[b + "norm3.bias"] = (d,)
        table[b + "ffn.0.weight"], table[b + "ffn.0.bias"] = (f, d), (f,)
        table[b + "ffn.2.weight"], table[b + "ffn.2.bias"] = (d, f), (d,)
        table[b + "audio_cross_attn.q_linear.weight"], table[b + "audio_cross_attn.q_linear.bias"] = (d, d), (d,)
        table[b + "audio_cross_attn.kv_linear.weight"] = (2 * d, 768)
        table[b + "audio_cross_attn.kv_linear.bias"] = (2 * d,)
        table[b + "audio_cross_attn.proj.weight"], table[b + "audio_cross_attn.proj.bias"] = (d, d), (d,)
        table[b + "norm_x.weight"], table[b + "norm_x.bias"] = (d,), (d,)
    return table


@pytest.fixture(scope="module")
def model_shapes():
    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(GEOMETRY_14B.dit)
    assert all(p.is_meta for p in model.parameters())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_original_names_match_reference_table(model_shapes):
    table = reference_table()
    ours = {model_to_original_key(k): v for k, v in model_shapes.items()}
    assert ours == table
    assert len(table) == 1303 + 330
    assert sum(_numel(s) for s in table.values()) == 18_882_046_784


def test_every_released_layout_maps_onto_the_model(model_shapes, tmp_path):
    table = reference_table()
    # original / ComfyUI names (optionally prefixed, optionally with the wrapper's audio_proj rename)
    assert {original_to_model_key(k): v for k, v in table.items()} == model_shapes
    # headers only: write a tiny fake header per layout and let the loader's planner map it
    import json
    import struct

    def fake(path, keys):
        header = {k: {"dtype": "BF16", "shape": [1], "data_offsets": [2 * i, 2 * i + 2]} for i, k in enumerate(keys)}
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (2 * len(keys)))
        return path

    layouts = {
        "comfy": ["model.diffusion_model." + k for k in table],
        "wrapper": ["model.diffusion_model." + k.replace("audio_proj.", "multitalk_audio_proj.") for k in table],
        "diffusers": list(model_shapes),
    }
    for name, keys in layouts.items():
        plan = plan_file(fake(tmp_path / f"{name}.safetensors", keys))
        assert set(plan.keys.values()) == set(model_shapes), name


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
