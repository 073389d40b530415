"""The Gradio page and the `infinite-talk ui` command.

Model panel → LoadOptions, generation panel → GenerateOptions (controls built from the schema, `controls.py`); both
run through `Studio` (`session.py`): the job service's store and worker, one pipeline. A page watches the server's
jobs on a timer inside the tab (`jobs.py`, `live.py`), so a reload shows the running job and closing a page cancels
nothing. Every failure becomes a message in the page; the traceback goes to the server log only.
(No `from __future__ import annotations`: gradio reads the `gr.Request` annotations of the handlers.)
"""

import argparse
import dataclasses
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import InfiniteTalkError, OptionError
from ..flags import add_schema, build_options
from ..library_messages import filter_library_noise
from ..media.frames import check_boxes
from ..media.request_check import check_audio, check_reference, check_request
from ..model_files import check_model_source
from ..options import GenerateOptions, LoadOptions
from ..request_plan import plan_request
from ..service.network import is_loopback
from ..service.store import FINAL_STATES
from . import controls as C
from . import jobs as J
from .live import live_player
from .session import Studio, audio_frames

MEDIA_FIELDS = ("image", "video", "audio", "audio2")
NOT_SHOWN = {"out"}  # the server picks the output path
# Where the generation fields go; schema fields not listed here appear under "More options", so every field of
# GenerateOptions has a control even when the schema grows.
GENERATE_LAYOUT = {
    "speakers": ("audio_mode", "bbox"),
    "prompts": ("prompt", "negative_prompt"),
    "sampling": ("size", "steps", "scheduler", "shift"),
    "guidance": ("text_scale", "audio_scale", "use_apg"),
    "output": ("seed", "color_correction", "max_seconds"),
    "chunking": ("frame_num", "motion_frames"),
}
log = logging.getLogger("infinite_talk.ui")
MAX_JOBS = 16  # API calls that may wait for their job at once (beyond that, Gradio's own queue holds them)
POLL_S = 0.25  # how often a waiting handler looks at the server's state
AUTH_ENV = "INFINITE_TALK_UI_AUTH"
MIN_PASSWORD_CHARS = 8
CHOICE_MIN_WIDTH = 240  # px: a choice box shows its whole value ("auto → sdpa-native")
# The bundled examples of a source checkout; an installed wheel has none and shows no examples.
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "tests" / "data" / "examples"
PLAN_QUEUE = {"concurrency_limit": 1, "concurrency_id": "request-plan"}  # plan-box updates: in order


def generate_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(GenerateOptions) if f.name not in NOT_SHOWN)


def _placed(group: str) -> tuple[str, ...]:
    names = set(generate_fields())
    return tuple(n for n in GENERATE_LAYOUT[group] if n in names)


def unplaced_generate_fields() -> tuple[str, ...]:
    placed = set(MEDIA_FIELDS).union(*GENERATE_LAYOUT.values())
    return tuple(n for n in generate_fields() if n not in placed)


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as err:
        raise InfiniteTalkError("the web UI needs gradio: pip install 'infinite_talk[ui]'") from err
    return gr


def _component(gr, spec: C.ControlSpec, **extra):
    """A gradio component for a schema field, straight from its spec."""
    common = dict(label=spec.label, info=spec.info or None, elem_id=spec.name.replace("_", "-"), **extra)
    value = C.widget_default(spec)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=C.widget_choices(spec), value=value, **common)
    if spec.kind == "radio":
        return gr.Radio(choices=C.widget_choices(spec), value=value, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, value=value, step=spec.step, **common)
    if spec.kind == "number":  # no minimum/maximum here: Gradio's refusal names no field; ours does (controls.py)
        return gr.Number(value=value, step=spec.step, precision=0 if spec.integer else None, **common)
    if spec.kind == "optional_number":
        return gr.Textbox(value=value, placeholder=C.EMPTY_MEANS.get(spec.name, "empty: the default"), **common)
    lines = {"negative_prompt": 3, "prompt": 2, "bbox": 1}.get(spec.name, 2 if spec.kind == "lines" else 1)
    return gr.Textbox(value=value, lines=lines, **common)


def _default_source(studio: Studio) -> str:
    if studio.preset == "tiny":
        return C.SOURCE_TINY
    return C.SOURCE_FOLDER if studio.models_dir else C.SOURCE_HUB


def _source_pairs(studio: Studio) -> list[tuple[str, str]]:
    pairs = []
    for value, label in C.SOURCE_LABELS.items():
        if value == C.SOURCE_FOLDER:
            label = f"models folder: {studio.models_dir}" if studio.models_dir else \
                "models folder — unavailable: start the UI with --models-dir DIR"
        pairs.append((label, value))
    return pairs


