"""Loading the InfiniteTalk transformer from every released layout, recognised by keys (docs/FORMATS.md §0–§3).

Accepted:
* original Wan shards (`diffusion_pytorch_model-0000N-of-00007.safetensors`, original key names) + the InfiniteTalk
  adapter file (`single|multi/infinitetalk.safetensors`);
* ComfyUI/Kijai single files, optionally `model.diffusion_model.`-prefixed, with or without the adapter merged in,
  with the wrapper's `multitalk_audio_proj.` rename; bf16/fp16/fp32, fp8 plain (upcast) and fp8 scaled (per-tensor
  `scale_weight`/`weight_scale` applied — never loaded unscaled);
* the diffusers layout (`transformer/` folder or files with diffusers key names);
* GGUF files (city96 / Kijai, original key names, recognised by the GGUF magic): quantized weights stay quantized
  in diffusers' `GGUFLinear` (dequantized per layer at compute time), F32/F16/BF16 tensors load as plain tensors.

The model is built on the meta device and each tensor is converted, cast and assigned as it is read, so loading
never holds two copies of the model. Everything that cannot be loaded correctly is refused with a `CheckpointError`
naming the file and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from ..errors import CheckpointError
from .checkpoint_io import GGUF_PLAIN, common_prefix, is_gguf, iter_tensors, tensor_infos, weight_files
from .configs import Geometry
from .diffusers_adapter import replace_with_gguf_linear
from .transformer import InfiniteTalkTransformer

# Original (released) module names -> this model's module names. Adapter modules keep their released names.
_TOP_LEVEL = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
_TOP_LEVEL_PARAMS = {"head.modulation": "scale_shift_table"}
_IN_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2",
}
_IN_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_ADAPTER_BLOCK = ("audio_cross_attn.q_linear", "audio_cross_attn.kv_linear", "audio_cross_attn.proj", "norm_x")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_PARAM = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED_KEYS = {"scaled_fp8"}
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: not used for weight dequantisation


def original_to_model_key(key: str) -> str | None:
    """Released Wan/InfiniteTalk name -> this model's name (None if it is not one of ours)."""
    if key in _TOP_LEVEL_PARAMS:
        return _TOP_LEVEL_PARAMS[key]
    if key.startswith("audio_proj."):
        return key
    module, _, leaf = key.rpartition(".")
    if module in _TOP_LEVEL and leaf in ("weight", "bias"):
        return f"{_TOP_LEVEL[module]}.{leaf}"
    if m := _BLOCK_PARAM.match(key):
        if m.group(2) in _IN_BLOCK_PARAMS:
            return f"blocks.{m.group(1)}.{_IN_BLOCK_PARAMS[m.group(2)]}"
    if m := _BLOCK_KEY.match(key):
        index, module, leaf = m.groups()
        if module in _IN_BLOCK:
            return f"blocks.{index}.{_IN_BLOCK[module]}.{leaf}"
        if module in _ADAPTER_BLOCK:
            return key
    return None


_REVERSE_TOP = {v: k for k, v in _TOP_LEVEL.items()}
_REVERSE_IN_BLOCK = {v: k for k, v in _IN_BLOCK.items()}


def model_to_original_key(key: str) -> str:
    """This model's name -> the released Wan/InfiniteTalk name (used to write checkpoints in the real layout)."""
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("audio_proj."):
        return key
    module, _, leaf = key.rpartition(".")
    if module in _REVERSE_TOP:
        return f"{_REVERSE_TOP[module]}.{leaf}"
    if m := re.match(r"^blocks\.(\d+)\.scale_shift_table$", key):
        return f"blocks.{m.group(1)}.modulation"
    if m := _BLOCK_KEY.match(key):
        index, module, leaf = m.groups()
        if module in _REVERSE_IN_BLOCK:
            return f"blocks.{index}.{_REVERSE_IN_BLOCK[module]}.{leaf}"
        return key
    raise KeyError(key)


def is_adapter_key(model_key: str) -> bool:
    return model_key.startswith("audio_proj.") or any(f".{m}." in model_key for m in _ADAPTER_BLOCK)


