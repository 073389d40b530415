"""Text encoder: the umT5-XXL encoder on `transformers.UMT5EncoderModel`.

Accepted weights (classified by content): the Wan original layout (`models_t5_umt5-xxl-enc-bf16.pth`, Kijai
`umt5-xxl-enc-*.safetensors`: `token_embedding.weight`, `blocks.N.attn.q.weight`, ...), converted at load to the
transformers names, and the HF / ComfyUI layout (`shared.weight`, `encoder.block.N...`; a file or a folder of
shards). Plain fp8 (e4m3/e5m2) weights are upcast; "scaled" fp8 files (`scaled_fp8` / `*.scale_weight`) are
refused. The tokenizer is a local folder loaded with `AutoTokenizer.from_pretrained`.

`encode(texts)` follows the reference: ftfy.fix_text + html.unescape twice + whitespace collapse, pad to
`text_len` (512) with an attention mask, then each output trimmed to its number of real tokens. A longer prompt is
cut at `text_len` tokens, as the encoder was trained; `token_report` states the cut (recorded in the sidecar as
effective, and printed by the CLI).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from ..errors import CheckpointError, InputError
from . import checkpoint_io
from .audio_encoder import load_module_state
from .configs import Geometry

_WANT = ("use the umT5-XXL encoder weights (models_t5_umt5-xxl-enc-bf16.pth, umt5-xxl-enc-bf16.safetensors or "
         "umt5_xxl_fp16.safetensors)")
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")

# Wan original name (block-relative) -> transformers UMT5 name (block-relative).
_BLOCK_MAP = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def tokenizer_not_weights(path) -> CheckpointError:
    return CheckpointError(
        f"A tokenizer is not a weight file: {path} looks like a tokenizer (id or folder), but the T5 weights are "
        f"needed here; {_WANT}, and pass the tokenizer folder (google/umt5-xxl files) separately"
    )


def convert_t5_original_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan original umT5 names -> `UMT5EncoderModel` names (docs/FORMATS.md §6)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if rest not in _BLOCK_MAP:
                raise KeyError(key)
            out[f"encoder.block.{idx}.{_BLOCK_MAP[rest]}"] = value
        else:
            raise KeyError(key)
    return out


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not path.parent.exists():
            raise tokenizer_not_weights(path)
        raise CheckpointError(f"{path}: T5 weights not found; {_WANT}")
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        has_weights = any(p.suffix in (".safetensors", ".pth", ".pt", ".bin") for p in path.iterdir())
        if not has_weights and names & set(_TOKENIZER_FILES):
            raise tokenizer_not_weights(path)
        files = checkpoint_io.weight_files(path)
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(checkpoint_io.load_state_dict(f))
        return state, path
    if path.suffix in (".json", ".model") or path.name in _TOKENIZER_FILES:
        raise tokenizer_not_weights(path)
    if path.suffix != ".safetensors":
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
        if head.startswith(b"{"):  # a JSON file (tokenizer.json renamed) is no torch pickle
            raise tokenizer_not_weights(path)
    return checkpoint_io.load_state_dict(path), path


def normalise_t5_state(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """Either layout -> `UMT5EncoderModel` names; refuses scaled fp8 and non-umT5 files."""
    if "scaled_fp8" in state or any(k.endswith((".scale_weight", ".scale_input")) for k in state):
        raise CheckpointError(
            f"{path}: scaled fp8 T5 file (scaled_fp8 / scale_weight keys) is not supported: its weights are only "
            f"meaningful with the per-tensor scales; {_WANT} (bf16/fp16, or a plain fp8_e4m3fn file)"
        )
    prefix = checkpoint_io.common_prefix(list(state), ("text_encoders.umt5xxl.transformer.", "model.", "t5."))
    state = {k[len(prefix):]: v for k, v in state.items()}
    if "token_embedding.weight" in state and "blocks.0.attn.q.weight" in state:
        try:
            return convert_t5_original_to_hf(state)
        except KeyError as err:
            raise CheckpointError(f"{path}: unknown key {err} in a Wan umT5 file; {_WANT}") from None
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in state:
        state = {k: v for k, v in state.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
        emb = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        if emb is None:
            raise CheckpointError(f"{path}: umT5 file without a token embedding (shared.weight); {_WANT}")
        state["shared.weight"] = emb
        state["encoder.embed_tokens.weight"] = emb
        return state
    raise CheckpointError(f"T5 file invalid: {path} is not a umT5 encoder (no token_embedding.weight / "
                          f"shared.weight + encoder blocks); {_WANT}")


def t5_config_from_state(state: dict[str, torch.Tensor], path, geometry: Geometry):
    g = geometry.t5
    emb = state["shared.weight"]
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.block.")})
    bias = state.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = state.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    wi = state.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    got = (tuple(emb.shape), layers, None if bias is None else tuple(bias.shape),
           None if q is None else q.shape[0], None if wi is None else wi.shape[0])
    want = ((g.vocab, g.dim), g.num_layers, (g.num_buckets, g.num_heads), g.dim_attn, g.dim_ffn)
    if got != want:
        raise CheckpointError(
            f"T5 file invalid: {path} has embedding {got[0]}, {got[1]} layers, relative bias {got[2]}, attention "
            f"width {got[3]}, ffn {got[4]}; the umT5 encoder of this model has embedding {want[0]}, {want[1]} "
            f"layers, relative bias {want[2]}, attention width {want[3]}, ffn {want[4]}; {_WANT}"
        )
    return UMT5Config(
        vocab_size=g.vocab, d_model=g.dim, d_kv=g.dim_attn // g.num_heads, d_ff=g.dim_ffn, num_layers=g.num_layers,
        num_heads=g.num_heads, relative_attention_num_buckets=g.num_buckets, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=0, eos_token_id=1, tie_word_embeddings=True,
    )


def _upcast_state(state, device, dtype):
    out = {}
    for k, v in state.items():
        if v.dtype in _FP8:
            v = v.float()
        out[k] = v.to(device=device, dtype=dtype)
    return out


def load_t5_model(weights_path: str | Path, geometry: Geometry, device="cpu", dtype: torch.dtype = torch.float32):
    """The `UMT5EncoderModel` of a umT5 weights file or folder (either layout), validated against the geometry."""
    raw, path = _read_weights(Path(weights_path))
    state = normalise_t5_state(raw, path)
    config = t5_config_from_state(state, path, geometry)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_module_state(model, _upcast_state(state, device, dtype), path, "umT5 encoder")
    model.tie_weights()
    return model.eval()


def clean_prompt(text: str) -> str:
    """Reference cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_tokenizer(tokenizer_path: str | Path):
    path = Path(tokenizer_path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer folder not found; download the google/umt5-xxl tokenizer files "
                              "(tokenizer.json / spiece.model, tokenizer_config.json) into a folder and pass it")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load the T5 tokenizer ({type(err).__name__}: {err}); download the "
                              "google/umt5-xxl tokenizer files into this folder") from err


