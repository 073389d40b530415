"""Memory plan: peak GPU and host memory of a request, estimated before loading, and the offload / VAE-tiling
setting that fits (docs/OPTIONS.md §2.6, §4.6).

How the numbers are made:

* **Weights** — exact parameter counts of the real transformer and VAE modules built on the meta device, and of
  the umT5 / CLIP encoders from the geometry, times the bytes each storage format takes: fp32 4 B, bf16/fp16 2 B,
  the modules the loader keeps in fp32 4 B; quantized block Linears in torchao's layouts: fp8 (Float8Tensor) 1 B per
  weight + a fp32 scale per row, int8 (Int8Tensor) 1 B + fp32 scale + int8 zero point per row, NF4 (NF4Tensor)
  0.5 B + an int8 scaler per 64 weights + small tables. Checked byte-exact against loaded tiny models (tests).
* **Activations** — not a formula: the real forward of a one-block transformer with the request's shapes (every
  block is alike and frees its transients before the next) runs on the meta device under a dispatch mode that adds
  up the bytes of the tensors alive after each operation; the maximum is the transient peak, for the same attention
  wrapper and quantized-layer code that will run (torchao's layers run on meta too). At 832x480 and 81 frames this
  gives 3.5 GiB above the weights in bf16; benchmarks/memory.py on an H200 measured the forward's peak within 0.2%
  of the estimate, with every block on the GPU and with 24 or 32 blocks swapped. The VAE wrapper's encode and decode are traced the same way for 3 and 5 latent frames and
  extrapolated linearly (their memory grows only by the frames they keep). Tiled VAE: the untiled trace of one tile
  plus the tiles and the output it keeps. T5/CLIP activations: small, from a formula.
* **Phases** — text encoder, image encoder, transformer forward, VAE. The peak is the largest phase: what stays on
  the GPU (resident transformer part, VAE, encoders unless offloaded) + that phase's transients (+ the swapped
  blocks on the GPU at once during the forward).
* **Fits** — estimate + headroom <= free GPU memory; headroom = 10% of the estimate, at least 2.5 GiB (what the
  caching allocator reserves beyond the allocated bytes, measured; see `ALLOCATOR_SLACK`).

`auto` picks, in this order, the first setting that fits: everything on the GPU; encoders moved off after use; VAE
tiling (when `vae_tiling=auto`); `blocks:N` for N = 1..L (encoders off the GPU); `sequential`. Explicit settings are
never changed: when they do not fit, the plan warns and names one that would.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InfiniteTalkError, OptionError
from ..models.configs import GEOMETRIES, GEOMETRY_14B, GEOMETRY_TINY, Geometry
from ..models.offload import blocks_in_flight, swapped_block_indices
from ..models.placement import Offload
from .resolved import Resolved

GIB = 2**30
# A setting fits when estimate + headroom <= free memory. The estimate is allocated bytes; the allocator reserves
# more (rounding, fragmentation, one pool per CUDA stream). Measured on an H200 at 480p with the default allocator
# (benchmarks/results/memory_h200_480_bf16.json): reserved - allocated = 1.3-2.8 GiB, and blocks:36 under an
# 11.25 GiB cap failed with 9.3 GiB allocated. Hence 10% (docs/OPTIONS.md §4.6) but at least 2.5 GiB.
HEADROOM = 0.10
ALLOCATOR_SLACK = 2.5 * 2**30
# cuDNN convolution workspace of the VAE (allocated through PyTorch, invisible to a trace): the VAE phase measured
# 0.54-0.61 GiB above the traced tensors on the same H200.
VAE_WORKSPACE = 0.6 * 2**30
PCIE_GB_PER_S = 25.0  # pinned host -> GPU copies over PCIe 4.0 x16 (PCIe 5.0 roughly doubles it)
H100_CLASS_TFLOPS = 497.0  # achieved by the bf16 forward at 480p on an H200 (benchmarks/results/dit_forward_h200_*)
_TRACE_LATENT_FRAMES = (3, 5)


class OutOfGpuMemoryError(InfiniteTalkError):
    """The GPU ran out of memory during a chunk; the finished chunks are kept and the message names a setting
    that would fit."""


# ---- request shape -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What sets the activation sizes: the frame size in pixels, frames per chunk, speakers."""

    height: int
    width: int
    frames: int = 81
    persons: int = 1

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8

    @property
    def tokens(self) -> int:
        t, h, w = self.latent
        return t * (h // 2) * (w // 2)

    def label(self) -> str:
        return f"{self.width}x{self.height}, {self.frames} frames"


def load_time_shape(geometry: Geometry, size: int = 480, frames: int = 81, persons: int = 2) -> Shape:
    """The request a load-time plan is made for: the largest bucket of the size tier (most pixels), two speakers."""
    from ..media.frames import BUCKETS

    h, w = max((geometry.frame_size(tuple(v)) for v in BUCKETS[size].values()), key=lambda hw: hw[0] * hw[1])
    return Shape(h, w, frames, persons)


# ---- settings and estimates ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    offload: str = "none"  # "none" | "blocks:N" | "sequential"
    vae_tiling: bool = False
    encoders_offloaded: bool = False

    def flags(self) -> str:
        return f"--offload {self.offload}" + (" --vae-tiling on" if self.vae_tiling else "")


@dataclass(frozen=True)
class Estimate:
    """Bytes: GPU peak per phase, what lives where, host memory."""

    setting: Setting
    phases: dict[str, int]
    resident: dict[str, int]
    host: int  # steady host memory for weights (pinned swapped blocks, encoders, wav2vec2)
    host_load: int  # host memory while loading (the transformer is loaded to host first when offloading)
    swapped: int  # bytes copied to the GPU per model call

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def fits(self, free_bytes: float) -> bool:
        return needed(self.peak) <= free_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"setting": dataclasses.asdict(self.setting), "peak_gib": _gib(self.peak), "peak_phase": self.peak_phase,
                "phases_gib": {k: _gib(v) for k, v in self.phases.items()},
                "resident_gib": {k: _gib(v) for k, v in self.resident.items()},
                "host_gib": _gib(self.host), "host_while_loading_gib": _gib(self.host_load),
                "copied_per_model_call_gib": _gib(self.swapped)}


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def needed(peak: float) -> float:
    """Free memory a setting with this estimated peak needs: the peak plus headroom."""
    return peak + max(HEADROOM * peak, ALLOCATOR_SLACK)


