"""Where a measurement ran: CPU model, cores, GPU and torch version, for reports and cache keys."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_name", "describe"]


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo where there is one).

    Example:
        >>> isinstance(cpu_name(), str)
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: CPU, core count, GPU (or "no GPU"), torch version.

    Example:
        >>> "cores" in describe()
        True
    """
    import torch

    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"
