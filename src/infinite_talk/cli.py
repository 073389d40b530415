"""`infinite-talk` command line: generate, doctor (and ui / serve when installed).

Flags are built from the one options schema (`options.py`, read by `flags.py`), so the CLI offers exactly what the UI
and API offer.
Every user-fixable failure prints one clear `error:` line and exits non-zero; no tracebacks unless --debug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import InfiniteTalkError, InputError, Interrupted
from .flags import add_schema, given_values
from .library_messages import filter_library_noise
from .model_files import check_model_source
from .options import GenerateOptions, LoadOptions


def _resolve_path(value: str, json_dir: Path) -> str:
    p = Path(value)
    if p.is_absolute() or p.exists():
        return str(p)
    return str(json_dir / p)


def from_reference_json(path: str) -> dict:
    """The reference's input JSON (prompt, cond_video, cond_audio{person1,person2}, audio_type, bbox)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the input JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: the input JSON must be an object with prompt, cond_video and cond_audio")
    base = Path(path).resolve().parent
    audio = data.get("cond_audio") or {}
    if not isinstance(audio, dict) or not audio:
        raise InputError(f"{path}: cond_audio must name at least person1's audio file")
    if len(audio) > 2:
        raise InputError(f"{path}: {len(audio)} speakers given; InfiniteTalk supports one or two speakers")
    if "cond_video" not in data:
        raise InputError(f"{path}: cond_video (the reference image or video) is missing")
    from .media.frames import FrameSource

    reference = _resolve_path(data["cond_video"], base)
    values: dict = {"prompt": data.get("prompt") or GenerateOptions.prompt}
    values["video" if FrameSource(reference).is_video else "image"] = reference
    persons = [audio[k] for k in sorted(audio)]
    values["audio"] = _resolve_path(persons[0], base)
    if len(persons) == 2:
        values["audio2"] = _resolve_path(persons[1], base)
        values["audio_mode"] = data.get("audio_type", "para")
    if data.get("bbox"):
        values["bbox"] = [data["bbox"][k] for k in sorted(data["bbox"])]
    return values


def _progress_printer():
    last = {"t": 0.0}

    def show(info: dict) -> None:
        now = time.monotonic()
        final = info["chunk"] == info["chunks"] and info["step"] == info["steps"]
        if now - last["t"] < 0.5 and not final:
            return
        last["t"] = now
        print(f"chunk {info['chunk']}/{info['chunks']} · step {info['step']}/{info['steps']} · "
              f"{info['passes']} passes · elapsed {info['elapsed_s']:.1f}s · ETA {info['eta_s']:.1f}s"
              + (f" · {info['cache_skips']} forwards skipped by the step cache" if info.get("cache_skips") else ""),
              file=sys.stderr, flush=True)

    return show


def _generate_options(ns: argparse.Namespace) -> tuple[LoadOptions, GenerateOptions]:
    from .presets.fast import apply_mode

    base = from_reference_json(ns.input_json) if ns.input_json else {}
    # a --mode preset fills only the values not given explicitly; the plan shows what it set
    load_values, generate_values = apply_mode(given_values(LoadOptions, ns), given_values(GenerateOptions, ns, base))
    return LoadOptions(**load_values).validate(), GenerateOptions(**generate_values).validate()


def cmd_generate(ns: argparse.Namespace) -> int:
    from .media.request_check import check_request
    from .parallel.launch import world_from_env

    world = world_from_env()
    if not world.is_leader:  # another process of a torchrun job: runs rank 0's transformer calls, writes nothing
        from .follower import run_follower

        return run_follower(lambda: _generate_options(ns)[0], world, ns.debug, ns.dry_run)
    load, request = _generate_options(ns)
    checked = None
    if not ns.dry_run:  # every input and the output, before the model libraries are even imported
        checked = check_request(request)
        for note in checked.notes:
            print("note: " + note, file=sys.stderr)
        check_model_source(load)  # no models here and no way to download them: say so before any loading
    from .pipeline import InfiniteTalkPipeline
    from .presets.fast import plan_lines as mode_lines
    from .request_plan import plan_request

    pipe = InfiniteTalkPipeline()
    if ns.dry_run:
        print(json.dumps({**plan_request(request).as_dict(), "mode_lines": mode_lines(load, request)}, indent=2))
        return 0
    try:
        plan = pipe.load_models(load, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print("plan:", file=sys.stderr)
        for line in plan.lines:
            print("  " + line, file=sys.stderr)
        for line in mode_lines(load, request, sampling_only=True):
            print("  " + line, file=sys.stderr)
        for note in plan.notes:
            print("note: " + note, file=sys.stderr)
        result = pipe.generate(request, progress=_progress_printer(), checked=checked)
    finally:
        pipe.release_processes()  # a torchrun job's other processes stop with rank 0
    eff = result.sidecar["effective"]
    for note in result.sidecar.get("notes", []):
        if note not in checked.notes:
            print("note: " + note, file=sys.stderr)
    print(f"wrote {result.video_path} ({result.frames} frames, {result.duration_s:.2f} s, seed {result.seed}, "
          f"{eff['scheduler']} {eff['steps']} steps × {eff['passes_per_step']} passes) and {result.sidecar_path}")
    return 0


def cmd_doctor(ns: argparse.Namespace) -> int:
    from .plan.doctor import doctor_report
    from .plan.probe import probe

    print(doctor_report(probe()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinite-talk", description="Lip-synced talking video of any length.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="make a talking video")
    gen.add_argument("--input-json", help="the reference's input JSON (prompt, cond_video, cond_audio, ...)")
    gen.add_argument("--dry-run", action="store_true", help="print the plan for the request and exit")
    add_schema(gen, LoadOptions)
    add_schema(gen, GenerateOptions)
    gen.set_defaults(func=cmd_generate)
    doc = sub.add_parser("doctor", help="what this machine can run, with the reason for everything it cannot")
    doc.set_defaults(func=cmd_doctor)
    try:
        from .ui.app import add_cli as add_ui
    except ImportError:
        add_ui = None
    if add_ui is not None:
        add_ui(sub)
    try:
        from .service.app import add_cli as add_serve
    except ImportError:
        add_serve = None
    if add_serve is not None:
        add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    filter_library_noise()
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except InfiniteTalkError as err:
        notes = "; ".join(getattr(err, "__notes__", ()))  # e.g. what a run that failed midway kept
        print(f"error: {err}" + (f"; {notes}" if notes else ""), file=sys.stderr)
        return 2
    except Interrupted as err:  # stopped during generation: the message says what was kept
        print(str(err), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted before any frame was generated; no video was written", file=sys.stderr)
        return 130
    except Exception as err:
        if ns.debug:
            raise
        notes = "; ".join(getattr(err, "__notes__", ()))
        print(f"internal error: {type(err).__name__}: {err} (run with --debug for details and report it)"
              + (f"; {notes}" if notes else ""), file=sys.stderr)
        return 1


def run() -> None:
    """The `infinite-talk` command: `main`, then exit; a torchrun job's other processes exit without teardown
    (`parallel.launch.exit_process`)."""
    from .parallel.launch import exit_process, world_from_env

    code = main()
    try:
        follower = not world_from_env().is_leader
    except InfiniteTalkError:  # malformed launcher variables: main() has said so already
        follower = False
    if follower:
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
