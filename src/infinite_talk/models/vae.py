"""Wan2.1 causal 3-D VAE on `diffusers.AutoencoderKLWan`.

Accepted files (classified by content): the original `Wan2.1_VAE.pth` (`encoder.*`, `conv1.*`, `conv2.*`,
`decoder.*`), ComfyUI / Kijai safetensors (same keys, with or without a `model.` prefix) and the diffusers layout
(a folder with `config.json` + `diffusion_pytorch_model.safetensors`, or a file with `quant_conv` /
`encoder.conv_in` keys). Original names are converted at load by `convert_wan_vae_original_to_diffusers`, which
follows diffusers' renaming but derives the block indices from the geometry (diffusers' own converter hard-codes
the real [1,2,4,4] stage layout). Wan2.2 (48 latent channels) and lightVAE (pruned decoder) files are refused.

`encode(video [1,3,F,H,W] in [-1,1])` = (mu - mean) * (1/std) (mu = encoder mode, no sampling);
`decode(latent)` = decoder(latent / (1/std) + mean) clamped to [-1, 1] — the reference `WanVAE` wrapper.

On CUDA (`use_fused_kernels`) three changes leave the arithmetic as it is and cut the passes over memory: each
residual block's RMS-norm + SiLU is one kernel (`vae_kernels.py`), the causal convolutions pad height and width inside
cuDNN instead of copying the input into a padded tensor, and the decoder/encoder run `frames_per_step` latent frames
per causal step instead of one (the causal cache makes both orders compute the same convolutions). The functions that
do this reach into diffusers' `AutoencoderKLWan` internals (module attributes, the causal-cache list); they are the
ones marked "diffusers internals" below.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, InputError
from . import checkpoint_io
from .audio_encoder import load_module_state
from .configs import Geometry
from .vae_kernels import norm_silu

WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
_WANT = "use the Wan2.1 VAE (Wan2.1_VAE.pth, wan_2.1_vae.safetensors or Wan2_1_VAE_bf16/fp32.safetensors)"
_RESNET = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
           "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
           "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}


def convert_wan_vae_original_to_diffusers(state: dict[str, torch.Tensor], num_stages: int,
                                          num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Original `WanVAE_` names -> `AutoencoderKLWan` names, for any stage count / res blocks per stage."""
    up_index: dict[int, str] = {}
    idx = 0
    for stage in range(num_stages):
        for j in range(num_res_blocks + 1):
            up_index[idx] = f"up_blocks.{stage}.resnets.{j}"
            idx += 1
        if stage != num_stages - 1:
            up_index[idx] = f"up_blocks.{stage}.upsamplers.0"
            idx += 1
    fixed = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
             "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        part, rest = key.split(".", 1)  # encoder / decoder
        if part not in ("encoder", "decoder"):
            raise KeyError(key)
        if rest.startswith("conv1."):
            new = "conv_in." + rest[len("conv1."):]
        elif rest.startswith("head.0."):
            new = "norm_out." + rest[len("head.0."):]
        elif rest.startswith("head.2."):
            new = "conv_out." + rest[len("head.2."):]
        elif rest.startswith("middle."):
            _, i, sub = rest.split(".", 2)
            if i == "1":
                new = "mid_block.attentions.0." + sub
            else:
                new = f"mid_block.resnets.{0 if i == '0' else 1}." + _RESNET[sub]
        elif rest.startswith(("downsamples.", "upsamples.")):
            kind, i, sub = rest.split(".", 2)
            block = f"down_blocks.{i}" if kind == "downsamples" else up_index[int(i)]
            new = f"{block}.{_RESNET.get(sub, sub)}"
        else:
            raise KeyError(key)
        out[f"{part}.{new}"] = value
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    if not path.exists():
        raise CheckpointError(f"{path}: VAE file not found; {_WANT}")
    config = None
    if path.is_dir():
        config = checkpoint_io.read_folder_config(path)
        files = checkpoint_io.weight_files(path)
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(checkpoint_io.load_state_dict(f))
        return state, config, path
    return checkpoint_io.load_state_dict(path), None, path


