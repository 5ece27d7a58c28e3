"""Prefetcher: draws a StatefulDataset's batches in a background thread, a few steps ahead of training.

The trainer synchronises with the GPU once per step (the ranks agree on a non-finite check before the
optimizer step). Whatever the host does between that sync and the next launch, the GPU waits for: making
the next batch, above all. A synthetic DiT-B/2 batch of 128 latents is ~0.5 M normal draws, and under
``torchrun`` every rank runs with ``OMP_NUM_THREADS=1``. With a prefetcher the batch is already there
(in pinned memory, when asked, so the copy to the GPU does not block the host).

Exactness is kept by position, not by luck: each batch comes with the dataset's ``state_dict()`` taken
right after it was drawn, and a consumer checkpoints the state of the last batch it *used*
(:attr:`Prefetcher.position`), never the dataset's own state, which runs ahead. After :meth:`close`
the dataset is put back at that position, so a later iteration continues with the first unused batch.
Datasets must keep the StatefulDataset promise of touching no global RNG (the thread would race the
training loop for it).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from fastdit.data.base import Batch, StatefulDataset

_DONE = object()  # the dataset's iterator ended (StatefulDatasets never should, but say so if one does)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterate ``dataset`` in a daemon thread, up to ``depth`` batches ahead.

    ``next(prefetcher)`` returns the next batch; :attr:`position` is the dataset state right after the
    last batch returned (before any: the state at construction). ``pin_memory=True`` pins every tensor
    of a batch (in the thread) so ``.to(device, non_blocking=True)`` does not block the host; give the
    CUDA ``device`` the batches go to (the thread makes it current: a thread starts on device 0, and a
    rank of another GPU must not open a context there). An error
    raised by the dataset is raised again by the ``next`` call that would have returned its batch.
    Use as a context manager, or call :meth:`close`: it stops the thread and rewinds the dataset to
    :attr:`position`.
    """

    def __init__(self, dataset: StatefulDataset, depth: int = 2, pin_memory: bool = False,
                 device: Optional[torch.device] = None):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"Prefetcher depth must be a positive integer, got {depth!r}")
        self.dataset, self.depth, self.pin_memory = dataset, depth, pin_memory
        self.device = None if device is None else torch.device(device)
        self.position: Dict[str, Any] = dataset.state_dict()
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="fastdit-prefetch", daemon=True)
        self._thread.start()

    # ---- the thread ------------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        """Queue ``item`` unless asked to stop first; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            if self.pin_memory and self.device is not None and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            batches = iter(self.dataset)
            while not self._stop.is_set():
                try:
                    batch = next(batches)
                except StopIteration:
                    self._put(_DONE)
                    return
                state = self.dataset.state_dict()
                if self.pin_memory:
                    batch = {k: (v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v)
                             for k, v in batch.items()}  # (already on the GPU: encoded there)
                if not self._put((batch, state)):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._put(_Failure(err))

    # ---- the consumer ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("Prefetcher is closed")
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without a batch or an error") from None
        if item is _DONE:
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        batch, self.position = item
        return batch

    def close(self) -> None:
        """Stop the thread and rewind the dataset to :attr:`position` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        while True:  # unblock a put() in progress
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=60)
        if self._thread.is_alive():  # pragma: no cover - a dataset stuck inside next()
            raise RuntimeError("the prefetch thread did not stop within 60 s (is the dataset blocked?)")
        self.dataset.load_state_dict(self.position)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Optional[Tuple]) -> None:
        self.close()
