"""Golden: CLIP visual tower through `load_image_encoder` (the case's open-clip `visual.*` weights file) + `encode`."""

from __future__ import annotations

import torch

from ...models.configs import ClipConfig, Geometry
from ...models.image_encoder import CLIP_MEAN, CLIP_STD, load_image_encoder


def geometry_from_config(config: dict) -> Geometry:
    assert config["activation"] == "gelu" and config["pre_norm"] and not config["post_norm"]
    assert config["pool_type"] == "token" and config["norm_eps"] == 1e-5
    return Geometry("golden", clip=ClipConfig(
        image_size=config["image_size"], patch_size=config["patch_size"], dim=config["dim"],
        mlp_ratio=config["mlp_ratio"], num_heads=config["num_heads"], num_layers=config["num_layers"]))


def run(case) -> dict[str, torch.Tensor]:
    assert tuple(case.meta["clip_mean"]) == CLIP_MEAN and tuple(case.meta["clip_std"]) == CLIP_STD
    encoder = load_image_encoder(case.weights_path(), geometry_from_config(case.config))
    return {"out": encoder.encode(case.inputs()["image"])}
