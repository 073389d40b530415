"""torch.compile of the transformer: one compiled block reused by all 40, and a compile cache that outlives the process.

Regional compilation: every `InfiniteTalkBlock` (the class diffusers' `_repeated_blocks` names) is compiled with the
same code, so Dynamo traces it once and the other blocks reuse that graph (their weights are graph inputs), instead
of compiling the whole model as one graph. Inductor's caches (FX graphs, AOTAutograd, Triton kernels) live under
the project's cache directory (`cache.py`: $INFINITE_TALK_CACHE or ~/.cache/infinite_talk) unless the user set
TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR: a second process with the same shapes and versions loads the compiled
kernels instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from ..cache import cache_root


def _inductor_default() -> str | None:
    """Inductor's own default cache folder: Inductor writes it into TORCHINDUCTOR_CACHE_DIR when it first needs a
    cache (importing torchao does), so that value means 'not chosen by the user'."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return default_cache_dir()


def use_compile_cache(root: Path | None = None) -> dict[str, str]:
    """Point Inductor's and Triton's caches under `root` (default: the project's `compile/` cache) unless the user
    chose their own; returns the two directories in use. Runs before the first compilation of the process."""
    base = Path(root) if root is not None else cache_root() / "compile"
    defaults = {"TORCHINDUCTOR_CACHE_DIR": _inductor_default(), "TRITON_CACHE_DIR": None}
    dirs = {}
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        if os.environ.get(var) in (None, "", defaults[var]):
            os.environ[var] = str(base / sub)
        dirs[var] = os.environ[var]
        Path(dirs[var]).mkdir(parents=True, exist_ok=True)
    return dirs


def compile_blocks(transformer: nn.Module, cache: bool = True) -> int:
    """Compile each repeated block of `transformer` in place (one graph shared by all); returns how many."""
    if cache:
        use_compile_cache()
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    count = 0
    for module in transformer.modules():
        if type(module).__name__ in names:
            module.compile()
            count += 1
    return count
