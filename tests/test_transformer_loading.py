"""The transformer loads from every released layout to the same weights, and refuses what it cannot load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinite_talk.errors import CheckpointError
from infinite_talk.models.configs import GEOMETRY_TINY
from infinite_talk.models.transformer_loading import load_transformer, state_dict_in_original_layout
from infinite_talk.presets.tiny_transformer import (
    fp8_scaled,
    random_transformer_inputs,
    random_transformer_state,
    write_adapter_file,
    write_diffusers_layout,
    write_original_shards,
    write_single_file,
)

G = GEOMETRY_TINY


@pytest.fixture(scope="module")
def state():
    return random_transformer_state(G, seed=3)


def _inputs(persons=1, frames=2, h=4, w=4, seed=0):
    return random_transformer_inputs(G, persons, frames, h, w, seed)


def _same_weights(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k].float(), v.float()), k


def test_original_shards_plus_adapter(tmp_path, state):
    base, adapter = write_original_shards(tmp_path, state, G)
    assert len(list(base.glob("diffusion_pytorch_model-*-of-00007.safetensors"))) == 7
    model = load_transformer(base, adapter, G, dtype=torch.float32)
    _same_weights(model, state)
    out = model(**_inputs())
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()


def test_comfy_single_file_prefixed_with_adapter_merged(tmp_path, state):
    path = write_single_file(tmp_path / "merged.safetensors", state, prefix="model.diffusion_model.")
    _same_weights(load_transformer(path, None, G, dtype=torch.float32), state)


def test_single_file_without_adapter_plus_wrapper_renamed_adapter(tmp_path, state):
    base = write_single_file(tmp_path / "base.safetensors", state, prefix="", with_adapter=False)
    adapter = write_adapter_file(tmp_path / "adapter.safetensors", state, wrapper_rename=True)
    assert any(k.startswith("multitalk_audio_proj.") for k in load_file(str(adapter)))
    _same_weights(load_transformer(base, adapter, G, dtype=torch.float32), state)


def test_merged_file_with_wrapper_rename(tmp_path, state):
    path = write_single_file(tmp_path / "m.safetensors", state, prefix="diffusion_model.", wrapper_rename=True)
    _same_weights(load_transformer(path, None, G, dtype=torch.float32), state)


def test_diffusers_layout_plus_adapter(tmp_path, state):
    folder = write_diffusers_layout(tmp_path / "pipe", state, G)
    adapter = write_adapter_file(tmp_path / "adapter.safetensors", state)
    _same_weights(load_transformer(folder, adapter, G, dtype=torch.float32), state)


def test_requested_dtype_is_really_used(tmp_path, state):
    path = write_single_file(tmp_path / "m.safetensors", state)
    model = load_transformer(path, None, G, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].audio_cross_attn.kv_linear.weight.dtype == torch.bfloat16
    # time MLPs, modulation, norms and the head stay float32 as in the reference
    assert model.condition_embedder.time_proj.weight.dtype == torch.float32
    assert model.proj_out.weight.dtype == torch.float32
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    out = model(**_inputs())
    ref = load_transformer(path, None, G, dtype=torch.float32)(**_inputs())
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 5e-2  # bf16 really ran, close to float32


def test_fp8_scaled_file_applies_scales(tmp_path, state):
    file_tensors, dequantised = fp8_scaled(state)
    path = tmp_path / "fp8_scaled.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in file_tensors.items()}, str(path))
    reference = tmp_path / "float.safetensors"
    save_file(dequantised, str(reference))
    scaled = load_transformer(path, None, G, dtype=torch.float32)
    floats = load_transformer(reference, None, G, dtype=torch.float32)
    _same_weights(scaled, floats.state_dict())
    a, b = scaled(**_inputs()), floats(**_inputs())
    assert ((a - b).norm() / b.norm()).item() < 1e-6  # same weights; only BLAS summation order may differ
    assert scaled.weights_fp8
    # the fp8 payload alone (scale ignored) is far from the true weight: the scales really matter here
    q = file_tensors["blocks.0.self_attn.q.weight"].float()
    assert q.abs().max() > 100 * dequantised["blocks.0.self_attn.q.weight"].abs().max()


def test_fp8_plain_file_is_upcast(tmp_path, state):
    original = state_dict_in_original_layout(state)
    plain = {k: (v.to(torch.float8_e4m3fn) if k.startswith("blocks.") and v.ndim == 2 else v)
             for k, v in original.items()}
    path = tmp_path / "fp8.safetensors"
    save_file(plain, str(path))
    model = load_transformer(path, None, G, dtype=torch.float32)
    w = model.blocks[0].attn1.to_q.weight
    assert torch.equal(w, plain["blocks.0.self_attn.q.weight"].float())


# ---- refusals -----------------------------------------------------------------------------------------------------

def test_refuses_plain_wan_without_adapter(tmp_path, state):
    path = write_single_file(tmp_path / "wan_i2v.safetensors", state, with_adapter=False)
    with pytest.raises(CheckpointError, match="no InfiniteTalk audio layers .* pass the InfiniteTalk adapter file"):
        load_transformer(path, None, G)


def test_refuses_t2v(tmp_path, state):
    original = state_dict_in_original_layout(state)
    original["patch_embedding.weight"] = torch.zeros(G.dit.dim, 16, 1, 2, 2)
    original = {k: v for k, v in original.items() if "k_img" not in k and "v_img" not in k}
    path = tmp_path / "t2v.safetensors"
    save_file(original, str(path))
    with pytest.raises(CheckpointError, match=r"t2v.safetensors: this is a Wan text-to-video \(T2V\) checkpoint"):
        load_transformer(path, None, G)


def test_refuses_missing_unexpected_and_misshaped(tmp_path, state):
    original = state_dict_in_original_layout(state)
    missing = dict(original)
    del missing["blocks.1.ffn.2.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing.safetensors: 1 tensors missing \(e.g. blocks.1.ffn.2.weight\)"):
        load_transformer(tmp_path / "missing.safetensors", None, G)

    extra = dict(original)
    extra["blocks.0.something_else.weight"] = torch.zeros(2)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="1 tensors do not belong .*blocks.0.something_else.weight"):
        load_transformer(tmp_path / "extra.safetensors", None, G)

    misshaped = dict(original)
    misshaped["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    save_file(misshaped, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor blocks.0.ffn.0.weight has shape \[3, 3\], expected \[64, 32\]"):
        load_transformer(tmp_path / "shape.safetensors", None, G)

    too_many_blocks = dict(original)
    too_many_blocks["blocks.7.ffn.0.weight"] = original["blocks.0.ffn.0.weight"].clone()
    save_file(too_many_blocks, str(tmp_path / "blocks.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor blocks.7.ffn.0.weight"):
        load_transformer(tmp_path / "blocks.safetensors", None, G)


def test_refuses_truncated_and_corrupt_files(tmp_path, state):
    path = write_single_file(tmp_path / "good.safetensors", state)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors: file is truncated .* download it again"):
        load_transformer(tmp_path / "truncated.safetensors", None, G)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.safetensors: not a safetensors file or truncated header"):
        load_transformer(tmp_path / "garbage.safetensors", None, G)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors: file is empty"):
        load_transformer(tmp_path / "empty.safetensors", None, G)


def test_refuses_longcat_adapter_and_other_sizes(tmp_path, state):
    base = write_single_file(tmp_path / "base.safetensors", state, with_adapter=False)
    longcat = {"multitalk_audio_proj.proj1.weight": torch.zeros(2, 2),
               "blocks.0.audio_cross_attn.q_norm.weight": torch.zeros(2),
               "blocks.0.audio_cross_attn.kv_linear.weight": torch.zeros(2, 2)}
    save_file(longcat, str(tmp_path / "longcat.safetensors"))
    with pytest.raises(CheckpointError, match="LongCat-Avatar audio adapter, not InfiniteTalk"):
        load_transformer(base, tmp_path / "longcat.safetensors", G)
    original = state_dict_in_original_layout(state)
    original["patch_embedding.weight"] = torch.zeros(1536, 36, 1, 2, 2)
    save_file(original, str(tmp_path / "small.safetensors"))
    with pytest.raises(CheckpointError, match="this is a Wan 1.3B model, not the tiny one"):
        load_transformer(tmp_path / "small.safetensors", None, G)


def test_folder_config_is_not_trusted_over_keys(tmp_path, state):
    base, adapter = write_original_shards(tmp_path, state, G)
    (base / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v"}))
    _same_weights(load_transformer(base, adapter, G, dtype=torch.float32), state)
