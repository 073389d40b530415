"""Loading: the model files for the load options, and the models as the plan says.

`load_models(plan, options, files, geometry)` returns the components (transformer, VAE, text/image/audio encoders)
and a `LoadedPlan`: the resolved `Plan` with what loading did (LoRAs, quantization, offload placement, files, notes),
typed; `as_dict()` only where it leaves the process (sidecar, job service, UI text). `InfiniteTalkPipeline` is given
the components. The other processes of a torchrun job (follower.py) load only the transformer, with
`load_planned_transformer`, so every process loads the same weights the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError
from .model_files import ModelFiles, files_from_folder, files_from_hub
from .models.audio_encoder import load_audio_encoder
from .models.checkpoint_io import is_gguf
from .models.compilation import compile_blocks
from .models.configs import GEOMETRY_14B, GEOMETRY_TINY, Geometry
from .models.image_encoder import load_image_encoder
from .models.lora import LoraResult, apply_loras
from .models.offload import apply_offload, apply_sequential, offload_after_use
from .models.quantize import quantize_text_encoder, quantize_transformer
from .models.text_encoder import load_text_encoder
from .models.transformer_loading import load_transformer, resolve_transformer_files
from .models.vae import load_vae
from .options import LoadOptions
from .plan.memory import MemoryPlan
from .plan.planner import Plan
from .plan.probe import probe
from .presets.fast import plan_lines as fast_mode_lines
from .presets.tiny import ensure_tiny_models


@dataclass(frozen=True)
class QuantizationReport:
    """What quantization did to the transformer and to T5 (`quantize_transformer` / `quantize_text_encoder`)."""

    transformer: dict[str, Any]
    t5: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"transformer": self.transformer, "t5": self.t5}


@dataclass
class LoadedPlan:
    """The plan that ran at load time, and what loading made of it."""

    plan: Plan
    options: LoadOptions  # as requested
    files: ModelFiles
    geometry: Geometry
    loras: LoraResult
    offload: dict[str, Any]  # `apply_offload`'s report: the blocks swapped, the mechanism, streams
    quantization: QuantizationReport
    lines: list[str] = field(default_factory=list)  # `option: requested → effective (reason)`, LoRAs, fast mode
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device(self.plan.device)

    @property
    def memory(self) -> MemoryPlan | None:
        return self.plan.memory

    def as_dict(self) -> dict[str, Any]:
        """JSON data: the sidecar's `load.effective`, the job service, the UI's load text."""
        return {**self.plan.to_dict(), "lines": self.lines, "loras": self.loras.as_dict(),
                "files": self.files.as_dict(), "offload_report": self.offload, "geometry": self.geometry.name,
                "quantization_report": self.quantization.as_dict(), "notes": self.notes}


@dataclass
class LoadedModels:
    """The components `InfiniteTalkPipeline` is given, and the report of how they were loaded."""

    transformer: Any
    vae: Any
    text_encoder: Any
    image_encoder: Any
    audio_encoder: Any
    report: LoadedPlan


def resolve_model_files(options: LoadOptions, say: Callable[[str], None]) -> tuple[ModelFiles, Geometry]:
    if options.preset == "tiny":
        return ensure_tiny_models(), GEOMETRY_TINY
    explicit = [options.transformer, options.vae, options.t5, options.t5_tokenizer, options.clip, options.wav2vec]
    if all(explicit):
        return ModelFiles([options.transformer], options.adapter, options.vae, options.t5, options.t5_tokenizer,
                          options.clip, options.wav2vec), GEOMETRY_14B
    roots = [Path(options.models_dir)] if options.models_dir else files_from_hub(say)
    return files_from_folder(options, roots), GEOMETRY_14B


def load_models(plan: Plan, options: LoadOptions, files: ModelFiles, geometry: Geometry,
                say: Callable[[str], None] = lambda msg: None, parallel=None) -> LoadedModels:
    """Every model as `plan` says (rank 0 of a torchrun job passes its `parallel` group). `options`: the requested
    values, for the LoRA files and the report."""
    device = torch.device(plan.device)
    transformer, loras, quantization, offload = load_planned_transformer(plan, options, files, geometry, say,
                                                                         parallel)
    say("loading VAE")
    vae = load_vae(files.vae, geometry, device=device, dtype=plan.vae_torch_dtype, tiling=plan.vae_tiling)
    say("loading text encoder")
    text_encoder = load_text_encoder(files.t5, files.t5_tokenizer, geometry, device=torch.device(plan.t5_load_device),
                                     dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
    t5_quantization = quantize_text_encoder(text_encoder.model, plan.t5_quantization)
    encoder_device = torch.device(plan.encoder_device)
    text_encoder.model.to(encoder_device)  # (the memory plan never offloads a quantized T5)
    say("loading image encoder")
    image_encoder = load_image_encoder(files.clip, geometry, device=encoder_device,
                                       dtype=torch.float32 if device.type == "cpu" else torch.float16)
    if plan.encoders_offloaded:  # they visit the GPU only to encode
        apply_sequential(text_encoder.model, device)  # T5 streamed layer by layer (largest: its embedding)
        offload_after_use(image_encoder.model, device)
    say("loading audio encoder")
    audio_encoder = load_audio_encoder(files.wav2vec, geometry, device="cpu", dtype=torch.float32)
    notes = [n for n in (getattr(audio_encoder, "warning", None),) if n]
    if plan.memory is not None:
        notes += [*plan.memory.warnings, *plan.memory.notes]
    report = LoadedPlan(plan, options, files, geometry, loras, offload, QuantizationReport(quantization,
                                                                                           t5_quantization),
                        lines=plan.lines() + loras.lines + fast_mode_lines(options, caps=probe()), notes=notes)
    return LoadedModels(transformer, vae, text_encoder, image_encoder, audio_encoder, report)


def load_planned_transformer(plan: Plan, options: LoadOptions, files: ModelFiles, geometry: Geometry, say,
                             parallel=None):
    """The transformer as `plan` says: loaded, LoRAs applied, quantized, attention set, sequence-parallel (when
    `parallel` is given), compiled, placed. Returns (transformer, loras, quantization report, offload report)."""
    say("loading transformer")
    device = torch.device(plan.device)
    host = torch.device("cpu")
    offloading = plan.offload.swapping
    transformer = load_transformer(files.transformer, files.adapter, geometry, dtype=plan.torch_dtype,
                                   device=torch.device(plan.transformer_load_device))
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


def refuse_double_quantization(plan: Plan, files: ModelFiles) -> None:
    """GGUF weights are already quantized (and dequantized per layer); a second quantization is refused."""
    if plan.quantization == "disabled":
        return
    gguf_files = [p for p in resolve_transformer_files(files.transformer, files.adapter) if is_gguf(p)]
    if gguf_files:
        raise OptionError(f"quantization={plan.options['quantization'].requested}: {gguf_files[0]} is already "
                          "GGUF-quantized (dequantized per layer as it runs); use --quantization disabled with GGUF "
                          "files, or a .safetensors model to quantize")
