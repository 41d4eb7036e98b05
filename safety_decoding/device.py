"""Where and in what precision the model runs (``ESS_DEVICE``, ``ESS_DTYPE``).

``auto`` picks what is fastest without changing what the model does: CUDA when present, and
bfloat16 where the hardware multiplies it natively (CUDA with bf16 support; CPUs with AMX or
AVX512-BF16, where a decode step of 8 rows costs 1.24x a step of one, against 2.1x in
float32: see `benchmarks/serving.py`). Elsewhere float32, since emulated bf16 is slower than float32.
Our choice, as vLLM's ``--dtype auto`` (the checkpoint's dtype on GPU) but aware of CPU bf16.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: settings and CLI parsers read DTYPE_NAMES
    import torch

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
"""What ``ESS_DTYPE`` and every ``--dtype`` option accept."""
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
"""What ``ESS_DEVICE`` and every ``--device`` option accept."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name reports and settings use)."""
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=2)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags from ``cpuinfo`` (Linux; empty where it cannot be read)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags include ``amx_bf16`` or ``avx512_bf16`` (Linux; else False)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags(cpuinfo))


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags include ``amx_bf16`` (Intel AMX tiles; Linux; else False)."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given.

    Raises:
        ValueError: ``name`` is not `DEVICE_PATTERN`'s, or a CUDA device was asked for and none
            is available.
    """
    import torch

    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 where ``device`` computes it natively, else float32; or the named dtype.

    Raises:
        ValueError: an unknown dtype name.
    """
    import torch

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32
    if name not in DTYPE_NAMES[1:]:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPE_NAMES[1:])}, got {name!r}")
    return getattr(torch, name)
