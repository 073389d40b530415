"""Image encoder: the CLIP ViT-H/14 visual tower on `transformers.CLIPVisionModel`.

Accepted files (classified by content): the Wan original open-clip file
(`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: `visual.*` keys, fused `to_qkv`; `log_scale` and
`textual.*` are ignored), converted at load to the transformers names, and the HF / ComfyUI `clip_vision_h`
layout (`vision_model.*`; `visual_projection` / `text_model` ignored).

`encode(image [1,3,1,H,W] in [-1,1])` = the reference `CLIPModel.visual(..., use_31_block=True)`: bicubic squash to
image_size (no crop), x*0.5+0.5, CLIP mean/std, then the output of the penultimate block (no post-LN).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..errors import CheckpointError, InputError
from . import checkpoint_io
from .audio_encoder import load_module_state
from .configs import Geometry

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_KNOWN_WIDTHS = {1664: "ViT-bigG", 1280: "ViT-H", 1024: "ViT-L", 768: "ViT-B"}
_WANT = "use models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or clip_vision_h.safetensors"


def convert_open_clip_visual_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open-clip / Wan `visual.*` names -> `CLIPVisionModel` names (to_qkv split into q, k, v)."""
    out: dict[str, torch.Tensor] = {}
    vm = "vision_model."
    for key, value in state.items():
        if not key.startswith("visual."):
            continue  # log_scale, textual.*
        key = key[len("visual."):]
        if key == "patch_embedding.weight":
            out[vm + "embeddings.patch_embedding.weight"] = value
        elif key == "cls_embedding":
            out[vm + "embeddings.class_embedding"] = value.reshape(-1)
        elif key == "pos_embedding":
            out[vm + "embeddings.position_embedding.weight"] = value.reshape(-1, value.shape[-1])
        elif key.startswith("pre_norm."):
            out[vm + "pre_layrnorm." + key.split(".", 1)[1]] = value
        elif key.startswith("post_norm."):
            out[vm + "post_layernorm." + key.split(".", 1)[1]] = value
        elif key == "head" or key.startswith("head."):
            continue  # projection to the joint space: unused
        elif key.startswith("transformer."):
            _, idx, rest = key.split(".", 2)
            base = f"{vm}encoder.layers.{idx}."
            if rest.startswith("attn.to_qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{name}.{kind}"] = part
                continue
            rename = {"attn.proj.": "self_attn.out_proj.", "norm1.": "layer_norm1.", "norm2.": "layer_norm2.",
                      "mlp.0.": "mlp.fc1.", "mlp.2.": "mlp.fc2."}
            for old, new in rename.items():
                if rest.startswith(old):
                    out[base + new + rest[len(old):]] = value
                    break
            else:
                raise KeyError("visual." + key)
        else:
            raise KeyError("visual." + key)
    return out


