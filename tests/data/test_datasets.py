import itertools

import pytest
import torch

from fastdit.data import StatefulDataset, SyntheticLatents, TensorDictDataset


def _tensors(n=23):
    return {"x": torch.arange(n).float()[:, None].repeat(1, 3), "y": torch.arange(n)}


def _take(ds, k):
    return [b for b in itertools.islice(iter(ds), k)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_equal_and_cover_an_epoch(world):
    n = 23
    per_rank = [TensorDictDataset(_tensors(n), 1, seed=5, rank=r, world_size=world) for r in range(world)]
    epoch0 = [torch.cat([b["y"] for b in _take(ds, n // world)]) for ds in per_rank]
    ids = torch.cat(epoch0)
    assert len(ids) == (n // world) * world and len(set(ids.tolist())) == len(ids)  # disjoint
    assert all(ds.epoch == 1 and ds.index == 0 for ds in per_rank)  # equal counts per rank
    for b in _take(per_rank[0], 2):
        assert torch.equal(b["x"][:, 0].long(), b["y"])  # keys stay aligned


def test_epochs_reshuffle_and_are_deterministic_per_seed():
    a = torch.cat([b["y"] for b in _take(TensorDictDataset(_tensors(), 23, seed=1), 3)])
    b = torch.cat([b["y"] for b in _take(TensorDictDataset(_tensors(), 23, seed=1), 3)])
    c = torch.cat([b["y"] for b in _take(TensorDictDataset(_tensors(), 23, seed=2), 3)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[:23], a[23:46]) and sorted(a[:23].tolist()) == list(range(23))
    plain = torch.cat([b["y"] for b in _take(TensorDictDataset(_tensors(), 5, shuffle=False), 2)])
    assert plain.tolist() == list(range(10))


def test_batches_continue_across_epochs_and_iteration_is_infinite():
    ds = TensorDictDataset(_tensors(5), 3, seed=0)
    batches = _take(ds, 20)
    assert all(len(b["y"]) == 3 for b in batches)
    assert ds.epoch == 12 and ds.index == 0


@pytest.mark.parametrize("cls", ["memory", "synthetic"])
def test_state_round_trip_resumes_with_the_next_batch(cls):
    def make():
        if cls == "memory":
            return TensorDictDataset(_tensors(), 4, seed=3, rank=1, world_size=2)
        return SyntheticLatents((2, 3, 3), 4, num_classes=7, seed=3, rank=1, world_size=2)
    full = _take(make(), 9)
    first = make()
    _take(first, 4)
    again = make()
    again.load_state_dict(first.state_dict())
    for want, got in zip(full[4:], _take(again, 5)):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert isinstance(again, StatefulDataset)


def test_state_from_another_setup_is_refused():
    a = TensorDictDataset(_tensors(), 4, seed=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        TensorDictDataset(_tensors(), 4, seed=3, rank=1, world_size=2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="is for 'TensorDictDataset'"):
        SyntheticLatents((1,), 4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="bad position"):
        a.load_state_dict({**a.state_dict(), "index": 999})


def test_synthetic_is_deterministic_per_seed_rank_step():
    a = SyntheticLatents((4, 8, 8), 3, num_classes=10, seed=0, rank=0, world_size=2)
    b = SyntheticLatents((4, 8, 8), 3, num_classes=10, seed=0, rank=1, world_size=2)
    x0, x1 = _take(a, 2), _take(b, 2)
    assert x0[0]["x"].shape == (3, 4, 8, 8) and x0[0]["y"].dtype == torch.int64
    assert not torch.equal(x0[0]["x"], x1[0]["x"]) and not torch.equal(x0[0]["x"], x0[1]["x"])
    assert torch.equal(a.batch_at(1)["x"], x0[1]["x"])
    assert 0 <= int(x0[0]["y"].min()) and int(x0[0]["y"].max()) < 10
    assert "y" not in SyntheticLatents((2,), 2, num_classes=0).batch_at(0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _take(a, 3)
    assert torch.equal(torch.get_rng_state(), before)  # no global RNG is touched


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size"), (dict(rank=2, world_size=2), "rank"), (dict(seed=-1), "seed"),
])
def test_bad_arguments(kwargs, message):
    args = dict(batch_size=2, rank=0, world_size=1, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TensorDictDataset(_tensors(), **args)
    with pytest.raises(ValueError, match="same first dimension"):
        TensorDictDataset({"x": torch.zeros(3), "y": torch.zeros(4)}, 2)
    with pytest.raises(ValueError, match="cannot be sharded"):
        TensorDictDataset({"x": torch.zeros(1)}, 1, world_size=2, rank=1)