# ---- weights -------------------------------------------------------------------------------------------------------
def quantized_linear_bytes(out_features: int, in_features: int, mode: str, itemsize: int) -> int:
    """Bytes of one quantized Linear weight in torchao's layout (`itemsize`: the compute dtype's)."""
    numel = out_features * in_features
    if mode in ("fp8-compute", "fp8-storage"):  # Float8Tensor: e4m3 data + fp32 scale per row
        return numel + 4 * out_features
    if mode == "int8-weight-only":  # Int8Tensor: int8 data + fp32 scale + int8 zero point per row
        return numel + 5 * out_features
    if mode == "nf4":  # NF4Tensor: 4-bit codes, int8 scaler per 64, factor per scaler block, mean, 16-entry table
        from ..models.quantize import _nf4_scaler_block

        blocks = numel // 64
        return numel // 2 + blocks + blocks // _nf4_scaler_block(numel) * itemsize + itemsize + 16 * itemsize
    if mode == "nvfp4":  # fp4 codes + an fp8 scale per 16 + fp32 tensor scale (layout not measured here)
        return numel // 2 + numel // 16 + 4
    raise ValueError(f"unknown quantization mode {mode!r}")


@functools.lru_cache(maxsize=4)
def _meta_transformer(geometry: Geometry):
    """The transformer with one block (all blocks are alike; building 40 on meta takes seconds)."""
    from accelerate import init_empty_weights

    from ..models.transformer import InfiniteTalkTransformer

    with init_empty_weights():
        return InfiniteTalkTransformer.from_dit_config(dataclasses.replace(geometry.dit, num_layers=1))


@dataclass(frozen=True)
class TransformerBytes:
    other: int  # embeddings, time MLPs, audio projection, head, RoPE tables: never swapped
    blocks: tuple[int, ...]
    largest_layers: tuple[int, int]  # the two biggest layers: what `sequential` holds at most (one is prefetched)
    top_level: int  # parameters of the model itself (sequential keeps them on the GPU for the whole forward)
    full_precision: int  # the whole model in the compute dtype, before quantization (host memory while loading)
    params: int

    @property
    def total(self) -> int:
        return self.other + sum(self.blocks)


@functools.lru_cache(maxsize=32)
def transformer_bytes(geometry: Geometry, dtype: str = "bfloat16", quantization: str = "disabled") -> TransformerBytes:
    """Bytes of the transformer as the loader and `quantize_transformer` leave it."""
    from ..models.quantize import quantizable
    from ..models.transformer_loading import keeps_fp32

    model = _meta_transformer(geometry)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    quantized = set()
    if quantization != "disabled":
        quantized = {f"{n}.weight" for n, m in model.named_modules() if quantizable(n, m, quantization)}
    block = other = top = full = full_block = params = 0
    layer_bytes: dict[str, int] = {}
    for name, p in model.named_parameters():
        params += p.numel() * (geometry.dit.num_layers if name.startswith("blocks.0.") else 1)
        plain = p.numel() * (4 if keeps_fp32(name) else itemsize)
        n = quantized_linear_bytes(*p.shape, quantization, itemsize) if name in quantized else plain
        layer = name.rsplit(".", 1)[0]
        layer_bytes[layer] = layer_bytes.get(layer, 0) + n
        if name.startswith("blocks.0."):
            block, full_block = block + n, full_block + plain
        else:
            other, full = other + n, full + plain
            top += n if "." not in name else 0
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    layers = geometry.dit.num_layers
    largest = sorted(layer_bytes.values())[-2:]
    return TransformerBytes(other + buffers, (block,) * layers, (largest[-1], largest[0]), top,
                            full + buffers + full_block * layers, params)


def wan_vae_model(geometry: Geometry):
    """diffusers' AutoencoderKLWan with the geometry's widths (as `models/vae.py: load_vae` builds it), on meta."""
    from diffusers import AutoencoderKLWan

    g = geometry.vae
    with torch.device("meta"):
        return AutoencoderKLWan(base_dim=g.dim, z_dim=g.z_dim, dim_mult=list(g.dim_mult), num_res_blocks=g.num_res_blocks,
                                attn_scales=[], temperal_downsample=list(g.temperal_downsample), dropout=0.0)


@functools.lru_cache(maxsize=4)
def _meta_vae(geometry: Geometry):
    return wan_vae_model(geometry)


def vae_bytes(geometry: Geometry, dtype: str) -> int:
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return sum(p.numel() for p in _meta_vae(geometry).parameters()) * itemsize


def t5_params(geometry: Geometry) -> tuple[int, int]:
    """(Linear weights, everything else) of the umT5 encoder: tied embedding, per-layer relative bias, norms."""
    g = geometry.t5
    linear = g.num_layers * (4 * g.dim * g.dim_attn + 3 * g.dim * g.dim_ffn)
    other = g.vocab * g.dim + g.num_layers * (g.num_buckets * g.num_heads + 2 * g.dim) + g.dim
    return linear, other


