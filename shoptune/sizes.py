"""Byte counts as the plan writes them: the units, memory in GiB (MiB below one), files in GB and GiB.

GiB is what du, nvidia-smi and vLLM print; GB is what model hubs list a file's size in.
"""

from __future__ import annotations

GIB = 2**30
GB = 10**9


def size(value: float) -> str:
    """Bytes in GiB, or MiB below one GiB (the demo's model is tens of MiB)."""
    return f"{value / GIB:,.1f} GiB" if abs(value) >= GIB or value == 0 else f"{value / 2**20:,.1f} MiB"


def file_size(value: float) -> str:
    """A file's size in GB (decimal, as model hubs list them) and GiB (as du and vLLM print them)."""
    if value >= GB:
        return f"{value / GB:,.1f} GB ({value / GIB:,.1f} GiB)"
    return f"{value / 1e6:,.1f} MB ({value / 2**20:,.1f} MiB)"
