"""Library log lines that mean nothing to a user, filtered at the entry points (the CLI, `ui.app.launch`, `serve`).

Each entry names the logger, the start of the message, and what to show instead (None: nothing). A message a user
can act on is said in our words; the rest is dropped. Only these exact messages are touched: any other warning of
these libraries still shows.
"""

from __future__ import annotations

import logging

# (logger name, message start, replacement or None)
RULES: tuple[tuple[str, str, str | None], ...] = (
    # torchao's optional compiled kernels built for other CUDA/Python versions; the plan probes what really runs
    ("torchao", "Failed to load ", None),
    # torchao built for another torch: its fast kernels are off, and the quantized paths it serves may be slower
    ("torchao", "Skipping import of cpp extensions due to incompatible torch version",
     "note: the installed torchao does not match this torch version, so its compiled kernels are off (quantized "
     "runs may be slower); install the torchao release made for this torch"),
    # diffusers' loader for checkpoints serialized by torchao: this tool never reads such files
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects", None),
    # torchao registers Enums with torch's pytree; a deprecation addressed to torchao's developers
    ("torch.utils._pytree", "%s is an Enum subclass", None),
    # torchao without Triton: its Triton matmul kernels are off; on a GPU the user can install it
    ("torchao.kernel.intmm", "Warning: Detected no triton",
     "note: Triton is not installed, so torchao's Triton kernels are unavailable (the plan shows what runs instead); "
     "on a CUDA machine, pip install triton to use them"),
    # the plan line 'attention: ... → ...' already says which attention backend runs
    ("diffusers.models.modeling_utils", "Attention backends are an experimental feature", None),
)


class _Rule(logging.Filter):
    def __init__(self, start: str, replacement: str | None):
        super().__init__()
        self.start, self.replacement = start, replacement

    def filter(self, record: logging.LogRecord) -> bool | logging.LogRecord:
        text = record.msg if isinstance(record.msg, str) else ""
        if not (text.startswith(self.start) or record.getMessage().startswith(self.start)):
            return True
        if self.replacement is None:
            return False
        record.msg, record.args = self.replacement, ()
        return True


_installed = False


def filter_library_noise() -> None:
    """Install the filters once (before the libraries are imported: some speak while importing)."""
    global _installed
    if _installed:
        return
    for name, start, replacement in RULES:
        logging.getLogger(name).addFilter(_Rule(start, replacement))
    _installed = True
