"""Streaming data: sources read item by item, split over ranks and DataLoader workers, resumable exactly.

A :class:`SampleSource` is an ordered list of **items** (a tar shard, a latent shard, a chunk of rows) and a
way to read one item sequentially from a sample offset. :class:`StreamingDataset` turns any source into a
:class:`~fastdit.data.base.StatefulDataset`: an infinite, deterministic, rank-sharded stream of batches
whose ``state_dict()`` is the exact position of every reader.

How the work is split
---------------------
There are ``world_size * max(1, num_workers)`` **slots**; worker ``k`` of rank ``r`` runs slot
``r * W + k``. Every epoch has an item order: a permutation seeded with ``derive_seed(seed, epoch)``
(``shuffle=True``), the natural order (``shuffle=False``), or ``len(items)`` draws *with replacement*
(``resampled=True``, the webdataset "resampled" mode). Then:

* **by item** (at least as many items as slots): slot ``g`` reads items ``order[g::slots]`` in full;
* **by sample** (fewer items than slots): every slot walks all items of the epoch but keeps only the
  sample positions ``p`` with ``(p + c) % slots == g``, where ``c`` counts the items read so far in the
  stream (``epoch * len(items) + index``). The rotation by ``c`` means even one-sample items reach every
  slot in turn, so no rank is ever left without data.

Either way, within one epoch no sample goes to two slots (except repeats drawn in resampled mode), and
together the slots see every sample of the epoch once. A slot keeps reading until it has a full batch
(skipped samples are counted, never batched), and crosses into the next epoch when its share ends: the
stream is infinite, so all ranks can take the same number of batches however unevenly the data falls.

Workers and the rotation
------------------------
With ``num_workers > 0`` the slots of a rank run in ``torch.utils.data.DataLoader`` worker processes; each
worker builds whole batches and sends every batch together with its slot's position after it. The
DataLoader (``in_order=True``) hands batches over in a fixed round-robin of workers, so the main process
sees slot ``0, 1, ..., W-1, 0, ...`` of its rank (checked on every batch). The state is the position of
every slot after its last batch handed out plus which slot comes next; a resumed iterator maps DataLoader
worker ``k`` to slot ``(next + k) % W``, so resuming in the middle of a rotation needs no buffering.
"""
from __future__ import annotations

import abc
import collections
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.utils.data

from fastdit.data.base import Batch, StatefulDataset, _check_common, derive_seed

Sample = Dict[str, Any]
"""One sample, no batch dimension: ``{"image": uint8 (3, S, S), "y": int, "caption": str, ...}``."""


class Skip(NamedTuple):
    """A position of an item that holds no usable sample; ``reason`` is a short fixed string
    ("corrupt image", "unreadable item", ...) that becomes a :meth:`StreamingDataset.skip_counts` key."""

    reason: str


class SampleSource(abc.ABC):
    """An ordered list of items and a sequential reader for one item (see the module docstring).

    Subclasses set ``name`` (used in messages) and implement :meth:`items` and :meth:`read`. Positions
    are exact: every position of an item yields exactly one value, a :data:`Sample` or a :class:`Skip`,
    so an offset names the same sample on every read. An item that cannot be opened at all yields one
    ``Skip("unreadable item")`` and ends. Sources must be picklable (they travel to DataLoader workers).
    """

    name: str = "source"

    @abc.abstractmethod
    def items(self) -> List[str]:
        """Stable, ordered item ids (paths, ``"file.parquet#rows=0:1000"``, ...)."""

    @abc.abstractmethod
    def read(self, item: str, start: int) -> Iterator[Union[Sample, Skip]]:
        """The values of ``item`` at positions ``start, start + 1, ...`` until the item ends."""

    def worker_init(self) -> None:
        """Per-process setup (HTTP pools, caches); called once in each process that reads."""

    def read_positions(self, item: str, start: int, stride: int = 1,
                       epoch: int = 0) -> Iterator[Union[Sample, Skip]]:
        """The values at positions ``start, start + stride, start + 2 * stride, ...`` of ``item`` in
        ``epoch``; what :class:`StreamingDataset` calls.

        The default reads every position with :meth:`read` and drops the others. Sources override this
        to skip the expensive part (decoding) of positions they drop, and/or to use ``epoch`` for
        augmentation seeds (a different flip each epoch).
        """
        for index, value in enumerate(self.read(item, start)):
            if index % stride == 0:
                yield value


