"""Golden-case runner.

    python -m infinite_talk.testing.golden DIR [DIR ...] [--component NAME ...]

Every folder (at any depth) under the given directories that holds a `case.json` is a case (format:
tests/data/golden/README.md). For each case the component's code runs on the case's weights and inputs and
every `compare` key is checked: ||ours - expected||_2 / ||expected||_2 <= tolerance. One line per case, then
`N passed, M failed, K skipped`. The exit status is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class GoldenCase:
    """One case folder, with lazily loaded tensors (float32)."""

    path: Path
    spec: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def component(self) -> str:
        return self.spec["component"]

    @property
    def config(self) -> dict:
        return self.spec.get("config", {})

    @property
    def meta(self) -> dict:
        return self.spec.get("inputs_meta", {})

    @property
    def tolerance(self) -> float:
        return float(self.spec["tolerance"]["rel_l2"])

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        rel = self.spec["files"].get(key)
        if not rel:
            return {}
        return {k: v.float() for k, v in load_file(str(self.path / rel)).items()}

    def weights(self) -> dict[str, torch.Tensor]:
        return self._load("weights")

    def weights_path(self) -> Path | None:
        rel = self.spec["files"].get("weights")
        return (self.path / rel).resolve() if rel else None

    def inputs(self) -> dict[str, torch.Tensor]:
        return self._load("inputs")

    def expected(self) -> dict[str, torch.Tensor]:
        return self._load("expected")


@dataclass
class CaseResult:
    case: GoldenCase
    status: str  # "passed" | "failed" | "skipped"
    errors: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    def line(self) -> str:
        tol = self.case.tolerance
        if self.status == "skipped":
            return f"SKIP {self.case.name} [{self.case.component}]: {self.detail}"
        errs = ", ".join(f"{k} rel_l2={v:.3e}" for k, v in self.errors.items())
        tag = "PASS" if self.status == "passed" else "FAIL"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{tag} {self.case.name} [{self.case.component}]: {errs or '-'} tolerance={tol:g}{extra}"


def rel_l2(ours: torch.Tensor, expected: torch.Tensor) -> float:
    ours = ours.detach().double().cpu()
    expected = expected.double()
    if ours.shape != expected.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != expected {tuple(expected.shape)}")
    den = expected.norm().item()
    num = (ours - expected).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def find_cases(roots: list[Path]) -> list[GoldenCase]:
    cases = []
    for root in roots:
        for case_json in sorted(Path(root).rglob("case.json")):
            cases.append(GoldenCase(case_json.parent, json.loads(case_json.read_text())))
    return cases


def component_module(component: str):
    """The implementation module of a component, or None when the project does not implement it."""
    name = f"infinite_talk.testing.golden_cases.{component}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            return None
        raise


def run_case(case: GoldenCase) -> CaseResult:
    try:
        module = component_module(case.component)
    except Exception as err:  # an import error inside an implemented component is a failure
        return CaseResult(case, "failed", detail=f"import error: {err!r}")
    if module is None:
        return CaseResult(case, "skipped", detail="component not implemented")
    try:
        with torch.no_grad():
            ours = module.run(case)
        expected = case.expected()
        errors = {key: rel_l2(ours[key], expected[key]) for key in case.spec["compare"]}
    except Exception as err:
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        return CaseResult(case, "failed", detail=f"{type(err).__name__}: {err} [{tb}]")
    ok = all(err <= case.tolerance for err in errors.values())
    return CaseResult(case, "passed" if ok else "failed", errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infinite_talk.testing.golden", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="folders holding golden case folders")
    parser.add_argument("--component", action="append", default=None, help="only cases of this component (repeat)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cases = find_cases(args.dirs)
    if args.component:
        cases = [c for c in cases if c.component in set(args.component)]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        result = run_case(case)
        counts[result.status] += 1
        print(result.line(), flush=True)
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
