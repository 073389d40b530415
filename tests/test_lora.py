"""LoRA files: every naming convention, alpha/rank scaling, merged == unmerged, refusals (docs/FORMATS.md §9)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infinite_talk.cli import build_parser
from infinite_talk.cli import main as cli_main
from infinite_talk.errors import CheckpointError, OptionError
from infinite_talk.flags import build_options
from infinite_talk.models.configs import GEOMETRY_TINY
from infinite_talk.models.lora import apply_loras, parse_lora_entries
from infinite_talk.models.transformer_loading import load_transformer_from_state_dict, state_dict_in_original_layout
from infinite_talk.options import LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.presets.tiny_transformer import random_transformer_inputs, random_transformer_state

G = GEOMETRY_TINY


@pytest.fixture(scope="module")
def base_model():
    state = random_transformer_state(G, seed=3)
    return load_transformer_from_state_dict(state_dict_in_original_layout(state), G)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _pair(weight: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, *weight.shape[1:], generator=g) * 0.1
    up = torch.randn(weight.shape[0], rank, *([1] * (weight.ndim - 2)), generator=g) * 0.1
    return down, up


def _p(model, name: str) -> torch.Tensor:
    return model.get_parameter(name).detach().clone()


def test_kohya_file_merges_as_strength_times_alpha_over_rank(model, tmp_path):
    q0, qb0 = _p(model, "blocks.0.attn1.to_q.weight"), _p(model, "blocks.0.attn1.to_q.bias")
    f0 = _p(model, "blocks.1.ffn.net.2.weight")
    n0, nb0 = _p(model, "blocks.0.norm2.weight"), _p(model, "blocks.0.norm2.bias")
    mod0 = _p(model, "blocks.1.scale_shift_table")
    qa, qb = _pair(q0, 4, 1)
    fa, fb = _pair(f0, 4, 2)
    g = torch.Generator().manual_seed(5)
    deltas = {k: torch.randn(*s, generator=g) for k, s in
              (("qbias", qb0.shape), ("norm", n0.shape), ("normb", nb0.shape), ("mod", mod0.shape))}
    p = "diffusion_model."
    save_file({p + "blocks.0.self_attn.q.lora_down.weight": qa, p + "blocks.0.self_attn.q.lora_up.weight": qb,
               p + "blocks.0.self_attn.q.alpha": torch.tensor(8.0), p + "blocks.0.self_attn.q.diff_b": deltas["qbias"],
               p + "blocks.1.ffn.2.lora_down.weight": fa, p + "blocks.1.ffn.2.lora_up.weight": fb,
               p + "blocks.1.ffn.2.alpha": torch.tensor(8.0),
               p + "blocks.0.norm3.diff": deltas["norm"], p + "blocks.0.norm3.diff_b": deltas["normb"],
               p + "blocks.1.modulation.diff": deltas["mod"]}, str(tmp_path / "kohya.safetensors"))

    result = apply_loras(model, [f"{tmp_path / 'kohya.safetensors'}:0.7"])
    s = 0.7
    torch.testing.assert_close(_p(model, "blocks.0.attn1.to_q.weight"), q0 + s * (8 / 4) * (qb @ qa), atol=1e-6, rtol=0)
    torch.testing.assert_close(_p(model, "blocks.0.attn1.to_q.bias"), qb0 + s * deltas["qbias"], atol=1e-6, rtol=0)
    torch.testing.assert_close(_p(model, "blocks.1.ffn.net.2.weight"), f0 + s * 2 * (fb @ fa), atol=1e-6, rtol=0)
    torch.testing.assert_close(_p(model, "blocks.0.norm2.weight"), n0 + s * deltas["norm"], atol=1e-6, rtol=0)
    torch.testing.assert_close(_p(model, "blocks.0.norm2.bias"), nb0 + s * deltas["normb"], atol=1e-6, rtol=0)
    torch.testing.assert_close(_p(model, "blocks.1.scale_shift_table"), mod0 + s * deltas["mod"], atol=1e-6, rtol=0)
    (report,) = result.reports
    assert (report.applied_keys, report.total_keys, report.modules) == (10, 10, 4)
    assert report.alpha_rank == "8/4" and report.unmatched == []
    assert "10 of 10 keys merged (4 modules), strength 0.7, alpha/rank 8/4" in result.lines[0]


def test_peft_file_without_alpha_uses_factor_one(model, tmp_path):
    w0 = _p(model, "blocks.1.attn2.add_k_proj.weight")
    a, b = _pair(w0, 2, 3)
    save_file({"transformer.blocks.1.attn2.add_k_proj.lora_A.default.weight": a,
               "transformer.blocks.1.attn2.add_k_proj.lora_B.default.weight": b}, str(tmp_path / "peft.safetensors"))
    result = apply_loras(model, [str(tmp_path / "peft.safetensors")])
    torch.testing.assert_close(_p(model, "blocks.1.attn2.add_k_proj.weight"), w0 + b @ a, atol=1e-6, rtol=0)
    assert result.reports[0].alpha_rank == "2/2" and result.reports[0].strength == 1.0


def test_underscore_and_prefixed_spellings_resolve(model, tmp_path):
    names = {"lora_unet__blocks_0_cross_attn_k_img": "blocks.0.attn2.add_k_proj.weight",
             "lycoris_blocks_1_attn1_to_out_0": "blocks.1.attn1.to_out.0.weight",
             "pipe.dit.blocks.0.audio_cross_attn.kv_linear": "blocks.0.audio_cross_attn.kv_linear.weight",
             "base_model.model.head.head": "proj_out.weight",
             "model.diffusion_model.time_projection.1": "condition_embedder.time_proj.weight"}
    tensors, expected = {}, {}
    for i, (key, param) in enumerate(names.items()):
        w0 = _p(model, param)
        a, b = _pair(w0, 2, 10 + i)
        tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(1.0)})
        expected[param] = w0 + 0.5 * (b @ a)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    result = apply_loras(model, [str(tmp_path / "mixed.safetensors")])
    for param, want in expected.items():
        torch.testing.assert_close(_p(model, param), want, atol=1e-6, rtol=0)
    assert result.reports[0].applied_keys == 15


def _full_lora(model) -> dict[str, torch.Tensor]:
    """Pairs on Linears (with alpha), a conv pair, weight/bias deltas on a Linear and a norm, a modulation delta."""
    t = {}
    for i, (orig, param) in enumerate((("blocks.0.self_attn.v", "blocks.0.attn1.to_v.weight"),
                                       ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0.weight"),
                                       ("blocks.0.audio_cross_attn.proj", "blocks.0.audio_cross_attn.proj.weight"),
                                       ("patch_embedding", "patch_embedding.weight"))):
        a, b = _pair(_p(model, param), 3, 20 + i)
        t.update({f"diffusion_model.{orig}.lora_down.weight": a, f"diffusion_model.{orig}.lora_up.weight": b,
                  f"diffusion_model.{orig}.alpha": torch.tensor(6.0)})
    g = torch.Generator().manual_seed(7)
    t["diffusion_model.blocks.1.ffn.0.diff"] = 0.01 * torch.randn(*_p(model, "blocks.1.ffn.net.0.proj.weight").shape,
                                                                  generator=g)
    t["diffusion_model.blocks.1.ffn.0.diff_b"] = 0.1 * torch.randn(G.dit.ffn_dim, generator=g)
    t["diffusion_model.blocks.1.self_attn.norm_q.diff"] = 0.1 * torch.randn(G.dit.dim, generator=g)
    t["diffusion_model.blocks.0.diff_m"] = 0.1 * torch.randn(1, 6, G.dit.dim, generator=g)
    return t


def test_unmerged_forward_equals_merged_and_is_switchable(base_model, tmp_path):
    inputs = random_transformer_inputs(G, seed=4)
    merged, unmerged = copy.deepcopy(base_model), copy.deepcopy(base_model)
    path = tmp_path / "full.safetensors"
    save_file(_full_lora(base_model), str(path))
    with torch.no_grad():
        before = base_model(**inputs)
        apply_loras(merged, [f"{path}:0.8"], "merged")
        want = merged(**inputs)
        result = apply_loras(unmerged, [f"{path}:0.8"], "unmerged")
        got = unmerged(**inputs)
        assert (want - before).abs().max() > 1e-3  # the LoRA changes the output
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        handle = result.handle
        assert handle.runtime_layers == 4 and handle.patched_tensors == 3  # 3 pair Linears + ffn.0; conv, norm, mod
        handle.set_strength(0, 0.0)
        torch.testing.assert_close(unmerged(**inputs), before, atol=1e-6, rtol=0)
        handle.set_strength(0, 0.8)
        torch.testing.assert_close(unmerged(**inputs), want, atol=2e-5, rtol=1e-5)
        handle.remove()
        assert torch.equal(unmerged(**inputs), before)  # hooks gone, patched tensors restored exactly
    assert "unmerged" in result.lines[0]


def test_unmerged_lora_survives_int8_quantization(base_model, tmp_path):
    from infinite_talk.models.quantize import quantize_transformer

    inputs = random_transformer_inputs(G, seed=5)
    path = tmp_path / "full.safetensors"
    save_file(_full_lora(base_model), str(path))
    model = copy.deepcopy(base_model)
    result = apply_loras(model, [str(path)], "unmerged")
    report = quantize_transformer(model, "int8-weight-only", "cpu")
    assert report["layers"] > 0
    result.handle.verify(model)
    with torch.no_grad():
        with_lora = model(**inputs)
        result.handle.set_strength(0, 0.0)
        without = model(**inputs)
    assert (with_lora - without).abs().max() > 1e-3  # the hooks still run on the int8 layers


def test_merging_into_quantized_weights_is_refused(base_model, tmp_path):
    from infinite_talk.models.quantize import quantize_transformer

    model = copy.deepcopy(base_model)
    quantize_transformer(model, "int8-weight-only", "cpu")
    path = tmp_path / "full.safetensors"
    save_file(_full_lora(base_model), str(path))
    with pytest.raises(OptionError, match="cannot merge a LoRA into quantized weights"):
        apply_loras(model, [str(path)], "merged")


def test_lora_of_another_model_is_refused_naming_the_file(model, tmp_path):
    path = tmp_path / "wan13b.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4)}, str(path))
    before = _p(model, "blocks.0.attn1.to_q.weight")
    with pytest.raises(CheckpointError) as err:
        apply_loras(model, [str(path)])
    assert str(path) in str(err.value) and "different model" in str(err.value) and "Wan 1.3B" in str(err.value)
    assert torch.equal(_p(model, "blocks.0.attn1.to_q.weight"), before)


def test_lora_matching_no_module_is_refused(model, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(CheckpointError, match="LoRA matched 0 modules") as err:
        apply_loras(model, [str(path)])
    assert str(path) in str(err.value)


def test_not_a_lora_and_incomplete_pairs_are_refused(model, tmp_path):
    full = tmp_path / "model.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(G.dit.dim, G.dit.dim)}, str(full))
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        apply_loras(model, [str(full)])
    half = tmp_path / "half.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, G.dit.dim)}, str(half))
    with pytest.raises(CheckpointError, match="has only its lora_down/lora_A tensor"):
        apply_loras(model, [str(half)])
    with pytest.raises(CheckpointError, match="LoRA file not found"):
        apply_loras(model, [str(tmp_path / "missing.safetensors")])


def test_keys_for_missing_blocks_are_reported_not_applied(model, tmp_path):
    w0 = _p(model, "blocks.1.attn1.to_k.weight")
    a, b = _pair(w0, 2, 30)
    path = tmp_path / "deeper.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.k.lora_down.weight": a,
               "diffusion_model.blocks.1.self_attn.k.lora_up.weight": b,
               "diffusion_model.blocks.7.self_attn.k.lora_down.weight": a.clone(),
               "diffusion_model.blocks.7.self_attn.k.lora_up.weight": b.clone()}, str(path))
    result = apply_loras(model, [str(path)])
    report = result.reports[0]
    assert (report.applied_keys, report.total_keys) == (2, 4)
    assert report.unmatched == ["diffusion_model.blocks.7.self_attn.k.lora_down.weight",
                                "diffusion_model.blocks.7.self_attn.k.lora_up.weight"]
    assert "2 keys match no module of this model" in result.lines[0]


def test_entries_and_options_validation():
    entries = parse_lora_entries(["a.safetensors:0.5", "C:\\loras\\b.safetensors", "dir:x/c.safetensors", "d.pt:-2"])
    assert [(e.path, e.strength) for e in entries] == [("a.safetensors", 0.5), ("C:\\loras\\b.safetensors", 1.0),
                                                       ("dir:x/c.safetensors", 1.0), ("d.pt", -2.0)]
    with pytest.raises(OptionError, match="outside"):
        LoadOptions(lora=["a.safetensors:11"]).validate()
    with pytest.raises(OptionError, match="lora_mode"):
        LoadOptions(lora_mode="peft").validate()
    ns = build_parser().parse_args(["generate", "--lora", "a.safetensors", "--lora", "b.safetensors:0.5",
                                    "--lora-mode", "unmerged"])
    load = build_options(LoadOptions, ns)
    assert load.lora == ["a.safetensors", "b.safetensors:0.5"] and load.lora_mode == "unmerged"


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_pipeline_applies_lora_and_shows_it_in_the_plan(tmp_path, mode):
    pipe = InfiniteTalkPipeline()
    plan = pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    w0 = _p(pipe.transformer, "blocks.0.attn1.to_q.weight")
    a, b = _pair(w0, 4, 40)
    path = tmp_path / "tiny_lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b,
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0)}, str(path))
    assert not any(line.startswith("lora:") for line in plan.lines)
    plan = pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32",
                                        lora=[f"{path}:1.5"], lora_mode=mode))
    line = next(x for x in plan.lines if x.startswith("lora:"))
    assert line == (f"lora: {path} → 3 of 3 keys {mode} (1 modules), strength 1.5, alpha/rank 2/4")
    assert plan.loras.reports[0].applied_keys == 3 and plan.as_dict()["loras"][0]["applied_keys"] == 3
    weight = _p(pipe.transformer, "blocks.0.attn1.to_q.weight")
    if mode == "merged":
        torch.testing.assert_close(weight, w0 + 1.5 * 0.5 * (b @ a), atol=1e-6, rtol=0)
    else:
        assert torch.equal(weight, w0)  # unmerged: the weights stay as loaded
        assert pipe.transformer.lora_result.handle.runtime_layers == 1


def test_cli_refuses_a_bad_lora_in_one_line(tmp_path, capsys):
    path = tmp_path / "not_lora.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    examples = Path(__file__).parent / "data" / "examples"  # real inputs: the request check passes, the LoRA is refused
    code = cli_main(["generate", "--preset", "tiny", "--lora", str(path), "--image", str(examples / "portrait.png"),
                     "--audio", str(examples / "speech_en.wav"), "--max-seconds", "0.2", "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {path}: not a LoRA file" in err and "Traceback" not in err
