"""Audio encoder: `TencentGameMate/chinese-wav2vec2-base` on `transformers.Wav2Vec2Model`.

Accepted files (classified by content):
* an HF folder (`config.json` + `model.safetensors` / `pytorch_model.bin`, Wav2Vec2ForPreTraining names with the
  `wav2vec2.` prefix, or bare `Wav2Vec2Model` names);
* a single file (Kijai `wav2vec2-chinese-base_fp16.safetensors`, `wav2vec2.`-prefixed keys, positional conv
  weight norm as `weight_g` / `weight_v`).

`embed` reproduces the reference `get_embedding`: CNN features at 50 Hz, linearly interpolated
(align_corners=True) to int(len/16000*25) frames BEFORE the feature projection, then the encoder; the hidden
states after every transformer layer are stacked to [T_video, layers, hidden].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from ..errors import CheckpointError, InputError
from . import checkpoint_io
from .configs import Geometry

REQUIRED = "Audio encoder must be TencentGameMate/chinese-wav2vec2-base"
_WANT = "download TencentGameMate/chinese-wav2vec2-base (or Kijai/wav2vec2_safetensors wav2vec2-chinese-base_fp16)"

# The published chinese-wav2vec2-base config.json (sizes are filled in from the geometry).
TENCENT_CONFIG: dict = {
    "architectures": ["Wav2Vec2ForPreTraining"],
    "conv_bias": False,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "do_stable_layer_norm": False,
    "feat_extract_activation": "gelu",
    "feat_extract_norm": "group",
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "num_conv_pos_embedding_groups": 16,
    "num_conv_pos_embeddings": 128,
    "num_feat_extract_layers": 7,
    "vocab_size": 32,
    "model_type": "wav2vec2",
}
# Keys of a Wav2Vec2ForPreTraining file that the bare encoder does not use.
_PRETRAIN_ONLY = ("quantizer.", "project_q.", "project_hid.", "masked_spec_embed")


def load_module_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """Assign `state` into a model built on the meta device: every parameter must be present with its shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: not a complete {what} file (missing keys: {missing[:4]}{'...' if len(missing) > 4 else ''}; "
            f"unexpected keys: {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}); download the file again"
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{path}: {what} tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)


def _cast_state(state: dict[str, torch.Tensor], path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{path}: fp8 weights are not supported for this encoder; use the fp16/fp32 file")
        out[key] = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, Path]:
    """(state dict, folder config.json or None, weights file) of a file or an HF folder."""
    if not path.exists():
        raise CheckpointError(f"{path}: audio encoder not found; {_WANT}")
    config = None
    if path.is_dir():
        config = checkpoint_io.read_folder_config(path)
        files = [p for p in checkpoint_io.weight_files(path) if not p.name.endswith("fairseq-ckpt.pt")]
        if len(files) != 1:
            raise CheckpointError(f"{path}: expected one weights file (model.safetensors or pytorch_model.bin), "
                                  f"found {[p.name for p in files]}")
        path = files[0]
    return checkpoint_io.load_state_dict(path), config, path