@dataclasses.dataclass
class ModelPanel:
    """The model panel's components (LoadOptions fields → controls)."""

    source: Any
    widgets: dict[str, Any]  # LoadOptions field -> component (choices, component files, device, more options)
    choices: dict[str, Any]  # the choice fields checked against this machine (a subset of `widgets`)
    load_check: Any
    availability: Any
    load_btn: Any
    load_status: Any
    load_plan: Any
    accepted: Any  # gr.State: the last value of each choice that this machine can run (a refused pick goes back)
    before_mode: Any  # gr.State: the generation values a mode preset replaced (restored when it is switched off)

    @property
    def inputs(self) -> set:
        return {self.source, *self.widgets.values(), self.accepted}


@dataclasses.dataclass
class GeneratePanel:
    """The generation panel's components (GenerateOptions fields → controls) and the run's outputs."""

    task: Any
    fields: dict[str, Any]  # GenerateOptions field -> component
    specs: dict[str, C.ControlSpec]
    image_column: Any
    image_preview: Any
    checks: dict[str, Any]  # media field -> the upload check shown under its box
    input_check: Any
    request_plan: Any
    run_btn: Any
    cancel_btn: Any
    run_progress: Any
    run_status: Any
    previews: Any
    result_video: Any
    sidecar: Any
    seed_used: Any
    live_video: Any
    history: Any
    watched: Any  # gr.State: the job this page shows (it belongs to the server, not to the page)
    submitted: Any  # gr.State: the job this page submitted (its buttons are busy while it is queued or running)
    shown: Any  # gr.State: what the page shows now (redrawn only when it changes)
    clock: Any  # gr.Timer of this tab: the redraw from the store

    @property
    def inputs(self) -> set:
        return {self.task, *self.fields.values()}

    def values(self, data) -> dict[str, Any]:
        return {name: data[comp] for name, comp in self.fields.items()}


def build_tab(studio: Studio) -> tuple[ModelPanel, GeneratePanel]:
    """The whole interface, rendered into the caller's current Gradio context (a `gr.Blocks`, a `gr.Tab` of a host
    app, ...). It sets nothing global: no queue, theme, css or launch option. Results are files in
    `studio.output_dir`; a host must serve them: `launch(**host_launch_options(studio))`, or keep the output folder
    under the working directory or the system's temp folder (Gradio serves those anyway)."""
    gr = _gradio()
    gr.Markdown("# Infinite Talk\nA talking video of any length from a photo or video plus speech.")
    model = _model_panel(gr, studio)
    gen = _generate_panel(gr, studio)
    _wire_model_panel(gr, studio, model, gen)
    _wire_generate_panel(gr, studio, model, gen)
    _api_endpoints(gr, studio, model, gen)
    return model, gen


def build_app(studio: Studio):
    """`build_tab` in its own Blocks (the `infinite-talk ui` page)."""
    gr = _gradio()
    # Gradio's copies of uploads and results are dropped after a day; the runs themselves stay in output_dir.
    with gr.Blocks(title="Infinite Talk", analytics_enabled=False, delete_cache=(86400, 86400)) as demo:
        build_tab(studio)
    return demo


def host_launch_options(studio: Studio) -> dict[str, Any]:
    """What a host app passes to `launch()` so that the tab's results and live segments can be served."""
    return {"allowed_paths": [str(studio.output_dir), str(studio.store.root)]}


# ---- layout --------------------------------------------------------------------------------------------------------
def _model_panel(gr, studio: Studio) -> ModelPanel:
    caps = studio.caps
    source_default = _default_source(studio)
    initial = LoadOptions(preset="tiny" if source_default == C.SOURCE_TINY else None,
                          models_dir=studio.models_dir if source_default == C.SOURCE_FOLDER else None)
    initial_status = studio.statuses(initial)
    component_pairs = C.component_choices(studio.found, studio.models_dir)
    load_meta = LoadOptions.__dataclass_fields__
    widgets: dict[str, Any] = {}
    choices: dict[str, Any] = {}
    with gr.Group():
        gr.Markdown("## 1 · Models")
        source = gr.Radio(choices=_source_pairs(studio), value=source_default, label="Model files",
                          info=load_meta["preset"].metadata["help"], elem_id="source")
        with gr.Accordion("Model file per component (found by content in the models folder)", open=False):
            gr.Markdown("*auto*: the tiny preset's file, the only one of its kind in the models folder, or the "
                        "hub default. A file picked here is used as is; with the tiny preset it is refused.")
            with gr.Row():
                for name in C.component_fields():
                    spec = C.field_spec(LoadOptions, name)
                    widgets[name] = gr.Dropdown(choices=component_pairs[name], value=C.AUTO, label=spec.label,
                                                info=load_meta[name].metadata.get("help"),
                                                elem_id=f"src-{name.replace('_', '-')}")
        with gr.Row():
            for name in C.load_choice_fields():
                spec = C.field_spec(LoadOptions, name)
                choices[name] = widgets[name] = gr.Dropdown(
                    choices=C.choice_pairs(initial_status[name]), value=spec.default, label=spec.label,
                    info=spec.info, elem_id=name.replace("_", "-"), min_width=CHOICE_MIN_WIDTH)
            widgets["device"] = gr.Dropdown(choices=C.device_choices(caps), value="auto", label="Device",
                                            info=load_meta["device"].metadata["help"], elem_id="device",
                                            min_width=CHOICE_MIN_WIDTH)
        if C.other_load_fields():
            with gr.Accordion("More load options", open=False):
                for name in C.other_load_fields():
                    widgets[name] = _component(gr, C.field_spec(LoadOptions, name))
        load_check = gr.Markdown(C.load_check_text(initial, caps), elem_id="load-check")
        with gr.Accordion("Every load choice on this machine", open=False):
            availability = gr.Markdown(C.availability_table(initial_status), elem_id="availability")
        load_btn = gr.Button("Load models", variant="primary", elem_id="load-btn")
        load_status = gr.Markdown("No models loaded yet.", elem_id="load-status")
        load_plan = gr.Textbox(label="Effective load plan (option: requested → effective (reason))", lines=6,
                               interactive=False, elem_id="load-plan")
        accepted = gr.State({name: C.field_default(LoadOptions, name) for name in choices})
        before_mode = gr.State({})
    return ModelPanel(source, widgets, choices, load_check, availability, load_btn, load_status, load_plan, accepted,
                      before_mode)


