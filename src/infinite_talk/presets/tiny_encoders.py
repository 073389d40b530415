"""Tiny random auxiliary-model checkpoints in the released file layouts (for the `tiny` preset, tests and demos).

Each writer builds the transformers / diffusers module of the geometry on the meta device only to learn the
parameter shapes, draws deterministic random values for a seed, converts them to the released key layout and
writes the file(s):

* `write_tiny_wav2vec` -> Kijai-style single safetensors (`wav2vec2.` prefix, pos-conv `weight_g`/`weight_v`);
* `write_tiny_t5`      -> Wan original `.pth` (`token_embedding.weight`, `blocks.N.attn.q.weight`, ...) plus a
  tokenizer folder (WordLevel, pad id 0, eos id 1, unk id 2 like umT5) loadable by `AutoTokenizer`;
* `write_tiny_clip`    -> open-clip `.pth` (`log_scale`, `visual.*` with fused `to_qkv`, a stub `textual.*`);
* `write_tiny_vae`     -> original `Wan2.1_VAE.pth` names.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..models.configs import Geometry
from ..models.text_encoder import _BLOCK_MAP

_WORDS = (
    "a the an and of to in on with at for is are was be this that it his her their man woman person people girl "
    "boy child old young he she they speaks talking talks sings singing smiles smiling looks looking camera front "
    "face mouth eyes hair head hands portrait video close up shot bright light dark room studio background "
    "natural realistic high quality detailed sharp blurry static still calm happy sad angry news anchor reads "
    "reporter interview podcast microphone red blue green white black gray yellow shirt jacket dress glasses "
    "wearing sitting standing indoor outdoor street city day night sun window table chair low worst ugly deformed "
    "extra fingers bad hands poorly drawn messy overexposed subtitles text watermark"
).split()


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic values: norms ~1, biases small, matrices N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        leaf = key.rsplit(".", 1)[-1]
        is_norm = "norm" in key and leaf in ("weight", "gamma") or leaf == "gamma"
        if is_norm:
            value = 1.0 + 0.1 * noise
        elif leaf == "bias" or len(shape) <= 1:
            value = 0.02 * noise
        else:
            value = noise / math.sqrt(max(1, math.prod(shape[1:])))
        out[key] = value.contiguous()
    return out


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------- wav2vec2


def tiny_wav2vec_state(geometry: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
    """Released (Kijai / Wav2Vec2ForPreTraining) names: `wav2vec2.` prefix, pos-conv weight_g / weight_v."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from ..models.audio_encoder import TENCENT_CONFIG

    g = geometry.wav2vec
    cfg = dict(TENCENT_CONFIG, conv_dim=[g.conv_dim] * 7, hidden_size=g.hidden_size,
               num_hidden_layers=g.num_hidden_layers, num_attention_heads=g.num_attention_heads,
               intermediate_size=g.intermediate_size, mask_time_prob=0.0, mask_feature_prob=0.0)
    with torch.device("meta"):
        model = Wav2Vec2Model(Wav2Vec2Config(**cfg))
    state = _random_state(_shapes(model), seed)
    out = {}
    for key, value in state.items():
        if key.endswith("parametrizations.weight.original0"):  # weight_g = ||v|| per tap (dims 0, 1)
            key = key.replace("parametrizations.weight.original0", "weight_g")
            v = state[key.replace("weight_g", "parametrizations.weight.original1")]
            value = v.norm(dim=(0, 1), keepdim=True) * (1.0 + 0.1 * value.abs())
        key = key.replace("parametrizations.weight.original1", "weight_v")
        out["wav2vec2." + key] = value
    return out


def write_tiny_wav2vec(dir: str | Path, geometry: Geometry, seed: int = 0) -> Path:
    return _save_safetensors(tiny_wav2vec_state(geometry, seed), Path(dir) / "wav2vec2-tiny.safetensors")


# ---------------------------------------------------------------------------------------------------------- T5


def convert_t5_hf_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in _BLOCK_MAP.items()}
    out = {}
    for key, value in state.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.embed_tokens.weight":
            continue
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            _, _, idx, rest = key.split(".", 3)
            out[f"blocks.{idx}.{inverse[rest]}"] = value
    return out


