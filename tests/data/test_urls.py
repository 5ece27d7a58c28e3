"""URL tables and the UrlImages source, against the local fault server of test_fetch.py (127.0.0.1 only)."""
from __future__ import annotations

import importlib.util
import json
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastdit.data.fetch import FetchPolicy
from fastdit.data.ram_cache import RamCache
from fastdit.data.streaming import Skip, StreamingDataset
from fastdit.data.urls import UrlImages, UrlTable, read_url_table


def _load_fault_server_module():
    """test_fetch.py holds the FaultServer (tests import nothing from sys.path: importlib mode)."""
    path = Path(__file__).with_name("test_fetch.py")
    spec = importlib.util.spec_from_file_location("fastdit_test_fault_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fs = _load_fault_server_module()
SIZE = 32


@pytest.fixture
def server():
    srv = fs.FaultServer()
    yield srv
    srv.close()


def policy(**kw) -> FetchPolicy:
    args = dict(deadline_s=0.5, allow_networks=("127.0.0.1/32",), retries=1, backoff_s=0.01, max_bytes=200_000)
    args.update(kw)
    return FetchPolicy(**args)


def write_jsonl(path: Path, rows: List[dict], extra_lines: Tuple[str, ...] = ()) -> str:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


# Every fault kind the server can inject, with the skip reason UrlImages must report for it.
def fault_urls(server) -> Dict[str, Tuple[str, str]]:
    """kind -> (url, expected skip reason)."""
    server.add("notimage", b"<html>not an image</html>", "text/html")
    server.add("bomb.png", fs.make_png_bomb(), "image/png")
    cut = fs.make_jpeg(seed=99)
    server.add("cut.jpg", cut[: len(cut) // 2], "image/jpeg")
    redirect = lambda to: server.url("/redirect?" + urllib.parse.urlencode({"to": to}))  # noqa: E731
    return {
        "404": (server.url("/status/404"), "fetch: http 4xx"),
        "500": (server.url("/status/500"), "fetch: http 5xx"),
        "503": (server.url("/status/503"), "fetch: http 5xx"),
        "stall": (server.url("/stall"), "fetch: timeout"),
        "truncated": (server.url("/truncated"), "fetch: truncated"),
        "oversize": (server.url("/oversize/300000"), "fetch: too large"),
        "empty": (server.url("/empty"), "fetch: empty"),
        "loop": (server.url("/loop/a"), "fetch: redirect loop"),
        "to-private": (redirect("http://10.0.0.1/x.jpg"), "fetch: refused address"),
        "to-metadata": (redirect("http://169.254.169.254/latest/"), "fetch: refused address"),
        "rebind": ("http://rebind.test/x.jpg", "fetch: refused address"),
        "ftp": ("ftp://127.0.0.1/x.jpg", "fetch: bad scheme"),
        "notimage": (server.url("/file/notimage"), "image: not an image"),
        "bomb": (server.url("/file/bomb.png"), "image: too large"),
        "cut-jpeg": (server.url("/file/cut.jpg"), "image: truncated"),
    }


def build_rows(server, n: int, fault_at, *, flaky_every: int = 0) -> Tuple[List[dict], Counter, List[str]]:
    """``n`` rows ``{"url", "caption": "row i"}``; rows where ``fault_at(i)`` is true get the fault kinds in
    turn, the others a JPEG (every ``flaky_every``-th of those through a 503-once route). Returns the
    rows, the expected skip counts and the captions of the good rows."""
    faults = fault_urls(server)
    kinds = list(faults)
    rows, expected, good, k = [], Counter(), [], 0
    for i in range(n):
        if fault_at(i):
            url, reason = faults[kinds[k % len(kinds)]]
            k += 1
            expected[reason] += 1
        else:
            name = f"img{i}.jpg"
            server.add(name, fs.make_jpeg(size=48, seed=i), "image/jpeg")
            if flaky_every and i % flaky_every == 0:
                server.flaky[name] = 1
                url = server.url(f"/flaky/{name}")
            else:
                url = server.url(f"/file/{name}")
            good.append(f"row {i}")
        rows.append({"url": url, "caption": f"row {i}"})
    return rows, expected, good


def make_source(table, **kw) -> UrlImages:
    args = dict(size=SIZE, chunk_size=8, concurrency=8, seed=0, policy=policy(),
                resolver=fs.StubResolver({"rebind.test": ["10.1.2.3"]}))
    args.update(kw)
    return UrlImages(table, **args)


def read_all(source: UrlImages) -> List:
    return [v for item in source.items() for v in source.read(item, 0)]


# ---- metadata ------------------------------------------------------------------------------------------
def test_parquet_with_img2dataset_columns_and_filters(tmp_path):
    table = pa.table({"URL": ["http://a/1", "http://a/2", None, "http://a/4", "http://a/5"],
                      "TEXT": ["one", "two", "three", None, "five"],
                      "WIDTH": [512, 100, 512, 300, None], "HEIGHT": [512, 512, 512, 300, 400],
                      "similarity": [0.35, 0.4, 0.5, 0.2, 0.9]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    t = read_url_table(str(tmp_path / "*.parquet"), min_width=256)
    (f,) = t.files
    assert f.urls == ["http://a/1", "http://a/4"] and f.captions == ["one", ""]
    assert (f.rows_in_file, f.bad_rows, f.filtered_out) == (5, 1, 2)  # null URL; width 100 and null width
    t = read_url_table(tmp_path / "part-0.parquet", min_similarity=0.3, min_height=400)
    assert t.files[0].urls == ["http://a/1", "http://a/2", "http://a/5"]
    assert len(read_url_table(str(tmp_path))) == 4  # a directory; no filters


def test_jsonl_skips_and_counts_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "urls.jsonl",
                       [{"url": "http://a/1", "caption": "c1", "width": 300}, {"url": "http://a/2", "width": 10},
                        {"url": 5}, {"caption": "no url"}],
                       extra_lines=("{not json", "[1, 2]", "", '"just a string"'))
    t = read_url_table(path, min_width=100)
    (f,) = t.files
    assert f.urls == ["http://a/1"] and f.captions == ["c1"]
    assert f.bad_rows == 5 and f.filtered_out == 1  # url 5, no url, 3 non-object lines (blank ignored)
    assert t.has_captions


def test_missing_url_column_and_no_match_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"link": ["x"], "TEXT": ["y"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet has no 'url' column.*'link', 'TEXT'"):
        read_url_table(str(tmp_path / "bad.parquet"))
    path = write_jsonl(tmp_path / "bad.jsonl", [{"href": "x", "alt": "y"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl has no 'url' field.*'href', 'alt'"):
        read_url_table(path)
    with pytest.raises(ValueError, match=r"no file matches '.*nothing-\*\.parquet'"):
        read_url_table(str(tmp_path / "nothing-*.parquet"))
    (tmp_path / "x.csv").write_text("url\nhttp://a\n")
    with pytest.raises(ValueError, match="neither parquet nor JSONL"):
        read_url_table(str(tmp_path / "x.csv"))


def test_items_are_row_chunks_per_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"url": f"http://a/{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"url": f"http://b/{i}"} for i in range(3)])
    src = UrlImages(str(tmp_path / "*.jsonl"), size=8, chunk_size=4)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert src.items() == [f"{a}#rows=0:4", f"{a}#rows=4:8", f"{a}#rows=8:10", f"{b}#rows=0:3"]
    assert src.name == "urls"
    with pytest.raises(ValueError, match="not one of this source's items"):
        list(src.read(f"{a}#rows=8:12", 0))
    with pytest.raises(ValueError, match="no usable rows"):
        UrlImages(UrlTable([]), size=8)


# ---- reading -------------------------------------------------------------------------------------------
def test_reads_images_and_captions_in_row_order_with_deterministic_flips(server, tmp_path):
    rows, _, good = build_rows(server, 20, lambda i: False)
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    values = read_all(make_source(path))
    assert [v["caption"] for v in values] == good
    for v in values:
        assert v["image"].dtype == torch.uint8 and v["image"].shape == (3, SIZE, SIZE)
    again = read_all(make_source(path, cache_bytes=0))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(values, again))
    plain = read_all(make_source(path, random_flip=False))
    flipped = [not torch.equal(a["image"], b["image"]) for a, b in zip(values, plain)]
    assert 3 <= sum(flipped) <= 17  # about half, drawn per row
    for a, b, f in zip(values, plain, flipped):
        if f:
            assert torch.equal(a["image"], b["image"].flip(-1))


def test_fault_accounting_is_exact(server, tmp_path):
    # 60 rows, 30% faults spread over every kind the server injects (15 kinds, some twice), plus
    # retried 503-once rows that must come through.
    rows, expected, good = build_rows(server, 60, lambda i: i % 10 in (1, 4, 7), flaky_every=5)
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    start = time.monotonic()
    values = read_all(make_source(path))
    elapsed = time.monotonic() - start
    assert len(values) == 60
    skips = Counter(v.reason for v in values if isinstance(v, Skip))
    assert skips == expected
    assert [v["caption"] for v in values if not isinstance(v, Skip)] == good
    assert sum(expected.values()) == 18
    assert elapsed < 8, elapsed


def test_resume_offsets_and_strides_fetch_only_their_rows(server, tmp_path):
    rows, _, _ = build_rows(server, 16, lambda i: i in (2, 9))
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    src = make_source(path, chunk_size=16)
    (item,) = src.items()
    full = list(src.read(item, 0))
    tail = list(make_source(path, chunk_size=16).read(item, 5))
    assert [_key(v) for v in tail] == [_key(v) for v in full[5:]]
    before = sum(server.hits.values())
    strided = list(make_source(path, chunk_size=16).read_positions(item, 1, 4))
    assert [_key(v) for v in strided] == [_key(v) for v in full[1::4]]
    assert sum(server.hits.values()) - before == 4  # rows 1, 5, 9, 13 only


def _key(value):
    return value.reason if isinstance(value, Skip) else value["caption"]


def test_cache_hits_skip_the_fetch_and_stay_under_the_cap(server, tmp_path):
    rows, _, _ = build_rows(server, 12, lambda i: False)
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    src = make_source(path)
    read_all(src)
    hits_after_first = sum(server.hits.values())
    assert hits_after_first == 12 and len(src.cache) == 12
    read_all(src)
    assert sum(server.hits.values()) == hits_after_first  # all from the cache
    assert src.cache.hits == 12
    one = len(fs.make_jpeg(size=48, seed=0))
    small = make_source(path, cache_bytes=3 * one + 100)
    read_all(small)
    assert small.cache.nbytes <= 3 * one + 100 and 1 <= len(small.cache) <= 4


def test_ram_cache_is_per_process_state_not_pickled(server, tmp_path):
    import pickle

    rows, _, _ = build_rows(server, 2, lambda i: False)
    src = make_source(write_jsonl(tmp_path / "u.jsonl", rows), resolver=__import__("socket").getaddrinfo)
    read_all(src)
    assert isinstance(src.cache, RamCache)
    clone = pickle.loads(pickle.dumps(src))
    assert clone.cache is None and clone.items() == src.items()


def _url_threads() -> int:
    return sum(t.name.startswith("fastdit-urls") for t in threading.enumerate())


def _wait_for_no_url_threads(seconds: float = 3) -> None:
    deadline = time.monotonic() + seconds
    while _url_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _url_threads() == 0


@pytest.mark.parametrize("drop", ["close", "del"])
def test_abandoned_generator_cancels_pending_fetches(server, tmp_path, drop):
    # The window (default 256) holds the whole chunk, but only the 4 threads' fetches may ever start:
    # the first wave (all stalled until the 0.5 s deadline) and, at most, the wave started as it ended.
    rows = [{"url": server.url("/stall"), "caption": str(i)} for i in range(40)]
    src = make_source(write_jsonl(tmp_path / "u.jsonl", rows), chunk_size=40, concurrency=4)
    (item,) = src.items()
    gen = src.read(item, 0)
    assert next(gen) == Skip("fetch: timeout")
    if drop == "close":
        gen.close()
    else:
        del gen  # dropped unclosed: the generator's finalizer closes it
    _wait_for_no_url_threads()
    assert server.hits["/stall"] <= 2 * 4 + 1  # never the whole chunk


def test_window_runs_ahead_of_a_blocked_row_with_few_threads(tmp_path):
    # Row 0 blocks (a stalled server); the other rows finish at once. The reader must submit exactly
    # `window` rows ahead while it waits, run them on at most `concurrency` threads, and still hand out
    # every row in order; no thread is left behind.
    path = write_jsonl(tmp_path / "u.jsonl", [{"url": f"http://a/{i}", "caption": str(i)} for i in range(40)])
    src = make_source(path, chunk_size=40, concurrency=3, window=12)
    (item,) = src.items()
    release, started, lock = threading.Event(), [], threading.Lock()
    peak = [0]

    def fake_load(fetcher, cache, file_index, row, epoch):
        with lock:
            started.append(row)
            peak[0] = max(peak[0], _url_threads())
        if row == 0:
            assert release.wait(10)
        return Skip(f"row {row}")

    src._load = fake_load
    out = []
    consumer = threading.Thread(target=lambda: out.extend(src.read(item, 0)))
    consumer.start()
    deadline = time.monotonic() + 5
    while len(started) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # nothing beyond the window may start while row 0 is held
    assert sorted(started) == list(range(12))
    release.set()
    consumer.join(10)
    assert [v.reason for v in out] == [f"row {i}" for i in range(40)]
    assert sorted(started) == list(range(40)) and peak[0] <= 3
    _wait_for_no_url_threads()
    assert make_source(path, concurrency=8, window=2).window == 8  # never fewer rows ahead than threads
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        make_source(path, window=0)


# ---- through StreamingDataset --------------------------------------------------------------------------
def test_streaming_dataset_in_process_counts_skips_exactly(server, tmp_path):
    # 40 rows in 5 chunks of 8, each chunk 2 faults (never its last row) and 6 good rows.
    rows, expected, good = build_rows(server, 40, lambda i: i % 8 in (0, 3))
    src = make_source(write_jsonl(tmp_path / "u.jsonl", rows))
    data = StreamingDataset(src, batch_size=6, seed=3)
    batches = [b for _, b in zip(range(5), data)]  # exactly one epoch
    assert all(b["image"].shape == (6, 3, SIZE, SIZE) for b in batches)
    assert sorted(c for b in batches for c in b["caption"]) == sorted(good)
    assert data.skip_counts() == dict(expected)


def test_two_ranks_two_workers_disjoint_rows_equal_batches_exact_skips(server, tmp_path):
    # 80 rows in 8 chunks of 10 (3 faults each, last row of a chunk always good): 4 slots (2 ranks x 2
    # workers) read 2 chunks each per epoch = 14 good rows = exactly 2 batches of 7.
    rows, expected, good = build_rows(server, 80, lambda i: i % 10 in (1, 4, 6))
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    captions, counts, skips = [], [], Counter()
    for rank in range(2):
        src = make_source(path, chunk_size=10, concurrency=4)
        data = StreamingDataset(src, batch_size=7, seed=11, rank=rank, world_size=2, num_workers=2,
                                multiprocessing_context="fork")
        it = iter(data)
        batches = [next(it) for _ in range(4)]
        it.close()
        counts.append(len(batches))
        assert all(b["image"].shape == (7, 3, SIZE, SIZE) for b in batches)
        rank_captions = [c for b in batches for c in b["caption"]]
        assert len(set(rank_captions)) == 28, (sorted(rank_captions), data.skip_counts())
        captions.append(set(rank_captions))
        skips.update(data.skip_counts())
    assert counts == [4, 4]
    assert not captions[0] & captions[1]  # no row on two ranks
    assert captions[0] | captions[1] == set(good)
    assert skips == expected
