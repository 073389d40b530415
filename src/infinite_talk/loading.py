"""Loading: the model files for the load options, and the transformer as the plan says.

Shared by the pipeline (rank 0, all models) and the other processes of a torchrun job (follower.py, transformer
only), so both load the same weights the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .errors import OptionError
from .model_files import ModelFiles, files_from_folder, files_from_hub
from .models.checkpoint_io import is_gguf
from .models.compilation import compile_blocks
from .models.configs import GEOMETRY_14B, GEOMETRY_TINY, Geometry
from .models.lora import apply_loras
from .models.offload import apply_offload
from .models.quantize import quantize_transformer
from .models.transformer_loading import load_transformer, resolve_transformer_files
from .options import LoadOptions
from .presets.tiny import ensure_tiny_models


def resolve_model_files(options: LoadOptions, say: Callable[[str], None]) -> tuple[ModelFiles, Geometry]:
    if options.preset == "tiny":
        return ensure_tiny_models(), GEOMETRY_TINY
    explicit = [options.transformer, options.vae, options.t5, options.t5_tokenizer, options.clip, options.wav2vec]
    if all(explicit):
        return ModelFiles([options.transformer], options.adapter, options.vae, options.t5, options.t5_tokenizer,
                          options.clip, options.wav2vec), GEOMETRY_14B
    roots = [Path(options.models_dir)] if options.models_dir else files_from_hub(say)
    return files_from_folder(options, roots), GEOMETRY_14B


def load_planned_transformer(plan, options: LoadOptions, files: ModelFiles, geometry: Geometry, say, parallel=None):
    """The transformer as `plan` says: loaded, LoRAs applied, quantized, attention set, sequence-parallel (when
    `parallel` is given), compiled, placed. Returns (transformer, loras, quantization report, offload report)."""
    say("loading transformer")
    device = torch.device(plan.device)
    # Quantized runs load on the CPU and quantize layer by layer on the way to the device: the device never holds
    # the full-precision model.
    # With offload the transformer stays in host memory until `apply_offload` places its parts.
    host = torch.device("cpu")
    offloading = plan.offload != "none"
    load_device = device if plan.quantization == "disabled" and not offloading else host
    transformer = load_transformer(files.transformer, files.adapter, geometry, dtype=plan.torch_dtype,
                                   device=load_device)
    # LoRAs: merged into the full-precision weights, or hooked onto the layers (unmerged), before quantization.
    loras = apply_loras(transformer, options.lora, options.lora_mode, device, say)
    if plan.quantization != "disabled":
        say(f"quantizing transformer ({plan.quantization})")
    quantization = quantize_transformer(transformer, plan.quantization, host if offloading else device)
    if loras.handle is not None:
        loras.handle.verify(transformer)
    transformer.set_attention_backend(plan.attention_backend)
    if parallel is not None:
        parallel.attach(transformer)
    if plan.compile:  # the 40 blocks share one compiled graph per input shape; the compile cache outlives the process
        compile_blocks(transformer)
    if offloading:
        say(f"placing transformer weights ({plan.offload})")
    offload = apply_offload(transformer, plan.offload, device)
    return transformer, loras, quantization, offload


def refuse_double_quantization(plan, files: ModelFiles) -> None:
    """GGUF weights are already quantized (and dequantized per layer); a second quantization is refused."""
    if plan.quantization == "disabled":
        return
    gguf_files = [p for p in resolve_transformer_files(files.transformer, files.adapter) if is_gguf(p)]
    if gguf_files:
        raise OptionError(f"quantization={plan.options['quantization'].requested}: {gguf_files[0]} is already "
                          "GGUF-quantized (dequantized per layer as it runs); use --quantization disabled with GGUF "
                          "files, or a .safetensors model to quantize")