def tiny_t5_hf_state(geometry: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF `UMT5EncoderModel` names (the ComfyUI / diffusers layout)."""
    from transformers import UMT5Config, UMT5EncoderModel

    g = geometry.t5
    cfg = UMT5Config(vocab_size=g.vocab, d_model=g.dim, d_kv=g.dim_attn // g.num_heads, d_ff=g.dim_ffn,
                     num_layers=g.num_layers, num_heads=g.num_heads, relative_attention_num_buckets=g.num_buckets,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    shapes = {k: v for k, v in _shapes(model).items() if k != "encoder.embed_tokens.weight"}
    state = _random_state(shapes, seed)
    state["shared.weight"] = state["shared.weight"] * math.sqrt(g.dim)  # embeddings ~N(0,1)
    return state


def write_tiny_tokenizer(dir: str | Path, vocab_size: int) -> Path:
    """A WordLevel tokenizer folder (lower-cased whitespace words, `</s>` appended) with exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    words = list(dict.fromkeys(_WORDS))
    vocab_list = specials + words + [f"w{i}" for i in range(vocab_size)]
    vocab = {tok: i for i, tok in enumerate(vocab_list[:vocab_size])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(dir))
    return dir


def write_tiny_t5(dir: str | Path, geometry: Geometry, seed: int = 0) -> tuple[Path, Path]:
    """(weights `.pth` in the Wan original layout, tokenizer folder)."""
    dir = Path(dir)
    state = convert_t5_hf_to_original(tiny_t5_hf_state(geometry, seed))
    weights = _save_pth(state, dir / "umt5-tiny-enc.pth")
    return weights, write_tiny_tokenizer(dir / "umt5-tiny-tokenizer", geometry.t5.vocab)


# -------------------------------------------------------------------------------------------------------- CLIP


def tiny_clip_hf_state(geometry: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF `CLIPVisionModel` names with the `vision_model.` prefix (the ComfyUI clip_vision layout)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    g = geometry.clip
    cfg = CLIPVisionConfig(hidden_size=g.dim, intermediate_size=g.dim * g.mlp_ratio, num_hidden_layers=g.num_layers,
                           num_attention_heads=g.num_heads, image_size=g.image_size, patch_size=g.patch_size,
                           hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.device("meta"):
        model = CLIPVisionModel(cfg)
    shapes = {k: v for k, v in _shapes(model).items() if not k.endswith("position_ids")}
    state = _random_state(shapes, seed)
    return {("" if k.startswith("vision_model.") else "vision_model.") + k: v for k, v in state.items()}


def convert_clip_hf_to_open_clip(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    vm = "vision_model."
    out: dict[str, torch.Tensor] = {}
    dim = state[vm + "embeddings.class_embedding"].shape[0]
    out["visual.patch_embedding.weight"] = state[vm + "embeddings.patch_embedding.weight"]
    out["visual.cls_embedding"] = state[vm + "embeddings.class_embedding"].reshape(1, 1, dim)
    out["visual.pos_embedding"] = state[vm + "embeddings.position_embedding.weight"][None]
    for leaf in ("weight", "bias"):
        out[f"visual.pre_norm.{leaf}"] = state[f"{vm}pre_layrnorm.{leaf}"]
        out[f"visual.post_norm.{leaf}"] = state[f"{vm}post_layernorm.{leaf}"]
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith(vm + "encoder.layers.")})
    for i in layers:
        src = f"{vm}encoder.layers.{i}."
        dst = f"visual.transformer.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.to_qkv.{leaf}"] = torch.cat([state[src + f"self_attn.{p}_proj.{leaf}"]
                                                          for p in ("q", "k", "v")])
            for a, b in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                         ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
                out[dst + f"{b}.{leaf}"] = state[src + f"{a}.{leaf}"]
    gen = torch.Generator().manual_seed(seed + 1)
    out["visual.head"] = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    out["log_scale"] = torch.tensor(math.log(1 / 0.07))
    out["textual.token_embedding.weight"] = torch.randn(16, dim, generator=gen)  # stub text tower (ignored)
    return out


def write_tiny_clip(dir: str | Path, geometry: Geometry, seed: int = 0) -> Path:
    state = convert_clip_hf_to_open_clip(tiny_clip_hf_state(geometry, seed), seed)
    return _save_pth(state, Path(dir) / "clip-tiny-open-clip-xlm-roberta-vit.pth")


# --------------------------------------------------------------------------------------------------------- VAE


def convert_wan_vae_diffusers_to_original(state: dict[str, torch.Tensor], num_stages: int,
                                          num_res_blocks: int) -> dict[str, torch.Tensor]:
    from ..models.vae import _RESNET

    inv_res = {v: k for k, v in _RESNET.items()}
    up_index: dict[str, int] = {}
    idx = 0
    for stage in range(num_stages):
        for j in range(num_res_blocks + 1):
            up_index[f"up_blocks.{stage}.resnets.{j}"] = idx
            idx += 1
        if stage != num_stages - 1:
            up_index[f"up_blocks.{stage}.upsamplers.0"] = idx
            idx += 1
    fixed = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    out = {}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head in fixed:
            out[f"{fixed[head]}.{rest}"] = value
            continue
        if rest.startswith("conv_in."):
            new = "conv1." + rest[len("conv_in."):]
        elif rest.startswith("norm_out."):
            new = "head.0." + rest[len("norm_out."):]
        elif rest.startswith("conv_out."):
            new = "head.2." + rest[len("conv_out."):]
        elif rest.startswith("mid_block.attentions.0."):
            new = "middle.1." + rest[len("mid_block.attentions.0."):]
        elif rest.startswith("mid_block.resnets."):
            _, _, i, sub = rest.split(".", 3)
            new = f"middle.{0 if i == '0' else 2}.{inv_res[sub]}"
        elif rest.startswith("down_blocks."):
            _, i, sub = rest.split(".", 2)
            new = f"downsamples.{i}.{inv_res.get(sub, sub)}"
        else:  # up_blocks.S.resnets.J.sub / up_blocks.S.upsamplers.0.sub
            parts = rest.split(".")
            block, sub = ".".join(parts[:4]), ".".join(parts[4:])
            new = f"upsamples.{up_index[block]}.{inv_res.get(sub, sub)}"
        out[f"{head}.{new}"] = value
    return out


def tiny_vae_diffusers_state(geometry: Geometry, seed: int = 0) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKLWan

    g = geometry.vae
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=g.dim, z_dim=g.z_dim, dim_mult=list(g.dim_mult),
                                 num_res_blocks=g.num_res_blocks, attn_scales=[],
                                 temperal_downsample=list(g.temperal_downsample))
    return _random_state(_shapes(model), seed)


def write_tiny_vae(dir: str | Path, geometry: Geometry, seed: int = 0) -> Path:
    g = geometry.vae
    state = convert_wan_vae_diffusers_to_original(tiny_vae_diffusers_state(geometry, seed), len(g.dim_mult),
                                                  g.num_res_blocks)
    return _save_pth(state, Path(dir) / "Wan2.1_VAE_tiny.pth")
