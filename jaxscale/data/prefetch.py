"""Background batch loading, so the accelerator does not wait on disk reads and packing."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Self

import numpy as np

from jaxscale.data.dataset import Dataset

Batch = dict[str, np.ndarray]


class Prefetcher:
    """Yields (step, batch, wait_seconds) for step = start_step, start_step + 1, ... without end.

    A daemon thread keeps up to `depth` batches ready; wait_seconds is how long the consumer blocked for
    the batch (data-wait time). With depth 0 batches load in the consumer's thread and wait_seconds is the
    load time. An exception in the loader thread is re-raised by next(). Use as a context manager or call
    close().
    """

    def __init__(self, ds: Dataset, start_step: int, batch_size: int, shard_index: int = 0,
                 shard_count: int = 1, depth: int = 2, *, split: str = "train", row_offset: int = 0):
        self._load = lambda step: ds.batch(step, batch_size, split=split, shard_index=shard_index,
                                           shard_count=shard_count, row_offset=row_offset)
        self._next_step = start_step
        self._load_s = 0.0  # time spent loading batches, wherever they load
        self._load_lock = threading.Lock()
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, args=(start_step,), name="jaxscale-prefetch",
                                            daemon=True)
            self._thread.start()

    def _fill(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item: tuple[int, Batch] | Exception = (step, self._timed_load(step))
            except Exception as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            step += 1

    def __iter__(self) -> Iterator[tuple[int, Batch, float]]:
        return self

    def __next__(self) -> tuple[int, Batch, float]:
        if self._stop.is_set():
            raise StopIteration
        start = time.perf_counter()
        if self._queue is None:
            step, batch = self._next_step, self._timed_load(self._next_step)
            self._next_step += 1
        else:
            item = self._queue.get()
            if isinstance(item, Exception):
                self.close()
                raise item
            step, batch = item
        return step, batch, time.perf_counter() - start

    def _timed_load(self, step: int) -> Batch:
        start = time.perf_counter()
        try:
            return self._load(step)
        finally:
            with self._load_lock:
                self._load_s += time.perf_counter() - start

    def take_load_seconds(self) -> float:
        """Seconds spent loading batches since the last call (in the loader thread, or in next() at depth 0).
        A loader as slow as the step hides from the data wait; this shows it."""
        with self._load_lock:
            seconds, self._load_s = self._load_s, 0.0
        return seconds

    def set_depth(self, depth: int) -> None:
        """Keep up to `depth` batches ready from now on (a process slow for its data loads further ahead)."""
        if self._queue is None:
            raise ValueError("a Prefetcher of depth 0 loads in the consumer's thread and has no queue to deepen")
        with self._queue.mutex:
            self._queue.maxsize = depth
            self._queue.not_full.notify_all()

    def close(self) -> None:
        """Stop the loader thread and wait for it; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
