"""Independent pieces of one frame's global registration spread over a few threads.

A global registration is many independent pieces: the search scores 36 rotations and
refines ~70 candidate poses, then the registration method runs from each of 3 or more
hypotheses and the level rivals are fitted one by one. One after the other they keep one core
of this 2-core CPU busy (open3d's ICP already uses both); :func:`parallel_map` runs them on
``workers`` threads, the calling one included. numpy, torch and open3d release the GIL in
their heavy loops, so the pieces overlap.

The results are the same as in one thread: each piece gets its own inputs and random
generator, and the results come back in input order. (open3d's ICP sums its correspondences
over OpenMP threads, so two runs of it differ at ~1e-13 mm whether or not they run side by
side.)

A piece that itself calls :func:`parallel_map` runs its items in its own thread (no nesting,
no deadlock).

The math libraries' own thread pools get in the way of these threads: numpy's OpenBLAS and
torch start threads of their own for each matrix product, which on 2 cores spin and wait more
than they help on the small products here. :func:`limit_math_threads` sets them (process-wide)
to one thread each; the pipeline does so when it is built (``PipelineConfig.math_threads``).
No rclpy here.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _helpers(count: int) -> ThreadPoolExecutor:
    """The shared pool of helper threads, grown to at least ``count`` threads."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="end2reg-piece")
            _pool_size = count
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _forget_helpers_in_child() -> None:
    """A forked child has none of its parent's threads: it starts its own pool when it
    needs one (else its pieces would wait in the queue of a pool without threads)."""
    global _pool, _pool_lock, _pool_size
    _pool, _pool_lock, _pool_size = None, threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers_in_child)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(item) for item in items]``, the items shared out over ``workers`` threads (the
    calling thread and ``workers - 1`` helpers; each takes the next item when it is free).

    ``workers <= 1``, a single item, or a call from inside another :func:`parallel_map`:
    all in the calling thread. An exception raised by ``fn`` is raised here once every
    thread has stopped (the first one, in input order)."""
    items = list(items)
    count = min(int(workers), len(items))
    if count <= 1 or getattr(_local, "inside", False):
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    errors: dict[int, BaseException] = {}
    order = itertools.count()  # next() on it is atomic under the GIL

    def drain() -> None:
        was_inside = getattr(_local, "inside", False)
        _local.inside = True
        try:
            while not errors:  # after an error: the others finish their piece, then stop
                i = next(order)
                if i >= len(items):
                    return
                try:
                    results[i] = fn(items[i])
                except BaseException as exc:  # noqa: BLE001 - raised again below
                    errors[i] = exc
        finally:
            _local.inside = was_inside

    futures = [_helpers(count - 1).submit(drain) for _ in range(count - 1)]
    drain()
    for future in futures:
        future.result()
    if errors:
        raise errors[min(errors)]
    return results


def parallel_batches(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray,
                     workers: int) -> np.ndarray:
    """``fn(rows)`` for a ``fn`` that treats every row (along the first axis) on its own:
    ``rows`` split into at most ``workers`` batches, each through ``fn`` on its own thread
    (:func:`parallel_map`), the results put back together in order. Without rows: ``fn``
    of the empty array."""
    batches = [b for b in np.array_split(rows, max(1, int(workers))) if len(b)]
    if not batches:
        return fn(rows)
    return np.concatenate(parallel_map(fn, batches, workers))


#: the entry points that set / get an OpenBLAS library's thread count: the system's
#: (``libopenblas.so``) and the builds inside numpy's and scipy's wheels (64-bit integer
#: interface and not), first match wins
_OPENBLAS_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
                     "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")
_OPENBLAS_GETTERS = ("openblas_get_num_threads", "openblas_get_num_threads64_",
                     "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads")


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (Linux: /proc/self/maps;
    elsewhere none are found)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            fields = (line.split(None, 5) for line in maps if "openblas" in line.lower())
            paths = {parts[5].strip() for parts in fields if len(parts) == 6}
    except OSError:
        return []
    return sorted(path for path in paths if path.startswith("/") and ".so" in path)


def _openblas_function(path: str, names: tuple[str, ...]):
    """The first of ``names`` exported by the already loaded library at ``path``, or None
    (the library is not opened anew: ``RTLD_NOLOAD``)."""
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
    except OSError:
        return None
    for name in names:
        function = getattr(lib, name, None)
        if function is not None:
            return function
    return None


def openblas_threads() -> dict[str, int]:
    """``{library path: its thread count}`` of every OpenBLAS loaded in this process."""
    out = {}
    for path in _loaded_openblas():
        getter = _openblas_function(path, _OPENBLAS_GETTERS)
        if getter is not None:
            getter.restype = ctypes.c_int
            out[path] = int(getter())
    return out


def limit_math_threads(count: int) -> dict[str, int]:
    """Process-wide: every OpenBLAS loaded in this process (numpy's, scipy's, the system's)
    and torch's CPU thread pool (when torch is imported) to ``count`` threads each.
    Returns ``{library: threads now}`` of those found (a library this cannot reach, such as
    an MKL build of numpy, is left as it is).

    Why: the pipeline's pieces run on its own threads (:func:`parallel_map`); OpenBLAS's
    threads on top of them, each waiting for the others at every small matrix product,
    took CPU time from them. On the 8 typical wide benchmark frames, one OpenBLAS thread
    cut the global search from 459 to 346 ms of CPU time per frame (2 threads of the search)
    and the whole global registration's CPU time by ~22 %, with the same poses."""
    count = int(count)
    if count < 1:
        raise ValueError(f"math threads must be >= 1, got {count}")
    out = {}
    for path in _loaded_openblas():
        setter = _openblas_function(path, _OPENBLAS_SETTERS)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter(count)
            out[path] = count
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        out["torch"] = int(torch.get_num_threads())
    return out
