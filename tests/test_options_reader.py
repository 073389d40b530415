"""One schema reader: the same raw value gives the same typed value, or the same refusal (same option and value),
through the CLI's flags, the web UI's widgets and the job API's JSON; validate() refuses wrong types by name; the
planner's refusals say which option they are about."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infinite_talk.cli import _generate_options, build_parser
from infinite_talk.cli import main as cli_main
from infinite_talk.errors import OptionError
from infinite_talk.flags import flag_name
from infinite_talk.options import GenerateOptions, LoadOptions, read
from infinite_talk.plan.planner import resolve
from infinite_talk.plan.probe import Capabilities
from infinite_talk.service.uploads import UploadRefused, parse_options
from infinite_talk.testing.machines import simulated
from infinite_talk.ui import controls as C

CPU = simulated("cpu")
H100 = simulated("h100")
T4 = Capabilities.from_dict({"gpus": [{"name": "Tesla T4", "capability": [7, 5], "total_memory_gib": 14.6}],
                             "cuda_version": "12.4", "kernels": {"sdpa_math": True, "sdpa_efficient": True}})


def _cli(name: str, raw: str) -> GenerateOptions:
    tokens = raw.split() if name == "bbox" and ";" not in raw else [raw]
    return _generate_options(build_parser().parse_args(["generate", flag_name(name), *tokens]))[1]


def _ui(name: str, raw) -> GenerateOptions:
    return C.request_from_form(C.TASK_IMAGE, {name: raw})


def _service(name: str, raw) -> GenerateOptions:
    try:
        return parse_options(json.dumps({name: raw}))
    except UploadRefused as err:
        assert isinstance(err.__cause__, OptionError) and str(err) == f"options: {err.__cause__}"
        raise err.__cause__ from None


SURFACES = {"cli": _cli, "ui": _ui, "service": _service}

# (field, raw text as typed on the command line, in a widget or sent in JSON, typed value)
SAME_VALUE = [
    ("steps", "8", 8),
    ("steps", " 12 ", 12),
    ("text_scale", "1.5", 1.5),
    ("audio_scale", "2", 2.0),
    ("seed", "42", 42),
    ("size", "720", 720),
    ("max_seconds", "2.5", 2.5),
    ("scheduler", "unipc", "unipc"),
    ("prompt", "two people talk", "two people talk"),
    ("bbox", "0 0 100 200; 0 200 100 400", [[0, 0, 100, 200], [0, 200, 100, 400]]),
    ("bbox", "[1, 2, 3, 4]", [[1, 2, 3, 4]]),
    ("bbox", "[[0,0,100,200],[0,200,100,400]]", [[0, 0, 100, 200], [0, 200, 100, 400]]),  # JSON text
]


@pytest.mark.parametrize(("name", "raw", "typed"), SAME_VALUE)
def test_the_same_raw_value_gives_the_same_typed_value_everywhere(name, raw, typed):
    for surface, read_through in SURFACES.items():
        value = getattr(read_through(name, raw), name)
        assert value == typed and type(value) is type(typed), (surface, value)


# (field, raw text, the refusal's message)
SAME_REFUSAL = [
    ("steps", "many", "steps: 'many' must be a whole number"),
    ("seed", "1.5", "seed: '1.5' must be a whole number"),
    ("steps", "0", "steps: 0 is outside [1, 1000]"),
    ("text_scale", "nan", "text_scale: 'nan' is not a finite number"),
    ("shift", "abc", "shift: 'abc' is not a number"),
    ("scheduler", "magic", "scheduler: unknown value 'magic'; choose one of: euler, unipc, dpm++, distill4"),
    ("size", "1080", "size: unknown value 1080; choose one of: 480, 720"),
    ("bbox", "1 2 3", "bbox: box 1 ('1 2 3') must be 4 whole numbers row_min, col_min, row_max, col_max"),
    ("frame_num", "80", "frame_num must be 4n+1 (e.g. 81), got 80"),
]


@pytest.mark.parametrize(("name", "raw", "message"), SAME_REFUSAL)
def test_the_same_raw_value_gives_the_same_refusal_everywhere(name, raw, message):
    refusals = {}
    for surface, read_through in SURFACES.items():
        with pytest.raises(OptionError) as caught:
            read_through(name, raw)
        refusals[surface] = (caught.value.option, caught.value.value, str(caught.value))
    assert len(set(map(repr, refusals.values()))) == 1, refusals
    option, _, text = refusals["cli"]
    assert option == name and text.startswith(message)


def test_widget_and_json_values_of_their_own_types_read_the_same():
    # a number box gives floats, a checkbox a bool, JSON numbers and lists: typed values as the text gives them
    assert _ui("steps", 4.0).steps == _service("steps", 4).steps == _cli("steps", "4").steps == 4
    assert _ui("use_apg", True).use_apg is _service("use_apg", True).use_apg is True
    assert _service("bbox", [[0, 0, 10, 10]]).bbox == _cli("bbox", "0 0 10 10").bbox == [[0, 0, 10, 10]]
    with pytest.raises(OptionError, match="use_apg: 1 must be true or false") as caught:
        _service("use_apg", 1)
    assert (caught.value.option, caught.value.value) == ("use_apg", 1)
    with pytest.raises(OptionError, match=r"bbox: \[0, 0, 10, 10\] must be \[\[row_min") as caught:
        _service("bbox", [0, 0, 10, 10])  # a box, not a list of boxes
    assert caught.value.option == "bbox"
    with pytest.raises(OptionError, match="steps: 4.5 must be a whole number"):
        _ui("steps", 4.5)


def test_empty_or_null_keeps_the_default_everywhere():
    default = GenerateOptions()
    assert _ui("steps", "").steps == _ui("steps", None).steps == _service("steps", None).steps == default.steps
    assert _ui("seed", " ").seed is None and _service("seed", None).seed is None
    cli = _generate_options(build_parser().parse_args(["generate"]))[1]
    assert cli == default


def test_validate_refuses_wrong_types_by_name():
    cases = [(GenerateOptions(steps="4"), "steps", "steps: '4' must be a whole number, not str"),
             (GenerateOptions(text_scale=float("inf")), "text_scale", "text_scale: inf is not a finite number"),
             (GenerateOptions(use_apg="yes"), "use_apg", "use_apg: 'yes' must be true or false, not str"),
             (GenerateOptions(bbox=[[1, 2, 3]]), "bbox", "bbox: [[1, 2, 3]] must be [[row_min"),
             (GenerateOptions(prompt=None), "prompt", "prompt: None must be text, not NoneType"),
             (LoadOptions(lora="a.safetensors"), "lora", "lora: 'a.safetensors' must be a list of text entries"),
             (LoadOptions(ulysses=2.0), "ulysses", "ulysses: 2.0 must be a whole number, not float")]
    for options, name, message in cases:
        with pytest.raises(OptionError) as caught:
            options.validate()
        assert caught.value.option == name and str(caught.value).startswith(message), str(caught.value)
        assert caught.value.value == getattr(options, name)


def test_paths_may_be_path_objects_and_are_read_as_text():
    assert read(LoadOptions, {"vae": Path("/m/vae.pth")}).vae == "/m/vae.pth"
    assert LoadOptions(vae=Path("/m/vae.pth")).validate().vae == Path("/m/vae.pth")
    with pytest.raises(OptionError, match="vae: 5 must be text") as caught:
        read(LoadOptions, {"vae": 5})
    assert (caught.value.option, caught.value.value) == ("vae", 5)


def test_unknown_names_are_refused_with_the_name():
    with pytest.raises(OptionError, match="unknown option.*: stepz") as caught:
        read(GenerateOptions, {"stepz": 4})
    assert (caught.value.option, caught.value.value) == ("stepz", 4)


def test_load_options_read_the_same_from_flags_and_the_model_panel():
    args = ["generate", "--preset", "tiny", "--attention", "sdpa", "--ulysses", "1", "--compile",
            "--lora", "a.safetensors", "--lora", "b.safetensors:0.5"]
    cli = _generate_options(build_parser().parse_args(args))[0]
    ui = C.load_options_from_form(C.SOURCE_TINY, {"attention": "sdpa", "ulysses": 1.0, "compile": True,
                                                  "lora": "a.safetensors\nb.safetensors:0.5\n"}, None)
    assert cli == ui and cli.lora == ["a.safetensors", "b.safetensors:0.5"] and cli.ulysses == 1
    with pytest.raises(OptionError) as caught:
        C.load_options_from_form(C.SOURCE_TINY, {"ulysses": "two"}, None)
    assert (caught.value.option, caught.value.value) == ("ulysses", "two")


def test_a_cli_type_error_is_one_line_naming_the_flag(capsys):
    assert cli_main(["generate", "--dry-run", "--steps", "x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: steps: 'x' must be a whole number" and "usage:" not in err


@pytest.mark.parametrize(("options", "caps", "option", "value"), [
    (LoadOptions(attention="flash_attn_3"), CPU, "attention", "flash_attn_3"),
    (LoadOptions(quantization="fp4"), H100, "quantization", "fp4"),
    (LoadOptions(device="cuda:3"), CPU, "device", "cuda:3"),
    (LoadOptions(device="tpu"), CPU, "device", "tpu"),
    (LoadOptions(model_precision="bf16"), T4, "model_precision", "bf16"),
    (LoadOptions(model_precision="fp32", attention="flash_attn_3"), H100, "attention", "flash_attn_3"),
    (LoadOptions(offload="blocks:4", device="cpu"), CPU, "offload", "blocks:4"),
    (LoadOptions(ulysses=2), CPU, "ulysses", 2),
])
def test_planner_refusals_carry_the_option_and_value(options, caps, option, value):
    with pytest.raises(OptionError) as caught:
        resolve(options, caps)
    assert (caught.value.option, caught.value.value) == (option, value)
    assert str(caught.value).startswith(f"{option}={value}:")


def test_the_ui_blames_the_refused_option_by_its_attribute():
    # flash_attn_3 is refused on this CPU: every other option's values are judged with it set back to its default,
    # which needs the refusal's `option` (without it every value of every option would show the same refusal)
    statuses = C.choice_status(LoadOptions(attention="flash_attn_3"), CPU)
    assert all(s.available for s in statuses["model_precision"]) and all(s.available for s in statuses["vae_tiling"])
    fa3 = next(s for s in statuses["attention"] if s.value == "flash_attn_3")
    assert not fa3.available and fa3.reason.startswith("needs a Hopper GPU")


def test_refusals_below_the_planner_carry_the_option_and_value_too():
    from infinite_talk.media.frames import bucket_for
    from infinite_talk.sampling import schedules, step_cache
    from infinite_talk.sampling.guidance import passes_for
    from infinite_talk.sampling.windows import chunk_count

    cases = [(lambda: bucket_for(512, 512, 1080), "size", 1080),
             (lambda: passes_for(5.0, -1.0), "audio_scale", -1.0),
             (lambda: chunk_count(100, frame_num=80), "frame_num", 80),
             (lambda: step_cache.describe("magic", None, 480, 4), "step_cache", "magic")]
    for refuse, option, value in cases:
        with pytest.raises(OptionError) as caught:
            refuse()
        assert (caught.value.option, caught.value.value) == (option, value), str(caught.value)
    with pytest.raises(OptionError) as caught:
        schedules.make_sampler("ddim", 4, 5.0)
    assert (caught.value.option, caught.value.value) == ("scheduler", "ddim")
