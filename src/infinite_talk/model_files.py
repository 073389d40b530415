"""Where the model files come from: explicit paths, a models folder (found by content) or the hub (the tiny preset's
files are written by presets/tiny.py; loading.resolve_model_files picks among them).

Files in a models folder are classified by their tensor names (docs/FORMATS.md §0), never by file name. Explicit paths
in `LoadOptions` always win. Without a folder or paths, the released repositories are fetched from the Hugging Face
hub through huggingface_hub (standard cache, resumable downloads).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants

from .errors import CheckpointError
from .models.checkpoint_io import common_prefix, tensor_infos
from .options import LoadOptions

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".gguf")
HUB_REPOS = {
    "wan": "Wan-AI/Wan2.1-I2V-14B-480P",
    "infinitetalk": "MeiGen-AI/InfiniteTalk",
    "wav2vec": "TencentGameMate/chinese-wav2vec2-base",
}


@dataclass
class ModelFiles:
    transformer: list[str]
    adapter: str | None
    vae: str
    t5: str
    t5_tokenizer: str
    clip: str
    wav2vec: str

    def as_dict(self) -> dict:
        return asdict(self)


def classify(path: Path) -> str | None:
    """'dit', 'adapter', 'vae', 't5', 'clip', 'wav2vec' or None, from the tensor names alone."""
    try:
        keys = set(tensor_infos(path))
    except CheckpointError:
        return None
    prefix = common_prefix(keys)
    keys = {k[len(prefix):] for k in keys}
    from .models.transformer_loading import is_adapter_key, original_to_model_key

    # Any tensor of the Wan DiT itself, in released or diffusers names (a shard may hold only some blocks' FFNs).
    mapped = [original_to_model_key(k) for k in keys]
    diffusers_names = any(k.startswith("condition_embedder.") or re.match(r"blocks\.\d+\.(attn[12]|ffn\.net)\.", k)
                          for k in keys)
    if diffusers_names or any(m is not None and not is_adapter_key(m) for m in mapped):
        return "dit"
    if any(k.startswith(("audio_proj.", "multitalk_audio_proj.")) or ".audio_cross_attn." in k for k in keys):
        return "adapter"
    if ("conv2.weight" in keys and "decoder.conv1.weight" in keys) or "quant_conv.weight" in keys:
        return "vae"
    if "token_embedding.weight" in keys or "shared.weight" in keys or "encoder.block.0.layer.0.SelfAttention.q.weight" in keys:
        return "t5"
    if any(k.startswith(("visual.transformer.", "vision_model.")) for k in keys):
        return "clip"
    if any("feature_extractor.conv_layers.0.conv.weight" in k for k in keys):
        return "wav2vec"
    return None


def _is_t5_tokenizer_dir(folder: Path) -> bool:
    """A umT5 tokenizer folder, by content: pad id 0 and eos id 1 (XLM-R, CLIP's tokenizer, has <s> at 0), or a
    sentencepiece-only folder whose config names a T5 tokenizer."""
    import json

    try:
        if (folder / "tokenizer.json").is_file():
            added = json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])
            ids = {t.get("id"): t.get("content") for t in added}
            return ids.get(0) == "<pad>" and ids.get(1) == "</s>"
        config = folder / "tokenizer_config.json"
        if (folder / "spiece.model").is_file() and config.is_file():
            return "T5" in str(json.loads(config.read_text()).get("tokenizer_class", ""))
    except (OSError, ValueError):
        return False
    return False


def discover(*roots: str | Path) -> dict[str, list[Path]]:
    """All model files under one or more folders, grouped by component (found by content)."""
    found: dict[str, list[Path]] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise CheckpointError(f"{root}: --models-dir is not a folder")
        _discover_into(root, found)
    return found


def _discover_into(root: Path, found: dict[str, list[Path]]) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            kind = classify(path)
            if kind:
                found.setdefault(kind, []).append(path)
        elif path.is_dir() and _is_t5_tokenizer_dir(path):
            found.setdefault("t5_tokenizer", []).append(path)


def _one(found: dict[str, list[Path]], kind: str, label: str, option: str, root: Path) -> Path:
    paths = found.get(kind, [])
    if not paths:
        raise CheckpointError(f"{root}: no {label} found in the models folder; add it or pass {option} PATH")
    if len(paths) > 1:
        shown = ", ".join(str(p) for p in paths[:4])
        raise CheckpointError(f"{root}: several {label} files found ({shown}); choose one with {option} PATH")
    return paths[0]


def _wav2vec_location(path: Path) -> Path:
    """An HF folder (config.json beside the weights) is passed as the folder."""
    return path.parent if (path.parent / "config.json").is_file() else path


def files_from_folder(options: LoadOptions, roots: list[Path] | None = None) -> ModelFiles:
    roots = roots or [Path(options.models_dir)]
    root = roots[0] if len(roots) == 1 else Path(", ".join(map(str, roots)))
    found = discover(*roots)
    dit = [Path(options.transformer)] if options.transformer else found.get("dit", [])
    if not dit:
        raise CheckpointError(f"{root}: no Wan2.1-I2V-14B transformer found; add it or pass --transformer PATH")
    adapter = options.adapter or (str(_one(found, "adapter", "InfiniteTalk adapter", "--adapter", root))
                                  if found.get("adapter") else None)
    tokenizer = options.t5_tokenizer or str(_one(found, "t5_tokenizer", "umT5 tokenizer folder", "--t5-tokenizer",
                                                 root))
    return ModelFiles(
        transformer=[str(p) for p in dit],
        adapter=adapter,
        vae=options.vae or str(_one(found, "vae", "Wan VAE", "--vae", root)),
        t5=options.t5 or str(_one(found, "t5", "umT5 encoder", "--t5", root)),
        t5_tokenizer=tokenizer,
        clip=options.clip or str(_one(found, "clip", "CLIP ViT-H/14", "--clip", root)),
        wav2vec=options.wav2vec or str(_wav2vec_location(_one(found, "wav2vec", "wav2vec2 encoder", "--wav2vec",
                                                               root))),
    )


# What each hub repository contributes (None: the whole repository).
HUB_PATTERNS = {"wan": None, "infinitetalk": ["single/infinitetalk.safetensors"], "wav2vec": None}


def from_hub(options: LoadOptions) -> bool:
    """True when the model files would come from the hub: no preset, no models folder, not every file given."""
    explicit = [options.transformer, options.vae, options.t5, options.t5_tokenizer, options.clip, options.wav2vec]
    return options.preset != "tiny" and not options.models_dir and not all(explicit)


def no_models_message(reason: str) -> str:
    """One line: what to download, and the two ways to point at it."""
    repos = ", ".join(f"{repo}" + (f" ({' '.join(HUB_PATTERNS[name])})" if HUB_PATTERNS[name] else "")
                      for name, repo in HUB_REPOS.items())
    return (f"no model files, and they cannot be downloaded ({reason}): download {repos} from the Hugging Face hub "
            "(e.g. `hf download REPO --local-dir DIR/NAME`) and pass --models-dir DIR, or fill the hub cache "
            f"({constants.HF_HUB_CACHE}) on a connected machine and run with HF_HUB_OFFLINE=1; "
            "--preset tiny runs without them")


def _cached(name: str) -> bool:
    try:
        huggingface_hub.snapshot_download(HUB_REPOS[name], allow_patterns=HUB_PATTERNS[name], local_files_only=True)
    except Exception:  # not in the cache (huggingface_hub raises several kinds here)
        return False
    return True


def check_model_source(options: LoadOptions, timeout_s: float = 10.0) -> None:
    """Before anything slow: files from the hub must be in its cache or the hub reachable (one look-up)."""
    if not from_hub(options):
        return
    missing = [name for name in HUB_REPOS if not _cached(name)]
    if not missing:
        return
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(no_models_message("HF_HUB_OFFLINE is set and the hub cache does not hold them"))
    try:
        HfApi().model_info(HUB_REPOS[missing[0]], timeout=timeout_s)
    except Exception as err:  # any failure to reach the hub: network, DNS, proxy, HTTP error
        raise CheckpointError(no_models_message(f"the hub is unreachable: {type(err).__name__}")) from None


def files_from_hub(say: Callable[[str], None]) -> list[Path]:
    """Download the released repositories into the standard hub cache; returns the snapshot folders."""
    folders = []
    for name, repo in HUB_REPOS.items():
        say(f"downloading {repo} (resumable; cached under the Hugging Face hub cache)")
        try:
            local = huggingface_hub.snapshot_download(repo, allow_patterns=HUB_PATTERNS[name])
        except Exception as err:  # network, disk, authorization: the message says what to do instead
            first_line = (str(err).splitlines() or [""])[0][:200]
            raise CheckpointError(no_models_message(f"{repo}: {type(err).__name__}: {first_line}")) from None
        folders.append(Path(local))
    return folders
