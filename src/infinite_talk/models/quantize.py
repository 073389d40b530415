"""Quantize the loaded transformer (and the T5 encoder) with torchao, after any LoRA merge, before the GPU move.

The planner has already decided the mode (`plan.quantization`); this module only applies it:

| plan mode          | torchao config                                         | what changes                              |
|--------------------|--------------------------------------------------------|-------------------------------------------|
| `fp8-compute`      | Float8DynamicActivationFloat8WeightConfig(PerRow())    | fp8 weights, fp8 activations, fp8 GEMMs   |
| `fp8-storage`      | Float8WeightOnlyConfig()                               | fp8 weights (per-row scales), upcast GEMM |
| `int8-weight-only` | Int8WeightOnlyConfig()                                 | int8 weights (per-row scales)             |
| `nf4`              | NF4WeightOnlyConfig (block 64, scaler block ≤ 256)     | 4-bit NormalFloat weights, upcast GEMM    |
| `nvfp4`            | NVFP4DynamicActivationNVFP4WeightConfig                | Blackwell FP4 GEMMs                       |

Only the large Linear layers inside the 40 transformer blocks are quantized (attention, FFN, audio cross-attention:
≈ 98% of the weights). The embeddings, time MLPs, modulation tables, norms and the head stay in their dtype — the
reference keeps them fp32 — and so do layers whose shape a kernel cannot take (fp8 GEMMs need dims % 16).
`quantize_` moves each layer to the target device just before quantizing it, so the GPU never holds the whole
model in bf16 while quantizing.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter

import torch
from torch import nn

from ..errors import OptionError

# torchao is optional (the [quant] extra): every torchao import below is inside the function that needs it, after
# `import_torchao()` has given the install hint.
MODES = ("fp8-compute", "fp8-storage", "int8-weight-only", "nf4", "nvfp4")


def import_torchao():
    """Import torchao without its import-time noise (it prints about CUDA-only .so files it cannot load on CPU)."""
    quiet = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
            import torchao
            import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise OptionError(f"quantization needs torchao >= 0.15 (pip install 'torchao>=0.15'): {err}") from err
    finally:
        logging.disable(previous)
    return torchao


def _config(mode: str, layer: nn.Linear | None = None):
    import_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if mode == "fp8-compute":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if mode == "fp8-storage":
        return Float8WeightOnlyConfig()
    if mode == "int8-weight-only":
        return Int8WeightOnlyConfig()
    if mode == "nf4":
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

        config = NF4WeightOnlyConfig()
        config.scaler_block_size = _nf4_scaler_block(layer.weight.numel())
        return config
    if mode == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig

        return NVFP4DynamicActivationNVFP4WeightConfig()
    raise OptionError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}", option="quantization",
                      value=mode)


def _nf4_scaler_block(numel: int) -> int:
    """NF4 needs numel % 64 == 0 and (numel / 64) % scaler_block == 0; 256 for every 14B layer, smaller in tests."""
    blocks = numel // 64
    for size in (256, 128, 64, 32, 16, 8, 4, 2):
        if blocks % size == 0:
            return size
    return 1


def quantizable(name: str, module: nn.Module, mode: str) -> bool:
    """Which Linear layers get quantized: inside the transformer blocks, with shapes the kernels take."""
    if not isinstance(module, nn.Linear) or ".blocks." not in f".{name}":
        return False
    out_features, in_features = module.weight.shape
    if mode in ("fp8-compute", "nvfp4"):
        return in_features % 16 == 0 and out_features % 16 == 0
    if mode == "nf4":
        return module.weight.numel() % 64 == 0
    return True


def quantize_transformer(model: nn.Module, mode: str, device: torch.device | str) -> dict:
    """Quantize `model` in place (layer by layer, each moved to `device` first), then move the rest to `device`.

    Returns a report: the mode, how many layers and weights were quantized, and the resulting weight bytes."""
    if mode == "disabled":
        model.to(device)
        return {"mode": "disabled", "layers": 0}
    if mode not in MODES:
        raise OptionError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}", option="quantization",
                          value=mode)
    import_torchao()
    from torchao.quantization import quantize_

    targets = [(name, m) for name, m in model.named_modules() if quantizable(name, m, mode)]
    if not targets:
        raise OptionError(f"quantization={mode}: no layer of this model has a shape the kernel takes",
                          option="quantization", value=mode)
    quantized_params = sum(m.weight.numel() for _, m in targets)
    if mode == "nf4":  # the scaler block depends on each layer's size
        for _name, layer in targets:
            quantize_(layer, _config(mode, layer), filter_fn=lambda m, _n: isinstance(m, nn.Linear), device=device)
    else:
        wanted = {id(m) for _, m in targets}
        quantize_(model, _config(mode), filter_fn=lambda m, _n: id(m) in wanted, device=device)
    model.to(device)
    kinds = Counter(type(m.weight).__name__ for _, m in targets)
    return {
        "mode": mode,
        "layers": len(targets),
        "quantized_params": quantized_params,
        "weight_types": dict(kinds),
        "weight_bytes": weight_bytes(model),
    }


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy, counting the inner tensors of quantized weights."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names if isinstance(getattr(tensor, n), torch.Tensor))
    return tensor.numel() * tensor.element_size()


def quantize_text_encoder(model: nn.Module, mode: str) -> dict:
    """umT5 `fp8-storage` (the plan's resolved `t5_quantization=fp8`): fp8 weight storage (Float8WeightOnlyConfig,
    per-row scales) for its Linear layers — memory only.

    Embeddings and norms stay as they are; the relative-position bias is tiny."""
    if mode == "disabled":
        return {"mode": "disabled", "layers": 0}
    if mode != "fp8-storage":
        raise OptionError(f"t5_quantization={mode!r}: the plan resolves disabled or fp8-storage",
                          option="t5_quantization", value=mode)
    import_torchao()
    from torchao.quantization import quantize_

    targets = [m for m in model.modules() if isinstance(m, nn.Linear)]
    wanted = {id(m) for m in targets}
    quantize_(model, _config("fp8-storage"), filter_fn=lambda m, _n: id(m) in wanted)
    return {"mode": "fp8-storage", "layers": len(targets), "weight_bytes": weight_bytes(model)}
