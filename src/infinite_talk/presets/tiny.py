"""The `tiny` preset: deterministic tiny random checkpoints in the real file formats, cached on disk.

Every component is written in its released layout (Wan original shards + InfiniteTalk adapter file, Wan2.1_VAE
`.pth` keys, the Wan umT5 `.pth` keys + a tokenizer folder, the open-clip `.pth` visual keys, a wav2vec2 HF folder)
and loaded back through the same loaders as the real models, so the whole pipeline runs on a CPU in seconds. The
weights are random: the video is noise. Nothing here is used unless the user asks for `--preset tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..cache import cache_root
from ..model_files import ModelFiles
from ..models.configs import GEOMETRY_TINY

PRESET_VERSION = 1
SEED = 1234


def cache_dir() -> Path:
    return cache_root() / f"tiny-v{PRESET_VERSION}"


def ensure_tiny_models(folder: str | Path | None = None) -> ModelFiles:
    """Write the tiny checkpoints once (atomic: a marker file is written last) and return their paths."""
    from .tiny_encoders import write_tiny_clip, write_tiny_t5, write_tiny_vae, write_tiny_wav2vec
    from .tiny_transformer import random_transformer_state, write_original_shards

    folder = Path(folder) if folder else cache_dir()
    marker = folder / "files.json"
    if marker.is_file():
        files = ModelFiles(**json.loads(marker.read_text()))
        if all(Path(p).exists() for p in [*files.transformer, files.adapter, files.vae, files.t5, files.t5_tokenizer,
                                          files.clip, files.wav2vec]):
            return files
    folder.mkdir(parents=True, exist_ok=True)
    g = GEOMETRY_TINY
    base, adapter = write_original_shards(folder, random_transformer_state(g, SEED), g)
    t5_weights, t5_tokenizer = write_tiny_t5(folder / "umt5", g, SEED + 1)
    files = ModelFiles(
        transformer=[str(base)],
        adapter=str(adapter),
        vae=str(write_tiny_vae(folder / "vae", g, SEED + 2)),
        t5=str(t5_weights),
        t5_tokenizer=str(t5_tokenizer),
        clip=str(write_tiny_clip(folder / "clip", g, SEED + 3)),
        wav2vec=str(write_tiny_wav2vec(folder / "chinese-wav2vec2-base", g, SEED + 4)),
    )
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(files.as_dict(), indent=2))
    tmp.replace(marker)
    return files