def collate_samples(samples: List[Sample], where: str = "source") -> Batch:
    """Stack samples into a batch: tensors -> ``(B, ...)``, ints/bools -> ``int64 (B,)``, floats ->
    ``float32 (B,)``, numpy arrays -> tensors ``(B, ...)``, ``"caption"`` -> ``list[str]`` of length B.

    Every sample must have the same keys; a mismatch is a ``ValueError`` naming ``where`` and the keys.
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    keys = list(samples[0].keys())
    for sample in samples[1:]:
        if sample.keys() != samples[0].keys():
            raise ValueError(f"{where}: samples of one batch have different keys: {sorted(samples[0])} vs "
                             f"{sorted(sample)}")
    batch: Dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if key == "caption":
            if not all(isinstance(v, str) for v in values):
                raise TypeError(f"{where}: 'caption' must be a str in every sample")
            batch[key] = list(values)
        elif torch.is_tensor(first):
            batch[key] = _stack_tensors(key, values, where)
        elif isinstance(first, np.ndarray):
            batch[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (bool, int, np.integer)):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        elif isinstance(first, (float, np.floating)):
            batch[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        else:
            raise TypeError(f"{where}: sample value {key!r} has type {type(first).__name__}; batches hold "
                            f"tensors, arrays, numbers and the 'caption' strings only")
    return batch


_NUMPY_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float16,
                 torch.float32, torch.float64}


def _stack_tensors(key: str, values: List[torch.Tensor], where: str) -> torch.Tensor:
    """``torch.stack`` of equally shaped tensors, done by numpy into one buffer for CPU dtypes numpy has:
    torch's parallel copy into fresh memory can be 10-100x slower on a host whose cores are busy (its
    OpenMP threads spin), and readers often run next to other work."""
    first = values[0]
    for value in values[1:]:
        if value.shape != first.shape or value.dtype != first.dtype:
            raise ValueError(f"{where}: {key!r} differs between samples of one batch: {tuple(first.shape)} "
                             f"{first.dtype} vs {tuple(value.shape)} {value.dtype}")
    if first.device.type != "cpu" or first.dtype not in _NUMPY_DTYPES or first.requires_grad:
        return torch.stack(values)
    out = np.empty((len(values),) + tuple(first.shape), dtype=first.numpy().dtype)
    for index, value in enumerate(values):
        out[index] = value.numpy()
    return torch.from_numpy(out)


def epoch_item_order(num_items: int, epoch: int, *, seed: int, shuffle: bool, resampled: bool) -> List[int]:
    """The item indices of ``epoch`` in reading order, before they are dealt to slots (same on every
    rank and worker): a permutation (shuffle), ``0..n-1`` (no shuffle) or ``n`` draws with replacement
    (resampled)."""
    if resampled:
        rng = np.random.default_rng(derive_seed(seed, epoch, 1))
        return rng.integers(0, num_items, size=num_items).tolist()
    if shuffle:
        return np.random.default_rng(derive_seed(seed, epoch)).permutation(num_items).tolist()
    return list(range(num_items))


class _SlotReader:
    """Reads the share of one slot and builds its batches; the position only moves as values are used.

    State (all plain ints): ``epoch``; ``item_index`` into this slot's item list of the epoch;
    ``offset``, the next position to read in that item; ``good_in_epoch``, usable samples taken this
    epoch (for the all-bad check); ``empty_epochs``, consecutive epochs without one; ``skips`` by reason.
    """

    def __init__(self, source: SampleSource, items: List[str], *, slot: int, num_slots: int,
                 batch_size: int, seed: int, shuffle: bool, resampled: bool,
                 state: Optional[Dict[str, Any]] = None):
        self.source, self.items = source, items
        self.slot, self.num_slots, self.batch_size = slot, num_slots, batch_size
        self.seed, self.shuffle, self.resampled = seed, shuffle, resampled
        self.by_item = len(items) >= num_slots
        # By sample, a slot reads every item but only every num_slots-th position of it.
        self.stride = 1 if self.by_item else num_slots
        self._order_cache: Dict[int, List[int]] = {}
        self._open: Optional[Iterator[Union[Sample, Skip]]] = None  # reader of the current item
        self._data_has_good_sample = False  # a probe found one (not state: re-probing is harmless)
        state = state if state is not None else initial_slot_state(slot)
        self.epoch = int(state["epoch"])
        self.item_index = int(state["item_index"])
        self.offset = int(state["offset"])
        self.good_in_epoch = int(state["good_in_epoch"])
        self.empty_epochs = int(state["empty_epochs"])
        self.skips: Dict[str, int] = collections.Counter({str(k): int(v) for k, v in state["skips"].items()})
        if self.offset < 0 or self.item_index < 0 or self.epoch < 0:
            raise ValueError(f"slot {slot}: negative position in {state}")
        if self.item_index == 0 and self.offset == 0 and not self.by_item:
            self.offset = self._first_offset(self.epoch, 0)  # a fresh by-sample slot starts at its phase

    # ---- the plan ---------------------------------------------------------------------------------
    def my_items(self, epoch: int) -> List[int]:
        """Indices (into ``items``) this slot reads in ``epoch``, in order."""
        if epoch not in self._order_cache:
            order = epoch_item_order(len(self.items), epoch, seed=self.seed, shuffle=self.shuffle,
                                     resampled=self.resampled)
            self._order_cache = {epoch: order[self.slot::self.num_slots] if self.by_item else order}
        return self._order_cache[epoch]

    def _first_offset(self, epoch: int, item_index: int) -> int:
        if self.by_item:
            return 0
        stream_index = epoch * len(self.items) + item_index  # items read so far, all epochs
        return (self.slot - stream_index) % self.num_slots

    def state(self) -> Dict[str, Any]:
        return {"slot": self.slot, "epoch": self.epoch, "item_index": self.item_index, "offset": self.offset,
                "good_in_epoch": self.good_in_epoch, "empty_epochs": self.empty_epochs,
                "skips": dict(self.skips)}

    # ---- reading ----------------------------------------------------------------------------------
    def next_batch(self) -> Batch:
        """The next ``batch_size`` usable samples of this slot, collated; skips are counted."""
        samples: List[Sample] = []
        while len(samples) < self.batch_size:
            value = self._next_value()
            if isinstance(value, Skip):
                self.skips[value.reason] += 1
            else:
                samples.append(value)
                self.good_in_epoch += 1
        return collate_samples(samples, f"{self.source.name} source")

    def _next_value(self) -> Union[Sample, Skip]:
        while True:
            mine = self.my_items(self.epoch)
            if self.item_index >= len(mine):
                self._end_epoch()
                continue
            item = self.items[mine[self.item_index]]
            if self._open is None:
                self._open = iter(self.source.read_positions(item, self.offset, self.stride, self.epoch))
            try:
                value = next(self._open)
            except StopIteration:
                self._open = None
                self.item_index += 1
                self.offset = self._first_offset(self.epoch, self.item_index)
                continue
            except Exception as err:  # a source should yield Skips; say where it failed instead
                self._open = None
                raise RuntimeError(f"{self.source.name} source failed reading {item!r} at position "
                                   f"{self.offset}: {type(err).__name__}: {err}") from err
            if not isinstance(value, (Skip, dict)):
                raise TypeError(f"{self.source.name} source yielded {type(value).__name__} for {item!r} "
                                f"position {self.offset}; expected a sample dict or a Skip")
            self.offset += self.stride
            return value

    def _end_epoch(self) -> None:
        if self.good_in_epoch == 0:
            self.empty_epochs += 1
            if not self._data_has_good_sample:
                self._probe_for_good_sample()
            # Rotation keeps small data sets reaching every slot, but a data set with only a handful of
            # usable samples for many slots could leave this one empty forever: stop with a clear error.
            # With shuffling, a slot misses one given item with probability (1 - 1/slots) per epoch, so
            # 25 x slots epochs make a false alarm less likely than 1e-10.
            if self.empty_epochs > 25 * self.num_slots + 10:
                raise RuntimeError(
                    f"StreamingDataset: slot {self.slot} of {self.num_slots} (rank x workers) got no usable "
                    f"sample from {self.source.name} in {self.empty_epochs} consecutive epochs; the data has "
                    f"too few usable samples for {self.num_slots} readers (skips so far: {dict(self.skips)})")
        else:
            self.empty_epochs = 0
        self.epoch += 1
        self.item_index = 0
        self.good_in_epoch = 0
        self.offset = self._first_offset(self.epoch, 0)

    def _probe_for_good_sample(self) -> None:
        """This slot's share of an epoch had no usable sample: read the whole epoch (every item, every
        position) until one turns up; none at all -> RuntimeError, instead of spinning forever."""
        reasons: Dict[str, int] = collections.Counter()
        order = epoch_item_order(len(self.items), self.epoch, seed=self.seed, shuffle=self.shuffle,
                                 resampled=self.resampled)
        for index in dict.fromkeys(order):  # each distinct item once
            for value in self.source.read_positions(self.items[index], 0, 1, self.epoch):
                if isinstance(value, Skip):
                    reasons[value.reason] += 1
                else:
                    self._data_has_good_sample = True
                    return
        raise RuntimeError(
            f"StreamingDataset: one full pass over the {len(set(order))} items of {self.source.name} "
            f"(e.g. {self.items[order[0]]!r}) found no usable sample; skipped: {dict(reasons)}")


def initial_slot_state(slot: int) -> Dict[str, Any]:
    """The state of a slot that has not read anything yet."""
    return {"slot": slot, "epoch": 0, "item_index": 0, "offset": 0, "good_in_epoch": 0, "empty_epochs": 0,
            "skips": {}}


def _keep(value: Any) -> Any:
    """DataLoader ``collate_fn`` that leaves the worker's (slot, batch, state) triple alone."""
    return value


