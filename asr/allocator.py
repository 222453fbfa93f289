"""The C allocator behind CPU tensors (`run.allocator`).

A training step allocates and frees the same few hundred large activation buffers every step. glibc's
malloc serves them from one heap shared with small allocations, which fragments: resident memory settles
at about twice the live peak. Handing every freed block back to the OS (`release`) keeps memory at the
live peak, but then each step faults all its pages in again (measured: +9 s of kernel time per Whisper
base step at batch 8). oneTBB's scalable allocator (the `tbb` wheel) keeps freed large blocks in size
classes and gives them to the next step's requests of the same size: memory near the live peak and no
page faults. It replaces malloc only when preloaded, so `run.py` restarts itself once with LD_PRELOAD
set (`preload_env`; same process id, same arguments) before anything is read or written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

_PROXY, _TBBMALLOC = "libtbbmalloc_proxy.so.2", "libtbbmalloc.so.2"
_HUGE_THRESHOLD = 1 << 20  # blocks of 1 MB or more stay cached for reuse (TBB frees them only when told)
_TBB_SET_HUGE_SIZE_THRESHOLD, _TBB_CLEAN_ALL_BUFFERS = 2, 0  # scalable_allocator.h
_GROWTH = 1.25  # limit_cache: resident memory may grow this much over a step's after a release
_cache = {"limit": None}  # resident bytes above which limit_cache releases the kept blocks


class AllocatorError(Exception):
    """run.allocator cannot be honoured (one line)."""


def tbb_libraries() -> tuple[Path, Path] | None:
    """(libtbbmalloc, its malloc-replacing proxy) from the installed `tbb` wheel, or None."""
    from importlib import metadata

    try:
        files = {f.name: f for f in metadata.files("tbb") or ()}
    except metadata.PackageNotFoundError:
        return None
    if _PROXY not in files or _TBBMALLOC not in files:
        return None
    lib, proxy = (Path(files[n].locate()).resolve() for n in (_TBBMALLOC, _PROXY))
    return (lib, proxy) if lib.is_file() and proxy.is_file() else None


@functools.cache
def tbb_active() -> bool:
    """Whether this process runs on TBB's malloc (its proxy library is mapped)."""
    try:
        return _PROXY in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def preload_env(allocator: str, device: str) -> dict | None:
    """The environment to restart this process with so that TBB's allocator replaces malloc, or None where
    no restart is wanted: another allocator chosen, not a CPU run (`device` as in run.device), not Linux,
    no `tbb` wheel (for "auto"; "tbb" raises AllocatorError), or TBB already loaded or tried once."""
    if allocator not in ("auto", "tbb") or not sys.platform.startswith("linux") or device.startswith("cuda"):
        return None
    if tbb_active() or os.environ.get("ASR_ALLOCATOR_PRELOADED"):
        return None
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return None
    libs = tbb_libraries()
    if libs is None:
        if allocator == "tbb":
            raise AllocatorError("run.allocator = 'tbb': the tbb package is not installed (pip install tbb; "
                                 "Linux x86_64 wheels)")
        return None
    preload = [str(p) for p in libs] + ([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else [])
    return {**os.environ, "LD_PRELOAD": " ".join(preload), "ASR_ALLOCATOR_PRELOADED": "1"}


def restart_with(env: dict) -> None:
    """Replace this process with the same command under `env` (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def configure(allocator: str) -> str:
    """Apply `allocator` to this process from now on; returns what it runs on: "tbb", "release" or
    "system" ("release": glibc's mmap threshold fixed at 1 MB, so freed blocks go back to the OS)."""
    if tbb_active():
        _tbbmalloc().scalable_allocation_mode(_TBB_SET_HUGE_SIZE_THRESHOLD, ctypes.c_ssize_t(_HUGE_THRESHOLD))
        return "tbb"
    if allocator == "release":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if libc.mallopt(-3, 1 << 20):  # M_MMAP_THRESHOLD
                return "release"
        except (OSError, AttributeError):  # not glibc
            pass
    return "system"


def release_cached() -> None:
    """Hand the blocks TBB keeps for reuse back to the OS (between phases whose buffers differ in size,
    e.g. before and after an evaluation); nothing to do on other allocators."""
    if tbb_active():
        _tbbmalloc().scalable_allocation_command(_TBB_CLEAN_ALL_BUFFERS, None)
        _cache["limit"] = None


def limit_cache() -> None:
    """Once per training step: bound what TBB keeps. Blocks are kept per size class, so where shapes
    change from step to step (CTC batches of other durations, Whisper label lengths) the kept blocks
    of sizes no longer asked for pile up. The first step after a release sets the limit (its resident
    memory, x1.25); a step that ends above it releases everything kept, and the next step sets it anew."""
    if not tbb_active():
        return
    rss = resident_bytes()
    if _cache["limit"] is None:
        _cache["limit"] = rss * _GROWTH
    elif rss > _cache["limit"]:
        release_cached()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tbbmalloc():
    return ctypes.CDLL(_TBBMALLOC)  # already loaded (by the proxy): dlopen finds it by its soname