def _generate_panel(gr, studio: Studio) -> GeneratePanel:
    fields: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    specs = {name: C.field_spec(GenerateOptions, name) for name in generate_fields()}

    def place(names):
        for name in names:
            fields[name] = _component(gr, specs[name])

    def speech_box(name: str, elem_id: str):
        with gr.Column():
            # no "share" button: it posts to Hugging Face Spaces discussions, which this page is not
            fields[name] = gr.Audio(type="filepath", sources=["upload", "microphone"], label=specs[name].label,
                                    elem_id=elem_id, buttons=["download"])
            checks[name] = gr.Markdown(elem_id=f"{elem_id}-check")

    with gr.Group():
        gr.Markdown("## 2 · Generate")
        task = gr.Radio(choices=[C.TASK_IMAGE, C.TASK_VIDEO], value=C.TASK_IMAGE, label="Task", elem_id="task")
        with gr.Row():
            with gr.Column() as image_column:
                # A file box, not gr.Image: gr.Image decodes uploads itself and turns a broken file into a
                # stuck form. We decode it (by content) for the preview and name the file when it is unusable.
                fields["image"] = gr.File(type="filepath", file_types=["image"], label=specs["image"].label,
                                          elem_id="ref-image")
                image_preview = gr.Image(label="Reference (as read)", interactive=False, height=160,
                                         elem_id="ref-preview", buttons=["download"])
            fields["video"] = gr.Video(sources=["upload"], label=specs["video"].label, elem_id="ref-video",
                                       visible=False)
            speech_box("audio", "audio1")
            speech_box("audio2", "audio2")
        checks["image"] = checks["video"] = gr.Markdown(elem_id="ref-check")
        input_check = gr.Markdown(elem_id="input-check")
        _examples(gr, task, fields)
        with gr.Row():
            place(_placed("speakers"))
        place([n for n in _placed("prompts") if n != "negative_prompt"])
        with gr.Accordion("Negative prompt", open=False):
            place([n for n in _placed("prompts") if n == "negative_prompt"])
        with gr.Row():
            with gr.Column():
                place(_placed("sampling"))
            with gr.Column():
                gr.Markdown("**Effective plan for this request**")
                request_plan = gr.Markdown(elem_id="request-plan")
        with gr.Row():
            place(_placed("guidance"))
        with gr.Row():
            place(_placed("output"))
        with gr.Accordion("Chunking", open=False), gr.Row():
            place(_placed("chunking"))
        if unplaced_generate_fields():
            with gr.Accordion("More options", open=False):
                place(unplaced_generate_fields())
        with gr.Row():
            run_btn = gr.Button("Generate", variant="primary", elem_id="run-btn")
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
        run_progress = gr.HTML(elem_id="run-progress")
        run_status = gr.Markdown(elem_id="run-status")
        previews = gr.Gallery(label="Finished chunks (last frame of each)", columns=8, height=160,
                              elem_id="previews", interactive=False)
        with gr.Row():
            result_video = gr.Video(label="Video", interactive=False, elem_id="result-video")
            with gr.Column():
                sidecar = gr.File(label="Sidecar JSON (requested vs effective options, timings)",
                                  interactive=False, elem_id="sidecar")
                seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
        # the server's jobs (ui/jobs.py, ui/live.py): live video, history; the page watches one job
        live_video = live_player(gr)
        with gr.Accordion("Results of this server (newest first)", open=True):
            history = gr.Markdown(J.history_text(studio), elem_id="history")
        watched, submitted, shown = gr.State(None), gr.State(None), gr.State("")
        clock = gr.Timer(1.0)
    return GeneratePanel(task, fields, specs, image_column, image_preview, checks, input_check, request_plan,
                         run_btn, cancel_btn, run_progress, run_status, previews, result_video, sidecar, seed_used,
                         live_video, history, watched, submitted, shown, clock)


