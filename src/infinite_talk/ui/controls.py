"""Controls built from the options schema, the availability of every load choice, and the texts the page shows.

Each control comes from a field of `LoadOptions`/`GenerateOptions` (label, help, choices, range, default), so the
page offers exactly what the CLI and the API offer. A load choice this machine cannot run stays in its list, labelled
with the planner's reason, and is refused if picked: never swapped for another value. Nothing here imports gradio;
`app.py` turns the specs into components.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InfiniteTalkError, InputError, OptionError
from ..loading import LoadedPlan
from ..options import GenerateOptions, LoadOptions, field_kind, read

# Model files, one source dropdown each (LoadOptions fields), and the `model_files.discover` kind behind each.
COMPONENT_KINDS = {"transformer": "dit", "adapter": "adapter", "vae": "vae", "t5": "t5",
                   "t5_tokenizer": "t5_tokenizer", "clip": "clip", "wav2vec": "wav2vec"}
# LoadOptions fields with their own controls: the model source (preset / models folder / hub) and the device.
LOAD_SPECIAL = {"preset", "models_dir", "device"}
AUTO = "auto"

SOURCE_TINY, SOURCE_FOLDER, SOURCE_HUB = "tiny", "folder", "hub"
SOURCE_LABELS = {
    SOURCE_TINY: "tiny preset (random weights: the video is noise)",
    SOURCE_FOLDER: "models folder (--models-dir)",
    SOURCE_HUB: "Hugging Face hub (released repositories)",
}

TASK_IMAGE, TASK_VIDEO = "image-to-video", "video dubbing"

LABELS = {
    "model_precision": "Model precision", "vae_precision": "VAE precision", "quantization": "Quantization",
    "attention": "Attention", "device": "Device",
    "transformer": "Transformer (Wan2.1-I2V-14B)", "adapter": "InfiniteTalk adapter (single / multi)",
    "vae": "VAE", "t5": "T5 text encoder (umT5-XXL)", "t5_tokenizer": "T5 tokenizer", "clip": "CLIP image encoder",
    "wav2vec": "wav2vec2 audio encoder",
    "image": "Reference image", "video": "Reference video", "audio": "Speaker 1 audio",
    "audio2": "Speaker 2 audio (optional)", "audio_mode": "Two speakers", "bbox": "Speaker boxes (optional)",
    "prompt": "Prompt", "negative_prompt": "Negative prompt", "size": "Resolution", "steps": "Steps",
    "scheduler": "Scheduler", "shift": "Shift", "text_scale": "Text guidance scale",
    "audio_scale": "Audio guidance scale", "use_apg": "Adaptive projected guidance (APG)", "seed": "Seed",
    "color_correction": "Colour correction", "max_seconds": "Maximum duration (s)",
    "frame_num": "Frames per chunk", "motion_frames": "Context frames",
    # fields other parts of the project own; without an entry the field name is shown
    "lora": "LoRA files (one per line)", "lora_mode": "LoRA mode", "vae_tiling": "VAE tiling",
    "t5_quantization": "T5 quantization", "step_cache": "Step cache", "compile": "torch.compile",
}
# Extra words for optional fields whose empty value means "the default".
EMPTY_MEANS = {
    "seed": "empty: random; the seed used is shown after the run",
    "shift": "empty: the default",
    "color_correction": "empty: the default",
    "max_seconds": "empty: the whole audio",
    "bbox": "empty: left and right halves",
}
# The page's own help where the schema's names the API/JSON form.
INFO = {
    "bbox": "one box per speaker in source pixels: row_min col_min row_max col_max, speakers separated by ';' "
            "(e.g. 0 0 480 420; 0 420 480 840); checked against the reference before a run",
}
# Shorter speech makes a video of a few frames (0.1 s gives 2): refused at upload and at Generate.
MIN_SPEECH_S = 0.5
FLOAT_STEP = 0.1
SLIDER_MAX_SPAN = 100  # wider integer/float ranges get a number box (a slider over 1..1000 is unusable)


@dataclass(frozen=True)
class ControlSpec:
    """How one schema field is shown (`kind`: see `field_spec`)."""

    name: str
    kind: str
    label: str
    info: str
    default: Any
    choices: tuple = ()  # (label, value) pairs
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    integer: bool = False
    optional: bool = False


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def field_default(cls, name: str) -> Any:
    f = _fields(cls)[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_spec(cls, name: str) -> ControlSpec:
    """The control for schema field `name` of `cls`, from its type and metadata alone.

    Kinds: dropdown/radio (choices), checkbox (bool), slider (a required number with a range of at most
    SLIDER_MAX_SPAN), number (other required numbers), optional_number (a text box: empty means the default, which a
    number box cannot express), lines (a list: one entry per line), textbox."""
    f = _fields(cls)[name]
    meta = f.metadata
    type_kind, optional = field_kind(cls, name)
    default = field_default(cls, name)
    label = LABELS.get(name, name.replace("_", " ").capitalize())
    info = INFO.get(name, meta.get("help", ""))
    if optional and name in EMPTY_MEANS:
        info = f"{info} ({EMPTY_MEANS[name]})"
    elif optional and default is None:
        info = f"{info} (empty: the default)"
    choices = meta.get("choices")
    if choices:
        values = tuple(c for c in choices if c is not None)
        kind = "radio" if len(values) <= 3 else "dropdown"
        return ControlSpec(name, kind, label, info, default, tuple((str(v), v) for v in values), optional=optional)
    if type_kind == "bool":
        return ControlSpec(name, "checkbox", label, info, default)
    if type_kind in ("lines", "boxes"):
        return ControlSpec(name, "lines", label, info, default, optional=optional)
    if type_kind in ("int", "float"):
        integer = type_kind == "int"
        lo, hi = meta.get("minimum"), meta.get("maximum")
        step = 1 if integer else FLOAT_STEP
        if optional:
            kind = "optional_number"
        elif lo is not None and hi is not None and hi - lo <= SLIDER_MAX_SPAN:
            kind = "slider"
        else:
            kind = "number"
        if kind == "number" and (lo is not None or hi is not None):
            info = f"{info} ({_range_text(lo, hi)})"
        return ControlSpec(name, kind, label, info, default, minimum=lo, maximum=hi, step=step, integer=integer,
                           optional=optional)
    return ControlSpec(name, "textbox", label, info, default, optional=optional)


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"{lo:g} to {hi:g}"
    return f"at least {lo:g}" if lo is not None else f"at most {hi:g}"


def load_choice_fields() -> tuple[str, ...]:
    """LoadOptions fields offered as choice lists, every value checked against this machine."""
    return tuple(f.name for f in dataclasses.fields(LoadOptions)
                 if f.metadata.get("choices") and f.name not in LOAD_SPECIAL)


def component_fields() -> tuple[str, ...]:
    names = _fields(LoadOptions)
    return tuple(n for n in COMPONENT_KINDS if n in names)


def other_load_fields() -> tuple[str, ...]:
    """The remaining LoadOptions fields (shown as plain controls)."""
    placed = LOAD_SPECIAL | set(component_fields()) | set(load_choice_fields())
    return tuple(f.name for f in dataclasses.fields(LoadOptions) if f.name not in placed)


def widget_choices(spec: ControlSpec) -> list[tuple[str, str]]:
    """A choice control's (label, value) pairs with text values: Gradio documents a choice as a string (e.g. the
    resolution as '480' | '720'), so the control holds exactly the string it documents (read back by `options.read`)."""
    return [(label, str(value)) for label, value in spec.choices]


def widget_default(spec: ControlSpec) -> Any:
    """The value a widget starts with: the schema default in the widget's own form."""
    if spec.kind == "optional_number":
        return "" if spec.default is None else str(spec.default)
    if spec.kind == "lines":
        return "\n".join(spec.default or [])
    if spec.kind == "textbox":
        return spec.default or ""
    if spec.kind in ("dropdown", "radio") and spec.default is not None:
        return str(spec.default)
    return spec.default


