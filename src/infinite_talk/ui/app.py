"""The Gradio page and the `infinite-talk ui` command.

Model panel → LoadOptions, generation panel → GenerateOptions (controls built from the schema, `controls.py`); both
run through `Studio` (`session.py`): the job service's store and worker, one pipeline. A page watches the server's
jobs on a timer (`jobs.py`, `live.py`), so a reload shows the running job and closing a page cancels nothing. Every
failure becomes a message in the page; the traceback goes to the server log only.
(No `from __future__ import annotations`: gradio reads the `gr.Request` annotations of the handlers.)
"""

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import InfiniteTalkError
from ..flags import add_schema, build_options
from ..library_messages import filter_library_noise
from ..media.request_check import check_request
from ..model_files import check_model_source
from ..options import GenerateOptions, LoadOptions
from ..request_plan import plan_request
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
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.kind == "radio":
        return gr.Radio(choices=list(spec.choices), value=value, **common)
    if spec.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if spec.kind == "slider":
        return gr.Slider(minimum=spec.minimum, maximum=spec.maximum, value=value, step=spec.step, **common)
    if spec.kind == "number":
        return gr.Number(value=value, minimum=spec.minimum, maximum=spec.maximum, step=spec.step,
                         precision=0 if spec.integer else None, **common)
    if spec.kind == "optional_number":
        return gr.Textbox(value=value, placeholder=C.EMPTY_MEANS.get(spec.name, "empty: the default"), **common)
    lines = {"negative_prompt": 3, "prompt": 2}.get(spec.name, 2 if spec.kind == "lines" else 1)
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


