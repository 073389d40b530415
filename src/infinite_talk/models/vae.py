"""Wan2.1 causal 3-D VAE on `diffusers.AutoencoderKLWan`.

Accepted files (classified by content): the original `Wan2.1_VAE.pth` (`encoder.*`, `conv1.*`, `conv2.*`,
`decoder.*`), ComfyUI / Kijai safetensors (same keys, with or without a `model.` prefix) and the diffusers layout
(a folder with `config.json` + `diffusion_pytorch_model.safetensors`, or a file with `quant_conv` /
`encoder.conv_in` keys). Original names are converted at load by `convert_wan_vae_original_to_diffusers`, which
follows diffusers' renaming but derives the block indices from the geometry (diffusers' own converter hard-codes
the real [1,2,4,4] stage layout). Wan2.2 (48 latent channels) and lightVAE (pruned decoder) files are refused.

`encode(video [1,3,F,H,W] in [-1,1])` = (mu - mean) * (1/std) (mu = encoder mode, no sampling);
`decode(latent)` = decoder(latent / (1/std) + mean) clamped to [-1, 1] — the reference `WanVAE` wrapper.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from . import checkpoint_io
from .audio_encoder import load_module_state
from .configs import Geometry

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


class WanVae(checkpoint_io.ModelWrapper):
    """Normalised-latent Wan2.1 VAE (the reference `WanVAE` wrapper semantics) on diffusers' `AutoencoderKLWan`."""

    def __init__(self, model, mean=WAN21_LATENT_MEAN, std=WAN21_LATENT_STD):
        super().__init__(model)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32)  # reference scale = [mean, 1/std] in float32

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
        mu = self.model.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        mean, inv_std = self._stats(mu)
        return (mu - mean) * inv_std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised [1,16,T,h,w] -> float32 video [1,3,1+4(T-1),8h,8w] clamped to [-1,1]."""
        if latent.ndim != 5 or latent.shape[1] != self.mean.numel():
            raise InputError(f"VAE latent must be [B,{self.mean.numel()},T,h,w]; got {tuple(latent.shape)}")
        mean, inv_std = self._stats(latent)
        z = latent.float().to(self.device) / inv_std.to(self.device) + mean.to(self.device)
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
    if tiling:
        vae.enable_tiling()
    return vae
