"""A per-host in-memory cache of decoded (and once-prepared) training examples.

Reading a 3-D example decodes a whole volume (tens of MB) for a few ROI crops; with the
decoded volume, and the per-volume work that does not depend on the random draw (such as the
foreground/background voxel indices of positive/negative crop sampling), kept in memory after
the first epoch, a crop costs milliseconds. Examples are cached first come, first served, up to
a byte budget (MONAI's ``CacheDataset`` with a cache rate); past the budget they are read as
before. Cached arrays are read-only, so a transform that writes into its input fails loudly
instead of corrupting later epochs. Values are unchanged, so exact resume is unaffected.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

GIB = 1024 ** 3


def example_nbytes(example: dict) -> int:
    """Bytes held by the numpy arrays of an example."""
    return sum(np.asarray(v).nbytes for v in example.values() if isinstance(v, (np.ndarray, np.generic)))


def _freeze(example: dict) -> dict:
    out = {}
    for key, value in example.items():
        if isinstance(value, np.ndarray):
            value = value.view()  # a read-only view; the source's own array keeps its flags
            value.flags.writeable = False
        out[key] = value
    return out


class CachedSource:
    """``source[i]`` with ``prepare`` applied once per example and the result kept while the budget lasts."""

    def __init__(self, source, prepare: Optional[Callable[[dict], dict]] = None, max_bytes: int = 4 * GIB):
        self.source = source
        self.prepare = prepare
        self.max_bytes = int(max_bytes)
        self.cached_bytes = 0
        self._cache: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._full_reported = False

    def __len__(self) -> int:
        return len(self.source)

    def __getstate__(self) -> dict:
        """Pickled for a loader worker process: the source, ``prepare`` and budget travel, the cached examples and
        the lock do not (each worker fills its own cache, up to the same budget)."""
        state = dict(self.__dict__)
        del state["_lock"]
        state.update(_cache={}, cached_bytes=0, _full_reported=False)
        return state

    def __setstate__(self, state: dict):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        hit = self._cache.get(index)
        if hit is not None:
            return hit
        example = self.source[index]
        example = dict(example) if self.prepare is None else self.prepare(dict(example))
        example = _freeze(example)
        size = example_nbytes(example)
        with self._lock:
            if index in self._cache:
                return self._cache[index]
            if self.cached_bytes + size <= self.max_bytes:
                self._cache[index] = example
                self.cached_bytes += size
            elif not self._full_reported:
                self._full_reported = True
                log.info("input cache full at %.2f GiB (%d of %d examples); the rest is read from disk each time "
                         "(raise data.cache_gib to cache more)", self.cached_bytes / GIB, len(self._cache), len(self))
        return example

    @property
    def num_cached(self) -> int:
        return len(self._cache)


def cached(source, prepare: Optional[Callable[[dict], dict]], cache_gib: float):
    """``source`` wrapped in a :class:`CachedSource` of ``cache_gib`` GiB; unchanged when ``cache_gib <= 0``."""
    if not cache_gib or cache_gib <= 0:
        return source
    return CachedSource(source, prepare, int(float(cache_gib) * GIB))
