"""What this machine's processor can do, read at run time: the training precision ``auto`` resolves to.

The CPU model changes between machines (AVX2 only on one, AVX-512 with BF16 and AMX on another), so
bf16 mixed precision is chosen from the CPU's flags (``/proc/cpuinfo``), never assumed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
AUTO = "auto"


@lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor (empty where the file is not there)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def resolve_precision(value, *, flags: frozenset[str] | None = None, cuda: bool | None = None) -> str:
    """``trainer.precision``: ``auto`` is ``bf16-mixed`` on a GPU or on a CPU with AVX512-BF16 or AMX-BF16,
    else ``32-true``; any other value is Lightning's, returned as it is."""
    if str(value) != AUTO:
        return str(value)
    if cuda is None:
        cuda = torch.cuda.is_available()
    flags = cpu_flags() if flags is None else flags
    return "bf16-mixed" if cuda or any(f in flags for f in BF16_FLAGS) else "32-true"


class ChannelsLast(Callback):
    """Train the module in channels_last (NHWC) memory format, where oneDNN (CPU) and cuDNN
    convolutions may run faster. The weights go back to the default format when the fit ends or
    fails, so saved models and every measurement see the same tensors as without it. Off by default
    (``trainer.callbacks.channels_last``): ``torch.nn.utils.prune``'s masks (``l1_static``,
    ``l1_dynamic``) call ``.view(-1)`` on the weights, which NHWC weights refuse.
    ``benchmarks/bench_precision.py`` measures whether it helps on this machine."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def on_fit_end(self, trainer, pl_module) -> None:
        pl_module.to(memory_format=torch.contiguous_format)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        pl_module.to(memory_format=torch.contiguous_format)