def _examples(gr, task, fields: dict[str, Any]) -> None:
    """The bundled portraits, speech and video (a source checkout's tests/data/examples) as clickable examples."""
    wanted = [  # label, task, image, video, speech
        ("portrait + English speech", C.TASK_IMAGE, "portrait.png", None, "speech_en.wav"),
        ("landscape portrait + a second voice", C.TASK_IMAGE, "portrait_landscape.png", None,
         "speech_en_speaker2.wav"),
        ("video dubbing + Chinese speech", C.TASK_VIDEO, None, "reference_video.mp4", "speech_zh.wav"),
    ]
    rows, labels = [], []
    for label, task_value, image, video, speech in wanted:
        files = [EXAMPLES_DIR / name if name else None for name in (image, video, speech)]
        if all(f is None or f.is_file() for f in files):
            rows.append([task_value, *[str(f) if f else None for f in files]])
            labels.append(label)
    if rows:
        gr.Examples(rows, [task, fields["image"], fields["video"], fields["audio"]], label="Examples (bundled)",
                    example_labels=labels, cache_examples=False, api_visibility="private", elem_id="examples")


def _default_form(specs: dict[str, C.ControlSpec]) -> dict[str, Any]:
    return {name: None if name in MEDIA_FIELDS else C.widget_default(spec) for name, spec in specs.items()}


def _on_page_load(gr, fn, inputs: set, outputs: list) -> None:
    """Run `fn(form)` (a dict of updates) once when a page opens. A one-shot timer, not `Blocks.load`: inside a
    host app the tab has no Blocks of its own to listen to, and the event stays off the API."""
    timer = gr.Timer(0.1)

    def once(data):
        return {**fn(data), timer: gr.Timer(active=False)}

    timer.tick(once, inputs, [*outputs, timer], show_progress="hidden", api_visibility="private", **PLAN_QUEUE)


# ---- behaviour: model panel ----------------------------------------------------------------------------------------
def _read_load(studio: Studio, model: ModelPanel, data) -> LoadOptions:
    return C.load_options_from_form(data[model.source], {n: data[c] for n, c in model.widgets.items()},
                                    studio.models_dir)