def normalise_wav2vec_keys(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """Released/Kijai names -> transformers `Wav2Vec2Model` names; refuses CTC fine-tunes and non-wav2vec2 files."""
    if any(k.startswith("lm_head.") for k in state):
        raise CheckpointError(
            f"{REQUIRED}; {path} is a CTC speech-recognition fine-tune (has lm_head, e.g. facebook/wav2vec2-base-960h), "
            f"not the self-supervised Tencent encoder the InfiniteTalk adapter was trained on; {_WANT}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("wav2vec2.")
        if key.startswith(_PRETRAIN_ONLY):
            continue
        key = key.replace("pos_conv_embed.conv.weight_g", "pos_conv_embed.conv.parametrizations.weight.original0")
        key = key.replace("pos_conv_embed.conv.weight_v", "pos_conv_embed.conv.parametrizations.weight.original1")
        out[key] = value
    if "feature_extractor.conv_layers.0.conv.weight" not in out:
        raise CheckpointError(
            f"{path}: not a wav2vec2 checkpoint (no feature_extractor.conv_layers.0.conv.weight); {REQUIRED}; {_WANT}"
        )
    return out


def wav2vec_config_from_state(state: dict[str, torch.Tensor], path, geometry: Geometry, folder_config: dict | None):
    """A `Wav2Vec2Config` for these weights, after checking them against the Tencent architecture and the geometry."""
    g = geometry.wav2vec
    n_conv = sum(1 for k in state if k.startswith("feature_extractor.conv_layers.") and k.endswith(".conv.weight"))
    n_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    proj = state.get("feature_projection.projection.weight")
    ffn = state.get("encoder.layers.0.feed_forward.intermediate_dense.weight")
    problems = []
    if n_conv != 7:
        problems.append(f"{n_conv} conv layers (expected 7)")
    conv_dims = [state[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[0] for i in range(n_conv)
                 if f"feature_extractor.conv_layers.{i}.conv.weight" in state]
    if any(d != g.conv_dim for d in conv_dims):
        problems.append(f"conv dims {sorted(set(conv_dims))} (expected {g.conv_dim})")
    if "feature_extractor.conv_layers.1.layer_norm.weight" in state:
        problems.append("layer-norm conv stack (a wav2vec2-large style model; expected the group-norm base stack)")
    if "feature_extractor.conv_layers.0.conv.bias" in state:
        problems.append("conv layers with bias (expected none)")
    if proj is None or ffn is None:
        problems.append("no feature projection / transformer layers")
    else:
        if proj.shape[0] != g.hidden_size:
            problems.append(f"hidden size {proj.shape[0]} (expected {g.hidden_size})")
        if ffn.shape[0] != g.intermediate_size:
            problems.append(f"ffn size {ffn.shape[0]} (expected {g.intermediate_size})")
    if n_layers != g.num_hidden_layers:
        problems.append(f"{n_layers} transformer layers (expected {g.num_hidden_layers})")
    if folder_config is not None:
        for field, want in (("feat_extract_norm", "group"), ("do_stable_layer_norm", False)):
            if folder_config.get(field, want) != want:
                problems.append(f"config.json {field}={folder_config.get(field)!r} (expected {want!r})")
        if folder_config.get("num_attention_heads", g.num_attention_heads) != g.num_attention_heads:
            problems.append(f"{folder_config.get('num_attention_heads')} attention heads "
                            f"(expected {g.num_attention_heads})")
    if problems:
        raise CheckpointError(f"{REQUIRED} ({g.num_hidden_layers} layers x {g.hidden_size}); {path} has "
                              + "; ".join(problems) + f"; {_WANT}")
    cfg = dict(TENCENT_CONFIG)
    cfg.update(conv_dim=[g.conv_dim] * 7, hidden_size=g.hidden_size, num_hidden_layers=g.num_hidden_layers,
               num_attention_heads=g.num_attention_heads, intermediate_size=g.intermediate_size)
    # Inference only: no SpecAugment parameter, no dropout.
    cfg.update(apply_spec_augment=False, mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.0)
    return Wav2Vec2Config(**cfg)


class AudioEncoder(checkpoint_io.ModelWrapper):
    """wav2vec2 audio features for the InfiniteTalk adapter: `embed(wave16k) -> [T_video, layers, hidden]`."""

    def __init__(self, model, provenance: str, warning: str | None = None, video_fps: int = 25,
                 sample_rate: int = 16000):
        super().__init__(model)
        self.provenance = provenance
        self.warning = warning
        self.video_fps = video_fps
        self.sample_rate = sample_rate

    def num_video_frames(self, num_samples: int) -> int:
        return int(num_samples / self.sample_rate * self.video_fps)

    @torch.no_grad()
    def embed(self, waveform_16k: np.ndarray) -> torch.Tensor:
        wave = np.asarray(waveform_16k, dtype=np.float32)
        if wave.ndim != 1:
            raise InputError(f"audio must be a mono waveform [n]; got shape {wave.shape}")
        if not np.isfinite(wave).all():
            raise InputError("audio contains NaN or infinite samples; re-export the audio as a normal wav file")
        frames = self.num_video_frames(wave.shape[0])
        if frames < 1:
            raise InputError(f"audio is too short ({wave.shape[0]} samples): at least one video frame "
                             f"(1/{self.video_fps} s) of audio is needed")
        # Preprocessor of chinese-wav2vec2-base: do_normalize=false, i.e. only the float32 cast.
        values = torch.from_numpy(wave)[None].to(self.device, self.dtype)

        def to_video_rate(_module, _inputs, features):  # [B, C, T50] -> [B, C, T_video]
            return F.interpolate(features, size=frames, mode="linear", align_corners=True)

        hook = self.model.feature_extractor.register_forward_hook(to_video_rate)
        try:
            out = self.model(values, output_hidden_states=True)
        finally:
            hook.remove()
        return torch.stack(out.hidden_states[1:], dim=1)[0].transpose(0, 1).contiguous()


def build_audio_encoder(state: dict[str, torch.Tensor], config, path, device="cpu",
                        dtype: torch.dtype = torch.float32, provenance: str = "", warning: str | None = None):
    with torch.device("meta"):
        model = Wav2Vec2Model(config)
    load_module_state(model, _cast_state(state, path, dtype, device), path, "wav2vec2")
    return AudioEncoder(model, provenance=provenance, warning=warning)


def load_audio_encoder(path: str | Path, geometry: Geometry, device="cpu",
                       dtype: torch.dtype = torch.float32) -> AudioEncoder:
    """Load chinese-wav2vec2-base from an HF folder or a single (Kijai) file; refuses other encoders."""
    path = Path(path)
    raw, folder_config, weights_file = _read(path)
    state = normalise_wav2vec_keys(raw, weights_file)
    config = wav2vec_config_from_state(state, weights_file, geometry, folder_config)
    if geometry.name == "14b":
        provenance = "unconfirmed wav2vec2-base (shapes of TencentGameMate/chinese-wav2vec2-base)"
        warning = (f"{weights_file}: has the shapes of TencentGameMate/chinese-wav2vec2-base, but any wav2vec2-base "
                   "pre-training checkpoint has the same shapes; if lip sync looks wrong, make sure this is the "
                   "Tencent (Chinese) encoder the InfiniteTalk adapter was trained on")
    else:
        provenance = f"{geometry.name} test encoder"
        warning = None
    return build_audio_encoder(state, config, weights_file, device, dtype, provenance, warning)
