"""What the UI server holds: one pipeline, a first-come queue for the GPU, and one job per browser page.

A GPU runs one thing at a time (loading models or generating): every job takes a ticket in `GpuQueue` and waits for
its turn, reporting how many jobs are ahead of it. A job runs in its own thread and reports through an event queue
that the page's handler turns into updates; cancelling sets a flag the pipeline checks before every step.
`Studio.run_generation` is the one run path, so a job service can replace it later.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CancelledError, InfiniteTalkError, NotLoadedError
from ..options import GenerateOptions, LoadOptions
from ..request_plan import frames_for_samples, track_samples
from .controls import ChoiceStatus, choice_status, preflight

log = logging.getLogger("infinite_talk.ui")


class GpuQueue:
    """First come, first served. The ticket at the head of the line holds the GPU."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line: list[int] = []
        self._numbers = itertools.count(1)

    def join(self) -> int:
        with self._cond:
            ticket = next(self._numbers)
            self._line.append(ticket)
            return ticket

    def ahead(self, ticket: int) -> int:
        """Jobs in front of `ticket` (0: its turn)."""
        with self._cond:
            return self._line.index(ticket)

    def wait_turn(self, ticket: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._line[0] == ticket, timeout)

    def leave(self, ticket: int) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._line)


class Job:
    """One unit of GPU work. Events: ("waiting", jobs_ahead), ("started", None), ("message", text),
    ("progress", info), ("chunk", (index, preview_path)), ("done", result), ("cancelled", text),
    ("failed", exception), then always ("end", None)."""

    def __init__(self, work: Callable[[Job], Any], cancellable: bool = True):
        self.work = work
        self.cancellable = cancellable
        self.events: queue.Queue = queue.Queue()
        self.cancel_requested = threading.Event()
        self.finished = threading.Event()
        self.started = False

    def emit(self, kind: str, payload: Any = None) -> None:
        self.events.put((kind, payload))

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set()

    def start(self, gpu: GpuQueue) -> Job:
        ticket = gpu.join()  # in the caller's thread, so the order of clicks is the order of the line
        threading.Thread(target=self._run, args=(gpu, ticket), daemon=True, name="infinite-talk-job").start()
        return self

    def _run(self, gpu: GpuQueue, ticket: int) -> None:
        try:
            last = None
            while not gpu.wait_turn(ticket, 0.25):
                if self.cancel_requested.is_set():
                    self.emit("cancelled", "cancelled while waiting for the GPU; nothing was generated")
                    return
                ahead = gpu.ahead(ticket)
                if ahead != last:
                    self.emit("waiting", ahead)
                    last = ahead
            self.started = True
            self.emit("started")
            self.emit("done", self.work(self))
        except CancelledError as err:
            self.emit("cancelled", str(err))
        except BaseException as err:  # reported in the page; the server keeps running
            if not isinstance(err, InfiniteTalkError):  # a user-fixable error needs no traceback in the log
                log.error("job failed", exc_info=err)
            self.emit("failed", err)
        finally:
            gpu.leave(ticket)
            self.finished.set()
            self.emit("end")

    def iter_events(self, poll_s: float = 0.5):
        """Events until ("end", None); yields ("tick", None) when nothing happened for `poll_s`."""
        while True:
            try:
                kind, payload = self.events.get(timeout=poll_s)
            except queue.Empty:
                yield "tick", None
                continue
            yield kind, payload
            if kind == "end":
                return


class BusyError(InfiniteTalkError):
    """This page already has a job running or waiting."""


