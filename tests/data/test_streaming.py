"""The streaming framework (fastdit.data.streaming) on a tiny in-memory source: splitting over ranks and
workers, infinite iteration, exact resume, skips, the all-bad error."""
import itertools
import random

import numpy as np
import pytest
import torch

from fastdit.data.streaming import SampleSource, Skip, StreamingDataset, collate_samples

FORK = "fork"


class CountingSource(SampleSource):
    """Items ``"item{i}"`` with ``lengths[i]`` positions; sample ``{"id": i * 1000 + p, "epoch": epoch}``;
    positions listed in ``bad`` (as ids) are ``Skip("bad")``."""

    name = "counting"

    def __init__(self, lengths, bad=(), all_bad=False):
        self.lengths, self.bad, self.all_bad = list(lengths), set(bad), all_bad

    def items(self):
        return [f"item{i}" for i in range(len(self.lengths))]

    def read(self, item, start):
        return self.read_positions(item, start)

    def read_positions(self, item, start, stride=1, epoch=0):
        index = int(item[4:])
        for position in range(start, self.lengths[index], stride):
            ident = index * 1000 + position
            if self.all_bad or ident in self.bad:
                yield Skip("bad")
            else:
                yield {"id": ident, "epoch": epoch, "caption": f"c{ident}"}


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def ids(batches, epoch=None):
    out = []
    for b in batches:
        for i, e in zip(b["id"].tolist(), b["epoch"].tolist()):
            if epoch is None or e == epoch:
                out.append(i)
    return out


def take_until_epoch_done(dataset, limit=500):
    """Batches until every slot of the dataset has moved past epoch 0 (bounded)."""
    batches = []
    iterator = iter(dataset)
    while min(s["epoch"] for s in dataset.state_dict()["slots"]) < 1:
        batches.append(next(iterator))
        assert len(batches) < limit, "epoch 0 never ended"
    return batches


def all_ids(source):
    return {i * 1000 + p for i, n in enumerate(source.lengths) for p in range(n)} - source.bad


def test_batches_and_one_rank_epoch_coverage():
    source = CountingSource([5, 7, 3, 9])
    dataset = StreamingDataset(source, 4, seed=3)
    batches = take_until_epoch_done(dataset)
    assert batches[0]["id"].shape == (4,) and batches[0]["id"].dtype == torch.int64
    assert batches[0]["caption"] == [f"c{i}" for i in batches[0]["id"].tolist()]
    seen = ids(batches, epoch=0)
    assert sorted(seen) == sorted(all_ids(source))
    # The next epoch is another shuffle of the items.
    more = take(dataset, 30)
    assert set(ids(more, epoch=1)) <= all_ids(source)


@pytest.mark.parametrize("lengths", [[4, 6, 5, 7, 3, 8, 2, 9, 5], [11, 3], [40]],
                         ids=["by-item", "by-sample-2-items", "by-sample-1-item"])
def test_two_ranks_two_workers_split(lengths):
    """2 ranks x 2 DataLoader workers = 4 slots: disjoint, complete epoch 0, equal batch counts; with
    fewer items than slots every rank still gets data."""
    source = CountingSource(lengths)
    per_rank = []
    for rank in range(2):
        dataset = StreamingDataset(source, 3, seed=5, rank=rank, world_size=2, num_workers=2,
                                   multiprocessing_context=FORK)
        per_rank.append(take_until_epoch_done(dataset))
        assert len(take(dataset, 4)) == 4  # keeps going: any number of batches on every rank
    seen = [ids(b, epoch=0) for b in per_rank]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_ids(source))
    assert all(len(s) == len(set(s)) for s in seen)


def test_fewer_items_than_slots_reaches_every_slot_without_workers():
    source = CountingSource([1, 1, 1])  # 3 one-sample items, 4 ranks: a rank with no shard of its own
    batches = [take(StreamingDataset(source, 2, seed=0, rank=r, world_size=4), 3) for r in range(4)]
    assert all(len(b) == 3 for b in batches)
    assert StreamingDataset(source, 2, world_size=4).split == "by sample"


def test_very_unequal_items_do_not_starve_a_rank():
    source = CountingSource([1, 500, 1, 2])
    for rank in range(2):
        dataset = StreamingDataset(source, 4, seed=1, rank=rank, world_size=2)
        assert len(take(dataset, 60)) == 60