def _wire_model_panel(gr, studio: Studio, model: ModelPanel, gen: GeneratePanel) -> None:
    caps = studio.caps
    choices, load_check, availability = model.choices, model.load_check, model.availability

    def refresh_load_panel(data):
        """Relabel every choice for the current form; a pick this machine cannot run goes back to the last value
        that could, at once, with the reason; every remaining refusal is listed, one line each."""
        accepted = dict(data[model.accepted])
        values = {n: data[c] for n, c in choices.items()}
        device = data[model.widgets["device"]]
        try:
            status = studio.statuses(LoadOptions(**values, device=device))
        except Exception:  # e.g. an impossible combination: default labels; the check below says why
            status = studio.statuses(LoadOptions())
        reset = []
        for name, value in values.items():
            row = next((r for r in status[name] if r.value == value), None)
            if row is not None and not row.available:
                back = accepted.get(name, C.field_default(LoadOptions, name))
                reset.append(f"- {C.LABELS.get(name, name)}: {value} is unavailable here ({row.reason}); set back "
                             f"to {back}")
                values[name] = back
            else:
                accepted[name] = value
        if reset:
            data = {**data, **{choices[n]: v for n, v in values.items()}}
        try:
            options, error = _read_load(studio, model, data), None
        except Exception as err:  # an OptionError; anything else is shown the same way
            options, error = None, err if isinstance(err, InfiniteTalkError) else InfiniteTalkError(_message(err))
        updates = {choices[n]: gr.update(choices=C.choice_pairs(status[n]), value=values[n]) for n in choices}
        check = C.load_check_text(options, caps, error)
        if reset:
            check = "**Not available on this machine:**\n\n" + "\n".join(reset) + "\n\n" + check
        updates[load_check] = check
        updates[availability] = C.availability_table(status)
        updates[model.accepted] = accepted
        return updates

    panel_outputs = [*choices.values(), load_check, availability, model.accepted]
    # One listener for all triggers, so a slow earlier refresh cannot overwrite a newer one.
    triggers = [comp.input for name, comp in model.widgets.items() if name != "mode"] + [model.source.input]
    gr.on(triggers, refresh_load_panel, model.inputs, panel_outputs, show_progress="hidden",
          concurrency_limit=None, trigger_mode="always_last", api_visibility="private")

    if "mode" in choices:
        mode_inputs = model.inputs | gen.inputs | {model.before_mode}

        def on_mode(data):
            """A mode preset fills the fields it sets, visibly, and only when this machine accepts it; switching
            back restores the values the user had."""
            values = {n: data[c] for n, c in choices.items()}
            values["device"] = data[model.widgets["device"]]
            saved = dict(data[model.before_mode])
            updates: dict = {}
            if values["mode"] == "standard":
                updates.update({gen.fields[n]: v for n, v in saved.items() if n in gen.fields})
                updates[model.before_mode] = {}
            else:
                try:
                    options = _read_load(studio, model, data)
                    C.preflight(options, caps)
                    load_set, gen_set = C.mode_preset(values, caps)
                except Exception as err:  # refused: the mode goes back, nothing else changes
                    updates[choices["mode"]] = gr.update(value=data[model.accepted].get("mode", "standard"))
                    updates[load_check] = f"**Mode {values['mode']} refused:** {_message(err)}"
                    return updates
                updates.update({choices[n]: v for n, v in load_set.items() if n in choices})
                fill = {n: C.widget_default(dataclasses.replace(gen.specs[n], default=v))
                        for n, v in gen_set.items() if n in gen.fields}
                if not saved:  # the user's own values, from before the first preset
                    saved = {n: data[gen.fields[n]] for n in fill}
                updates.update({gen.fields[n]: v for n, v in fill.items()})
                updates[model.before_mode] = saved
            return updates

        choices["mode"].input(on_mode, mode_inputs, [*choices.values(), load_check, model.before_mode,
                                                     *gen.fields.values()],
                              show_progress="hidden", concurrency_limit=None, api_visibility="private").then(
            refresh_load_panel, model.inputs, panel_outputs, show_progress="hidden", concurrency_limit=None,
            api_visibility="private")

    def on_load(data):
        try:
            options = _read_load(studio, model, data)
            C.preflight(options, caps)
        except Exception as err:
            refusal = C.load_check_text(None, caps, err if isinstance(err, InfiniteTalkError)
                                        else InfiniteTalkError(_message(err)))
            yield {model.load_status: f"**Not loaded.** {refusal}", load_check: refusal}
            return
        try:
            studio.start_load(options)  # in the server: a closed page does not stop it, every page sees it
        except Exception as err:
            yield {model.load_status: f"**Not loaded.** {_message(err)}"}
            return
        yield {model.load_btn: gr.update(value="Loading…", interactive=False)}
        last = None
        while True:
            state = studio.loading
            if state.version != last:
                last = state.version
                text, plan = J.load_texts(studio)
                yield {model.load_status: text, model.load_plan: plan, load_check: C.load_check_text(options, caps)}
            if state.state not in ("waiting", "loading"):
                yield {model.load_btn: idle()}
                return
            time.sleep(POLL_S)

    def idle():  # a new update each time: Gradio consumes an update's value when it sends it
        return gr.update(value="Load models", interactive=True)
    model.load_btn.click(on_load, model.inputs, [model.load_status, model.load_plan, load_check, model.load_btn],
                         concurrency_limit=None, show_progress="minimal", api_visibility="private").then(
        _plan_handler(studio, gen), gen.inputs, gen.request_plan, show_progress="hidden", api_visibility="private",
        **PLAN_QUEUE)


# ---- behaviour: generation panel -----------------------------------------------------------------------------------
def _plan_text(studio: Studio, task: str, values: dict[str, Any]) -> str:
    """The request plan box: what this form would run, or why it cannot."""
    try:
        request = C.request_from_form(task, values)
        try:
            frames = audio_frames(request)
        except (InfiniteTalkError, OSError) as err:
            return f"**Speaker audio:** {_message(err)}"
        reference = request.image or request.video
        if request.bbox and reference:  # boxes against the reference now, not at run time
            ref = check_reference(reference)
            check_boxes(request.bbox, 2 if request.audio2 else 1, ref.height, ref.width)
        plan = plan_request(request, frames, studio.pipeline.load_options).as_dict()
        estimate = {"time": C.time_estimate(plan, studio.calibration), "memory": studio.memory_text()}
        return C.plan_box_text(plan, estimate, C.mode_lines(studio.pipeline.load_options, request))
    except Exception as err:
        return f"**Cannot run:** {_message(err)}"


def _plan_handler(studio: Studio, gen: GeneratePanel):
    def plan_box(data):
        return _plan_text(studio, data[gen.task], gen.values(data))
    return plan_box


def _reference_text(path, task_value) -> tuple[Any, str]:
    """An uploaded reference decoded now: its first frame and a line under the box, or the refusal."""
    if not path:
        return None, ""
    try:
        reference_kind(path, task_value)
        info = check_reference(path)
        from ..media.frames import FrameSource

        source = FrameSource(path)
        try:
            first = source.first_frame()
        finally:
            source.close()
        what = f"video, {info.frames} frames at {info.fps:g} fps" if info.is_video else "picture"
        return first, f"✓ {Path(path).name}: {info.width}×{info.height} {what}"
    except Exception as err:
        return None, f"**Reference refused:** {_message(err)}"