def t5_bytes(geometry: Geometry, itemsize: int, quantization: str = "disabled") -> int:
    g = geometry.t5
    linear, other = t5_params(geometry)
    if quantization == "disabled":
        return (linear + other) * itemsize
    rows = g.num_layers * (3 * g.dim_attn + g.dim + 2 * g.dim_ffn + g.dim)  # output rows of the Linears: one scale each
    return linear + 4 * rows + other * itemsize


def t5_largest_layers(geometry: Geometry, itemsize: int, quantization: str = "disabled") -> int:
    """What T5 streaming holds on the GPU at most: the token embedding (never quantized) + an FFN Linear."""
    g = geometry.t5
    return g.vocab * g.dim * itemsize + g.dim * g.dim_ffn * (itemsize if quantization == "disabled" else 1)


def clip_params(geometry: Geometry) -> int:
    """transformers CLIPVisionModel: embeddings, pre/post LayerNorm, `num_layers` encoder layers."""
    g = geometry.clip
    d, mlp = g.dim, g.dim * g.mlp_ratio
    embeddings = d + 3 * g.patch_size**2 * d + g.tokens * d
    layer = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 4 * d
    return embeddings + 4 * d + g.num_layers * layer


def wav2vec_bytes(geometry: Geometry) -> int:
    """fp32 wav2vec2 on the host (approximate: conv feature encoder + transformer layers)."""
    g = geometry.wav2vec
    h = g.hidden_size
    layer = 4 * h * h + 2 * h * g.intermediate_size + 9 * h + g.intermediate_size
    convs = 7 * 3 * g.conv_dim * g.conv_dim + h * g.conv_dim + h * 128 * h // 16
    return 4 * (g.num_hidden_layers * layer + convs)


# ---- activation traces -----------------------------------------------------------------------------------------
class _LiveBytes:
    """Dispatch mode: bytes of the tensor storages created inside it that are still alive, and their maximum."""

    def __new__(cls):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live: dict[int, tuple[Any, int]] = {}
                self.current = self.peak = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                    self.current -= self.live.pop(key)[1]
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and not hasattr(t, "__tensor_flatten__"):
                        storage = t.untyped_storage()
                        ref = StorageWeakRef(storage)
                        if ref.cdata not in self.live:
                            self.live[ref.cdata] = (ref, storage.nbytes())
                            self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                return out

        return Mode()


def trace_peak(fn, *args, **kwargs) -> tuple[int, Any]:
    """(peak bytes of the tensors `fn` creates and holds at once, its result); works on meta, CPU or CUDA tensors."""
    with torch.inference_mode(), _LiveBytes() as mode:
        out = fn(*args, **kwargs)
    return mode.peak, out


def _trace_backend(attention_backend: str) -> str:
    """Memory twins: cuDNN makes contiguous [B,H,L,D] copies of q/k/v, math materialises the scores, the others
    (flash, efficient, FA3, Sage) write only their output. Our 8-bit kernels (models/int8_attention.py) write 8-bit
    copies of q, k (and v): less than cuDNN's bf16 copies, so they are planned as cuDNN (on the safe side)."""
    if attention_backend in ("sage8_triton", "sage8_triton_bf16pv"):
        return "_native_cudnn"
    return attention_backend if attention_backend in ("_native_cudnn", "_native_math") else "_native_flash"


def _set_backend_locally(model, backend: str) -> None:
    """Each attention module's backend, without `ModelMixin.set_attention_backend`, which also sets diffusers'
    process-wide active backend (a plan must not change how other models in the process attend)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from ..models.diffusers_adapter import set_processor_attention_backend
    from ..models.transformer import AudioCrossAttention

    name = AttentionBackendName(backend)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            set_processor_attention_backend(processor, name)
        if isinstance(module, AudioCrossAttention):
            set_processor_attention_backend(module, name)


def _quantize_on_meta(model, mode: str) -> None:
    """The quantized layers `quantize_transformer` makes, on the meta device, so their forward code is traced too."""
    from torch import nn

    from ..models.quantize import import_torchao, quantizable, quantize_transformer

    if mode != "fp8-compute":
        quantize_transformer(model, mode, "meta")
        return
    # torchao's config refuses fp8 dynamic activations without an sm >= 8.9 GPU in this process; build the same
    # tensors it builds (e4m3 weights, rowwise scales, rowwise-quantized activations) directly.
    import_torchao()
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    for name, module in model.named_modules():
        if quantizable(name, module, mode):
            weight = Float8Tensor.from_hp(module.weight.data, float8_dtype=torch.float8_e4m3fn, granularity=PerRow(),
                                          mm_config=Float8MMConfig(use_fast_accum=True),
                                          act_quant_kwargs=QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, PerRow()))
            module.weight = nn.Parameter(weight, requires_grad=False)


def transformer_inputs(geometry: Geometry, shape: Shape, device) -> dict[str, torch.Tensor | None]:
    """One model call's inputs at `shape` as the chunk loop passes them (random values off the meta device)."""
    cfg = geometry.dit
    frames, lat_h, lat_w = shape.latent
    g = torch.Generator().manual_seed(0)

    def make(*size):
        return torch.empty(size, device="meta") if str(device) == "meta" else torch.randn(size, generator=g).to(device)

    return dict(
        hidden_states=make(1, 16, frames, lat_h, lat_w),
        timestep=torch.full((1,), 500.0, device=device),
        encoder_hidden_states=make(1, cfg.text_len, cfg.text_dim),
        encoder_hidden_states_image=make(1, geometry.clip.tokens, cfg.image_dim),
        condition=make(1, 20, frames, lat_h, lat_w),
        audio=make(shape.persons, shape.frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim),
        ref_target_masks=torch.ones(3, lat_h, lat_w, device=device) if shape.persons == 2 else None,
    )