def normalise_vae_state(state: dict[str, torch.Tensor], path, geometry: Geometry) -> dict[str, torch.Tensor]:
    """Any accepted layout -> `AutoencoderKLWan` names, after the Wan2.1 variant checks."""
    g = geometry.vae
    prefix = checkpoint_io.common_prefix(list(state), ("first_stage_model.", "vae.", "model."))
    state = {k[len(prefix):]: v for k, v in state.items()}
    if "conv2.weight" in state and "decoder.conv1.weight" in state:
        layout = "original"
        post, dec_in, enc_in = state["conv2.weight"], state["decoder.conv1.weight"], state["encoder.conv1.weight"]
    elif "post_quant_conv.weight" in state and "encoder.conv_in.weight" in state:
        layout = "diffusers"
        post, dec_in, enc_in = (state["post_quant_conv.weight"], state["decoder.conv_in.weight"],
                                state["encoder.conv_in.weight"])
    else:
        raise CheckpointError(f"Not a Wan2.1 VAE: {path} has neither the original keys (conv2.weight, "
                              f"decoder.conv1.weight) nor the diffusers ones (post_quant_conv, encoder.conv_in); "
                              f"{_WANT}")
    want_dec = g.dim * g.dim_mult[-1]
    if post.shape[0] == 48:
        raise CheckpointError(f"Not a Wan2.1 VAE (Wan2.2): {path} has 48 latent channels (the Wan2.2-TI2V-5B VAE); "
                              f"InfiniteTalk works in the 16-channel Wan2.1 latent space; {_WANT}")
    if post.shape[0] != g.z_dim:
        raise CheckpointError(f"Not a Wan2.1 VAE (unknown): {path} has {post.shape[0]} latent channels, expected "
                              f"{g.z_dim}; {_WANT}")
    if dec_in.shape[0] != want_dec:
        if dec_in.shape[0] * 4 == want_dec:
            raise CheckpointError(f"Not a Wan2.1 VAE (lightVAE): {path} has a pruned decoder ({dec_in.shape[0]} "
                                  f"channels instead of {want_dec}); lightVAE is not supported; {_WANT}")
        raise CheckpointError(f"Not a Wan2.1 VAE (unknown): {path} decoder input width {dec_in.shape[0]}, "
                              f"expected {want_dec}; {_WANT}")
    if enc_in.shape[0] != g.dim:
        raise CheckpointError(f"Not a Wan2.1 VAE (unknown): {path} encoder width {enc_in.shape[0]}, expected "
                              f"{g.dim}; {_WANT}")
    if layout == "original":
        try:
            state = convert_wan_vae_original_to_diffusers(state, len(g.dim_mult), g.num_res_blocks)
        except KeyError as err:
            raise CheckpointError(f"Not a Wan2.1 VAE (unknown): unexpected key {err} in {path}; {_WANT}") from None
    return state


class NormSiLU(torch.nn.Module):
    """A residual block's `WanRMS_norm` and the SiLU after it as one module (same `gamma` parameter name)."""

    def __init__(self, norm: torch.nn.Module, conv_before: torch.nn.Module | None = None):
        super().__init__()
        self.gamma = norm.gamma
        self.conv_before = [conv_before]  # the convolution whose bias this adds (a list: not a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv_before[0]
        return norm_silu(x, self.gamma, bias_in=None if conv is None else conv.bias)


def fuse_norm_silu(model: torch.nn.Module) -> int:
    """diffusers internals: in every `WanResidualBlock` (norm1/norm2, each followed by `nonlinearity`) and in the
    encoder/decoder heads (norm_out, then `nonlinearity`), the norm becomes `NormSiLU` and the SiLU an identity;
    norm2 also adds conv1's bias (conv1 feeds norm2 alone), which conv1 then leaves out (`bias_elsewhere`).
    Returns the number of fused pairs (0 where the layout is not the expected one, leaving the model untouched)."""
    targets = []
    for module in model.modules():
        name = type(module).__name__
        norms = (("norm1", "norm2") if name == "WanResidualBlock"
                 else ("norm_out",) if name in ("WanDecoder3d", "WanEncoder3d") else ())
        if not norms:
            continue
        parts = [getattr(module, n, None) for n in norms]
        if (not isinstance(getattr(module, "nonlinearity", None), torch.nn.SiLU)
                or any(type(p).__name__ != "WanRMS_norm" or isinstance(p.bias, torch.Tensor) for p in parts)):
            return 0
        targets.append((module, norms))
    for module, norms in targets:
        conv1 = getattr(module, "conv1", None)
        for n in norms:
            takes_bias = (n == "norm2" and conv1 is not None and conv1.bias is not None
                          and getattr(conv1.forward, "__func__", None) is _causal_conv_padding_inside)
            setattr(module, n, NormSiLU(getattr(module, n), conv1 if takes_bias else None))
            if takes_bias:
                conv1.bias_elsewhere = True
        module.nonlinearity = torch.nn.Identity()
    return sum(len(n) for _, n in targets)