@dataclass
class FilePlan:
    """How one file's tensors map onto the model."""

    path: Path
    prefix: str
    layout: str  # "original" | "diffusers"
    keys: dict[str, str] = field(default_factory=dict)  # file key -> model key
    scales: dict[str, str] = field(default_factory=dict)  # model weight key -> file key of its fp8 scale
    fp8: bool = False
    infos: dict = field(default_factory=dict)  # file key -> TensorInfo (read once from the header)
    gguf: bool = False

    def gguf_quantized(self) -> dict[str, str]:
        """model key -> GGUF type of the tensors that stay quantized."""
        if not self.gguf:
            return {}
        return {mk: self.infos[fk].dtype for fk, mk in self.keys.items() if self.infos[fk].dtype not in GGUF_PLAIN}


def _normalise(key: str, prefix: str) -> str:
    key = key[len(prefix):]
    if key.startswith("multitalk_audio_proj."):  # ComfyUI-WanVideoWrapper rename
        key = "audio_proj." + key[len("multitalk_audio_proj."):]
    return key


def _refuse_other_models(path: Path, keys: set[str], infos: dict) -> None:
    """Specific messages for Wan-family checkpoints that are not Wan2.1-I2V-14B + InfiniteTalk."""
    if any(".audio_cross_attn.q_norm." in k for k in keys):
        raise CheckpointError(f"{path}: this is a LongCat-Avatar audio adapter, not InfiniteTalk; pass the "
                              "InfiniteTalk adapter file (single/ or multi/infinitetalk.safetensors)")
    if any(k.startswith("vace_blocks.") for k in keys):
        raise CheckpointError(f"{path}: this is a Wan VACE checkpoint; InfiniteTalk needs Wan2.1-I2V-14B-480P")
    if any("audio_injector" in k for k in keys):
        raise CheckpointError(f"{path}: this is a Wan S2V checkpoint; InfiniteTalk needs Wan2.1-I2V-14B-480P")
    if "img_emb.emb_pos" in keys or "condition_embedder.image_embedder.pos_embed" in keys:
        raise CheckpointError(f"{path}: this is a Wan FLF2V (first-last-frame) checkpoint; InfiniteTalk needs "
                              "Wan2.1-I2V-14B-480P")
    if any(k.endswith(".weight._data") for k in keys):
        raise CheckpointError(f"{path}: optimum-quanto quantized files are not supported; use the bf16/fp16/fp8 "
                              "safetensors release of the model")
    patch = infos.get("patch_embedding.weight")
    if patch is not None and len(patch.shape) == 5 and patch.shape[1] == 16:
        raise CheckpointError(f"{path}: this is a Wan text-to-video (T2V) checkpoint (patch_embedding takes 16 input "
                              "channels); InfiniteTalk needs the image-to-video Wan2.1-I2V-14B-480P model (36)")


def plan_file(path: Path) -> FilePlan:
    """Read one file's header and map its keys; refuse files of other models."""
    infos = tensor_infos(path)
    if not infos:
        raise CheckpointError(f"{path}: holds no tensors")
    prefix = common_prefix(infos)
    keys = {k: _normalise(k, prefix) for k in infos}
    norm_infos = {keys[k]: v for k, v in infos.items()}
    _refuse_other_models(path, set(norm_infos), norm_infos)

    diffusers_layout = any(k.startswith("condition_embedder.") or ".attn1." in k for k in norm_infos)
    plan = FilePlan(path, prefix, "diffusers" if diffusers_layout else "original", infos=infos, gguf=is_gguf(path))
    unknown = []
    for file_key, key in keys.items():
        if key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key.endswith(_SCALE_SUFFIXES):
            module = key.rsplit(".", 1)[0]
            model_weight = original_to_model_key(module + ".weight") if not diffusers_layout else module + ".weight"
            plan.scales[model_weight or module + ".weight"] = file_key
            continue
        model_key = key if diffusers_layout else original_to_model_key(key)
        if model_key is None:
            unknown.append(file_key)
            continue
        plan.keys[file_key] = model_key
        if infos[file_key].dtype.startswith(("F8", "float8")):
            plan.fp8 = True
    if unknown:
        shown = ", ".join(unknown[:5])
        raise CheckpointError(f"{path}: {len(unknown)} tensors do not belong to a Wan2.1-I2V + InfiniteTalk model "
                              f"(e.g. {shown}); check that this is the right file")
    return plan