def _speech_text(path, label: str) -> str:
    """An uploaded speech file decoded now (codec, duration, channels): a line under its box, or the refusal."""
    if not path:
        return ""
    try:
        return C.speech_check_text(check_audio(path), label)
    except Exception as err:
        return f"**Refused:** {_message(err)}"  # under its box: the file's name says which


def _submit(studio: Studio, gen: GeneratePanel, data):
    """Check a form as the Generate button does and queue it as a job of the server (as `POST /jobs` does)."""
    studio.require_models()
    req = C.request_from_form(data[gen.task], gen.values(data))
    C.check_inputs(req, data[gen.task])
    reference_kind(req.image or req.video, data[gen.task])
    # every input and the output folder, before the run is queued (the same check as CLI and service)
    checked = check_request(dataclasses.replace(req, out=str(Path(studio.output_dir) / "talk.mp4")))
    for audio, name in zip(checked.audio, ("audio", "audio2")):  # too short: refused before a job exists
        C.speech_check_text(audio, gen.specs[name].label)
    return studio.submit(req)


def _wire_generate_panel(gr, studio: Studio, model: ModelPanel, gen: GeneratePanel) -> None:
    fields, task = gen.fields, gen.task
    plan_box = _plan_handler(studio, gen)

    def on_page_load(data):
        return {gen.request_plan: plan_box(data)}

    _on_page_load(gr, on_page_load, gen.inputs, [gen.request_plan])
    # One at a time, in order (PLAN_QUEUE): run in parallel, a slow update started by an audio upload could finish
    # after a later one and show the plan of a stale form (seen in the browser test).
    gr.on([task.change, *(comp.change for comp in fields.values())], plan_box, gen.inputs, gen.request_plan,
          show_progress="hidden", trigger_mode="always_last", api_visibility="private", **PLAN_QUEUE)
    task.change(lambda t: (gr.update(visible=t == C.TASK_IMAGE), gr.update(visible=t == C.TASK_VIDEO)), task,
                [gen.image_column, fields["video"]], show_progress="hidden", concurrency_limit=None,
                api_visibility="private")

    # Each upload is checked when it arrives; the message stays under its box until the input changes.
    # Image and video share one check line: an emptied box of the other task leaves it alone (an example fills
    # both boxes at once, one of them with nothing).
    fields["image"].change(lambda path, t: _reference_text(path, t) if path or t == C.TASK_IMAGE else gr.skip(),
                           [fields["image"], task], [gen.image_preview, gen.checks["image"]],
                           show_progress="hidden", concurrency_limit=None, api_visibility="private")
    fields["video"].change(lambda path, t: _reference_text(path, t)[1] if path or t == C.TASK_VIDEO else gr.skip(),
                           [fields["video"], task], gen.checks["video"], show_progress="hidden",
                           concurrency_limit=None, api_visibility="private")
    for name in ("audio", "audio2"):
        fields[name].change(lambda path, label=gen.specs[name].label: _speech_text(path, label), fields[name],
                            gen.checks[name], show_progress="hidden", concurrency_limit=None,
                            api_visibility="private")

    def busy(active: bool):  # a new update each time: Gradio consumes an update's value when it sends it
        return gr.update(value="Generating…" if active else "Generate", interactive=not active)

    def on_generate(data):
        try:
            job = _submit(studio, gen, data)
        except Exception as err:
            return {gen.run_status: f"**Not started.** {_message(err)}", gen.run_progress: ""}
        return {gen.watched: job.id, gen.submitted: job.id, gen.run_status: "Queued…", gen.run_progress: "",
                gen.run_btn: busy(True)}

    def redraw(job_id, mine, last):
        """The watched job (or, when none, the server's running one) as it is in the store now; the run button is
        busy while the job this page submitted is queued or running."""
        if job_id is None:
            active = studio.active_job()
            job_id = active.id if active is not None else None
        panel = J.job_panel(studio, job_id)
        mine_active = mine is not None and mine == job_id and panel.active
        load_text, plan_text = J.load_texts(studio)
        history = J.history_text(studio)
        now = json.dumps([panel.signature(), mine_active, load_text, history])
        if now == last:
            return {gen.watched: job_id}
        if job_id is None:  # no job to show: the run area keeps what it says (e.g. why a run did not start)
            return {gen.watched: job_id, gen.shown: now, model.load_status: load_text, model.load_plan: plan_text,
                    gen.history: history}
        return {gen.watched: job_id, gen.shown: now, gen.run_status: panel.status, gen.run_progress: panel.progress,
                gen.previews: panel.previews, gen.live_video: panel.live, gen.result_video: panel.video,
                gen.sidecar: panel.sidecar, gen.seed_used: panel.seed, gen.run_btn: busy(mine_active),
                model.load_status: load_text, model.load_plan: plan_text, gen.history: history}

    page = [gen.run_status, gen.run_progress, gen.previews, gen.live_video, gen.result_video, gen.sidecar,
            gen.seed_used, gen.run_btn, model.load_status, model.load_plan, gen.history, gen.watched, gen.shown]
    redraw_inputs = [gen.watched, gen.submitted, gen.shown]
    gen.run_btn.click(on_generate, gen.inputs, [gen.run_status, gen.run_progress, gen.watched, gen.submitted,
                                                gen.run_btn],
                      concurrency_limit=None, show_progress="hidden", api_visibility="private").then(
        redraw, redraw_inputs, page, show_progress="hidden", concurrency_limit=None,
        api_visibility="private").then(
        plan_box, gen.inputs, gen.request_plan, show_progress="hidden", api_visibility="private", **PLAN_QUEUE)
    gen.clock.tick(redraw, redraw_inputs, page, show_progress="hidden", concurrency_limit=None,
                   api_visibility="private")

    def on_cancel(job_id):  # the only thing that cancels a job; the job's own end message then replaces this line
        try:
            return f"**{studio.cancel(job_id)}**"
        except Exception as err:
            return f"**{_message(err)}**"

    gen.cancel_btn.click(on_cancel, gen.watched, gen.run_status, concurrency_limit=None, show_progress="hidden",
                         api_visibility="private")