TRACE_FALLBACKS: dict[str, str] = {}  # quantization mode -> why its layers could not be traced (plain ones were)


def _meta_one_block(geometry: Geometry, dtype: str):
    from accelerate import init_empty_weights

    from ..models.transformer import InfiniteTalkTransformer
    from ..models.transformer_loading import keeps_fp32

    with init_empty_weights():
        model = InfiniteTalkTransformer.from_dit_config(dataclasses.replace(geometry.dit, num_layers=1))
    for name, p in model.named_parameters():
        if not keeps_fp32(name):
            p.data = p.data.to(getattr(torch, dtype))
    return model.to("meta")


def transformer_activation_bytes(geometry: Geometry, dtype: str, quantization: str, attention_backend: str,
                                 shape: Shape) -> int:
    """Transient bytes of one model call at `shape` (trace of a one-block model; see the module docstring).
    fp16 traces as bf16 (same sizes) and the attention backends as their memory twins, so fewer traces run."""
    dtype = "bfloat16" if dtype == "float16" else dtype
    return _transformer_activation_bytes(geometry, dtype, quantization, _trace_backend(attention_backend), shape)


@functools.lru_cache(maxsize=64)
def _transformer_activation_bytes(geometry: Geometry, dtype: str, quantization: str, attention_backend: str,
                                  shape: Shape) -> int:
    model = _meta_one_block(geometry, dtype)
    if quantization != "disabled":
        try:
            _quantize_on_meta(model, quantization)
        except Exception as err:  # e.g. a kernel config that needs its GPU even on meta: plain layers instead
            TRACE_FALLBACKS[quantization] = f"{type(err).__name__}: {err}"[:200]
            model = _meta_one_block(geometry, dtype)
    _set_backend_locally(model, "native" if attention_backend == "_native_math" else attention_backend)
    inputs = transformer_inputs(geometry, shape, "meta")
    peak, _ = trace_peak(model, **inputs)
    inputs_bytes = sum(t.numel() * t.element_size() for t in inputs.values() if t is not None)
    if attention_backend == "_native_math":  # the math kernel materialises the scores and their softmax (fp32)
        peak += 2 * geometry.dit.num_heads * shape.tokens**2 * 4
    return peak + inputs_bytes


def _vae_wrapper(geometry: Geometry, dtype: str):
    from ..models.vae import WanVae

    model = _meta_vae(geometry)
    for p in model.parameters():  # cast quietly (ModelMixin.to logs about fp32 modules the VAE does not have)
        p.data = p.data.to(getattr(torch, dtype))
    return WanVae(model)