# ---- load options: availability on this machine -------------------------------------------------------------------
def preflight(options: LoadOptions, caps):
    """The plan `load_models` resolves first, or the OptionError it raises before reading any weights."""
    from ..plan.planner import resolve

    return resolve(options, caps)


@dataclass(frozen=True)
class ChoiceStatus:
    value: str
    available: bool
    effective: str | None  # what runs, when available
    reason: str  # the planner's reason, or why it is refused

    @property
    def label(self) -> str:
        if not self.available:
            return f"{self.value} — unavailable: {page_text(self.reason)}"
        if self.effective and self.effective != self.value:
            return f"{self.value} → {self.effective}"
        return self.value


def _base_for(options: LoadOptions, name: str, caps) -> LoadOptions:
    """`options` with every *other* refused choice set back to its default, so that one refusal does not make
    every value of every other option look refused."""
    base = options
    for _ in range(len(load_choice_fields()) + 2):
        try:
            preflight(base, caps)
            return base
        except OptionError as err:
            other = err.option
            if other is None or other == name or other not in _fields(LoadOptions):
                return base
            default = field_default(LoadOptions, other)
            if getattr(base, other) == default:
                return base
            base = dataclasses.replace(base, **{other: default})
    return base


def _reason(err: OptionError, name: str, value: str) -> str:
    text = str(err)
    prefix = f"{name}={value}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def switch_fields() -> tuple[str, ...]:
    """LoadOptions on/off fields (e.g. compile): listed with the choices in the availability table."""
    return tuple(f.name for f in dataclasses.fields(LoadOptions) if field_spec(LoadOptions, f.name).kind == "checkbox")


