"""Fast mode (`--mode fast`): a step-distilled LoRA, 4 steps, 1 pass per step, fp8 where it runs fp8 matmuls.

A preset is a set of starting values, never applied silently (docs/OPTIONS.md §3):

* `apply_mode(load_values, generate_values)` fills the values the user did *not* give (the dicts hold only explicit
  values: CLI flags, API/JSON fields, UI fields the user touched). Front ends call it before building
  `LoadOptions` / `GenerateOptions`; the UI can call it to show the preset as editable fields.
* `plan_lines(load, request)` says what fast mode set and where the user's own values differ ("yours"); the pipeline
  puts these lines in the load plan and the request plan (and so in the sidecar).

The values (docs/OPTIONS.md §3, "native list"): the lightx2v I2V cfg-step-distill LoRA's own schedule
`distill4` ([1000, 750, 500, 250] warped with shift 5, then 0), text and audio scale 1 (one `cond` pass per step: the
LoRA is CFG-distilled), and fp8 weights with fp8 matmuls (`quantization=fp8` resolving to fp8-compute). Where fp8
would only store weights (CPU, GPUs below sm_89) it saves memory but costs time, so fast mode leaves quantization
disabled there and says why. If the user asks for another step count, the fixed 4-step list cannot give it: the
reference Euler schedule with the same shift runs those steps instead.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import OptionError
from ..options import GenerateOptions, LoadOptions, parse_lora_entries

FAST_SAMPLING = {"scheduler": "distill4", "steps": 4, "shift": 5.0, "text_scale": 1.0, "audio_scale": 1.0}
DISTILL_STEPS = 4


def fast_quantization(load_values: dict, caps=None) -> tuple[str, str]:
    """('fp8', why) where fp8 runs fp8 matmuls for these load values on this machine, else ('disabled', why)."""
    from ..plan.planner import resolve
    from ..plan.probe import probe

    caps = caps if caps is not None else probe()
    trial = LoadOptions(device=load_values.get("device", "auto"),
                        model_precision=load_values.get("model_precision", "bf16"), quantization="fp8")
    try:
        resolved = resolve(trial, caps).options["quantization"]
    except OptionError as err:
        return "disabled", f"fp8 cannot run here: {err}"
    if resolved.effective == "fp8-compute":
        return "fp8", resolved.reason
    return "disabled", f"fast mode uses fp8 only for fp8 matmuls; here fp8 would be {resolved.effective}: " \
                       f"{resolved.reason}"


def _sampling_preset(steps: int) -> dict:
    """The preset sampling values for a request running `steps` steps."""
    values = dict(FAST_SAMPLING)
    if steps != DISTILL_STEPS:
        values["scheduler"] = "euler"  # the distill list is fixed at 4 steps; Euler runs the steps asked for
    return values


def apply_mode(load_values: dict, generate_values: dict, caps=None) -> tuple[dict, dict]:
    """Fill the fast-mode values the user did not set (returns new dicts; unchanged unless mode is 'fast')."""
    load, generate = dict(load_values), dict(generate_values)
    if load.get("mode", "standard") != "fast":
        return load, generate
    if "quantization" not in load:
        load["quantization"] = fast_quantization(load, caps)[0]
    preset = _sampling_preset(generate.get("steps", DISTILL_STEPS))
    for key, value in preset.items():
        generate.setdefault(key, value)
    return load, generate


def _same(a, b) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b))
    return a == b


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_lines(load: LoadOptions | None, request: GenerateOptions | None = None, caps=None,
               sampling_only: bool = False) -> list[str]:
    """'fast mode: …' lines: every value the preset sets, and the user's own values where they differ."""
    if load is None or load.mode != "fast":
        return []
    lines = []
    if not sampling_only:
        loras = ", ".join(f"{e.path} (strength {e.strength:g})" for e in parse_lora_entries(load.lora))
        lines.append(f"fast mode: lora {loras}, {load.lora_mode} — must be a step/CFG-distilled LoRA (lightx2v, "
                     "FusioniX); a plain style LoRA gives a broken video at 4 steps")
        preset_q, why = fast_quantization(dataclasses.asdict(load), caps)
        if load.quantization == preset_q:
            lines.append(f"fast mode: quantization {preset_q} ({why})")
        else:
            lines.append(f"fast mode: quantization {load.quantization} (yours; fast mode would use {preset_q}: {why})")
    if request is not None:
        preset = _sampling_preset(request.steps)
        actual = {"scheduler": request.scheduler, "steps": request.steps, "shift": request.effective_shift,
                  "text_scale": request.text_scale, "audio_scale": request.audio_scale}
        parts = []
        for key, value in actual.items():
            text = f"{key} {_fmt(value)}"
            if not _same(value, preset[key]):
                text += f" (yours; fast mode: {_fmt(preset[key])})"
            elif key == "scheduler" and value != FAST_SAMPLING["scheduler"]:
                text += f" (the distill4 list has {DISTILL_STEPS} steps; {request.steps} asked for)"
            parts.append(text)
        from ..sampling.guidance import passes_for

        passes = len(passes_for(request.text_scale, request.audio_scale))
        lines.append(f"fast mode: {', '.join(parts)} → {passes} pass{'es' if passes > 1 else ''} per step")
    return lines
