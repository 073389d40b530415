"""Where the transformer's weights live, as the planner resolved it: `Offload(kind, blocks, swap)`.

The `offload` option's text is parsed once, by the memory plan (plan/memory.py); the loader and models/offload.py
take this object. `swap` says how swapped blocks travel, decided from the quantization mode: diffusers' group
offloading for plain weights, our compact copy for quantized (torchao) weights (models/offload.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionError
from ..options import parse_offload

SWAPS = ("diffusers", "compact")


def swap_for(quantization: str) -> str:
    """How swapped blocks of a transformer quantized with `quantization` ("disabled" or a resolved mode) travel."""
    return "diffusers" if quantization == "disabled" else "compact"


@dataclass(frozen=True)
class Offload:
    kind: str = "none"  # "none" | "blocks" | "sequential"
    blocks: int = 0  # blocks kept in host memory (kind "blocks")
    swap: str = ""  # how swapped blocks travel (kind "blocks"): see `swap_for`; sequential is diffusers' leaf level

    @classmethod
    def parse(cls, text: str, num_blocks: int, quantization: str = "disabled") -> Offload:
        """A resolved setting's text (`none`, `blocks:N`, `sequential`); `auto` is the planner's to resolve."""
        kind, n = parse_offload(text, num_blocks)
        if kind == "auto":
            raise OptionError("offload=auto: 'auto' must be resolved by the planner first")
        return cls(kind, n, swap_for(quantization) if kind == "blocks" else "")

    @property
    def swapping(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        return f"blocks:{self.blocks}" if self.kind == "blocks" else self.kind
