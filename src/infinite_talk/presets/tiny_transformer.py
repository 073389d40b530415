"""Deterministic random InfiniteTalk transformers written in the released file layouts (tests, demos, benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.configs import Geometry
from ..models.transformer import InfiniteTalkTransformer
from ..models.transformer_loading import split_base_and_adapter, state_dict_in_original_layout


def random_transformer_state(geometry: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in this model's names (float32), the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InfiniteTalkTransformer.from_dit_config(geometry.dit)
        # Output head and modulation get real magnitudes so outputs are not trivially zero.
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.data.normal_(0.0, 0.02)
            elif param.ndim == 1:
                param.data.normal_(1.0, 0.05)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _wan_config(geometry: Geometry) -> dict:
    cfg = geometry.dit
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": cfg.dim, "eps": cfg.eps,
            "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "model_type": "i2v",
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_dim,
            "text_len": cfg.text_len}


def write_original_shards(folder: str | Path, state: dict, geometry: Geometry, shards: int = 7,
                          dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Wan original folder (config.json + N shards of the base, original names) and the adapter file.

    Returns (base folder, adapter file) laid out as released: `<folder>/Wan2.1-I2V-14B-480P/` and
    `<folder>/InfiniteTalk/single/infinitetalk.safetensors`.
    """
    folder = Path(folder)
    base, adapter = split_base_and_adapter(state_dict_in_original_layout(state))
    base_dir = folder / "Wan2.1-I2V-14B-480P"
    base_dir.mkdir(parents=True, exist_ok=True)
    (base_dir / "config.json").write_text(json.dumps(_wan_config(geometry), indent=2))
    keys = list(base)
    per = -(-len(keys) // shards)
    for i in range(shards):
        part = {k: base[k].to(dtype).contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(base_dir / f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    adapter_path = folder / "InfiniteTalk" / "single" / "infinitetalk.safetensors"
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in adapter.items()}, str(adapter_path))
    return base_dir, adapter_path


def write_single_file(path: str | Path, state: dict, *, prefix: str = "model.diffusion_model.",
                      with_adapter: bool = True, wrapper_rename: bool = False,
                      dtype: torch.dtype = torch.float32) -> Path:
    """ComfyUI/Kijai-style single file (original names, optional prefix, adapter merged or not)."""
    original = state_dict_in_original_layout(state)
    base, adapter = split_base_and_adapter(original)
    tensors = dict(base)
    if with_adapter:
        for k, v in adapter.items():
            if wrapper_rename and k.startswith("audio_proj."):
                k = "multitalk_audio_proj." + k[len("audio_proj."):]
            tensors[k] = v
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_adapter_file(path: str | Path, state: dict, *, wrapper_rename: bool = False) -> Path:
    _, adapter = split_base_and_adapter(state_dict_in_original_layout(state))
    if wrapper_rename:
        adapter = {("multitalk_" + k if k.startswith("audio_proj.") else k): v for k, v in adapter.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(path))
    return path


def write_diffusers_layout(folder: str | Path, state: dict, geometry: Geometry) -> Path:
    """diffusers `transformer/` folder (diffusers names, base only; the adapter stays a separate file)."""
    folder = Path(folder) / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = geometry.dit
    config = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": cfg.num_heads,
              "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
              "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
              "num_layers": cfg.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
              "eps": cfg.eps, "image_dim": cfg.image_dim, "added_kv_proj_dim": cfg.dim, "rope_max_seq_len": 1024}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    base = {k: v for k, v in state.items() if not (k.startswith("audio_proj.") or ".audio_cross_attn." in k
                                                   or ".norm_x." in k)}
    save_file({k: v.contiguous() for k, v in base.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder.parent


def fp8_scaled(state: dict) -> tuple[dict, dict]:
    """(file tensors of a ComfyUI-style fp8-scaled file in original names, the float weights it stands for).

    Linear weights of the blocks become float8_e4m3fn with a per-tensor `scale_weight`; everything else stays
    float32 (as the wrapper keeps norms, biases, embeddings and the audio projection in base precision).
    """
    original = state_dict_in_original_layout(state)
    file_tensors: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    dequantised: dict[str, torch.Tensor] = {}
    for key, value in original.items():
        if key.startswith("blocks.") and key.endswith(".weight") and value.ndim == 2:
            scale = value.abs().max().clamp(min=1e-12) / 448.0
            q = (value / scale).to(torch.float8_e4m3fn)
            file_tensors[key] = q
            file_tensors[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
            dequantised[key] = q.float() * scale
        else:
            file_tensors[key] = value
            dequantised[key] = value
    return file_tensors, dequantised


def write_gguf(path: str | Path, original_state: dict, qtype: str = "Q8_0", prefix: str = "") -> Path:
    """A GGUF file as city96/Kijai publish them: original key names, the 2-D block weights quantized to `qtype`,
    everything else F32, tensors above 4-D flattened with their shape in `comfy.gguf.orig_shape.<name>`."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    kind = GGMLQuantizationType[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "wan")
    for key, tensor in original_state.items():
        name = prefix + key
        data = tensor.float().numpy()
        if key.startswith("blocks.") and data.ndim == 2 and data.shape[1] % 32 == 0:
            packed = quantize(data, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
            continue
        if data.ndim > 4:
            writer.add_array(f"comfy.gguf.orig_shape.{name}", list(data.shape))
            data = data.reshape(data.shape[0], -1)
        writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_transformer_inputs(geometry: Geometry, persons: int = 1, frames: int = 2, h: int = 4, w: int = 4,
                              seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Keyword inputs for one transformer forward (latent frames x h x w tokens), random but reproducible."""
    g = torch.Generator().manual_seed(seed)
    cfg = geometry.dit
    f = 4 * (frames - 1) + 1
    inputs = dict(
        hidden_states=torch.randn(1, 16, frames, h, w, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 7, cfg.text_dim, generator=g),
        encoder_hidden_states_image=torch.randn(1, 5, cfg.image_dim, generator=g),
        condition=torch.randn(1, 20, frames, h, w, generator=g),
        audio=torch.randn(persons, f, 5, cfg.audio_layers, cfg.audio_dim, generator=g),
        ref_target_masks=torch.ones(3, h, w),
    )
    return {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
