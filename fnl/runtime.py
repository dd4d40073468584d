"""CPU inference runtime setting: keep freed memory in the process (glibc malloc).

glibc's malloc serves every allocation above its mmap threshold (32 MiB at most) with a fresh
``mmap`` and gives it back with ``munmap`` on free. A CNN forward on the CPU allocates a new output
tensor per layer, so at batch 32 each large activation (resnet50's first stage: 103 MB) is
page-faulted in again on every call: measured on the project's 2-core machine, allocating and
filling 103 MB took 28 ms against 3.7 ms for filling a reused buffer. That cost is the same per
activation byte for an original and a compressed model, so it hides much of what factorization
saves. Caching allocators (jemalloc, tcmalloc through ``LD_PRELOAD``, as PyTorch's CPU performance
guides recommend) avoid it; :func:`cache_cpu_allocations` gets the same from glibc itself, at run
time, for the current process (equivalent to starting it with ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=2147483647``). The price: the process keeps its peak memory instead of
returning it to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["cache_cpu_allocations", "cpu_allocations_cached"]

_cached = False

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def cache_cpu_allocations(enable: bool = True) -> None:
    """Keep freed CPU memory in this process for reuse (``enable``), or restore glibc's defaults.

    With it on, large tensors come from the heap instead of fresh ``mmap`` calls, and freed heap
    memory is not trimmed back to the system, so repeated forwards reuse already-mapped pages.
    Affects later allocations of the whole process (not only torch's).

    Raises:
        RuntimeError: not glibc (macOS, Windows, musl): use jemalloc or tcmalloc there.
    """
    libc = _libc()
    if libc is None:
        raise RuntimeError("cache_cpu_allocations needs glibc's mallopt (Linux); on this platform preload a caching "
                           "allocator instead (jemalloc or tcmalloc, e.g. LD_PRELOAD=libjemalloc.so)")
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)) if enable else \
        ((_M_MMAP_MAX, _DEFAULT_MMAP_MAX), (_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    global _cached
    for option, value in settings:
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"glibc mallopt({option}, {value}) failed")
    _cached = enable


def cpu_allocations_cached() -> bool:
    """Whether :func:`cache_cpu_allocations` is on in this process."""
    return _cached