def test_workers_rotate_in_fixed_order():
    """1 rank x 2 workers reads the same slots as 2 ranks x 0 workers, interleaved slot 0, 1, 0, 1."""
    source = CountingSource([6, 5, 9, 4, 7])
    with_workers = take(StreamingDataset(source, 3, seed=2, num_workers=2, multiprocessing_context=FORK), 10)
    slot0 = take(StreamingDataset(source, 3, seed=2, rank=0, world_size=2), 5)
    slot1 = take(StreamingDataset(source, 3, seed=2, rank=1, world_size=2), 5)
    expected = [b for pair in zip(slot0, slot1) for b in pair]
    assert [b["id"].tolist() for b in with_workers] == [b["id"].tolist() for b in expected]


def assert_same_batches(a, b):
    assert [x["id"].tolist() for x in a] == [x["id"].tolist() for x in b]
    assert [x["epoch"].tolist() for x in a] == [x["epoch"].tolist() for x in b]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers, k", [(0, 5), (2, 4), (2, 5), (3, 7)],
                         ids=["in-process", "2-workers-rotation-start", "2-workers-mid-rotation",
                              "3-workers-mid-rotation"])
def test_exact_resume(num_workers, k, tmp_path):
    source = CountingSource([5, 8, 3, 6, 4, 7, 2], bad={1002, 3000})
    make = lambda: StreamingDataset(source, 3, seed=11, rank=1, world_size=2, num_workers=num_workers,  # noqa: E731
                                    multiprocessing_context=FORK)
    uninterrupted = take(make(), k + 6)
    first = make()
    assert_same_batches(take(first, k), uninterrupted[:k])
    state = first.state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded == state
    resumed = make()
    resumed.load_state_dict(loaded)
    assert resumed.skip_counts() == first.skip_counts()
    assert_same_batches(take(resumed, 6), uninterrupted[k:])


def test_resume_after_partial_iteration_and_second_iterator():
    """A fresh iterator continues where the last batch handed out left off (in-process reader)."""
    source = CountingSource([7, 7, 7])
    reference = take(StreamingDataset(source, 2, seed=4), 8)
    dataset = StreamingDataset(source, 2, seed=4)
    got = take(dataset, 3) + take(dataset, 5)
    assert_same_batches(got, reference)


def test_state_rejects_other_setups():
    source = CountingSource([4, 4, 4, 4])
    state = StreamingDataset(source, 2, seed=1, rank=0, world_size=2).state_dict()
    for kwargs, word in [({"seed": 2, "rank": 0, "world_size": 2}, "seed"),
                         ({"seed": 1, "rank": 1, "world_size": 2}, "rank"),
                         ({"seed": 1, "rank": 0, "world_size": 4}, "world_size"),
                         ({"seed": 1, "rank": 0, "world_size": 2, "num_workers": 2}, "num_workers")]:
        with pytest.raises(ValueError, match=word):
            StreamingDataset(source, 2, **kwargs).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        StreamingDataset(CountingSource([4, 4, 4]), 2, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="state is for"):
        StreamingDataset(source, 2, seed=1, world_size=2).load_state_dict({**state, "kind": "Other"})
    bad_slot = {**state, "slots": [{**state["slots"][0], "offset": -1}]}
    with pytest.raises(ValueError, match="offset"):
        StreamingDataset(source, 2, seed=1, world_size=2).load_state_dict(bad_slot)


def test_skips_are_counted_and_never_batched():
    bad = {0, 2, 1001, 1004, 2003}
    source = CountingSource([5, 5, 5], bad=bad)
    dataset = StreamingDataset(source, 2, seed=0, shuffle=False)
    batches = take(dataset, 5)  # exactly the 10 good samples of epoch 0 (the last position is good)
    assert sorted(ids(batches)) == sorted(all_ids(source))
    assert dataset.skip_counts() == {"bad": 5}
    assert "skipped=5" in repr(dataset)


