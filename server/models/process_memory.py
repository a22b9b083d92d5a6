"""The server process's resident memory, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm); elsewhere the peak, which only grows."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * 1024 if os.uname().sysname == "Linux" else peak


def release_free_memory() -> None:
    """Collects garbage and asks glibc to return free heap pages (an unloaded model's weights
    otherwise stay in the process's resident set, reused but never given back)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:
        pass
