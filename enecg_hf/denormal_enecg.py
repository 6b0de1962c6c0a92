"""Flush-to-zero for the frozen experts' pass, scoped and restored, in every thread that computes it.

Subnormal (denormal) floats - magnitudes below 1.2e-38 in float32 - are handled in microcode on many x86 CPUs, at up
to a hundred times the cost of a normal multiply. Pretrained weights that decayed towards zero in training are full
of them (DeepFADE: 76 % of its weights), and so are the activations they produce. With flush-to-zero and
denormals-are-zero (the x86 MXCSR FTZ and DAZ bits, set by `torch.set_flush_denormal`) the CPU treats them as 0: the
same results to float32 precision, at full speed.

The bits are per thread. `torch.set_flush_denormal` sets them on the calling thread only, while PyTorch computes on
its intra-op thread pool (OpenMP), whose threads keep the state they had when they were created. So a library that
set the flag on the caller's thread would get a pass that is fast on one thread and slow on the others - and setting
it process-wide would silently change the numerics of the user's own code. `flush_denormals()` therefore sets the
flag on the calling thread *and* on each thread of its OpenMP team for the duration of the block, and puts every
thread back to the state it had before.

The team is reached through the OpenMP runtime PyTorch links (`GOMP_parallel`, which GNU, LLVM and Intel OpenMP all
export): a parallel region whose body calls `torch.set_flush_denormal` runs once on each team thread. Where no such
runtime is found (a PyTorch built without OpenMP, or a platform without `/proc/self/maps`), or the CPU has no
FTZ/DAZ (`torch.set_flush_denormal` returns False, e.g. ARM), the flag is set on the calling thread only, or not at
all; the pass is then as fast or slow as the machine makes it, with unchanged results. `ENECG_HF_FLUSH_DENORMALS=0`
in the environment turns it off (read at every block: the benchmarks compare both in one process).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from typing import Callable, Iterator

import torch


logger = logging.getLogger(__name__)

FLUSH_DENORMALS_ENV = "ENECG_HF_FLUSH_DENORMALS"
_local = threading.local()  # per thread: how deep inside `flush_denormals` it is
_runtime_lock = threading.Lock()
_runtime: list = []  # [(GOMP_parallel, omp_get_thread_num) of PyTorch's OpenMP runtime, or None], found once
_PARALLEL_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def flushes_denormals() -> bool:
    """Whether the calling thread flushes subnormal floats to zero (FTZ): half the smallest normal double is 0 then.

    Python floats are computed with the same SSE unit and control register as PyTorch's CPU kernels."""
    return sys.float_info.min / 2 == 0.0


def _openmp_runtime_paths() -> list[str]:
    """Loaded OpenMP runtimes, PyTorch's own first (a process may hold several, e.g. scikit-learn's libgomp)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    found = [p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp"))]
    torch_dir = os.path.dirname(torch.__file__)
    return sorted(found, key=lambda p: (not p.startswith(torch_dir), p))


def _openmp_runtime() -> tuple[Callable, Callable] | None:
    """`GOMP_parallel(body, data, num_threads, flags)` and `omp_get_thread_num()` of PyTorch's OpenMP runtime, or
    None where there is none."""
    with _runtime_lock:
        if not _runtime:
            found = None
            if torch.backends.openmp.is_available():
                for path in _openmp_runtime_paths():
                    try:
                        library = ctypes.CDLL(path)
                        parallel, thread_number = library.GOMP_parallel, library.omp_get_thread_num
                    except (OSError, AttributeError):
                        continue
                    parallel.argtypes = [_PARALLEL_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                    parallel.restype = None
                    thread_number.restype = ctypes.c_int
                    found = (parallel, thread_number)
                    break
            if found is None:
                logger.debug("No OpenMP runtime found: flush-to-zero is set on the calling thread only")
            _runtime.append(found)
        return _runtime[0]


def _on_every_thread(work: Callable[[int], None]) -> None:
    """Run `work(thread number)` on the calling thread (number 0) and on each thread of its intra-op OpenMP team."""
    threads = torch.get_num_threads()
    runtime = _openmp_runtime() if threads > 1 else None
    if runtime is None:
        work(0)
        return
    parallel, thread_number = runtime
    # The body runs on every team thread, the caller included, each taking the GIL (ctypes does) for its Python call.
    parallel(_PARALLEL_BODY(lambda _data: work(thread_number())), None, threads, 0)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero in the block, on the calling thread and its PyTorch intra-op threads; every
    thread gets its previous state back afterwards. Nested blocks cost nothing; each thread has its own scope."""
    if os.environ.get(FLUSH_DENORMALS_ENV, "1") == "0":
        yield
        return
    if getattr(_local, "depth", 0):
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    previous: dict[int, bool] = {}

    def enter(number: int) -> None:
        previous[number] = flushes_denormals()
        torch.set_flush_denormal(True)

    def leave(number: int) -> None:
        torch.set_flush_denormal(previous.get(number, previous.get(0, False)))

    _on_every_thread(enter)
    _local.depth = 1
    try:
        yield
    finally:
        _local.depth = 0
        _on_every_thread(leave)


__all__ = ["flush_denormals", "flushes_denormals", "FLUSH_DENORMALS_ENV"]