def test_skip_counts_summed_over_workers():
    source = CountingSource([4, 4, 4, 4], bad={0, 1000, 2000, 3000})
    dataset = StreamingDataset(source, 3, seed=0, shuffle=False, num_workers=2, multiprocessing_context=FORK)
    take(dataset, 2)  # one batch per worker: each read 2 items of 3 good + 1 bad
    assert dataset.skip_counts() == {"bad": 2}


def test_all_bad_data_raises_after_one_pass():
    source = CountingSource([3, 4], all_bad=True)
    with pytest.raises(RuntimeError, match="no usable sample"):
        take(StreamingDataset(source, 2, seed=0), 1)
    with pytest.raises(RuntimeError, match="no usable sample"):
        take(StreamingDataset(source, 2, seed=0, num_workers=2, multiprocessing_context=FORK), 1)


def test_mostly_bad_shards_still_stream():
    """Slots whose whole share is bad keep going when other items have good samples."""
    source = CountingSource([3] * 8, bad={i * 1000 + p for i in range(7) for p in range(3)})
    for rank in range(4):
        got = take(StreamingDataset(source, 2, seed=9, rank=rank, world_size=4), 2)
        assert set(ids(got)) <= {7000, 7001, 7002}


def test_resampled_draws_with_replacement_and_resumes():
    source = CountingSource([2] * 10)
    dataset = StreamingDataset(source, 2, seed=6, resampled=True)
    batches = take_until_epoch_done(dataset)
    epoch0 = ids(batches, epoch=0)
    assert len(epoch0) == 20 and len(set(epoch0)) < 20  # some item drawn twice
    again = StreamingDataset(source, 2, seed=6, resampled=True)
    assert_same_batches(take(again, 4), batches[:4])
    state = again.state_dict()
    resumed = StreamingDataset(source, 2, seed=6, resampled=True)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 3), take(again, 3))


def test_global_rng_untouched():
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    source = CountingSource([5, 5, 5])
    take(StreamingDataset(source, 2, seed=1), 4)
    take(StreamingDataset(source, 2, seed=1, num_workers=2, multiprocessing_context=FORK), 4)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert random.getstate() == py_state


def test_collate_rejects_mixed_keys_and_bad_values():
    with pytest.raises(ValueError, match="different keys"):
        collate_samples([{"a": 1}, {"b": 1}])
    with pytest.raises(TypeError, match="name"):
        collate_samples([{"name": "x"}])
    batch = collate_samples([{"x": torch.zeros(2), "y": 1, "caption": "a"}, {"x": torch.ones(2), "y": 2,
                                                                             "caption": "b"}])
    assert batch["x"].shape == (2, 2) and batch["y"].dtype == torch.int64 and batch["caption"] == ["a", "b"]


def test_constructor_errors_and_repr():
    with pytest.raises(ValueError, match="no items"):
        StreamingDataset(CountingSource([]), 2)
    with pytest.raises(ValueError, match="num_workers"):
        StreamingDataset(CountingSource([1]), 2, num_workers=-1)
    with pytest.raises(TypeError, match="SampleSource"):
        StreamingDataset(object(), 2)
    text = repr(StreamingDataset(CountingSource([1, 2]), 2, rank=1, world_size=4, num_workers=2))
    assert "counting" in text and "rank=1/4" in text and "slots=8 (by sample)" in text


def test_slot_that_can_never_get_a_good_sample_stops_with_a_clear_error():
    """No shuffle: slot 1 of 2 reads items 1 and 3 every epoch, and both are bad while the data set has
    good samples elsewhere; it must not spin forever."""
    source = CountingSource([2, 2, 2, 2], bad={1000, 1001, 3000, 3001})
    assert len(take(StreamingDataset(source, 2, rank=0, world_size=2, shuffle=False), 3)) == 3
    with pytest.raises(RuntimeError, match="consecutive epochs"):
        take(StreamingDataset(source, 2, rank=1, world_size=2, shuffle=False), 1)


class BrokenSource(CountingSource):
    def read_positions(self, item, start, stride=1, epoch=0):
        yield {"id": 1, "epoch": 0, "caption": "x"}
        raise OSError("disk on fire")


def test_source_errors_name_the_item():
    with pytest.raises(RuntimeError, match="item0.*position 1.*disk on fire"):
        take(StreamingDataset(BrokenSource([3]), 2, shuffle=False), 1)
