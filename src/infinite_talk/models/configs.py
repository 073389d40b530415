"""Model geometries: `14b` (the released models) and `tiny` (random checkpoints for tests and demos).

A geometry fixes every shape the components must agree on: the transformer's text/image/audio input widths must
match what the T5, CLIP and wav2vec2 encoders produce. Loaders validate files against the geometry in use and name
the real model in their refusals.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_len: int = 512
    text_dim: int = 4096
    in_dim: int = 36
    out_dim: int = 16
    eps: float = 1e-6
    image_dim: int = 1280  # CLIP width (img_emb input)
    audio_layers: int = 12  # wav2vec2 hidden states stacked per frame
    audio_dim: int = 768  # wav2vec2 hidden size
    audio_window: int = 5
    vae_scale: int = 4
    intermediate_dim: int = 512
    output_dim: int = 768  # audio token width
    context_tokens: int = 32  # audio tokens per latent frame per person
    rope_max_seq_len: int = 1024

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512


@dataclass(frozen=True)
class ClipConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    num_heads: int = 16
    num_layers: int = 32

    @property
    def tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Wav2VecConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: int = 512


@dataclass(frozen=True)
class VaeConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)


@dataclass(frozen=True)
class Geometry:
    name: str
    dit: DiTConfig = field(default_factory=DiTConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: ClipConfig = field(default_factory=ClipConfig)
    wav2vec: Wav2VecConfig = field(default_factory=Wav2VecConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    # Frame sizes are the 480/720 buckets times this factor (rounded to multiples of 16). 1 for the real models;
    # the tiny preset shrinks frames so the whole pipeline runs on a CPU in seconds (its video is noise anyway).
    pixel_scale: float = 1.0

    def frame_size(self, bucket: tuple[int, int]) -> tuple[int, int]:
        if self.pixel_scale == 1.0:
            return bucket
        return tuple(max(16, int(round(side * self.pixel_scale / 16)) * 16) for side in bucket)


GEOMETRY_14B = Geometry("14b")

GEOMETRY_TINY = Geometry(
    "tiny",
    dit=DiTConfig(
        dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_len=512, text_dim=32, image_dim=32,
        audio_layers=2, audio_dim=32, intermediate_dim=16, output_dim=32, context_tokens=4, rope_max_seq_len=1024,
    ),
    t5=T5Config(vocab=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32),
    clip=ClipConfig(image_size=224, patch_size=14, dim=32, mlp_ratio=2, num_heads=2, num_layers=3),
    wav2vec=Wav2VecConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=32),
    vae=VaeConfig(dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=2),
    pixel_scale=0.125,
)

GEOMETRIES = {g.name: g for g in (GEOMETRY_14B, GEOMETRY_TINY)}
