"""Prefetcher: the same batches in the same order as direct iteration, the position of the last batch
used (not the dataset's, which runs ahead), a rewind on close, and the dataset's errors raised in the
consumer."""
import pytest
import torch

from fastdit.data import Prefetcher, SyntheticLatents, TensorDictDataset


def _datasets():
    yield SyntheticLatents((4, 8, 8), 5, num_classes=10, seed=3)
    gen = torch.Generator().manual_seed(0)
    # 13 samples in batches of 4: epochs end mid-batch, the shuffle reseeds every epoch
    yield TensorDictDataset({"x": torch.randn(13, 4, 2, 2, generator=gen), "y": torch.arange(13)}, 4, seed=1)


def _fresh(like):
    if isinstance(like, SyntheticLatents):
        return SyntheticLatents((4, 8, 8), 5, num_classes=10, seed=3)
    gen = torch.Generator().manual_seed(0)
    return TensorDictDataset({"x": torch.randn(13, 4, 2, 2, generator=gen), "y": torch.arange(13)}, 4, seed=1)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("index", [0, 1])
def test_same_batches_and_positions_as_direct_iteration(depth, index):
    dataset = list(_datasets())[index]
    reference = _fresh(dataset)
    expected, states = [], []
    it = iter(reference)
    for _ in range(9):
        expected.append(next(it))
        states.append(reference.state_dict())
    with Prefetcher(dataset, depth) as prefetcher:
        assert prefetcher.position == _fresh(dataset).state_dict()  # nothing used yet
        for want, state in zip(expected, states):
            _same(next(prefetcher), want)
            assert prefetcher.position == state


@pytest.mark.parametrize("index", [0, 1])
def test_close_rewinds_the_dataset_to_the_first_unused_batch(index):
    dataset = list(_datasets())[index]
    reference = _fresh(dataset)
    it = iter(reference)
    want = [next(it) for _ in range(6)]
    prefetcher = Prefetcher(dataset, depth=4)
    for k in range(4):
        _same(next(prefetcher), want[k])
    torch.manual_seed(0)
    prefetcher.close()
    assert not prefetcher._thread.is_alive()
    prefetcher.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(prefetcher)
    again = iter(dataset)  # continues with batch 4, not where the thread had got to
    _same(next(again), want[4])
    _same(next(again), want[5])


class _Breaks:
    """Yields two batches, then raises (or ends)."""

    def __init__(self, error):
        self.error, self.step = error, 0

    def __iter__(self):
        while True:
            if self.step == 2:
                if self.error is None:
                    return
                raise self.error
            self.step += 1
            yield {"x": torch.full((2,), float(self.step))}

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def test_a_dataset_error_is_raised_by_the_next_that_would_return_its_batch():
    with Prefetcher(_Breaks(OSError("shard 7 unreadable")), depth=3) as prefetcher:
        assert next(prefetcher)["x"][0] == 1 and next(prefetcher)["x"][0] == 2
        with pytest.raises(OSError, match="shard 7 unreadable"):
            next(prefetcher)
        assert prefetcher.position == {"step": 2}


def test_an_ending_dataset_ends_the_iteration():
    with Prefetcher(_Breaks(None), depth=2) as prefetcher:
        assert [float(b["x"][0]) for b in prefetcher] == [1.0, 2.0]


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_bad_depth_is_refused(depth):
    with pytest.raises(ValueError, match="depth must be a positive integer"):
        Prefetcher(SyntheticLatents((1,), 1), depth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches():
    with Prefetcher(SyntheticLatents((4, 8, 8), 2, num_classes=3), pin_memory=True,
                    device=torch.device("cuda", torch.cuda.device_count() - 1)) as prefetcher:
        batch = next(prefetcher)
    assert all(v.is_pinned() for v in batch.values())
