"""What a page shows of the server's state: the models, a job (status, progress, previews, live video, result) and
the history of this server's results. Plain values (no gradio here): `app.py` puts them into components.

A page watches one job (the one it submitted, or on opening the running one) and redraws from the store on a timer,
so a reloaded page or a second tab shows the same job, and closing a page cancels nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..sampling.windows import FPS
from ..service.live import segments
from ..service.store import FINAL_STATES, Job, NotFound
from . import controls as C
from .session import Studio


def file_url(path: str | Path) -> str:
    """Gradio's URL of a file under its allowed paths (the output and data folders)."""
    return f"/gradio_api/file={path}"


@dataclass
class JobPanel:
    status: str = ""
    progress: str = ""
    previews: list[tuple[str, str]] = field(default_factory=list)
    live: str = "{}"  # JSON for the live player: {"job", "segments": [urls], "ended", "audio"}
    video: str | None = None
    sidecar: str | None = None
    seed: str = ""
    active: bool = False  # queued or running

    def signature(self) -> str:
        """Changes exactly when something shown changes (the page redraws only then)."""
        return json.dumps([self.status, self.progress, self.previews, self.live, self.video, self.sidecar,
                           self.seed])


def load_texts(studio: Studio) -> tuple[str, str]:
    """The model panel's status line and load plan, as they are on the server now."""
    state = studio.loading
    if not studio.runs_jobs:
        return (f"Models: those of the server that works the job queue in {studio.store.root}.", "")
    if state.state == "waiting":
        return "**Waiting for the GPU:** the running job finishes first, then the models load.", ""
    if state.state == "loading":
        return f"Loading models… {state.message}".rstrip(), ""
    loaded = studio.pipeline.load_plan
    if studio.loaded and loaded is not None:
        text = f"**Models loaded** ({loaded.geometry.name} geometry on {loaded.plan.device})."
        return text, C.load_plan_text(loaded)
    if state.state == "failed" and state.error is not None:
        options = state.options
        text = C.failure_text(state.error, load=options,
                              statuses=studio.statuses(options) if options is not None else None)
        return f"**Loading failed.** {text} No models are loaded now.", ""
    return "No models loaded yet.", ""


def job_panel(studio: Studio, job_id: str | None) -> JobPanel:
    if not job_id:
        return JobPanel()
    try:
        job = studio.store.get(job_id)
    except NotFound:
        return JobPanel(status="The job this page showed has been deleted.")
    folder = studio.store.folder(job.id)
    chunks = (job.plan.get("chunks") or {}).get("chunks")
    found = segments(folder)
    panel = JobPanel(active=job.state not in FINAL_STATES)
    panel.previews = [(str(s["preview"]), f"chunk {s['index'] + 1}/{chunks or '?'}") for s in found if s["preview"]]
    panel.live = json.dumps({"job": job.id, "segments": [file_url(s["path"]) for s in found],
                             "ended": job.state in FINAL_STATES, "audio": any(s["audio"] for s in found)})
    if job.state == "queued":
        ahead = studio.store.queue_position(job) or 0
        if ahead:
            panel.status = (f"**Waiting for the GPU:** position {ahead + 1} in the queue ({ahead} job"
                            f"{'s' if ahead > 1 else ''} ahead; one runs at a time).")
        elif studio.runs_jobs and not studio.loaded:
            panel.status = "**Waiting for models:** the job starts once models are loaded (Load models above)."
        else:
            panel.status = "Starting…"
        return panel
    if job.state == "running":
        panel.status = ("**Cancelling:** the run stops before the next step; finished chunks are kept."
                        if job.cancel_requested else f"Running… job {job.id[:8]}"
                        + (f", resumed at chunk {job.resumed_from_chunk + 1}" if job.resumed_from_chunk else ""))
        info = job.progress or {}
        if all(k in info for k in ("chunk", "chunks", "step", "steps", "passes", "elapsed_s", "eta_s")):
            panel.progress = C.progress_html(info)
        return panel
    info = job.progress or {}
    if all(k in info for k in ("chunk", "chunks", "step", "steps", "passes", "elapsed_s", "eta_s")):
        # the last report: what ran, with the end instead of an estimate
        panel.progress = C.progress_html(info, {"completed": "finished"}.get(job.state, job.state))
    video, sidecar = studio.result_paths(job)
    panel.video = str(video) if video else None
    panel.sidecar = str(sidecar) if sidecar else None
    panel.seed = "" if job.seed is None else str(job.seed)
    if job.state == "completed":
        panel.status = _done_text(job, video, sidecar)
    else:
        error = (job.error or "").replace(f"{job.id}.mp4", str(video) if video else "the output")
        panel.status = f"**{'Cancelled' if job.state == 'cancelled' else 'Failed'}.** {error}"
    return panel


def _done_text(job: Job, video: Path | None, sidecar: Path | None) -> str:
    effective = {}
    if sidecar is not None:
        try:
            effective = json.loads(sidecar.read_text()).get("effective", {})
        except (OSError, ValueError):
            pass
    frames = job.frames or 0
    text = f"**Done:** {frames} frames, {frames / FPS:.2f} s, seed {job.seed}"
    if effective:
        text += (f", {effective.get('scheduler')} {effective.get('steps')} steps × "
                 f"{effective.get('passes_per_step')} passes")
    return text + (f". Saved as {video}" if video else ".")


def history_text(studio: Studio, limit: int = 10) -> str:
    """The last results of this server, newest first, with their videos and sidecars."""
    rows = []
    for job in studio.history(limit):
        video, sidecar = studio.result_paths(job)
        links = " · ".join(f"[{name}]({file_url(path)})" for name, path in (("video", video), ("sidecar", sidecar))
                           if path is not None) or "no output"
        inputs = ", ".join(entry.get("name", k) for k, entry in job.inputs.items())
        frames = f"{job.frames} frames" if job.frames else ""
        rows.append(f"- {job.state} · {inputs} · {frames} · {links}".replace(" ·  · ", " · "))
    return "\n".join(rows) if rows else "No results yet on this server."