def build_app(studio: Studio):
    gr = _gradio()
    caps = studio.caps
    source_default = _default_source(studio)
    initial = LoadOptions(preset="tiny" if source_default == C.SOURCE_TINY else None,
                          models_dir=studio.models_dir if source_default == C.SOURCE_FOLDER else None)
    initial_status = studio.statuses(initial)
    component_pairs = C.component_choices(studio.found, studio.models_dir)
    load_meta = LoadOptions.__dataclass_fields__

    # Gradio's copies of uploads and results are dropped after a day; the runs themselves stay in output_dir.
    with gr.Blocks(title="Infinite Talk", analytics_enabled=False, delete_cache=(86400, 86400)) as demo:
        gr.Markdown("# Infinite Talk\nA talking video of any length from a photo or video plus speech.")

        # ---- model panel ----------------------------------------------------------------------------------------
        load_widgets: dict[str, Any] = {}  # LoadOptions field -> component
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
                        load_widgets[name] = gr.Dropdown(choices=component_pairs[name], value=C.AUTO,
                                                         label=spec.label,
                                                         info=load_meta[name].metadata.get("help"),
                                                         elem_id=f"src-{name.replace('_', '-')}")
            choices = {}
            with gr.Row():
                for name in C.load_choice_fields():
                    spec = C.field_spec(LoadOptions, name)
                    choices[name] = load_widgets[name] = gr.Dropdown(
                        choices=C.choice_pairs(initial_status[name]), value=spec.default, label=spec.label,
                        info=spec.info, elem_id=name.replace("_", "-"))
                load_widgets["device"] = gr.Dropdown(choices=C.device_choices(caps), value="auto", label="Device",
                                                     info=load_meta["device"].metadata["help"], elem_id="device")
            if C.other_load_fields():
                with gr.Accordion("More load options", open=False):
                    for name in C.other_load_fields():
                        load_widgets[name] = _component(gr, C.field_spec(LoadOptions, name))
            load_check = gr.Markdown(C.load_check_text(initial, caps), elem_id="load-check")
            with gr.Accordion("Every load choice on this machine", open=False):
                availability = gr.Markdown(C.availability_table(initial_status), elem_id="availability")
            load_btn = gr.Button("Load models", variant="primary", elem_id="load-btn")
            load_status = gr.Markdown("No models loaded yet.", elem_id="load-status")
            load_plan = gr.Textbox(label="Effective load plan (option: requested → effective (reason))", lines=6,
                                   interactive=False, elem_id="load-plan")

        # ---- generation panel -----------------------------------------------------------------------------------
        gen: dict[str, Any] = {}
        specs = {name: C.field_spec(GenerateOptions, name) for name in generate_fields()}

        def place(names):
            for name in names:
                gen[name] = _component(gr, specs[name])

        with gr.Group():
            gr.Markdown("## 2 · Generate")
            task = gr.Radio(choices=[C.TASK_IMAGE, C.TASK_VIDEO], value=C.TASK_IMAGE, label="Task", elem_id="task")
            with gr.Row():
                with gr.Column() as image_column:
                    # A file box, not gr.Image: gr.Image decodes uploads itself and turns a broken file into a
                    # stuck form. We decode it (by content) for the preview and name the file when it is unusable.
                    gen["image"] = gr.File(type="filepath", file_types=["image"], label=specs["image"].label,
                                           elem_id="ref-image")
                    image_preview = gr.Image(label="Reference (as read)", interactive=False, height=160,
                                             elem_id="ref-preview")
                gen["video"] = gr.Video(sources=["upload"], label=specs["video"].label, elem_id="ref-video",
                                        visible=False)
                gen["audio"] = gr.Audio(type="filepath", sources=["upload", "microphone"],
                                        label=specs["audio"].label, elem_id="audio1")
                gen["audio2"] = gr.Audio(type="filepath", sources=["upload", "microphone"],
                                         label=specs["audio2"].label, elem_id="audio2")
            input_check = gr.Markdown(elem_id="input-check")
            with gr.Row():
                place(_placed("speakers"))
            place(_placed("prompts"))
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
            run_progress = gr.Markdown(elem_id="run-progress")
            run_status = gr.Markdown(elem_id="run-status")
            previews = gr.Gallery(label="Finished chunks (last frame of each)", columns=8, height=160,
                                  elem_id="previews", interactive=False)
            with gr.Row():
                result_video = gr.Video(label="Video", interactive=False, elem_id="result-video")
                with gr.Column():
                    sidecar = gr.File(label="Sidecar JSON (requested vs effective options, timings)",
                                      interactive=False, elem_id="sidecar")
                    seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
            # ---- the server's jobs (ui/jobs.py, ui/live.py): live video, history; the page watches one job --------
            live_video = live_player(gr)
            with gr.Accordion("Results of this server (newest first)", open=False):
                history = gr.Markdown(J.history_text(studio), elem_id="history")
            watched = gr.State(None)  # the job this page shows (it belongs to the server, not to the page)
            shown = gr.State("")  # what the page shows now (redrawn only when it changes)
            clock = gr.Timer(1.0)

        load_inputs = {source, *load_widgets.values()}
        gen_inputs = {task, *gen.values()}

        def read_load(data) -> LoadOptions:
            return C.load_options_from_form(data[source], {n: data[c] for n, c in load_widgets.items()},
                                            studio.models_dir)

        # ---- handlers: model panel ------------------------------------------------------------------------------
        def refresh_load_panel(data):
            try:
                options = read_load(data)
                error = None
            except Exception as err:  # an OptionError; anything else is shown the same way
                options, error = None, err if isinstance(err, InfiniteTalkError) else InfiniteTalkError(
                    _message(err))
            try:
                base = options or LoadOptions(**{n: data[c] for n, c in choices.items()}, device=data[
                    load_widgets["device"]])
                status = studio.statuses(base)
            except Exception:  # e.g. an impossible combination: keep default labels, show the refusal
                status = studio.statuses(LoadOptions())
            updates = {choices[n]: gr.update(choices=C.choice_pairs(status[n])) for n in choices}
            updates[load_check] = C.load_check_text(options, caps, error)
            updates[availability] = C.availability_table(status)
            return updates

        # One listener for all triggers, so a slow earlier refresh cannot overwrite a newer one.
        gr.on([comp.input for comp in load_inputs], refresh_load_panel, load_inputs,
              [*choices.values(), load_check, availability], show_progress="hidden", concurrency_limit=None,
              trigger_mode="always_last")

        if "mode" in choices:
            def on_mode(data):
                """A preset fills the fields it sets, visibly; they stay editable and are what runs."""
                try:
                    load_values = {n: data[c] for n, c in choices.items()}
                    load_values["device"] = data[load_widgets["device"]]
                    load_set, gen_set = C.mode_preset(load_values, caps)
                except Exception as err:
                    return {load_check: f"**Mode:** {_message(err)}"}
                updates = {choices[n]: v for n, v in load_set.items() if n in choices}
                updates.update({gen[n]: C.widget_default(dataclasses.replace(specs[n], default=v))
                                for n, v in gen_set.items() if n in gen})
                return updates

            choices["mode"].input(on_mode, load_inputs, [*choices.values(), load_check, *gen.values()],
                                  show_progress="hidden", concurrency_limit=None).then(
                refresh_load_panel, load_inputs, [*choices.values(), load_check, availability],
                show_progress="hidden", concurrency_limit=None)

        def on_load(data):
            try:
                options = read_load(data)
                C.preflight(options, caps)
            except Exception as err:
                refusal = C.load_check_text(None, caps, err if isinstance(err, InfiniteTalkError)
                                            else InfiniteTalkError(_message(err)))
                yield {load_status: f"**Not loaded.** {refusal}", load_check: refusal}
                return
            try:
                studio.start_load(options)  # in the server: a closed page does not stop it, every page sees it
            except Exception as err:
                yield {load_status: f"**Not loaded.** {_message(err)}"}
                return
            last = None
            while True:
                state = studio.loading
                if state.version != last:
                    last = state.version
                    text, plan = J.load_texts(studio)
                    yield {load_status: text, load_plan: plan, load_check: C.load_check_text(options, caps)}
                if state.state not in ("waiting", "loading"):
                    return
                time.sleep(0.25)

        # ---- handlers: generation panel -------------------------------------------------------------------------
        def form_values(data) -> dict[str, Any]:
            return {name: data[comp] for name, comp in gen.items()}

        def plan_box(data):
            try:
                request = C.request_from_form(data[task], form_values(data))
                frames = None
                try:
                    frames = audio_frames(request)
                except (InfiniteTalkError, OSError) as err:
                    return f"**Speaker audio:** {err}"
                plan = plan_request(request, frames, studio.pipeline.load_options).as_dict()
                estimate = {"time": C.time_estimate(plan, studio.calibration), "memory": studio.memory_text()}
                return C.plan_box_text(plan, estimate, C.mode_lines(studio.pipeline.load_options, request))
            except Exception as err:
                return f"**Cannot run:** {_message(err)}"

        # One at a time, in order (PLAN_QUEUE): run in parallel, a slow update started by an audio upload could finish
        # after a later one and show the plan of a stale form (seen in the browser test).
        gr.on([demo.load, task.change, *(comp.change for comp in gen.values())], plan_box, gen_inputs,
              request_plan, show_progress="hidden", trigger_mode="always_last", **PLAN_QUEUE)
        task.change(lambda t: (gr.update(visible=t == C.TASK_IMAGE), gr.update(visible=t == C.TASK_VIDEO)), task,
                    [image_column, gen["video"]], show_progress="hidden", concurrency_limit=None)

        def check_reference(path, task_value):
            """Decode the upload now: a preview, or a message naming the file and the fix."""
            if not path:
                return None, ""
            try:
                reference_kind(path, task_value)
                from ..media.frames import FrameSource

                return FrameSource(path).first_frame(), ""
            except Exception as err:
                return None, f"**Reference:** {_message(err)}"

        gen["image"].change(check_reference, [gen["image"], task], [image_preview, input_check],
                            show_progress="hidden", concurrency_limit=None)
        gen["video"].change(lambda path, t: check_reference(path, t)[1], [gen["video"], task], input_check,
                            show_progress="hidden", concurrency_limit=None)
        load_btn.click(on_load, load_inputs, [load_status, load_plan, load_check], concurrency_limit=None,
                       show_progress="minimal").then(
            plan_box, gen_inputs, request_plan, show_progress="hidden", **PLAN_QUEUE)

        def on_generate(data):
            try:
                studio.require_models()
                req = C.request_from_form(data[task], form_values(data))
                C.check_inputs(req, data[task])
                reference_kind(req.image or req.video, data[task])
                # every input and the output folder, before the run is queued (the same check as CLI and service)
                check_request(dataclasses.replace(req, out=str(Path(studio.output_dir) / "talk.mp4")))
                job = studio.submit(req)  # a job of the server's queue, as `POST /jobs` makes it
            except Exception as err:
                return {run_status: f"**Not started.** {_message(err)}", run_progress: ""}
            return {watched: job.id, run_status: "Queued…", run_progress: ""}

        def redraw(job_id, last):
            """The watched job (or, when none, the server's running one) as it is in the store now."""
            if job_id is None:
                active = studio.active_job()
                job_id = active.id if active is not None else None
            panel = J.job_panel(studio, job_id)
            load_text, plan_text = J.load_texts(studio)
            now = json.dumps([panel.signature(), load_text, J.history_text(studio)])
            if now == last:
                return {watched: job_id}
            return {watched: job_id, shown: now, run_status: panel.status, run_progress: panel.progress,
                    previews: panel.previews, live_video: panel.live, result_video: panel.video,
                    sidecar: panel.sidecar, seed_used: panel.seed, load_status: load_text, load_plan: plan_text,
                    history: J.history_text(studio)}

        page = [run_status, run_progress, previews, live_video, result_video, sidecar, seed_used, load_status,
                load_plan, history, watched, shown]
        run_btn.click(on_generate, gen_inputs, [run_status, run_progress, watched], concurrency_limit=None,
                      show_progress="minimal").then(
            redraw, [watched, shown], page, show_progress="hidden", concurrency_limit=None).then(
            plan_box, gen_inputs, request_plan, show_progress="hidden", **PLAN_QUEUE)
        clock.tick(redraw, [watched, shown], page, show_progress="hidden", concurrency_limit=None)
        demo.load(redraw, [watched, shown], page, show_progress="hidden", concurrency_limit=None)

        def on_cancel(job_id):  # the only thing that cancels a job
            try:
                return f"**{studio.cancel(job_id)}**"
            except Exception as err:
                return f"**{_message(err)}**"

        cancel_btn.click(on_cancel, watched, run_progress, concurrency_limit=None, show_progress="hidden")
    return demo


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


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    filter_library_noise()  # an entry point of its own when called from Python
    gr = _gradio()
    demo = build_app(studio)
    demo.queue(max_size=64)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # local fonts: no font download
    try:
        demo.launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False,
                    allowed_paths=[str(studio.output_dir), str(studio.store.root)], theme=theme, prevent_thread_lock=not block,
                    footer_links=["gradio", "settings"])
    except OSError as err:
        raise InfiniteTalkError(f"cannot serve on {host}:{port} ({err}); pass another --port") from err
    return demo


# ---- `infinite-talk ui` ------------------------------------------------------------------------------------------
def cmd_ui(ns: argparse.Namespace) -> int:
    _gradio()  # a clear message before probing when gradio is missing
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
    launch(studio, host=ns.host, port=ns.port)
    return 0


def add_cli(subparsers) -> None:
    ui = subparsers.add_parser("ui", help="the web UI (Gradio): load models, generate, watch progress, cancel")
    add_schema(ui, LoadOptions, skip={f.name for f in dataclasses.fields(LoadOptions)} - {"preset", "models_dir"})
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0 for all)")
    ui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ui.add_argument("--output-dir", default="outputs",
                    help="folder for the videos, sidecars and chunk previews (default ./outputs)")
    ui.add_argument("--data-dir", default=None,
                    help="keep the job queue in this folder (as `infinite-talk serve --data-dir DIR` does): jobs "
                         "survive a restart and resume; when a serve process already works that folder, generations "
                         "are submitted to it (default: a temporary folder, removed at exit)")
    ui.set_defaults(func=cmd_ui)
