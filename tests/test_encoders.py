"""wav2vec2 / umT5 / CLIP loaders: every accepted layout gives the same outputs, every refusal says why."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from infinite_talk.errors import CheckpointError, InputError
from infinite_talk.models.audio_encoder import load_audio_encoder
from infinite_talk.models.configs import GEOMETRY_TINY as G
from infinite_talk.models.configs import ClipConfig, T5Config, Wav2VecConfig
from infinite_talk.models.image_encoder import CLIP_MEAN, CLIP_STD, load_image_encoder
from infinite_talk.models.text_encoder import clean_prompt, load_t5_model, load_text_encoder
from infinite_talk.presets import tiny_encoders as tiny


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    t5, tok = tiny.write_tiny_t5(d, G, seed=1)
    return {"wav2vec": tiny.write_tiny_wav2vec(d, G, seed=1), "t5": t5, "tok": tok,
            "clip": tiny.write_tiny_clip(d, G, seed=1), "dir": d}


def _wave(seconds=1.3, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


# ------------------------------------------------------------------------------------------------ wav2vec2


def test_writers_are_deterministic(tmp_path, files):
    again = tiny.write_tiny_wav2vec(tmp_path, G, seed=1)
    assert again.read_bytes() == files["wav2vec"].read_bytes()
    other = tiny.tiny_wav2vec_state(G, seed=2)
    assert not torch.equal(other["wav2vec2.feature_projection.projection.weight"],
                           tiny.tiny_wav2vec_state(G, seed=1)["wav2vec2.feature_projection.projection.weight"])


def test_wav2vec_embedding_shape_and_frame_count(files):
    enc = load_audio_encoder(files["wav2vec"], G)
    for n in (16000, 16639, 16640, 36800):
        emb = enc.embed(_wave(n / 16000))
        assert emb.shape == (int(n / 16000 * 25), G.wav2vec.num_hidden_layers, G.wav2vec.hidden_size)
        assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert enc.provenance == "tiny test encoder" and enc.warning is None


def test_wav2vec_interpolates_cnn_features_before_the_transformer(files):
    """Manual pipeline with transformers' sub-modules: CNN -> linear(align_corners) -> projection -> encoder."""
    enc = load_audio_encoder(files["wav2vec"], G)
    wave = _wave(0.9)
    frames = int(len(wave) / 16000 * 25)
    m = enc.model
    feats = m.feature_extractor(torch.from_numpy(wave)[None])
    feats = torch.nn.functional.interpolate(feats, size=frames, mode="linear", align_corners=True).transpose(1, 2)
    hidden, _ = m.feature_projection(feats)
    states = [hidden]
    # post-LN encoder: pos-conv + LN, then each layer
    x = hidden + m.encoder.pos_conv_embed(hidden)
    x = m.encoder.layer_norm(x)
    for layer in m.encoder.layers:
        out = layer(x)
        x = out[0] if isinstance(out, tuple) else out
        states.append(x)
    manual = torch.stack(states[1:], dim=1)[0].transpose(0, 1)
    torch.testing.assert_close(enc.embed(wave), manual, rtol=1e-5, atol=1e-5)