def _shown(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def choice_status(options: LoadOptions, caps) -> dict[str, list[ChoiceStatus]]:
    """For each choice (and on/off) field, every value with what it resolves to here (others as in `options`) or
    why not."""
    out: dict[str, list[ChoiceStatus]] = {}
    for name in load_choice_fields() + switch_fields():
        base = _base_for(options, name, caps)
        values = (False, True) if name in switch_fields() else [v for _, v in field_spec(LoadOptions, name).choices]
        rows = []
        for value in values:
            try:
                plan = preflight(dataclasses.replace(base, **{name: value}), caps)
                r = plan.options.get(name)  # options the planner does not resolve run as given
                rows.append(ChoiceStatus(value, True, r.effective if r else _shown(value),
                                         r.reason if r else "applied as given"))
            except OptionError as err:
                rows.append(ChoiceStatus(value, False, None, _reason(err, name, _shown(value))))
        out[name] = rows
    return out


def choice_pairs(statuses: list[ChoiceStatus]) -> list[tuple[str, str]]:
    return [(s.label, s.value) for s in statuses]


def device_choices(caps) -> list[tuple[str, str]]:
    pairs = [(f"auto ({'cuda:0' if caps.gpu else 'cpu'} here)", "auto"), ("cpu", "cpu")]
    pairs += [(f"cuda:{g.index} ({g.name}, {g.sm})", f"cuda:{g.index}") for g in caps.gpus]
    return pairs


def refusals(options: LoadOptions, caps) -> list[OptionError]:
    """Every refused option of `options`, not only the first the planner meets: each refused one is set back to its
    default and the rest checked again."""
    found: list[OptionError] = []
    base = options
    for _ in range(len(_fields(LoadOptions))):
        try:
            preflight(base, caps)
            return found
        except OptionError as err:
            found.append(err)
            name = err.option
            if name is None or name not in _fields(LoadOptions):
                return found
            default = field_default(LoadOptions, name)
            if getattr(base, name) == default:
                return found
            base = dataclasses.replace(base, **{name: default})
    return found


def load_check_text(options: LoadOptions | None, caps, error: InfiniteTalkError | None = None) -> str:
    """The live check under the model panel: what Load would run, or every refusal, one line each."""
    errors = [error] if error is not None else []
    if options is not None:
        errors += refusals(options, caps)
        if not errors:
            plan = preflight(options, caps)
            lines = "\n".join(f"- {line}" for line in plan.lines())
            return f"**Load plan** (requested → effective, reason):\n\n{lines}"
    lines = "\n".join(f"- {page_text(str(e))}" for e in errors)
    return (f"**Refused:**\n\n{lines}\n\nWhat is refused cannot run here and is never swapped for another value; "
            "change it to load.")


def availability_table(statuses: dict[str, list[ChoiceStatus]]) -> str:
    """Markdown table of every load choice on this machine (like `infinite-talk doctor`)."""
    rows = ["| option | value | here |", "|---|---|---|"]
    for name, entries in statuses.items():
        for s in entries:
            here = f"✓ {s.effective}: {s.reason}" if s.available else f"✗ unavailable: {page_text(s.reason)}"
            rows.append(f"| {name} | {_shown(s.value)} | {_cell(here)} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def mode_preset(load_values: dict[str, Any], caps) -> tuple[dict[str, Any], dict[str, Any]]:
    """The values a `mode` preset would fill (load, generate), so the page can show them as editable fields: in the
    page every field always has a value, so a preset applied behind the user's back could never take effect."""
    if load_values.get("mode", "standard") == "standard":
        return {}, {}
    try:
        from ..presets.fast import apply_mode
    except ImportError:
        return {}, {}
    given = {k: v for k, v in load_values.items() if k != "quantization"}  # the preset picks it
    load, generate = apply_mode(given, {}, caps)
    return {k: v for k, v in load.items() if k not in given}, generate


def mode_lines(load: LoadOptions | None, request: GenerateOptions) -> list[str]:
    """What the loaded models' mode preset set for this request and where the request differs."""
    if load is None or getattr(load, "mode", "standard") == "standard":
        return []
    try:
        from ..presets.fast import plan_lines
    except ImportError:
        return []
    return plan_lines(load, request, sampling_only=True)


# ---- model sources ------------------------------------------------------------------------------------------------
def component_choices(found: dict[str, list[Path]], models_dir: str | None) -> dict[str, list[tuple[str, str]]]:
    """Per component field: 'auto' then every file (or shard folder) found by content in the models folder."""
    root = Path(models_dir) if models_dir else None

    def shown(p: Path) -> str:
        try:
            return str(p.relative_to(root)) if root else str(p)
        except ValueError:
            return str(p)

    out = {}
    for name in component_fields():
        paths = list(found.get(COMPONENT_KINDS[name], []))
        if name == "transformer":
            paths = _dit_entries(paths)
        out[name] = [(AUTO, AUTO)] + [(shown(p), str(p)) for p in paths]
    return out


def _dit_entries(shards: list[Path]) -> list[Path]:
    """A folder whose weight files are all DiT shards is offered as one entry; other shards one by one."""
    from ..model_files import WEIGHT_SUFFIXES

    by_parent: dict[Path, list[Path]] = {}
    for p in shards:
        by_parent.setdefault(p.parent, []).append(p)
    entries: list[Path] = []
    for parent, files in by_parent.items():
        weights = [p for p in parent.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
        if len(files) > 1 and len(weights) == len(files):
            entries.append(parent)
        else:
            entries += files
    return entries


def load_options_from_form(source: str, values: dict[str, Any], models_dir: str | None) -> LoadOptions:
    """LoadOptions from the model panel (widget values by field name, read by `options.read`); a pick that would be
    ignored is refused."""
    if source not in SOURCE_LABELS:
        raise OptionError(f"model source: unknown value {source!r}; choose one of: {', '.join(SOURCE_LABELS)}")
    data: dict[str, Any] = {}
    picked = {}
    for name, value in values.items():
        if name in COMPONENT_KINDS:
            if value and value != AUTO:
                picked[name] = value
            continue
        data[name] = value
    if source == SOURCE_TINY:
        if picked:
            name, path = next(iter(picked.items()))
            raise OptionError(f"{name}: {path} was picked, but the tiny preset builds its own files and would ignore "
                              "it; set it back to auto or choose the models folder or hub as the source",
                              option=name, value=path)
        data["preset"] = "tiny"
    elif source == SOURCE_FOLDER:
        if not models_dir:
            raise OptionError("model source: no models folder; start the UI with --models-dir DIR")
        data["models_dir"] = models_dir
    data.update(picked)
    return read(LoadOptions, data)


# ---- generation request --------------------------------------------------------------------------------------------
def request_from_form(task: str, values: dict[str, Any], out: str | None = None) -> GenerateOptions:
    """GenerateOptions from the generation panel's widget values, read by `options.read` (an emptied box keeps
    the default; a wrong type or an out-of-range value is an OptionError naming the field)."""
    if task not in (TASK_IMAGE, TASK_VIDEO):
        raise OptionError(f"task: unknown value {task!r}; choose {TASK_IMAGE} or {TASK_VIDEO}")
    data = dict(values)
    # The task decides which reference is used; the other upload is not silently combined with it.
    data.pop("video" if task == TASK_IMAGE else "image", None)
    if out is not None:
        data["out"] = out
    return read(GenerateOptions, data)


def check_inputs(request: GenerateOptions, task: str) -> None:
    """The inputs a run needs, named as on the page (the pipeline then checks their content)."""
    if task == TASK_IMAGE and not request.image:
        raise InputError("no reference image: upload one under 'Reference image' (or switch the task to video "
                         "dubbing)")
    if task == TASK_VIDEO and not request.video:
        raise InputError("no reference video: upload one under 'Reference video' (or switch the task to "
                         "image-to-video)")
    if not request.audio:
        raise InputError("no speech: upload speaker 1's audio under 'Speaker 1 audio'")


# ---- texts -------------------------------------------------------------------------------------------------------
def plan_box_text(plan: dict, estimate: dict | None = None, notes: list[str] | None = None) -> str:
    """The 'effective plan for this request' box: steps that run, passes, chunks, calls, time and memory."""
    sched = plan["scheduler"]
    passes = plan["passes"]
    lines = [
        f"- **steps that run: {plan['steps']}** ({sched.get('name', '?')}: {sched.get('solver', '')}, "
        f"shift {plan['shift']:g})",
        f"- passes per step: {plan['passes_per_step']} ({', '.join(passes)}; text scale {plan['text_scale']:g}, "
        f"audio scale {plan['audio_scale']:g})",
    ]
    chunks = plan.get("chunks")
    if chunks:
        lines.append(f"- chunks: {chunks['chunks']} → {chunks['frames']} frames, {chunks['duration_s']:.2f} s of video")
        lines.append(f"- model calls: {plan['model_calls']} ({chunks['chunks']} chunks × {plan['steps']} steps × "
                     f"{plan['passes_per_step']} passes)")
    else:
        calls = plan["steps"] * plan["passes_per_step"]
        lines.append(f"- chunks: known once speaker 1's audio is uploaded; model calls per chunk: {calls}")
    lines.append(f"- colour correction: {plan['color_correction']:g}")
    estimate = estimate or {}
    if estimate.get("time"):
        lines.append(f"- estimated time: {estimate['time']}")
    if estimate.get("memory"):
        lines.append(f"- memory: {estimate['memory']}")
    lines += [f"- {note}" for note in notes or []]
    return "\n".join(lines)


def time_estimate(plan: dict, calibration: dict | None) -> str:
    """Seconds for this request from the last run at the same size on this server; none before a run."""
    if not calibration or calibration.get("size") != plan.get("size"):
        return "measured by the first run at this resolution on this server"
    if "model_calls" not in plan:
        return f"{calibration['s_per_call']:.2f} s per model call (last run); total once the audio is known"
    chunks = plan["chunks"]["chunks"]
    seconds = plan["model_calls"] * calibration["s_per_call"] + chunks * calibration["s_per_chunk"]
    return (f"≈ {_duration(seconds)} ({calibration['s_per_call']:.2f} s per model call and "
            f"{calibration['s_per_chunk']:.1f} s per chunk for encoding/decoding, from the last run)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress_text(info: dict) -> str:
    return (f"chunk {info['chunk']}/{info['chunks']} · step {info['step']}/{info['steps']} · "
            f"{info['passes']} passes per step · elapsed {_duration(info['elapsed_s'])} · "
            f"ETA {_duration(info['eta_s'])}")


def load_plan_text(loaded: LoadedPlan) -> str:
    """What was loaded: `requested → effective (reason)` per option, then the files."""
    lines = list(loaded.lines)
    files = loaded.files.as_dict()
    if files:
        lines.append("")
        lines.append(f"geometry: {loaded.geometry.name}")
        for name, value in files.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"{name}: {shown}")
    lines += [f"note: {n}" for n in loaded.notes]
    return "\n".join(lines)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def memory_advice(request: GenerateOptions | None, load: LoadOptions | None,
                  statuses: dict[str, list[ChoiceStatus]] | None) -> list[str]:
    """Settings that need less memory than the current ones, only those that can run here."""
    advice = []
    if request is not None and request.size == 720:
        advice.append("resolution 480 (about half the tokens of 720)")
    if load is not None:
        available = {name: [s for s in rows if s.available] for name, rows in (statuses or {}).items()}
        if load.quantization == "disabled":
            quant = [s.value for s in available.get("quantization", []) if s.value != "disabled"]
            if quant:
                advice.append(f"quantization {' or '.join(quant)} (transformer weights in less memory; reload models)")
        for name in ("model_precision", "vae_precision"):
            if getattr(load, name) == "fp32":
                halves = [s.value for s in available.get(name, []) if s.value in ("bf16", "fp16")]
                if halves:
                    advice.append(f"{LABELS[name].lower()} {' or '.join(halves)} (half of fp32; reload models)")
    if request is not None and request.frame_num > 33:
        advice.append("fewer frames per chunk (activations grow with the chunk length)")
    return advice


def failure_text(err: BaseException, request: GenerateOptions | None = None, load: LoadOptions | None = None,
                 statuses: dict[str, list[ChoiceStatus]] | None = None) -> str:
    """One readable message for any failure; never a traceback, an exception class or an upload's temporary path."""
    if isinstance(err, OptionError):
        return page_text(field_named(err))
    if isinstance(err, InfiniteTalkError):
        return page_text(str(err))
    first = page_text((str(err).strip().splitlines() or [""])[0][:300])
    if is_out_of_memory(err):
        advice = memory_advice(request, load, statuses)
        tip = ("settings that need less memory: " + "; ".join(advice)) if advice else \
            "free memory (close other programs using the GPU) or use a shorter maximum duration"
        return f"Out of memory ({first}). Finished chunks are kept; {tip}."
    return f"Internal error: {first}. The server keeps running; the details are in the server log — please report it."


# ---- the page's words ------------------------------------------------------------------------------------------------
# CLI flags in shared messages (presets, planner) → the page's fields.
FLAG_LABELS = {"--lora FILE": "a file under 'LoRA files'", "--lora": "'LoRA files'", "--steps": "Steps",
               "--text-scale": "Text guidance scale", "--audio-scale": "Audio guidance scale",
               "--models-dir": "the models folder (--models-dir at start)"}


def upload_root() -> str:
    """Where Gradio keeps uploads (GRADIO_TEMP_DIR, else <temp>/gradio)."""
    return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")


def page_text(text: str) -> str:
    """A shared message as the page says it: an upload's temporary path becomes the file's own name (Gradio keeps it
    as <upload root>/<hash>/<name>), a CLI flag the page's field."""
    root = re.escape(os.path.abspath(upload_root()).rstrip(os.sep))
    text = re.sub(root + r"/[^/\s]+/(?:[^/\s]+/)*", "", text)
    for flag, label in FLAG_LABELS.items():
        text = re.sub(re.escape(flag) + r"(?![\w-])", label, text)
    return re.sub(r"\b[A-Z]\w*(?:Error|Exception): ", "", text)  # a library's exception class means nothing here


def field_named(err: OptionError) -> str:
    """An option error led by the field's label on the page ('Steps: 5000 is outside [1, 1000]')."""
    name = getattr(err, "option", None) or _blame_field(str(err))
    text = str(err)
    if name and name in LABELS and text.startswith(f"{name}:"):
        return f"{LABELS[name]}{text[len(name):]}"
    return text


def _blame_field(text: str) -> str | None:
    m = re.match(r"(\w+)[:=]", text)
    return m.group(1) if m else None


def progress_html(info: dict | None, final: str | None = None) -> str:
    """A progress bar over every step of every chunk; `final` replaces the time line once the run has ended (no
    stale ETA)."""
    if info is None:
        return ""
    total = max(1, info["chunks"] * info["steps"])
    done = min(total, (info["chunk"] - 1) * info["steps"] + info["step"])
    line = progress_text(info) if final is None else (
        f"{final}: chunk {info['chunk']}/{info['chunks']} · step {info['step']}/{info['steps']} · "
        f"elapsed {_duration(info['elapsed_s'])}")
    return (f'<progress id="run-bar" value="{done}" max="{total}" style="width:100%"></progress>'
            f'<div id="run-bar-text">{html.escape(line)}</div>')


def speech_check_text(info, label: str) -> str:
    """What the upload check found in a speech file, or the refusal of one too short."""
    seconds = info.seconds
    if seconds < MIN_SPEECH_S:
        raise InputError(f"{label}: {info.path.name} is {seconds:.2f} s long; speech must be at least "
                         f"{MIN_SPEECH_S:g} s (shorter makes a video of a few frames)")
    channels = {1: "mono", 2: "stereo"}.get(info.channels, f"{info.channels} channels")
    return f"✓ {info.path.name}: {seconds:.2f} s, {channels}, {info.rate} Hz"