def normalise_clip_state(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    prefix = checkpoint_io.common_prefix(list(state), ("model.", "clip_vision."))
    state = {k[len(prefix):]: v for k, v in state.items()}
    if "visual.patch_embedding.weight" in state:
        try:
            return convert_open_clip_visual_to_hf(state)
        except KeyError as err:
            raise CheckpointError(f"{path}: unknown key {err} in an open-clip visual tower; {_WANT}") from None
    if "vision_model.embeddings.patch_embedding.weight" in state:
        return {k: v for k, v in state.items() if k.startswith("vision_model.")}
    if "visual.conv1.weight" in state:
        raise CheckpointError(f"{path}: an OpenAI/open_clip-hub CLIP layout (visual.conv1) is not supported; {_WANT}")
    raise CheckpointError(f"{path}: not a CLIP vision checkpoint (no visual.patch_embedding.weight / "
                          f"vision_model.embeddings.patch_embedding.weight); {_WANT}")


def clip_config_from_state(state: dict[str, torch.Tensor], path, geometry: Geometry):
    g = geometry.clip
    patch = state["vision_model.embeddings.patch_embedding.weight"]
    width = patch.shape[0]
    if width != g.dim:
        name = _KNOWN_WIDTHS.get(width, "unknown model")
        raise CheckpointError(f"CLIP must be ViT-H/14 ({g.dim}); got {width} ({name}) in {path}; {_WANT}")
    layers = len({k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")})
    pos = state.get("vision_model.embeddings.position_embedding.weight")
    fc1 = state.get("vision_model.encoder.layers.0.mlp.fc1.weight")
    problems = []
    if tuple(patch.shape[1:]) != (3, g.patch_size, g.patch_size):
        problems.append(f"patch embedding {tuple(patch.shape)} (expected patch {g.patch_size})")
    if layers != g.num_layers:
        problems.append(f"{layers} layers (expected {g.num_layers})")
    if pos is None or pos.shape[0] != g.tokens:
        problems.append(f"position table of {None if pos is None else pos.shape[0]} tokens (expected {g.tokens})")
    if fc1 is None or fc1.shape[0] != g.dim * g.mlp_ratio:
        problems.append(f"MLP width {None if fc1 is None else fc1.shape[0]} (expected {g.dim * g.mlp_ratio})")
    if problems:
        raise CheckpointError(f"CLIP must be ViT-H/14 ({g.dim}, {g.num_layers} layers, {g.tokens} positions); "
                              f"{path} has " + "; ".join(problems) + f"; {_WANT}")
    return CLIPVisionConfig(
        hidden_size=g.dim, intermediate_size=g.dim * g.mlp_ratio, num_hidden_layers=g.num_layers,
        num_attention_heads=g.num_heads, image_size=g.image_size, patch_size=g.patch_size, num_channels=3,
        hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
    )


class ImageEncoder(checkpoint_io.ModelWrapper):
    """CLIP penultimate-block tokens of the reference frame: `encode([1,3,1,H,W] in [-1,1]) -> [1, tokens, width]`."""

    def __init__(self, model, image_size: int):
        super().__init__(model)
        self.image_size = image_size

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4:
            image = image[:, :, None]
        if image.ndim != 5 or image.shape[0] != 1 or image.shape[1] != 3:
            raise InputError(f"CLIP input must be [1,3,F,H,W] (RGB in [-1,1]); got {tuple(image.shape)}")
        frames = image[0].transpose(0, 1).float()  # [F,3,H,W]
        size = (self.image_size, self.image_size)
        x = F.interpolate(frames, size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(image.to(self.device))
        out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[-2]


def load_image_encoder(path: str | Path, geometry: Geometry, device="cpu",
                       dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """CLIP ViT-H/14 visual tower from the open-clip `.pth` or an HF/ComfyUI `vision_model.*` file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: CLIP file not found; {_WANT}")
    files = checkpoint_io.weight_files(path)
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        raw.update(checkpoint_io.load_state_dict(f))
    state = normalise_clip_state(raw, path)
    config = clip_config_from_state(state, path, geometry)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    expected = model.state_dict()
    if not any(k.startswith("vision_model.") for k in expected):  # transformers 5: the tower is the model itself
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    g = geometry.clip
    # post_layernorm only feeds the pooled output (unused here): identity when the file has none.
    for key, fill in (("post_layernorm.weight", torch.ones), ("post_layernorm.bias", torch.zeros)):
        for full in (key, "vision_model." + key):
            if full in expected and full not in state:
                state[full] = fill(g.dim)
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    cast = {k: (v.float() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else v).to(device, dtype)
            for k, v in state.items()}
    load_module_state(model, cast, path, "CLIP vision")
    tower = getattr(model, "vision_model", model)
    emb = tower.embeddings  # non-persistent buffer, still on the meta device
    emb.register_buffer("position_ids", torch.arange(g.tokens, device=device).expand((1, -1)), persistent=False)
    return ImageEncoder(model, g.image_size)
