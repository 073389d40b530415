"""What the UI server holds: one pipeline, the job service's queue (store + worker) and the model-loading state.

Generations are jobs of `service/store.py` `JobStore`, run by `service/worker.py` `Worker` in this process, exactly
as the job service runs them: queue positions, cancel, resume from the last chunk, previews and live segments
(`service/live.py`) are the same in both. Without `--data-dir` the store lives in a temporary folder removed at exit;
with one, jobs survive a restart of the UI and resume. When another server already works that folder (holds its
runner lock) the UI only submits, and that server's worker runs the jobs. A job belongs to the server, not to a page:
pages watch jobs, only Cancel cancels. The GPU does one thing at a time: a model load takes the worker's lock
between jobs.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import InfiniteTalkError, NotLoadedError, OptionError
from ..loading import LoadedPlan
from ..model_files import discover
from ..options import GenerateOptions, LoadOptions
from ..pipeline import InfiniteTalkPipeline
from ..plan.probe import probe
from ..request_plan import frames_for_samples, track_samples
from ..service.store import FINAL_STATES, Job, JobStore
from ..service.worker import SIDECAR_NAME, VIDEO_NAME, Worker
from .controls import ChoiceStatus, choice_status, preflight

log = logging.getLogger("infinite_talk.ui")


class BusyError(InfiniteTalkError):
    """Models are being loaded already."""


@dataclasses.dataclass
class LoadState:
    """The server's model state, as every page shows it: idle | waiting | loading | loaded | failed."""

    state: str = "idle"
    message: str = ""
    plan: LoadedPlan | None = None
    options: LoadOptions | None = None
    error: BaseException | None = None
    version: int = 0  # bumped at every change (pages redraw only then)


