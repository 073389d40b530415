"""Fast mode: the values it fills, explicit values winning, fp8 only where it runs fp8 matmuls, the plan lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infinite_talk.cli import main as cli_main
from infinite_talk.errors import OptionError
from infinite_talk.options import GenerateOptions, LoadOptions
from infinite_talk.pipeline import InfiniteTalkPipeline
from infinite_talk.presets.fast import apply_mode, plan_lines
from infinite_talk.testing.machines import simulated

EXAMPLES = Path(__file__).parent / "data" / "examples"
CPU, H100, A100 = simulated("cpu"), simulated("h100"), simulated("a100")


def test_fills_the_unset_values_and_picks_fp8_only_for_fp8_matmuls():
    load, gen = apply_mode({"mode": "fast", "lora": ["d.safetensors"]}, {"audio": "a.wav"}, caps=H100)
    assert load["quantization"] == "fp8"
    assert gen == {"audio": "a.wav", "scheduler": "distill4", "steps": 4, "shift": 5.0, "text_scale": 1.0,
                   "audio_scale": 1.0}
    for caps in (CPU, A100):  # fp8 would only store weights there: memory, not speed
        load, _ = apply_mode({"mode": "fast", "lora": ["d.safetensors"]}, {}, caps=caps)
        assert load["quantization"] == "disabled"
    lines = plan_lines(LoadOptions(mode="fast", lora=["d.safetensors"]), None, caps=CPU)
    assert lines[1].startswith("fast mode: quantization disabled (fast mode uses fp8 only for fp8 matmuls; here fp8 "
                               "would be fp8-storage: ")
    assert "no fp8 matmuls on CPU" in lines[1]
    lines = plan_lines(LoadOptions(mode="fast", lora=["d.safetensors"], quantization="fp8"), None, caps=H100)
    assert lines[1].startswith("fast mode: quantization fp8 (") and "real fp8 matmuls" in lines[1]


def test_explicit_values_win_and_are_shown():
    load, gen = apply_mode({"mode": "fast", "lora": ["d.safetensors:0.8"], "quantization": "int8"},
                           {"steps": 8, "text_scale": 5.0}, caps=H100)
    assert load["quantization"] == "int8"
    assert gen == {"steps": 8, "text_scale": 5.0, "scheduler": "euler", "shift": 5.0, "audio_scale": 1.0}
    request = GenerateOptions(**gen).validate()
    lines = plan_lines(LoadOptions(**load).validate(), request, caps=H100)
    assert lines[0].startswith("fast mode: lora d.safetensors (strength 0.8), merged")
    assert lines[1].startswith("fast mode: quantization int8 (yours; fast mode would use fp8:")
    assert lines[2] == ("fast mode: scheduler euler (the distill4 list has 4 steps; 8 asked for), steps 8 (yours; "
                        "fast mode: 4), shift 5, text_scale 5 (yours; fast mode: 1), audio_scale 1 → 3 passes per step")


def test_standard_mode_changes_nothing_and_fast_needs_a_lora():
    load, gen = apply_mode({"quantization": "disabled"}, {"steps": 40}, caps=H100)
    assert load == {"quantization": "disabled"} and gen == {"steps": 40}
    assert plan_lines(LoadOptions(), GenerateOptions(), caps=H100) == []
    with pytest.raises(OptionError, match="mode=fast needs a step/CFG-distilled LoRA: pass --lora FILE"):
        LoadOptions(mode="fast").validate()


def test_cli_dry_run_shows_the_fast_plan(tmp_path, capsys):
    code = cli_main(["generate", "--dry-run", "--mode", "fast", "--lora", "distill.safetensors", "--audio-scale", "2",
                     "--image", "x.png", "--audio", "a.wav", "--out", str(tmp_path / "o.mp4")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["steps"], out["passes_per_step"], out["scheduler"]["name"], out["shift"]) == (4, 2, "distill4", 5.0)
    assert out["mode_lines"][-1] == ("fast mode: scheduler distill4, steps 4, shift 5, text_scale 1, audio_scale 2 "
                                     "(yours; fast mode: 1) → 2 passes per step")


def test_fast_mode_runs_on_the_tiny_preset(tmp_path):
    from infinite_talk.plan.planner import resolve
    from infinite_talk.plan.probe import probe

    pipe = InfiniteTalkPipeline()
    pipe.load_models(LoadOptions(preset="tiny", model_precision="fp32", vae_precision="fp32"))
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    lora = tmp_path / "distill.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(2, dim) * 0.1,
               "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(pipe.transformer.blocks[0].ffn.net[0]
                                                                           .proj.out_features, 2) * 0.1},
              str(lora))
    load_values, gen_values = apply_mode(
        {"preset": "tiny", "model_precision": "fp32", "vae_precision": "fp32", "mode": "fast", "lora": [str(lora)]},
        {"image": str(EXAMPLES / "portrait.png"), "audio": str(EXAMPLES / "speech_en.wav"), "max_seconds": 0.8,
         "frame_num": 21, "motion_frames": 5, "seed": 1, "out": str(tmp_path / "fast.mp4")})
    fp8 = resolve(LoadOptions(preset="tiny", model_precision="fp32", quantization="fp8"), probe()).quantization
    expected_q = "fp8" if fp8 == "fp8-compute" else "disabled"  # fast mode takes fp8 only for fp8 matmuls
    assert load_values["quantization"] == expected_q
    plan = pipe.load_models(LoadOptions(**load_values))
    assert any(line.startswith(f"lora: {lora} → 2 of 2 keys merged") for line in plan.lines)
    assert any(line.startswith(f"fast mode: quantization {expected_q}") for line in plan.lines)
    result = pipe.generate(GenerateOptions(**gen_values))
    eff = result.sidecar["effective"]
    assert eff["model_calls_per_chunk"] == [4] and eff["passes_per_step"] == 1 and eff["scheduler"] == "distill4"
    assert eff["mode_lines"] == ["fast mode: scheduler distill4, steps 4, shift 5, text_scale 1, audio_scale 1 → "
                                 "1 pass per step"]
    assert result.frames == 20
