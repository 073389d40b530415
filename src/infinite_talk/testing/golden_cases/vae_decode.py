"""Golden: reference `WanVAE.decode` through `load_vae` (weights shared with the vae_encode case)."""

from __future__ import annotations

import torch

from .vae_encode import load_case_vae


def run(case) -> dict[str, torch.Tensor]:
    return {"video": load_case_vae(case).decode(case.inputs()["latent"])}
