"""One resolved option: what was asked, what will run, and why (the planner's and the memory plan's answer)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Resolved:
    requested: str
    effective: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)
