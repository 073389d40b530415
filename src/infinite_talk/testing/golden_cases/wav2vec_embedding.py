"""Golden: reference `get_embedding` through `load_audio_encoder` (the case's released-name weights file) + `embed`."""

from __future__ import annotations

import torch

from ...models.audio_encoder import TENCENT_CONFIG, load_audio_encoder
from ...models.configs import Geometry, Wav2VecConfig


def geometry_from_config(config: dict) -> Geometry:
    for key, value in TENCENT_CONFIG.items():  # the case uses the real config with only sizes reduced
        if key in config and config[key] != value:
            raise AssertionError(f"case config {key}={config[key]!r} differs from the Tencent config {value!r}")
    conv = set(config["conv_dim"])
    assert len(conv) == 1, config["conv_dim"]
    return Geometry("golden", wav2vec=Wav2VecConfig(
        hidden_size=config["hidden_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
        conv_dim=conv.pop()))


def run(case) -> dict[str, torch.Tensor]:
    encoder = load_audio_encoder(case.weights_path(), geometry_from_config(case.config))
    wave = case.inputs()["waveform"].numpy()
    return {"embedding": encoder.embed(wave)}