class Studio:
    """The server's state: the capability probe, the model files found, the pipeline, the job store and worker."""

    def __init__(self, preset: str | None = None, models_dir: str | None = None, output_dir: str | Path = "outputs",
                 caps=None, data_dir: str | Path | None = None, run_jobs: bool = True):
        self.caps = caps if caps is not None else probe()
        self.preset = preset
        self.models_dir = str(Path(models_dir).resolve()) if models_dir else None
        self.found = discover(self.models_dir) if self.models_dir else {}
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = InfiniteTalkPipeline()
        self.calibration: dict | None = None
        self.last_peak_gib: float | None = None
        self.loading = LoadState()
        self._load_lock = threading.Lock()
        self.temporary = data_dir is None
        root = Path(tempfile.mkdtemp(prefix="infinite-talk-ui-")) if data_dir is None else Path(data_dir)
        self.store = JobStore(root)
        self.recovered: dict = {}
        self.runs_jobs = False  # False: another server works this data folder; the UI only submits
        try:
            self.store.acquire_runner_lock()
            self.runs_jobs = True
        except OptionError:
            log.info("another server works the queue in %s: generations are submitted to it", self.store.root)
        self.stop = threading.Event()
        self.worker = Worker(self.store, self.pipeline, "ui-worker", self.stop, ready=lambda: self.loaded,
                             on_end=self._job_ended)
        if self.runs_jobs:
            self.recovered = self.store.recover_at_start()
            if run_jobs:
                self.worker.start()
        atexit.register(self.close)

    def close(self) -> None:
        """Stop taking jobs; a temporary data folder goes (results were copied to the output folder)."""
        self.stop.set()
        self.store.wake()
        self.store.release_runner_lock()
        if self.temporary:
            self.store.close()
            shutil.rmtree(self.store.root, ignore_errors=True)

    # ---- state ----------------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        p = self.pipeline
        return all(getattr(p, n) is not None for n in ("transformer", "vae", "text_encoder", "image_encoder",
                                                        "audio_encoder"))

    def require_models(self) -> None:
        if not self.runs_jobs:  # the server that works the queue holds the models
            return
        if not self.loaded:
            raise NotLoadedError("No models are loaded: press 'Load models' in the model panel first")

    def statuses(self, options: LoadOptions) -> dict[str, list[ChoiceStatus]]:
        return choice_status(options, self.caps)

    # ---- models ---------------------------------------------------------------------------------------------------
    def start_load(self, options: LoadOptions) -> None:
        """Load in the background (refused options fail here, before the old models are dropped); every page
        follows `loading`. The load waits for the running job's end: the GPU does one thing at a time."""
        preflight(options, self.caps)
        with self._load_lock:
            if self.loading.state in ("waiting", "loading"):
                raise BusyError("models are being loaded already; wait for that load to finish")
            self._set_loading("waiting", "waiting for the running job to finish" if self.worker.current else "",
                              options=options)
        threading.Thread(target=self._load, args=(options,), daemon=True, name="infinite-talk-load").start()

    def load(self, options: LoadOptions, say: Callable[[str], None], on_turn: Callable[[], None] | None = None
             ) -> LoadedPlan:
        """Replace the loaded models now, in the caller's thread (after the running job; `on_turn` once the GPU
        is this load's)."""
        preflight(options, self.caps)
        with self.worker.gpu:
            if on_turn is not None:
                on_turn()
            if self.loaded:
                say("unloading the previous models")
            self._unload()
            plan = self.pipeline.load_models(options, progress=say)
            self.worker.pipeline = self.pipeline
            self.store.wake()
            return plan

    def _load(self, options: LoadOptions) -> None:
        try:
            plan = self.load(options, say=lambda message: self._set_loading("loading", message),
                             on_turn=lambda: self._set_loading("loading", ""))
        except BaseException as err:  # shown in every page; the server keeps running
            if not isinstance(err, InfiniteTalkError):
                log.error("loading failed", exc_info=err)
            self._set_loading("failed", "", error=err)
        else:
            self._set_loading("loaded", "", plan=plan)

    def _set_loading(self, state: str, message: str, **fields) -> None:
        keep = {} if state in ("waiting", "failed") else {"options": self.loading.options}
        self.loading = LoadState(state, message, version=self.loading.version + 1,
                                 **{**keep, **fields})

    def _unload(self) -> None:
        self.pipeline = InfiniteTalkPipeline()  # the old one's tensors go with it (two 14B copies do not fit)
        self.worker.pipeline = self.pipeline
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # memory hygiene only
            pass

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def submit(self, request: GenerateOptions) -> Job:
        """Queue a generation (inputs copied and checked by the store, as for an HTTP upload)."""
        self.require_models()
        if not self.runs_jobs and not self.store.runner_active():
            raise InfiniteTalkError(f"no `infinite-talk serve --data-dir {self.store.root}` is running to work the "
                                    "queue; start one (submitted jobs wait for it)")
        unset = {"image": None, "video": None, "audio": None, "audio2": None, "out": None}
        return self.store.submit(Path(request.image or request.video), Path(request.audio),
                                 Path(request.audio2) if request.audio2 else None,
                                 options=dataclasses.replace(request, **unset))

    def cancel(self, job_id: str | None) -> str:
        if not job_id:
            return "Nothing to cancel: no generation is running or waiting."
        job = self.store.get(job_id)
        if job.state in FINAL_STATES:
            return f"Nothing to cancel: the generation has already {_ended_word(job.state)}."
        job = self.store.cancel(job_id)
        if job.state == "cancelled":
            return "Cancelled: the job left the queue; nothing was generated."
        return "Cancelling: the run stops before the next step; finished chunks are kept."

    def active_job(self) -> Job | None:
        """The running job, else the first waiting one (what a freshly opened page shows)."""
        running = self.store.list("running", limit=1)
        if running:
            return running[0]
        queued = self.store.list("queued", limit=1)
        return queued[0] if queued else None

    def history(self, limit: int = 10) -> list[Job]:
        """The last finished jobs of this server, newest first."""
        done = [j for j in self.store.list(limit=1000) if j.state in FINAL_STATES]
        return sorted(done, key=lambda j: j.finished_at or 0, reverse=True)[:limit]

    def result_paths(self, job: Job) -> tuple[Path | None, Path | None]:
        """The job's mp4 and sidecar in the output folder (copied there once it has ended)."""
        if job.state not in FINAL_STATES:
            return None, None
        dest = self.export(job)
        video, sidecar = dest / "talk.mp4", dest / "talk.json"
        return (video if video.is_file() else None), (sidecar if sidecar.is_file() else None)

    def export(self, job: Job) -> Path:
        """Copy an ended job's mp4 and sidecar to `<output_dir>/<date-time>-<id>/` (once; idempotent)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(job.created_at))
        dest = self.output_dir / f"{stamp}-{job.id[:8]}"
        folder = self.store.folder(job.id)
        for name, target in ((VIDEO_NAME, "talk.mp4"), (SIDECAR_NAME, "talk.json")):
            source = folder / name
            if source.is_file() and not (dest / target).is_file():
                dest.mkdir(parents=True, exist_ok=True)
                tmp = dest / f".{target}.part"
                shutil.copyfile(source, tmp)
                os.replace(tmp, dest / target)
        return dest

    def _job_ended(self, job_id: str) -> None:
        """After the worker ran a job: its results to the output folder, the time estimate calibrated."""
        try:
            job = self.store.get(job_id)
            if job.state not in FINAL_STATES:  # back in the queue (storage fault, server stopping)
                return
            dest = self.export(job)
            if job.state == "completed" and (dest / "talk.json").is_file():
                self._calibrate(job.options.get("size") or GenerateOptions().size,
                                json.loads((dest / "talk.json").read_text()))
            self._record_peak()
        except Exception as err:  # the job itself has ended as recorded; its files stay in the data folder
            log.warning("job %s: results not copied to %s: %s", job_id, self.output_dir, err)

    def _record_peak(self) -> None:
        try:
            import torch
        except ImportError:
            return
        device = self.pipeline.device
        if device is not None and getattr(device, "type", None) == "cuda":
            self.last_peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)

    def _calibrate(self, size: int, sidecar: dict) -> None:
        """Seconds per model call and per chunk of the last run, for the time estimate of the next request."""
        timings = sidecar.get("timings_s", {})
        calls = sidecar.get("effective", {}).get("model_calls") or 0
        chunks = sidecar.get("output", {}).get("chunks_done") or 0
        if calls and chunks and "denoise" in timings:
            self.calibration = {
                "size": size,
                "s_per_call": timings["denoise"] / calls,
                "s_per_chunk": (timings.get("encode", 0.0) + timings.get("decode", 0.0)) / chunks,
            }

    def memory_text(self) -> str:
        if not self.loaded:
            return "model weights: known once models are loaded"
        size = sum(_module_bytes(getattr(self.pipeline, n)) for n in ("transformer", "vae", "text_encoder",
                                                                       "image_encoder", "audio_encoder"))
        text = f"model weights in memory: {_size(size)} on {self.pipeline.device}"
        memory = self.pipeline.load_plan.memory if self.pipeline.load_plan else None
        if memory is not None and memory.estimate is not None:  # the planner's estimate for the loaded models
            estimate = memory.estimate.to_dict()
            text += (f"; estimated peak {estimate['peak_gib']:.2f} GiB ({estimate['peak_phase']} phase, planned for "
                     f"{memory.shape.label()})")
        if self.last_peak_gib is not None:
            text += f"; peak GPU memory of the last run: {_size(self.last_peak_gib * 2**30)}"
        return text


def _ended_word(state: str) -> str:
    return {"completed": "finished", "failed": "failed", "cancelled": "been cancelled"}[state]


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _module_bytes(component) -> int:
    import torch

    module = component if isinstance(component, torch.nn.Module) else getattr(component, "model", None)
    if not isinstance(module, torch.nn.Module):
        return 0
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.lru_cache(maxsize=64)
def _samples_16k(path: str, mtime_ns: int, size: int) -> int:
    from ..media.audio import load_audio

    return len(load_audio(path))


def audio_frames(request: GenerateOptions) -> int | None:
    """25 fps rows of speaker 1's model track (as `generate` builds it), or None without audio."""
    if not request.audio:
        return None
    lengths = []
    for p in [request.audio] + ([request.audio2] if request.audio2 else []):
        st = os.stat(p)
        lengths.append(_samples_16k(str(p), st.st_mtime_ns, st.st_size))
    return frames_for_samples(track_samples(lengths, request.audio_mode))