class Studio:
    """The server's state: the capability probe, the model files found, the pipeline and the jobs."""

    def __init__(self, preset: str | None = None, models_dir: str | None = None, output_dir: str | Path = "outputs",
                 caps=None, data_dir: str | Path | None = None):
        from ..model_files import discover
        from ..pipeline import InfiniteTalkPipeline
        from ..plan.probe import probe

        self.caps = caps if caps is not None else probe()
        self.preset = preset
        self.models_dir = str(Path(models_dir).resolve()) if models_dir else None
        self.found = discover(self.models_dir) if self.models_dir else {}
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = InfiniteTalkPipeline()
        self.gpu = GpuQueue()
        self.calibration: dict | None = None
        self.last_peak_gib: float | None = None
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.store = None  # with --data-dir: runs go to the job service's queue in that folder
        if data_dir is not None:
            from ..service.store import JobStore

            self.store = JobStore(data_dir)

    # ---- state ----------------------------------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        p = self.pipeline
        return all(getattr(p, n) is not None for n in ("transformer", "vae", "text_encoder", "image_encoder",
                                                        "audio_encoder"))

    def require_models(self) -> None:
        if self.store is not None:  # the service process that runs the queue holds the models
            return
        if not self.loaded:
            raise NotLoadedError("No models are loaded: press 'Load models' in the model panel first")

    def statuses(self, options: LoadOptions) -> dict[str, list[ChoiceStatus]]:
        return choice_status(options, self.caps)

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def submit(self, key: str, work: Callable[[Job], Any], cancellable: bool = True) -> Job:
        with self._lock:
            old = self._jobs.get(key)
            if old is not None and not old.finished.is_set():
                raise BusyError("this page already has a job running or waiting: wait for it or cancel it")
            job = Job(work, cancellable)
            self._jobs[key] = job
        return job.start(self.gpu)

    def cancel(self, key: str) -> str:
        job = self._jobs.get(key)
        if job is None or job.finished.is_set():
            return "Nothing to cancel: no generation is running or waiting for this page."
        if not job.cancellable:
            return "Loading models cannot be stopped halfway; it finishes on its own."
        job.cancel_requested.set()
        if not job.started:
            return "Cancelling: the job leaves the queue."
        return "Cancelling: the run stops before the next step; finished chunks are kept."

    def new_output_path(self) -> Path:
        folder = self.output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder.mkdir(parents=True)
        return folder / "talk.mp4"

    # ---- work on the GPU turn -------------------------------------------------------------------------------------
    def load(self, options: LoadOptions, say: Callable[[str], None]) -> dict:
        """Replace the loaded models (refused options fail here, before the old models are dropped); what was loaded,
        as the load panel shows it."""
        preflight(options, self.caps)
        if self.loaded:
            say("unloading the previous models")
        self._unload()
        return self.pipeline.load_models(options, progress=say).as_dict()

    def _unload(self) -> None:
        from ..pipeline import InfiniteTalkPipeline

        self.pipeline = InfiniteTalkPipeline()  # the old one's tensors go with it (two 14B copies do not fit)
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # memory hygiene only
            pass

    def run_generation(self, request: GenerateOptions, progress=None, on_chunk=None, should_stop=None):
        """The one run path: this server's pipeline, or with `--data-dir` the job service's queue."""
        if self.store is not None:
            return self._run_via_queue(request, progress, should_stop)
        import torch

        cuda = self.pipeline.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.pipeline.device)
        result = self.pipeline.generate(request, progress=progress, on_chunk=on_chunk, should_stop=should_stop)
        if cuda:
            self.last_peak_gib = torch.cuda.max_memory_allocated(self.pipeline.device) / 2**30
        self._calibrate(request, result.sidecar)
        return result

    def _run_via_queue(self, request: GenerateOptions, progress=None, should_stop=None, poll_s: float = 0.3):
        """Submit to the job service's queue (`infinite-talk serve --data-dir` runs it), follow the job, then copy
        its mp4 and sidecar to `request.out`. Chunk previews are not available this way."""
        import dataclasses
        import json
        import shutil

        from ..pipeline import GenerateResult
        from ..sampling.windows import FPS
        from ..service.store import FINAL_STATES
        from ..service.worker import SIDECAR_NAME, VIDEO_NAME

        stopped = (f"no `infinite-talk serve --data-dir {self.store.root}` is running to work the queue; start one "
                   "(submitted jobs wait for it)")
        if not self.store.runner_active():  # refuse rather than wait on a queue nobody works
            raise InfiniteTalkError(stopped)
        unset = {"image": None, "video": None, "audio": None, "audio2": None, "out": None}
        job = self.store.submit(Path(request.image or request.video), Path(request.audio),
                                Path(request.audio2) if request.audio2 else None,
                                options=dataclasses.replace(request, **unset))
        while job.state not in FINAL_STATES:
            if should_stop is not None and should_stop() and not job.cancel_requested:
                self.store.cancel(job.id)
            if progress is not None and job.state == "running" and job.progress:
                progress(job.progress)
            time.sleep(poll_s)
            job = self.store.get(job.id)
            if job.state not in FINAL_STATES and not self.store.runner_active():
                raise InfiniteTalkError(f"{stopped}; job {job.id} is kept and continues when it restarts")
        folder, out = self.store.folder(job.id), Path(request.out)
        for name, dest in ((VIDEO_NAME, out), (SIDECAR_NAME, out.with_suffix(".json"))):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest)
        if job.state == "cancelled":
            raise CancelledError(f"cancelled; the {job.frames or 0} finished frames are in {out}")
        if job.state == "failed":
            raise InfiniteTalkError(f"the job service could not make this video: {job.error}")
        sidecar = json.loads(out.with_suffix(".json").read_text())
        return GenerateResult(out, out.with_suffix(".json"), job.frames, job.frames / FPS, job.seed, sidecar)

    def _calibrate(self, request: GenerateOptions, sidecar: dict) -> None:
        """Seconds per model call and per chunk of the last run, for the time estimate of the next request."""
        timings = sidecar.get("timings_s", {})
        calls = sidecar.get("effective", {}).get("model_calls") or 0
        chunks = sidecar.get("output", {}).get("chunks_done") or 0
        if calls and chunks and "denoise" in timings:
            self.calibration = {
                "size": request.size,
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
