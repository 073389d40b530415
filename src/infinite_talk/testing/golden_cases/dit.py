"""Golden `dit`: one denoiser call of the InfiniteTalk transformer, weights in the released key layout."""

from __future__ import annotations

from ...models.configs import DiTConfig, Geometry
from ...models.transformer_loading import load_transformer_from_state_dict


def geometry_from_case(config: dict) -> Geometry:
    keys = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_len", "text_dim", "in_dim", "out_dim",
            "eps", "audio_window", "vae_scale", "intermediate_dim", "output_dim", "context_tokens")
    # The reference hard-wires the CLIP width (1280) and the wav2vec2 geometry (12 layers x 768).
    return Geometry("golden", dit=DiTConfig(**{k: config[k] for k in keys}, image_dim=1280, audio_layers=12,
                                            audio_dim=768))


def run(case):
    geometry = geometry_from_case(case.config)
    model = load_transformer_from_state_dict(case.weights(), geometry)
    inp = case.inputs()
    out = model(
        inp["x"][None], inp["t"], inp["context"][None], inp["clip_fea"], inp["y"][None], inp["audio"],
        inp["ref_target_masks"],
    )[0]
    result = {"out": out}
    for i, block in enumerate(model.blocks):
        ref_map = getattr(block, "last_ref_map", None)
        if ref_map is not None:
            result[f"aux.block{i}.x_ref_attn_map"] = ref_map
            result[f"aux.block{i}.route_class"] = ref_map.argmax(0).float()
    return result
