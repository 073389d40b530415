"""Golden: reference `WanVAE.encode` through `load_vae` (the case's original `Wan2.1_VAE.pth`-name weights file)."""

from __future__ import annotations

import torch

from ...models.configs import Geometry, VaeConfig
from ...models.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, load_vae


def load_case_vae(case):
    config = case.config
    assert config["attn_scales"] == [] and config["dropout"] == 0.0
    assert tuple(case.meta["vae_mean"]) == WAN21_LATENT_MEAN and tuple(case.meta["vae_std"]) == WAN21_LATENT_STD
    geometry = Geometry("golden", vae=VaeConfig(
        dim=config["dim"], z_dim=config["z_dim"], dim_mult=tuple(config["dim_mult"]),
        num_res_blocks=config["num_res_blocks"], temperal_downsample=tuple(config["temperal_downsample"])))
    return load_vae(case.weights_path(), geometry)


def run(case) -> dict[str, torch.Tensor]:
    return {"latent": load_case_vae(case).encode(case.inputs()["video"])}
