"""glibc's heap: handing freed pages back to the system.

glibc's ``malloc`` keeps freed memory in its heap for reuse; activations of differing sizes leave holes
that later batches do not fill exactly, and a loop's high-water mark stays resident after it. ``malloc_trim``
returns the free pages to the system (:class:`pq_lightning.callbacks.HeapTrim` calls it between batches).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    fn = getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only (not musl, not macOS)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Give the heap's free pages back to the system; ``False`` where the C library cannot."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