class TextEncoder:
    """umT5 prompt encoder: `encode(texts) -> list of [L_i, dim]` (trimmed to the real tokens)."""

    def __init__(self, model, tokenizer, text_len: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError("prompts must be a list of strings")
        batch = self.tokenizer([clean_prompt(t) for t in texts], padding="max_length", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_attention_mask=True,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def count_tokens(self, text: str) -> int:
        """Tokens of the cleaned text with its end token, before the cut at `text_len`."""
        return len(self.tokenizer(clean_prompt(text), add_special_tokens=True, truncation=False,
                                  verbose=False)["input_ids"])

    def token_report(self, prompt: str, negative_prompt: str) -> dict:
        """For the sidecar: each prompt's tokens and how many the encoder reads (the first `text_len`); a note when
        a prompt is cut."""
        counts = {"prompt": self.count_tokens(prompt), "negative_prompt": self.count_tokens(negative_prompt)}
        report: dict = {"limit": self.text_len, **{name: {"tokens": n, "used": min(n, self.text_len)}
                                                   for name, n in counts.items()}}
        cut = [f"the {name.replace('_', ' ')} has {n} tokens; the text encoder reads only the first {self.text_len} "
               "(the rest has no effect)" for name, n in counts.items() if n > self.text_len]
        if cut:
            report["note"] = "; ".join(cut)
        return report

    @torch.no_grad()
    def forward_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, dim] for all positions (pads included)."""
        out = self.model(input_ids=ids.long().to(self.device), attention_mask=mask.long().to(self.device))
        return out.last_hidden_state

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        ids, mask = self.tokenize(texts)
        hidden = self.forward_ids(ids, mask)
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, : int(n)] for i, n in enumerate(lengths)]


def load_text_encoder(weights_path: str | Path, tokenizer_path: str | Path, geometry: Geometry, device="cpu",
                      dtype: torch.dtype = torch.float32) -> TextEncoder:
    """umT5 encoder weights (Wan original or HF/ComfyUI layout) + a local tokenizer folder."""
    tokenizer = load_tokenizer(tokenizer_path)
    if len(tokenizer) > geometry.t5.vocab:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {len(tokenizer)} tokens but the umT5 embedding has "
                              f"{geometry.t5.vocab}; use the google/umt5-xxl tokenizer")
    model = load_t5_model(weights_path, geometry, device, dtype)
    return TextEncoder(model, tokenizer, geometry.t5.text_len)