def _expected_shapes(geometry: Geometry) -> dict[str, tuple[int, ...]]:
    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(geometry.dit)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(plans: list[FilePlan], expected: dict[str, tuple[int, ...]], geometry: Geometry) -> None:
    for plan in plans:
        infos = plan.infos
        for file_key, model_key in plan.keys.items():
            if model_key not in expected:
                raise CheckpointError(f"{plan.path}: unexpected tensor {file_key} (the {geometry.name} model has "
                                      f"{geometry.dit.num_layers} blocks); check that this is the right file")
            shape = tuple(infos[file_key].shape)
            if shape != expected[model_key]:
                hint = ""
                if model_key == "patch_embedding.weight" and shape and shape[0] != geometry.dit.dim:
                    sizes = {1536: "Wan 1.3B", 3072: "Wan2.2 5B", 4096: "LongCat", 5120: "Wan 14B"}
                    hint = f" — this is a {sizes.get(shape[0], f'dim {shape[0]}')} model, not the {geometry.name} one"
                raise CheckpointError(f"{plan.path}: tensor {file_key} has shape {list(shape)}, expected "
                                      f"{list(expected[model_key])}{hint}")


def keeps_fp32(name: str) -> bool:
    parts = name.split(".")
    singles = [m for m in InfiniteTalkTransformer._keep_in_fp32_modules if "." not in m]
    return any(m in parts for m in singles) or name.startswith("audio_proj.norm.")


def resolve_transformer_files(transformer, adapter: str | Path | None = None) -> list[Path]:
    """The weight files to read, in order (later files win on duplicate keys, as in the reference).

    `transformer` is a file, a folder of shards, a diffusers pipeline folder, or a list of files."""
    files: list[Path] = []
    for entry in transformer if isinstance(transformer, list | tuple) else [transformer]:
        entry = Path(entry)
        if entry.is_dir() and (entry / "transformer").is_dir():
            entry = entry / "transformer"  # a diffusers pipeline folder
        files += weight_files(entry)
    if adapter is not None:
        files += weight_files(adapter)
    return files


