"""Reading checkpoint files safely: headers first, clear errors, no full copies.

Formats: `.safetensors` (header read without loading tensors), torch pickles (`.pth/.pt/.bin`, loaded with
`weights_only=True` and memory-mapped where possible), GGUF (recognised by its `GGUF` magic, memory-mapped by the
`gguf` reader; quantized tensors stay quantized as diffusers `GGUFParameter`s) and folders of shards. Every failure is a `CheckpointError`
that names the file and says what to do. Classification by keys lives with each component's loader.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string (F32, BF16, F16, F8_E4M3, ...) or torch dtype name
    shape: tuple[int, ...]


def _is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def is_gguf(path: str | Path) -> bool:
    """By content: GGUF files start with the magic b"GGUF" whatever their name."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


# GGUF tensor types read as plain tensors; every other supported type stays quantized (diffusers dequantizes it per
# layer in GGUFLinear). The list is diffusers' SUPPORTED_GGUF_QUANT_TYPES (docs/FORMATS.md §2.3).
GGUF_PLAIN = ("F32", "F16", "BF16")


def _gguf_reader(path: Path):
    try:  # lazy: `gguf` is optional (the [quant] extra)
        from gguf import GGUFReader
    except ImportError as err:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)") from err
    try:
        return GGUFReader(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: invalid GGUF file ({type(err).__name__}: {err}); download it again") from err


def _gguf_shape(reader, tensor) -> tuple[int, ...]:
    """Logical (torch-order) shape; >4-D tensors carry their real shape in ComfyUI-GGUF's metadata."""
    field = reader.fields.get(f"comfy.gguf.orig_shape.{tensor.name}")
    if field is not None:
        return tuple(int(field.parts[i][0]) for i in field.data)
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _gguf_tensors(path: Path):
    # lazy: diffusers' GGUF utilities import the optional `gguf` package
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    reader = _gguf_reader(path)
    supported = {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | set(GGUF_PLAIN)
    for tensor in reader.tensors:
        qtype = tensor.tensor_type.name
        if qtype not in supported:
            raise CheckpointError(f"{path}: tensor {tensor.name} has GGUF type {qtype}, which cannot be dequantized "
                                  f"(supported: {', '.join(sorted(supported))}); use another quantization of the model")
        yield reader, tensor, qtype


def _gguf_infos(path: Path) -> dict[str, TensorInfo]:
    return {t.name: TensorInfo(qtype, _gguf_shape(r, t)) for r, t, qtype in _gguf_tensors(path)}


def _iter_gguf(path: Path, keys: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
    # lazy: diffusers' GGUF utilities import the optional `gguf` package
    from diffusers.quantizers.gguf.utils import GGUFParameter

    for reader, tensor, qtype in _gguf_tensors(path):
        if keys is not None and tensor.name not in keys:
            continue
        data = torch.from_numpy(tensor.data.copy())
        if qtype in GGUF_PLAIN:
            if qtype == "BF16":
                data = data.view(torch.bfloat16)
            yield tensor.name, data.reshape(_gguf_shape(reader, tensor))
        else:
            yield tensor.name, GGUFParameter(data, quant_type=tensor.tensor_type)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Keys, dtypes and shapes of a safetensors file, checked against the file size (catches truncation)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is empty or truncated ({size} bytes); download it again")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len <= 0 or 8 + header_len > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated header; download it again")
            header = json.loads(fh.read(header_len))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors header ({err}); download the file again") from err
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            infos[key] = TensorInfo(entry["dtype"], tuple(entry["shape"]))
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header entry {key!r}; download the file again") from err
    if 8 + header_len + data_end > size:
        missing = 8 + header_len + data_end - size
        raise CheckpointError(
            f"{path}: file is truncated ({missing} bytes missing of {8 + header_len + data_end}); download it again"
        )
    return infos, meta


def load_torch_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth/.pt/.bin` state dict (weights only, memory-mapped); a `state_dict`/`module` wrapper is unwrapped."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot load this torch file ({type(err).__name__}: {err}); it may be truncated or not a "
            "weights file — download it again"
        ) from err
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return obj


def tensor_infos(path: str | Path) -> dict[str, TensorInfo]:
    """Keys, dtypes and shapes of any supported file (pickles are loaded lazily via mmap)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    if _is_safetensors(path):
        return read_safetensors_header(path)[0]
    if is_gguf(path):
        return _gguf_infos(path)
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic); it may be truncated or mislabelled — "
                              "download it again")
    sd = load_torch_pickle(path)
    return {k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sd.items()}


def iter_tensors(path: str | Path, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time, so a caller can assign and drop each before reading the next."""
    path = Path(path)
    if _is_safetensors(path):
        read_safetensors_header(path)  # validates size first
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    if keys is None or key in keys:
                        yield key, fh.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: cannot read tensors ({err}); the file may be corrupt") from err
        return
    if is_gguf(path):
        yield from _iter_gguf(path, keys)
        return
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic); it may be truncated or mislabelled — "
                              "download it again")
    for key, value in load_torch_pickle(path).items():
        if keys is None or key in keys:
            yield key, value


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(path))


def common_prefix(keys: list[str] | set[str], prefixes: tuple[str, ...] = DIT_PREFIXES) -> str:
    """The first prefix carried by *every* key (checking one key is not enough), or ''."""
    keys = list(keys)
    for prefix in prefixes:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def weight_files(path: str | Path) -> list[Path]:
    """The weight files of a file or folder: a folder's `*.safetensors` (else `*.pth/*.pt/*.bin`), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.gguf")) or sorted(
        p for ext in ("*.pth", "*.pt", "*.bin") for p in path.glob(ext)
    )
    if not files:
        raise CheckpointError(f"{path}: folder holds no .safetensors/.pth/.bin weight files")
    return files


def read_folder_config(folder: Path) -> dict | None:
    """`config.json` of a model folder, or None when there is none; an unreadable one is a CheckpointError."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{cfg}: unreadable config.json ({err}); download it again") from err


class ModelWrapper:
    """Base of our thin wrappers around a library model: the device and dtype its weights really have."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