def _causal_conv_padding_inside(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """`WanCausalConv3d.forward` with height/width zero padding done by the convolution: only the causal (time)
    padding is materialised, and only where the cache does not already supply those frames. The bias is left to the
    next module where `fuse_norm_silu` moved it there."""
    front = self._padding[4]
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front > 0:
        x = F.pad(x, (0, 0, 0, 0, front, 0))
    bias = None if getattr(self, "bias_elsewhere", False) else self.bias
    return F.conv3d(x, self.weight, bias, self.stride, (0, self._padding[2], self._padding[0]), self.dilation,
                    self.groups)


def pad_inside_convolutions(model: torch.nn.Module) -> int:
    """diffusers internals: every `WanCausalConv3d` (its `_padding` = (w, w, h, h, 2t, 0)) gets
    `_causal_conv_padding_inside` as its forward. Returns how many."""
    convs = [m for m in model.modules() if type(m).__name__ == "WanCausalConv3d"
             and len(getattr(m, "_padding", ())) == 6 and tuple(m.padding) == (0, 0, 0)]
    for conv in convs:
        conv.forward = types.MethodType(_causal_conv_padding_inside, conv)
    return len(convs)


def upsample_in_own_dtype(model: torch.nn.Module) -> int:
    """diffusers internals: `WanUpsample` upsamples a float32 copy and casts back; nearest-neighbour upsampling only
    copies values, so doing it in the tensor's own dtype gives the same result without the two extra passes."""
    ups = [m for m in model.modules() if type(m).__name__ == "WanUpsample" and isinstance(m, torch.nn.Upsample)
           and m.mode.startswith("nearest")]
    for up in ups:
        up.forward = types.MethodType(torch.nn.Upsample.forward, up)
    return len(ups)


def decode_in_steps(model, z: torch.Tensor, frames_per_step: int) -> torch.Tensor:
    """diffusers internals: `AutoencoderKLWan._decode` (untiled) with `frames_per_step` latent frames per decoder
    call after the first frame, which is always alone (its temporal upsampling differs). Not clamped."""
    model.clear_cache()
    x = model.post_quant_conv(z)
    frames = x.shape[2]
    outs = []
    for start in [0, *range(1, frames, frames_per_step)]:
        stop = 1 if start == 0 else min(start + frames_per_step, frames)
        model._conv_idx = [0]
        outs.append(model.decoder(x[:, :, start:stop], feat_cache=model._feat_map, feat_idx=model._conv_idx,
                                  first_chunk=start == 0))
    model.clear_cache()
    return torch.cat(outs, dim=2)


def encode_in_steps(model, video: torch.Tensor, frames_per_step: int) -> torch.Tensor:
    """diffusers internals: `AutoencoderKLWan._encode` (untiled) with 4 * `frames_per_step` video frames per encoder
    call after the first frame; returns the latent mean (`latent_dist.mode()`)."""
    model.clear_cache()
    frames = video.shape[2]
    step = 4 * frames_per_step
    outs = []
    for start in [0, *range(1, frames, step)]:
        stop = 1 if start == 0 else min(start + step, frames)
        model._enc_conv_idx = [0]
        outs.append(model.encoder(video[:, :, start:stop], feat_cache=model._enc_feat_map,
                                  feat_idx=model._enc_conv_idx))
    h = model.quant_conv(torch.cat(outs, dim=2))
    model.clear_cache()
    return h[:, : h.shape[1] // 2]


class WanVae(checkpoint_io.ModelWrapper):
    """Normalised-latent Wan2.1 VAE (the reference `WanVAE` wrapper semantics) on diffusers' `AutoencoderKLWan`."""

    def __init__(self, model, mean=WAN21_LATENT_MEAN, std=WAN21_LATENT_STD):
        super().__init__(model)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32)  # reference scale = [mean, 1/std] in float32
        self.frames_per_step = 1  # latent frames per causal decoder/encoder call (1 = diffusers' own loop)

    def enable_tiling(self, tile_size: int = 256, stride: int = 192) -> None:
        """Spatial tiling for low memory (pixel tile/stride; blending makes it close to, not equal to, untiled)."""
        self.model.enable_tiling(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
                                 tile_sample_stride_height=stride, tile_sample_stride_width=stride)

    def use_channels_last(self) -> None:
        """Conv3d weights in channels_last_3d, so cuDNN runs its NDHWC kernels: on an H200 a 480p chunk decodes in
        1.64 s instead of 1.83 s and encodes in 1.00 s instead of 1.14 s (benchmarks/vae_speed.py)."""
        for module in self.model.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)

    def use_fused_kernels(self, frames_per_step: int = 1) -> None:
        """The fused norm + SiLU, convolution-side spatial padding and `frames_per_step` latent frames per causal
        step (module docstring); the outputs equal the unfused ones within the dtype's rounding."""
        pad_inside_convolutions(self.model)  # before fuse_norm_silu, which moves conv1's bias into norm2
        fuse_norm_silu(self.model)
        upsample_in_own_dtype(self.model)
        self.frames_per_step = max(1, int(frames_per_step))

    def _stepped(self) -> bool:
        return self.frames_per_step > 1 and not self.model.use_tiling

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    def _stats(self, like: torch.Tensor):
        shape = (1, -1, 1, 1, 1)
        return self.mean.to(like.device).view(shape), self.inv_std.to(like.device).view(shape)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[1,3,F,H,W] in [-1,1] (F = 1+4k, H/W multiples of 8) -> float32 [1,16,1+(F-1)/4,H/8,W/8]."""
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % 4 or video.shape[3] % 8 or video.shape[4] % 8:
            raise InputError(f"VAE input must be [B,3,1+4k,H,W] with H and W multiples of 8; got {tuple(video.shape)}")
        video = video.to(self.device, self.dtype)
        if self._stepped():
            mu = encode_in_steps(self.model, video, self.frames_per_step).float()
        else:
            mu = self.model.encode(video).latent_dist.mode().float()
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised [1,16,T,h,w] -> float32 video [1,3,1+4(T-1),8h,8w] clamped to [-1,1]."""
        if latent.ndim != 5 or latent.shape[1] != self.mean.numel():
            raise InputError(f"VAE latent must be [B,{self.mean.numel()},T,h,w]; got {tuple(latent.shape)}")
        mean, inv_std = self._stats(latent)
        z = latent.float().to(self.device) / inv_std.to(self.device) + mean.to(self.device)
        if self._stepped():
            video = decode_in_steps(self.model, z.to(self.dtype), self.frames_per_step).float()
        else:
            video = self.model.decode(z.to(self.dtype)).sample.float()
        return video.clamp(-1.0, 1.0)


