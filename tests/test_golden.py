"""Every golden case in tests/data/golden must pass once its component is implemented.

Cases of components not implemented yet are skipped with that reason (the runner never counts them as passed).
"""

from pathlib import Path

import pytest

from infinite_talk.testing.golden import component_module, find_cases, main, run_case

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = find_cases([GOLDEN])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_case(case):
    if component_module(case.component) is None:
        pytest.skip(f"component {case.component} not implemented")
    result = run_case(case)
    assert result.status == "passed", result.line()


def test_runner_reports_counts_and_fails_on_a_broken_case(tmp_path, capsys):
    # A copy of a schedule case whose expected values are wrong must fail and make the exit status non-zero.
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = GOLDEN / "schedule_4steps_shift5"
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    expected = load_file(str(dst / "expected.safetensors"))
    expected["timesteps"] = expected["timesteps"] + 1.0
    save_file(expected, str(dst / "expected.safetensors"))
    unknown = tmp_path / "unknown_component"
    shutil.copytree(src, unknown)
    spec = json.loads((unknown / "case.json").read_text())
    spec["component"] = "no_such_component"
    (unknown / "case.json").write_text(json.dumps(spec))

    status = main([str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert "SKIP unknown_component [no_such_component]: component not implemented" in out
    assert status == 1
    assert out[-1] == "0 passed, 1 failed, 1 skipped"
    assert any(line.startswith("FAIL broken [schedule]: timesteps rel_l2=") for line in out)
    assert main([str(GOLDEN / "schedule_4steps_shift5")]) == 0