def test_wav2vec_hf_folder_layouts_agree_with_kijai_file(files, tmp_path):
    ref = load_audio_encoder(files["wav2vec"], G).embed(_wave())
    state = tiny.tiny_wav2vec_state(G, seed=1)
    # HF folder, Wav2Vec2ForPreTraining file: quantizer / project heads present, pytorch_model.bin
    folder = tmp_path / "chinese-wav2vec2-base"
    folder.mkdir()
    pre = dict(state)
    pre["quantizer.codevectors"] = torch.zeros(1, 8, 4)
    pre["project_q.weight"] = torch.zeros(4, 4)
    pre["project_hid.weight"] = torch.zeros(4, G.wav2vec.hidden_size)
    pre["wav2vec2.masked_spec_embed"] = torch.zeros(G.wav2vec.hidden_size)
    torch.save(pre, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"feat_extract_norm": "group", "do_stable_layer_norm": False,
                                                    "num_attention_heads": G.wav2vec.num_attention_heads}))
    torch.testing.assert_close(load_audio_encoder(folder, G).embed(_wave()), ref, rtol=0, atol=0)
    # bare Wav2Vec2Model names with transformers' parametrization names, fp16 safetensors
    bare = {}
    for k, v in state.items():
        k = k.removeprefix("wav2vec2.").replace("weight_g", "parametrizations.weight.original0")
        bare[k.replace("weight_v", "parametrizations.weight.original1")] = v
    save_file(bare, str(tmp_path / "bare.safetensors"))
    torch.testing.assert_close(load_audio_encoder(tmp_path / "bare.safetensors", G).embed(_wave()), ref,
                               rtol=0, atol=0)


