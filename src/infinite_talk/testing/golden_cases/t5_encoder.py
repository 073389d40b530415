"""Golden: umT5 encoder through `load_t5_model` (the case's Wan-original-name weights file) + `TextEncoder`."""

from __future__ import annotations

import torch

from ...models.configs import Geometry, T5Config
from ...models.text_encoder import TextEncoder, load_t5_model


def geometry_from_config(config: dict, text_len: int) -> Geometry:
    assert not config.get("shared_pos", False)
    return Geometry("golden", t5=T5Config(
        vocab=config["vocab"], dim=config["dim"], dim_attn=config["dim_attn"], dim_ffn=config["dim_ffn"],
        num_heads=config["num_heads"], num_layers=config["num_layers"], num_buckets=config["num_buckets"],
        text_len=text_len))


def run(case) -> dict[str, torch.Tensor]:
    geometry = geometry_from_config(case.config, case.meta["padded_len"])
    encoder = TextEncoder(load_t5_model(case.weights_path(), geometry), tokenizer=None, text_len=geometry.t5.text_len)
    inputs = case.inputs()
    hidden = encoder.forward_ids(inputs["ids"], inputs["mask"])
    n_valid = int(inputs["mask"].sum().item())
    return {"hidden": hidden, "context": hidden[0, :n_valid]}
