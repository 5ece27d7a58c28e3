"""RamCache: byte-capped, thread-safe LRU of url -> bytes."""
from __future__ import annotations

import random
import threading

import pytest

from fastdit.data.ram_cache import RamCache


def test_get_put_counts_hits_and_misses():
    cache = RamCache(100)
    assert cache.get("a") is None
    assert cache.put("a", b"12345")
    assert cache.get("a") == b"12345"
    assert (cache.hits, cache.misses, len(cache), cache.nbytes) == (1, 1, 1, 5)
    assert "a" in cache and "b" not in cache


def test_evicts_least_recently_used_to_stay_under_the_cap():
    cache = RamCache(10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    cache.get("a")  # a is now the most recently used
    cache.put("c", b"cccc")  # 12 > 10: b goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 8 <= cache.max_bytes


def test_item_larger_than_the_cap_is_not_cached_and_evicts_nothing():
    cache = RamCache(10)
    cache.put("a", b"aaaa")
    assert not cache.put("huge", b"x" * 11)
    assert "huge" not in cache and "a" in cache and cache.nbytes == 4


def test_replacing_a_key_updates_the_byte_count():
    cache = RamCache(10)
    cache.put("a", b"aaaa")
    cache.put("a", b"aaaaaaaa")
    assert (len(cache), cache.nbytes) == (1, 8)
    assert not cache.put("a", b"x" * 20)  # too large: the old value is dropped too (it is stale)
    assert (len(cache), cache.nbytes) == (0, 0)


def test_zero_cap_disables_and_bad_arguments_are_refused():
    cache = RamCache(0)
    assert not cache.put("a", b"x") and cache.get("a") is None
    with pytest.raises(ValueError, match="max_bytes"):
        RamCache(-1)
    with pytest.raises(TypeError, match="bytes"):
        RamCache(10).put("a", "text")


def test_clear_and_repr():
    cache = RamCache(10)
    cache.put("a", b"abc")
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert "0/10 bytes" in repr(cache)


def test_concurrent_use_keeps_the_cap_and_the_accounting():
    cache = RamCache(5_000)
    errors = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(2_000):
                key = f"k{rng.randrange(200)}"
                if rng.random() < 0.5:
                    cache.put(key, bytes(rng.randrange(1, 400)))
                else:
                    value = cache.get(key)
                    assert value is None or isinstance(value, bytes)
                assert cache.nbytes <= cache.max_bytes
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert cache.nbytes <= cache.max_bytes
    assert cache.nbytes == sum(len(cache.get(k) or b"") for k in [f"k{i}" for i in range(200)])
    assert cache.hits + cache.misses > 0