@functools.lru_cache(maxsize=64)
def _vae_trace(geometry: Geometry, dtype: str, height: int, width: int, latent_frames: int,
               raw: bool = False) -> tuple[int, int]:
    """(encode, decode) transient bytes for a chunk: of the WanVae wrapper as the chunk loop calls it, or (`raw`) of
    diffusers' model alone on one tile."""
    vae = _vae_wrapper(geometry, dtype)
    frames = 4 * (latent_frames - 1) + 1
    latent = torch.empty(1, geometry.vae.z_dim, latent_frames, height // 8, width // 8, device="meta")
    if raw:
        video = torch.empty(1, 3, frames, height, width, device="meta", dtype=vae.dtype)
        encode, _ = trace_peak(lambda x: vae.model.encode(x).latent_dist.mode(), video)
        decode, _ = trace_peak(lambda z: vae.model.decode(z).sample, latent.to(vae.dtype))
        return encode, decode
    video = torch.empty(1, 3, frames, height, width, device="meta")  # fp32 [keyframe, zeros] built by the loop
    encode, _ = trace_peak(vae.encode, video)
    encode += 2 * video.numel() * 4  # the loop holds the zeros and their concatenation with the keyframe
    decode, _ = trace_peak(vae.decode, latent)
    return encode, decode


def _vae_extrapolated(geometry: Geometry, dtype: str, height: int, width: int, latent_frames: int,
                      raw: bool = False) -> tuple[int, int]:
    """Trace 3 and 5 latent frames and extrapolate: each further latent frame adds the same bytes (the output the
    VAE keeps), which traces of 3..21 frames confirm at 480p."""
    a, b = _TRACE_LATENT_FRAMES
    if latent_frames <= b:
        return _vae_trace(geometry, dtype, height, width, latent_frames, raw)
    ta = _vae_trace(geometry, dtype, height, width, a, raw)
    tb = _vae_trace(geometry, dtype, height, width, b, raw)
    return tuple(int(z + (z - y) / (b - a) * (latent_frames - b)) for y, z in zip(ta, tb))


def vae_tile() -> tuple[int, int]:
    """(tile, stride) in pixels that `WanVae.enable_tiling` uses by default."""
    from ..models.vae import WanVae

    params = inspect.signature(WanVae.enable_tiling).parameters
    return params["tile_size"].default, params["stride"].default


def vae_activation_bytes(geometry: Geometry, dtype: str, shape: Shape, tiled: bool) -> int:
    """Transient bytes of the larger of VAE encode and decode for one chunk.

    Tiled (diffusers `tiled_encode`/`tiled_decode`: each tile runs alone, all decoded tiles are kept until they are
    blended): one tile's traced working set + the kept tiles + the assembled output and the wrapper's fp32 copies.
    Against full traces of the tiled VAE at 832x480 (3, 5 and 21 latent frames) this is within +6% for encode and
    +3..21% (conservative) for decode; the full trace is too slow for a plan (75 s)."""
    return _vae_activation_bytes(geometry, "bfloat16" if dtype == "float16" else dtype, shape, tiled)


@functools.lru_cache(maxsize=64)
def _vae_activation_bytes(geometry: Geometry, dtype: str, shape: Shape, tiled: bool) -> int:
    t = shape.latent[0]
    h, w = shape.height, shape.width
    tile, stride = vae_tile()
    if not tiled or (h <= tile and w <= tile):  # diffusers tiles only frames larger than a tile
        return max(_vae_extrapolated(geometry, dtype, h, w, t))
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    th, tw = min(h, tile), min(w, tile)
    tile_encode, tile_decode = _vae_extrapolated(geometry, dtype, th, tw, t, raw=True)
    tiles = math.ceil(h / stride) * math.ceil(w / stride)
    frames = 4 * (t - 1) + 1
    tile_out = 3 * frames * th * tw * itemsize
    out = 3 * frames * h * w * itemsize
    out32 = 3 * frames * h * w * 4
    decode = max(tile_decode + (tiles - 1) * tile_out, tiles * tile_out + 3 * out, out + out32, 2 * out32)
    kept_latents = tiles * 2 * geometry.vae.z_dim * t * (th // 8) * (tw // 8) * itemsize
    encode = 2 * out32 + out + tile_encode + kept_latents
    return max(encode, decode)


def text_encoder_activation_bytes(geometry: Geometry, itemsize: int, prompts: int = 2) -> int:
    g = geometry.t5
    n = g.text_len
    return prompts * n * (4 * g.dim + 3 * g.dim_ffn) * itemsize + 2 * prompts * g.num_heads * n * n * 4


def image_encoder_activation_bytes(geometry: Geometry, itemsize: int) -> int:
    g = geometry.clip
    n = g.tokens
    return n * (6 * g.dim + 2 * g.dim * g.mlp_ratio) * itemsize + 2 * g.num_heads * n * n * 4 + 3 * 224 * 224 * 4 * 4


def loop_bytes(geometry: Geometry, shape: Shape) -> int:
    """The chunk loop's own GPU tensors: latents, noise, the reference latent, the pass predictions (fp32)."""
    t, h, w = shape.latent
    return 12 * geometry.vae.z_dim * t * h * w * 4


# ---- the estimator -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryModel:
    """Everything fixed at load time; `estimate(setting, shape)` gives the phases of one request."""

    geometry: Geometry
    model_dtype: str = "bfloat16"
    vae_dtype: str = "bfloat16"
    quantization: str = "disabled"
    t5_quantization: str = "disabled"
    attention_backend: str = "_native_flash"
    encoder_itemsize: int = 2  # T5 in bf16, CLIP in fp16 on a GPU
    compiled: bool = False  # torch.compile'd blocks: quantized ones cannot be swapped (COMPILED_QUANTIZED_SWAP)

    @property
    def transformer(self) -> TransformerBytes:
        return transformer_bytes(self.geometry, self.model_dtype, self.quantization)

    def weights(self) -> dict[str, int]:
        g = self.geometry
        return {"transformer": self.transformer.total, "vae": vae_bytes(g, self.vae_dtype),
                "t5": t5_bytes(g, self.encoder_itemsize, "disabled" if self.t5_quantization == "disabled" else "fp8"),
                "clip": clip_params(g) * self.encoder_itemsize, "wav2vec2_host": wav2vec_bytes(g)}

    def estimate(self, setting: Setting, shape: Shape) -> Estimate:
        g, tb, w = self.geometry, self.transformer, self.weights()
        placement = Offload.parse(setting.offload, len(tb.blocks), self.quantization)
        kind, n = placement.kind, placement.blocks
        if kind == "blocks":
            swapped = swapped_block_indices(len(tb.blocks), n)
            on_host = sum(tb.blocks[i] for i in swapped)
            in_flight = blocks_in_flight(len(tb.blocks), n) * max(tb.blocks[i] for i in swapped)
        elif kind == "sequential":
            on_host, in_flight = tb.total, tb.top_level + sum(tb.largest_layers)
        else:
            on_host = in_flight = 0
        slots = 0
        if kind == "blocks" and placement.swap == "compact":
            # quantized blocks are copied into fixed GPU slots that stay allocated (`offload.SwapSlots`)
            slots, in_flight = in_flight, 0
        encoders = w["t5"] + w["clip"]
        resident = {"transformer": tb.total - on_host + slots, "vae": w["vae"],
                    "encoders": 0 if setting.encoders_offloaded else encoders}
        base = sum(resident.values())
        act = transformer_activation_bytes(g, self.model_dtype, self.quantization, self.attention_backend, shape)
        vae = vae_activation_bytes(g, self.vae_dtype, shape, setting.vae_tiling)
        loop = loop_bytes(g, shape)
        # offloaded encoders: T5 streamed layer by layer (the embedding and the next layer on the GPU at once),
        # CLIP moved for its call
        t5_on_gpu = t5_largest_layers(g, self.encoder_itemsize, self.t5_quantization) \
            if setting.encoders_offloaded else 0
        clip_on_gpu = w["clip"] if setting.encoders_offloaded else 0
        phases = {
            "text encoder": base + t5_on_gpu + text_encoder_activation_bytes(g, self.encoder_itemsize),
            "image encoder": base + clip_on_gpu + image_encoder_activation_bytes(g, self.encoder_itemsize),
            "transformer": base + in_flight + act + loop,
            "VAE": base + vae + loop + (VAE_WORKSPACE if self.geometry.name == "14b" else 0),
        }
        host = on_host + (encoders if setting.encoders_offloaded else 0) + w["wav2vec2_host"]
        # offloaded or quantized transformers are loaded to host memory first, in the compute dtype
        on_host_first = kind != "none" or self.quantization != "disabled"
        host_load = max(host, tb.full_precision + max(tb.blocks) if on_host_first else 0)
        return Estimate(setting, phases, resident, host, host_load, on_host if kind != "none" else 0)

    def candidates(self, offload: str = "auto", vae_tiling: str = "auto"):
        """Settings in the order `auto` tries them (fewest copies first)."""
        num = len(self.transformer.blocks)
        quantized = self.quantization != "disabled"
        leaf_level = [] if quantized else ["sequential"]  # see QUANTIZED_OFFLOAD
        blocks = [] if quantized and self.compiled else [f"blocks:{i}" for i in range(1, num + 1)]
        offloads = ["none"] + blocks + leaf_level if offload == "auto" else [offload]
        tilings = [False, True] if vae_tiling == "auto" else [vae_tiling == "on"]
        for off in offloads:
            encoders = ([False, True] if offload == "auto" else [False]) if off == "none" else [True]
            if self.t5_quantization != "disabled":  # an fp8 T5 cannot be streamed either (QUANTIZED_OFFLOAD)
                encoders = [False]
            for enc in encoders:
                for tiling in tilings:
                    yield Setting(off, tiling, enc)

    def choose(self, free_bytes: float, shape: Shape, offload: str = "auto", vae_tiling: str = "auto",
               limit: float | None = None) -> tuple[Estimate, bool]:
        """(first candidate that fits — or the last one tried, fits=False)."""
        best = None
        for setting in self.candidates(offload, vae_tiling):
            est = self.estimate(setting, shape)
            if est.fits(free_bytes) and (limit is None or est.peak <= limit):
                return est, True
            best = est
        return best, False

    def context(self, free_bytes: float | None, setting: Setting, sm: tuple[int, int] | None) -> dict:
        return {"geometry": self.geometry.name, "model_dtype": self.model_dtype, "vae_dtype": self.vae_dtype,
                "quantization": self.quantization, "t5_quantization": self.t5_quantization,
                "attention_backend": self.attention_backend, "encoder_itemsize": self.encoder_itemsize,
                "compiled": self.compiled, "free_gib": None if free_bytes is None else free_bytes / GIB,
                "setting": dataclasses.asdict(setting),
                "sm": list(sm) if sm else None}


def _model_from_context(ctx: dict, quantization: str | None = None) -> MemoryModel:
    return MemoryModel(GEOMETRIES[ctx["geometry"]], ctx["model_dtype"], ctx["vae_dtype"],
                       quantization or ctx["quantization"], ctx["t5_quantization"], ctx["attention_backend"],
                       ctx["encoder_itemsize"], ctx.get("compiled", False))


# ---- speed notes ---------------------------------------------------------------------------------------------------
def forward_flops(geometry: Geometry, tokens: int) -> float:
    """Matmul FLOPs of one model call (as benchmarks/dit_forward.py counts them)."""
    cfg = geometry.dit
    d, f, c = cfg.dim, cfg.ffn_dim, cfg.text_len + geometry.clip.tokens
    per_block = 8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * d + 4 * c * d * d \
        + 4 * tokens * c * d + 4 * tokens * d * d + 4 * tokens * d * f
    return cfg.num_layers * per_block


def copy_notes(model: MemoryModel, est: Estimate, shape: Shape, sm: tuple[int, int] | None) -> list[str]:
    """What the copies cost per model call: the bound without overlap and, on H100-class GPUs, the expected cost
    with the side-stream prefetch (a block's copy hides behind the previous block's compute when shorter)."""
    placement = Offload.parse(est.setting.offload, len(model.transformer.blocks), model.quantization)
    kind, n = placement.kind, placement.blocks
    if kind == "none":
        return []
    gb = est.swapped / 1e9
    copy_s = gb / PCIE_GB_PER_S
    what = f"{n} of {len(model.transformer.blocks)} blocks" if kind == "blocks" else "every layer"
    note = (f"{est.setting.offload} copies {what} ({gb:.1f} GB) to the GPU for every model call: {copy_s:.2f} s at "
            f"{PCIE_GB_PER_S:.0f} GB/s (PCIe 4.0 x16, pinned) if nothing overlaps")
    if sm is not None and sm[0] in (9, 10):
        compute = forward_flops(model.geometry, shape.tokens) / (H100_CLASS_TFLOPS * 1e12)
        if kind == "blocks":
            per_block_copy = max(model.transformer.blocks) / 1e9 / PCIE_GB_PER_S
            per_block_compute = compute / len(model.transformer.blocks)
            extra = n * max(0.0, per_block_copy - per_block_compute)
            note += (f"; a model call computes ≈{compute:.1f} s here ({per_block_compute * 1000:.0f} ms per block vs "
                     f"{per_block_copy * 1000:.0f} ms per block copy), so with the prefetch expect ≈×"
                     f"{(compute + extra) / compute:.2f} and at worst ×{(compute + copy_s) / compute:.2f}")
        else:
            note += f"; a model call computes ≈{compute:.1f} s here: expect up to ×{(compute + copy_s) / compute:.2f}"
    return [note]


# ---- the plan ------------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    offload: Resolved
    vae_tiling: Resolved
    encoders_offloaded: bool
    estimate: Estimate | None
    free_gib: float | None
    shape: Shape
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    context: dict | None = None
    placement: Offload = Offload()  # the resolved offload setting, parsed once (what loading applies)

    def to_dict(self) -> dict[str, Any]:
        return {"offload": self.offload.to_dict(), "vae_tiling": self.vae_tiling.to_dict(),
                "encoders": "offloaded after use" if self.encoders_offloaded else "resident",
                "planned_for": {**dataclasses.asdict(self.shape), "label": self.shape.label()},
                "free_gib": None if self.free_gib is None else round(self.free_gib, 2),
                "headroom": {"fraction": HEADROOM, "at_least_gib": ALLOCATOR_SLACK / GIB},
                "estimate": self.estimate.to_dict() if self.estimate else None, "notes": self.notes,
                "warnings": self.warnings, "context": self.context}


def _geometry_for(options) -> Geometry:
    return GEOMETRY_TINY if options.preset == "tiny" else GEOMETRY_14B


def _live_free_gib(caps, device: str) -> float | None:
    """Free memory of the run's GPU now (the probe's value is from its start, and simulated machines keep theirs)."""
    if caps.simulated is None and torch.cuda.is_available():
        try:
            return torch.cuda.mem_get_info(torch.device(device))[0] / GIB
        except Exception:  # a broken driver falls back to the probe's number
            pass
    gpu = caps.gpu
    return gpu.free_memory_gib if gpu and gpu.free_memory_gib is not None else (gpu.total_memory_gib if gpu else None)


# Measured on an H200 (torch 2.11, diffusers 0.42.1, torchao 0.18): diffusers' group offloading cannot move torchao
# tensors — `Tensor.to(..., non_blocking=...)` trips torchao's assertion, and without it the storage swap fails
# ("Attempted to set the storage of a tensor on device cuda:0 to a storage on different device cpu"). Quantized blocks
# are therefore swapped by our compact hook (`models/offload.py`, `CompactBlockGroup`); leaf-level `sequential` is
# diffusers' alone and stays refused for them (`blocks:40` swaps every block, in compact form).
# Measured on an H200 (benchmarks/offload_check.py --compile): torch.compile'd blocks whose quantized weights are
# swapped in by `CompactBlockGroup` fail to trace (dynamo: "Attempting to broadcast a dimension of length 32" in the
# quantized linear), for fp8 and int8 alike; bf16 blocks swapped by diffusers compile and run.
COMPILED_QUANTIZED_SWAP = ("compiled blocks with swapped quantized weights fail in torch.compile (dynamo cannot "
                           "trace the swapped-in torchao tensors; seen on an H200)")
QUANTIZED_OFFLOAD = ("leaf-level offloading of quantized layers does not work with diffusers' group offloading and "
                     "torchao 0.18 (their tensors cannot be copied by it; seen on an H200)")


def plan_memory(options, caps, *, device: str, model_dtype: str, vae_dtype: str, quantization: str,
                t5_quantization: str = "disabled", attention_backend: str = "_native_flash",
                free_gib: float | None = None, shape: Shape | None = None) -> MemoryPlan:
    """Resolve `options.offload` and `options.vae_tiling` for this machine (see the module docstring).
    `free_gib` overrides the GPU's free memory (benchmarks, tests); `shape` the planned request."""
    geometry = _geometry_for(options)
    shape = shape or load_time_shape(geometry)
    requested = None if options.offload == "auto" else Offload.parse(options.offload, geometry.dit.num_layers,
                                                                      quantization)
    kind = requested.kind if requested else "auto"
    if device == "cpu":
        if kind in ("blocks", "sequential"):
            where = "this run uses device=cpu" if caps.gpu else "this machine has no GPU"
            raise OptionError(f"offload={options.offload}: offload moves weights between GPU and host; {where}",
                              option="offload", value=options.offload)
        offload = Resolved(options.offload, "none", "CPU run: every weight is in host memory already")
        tiling = {"auto": Resolved("auto", "off", "CPU run: no GPU memory to save"),
                  "on": Resolved("on", "on", "requested: tiled VAE encode/decode (less host memory, seams possible)"),
                  "off": Resolved("off", "off", "requested")}[options.vae_tiling]
        return MemoryPlan(offload, tiling, False, None, None, shape)  # placement: Offload("none")

    if quantization != "disabled" and kind == "sequential":
        raise OptionError(f"offload=sequential: {QUANTIZED_OFFLOAD}; use --offload blocks:{geometry.dit.num_layers} "
                          f"(every block swapped in its compact {quantization} form), or --quantization disabled "
                          "with --offload sequential", option="offload", value=options.offload)
    if quantization != "disabled" and kind == "blocks" and options.compile:
        raise OptionError(f"offload={options.offload}: {COMPILED_QUANTIZED_SWAP}; drop --compile, or use "
                          f"--offload none with quantization={quantization} and --compile", option="offload",
                          value=options.offload)
    model = MemoryModel(geometry, model_dtype, vae_dtype, quantization, t5_quantization, attention_backend,
                        compiled=options.compile)
    free = (free_gib if free_gib is not None else _live_free_gib(caps, device)) * GIB
    sm = caps.gpu.capability if caps.gpu else None
    everything = model.estimate(Setting(), shape)
    est, fits = model.choose(free, shape, options.offload, options.vae_tiling)
    s = est.setting
    notes, warnings = [], []
    free_text = f"free {free / GIB:.1f} GiB"
    where = f"est. peak {_gib(est.peak)} GiB ({est.peak_phase})"
    if options.offload == "auto":
        if not fits:
            reason = f"nothing fits the {free_text}; the fewest-copies setting tried last: {where} (see warnings)"
        elif s.offload == "none":
            reason = f"{where} fits the {free_text} with headroom ({HEADROOM:.0%}, at least {ALLOCATOR_SLACK / GIB:g} GiB)"
        else:
            reason = (f"est. peak {_gib(everything.peak)} GiB > {free_text} with every weight on the GPU; with "
                      f"{s.offload}: {where}")
    else:
        reason = f"requested; {where}, {free_text}"
    offload = Resolved(options.offload, s.offload, reason)
    vae_only = model.estimate(dataclasses.replace(s, vae_tiling=False), shape)
    tiled = model.estimate(dataclasses.replace(s, vae_tiling=True), shape)
    vae_text = f"VAE phase est. {_gib(vae_only.phases['VAE'])} GiB untiled, {_gib(tiled.phases['VAE'])} GiB tiled"
    if options.vae_tiling == "auto":
        tiling = Resolved("auto", "on" if s.vae_tiling else "off",
                          f"{vae_text}; " + ("tiling is needed to fit" if s.vae_tiling else "fits untiled"))
    else:
        tiling = Resolved(options.vae_tiling, options.vae_tiling, f"requested; {vae_text}")
    if not fits:
        better, better_fits = model.choose(free, shape)
        hint = f"; {better.setting.flags()} would fit (est. {_gib(better.peak)} GiB)" if better_fits else (
            "; no setting fits: a smaller --size or fewer --frame-num, or --quantization nf4")
        if not better_fits and model.compiled and quantization != "disabled" and \
                dataclasses.replace(model, compiled=False).choose(free, shape)[1]:
            hint = f"; without --compile the {quantization} blocks could be swapped to fit ({COMPILED_QUANTIZED_SWAP})"
        warnings.append(f"est. peak {_gib(est.peak)} GiB + headroom > {free_text}: this may run out of GPU "
                        f"memory{hint}")
    enc = model.weights()
    notes.append(f"T5 ({_gib(enc['t5'])} GiB) and CLIP ({_gib(enc['clip'])} GiB) "
                 + ("stay in host memory: T5 is streamed to the GPU layer by layer while it encodes, CLIP moves "
                    "there for its call" if s.encoders_offloaded else "stay on the GPU"))
    notes += copy_notes(model, est, shape, sm)
    if quantization in TRACE_FALLBACKS:
        notes.append(f"activations estimated with unquantized layers ({quantization} layers could not be traced: "
                     f"{TRACE_FALLBACKS[quantization]})")
    host_avail = caps.host_ram_available_gib
    if est.host_load / GIB > 0.5:
        notes.append(f"host memory for weights: {_gib(est.host)} GiB"
                     + (" pinned" if s.offload != "none" else "") + f", {_gib(est.host_load)} GiB while loading")
    if host_avail is not None and est.host_load / GIB > host_avail:
        warnings.append(f"needs ≈{_gib(est.host_load)} GiB of host memory while loading, {host_avail:.1f} GiB is "
                        "available: the machine may run out of RAM (use --quantization to shrink the weights)")
    plan = MemoryPlan(offload, tiling, s.encoders_offloaded, est, free / GIB, shape, notes, warnings,
                      model.context(free, s, sm), Offload.parse(s.offload, geometry.dit.num_layers, quantization))
    return plan


# ---- out of memory -------------------------------------------------------------------------------------------------
def fit_suggestions(context: dict | None, shape: Shape) -> list[str]:
    """Settings that would fit `shape` in the planned free memory, as CLI flags, best first. When the current
    setting was estimated to fit but ran out anyway, only settings estimated ≥10% lower are offered."""
    if not context or context.get("free_gib") is None:
        return []
    free = context["free_gib"] * GIB
    current = _model_from_context(context).estimate(Setting(**context["setting"]), shape)
    limit = 0.9 * current.peak if current.fits(free) else None
    out = []
    est, ok = _model_from_context(context).choose(free, shape, limit=limit)
    if ok:
        out.append(est.setting.flags())
    if context["quantization"] == "disabled":
        fp8 = "fp8-compute" if context.get("sm") and tuple(context["sm"]) >= (8, 9) else "fp8-storage"
        for flag, mode in (("fp8", fp8), ("int8", "int8-weight-only")):
            est, ok = _model_from_context(context, mode).choose(free, shape, limit=limit)
            if ok:
                out.append(f"--quantization {flag} {est.setting.flags()}")
    return out


def out_of_memory_error(memory_plan: MemoryPlan | None, size_hw: tuple[int, int], frames: int, persons: int,
                        chunk: int, chunks: int, frames_done: int, out_path) -> OutOfGpuMemoryError:
    """The message for a CUDA out-of-memory error during chunk `chunk` (1-based), from the loaded plan's memory
    plan."""
    h, w = size_hw
    shape = Shape(h, w, frames, persons)
    kept = (f"the finished {frames_done} frames are in {out_path}" if frames_done
            else "no chunk had finished, so no video was written")
    context = memory_plan.context if memory_plan is not None else None
    fits = fit_suggestions(context, shape)
    hint = ("this would fit: " + " or ".join(fits)) if fits else (
        "lower --size or --frame-num, or use --quantization disabled --offload sequential")
    return OutOfGpuMemoryError(f"out of GPU memory at chunk {chunk}/{chunks} ({shape.label()} per chunk); {kept}; "
                               f"{hint}")
