"""GGUF checkpoints (city96 / Kijai layout) load by content, stay quantized, and match the float model."""

from __future__ import annotations

import pytest
import torch

from infinite_talk.errors import CheckpointError, OptionError
from infinite_talk.models.configs import GEOMETRY_TINY as G
from infinite_talk.models.transformer_loading import (
    load_transformer,
    load_transformer_from_state_dict,
    split_base_and_adapter,
    state_dict_in_original_layout,
)
from infinite_talk.presets.tiny_transformer import random_transformer_inputs, random_transformer_state, write_gguf


@pytest.fixture(scope="module")
def original():
    return state_dict_in_original_layout(random_transformer_state(G, seed=5))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("qtype,tolerance", [("Q8_0", 0.01), ("Q4_0", 0.15)])
def test_gguf_base_and_adapter_load_quantized_and_match_the_float_model(tmp_path, original, qtype, tolerance):
    base, adapter = split_base_and_adapter(original)
    # the base as city96 names it (a file name that says nothing), the adapter with the ComfyUI prefix
    base_file = write_gguf(tmp_path / "wan-i2v-480p.bin", base, qtype)
    adapter_file = write_gguf(tmp_path / "Wan2_1-InfiniteTalk_Single.gguf", adapter, qtype,
                              prefix="model.diffusion_model.")
    model = load_transformer(base_file, adapter_file, G, dtype=torch.float32)
    linear = model.blocks[0].attn1.to_q
    assert type(linear).__name__ == "GGUFLinear" and linear.weight.quant_type.name == qtype
    assert model.blocks[0].audio_cross_attn.q_linear.weight.quant_type.name == qtype  # adapter layers too
    assert model.weights_gguf == [qtype]
    assert model.patch_embedding.weight.shape == original["patch_embedding.weight"].shape  # 5-D restored
    reference = load_transformer_from_state_dict(original, G, torch.float32)
    with torch.inference_mode():
        err = _rel(model(**random_transformer_inputs(G)), reference(**random_transformer_inputs(G)))
    assert 1e-6 < err < tolerance, err


def test_bad_gguf_files_are_refused_with_the_file_named(tmp_path, original):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(CheckpointError, match="model.gguf: not a GGUF file"):
        load_transformer(fake, None, G)
    good = write_gguf(tmp_path / "good.gguf", original)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf: invalid GGUF file"):
        load_transformer(truncated, None, G)


def test_gguf_weights_refuse_a_second_quantization(tmp_path, original, monkeypatch):
    from infinite_talk.model_files import ModelFiles
    from infinite_talk.options import LoadOptions
    from infinite_talk.pipeline import InfiniteTalkPipeline
    from infinite_talk.presets import tiny

    files = tiny.ensure_tiny_models(tmp_path / "tiny")
    gguf_file = write_gguf(tmp_path / "dit.gguf", original)
    options = LoadOptions(transformer=str(gguf_file), adapter=None, vae=files.vae, t5=files.t5,
                          t5_tokenizer=files.t5_tokenizer, clip=files.clip, wav2vec=files.wav2vec,
                          quantization="int8")
    monkeypatch.setattr("infinite_talk.pipeline.resolve_model_files",
                        lambda opts, say: (ModelFiles(transformer=[str(gguf_file)], adapter=None, vae=files.vae,
                                                      t5=files.t5, t5_tokenizer=files.t5_tokenizer, clip=files.clip,
                                                      wav2vec=files.wav2vec), G))
    with pytest.raises(OptionError, match=r"quantization=int8: .*dit.gguf is already GGUF-quantized"):
        InfiniteTalkPipeline().load_models(options)


def test_models_folder_finds_gguf_files_by_content(tmp_path, original):
    from infinite_talk.model_files import discover

    base, adapter = split_base_and_adapter(original)
    write_gguf(tmp_path / "models" / "a.gguf", base)
    write_gguf(tmp_path / "models" / "b.gguf", adapter)
    found = discover(tmp_path / "models")
    assert [p.name for p in found["dit"]] == ["a.gguf"] and [p.name for p in found["adapter"]] == ["b.gguf"]
