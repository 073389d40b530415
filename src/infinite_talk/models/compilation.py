"""torch.compile of the transformer: one compiled block reused by all 40, and a compile cache that outlives the process.

Regional compilation (diffusers' `compile_repeated_blocks`): every `InfiniteTalkBlock` (the class the model's
`_repeated_blocks` names) is compiled with the same code, so Dynamo traces it once and the other blocks reuse that
graph (their weights are graph inputs), instead of compiling the whole model as one graph. Inductor's caches (FX graphs, AOTAutograd, Triton kernels) live under
the project's cache directory (`cache.py`: $INFINITE_TALK_CACHE or ~/.cache/infinite_talk) unless the user set
TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR: a second process with the same shapes and versions loads the compiled
kernels instead of compiling them again.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import ModelMixin

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


def compile_blocks(transformer: ModelMixin, cache: bool = True) -> int:
    """Compile each repeated block of `transformer` in place (one graph shared by all); returns how many."""
    if cache:
        use_compile_cache()
    transformer.compile_repeated_blocks()
    names = set(transformer._repeated_blocks)
    return sum(type(m).__name__ in names for m in transformer.modules())