def load_transformer(
    transformer: str | Path | list,
    adapter: str | Path | None,
    geometry: Geometry,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> InfiniteTalkTransformer:
    """Build the transformer from released files; see the module docstring for the accepted layouts."""
    files = resolve_transformer_files(transformer, adapter)
    plans = [plan_file(p) for p in files]
    expected = _expected_shapes(geometry)
    _check_shapes(plans, expected, geometry)

    all_keys = {k for plan in plans for k in plan.keys.values()}
    if any(".attn1." in k for k in all_keys) and not any(".attn2.add_k_proj." in k for k in all_keys):
        raise CheckpointError(f"{files[0]}: this Wan checkpoint has no image cross-attention (k_img), so it is not "
                              "an I2V model; InfiniteTalk needs Wan2.1-I2V-14B-480P")
    covered: dict[str, FilePlan] = {}
    for plan in plans:
        for model_key in plan.keys.values():
            covered[model_key] = plan
    missing = [k for k in expected if k not in covered]
    if missing:
        adapter_missing = [k for k in missing if is_adapter_key(k)]
        if adapter_missing and len(adapter_missing) == len(missing):
            where = ", ".join(str(p) for p in files)
            raise CheckpointError(
                f"{where}: no InfiniteTalk audio layers ({len(adapter_missing)} adapter tensors missing), so the audio "
                "would be ignored — pass the InfiniteTalk adapter file (single/infinitetalk.safetensors, or "
                "multi/infinitetalk.safetensors for two speakers) with --adapter"
            )
        shown = ", ".join(model_to_original_key(k) for k in missing[:5])
        raise CheckpointError(
            f"{files[0]}: {len(missing)} tensors missing (e.g. {shown}); the checkpoint is incomplete — pass all "
            "shards (the folder) or download it again"
        )

    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(geometry.dit)
    gguf_quantized = {k: q for plan in plans for k, q in plan.gguf_quantized().items() if covered[k] is plan}
    if gguf_quantized:
        _use_gguf_linears(model, gguf_quantized, dtype)
    for plan in plans:
        wanted = {fk for fk, mk in plan.keys.items() if covered[mk] is plan}
        scale_keys = set(plan.scales.values())
        scales = dict(iter_tensors(plan.path, scale_keys)) if scale_keys else {}
        for file_key, tensor in iter_tensors(plan.path, wanted):
            name = plan.keys[file_key]
            if name in gguf_quantized:  # stays quantized: assigned as the GGUFParameter it is
                module_name, leaf = name.rsplit(".", 1)
                model.get_submodule(module_name)._parameters[leaf] = type(tensor)(tensor.to(device),
                                                                                  quant_type=tensor.quant_type)
                continue
            if name in plan.scales:  # fp8 scaled: W = W_fp8 * scale (per tensor)
                tensor = tensor.float() * scales[plan.scales[name]].float()
            target = torch.float32 if keeps_fp32(name) else dtype
            set_module_tensor_to_device(model, name, device, value=tensor.to(target), dtype=target)
    model.eval().requires_grad_(False)
    model.loaded_from = [str(p) for p in files]
    model.weights_fp8 = any(p.fp8 for p in plans)
    model.weights_gguf = sorted(set(gguf_quantized.values()))
    return model


def _use_gguf_linears(model: InfiniteTalkTransformer, quantized: dict[str, str], dtype: torch.dtype) -> None:
    """Swap the Linear layers whose weights arrive GGUF-quantized for diffusers' GGUFLinear (compute in `dtype`)."""
    # lazy: the optional `gguf` package (diffusers' GGUF utilities import it too)
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFParameter

    not_linear = [k for k in quantized if not isinstance(model.get_submodule(k.rsplit(".", 1)[0]), torch.nn.Linear)]
    if not_linear:
        raise CheckpointError(f"GGUF-quantized tensors on layers that are not Linear ({', '.join(not_linear[:3])}); "
                              "this GGUF file was not made for Wan2.1-I2V + InfiniteTalk")
    # diffusers decides per layer from a state dict of GGUFParameters; empty placeholders carry the types
    placeholders = {k: GGUFParameter(torch.empty(0, dtype=torch.uint8), quant_type=gguf.GGMLQuantizationType[q])
                    for k, q in quantized.items()}
    replace_with_gguf_linear(model, dtype, placeholders)


def state_dict_in_original_layout(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict renamed to the released Wan/InfiniteTalk names."""
    return {model_to_original_key(k): v for k, v in model_state.items()}


def split_base_and_adapter(original_state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split an original-layout state dict into (Wan base, InfiniteTalk adapter) as released."""
    adapter = {k: v for k, v in original_state.items() if is_adapter_key(original_to_model_key(k) or "")}
    base = {k: v for k, v in original_state.items() if k not in adapter}
    return base, adapter


def load_transformer_from_state_dict(
    original_state: dict[str, torch.Tensor], geometry: Geometry, dtype: torch.dtype = torch.float32
) -> InfiniteTalkTransformer:
    """Build a model from an in-memory original-layout state dict (goldens, tests)."""
    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(geometry.dit)
    expected = model.state_dict()
    converted = {original_to_model_key(k): v for k, v in original_state.items()}
    bad = [k for k in converted if k is None or k not in expected]
    missing = [k for k in expected if k not in converted]
    if bad or missing:
        raise CheckpointError(f"state dict does not match the {geometry.name} model: missing {missing[:5]}, "
                              f"unknown {bad[:5]}")
    for name, tensor in converted.items():
        target = torch.float32 if keeps_fp32(name) else dtype
        set_module_tensor_to_device(model, name, "cpu", value=tensor.to(target), dtype=target)
    return model.eval().requires_grad_(False)
