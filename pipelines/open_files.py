"""A bounded LRU of open shard files, per process: nothing grows with the shards a run touches.

A training stream over 20k shards at 64 ranks touches thousands of shards per worker. Each
open entry holds a file descriptor and that shard's small binary index; at most `capacity`
entries stay open, the least recently used one is closed when another is needed.

Readers run in several threads (the stream prefetches with a pool), so an entry evicted while
another thread still reads from it is closed only when that read is done: `use()` counts its
users. The bound therefore holds for idle entries, plus at most one per reading thread.

Our own ~60 lines rather than functools.lru_cache: that one cannot close what it evicts, nor
wait for a reader that still holds the evicted entry.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

__all__ = ["DEFAULT_OPEN_SHARDS", "OpenFiles"]

Opener = Callable[[Hashable], tuple[int, Any]]
DEFAULT_OPEN_SHARDS = 64  # per reader kind and process: with 64 ranks x 4 workers, far under ulimit -n 1024


class _Entry:
    __slots__ = ("fd", "value", "users", "evicted")

    def __init__(self, fd: int, value: Any):
        self.fd, self.value, self.users, self.evicted = fd, value, 0, False


def _close(fd: int | None) -> None:
    if fd is not None:  # None: an entry held in memory only (a remote shard's records)
        os.close(fd)


class OpenFiles:
    """LRU of (fd, value) pairs made by `opener(key) -> (fd, value)`; fds closed on eviction.
    Several readers can share one (the training stream gives all its sources one for tars and
    one for token files), so the bound holds per process, whatever the number of sources.

    Args:
        opener: opens the file for `key` and returns its descriptor and what to keep beside it
            (a reader sharing the LRU passes its own opener to `use` instead).
        capacity: entries kept open at most (besides those a thread is reading from).
    """

    def __init__(
        self, opener: Callable[[Hashable], tuple[int, Any]] | None = None, capacity: int = DEFAULT_OPEN_SHARDS
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.opener, self.capacity = opener, capacity
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.opened = 0  # how many times a file was opened (a miss), for tests and benches

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def use(
        self, key: Hashable, opener: Callable[[Hashable], tuple[int, Any]] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """(fd, value) of `key`, open for the duration of the block (opened by `opener` on a miss)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.users += 1
        if entry is None:
            fd, value = (opener or self.opener)(key)  # outside the lock: opening may read an index
            with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = _Entry(fd, value)
                    self.opened += 1
                    self._evict()
                else:  # another thread opened it meanwhile
                    _close(fd)
                    self._entries.move_to_end(key)
                entry.users += 1
        try:
            yield entry.fd, entry.value
        finally:
            with self._lock:
                entry.users -= 1
                if entry.evicted and entry.users == 0:
                    _close(entry.fd)

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            _, old = self._entries.popitem(last=False)
            old.evicted = True
            if old.users == 0:
                _close(old.fd)

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                entry.evicted = True
                if entry.users == 0:
                    _close(entry.fd)
            self._entries.clear()

    def __del__(self):  # a stream dropped without close() must not leak descriptors
        with contextlib.suppress(Exception):
            self.close()