def test_wav2vec_refusals(files, tmp_path):
    state = tiny.tiny_wav2vec_state(G, seed=1)
    ctc = dict(state, **{"lm_head.weight": torch.zeros(32, G.wav2vec.hidden_size), "lm_head.bias": torch.zeros(32)})
    save_file(ctc, str(tmp_path / "wav2vec2-base-960h.safetensors"))
    with pytest.raises(CheckpointError, match=r"Audio encoder must be TencentGameMate/chinese-wav2vec2-base; .*"
                                              r"wav2vec2-base-960h\.safetensors is a CTC speech-recognition fine-tune"):
        load_audio_encoder(tmp_path / "wav2vec2-base-960h.safetensors", G)
    wide = dataclasses.replace(G, wav2vec=Wav2VecConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, conv_dim=32))
    with pytest.raises(CheckpointError, match=r"Audio encoder must be TencentGameMate/chinese-wav2vec2-base "
                                              r"\(2 layers x 48\); .* has hidden size 32 \(expected 48\)"):
        load_audio_encoder(files["wav2vec"], wide)
    deep = dataclasses.replace(G, wav2vec=dataclasses.replace(G.wav2vec, num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"2 transformer layers \(expected 3\)"):
        load_audio_encoder(files["wav2vec"], deep)
    large = dict(state, **{"wav2vec2.feature_extractor.conv_layers.1.layer_norm.weight": torch.ones(32)})
    save_file(large, str(tmp_path / "large.safetensors"))
    with pytest.raises(CheckpointError, match=r"layer-norm conv stack"):
        load_audio_encoder(tmp_path / "large.safetensors", G)
    with pytest.raises(CheckpointError, match=r"not a wav2vec2 checkpoint"):
        load_audio_encoder(files["clip"], G)
    with pytest.raises(CheckpointError, match=r"missing\.safetensors: audio encoder not found"):
        load_audio_encoder(tmp_path / "missing.safetensors", G)


def test_wav2vec_unconfirmed_provenance_is_reported(files):
    real_named = dataclasses.replace(G, name="14b")
    enc = load_audio_encoder(files["wav2vec"], real_named)
    assert enc.provenance.startswith("unconfirmed")
    assert "any wav2vec2-base pre-training checkpoint has the same shapes" in enc.warning
    assert str(files["wav2vec"]) in enc.warning


def test_wav2vec_input_checks(files):
    enc = load_audio_encoder(files["wav2vec"], G)
    with pytest.raises(InputError, match="too short"):
        enc.embed(np.zeros(600, np.float32))
    with pytest.raises(InputError, match="NaN"):
        enc.embed(np.full(16000, np.nan, np.float32))


def test_wav2vec_dtype_applied(files):
    enc = load_audio_encoder(files["wav2vec"], G, dtype=torch.bfloat16)
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    ref = load_audio_encoder(files["wav2vec"], G).embed(_wave())
    out = enc.embed(_wave()).float()
    assert (out - ref).norm() / ref.norm() < 0.1


# ---------------------------------------------------------------------------------------------------- umT5


def test_clean_prompt():
    assert clean_prompt("  A  man &amp;amp; a\n\nwoman\t talk ") == "A man & a woman talk"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy repairs mojibake


def test_t5_encode_trims_to_real_tokens(files):
    enc = load_text_encoder(files["t5"], files["tok"], G)
    ids, mask = enc.tokenize(["a man is talking", "hello"])
    assert ids.shape == (2, 512) and mask.shape == (2, 512)
    assert ids[0, :5].tolist()[-1] == 1 and ids[0, 5:].eq(0).all()  # eos 1, then pad 0
    out = enc.encode(["a man is talking", "hello"])
    assert [o.shape for o in out] == [(5, G.t5.dim), (2, G.t5.dim)]
    full = enc.forward_ids(ids, mask)
    torch.testing.assert_close(out[0], full[0, :5])
    # the trimmed rows do not depend on the padding length (padded keys are masked)
    short = enc.forward_ids(ids[:, :8], mask[:, :8])
    torch.testing.assert_close(short[0, :5], out[0], rtol=1e-5, atol=1e-5)


def test_t5_layouts_agree(files, tmp_path):
    ref = load_t5_model(files["t5"], G)
    ids = torch.tensor([[5, 9, 33, 2, 1, 0, 0]])
    mask = (ids > 0).long()
    want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    hf = tiny.tiny_t5_hf_state(G, seed=1)
    save_file(hf, str(tmp_path / "umt5_tiny_fp32.safetensors"))  # ComfyUI / HF names
    comfy = {"encoder.embed_tokens.weight" if k == "shared.weight" else k: v.half() for k, v in hf.items()}
    save_file(comfy, str(tmp_path / "umt5_tiny_fp16.safetensors"))  # only the encoder-side embedding, fp16
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file(hf, str(folder / "model.safetensors"))
    for path, tol in ((tmp_path / "umt5_tiny_fp32.safetensors", 0.0), (folder, 0.0),
                      (tmp_path / "umt5_tiny_fp16.safetensors", 2e-2)):
        got = load_t5_model(path, G)(input_ids=ids, attention_mask=mask).last_hidden_state
        assert ((got - want).norm() / want.norm()).item() <= tol, path


def test_t5_plain_fp8_is_upcast_and_scaled_fp8_refused(files, tmp_path):
    hf = tiny.tiny_t5_hf_state(G, seed=1)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in hf.items()}
    save_file(fp8, str(tmp_path / "umt5_fp8_e4m3fn.safetensors"))
    model = load_t5_model(tmp_path / "umt5_fp8_e4m3fn.safetensors", G)
    assert model.shared.weight.dtype == torch.float32
    torch.testing.assert_close(model.shared.weight, hf["shared.weight"].to(torch.float8_e4m3fn).float())
    scaled = dict(fp8, scaled_fp8=torch.zeros(0, dtype=torch.float8_e4m3fn))
    scaled["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.tensor(0.01)
    save_file(scaled, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    with pytest.raises(CheckpointError, match=r"umt5_xxl_fp8_e4m3fn_scaled\.safetensors: scaled fp8 T5 file "
                                              r"\(scaled_fp8 / scale_weight keys\) is not supported"):
        load_t5_model(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", G)


def test_t5_refuses_tokenizer_as_weights_and_wrong_geometry(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"^A tokenizer is not a weight file: google/umt5-xxl looks like a "
                                              r"tokenizer"):
        load_text_encoder("google/umt5-xxl", files["tok"], G)
    with pytest.raises(CheckpointError, match=r"^A tokenizer is not a weight file: .*umt5-tiny-tokenizer"):
        load_text_encoder(files["tok"], files["tok"], G)
    with pytest.raises(CheckpointError, match=r"^A tokenizer is not a weight file: .*tokenizer\.json"):
        load_t5_model(files["tok"] / "tokenizer.json", G)
    big = dataclasses.replace(G, t5=T5Config(vocab=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=3))
    with pytest.raises(CheckpointError, match=r"^T5 file invalid: .*umt5-tiny-enc\.pth has embedding \(512, 32\), "
                                              r"2 layers.*the umT5 encoder of this model has embedding \(512, 32\), 3"):
        load_t5_model(files["t5"], big)
    with pytest.raises(CheckpointError, match=r"^T5 file invalid: .* is not a umT5 encoder"):
        load_t5_model(files["wav2vec"], G)
    with pytest.raises(CheckpointError, match=r"no-tok: tokenizer folder not found"):
        load_text_encoder(files["t5"], tmp_path / "no-tok", G)


# ---------------------------------------------------------------------------------------------------- CLIP


def test_clip_preprocessing_and_penultimate_block(files):
    enc = load_image_encoder(files["clip"], G)
    image = torch.rand(1, 3, 1, 40, 48) * 2 - 1
    out = enc.encode(image)
    assert out.shape == (1, G.clip.tokens, G.clip.dim)
    x = torch.nn.functional.interpolate(image[:, :, 0], size=(224, 224), mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    hs = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hs) == G.clip.num_layers + 1
    torch.testing.assert_close(out, hs[-2])
    assert not torch.allclose(out, hs[-1])


def test_clip_layouts_agree(files, tmp_path):
    image = torch.rand(1, 3, 1, 64, 40) * 2 - 1
    ref = load_image_encoder(files["clip"], G).encode(image)
    hf = tiny.tiny_clip_hf_state(G, seed=1)
    hf["visual_projection.weight"] = torch.zeros(16, G.clip.dim)  # CLIPVisionModelWithProjection file
    save_file(hf, str(tmp_path / "clip_vision_h.safetensors"))
    got = load_image_encoder(tmp_path / "clip_vision_h.safetensors", G).encode(image)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    fp16 = load_image_encoder(files["clip"], G, dtype=torch.float16)
    assert {p.dtype for p in fp16.model.parameters()} == {torch.float16}


def test_clip_refusals(files, tmp_path):
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1664, 3, 14, 14)},
              str(tmp_path / "clip_vision_g.safetensors"))
    with pytest.raises(CheckpointError, match=r"^CLIP must be ViT-H/14 \(32\); got 1664 \(ViT-bigG\)"):
        load_image_encoder(tmp_path / "clip_vision_g.safetensors", G)
    real = dataclasses.replace(G, clip=ClipConfig())
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1664, 3, 14, 14)},
              str(tmp_path / "clip_vision_g.safetensors"))
    with pytest.raises(CheckpointError, match=r"^CLIP must be ViT-H/14 \(1280\); got 1664 \(ViT-bigG\)"):
        load_image_encoder(tmp_path / "clip_vision_g.safetensors", real)
    state = torch.load(files["clip"], weights_only=True)
    fewer = {k: v for k, v in state.items() if not k.startswith(f"visual.transformer.{G.clip.num_layers - 1}.")}
    torch.save(fewer, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=rf"has {G.clip.num_layers - 1} layers \(expected {G.clip.num_layers}\)"):
        load_image_encoder(tmp_path / "short.pth", G)
    small = dataclasses.replace(G, clip=dataclasses.replace(G.clip, image_size=112))
    with pytest.raises(CheckpointError, match=r"position table of 257 tokens \(expected 65\)"):
        load_image_encoder(files["clip"], small)
    with pytest.raises(CheckpointError, match=r"not a CLIP vision checkpoint"):
        load_image_encoder(files["t5"], G)
    with pytest.raises(InputError, match=r"CLIP input must be \[1,3,F,H,W\]"):
        load_image_encoder(files["clip"], G).encode(torch.zeros(1, 4, 1, 8, 8))
    assert math.isclose(sum(CLIP_MEAN), 1.34749289, rel_tol=1e-6)