# ---- API endpoints (gradio_client) ---------------------------------------------------------------------------------
def _keyword_endpoint(gr, fn, components: dict[str, Any], doc: str):
    """`fn(request, values)` as an endpoint with one keyword parameter per component (named after its schema field),
    each optional: left out, the control's default is used (Gradio documents it in `view_api`)."""
    def endpoint(request: gr.Request, **values):
        return fn(request, values)

    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in components]
    endpoint.__signature__ = inspect.Signature(
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request), *params])
    endpoint.__doc__ = doc
    return endpoint


def _api_endpoints(gr, studio: Studio, model: ModelPanel, gen: GeneratePanel) -> None:
    """`/load_models`, `/plan` and `/generate`: the page's actions for scripts. Each runs the checks of its button,
    goes through the same Studio (one load at a time, the server's job queue) and answers when done; a refusal or
    failure is a `gradio_client` AppError with the page's one-line message."""
    load_inputs = {"source": model.source, **model.widgets}
    gen_inputs = {"task": gen.task, **gen.fields}

    def form(components, values):
        return {comp: values[name] for name, comp in components.items()}

    def load_models(request, values):
        data = form(load_inputs, values)
        options = None
        try:
            options = _read_load(studio, model, data)
            C.preflight(options, studio.caps)
        except Exception as err:
            raise gr.Error(f"Not loaded. {_message(err)}", print_exception=False) from None
        try:
            loaded = studio.load(options, say=lambda message: None)  # synchronous: answers once loaded
        except Exception as err:
            text = C.failure_text(err, load=options, statuses=studio.statuses(options))
            if not isinstance(err, InfiniteTalkError):
                log.error("loading failed", exc_info=err)
            raise gr.Error(f"Loading failed. {text}", print_exception=False) from None
        return (f"Models loaded ({loaded.geometry.name} geometry on {loaded.plan.device}).",
                C.load_plan_text(loaded))

    def plan(request, values):
        data = form(gen_inputs, values)
        return _plan_text(studio, data[gen.task], gen.values(data))

    def generate(request, values):
        data = form(gen_inputs, values)
        try:
            job = _submit(studio, gen, data)
        except Exception as err:
            raise gr.Error(f"Not started. {_message(err)}", print_exception=False) from None
        while studio.store.get(job.id).state not in FINAL_STATES:  # the job is the server's: it runs on if we leave
            time.sleep(POLL_S)
        panel = J.job_panel(studio, job.id)
        status = panel.status.replace("**", "")
        if panel.video is None or not status.startswith("Done:"):
            raise gr.Error(status, print_exception=False)
        return panel.video, panel.sidecar, panel.seed, status

    trigger = gr.Button(visible=False, elem_id="api-trigger")  # never clicked: the endpoints are for scripts
    trigger.click(_keyword_endpoint(gr, load_models, load_inputs,
                                    "Load the models (replacing loaded ones). Returns (status, load plan)."),
                  inputs_kwargs=load_inputs, outputs=[model.load_status, model.load_plan], api_name="load_models",
                  concurrency_limit=1, concurrency_id="api-load")
    trigger.click(_keyword_endpoint(gr, plan, gen_inputs, "The effective plan of a request, as Markdown."),
                  inputs_kwargs=gen_inputs, outputs=gen.request_plan, api_name="plan", **PLAN_QUEUE)
    trigger.click(_keyword_endpoint(gr, generate, gen_inputs,
                                    "Make a video. Returns (mp4, sidecar JSON, seed used, status)."),
                  inputs_kwargs=gen_inputs, outputs=[gen.result_video, gen.sidecar, gen.seed_used, gen.run_status],
                  api_name="generate", concurrency_limit=MAX_JOBS, concurrency_id="api-jobs")