def load_vae(path: str | Path, geometry: Geometry, device="cpu", dtype: torch.dtype = torch.float32,
             tiling: bool = False) -> WanVae:
    """The Wan2.1 VAE from an original / ComfyUI / Kijai / diffusers file or folder, in `dtype` on `device`."""
    from diffusers import AutoencoderKLWan

    state, folder_config, path = _read(Path(path))
    state = normalise_vae_state(state, path, geometry)
    g = geometry.vae
    if folder_config is not None:
        for key, want in (("base_dim", g.dim), ("z_dim", g.z_dim), ("num_res_blocks", g.num_res_blocks)):
            if key in folder_config and folder_config[key] != want:
                raise CheckpointError(f"Not a Wan2.1 VAE (unknown): {path}/config.json {key}={folder_config[key]}, "
                                      f"expected {want}; {_WANT}")
        if folder_config.get("is_residual") or folder_config.get("patch_size"):
            raise CheckpointError(f"Not a Wan2.1 VAE (Wan2.2): {path}/config.json is a Wan2.2 VAE; {_WANT}")
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=g.dim, z_dim=g.z_dim, dim_mult=list(g.dim_mult),
                                 num_res_blocks=g.num_res_blocks, attn_scales=[],
                                 temperal_downsample=list(g.temperal_downsample), dropout=0.0)
    cast = {k: (v.float() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else v).to(device, dtype)
            for k, v in state.items()}
    load_module_state(model, cast, path, "Wan2.1 VAE")
    vae = WanVae(model)
    if torch.device(device).type == "cuda":
        vae.use_channels_last()
        vae.use_fused_kernels()
    if tiling:
        vae.enable_tiling()
    return vae