class _WorkerStream(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: worker ``k`` reads local slot ``(first + k) % W`` of this rank
    from its saved state and yields ``(local_slot, batch, slot_state_after_batch)`` forever."""

    def __init__(self, source: SampleSource, items: List[str], reader_args: Dict[str, Any],
                 slot_states: List[Dict[str, Any]], first: int, rank: int, num_workers: int):
        self.source, self.items, self.reader_args = source, items, reader_args
        self.slot_states, self.first, self.rank, self.num_workers = slot_states, first, rank, num_workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError("_WorkerStream only runs inside DataLoader workers")
        local = (self.first + info.id) % self.num_workers
        self.source.worker_init()
        reader = _SlotReader(self.source, self.items, slot=self.rank * self.num_workers + local,
                             state=self.slot_states[local], **self.reader_args)
        while True:
            batch = reader.next_batch()
            yield local, batch, reader.state()


def skip_counts_of_state(state: Dict[str, Any]) -> Dict[str, int]:
    """Skipped positions by reason recorded in a :meth:`StreamingDataset.state_dict` (summed over its slots);
    empty for any other state. A consumer that reads ahead (the trainer's prefetcher) counts from the state
    of the last batch it *used*, so the counts cover exactly the batches trained on."""
    total: Dict[str, int] = collections.Counter()
    slots = state.get("slots") if isinstance(state, dict) else None
    for slot_state in slots if isinstance(slots, list) else ():
        total.update(slot_state.get("skips", {}))
    return dict(total)


class StreamingDataset(StatefulDataset):
    """An infinite, rank-sharded, exactly resumable stream of batches from a :class:`SampleSource`.

    Args:
        source: the items and their reader.
        batch_size: samples per batch on this rank (B).
        seed, rank, world_size: as for every StatefulDataset; the sequence of batches is a function of
            these, ``num_workers``, ``shuffle``, ``resampled`` and the data only.
        num_workers: DataLoader worker processes for this rank (0: read in the calling thread). Part of
            the split (slots = world_size x max(1, num_workers)), so changing it changes the sequence.
        shuffle: a new item order every epoch (seeded by ``(seed, epoch)``); False: the source's order.
        resampled: draw each epoch's items with replacement instead of a permutation.
        prefetch_factor: batches each worker keeps ready (DataLoader argument).
        multiprocessing_context: DataLoader's (e.g. ``"fork"``, ``"spawn"``); None: the platform default.

    Batches are what the source's samples collate to (:func:`collate_samples`): for images
    ``{"image": uint8 (B, 3, S, S), "y": int64 (B,), "caption": list[str]}`` as the source provides.

    Use one iterator at a time: ``state_dict`` describes the batches the latest iterator handed out.
    """

    def __init__(self, source: SampleSource, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle: bool = True, resampled: bool = False,
                 prefetch_factor: int = 2, multiprocessing_context: Any = None):
        _check_common(batch_size, rank, world_size, seed)
        if not isinstance(source, SampleSource):
            raise TypeError(f"source must be a SampleSource, got {type(source).__name__}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be a positive int, got {prefetch_factor!r}")
        self.source = source
        self.items: List[str] = list(source.items())
        if not self.items:
            raise ValueError(f"{source.name} source has no items to read")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.shuffle, self.resampled = num_workers, bool(shuffle), bool(resampled)
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self.slots_per_rank = max(1, num_workers)
        self.num_slots = world_size * self.slots_per_rank
        self.split = "by item" if len(self.items) >= self.num_slots else "by sample"
        self._slot_states = [initial_slot_state(rank * self.slots_per_rank + k)
                             for k in range(self.slots_per_rank)]
        self._next_slot = 0  # local slot whose batch comes next (the rotation)
        self._reader: Optional[_SlotReader] = None  # num_workers == 0: kept open between iterators
        self._worker_init_done = False

    # ---- iteration --------------------------------------------------------------------------------
    def _reader_args(self) -> Dict[str, Any]:
        return {"num_slots": self.num_slots, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "resampled": self.resampled}

    def __iter__(self) -> Iterator[Batch]:
        if self.num_workers == 0:
            return self._iter_in_process()
        return self._iter_workers()

    def _iter_in_process(self) -> Iterator[Batch]:
        if not self._worker_init_done:
            self.source.worker_init()
            self._worker_init_done = True
        if self._reader is None:
            self._reader = _SlotReader(self.source, self.items, slot=self.rank, state=self._slot_states[0],
                                       **self._reader_args())
        reader = self._reader
        while True:
            if reader is not self._reader:
                return  # load_state_dict replaced the position: this iterator is stale
            batch = reader.next_batch()
            self._slot_states[0] = reader.state()
            yield batch

    def _iter_workers(self) -> Iterator[Batch]:
        workers = self.num_workers
        first = self._next_slot
        stream = _WorkerStream(self.source, self.items, self._reader_args(),
                               [dict(s) for s in self._slot_states], first, self.rank, workers)
        # DataLoader draws its workers' base seed from ``generator``; giving it one keeps the global RNG
        # untouched (our readers use no torch RNG at all).
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, 2))
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, collate_fn=_keep, in_order=True,
            prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context,
            generator=generator, persistent_workers=False)
        batches = iter(loader)
        expected = first
        try:
            while True:
                local, batch, state = next(batches)
                if local != expected:  # the rotation is what makes the sequence deterministic
                    raise RuntimeError(f"StreamingDataset: DataLoader returned a batch of worker slot {local} "
                                       f"where slot {expected} was due; batches would be out of order")
                self._slot_states[local] = state
                self._next_slot = expected = (local + 1) % workers
                yield batch
        finally:
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Plain values: the setup (checked on load), every slot's position after its last batch handed
        out (``epoch``, ``item_index``, ``offset``, skip counts, ...) and ``next_slot`` (the rotation)."""
        return {"kind": type(self).__name__, "source": self.source.name, "num_items": len(self.items),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "resampled": self.resampled, "next_slot": self._next_slot,
                "slots": [{**s, "skips": dict(s["skips"])} for s in self._slot_states]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue exactly after the last batch of ``state``; ValueError naming the mismatch when it is
        from another setup (source kind, item count, seed, rank, world size, workers, batch size, ...)."""
        if not isinstance(state, dict):
            raise ValueError(f"StreamingDataset.load_state_dict: expected a dict, got {type(state).__name__}")
        self._check_state(state, ("seed", "rank", "world_size", "num_workers", "batch_size", "shuffle",
                                  "resampled"))
        if state.get("source") != self.source.name:
            raise ValueError(f"StreamingDataset.load_state_dict: state is for a {state.get('source')!r} source, "
                             f"this dataset reads {self.source.name!r}")
        if state.get("num_items") != len(self.items):
            raise ValueError(f"StreamingDataset.load_state_dict: state has num_items={state.get('num_items')!r}, "
                             f"the {self.source.name} source now has {len(self.items)} items")
        slots = state.get("slots")
        if not isinstance(slots, list) or len(slots) != self.slots_per_rank:
            raise ValueError(f"StreamingDataset.load_state_dict: need {self.slots_per_rank} slot states, "
                             f"got {slots!r:.200}")
        next_slot = state.get("next_slot")
        if not isinstance(next_slot, int) or not 0 <= next_slot < self.slots_per_rank:
            raise ValueError(f"StreamingDataset.load_state_dict: bad next_slot {next_slot!r}")
        checked = []
        for k, slot_state in enumerate(slots):
            checked.append(self._checked_slot_state(k, slot_state))
        self._slot_states, self._next_slot, self._reader = checked, next_slot, None

    def _checked_slot_state(self, local: int, slot_state: Any) -> Dict[str, Any]:
        where = f"StreamingDataset.load_state_dict: slot {local}"
        if not isinstance(slot_state, dict):
            raise ValueError(f"{where}: expected a dict, got {type(slot_state).__name__}")
        expected_slot = self.rank * self.slots_per_rank + local
        if slot_state.get("slot") != expected_slot:
            raise ValueError(f"{where}: state is for slot {slot_state.get('slot')!r}, expected {expected_slot}")
        out: Dict[str, Any] = {"slot": expected_slot}
        for key in ("epoch", "item_index", "offset", "good_in_epoch", "empty_epochs"):
            value = slot_state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be a non-negative int, got {value!r}")
            out[key] = value
        skips = slot_state.get("skips")
        if not isinstance(skips, dict) or not all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                                  for k, v in skips.items()):
            raise ValueError(f"{where}: skips must map reasons to counts, got {skips!r:.200}")
        out["skips"] = dict(skips)
        probe = _SlotReader(self.source, self.items, slot=expected_slot, **self._reader_args())
        if out["item_index"] > len(probe.my_items(out["epoch"])):
            raise ValueError(f"{where}: item_index {out['item_index']} is past the slot's "
                             f"{len(probe.my_items(out['epoch']))} items of epoch {out['epoch']}")
        return out

    # ---- reporting --------------------------------------------------------------------------------
    def skip_counts(self) -> Dict[str, int]:
        """Skipped positions by reason, over all slots of this rank, up to the last batch handed out."""
        return skip_counts_of_state({"slots": self._slot_states})

    @property
    def epoch(self) -> int:
        """The lowest epoch any slot of this rank is reading (a rough progress figure for logs)."""
        return min(s["epoch"] for s in self._slot_states)

    def __repr__(self) -> str:
        skipped = sum(self.skip_counts().values())
        return (f"StreamingDataset(source={self.source.name!r}, items={len(self.items)}, "
                f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"num_workers={self.num_workers}, slots={self.num_slots} ({self.split}), "
                f"shuffle={self.shuffle}, resampled={self.resampled}, seed={self.seed}, epoch={self.epoch}, "
                f"skipped={skipped})")