def _message(err: BaseException) -> str:
    """The page's text for a failure; an unexpected one also goes to the server log with its traceback."""
    if not isinstance(err, InfiniteTalkError):
        log.error("unexpected error in a UI handler", exc_info=err)
    return C.failure_text(err)


def reference_kind(path: str, task: str) -> None:
    """The reference's content must match the task (a video in the image box is not silently dubbed)."""
    from ..errors import InputError
    from ..media.frames import is_video, read_image

    if is_video(path):
        if task == C.TASK_IMAGE:
            raise InputError(f"{path}: this is a video; for video dubbing switch the task to '{C.TASK_VIDEO}'")
        return
    if task == C.TASK_VIDEO:
        raise InputError(f"{path}: this is not a video; for a photo switch the task to '{C.TASK_IMAGE}'")
    read_image(path)


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
           auth: tuple[str, str] | None = None):
    filter_library_noise()  # an entry point of its own when called from Python
    gr = _gradio()
    check_exposure(host, auth)
    demo = build_app(studio)
    demo.queue(max_size=64)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # local fonts: no font download
    try:
        demo.launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False,
                    theme=theme, **host_launch_options(studio), prevent_thread_lock=not block, auth=auth,
                    footer_links=["api", "gradio", "settings"])
    except OSError as err:
        raise InfiniteTalkError(f"cannot serve on {host}:{port} ({err}); pass another --port") from err
    return demo


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'USER:PASSWORD' (from --auth or $INFINITE_TALK_UI_AUTH) → (user, password)."""
    if text is None or text == "":
        return None
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password.strip():
        raise OptionError(f"--auth / ${AUTH_ENV}: give USER:PASSWORD (both non-empty), not {len(text)} characters "
                          "without that form")
    if len(password) < MIN_PASSWORD_CHARS:
        raise OptionError(f"--auth / ${AUTH_ENV}: the password is {len(password)} characters; use at least "
                          f"{MIN_PASSWORD_CHARS}")
    return user, password


def check_exposure(host: str, auth: tuple[str, str] | None) -> None:
    """Beyond loopback anyone who can reach the page could run the GPU and read the results: a login is required."""
    if auth is None and not is_loopback(host):
        raise OptionError(f"refusing to serve the UI on {host} without a login: pass --auth USER:PASSWORD (or set "
                          f"{AUTH_ENV}) or serve on 127.0.0.1")


# ---- `infinite-talk ui` ------------------------------------------------------------------------------------------
def cmd_ui(ns: argparse.Namespace) -> int:
    _gradio()  # a clear message before probing when gradio is missing
    auth = parse_auth(ns.auth if ns.auth is not None else os.environ.get(AUTH_ENV))
    check_exposure(ns.host, auth)  # before the probe and the model scan
    given = build_options(LoadOptions, ns)  # --preset and --models-dir, read by the schema
    if ns.data_dir is None:  # with --data-dir the service's models are used
        check_model_source(given)
    studio = Studio(preset=given.preset, models_dir=given.models_dir, output_dir=ns.output_dir, data_dir=ns.data_dir)
    print(f"outputs go to {studio.output_dir}", flush=True)
    if not studio.runs_jobs:
        print(f"another server works the job queue in {studio.store.root}: generations are submitted to it (its "
              "models are used)", flush=True)
    elif not studio.temporary:
        requeued = studio.recovered.get("requeued") or []
        print(f"jobs are kept in {studio.store.root}" + (f"; {len(requeued)} interrupted job(s) resume once models "
              "are loaded" if requeued else ""), flush=True)
    launch(studio, host=ns.host, port=ns.port, auth=auth)
    return 0


def add_cli(subparsers) -> None:
    ui = subparsers.add_parser("ui", help="the web UI (Gradio): load models, generate, watch progress, cancel")
    add_schema(ui, LoadOptions, skip={f.name for f in dataclasses.fields(LoadOptions)} - {"preset", "models_dir"})
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; any other address "
                    "needs --auth)")
    ui.add_argument("--auth", default=None, help=f"USER:PASSWORD the page and its API ask for (default: ${AUTH_ENV}; "
                    "required beyond loopback)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--output-dir", default="outputs",
                    help="folder for the videos, sidecars and chunk previews (default ./outputs)")
    ui.add_argument("--data-dir", default=None,
                    help="keep the job queue in this folder (as `infinite-talk serve --data-dir DIR` does): jobs "
                         "survive a restart and resume; when a serve process already works that folder, generations "
                         "are submitted to it (default: a temporary folder, removed at exit)")
    ui.set_defaults(func=cmd_ui)
